"""Sparse-inference latency: a pruned model run dense (the best dense a user gets) vs sparsified.

``fastprune bench sparse --model vgg16 resnet18 wrn-28-4 --sparsity 0.9 0.95 0.99 --batch 1 64 256``

Per (model, sparsity, batch): the model is magnitude-pruned to that sparsity in every conv and
linear layer; the dense baseline is the pruned model with its masks folded into plain layers, run by
oneDNN on the CPU contiguous and channels_last, each with and without BatchNorm folded into the convs
(torch.fx), the fastest of the four counting (on CUDA: float16 and TF32, channels_last, and float16
replayed as a CUDA graph); the sparse model is ``fastprune.nn.sparsify`` of it, which times every
layer dense and sparse on its real input and keeps the faster. Latencies are medians of interleaved
rounds. Outputs are checked equal (1e-4 relative). Writes a CSV and a plot.
"""
from __future__ import annotations

import argparse
import os

import torch

from ..models import get_model
from ..nn.masked import fold_masks, prune_model
from ..nn.sparse import SparseConv2d, SparseLinear, fold_batchnorm, sparsify
from .common import (cuda_graphed, device_label, device_slug, interleaved_medians, markdown_table, versions,
                     write_csv)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of conv/linear weights as stored: dense tensors, or CSR buffers for sparse layers."""
    total = 0
    for module in model.modules():
        if isinstance(module, (SparseConv2d, SparseLinear)):
            total += sum(t.numel() * t.element_size() for t in (module.row_ptr, module.col_idx, module.values))
        elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            total += module.weight.numel() * module.weight.element_size()
    return total


def dense_variants(model: torch.nn.Module, device: torch.device) -> dict:
    """The dense baselines a user would try, as name -> (model, input transform)."""
    if device.type == "cuda":
        half = copy_to(model, device, dtype=torch.float16, channels_last=True)
        tf32 = copy_to(model, device, channels_last=True)
        return {"dense fp16 channels_last": (half, lambda x: x.half().contiguous(memory_format=torch.channels_last)),
                "dense tf32 channels_last": (tf32, lambda x: x.contiguous(memory_format=torch.channels_last))}
    to_cl = lambda x: x.contiguous(memory_format=torch.channels_last)  # noqa: E731
    folded = fold_batchnorm(copy_to(model, device))  # conv+BN folded, as torch.fx's fuse does
    return {"dense (oneDNN)": (model, lambda x: x),
            "dense (oneDNN) channels_last": (copy_to(model, device, channels_last=True), to_cl),
            "dense (oneDNN) BN folded": (folded, lambda x: x),
            "dense (oneDNN) BN folded, channels_last": (copy_to(folded, device, channels_last=True), to_cl)}


def copy_to(model, device, dtype=None, channels_last=False):
    import copy

    out = copy.deepcopy(model).to(device)
    if dtype is not None:
        out = out.to(dtype)
    if channels_last:
        out = out.to(memory_format=torch.channels_last)
    return out.eval()


def run(models, sparsities, batches, device: torch.device, repeats: int = 7, seed: int = 0) -> list[dict]:
    rows = []
    for name in models:
        for sparsity in sparsities:
            torch.manual_seed(seed)
            model = prune_model(get_model(name, 10, 3).to(device).eval(), sparsity, method="magnitude")
            dense = fold_masks(model)
            for batch in batches:
                x = torch.rand(batch, 3, 32, 32, device=device)
                sparse = sparsify(dense, x)
                variants = dense_variants(dense, device)
                fns = {k: (lambda m=m, f=f: m(f(x))) for k, (m, f) in variants.items()}
                fns["fastprune sparse"] = lambda: sparse(x)
                if device.type == "cuda":  # launch-bound at small batches: replay both sides as CUDA graphs
                    half, to_half = variants["dense fp16 channels_last"]
                    fns.update(graphed({"dense fp16 channels_last, CUDA graph": lambda t: half(to_half(t)),
                                        "fastprune sparse, CUDA graph": sparse}, x))
                with torch.no_grad():
                    want, got = dense(x), sparse(x)
                    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
                    seconds = interleaved_medians(fns, device, repeats=repeats, warmup=2)
                best_dense = min(v for k, v in seconds.items() if k.startswith("dense"))
                kept = sum(d["kept"] == "sparse" for d in sparse.sparsify_decisions.values())
                for impl, sec in seconds.items():
                    rows.append({"model": name, "sparsity": sparsity, "batch": batch, "impl": impl,
                                 "latency_ms": sec * 1e3, "speedup_vs_best_dense": best_dense / sec,
                                 "weight_MB": weight_bytes(sparse if impl.startswith("fastprune") else dense) / 2**20,
                                 "sparse_layers": f"{kept}/{len(sparse.sparsify_decisions)}" if impl.startswith(
                                     "fastprune") else "", "max_rel_err": err if impl.startswith("fastprune") else ""})
                print(f"  {name} sparsity={sparsity} batch={batch}: best dense {best_dense * 1e3:.1f} ms, "
                      f"sparse {seconds['fastprune sparse'] * 1e3:.1f} ms "
                      f"({best_dense / seconds['fastprune sparse']:.2f}x, {kept} sparse layers)", flush=True)
    return rows


def graphed(fns: dict, x: torch.Tensor) -> dict:
    """name -> replay of fn(x) captured in a CUDA graph, for those that capture."""
    out = {}
    for name, fn in fns.items():
        try:
            out[name] = cuda_graphed(fn, x)
        except RuntimeError as exc:  # e.g. an op that syncs with the host: report, time the rest
            print(f"  {name}: not capturable ({str(exc).splitlines()[0][:120]})", flush=True)
    return out


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    keys = sorted({(r["model"], r["batch"]) for r in rows})
    for model, batch in keys:
        pts = sorted((r["sparsity"], r["speedup_vs_best_dense"]) for r in rows
                     if r["model"] == model and r["batch"] == batch and r["impl"] == "fastprune sparse")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{model}, batch {batch}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("speed-up vs best dense")
    ax.set_title("fastprune sparse inference")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastprune bench sparse", description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["vgg16", "resnet18"])
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.9, 0.95, 0.99])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    args = parser.parse_args(argv)
    for s in args.sparsity:
        if not 0 <= s < 1:
            raise ValueError(f"--sparsity values must be in [0, 1), got {s}")
    for b in args.batch:
        if b < 1:
            raise ValueError(f"--batch values must be at least 1, got {b}")
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    from ..models import available_models

    unknown = [m for m in args.model if m not in available_models()]
    if unknown:
        raise ValueError(f"--model {unknown}: unknown; available: {available_models()}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda given but no CUDA device is available")
    device = torch.device(args.device)
    meta = {"device": device_label(device), **versions()}
    print(f"# sparse inference on {meta['device']} (torch {meta['torch']})", flush=True)
    rows = run(args.model, args.sparsity, args.batch, device, repeats=args.repeats)
    print(markdown_table(rows, ["model", "sparsity", "batch", "impl", "latency_ms", "speedup_vs_best_dense",
                                "weight_MB", "sparse_layers"]))
    base = os.path.join(args.out, f"sparse-{device_slug(device)}")
    write_csv([{**row, **meta} for row in rows], base + ".csv")
    plot(rows, base + ".png")
    print(f"wrote {base}.csv and {base}.png")
    return 0
