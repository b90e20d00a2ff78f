"""Triton kernels for the Gaussian Gram matrix K_ij = exp(-scale |x_i - x_j|^2), forward and backward.

Forward, two launches:
  1. ``_gram_partial_kernel``: x x^T on batch-centred rows (mean subtracted on load), split along
     d so that a small batch with a huge feature dimension still fills the GPU (split-K). Only
     tiles on or above the diagonal are computed (K is symmetric); diagonal tiles also sum the
     squared row norms. Partial sums go to a (split, m, m) buffer: deterministic, no atomics.
  2. ``_gram_epilogue_kernel``: sums the partials, forms the distance, the exponential, and writes
     the tile and its mirror image.
Backward, one launch: with G = dL/dK, S = (G + G^T) * K formed tile by tile on the fly,
  dX = 2 scale (S X - diag(S 1) X), one (m x m)(m x d) product (``_gram_bwd_kernel``).
All accumulation is in float32; the dots run in ``input_precision`` ("tf32x3": float32-accurate
on tensor cores; "ieee": plain float32; "tf32": fastest, about 1e-3 relative).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _gram_partial_kernel(
    x_ptr, mean_ptr, part_ptr, sq_part_ptr,
    m, d, stride_xm, d_per_split,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_i, pid_j, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if pid_j < pid_i:  # K is symmetric: the lower tiles are mirrored by the epilogue
        return
    rows = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_j * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    d_start = split * d_per_split
    for k0 in range(d_start, d_start + d_per_split, BLOCK_D):
        kk = k0 + tl.arange(0, BLOCK_D)
        kmask = (kk < d) & (kk < d_start + d_per_split)
        mu = tl.load(mean_ptr + kk, mask=kmask, other=0.0)
        amask = (rows[:, None] < m) & kmask[None, :]
        a = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + kk[None, :], mask=amask, other=0.0)
        a = tl.where(amask, a.to(tl.float32) - mu[None, :], 0.0)
        bmask = (cols[:, None] < m) & kmask[None, :]
        b = tl.load(x_ptr + cols[:, None].to(tl.int64) * stride_xm + kk[None, :], mask=bmask, other=0.0)
        b = tl.where(bmask, b.to(tl.float32) - mu[None, :], 0.0)
        acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
        if pid_i == pid_j:
            sq += tl.sum(a * a, axis=1)
    base = split.to(tl.int64) * m * m
    omask = (rows[:, None] < m) & (cols[None, :] < m)
    tl.store(part_ptr + base + rows[:, None] * m + cols[None, :], acc, mask=omask)
    if pid_i == pid_j:
        tl.store(sq_part_ptr + split.to(tl.int64) * m + rows, sq, mask=rows < m)


@triton.jit
def _gram_epilogue_kernel(
    part_ptr, sq_part_ptr, scale_ptr, k_ptr, m, n_split,
    BLOCK_M: tl.constexpr, APPLY_EXP: tl.constexpr,
):
    pid_i, pid_j = tl.program_id(0), tl.program_id(1)
    if pid_j < pid_i:
        return
    rows = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_j * BLOCK_M + tl.arange(0, BLOCK_M)
    omask = (rows[:, None] < m) & (cols[None, :] < m)
    dot = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
    sq_r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    sq_c = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for s in range(0, n_split):
        dot += tl.load(part_ptr + s * m * m + rows[:, None] * m + cols[None, :], mask=omask, other=0.0)
        sq_r += tl.load(sq_part_ptr + s * m + rows, mask=rows < m, other=0.0)
        sq_c += tl.load(sq_part_ptr + s * m + cols, mask=cols < m, other=0.0)
    dist = tl.maximum(sq_r[:, None] + sq_c[None, :] - 2.0 * dot, 0.0)
    dist = tl.where(rows[:, None] == cols[None, :], 0.0, dist)
    if APPLY_EXP:
        out = tl.exp(-tl.load(scale_ptr) * dist)
    else:
        out = dist
    # Write the upper triangle and its mirror image only, so that K is exactly symmetric even where
    # a diagonal tile's dot products differ in the last bit between (i, j) and (j, i). (In tiles
    # above the diagonal every column index exceeds every row index, so the test passes there.)
    upper = omask & (rows[:, None] <= cols[None, :])
    tl.store(k_ptr + rows[:, None] * m + cols[None, :], out, mask=upper)
    tl.store(k_ptr + cols[None, :] * m + rows[:, None], out, mask=upper)


@triton.jit
def _gram_bwd_kernel(
    g_ptr, k_ptr, x_ptr, mean_ptr, scale_ptr, dx_ptr,
    m, d, stride_xm, stride_dxm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m, pid_d = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < d
    mu = tl.load(mean_ptr + dcols, mask=dmask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    s_rows = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, m, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        smask = (rows[:, None] < m) & (cols[None, :] < m)
        g = tl.load(g_ptr + rows[:, None] * m + cols[None, :], mask=smask, other=0.0)
        g_t = tl.load(g_ptr + cols[None, :] * m + rows[:, None], mask=smask, other=0.0)
        k = tl.load(k_ptr + rows[:, None] * m + cols[None, :], mask=smask, other=0.0)
        s = (g + g_t) * k
        s_rows += tl.sum(s, axis=1)
        xmask = (cols[:, None] < m) & dmask[None, :]
        xb = tl.load(x_ptr + cols[:, None].to(tl.int64) * stride_xm + dcols[None, :], mask=xmask, other=0.0)
        xb = tl.where(xmask, xb.to(tl.float32) - mu[None, :], 0.0)
        acc += tl.dot(s, xb, input_precision=PRECISION)
    amask = (rows[:, None] < m) & dmask[None, :]
    xa = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + dcols[None, :], mask=amask, other=0.0)
    xa = xa.to(tl.float32) - mu[None, :]
    dx = 2.0 * tl.load(scale_ptr) * (acc - s_rows[:, None] * xa)
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * stride_dxm + dcols[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=amask)


def _precision(x: torch.Tensor) -> str:
    # The interpreter computes dots with numpy in the inputs' precision whatever is asked.
    return "tf32x3" if x.is_cuda else "ieee"


def gaussian_gram_fwd(x, mean, scale, out, apply_exp=True):
    """K (m, m) float32 into ``out``. x: (m, d) row-major; mean: (d,) float32; scale: () float32."""
    m, d = x.shape
    block_m, block_d = (64, 64) if x.is_cuda else (16, 32)
    tiles = triton.cdiv(m, block_m)
    # Split d until there are enough programs to fill the GPU, each handling at least 4 blocks of d.
    target = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    upper_tiles = tiles * (tiles + 1) // 2
    n_split = max(1, min(triton.cdiv(target, upper_tiles), triton.cdiv(d, 4 * block_d), 64))
    d_per_split = triton.cdiv(triton.cdiv(d, n_split), block_d) * block_d
    n_split = triton.cdiv(d, d_per_split)
    partial = torch.empty((n_split, m, m), device=x.device, dtype=torch.float32)
    sq_partial = torch.empty((n_split, m), device=x.device, dtype=torch.float32)
    _gram_partial_kernel[(tiles, tiles, n_split)](
        x, mean, partial, sq_partial, m, d, x.stride(0), d_per_split,
        BLOCK_M=block_m, BLOCK_D=block_d, PRECISION=_precision(x), num_warps=4, num_stages=3 if x.is_cuda else 1,
    )
    _gram_epilogue_kernel[(tiles, tiles)](
        partial, sq_partial, scale, out, m, n_split, BLOCK_M=block_m, APPLY_EXP=apply_exp, num_warps=4,
    )
    return out


def gaussian_gram_bwd(grad, k, x, mean, scale, dx):
    """dL/dx (m, d) into ``dx`` given grad = dL/dK (m, m) float32 and the forward's K."""
    m, d = x.shape
    block_m, block_n, block_d = (64, 32, 64) if x.is_cuda else (16, 16, 32)
    grid = (triton.cdiv(m, block_m), triton.cdiv(d, block_d))
    _gram_bwd_kernel[grid](
        grad, k, x, mean, scale, dx, m, d, x.stride(0), dx.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=_precision(x),
        num_warps=4, num_stages=3 if x.is_cuda else 1,
    )
    return dx
