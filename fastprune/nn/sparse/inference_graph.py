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
"""
from __future__ import annotations

import torch
import torch.fx
from torch import nn

from ...ops.sparse import _GENERATED_PADDED_PLANES, ALGORITHMS, EPILOGUES, direct_cpu_conv
from .layers import SparseConv2d

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


def build_inference_graph(net: nn.Module, choices: dict[str, str]) -> tuple[nn.Module, list[SparseConv2d]] | None:
    """(graph module, the layers whose kernel it calls directly) for ``net`` under the layer
    ``choices`` of a config, or None where nothing would change (``net`` is no GraphModule, or no
    conv qualifies).

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
    direct: list[SparseConv2d] = []
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
    if not direct:
        return None
    graph.lint()
    return torch.fx.GraphModule(net, graph, class_name="InferenceGraph"), direct
