"""Argument checks every layer shares: each raises ValueError with one line that names the argument
and what it should be. (The bottom layer: imports nothing from fastprune.)"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn


def check_positive(name: str, value, *, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>=' if allow_zero else '>'} 0, got {value!r}")
    return float(value)


def check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_eps(eps: float, clip=(0.0, 1.0), norm: str = "linf") -> float:
    """eps in pixel units: an Linf radius above the clip box's width is a unit mistake (8 for 8/255).
    (L2 radii above 1 are common, so only Linf is bounded.)"""
    eps = check_positive("eps", eps)
    width = float(clip[1]) - float(clip[0])
    if norm == "linf" and eps > width:
        raise ValueError(f"eps={eps:g} exceeds the image range {tuple(clip)}: eps is in pixel units "
                         f"(for 8/255 pass {eps:g}/255 = {eps / 255:.4g})")
    return eps


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode, then restore each module's own mode (not just the root's)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def logits_of(output) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, the first element of a tuple or list, or
    the "logits" entry of a dict (Hugging Face style)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    elif isinstance(output, dict):
        if "logits" not in output:
            raise ValueError(f"the model returned a dict without 'logits' (keys: {sorted(output)[:5]})")
        output = output["logits"]
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"the model must return logits (a tensor), got {type(output).__name__}")
    return output


def model_dtype(model) -> torch.dtype | None:
    param = next(iter(model.parameters()), None) if isinstance(model, nn.Module) else None
    return param.dtype if param is not None else None


def check_images_labels(images, labels, *, clip=(0.0, 1.0), model=None, what: str = "images",
                        num_classes: int | None = None) -> int | None:
    """images (N, ...) floating point, finite, inside ``clip``, of the model's dtype; labels (N,)
    integer in [0, classes). The classes are ``num_classes`` if given, else read off one forward of
    a single image in eval mode when a model is given. One host synchronisation for all the value
    checks. Returns the number of classes used (None if unknown), for callers to cache."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor of shape (N, ...), got "
                         f"{images.dtype if isinstance(images, torch.Tensor) else type(images).__name__}")
    if images.dim() < 2:
        raise ValueError(f"{what} must have shape (N, ...), got {tuple(images.shape)}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() or \
            labels.dtype == torch.bool or labels.is_complex():
        raise ValueError("labels must be an integer tensor of shape (N,), got "
                         f"{(labels.dtype, tuple(labels.shape)) if isinstance(labels, torch.Tensor) else labels!r}")
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels has length {labels.shape[0]} but {what} has batch size {images.shape[0]}")
    dtype = model_dtype(model)
    if dtype is not None and dtype.is_floating_point and images.dtype != dtype:
        raise ValueError(f"{what} are {images.dtype} but the model's parameters are {dtype}: convert one "
                         f"(e.g. images.to({dtype}))")
    if images.numel() == 0:
        return num_classes
    finite, lo, hi, lmin, lmax = torch.stack([
        torch.isfinite(images).all().double(), images.min().double(), images.max().double(),
        labels.min().double(), labels.max().double()]).tolist()
    if not finite:
        raise ValueError(f"{what} contain NaN or Inf")
    if lo < clip[0] or hi > clip[1]:
        hint = " (scaled to 0-255? divide by 255)" if hi > 1.5 * float(clip[1]) and hi <= 255 else ""
        raise ValueError(f"{what} must lie in clip={tuple(clip)}, got values in [{lo:.4g}, {hi:.4g}]{hint}")
    if lmin < 0:
        raise ValueError(f"labels must be class indices >= 0, got {int(lmin)}")
    if num_classes is None and isinstance(model, nn.Module):
        with torch.no_grad(), eval_mode(model):
            num_classes = logits_of(model(images[:1])).shape[-1]
    if num_classes is not None and lmax >= num_classes:
        raise ValueError(f"labels must be class indices below the model's {num_classes} outputs, got {int(lmax)}")
    return num_classes
