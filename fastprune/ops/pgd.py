"""The fused PGD step: ``fastprune::pgd_step`` and its in-place twin ``fastprune::pgd_step_``.

Chain: fastprune/kernels/pgd.py (Triton), csrc/pgd.cpp and csrc/cuda/pgd.cu (C++/CUDA, registered as
``fastprune::pgd_step_ext``), fastprune/reference/pgd.py (PyTorch), this module (registration,
fake impls, backend choice) and the public ``pgd_step``/``pgd_step_`` below.
"""
from __future__ import annotations

import math
import weakref
from typing import Union

import torch

from .. import backends
from ..reference.pgd import pgd_step_ref

Number = Union[float, int]
NORMS = ("linf", "l2")
# Preference per device, first available wins. On the CPU the C++ kernel was measured fastest
# (bench/results/attacks-cpu.csv); on a GPU the order (CUDA C++, then Triton) is a guess until
# scripts/gpu_check.sh has timed both (bench/attacks.py times every backend that runs).
_SPEC = backends.OpSpec("pgd_step", {"cuda": ("cuda", "triton"), "cpu": ("cpp",)}, native="pgd_step_ext")


def _run_reference(x_adv, grad, x_nat, alpha, eps, norm, clip_min, clip_max, out) -> None:
    out.copy_(pgd_step_ref(x_adv, grad, x_nat, alpha, eps, norm, clip_min, clip_max))


def _run_backend(x_adv, grad, x_nat, alpha, eps, norm, clip_min, clip_max, out) -> None:
    """Write the step into ``out`` (which may alias ``x_adv``) with the backend chosen for the
    tensors' device: the per-device kernels below call this; ``use_backend`` overrides the choice."""
    backend = backends.choose(_SPEC, x_adv.device)
    if backend == "reference":
        _run_reference(x_adv, grad, x_nat, alpha, eps, norm, clip_min, clip_max, out)
    elif backend == "triton":
        from fastprune.kernels.pgd import pgd_step_fwd

        pgd_step_fwd(x_adv, grad, x_nat, alpha, eps, norm, clip_min, clip_max, out)
    else:  # cpp and cuda share the native schema; the dispatcher picks the device's kernel
        torch.ops.fastprune.pgd_step_ext(x_adv, grad, x_nat, alpha, eps, norm, clip_min, clip_max, out)


def _check_native_args(x_adv, grad, x_nat, alpha, eps, norm) -> None:
    """Shape checks of the registered ops (also run on fake tensors under torch.compile)."""
    for name, t in (("grad", grad), ("x_nat", x_nat)):
        torch._check(t.shape == x_adv.shape, lambda: f"{name} must have x_adv's shape")
    for name, t in (("alpha", alpha), ("eps", eps)):
        torch._check(t.dim() == 1 and t.shape[0] == x_adv.shape[0], lambda: f"{name} must have shape (N,)")
    torch._check(norm in NORMS, lambda: f"norm must be one of {NORMS}")


# One schema, one implementation per device registered on it: the decorated body is the default
# (the PyTorch reference, any device); the CPU and CUDA kernels choose among their backends.
@torch.library.custom_op("fastprune::pgd_step", mutates_args=())
def _pgd_step_op(
    x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, alpha: torch.Tensor, eps: torch.Tensor,
    norm: str, clip_min: float, clip_max: float,
) -> torch.Tensor:
    out = torch.empty_like(x_adv)
    _run_reference(x_adv, grad, x_nat, alpha, eps, norm, clip_min, clip_max, out)
    return out


@_pgd_step_op.register_kernel(("cpu", "cuda"))
def _pgd_step_device(x_adv, grad, x_nat, alpha, eps, norm, clip_min, clip_max):
    out = torch.empty_like(x_adv)
    _run_backend(x_adv, grad, x_nat, alpha, eps, norm, clip_min, clip_max, out)
    return out


@_pgd_step_op.register_fake
def _pgd_step_fake(x_adv, grad, x_nat, alpha, eps, norm, clip_min, clip_max):
    _check_native_args(x_adv, grad, x_nat, alpha, eps, norm)
    return torch.empty_like(x_adv)


@torch.library.custom_op("fastprune::pgd_step_", mutates_args=("x_adv",))
def _pgd_step_inplace_op(
    x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor, alpha: torch.Tensor, eps: torch.Tensor,
    norm: str, clip_min: float, clip_max: float,
) -> None:
    _run_reference(x_adv, grad, x_nat, alpha, eps, norm, clip_min, clip_max, x_adv)


@_pgd_step_inplace_op.register_kernel(("cpu", "cuda"))
def _pgd_step_inplace_device(x_adv, grad, x_nat, alpha, eps, norm, clip_min, clip_max):
    _run_backend(x_adv, grad, x_nat, alpha, eps, norm, clip_min, clip_max, x_adv)


@_pgd_step_inplace_op.register_fake
def _pgd_step_inplace_fake(x_adv, grad, x_nat, alpha, eps, norm, clip_min, clip_max):
    _check_native_args(x_adv, grad, x_nat, alpha, eps, norm)


def _is_batch_major_dense(t: torch.Tensor) -> bool:
    """Dense with the batch outermost: contiguous, or channels_last (the layouts attacks use)."""
    if t.is_contiguous():
        return True
    return (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)) or (
        t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d)
    )


# Per-sample alpha/eps tensors whose values passed the check, with the version they had then: a loop
# that passes the same tensor at every step pays the check's host sync once, not once per step (on
# an H200 the sync made a 3 MB step 40x slower than the kernel). An in-place change bumps the
# tensor's version and so brings the check back.
_CHECKED: dict[int, tuple] = {}  # id(tensor) -> (weak reference to it, its version when checked)


def _checked_before(t: torch.Tensor) -> bool:
    entry = _CHECKED.get(id(t))
    return entry is not None and entry[0]() is t and entry[1] == t._version


def _remember_checked(t: torch.Tensor) -> None:
    key = id(t)
    try:
        ref = weakref.ref(t, lambda _, key=key: _CHECKED.pop(key, None))
    except TypeError:  # tensors that take no weak reference
        return
    _CHECKED[key] = (ref, t._version)


def _per_sample(value, name: str, like: torch.Tensor, check_values: bool = True) -> torch.Tensor:
    """A float or an (N,) tensor as a contiguous float32 (N,) tensor on ``like``'s device; a
    tensor's entries are checked finite and >= 0 unless ``check_values`` is off (one host sync)."""
    n = like.shape[0]
    if isinstance(value, torch.Tensor):
        original = value
        if value.dim() == 0:
            value = value.expand(n)
        if value.shape != (n,):
            raise ValueError(f"{name} must be a float or a tensor of shape ({n},), got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {value.dtype}")
        if check_values and value.numel() and not _checked_before(original):
            if not bool((torch.isfinite(value) & (value >= 0)).all()):
                raise ValueError(f"{name} must hold finite values >= 0, got min {value.min().item():.4g}, "
                                 f"max {value.max().item():.4g}")
            _remember_checked(original)
        return value.to(device=like.device, dtype=torch.float32).contiguous()
    if not isinstance(value, (float, int)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite float >= 0, got {value!r}")
    return torch.full((n,), float(value), device=like.device, dtype=torch.float32)


def _prepare(x_adv, grad, x_nat, alpha, eps, norm, clip, check_values=True):
    if not isinstance(x_adv, torch.Tensor) or not x_adv.is_floating_point():
        raise ValueError("x_adv must be a floating-point tensor")
    if x_adv.dim() < 1:
        raise ValueError("x_adv must have a batch dimension (shape (N, ...))")
    for name, t in (("grad", grad), ("x_nat", x_nat)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a tensor")
        if t.shape != x_adv.shape:
            raise ValueError(f"{name} must have x_adv's shape {tuple(x_adv.shape)}, got {tuple(t.shape)}")
        if t.device != x_adv.device:
            raise ValueError(f"{name} is on {t.device}, x_adv on {x_adv.device}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not (isinstance(clip, (tuple, list)) and len(clip) == 2):
        raise ValueError(f"clip must be a pair (min, max), got {clip!r}")
    clip_min, clip_max = float(clip[0]), float(clip[1])
    if not (math.isfinite(clip_min) and math.isfinite(clip_max) and clip_min <= clip_max):
        raise ValueError(f"clip must be finite with min <= max, got {clip!r}")
    alpha_t = _per_sample(alpha, "alpha", x_adv, check_values)
    eps_t = _per_sample(eps, "eps", x_adv, check_values)
    # The kernels walk flat memory: give grad and x_nat x_adv's dtype and exact layout.
    if not _is_batch_major_dense(x_adv):
        x_adv = x_adv.contiguous()
    grad, x_nat = (
        t if (t.dtype == x_adv.dtype and t.stride() == x_adv.stride()) else torch.empty_like(x_adv).copy_(t)
        for t in (grad, x_nat)
    )
    return x_adv, grad, x_nat, alpha_t, eps_t, clip_min, clip_max


def pgd_step(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x_nat: torch.Tensor,
    *,
    alpha: Number | torch.Tensor,
    eps: Number | torch.Tensor,
    norm: str = "linf",
    clip: tuple[float, float] = (0.0, 1.0),
    check_values: bool = True,
) -> torch.Tensor:
    """One projected-gradient ascent step, fused into one kernel.

    Args:
        x_adv: (N, ...) current iterate.
        grad: (N, ...) gradient of the loss at ``x_adv`` (cast to x_adv's dtype if it differs).
        x_nat: (N, ...) natural images, the centre of the eps-ball.
        alpha: step size, a float or an (N,) tensor (one per sample).
        eps: ball radius, a float or an (N,) tensor.
        norm: ``"linf"``: x + alpha * sign(grad); ``"l2"``: x + alpha * grad / |grad|_2 per sample
            (a zero gradient takes no step). Then projection onto the eps-ball around x_nat.
        clip: the box the result is clamped to, after the projection.
        check_values: check per-sample alpha/eps tensors for negative or NaN entries (one host
            synchronisation; the attacks' loops, which built those tensors themselves, turn it off).

    Returns:
        (N, ...) the next iterate, same dtype as x_adv.
    """
    x_adv, grad, x_nat, a, e, lo, hi = _prepare(x_adv, grad, x_nat, alpha, eps, norm, clip, check_values)
    return _pgd_step_op(x_adv, grad, x_nat, a, e, norm, lo, hi)


def pgd_step_(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x_nat: torch.Tensor,
    *,
    alpha: Number | torch.Tensor,
    eps: Number | torch.Tensor,
    norm: str = "linf",
    clip: tuple[float, float] = (0.0, 1.0),
    check_values: bool = True,
) -> torch.Tensor:
    """In-place :func:`pgd_step`: overwrites and returns ``x_adv`` (N, ...), allocating nothing when
    x_adv is dense and grad/x_nat share its layout (the attack loop's case)."""
    target = x_adv
    x_adv, grad, x_nat, a, e, lo, hi = _prepare(x_adv, grad, x_nat, alpha, eps, norm, clip, check_values)
    _pgd_step_inplace_op(x_adv, grad, x_nat, a, e, norm, lo, hi)
    if x_adv is not target:  # x_adv was not dense: the step ran on a contiguous copy
        target.copy_(x_adv)
    return target
