"""Triton kernels for the fused PGD step.

Linf is elementwise: one program per BLOCK elements, alpha/eps gathered per element's sample. L2
needs two per-sample norms (of the gradient, and of the perturbation after the step) before any
output is known, so one program handles one whole sample in three passes over it.
Arithmetic is in float32 (float64 for double inputs), in the order of fastprune/reference/pgd.py.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _pgd_step_linf_kernel(
    x_ptr, g_ptr, xn_ptr, alpha_ptr, eps_ptr, out_ptr,
    numel, per_sample, clip_min, clip_max,
    BLOCK: tl.constexpr, COMPUTE: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    sample = offs // per_sample
    a = tl.load(alpha_ptr + sample, mask=mask).to(COMPUTE)
    e = tl.load(eps_ptr + sample, mask=mask).to(COMPUTE)
    x = tl.load(x_ptr + offs, mask=mask).to(COMPUTE)
    g = tl.load(g_ptr + offs, mask=mask).to(COMPUTE)
    xn = tl.load(xn_ptr + offs, mask=mask).to(COMPUTE)
    step = tl.where(g > 0, a, tl.where(g < 0, -a, 0.0))
    y = x + step
    y = tl.minimum(tl.maximum(y, xn - e), xn + e)
    y = tl.minimum(tl.maximum(y, clip_min), clip_max)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pgd_step_l2_kernel(
    x_ptr, g_ptr, xn_ptr, alpha_ptr, eps_ptr, out_ptr,
    per_sample, clip_min, clip_max,
    BLOCK: tl.constexpr, COMPUTE: tl.constexpr,
):
    sample = tl.program_id(0).to(tl.int64)
    base = sample * per_sample
    a = tl.load(alpha_ptr + sample).to(COMPUTE)
    e = tl.load(eps_ptr + sample).to(COMPUTE)
    cols = tl.arange(0, BLOCK)

    gsq = tl.zeros([BLOCK], dtype=COMPUTE)
    for start in range(0, per_sample, BLOCK):
        m = start + cols < per_sample
        g = tl.load(g_ptr + base + start + cols, mask=m, other=0.0).to(COMPUTE)
        gsq += g * g
    scale = a / tl.maximum(tl.sqrt(tl.sum(gsq, axis=0)), 1e-12)

    dsq = tl.zeros([BLOCK], dtype=COMPUTE)
    for start in range(0, per_sample, BLOCK):
        m = start + cols < per_sample
        x = tl.load(x_ptr + base + start + cols, mask=m, other=0.0).to(COMPUTE)
        g = tl.load(g_ptr + base + start + cols, mask=m, other=0.0).to(COMPUTE)
        xn = tl.load(xn_ptr + base + start + cols, mask=m, other=0.0).to(COMPUTE)
        d = (x + scale * g) - xn
        dsq += d * d
    factor = tl.minimum(e / tl.maximum(tl.sqrt(tl.sum(dsq, axis=0)), 1e-12), 1.0)

    for start in range(0, per_sample, BLOCK):
        m = start + cols < per_sample
        x = tl.load(x_ptr + base + start + cols, mask=m, other=0.0).to(COMPUTE)
        g = tl.load(g_ptr + base + start + cols, mask=m, other=0.0).to(COMPUTE)
        xn = tl.load(xn_ptr + base + start + cols, mask=m, other=0.0).to(COMPUTE)
        y = xn + ((x + scale * g) - xn) * factor
        y = tl.minimum(tl.maximum(y, clip_min), clip_max)
        tl.store(out_ptr + base + start + cols, y.to(out_ptr.dtype.element_ty), mask=m)


def pgd_step_fwd(x_adv, grad, x_nat, alpha, eps, norm, clip_min, clip_max, out):
    """Launch the step, writing ``out`` (which may be ``x_adv``). Tensors: dense, batch-outermost,
    one shared layout; alpha, eps: float32 (N,)."""
    numel = x_adv.numel()
    if numel == 0:
        return out
    n = x_adv.shape[0]
    per_sample = numel // n
    compute = tl.float64 if x_adv.dtype == torch.float64 else tl.float32
    if norm == "linf":
        block = 2048
        _pgd_step_linf_kernel[(triton.cdiv(numel, block),)](
            x_adv, grad, x_nat, alpha, eps, out, numel, per_sample, clip_min, clip_max,
            BLOCK=block, COMPUTE=compute, num_warps=8,
        )
    else:
        block = min(4096, max(triton.next_power_of_2(per_sample), 128))
        _pgd_step_l2_kernel[(n,)](
            x_adv, grad, x_nat, alpha, eps, out, per_sample, clip_min, clip_max,
            BLOCK=block, COMPUTE=compute, num_warps=8 if block >= 2048 else 4,
        )
    return out
