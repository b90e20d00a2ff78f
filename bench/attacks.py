"""Attack benchmarks, side by side in one run (python bench/attacks.py [--device cuda]).

(a) pgd_step alone: GB/s of fastprune's fused step (every backend that runs here) vs the
    torchattacks-style sequence of eager ops, and vs a plain device copy (the bandwidth ceiling).
(b) Whole attacks: images/s of PGD-10 and APGD-CE (100 iterations) with fastprune (options off and
    on) vs torchattacks, with each one's robust accuracy on the same model and images.
    CPU: cnn-small on digits (8x8). GPU: CIFAR ResNet-18 on digits upscaled to 3x32x32, batch 256.
    Both models are trained in this run (seconds), so robust accuracies mean something.
(c) AutoAttack standard: fastprune's AutoAttack vs torchattacks' at AutoAttack's settings (its
    AutoAttack class defaults to 10 iterations for APGD, APGD-T and FAB; the reference and fastprune
    use 100, and Square without the rescaled schedule), on the demo's models (cnn-wide PGD-trained on
    digits at eps 0.1, and its LWM-pruned copy at 95%) and a PGD-trained LeNet at eps 0.2: robust
    accuracy after each component and the images/s of the whole suite (one interleaved round: a
    suite takes minutes here; the timed runs are the compared ones).

Writes bench/results/attacks-<device>.csv and prints markdown tables.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastprune  # noqa: E402
from fastprune.benchmarks.common import (  # noqa: E402
    device_label, interleaved_medians, markdown_table, save_results, versions)
from fastprune import backends  # noqa: E402
from fastprune.attacks import APGD, PGD  # noqa: E402
from fastprune.data import get_dataset  # noqa: E402
from fastprune.models import get_model  # noqa: E402
from fastprune.train import train_classifier  # noqa: E402

EPS = 0.1  # digits pixels are in [0, 1]


# --- (a) the step alone -----------------------------------------------------------------------
def torchattacks_style_step(x_adv, grad, x_nat, alpha, eps, norm):
    """The elementwise ops torchattacks' PGD / PGDL2 run per step (torchattacks 3.5)."""
    if norm == "linf":
        adv = x_adv + alpha * grad.sign()
        delta = torch.clamp(adv - x_nat, min=-eps, max=eps)
        return torch.clamp(x_nat + delta, min=0, max=1)
    n = x_adv.shape[0]
    grad_norms = torch.norm(grad.view(n, -1), p=2, dim=1) + 1e-10
    adv = x_adv + alpha * grad / grad_norms.view(n, 1, 1, 1)
    delta = adv - x_nat
    factor = torch.min(eps / torch.norm(delta.view(n, -1), p=2, dim=1), torch.ones(n, device=adv.device))
    return torch.clamp(x_nat + delta * factor.view(-1, 1, 1, 1), min=0, max=1)


def time_kernels(fns: dict, device) -> dict[str, float]:
    if device.type == "cuda":
        import triton.testing

        return {k: triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
                for k, fn in fns.items()}
    return interleaved_medians(fns, device, repeats=30, warmup=3)


def graphed(fn, name: str):
    """fn captured once in a CUDA graph; the returned callable replays it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up outside the capture (compilation, allocator)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as err:  # a host sync inside, say: report it and leave the row out
        print(f"{name}: not captured in a CUDA graph ({err})", flush=True)
        return None
    return graph.replay


def bench_step(device: torch.device, quick: bool) -> list[dict]:
    shapes = [(256, 3, 32, 32)]
    if device.type == "cuda":
        shapes.append((1024, 3, 224, 224))  # 616 MB a tensor: far larger than L2, a bandwidth measurement
    elif not quick:
        shapes.append((1024, 3, 64, 64))
    rows = []
    for shape in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        x_nat = torch.rand(shape, device=device, generator=gen)
        x_adv = (x_nat + 0.01 * torch.randn(shape, device=device, generator=gen)).clamp(0, 1)
        grad = torch.randn(shape, device=device, generator=gen)
        out = torch.empty_like(x_adv)
        n = shape[0]
        alpha, eps = torch.full((n,), 2 / 255, device=device), torch.full((n,), 8 / 255, device=device)
        step_bytes, copy_bytes = 4 * x_adv.numel() * 4, 2 * x_adv.numel() * 4
        fns = {"device copy": lambda: out.copy_(x_adv)}
        for norm in ("linf", "l2"):
            for backend in backends.BACKENDS:
                if not backends.backend_runs_on(backend, device) or (backend == "triton" and device.type == "cpu"):
                    continue  # the Triton interpreter is a correctness tool, not a speed one

                def run(backend=backend, norm=norm):
                    with fastprune.use_backend(backend):
                        fastprune.pgd_step_(out, grad, x_nat, alpha=alpha, eps=eps, norm=norm)

                fns[f"{norm}|fastprune ({backend})"] = run
            fns[f"{norm}|torchattacks-style eager"] = (
                lambda norm=norm: torchattacks_style_step(x_adv, grad, x_nat, 2 / 255, 8 / 255, norm))
        if device.type == "cuda":
            # The same calls replayed from a CUDA graph: the kernels' own speed, without the host's
            # dispatch and launch time (which is most of a 3 MB step's time; attacks with
            # cuda_graph=True run their steps this way).
            for key in [k for k in fns if k == "device copy" or "fastprune (" in k and "reference" not in k]:
                replay = graphed(fns[key], key)
                if replay is not None:
                    fns[key + " (cuda graph)" if key == "device copy" else key[:-1] + ", cuda graph)"] = replay
        seconds = time_kernels(fns, device)
        copy_gbps = copy_bytes / seconds["device copy"] / 1e9
        base = {"section": "pgd_step", "shape": "x".join(map(str, shape)), "dtype": "float32"}
        rows.append({**base, "norm": "-", "impl": "device copy", "median_ms": seconds["device copy"] * 1e3,
                     "GB/s": copy_gbps, "vs_copy": 1.0})
        graph_copy_gbps = None
        if "device copy (cuda graph)" in seconds:
            graph_copy_gbps = copy_bytes / seconds["device copy (cuda graph)"] / 1e9
            rows.append({**base, "norm": "-", "impl": "device copy (cuda graph)",
                         "median_ms": seconds["device copy (cuda graph)"] * 1e3, "GB/s": graph_copy_gbps,
                         "vs_copy": 1.0})
        for key, s in seconds.items():
            if key.startswith("device copy"):
                continue
            norm, label = key.split("|")
            gbps = step_bytes / s / 1e9
            reference_gbps = graph_copy_gbps if "cuda graph" in label else copy_gbps  # like against like
            rows.append({**base, "norm": norm, "impl": label, "median_ms": s * 1e3, "GB/s": gbps,
                         "vs_copy": gbps / reference_gbps,
                         "speedup_vs_eager": seconds[f"{norm}|torchattacks-style eager"] / s})
    return rows


# --- (b) whole attacks ------------------------------------------------------------------------
def bench_model(device: torch.device):
    """(model, images, labels): a model trained here on digits, and every digits image."""
    data = get_dataset("digits")
    x = torch.cat([data.train.tensors[0], data.test.tensors[0]])
    y = torch.cat([data.train.tensors[1], data.test.tensors[1]])
    torch.manual_seed(0)
    if device.type == "cuda":  # CIFAR-shaped inputs for the CIFAR ResNet-18
        x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)
        model = get_model("resnet18", 10, 3).to(device)
        train_x = x[: len(data.train)]
    else:
        model = get_model("cnn-small", 10, 1)
        train_x = data.train.tensors[0]
    train = torch.utils.data.TensorDataset(train_x, data.train.tensors[1])
    train_classifier(model, train, epochs=10, progress=False)
    return model.eval(), x.to(device), y.to(device)


def robust_accuracy(model, attack, x, y, batch) -> float:
    correct = 0
    for s in range(0, x.shape[0], batch):
        xb, yb = x[s:s + batch], y[s:s + batch]
        x_adv = attack(xb, yb)  # outside no_grad: torchattacks needs autograd enabled
        with torch.no_grad():
            correct += (model(x_adv).argmax(1) == yb).sum().item()
    return correct / x.shape[0]


def bench_attacks(device: torch.device, quick: bool) -> list[dict]:
    try:
        import torchattacks
    except ImportError:  # e.g. a GPU machine without network: scripts/gpu_check.sh carries its wheel
        print("torchattacks is not installed: the whole-attack comparison is skipped", flush=True)
        return []

    model, x, y = bench_model(device)
    batch = 256
    xb, yb = x[:batch], y[:batch]
    variants = [("off", {})]
    if device.type == "cuda":
        variants += [("amp", {"amp": True}), ("channels_last", {"channels_last": True}),
                     ("cuda_graph", {"cuda_graph": True}),
                     ("amp+channels_last+cuda_graph", {"amp": True, "channels_last": True, "cuda_graph": True})]
    else:
        variants += [("amp (bf16)", {"amp": True}), ("channels_last", {"channels_last": True})]
    apgd_steps = 20 if quick else 100
    setups = {
        "PGD-10": (
            lambda m, **o: PGD(m, eps=EPS, alpha=EPS / 4, steps=10, seed=0, **o),
            lambda m: torchattacks.PGD(m, eps=EPS, alpha=EPS / 4, steps=10, random_start=True),
        ),
        f"APGD-CE-{apgd_steps}": (
            lambda m, **o: APGD(m, eps=EPS, steps=apgd_steps, loss="ce", seed=0, **o),
            lambda m: torchattacks.APGD(m, eps=EPS, steps=apgd_steps, loss="ce", n_restarts=1, seed=0),
        ),
    }
    rows = []
    repeats = 3 if quick else 7
    for attack_name, (ours, theirs) in setups.items():
        attacks = {"torchattacks": theirs(model)}
        models = {"torchattacks": model}
        for label, options in variants:
            models[label] = copy.deepcopy(model)  # channels_last converts the model; keep the others as they are
            attacks[label] = ours(models[label], **options)
        torch.manual_seed(0)
        seconds = interleaved_medians({k: (lambda a=a: a(xb, yb)) for k, a in attacks.items()}, device,
                                      repeats=repeats, warmup=1)
        base = {"section": "attack", "attack": attack_name, "model": type(model).__name__, "batch": batch}
        for label, atk in attacks.items():
            rows.append({**base, "impl": "torchattacks" if label == "torchattacks" else "fastprune",
                         "options": "-" if label == "torchattacks" else label,
                         "median_ms": seconds[label] * 1e3, "images/s": batch / seconds[label],
                         "speedup": seconds["torchattacks"] / seconds[label],
                         "robust_acc": robust_accuracy(models[label], atk, x, y, batch)})
            print(f"  {attack_name} {label}: {batch / seconds[label]:.0f} img/s", flush=True)
    return rows


# --- (c) AutoAttack ---------------------------------------------------------------------------------
def autoattack_models(device: torch.device, quick: bool) -> list[tuple[str, torch.nn.Module, float]]:
    """(name, model, eps): the demo's base and pruned models and a PGD-trained LeNet, trained here."""
    from fastprune.prune import lwm
    from fastprune.study import StudySettings
    from fastprune.train import PGDTraining, fit

    data = get_dataset("digits")
    s = StudySettings.quick() if quick else StudySettings()
    models = []
    torch.manual_seed(0)
    base = get_model(s.model, data.num_classes, data.in_channels).to(device)
    fit(base, data.train, objective=PGDTraining(s.eps, s.eps / 4, s.train_steps), epochs=s.base_epochs,
        lr=s.base_lr, batch_size=s.batch_size, weight_decay=5e-4, seed=0, progress=False)
    models.append((f"{s.model} PGD-AT (demo base)", base.eval(), s.eps))
    torch.manual_seed(0)
    pruned = lwm(copy.deepcopy(base), data.train, sparsity=0.95, objective=PGDTraining(s.eps, s.eps / 4, s.train_steps),
                 finetune_epochs=s.finetune_epochs, finetune_lr=s.finetune_lr, batch_size=s.batch_size, seed=0,
                 progress=False)
    models.append((f"{s.model} LWM 95% (demo)", pruned.eval(), s.eps))
    if not quick:
        torch.manual_seed(0)
        lenet = get_model("lenet", data.num_classes, data.in_channels).to(device)
        fit(lenet, data.train, objective=PGDTraining(0.2, 0.05, 7), epochs=20, lr=0.05, batch_size=64,
            weight_decay=5e-4, seed=0, progress=False)
        models.append(("lenet PGD-AT", lenet.eval(), 0.2))
    return models


def torchattacks_autoattack(torchattacks, model, eps: float, n_queries: int, steps: int):
    """torchattacks' AutoAttack (standard) set to AutoAttack's settings: its components' iterations
    (torchattacks defaults to 10) and Square without the rescaled schedule, as the reference runs.
    It counts the points still robust after each component (MultiAttack's records)."""
    attack = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=10, seed=0)
    multi = attack._autoattack
    for component in multi.attacks[:3]:
        component.steps = steps
    multi.attacks[3].n_queries, multi.attacks[3].rescale_schedule = n_queries, False
    multi._accumulate_multi_atk_records = True
    return attack


def _robust(model, x_adv, y) -> torch.Tensor:
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def bench_autoattack(device: torch.device, quick: bool, images: int | None) -> list[dict]:
    try:
        import torchattacks
    except ImportError:
        print("torchattacks is not installed: the AutoAttack comparison is skipped", flush=True)
        return []
    from fastprune.attacks import AutoAttack

    data = get_dataset("digits")
    x, y = (t.to(device) for t in data.test.tensors)
    images = images or (100 if quick else None)
    if images:
        x, y = x[:images], y[:images]
    n_queries, steps = (200, 20) if quick else (5000, 100)
    variants = [("off", {}), ("amp (bf16)" if device.type == "cpu" else "amp", {"amp": True}),
                ("channels_last", {"channels_last": True})]
    rows = []
    for name, model, eps in autoattack_models(device, quick):
        print(f"  AutoAttack on {name}, eps {eps}, {x.shape[0]} images", flush=True)
        with torch.no_grad():
            clean = _robust(model, x, y)
        base = {"section": "autoattack", "model": name, "eps": eps, "images": x.shape[0], "steps": steps,
                "n_queries": n_queries}
        theirs = torchattacks_autoattack(torchattacks, model, eps, n_queries, steps)
        contenders = {"torchattacks": (model, theirs)}
        for label, options in variants:
            copied = copy.deepcopy(model)
            contenders[label] = (copied, AutoAttack(copied, eps=eps, steps=steps, n_queries=n_queries, seed=0,
                                                    **options))
        # One interleaved round (a whole suite takes minutes here); each run's output is kept for
        # the accuracy comparison, so the timed runs are the compared runs.
        final = {}
        theirs._autoattack._multi_atk_records = [0.0] * 5
        seconds = interleaved_medians({k: (lambda a=a, k=k: final.__setitem__(k, a[1](x, y)))
                                       for k, a in contenders.items()}, device, repeats=1, warmup=0)
        records = theirs._autoattack._multi_atk_records  # robust count before and after each component
        ours = contenders["off"][1]
        for i, component in enumerate(ours.components):
            # torchattacks' records count points correctly classified at the start (clean right).
            theirs_after = records[i + 1] / x.shape[0] if i + 1 < len(records) and records[i + 1] else 0.0
            rows.append({**base, "component": component,
                         "fastprune_after": ours.robust_after[component].float().mean().item(),
                         "torchattacks_after": theirs_after})
        for label, (m, _) in contenders.items():
            rows.append({**base, "component": "AutoAttack", "impl": "torchattacks" if label == "torchattacks"
                         else "fastprune", "options": "-" if label == "torchattacks" else label,
                         "seconds": seconds[label], "images/s": x.shape[0] / seconds[label],
                         "speedup": seconds["torchattacks"] / seconds[label],
                         "robust_acc": (_robust(m, final[label], y) & clean).float().mean().item()})
            print(f"    {label}: {x.shape[0] / seconds[label]:.2f} img/s, robust {rows[-1]['robust_acc']:.4f}",
                  flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and APGD iterations")
    parser.add_argument("--only", choices=("step", "attacks", "autoattack"), default=None,
                        help="run one section (default: all; the file then holds only that section's rows)")
    parser.add_argument("--images", type=int, default=None,
                        help="AutoAttack on the first N digits test images (default: all 450; --quick: 100)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    meta = {"device": device_label(device), **versions()}
    print(f"# attacks benchmark on {meta['device']} (torch {meta['torch']}, triton {meta['triton']})", flush=True)
    rows = []
    if args.only in (None, "step"):
        rows += bench_step(device, args.quick)
        print(markdown_table([r for r in rows if r["section"] == "pgd_step"],
                             ["shape", "norm", "impl", "median_ms", "GB/s", "vs_copy", "speedup_vs_eager"]))
    if args.only in (None, "attacks"):
        rows += bench_attacks(device, args.quick)
        print(markdown_table([r for r in rows if r["section"] == "attack"],
                             ["attack", "impl", "options", "median_ms", "images/s", "speedup", "robust_acc"]))
    if args.only in (None, "autoattack"):
        rows += bench_autoattack(device, args.quick, args.images)
        aa = [r for r in rows if r["section"] == "autoattack"]
        print(markdown_table([r for r in aa if r["component"] != "AutoAttack"],
                             ["model", "eps", "component", "fastprune_after", "torchattacks_after"]))
        print(markdown_table([r for r in aa if r["component"] == "AutoAttack"],
                             ["model", "impl", "options", "seconds", "images/s", "speedup", "robust_acc"]))
    save_results(rows, meta, args.out, "attacks" if args.only is None else f"attacks-{args.only}", device,
                 args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
