"""PwoA (Jian et al. 2022): prune a robust model without adversarial examples.

Stage 1, ADMM pruning with distillation: loss = alpha T^2 KL(teacher || student at temperature T)
+ rho/2 sum_l |W_l - Z_l + U_l|^2, with Z the per-layer magnitude projection of W + U onto the
sparsity constraint and U the scaled dual, updated every ``admm_every`` epochs while rho grows by
``rho_growth`` up to ``rho_max``. Stage 2: hard magnitude prune to the target per layer. Stage 3:
masked retrain with distillation plus the HSIC bottleneck (fastprune.hsic_bottleneck) over the
student's hidden outputs (``block_outputs``: for the zoo's ResNet-18 and WRNs the same ones PwoA's
models return). No adversarial example is computed unless ``mix_ratio`` > 0: then, as in PwoA's code,
each batch of both stages is replaced by PGD examples of it with that probability, and the stage's
usual loss (distillation, + HSIC in the retrain, + the ADMM penalty) is computed on them.

The KL term is averaged over the batch and the classes, as PyTorch's elementwise "mean" in the papers'
code does: alpha = 10 and T = 30 mean what they mean there (the per-sample KL would be 10x larger on
ten classes and makes the paper's learning rates diverge).
"""
from __future__ import annotations

import copy
import random
import re
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.checks import check_count, check_positive
from ..models.external import ImageInput
from ..attacks.losses import logits_of
from ..nn.attention import to_prunable_attention
from ..nn.hsic import HSICBottleneck
from ..nn.masked import MASKED_OF, MASKED_TYPES, check_sparsity, kept_count, prune_model, topk_mask
from ..nn.sparse.training import sparse_training
from ..train.loops import fit
from ..train.objectives import MART, TRADES
from ..attacks.pgd import PGD


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                      alpha: float) -> torch.Tensor:
    """alpha T^2 KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch and the
    classes (student and teacher logits (N, classes) -> 0-dim)."""
    kl = F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.softmax(teacher_logits / temperature, dim=1),
                  reduction="batchmean")
    return alpha * temperature ** 2 * kl / student_logits.shape[1]


ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish)


def block_outputs(model: nn.Module) -> list[str]:
    """PwoA's hidden layers, the outputs of a model's blocks, for any model:

    1. what the model names itself (``model.hidden_outputs()``: the zoo's ResNets, WRNs, LeNet3);
    2. ResNet-style stages (children ``layer1``, ``layer2``, ... of blocks: torchvision's and timm's
       ResNets): every block's output;
    3. else the outermost sequence of blocks (an nn.Sequential or nn.ModuleList of at least two
       modules that all have weights; the longest of the outermost): MobileNet's, EfficientNet's and
       ConvNeXt's ``features``, a ViT's encoder layers, DeiT's ``blocks``: each one's output;
    4. else every activation module (ReLU, ReLU6, SiLU, GELU, ...) of a plain network.
    A model wrapped for its input (fastprune.models.ImageInput) is searched inside. Raises ValueError
    when nothing is found (then pass the layer names yourself: ``hsic_layers``)."""
    named = getattr(model, "hidden_outputs", None)
    if callable(named):
        return list(named())
    inner, prefix = (model.model, "model.") if isinstance(model, ImageInput) else (model, "")
    stages = [n for n, m in inner.named_children() if re.fullmatch(r"layer\d+", n) and isinstance(m, nn.Sequential)]
    if stages:
        return [f"{prefix}{stage}.{block}" for stage in stages for block, _ in inner.get_submodule(stage).named_children()]
    best = None
    for name, module in inner.named_modules():
        if not isinstance(module, (nn.Sequential, nn.ModuleList)) or len(module) < 2:
            continue
        children = list(module.named_children())
        if all(any(True for _ in child.parameters()) for _, child in children):
            rank = (name.count(".") + bool(name), -len(children))  # the shallowest, then the longest
            if best is None or rank < best[2]:
                best = (name, children, rank)
    if best is not None:
        return [f"{prefix}{best[0]}.{child}" if best[0] else f"{prefix}{child}" for child, _ in best[1]]
    found = [prefix + n for n, m in inner.named_modules() if isinstance(m, ACTIVATIONS)]
    if not found:
        raise ValueError("found no hidden layers for PwoA's HSIC bottleneck in this model (no hidden_outputs(), "
                         "no sequence of blocks, no activation modules): pass hsic_layers=[module names]")
    return found


PRUNE_LAYERS = ("pwoa", "all")
BASE_LOSSES = ("ce", "trades", "mart")


def pruned_layer_names(model: nn.Module, prune_layers: str = "pwoa", skip=()) -> list[str]:
    """The layers PwoA prunes. "pwoa": every nn.Conv2d and the nn.Linear layers named ``fc`` (PwoA's
    code prunes 4-D weights and parameters named ``fc.weight``: ResNet-18's ``linear`` and LeNet3's
    ``fc1``/``fc2`` stay dense); "all": every conv and linear layer. Minus the names in ``skip``."""
    if prune_layers not in PRUNE_LAYERS:
        raise ValueError(f"prune_layers must be one of {PRUNE_LAYERS}, got {prune_layers!r}")
    names = {n for n, _ in model.named_modules()}
    unknown = [n for n in skip if n not in names]
    if unknown:
        raise ValueError(f"skip names {unknown} are not modules of the model")
    chosen = []
    for name, module in model.named_modules():
        if type(module) not in MASKED_OF or name in skip:
            continue
        if prune_layers == "all" or type(module) is nn.Conv2d or name.split(".")[-1] == "fc":
            chosen.append(name)
    if not chosen:
        raise ValueError(f"prune_layers={prune_layers!r} selects no layer of this model (PwoA's rule prunes convs "
                         f"and layers named 'fc'); pass prune_layers='all'")
    return chosen


def _prunable(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    return [modules[n] for n in names]


class _ADMM:
    """Z, U and rho of the ADMM penalty for every prunable layer of ``model``."""

    def __init__(self, model: nn.Module, names: Sequence[str], sparsity: float, rho: float, growth: float,
                 rho_max: float):
        self.layers = _prunable(model, names)
        self.k = [kept_count(m.weight.numel(), sparsity) for m in self.layers]
        self.rho, self.growth, self.rho_max = rho, growth, rho_max
        self.u = [torch.zeros_like(m.weight) for m in self.layers]
        self.z = [self._project(m.weight.detach(), k) for m, k in zip(self.layers, self.k)]

    @staticmethod
    def _project(w: torch.Tensor, k: int) -> torch.Tensor:
        return w * topk_mask(w.abs(), k)

    def penalty(self) -> torch.Tensor:
        return sum((m.weight - z + u).square().sum() for m, z, u in zip(self.layers, self.z, self.u)) * (self.rho / 2)

    @torch.no_grad()
    def reproject(self) -> None:
        """Z = proj(W): what PwoA's code does at the start of every ADMM epoch (before the dual
        update of the epochs that have one)."""
        self.z = [self._project(m.weight.detach(), k) for m, k in zip(self.layers, self.k)]

    @torch.no_grad()
    def update(self) -> None:
        for i, m in enumerate(self.layers):
            self.z[i] = self._project(m.weight + self.u[i], self.k[i])
            self.u[i] += m.weight - self.z[i]
        self.rho = min(self.rho * self.growth, self.rho_max)

    def state_dict(self) -> dict:
        """Z, U and rho: saved with every run checkpoint of the ADMM stage (exact resume)."""
        return {"z": [z.detach().clone() for z in self.z], "u": [u.detach().clone() for u in self.u], "rho": self.rho}

    def load_state_dict(self, state: dict) -> None:
        if len(state["z"]) != len(self.layers) or len(state["u"]) != len(self.layers):
            raise ValueError("the run checkpoint's ADMM state is for another model")
        self.z = [z.to(m.weight.device) for z, m in zip(state["z"], self.layers)]
        self.u = [u.to(m.weight.device) for u, m in zip(state["u"], self.layers)]
        self.rho = float(state["rho"])

    def distance(self) -> float:
        """Relative distance of the weights from the sparse set, sum |W - Z|^2 / sum |W|^2."""
        with torch.no_grad():
            num = sum((m.weight - z).square().sum() for m, z in zip(self.layers, self.z))
            return float(num / sum(m.weight.square().sum() for m in self.layers))


class _States:
    """Several objects' states as one extra_state for fit() (the ADMM stage: ADMM and the coin)."""

    def __init__(self, *parts):
        self.parts = parts

    def state_dict(self) -> dict:
        return {"parts": [part.state_dict() for part in self.parts]}

    def load_state_dict(self, state: dict) -> None:
        if len(state.get("parts", ())) != len(self.parts):
            raise ValueError("the run checkpoint's state is for another PwoA version")
        for part, part_state in zip(self.parts, state["parts"]):
            part.load_state_dict(part_state)


class _Coin(random.Random):
    """The batch-mixing coin of both stages, whose state goes into the run checkpoints."""

    def state_dict(self) -> dict:
        version, internal, gauss = self.getstate()
        return {"version": version, "internal": list(internal), "gauss": gauss}

    def load_state_dict(self, state: dict) -> None:
        self.setstate((state["version"], tuple(state["internal"]), state["gauss"]))


def pwoa(student: nn.Module, teacher: nn.Module | None, train, *, sparsity: float,
         admm_epochs: int = 50, retrain_epochs: int = 100, admm_lr: float = 0.01, retrain_lr: float = 0.005,
         temperature: float = 30.0, alpha: float = 10.0, rho: float = 0.01, rho_growth: float = 1.35,
         rho_max: float = 1.0, admm_every: int = 3, lambda_x: float = 2e-5, lambda_y: float = 1e-4,
         sigma: float = 5.0, hsic_layers: Sequence[str] | None = None, num_classes: int | None = None,
         mix_ratio: float = 0.0, mix_attack: Callable | None = None, prune_layers: str = "pwoa", skip=(),
         admm_schedule: str = "cyclic", reproject_z: bool = True, ce_weight: float = 0.0, base_loss: str = "ce",
         run_dir: str | None = None, sparse_kernels: bool = False, **fit_options) -> nn.Module:
    """Prune ``student`` (in place; usually a copy of the robust ``teacher``) to ``sparsity`` per
    layer with PwoA's three stages; returns it with frozen masks. Epochs, learning rates, temperature,
    alpha, rho and the HSIC weights are the paper's CIFAR-10 settings; the schedule, the pruned
    layers and Z's re-projection follow its code (docs/REPRODUCING.md). ``mix_attack``:
    (images, labels) -> adversarial images for mixed batches (default PGD on the student: eps 8/255,
    step 2/255, 10 steps, random start, as PwoA's scripts).
    ``prune_layers``: "pwoa" (default: convs and layers named ``fc``, as PwoA's code) or "all"; ``skip``:
    layer names left dense besides (see :func:`pruned_layer_names`). ``admm_schedule``: the ADMM
    stage's learning rate, "cyclic" (PwoA's: admm_lr, /10, /100 over each ``admm_every``-epoch period)
    or any other fit() schedule; the retrain stage takes ``schedule`` from ``fit_options`` (cosine by
    default). ``reproject_z``: Z = proj(W) at the start of every ADMM epoch, as PwoA's code does
    (False: Z changes only at the dual updates). ``ce_weight`` (PwoA's xentropy_weight; 0 in its
    scripts) adds that weight times a base loss in both stages: ``base_loss`` "ce" (cross-entropy on
    the batch, adversarial when mixed in), or "trades" / "mart", which on a mixed batch replace it
    by PwoA's TRADES (step 0.003) or MART (step 0.007) loss at eps 0.031, 10 steps, beta 6, computed
    from the clean batch (the distillation and HSIC terms then see the clean batch; PwoA's code
    takes the HSIC terms of its TRADES batches on the adversarial pass). ``sparse_kernels``: the masked retrain runs on sparse
    layers with trainable values (see fastprune.prune.finetune_phase)."""
    if teacher is None:
        raise ValueError("teacher: PwoA distils from the pre-trained robust model; pass it")
    check_sparsity(sparsity)
    check_count("admm_every", admm_every)
    for name, value in (("temperature", temperature), ("alpha", alpha), ("rho", rho), ("rho_growth", rho_growth)):
        check_positive(name, value, allow_zero=False)
    if not 0 <= mix_ratio <= 1:
        raise ValueError(f"mix_ratio must be in [0, 1], got {mix_ratio!r}")
    check_positive("ce_weight", ce_weight)
    if base_loss not in BASE_LOSSES:
        raise ValueError(f"base_loss must be one of {BASE_LOSSES}, got {base_loss!r}")
    teacher = copy.deepcopy(teacher).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)

    def distill(model, x, y=None):
        """The distillation loss, plus ce_weight times the cross-entropy on the same forward pass."""
        with torch.no_grad():
            target = logits_of(teacher(x))
        logits = logits_of(model(x))
        loss = distillation_loss(logits, target, temperature, alpha)
        if ce_weight > 0 and y is not None:
            loss = loss + ce_weight * F.cross_entropy(logits, y)
        return loss

    to_prunable_attention(student, skip)  # attention projections as layers, so that the names below see them
    names = pruned_layer_names(student, prune_layers, skip)
    # The retrain's hidden layers are checked now, not after the ADMM stage's epochs.
    hidden = list(hsic_layers) if hsic_layers is not None else block_outputs(student)
    modules = dict(student.named_modules())
    unknown = [n for n in hidden if n not in modules]
    if not hidden or unknown:
        raise ValueError(f"hsic_layers: {'no layers' if not hidden else f'{unknown[:4]} are not modules of the model'}; "
                         f"some module names: {[n for n in modules if n][:8]}")

    # Batches replaced by adversarial examples of them with probability mix_ratio, in both stages.
    attack = mix_attack or (PGD(student, eps=8 / 255, alpha=2 / 255, steps=10) if mix_ratio > 0 else None)
    robust_base = {"trades": lambda: TRADES(0.031, 0.003, 10, beta=6.0),
                   "mart": lambda: MART(0.031, 0.007, 10, beta=6.0)}.get(base_loss, lambda: None)()
    coin = _Coin(0)

    def batch_terms(model, x, y):
        """(the batch the distillation and HSIC terms see, the base loss term) for one batch: a
        mixed-in batch is replaced by PGD examples (base_loss "ce"), or keeps its clean images and
        gets the TRADES/MART loss as its base term."""
        flagged = attack is not None and coin.random() < mix_ratio
        if flagged and robust_base is not None:  # (with ce_weight 0 PwoA's code then trains on the clean batch)
            return x, y, ce_weight * robust_base(model, x, y) if ce_weight > 0 else None
        return (attack(x, y) if flagged else x), y, None

    # Stage 1: ADMM with distillation.
    admm = _ADMM(student, names, sparsity, rho, rho_growth, rho_max)

    def admm_objective(model, x, y):
        x, y, base = batch_terms(model, x, y)
        loss = (distill(model, x) + base) if base is not None else distill(model, x, y)
        return loss + admm.penalty()

    def admm_epoch_end(epoch, row):
        # PwoA's code, at the start of the next epoch: Z = proj(W), then on ADMM epochs the dual update.
        row["admm_distance"] = admm.distance()
        if reproject_z:
            admm.reproject()
        if (epoch + 1) % admm_every == 0:
            admm.update()

    # The best-robust-epoch choice (keep, val) applies to the retrain only, as in PwoA's code: the
    # ADMM stage's epochs are not pruned models.
    admm_options = {k: v for k, v in fit_options.items()
                    if k not in ("keep", "val", "val_attack", "schedule", "milestones", "gamma", "cycle_epochs")}
    fit(student, train, objective=admm_objective, epochs=admm_epochs, lr=admm_lr, schedule=admm_schedule,
        cycle_epochs=admm_every, run_dir=f"{run_dir}/admm" if run_dir else None, on_epoch_end=admm_epoch_end,
        extra_state=_States(admm, coin), **admm_options)

    # Stage 2: hard prune, the masks frozen from here on.
    dense = [n for n, m in student.named_modules() if type(m) in MASKED_OF and n not in names]
    prune_model(student, sparsity, method="magnitude", skip=dense)
    for layer in (m for m in student.modules() if isinstance(m, MASKED_TYPES)):
        layer.freeze_mask()

    # Stage 3: masked retrain, distillation + HSIC bottleneck; adversarial batches only if mixed in.
    bottleneck = HSICBottleneck(student, hidden, lambda_x=lambda_x,
                                lambda_y=lambda_y, sigma=sigma, num_classes=num_classes)

    def retrain_objective(model, x, y):
        x, y, base = batch_terms(model, x, y)  # a PGD batch: the HSIC terms measure it, as PwoA's code does
        if base is not None:  # TRADES/MART first: the taps then hold the distillation pass's features
            return base + distill(model, x) + bottleneck(x, y)
        return distill(model, x, y) + bottleneck(x, y)

    try:
        with sparse_training(student, sparse_kernels):
            fit(student, train, objective=retrain_objective, epochs=retrain_epochs, lr=retrain_lr,
                run_dir=f"{run_dir}/retrain" if run_dir else None, extra_state=coin, **fit_options)
    finally:
        bottleneck.remove()
    return student
