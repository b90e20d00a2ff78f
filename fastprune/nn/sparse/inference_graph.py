"""The inference graph: a copy of a SparseModel network's torch.fx graph for CPU inference under one
config, in which the sparse convs that are fed only by other sparse convs call their C++ kernel
directly instead of through their module.

At batch 1 a layer's kernel takes tens of microseconds and the path to it through Python as many
again: the module call (nn.Module.__call__ and the attribute lookups of ``getattr(self.layer1,
"0").conv1``), the layer's input checks, the choice of algorithm and the epilogue's bookkeeping,
about 8 us a conv on a Zen 4 core (ResNet-18's 512 -> 512 4 x 4 layer at 99%: 25.8 us called as the
network calls it, 17.6 the kernel alone). Within one config all of that is fixed except the tensors,
so each such conv becomes a function that reads its layer's current CSR tensors and calls the
kernel. Which convs qualify is decided once per config (see :func:`build_inference_graph`); the
others, and every other node, stay as they are. The graph computes exactly what the network does:
the same kernels with the same arguments.

One more change, the classifier head: global average pooling, flatten and a SparseLinear after a
sparse conv (ResNet's avgpool + fc) become one C++ call (``fastprune._C.pooled_linear_cpu``). In the
network the three PyTorch ops' own code comes from memory at each call, after megabytes of generated
conv code have passed through the caches (ResNet-18's head on 16 images, Zen 4: 0.38 ms in the
network against 0.07 alone). The same maths, summed in another order: equal to the module path to
rounding, not bit for bit.
"""
from __future__ import annotations

import torch
import torch.fx
from torch import nn

from ... import backends
from ...ops.sparse import _GENERATED_PADDED_PLANES, ALGORITHMS, EPILOGUES, direct_cpu_conv
from .layers import SparseConv2d, SparseLinear
from .passes import FastAdaptiveAvgPool2d, _planes_batch_innermost

# The choices whose kernels return a batch-innermost output by construction and fuse every epilogue
# but pooling (sparse_conv2d_cpu_inference returns their output as is): a direct call gives the same
# tensor. The generated one pads its output planes there, as on the layer's own path.
_DIRECT_ALGOS = {"batch_innermost": ALGORITHMS["batch_innermost"], "tiled": ALGORITHMS["tiled"],
                 "generated": _GENERATED_PADDED_PLANES}
_DIRECT_EPILOGUES = (EPILOGUES["none"], EPILOGUES["relu"], EPILOGUES["add_relu"])


def _kernel_call(layer: SparseConv2d, algo: int):
    """fn(x, residual=None): the layer's C++ kernel on x, its CSR tensors read at each call (weights
    loaded or edited in place later are used); called without the dispatcher (the graph runs only
    without autograd), but through the op while torch.compile traces."""
    ext = torch.ops.fastprune.sparse_conv2d_ext
    direct = direct_cpu_conv()
    geometry = (*layer.kernel_size, *layer.stride, *layer.padding)
    epilogue = layer.epilogue

    def sparse_conv_kernel(x, residual=None):
        row_ptr, col_idx, values, bias = layer._csr()
        kernel = ext if torch.compiler.is_compiling() else direct
        return kernel(x, row_ptr, col_idx, values, bias, *geometry, algo, epilogue, residual)

    return sparse_conv_kernel


# A head whose linear layer the tuner left dense is fused too up to this many non-zeros: past it, a
# large classifier (2048 -> 1000) might run faster on the dense kernel it was timed on.
_FUSED_DENSE_HEAD_NONZEROS = 65536


def _is_flatten_1(node: torch.fx.Node, modules: dict) -> bool:
    """Whether ``node`` flattens its one input from dimension 1 on (nn.Flatten(), torch.flatten(x, 1),
    x.flatten(1))."""
    if node.op == "call_module":
        m = modules.get(node.target)
        return type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1 and len(node.args) == 1
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim")
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    return ((node.op == "call_function" and node.target is torch.flatten)
            or (node.op == "call_method" and node.target == "flatten")) and start == 1 and end == -1


def _pooled_linear_call(pool: nn.Module, linear: SparseLinear):
    """fn(x): linear(flatten(pool(x), 1)), in one C++ call where x is what the sparse convs return
    (float32, batch-innermost channel planes), else through the modules."""
    fused = None
    if backends._load_extension():
        import fastprune._C as native

        fused = getattr(native, "pooled_linear_cpu", None)  # None where the extension predates it

    def pooled_linear(x):
        _, c, h, w = x.shape
        if (fused is None or torch.compiler.is_compiling() or c != linear.in_features or h * w == 0
                or not _planes_batch_innermost(x)):
            return linear(torch.flatten(pool(x), 1))
        row_ptr, col_idx, values, bias = linear._csr()
        return fused(x, row_ptr, col_idx, values, bias)

    return pooled_linear


def _fuse_head(graph: torch.fx.Graph, modules: dict, conv_nodes: set) -> list[nn.Module]:
    """Each global average pooling -> flatten -> SparseLinear chain on a sparse conv's output, each node
    used only by the next, replaced in ``graph`` by one call (_pooled_linear_call); the modules it
    calls without their module call."""
    fused: list[nn.Module] = []
    for pool_node in list(graph.nodes):
        pool = modules.get(pool_node.target) if pool_node.op == "call_module" else None
        if (not isinstance(pool, FastAdaptiveAvgPool2d) or tuple(pool.output_size) != (1, 1)
                or len(pool_node.args) != 1 or pool_node.kwargs or pool_node.args[0] not in conv_nodes
                or len(pool_node.users) != 1):
            continue
        flatten_node = next(iter(pool_node.users))
        if not _is_flatten_1(flatten_node, modules) or len(flatten_node.users) != 1:
            continue
        linear_node = next(iter(flatten_node.users))
        linear = modules.get(linear_node.target) if linear_node.op == "call_module" else None
        if (not isinstance(linear, SparseLinear) or linear_node.args != (flatten_node,) or linear_node.kwargs
                or (linear.choice != "csr" and linear.nnz > _FUSED_DENSE_HEAD_NONZEROS)):
            continue
        with graph.inserting_after(linear_node):
            call = graph.call_function(_pooled_linear_call(pool, linear), pool_node.args)
        linear_node.replace_all_uses_with(call)
        for node in (linear_node, flatten_node, pool_node):
            graph.erase_node(node)
        fused += [pool, linear]
    return fused


def build_inference_graph(net: nn.Module, choices: dict[str, str]) -> tuple[nn.Module, list[nn.Module]] | None:
    """(graph module, the modules it calls without their module call) for ``net`` under the layer
    ``choices`` of a config, or None where nothing would change (``net`` is no GraphModule, or no
    conv qualifies and no head is fused).

    A SparseConv2d call qualifies when its choice is one of _DIRECT_ALGOS, its epilogue one of
    _DIRECT_EPILOGUES, its stride fits the algorithm, and each of its tensor inputs (x, and the
    residual) is another SparseConv2d's output: those are float32 CPU tensors of the right channel
    count by construction, so the layer's input checks have nothing left to catch. (The network's
    own input reaches the first conv through the layer as before, with its checks and messages.)"""
    if not isinstance(net, torch.fx.GraphModule):
        return None
    modules = dict(net.named_modules())
    graph = torch.fx.Graph()
    mapping: dict[torch.fx.Node, torch.fx.Node] = {}
    graph.output(graph.graph_copy(net.graph, mapping))
    conv_nodes = {mapping[n] for n in net.graph.nodes
                  if n.op == "call_module" and isinstance(modules.get(n.target), SparseConv2d)}
    direct: list[nn.Module] = []
    for node in list(graph.nodes):
        if node not in conv_nodes or node.kwargs:
            continue
        layer = modules[node.target]
        algo = _DIRECT_ALGOS.get(choices.get(node.target))
        if (algo is None or layer.epilogue not in _DIRECT_EPILOGUES or layer.stride[0] != layer.stride[1]
                or len(node.args) != (2 if layer.epilogue == EPILOGUES["add_relu"] else 1)
                or not all(isinstance(a, torch.fx.Node) and a in conv_nodes for a in node.args)):
            continue
        with graph.inserting_after(node):
            call = graph.call_function(_kernel_call(layer, algo), node.args)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        conv_nodes.add(call)
        direct.append(layer)
    direct += _fuse_head(graph, modules, conv_nodes)
    if not direct:
        return None
    graph.lint()
    return torch.fx.GraphModule(net, graph, class_name="InferenceGraph"), direct
