"""Graph passes sparsify applies to a model: BatchNorm folding, faster pooling modules, and fusing
ReLU, 2x2 max pooling and ResNet's relu(a + b) into the sparse convolutions' epilogues."""
from __future__ import annotations

import torch
from torch import nn

from ...ops.sparse import EPILOGUES, max_pool_2x2
from ..masked import _replace
from .layers import SparseConv2d


class MaxPool2x2(nn.Module):
    """nn.MaxPool2d(2) computed by :func:`max_pool_2x2`: the same values, faster."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool_2x2(x) if x.dim() == 4 else torch.nn.functional.max_pool2d(x, 2)

    @staticmethod
    def replaces(module: nn.Module) -> bool:
        def pair(v):
            return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

        return (type(module) is nn.MaxPool2d and pair(module.kernel_size) == (2, 2)
                and pair(module.stride or module.kernel_size) == (2, 2) and pair(module.padding) == (0, 0)
                and pair(module.dilation) == (1, 1) and not module.ceil_mode and not module.return_indices)


class _AdaptivePool(nn.Module):
    """What the fast adaptive poolings share: an (h, w) output size taken from the PyTorch module
    they replace (``pytorch_type``), which must give both sizes as integers."""

    pytorch_type: type

    def __init__(self, output_size: tuple[int, int]):
        super().__init__()
        self.output_size = output_size

    @classmethod
    def _size_of(cls, module: nn.Module) -> tuple[int, int] | None:
        if type(module) is not cls.pytorch_type or getattr(module, "return_indices", False):
            return None
        size = module.output_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return size if all(isinstance(v, int) for v in size) else None

    @classmethod
    def replaces(cls, module: nn.Module) -> bool:
        return cls._size_of(module) is not None

    @classmethod
    def from_module(cls, module: nn.Module) -> "_AdaptivePool":
        return cls(cls._size_of(module))

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


class AdaptiveMaxPool2x2(_AdaptivePool):
    """nn.AdaptiveMaxPool2d(output_size): where the input is exactly twice the output size its windows
    are the 2x2 stride-2 ones, computed by :func:`max_pool_2x2` (PyTorch's adaptive kernel is an
    order of magnitude slower on NCHW CPU tensors); any other size falls back to PyTorch."""

    pytorch_type = nn.AdaptiveMaxPool2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and (x.shape[2], x.shape[3]) == (2 * self.output_size[0], 2 * self.output_size[1]):
            return max_pool_2x2(x)
        return torch.nn.functional.adaptive_max_pool2d(x, self.output_size)


class FastAdaptiveAvgPool2d(_AdaptivePool):
    """nn.AdaptiveAvgPool2d(output_size) with the cases PyTorch's NCHW CPU kernel is slow at done
    directly: a 1 x 1 input is broadcast (VGG16's 1 x 1 features pooled "up" to 2 x 2), a global
    average of a batch-innermost input is a sum over (C, H W, N), an input that is a whole multiple of
    the output is plain average pooling; anything else goes to PyTorch."""

    pytorch_type = nn.AdaptiveAvgPool2d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        oh, ow = self.output_size
        if x.dim() == 4:
            h, w = x.shape[2], x.shape[3]
            if (h, w) == (1, 1):
                if x.stride(0) != 1:
                    return x.expand(-1, -1, oh, ow).contiguous()
                # A batch-innermost input (the sparse convs' output) stays batch innermost: the copy
                # runs along the batch, and a flatten after it is a view whose transpose is
                # contiguous, which the CPU sparse linear reads as is (VGG16's classifier at batch
                # 64, Zen 4: this pooling 0.11 ms and the linear's transposed copy 0.07 ms before).
                n, c = x.shape[:2]
                out = torch.empty_strided((n, c, oh, ow), (1, oh * ow * n, ow * n, n), dtype=x.dtype, device=x.device)
                return out.copy_(x.expand(-1, -1, oh, ow))
            # Global average pooling; of one image, avg_pool2d below (ResNet-18's 512 x 4 x 4, Zen 4:
            # 5.6 us against 14.9 for the sum's four ops).
            if (oh, ow) == (1, 1) and x.shape[0] > 1 and _planes_batch_innermost(x):
                return x.permute(1, 2, 3, 0).flatten(1, 2).mean(1).t()[:, :, None, None]
            if h % oh == 0 and w % ow == 0:
                return torch.nn.functional.avg_pool2d(x, (h // oh, w // ow))
        return torch.nn.functional.adaptive_avg_pool2d(x, self.output_size)


def _planes_batch_innermost(x: torch.Tensor) -> bool:
    """Whether each channel's (H, W, N) plane of x (N, C, H, W) is contiguous, the planes any distance
    apart (the sparse convs' batch-innermost output). Global average pooling then sums x as (C, H W, N),
    whole vectors of images at a time, where PyTorch's avg_pool2d walks such strides element by element
    (ResNet-18's 512 x 4 x 4 maps of 16 images: 189 us against 32 on one Zen 4 core; other layouts
    stay on avg_pool2d, faster there: 2 us against mean's 5 at batch 1, channels_last)."""
    n, _, h, w = x.shape  # (a dimension of size 1 may have any stride)
    return (n == 1 or x.stride(0) == 1) and (w == 1 or x.stride(3) == n) and (h == 1 or x.stride(2) == w * n)


def fold_batchnorm(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Fold every BatchNorm that follows a conv into the conv (eval mode; per-output-channel scaling
    keeps zero weights zero, so sparsity survives). Uses torch.fx; a model that cannot be traced is
    returned unchanged. ``inplace``: fold into ``model``'s own modules instead of a copy."""
    import torch.fx
    import torch.fx.experimental.optimization as fx_opt

    try:
        fused = fx_opt.fuse(model.eval(), inplace=inplace)
    except (torch.fx.proxy.TraceError, TypeError, NotImplementedError, RuntimeError, AttributeError):
        # symbolic tracing cannot follow the model (data-dependent control flow, untraceable calls):
        # the model stays as it is, BatchNorms unfolded
        return model
    return fused


def _fast_pooling(model: nn.Module) -> nn.Module:
    for name, module in list(model.named_modules()):
        if MaxPool2x2.replaces(module):
            _replace(model, name, MaxPool2x2())
        elif AdaptiveMaxPool2x2.replaces(module):
            _replace(model, name, AdaptiveMaxPool2x2.from_module(module))
        elif FastAdaptiveAvgPool2d.replaces(module):
            _replace(model, name, FastAdaptiveAvgPool2d.from_module(module))
    return model


def _is_relu(node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in (torch.relu, torch.relu_, torch.nn.functional.relu)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_pool(node, modules) -> bool:
    module = modules.get(node.target) if node.op == "call_module" else None
    return isinstance(module, MaxPool2x2) or (module is not None and MaxPool2x2.replaces(module))


def fuse_epilogues(model: nn.Module) -> nn.Module:
    """In a torch.fx GraphModule, fold ReLU (and a following 2x2 max pool) that consume a
    SparseConv2d's output alone, and ResNet's relu(a + b), into the conv's epilogue, saving whole
    passes over the activations. The fusion depends on the graph only, never on the algorithm a
    layer runs: each kernel fuses what it can and the layer applies the rest (see SparseConv2d), so
    one graph serves every batch-size bucket. Other models are returned unchanged."""
    import torch.fx

    if not isinstance(model, torch.fx.GraphModule):
        return model
    modules = dict(model.named_modules())
    for node in list(model.graph.nodes):
        conv = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(conv, SparseConv2d) or len(node.users) != 1 or conv.epilogue:
            continue
        relu = next(iter(node.users))
        if not _is_relu(relu, modules) or relu.args[0] is not node:
            continue
        conv.epilogue = EPILOGUES["relu"]
        relu.replace_all_uses_with(node)
        model.graph.erase_node(relu)
        pool = next(iter(node.users)) if len(node.users) == 1 else None
        if pool is not None and _is_pool(pool, modules):
            conv.epilogue = EPILOGUES["relu_pool"]
            pool.replace_all_uses_with(node)
            model.graph.erase_node(pool)
    _fuse_add_relu(model)
    model.recompile()
    return model


def add_relu(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """relu(a + b): one pass over the activations (aten._add_relu) at inference, the differentiable
    two-op form when autograd records (aten._add_relu has no derivative; attacks need one)."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return torch.relu(a + b)
    if a.device.type != "cpu":  # aten._add_relu has CPU kernels only
        return torch.add(a, b).relu_()
    return torch.ops.aten._add_relu(a, b)


def _fuse_add_relu(model) -> None:
    """relu(a + b) (the residual connection at the end of every ResNet block) -> one pass over the
    activations instead of two: into the epilogue of the sparse conv that computes a (or b) where a
    feeds nothing else, else :func:`add_relu`."""
    import operator

    modules = dict(model.named_modules())

    def fusable_conv(arg):
        conv = modules.get(arg.target) if arg.op == "call_module" else None
        ok = (isinstance(conv, SparseConv2d)
              and conv.epilogue == 0 and len(arg.users) == 1 and len(arg.args) == 1 and not arg.kwargs)
        return conv if ok else None

    for node in list(model.graph.nodes):
        is_add = node.op == "call_function" and node.target in (operator.add, operator.iadd, torch.add)
        if not is_add or node.kwargs or len(node.args) != 2 or len(node.users) != 1:
            continue
        if not all(isinstance(a, torch.fx.Node) for a in node.args):
            continue
        relu = next(iter(node.users))
        if not _is_relu(relu, modules) or relu.args[0] is not node:
            continue
        conv_node = next((a for a in node.args if fusable_conv(a) is not None), None)
        with model.graph.inserting_after(relu):
            if conv_node is None:
                fused = model.graph.call_function(add_relu, tuple(node.args))
            else:  # conv(x, residual): placed where the relu was, after both its inputs exist
                other = node.args[1] if node.args[0] is conv_node else node.args[0]
                fusable_conv(conv_node).epilogue = EPILOGUES["add_relu"]
                fused = model.graph.call_module(conv_node.target, (conv_node.args[0], other))
        relu.replace_all_uses_with(fused)
        model.graph.erase_node(relu)
        model.graph.erase_node(node)
        if conv_node is not None:
            model.graph.erase_node(conv_node)
