"""Where the time goes in the calls whose GPU targets were missed by a wide margin: host (Python,
dispatch, launches) or device (kernels). torch.profiler tables, CPU and device time per op, for
  hsic        fastprune.hsic forward + backward, m=128, d=16384 (biased and NOCCO) and the eager peer
  pgd_step    fastprune.pgd_step_ at 256x3x32x32 (the documented call, then check_values=False)
  bottleneck  fastprune.hsic_bottleneck over ResNet-18's block shapes, m=128

python bench/profile_gpu.py [--device cuda] [--out DIR]: prints the tables and writes
DIR/profile-<device>.txt (bench/results by default). On the CPU it profiles the host side alone.
"""
from __future__ import annotations

import argparse
import re
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastprune  # noqa: E402
from fastprune.benchmarks.common import device_label, versions  # noqa: E402

from hsic import WORKLOADS, eager_hsic, fastprune_hsic  # noqa: E402


def profiled(name: str, fn, device: torch.device, calls: int = 20) -> str:
    for _ in range(3):  # warm: compilation, autotuning, allocator
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=60)
    return f"## {name} ({calls} calls)\n\n{table}\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator(device=device).manual_seed(0)
    sections = [f"# profile on {device_label(device)} ({versions()})\n"]

    m, d = 128, 16384
    x = torch.rand(m, d, device=device, generator=gen)
    z = torch.relu(torch.randn(m, d, device=device, generator=gen)).requires_grad_(True)
    for estimator in ("biased", "nocco"):
        sections.append(profiled(f"fastprune.hsic {estimator} fwd+bwd m={m} d={d}",
                                 lambda e=estimator: fastprune_hsic(x, z, e).backward(), device))
    sections.append(profiled(f"eager hsic biased fwd+bwd m={m} d={d}",
                             lambda: eager_hsic(x, z, "biased").backward(), device))

    shape = (256, 3, 32, 32)
    x_nat = torch.rand(shape, device=device, generator=gen)
    grad = torch.randn(shape, device=device, generator=gen)
    out = x_nat.clone()
    alpha, eps = torch.full((256,), 2 / 255, device=device), torch.full((256,), 8 / 255, device=device)
    for check in (True, False):
        sections.append(profiled(f"fastprune.pgd_step_ linf {shape} check_values={check}",
                                 lambda c=check: fastprune.pgd_step_(out, grad, x_nat, alpha=alpha, eps=eps,
                                                                     check_values=c), device, calls=50))

    feats = [torch.relu(torch.randn((m,) + s, device=device, generator=gen)).requires_grad_(True)
             for s in WORKLOADS["resnet18"]]
    inputs = torch.rand(m, 3, 32, 32, device=device, generator=gen)
    labels = torch.randint(0, 10, (m,), device=device, generator=gen)
    sections.append(profiled("hsic_bottleneck ResNet-18 blocks m=128 fwd+bwd", lambda: fastprune.hsic_bottleneck(
        inputs, labels, feats, lambda_x=2e-5, lambda_y=1e-4, num_classes=10, check_inputs=False).backward(),
        device, calls=5))

    text = "\n".join(sections)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "profile-" + re.sub(r"[^a-z0-9]+", "-", device_label(device).lower()).strip("-") + ".txt")
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
