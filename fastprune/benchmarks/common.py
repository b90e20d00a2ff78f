"""Helpers every benchmark shares: machine naming, median timing, CSV and markdown output."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import re
import statistics
import time
from typing import Callable

import torch


def device_label(device: torch.device) -> str:
    """A human-readable name of the machine the numbers come from."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"model name\s*:\s*(.+)", f.read())
        cpu = names[0].strip() if names else cpu
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def device_slug(device: torch.device) -> str:
    """A file-name tag: 'cpu', or the GPU's name ('nvidia-h100-80gb-hbm3')."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def versions() -> dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    return {"torch": torch.__version__, "triton": triton_version, "date": datetime.date.today().isoformat()}


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


def interleaved_medians(fns: dict[str, Callable[[], object]], device: torch.device, *, repeats: int = 10,
                        warmup: int = 1) -> dict[str, float]:
    """Median seconds of each fn, timed in interleaved rounds (every fn once per round), so that
    drift in the machine's speed (shared or throttled CPUs) hits every contender alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(median_time(fn, device, repeats=1, warmup=0))
    return {name: statistics.median(ts) for name, ts in times.items()}


def write_csv(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def save_results(rows: list[dict], meta: dict, out_dir: str, suite: str, device: torch.device,
                 quick: bool = False) -> str:
    """Write ``rows`` (each with ``meta``: device, versions) to <out_dir>/<suite>-<device>[-quick].csv,
    say so, and return the path."""
    path = os.path.join(out_dir, f"{suite}-{device_slug(device)}{'-quick' if quick else ''}.csv")
    write_csv([{**row, **meta} for row in rows], path)
    print(f"wrote {path}")
    return path


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
