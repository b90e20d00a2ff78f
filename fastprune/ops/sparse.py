"""Sparse inference ops: ``fastprune::sparse_conv2d`` and ``fastprune::sparse_linear`` with CSR weights.

Chain: fastprune/kernels/sparse.py (Triton) and csrc/cuda/sparse.cu (CUDA C++,
``sparse_conv2d_tiled_ext``): the GPU paths, float32/float16/bfloat16, both on the weight's
output-channel-tiled form (reference/sparse.py's TiledWeight, built once per weight and cached
here); csrc/sparse/ (the CPU direct sparse convolution on CSR: one file per algorithm, a shared
epilogue.h, conv.cpp the op);
fastprune/reference/sparse.py (dense equivalent); fastprune/nn/sparse/ (modules, passes, sparsify, files).
The GPU kernels are checked here only under the Triton interpreter and by compilation: their GPU
speed is unmeasured, and ``sparsify`` keeps whichever of dense and sparse its timing finds faster.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import weakref
from typing import Optional

import torch

from .. import backends
from ..utils.autograd import parameter_gradients_wanted
from ..reference.sparse import TiledPattern, TiledWeight, check_csr, csr_to_dense, sparse_conv2d_ref, sparse_linear_ref

_CONV_SPEC = backends.OpSpec("sparse_conv2d", {"cuda": ("triton", "cuda"), "cpu": ("cpp",)},
                             native={"cpp": "sparse_conv2d_ext", "cuda": "sparse_conv2d_tiled_ext"})
_LINEAR_SPEC = backends.OpSpec("sparse_linear", {"cuda": ("triton", "cuda"), "cpu": ("cpp",)},
                               native={"cpp": "sparse_linear_ext", "cuda": "sparse_conv2d_tiled_ext"})

# The tiled forms of the weights the GPU kernels have seen. The pattern part (TiledPattern, keyed by
# the CSR index tensors' identity, gone with col_idx) is built once per pattern: that syncs with the
# host (run a model once before capturing it in a CUDA graph; sparsify's timing does). The values
# part, one per weight (gone with the values tensor), is refreshed from the cached pattern by one
# scatter, without a host sync, when the values or bias change (a finetune step bumps their version).
_PATTERNS: dict[tuple, tuple[tuple, TiledPattern]] = {}
_TILED: dict[tuple, tuple[tuple, TiledWeight]] = {}


def tiled_pattern(row_ptr, col_idx, columns: int, values: Optional[torch.Tensor] = None) -> TiledPattern:
    """The cached :class:`TiledPattern` of a CSR pattern (built and checked on first use)."""
    key = (id(row_ptr), id(col_idx), columns)
    versions = (row_ptr._version, col_idx._version)
    found = _PATTERNS.get(key)
    if found is None or found[0] != versions:
        if found is None:
            weakref.finalize(col_idx, _PATTERNS.pop, key, None)
        check_csr(row_ptr, col_idx, values, columns)
        found = _PATTERNS[key] = (versions, TiledPattern(row_ptr, col_idx, columns))
    return found[1]


def tiled_weight(row_ptr, col_idx, values, bias, columns: int) -> TiledWeight:
    """The cached tiled form of a CSR weight (and bias) for the GPU kernels."""
    pattern = tiled_pattern(row_ptr, col_idx, columns, values)
    key = (id(values), id(row_ptr), id(col_idx), columns, None if bias is None else id(bias))
    versions = (values._version, None if bias is None else bias._version, id(pattern))
    found = _TILED.get(key)
    if found is None or found[0] != versions:
        if found is None:
            weakref.finalize(values, _TILED.pop, key, None)
        found = _TILED[key] = (versions, TiledWeight.from_pattern(pattern, values.detach(),
                                                                   None if bias is None else bias.detach()))
    return found[1]


def _tiled_conv_cuda(x, weight: TiledWeight, geometry, relu: bool) -> torch.Tensor:
    return torch.ops.fastprune.sparse_conv2d_tiled_ext(x, weight.tile_ptr, weight.tile_cols, weight.tile_vals,
                                                       weight.bias, weight.rows, *geometry, relu)


ALGORITHMS = {"padded": 1, "direct": 2, "batch_innermost": 3, "tiled": 4, "generated": 5}
# The algorithms whose output is laid out (OC, H', W', N) and that fuse the residual epilogue.
_BATCH_INNERMOST_OUT = (ALGORITHMS["batch_innermost"], ALGORITHMS["tiled"], ALGORITHMS["generated"])
# The generated algorithm with its output's channel planes padded by one vector (csrc/sparse/generated.cpp,
# channel_plane): batch innermost, but not the op's exact strides, so only the inference path asks for it.
_GENERATED_PADDED_PLANES = 6
# Batches the generated algorithm runs itself (whole AVX-512 vectors of images); others go to the tiled one.
GENERATED_BATCH_MULTIPLE = 16
GENERATED_MAX_NONZEROS = 400000  # csrc/sparse/generated.cpp, kMaxGeneratedNonzeros
EPILOGUES = {"none": 0, "relu": 1, "relu_pool": 2, "add_relu": 3}


def direct_applicable(x: torch.Tensor, stride) -> bool:
    """Whether the direct algorithm can run on input x with this stride."""
    return x.is_contiguous() and tuple(stride) in ((1, 1), (2, 2))


def pool_fusable(x: torch.Tensor, stride, algo: int) -> bool:
    """Whether the cpp backend can fuse ReLU + 2x2 max pooling: the batch-innermost algorithm, the
    padded, tiled and generated (pooling after its conv) ones with equal strides, or the direct
    one (chosen when ``algo`` is 0 or 2)."""
    if algo == ALGORITHMS["batch_innermost"]:
        return True
    if algo in (ALGORITHMS["padded"], ALGORITHMS["tiled"], ALGORITHMS["generated"]):
        return stride[0] == stride[1]
    return direct_applicable(x, stride)


def generated_supported() -> bool:
    """Whether the CPU's generated algorithm (algo 5: AVX-512 machine code written per layer for its
    non-zero pattern) runs on this machine; where it does not, algo 5 runs the tiled algorithm."""
    global _generated_supported
    if _generated_supported is None:
        _generated_supported = bool(backends._load_extension()
                                    and torch.ops.fastprune.sparse_generated_supported_ext())
    return _generated_supported


_generated_supported: Optional[bool] = None


def generated_applicable(x: torch.Tensor, stride, nnz: int, pool: bool = False) -> bool:
    """Whether algo 5 runs its generated code on input x (else it runs the tiled algorithm): a CPU
    with AVX-512, equal strides, a batch of whole multiples of 16 images, at most
    GENERATED_MAX_NONZEROS non-zeros (a bound on the code's size and the time to write it). A pooling
    layer (``pool``) qualifies too: its pooling runs after the generated conv."""
    del pool  # kept in the signature: callers say what the layer fuses
    return (x.device.type == "cpu" and x.dim() == 4 and stride[0] == stride[1]
            and x.shape[0] > 0 and x.shape[0] % GENERATED_BATCH_MULTIPLE == 0 and nnz <= GENERATED_MAX_NONZEROS
            and generated_supported())


def to_batch_innermost(x: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W) with its memory laid out (C, H, W, N), the batch innermost: strides
    (1, H W N, W N, N). The layout the batch-innermost algorithm reads and writes."""
    return x.permute(1, 2, 3, 0).contiguous().permute(3, 0, 1, 2)


def is_batch_innermost(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.permute(1, 2, 3, 0).is_contiguous()


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


# The output's memory layout, the same for every backend (and what the fake says, so torch.compile
# and opcheck see the real strides): batch innermost from the CPU's batch-innermost and tiled
# algorithms, channels_last from a channels_last input, contiguous otherwise.
def output_layout(x: torch.Tensor, algo: int) -> str:
    if x.device.type == "cpu" and algo in _BATCH_INNERMOST_OUT:
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


def layout_strides(shape, layout: str) -> tuple[int, int, int, int]:
    """The strides :func:`empty_in_layout` gives an (N, C, H, W) tensor, computed without allocating."""
    n, c, h, w = shape
    if layout == "batch_innermost":
        return (1, h * w * n, w * n, n)
    if layout == "channels_last":
        return (h * w * c, 1, w * c, c)
    return (c * h * w, h * w, w, 1)


def in_layout(y: torch.Tensor, layout: str) -> torch.Tensor:
    """``y`` with exactly the strides :func:`empty_in_layout` gives: itself when it has them (the
    kernels' usual case, no allocation on the hot path), else a copy."""
    if tuple(y.stride()) == layout_strides(y.shape, layout):
        return y
    return empty_in_layout(y, y.shape, layout).copy_(y)


def _check_epilogue(epilogue: int, residual) -> None:
    if epilogue not in EPILOGUES.values():
        raise ValueError(f"epilogue must be one of {EPILOGUES}, got {epilogue!r}")
    if (epilogue == EPILOGUES["add_relu"]) != (residual is not None):
        raise ValueError("residual must be given exactly when epilogue is 3 (add_relu)")


def _reference_conv(x, row_ptr, col_idx, values, bias, in_channels, geometry):
    kh, kw, stride_h, stride_w, pad_h, pad_w = geometry
    return sparse_conv2d_ref(x, row_ptr, col_idx, values, bias, in_channels, kh, kw, (stride_h, stride_w),
                             (pad_h, pad_w))


def _conv_gpu(backend, x, row_ptr, col_idx, values, bias, in_channels, geometry, epilogue):
    """(output, fused epilogue) of the tiled GPU kernels: ReLU fused, pooling and the residual after."""
    kh, kw = geometry[:2]
    weight = tiled_weight(row_ptr, col_idx, values, bias, in_channels * kh * kw)
    relu = epilogue in (EPILOGUES["relu"], EPILOGUES["relu_pool"])
    if backend == "triton":
        from fastprune.kernels.sparse import sparse_conv2d_fwd

        y = sparse_conv2d_fwd(x, weight, *geometry, relu=relu)
    else:
        y = _tiled_conv_cuda(x, weight, geometry, relu)
    return y, EPILOGUES["relu"] if relu else EPILOGUES["none"]


@functools.lru_cache(maxsize=None)
def direct_cpu_conv():
    """fastprune._C.sparse_conv2d_cpu: the CPU kernel of ``fastprune::sparse_conv2d_ext`` (same
    arguments, same output) called without the dispatcher, 2 us a call less (Zen 4), for inference
    only (its output records no autograd graph; torch.compile cannot trace it). The op where the
    extension predates it. Looked up once: the layers' inference path asks at every call."""
    import fastprune._C as native  # (loaded by the caller's backend choice already)

    return getattr(native, "sparse_conv2d_cpu", None) or torch.ops.fastprune.sparse_conv2d_ext


def _conv_cpp(x, row_ptr, col_idx, values, bias, geometry, algo, epilogue, residual, pad_planes=False,
              inference=False):
    """(output, fused epilogue) of the CPU C++ kernels, which fuse what their algorithm can.
    ``pad_planes``: the generated algorithm pads its output's channel planes (_GENERATED_PADDED_PLANES).
    ``inference``: no autograd and no tracing, so the kernel is called without the dispatcher."""
    ext = direct_cpu_conv() if inference else torch.ops.fastprune.sparse_conv2d_ext
    kernel_algo = _GENERATED_PADDED_PLANES if pad_planes and algo == ALGORITHMS["generated"] else algo
    if epilogue == EPILOGUES["add_relu"] and algo in _BATCH_INNERMOST_OUT:
        return ext(x, row_ptr, col_idx, values, bias, *geometry, kernel_algo, epilogue, residual), epilogue
    if epilogue == EPILOGUES["relu_pool"] and pool_fusable(x, geometry[2:4], algo):
        pool_algo = kernel_algo if algo in (ALGORITHMS["padded"], *_BATCH_INNERMOST_OUT) else ALGORITHMS["direct"]
        return ext(x, row_ptr, col_idx, values, bias, *geometry, pool_algo, epilogue), epilogue
    fused = EPILOGUES["relu"] if epilogue in (EPILOGUES["relu"], EPILOGUES["relu_pool"]) else EPILOGUES["none"]
    return ext(x, row_ptr, col_idx, values, bias, *geometry, kernel_algo, fused), fused


def _conv_on_cpu(x, row_ptr, col_idx, values, bias, in_channels, geometry, algo, epilogue, residual):
    backend = backends.choose(_CONV_SPEC, x.device)
    if backend == "cpp":
        y, fused = _conv_cpp(x, row_ptr, col_idx, values, bias, geometry, algo, epilogue, residual)
    elif backend == "triton":  # the GPU kernel under Triton's interpreter (tests)
        y, fused = _conv_gpu(backend, x, row_ptr, col_idx, values, bias, in_channels, geometry, epilogue)
    else:
        y, fused = _reference_conv(x, row_ptr, col_idx, values, bias, in_channels, geometry), EPILOGUES["none"]
    return in_layout(finish_epilogue(y, epilogue, fused, residual), output_layout(x, algo))


# The device-generic op: the math (convolution with a CSR weight, then the epilogue), nothing about
# how a device computes it. Its CPU kernel uses the algorithm the shape suggests; to pick one (the
# tuner does), call the CPU op below. One implementation per device, registered on the op.
@torch.library.custom_op("fastprune::sparse_conv2d", mutates_args=())
def _sparse_conv2d_op(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                      bias: Optional[torch.Tensor], in_channels: int, kh: int, kw: int, stride_h: int, stride_w: int,
                      pad_h: int, pad_w: int, epilogue: int = 0, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Default implementation (any device): the PyTorch reference."""
    geometry = (kh, kw, stride_h, stride_w, pad_h, pad_w)
    y = _reference_conv(x, row_ptr, col_idx, values, bias, in_channels, geometry)
    return in_layout(finish_epilogue(y, epilogue, EPILOGUES["none"], residual), output_layout(x, 0))


@_sparse_conv2d_op.register_kernel("cpu")
def _sparse_conv2d_cpu_kernel(x, row_ptr, col_idx, values, bias, in_channels, kh, kw, stride_h, stride_w, pad_h,
                              pad_w, epilogue=0, residual=None):
    return _conv_on_cpu(x, row_ptr, col_idx, values, bias, in_channels, (kh, kw, stride_h, stride_w, pad_h, pad_w),
                        0, epilogue, residual)


@_sparse_conv2d_op.register_kernel("cuda")
def _sparse_conv2d_cuda_kernel(x, row_ptr, col_idx, values, bias, in_channels, kh, kw, stride_h, stride_w, pad_h,
                               pad_w, epilogue=0, residual=None):
    geometry = (kh, kw, stride_h, stride_w, pad_h, pad_w)
    backend = backends.choose(_CONV_SPEC, x.device)
    if backend == "reference":
        y, fused = _reference_conv(x, row_ptr, col_idx, values, bias, in_channels, geometry), EPILOGUES["none"]
    else:
        y, fused = _conv_gpu(backend, x, row_ptr, col_idx, values, bias, in_channels, geometry, epilogue)
    return in_layout(finish_epilogue(y, epilogue, fused, residual), output_layout(x, 0))


# The CPU's own op: the same convolution with the algorithm as an argument (0 by shape, 1 padded
# channel-major, 2 direct NCHW for strides 1 and 2 on contiguous inputs, 3 batch innermost, 4 tiled
# (register-blocked, equal strides), 5 generated (machine code per layer, AVX-512, batches of whole
# multiples of 16; tiled otherwise); 3-5 lay their output out (OC, H', W', N); see csrc/sparse/).
# CPU tensors only.
@torch.library.custom_op("fastprune::sparse_conv2d_cpu", mutates_args=())
def _sparse_conv2d_cpu_op(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                          bias: Optional[torch.Tensor], in_channels: int, kh: int, kw: int, stride_h: int,
                          stride_w: int, pad_h: int, pad_w: int, algo: int, epilogue: int = 0,
                          residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    if x.device.type != "cpu":
        raise ValueError(f"fastprune::sparse_conv2d_cpu takes CPU tensors, got {x.device}")
    return _conv_on_cpu(x, row_ptr, col_idx, values, bias, in_channels, (kh, kw, stride_h, stride_w, pad_h, pad_w),
                        algo, epilogue, residual)


def sparse_conv2d(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                  bias: Optional[torch.Tensor], in_channels: int, kh: int, kw: int, stride_h: int, stride_w: int,
                  pad_h: int, pad_w: int, epilogue: int = 0, residual: Optional[torch.Tensor] = None, *,
                  algo: int = 0) -> torch.Tensor:
    """Sparse convolution: (N, C, H, W) -> (N, OC, H', W'), CSR weight (OC rows; column
    (ic * kh + r) * kw + s; row_ptr/col_idx int32, values float32), groups 1, dilation 1, zero padding.

    epilogue: 0 none, 1 ReLU, 2 ReLU then 2x2 max pooling (output H'/2 x W'/2), 3 ReLU of the sum
    with ``residual`` (N, OC, H', W'); fused into the kernel where the device's kernel can, applied
    after otherwise. algo: the CPU algorithm (see fastprune::sparse_conv2d_cpu); 0, by shape, is
    the only choice on a GPU. Output layout (every backend alike): batch innermost from algorithms 3-5,
    channels_last from a channels_last input, contiguous otherwise. Differentiable w.r.t. x, values and
    bias (and the residual) with every epilogue: the fused ReLU through its output's sign, the fused
    pooling through its window positions (:func:`sparse_conv2d_relu_pool`).
    """
    _check_epilogue(epilogue, residual)
    if algo not in ALGORITHMS.values() and algo != 0:
        raise ValueError(f"algo must be 0 or one of {ALGORITHMS}, got {algo!r}")
    args = (x, row_ptr, col_idx, values, bias, in_channels, kh, kw, stride_h, stride_w, pad_h, pad_w)
    if epilogue == EPILOGUES["relu_pool"] and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, values, bias)):
        return sparse_conv2d_relu_pool(*args, algo)[0]  # keeps the window positions for the backward pass
    if algo == 0 or x.device.type != "cpu":
        return _sparse_conv2d_op(*args, epilogue, residual)
    return _sparse_conv2d_cpu_op(*args, algo, epilogue, residual)


def sparse_conv2d_cpu_inference(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                                bias: Optional[torch.Tensor], geometry: tuple, algo: int, epilogue: int,
                                residual: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """:func:`sparse_conv2d` on the CPU's C++ kernels called directly, or None where that path does not
    apply (another backend chosen, autograd recording, torch.compile tracing: use sparse_conv2d).
    The same output and layout as the op; what it skips is the custom op's dispatch, tens of
    microseconds a call, which at batch 1 is as long as a small layer's kernel. geometry: (kh, kw,
    stride_h, stride_w, pad_h, pad_w)."""
    if x.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling():
        return None
    if (_network_cpu_backend.get() or backends.choose(_CONV_SPEC, x.device)) != "cpp":
        return None
    # The generated algorithm here pads its output's channel planes, for the next generated layer to
    # read in place: batch innermost, but not the exact strides the op's contract (output_layout) says.
    y, fused = _conv_cpp(x, row_ptr, col_idx, values, bias, geometry, algo, epilogue, residual, pad_planes=True,
                         inference=True)
    if algo in _BATCH_INNERMOST_OUT:  # the kernel's own (OC, H', W', N) output: the layout by construction
        return y if fused == epilogue else in_layout(finish_epilogue(y, epilogue, fused, residual), "batch_innermost")
    return in_layout(finish_epilogue(y, epilogue, fused, residual), output_layout(x, algo))


# The CPU backend of the sparse convs, resolved once for a whole network call (SparseModel.run sets
# it): choosing it reads the environment and the registered kernels, 2 us that at batch 1 were
# repeated for every layer. None outside a network call: each call chooses.
_network_cpu_backend: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "fastprune_network_cpu_backend", default=None)


def network_cpu_backend() -> Optional[str]:
    """The CPU sparse convs' backend chosen for the network call in progress (None outside one)."""
    return _network_cpu_backend.get()


@contextlib.contextmanager
def cpu_backend_per_network_call():
    """Within the block, the CPU sparse convs' inference path uses the backend chosen on entry."""
    token = _network_cpu_backend.set(backends.choose(_CONV_SPEC, torch.device("cpu")))
    try:
        yield
    finally:
        _network_cpu_backend.reset(token)


def release_cpu_memory() -> int:
    """Free the memory the C++ CPU kernels keep for reuse and return how many bytes that was.

    Each large output (512 KiB and up: a layer's activations at batch 16-64) goes back to a free
    list when its tensor dies and serves a later output up to 8 times smaller, the most recently
    freed first (its lines still in cache), so that a network run again does not page-fault on
    fresh memory (2-4 ms a 16 MB layer); at most 1 GiB is kept. Call this after
    inference when that memory is wanted elsewhere; 0 without the C++ extension."""
    if not backends._load_extension():
        return 0
    return int(torch.ops.fastprune.sparse_release_memory_ext())


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2, stride-2 max pooling of (N, C, H, W) as the maximum of four strided views (odd edges
    dropped, as nn.MaxPool2d does): the same values as PyTorch's, several times faster on NCHW CPU
    tensors (the layout the sparse convolutions produce) and no slower on channels_last ones."""
    a, b, c, d = _windows_2x2(x)
    return torch.maximum(torch.maximum(a, b), torch.maximum(c, d))


def _windows_2x2(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four strided views of x's 2x2 windows, in window order 2 dy + dx (odd edges dropped)."""
    h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
    x = x[:, :, :h, :w]
    return x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]


def finish_epilogue(y: torch.Tensor, epilogue: int, fused: int, residual: Optional[torch.Tensor] = None):
    """Apply in PyTorch ops what of ``epilogue`` the kernel did not fuse (it fused ``fused``: none,
    the same epilogue, or the ReLU of one that pools): the residual add + ReLU, the ReLU, the 2x2
    max pooling. At inference (nothing records gradients) the residual sum and ReLU are one in-place
    pass over y, which must then be the kernel's own fresh output."""
    if epilogue == fused:
        return y
    recording = torch.is_grad_enabled() and (y.requires_grad or (residual is not None and residual.requires_grad))
    if epilogue == EPILOGUES["add_relu"]:
        if recording:
            return torch.relu(y + residual)
        # aten._add_relu_ (one pass) has CPU kernels only; on a GPU the two in-place passes are cheap
        return torch.ops.aten._add_relu_(y, residual) if y.device.type == "cpu" else y.add_(residual).relu_()
    if fused == EPILOGUES["none"] and epilogue in (EPILOGUES["relu"], EPILOGUES["relu_pool"]):
        y = torch.relu(y) if recording else y.relu_()
    if epilogue == EPILOGUES["relu_pool"]:
        y = max_pool_2x2(y)
    return y


# The output layout is part of each op's contract (see output_layout): the fakes follow it, so
# torch.compile and opcheck see the real strides.
def _conv_fake(x, row_ptr, kh, kw, stride_h, stride_w, pad_h, pad_w, algo, epilogue):
    torch._check(x.dim() == 4, lambda: "x must be (N, C, H, W)")
    ho = conv_output_size(x.shape[2], kh, stride_h, pad_h)
    wo = conv_output_size(x.shape[3], kw, stride_w, pad_w)
    if epilogue == EPILOGUES["relu_pool"]:
        ho, wo = ho // 2, wo // 2
    return empty_in_layout(x, (x.shape[0], row_ptr.shape[0] - 1, ho, wo), output_layout(x, algo))


@_sparse_conv2d_op.register_fake
def _sparse_conv2d_fake(x, row_ptr, col_idx, values, bias, in_channels, kh, kw, stride_h, stride_w, pad_h, pad_w,
                        epilogue=0, residual=None):
    return _conv_fake(x, row_ptr, kh, kw, stride_h, stride_w, pad_h, pad_w, 0, epilogue)


@_sparse_conv2d_cpu_op.register_fake
def _sparse_conv2d_cpu_fake(x, row_ptr, col_idx, values, bias, in_channels, kh, kw, stride_h, stride_w, pad_h, pad_w,
                            algo, epilogue=0, residual=None):
    return _conv_fake(x, row_ptr, kh, kw, stride_h, stride_w, pad_h, pad_w, algo, epilogue)


# The transposed, flipped pattern of each conv weight the backward pass has seen: rows are input
# channels, column (oc * kh + kh - 1 - r) * kw + kw - 1 - s for the non-zero at (oc, (ic, r, s)),
# and the permutation that takes the values there. The input gradient of a convolution is the
# convolution of the output gradient with this weight (padding k - 1 - p; strides go by phases,
# below), so it runs on the forward's sparse kernels at the forward's sparse cost.
# Keyed by the pattern tensors alone (finetuning changes the values every step, not the pattern);
# built without host syncs.
_TRANSPOSED: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

# values[order] for the reordered weights above, one entry per (pattern, values tensor), replaced when
# the values change (a finetune step): the GPU kernels' tiled form, keyed by the tensor, is then
# built once per weight update, not on every backward pass.
_GATHERED: dict[tuple, tuple[int, torch.Tensor]] = {}


def _gathered(values: torch.Tensor, order: torch.Tensor, pattern_key: tuple) -> torch.Tensor:
    key = pattern_key + (id(values),)
    found = _GATHERED.get(key)
    if found is None or found[0] != values._version:
        if found is None:
            weakref.finalize(values, _GATHERED.pop, key, None)
        found = _GATHERED[key] = (values._version, values.detach()[order])
    return found[1]


def transposed_weight(row_ptr, col_idx, values, in_channels: int, kh: int, kw: int):
    """(row_ptr, col_idx, values) of the transposed, flipped weight (in_channels rows of
    out_channels * kh * kw columns); the pattern is cached per weight, the values gathered."""
    key = (id(row_ptr), row_ptr._version, id(col_idx), col_idx._version, in_channels, kh, kw)
    found = _TRANSPOSED.get(key)
    if found is None:
        found = _TRANSPOSED[key] = _transpose_pattern(row_ptr, col_idx, in_channels, kh, kw)
        weakref.finalize(col_idx, _TRANSPOSED.pop, key, None)
    new_ptr, new_col, order = found
    return new_ptr, new_col, _gathered(values, order, key)


def _transpose_pattern(row_ptr, col_idx, in_channels: int, kh: int, kw: int):
    oc_count, ksize, nnz = row_ptr.numel() - 1, kh * kw, col_idx.numel()
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    oc = torch.repeat_interleave(torch.arange(oc_count, device=col_idx.device), counts, output_size=nnz)
    col = col_idx.long()
    ic, rs = col // ksize, col % ksize
    new_col = (oc * kh + (kh - 1 - rs // kw)) * kw + (kw - 1 - rs % kw)
    return _csr_by_input_channel(ic, new_col, in_channels, oc_count * ksize)


def _csr_by_input_channel(ic: torch.Tensor, new_col: torch.Tensor, in_channels: int, columns: int):
    """(row_ptr, col_idx, order): the non-zeros regrouped as CSR over input channels (rows ``ic``,
    columns ``new_col`` < ``columns``), sorted by row then column; ``order`` takes the values there.
    No host sync."""
    order = torch.argsort(ic * columns + new_col)
    per_row = torch.zeros(in_channels, dtype=torch.long, device=ic.device).index_add_(0, ic, torch.ones_like(ic))
    new_ptr = torch.cat([per_row.new_zeros(1), per_row.cumsum(0)]).to(torch.int32)
    return new_ptr, new_col[order].to(torch.int32).contiguous(), order


def conv_input_grad(grad, row_ptr, col_idx, values, x_shape, in_channels: int, kh: int, kw: int, stride, padding):
    """d loss / d x (x_shape) of the sparse convolution from d loss / d output: a sparse convolution
    of the output gradient with the transposed, flipped weight (stride 1), or one per stride phase
    (stride S: see :func:`_strided_input_grad`), on the forward's kernels."""
    (sh, sw), (ph, pw) = stride, padding
    if (sh, sw) != (1, 1):
        return _strided_input_grad(grad, row_ptr, col_idx, values, x_shape, in_channels, kh, kw, stride, padding)
    if ph > kh - 1 or pw > kw - 1:  # a padding wider than the kernel: the dense transposed convolution
        weight = csr_to_dense(row_ptr, col_idx, values, (row_ptr.shape[0] - 1, in_channels, kh, kw)).to(grad.dtype)
        return torch.nn.grad.conv2d_input(x_shape, weight, grad.contiguous(), stride=stride, padding=padding)
    t_ptr, t_cols, t_vals = transposed_weight(row_ptr, col_idx, values, in_channels, kh, kw)
    return sparse_conv2d(grad, t_ptr, t_cols, t_vals.to(grad.dtype), None, grad.shape[1], kh, kw, 1, 1,
                         kh - 1 - ph, kw - 1 - pw, algo=_input_grad_algo(grad))


def _input_grad_algo(grad: torch.Tensor) -> int:
    """The CPU algorithm of the input gradient's (stride-1) sparse convolutions: the tiled one from
    batch 8 on (the fastest there, see bench/NOTES.md), batch innermost on such a gradient below,
    else by shape."""
    if grad.device.type != "cpu":
        return 0
    if grad.shape[0] >= 8:
        return ALGORITHMS["tiled"]
    return ALGORITHMS["batch_innermost"] if is_batch_innermost(grad) else 0


# Stride phases. With stride S, input row i = S q + a - p (a in [0, S)) receives the output gradient
# through the kernel rows r = a + S t only: d/dx on phase a is the stride-1 transposed convolution of
# the output gradient with the sub-kernel u_a[t] = w[a + S t]. So the input gradient is S x S' sparse
# convolutions of the gradient with the phases' transposed, flipped sub-kernels (full padding), each
# written into its rows and columns of d/dx: the work of the non-zeros, where spreading the gradient S
# apart and convolving it would compute S S' times as many positions, most of them on zeros.
_PHASES: dict[tuple, list] = {}


def _phase_patterns(row_ptr, col_idx, in_channels: int, kh: int, kw: int, sh: int, sw: int) -> list:
    """[(a, b, th, tw, row_ptr, col_idx, order) per phase with taps]: the sub-kernel's CSR over input
    channels, its column (oc * th + th - 1 - t) * tw + tw - 1 - t2 for the tap (a + sh t, b + sw t2),
    and the permutation that takes the values there. Cached per weight pattern (building it reads
    the per-phase counts: one host sync per weight on a GPU)."""
    key = (id(row_ptr), row_ptr._version, id(col_idx), col_idx._version, in_channels, kh, kw, sh, sw)
    found = _PHASES.get(key)
    if found is not None:
        return found
    oc_count, ksize, nnz = row_ptr.numel() - 1, kh * kw, col_idx.numel()
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    oc = torch.repeat_interleave(torch.arange(oc_count, device=col_idx.device), counts, output_size=nnz)
    col = col_idx.long()
    ic, rs = col // ksize, col % ksize
    r, s = rs // kw, rs % kw
    found = []
    for a in range(sh):
        th = (kh - a + sh - 1) // sh  # taps a, a + sh, ... below kh
        for b in range(sw):
            tw = (kw - b + sw - 1) // sw
            if th <= 0 or tw <= 0:
                continue
            idx = (((r % sh) == a) & ((s % sw) == b)).nonzero().squeeze(1)
            t, t2 = r[idx] // sh, s[idx] // sw
            new_col = (oc[idx] * th + (th - 1 - t)) * tw + (tw - 1 - t2)
            ptr, cols, local = _csr_by_input_channel(ic[idx], new_col, in_channels, oc_count * th * tw)
            found.append((a, b, th, tw, ptr, cols, idx[local]))
    _PHASES[key] = found
    weakref.finalize(col_idx, _PHASES.pop, key, None)
    return found


def _strided_input_grad(grad, row_ptr, col_idx, values, x_shape, in_channels, kh, kw, stride, padding):
    n, _, h, w = x_shape
    (sh, sw), (ph, pw) = stride, padding
    grad_x = grad.new_zeros((n, in_channels, h, w))
    for a, b, th, tw, ptr, cols, order in _phase_patterns(row_ptr, col_idx, in_channels, kh, kw, sh, sw):
        # input rows i = sh q + a - ph inside [0, h): q in [q0, q1]; likewise columns
        q0, q1 = max(0, -((a - ph) // sh)), (h - 1 + ph - a) // sh
        c0, c1 = max(0, -((b - pw) // sw)), (w - 1 + pw - b) // sw
        if q1 < q0 or c1 < c0:
            continue
        vals = _gathered(values, order, (id(col_idx), col_idx._version, a, b, sh, sw)).to(grad.dtype)
        part = sparse_conv2d(grad, ptr, cols, vals, None, grad.shape[1], th, tw, 1, 1, th - 1, tw - 1,
                             algo=_input_grad_algo(grad))
        # rows past the computed ones receive nothing: they stay zero
        q1, c1 = min(q1, part.shape[2] - 1), min(c1, part.shape[3] - 1)
        if q1 < q0 or c1 < c0:
            continue
        i0, j0 = sh * q0 + a - ph, sw * c0 + b - pw
        grad_x[:, :, i0: i0 + sh * (q1 - q0) + 1: sh, j0: j0 + sw * (c1 - c0) + 1: sw] = part[:, :, q0: q1 + 1,
                                                                                           c0: c1 + 1]
    return grad_x


def _weight_grad_reference(x, grad, row_ptr, col_idx, in_channels, kh, kw, stride_h, stride_w, pad_h, pad_w):
    shape = (row_ptr.shape[0] - 1, in_channels, kh, kw)
    dense = torch.nn.grad.conv2d_weight(x, shape, grad, stride=(stride_h, stride_w), padding=(pad_h, pad_w))
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    rows = torch.repeat_interleave(torch.arange(shape[0], device=x.device), counts, output_size=col_idx.numel())
    return dense.reshape(shape[0], -1)[rows, col_idx.long()].contiguous()


@torch.library.custom_op("fastprune::sparse_conv2d_weight_grad", mutates_args=())
def sparse_conv2d_weight_grad(x: torch.Tensor, grad: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor,
                              in_channels: int, kh: int, kw: int, stride_h: int, stride_w: int, pad_h: int,
                              pad_w: int) -> torch.Tensor:
    """d loss / d values (nnz,) of a sparse convolution with a frozen pattern, from its input x
    (N, C, H, W) and the gradient of its output (N, OC, H', W'): the dense weight gradient sampled
    at the non-zeros. Default implementation (any device): that, computed densely (the reference)."""
    return _weight_grad_reference(x, grad, row_ptr, col_idx, in_channels, kh, kw, stride_h, stride_w, pad_h, pad_w)


@sparse_conv2d_weight_grad.register_kernel(("cpu", "cuda"))
def _sparse_conv2d_weight_grad_device(x, grad, row_ptr, col_idx, in_channels, kh, kw, stride_h, stride_w, pad_h,
                                      pad_w):
    backend = backends.choose(_CONV_SPEC, x.device)
    if backend == "cpp" and x.dtype == torch.float32:
        return torch.ops.fastprune.sparse_conv2d_weight_grad_ext(x, grad, row_ptr, col_idx, kh, kw, stride_h,
                                                                 stride_w, pad_h, pad_w)
    if backend in ("triton", "cuda") and backends.triton_importable():
        # Both GPU backends take the Triton kernel: there is no CUDA C++ weight gradient.
        from fastprune.kernels.sparse import sparse_conv2d_weight_grad as triton_weight_grad

        pattern = tiled_pattern(row_ptr, col_idx, in_channels * kh * kw)
        return triton_weight_grad(x, grad, pattern, kh, kw, stride_h, stride_w, pad_h, pad_w)
    return _weight_grad_reference(x, grad, row_ptr, col_idx, in_channels, kh, kw, stride_h, stride_w, pad_h, pad_w)


@sparse_conv2d_weight_grad.register_fake
def _sparse_conv2d_weight_grad_fake(x, grad, row_ptr, col_idx, in_channels, kh, kw, stride_h, stride_w, pad_h, pad_w):
    return x.new_empty((col_idx.shape[0],))


def _grad_wanted(ctx, index: int) -> bool:
    """Whether this backward pass needs the gradient of input ``index`` (values, bias): it requires
    grad and no attack asked for input gradients only (see fastprune.utils.autograd)."""
    return ctx.needs_input_grad[index] and parameter_gradients_wanted()


# Gradients: w.r.t. the input (attacks on a sparse model) as a sparse transposed convolution, and
# w.r.t. the CSR values where they require it (finetuning with the pattern frozen) at the non-zeros
# only. A fused ReLU or relu(conv + residual) is differentiated through the saved output (its sign is
# ReLU's mask; the residual gets the masked gradient too); the fused 2x2 pooling is not: under
# autograd SparseConv2d fuses the ReLU alone and pools after.
def _conv_setup_context(ctx, inputs, output):
    x, row_ptr, col_idx, values, bias, in_channels, kh, kw, stride_h, stride_w, pad_h, pad_w = inputs[:12]
    epilogue = inputs[-2]
    ctx.n_inputs = len(inputs)
    # A fused ReLU (or relu(conv + residual)) is differentiated through its output: relu'(z) is
    # output > 0, so the forward keeps its one pass and the backward needs no pre-activation.
    relu_mask = epilogue in (EPILOGUES["relu"], EPILOGUES["add_relu"])
    ctx.save_for_backward(row_ptr, col_idx, values, x if values.requires_grad else None,
                          output if relu_mask else None)
    ctx.geometry = (x.shape, in_channels, kh, kw, (stride_h, stride_w), (pad_h, pad_w), epilogue)


def _conv_backward(ctx, grad):
    row_ptr, col_idx, values, x, output = ctx.saved_tensors
    x_shape, in_channels, kh, kw, stride, padding, epilogue = ctx.geometry
    if epilogue == EPILOGUES["relu_pool"]:
        raise RuntimeError("sparse_conv2d: this op's fused pooling epilogue has no gradient; the public "
                           "fastprune.ops.sparse.sparse_conv2d (and SparseConv2d) differentiate it through "
                           "fastprune::sparse_conv2d_relu_pool, which keeps the pooling's window positions")
    grad_residual = None
    if output is not None:  # through the fused ReLU: its mask is the saved output's sign
        grad = torch.ops.aten.threshold_backward(grad, output, 0)  # ReLU's own backward: one pass
        if epilogue == EPILOGUES["add_relu"] and ctx.needs_input_grad[ctx.n_inputs - 1]:
            grad_residual = grad
    grad_x, grad_values, grad_bias = _conv_grads(ctx, grad, row_ptr, col_idx, values, x)
    return (grad_x, None, None, grad_values, grad_bias) + (None,) * (ctx.n_inputs - 6) + (grad_residual,)


def _conv_grads(ctx, grad, row_ptr, col_idx, values, x):
    """(d/dx, d/dvalues, d/dbias) of the convolution (before its epilogue) from the gradient of its
    output, each only where this backward pass needs it (inputs 0, 3 and 4 of the op)."""
    x_shape, in_channels, kh, kw, stride, padding = ctx.geometry[:6]
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = conv_input_grad(grad, row_ptr, col_idx, values, x_shape, in_channels, kh, kw, stride, padding)
    if _grad_wanted(ctx, 3):
        grad_values = sparse_conv2d_weight_grad(x, grad, row_ptr, col_idx, in_channels, kh, kw, *stride, *padding)
    if _grad_wanted(ctx, 4):
        grad_bias = grad.sum((0, 2, 3))
    return grad_x, grad_values, grad_bias


_sparse_conv2d_op.register_autograd(_conv_backward, setup_context=_conv_setup_context)
_sparse_conv2d_cpu_op.register_autograd(_conv_backward, setup_context=_conv_setup_context)


# ReLU then 2x2 max pooling fused, differentiably: the op also returns each pooled output's window
# position (uint8, 2 dy + dx of the first maximum, as PyTorch's max pooling picks), and the backward
# pass sends the gradient there (where the output is positive: ReLU's mask), without the pre-pooling
# activations. The public sparse_conv2d takes this op for epilogue 2 whenever autograd records.
def pool_2x2_with_index(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C, H, W) -> its 2x2 stride-2 max pooling (odd edges dropped) and the window positions
    (N, C, H/2, W/2) uint8 (2 dy + dx; the first maximum)."""
    windows = torch.stack(_windows_2x2(y))
    return windows.amax(0), windows.argmax(0).to(torch.uint8)


def unpool_2x2(grad: torch.Tensor, index: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The backward of a 2x2 stride-2 max pooling: grad (N, C, H/2, W/2) to the window positions
    ``index`` (uint8, 2 dy + dx) in an (N, C, H, W) gradient, ``size`` = (H, W) (an odd edge: zero)."""
    n, c, oh, ow = grad.shape
    positions = torch.arange(4, device=grad.device, dtype=torch.uint8)
    spread = torch.where(index.unsqueeze(-1) == positions, grad.unsqueeze(-1), grad.new_zeros(()))
    full = spread.reshape(n, c, oh, ow, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * oh, 2 * ow)
    if (2 * oh, 2 * ow) != tuple(size):
        full = torch.nn.functional.pad(full, (0, size[1] - 2 * ow, 0, size[0] - 2 * oh))
    return full


def _relu_pool_unfused(y: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    pooled, index = pool_2x2_with_index(torch.relu(y))
    return in_layout(pooled, layout), in_layout(index, layout)


@torch.library.custom_op("fastprune::sparse_conv2d_relu_pool", mutates_args=())
def sparse_conv2d_relu_pool(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                            bias: Optional[torch.Tensor], in_channels: int, kh: int, kw: int, stride_h: int,
                            stride_w: int, pad_h: int, pad_w: int, algo: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sparse_conv2d` with epilogue 2 (ReLU, then 2x2 max pooling), differentiable: returns the
    pooled output (N, OC, H'/2, W'/2) and the pooling's window positions (the same shape and strides,
    uint8: 2 dy + dx of each window's first maximum) that its backward pass uses. ``algo``: the CPU
    algorithm (ignored on a GPU). Default implementation (any device): the PyTorch reference."""
    geometry = (kh, kw, stride_h, stride_w, pad_h, pad_w)
    return _relu_pool_unfused(_reference_conv(x, row_ptr, col_idx, values, bias, in_channels, geometry),
                              output_layout(x, 0))


@sparse_conv2d_relu_pool.register_kernel(("cpu", "cuda"))
def _sparse_conv2d_relu_pool_device(x, row_ptr, col_idx, values, bias, in_channels, kh, kw, stride_h, stride_w,
                                    pad_h, pad_w, algo=0):
    geometry = (kh, kw, stride_h, stride_w, pad_h, pad_w)
    algo = algo if x.device.type == "cpu" else 0
    backend = backends.choose(_CONV_SPEC, x.device)
    if backend == "cpp" and pool_fusable(x, (stride_h, stride_w), algo):  # fused in the kernel's epilogue
        pool_algo = algo if algo in (ALGORITHMS["padded"], *_BATCH_INNERMOST_OUT) else ALGORITHMS["direct"]
        out, index = torch.ops.fastprune.sparse_conv2d_pool_ext(x, row_ptr, col_idx, values, bias, *geometry,
                                                                 pool_algo)
        return out, index
    if x.device.type == "cpu":
        y = _conv_on_cpu(x, row_ptr, col_idx, values, bias, in_channels, geometry, algo, EPILOGUES["relu"], None)
    elif backend == "reference":
        y = torch.relu(_reference_conv(x, row_ptr, col_idx, values, bias, in_channels, geometry))
    else:
        y, _ = _conv_gpu(backend, x, row_ptr, col_idx, values, bias, in_channels, geometry, EPILOGUES["relu"])
    return _relu_pool_unfused(y, output_layout(x, algo))


@sparse_conv2d_relu_pool.register_fake
def _sparse_conv2d_relu_pool_fake(x, row_ptr, col_idx, values, bias, in_channels, kh, kw, stride_h, stride_w, pad_h,
                                  pad_w, algo=0):
    out = _conv_fake(x, row_ptr, kh, kw, stride_h, stride_w, pad_h, pad_w, algo, EPILOGUES["relu_pool"])
    return out, torch.empty_strided(out.shape, out.stride(), dtype=torch.uint8, device=out.device)


def _relu_pool_setup_context(ctx, inputs, output):
    x, row_ptr, col_idx, values, bias, in_channels, kh, kw, stride_h, stride_w, pad_h, pad_w = inputs[:12]
    pooled, index = output
    ctx.mark_non_differentiable(index)
    ctx.save_for_backward(row_ptr, col_idx, values, x if values.requires_grad else None, pooled, index)
    ctx.geometry = (x.shape, in_channels, kh, kw, (stride_h, stride_w), (pad_h, pad_w))
    ctx.conv_size = (conv_output_size(x.shape[2], kh, stride_h, pad_h), conv_output_size(x.shape[3], kw, stride_w,
                                                                                            pad_w))


def _relu_pool_backward(ctx, grad, _grad_index):
    row_ptr, col_idx, values, x, pooled, index = ctx.saved_tensors
    grad = torch.ops.aten.threshold_backward(grad, pooled, 0)  # ReLU's mask: the pooled output is positive
    grad = unpool_2x2(grad, index, ctx.conv_size)
    grad_x, grad_values, grad_bias = _conv_grads(ctx, grad, row_ptr, col_idx, values, x)
    return (grad_x, None, None, grad_values, grad_bias) + (None,) * 8


sparse_conv2d_relu_pool.register_autograd(_relu_pool_backward, setup_context=_relu_pool_setup_context)


@torch.library.custom_op("fastprune::sparse_linear", mutates_args=())
def sparse_linear(x: torch.Tensor, row_ptr: torch.Tensor, col_idx: torch.Tensor, values: torch.Tensor,
                  bias: Optional[torch.Tensor], in_features: int) -> torch.Tensor:
    """(N, in) -> (N, out); CSR weight (out rows, in columns). Default implementation: the reference."""
    return sparse_linear_ref(x, row_ptr, col_idx, values, bias, in_features)


@sparse_linear.register_kernel(("cpu", "cuda"))
def _sparse_linear_device(x, row_ptr, col_idx, values, bias, in_features):
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
    x, row_ptr, col_idx, values, bias, in_features = inputs
    ctx.save_for_backward(row_ptr, col_idx, values, x if values.requires_grad else None)
    ctx.in_features = in_features


def _linear_backward(ctx, grad):
    """d/dx = grad W: the sparse product with the transposed CSR (rows: input features); d/dvalues
    at the non-zeros only: sum over the batch of grad[:, row] * x[:, col]."""
    row_ptr, col_idx, values, x = ctx.saved_tensors
    grad_x = grad_values = grad_bias = None
    if ctx.needs_input_grad[0]:
        t_ptr, t_cols, t_vals = transposed_weight(row_ptr, col_idx, values, ctx.in_features, 1, 1)
        grad_x = sparse_linear(grad.contiguous(), t_ptr, t_cols, t_vals.to(grad.dtype), None, grad.shape[1])
    if _grad_wanted(ctx, 3):
        counts = (row_ptr[1:] - row_ptr[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(row_ptr.numel() - 1, device=grad.device), counts,
                                       output_size=col_idx.numel())
        grad_values = (grad[:, rows] * x[:, col_idx.long()]).sum(0)
    if _grad_wanted(ctx, 4):
        grad_bias = grad.sum(0)
    return grad_x, None, None, grad_values, grad_bias, None


sparse_linear.register_autograd(_linear_backward, setup_context=_linear_setup_context)
