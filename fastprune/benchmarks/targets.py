"""The GPU targets (the GPU issue's table), read off the benchmarks' CSV files: met, not met, or not
measured, each with its figure. ``python -m fastprune.benchmarks.targets RESULTS_DIR [--out FILE]``
prints a markdown table (and writes it to FILE); scripts/gpu_check.sh runs it on its results.
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import sys
from typing import Callable


def _rows(results: str, suite: str) -> list[dict]:
    """Rows of every <suite>-<device>.csv under ``results`` except the CPU's (quick runs included)."""
    rows = []
    for path in sorted(glob.glob(os.path.join(results, f"{suite}-*.csv"))):
        if os.path.basename(path).startswith(f"{suite}-cpu"):
            continue
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def _num(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _pgd_step(results: str) -> list[tuple]:
    out = []
    rows = _rows(results, "attacks")
    for shape in ("256x3x32x32", "1024x3x224x224"):
        fused = [r for r in rows if r.get("section") == "pgd_step" and r.get("shape") == shape
                 and r.get("norm") == "linf" and r.get("impl", "").startswith("fastprune (")
                 and "reference" not in r.get("impl", "")]
        best = max(fused, key=lambda r: _num(r.get("vs_copy")) or 0, default=None)
        figure = _num(best.get("vs_copy")) if best else None
        out.append((f"pgd_step Linf float32 {shape}: bandwidth vs a device copy", ">= 0.80", figure,
                    None if figure is None else figure >= 0.8,
                    best and f"{best['impl']}, {float(best['GB/s']):.0f} GB/s"))
    return out


def _pgd10(results: str) -> list[tuple]:
    rows = [r for r in _rows(results, "attacks") if r.get("section") == "attack" and r.get("attack") == "PGD-10"]
    base = next((r for r in rows if r.get("impl") == "torchattacks"), None)
    ours = [r for r in rows if r.get("impl") == "fastprune" and "amp" in r.get("options", "")
            and "cuda_graph" in r.get("options", "")]
    best = max(ours, key=lambda r: _num(r.get("speedup")) or 0, default=None)
    if not (base and best):
        return [("PGD-10 ResNet-18 batch 256, amp + cuda_graph vs torchattacks", ">= 2x, acc within 0.5 pt",
                 None, None, None)]
    speedup = _num(best["speedup"])
    gap = abs(_num(best["robust_acc"]) - _num(base["robust_acc"])) * 100
    return [("PGD-10 ResNet-18 batch 256, amp + cuda_graph vs torchattacks", ">= 2x, acc within 0.5 pt", speedup,
             speedup >= 2 and gap <= 0.5, f"{best['options']}; robust accuracy gap {gap:.2f} points")]


def _autoattack(results: str) -> list[tuple]:
    """bench/attacks.py's AutoAttack section: the best fastprune option against torchattacks' suite
    (at AutoAttack's settings) on each model, and the largest robust-accuracy gap."""
    rows = [r for r in _rows(results, "attacks") if r.get("section") == "autoattack"
            and r.get("component") == "AutoAttack"]
    name, target = "AutoAttack standard vs torchattacks' (same settings), every model", ">= 3x, acc within 0.3 pt"
    models = sorted({r.get("model") for r in rows})
    speedups, gaps = [], []
    for model in models:
        base = next((r for r in rows if r.get("model") == model and r.get("impl") == "torchattacks"), None)
        ours = [r for r in rows if r.get("model") == model and r.get("impl") == "fastprune"]
        if not (base and ours):
            continue
        best = max(ours, key=lambda r: _num(r.get("speedup")) or 0)
        speedups.append(_num(best["speedup"]))
        gaps.append(max(abs(_num(r["robust_acc"]) - _num(base["robust_acc"])) * 100 for r in ours))
    if not speedups:
        return [(name, target, None, None, None)]
    low, gap = min(speedups), max(gaps)
    return [(name, target, low, low >= 3 and gap <= 0.3,
             f"{len(speedups)} models; largest robust-accuracy gap {gap:.2f} points")]


def _gram(results: str) -> list[tuple]:
    out = []
    rows = _rows(results, "hsic")
    for d in ("16384", "65536"):
        row = next((r for r in rows if r.get("section") == "single" and r.get("estimator") == "biased"
                    and r.get("m") == "128" and r.get("d") == d and r.get("impl") == "fastprune"), None)
        figure = _num(row.get("vs_floor")) if row else None
        out.append((f"gaussian_gram fwd+bwd m=128 d={d}: time vs the cuBLAS products", "<= 1.5x", figure,
                    None if figure is None else figure <= 1.5, row and f"{float(row['fwd+bwd_ms']):.3f} ms"))
    return out


def _bottleneck(results: str) -> list[tuple]:
    rows = [r for r in _rows(results, "hsic") if r.get("section") == "bottleneck" and r.get("model") == "resnet18"]
    out = []
    for impl, target in (("paper-style", 50.0), ("compile", 2.0)):
        row = next((r for r in rows if r.get("impl") == impl), None)
        figure = _num(row.get("fastprune_speedup")) if row else None
        out.append((f"hsic_bottleneck ResNet-18 m=128 vs {impl}", f">= {target:g}x", figure,
                    None if figure is None else figure >= target, None))
    return out


def _sparse(results: str) -> list[tuple]:
    rows = _rows(results, "sparse")
    out = []
    for model in ("resnet18", "vgg16"):
        mine = [r for r in rows if r.get("model") == model and r.get("impl", "").startswith("fastprune")]
        at256 = [r for r in mine if r.get("batch") == "256" and _num(r.get("sparsity")) == 0.99]
        best = max(at256, key=lambda r: _num(r["speedup_vs_best_dense"]), default=None)
        figure = _num(best["speedup_vs_best_dense"]) if best else None
        out.append((f"sparse {model} 99% batch 256 vs fp16 cuDNN (channels_last, CUDA graph)", ">= 2x", figure,
                    None if figure is None else figure >= 2, best and best["impl"]))
        worst = {}
        for r in mine:
            if r.get("impl") in ("fastprune sparse", "fastprune sparse, CUDA graph"):
                key = (r["batch"], r["sparsity"])
                worst[key] = max(worst.get(key, 0.0), _num(r["speedup_vs_best_dense"]))
        low = min(worst.values(), default=None)
        out.append((f"sparse {model}: never slower than dense at every batch benchmarked", ">= 0.97x", low,
                    None if low is None else low >= 0.97, f"{len(worst)} (batch, sparsity) points" if worst else None))
        # plans used off the batch size they were tuned on, and sparsify without an example (warm)
        off = [_num(r["speedup_vs_best_dense"]) for r in mine
               if "tuned on" in r.get("impl", "") or "untuned" in r.get("impl", "")]
        low = min(off, default=None)
        out.append((f"sparse {model}: transferred and untuned plans, warm", ">= 0.97x", low,
                    None if low is None else low >= 0.97, f"{len(off)} rows" if off else None))
    return out


def _train(results: str) -> list[tuple]:
    rows = [r for r in _rows(results, "train") if r.get("loop") == "ratio"]

    def find(text):
        return next((_num(r["value"]) for r in rows if text in r.get("ratio", "")), None)

    hydra = find("fastprune HYDRA vs paper-faithful HYDRA")
    pwoa = find("fastprune PwoA retrain vs fastprune HYDRA prune phase")
    return [("HYDRA prune-phase epoch vs the paper-faithful loop", ">= 2x", hydra,
             None if hydra is None else hydra >= 2, None),
            ("PwoA retrain epoch vs fastprune's HYDRA prune-phase epoch", ">= 5x cheaper", pwoa,
             None if pwoa is None else pwoa >= 5, None)]


CHECKS: list[Callable[[str], list[tuple]]] = [_pgd_step, _pgd10, _autoattack, _gram, _bottleneck, _sparse, _train]


def evaluate(results: str) -> list[dict]:
    """One dict per target: what, target, figure (None: not measured), met (None: not measured), note."""
    out = []
    for check in CHECKS:
        for what, target, figure, met, note in check(results):
            out.append({"what": what, "target": target, "figure": figure, "met": met, "note": note or ""})
    return out


def markdown(targets: list[dict]) -> str:
    lines = ["| target | required | measured | met | note |", "|---|---|---|---|---|"]
    for t in targets:
        figure = "-" if t["figure"] is None else f"{t['figure']:.3g}"
        met = "not measured" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['what']} | {t['target']} | {figure} | {met} | {t['note']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastprune.benchmarks.targets", description=__doc__.splitlines()[0])
    parser.add_argument("results", help="folder of the benchmarks' CSV files")
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.results):
        parser.error(f"results: {args.results!r} is not a folder")
    table = markdown(evaluate(args.results))
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
