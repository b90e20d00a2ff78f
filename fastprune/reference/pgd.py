"""Reference projected-gradient step, computed in the same order as the kernels."""
from __future__ import annotations

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kernels compute in float32 for half, bfloat16 and float, in float64 for double."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pgd_step_ref(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x_nat: torch.Tensor,
    alpha: torch.Tensor,
    eps: torch.Tensor,
    norm: str,
    clip_min: float,
    clip_max: float,
) -> torch.Tensor:
    """One PGD step; shapes: x_adv, grad, x_nat (N, ...); alpha, eps (N,) float32. Returns (N, ...).

    linf: clip(proj_eps(x + alpha * sign(grad))); a zero (or NaN) gradient component takes no step.
    l2:   x + alpha * grad / max(|grad|, 1e-12), then delta = that - x_nat is scaled by
          min(1, eps / max(|delta|, 1e-12)), then clipped; norms are per sample.
    """
    ct = _compute_dtype(x_adv.dtype)
    x, g, xn = x_adv.to(ct), grad.to(ct), x_nat.to(ct)
    shape = (-1,) + (1,) * (x.dim() - 1)
    a, e = alpha.to(ct).view(shape), eps.to(ct).view(shape)
    if norm == "linf":
        step = torch.where(g > 0, a, torch.where(g < 0, -a, torch.zeros_like(a)))
        y = x + step
        y = torch.minimum(torch.maximum(y, xn - e), xn + e)
    elif norm == "l2":
        n = x.shape[0]
        gnorm = g.reshape(n, -1).norm(dim=1).clamp_min(1e-12).view(shape)
        d = (x + (a / gnorm) * g) - xn
        dnorm = d.reshape(n, -1).norm(dim=1).clamp_min(1e-12).view(shape)
        y = xn + d * (e / dnorm).clamp_max(1.0)
    else:
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    return y.clamp(clip_min, clip_max).to(x_adv.dtype)
