"""Triton kernels for the Gaussian Gram matrix K_ij = exp(-scale |x_i - x_j|^2), forward and backward.

Forward, two launches:
  1. ``_gram_partial_kernel``: x x^T on batch-centred rows (mean subtracted on load), split along
     d so that a small batch with a huge feature dimension still fills the GPU (split-K; the split
     count is chosen to fill whole waves, ``gram_split``). Only tiles on or above the diagonal are
     computed (K is symmetric). Partial sums go to a (split, m, m) buffer: deterministic, no atomics.
  2. ``_gram_epilogue_kernel``: sums the partials, takes the squared norms from their diagonal,
     forms the distance, the exponential, and writes the tile and its mirror image.
Backward, two launches: with G = dL/dK, ``_gram_s_kernel`` forms S' = S - diag(S 1),
  S = (G + G^T) * K, once (m x m); then dX = 2 scale S' (X - mean) is one (m x m)(m x d) product
  (``_gram_bwd_kernel``), feature tiles along grid axis 0 so that no d is too large to launch.
All accumulation is in float32; the dots run in ``input_precision`` ("tf32x3": float32-accurate
on tensor cores; "ieee": plain float32; "tf32": fastest, about 1e-3 relative).
"""
import functools

import torch
import triton
import triton.language as tl

from .launch import cdiv, sm_count


@triton.jit
def _gram_partial_kernel(
    x_ptr, mean_ptr, part_ptr,
    m, d, stride_xm, d_per_split,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_i, pid_j, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if pid_j < pid_i:  # K is symmetric: the lower tiles are mirrored by the epilogue
        return
    rows = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_j * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=tl.float32)
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
    base = split.to(tl.int64) * m * m
    omask = (rows[:, None] < m) & (cols[None, :] < m)
    tl.store(part_ptr + base + rows[:, None] * m + cols[None, :], acc, mask=omask)


@triton.jit
def _gram_epilogue_kernel(
    part_ptr, scale_ptr, k_ptr, m, n_split,
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
        base = part_ptr + s * m * m
        dot += tl.load(base + rows[:, None] * m + cols[None, :], mask=omask, other=0.0)
        # Squared norms: the diagonal of the product (diagonal tiles hold their whole block).
        sq_r += tl.load(base + rows * (m + 1), mask=rows < m, other=0.0)
        sq_c += tl.load(base + cols * (m + 1), mask=cols < m, other=0.0)
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
def _gram_s_kernel(g_ptr, k_ptr, s_ptr, m, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """S' = (G + G^T) * K - diag(row sums of (G + G^T) * K), formed once: BLOCK_R rows a program."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < m
    total = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, m, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = rmask[:, None] & (cols[None, :] < m)
        g = tl.load(g_ptr + rows[:, None] * m + cols[None, :], mask=mask, other=0.0)
        g_t = tl.load(g_ptr + cols[None, :] * m + rows[:, None], mask=mask, other=0.0)
        s = (g + g_t) * tl.load(k_ptr + rows[:, None] * m + cols[None, :], mask=mask, other=0.0)
        total += tl.sum(s, axis=1)
        # The diagonal is written once, after the loop: no two stores to one address.
        tl.store(s_ptr + rows[:, None] * m + cols[None, :], s, mask=mask & (rows[:, None] != cols[None, :]))
    diag = 2.0 * tl.load(g_ptr + rows * m + rows, mask=rmask, other=0.0) * tl.load(k_ptr + rows * m + rows,
                                                                                     mask=rmask, other=0.0)
    tl.store(s_ptr + rows * m + rows, diag - total, mask=rmask)


@triton.jit
def _gram_bwd_kernel(
    s_ptr, x_ptr, mean_ptr, scale_ptr, dx_ptr,
    m, d, stride_xm, stride_dxm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """dX tile = 2 scale S' (X - mean): feature tiles along axis 0 (no limit from d), rows along axis 1."""
    pid_d, pid_m = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < d
    mu = tl.load(mean_ptr + dcols, mask=dmask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, m, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        s = tl.load(s_ptr + rows[:, None] * m + cols[None, :], mask=(rows[:, None] < m) & (cols[None, :] < m),
                    other=0.0)
        xmask = (cols[:, None] < m) & dmask[None, :]
        xb = tl.load(x_ptr + cols[:, None].to(tl.int64) * stride_xm + dcols[None, :], mask=xmask, other=0.0)
        xb = tl.where(xmask, xb.to(tl.float32) - mu[None, :], 0.0)
        acc += tl.dot(s, xb, input_precision=PRECISION)
    dx = 2.0 * tl.load(scale_ptr) * acc
    amask = (rows[:, None] < m) & dmask[None, :]
    tl.store(dx_ptr + rows[:, None].to(tl.int64) * stride_dxm + dcols[None, :],
             dx.to(dx_ptr.dtype.element_ty), mask=amask)


def _precision(x: torch.Tensor) -> str:
    # The interpreter computes dots with numpy in the inputs' precision whatever is asked.
    return "tf32x3" if x.is_cuda else "ieee"


# Tile sizes: (GPU, interpreter). On the GPU the forward's 64 x 64 output tile with 32-wide slices
# of d in 3 pipeline stages takes 48 KB of shared memory (several programs per SM).
FWD_TILES = {True: dict(BLOCK_M=64, BLOCK_D=32, num_warps=8, num_stages=2),
             False: dict(BLOCK_M=16, BLOCK_D=32, num_warps=4, num_stages=1)}
EPI_WARPS = 8
S_TILES = dict(BLOCK_R=16, BLOCK_C=64, num_warps=4)
BWD_TILES = {True: dict(BLOCK_M=64, BLOCK_N=32, BLOCK_D=64, num_warps=8, num_stages=3),
             False: dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=32, num_warps=4, num_stages=1)}
MAX_SPLIT = 64


@functools.lru_cache(maxsize=1024)
def gram_split(upper_tiles: int, d: int, block_d: int, wave: int) -> tuple[int, int]:
    """(n_split, d_per_split) for the forward's split-K: the fewest idle slots over the waves of
    programs (each split at least 4 slices of d), then the fewest splits (less partial-sum
    traffic). ``wave``: programs that run at once (the SM count). Cached: the search over up to 64
    splits took 0.4 ms of Python per call, more than the kernels' GPU time at m = 128 (H200 profile)."""
    max_split = max(1, min(MAX_SPLIT, cdiv(d, 4 * block_d)))
    best = None
    for asked in range(1, max_split + 1):
        per = cdiv(cdiv(d, asked), block_d) * block_d
        n_split = cdiv(d, per)
        programs = upper_tiles * n_split
        efficiency = programs / (cdiv(programs, wave) * wave)
        key = (efficiency, -n_split)
        if best is None or key > best[0]:
            best = (key, n_split, per)
    return best[1], best[2]


def gram_bwd_grid(m: int, d: int, on_gpu: bool = True) -> tuple[int, int]:
    """The backward product's grid: feature tiles on axis 0 (up to 2^31 - 1), row tiles on axis 1."""
    cfg = BWD_TILES[on_gpu]
    return cdiv(d, cfg["BLOCK_D"]), cdiv(m, cfg["BLOCK_M"])


def gaussian_gram_fwd(x, mean, scale, out, apply_exp=True):
    """K (m, m) float32 into ``out``. x: (m, d) row-major; mean: (d,) float32; scale: () float32."""
    m, d = x.shape
    if x.dtype in (torch.float16, torch.bfloat16):
        # Half inputs are widened first: loading them in the product's loop (with tf32x3's three
        # dots) spilled registers on sm_80 in the ahead-of-time check (bench/results/triton-aot.csv).
        x = x.float()
    cfg = FWD_TILES[x.is_cuda]
    tiles = cdiv(m, cfg["BLOCK_M"])
    wave = sm_count(x.device) if x.is_cuda else 4
    n_split, d_per_split = gram_split(tiles * (tiles + 1) // 2, d, cfg["BLOCK_D"], wave)
    partial = torch.empty((n_split, m, m), device=x.device, dtype=torch.float32)
    # Grid (tiles, tiles, n_split): tiles <= 65535 on axis 1 (m up to 4M), n_split <= 64.
    _gram_partial_kernel[(tiles, tiles, n_split)](
        x, mean, partial, m, d, x.stride(0), d_per_split, PRECISION=_precision(x), **cfg,
    )
    _gram_epilogue_kernel[(tiles, tiles)](
        partial, scale, out, m, n_split, BLOCK_M=cfg["BLOCK_M"], APPLY_EXP=apply_exp, num_warps=EPI_WARPS,
        num_stages=1,
    )
    return out


def gaussian_gram_bwd(grad, k, x, mean, scale, dx):
    """dL/dx (m, d) into ``dx`` given grad = dL/dK (m, m) float32 and the forward's K."""
    m, d = x.shape
    s = torch.empty((m, m), device=x.device, dtype=torch.float32)
    _gram_s_kernel[(cdiv(m, S_TILES["BLOCK_R"]),)](grad, k, s, m, **S_TILES)
    cfg = BWD_TILES[x.is_cuda]
    _gram_bwd_kernel[gram_bwd_grid(m, d, x.is_cuda)](s, x, mean, scale, dx, m, d, x.stride(0), dx.stride(0), PRECISION=_precision(x), **cfg)
    return dx


def aot_variants():
    """Every (kernel, signature, constexprs, options) the launchers above can launch on a GPU, for
    the ahead-of-time compile check (fastprune/kernels/aot.py)."""
    split = lambda cfg: ({k: v for k, v in cfg.items() if k.isupper()},  # noqa: E731
                         {k: v for k, v in cfg.items() if not k.isupper()})
    fwd_const, fwd_opts = split(FWD_TILES[True])
    bwd_const, bwd_opts = split(BWD_TILES[True])
    s_const, s_opts = split(S_TILES)
    for dtype, ty in (("float32", "fp32"), ("float64", "fp64")):  # half inputs are widened first
        yield (f"partial {dtype}", _gram_partial_kernel,
               {"x_ptr": f"*{ty}", "mean_ptr": "*fp32", "part_ptr": "*fp32",
                "m": "i32", "d": "i32", "stride_xm": "i32", "d_per_split": "i32"},
               {**fwd_const, "PRECISION": "tf32x3"}, fwd_opts)
    for dtype, ty in (("float32", "fp32"), ("float16", "fp16"), ("bfloat16", "bf16"), ("float64", "fp64")):
        yield (f"bwd {dtype}", _gram_bwd_kernel,
               {"s_ptr": "*fp32", "x_ptr": f"*{ty}", "mean_ptr": "*fp32", "scale_ptr": "*fp32",
                "dx_ptr": f"*{ty}", "m": "i32", "d": "i32", "stride_xm": "i32", "stride_dxm": "i32"},
               {**bwd_const, "PRECISION": "tf32x3"}, bwd_opts)
    for apply_exp in (True, False):
        yield (f"epilogue exp={apply_exp}", _gram_epilogue_kernel,
               {"part_ptr": "*fp32", "scale_ptr": "*fp32", "k_ptr": "*fp32",
                "m": "i32", "n_split": "i32"},
               {"BLOCK_M": FWD_TILES[True]["BLOCK_M"], "APPLY_EXP": apply_exp}, {"num_warps": EPI_WARPS, "num_stages": 1})
    yield ("S once", _gram_s_kernel, {"g_ptr": "*fp32", "k_ptr": "*fp32", "s_ptr": "*fp32", "m": "i32"},
           s_const, s_opts)
