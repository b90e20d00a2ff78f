"""Sparse-inference latency: a pruned model run dense (the best dense a user gets) vs sparsified.

``fastprune bench sparse --model vgg16 resnet18 wrn-28-4 --sparsity 0.9 0.95 0.99 --batch 1 8 64 256``

Per (model, sparsity, batch): the model is magnitude-pruned to that sparsity in every conv and
linear layer; the dense baseline is the pruned model with its masks folded into plain layers, run by
oneDNN on the CPU contiguous and channels_last, each with and without BatchNorm folded into the convs
(torch.fx), the fastest of the four counting (on CUDA: float16 and TF32, channels_last, and float16
replayed as a CUDA graph); the sparse model is ``fastprune.nn.sparsify(model, example)`` with its
default batch sizes (one per bucket: 1, 4, 16, 64, 256), the documented call. Latencies are
medians of interleaved rounds (on the CPU each round runs every contender in a burst: one untimed
call, then three timed back to back; with DeepSparse, after a 50 ms pause each, so that no
contender's threads still spin while the next runs). Outputs are checked equal (1e-4 relative).

Extra rows (unless --no-extras): a plan tuned on 64 only, run on 1 and 256, and one tuned on 1 only,
run on 64 (the untuned bucket is tuned on its first call: ``first_call_s``); ``sparsify(model)``
with no example; torch.compile of the sparse and of the dense model. Writes a CSV and a plot.

DeepSparse (optional, CPU): where a Python that imports deepsparse is found (this one,
``--deepsparse-python`` or $FASTPRUNE_DEEPSPARSE_PYTHON), the same pruned model exported to ONNX runs
on DeepSparse in a worker process, interleaved with the rows above (fastprune/benchmarks/
deepsparse_baseline.py); its outputs are checked against the dense model's (max_rel_err).
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


def _example(device: torch.device) -> torch.Tensor:
    """256 CIFAR-sized samples: sparsify's example (it repeats or cuts them to each batch size)."""
    return torch.rand(256, 3, 32, 32, device=device)


def _first_and_warm(model, x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of the next ones): a bucket tuned on first use, or
    torch.compile's compilation, shows in the first."""
    import time

    with torch.no_grad():
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        start = time.perf_counter()
        model(x)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        first = time.perf_counter() - start
        warm = interleaved_medians({"m": lambda: model(x)}, x.device, repeats=repeats, warmup=1)["m"]
    return first, warm


# Calls per contender per round on the CPU: one untimed, then timed ones back to back. With DeepSparse
# (another process), a pause before each turn lets the previous contender's spinning threads sleep.
_CPU_BURST = 4
_CPU_GAP_S = 0.05


def _sparse_layers(sparse, x: torch.Tensor) -> str:
    config = sparse.config_for(x)
    return f"{sum(c != 'dense' for c in config['layers'].values())}/{len(config['layers'])}"


def run(models, sparsities, batches, device: torch.device, repeats: int = 7, seed: int = 0,
        extras: bool = True, deepsparse_python: str | None = None) -> list[dict]:
    """Rows of the benchmark: per model, sparsity and batch, the dense variants and sparsify's model
    (tuned with the library's default batch sizes); with ``extras``, a plan used on batch sizes it
    was not tuned on, sparsify without an example, and torch.compile of both sides. With
    ``deepsparse_python`` (a Python that imports deepsparse; CPU only), DeepSparse on the same pruned
    model, interleaved with the others."""
    import time

    rows = []
    for name in models:
        for sparsity in sparsities:
            torch.manual_seed(seed)
            model = prune_model(get_model(name, 10, 3).to(device).eval(), sparsity, method="magnitude")
            dense = fold_masks(model)
            example = _example(device)
            started = time.perf_counter()
            sparse = sparsify(dense, example)
            tune_s = time.perf_counter() - started
            print(f"  {name} sparsity={sparsity}: sparsify tuned {len(sparse.tuned(device))} buckets in "
                  f"{tune_s:.0f} s", flush=True)
            variants = dense_variants(dense, device)
            # On CUDA also fastprune in float16 (sparsify of the half model), so that sparse and the
            # float16 dense baseline compare in one precision (the first H200 run had float32 only).
            sparse_half = None
            if device.type == "cuda":
                try:
                    half_model = copy_to(dense, device, dtype=torch.float16)
                    sparse_half = sparsify(half_model, example.half())
                except Exception as exc:  # noqa: BLE001 - an optional row: reported, the other rows still run
                    print(f"  {name} sparsity={sparsity}: the float16 sparse model failed: {exc}", flush=True)
            best_dense = {}
            for batch in batches:
                x = example[:batch] if batch <= example.shape[0] else torch.rand(batch, 3, 32, 32, device=device)
                fns = {k: (lambda m=m, f=f: m(f(x))) for k, (m, f) in variants.items()}
                fns["fastprune sparse"] = lambda: sparse(x)
                if sparse_half is not None:
                    fns["fastprune sparse fp16"] = lambda: sparse_half(x.half())
                engine = _deepsparse_engine(deepsparse_python, dense, x, name, sparsity)
                if engine is not None:
                    fns[f"DeepSparse {engine.version}"] = engine
                if device.type == "cuda":  # launch-bound at small batches: replay both sides as CUDA graphs
                    half, to_half = variants["dense fp16 channels_last"]
                    fns.update(graphed({"dense fp16 channels_last, CUDA graph": lambda t: half(to_half(t)),
                                        "fastprune sparse, CUDA graph": sparse}, x))
                    if sparse_half is not None:
                        fns.update(graphed({"fastprune sparse fp16, CUDA graph": lambda t: sparse_half(t.half())}, x))
                with torch.no_grad():
                    want, got = dense(x), sparse(x)
                    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
                    if sparse_half is not None:
                        got_half = sparse_half(x.half()).float()
                        err_half = ((got_half - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
                    # CPU: bursts of back-to-back calls per contender (see interleaved_medians): DeepSparse
                    # runs in another process, whose threads sleep while ours run, and ours while its run.
                    cpu = device.type == "cpu"
                    seconds = interleaved_medians(fns, device, repeats=repeats, warmup=2, burst=_CPU_BURST if cpu else 1,
                                                  gap_s=_CPU_GAP_S if cpu and engine is not None else 0.0)
                    errors = {}
                    if engine is not None:
                        theirs = engine.output()
                        errors[f"DeepSparse {engine.version}"] = ((theirs - want).abs().max()
                                                                  / want.abs().max().clamp_min(1e-12)).item()
                        engine.close()
                best_dense[batch] = min(v for k, v in seconds.items() if k.startswith("dense"))
                for impl, sec in seconds.items():
                    mine = impl.startswith("fastprune")
                    half = "fp16" in impl
                    ours = sparse_half if half else sparse
                    rows.append({"model": name, "sparsity": sparsity, "batch": batch, "impl": impl,
                                 "latency_ms": sec * 1e3, "speedup_vs_best_dense": best_dense[batch] / sec,
                                 "weight_MB": weight_bytes(ours if mine else dense) / 2**20,
                                 "sparse_layers": _sparse_layers(ours, x.half() if half else x) if mine else "",
                                 "max_rel_err": (err_half if half else err) if mine else errors.get(impl, ""),
                                 "tune_s": tune_s if mine else ""})
                theirs = "".join(f", {k} {v * 1e3:.1f} ms" for k, v in seconds.items() if k.startswith("DeepSparse"))
                print(f"  {name} sparsity={sparsity} batch={batch}: best dense {best_dense[batch] * 1e3:.1f} ms, "
                      f"sparse {seconds['fastprune sparse'] * 1e3:.1f} ms "
                      f"({best_dense[batch] / seconds['fastprune sparse']:.2f}x){theirs}", flush=True)
            if extras:
                rows += _extra_rows(name, sparsity, dense, sparse, example, best_dense, device, repeats)
    return rows


def _deepsparse_engine(python, dense, x, name, sparsity):
    """DeepSparse compiled for x's batch, or None (no DeepSparse, or it failed: said, not fatal)."""
    if python is None:
        return None
    from .deepsparse_baseline import DeepSparseEngine

    try:
        return DeepSparseEngine(python, dense, x, torch.get_num_threads())
    except (RuntimeError, OSError) as exc:
        print(f"  {name} sparsity={sparsity} batch={x.shape[0]}: DeepSparse skipped: {exc}", flush=True)
        return None


def _extra_rows(name, sparsity, dense, sparse, example, best_dense: dict, device, repeats: int) -> list[dict]:
    """Plans used off their tuned batch size (transfer), sparsify without an example (untuned: each
    bucket tuned on its first call), and the compiled sparse and dense models: first call and warm."""
    import time

    rows = []

    def row(impl, model, batch, tune_s=""):
        x = example[:batch]
        if batch not in best_dense:
            variants = dense_variants(dense, device)
            with torch.no_grad():
                best_dense[batch] = min(interleaved_medians({k: (lambda m=m, f=f: m(f(x))) for k, (m, f) in
                                                             variants.items()}, device, repeats=repeats,
                                                            warmup=2).values())
        first, warm = _first_and_warm(model, x, repeats)
        rows.append({"model": name, "sparsity": sparsity, "batch": batch, "impl": impl, "latency_ms": warm * 1e3,
                     "speedup_vs_best_dense": best_dense[batch] / warm, "first_call_s": first, "tune_s": tune_s,
                     "sparse_layers": _sparse_layers(model, x) if hasattr(model, "config_for") else ""})
        print(f"  {name} sparsity={sparsity} batch={batch} {impl}: first call {first:.2f} s, warm "
              f"{warm * 1e3:.1f} ms ({best_dense[batch] / warm:.2f}x best dense)", flush=True)

    for tuned_on, run_on in ((64, (1, 256)), (1, (64,))):
        started = time.perf_counter()
        transfer = sparsify(dense, example, batch_sizes=(tuned_on,))
        tune_s = time.perf_counter() - started
        for batch in run_on:
            row(f"fastprune sparse, tuned on {tuned_on} only", transfer, batch, tune_s)
        del transfer
    untuned = sparsify(dense)
    for batch in (1, 64):
        row("fastprune sparse, untuned (no example)", untuned, batch)
    del untuned
    torch._dynamo.reset()
    compiled_sparse = torch.compile(sparse)
    compiled_dense = torch.compile(dense)
    for batch in (1, 64):
        row("fastprune sparse, torch.compile", compiled_sparse, batch)
        row("dense (oneDNN), torch.compile" if device.type == "cpu" else "dense, torch.compile", compiled_dense, batch)
    return rows


_MEMORY_PROBE = """
import gc, json, sys, torch
from fastprune.models import get_model
from fastprune.nn import fold_masks, prune_model, sparsify

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

name, sparsity = sys.argv[1], float(sys.argv[2])
torch.manual_seed(0)
dense = fold_masks(prune_model(get_model(name, 10, 3).eval(), sparsity, method="magnitude"))
gc.collect()
weights = sum(t.numel() * t.element_size() for t in dense.state_dict().values())
x = torch.rand(256, 3, 32, 32)
reset_peak(); base = status("VmRSS")
with torch.no_grad():
    dense(x)
activations = status("VmHWM") - base
gc.collect()
reset_peak(); base = status("VmRSS")
sparse = sparsify(dense, x, repeats=1)
print(json.dumps({"weights": weights, "activations": activations, "sparsify_peak": status("VmHWM") - base}))
"""


def sparsify_memory(name: str, sparsity: float) -> dict:
    """Peak memory (Linux RSS high-water mark, in a fresh process, large blocks returned to the
    system when freed) that ``sparsify`` adds over the dense model already in memory, against the
    dense weights and a dense batch-256 run's activations."""
    import json
    import subprocess
    import sys

    # A fixed mmap threshold makes glibc return every large block when it is freed, so the RSS
    # follows the live tensors instead of what the allocator kept from earlier frees (which made
    # the dense run's activations read anywhere from 70 to 330 MB for the same model).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, name, str(sparsity)], capture_output=True, text=True,
                         check=True, env=env)
    found = json.loads(out.stdout.strip().splitlines()[-1])
    budget = 2 * found["weights"] + found["activations"]
    return {"model": name, "sparsity": sparsity, "batch": 256, "impl": "sparsify peak memory",
            "weight_MB": found["weights"] / 2**20, "activations_MB": found["activations"] / 2**20,
            "sparsify_peak_MB": found["sparsify_peak"] / 2**20, "peak_vs_budget": found["sparsify_peak"] / budget}


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
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8, 64, 256])
    parser.add_argument("--no-extras", action="store_true",
                        help="skip the rows of plans used off their tuned batch size, untuned and compiled models")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    parser.add_argument("--deepsparse-python", default=None,
                        help="a Python that imports deepsparse (default: this one if it does, else "
                             "$FASTPRUNE_DEEPSPARSE_PYTHON): DeepSparse joins the CPU rows; without one, skipped")
    parser.add_argument("--no-deepsparse", action="store_true", help="leave DeepSparse out even where it is found")
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
    deepsparse_python = None
    if device.type == "cpu" and not args.no_deepsparse:
        from .deepsparse_baseline import find_python

        deepsparse_python = find_python(args.deepsparse_python)
        print("# DeepSparse: " + (f"with {deepsparse_python}" if deepsparse_python else
                                  "not found (--deepsparse-python or $FASTPRUNE_DEEPSPARSE_PYTHON), skipped"),
              flush=True)
    rows = run(args.model, args.sparsity, args.batch, device, repeats=args.repeats, extras=not args.no_extras,
               deepsparse_python=deepsparse_python)
    if device.type == "cpu" and not args.no_extras and os.path.exists("/proc/self/clear_refs"):
        for name in args.model:
            found = sparsify_memory(name, max(args.sparsity))
            print(f"  {name}: sparsify's peak {found['sparsify_peak_MB']:.0f} MB over the dense model "
                  f"({found['peak_vs_budget']:.2f} of 2 x weights + activations)", flush=True)
            rows.append(found)
    print(markdown_table(rows, ["model", "sparsity", "batch", "impl", "latency_ms", "speedup_vs_best_dense",
                                "first_call_s", "weight_MB", "sparse_layers", "max_rel_err"]))
    base = os.path.join(args.out, f"sparse-{device_slug(device)}")
    write_csv([{**row, **meta} for row in rows], base + ".csv")
    plot(rows, base + ".png")
    print(f"wrote {base}.csv and {base}.png")
    return 0
