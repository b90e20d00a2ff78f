"""HSIC: the Gaussian Gram op ``fastprune::gaussian_gram`` (all of HSIC's m x m x d work, forward
and backward) and the public ``hsic`` and ``hsic_bottleneck``.

Chain: fastprune/kernels/hsic.py (Triton), csrc/hsic.cpp and csrc/cuda/hsic.cu (``gaussian_gram_ext`` and
``gaussian_gram_backward_ext``), fastprune/reference/hsic.py. The estimators work on m x m
matrices (centring, products, NOCCO's batched Cholesky solve) in PyTorch on the tensors' device:
no m x m centring matrix, no CPU round trip, no host synchronisation unless ``check_inputs``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .. import backends
from ..reference.hsic import (
    ESTIMATORS,
    gaussian_gram_backward_ref,
    median_sigma,
    pair_prepared,
    prepare_kernel,
    squared_distances_ref,
)

KERNELS = ("gaussian", "linear")
_SPEC = backends.OpSpec("gaussian_gram", {"cuda": ("triton", "cuda"), "cpu": ("cpp",)}, native="gaussian_gram_ext")


# --- the registered ops -------------------------------------------------------------------------
def _gram_reference(x, mean, scale, apply_exp):
    dist = squared_distances_ref(x, mean).float()
    return torch.exp(-scale * dist) if apply_exp else dist


# One schema, one implementation per device registered on it: the decorated body is the default
# (the PyTorch reference, any device); the CPU and CUDA kernels choose among their backends.
@torch.library.custom_op("fastprune::gaussian_gram", mutates_args=())
def _gaussian_gram_op(x: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, apply_exp: bool) -> torch.Tensor:
    return _gram_reference(x, mean, scale, apply_exp)


@_gaussian_gram_op.register_kernel(("cpu", "cuda"))
def _gaussian_gram_device(x, mean, scale, apply_exp):
    backend = backends.choose(_SPEC, x.device)
    if backend == "reference":
        return _gram_reference(x, mean, scale, apply_exp)
    if backend == "triton":
        from fastprune.kernels.hsic import gaussian_gram_fwd

        out = torch.empty((x.shape[0], x.shape[0]), device=x.device, dtype=torch.float32)
        return gaussian_gram_fwd(x, mean, scale, out, apply_exp)
    return torch.ops.fastprune.gaussian_gram_ext(x, mean, scale, apply_exp)


@_gaussian_gram_op.register_fake
def _gaussian_gram_fake(x, mean, scale, apply_exp):
    torch._check(x.dim() == 2, lambda: "x must be (m, d)")
    torch._check(mean.shape == (x.shape[1],), lambda: "mean must be (d,)")
    return x.new_empty((x.shape[0], x.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastprune::gaussian_gram_backward", mutates_args=())
def _gaussian_gram_backward_op(grad: torch.Tensor, k: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                               scale: torch.Tensor) -> torch.Tensor:
    return gaussian_gram_backward_ref(grad, k, x, scale, mean).to(x.dtype)


@_gaussian_gram_backward_op.register_kernel(("cpu", "cuda"))
def _gaussian_gram_backward_device(grad, k, x, mean, scale):
    backend = backends.choose(_SPEC, x.device)
    if backend == "reference":
        return gaussian_gram_backward_ref(grad, k, x, scale, mean).to(x.dtype)
    if backend == "triton":
        from fastprune.kernels.hsic import gaussian_gram_bwd

        return gaussian_gram_bwd(grad, k, x, mean, scale, torch.empty_like(x))
    return torch.ops.fastprune.gaussian_gram_backward_ext(grad, k, x, mean, scale)


@_gaussian_gram_backward_op.register_fake
def _gaussian_gram_backward_fake(grad, k, x, mean, scale):
    return torch.empty_like(x)


def _gram_setup_context(ctx, inputs, output):
    x, mean, scale, apply_exp = inputs
    ctx.apply_exp = apply_exp
    ctx.save_for_backward(x, mean, scale, output)


def _gram_backward(ctx, grad_k):
    if not ctx.apply_exp:
        raise RuntimeError("fastprune::gaussian_gram: the squared-distance output (apply_exp=False) is not differentiable")
    x, mean, scale, k = ctx.saved_tensors
    # Gradients of sums arrive expanded (stride 0): the kernels need real memory.
    dx = _gaussian_gram_backward_op(grad_k.float().contiguous(), k, x, mean, scale)
    return dx, None, None, None


_gaussian_gram_op.register_autograd(_gram_backward, setup_context=_gram_setup_context)


def _no_double_backward(ctx, grad):
    raise RuntimeError("fastprune: double backward through the Gaussian Gram matrix is not supported")


_gaussian_gram_backward_op.register_autograd(_no_double_backward, setup_context=lambda ctx, inputs, output: None)


# --- public functions ---------------------------------------------------------------------------
def _rows(t: torch.Tensor) -> torch.Tensor:
    """(m, ...) -> (m, d) with unit stride along d."""
    t = t.reshape(t.shape[0], -1)
    return t if t.stride(1) == 1 else t.contiguous()


def gaussian_gram(x: torch.Tensor, sigma: float | torch.Tensor | None = None, *,
                  scale_sigma_by_dim: bool = False) -> torch.Tensor:
    """Gaussian kernel matrix of the samples of x: (m, ...) -> K (m, m) float32,
    K_ij = exp(-|x_i - x_j|^2 / (2 sigma^2)), differentiable w.r.t. x.

    sigma: a positive float (times sqrt(d) if ``scale_sigma_by_dim``), a 0-dim tensor, or None
    for the median heuristic (median pairwise distance, computed without gradient on the device).
    """
    _check_sigma("sigma", sigma)
    if isinstance(sigma, torch.Tensor) and (sigma.numel() != 1 or not sigma.is_floating_point()):
        raise ValueError(f"sigma must be a positive float, a one-element floating tensor or None, got a "
                         f"{sigma.dtype} tensor of shape {tuple(sigma.shape)}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError("x must be a floating-point tensor of shape (m, ...)")
    x2 = _rows(x)
    with torch.no_grad():
        mean = x2.float().mean(dim=0)
        if sigma is None:
            if scale_sigma_by_dim:
                raise ValueError("scale_sigma_by_dim needs an explicit sigma, not the median heuristic (sigma=None)")
            sig = median_sigma(_gaussian_gram_op(x2.detach(), mean, torch.ones((), device=x.device), False))
        elif isinstance(sigma, torch.Tensor):
            sig = sigma.detach().float().to(x.device).reshape(())
        else:
            # A float bandwidth becomes the scale on the host and one fill on the device: no
            # host-to-device copy and no chain of scalar kernels (each a launch on a GPU, where
            # this op is launch-bound at PwoA's m = 128).
            bandwidth = float(sigma) * (math.sqrt(x2.shape[1]) if scale_sigma_by_dim else 1.0)
            sig = None
            scale = torch.full((), 0.5 / bandwidth ** 2, device=x.device)
        if sig is not None:
            if scale_sigma_by_dim:
                sig = sig * math.sqrt(x2.shape[1])
            scale = (0.5 / sig.square()).float().reshape(())
    return _gaussian_gram_op(x2, mean, scale, True)


def _kernel_matrix(t: torch.Tensor, kind: str, sigma, scale_sigma_by_dim: bool) -> torch.Tensor:
    if kind == "gaussian":
        return gaussian_gram(t, sigma, scale_sigma_by_dim=scale_sigma_by_dim)
    tc = _rows(t).float()
    tc = tc - tc.mean(dim=0, keepdim=True)  # changes nothing after centring the matrix, helps accuracy
    return tc @ tc.T


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.zeros(labels.shape[0], num_classes, device=labels.device).scatter_(1, labels[:, None], 1.0)


def _check_sigma(name: str, sigma) -> None:
    if sigma is None or isinstance(sigma, torch.Tensor):
        return
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma <= 0:
        raise ValueError(f"{name} must be a positive float or None (median heuristic), got {sigma!r}")


# Squared distances in float32 overflow once |x_i - x_j|^2 nears 3e38: refuse features whose
# spread could get there, rather than return NaN.
_MAX_SPREAD = 1e18


def _check_finite(name: str, t: torch.Tensor) -> None:
    finite, spread = torch.stack([torch.isfinite(t).all().double(), (t.amax() - t.amin()).double()]).tolist()
    if not finite:
        raise ValueError(f"{name} contains NaN or Inf")
    d = max(1, t[0].numel())
    if spread * d ** 0.5 > _MAX_SPREAD:
        raise ValueError(f"{name} spans {spread:.3g} over {d} features: squared distances would overflow float32; "
                         "rescale the features")


def _check_labels(labels: torch.Tensor, num_classes: int | None) -> int:
    lo, hi = (int(v) for v in torch.stack([labels.min(), labels.max()]).tolist())
    classes = num_classes if num_classes is not None else hi + 1
    if lo < 0 or hi >= classes:
        raise ValueError(f"labels must lie in [0, {classes}), got values in [{lo}, {hi}]")
    return classes


def _as_kernel_input(name: str, t, m: int | None, kernel: str | None, num_classes, check_inputs: bool):
    """(tensor to build a kernel from, kernel name). Integer (m,) labels become one-hot rows."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a tensor")
    if t.dim() == 0:
        raise ValueError(f"{name} must have a batch dimension (m, ...)")
    if m is not None and t.shape[0] != m:
        raise ValueError(f"{name} has batch size {t.shape[0]}, expected {m} (batch sizes must match)")
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel_{name} must be one of {KERNELS}, got {kernel!r}")
    if not t.is_floating_point():
        if t.dim() != 1:
            raise ValueError(f"integer {name} must be (m,) class labels, got shape {tuple(t.shape)}")
        if num_classes is None or check_inputs:
            num_classes = _check_labels(t, num_classes)
        return _one_hot(t, num_classes), kernel or "linear"
    if check_inputs:
        _check_finite(name, t)
    return t, kernel or "gaussian"


def hsic(x: torch.Tensor, y: torch.Tensor, *, kernel_x: str = "gaussian", kernel_y: str | None = None,
         sigma_x: float | None = None, sigma_y: float | None = None, estimator: str = "biased",
         scale_sigma_by_dim: bool = False, eps: float = 1e-5, num_classes: int | None = None,
         check_inputs: bool = True) -> torch.Tensor:
    """Hilbert-Schmidt independence criterion between the samples of x and y; a 0-dim tensor.

    Args:
        x: (m, ...) floating tensor, flattened per sample.
        y: (m, ...) floating tensor, or (m,) integer class labels (one-hot encoded; linear kernel
            unless ``kernel_y`` says otherwise; ``num_classes`` defaults to max label + 1).
        kernel_x, kernel_y: "gaussian" exp(-|a - b|^2 / (2 sigma^2)) or "linear" a.b
            (kernel_y=None: gaussian for features, linear for labels).
        sigma_x, sigma_y: Gaussian bandwidths (> 0), or None for the median heuristic.
        estimator: "biased" tr(Kc Lc)/(m-1)^2; "unbiased" (Song et al. 2012, m >= 4); "cka"
            (normalised biased); "nocco" tr(Kc (Kc + eps m I)^-1 Lc (Lc + eps m I)^-1), HBaR/PwoA's.
        scale_sigma_by_dim: use sigma * sqrt(d) (the HBaR/PwoA convention).
        check_inputs: check for NaN/Inf and label range (one host sync); turn off in hot loops.

    Differentiable w.r.t. every floating input; double backward raises.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor of shape (m, ...)")
    m = x.shape[0] if x.dim() > 0 else 0
    minimum = 4 if estimator == "unbiased" else 2
    if m < minimum:
        raise ValueError(f"x has batch size {m}; the {estimator} estimator needs m >= {minimum}")
    _check_sigma("sigma_x", sigma_x)
    _check_sigma("sigma_y", sigma_y)
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    x_in, kx = _as_kernel_input("x", x, None, kernel_x, None, check_inputs)
    y_in, ky = _as_kernel_input("y", y, m, kernel_y, num_classes, check_inputs)
    k = _kernel_matrix(x_in, kx, sigma_x, scale_sigma_by_dim)
    l = _kernel_matrix(y_in, ky, sigma_y, scale_sigma_by_dim)
    return pair_prepared(prepare_kernel(k, estimator, eps), prepare_kernel(l, estimator, eps), estimator)


def hsic_bottleneck(x: torch.Tensor, labels: torch.Tensor, features: Sequence[torch.Tensor], *, lambda_x: float,
                    lambda_y: float, sigma: float = 5.0, scale_sigma_by_dim: bool = True, estimator: str = "nocco",
                    num_classes: int | None = None, eps: float = 1e-5, check_inputs: bool = True) -> torch.Tensor:
    """The HBaR/PwoA regulariser: sum over layers l of lambda_x HSIC(X, Z_l) - lambda_y HSIC(Y, Z_l).

    x: (m, ...) input images; labels: (m,) integer classes; features: hidden outputs Z_l, each
    (m, ...). Gaussian kernels (bandwidth sigma * sqrt(d) by default) for X and every Z_l, the linear
    kernel on one-hot labels for Y. X's and Y's kernel matrices are built and prepared (centred,
    or NOCCO-solved) once; all layers' matrices are stacked so the estimator runs batched.
    Returns a 0-dim tensor, differentiable w.r.t. the features (and x if it requires grad).
    """
    if not features:
        raise ValueError("features must hold at least one (m, ...) tensor")
    for name, value in (("lambda_x", lambda_x), ("lambda_y", lambda_y)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite float, got {value!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.dim() != 1:
        raise ValueError("labels must be an integer tensor of shape (m,)")
    _check_sigma("sigma", sigma)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("x must be a floating-point tensor of shape (m, ...)")
    m = x.shape[0]
    if m < (4 if estimator == "unbiased" else 2):
        raise ValueError(f"x has batch size {m}, too small for the {estimator} estimator")
    y_in, _ = _as_kernel_input("labels", labels, m, None, num_classes, check_inputs)
    x_in, _ = _as_kernel_input("x", x, m, None, None, check_inputs)
    z_in = [_as_kernel_input(f"features[{i}]", z, m, None, None, check_inputs)[0] for i, z in enumerate(features)]

    px = prepare_kernel(gaussian_gram(x_in, sigma, scale_sigma_by_dim=scale_sigma_by_dim), estimator, eps)
    py = prepare_kernel(_kernel_matrix(y_in, "linear", None, False), estimator, eps)
    kz = torch.stack([gaussian_gram(z, sigma, scale_sigma_by_dim=scale_sigma_by_dim) for z in z_in])
    pz = prepare_kernel(kz, estimator, eps)  # (L, m, m): one batched centring / solve for all layers
    return lambda_x * pair_prepared(px, pz, estimator).sum() - lambda_y * pair_prepared(py, pz, estimator).sum()
