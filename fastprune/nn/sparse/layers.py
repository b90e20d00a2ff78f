"""Sparse inference layers: SparseConv2d / SparseLinear (CSR weights: memory and work proportional
to the non-zeros) and SemiStructuredLinear (PyTorch's 2:4 format on GPUs that have it)."""
from __future__ import annotations

import torch
from torch import nn

import torch.nn.functional as F

from ...ops.sparse import (ALGORITHMS, EPILOGUES, direct_applicable, finish_epilogue, sparse_conv2d,
                           sparse_conv2d_cpu_inference, sparse_linear)
from ...reference.sparse import check_csr, csr_to_dense, dense_to_csr
from ..masked import effective_weight


class _CSRWeight(nn.Module):
    """A weight stored as CSR buffers (row_ptr, col_idx, values): memory proportional to the non-zeros.

    ``choice`` says how the layer runs (set per batch-size bucket by :class:`SparseModel`): "dense"
    runs PyTorch's dense kernel on the weight rebuilt from the CSR arrays (kept in ``dense_cache``, a
    buffer outside the state_dict, built on first use), anything else one of the sparse kernels. The
    state_dict is the same whatever the choice."""

    choices: tuple[str, ...] = ("dense",)

    def _store(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self._store_csr(*dense_to_csr(weight), bias, weight.shape)

    def _store_csr(self, row_ptr, col_idx, values, bias, weight_shape) -> None:
        self.register_buffer("row_ptr", row_ptr)
        self.register_buffer("col_idx", col_idx)
        self.register_buffer("values", values)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.register_buffer("dense_cache", None, persistent=False)
        self.weight_shape = tuple(weight_shape)
        self._choice = self.choices[1]

    @property
    def choice(self) -> str:
        return self._choice

    @choice.setter
    def choice(self, value: str) -> None:
        if value not in self.choices:
            raise ValueError(f"choice must be one of {self.choices}, got {value!r}")
        self._choice = value

    def _csr(self) -> tuple:
        """(row_ptr, col_idx, values, bias), read from the buffers' dict where they are buffers (the
        inference case): as attributes nn.Module looks each up in three dicts, 2 us for the four,
        which at batch 1 is a noticeable part of a layer. Trainable values and bias are parameters."""
        b = self._buffers
        try:
            return b["row_ptr"], b["col_idx"], b["values"], b["bias"]
        except KeyError:
            return self.row_ptr, self.col_idx, self.values, self.bias

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def dense_weight(self) -> torch.Tensor:
        """The dense weight the CSR arrays describe (detached: a copy, never part of a graph)."""
        return csr_to_dense(self.row_ptr, self.col_idx, self.values.detach(), self.weight_shape)

    def dense_for(self, x: torch.Tensor) -> torch.Tensor:
        """The dense weight in x's dtype on x's device, for the "dense" choice (cached)."""
        cached = self.dense_cache
        if cached is None or cached.device != x.device or cached.dtype != x.dtype:
            cached = self.dense_cache = self.dense_weight().to(x.device, x.dtype)
        return cached

    def release_dense(self) -> None:
        """Drop the dense weight's cache (sparsify does, for layers no tuned bucket runs dense)."""
        self.dense_cache = None

    def _bias_for(self, x: torch.Tensor) -> torch.Tensor | None:
        bias = self.bias  # (one module attribute lookup; .to() of the same dtype still costs 1.5 us)
        return bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)

    def _check_input(self, x: torch.Tensor, dims: int, name: str) -> None:
        # The common case first, in the fewest attribute reads (at batch 1 a layer's Python is a
        # sizeable part of its time): a float32 CPU tensor of the right rank for a CPU layer.
        if (type(x) is torch.Tensor and x.dtype is torch.float32 and x.dim() == dims and x.device.type == "cpu"
                and not self._csr()[2].is_cuda):
            return
        if not isinstance(x, torch.Tensor) or x.dim() != dims:
            raise ValueError(f"input to {name} must be {dims}D, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        allowed = (torch.float32, torch.float16, torch.bfloat16) if x.is_cuda else (torch.float32,)
        if x.dtype not in allowed:
            raise ValueError(f"input to {name} must be {' or '.join(str(d) for d in allowed)} on {x.device.type}, "
                             f"got {x.dtype}")
        if x.device != self.values.device:
            raise ValueError(f"input to {name} is on {x.device}, the layer on {self.values.device}")


# A sparse conv's choices: "auto" picks its algorithm by shape (the only sparse choice on a GPU); the
# others are the CPU algorithms of fastprune::sparse_conv2d_cpu.
_CONV_CHOICES = ("dense", "auto", "padded", "direct", "batch_innermost", "tiled", "generated")


class SparseConv2d(_CSRWeight):
    """Convolution with a CSR weight (groups 1, dilation 1, zero padding): (N, C, H, W) -> (N, OC, H', W').

    ``choice``: "dense", "auto" (the algorithm by shape), or a CPU algorithm ("padded", "direct",
    "batch_innermost", "tiled", "generated"); ``algo`` is the same as the op's integer. ``epilogue`` (set by the graph
    pass fuse_epilogues): 1 ReLU, 2 ReLU then 2x2 max pooling, 3 relu(conv + residual); whatever a
    choice's kernel cannot fuse runs after it, so every choice computes the same function."""

    choices = _CONV_CHOICES

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride=(1, 1), padding=(0, 0)):
        super().__init__()
        if weight.dim() != 4:
            raise ValueError(f"weight must be (OC, IC, KH, KW), got {tuple(weight.shape)}")
        self._store(weight, bias)
        self.in_channels, self.kernel_size = weight.shape[1], tuple(weight.shape[2:])
        self.stride, self.padding = tuple(stride), tuple(padding)
        self.epilogue = 0

    @property
    def algo(self) -> int:
        """The op's algorithm number of ``choice`` (0 for "auto" and "dense")."""
        return ALGORITHMS.get(self.choice, 0)

    @algo.setter
    def algo(self, value: int) -> None:
        names = {0: "auto", **{v: k for k, v in ALGORITHMS.items()}}
        if value not in names:
            raise ValueError(f"algo must be 0 or one of {ALGORITHMS}, got {value!r}")
        self.choice = names[value]

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
        layer.stride, layer.padding, layer.epilogue = tuple(conv.stride), tuple(conv.padding), 0
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

    def applicable(self, x: torch.Tensor) -> bool:
        """Whether ``choice`` runs on input x (the direct algorithm needs a contiguous input and stride 1
        or 2, the tiled and generated ones equal strides); forward falls back to the algorithm by shape
        otherwise. (The generated one runs the tiled one itself where its code does not apply.)"""
        if self.choice == "direct":
            return direct_applicable(x, self.stride)
        return self.choice not in ("tiled", "generated") or self.stride[0] == self.stride[1]

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
        if self.choice == "dense":
            y = F.conv2d(x, self.dense_for(x), self._bias_for(x), self.stride, self.padding)
            return finish_epilogue(y, self.epilogue, EPILOGUES["none"], residual)
        algo = self.algo if self.applicable(x) else 0
        if algo != 0 and not x.is_cuda:  # inference on a chosen CPU kernel: no op dispatch
            y = sparse_conv2d_cpu_inference(x, *self._csr(), (*self.kernel_size, *self.stride, *self.padding), algo,
                                            self.epilogue, residual)
            if y is not None:
                return y
        # Under autograd (attacks, finetuning) the epilogues stay fused: ReLU and the residual are
        # differentiated through the output's sign, the pooling through its saved window positions.
        return sparse_conv2d(x, self.row_ptr, self.col_idx, self.values, self.bias, self.in_channels,
                             *self.kernel_size, *self.stride, *self.padding, self.epilogue, residual,
                             algo=algo if x.device.type == "cpu" else 0)

    def extra_repr(self) -> str:
        total = 1
        for s in self.weight_shape:
            total *= s
        return (f"{self.in_channels}, {self.weight_shape[0]}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, nnz={self.nnz} ({1 - self.nnz / total:.1%} sparse)")


class SparseLinear(_CSRWeight):
    """Linear layer with a CSR weight: (N, in) -> (N, out). ``choice``: "dense", "csr" (the sparse
    kernel) or "2:4" (PyTorch's semi-structured kernels, where :func:`semi_structured_usable`)."""

    choices = ("dense", "csr", "2:4")

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
        """x (..., in_features) -> (..., out_features), as nn.Linear: leading dimensions (a
        transformer's tokens) are flattened into rows for the kernels and restored after."""
        if isinstance(x, torch.Tensor) and x.dim() > 2:
            lead = x.shape[:-1]
            return self.forward(x.reshape(-1, x.shape[-1])).reshape(*lead, self.out_features)
        if isinstance(x, torch.Tensor) and x.dim() == 1:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        self._check_input(x, 2, "SparseLinear")
        if x.shape[1] != self.in_features:
            raise ValueError(f"input has {x.shape[1]} features, the layer expects {self.in_features}")
        if self.choice == "dense":
            return F.linear(x, self.dense_for(x), self._bias_for(x))
        if self.choice == "2:4":
            return F.linear(x, self._semi_structured_for(x), self._bias_for(x))
        return sparse_linear(x, self.row_ptr, self.col_idx, self.values, self.bias, self.in_features)

    def _semi_structured_for(self, x: torch.Tensor) -> torch.Tensor:
        """The weight in PyTorch's 2:4 format on x's device and dtype (cached outside the state_dict)."""
        from torch.sparse import to_sparse_semi_structured

        cached = getattr(self, "_semi_cache", None)
        if cached is None or cached.device != x.device or cached.dtype != x.dtype:
            cached = self._semi_cache = to_sparse_semi_structured(self.dense_weight().to(x.device, x.dtype))
        return cached

    def release_dense(self) -> None:
        super().release_dense()
        self._semi_cache = None

    def semi_structured_usable(self, x: torch.Tensor) -> bool:
        """Whether the "2:4" choice can run on input x: a capable GPU, half precision, a 2:4 weight
        of a shape PyTorch's kernels take."""
        return (semi_structured_supported(x.device, x.dtype) and semi_structured_shape_ok(self.weight_shape, x.dtype)
                and is_2to4(self.dense_weight()))

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
