"""sparsify: build the sparse inference model of a pruned model, timing layers and whole candidates
(layouts, algorithms, micro-batches, dense) on the device and keeping the fastest."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ...ops.sparse import ALGORITHMS, direct_applicable, to_batch_innermost
from ...utils.timing import interleaved_medians, median_time
from ..masked import _replace, check_sparsity, fold_masks
from .files import _plan_of
from .layers import (SemiStructuredLinear, SparseConv2d, SparseLinear, is_2to4, semi_structured_shape_ok,
                     semi_structured_supported)
from .layout import BatchInnermostInput, ChannelsLastInput, MicroBatched
from .passes import _fast_pooling, fold_batchnorm, fuse_epilogues


def _sparse_twins(module: nn.Module) -> list[nn.Module]:
    """The sparse layers that could replace ``module``: CSR (float32; any float on CUDA), and the
    2:4 semi-structured linear where its weight and the hardware allow."""
    w = module.weight
    csr_dtype = w.dtype == torch.float32 or (w.is_cuda and w.dtype in (torch.float16, torch.bfloat16))
    twins = []
    if (isinstance(module, nn.Linear) and semi_structured_supported(w.device, w.dtype)
            and semi_structured_shape_ok(w.shape, w.dtype) and is_2to4(w.detach())):
        twins.append(SemiStructuredLinear.from_dense(module))
    if isinstance(module, nn.Conv2d) and SparseConv2d.supports(module) and csr_dtype:
        twins.append(SparseConv2d.from_dense(module))
    elif isinstance(module, nn.Linear) and csr_dtype:
        twins.append(SparseLinear.from_dense(module))
    return twins


# A sparse candidate must beat dense by this factor to be chosen: timings on a shared machine vary by
# a few per cent, and a near tie picked by noise can come out slower than dense when timed again.
_WIN_MARGIN = 0.97


def _median_seconds(fn, x, repeats: int) -> float:
    """Median seconds of fn(x) without autograd (one warm-up run)."""
    with torch.no_grad():
        return median_time(lambda: fn(x), x.device, repeats=repeats, warmup=1)


def _tune_sparse(layer: nn.Module, x: torch.Tensor, repeats: int, batch_innermost: bool = False) -> float:
    """Time each algorithm a sparse conv can use on input x, keep the fastest; returns its time.
    In a batch-innermost model every sparse conv runs that algorithm (its output layout is what the
    next layer reads)."""
    if not isinstance(layer, SparseConv2d):
        return _median_seconds(layer, x, repeats)
    if batch_innermost:
        options = [ALGORITHMS["batch_innermost"]]
    else:
        options = [ALGORITHMS["padded"]] + ([ALGORITHMS["direct"]] if direct_applicable(x, layer.stride) else [])
    times = {}
    for algo in options:
        layer.algo = algo
        times[algo] = _median_seconds(layer, x, repeats)
    layer.algo = min(times, key=times.get)
    return times[layer.algo]


def _convert_layers(dense: nn.Module, inputs: dict, min_sparsity: float, repeats: int,
                    batch_innermost: bool = False):
    """Swap dense conv/linear layers for sparse ones: by timing where ``inputs`` has the layer's
    input, else by the sparsity rule. Returns (model, decisions); ``dense`` is modified."""
    decisions = {}
    for name, module in [(n, m) for n, m in dense.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]:
        twins = _sparse_twins(module)
        weight = module.weight.detach()
        decision = {"sparsity": float((weight == 0).float().mean()), "dense_s": None, "sparse_s": None}
        chosen = None
        if twins and name in inputs:
            x = inputs[name]
            decision["dense_s"] = _median_seconds(module, x, repeats)
            times = [_tune_sparse(twin, x, repeats, batch_innermost) for twin in twins]
            best = min(range(len(twins)), key=times.__getitem__)
            decision["sparse_s"] = times[best]
            chosen = twins[best] if times[best] < _WIN_MARGIN * decision["dense_s"] else None
        elif twins:  # no timing: semi-structured wherever it applies, CSR from min_sparsity on
            semi = [t for t in twins if isinstance(t, SemiStructuredLinear)]
            chosen = semi[0] if semi else (twins[0] if decision["sparsity"] >= min_sparsity else None)
        decision["kept"] = "sparse" if chosen is not None else "dense"
        decision["format"] = "2:4" if isinstance(chosen, SemiStructuredLinear) else "csr" if chosen else "dense"
        decisions[name] = decision
        if chosen is not None:
            _replace(dense, name, chosen)
    return dense, decisions


def _layer_inputs(model: nn.Module, x: torch.Tensor, convert=None) -> dict:
    """Each conv/linear layer's input when ``model`` runs on x, passed through ``convert`` (the
    layout the layer will see once its predecessors are sparse) where one is given."""
    inputs = {}

    def keep(name, value):
        inputs[name] = convert(value) if convert is not None and value.dim() == 4 else value

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    hooks = [m.register_forward_hook(lambda mod, args, out, name=n: keep(name, args[0].detach())) for n, m in layers]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs


def _layout_candidates(dense: nn.Module, example: torch.Tensor, layouts: dict, min_sparsity: float, repeats: int,
                       sparse_only: bool = False) -> dict:
    """{"sparse, <layout>" / "dense, <layout>": (model, decisions)} for each memory layout: the
    sparse model has each layer tuned on its real input in that layout."""
    candidates = {}
    for layout, wrapper in layouts.items():
        cl = layout == "channels_last"
        base = copy.deepcopy(dense).to(memory_format=torch.channels_last) if cl else copy.deepcopy(dense)
        x = wrapper.convert(example) if wrapper else example
        innermost = layout == "batch innermost"
        inputs = _layer_inputs(base, x, to_batch_innermost if innermost else None)
        sparse, decisions = _convert_layers(copy.deepcopy(base), inputs, min_sparsity, repeats,
                                            batch_innermost=innermost)
        sparse = fuse_epilogues(sparse)
        wrap = wrapper or (lambda m: m)
        candidates[f"sparse, {layout}"] = (wrap(sparse), decisions)
        if not innermost and not sparse_only:  # oneDNN has no batch-innermost convolution: it would convert
            all_dense = {k: {**d, "kept": "dense", "format": "dense"} for k, d in decisions.items()}
            candidates[f"dense, {layout}"] = (wrap(base), all_dense)
    return candidates


# Batches at least this large may run batch-innermost on the CPU (a batch fills a vector register).
_BATCH_INNERMOST_MIN_BATCH = 8


# Larger CPU batches are also tried in micro-batches of this many images.
_MICRO_BATCH = 64


def sparsify(model: nn.Module, example_input: torch.Tensor | None = None, *, benchmark: bool = True,
             min_sparsity: float = 0.5, repeats: int = 5, channels_last: bool | str = "auto",
             batch_innermost: bool | str = "auto") -> nn.Module:
    """An inference copy of ``model`` whose conv and linear layers carry compressed weights.

    With ``example_input`` (a typical batch, (N, C, H, W) for a CNN) and ``benchmark`` on, on the
    model's device: every candidate layer is timed dense and sparse on its real input and the faster
    kept; then the whole sparse model is timed against the dense model (masks folded in), in the
    contiguous and the channels_last layout (``channels_last="auto"``) and, on the CPU for batches of
    8 or more (``batch_innermost="auto"``), with every sparse conv on the batch-innermost algorithm
    (activations laid out (C, H, W, N), see :class:`BatchInnermostInput`); CPU batches over 64 are
    also tried in micro-batches of 64 (:class:`MicroBatched`, tuned on 64); the fastest of those is
    returned, so the result is never slower than the dense model. A sparse layer or model must be at
    least 3% faster than dense to be chosen (smaller differences are timing noise). Without timing,
    a layer becomes sparse when its sparsity is at least ``min_sparsity``. Masks of masked layers
    and BatchNorms that follow a conv are folded into the conv weights either way, 2x2 max pooling
    gets a faster NCHW version, and ReLU (and pooling) right after a sparse conv are fused into its
    epilogue.

    The returned model has ``sparsify_decisions`` ({layer: {"sparsity", "dense_s", "sparse_s",
    "kept"}}) and ``sparsify_choice`` (what was returned and the whole-model times).
    """
    check_sparsity(min_sparsity, "min_sparsity")
    for name, value in (("channels_last", channels_last), ("batch_innermost", batch_innermost)):
        if value not in (True, False, "auto"):
            raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")
    recipe = getattr(model, "fastprune_recipe", None)  # how to rebuild it (save_sparse), for zoo models
    dense = _fast_pooling(fold_batchnorm(fold_masks(copy.deepcopy(model).eval())))
    if example_input is None or not benchmark:
        result, decisions = _convert_layers(dense, {}, min_sparsity, repeats)
        result = fuse_epilogues(result)
        if channels_last is True:
            result = ChannelsLastInput(result.to(memory_format=torch.channels_last))
        result.sparsify_decisions, result.sparsify_choice = decisions, {"kind": "sparse", "timed": False}
        result.sparsify_plan, result.fastprune_recipe = _plan_of(result, "sparse"), recipe
        return result

    layouts = {"contiguous": None, "channels_last": ChannelsLastInput}
    if channels_last != "auto":
        del layouts["contiguous" if channels_last else "channels_last"]
    if batch_innermost is True or (batch_innermost == "auto" and example_input.device.type == "cpu"
                                   and example_input.dim() == 4
                                   and example_input.shape[0] >= _BATCH_INNERMOST_MIN_BATCH):
        layouts["batch innermost"] = BatchInnermostInput
    candidates = _layout_candidates(dense, example_input, layouts, min_sparsity, repeats)
    micro = _MICRO_BATCH
    if example_input.device.type == "cpu" and example_input.dim() == 4 and example_input.shape[0] > micro:
        # Large CPU batches also run in micro-batches, each through the whole network while its
        # activations fit in cache; the layers are tuned on a micro-batch. Kept only where the
        # outputs equal the whole-batch run (no cross-sample op in the model).
        with torch.no_grad():
            reference = candidates["dense, " + next(iter(layouts))][0](example_input)
        small = _layout_candidates(dense, example_input[:micro], layouts, min_sparsity, repeats, sparse_only=True)
        for key, (model_, decisions) in small.items():
            chunked = MicroBatched(model_, micro)
            with torch.no_grad():
                out = chunked(example_input)
            if isinstance(out, torch.Tensor) and torch.allclose(out, reference, rtol=1e-3, atol=1e-3 * (
                    reference.abs().max().item() + 1e-12)):
                candidates[f"{key}, micro-batches of {micro}"] = (chunked, decisions)
    # Whole models in interleaved rounds after two warm-up runs: the first runs of a model allocate
    # its activations afresh (page faults), which would favour whichever candidate ran last.
    with torch.no_grad():
        times = interleaved_medians({k: (lambda m=m: m(example_input)) for k, (m, _) in candidates.items()},
                                    example_input.device, repeats=repeats, warmup=2)
    best = min(times, key=times.get)
    fastest_dense = min((k for k in times if k.startswith("dense")), key=times.get)
    if times[best] >= _WIN_MARGIN * times[fastest_dense]:  # a near tie is timing noise: stay dense
        best = fastest_dense
    result, decisions = candidates[best]
    result.sparsify_decisions = decisions
    result.sparsify_choice = {"kind": best, "timed": True, "seconds": times}
    result.sparsify_plan, result.fastprune_recipe = _plan_of(result, best.split(",")[0]), recipe
    return result
