"""Concurrent CPU micro-batches, and the join: the network's first layers on micro-batches, one
thread each, the last ones on the whole batch with every layer split over the threads.

Why both: the first layers' activations are large, and a micro-batch that one thread takes through
them stays in that core's cache (bench/NOTES.md, sessions 13-15). The last layers' activations are
small but their weights large, and the generated kernel's code for them (about 11 bytes a non-zero:
2.6 MB for a 512 -> 512 3x3 layer at 90%) streams from L3 or memory for every micro-batch that runs
it; on the whole batch each thread reads only its output channels' code, once. VGG16 at 90%, batch 64,
Zen 4 (session 17): a 512 -> 512 2x2 layer took 0.43 ms on 64 images split over two threads against
0.64 ms for four micro-batches of 16 run two a thread; the network 26.3 ms joined before its 4x4
layers against 28.0 in micro-batches throughout.

The micro-batches run on one OpenMP team (fastprune._C.run_team): the same threads that then split
the joined layers, so no thread is left spinning (libgomp's wait) on a core another one needs.
"""
from __future__ import annotations

import contextvars
import functools

import torch
import torch.fx

from .layers import SparseConv2d


def run_team(calls: list) -> list:
    """[call() for call in calls], call i on thread i of one OpenMP team (thread 0: this one), each
    in a copy of this thread's context (context variables: the CPU backend chosen for the call), the
    torch ops inside running serially on their thread. The first exception raised is raised here,
    after all have finished."""
    from ... import _C

    for i, call in enumerate(calls):
        if not callable(call):
            raise TypeError(f"run_team: calls[{i}] is not callable, got {type(call).__name__}")
    return _C.run_team([functools.partial(contextvars.copy_context().run, call) for call in calls])


def split_network(net: torch.fx.GraphModule, layer: str) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule] | None:
    """(prefix, suffix) with suffix(prefix(x)) == net(x): the prefix ends with the input of the conv
    ``layer`` (a call of that module in net's graph), the suffix takes it as its one input. None where
    no such cut exists: ``layer`` is not called in the graph, its input is the network's own input, or
    a node after the cut reads a value from before it (a residual around it) other than a parameter or
    buffer (get_attr nodes are copied into the suffix)."""
    if not isinstance(net, torch.fx.GraphModule):
        return None
    nodes = list(net.graph.nodes)
    conv = next((n for n in nodes if n.op == "call_module" and n.target == layer), None)
    if (conv is None or not conv.args or not isinstance(conv.args[0], torch.fx.Node)
            or conv.args[0].op not in ("call_module", "call_function", "call_method")):
        return None
    cut = conv.args[0]
    at = nodes.index(cut)
    before = set(nodes[:at])

    prefix = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in nodes[:at + 1]:
        env[node] = prefix.node_copy(node, lambda n: env[n])
    prefix.output(env[cut])

    suffix = torch.fx.Graph()
    env = {cut: suffix.placeholder("x")}

    def value(n: torch.fx.Node) -> torch.fx.Node:
        if n not in env:  # a node from before the cut: only parameters and buffers may be read again
            if n not in before or n.op != "get_attr":
                raise _NoCut
            env[n] = suffix.node_copy(n, lambda m: env[m])
        return env[n]

    try:
        for node in nodes[at + 1:]:
            env[node] = suffix.node_copy(node, value)
    except _NoCut:
        return None
    first = torch.fx.GraphModule(net, prefix, class_name="Prefix")
    first.graph.eliminate_dead_code()  # parameters read only after the cut
    first.recompile()
    return first, torch.fx.GraphModule(net, suffix, class_name="Suffix")


class _NoCut(Exception):
    pass


def join_micro_batches(parts: list[torch.Tensor]) -> torch.Tensor:
    """The micro-batches' outputs (N_i, ...) as one batch, in their memory layout where they are
    batch innermost ((C, H, W, N) in memory, each channel plane padded alike, as the sparse kernels
    write them: the next generated layer then reads the joined batch in place), else torch.cat."""
    pads = {_plane_padding(p) for p in parts}
    if len(pads) != 1 or None in pads or len({p.shape[1:] for p in parts}) != 1:
        return torch.cat(parts)
    pad = pads.pop()
    n = sum(p.shape[0] for p in parts)
    _, c, h, w = parts[0].shape
    joined = torch.empty_strided((n, c, h, w), (1, h * w * n + pad, w * n, n), dtype=parts[0].dtype,
                                 device=parts[0].device)
    start = 0
    for p in parts:
        joined[start:start + p.shape[0]].copy_(p)
        start += p.shape[0]
    return joined


def _plane_padding(p: torch.Tensor) -> int | None:
    """Floats between one channel plane's end and the next plane of a batch-innermost (N, C, H, W)
    tensor ((C, H, W, N) in memory), None for any other layout."""
    if p.dim() != 4:
        return None
    n, _, h, w = p.shape
    if p.stride(0) != 1 or p.stride(3) != n or p.stride(2) != w * n or p.stride(1) < h * w * n:
        return None
    return p.stride(1) - h * w * n


def join_candidates(net: torch.fx.GraphModule, example: torch.Tensor, most: int = 3) -> list[str]:
    """The sparse convs before which the tuner tries joining the micro-batches: for each map size, in
    the network's order, the first conv at it whose input is a cut (split_network), after the first
    conv; the last ``most`` of them (the smallest maps, where the weights outweigh the activations).
    ``example``: an input (one image is enough) the network is run on once to see the map sizes."""
    if not isinstance(net, torch.fx.GraphModule):
        return []
    modules = dict(net.named_modules())
    convs = [n.target for n in net.graph.nodes if n.op == "call_module" and isinstance(modules.get(n.target), SparseConv2d)]
    sizes: dict[str, int] = {}
    hooks = [modules[name].register_forward_pre_hook(
        lambda m, args, name=name: sizes.__setitem__(name, args[0].shape[-2] * args[0].shape[-1])) for name in convs]
    try:
        with torch.no_grad():
            net(example[:1])
    finally:
        for hook in hooks:
            hook.remove()
    found, seen = [], set()
    for name in convs[1:]:
        if name in sizes and sizes[name] not in seen and split_network(net, name) is not None:
            seen.add(sizes[name])
            found.append(name)
    return found[-most:]
