"""Timing: medians of repeated runs (CUDA events on the GPU), interleaved rounds, CUDA graphs (the
bottom layer: sparsify's tuner and the benchmarks share it)."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_time(fn: Callable[[], object], device: torch.device, *, repeats: int = 10, warmup: int = 2) -> float:
    """Median time of fn() in seconds over ``repeats`` runs after ``warmup`` runs. On CUDA each run
    is timed on the device by CUDA events recorded around it on the current stream (the GPU's own
    clock: no host-side launch jitter, no synchronisation inside the timed region); on the CPU by
    the wall clock."""
    for _ in range(warmup):
        fn()
    device = torch.device(device)
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def cuda_graphed(fn: Callable[[torch.Tensor], object], example: torch.Tensor) -> Callable[[], object]:
    """``fn(example)`` captured once in a CUDA graph (after two warm-up runs on a side stream, so
    lazy setup such as cuBLAS handles or fastprune's tiled weights happens before capture); returns a
    callable that replays it. Raises RuntimeError where fn cannot be captured."""
    static = example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(2):
            fn(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        fn(static)
    return graph.replay


def interleaved_times(fns: dict[str, Callable[[], object]], device: torch.device, *, repeats: int = 10,
                      warmup: int = 1, burst: int = 1, gap_s: float = 0.0) -> dict[str, list[float]]:
    """Each fn's seconds in each of ``repeats`` interleaved rounds (every fn in turn each round), so that
    drift in the machine's speed (shared or throttled CPUs) hits every contender alike. ``burst`` > 1:
    in each round a fn runs one untimed call and then burst - 1 timed ones back to back, the round
    counting their median: each contender is timed in its steady state, not on the caches and the
    sleeping or still-spinning thread pools the previous contender left behind (which matters where
    contenders run in different processes). A fn with a true ``reports_seconds`` attribute times
    itself (another process's engine behind a pipe): it is called as fn(burst), runs its burst
    where the engine lives (no pipe between the runs) and returns the round's seconds, which count
    instead of the wall time around the call. ``gap_s``: a pause before each contender's turn, so
    that the thread pools of the one before (OpenMP's spin for milliseconds after a parallel region)
    are asleep before the next one starts: on a machine with few cores a spinning pool of another
    process takes a core from the one being timed."""
    if burst < 1:
        raise ValueError(f"burst must be at least 1, got {burst}")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if gap_s > 0:
                time.sleep(gap_s)
            if getattr(fn, "reports_seconds", False):
                times[name].append(float(fn(burst)))
                continue
            if burst > 1:
                fn()
            times[name].append(statistics.median(median_time(fn, device, repeats=1, warmup=0)
                                                 for _ in range(max(1, burst - 1))))
    return times


def interleaved_medians(fns: dict[str, Callable[[], object]], device: torch.device, *, repeats: int = 10,
                        warmup: int = 1, burst: int = 1, gap_s: float = 0.0) -> dict[str, float]:
    """Median seconds of each fn over interleaved rounds (:func:`interleaved_times`): what a user
    sees on the machine as it is (the benchmarks' figure)."""
    times = interleaved_times(fns, device, repeats=repeats, warmup=warmup, burst=burst, gap_s=gap_s)
    return {name: statistics.median(ts) for name, ts in times.items()}


def interleaved_fastest(fns: dict[str, Callable[[], object]], device: torch.device, *, repeats: int = 10,
                        warmup: int = 1) -> dict[str, float]:
    """Each fn's fastest round of interleaved rounds (:func:`interleaved_times`): what it costs when
    nothing else gets in its way. For choosing between candidates on a shared machine, where another
    tenant's load comes and goes for seconds at a time and only ever adds time: a median taken while
    the load was on ranks the candidates by how much they suffer from it (session 12: sparsify kept
    micro-batches of 64 for ResNet-18 at 90%, 20% slower than slices of 16 once the load had gone)."""
    times = interleaved_times(fns, device, repeats=repeats, warmup=warmup)
    return {name: min(ts) for name, ts in times.items()}
