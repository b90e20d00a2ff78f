"""nn.MultiheadAttention with its projections as layers of their own, so that they can be pruned.

nn.MultiheadAttention keeps its input projection as a bare parameter (``in_proj_weight``, (3E, E))
and reads ``out_proj.weight`` directly, so neither is a layer a mask can be put on.
:class:`PrunableMultiheadAttention` computes the same function with ``in_proj`` and ``out_proj``
as nn.Linear children (masked like any other linear layer by prune_model), through the same
``F.multi_head_attention_forward``. ``to_prunable_attention`` swaps the modules in a model;
``dense_attention`` turns one back into nn.MultiheadAttention (fold_masks does, zeros kept).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _weight(layer: nn.Module) -> torch.Tensor:
    """A projection's weight as it computes with it: masked where the layer is masked."""
    masked = getattr(layer, "masked_weight", None)
    return masked() if callable(masked) else layer.weight


class PrunableMultiheadAttention(nn.Module):
    """nn.MultiheadAttention (one E x E projection per q, k, v, stacked) with ``in_proj``
    (Linear E -> 3E) and ``out_proj`` (Linear E -> E) as children. Same call and results:
    (query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
    -> (output (L, N, E) or (N, L, E) with batch_first, attention weights or None)."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        if not attention._qkv_same_embed_dim:
            raise ValueError("PrunableMultiheadAttention takes attentions whose key and value have the query's "
                             "embedding size (kdim = vdim = embed_dim)")
        e = attention.embed_dim
        w = attention.in_proj_weight
        self.embed_dim, self.num_heads, self.batch_first = e, attention.num_heads, attention.batch_first
        self.dropout, self.add_zero_attn = attention.dropout, attention.add_zero_attn
        self.in_proj = nn.Linear(e, 3 * e, bias=attention.in_proj_bias is not None, device=w.device, dtype=w.dtype)
        self.out_proj = nn.Linear(e, e, bias=attention.out_proj.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.in_proj.weight.copy_(attention.in_proj_weight)
            if attention.in_proj_bias is not None:
                self.in_proj.bias.copy_(attention.in_proj_bias)
            self.out_proj.weight.copy_(attention.out_proj.weight)
            if attention.out_proj.bias is not None:
                self.out_proj.bias.copy_(attention.out_proj.bias)
        self.bias_k, self.bias_v = attention.bias_k, attention.bias_v
        self.train(attention.training)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        if self.batch_first:
            query, key, value = (t.transpose(0, 1) if t.dim() == 3 else t for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, _weight(self.in_proj), self.in_proj.bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, _weight(self.out_proj), self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self.batch_first and out.dim() == 3:
            out = out.transpose(0, 1)
        return out, weights


def swappable_attention(model: nn.Module, skip=()) -> list[str]:
    """The names of the nn.MultiheadAttention modules :func:`to_prunable_attention` would swap: not
    those named in ``skip``, nor ones whose key/value size differs from the query's."""
    return [name for name, module in model.named_modules()
            if type(module) is nn.MultiheadAttention and name not in skip and module._qkv_same_embed_dim]


def to_prunable_attention(model: nn.Module, skip=()) -> list[str]:
    """Swap those attentions (in place) for :class:`PrunableMultiheadAttention`; returns their names."""
    from .masked import _replace

    names = swappable_attention(model, skip)
    for name in names:
        _replace(model, name, PrunableMultiheadAttention(model.get_submodule(name)))
    return names


def dense_attention(module: PrunableMultiheadAttention, in_weight: torch.Tensor,
                    out_weight: torch.Tensor) -> nn.MultiheadAttention:
    """An nn.MultiheadAttention computing what ``module`` computes with the given (masked) weights."""
    w = in_weight
    dense = nn.MultiheadAttention(module.embed_dim, module.num_heads, dropout=module.dropout,
                                  bias=module.in_proj.bias is not None, add_bias_kv=module.bias_k is not None,
                                  add_zero_attn=module.add_zero_attn, batch_first=module.batch_first,
                                  device=w.device, dtype=w.dtype)
    with torch.no_grad():
        dense.in_proj_weight.copy_(in_weight)
        dense.out_proj.weight.copy_(out_weight)
        if module.in_proj.bias is not None:
            dense.in_proj_bias.copy_(module.in_proj.bias)
            dense.out_proj.bias.copy_(module.out_proj.bias)
        if module.bias_k is not None:
            dense.bias_k.copy_(module.bias_k)
            dense.bias_v.copy_(module.bias_v)
    dense.train(module.training)
    return dense
