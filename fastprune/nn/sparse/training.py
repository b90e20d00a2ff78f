"""Finetuning at sparse cost: masked layers with frozen masks become SparseConv2d / SparseLinear whose
CSR values (and biases) are trainable parameters, so forward, input gradient and weight gradient all
run on the sparse kernels (the weight gradient at the non-zeros only); and back to masked layers.

The two forms compute the same function with the same trainable numbers: the masked layer's kept
weights are the sparse layer's values, its pruned weights never reach the output. SGD (momentum,
weight decay) on the values equals SGD on the masked weights at the kept positions.
"""
from __future__ import annotations

import contextlib
import copy
import weakref

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


# The eval-mode views of sparse-training models (attack_view), one per model, gone with it.
_VIEWS: "weakref.WeakKeyDictionary[nn.Module, _AttackView]" = weakref.WeakKeyDictionary()


class _AttackView:
    """A model under sparse finetuning as its attacks see it: in eval mode, with each BatchNorm that
    follows a sparse conv folded into the conv and ReLU / relu(a + b) fused into the convs' epilogues
    (``sparsify``'s untuned network), on the training layers' own CSR patterns. ``refresh`` copies the
    training values in, scaled by the BatchNorms' current statistics: one pass over the non-zeros."""

    def __init__(self, model: nn.Module, key: tuple):
        self.key = key
        self.view = None
        self.links = []  # (view layer, training layer, BatchNorm or None, row of each non-zero)
        self.copies = []  # (view tensor, the model's tensor's name): other numbers, copied as they are
        try:
            self._build(model)
        except (torch.fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError, AttributeError,
                ValueError, KeyError):
            self.view, self.links, self.copies = None, [], []  # not traceable / foldable: the model itself

    def _build(self, model: nn.Module) -> None:
        from ..masked import fold_masks
        from .tuner import sparsify

        trained = {n: m for n, m in model.named_modules()
                   if isinstance(m, (SparseConv2d, SparseLinear)) and isinstance(m.values, nn.Parameter)}
        if not trained:
            return
        plain = fold_masks(to_masked(copy.deepcopy(model))).eval()  # Conv2d / Linear and BatchNorm
        graph = torch.fx.symbolic_trace(plain)
        modules = dict(graph.named_modules())
        follows = {}  # conv name -> the BatchNorm that alone reads its output
        for node in graph.graph.nodes:
            if node.op == "call_module" and isinstance(modules.get(node.target), nn.BatchNorm2d):
                src = node.args[0]
                if (isinstance(src, torch.fx.Node) and src.op == "call_module" and src.target in trained
                        and isinstance(trained[src.target], SparseConv2d) and len(src.users) == 1):
                    follows[src.target] = node.target
        for name, bn in ((b, model.get_submodule(b)) for b in follows.values()):
            if not bn.track_running_stats or bn.running_var is None:
                return  # normalised by the batch's own statistics even in eval mode: not foldable
        view = sparsify(plain)  # BatchNorms folded by torch.fx's fuse (the same pairs), epilogues fused
        # Any other numbers (an input normalisation's buffers, a layer left dense) are copied on each
        # refresh; one the view does not hold under the same name means no view.
        folded = set(follows.values())
        held = dict(view.net.named_parameters()) | dict(view.net.named_buffers())
        for n, m in model.named_modules():
            if n in trained or n in folded:
                continue
            for t, _ in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                full = f"{n}.{t}" if n else t
                if full not in held:
                    return
                self.copies.append((held[full], full))
        for name, layer in trained.items():
            twin = view.net.get_submodule(name)
            if not isinstance(twin, type(layer)):
                return
            twin.release_dense()
            twin.row_ptr, twin.col_idx = layer.row_ptr, layer.col_idx  # the training pattern, shared
            twin.values = layer.values.detach().clone()
            bn = model.get_submodule(follows[name]) if name in follows else None
            if twin.bias is None and (bn is not None or layer.bias is not None):
                return
            counts = (layer.row_ptr[1:] - layer.row_ptr[:-1]).long()
            rows = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
            self.links.append((twin, layer, bn, rows))
        self.view = view.eval()

    @torch.no_grad()
    def refresh(self, model: nn.Module) -> None:
        state = dict(model.named_parameters()) | dict(model.named_buffers())
        for mine, name in self.copies:
            mine.copy_(state[name])
        for twin, layer, bn, rows in self.links:
            values = layer.values.detach()
            bias = None if layer.bias is None else layer.bias.detach()
            if bn is not None:
                scale = torch.rsqrt(bn.running_var + bn.eps)
                if bn.weight is not None:
                    scale = scale * bn.weight.detach()
                shift = -bn.running_mean * scale + (0.0 if bn.bias is None else bn.bias.detach())
                values = values * scale[rows]
                bias = shift if bias is None else bias * scale + shift
            twin.values.copy_(values)
            if twin.bias is not None:
                twin.bias.copy_(bias)
            twin.release_dense()  # a layer the view runs dense rebuilds its dense weight from the new values


def attack_view(model: nn.Module) -> nn.Module:
    """What an attack inside a training step (TRADES', MART's inner maximisation: eval mode, input
    gradients only) should run: for a model under sparse finetuning (``to_sparse_training``), a view
    with its BatchNorms folded into the sparse convs and the ReLUs and residual sums fused into their
    epilogues, refreshed from the model's current values and statistics; the model itself otherwise
    (in train mode, nothing to fold, not traceable, or holding numbers the view would not follow)."""
    if model.training or not any(isinstance(m, (SparseConv2d, SparseLinear)) and isinstance(m.values, nn.Parameter)
                                 for m in model.modules()):
        return model
    key = tuple(id(m) for m in model.modules())  # a layer replaced (to_masked, ...) builds a new view
    entry = _VIEWS.get(model)
    if entry is None or entry.key != key:
        entry = _VIEWS[model] = _AttackView(model, key)
    if entry.view is None:
        return model
    entry.refresh(model)
    return entry.view
