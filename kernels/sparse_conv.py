"""Triton kernels for sparse inference: direct sparse convolution and sparse linear with CSR weights.

One program computes BLOCK_P output positions (flattened over batch and space) of one output
channel, looping over that channel's non-zero weights: each non-zero is one masked gather of the
shifted input, so the work is proportional to the number of non-zeros. Output positions run along
the width, so the gathers are coalesced for stride 1. Accumulation in float32.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _sparse_conv2d_fwd_kernel(
    x_ptr, row_ptr_ptr, col_ptr, val_ptr, bias_ptr, out_ptr,
    C, H, W, OC, HO, WO, total_p, KW, KSIZE, SH, SW, PH, PW,
    HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr,
):
    oc = tl.program_id(1)
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < total_p
    n = p // (HO * WO)
    rem = p % (HO * WO)
    y = rem // WO
    xo = rem % WO
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    start = tl.load(row_ptr_ptr + oc)
    end = tl.load(row_ptr_ptr + oc + 1)
    for e in range(start, end):
        col = tl.load(col_ptr + e)
        v = tl.load(val_ptr + e)
        ic = col // KSIZE
        rs = col % KSIZE
        iy = y * SH + rs // KW - PH
        ix = xo * SW + rs % KW - PW
        m = pmask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
        xv = tl.load(x_ptr + ((n * C + ic) * H + iy) * W + ix, mask=m, other=0.0)
        acc += v * xv.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + oc)
    tl.store(out_ptr + ((n * OC + oc) * HO + y) * WO + xo, acc.to(out_ptr.dtype.element_ty), mask=pmask)


@triton.jit
def _sparse_linear_fwd_kernel(
    x_ptr, row_ptr_ptr, col_ptr, val_ptr, bias_ptr, out_ptr, batch, in_features, out_features,
    HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr,
):
    o = tl.program_id(1)
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = b < batch
    acc = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for e in range(tl.load(row_ptr_ptr + o), tl.load(row_ptr_ptr + o + 1)):
        col = tl.load(col_ptr + e)
        acc += tl.load(val_ptr + e) * tl.load(x_ptr + b * in_features + col, mask=bmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o)
    tl.store(out_ptr + b * out_features + o, acc.to(out_ptr.dtype.element_ty), mask=bmask)


def sparse_conv2d_fwd(x, row_ptr, col_idx, values, bias, kh, kw, stride_h, stride_w, pad_h, pad_w):
    """(N, C, H, W) contiguous -> (N, OC, HO, WO) in x's dtype."""
    n, c, h, w = x.shape
    oc = row_ptr.shape[0] - 1
    ho, wo = (h + 2 * pad_h - kh) // stride_h + 1, (w + 2 * pad_w - kw) // stride_w + 1
    out = torch.empty((n, oc, ho, wo), device=x.device, dtype=x.dtype)
    total = n * ho * wo
    if out.numel() == 0:
        return out
    block = 256 if x.is_cuda else 64
    _sparse_conv2d_fwd_kernel[(triton.cdiv(total, block), oc)](
        x, row_ptr, col_idx, values, bias if bias is not None else values, out,
        c, h, w, oc, ho, wo, total, kw, kh * kw, stride_h, stride_w, pad_h, pad_w,
        HAS_BIAS=bias is not None, BLOCK_P=block, num_warps=4,
    )
    return out


def sparse_linear_fwd(x, row_ptr, col_idx, values, bias):
    """(N, in) contiguous -> (N, out) in x's dtype."""
    batch, fin = x.shape
    fout = row_ptr.shape[0] - 1
    out = torch.empty((batch, fout), device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    block = 128 if x.is_cuda else 32
    _sparse_linear_fwd_kernel[(triton.cdiv(batch, block), fout)](
        x, row_ptr, col_idx, values, bias if bias is not None else values, out, batch, fin, fout,
        HAS_BIAS=bias is not None, BLOCK_B=block, num_warps=4,
    )
    return out
