"""Data-parallel fit() over two gloo processes on the CPU matches one process on the same batches."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from fastprune.models import get_model
from fastprune.train import fit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(n=200):
    from fastprune.data import load_digits

    x, y = load_digits().train.tensors
    return torch.utils.data.TensorDataset(x[:n], y[:n])


def _train(run_dir=None, perturb=False):
    torch.manual_seed(0)
    model = get_model("cnn-small", 10, 1)
    if perturb:  # another starting point: fit must start every rank from rank 0's model
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
    history = fit(model, _data(), epochs=2, lr=0.05, batch_size=64, run_dir=run_dir, progress=False)
    return model, history


def _worker(rank, world, port, out):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, history = _train(run_dir=os.path.join(out, "run"), perturb=rank == 1)
        torch.save({"state": model.state_dict(), "history": history}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_match_one_process(tmp_path):
    torch.set_num_threads(1)
    single, single_history = _train()
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for name, value in single.state_dict().items():
        # both ranks hold the same model, and it is the single-process one up to float rounding
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        assert torch.allclose(ranks[0]["state"][name], value, rtol=1e-4, atol=1e-5), name
    for a, b in zip(ranks[0]["history"], single_history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    # rank 0 alone wrote the run directory: one checkpoint, one metrics file
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "metrics.csv", "metrics.json"]


def _bn_model():
    """A small CNN with BatchNorm after each convolution (and a BatchNorm1d), for the sync test."""
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 16), nn.BatchNorm1d(16),
                         nn.ReLU(), nn.Linear(16, 10))


def _train_bn(sync_bn=True):
    model = _bn_model()
    history = fit(model, _data(), epochs=2, lr=0.05, batch_size=64, progress=False, sync_bn=sync_bn)
    return model, history


def _bn_worker(rank, world, port, out, sync_bn):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, history = _train_bn(sync_bn)
        torch.save({"state": model.state_dict(), "history": history, "classes": sorted(
            {type(m).__name__ for m in model.modules()})}, os.path.join(out, f"bn{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sync_bn", [True, False])
def test_batchnorm_model_over_two_gloo_processes(tmp_path, sync_bn):
    # With sync_bn every BatchNorm normalises with the global batch's statistics: two processes give
    # one process's model and running statistics up to float rounding. Without it each rank
    # normalises its own half-batch, and the weights drift measurably.
    torch.set_num_threads(1)
    single, single_history = _train_bn()
    mp.spawn(_bn_worker, args=(2, _free_port(), str(tmp_path), sync_bn), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"bn{r}.pt", weights_only=True) for r in (0, 1)]
    assert "SyncedBatchNorm2d" not in ranks[0]["classes"]  # the model is given back with plain BatchNorm
    worst = 0.0
    for name, value in single.state_dict().items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        if value.is_floating_point():
            worst = max(worst, ((ranks[0]["state"][name] - value).abs().max() / value.abs().max().clamp_min(1e-6)).item())
    print(f"sync_bn={sync_bn}: largest relative difference from one process {worst:.1e}")
    if sync_bn:
        assert worst < 1e-4, worst
        for a, b in zip(ranks[0]["history"], single_history):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    else:
        assert worst > 1e-3, worst


def _torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastprune.cli", *args, "--eps", "0.1", "--alpha", "0.025", "--steps", "2", "--batch-size", "64",
           "--quiet"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run directory") == 1  # only rank 0 reports
    return result


def test_torchrun_cli_train_then_hydra(tmp_path):
    base, pruned = tmp_path / "base", tmp_path / "hydra"
    _torchrun("train", "--model", "cnn-small", "--epochs", "1", "--objective", "pgd", "--out", str(base))
    assert (base / "model.pt").exists() and (base / "report.json").exists()
    # HYDRA's prune phase trains the scores alone (weights frozen), then the finetune the weights
    _torchrun("prune", "--method", "hydra", "--checkpoint", str(base / "model.pt"), "--sparsity", "0.9",
              "--prune-epochs", "1", "--finetune-epochs", "1", "--objective", "trades", "--out", str(pruned))
    report = json.loads((pruned / "report.json").read_text())
    assert abs(report["sparsity"] - 0.9) < 0.01
