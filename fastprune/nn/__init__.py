"""Modules built on fastprune's ops: masked training layers, the HSIC bottleneck."""
from .hsic import FeatureTaps, HSICBottleneck
from .masked import (
    MaskedConv2d,
    MaskedLinear,
    kept_count,
    prune_model,
    sparsity_report,
    topk_mask,
)

__all__ = [
    "FeatureTaps", "HSICBottleneck", "MaskedConv2d", "MaskedLinear", "kept_count", "prune_model",
    "sparsity_report", "topk_mask",
]
