"""Inference (and finetuning) with truly sparse layers, in seven rooms:

- layers.py  SparseConv2d / SparseLinear (CSR weights only) and SemiStructuredLinear (2:4);
- passes.py  graph passes: BatchNorm folding, faster pooling, epilogue fusion (ReLU, pooling, residual);
- model.py   SparseModel: the sparse network and its plan (per device and batch-size bucket: memory
             layout, micro-batching, each layer dense or on which sparse kernel);
- tuner.py   ``sparsify``: builds the SparseModel of a pruned model and times each bucket's choices
             on the actual device;
- layout.py  wrappers that run any model in a memory layout or in micro-batches;
- files.py   ``save_sparse`` / ``load_sparse``: plain data (recipe, plan, tensors), no code;
- training.py  masked layers <-> sparse layers with trainable CSR values (finetuning at sparse cost).
"""
from .files import load_sparse, save_sparse
from .layers import (SemiStructuredLinear, SparseConv2d, SparseLinear, is_2to4, semi_structured_shape_ok,
                     semi_structured_supported)
from .layout import BatchInnermostInput, ChannelsLastInput, MicroBatched
from .model import BUCKETS, DEFAULT_BATCH_SIZES, SparseModel, bucket_of
from .passes import (AdaptiveMaxPool2x2, FastAdaptiveAvgPool2d, MaxPool2x2, add_relu, fold_batchnorm,
                     fuse_epilogues)
from .tuner import sparsify

__all__ = ["AdaptiveMaxPool2x2", "BUCKETS", "BatchInnermostInput", "DEFAULT_BATCH_SIZES", "SparseModel", "bucket_of", "ChannelsLastInput", "FastAdaptiveAvgPool2d", "MaxPool2x2",
           "MicroBatched", "SemiStructuredLinear", "SparseConv2d", "SparseLinear", "add_relu", "fold_batchnorm",
           "fuse_epilogues", "is_2to4", "load_sparse", "save_sparse", "semi_structured_shape_ok",
           "semi_structured_supported", "sparsify"]
