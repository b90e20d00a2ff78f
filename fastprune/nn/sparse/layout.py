"""Wrappers that run a model in the memory layout or the batch slicing that sparsify chose."""
from __future__ import annotations

import torch
from torch import nn

from ...ops.sparse import to_batch_innermost


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
