"""Helpers every benchmark shares: machine naming, median timing, CSV and markdown output."""
from __future__ import annotations

import csv
import datetime
import os
import platform
import re

import torch

from ..utils.timing import cuda_graphed, interleaved_medians, median_time  # noqa: F401 - re-exported


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
