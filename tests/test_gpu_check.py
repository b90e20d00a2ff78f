"""scripts/gpu_check.sh (the one command for a GPU machine) and the targets it reports.

Here, without a GPU, the script's --dry-run goes through every step's argument handling and the
packing; the targets evaluator is checked on CSV files written in the benchmarks' formats."""
import csv
import os
import subprocess
import tarfile

import pytest

from fastprune.benchmarks.targets import evaluate, markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_packs_a_summary_of_every_step(tmp_path):
    # The script's own settings are left out: the suite may run inside gpu_check.sh, which a
    # GPU_CHECK_SKIP there would carry into this dry run (second H200 run).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and not k.startswith("GPU_CHECK_")}
    env["OUT"] = str(tmp_path / "out")
    res = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    for step in ("versions", "build", "tests-cuda", "bench-attacks", "bench-hsic", "bench-sparse", "bench-train",
                 "tests-rest", "targets"):
        assert f"| {step} | dry run: ok |" in summary, summary
    assert "not measured" in summary  # no GPU figures here
    with tarfile.open(tmp_path / "out" / "gpu-check.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"summary.md", "logs/build.log", "logs/tests-cuda.log", "logs/bench-sparse.log"} <= names
    # The CUDA variants of the suite are what the GPU step selects: collected here, skipped here.
    with tarfile.open(tmp_path / "out" / "gpu-check.tar.gz") as tar:
        collected = tar.extractfile("logs/tests-cuda.log").read().decode()
    assert "test_sparse_conv_matches_conv2d[" in collected and "cuda" in collected


def test_bad_arguments_are_refused_in_one_line(tmp_path):
    res = subprocess.run(["bash", "scripts/gpu_check.sh", "--fast"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "unknown argument '--fast'" in res.stderr
    env = dict(os.environ, GPU_CHECK_BUDGET="soon", OUT=str(tmp_path))
    res = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True)
    assert res.returncode == 2 and "GPU_CHECK_BUDGET" in res.stderr


def write(path, rows):
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def results(tmp_path):
    dev = "nvidia-h100-80gb-hbm3"
    write(tmp_path / f"attacks-{dev}-quick.csv", [
        {"section": "pgd_step", "shape": "256x3x32x32", "norm": "linf", "impl": "fastprune (cuda)", "vs_copy": 0.9,
         "GB/s": 2700},
        {"section": "pgd_step", "shape": "256x3x32x32", "norm": "linf", "impl": "fastprune (triton)", "vs_copy": 0.7,
         "GB/s": 2100},
        {"section": "pgd_step", "shape": "1024x3x224x224", "norm": "linf", "impl": "fastprune (cuda)",
         "vs_copy": 0.75, "GB/s": 2250},
        {"section": "pgd_step", "shape": "1024x3x224x224", "norm": "linf", "impl": "fastprune (reference)",
         "vs_copy": 0.95, "GB/s": 2850},  # the reference does not count
        {"section": "attack", "attack": "PGD-10", "impl": "torchattacks", "options": "-", "speedup": 1.0,
         "robust_acc": 0.500},
        {"section": "attack", "attack": "PGD-10", "impl": "fastprune", "options": "amp+channels_last+cuda_graph",
         "speedup": 2.5, "robust_acc": 0.503},
        {"section": "attack", "attack": "PGD-10", "impl": "fastprune", "options": "off", "speedup": 1.1,
         "robust_acc": 0.5},
        *[{"section": "autoattack", "component": "AutoAttack", "model": model, "impl": impl, "options": options,
           "speedup": speedup, "robust_acc": acc}
          for model, impl, options, speedup, acc in [
              ("base", "torchattacks", "-", 1.0, 0.800), ("base", "fastprune", "off", 2.0, 0.800),
              ("base", "fastprune", "amp", 3.5, 0.802), ("pruned", "torchattacks", "-", 1.0, 0.500),
              ("pruned", "fastprune", "amp", 3.2, 0.500)]],
        {"section": "autoattack", "component": "square", "model": "base", "fastprune_after": 0.8}])
    write(tmp_path / f"hsic-{dev}-quick.csv", [
        {"section": "single", "estimator": "biased", "m": 128, "d": 16384, "impl": "fastprune", "vs_floor": 1.2,
         "fwd+bwd_ms": 0.1},
        {"section": "single", "estimator": "biased", "m": 128, "d": 65536, "impl": "fastprune", "vs_floor": 1.9,
         "fwd+bwd_ms": 0.4},
        {"section": "bottleneck", "model": "resnet18", "impl": "paper-style", "fastprune_speedup": 80},
        {"section": "bottleneck", "model": "resnet18", "impl": "compile", "fastprune_speedup": 1.5}])
    write(tmp_path / f"sparse-{dev}.csv", [
        {"model": m, "sparsity": s, "batch": b, "impl": impl, "speedup_vs_best_dense": v}
        for m, s, b, impl, v in [("resnet18", 0.99, 256, "fastprune sparse", 1.5),
                                 ("resnet18", 0.99, 256, "fastprune sparse, CUDA graph", 2.2),
                                 ("resnet18", 0.99, 1, "fastprune sparse", 0.5),
                                 ("resnet18", 0.99, 1, "fastprune sparse, CUDA graph", 0.99),
                                 ("resnet18", 0.99, 64, "fastprune sparse", 1.3),
                                 ("vgg16", 0.99, 256, "fastprune sparse", 1.8),
                                 ("vgg16", 0.9, 64, "fastprune sparse", 0.8),
                                 ("vgg16", 0.9, 64, "dense fp16 channels_last", 1.0),
                                 ("vgg16", 0.9, 1, "fastprune sparse, tuned on 64 only", 0.96),
                                 ("vgg16", 0.9, 64, "fastprune sparse, untuned (no example)", 1.2),
                                 ("vgg16", 0.9, 1, "fastprune sparse, torch.compile", 0.5)]])
    write(tmp_path / "sparse-cpu.csv", [{"model": "vgg16", "sparsity": 0.99, "batch": 256,
                                         "impl": "fastprune sparse", "speedup_vs_best_dense": 9.0}])
    write(tmp_path / f"train-{dev}-quick.csv", [
        {"loop": "ratio", "ratio": "fastprune HYDRA vs paper-faithful HYDRA (speed-up)", "value": 2.3},
        {"loop": "ratio", "ratio": "fastprune PwoA retrain vs fastprune HYDRA prune phase (x faster)", "value": 4}])
    return tmp_path


def test_targets_are_read_off_the_benchmark_files(results):
    got = {t["what"]: (t["figure"], t["met"]) for t in evaluate(str(results))}
    assert got["pgd_step Linf float32 256x3x32x32: bandwidth vs a device copy"] == (0.9, True)  # best backend
    assert got["pgd_step Linf float32 1024x3x224x224: bandwidth vs a device copy"] == (0.75, False)
    assert got["PGD-10 ResNet-18 batch 256, amp + cuda_graph vs torchattacks"][1] is True
    # the slowest model's best option; every option's accuracy gap counts (0.2 pt here)
    assert got["AutoAttack standard vs torchattacks' (same settings), every model"] == (3.2, True)
    assert got["gaussian_gram fwd+bwd m=128 d=16384: time vs the cuBLAS products"] == (1.2, True)
    assert got["gaussian_gram fwd+bwd m=128 d=65536: time vs the cuBLAS products"] == (1.9, False)
    assert got["hsic_bottleneck ResNet-18 m=128 vs paper-style"] == (80, True)
    assert got["hsic_bottleneck ResNet-18 m=128 vs compile"] == (1.5, False)
    sparse = "sparse resnet18 99% batch 256 vs fp16 cuDNN (channels_last, CUDA graph)"
    assert got[sparse] == (2.2, True)  # the graphed sparse model counts
    assert got["sparse resnet18: never slower than dense at every batch benchmarked"] == (0.99, True)
    assert got["sparse resnet18: transferred and untuned plans, warm"] == (None, None)  # not in the file
    assert got["sparse vgg16 99% batch 256 vs fp16 cuDNN (channels_last, CUDA graph)"] == (1.8, False)  # not the CPU's 9x
    assert got["sparse vgg16: never slower than dense at every batch benchmarked"] == (0.8, False)
    assert got["sparse vgg16: transferred and untuned plans, warm"] == (0.96, False)  # compiled rows not counted
    assert got["HYDRA prune-phase epoch vs the paper-faithful loop"] == (2.3, True)
    assert got["PwoA retrain epoch vs fastprune's HYDRA prune-phase epoch"] == (4, False)
    table = markdown(evaluate(str(results)))
    assert table.count("\n") == len(got) + 1 and "**no**" in table


def test_missing_files_read_as_not_measured(tmp_path):
    targets = evaluate(str(tmp_path))
    assert targets and all(t["met"] is None and t["figure"] is None for t in targets)
