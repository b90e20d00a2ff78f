"""Modules built on fastprune's ops: masked training layers, the HSIC bottleneck."""
from .hsic import FeatureTaps, HSICBottleneck
from .masked import (
    MaskedConv2d,
    MaskedLinear,
    check_sparsity,
    dense_twin,
    fold_masks,
    kept_count,
    prune_model,
    sparsity_report,
    topk_mask,
)
from .sparse import (
    ChannelsLastInput,
    MaxPool2x2,
    SparseConv2d,
    SparseLinear,
    fold_batchnorm,
    load_sparse,
    save_sparse,
    sparsify,
)

__all__ = [
    "ChannelsLastInput", "FeatureTaps", "HSICBottleneck", "check_sparsity", "dense_twin", "fold_batchnorm", "fold_masks", "MaxPool2x2", "MaskedConv2d", "MaskedLinear", "kept_count", "prune_model",
    "sparsity_report", "topk_mask", "SparseConv2d", "SparseLinear", "load_sparse", "save_sparse", "sparsify",
]
