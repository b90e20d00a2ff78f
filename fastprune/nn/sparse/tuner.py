"""sparsify and the tuner: build a pruned model's SparseModel, then time, per batch-size bucket on the
device, each layer dense and on each sparse kernel, and whole-model candidates (memory layouts,
micro-batches, all dense), keeping the fastest as the bucket's config in the model's plan."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ...ops.sparse import EPILOGUES, direct_applicable, generated_applicable
from ...utils.timing import interleaved_fastest, median_time
from ..masked import _replace, check_sparsity, effective_weight, fold_masks
from .layers import SparseConv2d, SparseLinear, is_2to4
from .micro_batches import join_candidates
from .model import DEFAULT_BATCH_SIZES, SparseModel, bucket_of, device_key, make_config
from .passes import _fast_pooling, fold_batchnorm, fuse_epilogues

# A sparse candidate must beat dense by this factor to be chosen: timings on a shared machine vary by
# a few per cent, and a near tie picked by noise can come out slower than dense when timed again.
_WIN_MARGIN = 0.97

# Batches at least this large may run batch-innermost on the CPU (a batch fills a vector register).
_BATCH_INNERMOST_MIN_BATCH = 8

# CPU batches of this many images or more run sparse in micro-batches of this size (layers tuned on one).
_MICRO_BATCH = 64


def _convertible(module: nn.Module, min_sparsity: float) -> bool:
    """Whether ``module`` gets a sparse twin: a conv the sparse kernels take or a linear layer, in
    float32 (or half precision on CUDA), at least ``min_sparsity`` sparse (2:4 weights always).
    Depends on the weights only, never on timing, so the sparse model's state_dict keys do not."""
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        return False
    w = module.weight
    if not (w.dtype == torch.float32 or (w.is_cuda and w.dtype in (torch.float16, torch.bfloat16))):
        return False
    if isinstance(module, nn.Conv2d) and not SparseConv2d.supports(module):
        return False
    sparsity = float((w.detach() == 0).float().mean())
    return sparsity >= min_sparsity or (isinstance(module, nn.Linear) and is_2to4(w.detach()))


def _sparse_but_unsupported(model: nn.Module, min_sparsity: float) -> list[str]:
    """Conv layers sparse enough to convert that stay dense because no sparse kernel takes them
    (grouped and depthwise, dilated, or non-zero padding modes: MobileNet's and EfficientNet's
    depthwise convs, say), so that the model's summary can say so."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and not SparseConv2d.supports(module):
            if float((effective_weight(module) == 0).float().mean()) >= min_sparsity:
                out.append(name)
    return out


def _sparse_twin(module: nn.Module) -> nn.Module:
    """The SparseConv2d/SparseLinear of ``module``, holding its dense weight as the dense choice's
    cache (no copy: the dense module goes away)."""
    twin = SparseConv2d.from_dense(module) if isinstance(module, nn.Conv2d) else SparseLinear.from_dense(module)
    twin.dense_cache = module.weight.detach()
    return twin


def build_sparse_network(model: nn.Module, min_sparsity: float) -> tuple[nn.Module, dict[str, float]]:
    """(net, {converted layer: sparsity}): a copy of ``model`` with masks and BatchNorms folded,
    faster pooling, the convertible layers sparse and epilogues fused. Only one copy of the model
    exists at a time besides the caller's."""
    net = copy.deepcopy(model).eval()
    net = _fast_pooling(fold_batchnorm(fold_masks(net), inplace=True))
    sparsity = {}
    # nn.MultiheadAttention reads its out_proj's weight itself (it never calls the layer): leave it.
    read_directly = {f"{n}.out_proj" for n, m in net.named_modules() if isinstance(m, nn.MultiheadAttention)}
    for name, module in [(n, m) for n, m in net.named_modules()
                         if _convertible(m, min_sparsity) and n not in read_directly]:
        sparsity[name] = float((module.weight.detach() == 0).float().mean())
        _replace(net, name, _sparse_twin(module))
    return fuse_epilogues(net), sparsity


def _options(layer: nn.Module, x: torch.Tensor, layout: str) -> list[str]:
    """The choices worth timing for ``layer`` on input x in ``layout``: dense first."""
    if isinstance(layer, SparseLinear):
        return ["dense", "csr"] + (["2:4"] if layer.semi_structured_usable(x) else [])
    if x.device.type != "cpu":
        return ["dense", "auto"]
    tiled = ["tiled"] if layer.stride[0] == layer.stride[1] else []  # its output is batch innermost too
    if generated_applicable(x, layer.stride, layer.nnz, pool=layer.epilogue == EPILOGUES["relu_pool"]):
        tiled.append("generated")  # (else it would run the tiled algorithm: nothing new to time)
    if layout == "batch_innermost":  # every sparse conv keeps the layout the next one reads
        return ["dense", "batch_innermost"] + tiled
    return ["dense", "padded"] + (["direct"] if direct_applicable(x, layer.stride) else []) + tiled


def _time_choice(layer: nn.Module, choice: str, args: tuple, repeats: int) -> float:
    """Median seconds of ``layer`` on ``args`` with ``choice`` (which stays set)."""
    layer.choice = choice
    with torch.no_grad():
        return median_time(lambda: layer.forward(*args), args[0].device, repeats=repeats, warmup=1)


def tune_layers(model: SparseModel, x: torch.Tensor, layout: str, repeats: int) -> dict[str, str]:
    """{layer: choice}: in one run of the network on x in ``layout``, each sparse layer, just before it
    runs, times its options on its real input and keeps the fastest (a sparse kernel only when at
    least 3% faster than dense); later layers see the layout the earlier choices produce. No
    activation is kept beyond the run."""
    layers = model.sparse_layers()
    choices = {name: ("batch_innermost" if layout == "batch_innermost" and isinstance(m, SparseConv2d)
                      else m.choices[1]) for name, m in layers.items()}
    start = make_config(layout, None, choices, "sparse")

    def choose(name, layer, args):
        times = {option: _time_choice(layer, option, args, repeats) for option in _options(layer, args[0], layout)}
        best = min(times, key=times.get)
        if best != "dense" and times[best] >= _WIN_MARGIN * times["dense"]:
            best = "dense"
        layer.choice = choices[name] = best

    hooks = [m.register_forward_pre_hook(lambda mod, args, name=n: choose(name, mod, args)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            model.run(x, start)
    finally:
        for hook in hooks:
            hook.remove()
        model._active = None  # the layers' choices moved away from ``start``
    return choices


def _layouts(x: torch.Tensor, channels_last, batch_innermost) -> list[str]:
    if x.dim() != 4:
        return ["contiguous"]
    layouts = {True: ["channels_last"], False: ["contiguous"], "auto": ["contiguous", "channels_last"]}[channels_last]
    if batch_innermost is True or (batch_innermost == "auto" and x.device.type == "cpu"
                                   and x.shape[0] >= _BATCH_INNERMOST_MIN_BATCH):
        layouts.append("batch_innermost")
    return layouts


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return isinstance(a, torch.Tensor) and a.shape == b.shape and torch.allclose(
        a, b, rtol=1e-3, atol=1e-3 * (b.abs().max().item() + 1e-12))


def tune_bucket(model: SparseModel, x: torch.Tensor, repeats: int = 5, channels_last: bool | str = "auto",
                batch_innermost: bool | str = "auto", release: bool = True) -> dict:
    """Tune the bucket of x's batch size on x's device and store its config in ``model.plan``.

    For each memory layout (contiguous and channels_last; batch-innermost on CPU batches of 8 or
    more): the layers are tuned on x (:func:`tune_layers`), giving a sparse candidate; contiguous
    and channels_last also give an all-dense candidate. On CPU batches of 64 and more the sparse
    candidates run in micro-batches of 64 (layers tuned on 64 images), and each also in slices of
    32 and of 16 (layers tuned on slices of that size: the best kernel of a layer can change with the
    batch, the generated one's code is worth more over 16 images than over 64 split into blocks),
    batch-innermost slices also joined into the whole batch before one of the last map sizes
    (micro_batches.py: the last layers' weights read once for the batch, not once a slice):
    each slice's activations stay in cache through the network
    (ResNet-18 at 99%, batch 64: 20 ms whole, 17 in slices of 32, 15 in slices of 16; VGG16's best
    slices are 32 or 64), a larger batch in the bucket costs per image what the tuned one did, and no
    whole-batch copy of the sparse kernels' activations (padded inputs, layout conversions) is ever
    held; kept only where slicing gives the whole batch's outputs (checked on two slices: no op mixes
    samples). The candidates are timed whole in interleaved rounds, each by its fastest round (another
    tenant's load on a shared machine comes and goes and only adds time); the fastest is kept, a sparse one only when at least 3% faster than the fastest dense one. Returns
    the config. ``release``: afterwards, free the dense weights of layers that no tuned bucket runs
    dense (sparsify does so once, after all its buckets)."""
    bucket, key = bucket_of(x.shape[0]), device_key(x.device)
    micro = _MICRO_BATCH if x.device.type == "cpu" and x.dim() == 4 and x.shape[0] >= _MICRO_BATCH else None
    layers_x = x if micro is None else x[:micro]
    joins = [] if micro is None else join_candidates(model.net, x)
    candidates = {}
    for layout in _layouts(x, channels_last, batch_innermost):
        choices = tune_layers(model, layers_x, layout, repeats)
        name = f"sparse, {layout}" + ("" if micro is None else f", micro-batches of {micro}")
        candidates[name] = make_config(layout, micro, choices, "sparse")
        if micro is not None:  # slices of a half and a quarter: activations that stay in cache
            for part in (micro // 2, micro // 4):  # each with its layers tuned on a slice of its size
                part_choices = tune_layers(model, layers_x[:part], layout, repeats)
                candidates[f"sparse, {layout}, micro-batches of {part}"] = make_config(layout, part, part_choices,
                                                                                       "sparse")
                # ... and joined into one batch before one of the last map sizes (micro_batches.py),
                # in the layout the generated kernels read in place
                for join_at in (joins if layout == "batch_innermost" else ()):
                    candidates[f"sparse, {layout}, micro-batches of {part} joined at {join_at}"] = make_config(
                        layout, part, part_choices, "sparse", join_at)
        if layout != "batch_innermost":  # oneDNN has no batch-innermost convolution: it would convert
            all_dense = {name: "dense" for name in choices}
            candidates[f"dense, {layout}"] = make_config(layout, None, all_dense, "dense")
    with torch.no_grad():
        if micro is not None:  # slices must give the whole batch's outputs (no op mixes samples)
            two = batch_of(x, 2 * micro)
            reference = model.run(two, next(c for c in candidates.values() if c["kind"] == "dense"))
            candidates = {k: c for k, c in candidates.items()
                          if c["micro_batch"] is None or _same(model.run(two, c), reference)}
        # Whole models after two warm-up runs: the first runs of a config allocate its activations
        # afresh (page faults), which would favour whichever candidate ran last.
        times = interleaved_fastest({k: (lambda c=c: model.run(x, c)) for k, c in candidates.items()},
                                    x.device, repeats=repeats, warmup=2)
    best = min(times, key=times.get)
    fastest_dense = min((k for k in times if candidates[k]["kind"] == "dense"), key=times.get)
    if times[best] >= _WIN_MARGIN * times[fastest_dense]:  # a near tie is timing noise: stay dense
        best = fastest_dense
    config = {**candidates[best], "tuned_on": int(x.shape[0]), "choice": best,
              "seconds": {k: float(v) for k, v in times.items()}}
    model.plan["devices"].setdefault(key, {})[bucket] = config
    if release:
        _release_unused_dense(model, x.device)
    return config


def _release_unused_dense(model: SparseModel, device: torch.device) -> None:
    """Free the dense weights of layers that no tuned bucket on ``device`` runs dense."""
    used = {name for config in model.tuned(device).values() for name, c in config["layers"].items() if c == "dense"}
    for name, layer in model.sparse_layers().items():
        if name not in used:
            layer.release_dense()


def batch_of(example: torch.Tensor, batch: int) -> torch.Tensor:
    """A batch of ``batch`` samples made of the example's (repeated when it has fewer)."""
    if example.shape[0] >= batch:
        return example[:batch]
    return example[torch.arange(batch, device=example.device) % example.shape[0]]


def sparsify(model: nn.Module, example_input: torch.Tensor | None = None, *,
             batch_sizes: tuple[int, ...] | None = DEFAULT_BATCH_SIZES, benchmark: bool = True,
             min_sparsity: float = 0.5, repeats: int = 5, channels_last: bool | str = "auto",
             batch_innermost: bool | str = "auto", untuned: str | None = None) -> SparseModel:
    """The sparse inference model of a pruned ``model``: a :class:`SparseModel`.

    Masks of masked layers and BatchNorms that follow a conv are folded into the conv weights, 2x2
    max pooling gets a faster NCHW version, every conv/linear layer at least ``min_sparsity`` sparse
    (float32; half precision on CUDA) gets CSR weights, and ReLU, pooling and residual additions
    after a sparse conv are fused into its epilogue. Then, with ``example_input`` (samples of the
    input, (N, C, H, W) for a CNN) and ``benchmark`` on, each batch size in ``batch_sizes`` (default
    1, 4, 16, 64 and 256: one in each bucket 1, 2-7, 8-63, 64-255, 256+) is tuned on the model's
    device (see :func:`tune_bucket`; the example's samples are repeated or cut to each size): the
    model runs each bucket in its fastest layout and per-layer choice, never in a config slower than
    its dense run (a sparse choice must be at least 3% faster, the size of timing noise). Two
    sizes in one bucket are refused.

    A bucket not tuned here is, by ``untuned``: "tune" (the default when timing is allowed) timed
    on its first call, which takes seconds; "dense", every layer dense; "sparse" (the default with
    ``benchmark=False``), every converted layer on its sparse kernel by shape, untimed (on the CPU
    from batch 8 on, the tiled algorithm for every conv with equal strides). The plan
    is ``result.plan``; ``result.summary()`` says it in words; ``save_sparse`` keeps it.
    """
    check_sparsity(min_sparsity, "min_sparsity")
    for name, value in (("channels_last", channels_last), ("batch_innermost", batch_innermost)):
        if value not in (True, False, "auto"):
            raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")
    sizes = _check_batch_sizes(batch_sizes)
    if untuned is None:
        untuned = "tune" if benchmark else "sparse"
    net, _ = build_sparse_network(model, min_sparsity)
    result = SparseModel(net, recipe=getattr(model, "fastprune_recipe", None), untuned=untuned, repeats=repeats)
    result.no_kernel = _sparse_but_unsupported(model, min_sparsity)
    if example_input is not None and benchmark:
        if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2 or example_input.shape[0] < 1:
            raise ValueError("example_input must be a batch of samples, (N, ...) with N >= 1")
        for size in sizes:
            tune_bucket(result, batch_of(example_input, size), repeats, channels_last, batch_innermost, release=False)
    if untuned != "dense":
        device = next(iter(result.buffers()), torch.empty(0)).device
        _release_unused_dense(result, device)
    return result


def _check_batch_sizes(batch_sizes) -> list[int]:
    sizes = sorted(set(int(b) for b in (batch_sizes or ())))
    if any(b < 1 for b in sizes):
        raise ValueError(f"batch_sizes must be positive, got {batch_sizes!r}")
    buckets = [bucket_of(b) for b in sizes]
    for bucket in set(buckets):
        shared = [b for b, name in zip(sizes, buckets) if name == bucket]
        if len(shared) > 1:
            raise ValueError(f"batch_sizes {shared} share the bucket {bucket}: give one size per bucket")
    return sizes
