"""Finetuning at sparse cost: masked layers with frozen masks become SparseConv2d / SparseLinear whose
CSR values (and biases) are trainable parameters, so forward, input gradient and weight gradient all
run on the sparse kernels (the weight gradient at the non-zeros only); and back to masked layers.

The two forms compute the same function with the same trainable numbers: the masked layer's kept
weights are the sparse layer's values, its pruned weights never reach the output. SGD (momentum,
weight decay) on the values equals SGD on the masked weights at the kept positions.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ...reference.sparse import csr_to_dense
from ..masked import MaskedConv2d, MaskedLinear, _replace
from .layers import SparseConv2d, SparseLinear


def _csr_of_mask(weight: torch.Tensor, mask: torch.Tensor):
    """CSR over the rows of ``weight`` at the mask's non-zeros (a kept weight that is exactly 0 stays
    in the pattern, so the pattern is the mask's, not the weights')."""
    flat_mask = (mask != 0).reshape(mask.shape[0], -1)
    counts = flat_mask.sum(dim=1)
    row_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
    col_idx = flat_mask.nonzero()[:, 1].to(torch.int32)
    values = weight.detach().reshape(weight.shape[0], -1)[flat_mask].float().contiguous()
    return row_ptr, col_idx, values


def _trainable(layer: nn.Module) -> nn.Module:
    """Make a sparse layer's values and bias trainable parameters."""
    values = nn.Parameter(layer.values.detach().clone())
    bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
    del layer.values, layer.bias
    layer.values, layer.bias = values, bias
    layer.release_dense()
    return layer


def to_sparse_training(model: nn.Module) -> nn.Module:
    """Replace every masked layer of ``model`` (in place; its mask frozen first) by a sparse layer
    with trainable values: a finetune step then costs the non-zeros' work. Returns the model.
    Layers the sparse kernels do not take (grouped or dilated convs; 1-D and transposed convs) stay
    masked."""
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, (MaskedConv2d, MaskedLinear))]:
        if isinstance(module, MaskedConv2d) and not SparseConv2d.supports(module):
            continue
        module.freeze_mask()
        arrays = _csr_of_mask(module.weight, module.mask)
        bias = module.bias
        if isinstance(module, MaskedConv2d):
            layer = SparseConv2d.from_csr(*arrays, bias, module)
        else:
            layer = SparseLinear.from_csr(*arrays, bias, module)
        _replace(model, name, _trainable(layer.to(module.weight.device)))
    return model


def to_masked(model: nn.Module) -> nn.Module:
    """The inverse of :func:`to_sparse_training` (in place): each sparse layer with trainable values
    becomes a masked layer with a fixed mask (its pattern) and the values as its weights. Returns it."""
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, (SparseConv2d, SparseLinear))
                         and isinstance(m.values, nn.Parameter)]:
        weight = module.dense_weight().detach()
        mask = csr_to_dense(module.row_ptr, module.col_idx, torch.ones_like(module.values.detach()),
                            module.weight_shape)
        if isinstance(module, SparseConv2d):
            dense = nn.Conv2d(module.in_channels, module.weight_shape[0], module.kernel_size, module.stride,
                              module.padding, bias=module.bias is not None, device=weight.device)
            masked_type = MaskedConv2d
        else:
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device=weight.device)
            masked_type = MaskedLinear
        with torch.no_grad():
            dense.weight.copy_(weight)
            if module.bias is not None:
                dense.bias.copy_(module.bias)
        _replace(model, name, masked_type.from_dense(dense, source="fixed", mask=mask))
    return model


@contextlib.contextmanager
def sparse_training(model: nn.Module, enabled: bool = True):
    """``with sparse_training(model):`` the masked layers train as sparse ones inside the block and
    are masked layers again after it (also when it raises). ``enabled=False``: does nothing."""
    if not enabled:
        yield model
        return
    to_sparse_training(model)
    try:
        yield model
    finally:
        to_masked(model)
