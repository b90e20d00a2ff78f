"""SparseModel: one sparse inference network and its plan, the per-device, per-batch-size-bucket
choice of memory layout, micro-batching and, per layer, dense or sparse and which sparse algorithm.

The network's modules and state_dict never change with the plan (every convertible layer holds its
CSR weights; "dense" rebuilds the dense weight outside the state_dict), so what timing picked is
data, saved with the model (files.py) and switched per call by the batch size.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as module_globals  # the global forward hooks

from ... import backends
from ...ops.sparse import cpu_backend_per_network_call, network_cpu_backend, to_batch_innermost
from .inference_graph import build_inference_graph
from .layers import SparseConv2d, SparseLinear
from .micro_batches import join_micro_batches, run_team, split_network

# Batch-size buckets (first, last or None: no end). A plan tuned on one batch size is used only for
# the batch sizes of its bucket: the best layout at 64 can be the worst at 1.
BUCKETS = ((1, 1), (2, 7), (8, 63), (64, 255), (256, None))

# What sparsify tunes when given an example input: one batch size in each bucket (from 64 on, CPU
# sparse runs go in micro-batches of 64, so the plan tuned on 64 costs the same per image up to 255).
DEFAULT_BATCH_SIZES = (1, 4, 16, 64, 256)

LAYOUTS = ("contiguous", "channels_last", "batch_innermost")

# From this batch size on, an untuned CPU bucket runs its convs on the tiled algorithm (see static_config).
_TILED_MIN_BATCH = 8

# What a bucket the plan does not cover runs: "tune" times it on its first call (that call takes
# seconds), "dense" runs every layer dense (never slower than the dense model), "sparse" runs every
# convertible layer sparse on the algorithm chosen by shape (sparsify(..., benchmark=False); the tiled
# one on CPU batches of _TILED_MIN_BATCH and more).
UNTUNED = ("tune", "dense", "sparse")


def bucket_name(first: int, last: int | None) -> str:
    return f"{first}+" if last is None else str(first) if first == last else f"{first}-{last}"


def bucket_of(batch: int) -> str:
    """The name of the bucket holding ``batch`` ("1", "2-7", "8-63", "64-255", "256+"); an empty
    batch counts as 1."""
    batch = max(int(batch), 1)
    for first, last in BUCKETS:
        if last is None or batch <= last:
            return bucket_name(first, last)
    raise AssertionError("the last bucket has no end")


def device_key(device: torch.device) -> str:
    """What a plan is tuned for: the GPU's name, or the CPU with its thread count (timings on 2 and
    on 16 threads pick differently)."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"{device.type}: {torch.get_num_threads()} threads"


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x (N, C, H, W) in the given memory layout (other shapes unchanged)."""
    if x.dim() != 4 or layout == "contiguous":
        return x.contiguous() if x.dim() == 4 else x
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    return to_batch_innermost(x)


def _hooks_registered(layers) -> bool:
    """Whether a forward hook would see a call of one of ``layers`` (its own, or a global one)."""
    if getattr(module_globals, "_global_forward_hooks", None) or getattr(module_globals, "_global_forward_pre_hooks", None):
        return True
    return any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers)


def make_config(layout: str, micro_batch: int | None, layers: dict[str, str], kind: str,
                join_at: str | None = None) -> dict:
    """One bucket's entry of a plan: plain data (saved as is). ``join_at``: the sparse conv from which
    on concurrent micro-batches run joined as one batch (micro_batches.py); absent when None."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    config = {"kind": kind, "layout": layout, "micro_batch": micro_batch, "layers": dict(layers)}
    if join_at is not None:
        config["join_at"] = join_at
    return config


class SparseModel(nn.Module):
    """A model's sparse inference network (``net``: convertible layers as SparseConv2d/SparseLinear,
    BatchNorms folded, epilogues fused) with its ``plan``.

    ``plan["devices"][device_key][bucket]`` holds, for the batch sizes of that bucket on that device:
    the memory layout the input is put in ("contiguous", "channels_last", "batch_innermost"), the
    micro-batch size (large CPU batches run in slices whose activations stay in cache) and each
    sparse layer's choice ("dense", or a sparse kernel); ``plan["untuned"]`` says what a bucket
    without an entry runs (see UNTUNED). forward(x) (N, ...) -> the model's output, the same
    function whatever the plan chooses.

    ``parallel_micro_batches`` (default True): CPU inference (autograd off) in at least as many
    micro-batches as torch.get_num_threads() runs them concurrently, each whole network on one
    thread, instead of one micro-batch at a time with every layer split over the threads; the
    micro-batches left over after whole rounds run the second way. Each thread then reads only the
    activations it wrote: where the two cores of a shared VM did not share their caches well
    (bench/NOTES.md, session 13), ResNet-18 at 90% ran 58.9 ms a batch of 64 against 85.8 split by
    layer; in a normal process 54.6 against 55.4 with a plan tuned this way (a plan tuned for the
    other ran 8% slower concurrently). Set it False on an instance to split every layer instead.
    """

    parallel_micro_batches = True

    def __init__(self, net: nn.Module, plan: dict | None = None, recipe: dict | None = None,
                 untuned: str = "tune", repeats: int = 5):
        super().__init__()
        self.net = net
        self.plan = plan if plan is not None else {"untuned": untuned, "devices": {}}
        if self.plan.get("untuned") not in UNTUNED:
            raise ValueError(f"untuned must be one of {UNTUNED}, got {self.plan.get('untuned')!r}")
        self._check_plan()
        self.fastprune_recipe = recipe
        self.repeats = repeats  # timing repeats when a bucket is tuned on first use
        self._active = None     # the config the layers are set to
        # {(id(config), id(net or its part)): (config, its choices, net or part, inference graph or None,
        #  the layers it calls directly)}
        self._inference_graphs: dict[tuple[int, int], tuple] = {}
        self._splits: dict[str, tuple] = {}  # {join_at: (net, (prefix, suffix) or None)}
        self.no_kernel: list[str] = []  # sparse convs left dense: no sparse kernel takes them (sparsify fills it)

    def _check_plan(self) -> None:
        """A plan (perhaps read from a file) must name this network's sparse layers and choices they have."""
        layers = self.sparse_layers()
        if not isinstance(self.plan.get("devices"), dict):
            raise ValueError("plan: 'devices' must map device names to buckets")
        for device, buckets in self.plan["devices"].items():
            for bucket, config in buckets.items():
                where = f"plan[{device!r}][{bucket!r}]"
                if config.get("layout") not in LAYOUTS or not isinstance(config.get("layers"), dict):
                    raise ValueError(f"{where}: needs a layout in {LAYOUTS} and a dict of layers")
                micro = config.get("micro_batch")
                if micro is not None and (not isinstance(micro, int) or micro < 1):
                    raise ValueError(f"{where}: micro_batch must be None or a positive int, got {micro!r}")
                join_at = config.get("join_at")
                if join_at is not None and not (isinstance(join_at, str)
                                                and isinstance(layers.get(join_at), SparseConv2d)):
                    raise ValueError(f"{where}: join_at must be None or the name of a sparse conv, got {join_at!r}")
                if set(config["layers"]) != set(layers):
                    raise ValueError(f"{where}: its layers do not match the network's sparse layers")
                for name, choice in config["layers"].items():
                    if choice not in layers[name].choices:
                        raise ValueError(f"{where}: layer {name!r} has no choice {choice!r}")

    @property
    def untuned(self) -> str:
        return self.plan["untuned"]

    @untuned.setter
    def untuned(self, value: str) -> None:
        if value not in UNTUNED:
            raise ValueError(f"untuned must be one of {UNTUNED}, got {value!r}")
        self.plan["untuned"] = value

    def sparse_layers(self) -> dict[str, nn.Module]:
        """{name in net: layer} of the layers a plan chooses for."""
        return {n: m for n, m in self.net.named_modules() if isinstance(m, (SparseConv2d, SparseLinear))}

    def tuned(self, device: torch.device) -> dict:
        """{bucket: config} tuned for ``device``."""
        return self.plan["devices"].get(device_key(device), {})

    def static_config(self, kind: str, x: torch.Tensor | None = None) -> dict:
        """Every sparse layer dense ("dense") or on its sparse kernel by shape ("sparse"), contiguous.
        For a CPU batch x of _TILED_MIN_BATCH or more images, "sparse" puts every conv with equal
        strides on the tiled algorithm (the fastest there in every layer of ResNet-18 and VGG16 that
        bench/NOTES.md profiles; at smaller batches the padded and direct ones win)."""
        tiled = (kind == "sparse" and x is not None and x.device.type == "cpu" and x.dim() == 4
                 and x.shape[0] >= _TILED_MIN_BATCH)

        def choice(m):
            if kind == "dense":
                return "dense"
            if tiled and isinstance(m, SparseConv2d) and m.stride[0] == m.stride[1]:
                return "tiled"
            return m.choices[1]

        layers = {n: choice(m) for n, m in self.sparse_layers().items()}
        return make_config("contiguous", None, layers, kind)

    def config_for(self, x: torch.Tensor) -> dict:
        """The config that runs x: its bucket's on x's device, else by ``untuned`` (tuning it now
        when that is "tune")."""
        config = self.tuned(x.device).get(bucket_of(x.shape[0]))
        if config is not None:
            return config
        if self.untuned == "tune":
            from .tuner import tune_bucket

            return tune_bucket(self, x.detach(), repeats=self.repeats)
        return self.static_config(self.untuned, x)

    def use_config(self, config: dict) -> None:
        """Set every sparse layer to its choice in ``config``."""
        if config is self._active:
            return
        layers = self.sparse_layers()
        for name, choice in config["layers"].items():
            layers[name].choice = choice
        self._active = config

    @torch.compiler.disable
    def _prepare(self, x: torch.Tensor) -> dict:
        # Outside torch.compile's graph: choosing (and perhaps tuning) the bucket is plain Python; the
        # layers' choices it sets are guarded on, so a compiled model recompiles per bucket.
        config = self.config_for(x)
        self.use_config(config)
        return config

    def run(self, x: torch.Tensor, config: dict) -> torch.Tensor:
        """The network on x under ``config`` (layout, micro-batches, layer choices)."""
        self.use_config(config)
        layout, micro = config["layout"], config["micro_batch"]
        # The CPU convs' backend once per call, for CPU inputs only (a GPU model under use_backend("cuda")
        # has no CPU backend to resolve); traced, the layers' inference path does not apply anyway.
        if torch.compiler.is_compiling() or x.device.type != "cpu":
            return self._run_net(self.net, x, layout, micro)
        with cpu_backend_per_network_call():
            split = self._split(config.get("join_at"), x, micro)
            if split is not None:
                return self._run_joined(x, config, *split)
            return self._run_net(self._inference_net(x, config, self.net), x, layout, micro)

    def _split(self, join_at: str | None, x: torch.Tensor, micro: int | None):
        """(prefix, suffix) of the network cut before ``join_at`` (micro_batches.split_network) where the
        call runs concurrent micro-batches, else None (every micro-batch then runs the whole network)."""
        if join_at is None or micro is None or x.shape[0] <= micro:
            return None
        if self._micro_batch_workers(x, -(-x.shape[0] // micro)) < 2:  # parts: ceil(N / micro)
            return None
        entry = self._splits.get(join_at)
        if entry is None or entry[0] is not self.net:
            entry = self._splits[join_at] = (self.net, split_network(self.net, join_at))
        return entry[1]

    def _run_joined(self, x: torch.Tensor, config: dict, prefix: nn.Module, suffix: nn.Module) -> torch.Tensor:
        """The prefix on concurrent micro-batches, then the suffix on them joined, every layer split
        over the threads (micro_batches.py)."""
        parts = x.split(config["micro_batch"])
        outs = self._run_concurrently(self._inference_net(x, config, prefix), parts, config["layout"],
                                      self._micro_batch_workers(x, len(parts)))
        return self._inference_net(x, config, suffix)(join_micro_batches(outs))

    def _inference_net(self, x: torch.Tensor, config: dict, net: nn.Module) -> nn.Module:
        """What runs x under ``config`` on the CPU in place of ``net`` (the network, or a part of it):
        ``net``, or, for float32 inference on the C++ kernels (autograd and autocast off), its inference
        graph (inference_graph.py: the sparse convs fed by other sparse convs call their kernel
        directly, 8 us a layer less at batch 1). Not while a forward hook is registered on the network
        or one of those layers, or globally: hooks see every call."""
        if (x.dtype != torch.float32 or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")
                or network_cpu_backend() != "cpp"):
            return net
        choices = tuple(config["layers"].values())
        key = (id(config), id(net))
        entry = self._inference_graphs.get(key)
        if entry is None or entry[0] is not config or entry[1] != choices or entry[2] is not net:
            if len(self._inference_graphs) >= 48:  # configs tuned and dropped: start over
                self._inference_graphs.clear()
            built = build_inference_graph(net, config["layers"])
            graph, direct = (None, ()) if built is None else built
            entry = self._inference_graphs[key] = (config, choices, net, graph, direct)
        graph, direct = entry[3], entry[4]
        if graph is None or _hooks_registered((self.net, *direct)):
            return net
        return graph

    def __getstate__(self):
        # The inference graphs and the network's parts call the layers they were built on: a copy
        # builds its own.
        state = dict(super().__getstate__())
        state["_inference_graphs"] = {}
        state["_splits"] = {}
        return state

    def _run_net(self, net: nn.Module, x: torch.Tensor, layout: str, micro: int | None) -> torch.Tensor:
        if micro is None or x.shape[0] <= micro:
            return net(to_layout(x, layout))
        parts = x.split(micro)
        workers = self._micro_batch_workers(x, len(parts))
        if workers < 2:
            x = to_layout(x, layout)
            return torch.cat([net(part) for part in x.split(micro)])
        return torch.cat(self._run_concurrently(net, parts, layout, workers))

    def _micro_batch_workers(self, x: torch.Tensor, parts: int) -> int:
        """How many threads run whole micro-batches at once (1: one micro-batch at a time): only CPU
        inference without autograd or autocast (thread-local modes the workers would not share)."""
        threads = torch.get_num_threads()
        if (not self.parallel_micro_batches or x.device.type != "cpu" or threads < 2 or parts < threads
                or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()
                or not backends._load_extension()):
            return 1
        return threads

    def _run_concurrently(self, net: nn.Module, parts: tuple[torch.Tensor, ...], layout: str,
                          workers: int) -> list[torch.Tensor]:
        """``net`` on each part, in order: workers x (len(parts) // workers) of them on one OpenMP team
        of ``workers`` threads (this one and the threads its parallel regions run on:
        micro_batches.run_team), a contiguous run of parts a thread, the rest after them on this thread
        with every layer split over the threads.

        Each part is put in ``layout`` by the thread that runs it, not before: a parallel region here
        first would only cost a fork and join (bench/NOTES.md, session 15: with the micro-batches on a
        Python thread pool, the OpenMP threads of such a region spun on the cores the pool needed)."""
        per = len(parts) // workers
        inference = torch.is_inference_mode_enabled()

        def run(group):
            with torch.inference_mode() if inference else torch.no_grad():
                return [net(to_layout(part, layout)) for part in group]

        outs = run_team([lambda i=i: run(parts[i * per:(i + 1) * per]) for i in range(workers)])
        return [y for group in outs for y in group] + [net(to_layout(part, layout)) for part in parts[workers * per:]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, ...) -> net(x), under the config of N's bucket on x's device."""
        return self.run(x, self._prepare(x))

    def summary(self) -> str:
        """One line per tuned bucket: what runs there."""
        lines = []
        for device, buckets in self.plan["devices"].items():
            for bucket, config in buckets.items():
                sparse = sum(choice != "dense" for choice in config["layers"].values())
                micro = f", micro-batches of {config['micro_batch']}" if config["micro_batch"] else ""
                if config.get("join_at"):
                    micro += f" joined at {config['join_at']}"
                lines.append(f"{device}, batch {bucket}: {config['kind']}, {config['layout']}{micro}, "
                             f"{sparse}/{len(config['layers'])} layers sparse")
        lines.append(f"other batch sizes: {self.untuned}")
        if self.no_kernel:
            lines.append(f"left dense, no sparse kernel for them (grouped/depthwise or dilated convs): "
                         f"{len(self.no_kernel)} layers, e.g. {self.no_kernel[0]}")
        return "\n".join(lines)
