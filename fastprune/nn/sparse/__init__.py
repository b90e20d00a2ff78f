"""Inference with truly sparse layers, in four rooms:

- layers.py  SparseConv2d / SparseLinear (CSR weights only) and SemiStructuredLinear (2:4);
- passes.py  graph passes: BatchNorm folding, faster pooling, epilogue fusion (ReLU, pooling, residual);
- layout.py  wrappers for the chosen memory layout and micro-batching;
- tuner.py   ``sparsify``: converts a pruned model, keeping per layer and per whole model whichever
             of dense and sparse runs faster on the actual device;
- files.py   ``save_sparse`` / ``load_sparse``: plain data (recipe, plan, tensors), no code.
"""
from .files import load_sparse, save_sparse
from .layers import (SemiStructuredLinear, SparseConv2d, SparseLinear, is_2to4, semi_structured_shape_ok,
                     semi_structured_supported)
from .layout import BatchInnermostInput, ChannelsLastInput, MicroBatched
from .passes import (AdaptiveMaxPool2x2, FastAdaptiveAvgPool2d, MaxPool2x2, add_relu, fold_batchnorm,
                     fuse_epilogues)
from .tuner import sparsify

__all__ = ["AdaptiveMaxPool2x2", "BatchInnermostInput", "ChannelsLastInput", "FastAdaptiveAvgPool2d", "MaxPool2x2",
           "MicroBatched", "SemiStructuredLinear", "SparseConv2d", "SparseLinear", "add_relu", "fold_batchnorm",
           "fuse_epilogues", "is_2to4", "load_sparse", "save_sparse", "semi_structured_shape_ok",
           "semi_structured_supported", "sparsify"]
