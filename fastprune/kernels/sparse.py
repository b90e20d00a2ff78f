"""Triton kernel for sparse inference on the GPU: direct sparse convolution (and linear, as a 1x1
convolution on a 1x1 map) with the weight in an output-channel-tiled format.

Why tiles: with plain CSR, each output channel walks its own non-zeros, so an input value loaded
for one channel is never reused by another. Here the output channels are cut into tiles of
``OC_TILE`` (16); a tile keeps the sorted union of its channels' non-zero columns (input channel,
kernel row, kernel column) and a dense (columns x OC_TILE) block of values, zero where a channel has
no weight at that column (fastprune.reference.sparse.TiledWeight). A program computes BLOCK_P output positions
(flattened over batch and space) for one tile: for each slice of BLOCK_K union columns it gathers
the (BLOCK_K, BLOCK_P) input values once and multiplies them with the (OC_TILE, BLOCK_K) values in
one ``tl.dot`` on the tensor cores, so every loaded input serves all 16 channels of the tile. The
cost is the zeros inside a tile's block: at 90% sparsity a 16-channel tile's union holds about 80%
of the columns (1.6 non-zeros each), at 99% about 15% (1.1 each).

Positions run along the width (coalesced gathers for stride 1); any input strides are honoured
(contiguous or channels_last, no copy); the output is contiguous (N, OC, H', W'). BLOCK_P follows
the output size (16 to 128), so a 4x4 map at batch 1 keeps its lanes busy. The grid is one flat
axis (tile-major; up to 2^31 - 1 programs), so no output-channel or position count is too large to
launch. float32 inputs use ``tf32x3`` dots (float32 accuracy); float16/bfloat16 inputs their own
precision with float32 accumulation.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cdiv

OC_TILE = 16
BLOCK_K = 16
BLOCK_P_CHOICES = (16, 32, 64, 128)
NUM_WARPS = 4
NUM_STAGES = 2  # 3 stages spilled registers for float16/bfloat16 at BLOCK_P 64 on sm_80 (AOT check)


@triton.jit
def _sparse_conv2d_tiled_kernel(
    x_ptr, tile_ptr_ptr, tile_col_ptr, tile_val_ptr, bias_ptr, out_ptr,
    OC, HO, WO, total_p, n_pblocks, KW, KSIZE, SH, SW, PH, PW, H, W,
    sxn, sxc, sxh, sxw,
    RELU: tl.constexpr, BLOCK_P: tl.constexpr, OC_TILE: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    tile, pblock = pid // n_pblocks, pid % n_pblocks
    p = pblock.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < total_p
    n = p // (HO * WO)
    rem = p % (HO * WO)
    y0 = (rem // WO) * SH - PH
    x0 = (rem % WO) * SW - PW
    oc = tile * OC_TILE + tl.arange(0, OC_TILE)
    start = tl.load(tile_ptr_ptr + tile)
    end = tl.load(tile_ptr_ptr + tile + 1)
    acc = tl.zeros((OC_TILE, BLOCK_P), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < end
        col = tl.load(tile_col_ptr + ks, mask=kmask, other=0)
        ic = col // KSIZE
        rs = col % KSIZE
        iy = y0[None, :] + (rs // KW)[:, None]
        ix = x0[None, :] + (rs % KW)[:, None]
        m = kmask[:, None] & pmask[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        xv = tl.load(x_ptr + n[None, :] * sxn + ic[:, None].to(tl.int64) * sxc + iy * sxh + ix * sxw,
                     mask=m, other=0.0)
        w = tl.load(tile_val_ptr + ks[None, :].to(tl.int64) * OC_TILE + tl.arange(0, OC_TILE)[:, None],
                    mask=kmask[None, :], other=0.0)
        acc += tl.dot(w.to(xv.dtype), xv, input_precision=PRECISION)
    acc += tl.load(bias_ptr + oc, mask=oc < OC, other=0.0)[:, None]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    omask = (oc[:, None] < OC) & pmask[None, :]
    offs = (n[None, :] * OC + oc[:, None]) * (HO * WO) + rem[None, :]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=omask)


def block_p(total_p: int) -> int:
    """Positions per program: the output's size rounded up to a power of two, 16 to 128."""
    return min(BLOCK_P_CHOICES[-1], max(BLOCK_P_CHOICES[0], 1 << (max(total_p, 1) - 1).bit_length()))


def launch_grid(total_p: int, oc: int) -> tuple[int, int, int]:
    """(programs, position blocks, BLOCK_P): one flat grid axis, tile-major."""
    bp = block_p(total_p)
    n_pblocks = cdiv(total_p, bp)
    return cdiv(oc, OC_TILE) * n_pblocks, n_pblocks, bp


def _precision(dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "ieee"


def sparse_conv2d_fwd(x, weight, kh, kw, stride_h, stride_w, pad_h, pad_w, relu=False):
    """(N, C, H, W) in any strides -> (N, OC, H', W') contiguous, in x's dtype. ``weight``: the
    layer's tiled form (fastprune.reference.sparse.TiledWeight: tile_ptr, tile_cols, tile_vals,
    bias, rows)."""
    n, c, h, w = x.shape
    oc = weight.rows
    ho, wo = (h + 2 * pad_h - kh) // stride_h + 1, (w + 2 * pad_w - kw) // stride_w + 1
    out = torch.empty((n, oc, ho, wo), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    total = n * ho * wo
    programs, n_pblocks, bp = launch_grid(total, oc)
    interpreted = not x.is_cuda
    _sparse_conv2d_tiled_kernel[(programs,)](
        x, weight.tile_ptr, weight.tile_cols, weight.tile_vals, weight.bias, out,
        oc, ho, wo, total, n_pblocks, kw, kh * kw, stride_h, stride_w, pad_h, pad_w, h, w, *x.stride(),
        RELU=bool(relu), BLOCK_P=bp, OC_TILE=OC_TILE, BLOCK_K=BLOCK_K,
        PRECISION="ieee" if interpreted else _precision(x.dtype), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return out


def sparse_linear_fwd(x, weight):
    """(N, in) -> (N, out) in x's dtype: the tiled convolution of a 1x1 map."""
    return sparse_conv2d_fwd(x[:, :, None, None], weight, 1, 1, 1, 1, 0, 0).view(x.shape[0], -1)


# The weight gradient at the non-zeros (finetuning with a frozen pattern), on the same tiled form:
# for a tile's 16 output channels and a block of BLOCK_K of its union columns, the (OC_TILE, BLOCK_K)
# block of d loss / d weight is the sum over output positions p of grad[oc, p] * x[col, p], one
# ``tl.dot`` of a (OC_TILE, BLOCK_P) slice of the output gradient with the gathered (BLOCK_P,
# BLOCK_K) input per step. The positions (N * H' * W', up to 262144 for a 32x32 map at batch 256)
# are split over several programs, each writing its partial block; the partials are summed after
# (deterministic, no atomics) and the blocks gathered into the CSR order by the pattern's slots.
# Its cost is the forward's: the products at the tile's union columns only.
WGRAD_BLOCK_P = 64
WGRAD_PROGRAMS = 1024  # enough programs for any GPU's SMs (132 on an H100), so the splits follow


@triton.jit
def _sparse_conv2d_weight_grad_kernel(
    x_ptr, g_ptr, kblock_ptr, tile_col_ptr, out_ptr,
    OC, HO, WO, total_p, p_per_split, n_union, KW, KSIZE, SH, SW, PH, PW, H, W,
    sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
    BLOCK_P: tl.constexpr, OC_TILE: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    kb = tl.program_id(0)
    split = tl.program_id(1)
    tile = tl.load(kblock_ptr + 3 * kb)
    k0 = tl.load(kblock_ptr + 3 * kb + 1)
    k1 = tl.load(kblock_ptr + 3 * kb + 2)
    ks = k0 + tl.arange(0, BLOCK_K)
    kmask = ks < k1
    col = tl.load(tile_col_ptr + ks, mask=kmask, other=0)
    ic = col // KSIZE
    rs = col % KSIZE
    ky = rs // KW
    kx = rs % KW
    oc = tile * OC_TILE + tl.arange(0, OC_TILE)
    ocmask = oc < OC
    acc = tl.zeros((OC_TILE, BLOCK_K), dtype=tl.float32)
    p_start = split.to(tl.int64) * p_per_split
    p_end = tl.minimum(p_start + p_per_split, total_p)
    for p0 in range(p_start, p_end, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < p_end
        n = p // (HO * WO)
        rem = p % (HO * WO)
        oy = rem // WO
        ox = rem % WO
        g = tl.load(g_ptr + n[None, :] * sgn + oc[:, None].to(tl.int64) * sgc + oy[None, :] * sgh + ox[None, :] * sgw,
                    mask=ocmask[:, None] & pmask[None, :], other=0.0)
        iy = (oy * SH - PH)[:, None] + ky[None, :]
        ix = (ox * SW - PW)[:, None] + kx[None, :]
        m = pmask[:, None] & kmask[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        xv = tl.load(x_ptr + n[:, None] * sxn + ic[None, :].to(tl.int64) * sxc + iy * sxh + ix * sxw,
                     mask=m, other=0.0)
        acc += tl.dot(g.to(xv.dtype), xv, input_precision=PRECISION)
    offs = (split.to(tl.int64) * n_union + ks[None, :]) * OC_TILE + tl.arange(0, OC_TILE)[:, None]
    tl.store(out_ptr + offs, acc, mask=kmask[None, :])


def weight_grad_blocks(pattern) -> torch.Tensor:
    """(blocks, 3) int32 on the pattern's device: (tile, first, end) union-column ranges of at most
    BLOCK_K columns, never straddling two tiles. Built once per pattern (one host sync), cached on it."""
    blocks = getattr(pattern, "_wgrad_blocks", None)
    if blocks is None:
        starts = pattern.tile_ptr.cpu().long()
        counts = starts[1:] - starts[:-1]
        per_tile = (counts + BLOCK_K - 1) // BLOCK_K
        tile = torch.repeat_interleave(torch.arange(pattern.tiles), per_tile)
        first_block = torch.cumsum(per_tile, 0) - per_tile
        first = starts[tile] + (torch.arange(tile.numel()) - first_block[tile]) * BLOCK_K
        end = torch.minimum(first + BLOCK_K, starts[tile + 1])
        blocks = torch.stack([tile, first, end], 1).to(torch.int32).contiguous().to(pattern.tile_cols.device)
        pattern._wgrad_blocks = blocks
    return blocks


def sparse_conv2d_weight_grad(x, grad, pattern, kh, kw, stride_h, stride_w, pad_h, pad_w) -> torch.Tensor:
    """d loss / d values (nnz,) float32 in the CSR order of ``pattern`` (TiledPattern), from the input
    x (N, C, H, W) and the output gradient (N, OC, H', W') in any strides (one dtype; float32,
    float16 or bfloat16, float32 accumulation). No host synchronisation after the pattern's first use."""
    n, _, h, w = x.shape
    _, oc, ho, wo = grad.shape
    grad = grad.to(x.dtype)
    blocks = weight_grad_blocks(pattern)
    n_union = pattern.tile_cols.numel()
    total = n * ho * wo
    if blocks.shape[0] == 0 or total == 0:
        return torch.zeros(pattern.nnz, device=x.device, dtype=torch.float32)
    splits = max(1, min(cdiv(total, 4 * WGRAD_BLOCK_P), cdiv(WGRAD_PROGRAMS, blocks.shape[0])))
    p_per_split = cdiv(cdiv(total, splits), WGRAD_BLOCK_P) * WGRAD_BLOCK_P
    splits = cdiv(total, p_per_split)
    partial = torch.empty((splits, n_union, OC_TILE), device=x.device, dtype=torch.float32)
    interpreted = not x.is_cuda
    _sparse_conv2d_weight_grad_kernel[(blocks.shape[0], splits)](
        x, grad, blocks, pattern.tile_cols, partial,
        oc, ho, wo, total, p_per_split, n_union, kw, kh * kw, stride_h, stride_w, pad_h, pad_w, h, w,
        *x.stride(), *grad.stride(),
        BLOCK_P=WGRAD_BLOCK_P, OC_TILE=OC_TILE, BLOCK_K=BLOCK_K,
        PRECISION="ieee" if interpreted else _precision(x.dtype), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )
    return partial.sum(0).view(-1)[pattern.slot]


def aot_variants():
    """Every (kernel, signature, constexprs, options) the launcher can launch on a GPU."""
    sizes = {k: "i32" for k in ("OC", "HO", "WO", "total_p", "n_pblocks", "KW", "KSIZE", "SH", "SW", "PH", "PW",
                                "H", "W", "sxn", "sxc", "sxh", "sxw")}
    for dtype, ty in (("float32", "fp32"), ("float16", "fp16"), ("bfloat16", "bf16")):
        for bp in BLOCK_P_CHOICES:
            for relu in (False, True):
                yield (f"{dtype} P{bp}{' relu' if relu else ''}", _sparse_conv2d_tiled_kernel,
                       {"x_ptr": f"*{ty}", "tile_ptr_ptr": "*i32", "tile_col_ptr": "*i32", "tile_val_ptr": "*fp32",
                        "bias_ptr": "*fp32", "out_ptr": f"*{ty}", **sizes},
                       {"RELU": relu, "BLOCK_P": bp, "OC_TILE": OC_TILE, "BLOCK_K": BLOCK_K,
                        "PRECISION": _precision(getattr(torch, dtype))},
                       {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES})
    wgrad_sizes = {k: "i32" for k in ("OC", "HO", "WO", "total_p", "p_per_split", "n_union", "KW", "KSIZE", "SH",
                                      "SW", "PH", "PW", "H", "W", "sxn", "sxc", "sxh", "sxw", "sgn", "sgc", "sgh",
                                      "sgw")}
    for dtype, ty in (("float32", "fp32"), ("float16", "fp16"), ("bfloat16", "bf16")):
        yield (f"weight grad {dtype}", _sparse_conv2d_weight_grad_kernel,
               {"x_ptr": f"*{ty}", "g_ptr": f"*{ty}", "kblock_ptr": "*i32", "tile_col_ptr": "*i32",
                "out_ptr": "*fp32", **wgrad_sizes},
               {"BLOCK_P": WGRAD_BLOCK_P, "OC_TILE": OC_TILE, "BLOCK_K": BLOCK_K,
                "PRECISION": _precision(getattr(torch, dtype))},
               {"num_warps": NUM_WARPS, "num_stages": NUM_STAGES})
