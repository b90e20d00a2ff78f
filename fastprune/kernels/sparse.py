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
