"""HSIC benchmarks, side by side in one run (python bench/hsic.py [--device cuda] [--quick]).

Single layer, HSIC(X, Z) with Gaussian kernels, forward, backward and both, for
  paper-style   what HBaR/PwoA's released code does (shared/docs/FIELD.md): kernel matrices moved to
                the CPU, a dense m x m centring matrix H, K @ H products and two explicit inverses
                (NOCCO), written here from that description;
  eager         best-practice eager PyTorch on the device: cdist, O(m^2) centring of both matrices;
  compile       torch.compile of the eager version;
  fastprune     fastprune.hsic;
  floor         the m x m x d matrix products no implementation avoids (x x^T and z z^T forward,
                S z backward), timed as torch.mm.
Then PwoA's real workload: hsic_bottleneck over every block output of a CIFAR ResNet-18 (and on
GPU a WRN-34-10) at m = 128, against the paper-style loop (two NOCCO calls per layer).

Writes bench/results/hsic-<device>.csv and prints markdown tables.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastprune  # noqa: E402
from fastprune.benchmarks.common import (  # noqa: E402
    device_label, interleaved_medians, markdown_table, save_results, versions)

SIGMA = 5.0  # PwoA/HBaR: sigma 5, scaled by sqrt(d)
EPS = 1e-5


# --- peers ----------------------------------------------------------------------------------------
def paper_style_nocco(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """NOCCO the way the papers' code computes it: Gaussian kernels from a distance matrix, then
    moved to the CPU, centred with a dense H, and two m x m inverses there."""
    def centred_kernel(a):
        m = a.shape[0]
        a = a.reshape(m, -1)
        sq = (a * a).sum(dim=1, keepdim=True)
        dist = sq - 2 * a @ a.T + sq.T
        k = torch.exp(-dist / (2 * SIGMA ** 2 * a.shape[1])).cpu()
        h = torch.eye(m) - torch.ones(m, m) / m
        return k @ h

    kx, kz = centred_kernel(x), centred_kernel(z)
    m = kx.shape[0]
    eye = torch.eye(m)
    rx = kx @ torch.inverse(kx + EPS * m * eye)
    rz = kz @ torch.inverse(kz + EPS * m * eye)
    return (rx * rz.T).sum()


def eager_hsic(x: torch.Tensor, z: torch.Tensor, estimator: str = "nocco") -> torch.Tensor:
    """Best-practice eager PyTorch on the device: cdist, both matrices centred in O(m^2)."""
    def centred_kernel(a):
        a = a.reshape(a.shape[0], -1)
        k = torch.exp(-torch.cdist(a, a).square() / (2 * SIGMA ** 2 * a.shape[1]))
        return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()

    kx, kz = centred_kernel(x), centred_kernel(z)
    m = kx.shape[0]
    if estimator == "biased":
        return (kx * kz).sum() / (m - 1) ** 2
    eye = torch.eye(m, device=x.device)
    rx = torch.linalg.solve(kx + EPS * m * eye, kx)
    rz = torch.linalg.solve(kz + EPS * m * eye, kz)
    return (rx * rz.T).sum()


def fastprune_hsic(x, z, estimator="nocco"):
    return fastprune.hsic(x, z, sigma_x=SIGMA, sigma_y=SIGMA, scale_sigma_by_dim=True, estimator=estimator,
                          check_inputs=False)


# --- timing ------------------------------------------------------------------------------------------
def fwd_bwd_callables(fn, x, z):
    """(forward only, forward + backward) callables; z requires grad as a hidden layer would."""
    zg = z.detach().requires_grad_(True)

    def forward():
        return fn(x, zg)

    def both():
        zg.grad = None
        fn(x, zg).backward()

    return forward, both


def bench_single(device, shapes, estimator, repeats):
    rows = []
    compiled = torch.compile(eager_hsic)
    for m, d in shapes:
        gen = torch.Generator(device=device).manual_seed(m + d)
        x = torch.rand(m, d, device=device, generator=gen)
        z = torch.relu(torch.randn(m, d, device=device, generator=gen))  # post-ReLU features
        impls = {"fastprune": lambda a, b: fastprune_hsic(a, b, estimator),
                 "eager": lambda a, b: eager_hsic(a, b, estimator),
                 "compile": lambda a, b: compiled(a, b, estimator)}
        if estimator == "nocco":
            impls["paper-style"] = paper_style_nocco
        fns = {}
        for name, fn in impls.items():
            fns[f"{name}|fwd"], fns[f"{name}|fwd+bwd"] = fwd_bwd_callables(fn, x, z)
        s = torch.randn(m, m, device=device)
        # Both Gram products forward (X's and Z's), and S z backward (x needs no gradient).
        fns["floor|fwd"] = lambda: (torch.mm(x, x.T), torch.mm(z, z.T))
        fns["floor|fwd+bwd"] = lambda: (torch.mm(x, x.T), torch.mm(z, z.T), torch.mm(s, z))
        seconds = interleaved_medians(fns, device, repeats=repeats, warmup=2)
        floor = seconds["floor|fwd+bwd"]
        for name in list(impls) + ["floor"]:
            fwd, both = seconds[f"{name}|fwd"], seconds[f"{name}|fwd+bwd"]
            rows.append({"section": "single", "estimator": estimator, "m": m, "d": d, "impl": name,
                         "fwd_ms": fwd * 1e3, "bwd_ms": (both - fwd) * 1e3, "fwd+bwd_ms": both * 1e3,
                         "fastprune_speedup": both / seconds["fastprune|fwd+bwd"], "vs_floor": both / floor})
        print(f"  m={m} d={d}: fastprune {seconds['fastprune|fwd+bwd'] * 1e3:.1f} ms, "
              f"eager {seconds['eager|fwd+bwd'] * 1e3:.1f} ms, floor {floor * 1e3:.1f} ms", flush=True)
    return rows


# ResNet-18 (CIFAR) block outputs: 2 blocks per stage; WRN-34-10: 5 blocks per stage.
WORKLOADS = {
    "resnet18": [(64, 32, 32)] * 2 + [(128, 16, 16)] * 2 + [(256, 8, 8)] * 2 + [(512, 4, 4)] * 2,
    "wrn-34-10": [(160, 32, 32)] * 5 + [(320, 16, 16)] * 5 + [(640, 8, 8)] * 5,
}


def bench_bottleneck(device, models, repeats, m=128):
    rows = []
    compiled = torch.compile(eager_hsic)
    for model in models:
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.rand(m, 3, 32, 32, device=device, generator=gen)
        labels = torch.randint(0, 10, (m,), device=device, generator=gen)
        y = torch.nn.functional.one_hot(labels, 10).float()
        feats = [torch.relu(torch.randn((m,) + s, device=device, generator=gen)).requires_grad_(True)
                 for s in WORKLOADS[model]]

        def run(per_layer):
            for f in feats:
                f.grad = None
            total = sum(2e-5 * per_layer(x, f) - 1e-4 * per_layer(y, f) for f in feats)
            total.backward()

        def ours():
            for f in feats:
                f.grad = None
            fastprune.hsic_bottleneck(x, labels, feats, lambda_x=2e-5, lambda_y=1e-4, num_classes=10,
                                      check_inputs=False).backward()

        fns = {"fastprune": ours, "eager": lambda: run(eager_hsic), "compile": lambda: run(compiled),
               "paper-style": lambda: run(paper_style_nocco)}
        seconds = interleaved_medians(fns, device, repeats=repeats, warmup=2)
        for name, sec in seconds.items():
            rows.append({"section": "bottleneck", "estimator": "nocco", "m": m, "model": model,
                         "layers": len(feats), "impl": name, "fwd+bwd_ms": sec * 1e3,
                         "fastprune_speedup": sec / seconds["fastprune"]})
        print(f"  {model}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in seconds.items()), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    meta = {"device": device_label(device), **versions()}
    print(f"# HSIC benchmark on {meta['device']} (torch {meta['torch']}, triton {meta['triton']})", flush=True)
    if device.type == "cuda" and args.quick:  # the GPU targets' sizes only (scripts/gpu_check.sh)
        shapes, models, repeats = [(128, 16384), (128, 65536)], ["resnet18"], 10
    elif device.type == "cuda":
        shapes = [(m, d) for m in (128, 256, 512, 1024) for d in (3072, 16384, 65536, 163840)]
        models, repeats = ["resnet18", "wrn-34-10"], 20
    elif args.quick:
        shapes, models, repeats = [(128, 3072)], [], 3
    else:
        shapes = [(128, 3072), (128, 16384), (128, 65536), (256, 16384)]
        models, repeats = ["resnet18"], 5
    rows = bench_single(device, shapes, "nocco", repeats)
    rows += bench_single(device, shapes[:1] + [s for s in shapes if s == (128, 65536)], "biased", repeats)
    print(markdown_table(rows, ["estimator", "m", "d", "impl", "fwd_ms", "bwd_ms", "fwd+bwd_ms",
                                "fastprune_speedup", "vs_floor"]))
    if models:
        bottleneck = bench_bottleneck(device, models, max(3, repeats // 2))
        print(markdown_table(bottleneck, ["model", "layers", "impl", "fwd+bwd_ms", "fastprune_speedup"]))
        rows += bottleneck
    save_results(rows, meta, args.out, "hsic", device, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
