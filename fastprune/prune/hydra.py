"""HYDRA (Sehwag et al., NeurIPS 2020) and its LWM baseline, as phases over a (pre)trained model.

HYDRA: every conv and linear layer gets importance scores initialised from its weights (so the first
mask is the magnitude mask); the prune phase trains the scores under the robust objective, with the
conv and linear weights frozen and BatchNorm's scale and shift training alongside the scores (as the
released scripts do: they never pass --freeze-bn; ``freeze_bn=True`` freezes them); the finetune
phase freezes the mask and trains the weights. LWM skips the prune phase: magnitude mask, then the
same finetune.
"""
from __future__ import annotations

import copy
import os
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..utils.checks import logits_of
from ..data.batches import as_tensors
from ..nn.attention import to_prunable_attention
from ..nn.masked import MASKED_OF, MASKED_TYPES, SCORE_INITS, check_sparsity, prune_model
from ..nn.sparse.training import sparse_training
from ..train.loops import fit


def _masked_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, MASKED_TYPES)]


def _phase_dir(run_dir: str | None, phase: str) -> str | None:
    return os.path.join(run_dir, phase) if run_dir else None


def batchnorm_affine(model: nn.Module) -> list[nn.Parameter]:
    """BatchNorm layers' scale and shift parameters."""
    return [p for m in model.modules() if isinstance(m, _BatchNorm) for p in (m.weight, m.bias) if p is not None]


def prune_phase(model: nn.Module, train, *, objective: Callable, epochs: int, lr: float = 0.1,
                freeze_bn: bool = False, run_dir: str | None = None, **fit_options) -> list[dict]:
    """Train the scores of ``model``'s score-masked layers, and BatchNorm's scale and shift unless
    ``freeze_bn`` (HYDRA's scripts train them); every conv and linear weight and bias stays frozen."""
    scores = [m.scores for m in _masked_layers(model) if m.source == "scores"]
    if not scores:
        raise ValueError("model has no score-masked layers: call prune_model(model, sparsity, 'scores') first")
    trained = scores + ([] if freeze_bn else batchnorm_affine(model))
    chosen = {id(p) for p in trained}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    return fit(model, train, objective=objective, epochs=epochs, lr=lr, params=trained,
               run_dir=_phase_dir(run_dir, "prune"), **fit_options)


def finetune_phase(model: nn.Module, train, *, objective: Callable, epochs: int, lr: float = 0.01,
                   run_dir: str | None = None, sparse_kernels: bool = False, **fit_options) -> list[dict]:
    """Freeze every mask as it is, then train the weights (HYDRA's and LWM's last phase).

    ``sparse_kernels``: train the masked layers as sparse layers with trainable CSR values
    (fastprune.nn.sparse.training), so forward, input and weight gradients cost the non-zeros'
    work; the model comes back as masked layers (fixed masks) afterwards, as without it. CPU
    float32 runs on the C++ sparse kernels."""
    for layer in _masked_layers(model):
        layer.freeze_mask()
    for p in model.parameters():
        p.requires_grad_(True)
    with sparse_training(model, sparse_kernels):
        return fit(model, train, objective=objective, epochs=epochs, lr=lr, run_dir=_phase_dir(run_dir, "finetune"),
                   **fit_options)


HYDRA_SCORE_INITS = SCORE_INITS + ("snip",)


def snip_sensitivity(model: nn.Module, train, batch_size: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """SNIP's connection sensitivity |dL/dW * W| of every prunable layer, from the cross-entropy of
    one random training batch ({layer name: tensor of its weight's shape}). HYDRA's snip_init gets
    the same numbers as the gradient of its scores with every weight kept (k = 1: the
    straight-through gradient of a score is dL/dW * W), on a model in training mode; here a copy
    runs it, so the model's BatchNorm statistics do not move."""
    images, labels = as_tensors(train, "train")
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(images.shape[0], generator=gen)[:batch_size]
    probe = copy.deepcopy(model).train()
    device = next((p.device for p in probe.parameters()), torch.device("cpu"))
    layers = {n: m for n, m in probe.named_modules() if type(m) in MASKED_OF}
    probe.zero_grad(set_to_none=True)
    F.cross_entropy(logits_of(probe(images[index].to(device))), labels[index].to(device)).backward()
    return {n: (m.weight.grad * m.weight).detach().abs() for n, m in layers.items() if m.weight.grad is not None}


def hydra(model: nn.Module, train, *, sparsity: float, objective: Callable, prune_epochs: int = 20,
          finetune_epochs: int = 100, prune_lr: float = 0.1, finetune_lr: float = 0.01, freeze_bn: bool = False,
          score_init: str = "scaled", skip=(), run_dir: str | None = None, sparse_kernels: bool = False,
          **fit_options) -> nn.Module:
    """Prune ``model`` (in place) to ``sparsity`` in every layer with HYDRA; returns it, masks frozen.
    Defaults follow the released code: 20 prune epochs at lr 0.1 (scores and BatchNorm's affine
    parameters; ``freeze_bn=True`` keeps BatchNorm fixed), 100 finetune epochs at lr 0.01, scaled
    score initialisation (``score_init``: see fastprune.nn.prune_model; or "snip", HYDRA's
    --snip-init: each layer's scores are SNIP's |dL/dW * W| on one training batch)."""
    check_sparsity(sparsity)
    if score_init not in HYDRA_SCORE_INITS:
        raise ValueError(f"score_init must be one of {HYDRA_SCORE_INITS}, got {score_init!r}")
    sensitivity = None
    if score_init == "snip":
        to_prunable_attention(model, skip)  # attention projections as layers first, so that they get scores too
        sensitivity = snip_sensitivity(model, train, batch_size=fit_options.get("batch_size", 128),
                                       seed=fit_options.get("seed", 0))
    prune_model(model, sparsity, method="scores", skip=skip,
                score_init="kaiming_normal" if score_init == "snip" else score_init)
    if sensitivity is not None:
        for name, module in model.named_modules():
            if name in sensitivity and isinstance(module, MASKED_TYPES):
                module.scores.data.copy_(sensitivity[name])
    prune_phase(model, train, objective=objective, epochs=prune_epochs, lr=prune_lr, freeze_bn=freeze_bn,
                run_dir=run_dir, **fit_options)
    finetune_phase(model, train, objective=objective, epochs=finetune_epochs, lr=finetune_lr, run_dir=run_dir,
                   sparse_kernels=sparse_kernels, **fit_options)
    return model


def lwm(model: nn.Module, train, *, sparsity: float, objective: Callable, finetune_epochs: int = 100,
        finetune_lr: float = 0.01, skip=(), run_dir: str | None = None, sparse_kernels: bool = False,
        **fit_options) -> nn.Module:
    """Least-weight-magnitude pruning: magnitude mask per layer, then the robust finetune."""
    check_sparsity(sparsity)
    prune_model(model, sparsity, method="magnitude", skip=skip)
    finetune_phase(model, train, objective=objective, epochs=finetune_epochs, lr=finetune_lr, run_dir=run_dir,
                   sparse_kernels=sparse_kernels, **fit_options)
    return model
