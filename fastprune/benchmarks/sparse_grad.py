"""Attacks and adversarial finetuning at sparse cost: the masked dense model against the sparse one.

``fastprune bench sparse-grad --sparsity 0.95 0.99 --batch 64``

On a magnitude-pruned ResNet-18 (CIFAR shapes; timing does not depend on the values), side by side
in interleaved rounds:
  attack   PGD-10 (eps 8/255, step 2/255, random start) on the masked model (what a pruning run
           attacks), on the masks folded into plain dense layers, and on ``sparsify(model)``'s
           SparseModel (tuned on the batch; the input gradient is a sparse transposed convolution);
           images/s, and robust accuracy of the masked and the sparse model on the same images and
           random starts (they must agree within 0.2 points);
  trades   one TRADES finetune step (10 attack steps + loss + backward + SGD update) on the masked
           model and on the same model trained on the sparse kernels (trainable CSR values,
           ``to_sparse_training``): seconds per step.
Writes bench/results/sparse-grad-<device>.csv and prints a markdown table.
"""
from __future__ import annotations

import argparse
import copy
import os

import torch

from ..attacks import PGD
from ..models import get_model
from ..nn.masked import MASKED_TYPES, fold_masks, prune_model
from ..nn.sparse import sparsify
from ..nn.sparse.training import to_sparse_training
from ..train.objectives import TRADES
from .common import device_label, interleaved_medians, markdown_table, save_results, versions


def _pruned(name: str, sparsity: float, device: torch.device, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = prune_model(get_model(name, 10, 3).to(device).eval(), sparsity, method="magnitude")
    for m in model.modules():
        if isinstance(m, MASKED_TYPES):
            m.freeze_mask()
    return model


def attack_rows(name: str, sparsity: float, batch: int, device: torch.device, repeats: int) -> list[dict]:
    masked = _pruned(name, sparsity, device)
    dense = fold_masks(copy.deepcopy(masked))
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    sparse = sparsify(masked, x, batch_sizes=(batch,), repeats=3)
    attacks = {k: PGD(m, eps=8 / 255, alpha=2 / 255, steps=10) for k, m in
               (("masked dense", masked), ("dense (masks folded)", dense), ("fastprune sparse", sparse))}

    def run(attack):
        torch.manual_seed(0)  # the same random start for every model
        return attack(x, y)

    seconds = interleaved_medians({k: (lambda a=a: run(a)) for k, a in attacks.items()}, device, repeats=repeats,
                                   warmup=1)
    with torch.no_grad():
        accuracy = {k: (a.model(run(a)).argmax(1) == y).float().mean().item() for k, a in attacks.items()}
    rows = []
    for impl, sec in seconds.items():
        rows.append({"section": "attack", "model": name, "sparsity": sparsity, "batch": batch,
                     "impl": impl, "what": "PGD-10", "images_per_s": batch / sec, "seconds": sec,
                     "speedup_vs_masked": seconds["masked dense"] / sec, "robust_acc": accuracy[impl]})
    return rows


def trades_rows(name: str, sparsity: float, batch: int, device: torch.device, repeats: int) -> list[dict]:
    masked = _pruned(name, sparsity, device).train()
    sparse = to_sparse_training(copy.deepcopy(masked)).train()
    objective = TRADES(8 / 255, 2 / 255, 10)
    x = torch.rand(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    steps = {}
    for impl, model in (("masked dense", masked), ("fastprune sparse training", sparse)):
        optimiser = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, weight_decay=5e-4)

        def step(model=model, optimiser=optimiser):
            optimiser.zero_grad(set_to_none=True)
            objective(model, x, y).backward()
            optimiser.step()

        steps[impl] = step
    seconds = interleaved_medians(steps, device, repeats=repeats, warmup=1)
    return [{"section": "trades", "model": name, "sparsity": sparsity, "batch": batch, "impl": impl,
             "what": "TRADES step (10 attack steps + update)", "seconds": sec,
             "speedup_vs_masked": seconds["masked dense"] / sec} for impl, sec in seconds.items()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastprune bench sparse-grad", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--sparsity", nargs="+", type=float, default=[0.95, 0.99])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join("bench", "results"))
    args = parser.parse_args(argv)
    for s in args.sparsity:
        if not 0 <= s < 1:
            raise ValueError(f"--sparsity values must be in [0, 1), got {s}")
    if args.batch < 1 or args.repeats < 1:
        raise ValueError("--batch and --repeats must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda given but no CUDA device is available")
    device = torch.device(args.device)
    meta = {"device": device_label(device), **versions()}
    print(f"# sparse gradients on {meta['device']} (torch {meta['torch']})", flush=True)
    rows = []
    for sparsity in args.sparsity:
        for part in (attack_rows, trades_rows):
            found = part(args.model, sparsity, args.batch, device, args.repeats)
            for row in found:
                print(f"  {row['section']} {args.model} {sparsity}: {row['impl']}: {row['seconds'] * 1e3:.0f} ms "
                      f"({row['speedup_vs_masked']:.2f}x masked)"
                      + (f", robust acc {row['robust_acc']:.3f}" if "robust_acc" in row else ""), flush=True)
            rows += found
    print(markdown_table(rows, ["section", "model", "sparsity", "batch", "impl", "seconds", "speedup_vs_masked",
                                "robust_acc"]))
    save_results(rows, meta, args.out, "sparse-grad", device)
    return 0
