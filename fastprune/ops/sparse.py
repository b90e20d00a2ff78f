"""Sparse inference ops: ``fastprune::sparse_conv2d`` and ``fastprune::sparse_linear`` with CSR weights.

Chain: fastprune/kernels/sparse.py (Triton) and csrc/cuda/sparse.cu (CUDA C++,
``sparse_conv2d_tiled_ext``): the GPU paths, float32/float16/bfloat16, both on the weight's
output-channel-tiled form (reference/sparse.py's TiledWeight, built once per weight and cached
here); csrc/sparse.cpp (the CPU direct sparse convolution, three algorithms, on CSR);
fastprune/reference/sparse.py (dense equivalent); fastprune/nn/sparse.py (modules, sparsify).
The GPU kernels are checked here only under the Triton interpreter and by compilation: their GPU
speed is unmeasured, and ``sparsify`` keeps whichever of dense and sparse its timing finds faster.
"""
from __future__ import annotations

import weakref
from typing import Optional

import torch

from .. import backends
from ..reference.sparse import TiledWeight, csr_to_dense, sparse_conv2d_ref, sparse_linear_ref

_CONV_SPEC = backends.OpSpec("sparse_conv2d", {"cuda": ("triton", "cuda"), "cpu": ("cpp",)},
                             native={"cpp": "sparse_conv2d_ext", "cuda": "sparse_conv2d_tiled_ext"})
_LINEAR_SPEC = backends.OpSpec("sparse_linear", {"cuda": ("triton", "cuda"), "cpu": ("cpp",)},
                               native={"cpp": "sparse_linear_ext", "cuda": "sparse_conv2d_tiled_ext"})

# The tiled forms of the weights the GPU kernels have seen, keyed by the CSR tensors' identity and
# version; an entry goes away with its values tensor. Building one syncs with the host once per
# weight: run a model once before capturing it in a CUDA graph (sparsify's timing does).
_TILED: dict[tuple, TiledWeight] = {}


def tiled_weight(row_ptr, col_idx, values, bias, columns: int) -> TiledWeight:
    key = (id(values), values._version, id(row_ptr), id(col_idx), columns,
           None if bias is None else (id(bias), bias._version))
    found = _TILED.get(key)
    if found is None:
        found = _TILED[key] = TiledWeight(row_ptr, col_idx, values, bias, columns)
        weakref.finalize(values, _TILED.pop, key, None)
    return found


def _tiled_conv_cuda(x, weight: TiledWeight, geometry, relu: bool) -> torch.Tensor:
    return torch.ops.fastprune.sparse_conv2d_tiled_ext(x, weight.tile_ptr, weight.tile_cols, weight.tile_vals,
                                                       weight.bias, weight.rows, *geometry, relu)


ALGORITHMS = {"padded": 1, "direct": 2, "batch_innermost": 3}
EPILOGUES = {"none": 0, "relu": 1, "relu_pool": 2, "add_relu": 3}


def direct_applicable(x: torch.Tensor, stride) -> bool:
    """Whether the direct algorithm can run on input x with this stride."""
    return x.is_contiguous() and tuple(stride) in ((1, 1), (2, 2))


def pool_fusable(x: torch.Tensor, stride, algo: int) -> bool:
    """Whether the cpp backend can fuse ReLU + 2x2 max pooling: the batch-innermost algorithm, the
    padded one with equal strides, or the direct one (chosen when ``algo`` is 0 or 2)."""
    if algo == ALGORITHMS["batch_innermost"]:
        return True
    if algo == ALGORITHMS["padded"]:
        return stride[0] == stride[1]
    return direct_applicable(x, stride)


def to_batch_innermost(x: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) with its memory laid out (C, H, W, N), the batch innermost: strides
    (1, H W N, W N, N). The layout the batch-innermost algorithm reads and writes."""
    return x.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)


def is_batch_innermost(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.permute(1, 2, 3, 0).is_contiguous()


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@torch.library.custom_op("fastprune::sparse_conv2d", mutates_args=())
def sparse_conv2d(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                  bias: Optional[torch.Tensor], in_channels: int, kh: int, kw: int, stride_h: int, stride_w: int,
                  pad_h: int, pad_w: int, algo: int = 0, epilogue: int = 0,
                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N, C, H, W) float32 -> (N, OC, H', W'); CSR weight (OC rows, columns (ic * kh + r) * kw + s).
    algo (cpp backend): 0 by shape, 1 padded channel-major, 2 direct (stride 1 or 2, contiguous NCHW),
    3 batch innermost (any input; the output's memory holds (OC, H', W', N), see to_batch_innermost).
    epilogue: 0 none, 1 ReLU, 2 ReLU then 2x2 max pooling (output H'/2 x W'/2), 3 ReLU of the sum with
    ``residual`` (N, OC, H', W'); fused into the kernel where it can be (cpp: ReLU always, pooling
    with all but the padded algorithm at unequal strides, the residual with the batch-innermost one),
    applied after otherwise."""
    if (epilogue == EPILOGUES["add_relu"]) != (residual is not None):
        raise ValueError("residual must be given exactly when epilogue is 3 (add_relu)")
    backend = backends.choose(_CONV_SPEC, x.device)
    geometry = (kh, kw, stride_h, stride_w, pad_h, pad_w)
    fused = 0
    if backend == "reference":
        y = sparse_conv2d_ref(x, row_ptr, col_idx, values, bias, in_channels, kh, kw, (stride_h, stride_w),
                              (pad_h, pad_w))
    elif backend in ("triton", "cuda"):  # the tiled GPU kernels: ReLU fused, pooling/residual after
        weight = tiled_weight(row_ptr, col_idx, values, bias, in_channels * kh * kw)
        fused = 1 if epilogue in (1, 2) else 0
        if backend == "triton":
            from fastprune.kernels.sparse import sparse_conv2d_fwd

            y = sparse_conv2d_fwd(x, weight, *geometry, relu=bool(fused))
        else:
            y = _tiled_conv_cuda(x, weight, geometry, bool(fused))
    elif backend == "cpp" and epilogue == 3 and algo == ALGORITHMS["batch_innermost"]:
        y, fused = torch.ops.fastprune.sparse_conv2d_ext(x, row_ptr, col_idx, values, bias, *geometry, algo, 3,
                                                         residual), 3
    elif backend == "cpp" and epilogue == 2 and pool_fusable(x, (stride_h, stride_w), algo):
        pool_algo = algo if algo in (ALGORITHMS["padded"], ALGORITHMS["batch_innermost"]) else ALGORITHMS["direct"]
        y, fused = torch.ops.fastprune.sparse_conv2d_ext(x, row_ptr, col_idx, values, bias, *geometry, pool_algo, 2), 2
    else:  # cpp: ReLU fused, pooling or the residual (if asked) after
        fused = 1 if epilogue in (1, 2) else 0
        y = torch.ops.fastprune.sparse_conv2d_ext(x, row_ptr, col_idx, values, bias, *geometry, algo, fused)
    return in_layout(finish_epilogue(y, epilogue, fused, residual), output_layout(x, algo))


# The output's memory layout, the same for every backend (and what the fake says, so torch.compile
# and opcheck see the real strides): batch innermost from the CPU's batch-innermost algorithm,
# channels_last from a channels_last input, contiguous otherwise.
LAYOUTS = ("contiguous", "channels_last", "batch_innermost")


def output_layout(x: torch.Tensor, algo: int) -> str:
    if x.device.type == "cpu" and algo == ALGORITHMS["batch_innermost"]:
        return "batch_innermost"
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "contiguous"


def empty_in_layout(like: torch.Tensor, shape, layout: str) -> torch.Tensor:
    """An uninitialised (N, C, H, W) tensor of ``shape`` in ``layout``, on ``like``'s device and dtype
    (fake tensors too)."""
    n, c, h, w = shape
    if layout == "batch_innermost":
        return like.new_empty((c, h, w, n)).permute(3, 0, 1, 2)
    if layout == "channels_last":
        return like.new_empty((n, h, w, c)).permute(0, 3, 1, 2)
    return like.new_empty((n, c, h, w))


def in_layout(y: torch.Tensor, layout: str) -> torch.Tensor:
    """``y`` with exactly the strides :func:`empty_in_layout` gives (a copy only where they differ)."""
    target = empty_in_layout(y, y.shape, layout)
    if target.stride() == y.stride():
        return y
    return target.copy_(y)


def finish_epilogue(y: torch.Tensor, epilogue: int, fused: int, residual: Optional[torch.Tensor] = None):
    """Apply in PyTorch ops what of ``epilogue`` the kernel did not fuse (it fused ``fused``): the
    residual add + ReLU, the ReLU, the 2x2 max pooling."""
    if epilogue == EPILOGUES["add_relu"]:
        return y if fused == epilogue else torch.relu(y + residual)
    if epilogue >= 1 and fused == 0:
        y = torch.relu(y)
    if epilogue == EPILOGUES["relu_pool"] and fused < epilogue:
        y = torch.nn.functional.max_pool2d(y, 2)
    return y


@sparse_conv2d.register_fake
def _sparse_conv2d_fake(x, row_ptr, col_idx, values, bias, in_channels, kh, kw, stride_h, stride_w, pad_h, pad_w,
                        algo=0, epilogue=0, residual=None):
    torch._check(x.dim() == 4, lambda: "x must be (N, C, H, W)")
    ho = conv_output_size(x.shape[2], kh, stride_h, pad_h)
    wo = conv_output_size(x.shape[3], kw, stride_w, pad_w)
    if epilogue == 2:
        ho, wo = ho // 2, wo // 2
    return empty_in_layout(x, (x.shape[0], row_ptr.shape[0] - 1, ho, wo), output_layout(x, algo))


# Gradients w.r.t. the input only (the weights are inference buffers), so that attacks can run on a
# sparse model: the transposed convolution with the dense weight rebuilt from the CSR arrays (the
# backward pass is not what sparse inference speeds up). Fused epilogues are not differentiated:
# SparseConv2d applies them unfused when autograd records.
def _conv_setup_context(ctx, inputs, output):
    x, row_ptr, col_idx, values, _, in_channels, kh, kw, stride_h, stride_w, pad_h, pad_w, _, epilogue, _ = inputs
    ctx.save_for_backward(row_ptr, col_idx, values)
    ctx.geometry = (x.shape, in_channels, kh, kw, (stride_h, stride_w), (pad_h, pad_w), epilogue)


def _conv_backward(ctx, grad):
    row_ptr, col_idx, values = ctx.saved_tensors
    x_shape, in_channels, kh, kw, stride, padding, epilogue = ctx.geometry
    if epilogue:
        raise RuntimeError("sparse_conv2d: a fused epilogue has no gradient; call it with epilogue=0 "
                           "and apply ReLU/pooling/the residual after (SparseConv2d does so under autograd)")
    weight = csr_to_dense(row_ptr, col_idx, values, (row_ptr.shape[0] - 1, in_channels, kh, kw)).to(grad.dtype)
    grad_x = torch.nn.grad.conv2d_input(x_shape, weight, grad.contiguous(), stride=stride, padding=padding)
    return (grad_x,) + (None,) * 14


sparse_conv2d.register_autograd(_conv_backward, setup_context=_conv_setup_context)


@torch.library.custom_op("fastprune::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                  bias: Optional[torch.Tensor], in_features: int) -> torch.Tensor:
    """(N, in) float32 -> (N, out); CSR weight (out rows, in columns)."""
    backend = backends.choose(_LINEAR_SPEC, x.device)
    if backend == "reference":
        return sparse_linear_ref(x, row_ptr, col_idx, values, bias, in_features)
    if backend in ("triton", "cuda"):  # the tiled convolution of a 1x1 map
        weight = tiled_weight(row_ptr, col_idx, values, bias, in_features)
        # Batch innermost (a column-major copy of x): the kernels' lanes run over the batch, so their
        # gathers of one feature for consecutive samples are contiguous (coalesced).
        x_cm = x.t().contiguous().t()
        if backend == "triton":
            from fastprune.kernels.sparse import sparse_linear_fwd

            return sparse_linear_fwd(x_cm, weight)
        return _tiled_conv_cuda(x_cm[:, :, None, None], weight, (1, 1, 1, 1, 0, 0), False).view(x.shape[0], -1)
    return torch.ops.fastprune.sparse_linear_ext(x, row_ptr, col_idx, values, bias)


@sparse_linear.register_fake
def _sparse_linear_fake(x, row_ptr, col_idx, values, bias, in_features):
    return x.new_empty((x.shape[0], row_ptr.shape[0] - 1))


def _linear_setup_context(ctx, inputs, output):
    _, row_ptr, col_idx, values, _, in_features = inputs
    ctx.save_for_backward(row_ptr, col_idx, values)
    ctx.in_features = in_features


def _linear_backward(ctx, grad):
    row_ptr, col_idx, values = ctx.saved_tensors
    weight = csr_to_dense(row_ptr, col_idx, values, (row_ptr.shape[0] - 1, ctx.in_features)).to(grad.dtype)
    return grad @ weight, None, None, None, None, None


sparse_linear.register_autograd(_linear_backward, setup_context=_linear_setup_context)
