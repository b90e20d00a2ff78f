"""Triton kernels for the fused PGD step.

Linf is elementwise: one program per BLOCK elements, alpha/eps gathered per element's sample.

L2 needs two per-sample norms (of the gradient, and of the perturbation after the step) before any
output is known. One program per sample would leave most of a GPU idle at attack batch sizes (32
samples on 132 SMs), so each sample is cut into ``n_chunks`` chunks and the work is three launches
over (sample, chunk) programs, each reading the previous launch's per-chunk partial sums
(deterministic: no atomics):
  1. ``_pgd_l2_grad_sq_kernel``: sum of grad^2 over the chunk;
  2. ``_pgd_l2_delta_sq_kernel``: the sample's step scale from (1), then the sum of
     ((x + scale g) - x_nat)^2 over the chunk;
  3. ``_pgd_l2_write_kernel``: scale and projection factor from (1) and (2), then the write.
Arithmetic is in float32 (float64 for double inputs), in the order of fastprune/reference/pgd.py.
"""
import torch
import triton
import triton.language as tl

from .launch import cdiv, sm_count

LINF_BLOCK, LINF_WARPS = 2048, 8
L2_BLOCK, L2_WARPS = 1024, 4
L2_MAX_CHUNKS = 64  # partial sums per sample; a power of two (one masked load reads them all)


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
def _chunk_bounds(per_sample, chunk_len, n_chunks):
    """This program's sample, chunk and the [start, end) of its chunk, as flat offsets. Programs
    are numbered sample-major along axis 0 (up to 2^31 - 1: no 65535-sample limit)."""
    pid = tl.program_id(0).to(tl.int64)
    sample, chunk = pid // n_chunks, pid % n_chunks
    start = sample * per_sample + chunk * chunk_len
    end = tl.minimum(start + chunk_len, (sample + 1) * per_sample)
    return sample, chunk, start, end


@triton.jit
def _sample_total(part_ptr, sample, n_chunks, MAX_CHUNKS: tl.constexpr):
    """Sum of one sample's per-chunk partial sums (row ``sample`` of a (N, n_chunks) buffer)."""
    c = tl.arange(0, MAX_CHUNKS)
    return tl.sum(tl.load(part_ptr + sample * n_chunks + c, mask=c < n_chunks, other=0.0), axis=0)


@triton.jit
def _pgd_l2_grad_sq_kernel(
    g_ptr, gpart_ptr, per_sample, chunk_len, n_chunks,
    BLOCK: tl.constexpr, COMPUTE: tl.constexpr,
):
    sample, chunk, start, end = _chunk_bounds(per_sample, chunk_len, n_chunks)
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=COMPUTE)
    for i in range(start, end, BLOCK):
        m = i + cols < end
        g = tl.load(g_ptr + i + cols, mask=m, other=0.0).to(COMPUTE)
        acc += g * g
    tl.store(gpart_ptr + sample * n_chunks + chunk, tl.sum(acc, axis=0))


@triton.jit
def _pgd_l2_delta_sq_kernel(
    x_ptr, g_ptr, xn_ptr, alpha_ptr, gpart_ptr, dpart_ptr, per_sample, chunk_len, n_chunks,
    BLOCK: tl.constexpr, MAX_CHUNKS: tl.constexpr, COMPUTE: tl.constexpr,
):
    sample, chunk, start, end = _chunk_bounds(per_sample, chunk_len, n_chunks)
    gnorm = tl.sqrt(_sample_total(gpart_ptr, sample, n_chunks, MAX_CHUNKS))
    scale = tl.load(alpha_ptr + sample).to(COMPUTE) / tl.maximum(gnorm, 1e-12)
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=COMPUTE)
    for i in range(start, end, BLOCK):
        m = i + cols < end
        x = tl.load(x_ptr + i + cols, mask=m, other=0.0).to(COMPUTE)
        g = tl.load(g_ptr + i + cols, mask=m, other=0.0).to(COMPUTE)
        xn = tl.load(xn_ptr + i + cols, mask=m, other=0.0).to(COMPUTE)
        d = (x + scale * g) - xn
        acc += d * d
    tl.store(dpart_ptr + sample * n_chunks + chunk, tl.sum(acc, axis=0))


@triton.jit
def _pgd_l2_write_kernel(
    x_ptr, g_ptr, xn_ptr, alpha_ptr, eps_ptr, gpart_ptr, dpart_ptr, out_ptr,
    per_sample, chunk_len, n_chunks, clip_min, clip_max,
    BLOCK: tl.constexpr, MAX_CHUNKS: tl.constexpr, COMPUTE: tl.constexpr,
):
    sample, chunk, start, end = _chunk_bounds(per_sample, chunk_len, n_chunks)
    gnorm = tl.sqrt(_sample_total(gpart_ptr, sample, n_chunks, MAX_CHUNKS))
    scale = tl.load(alpha_ptr + sample).to(COMPUTE) / tl.maximum(gnorm, 1e-12)
    dnorm = tl.sqrt(_sample_total(dpart_ptr, sample, n_chunks, MAX_CHUNKS))
    factor = tl.minimum(tl.load(eps_ptr + sample).to(COMPUTE) / tl.maximum(dnorm, 1e-12), 1.0)
    cols = tl.arange(0, BLOCK)
    for i in range(start, end, BLOCK):
        m = i + cols < end
        x = tl.load(x_ptr + i + cols, mask=m, other=0.0).to(COMPUTE)
        g = tl.load(g_ptr + i + cols, mask=m, other=0.0).to(COMPUTE)
        xn = tl.load(xn_ptr + i + cols, mask=m, other=0.0).to(COMPUTE)
        y = xn + ((x + scale * g) - xn) * factor
        y = tl.minimum(tl.maximum(y, clip_min), clip_max)
        tl.store(out_ptr + i + cols, y.to(out_ptr.dtype.element_ty), mask=m)


def l2_chunks(n: int, per_sample: int, block: int, target_programs: int) -> tuple[int, int]:
    """(n_chunks, chunk_len) for the L2 step: enough (chunk, sample) programs to reach
    ``target_programs`` (a few per SM), each chunk a whole number of blocks, at most
    L2_MAX_CHUNKS chunks per sample, every chunk non-empty."""
    blocks = cdiv(per_sample, block)
    n_chunks = max(1, min(cdiv(target_programs, max(n, 1)), blocks, L2_MAX_CHUNKS))
    chunk_len = cdiv(blocks, n_chunks) * block
    return cdiv(per_sample, chunk_len), chunk_len


def target_programs(device: torch.device) -> int:
    """Programs that fill the device a few times over: 4 per SM on a GPU; 4 under the interpreter."""
    if device.type == "cuda":
        return 4 * sm_count(device)
    return 4


def _compute_type(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def pgd_step_fwd(x_adv, grad, x_nat, alpha, eps, norm, clip_min, clip_max, out):
    """Launch the step, writing ``out`` (which may be ``x_adv``). Tensors: dense, batch-outermost,
    one shared layout; alpha, eps: float32 (N,)."""
    numel = x_adv.numel()
    if numel == 0:
        return out
    n = x_adv.shape[0]
    per_sample = numel // n
    compute = _compute_type(x_adv.dtype)
    if norm == "linf":
        _pgd_step_linf_kernel[(cdiv(numel, LINF_BLOCK),)](
            x_adv, grad, x_nat, alpha, eps, out, numel, per_sample, clip_min, clip_max,
            BLOCK=LINF_BLOCK, COMPUTE=compute, num_warps=LINF_WARPS,
        )
        return out
    n_chunks, chunk_len = l2_chunks(n, per_sample, L2_BLOCK, target_programs(x_adv.device))
    part_dtype = torch.float64 if x_adv.dtype == torch.float64 else torch.float32
    gpart = torch.empty((n, n_chunks), device=x_adv.device, dtype=part_dtype)
    dpart = torch.empty_like(gpart)
    grid = (n * n_chunks,)
    common = dict(BLOCK=L2_BLOCK, COMPUTE=compute, num_warps=L2_WARPS)
    _pgd_l2_grad_sq_kernel[grid](grad, gpart, per_sample, chunk_len, n_chunks, **common)
    _pgd_l2_delta_sq_kernel[grid](x_adv, grad, x_nat, alpha, gpart, dpart, per_sample, chunk_len, n_chunks,
                                  MAX_CHUNKS=L2_MAX_CHUNKS, **common)
    _pgd_l2_write_kernel[grid](x_adv, grad, x_nat, alpha, eps, gpart, dpart, out, per_sample, chunk_len, n_chunks,
                               clip_min, clip_max, MAX_CHUNKS=L2_MAX_CHUNKS, **common)
    return out


def aot_variants():
    """Every (kernel, signature, constexprs, options) the launcher above can launch, for the
    ahead-of-time compile check (fastprune/kernels/aot.py)."""
    for dtype, ty in (("float32", "fp32"), ("float16", "fp16"), ("bfloat16", "bf16"), ("float64", "fp64")):
        compute = _compute_type(getattr(torch, dtype))
        part = "fp64" if dtype == "float64" else "fp32"
        p = f"*{ty}"
        yield (f"linf {dtype}", _pgd_step_linf_kernel,
               {"x_ptr": p, "g_ptr": p, "xn_ptr": p, "alpha_ptr": "*fp32", "eps_ptr": "*fp32", "out_ptr": p,
                "numel": "i64", "per_sample": "i64", "clip_min": "fp32", "clip_max": "fp32"},
               {"BLOCK": LINF_BLOCK, "COMPUTE": compute}, {"num_warps": LINF_WARPS})
        sizes = {"per_sample": "i32", "chunk_len": "i32", "n_chunks": "i32"}
        yield (f"l2 grad_sq {dtype}", _pgd_l2_grad_sq_kernel,
               {"g_ptr": p, "gpart_ptr": f"*{part}", **sizes},
               {"BLOCK": L2_BLOCK, "COMPUTE": compute}, {"num_warps": L2_WARPS})
        yield (f"l2 delta_sq {dtype}", _pgd_l2_delta_sq_kernel,
               {"x_ptr": p, "g_ptr": p, "xn_ptr": p, "alpha_ptr": "*fp32", "gpart_ptr": f"*{part}",
                "dpart_ptr": f"*{part}", **sizes},
               {"BLOCK": L2_BLOCK, "MAX_CHUNKS": L2_MAX_CHUNKS, "COMPUTE": compute}, {"num_warps": L2_WARPS})
        yield (f"l2 write {dtype}", _pgd_l2_write_kernel,
               {"x_ptr": p, "g_ptr": p, "xn_ptr": p, "alpha_ptr": "*fp32", "eps_ptr": "*fp32",
                "gpart_ptr": f"*{part}", "dpart_ptr": f"*{part}", "out_ptr": p, **sizes,
                "clip_min": "fp32", "clip_max": "fp32"},
               {"BLOCK": L2_BLOCK, "MAX_CHUNKS": L2_MAX_CHUNKS, "COMPUTE": compute}, {"num_warps": L2_WARPS})
