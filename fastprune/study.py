"""The robust-pruning study behind ``fastprune demo``: every method at every sparsity, on real data.

1. A base model is adversarially trained (PGD-AT) on real data: scikit-learn's digits (8x8), or
   with ``data="mnist5k"`` 5000 real MNIST images at MNIST's usual threat model (eps 0.3).
2. Copies of it are pruned at each sparsity with HYDRA, LWM, PwoA, and the control that uses no
   adversarial example either: naive pruning (magnitude mask, then a clean finetune).
3. Every model is evaluated on the held-out split: clean accuracy, each attack's accuracy (FGSM,
   PGD-20, CW and AutoAttack standard, reported after each of its components) and the worst case
   per sample over all of them.
4. Each pruned model's inference latency is timed dense (masks folded into plain PyTorch layers) and
   as fastprune's sparse model (``sparsify``), side by side; each method's wall time is recorded.
5. results.csv, results.md and PNG plots go into the run directory, together with the papers'
   findings as checked on these numbers (they are reported as they come out, held or not).

Every finished model's row is stored under ``rows/`` as it completes, so a rerun with the same run
directory resumes where the previous one stopped.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .attacks import evaluate
from .benchmarks.common import device_label, interleaved_medians, markdown_table, versions, write_csv
from .data import get_dataset
from .models import get_model
from .nn import ChannelsLastInput, fold_masks, prune_model, sparsify, sparsity_report
from .nn.masked import check_sparsity
from .prune import hydra, lwm, pwoa
from .prune.hydra import finetune_phase
from .train import PGDTraining, fit, load_model, natural_loss, save_model

METHODS = ("hydra", "lwm", "pwoa", "naive")
ATTACKS = ("fgsm", "pgd20", "cw", "autoattack")


# The mnist5k study: PwoA's MNIST threat model (eps 0.3) on 4000 training images, a CNN that reaches
# about 92% clean and 66% PGD-40 accuracy after one clean and eight PGD-7 epochs (measured here on 2
# cores, 2 minutes); pruning and evaluation budgets cut so that the whole study ends within about
# 20 minutes on 2 CPU cores (AutoAttack at a reduced budget, stated in results.md).
MNIST5K = dict(data="mnist5k", model="cnn-small", eps=0.3, train_steps=7, base_natural_epochs=1, base_epochs=8,
               base_lr=0.05, hydra_prune_epochs=2, finetune_epochs=3, finetune_lr=0.01, pwoa_admm_epochs=6,
               pwoa_retrain_epochs=6, eval_images=200, autoattack_steps=20, autoattack_queries=500,
               latency_repeats=10)


@dataclass
class StudySettings:
    """What the study runs. Epoch counts are the papers' phases scaled down to digits and a CPU;
    HYDRA, LWM and naive pruning get the same finetune budget, HYDRA its prune phase on top (as in
    the paper), PwoA its ADMM and retrain stages with no adversarial example."""

    data: str = "digits"                  # "digits" or "mnist5k" (StudySettings.for_data gives each one's settings)
    model: str = "cnn-wide"
    eps: float = 0.1                      # Linf radius in pixel units, for training and evaluation
    base_natural_epochs: int = 0          # clean epochs before PGD-AT (a warm start; MNIST's eps 0.3 needs one)
    train_steps: int = 7                  # PGD steps in adversarial training (step eps / 4)
    base_epochs: int = 20
    base_lr: float = 0.05
    sparsities: tuple[float, ...] = (0.9, 0.95, 0.99)
    methods: tuple[str, ...] = METHODS
    hydra_prune_epochs: int = 5
    finetune_epochs: int = 10             # HYDRA, LWM and naive finetunes
    finetune_lr: float = 0.01
    pwoa_admm_epochs: int = 15
    pwoa_retrain_epochs: int = 15
    attacks: tuple[str, ...] = ATTACKS
    autoattack_steps: int = 100           # AutoAttack's settings: APGD and FAB iterations,
    autoattack_queries: int = 5000        # and Square's queries
    eval_images: int | None = None        # evaluate on the first n test images (None: all of them)
    latency_batch: int = 256
    latency_repeats: int = 20
    batch_size: int = 64

    @classmethod
    def quick(cls) -> "StudySettings":
        """A few epochs and the cheapest settings: every method and sparsity still runs (for tests)."""
        return cls(model="cnn-small", train_steps=2, base_epochs=2, hydra_prune_epochs=1, finetune_epochs=1,
                   pwoa_admm_epochs=1, pwoa_retrain_epochs=1, eval_images=64, latency_batch=64, latency_repeats=3,
                   autoattack_steps=10, autoattack_queries=100)

    @classmethod
    def for_data(cls, data: str, quick: bool = False) -> "StudySettings":
        """The study's settings for a bundled data set: "digits" (the defaults), or "mnist5k" (PwoA's
        MNIST threat model, eps 0.3; a clean warm start, then PGD-AT; budgets sized to end within
        about 20 minutes on 2 CPU cores). ``quick``: :meth:`quick` on that data set."""
        if data not in ("digits", "mnist5k"):
            raise ValueError(f"data must be 'digits' or 'mnist5k', got {data!r}")
        base = cls.quick() if quick else cls()
        if data == "digits":
            return base
        if quick:
            return dataclasses.replace(base, data=data, eps=0.3, base_natural_epochs=1, eval_images=32)
        return dataclasses.replace(base, **MNIST5K)

    def check(self) -> None:
        if self.data not in ("digits", "mnist5k"):
            raise ValueError(f"data must be 'digits' or 'mnist5k', got {self.data!r}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHODS}, got {list(self.methods)}")
        if not self.sparsities:
            raise ValueError("sparsities must name at least one sparsity")
        for s in self.sparsities:
            check_sparsity(s)
        if self.eps <= 0:
            raise ValueError(f"eps must be positive, got {self.eps!r}")
        if self.autoattack_steps < 1 or self.autoattack_queries < 1:
            raise ValueError(f"autoattack_steps and autoattack_queries must be >= 1, got {self.autoattack_steps}, "
                             f"{self.autoattack_queries}")
        if self.eval_images is not None and self.eval_images < 1:
            raise ValueError(f"eval_images must be None or >= 1, got {self.eval_images!r}")


def _prune(method: str, model: nn.Module, teacher: nn.Module, train, sparsity: float, s: StudySettings,
           num_classes: int, seed: int, progress: bool) -> nn.Module:
    """``model`` (a copy of the base) pruned in place by ``method``."""
    options = dict(batch_size=s.batch_size, seed=seed, progress=progress)
    robust = PGDTraining(s.eps, s.eps / 4, s.train_steps)
    if method == "hydra":
        return hydra(model, train, sparsity=sparsity, objective=robust, prune_epochs=s.hydra_prune_epochs,
                     finetune_epochs=s.finetune_epochs, finetune_lr=s.finetune_lr, **options)
    if method == "lwm":
        return lwm(model, train, sparsity=sparsity, objective=robust, finetune_epochs=s.finetune_epochs,
                   finetune_lr=s.finetune_lr, **options)
    if method == "pwoa":
        # every layer, as the other methods prune (PwoA's own rule would leave cnn-wide's linear layers
        # dense: they are not named "fc"), so all methods compare at the same sparsity
        return pwoa(model, teacher, train, sparsity=sparsity, admm_epochs=s.pwoa_admm_epochs,
                    retrain_epochs=s.pwoa_retrain_epochs, num_classes=num_classes, prune_layers="all", **options)
    # naive: no adversarial example anywhere, no teacher: magnitude mask, clean finetune
    prune_model(model, sparsity, method="magnitude")
    finetune_phase(model, train, objective=natural_loss, epochs=s.finetune_epochs, lr=s.finetune_lr, **options)
    return model


def _latency(model: nn.Module, example: torch.Tensor, repeats: int) -> dict:
    """Milliseconds per batch, timed in interleaved rounds: the masked model as plain dense PyTorch
    in its faster memory layout (contiguous or channels_last: the best a user gets without
    fastprune) against fastprune's sparse model (``sparsify``)."""
    dense = fold_masks(copy.deepcopy(model)).eval()
    dense_cl = ChannelsLastInput(copy.deepcopy(dense).to(memory_format=torch.channels_last))
    sparse = sparsify(model, example, batch_sizes=(example.shape[0],), repeats=max(3, repeats // 4))
    with torch.no_grad():
        times = interleaved_medians({"dense": lambda: dense(example), "dense_cl": lambda: dense_cl(example),
                                     "sparse": lambda: sparse(example)}, example.device, repeats=repeats)
    best_dense = min(times["dense"], times["dense_cl"])
    config = sparse.config_for(example)
    kept = sum(choice != "dense" for choice in config["layers"].values())
    return {"dense_ms": best_dense * 1e3, "sparse_ms": times["sparse"] * 1e3,
            "latency_speedup": best_dense / times["sparse"], "sparse_layers": kept}


def _evaluate(model: nn.Module, test, s: StudySettings, seed: int, progress: bool) -> dict:
    """Accuracies under the attacks. The attacks run on a channels_last copy (1.3-1.6x faster on the
    CPU for these models; the same function), leaving ``model`` as it is for the latency timing."""
    images, labels = (t[: s.eval_images] for t in test.tensors)
    settings = {"autoattack": {"steps": s.autoattack_steps, "n_queries": s.autoattack_queries}}
    settings = {k: v for k, v in settings.items() if k in s.attacks}
    result = evaluate(copy.deepcopy(model), (images, labels), ("clean", *s.attacks), eps=s.eps, seed=seed,
                      progress=progress, settings=settings, channels_last=True)
    return {k: v for k, v in result.items() if k != "n"}


def _load_row(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _save_row(path: str, row: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(row, f, indent=1)
    os.replace(tmp, path)


def run_study(out: str, settings: StudySettings | None = None, *, device: str | torch.device = "cpu",
              seed: int = 0, progress: bool = True, log=print) -> list[dict]:
    """Run the study into ``out`` (created; an existing one resumes) and return its rows, one per
    model: method (base, hydra, lwm, pwoa, naive), sparsity asked and measured, accuracy clean and
    under each attack, worst case, dense and sparse latency (ms per batch of ``latency_batch``) and
    wall time in seconds (training for base, pruning for the others)."""
    s = settings or StudySettings()
    s.check()
    device = torch.device(device)
    os.makedirs(os.path.join(out, "rows"), exist_ok=True)
    with open(os.path.join(out, "settings.json"), "w") as f:
        json.dump({**dataclasses.asdict(s), "seed": seed, "device": device_label(device), **versions()}, f, indent=1)
    data = get_dataset(s.data)
    example = data.test.tensors[0][: s.latency_batch].to(device)

    base_path = os.path.join(out, "base.pt")
    row = _load_row(os.path.join(out, "rows", "base.json"))
    if row is None or not os.path.exists(base_path):
        log(f"[base] PGD adversarial training of {s.model} on {s.data} ({len(data.train)} train, "
            f"{len(data.test)} test images; {s.eval_images or len(data.test)} evaluated), eps {s.eps}, {s.base_epochs} epochs")
        torch.manual_seed(seed)
        base = get_model(s.model, data.num_classes, data.in_channels).to(device)
        started = time.perf_counter()
        if s.base_natural_epochs:
            fit(base, data.train, epochs=s.base_natural_epochs, lr=s.base_lr, batch_size=s.batch_size,
                weight_decay=5e-4, seed=seed, progress=progress)
        fit(base, data.train, objective=PGDTraining(s.eps, s.eps / 4, s.train_steps), epochs=s.base_epochs,
            lr=s.base_lr, batch_size=s.batch_size, weight_decay=5e-4, seed=seed, progress=progress)
        wall = time.perf_counter() - started
        save_model(base_path, base, s.model, data.num_classes, data.in_channels, eps=s.eps)
        row = {"method": "base", "sparsity": 0.0, "measured_sparsity": sparsity_report(base)["sparsity"],
               **_evaluate(base, data.test, s, seed, progress), "wall_s": wall}
        _save_row(os.path.join(out, "rows", "base.json"), row)
    base, _ = load_model(base_path, device)
    rows = [row]
    log(_summary(row))

    jobs = [(m, sp) for sp in s.sparsities for m in s.methods]
    for method, sparsity in tqdm(jobs, desc="study", unit="model", disable=not progress):
        path = os.path.join(out, "rows", f"{method}-{sparsity:g}.json")
        row = _load_row(path)
        if row is None:
            torch.manual_seed(seed)
            started = time.perf_counter()
            model = _prune(method, copy.deepcopy(base), base, data.train, sparsity, s, data.num_classes, seed,
                           progress)
            wall = time.perf_counter() - started
            row = {"method": method, "sparsity": sparsity, "measured_sparsity": sparsity_report(model)["sparsity"],
                   **_evaluate(model, data.test, s, seed, progress), "wall_s": wall,
                   **_latency(model, example, s.latency_repeats)}
            _save_row(path, row)
        rows.append(row)
        log(_summary(row))
    write_results(out, rows, s, device, n_eval=min(s.eval_images or len(data.test), len(data.test)))
    return rows


def _summary(row: dict) -> str:
    latency = (f", latency {row['dense_ms']:.2f} -> {row['sparse_ms']:.2f} ms" if "dense_ms" in row else "")
    return (f"[{row['method']} {row['sparsity']:.0%}] clean {row['clean']:.1%}, worst case {row['worst']:.1%}, "
            f"{row['wall_s']:.1f} s{latency}")


def findings(rows: list[dict]) -> list[dict]:
    """The papers' claims checked on ``rows``: [{"claim", "holds" (bool or None when a method or
    sparsity is missing), "evidence"}]. Robust accuracy means the worst case over the attacks."""
    table = {(r["method"], r["sparsity"]): r for r in rows}
    sparsities = sorted({r["sparsity"] for r in rows if r["method"] != "base"})
    out = []

    top = max(sparsities, default=None)
    hydra_row, lwm_row = table.get(("hydra", top)), table.get(("lwm", top))
    claim = f"HYDRA keeps more robust accuracy than LWM at the highest sparsity ({top:.0%})" if top else "HYDRA > LWM"
    if hydra_row and lwm_row:
        out.append({"claim": claim, "holds": hydra_row["worst"] > lwm_row["worst"],
                    "evidence": f"worst case HYDRA {hydra_row['worst']:.1%} vs LWM {lwm_row['worst']:.1%}"})
    else:
        out.append({"claim": claim, "holds": None, "evidence": "HYDRA or LWM not run"})

    pairs = [(sp, table[("pwoa", sp)], table[("naive", sp)]) for sp in sparsities
             if ("pwoa", sp) in table and ("naive", sp) in table]
    claim = "PwoA keeps more robustness than naive pruning (neither computes adversarial examples)"
    if pairs:
        gaps = [p["worst"] - n["worst"] for _, p, n in pairs]
        out.append({"claim": claim, "holds": all(g > 0 for g in gaps),
                    "evidence": "; ".join(f"{sp:.0%}: PwoA {p['worst']:.1%} vs naive {n['worst']:.1%}"
                                          for sp, p, n in pairs)})
    else:
        out.append({"claim": claim, "holds": None, "evidence": "PwoA or naive not run"})

    hydra_t = [table[("hydra", sp)]["wall_s"] for sp in sparsities if ("hydra", sp) in table]
    pwoa_t = [table[("pwoa", sp)]["wall_s"] for sp in sparsities if ("pwoa", sp) in table]
    claim = "PwoA's pruning costs a fraction of HYDRA's time"
    if hydra_t and pwoa_t:
        ratio = (sum(pwoa_t) / len(pwoa_t)) / (sum(hydra_t) / len(hydra_t))
        out.append({"claim": claim, "holds": ratio < 1,
                    "evidence": f"mean wall time PwoA {sum(pwoa_t) / len(pwoa_t):.1f} s vs HYDRA "
                                f"{sum(hydra_t) / len(hydra_t):.1f} s ({ratio:.2f}x)"})
    else:
        out.append({"claim": claim, "holds": None, "evidence": "PwoA or HYDRA not run"})
    return out


def _columns(rows: list[dict]) -> list[str]:
    head = ["method", "sparsity", "measured_sparsity", "clean"]
    attacks = [k for k in rows[0] if k not in head and k not in ("worst", "wall_s")]
    tail = ["worst", "dense_ms", "sparse_ms", "latency_speedup", "sparse_layers", "wall_s"]
    return head + [a for a in attacks if a not in tail] + tail


def _autoattack_note(s: StudySettings) -> str:
    if "autoattack" not in s.attacks:
        return ""
    budget = ("AutoAttack's own settings" if (s.autoattack_steps, s.autoattack_queries) == (100, 5000) else
              "a reduced budget (AutoAttack's own: 100 and 5000)")
    return (f"`autoattack` is AutoAttack standard (APGD-CE, APGD-T and FAB-T at {s.autoattack_steps} iterations, "
            f"Square at {s.autoattack_queries} queries: {budget}); `autoattack/<component>` is the accuracy "
            f"left after that component.")


def write_results(out: str, rows: list[dict], settings: StudySettings, device: torch.device, n_eval: int) -> None:
    """results.csv, results.md and the plots of a finished study."""
    columns = _columns(rows)
    write_csv([{c: r.get(c) for c in columns} for r in rows], os.path.join(out, "results.csv"))
    checks = findings(rows)
    verdict = {True: "holds", False: "does not hold", None: "not checked"}
    lines = [
        f"# fastprune demo: robust pruning on {settings.data}",
        "",
        f"Device: {device_label(device)}; torch {versions()['torch']}; {versions()['date']}.",
        f"Model {settings.model}, Linf eps {settings.eps} (pixels in [0, 1]); accuracies on {n_eval} held-out "
        f"test images; `worst` is the fraction of images no attack fools. {_autoattack_note(settings)} "
        f"Latency: ms per batch of "
        f"{settings.latency_batch}, the masked model as dense PyTorch vs fastprune's sparse model. "
        "wall_s: training time (base) or pruning time (the methods).",
        "",
        markdown_table(rows, columns),
        "",
        "## The papers' findings, checked",
        "",
        *[f"- {c['claim']}: **{verdict[c['holds']]}** ({c['evidence']})" for c in checks],
        "",
        "Plots: robust_accuracy.png, pruning_time.png, latency.png.",
    ]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "findings.json"), "w") as f:
        json.dump(checks, f, indent=1)
    plot_results(out, rows, settings.data)


def plot_results(out: str, rows: list[dict], data: str = "digits") -> None:
    """robust_accuracy.png (worst-case accuracy vs sparsity per method, base as a line),
    pruning_time.png (wall time per method and sparsity) and latency.png (dense vs sparse)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next((r for r in rows if r["method"] == "base"), None)
    pruned = [r for r in rows if r["method"] != "base"]
    methods = list(dict.fromkeys(r["method"] for r in pruned))
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        pts = sorted((r["sparsity"], r["worst"]) for r in pruned if r["method"] == m)
        ax.plot([p[0] * 100 for p in pts], [p[1] * 100 for p in pts], marker="o", label=m)
    if base:
        ax.axhline(base["worst"] * 100, color="grey", linestyle="--", label="base (dense)")
    ax.set_xlabel("sparsity (%)")
    ax.set_ylabel("robust accuracy, worst case (%)")
    ax.set_title(f"Robust accuracy vs sparsity ({data})")
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "robust_accuracy.png"), dpi=120)
    plt.close(fig)

    def grouped_bars(filename, series, ylabel, title):
        fig, ax = plt.subplots(figsize=(7, 4))
        labels = [f"{r['method']} {r['sparsity']:.0%}" for r in pruned]
        width = 0.8 / len(series)
        for i, (name, key) in enumerate(series):
            ax.bar([j + i * width for j in range(len(pruned))], [r[key] for r in pruned], width, label=name)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(pruned))], labels, rotation=60, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if len(series) > 1:
            ax.legend(loc="lower left", framealpha=0.9)
        fig.tight_layout()
        fig.savefig(os.path.join(out, filename), dpi=120)
        plt.close(fig)

    grouped_bars("pruning_time.png", [("wall time", "wall_s")], "seconds", "Pruning wall time per method")
    if all("dense_ms" in r for r in pruned):
        grouped_bars("latency.png", [("dense PyTorch", "dense_ms"), ("fastprune sparse", "sparse_ms")],
                     "ms per batch", "Inference latency")
