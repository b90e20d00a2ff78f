"""Training-loop benchmarks: epoch time per pruning method, side by side in one run
(python bench/train.py [--device cuda] [--model resnet18] [--batch 128] [--batches 20] [--quick]).

On CIFAR-shaped synthetic data (3x32x32, 10 classes; timing does not depend on the values):
  hydra-paper      HYDRA's prune phase as its released code runs it (shared/docs/FIELD.md): every
                   masked layer re-sorts its scores on every forward pass, TRADES recomputes the
                   clean prediction inside every attack step, the PGD step is plain eager ops;
                   written here from that description;
  hydra-fastprune  fastprune's prune phase: prune_model(method="scores") (mask cached until the
                   scores change) and fit() with fastprune's TRADES (one clean forward per batch,
                   the fused PGD step); with --amp also under autocast;
  pwoa-paper       PwoA's masked retrain with the HSIC bottleneck computed as the papers' code does
                   (kernel matrices on the CPU, a dense centring matrix, explicit inverses), eager;
  pwoa-fastprune   the same retrain with fastprune.nn.HSICBottleneck (fused Gram ops, all layers
                   batched, no host round trip);
  pwoa-admm        PwoA's stage 1 (distillation + ADMM penalty), fastprune.
Every contender runs the same model, batch size and number of batches; "epoch" below is
``--batches`` batches, and the projected CIFAR-10 epoch (50,000 images) is scaled from it.
Ratios: fastprune HYDRA vs the paper-faithful HYDRA, fastprune PwoA vs the paper-style PwoA, and
fastprune PwoA (retrain) vs fastprune HYDRA (prune phase).

Writes bench/results/train-<device>.csv and prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.hsic import paper_style_nocco  # noqa: E402
from fastprune.attacks.losses import logits_of  # noqa: E402
from fastprune.benchmarks.common import (  # noqa: E402
    device_label, interleaved_medians, markdown_table, save_results, versions)
from fastprune.models import get_model  # noqa: E402
from fastprune.nn import HSICBottleneck, prune_model  # noqa: E402
from fastprune.nn.hsic import FeatureTaps  # noqa: E402
from fastprune.prune import block_outputs, distillation_loss  # noqa: E402
from fastprune.prune.pwoa import _ADMM, pruned_layer_names  # noqa: E402
from fastprune.train import TRADES, fit  # noqa: E402

EPS, ALPHA, STEPS, BETA = 8 / 255, 2 / 255, 10, 6.0
SPARSITY = 0.99
T, KD_ALPHA, LAMBDA_X, LAMBDA_Y = 30.0, 10.0, 2e-5, 1e-4


# --- HYDRA as its released code runs it ---------------------------------------------------------
class _TopKEveryForward(torch.autograd.Function):
    """HYDRA's mask: sort |scores| on every call, keep the top k; straight-through gradient."""

    @staticmethod
    def forward(ctx, scores, keep):
        mask = torch.zeros_like(scores)
        order = scores.abs().flatten().argsort()
        mask.view(-1)[order[int((1 - keep) * scores.numel()):]] = 1
        return mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class PaperScoreConv(nn.Conv2d):
    def forward(self, x):
        mask = _TopKEveryForward.apply(self.scores, 1 - SPARSITY)
        return self._conv_forward(x, self.weight * mask, self.bias)


class PaperScoreLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight * _TopKEveryForward.apply(self.scores, 1 - SPARSITY), self.bias)


def paper_hydra_model(dense: nn.Module) -> nn.Module:
    """``dense`` with every conv/linear swapped for HYDRA-code-style score layers (weights frozen)."""
    model = copy.deepcopy(dense)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) in (nn.Conv2d, nn.Linear):
                cls = PaperScoreConv if isinstance(child, nn.Conv2d) else PaperScoreLinear
                child.__class__ = cls
                fan_in = child.weight[0].numel()
                child.scores = nn.Parameter(child.weight.detach() * (6 / fan_in) ** 0.5 / child.weight.abs().max())
    for n, p in model.named_parameters():
        p.requires_grad_(n.endswith("scores"))
    return model


def paper_trades_loss(model, x, y):
    """TRADES as HYDRA's code computes it: a clean forward inside every attack step, eager PGD ops."""
    model.eval()
    x_adv = x + 0.001 * torch.randn_like(x)
    for _ in range(STEPS):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1), reduction="sum")
        grad = torch.autograd.grad(kl, [x_adv])[0]
        x_adv = x_adv.detach() + ALPHA * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0.0, 1.0)
    model.train()
    logits = model(x)
    robust = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1), reduction="batchmean")
    return F.cross_entropy(logits, y) + BETA * robust


def paper_loop(model, objective, images, labels, batch, lr, params):
    """The plain training loop of the papers' code: SGD, one batch after another."""
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4)
    for start in range(0, images.shape[0], batch):
        loss = objective(model, images[start:start + batch], labels[start:start + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()


# --- PwoA's retrain as the papers' code runs it ----------------------------------------------------
def paper_pwoa_objective(teacher, layers):
    def objective(model, x, y):
        with FeatureTaps(model, layers) as taps:
            logits = logits_of(model(x))
            feats = taps.ordered()
        with torch.no_grad():
            target = teacher(x)
        loss = distillation_loss(logits, target, T, KD_ALPHA)
        onehot = F.one_hot(y, logits.shape[1]).float()
        for z in feats:
            loss = loss + LAMBDA_X * paper_style_nocco(x, z) - LAMBDA_Y * paper_style_nocco(onehot, z)
        return loss.to(x.device)
    return objective


def fastprune_pwoa_objective(teacher, bottleneck):
    def objective(model, x, y):
        with torch.no_grad():
            target = teacher(x)
        return distillation_loss(logits_of(model(x)), target, T, KD_ALPHA) + bottleneck(x, y)
    return objective


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="default: resnet18 on GPU, cnn-small on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default 128 on GPU, 32 on CPU")
    parser.add_argument("--batches", type=int, default=None, help="batches per timed epoch (default 20 GPU, 4 CPU)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--amp", action="store_true", help="also time fastprune HYDRA under autocast")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    model_name = args.model or ("resnet18" if gpu else "cnn-small")
    batch = args.batch or (128 if gpu else 32)
    batches = args.batches or (2 if args.quick else 20 if gpu else 4)
    repeats = 1 if args.quick else args.repeats
    meta = {"device": device_label(device), "model": model_name, "batch": batch, "batches": batches, **versions()}
    print(f"# training benchmark on {meta['device']}: {model_name}, batch {batch}, {batches} batches per epoch, "
          f"sparsity {SPARSITY}", flush=True)

    torch.manual_seed(0)
    n = batch * batches
    images = torch.rand(n, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (n,), device=device)
    data = torch.utils.data.TensorDataset(images, labels)
    teacher = get_model(model_name, 10, 3).to(device).eval()

    # HYDRA prune phase: scores only.
    paper_hydra = paper_hydra_model(teacher).train()
    ours_hydra = prune_model(copy.deepcopy(teacher), SPARSITY, method="scores").train()
    for name, p in ours_hydra.named_parameters():
        p.requires_grad_(name.endswith("scores"))
    ours_scores = [p for p in ours_hydra.parameters() if p.requires_grad]
    trades = TRADES(EPS, ALPHA, STEPS, BETA)

    # PwoA retrain: masks frozen, weights train, distillation + HSIC over the block outputs.
    student = prune_model(copy.deepcopy(teacher), SPARSITY, method="magnitude").train()
    layers = block_outputs(student)
    bottleneck = HSICBottleneck(student, layers, lambda_x=LAMBDA_X, lambda_y=LAMBDA_Y, num_classes=10)
    paper_student = copy.deepcopy(student)
    paper_student_layers = block_outputs(paper_student)
    admm_student = copy.deepcopy(teacher).train()
    admm = _ADMM(admm_student, pruned_layer_names(admm_student, "all"), SPARSITY, 0.01, 1.35, 1.0)

    def admm_objective(model, x, y):
        with torch.no_grad():
            target = teacher(x)
        return distillation_loss(logits_of(model(x)), target, T, KD_ALPHA) + admm.penalty()

    quiet = dict(batch_size=batch, progress=False, seed=0)
    fns = {
        "hydra-paper": lambda: paper_loop(paper_hydra, paper_trades_loss, images, labels, batch, 0.1,
                                          [p for p in paper_hydra.parameters() if p.requires_grad]),
        "hydra-fastprune": lambda: fit(ours_hydra, data, objective=trades, epochs=1, lr=0.1, params=ours_scores,
                                       **quiet),
        "pwoa-paper": lambda: paper_loop(paper_student, paper_pwoa_objective(teacher, paper_student_layers), images,
                                         labels, batch, 0.005, list(paper_student.parameters())),
        "pwoa-fastprune": lambda: fit(student, data, objective=fastprune_pwoa_objective(teacher, bottleneck),
                                      epochs=1, lr=0.005, **quiet),
        "pwoa-admm": lambda: fit(admm_student, data, objective=admm_objective, epochs=1, lr=0.01, **quiet),
    }
    if args.amp:
        fns["hydra-fastprune-amp"] = lambda: fit(ours_hydra, data, objective=trades, epochs=1, lr=0.1,
                                                 params=ours_scores, amp=True, **quiet)
    seconds = interleaved_medians(fns, device, repeats=repeats, warmup=1)
    bottleneck.remove()

    per_cifar_epoch = 50_000 / n
    rows = [{"loop": name, "epoch_s": sec, "ms_per_batch": sec / batches * 1e3,
             "cifar10_epoch_s": sec * per_cifar_epoch} for name, sec in seconds.items()]
    ratios = {
        "fastprune HYDRA vs paper-faithful HYDRA (speed-up)": seconds["hydra-paper"] / seconds["hydra-fastprune"],
        "fastprune PwoA retrain vs paper-style PwoA (speed-up)": seconds["pwoa-paper"] / seconds["pwoa-fastprune"],
        "fastprune PwoA retrain vs fastprune HYDRA prune phase (x faster)":
            seconds["hydra-fastprune"] / seconds["pwoa-fastprune"],
        "fastprune PwoA ADMM vs fastprune HYDRA prune phase (x faster)":
            seconds["hydra-fastprune"] / seconds["pwoa-admm"],
    }
    if args.amp:
        ratios["fastprune HYDRA with AMP vs paper-faithful HYDRA (speed-up)"] = (
            seconds["hydra-paper"] / seconds["hydra-fastprune-amp"])
    print(markdown_table(rows, ["loop", "epoch_s", "ms_per_batch", "cifar10_epoch_s"]))
    print()
    print(markdown_table([{"ratio": k, "value": v} for k, v in ratios.items()], ["ratio", "value"]))
    rows += [{"loop": "ratio", "ratio": k, "value": v} for k, v in ratios.items()]
    save_results(rows, meta, args.out, "train", device, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
