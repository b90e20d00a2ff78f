"""Inference with truly sparse layers: SparseConv2d / SparseLinear hold CSR weights only, and
``sparsify`` converts a pruned model, keeping per layer whichever of dense and sparse runs faster
on the actual device."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..ops.sparse import (ALGORITHMS, EPILOGUES, direct_applicable, finish_epilogue, sparse_conv2d, sparse_linear,
                          to_batch_innermost)
from ..models import from_recipe
from ..reference.sparse import check_csr, csr_to_dense, dense_to_csr
from ..utils.io import atomic_save, safe_load
from ..utils.timing import interleaved_medians, median_time
from .masked import _replace, check_sparsity, effective_weight, fold_masks


class _CSRWeight(nn.Module):
    """A weight stored as CSR buffers (row_ptr, col_idx, values): memory proportional to the non-zeros."""

    def _store(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self._store_csr(*dense_to_csr(weight), bias, weight.shape)

    def _store_csr(self, row_ptr, col_idx, values, bias, weight_shape) -> None:
        self.register_buffer("row_ptr", row_ptr)
        self.register_buffer("col_idx", col_idx)
        self.register_buffer("values", values)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.weight_shape = tuple(weight_shape)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def dense_weight(self) -> torch.Tensor:
        return csr_to_dense(self.row_ptr, self.col_idx, self.values, self.weight_shape)

    def _check_input(self, x: torch.Tensor, dims: int, name: str) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != dims:
            raise ValueError(f"input to {name} must be {dims}D, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        allowed = (torch.float32, torch.float16, torch.bfloat16) if x.is_cuda else (torch.float32,)
        if x.dtype not in allowed:
            raise ValueError(f"input to {name} must be {' or '.join(str(d) for d in allowed)} on {x.device.type}, "
                             f"got {x.dtype}")
        if x.device != self.values.device:
            raise ValueError(f"input to {name} is on {x.device}, the layer on {self.values.device}")


class SparseConv2d(_CSRWeight):
    """Convolution with a CSR weight (groups 1, dilation 1, zero padding): (N, C, H, W) -> (N, OC, H', W')."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride=(1, 1), padding=(0, 0)):
        super().__init__()
        if weight.dim() != 4:
            raise ValueError(f"weight must be (OC, IC, KH, KW), got {tuple(weight.shape)}")
        self._store(weight, bias)
        self.in_channels, self.kernel_size = weight.shape[1], tuple(weight.shape[2:])
        self.stride, self.padding = tuple(stride), tuple(padding)
        self.algo = 0  # chosen by shape; sparsify times the algorithms and sets the faster
        # 1: ReLU fused, 2: ReLU and 2x2 max pooling fused, 3: relu(conv + residual) fused (set by
        # sparsify's graph pass)
        self.epilogue = 0

    @classmethod
    def from_csr(cls, row_ptr, col_idx, values, bias, conv: nn.Conv2d) -> "SparseConv2d":
        """From CSR arrays (as in a saved state_dict) and the dense conv they replace (its geometry);
        the arrays are checked against the conv's shape."""
        shape = tuple(conv.weight.shape)
        check_csr(row_ptr, col_idx, values, shape[1] * shape[2] * shape[3])
        if row_ptr.numel() != shape[0] + 1:
            raise ValueError(f"row_ptr has {row_ptr.numel()} entries, the conv has {shape[0]} output channels")
        layer = cls.__new__(cls)
        _CSRWeight.__init__(layer)
        layer._store_csr(row_ptr, col_idx, values, bias, shape)
        layer.in_channels, layer.kernel_size = shape[1], shape[2:]
        layer.stride, layer.padding, layer.algo, layer.epilogue = tuple(conv.stride), tuple(conv.padding), 0, 0
        return layer

    @staticmethod
    def supports(conv: nn.Conv2d) -> bool:
        return (conv.groups == 1 and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros"
                and isinstance(conv.padding, tuple))

    @classmethod
    def from_dense(cls, conv: nn.Conv2d) -> "SparseConv2d":
        """From a Conv2d or MaskedConv2d (its masked weight)."""
        if not cls.supports(conv):
            raise ValueError("conv must have groups=1, dilation=1, zero padding given as numbers")
        return cls(effective_weight(conv), conv.bias, conv.stride, conv.padding)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x (N, C, H, W) -> (N, OC, H', W'); with the residual epilogue (3), relu(conv(x) + residual),
        residual (N, OC, H', W')."""
        self._check_input(x, 4, "SparseConv2d")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"input has {x.shape[1]} channels, the layer expects {self.in_channels}")
        if (residual is not None) != (self.epilogue == EPILOGUES["add_relu"]):
            raise ValueError("residual must be given exactly when the layer's epilogue is 3 (add_relu)")
        if residual is not None:
            self._check_input(residual, 4, "SparseConv2d (residual)")
        algo = self.algo if self.algo != ALGORITHMS["direct"] or direct_applicable(x, self.stride) else 0
        recording = torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad))
        epilogue = 0 if recording else self.epilogue  # under autograd (attacks): the epilogue unfused
        y = sparse_conv2d(x, self.row_ptr, self.col_idx, self.values, self.bias, self.in_channels,
                          *self.kernel_size, *self.stride, *self.padding, epilogue,
                          residual if epilogue == EPILOGUES["add_relu"] else None,
                          algo=algo if x.device.type == "cpu" else 0)
        return finish_epilogue(y, self.epilogue, epilogue, residual)

    def extra_repr(self) -> str:
        total = 1
        for s in self.weight_shape:
            total *= s
        return (f"{self.in_channels}, {self.weight_shape[0]}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, nnz={self.nnz} ({1 - self.nnz / total:.1%} sparse)")


class SparseLinear(_CSRWeight):
    """Linear layer with a CSR weight: (N, in) -> (N, out)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"weight must be (out, in), got {tuple(weight.shape)}")
        self._store(weight, bias)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> "SparseLinear":
        return cls(effective_weight(linear), linear.bias)

    @classmethod
    def from_csr(cls, row_ptr, col_idx, values, bias, linear: nn.Linear) -> "SparseLinear":
        """From CSR arrays (as in a saved state_dict) and the dense linear layer they replace."""
        out_features, in_features = linear.weight.shape
        check_csr(row_ptr, col_idx, values, in_features)
        if row_ptr.numel() != out_features + 1:
            raise ValueError(f"row_ptr has {row_ptr.numel()} entries, the layer has {out_features} outputs")
        layer = cls.__new__(cls)
        _CSRWeight.__init__(layer)
        layer._store_csr(row_ptr, col_idx, values, bias, (out_features, in_features))
        layer.in_features, layer.out_features = in_features, out_features
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, 2, "SparseLinear")
        if x.shape[1] != self.in_features:
            raise ValueError(f"input has {x.shape[1]} features, the layer expects {self.in_features}")
        return sparse_linear(x, self.row_ptr, self.col_idx, self.values, self.bias, self.in_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, nnz={self.nnz}"


def semi_structured_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether PyTorch's 2:4 semi-structured kernels run here: CUDA, compute capability >= 8.0
    (Ampere, Hopper), float16 or bfloat16."""
    device = torch.device(device)
    return (device.type == "cuda" and torch.cuda.is_available() and dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(device)[0] >= 8)


def semi_structured_shape_ok(shape, dtype: torch.dtype) -> bool:
    """Whether PyTorch's semi-structured format takes a weight of ``shape`` (out, in) and ``dtype``:
    both dimensions multiples of (and at least) the minimum of every backend it may pick (cuSPARSELt,
    CUTLASS); for float16/bfloat16 that is 32 rows and 64 columns, so e.g. a Linear(256, 10) head
    stays CSR or dense."""
    if len(shape) != 2:
        return False
    rows, cols = shape
    limits = []
    for name in ("SparseSemiStructuredTensorCUSPARSELT", "SparseSemiStructuredTensorCUTLASS"):
        table = getattr(getattr(torch.sparse, name, None), "_DTYPE_SHAPE_CONSTRAINTS", {})
        if dtype in table:
            limits.append((table[dtype].sparse_min_rows, table[dtype].sparse_min_cols))
    if not limits:  # an older or newer torch without the table: the documented fp16/bf16 minimum
        if dtype not in (torch.float16, torch.bfloat16):
            return False
        limits = [(32, 64)]
    return all(rows >= r and rows % r == 0 and cols >= c and cols % c == 0 for r, c in limits)


def is_2to4(weight: torch.Tensor) -> bool:
    """Whether every 4 consecutive entries along each row of ``weight`` (out, in) hold at most 2
    non-zeros (what prune_model(..., pattern="2:4") produces)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


class SemiStructuredLinear(nn.Module):
    """nn.Linear with a 2:4-sparse weight kept in PyTorch's semi-structured format (half the values
    plus metadata) and run by its sparse tensor-core kernels: (..., in) -> (..., out). Needs
    :func:`semi_structured_supported`; pickles as the dense weight and converts back on load."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        weight = weight.detach()
        if not semi_structured_supported(weight.device, weight.dtype):
            raise ValueError(f"weight: 2:4 semi-structured kernels need a CUDA device of compute capability >= 8.0 "
                             f"and float16/bfloat16; got {weight.dtype} on {weight.device}")
        if not is_2to4(weight):
            raise ValueError("weight is not 2:4 sparse (prune with prune_model(..., pattern='2:4'))")
        if not semi_structured_shape_ok(weight.shape, weight.dtype):
            raise ValueError(f"weight: PyTorch's semi-structured kernels do not take shape {tuple(weight.shape)} "
                             f"in {weight.dtype} (rows a multiple of 32, columns of 64 for float16/bfloat16)")
        self._set_weight(weight)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def _set_weight(self, weight: torch.Tensor) -> None:
        from torch.sparse import to_sparse_semi_structured

        self.weight = nn.Parameter(to_sparse_semi_structured(weight), requires_grad=False)

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> "SemiStructuredLinear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        return torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias).reshape(*lead, -1)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_parameters"] = dict(state["_parameters"])
        state["_dense_weight"] = state["_parameters"].pop("weight").to_dense()
        return state

    def __setstate__(self, state):
        dense = state.pop("_dense_weight")
        self.__dict__.update(state)
        self._set_weight(dense)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, 2:4 semi-structured"


def _sparse_twins(module: nn.Module) -> list[nn.Module]:
    """The sparse layers that could replace ``module``: CSR (float32; any float on CUDA), and the
    2:4 semi-structured linear where its weight and the hardware allow."""
    w = module.weight
    csr_dtype = w.dtype == torch.float32 or (w.is_cuda and w.dtype in (torch.float16, torch.bfloat16))
    twins = []
    if (isinstance(module, nn.Linear) and semi_structured_supported(w.device, w.dtype)
            and semi_structured_shape_ok(w.shape, w.dtype) and is_2to4(w.detach())):
        twins.append(SemiStructuredLinear.from_dense(module))
    if isinstance(module, nn.Conv2d) and SparseConv2d.supports(module) and csr_dtype:
        twins.append(SparseConv2d.from_dense(module))
    elif isinstance(module, nn.Linear) and csr_dtype:
        twins.append(SparseLinear.from_dense(module))
    return twins


# A sparse candidate must beat dense by this factor to be chosen: timings on a shared machine vary by
# a few per cent, and a near tie picked by noise can come out slower than dense when timed again.
_WIN_MARGIN = 0.97


def _median_seconds(fn, x, repeats: int) -> float:
    """Median seconds of fn(x) without autograd (one warm-up run)."""
    with torch.no_grad():
        return median_time(lambda: fn(x), x.device, repeats=repeats, warmup=1)


def _max_of_four(x: torch.Tensor) -> torch.Tensor:
    """2x2, stride-2 max pooling of (N, C, H, W) as the maximum of four strided views (odd edges
    dropped, as nn.MaxPool2d does): several times faster than PyTorch's CPU pooling on NCHW tensors,
    the layout the sparse convolutions produce, and no slower on channels_last ones."""
    h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
    x = x[:, :, :h, :w]
    return torch.maximum(torch.maximum(x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2]),
                         torch.maximum(x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]))


class MaxPool2x2(nn.Module):
    """nn.MaxPool2d(2) computed by :func:`_max_of_four`: the same values, faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _max_of_four(x) if x.dim() == 4 else torch.nn.functional.max_pool2d(x, 2)

    @staticmethod
    def replaces(module: nn.Module) -> bool:
        def pair(v):
            return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

        return (type(module) is nn.MaxPool2d and pair(module.kernel_size) == (2, 2)
                and pair(module.stride or module.kernel_size) == (2, 2) and pair(module.padding) == (0, 0)
                and pair(module.dilation) == (1, 1) and not module.ceil_mode and not module.return_indices)


class _AdaptivePool(nn.Module):
    """What the fast adaptive poolings share: an (h, w) output size taken from the PyTorch module
    they replace (``pytorch_type``), which must give both sizes as integers."""

    pytorch_type: type

    def __init__(self, output_size: tuple[int, int]):
        super().__init__()
        self.output_size = output_size

    @classmethod
    def _size_of(cls, module: nn.Module) -> tuple[int, int] | None:
        if type(module) is not cls.pytorch_type or getattr(module, "return_indices", False):
            return None
        size = module.output_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return size if all(isinstance(v, int) for v in size) else None

    @classmethod
    def replaces(cls, module: nn.Module) -> bool:
        return cls._size_of(module) is not None

    @classmethod
    def from_module(cls, module: nn.Module) -> "_AdaptivePool":
        return cls(cls._size_of(module))

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


class AdaptiveMaxPool2x2(_AdaptivePool):
    """nn.AdaptiveMaxPool2d(output_size): where the input is exactly twice the output size its windows
    are the 2x2 stride-2 ones, computed by :func:`_max_of_four` (PyTorch's adaptive kernel is an
    order of magnitude slower on NCHW CPU tensors); any other size falls back to PyTorch."""

    pytorch_type = nn.AdaptiveMaxPool2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and (x.shape[2], x.shape[3]) == (2 * self.output_size[0], 2 * self.output_size[1]):
            return _max_of_four(x)
        return torch.nn.functional.adaptive_max_pool2d(x, self.output_size)


class FastAdaptiveAvgPool2d(_AdaptivePool):
    """nn.AdaptiveAvgPool2d(output_size) with the cases PyTorch's NCHW CPU kernel is slow at done
    directly: a 1 x 1 input is broadcast (VGG16's 1 x 1 features pooled "up" to 2 x 2), an input that
    is a whole multiple of the output is plain average pooling; anything else goes to PyTorch."""

    pytorch_type = nn.AdaptiveAvgPool2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        oh, ow = self.output_size
        if x.dim() == 4:
            h, w = x.shape[2], x.shape[3]
            if (h, w) == (1, 1):
                return x.expand(-1, -1, oh, ow).contiguous()
            if h % oh == 0 and w % ow == 0:
                return torch.nn.functional.avg_pool2d(x, (h // oh, w // ow))
        return torch.nn.functional.adaptive_avg_pool2d(x, self.output_size)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm that follows a conv into the conv (eval mode; per-output-channel scaling
    keeps zero weights zero, so sparsity survives). Uses torch.fx; a model that cannot be traced is
    returned unchanged."""
    import torch.fx.experimental.optimization as fx_opt

    try:
        return _without_string_types(fx_opt.fuse(model.eval(), inplace=False))
    except Exception:  # noqa: BLE001 - any tracing failure means: leave the model as it is
        return model


def _without_string_types(graph_module):
    """Drop type annotations that fx recorded as strings (a traced forward's annotations under
    `from __future__ import annotations`): torch 2.11 cannot pickle a GraphModule that has them."""
    changed = False
    for node in graph_module.graph.nodes:
        if isinstance(node.type, str):
            node.type, changed = None, True
    if changed:
        graph_module.recompile()
    return graph_module


def _fast_pooling(model: nn.Module) -> nn.Module:
    for name, module in list(model.named_modules()):
        if MaxPool2x2.replaces(module):
            _replace(model, name, MaxPool2x2())
        elif AdaptiveMaxPool2x2.replaces(module):
            _replace(model, name, AdaptiveMaxPool2x2.from_module(module))
        elif FastAdaptiveAvgPool2d.replaces(module):
            _replace(model, name, FastAdaptiveAvgPool2d.from_module(module))
    return model


class MicroBatched(nn.Module):
    """Runs ``model`` (in eval mode, a tensor in and out) on slices of at most ``micro_batch``
    images and concatenates the outputs: each slice's activations stay in the CPU's caches from one
    layer to the next, where a whole large batch's would stream through memory."""

    def __init__(self, model: nn.Module, micro_batch: int):
        super().__init__()
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be at least 1, got {micro_batch}")
        self.model, self.micro_batch = model, micro_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, ...) -> model(x), computed micro_batch rows at a time."""
        if x.shape[0] <= self.micro_batch:
            return self.model(x)
        return torch.cat([self.model(part) for part in x.split(self.micro_batch)])


class _LayoutInput(nn.Module):
    """Runs ``model`` on its 4D inputs converted by ``convert`` to the memory layout it is fastest in."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @staticmethod
    def convert(x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.convert(x) if x.dim() == 4 else x)


class ChannelsLastInput(_LayoutInput):
    """Runs ``model`` on channels_last inputs: in that layout BatchNorm, pooling and the sparse
    convolutions around each other avoid layout conversions on the CPU."""

    @staticmethod
    def convert(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)


class BatchInnermostInput(_LayoutInput):
    """Runs ``model`` on inputs whose memory is laid out (C, H, W, N) (see
    :func:`fastprune.ops.sparse.to_batch_innermost`): sparse convolutions on the batch-innermost
    algorithm read and write that layout, so a network of them never re-lays its activations, and
    elementwise ops between them (residual additions) keep it."""

    convert = staticmethod(to_batch_innermost)


def _tune_sparse(layer: nn.Module, x: torch.Tensor, repeats: int, batch_innermost: bool = False) -> float:
    """Time each algorithm a sparse conv can use on input x, keep the fastest; returns its time.
    In a batch-innermost model every sparse conv runs that algorithm (its output layout is what the
    next layer reads)."""
    if not isinstance(layer, SparseConv2d):
        return _median_seconds(layer, x, repeats)
    if batch_innermost:
        options = [ALGORITHMS["batch_innermost"]]
    else:
        options = [ALGORITHMS["padded"]] + ([ALGORITHMS["direct"]] if direct_applicable(x, layer.stride) else [])
    times = {}
    for algo in options:
        layer.algo = algo
        times[algo] = _median_seconds(layer, x, repeats)
    layer.algo = min(times, key=times.get)
    return times[layer.algo]


def _convert_layers(dense: nn.Module, inputs: dict, min_sparsity: float, repeats: int,
                    batch_innermost: bool = False):
    """Swap dense conv/linear layers for sparse ones: by timing where ``inputs`` has the layer's
    input, else by the sparsity rule. Returns (model, decisions); ``dense`` is modified."""
    decisions = {}
    for name, module in [(n, m) for n, m in dense.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]:
        twins = _sparse_twins(module)
        weight = module.weight.detach()
        decision = {"sparsity": float((weight == 0).float().mean()), "dense_s": None, "sparse_s": None}
        chosen = None
        if twins and name in inputs:
            x = inputs[name]
            decision["dense_s"] = _median_seconds(module, x, repeats)
            times = [_tune_sparse(twin, x, repeats, batch_innermost) for twin in twins]
            best = min(range(len(twins)), key=times.__getitem__)
            decision["sparse_s"] = times[best]
            chosen = twins[best] if times[best] < _WIN_MARGIN * decision["dense_s"] else None
        elif twins:  # no timing: semi-structured wherever it applies, CSR from min_sparsity on
            semi = [t for t in twins if isinstance(t, SemiStructuredLinear)]
            chosen = semi[0] if semi else (twins[0] if decision["sparsity"] >= min_sparsity else None)
        decision["kept"] = "sparse" if chosen is not None else "dense"
        decision["format"] = "2:4" if isinstance(chosen, SemiStructuredLinear) else "csr" if chosen else "dense"
        decisions[name] = decision
        if chosen is not None:
            _replace(dense, name, chosen)
    return dense, decisions


def _is_relu(node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in (torch.relu, torch.relu_, torch.nn.functional.relu)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_pool(node, modules) -> bool:
    module = modules.get(node.target) if node.op == "call_module" else None
    return isinstance(module, MaxPool2x2) or (module is not None and MaxPool2x2.replaces(module))


def fuse_epilogues(model: nn.Module) -> nn.Module:
    """In a torch.fx GraphModule, fold ReLU (and a following 2x2 max pool, where the layer's algorithm
    can pool) that consume a SparseConv2d's output alone into that layer's epilogue,
    saving whole passes over the activations. Other models are returned unchanged."""
    import torch.fx

    if not isinstance(model, torch.fx.GraphModule):
        return model
    modules = dict(model.named_modules())
    for node in list(model.graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, SparseConv2d) or len(node.users) != 1:
            continue
        relu = next(iter(node.users))
        if not _is_relu(relu, modules) or relu.args[0] is not node:
            continue
        conv.epilogue = 1
        relu.replace_all_uses_with(node)
        model.graph.erase_node(relu)
        pool = next(iter(node.users)) if len(node.users) == 1 else None
        pool_ok = conv.algo in (ALGORITHMS["direct"], ALGORITHMS["batch_innermost"]) or (
            conv.algo == ALGORITHMS["padded"] and conv.stride[0] == conv.stride[1])
        if pool is not None and _is_pool(pool, modules) and pool_ok:
            conv.epilogue = 2
            pool.replace_all_uses_with(node)
            model.graph.erase_node(pool)
    _fuse_add_relu(model)
    model.recompile()
    return _without_string_types(model)


def add_relu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """relu(a + b): one pass over the activations (aten._add_relu) at inference, the differentiable
    two-op form when autograd records (aten._add_relu has no derivative; attacks need one)."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return torch.relu(a + b)
    return torch.ops.aten._add_relu(a, b)


def _fuse_add_relu(model) -> None:
    """relu(a + b) (the residual connection at the end of every ResNet block) -> one pass over the
    activations instead of two: into the epilogue of the sparse conv that computes a (or b) where it
    runs the batch-innermost algorithm and a feeds nothing else, else :func:`add_relu`."""
    import operator

    modules = dict(model.named_modules())

    def fusable_conv(arg):
        conv = modules.get(arg.target) if arg.op == "call_module" else None
        ok = (isinstance(conv, SparseConv2d) and conv.algo == ALGORITHMS["batch_innermost"]
              and conv.epilogue == 0 and len(arg.users) == 1 and len(arg.args) == 1 and not arg.kwargs)
        return conv if ok else None

    for node in list(model.graph.nodes):
        is_add = node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)
        if not is_add or node.kwargs or len(node.args) != 2 or len(node.users) != 1:
            continue
        if not all(isinstance(a, torch.fx.Node) for a in node.args):
            continue
        relu = next(iter(node.users))
        if not _is_relu(relu, modules) or relu.args[0] is not node:
            continue
        conv_node = next((a for a in node.args if fusable_conv(a) is not None), None)
        with model.graph.inserting_after(relu):
            if conv_node is None:
                fused = model.graph.call_function(add_relu, tuple(node.args))
            else:  # conv(x, residual): placed where the relu was, after both its inputs exist
                other = node.args[1] if node.args[0] is conv_node else node.args[0]
                fusable_conv(conv_node).epilogue = EPILOGUES["add_relu"]
                fused = model.graph.call_module(conv_node.target, (conv_node.args[0], other))
        relu.replace_all_uses_with(fused)
        model.graph.erase_node(relu)
        model.graph.erase_node(node)
        if conv_node is not None:
            model.graph.erase_node(conv_node)


def _layer_inputs(model: nn.Module, x: torch.Tensor, convert=None) -> dict:
    """Each conv/linear layer's input when ``model`` runs on x, passed through ``convert`` (the
    layout the layer will see once its predecessors are sparse) where one is given."""
    inputs = {}

    def keep(name, value):
        inputs[name] = convert(value) if convert is not None and value.dim() == 4 else value

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks = [m.register_forward_hook(lambda mod, args, out, name=n: keep(name, args[0].detach())) for n, m in layers]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def _layout_candidates(dense: nn.Module, example: torch.Tensor, layouts: dict, min_sparsity: float, repeats: int,
                       sparse_only: bool = False) -> dict:
    """{"sparse, <layout>" / "dense, <layout>": (model, decisions)} for each memory layout: the
    sparse model has each layer tuned on its real input in that layout."""
    candidates = {}
    for layout, wrapper in layouts.items():
        cl = layout == "channels_last"
        base = copy.deepcopy(dense).to(memory_format=torch.channels_last) if cl else copy.deepcopy(dense)
        x = wrapper.convert(example) if wrapper else example
        innermost = layout == "batch innermost"
        inputs = _layer_inputs(base, x, to_batch_innermost if innermost else None)
        sparse, decisions = _convert_layers(copy.deepcopy(base), inputs, min_sparsity, repeats,
                                            batch_innermost=innermost)
        sparse = fuse_epilogues(sparse)
        wrap = wrapper or (lambda m: m)
        candidates[f"sparse, {layout}"] = (wrap(sparse), decisions)
        if not innermost and not sparse_only:  # oneDNN has no batch-innermost convolution: it would convert
            all_dense = {k: {**d, "kept": "dense", "format": "dense"} for k, d in decisions.items()}
            candidates[f"dense, {layout}"] = (wrap(base), all_dense)
    return candidates


# Batches at least this large may run batch-innermost on the CPU (a batch fills a vector register).
_BATCH_INNERMOST_MIN_BATCH = 8
# Larger CPU batches are also tried in micro-batches of this many images.
_MICRO_BATCH = 64


def sparsify(model: nn.Module, example_input: torch.Tensor | None = None, *, benchmark: bool = True,
             min_sparsity: float = 0.5, repeats: int = 5, channels_last: bool | str = "auto",
             batch_innermost: bool | str = "auto") -> nn.Module:
    """An inference copy of ``model`` whose conv and linear layers carry compressed weights.

    With ``example_input`` (a typical batch, (N, C, H, W) for a CNN) and ``benchmark`` on, on the
    model's device: every candidate layer is timed dense and sparse on its real input and the faster
    kept; then the whole sparse model is timed against the dense model (masks folded in), in the
    contiguous and the channels_last layout (``channels_last="auto"``) and, on the CPU for batches of
    8 or more (``batch_innermost="auto"``), with every sparse conv on the batch-innermost algorithm
    (activations laid out (C, H, W, N), see :class:`BatchInnermostInput`); CPU batches over 64 are
    also tried in micro-batches of 64 (:class:`MicroBatched`, tuned on 64); the fastest of those is
    returned, so the result is never slower than the dense model. A sparse layer or model must be at
    least 3% faster than dense to be chosen (smaller differences are timing noise). Without timing,
    a layer becomes sparse when its sparsity is at least ``min_sparsity``. Masks of masked layers
    and BatchNorms that follow a conv are folded into the conv weights either way, 2x2 max pooling
    gets a faster NCHW version, and ReLU (and pooling) right after a sparse conv are fused into its
    epilogue.

    The returned model has ``sparsify_decisions`` ({layer: {"sparsity", "dense_s", "sparse_s",
    "kept"}}) and ``sparsify_choice`` (what was returned and the whole-model times).
    """
    check_sparsity(min_sparsity, "min_sparsity")
    for name, value in (("channels_last", channels_last), ("batch_innermost", batch_innermost)):
        if value not in (True, False, "auto"):
            raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")
    recipe = getattr(model, "fastprune_recipe", None)  # how to rebuild it (save_sparse), for zoo models
    dense = _fast_pooling(fold_batchnorm(fold_masks(copy.deepcopy(model).eval())))
    if example_input is None or not benchmark:
        result, decisions = _convert_layers(dense, {}, min_sparsity, repeats)
        result = fuse_epilogues(result)
        if channels_last is True:
            result = ChannelsLastInput(result.to(memory_format=torch.channels_last))
        result.sparsify_decisions, result.sparsify_choice = decisions, {"kind": "sparse", "timed": False}
        result.sparsify_plan, result.fastprune_recipe = _plan_of(result, "sparse"), recipe
        return result

    layouts = {"contiguous": None, "channels_last": ChannelsLastInput}
    if channels_last != "auto":
        del layouts["contiguous" if channels_last else "channels_last"]
    if batch_innermost is True or (batch_innermost == "auto" and example_input.device.type == "cpu"
                                   and example_input.dim() == 4
                                   and example_input.shape[0] >= _BATCH_INNERMOST_MIN_BATCH):
        layouts["batch innermost"] = BatchInnermostInput
    candidates = _layout_candidates(dense, example_input, layouts, min_sparsity, repeats)
    micro = _MICRO_BATCH
    if example_input.device.type == "cpu" and example_input.dim() == 4 and example_input.shape[0] > micro:
        # Large CPU batches also run in micro-batches, each through the whole network while its
        # activations fit in cache; the layers are tuned on a micro-batch. Kept only where the
        # outputs equal the whole-batch run (no cross-sample op in the model).
        with torch.no_grad():
            reference = candidates["dense, " + next(iter(layouts))][0](example_input)
        small = _layout_candidates(dense, example_input[:micro], layouts, min_sparsity, repeats, sparse_only=True)
        for key, (model_, decisions) in small.items():
            chunked = MicroBatched(model_, micro)
            with torch.no_grad():
                out = chunked(example_input)
            if isinstance(out, torch.Tensor) and torch.allclose(out, reference, rtol=1e-3, atol=1e-3 * (
                    reference.abs().max().item() + 1e-12)):
                candidates[f"{key}, micro-batches of {micro}"] = (chunked, decisions)
    # Whole models in interleaved rounds after two warm-up runs: the first runs of a model allocate
    # its activations afresh (page faults), which would favour whichever candidate ran last.
    with torch.no_grad():
        times = interleaved_medians({k: (lambda m=m: m(example_input)) for k, (m, _) in candidates.items()},
                                    example_input.device, repeats=repeats, warmup=2)
    best = min(times, key=times.get)
    fastest_dense = min((k for k in times if k.startswith("dense")), key=times.get)
    if times[best] >= _WIN_MARGIN * times[fastest_dense]:  # a near tie is timing noise: stay dense
        best = fastest_dense
    result, decisions = candidates[best]
    result.sparsify_decisions = decisions
    result.sparsify_choice = {"kind": best, "timed": True, "seconds": times}
    result.sparsify_plan, result.fastprune_recipe = _plan_of(result, best.split(",")[0]), recipe
    return result


_FORMAT = "fastprune-sparse"
_FORMAT_VERSION = 1


def _unwrap(model: nn.Module) -> tuple[nn.Module, int, int | None, str]:
    """(innermost model, wrapper depth, micro-batch size or None, layout) of a sparsify result."""
    depth, micro, layout = 0, None, "contiguous"
    if isinstance(model, MicroBatched):
        model, depth, micro = model.model, depth + 1, model.micro_batch
    if isinstance(model, _LayoutInput):
        layout = "channels_last" if isinstance(model, ChannelsLastInput) else "batch innermost"
        model, depth = model.model, depth + 1
    return model, depth, micro, layout


def _plan_of(result: nn.Module, kind: str) -> dict:
    """What sparsify chose, as plain data: enough to rebuild the model from its zoo recipe and a
    state_dict without timing anything (save_sparse / load_sparse)."""
    inner, _, micro, layout = _unwrap(result)
    layers = {}
    for name, m in inner.named_modules():
        if isinstance(m, SparseConv2d):
            layers[name] = {"format": "csr", "algo": int(m.algo), "epilogue": int(m.epilogue)}
        elif isinstance(m, SparseLinear):
            layers[name] = {"format": "csr"}
        elif isinstance(m, SemiStructuredLinear):
            layers[name] = {"format": "2:4"}
    return {"kind": kind, "layout": layout, "micro_batch": micro, "layers": layers}


def _rebuild(recipe: dict, plan: dict, state: dict, device) -> nn.Module:
    """The sparsified model a plan describes, rebuilt from the zoo and filled from ``state``."""
    dense = _fast_pooling(fold_batchnorm(from_recipe(recipe).eval()))
    if plan["layout"] == "channels_last":
        dense = dense.to(memory_format=torch.channels_last)
    prefix = "model." * ((plan["layout"] != "contiguous") + (plan["micro_batch"] is not None))
    for name, spec in plan["layers"].items():
        module = dense.get_submodule(name)
        key = prefix + name + "."
        if spec["format"] == "2:4":
            twin = SemiStructuredLinear(state[key + "weight"].to(device), state.get(key + "bias"))
        elif isinstance(module, nn.Conv2d):
            twin = SparseConv2d.from_csr(*(state[key + k] for k in ("row_ptr", "col_idx", "values")),
                                         state.get(key + "bias"), module)
            twin.algo = spec["algo"]
        else:
            twin = SparseLinear.from_csr(*(state[key + k] for k in ("row_ptr", "col_idx", "values")),
                                         state.get(key + "bias"), module)
        _replace(dense, name, twin)
    if plan["kind"] == "sparse":
        dense = fuse_epilogues(dense)
        for name, spec in plan["layers"].items():
            if "epilogue" in spec and dense.get_submodule(name).epilogue != spec["epilogue"]:
                raise ValueError(f"layer {name!r}: the file's fused epilogue does not match its rebuilt graph")
    model = {"channels_last": ChannelsLastInput, "batch innermost": BatchInnermostInput}.get(
        plan["layout"], lambda m: m)(dense)
    if plan["micro_batch"] is not None:
        model = MicroBatched(model, plan["micro_batch"])
    model.load_state_dict({k: v for k, v in state.items() if not _is_semi_structured_key(k, plan, prefix)},
                          strict=False)
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise ValueError(f"the file lacks {sorted(missing)[:3]}{' ...' if len(missing) > 3 else ''}")
    model.sparsify_plan, model.fastprune_recipe = plan, recipe
    return model.to(device).eval()


def _is_semi_structured_key(key: str, plan: dict, prefix: str) -> bool:
    name = key[len(prefix):].rpartition(".")[0]
    return plan["layers"].get(name, {}).get("format") == "2:4"


def save_sparse(model: nn.Module, path: str) -> None:
    """Write a model returned by :func:`sparsify` as tensors and plain data only: its zoo recipe
    (fastprune.models.get_model's name, classes, channels), sparsify's plan (layout, micro-batching,
    per-layer format, algorithm and fused epilogue) and its state_dict (CSR buffers: the file grows
    with the number of non-zeros, not the dense size). Nothing in it runs code when loaded.
    Written atomically."""
    plan = getattr(model, "sparsify_plan", None)
    recipe = getattr(model, "fastprune_recipe", None)
    if plan is None:
        raise ValueError("model: save_sparse takes a model returned by fastprune.nn.sparsify")
    if recipe is None:
        raise ValueError("model: sparsify's input was not built by fastprune.models.get_model, so the file could "
                         "not say how to rebuild it; save the dense model's state_dict instead")
    state = {}
    for key, value in model.state_dict().items():
        if getattr(value, "is_sparse_semi_structured", False) or type(value).__name__.startswith("SparseSemi"):
            value = value.to_dense()
        state[key] = value.detach().cpu()
    atomic_save({"format": _FORMAT, "version": _FORMAT_VERSION, "recipe": recipe, "plan": plan, "state_dict": state},
                path)


def load_sparse(path: str, map_location="cpu") -> nn.Module:
    """Read a model written by :func:`save_sparse` (tensors and plain data only: loading runs no
    code from the file) and rebuild it on ``map_location``."""
    obj = safe_load(path, "sparse model file")
    if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
        raise ValueError(f"{path!r} was not written by fastprune.save_sparse")
    if obj.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{path!r}: sparse format version {obj.get('version')!r}, this fastprune reads "
                         f"{_FORMAT_VERSION}")
    try:
        return _rebuild(obj["recipe"], obj["plan"], obj["state_dict"], map_location)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path!r}: the sparse model file is inconsistent ({type(exc).__name__}: {exc})") from None
