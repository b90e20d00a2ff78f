"""Modules built on fastprune's ops: masked training layers, sparse inference layers, the HSIC bottleneck."""
from .hsic import FeatureTaps, HSICBottleneck
from .masked import (
    apply_masks,
    MaskedConv1d,
    MaskedConv2d,
    MaskedConvTranspose2d,
    MaskedLinear,
    check_sparsity,
    dense_twin,
    fold_masks,
    kept_count,
    nm_mask,
    prune_model,
    sparsity_report,
    topk_mask,
)
from .sparse import (
    AdaptiveMaxPool2x2,
    BatchInnermostInput,
    ChannelsLastInput,
    MaxPool2x2,
    MicroBatched,
    SemiStructuredLinear,
    SparseConv2d,
    SparseLinear,
    SparseModel,
    fold_batchnorm,
    is_2to4,
    load_sparse,
    save_sparse,
    semi_structured_supported,
    sparsify,
)

__all__ = [
    "AdaptiveMaxPool2x2", "BatchInnermostInput", "ChannelsLastInput", "FeatureTaps", "HSICBottleneck",
    "MaskedConv1d", "MaskedConv2d", "MaskedConvTranspose2d", "MaskedLinear", "MaxPool2x2", "MicroBatched", "SemiStructuredLinear", "SparseConv2d", "SparseLinear", "SparseModel",
    "apply_masks", "check_sparsity", "dense_twin",
    "fold_batchnorm", "fold_masks", "is_2to4", "kept_count", "load_sparse", "nm_mask", "prune_model", "save_sparse",
    "semi_structured_supported", "sparsify", "sparsity_report", "topk_mask",
]
