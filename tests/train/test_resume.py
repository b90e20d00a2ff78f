"""Every command killed at any point and rerun with the same --out gives the uninterrupted run's
model, metrics and report, bit for bit (wall times aside); two uninterrupted runs are identical; a
resume with other settings, a second process on the same folder and leftovers of a killed write are
handled. A kill is simulated in-process: the optimiser's N-th step raises, as SIGKILL would stop the
process there (checkpoints are written atomically, so what is on disk is the same)."""
import csv
import json

import pytest
import torch

from fastprune.cli import main


class Killed(BaseException):
    """Not an Exception: nothing in fastprune may catch it, as nothing can catch SIGKILL."""


def run(args, monkeypatch=None, kill_at=None):
    if kill_at is None:
        assert main(args) == 0
        return
    original = torch.optim.SGD.step
    count = [0]

    def step(self, *a, **k):
        count[0] += 1
        if count[0] == kill_at:
            raise Killed
        return original(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(torch.optim.SGD, "step", step)
        with pytest.raises(Killed):
            main(args)


def outcome(out):
    """What a run produced, without wall times: the model's tensors, every metrics row, the report."""
    model = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    metrics = {}
    for path in sorted(out.rglob("metrics.csv")):
        with open(path) as f:
            metrics[str(path.relative_to(out))] = [{k: v for k, v in row.items() if k != "seconds"}
                                                   for row in csv.DictReader(f)]
    report = {k: v for k, v in json.loads((out / "report.json").read_text()).items() if k != "wall_s"}
    return model, metrics, report


def assert_same(a, b):
    (model_a, metrics_a, report_a), (model_b, metrics_b, report_b) = a, b
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    assert metrics_a == metrics_b
    assert report_a == report_b


COMMON = ["--batch-size", "128", "--quiet", "--eps", "0.1", "--alpha", "0.05", "--steps", "1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", "--model", "cnn-small", "--epochs", "2", "--objective", "pgd", "--out", str(out)] + COMMON) == 0
    return out / "model.pt"


def commands(base):
    return {
        "train": ["train", "--model", "cnn-small", "--epochs", "3", "--objective", "trades"] + COMMON,
        "hydra": ["prune", "--method", "hydra", "--checkpoint", str(base), "--sparsity", "0.9", "--prune-epochs", "2",
                  "--finetune-epochs", "2", "--objective", "pgd"] + COMMON,
        "lwm": ["prune", "--method", "lwm", "--checkpoint", str(base), "--sparsity", "0.9", "--finetune-epochs", "2",
                "--objective", "pgd"] + COMMON,
        # ADMM every 3 epochs: epoch 2 ends with an update, so a kill in epoch 3 resumes after it
        "pwoa": ["prune", "--method", "pwoa", "--checkpoint", str(base), "--teacher", str(base), "--sparsity", "0.9",
                 "--admm-epochs", "4", "--retrain-epochs", "2", "--temperature", "4", "--kd-alpha", "1"] + COMMON,
        "finetune": ["finetune", "--checkpoint", str(base), "--epochs", "3", "--objective", "pgd"] + COMMON,
    }


# Optimiser steps at which the run is killed (digits: 11 batches of 128 an epoch): inside the first,
# a middle and the last epoch of each stage.
KILLS = {"train": [5, 17, 30], "hydra": [8, 20, 35], "lwm": [6, 15], "pwoa": [15, 38, 50],
         "finetune": [3, 25]}


@pytest.mark.parametrize("name", list(KILLS))
def test_killed_anywhere_and_rerun_equals_the_uninterrupted_run(name, base, tmp_path, monkeypatch):
    args = commands(base)[name]
    run(args + ["--out", str(tmp_path / "a")])
    run(args + ["--out", str(tmp_path / "b")])
    reference = outcome(tmp_path / "a")
    assert_same(reference, outcome(tmp_path / "b"))  # two uninterrupted runs: identical
    for i, step in enumerate(KILLS[name]):
        out = tmp_path / f"killed-{i}"
        run(args + ["--out", str(out)], monkeypatch, kill_at=step)
        (out / ".tmp-leftover.pt").write_bytes(b"")  # what a kill during a checkpoint write leaves
        run(args + ["--out", str(out)])
        assert not list(out.rglob(".tmp-*.pt")), "leftover temporaries are cleaned at the next start"
        assert_same(reference, outcome(out))


def test_resume_with_other_settings_stops_naming_them(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", "--model", "cnn-small", "--epochs", "1", "--objective", "natural", "--out", out] + COMMON
    assert main(args) == 0
    capsys.readouterr()
    assert main(args[:4] + ["2", "--lr", "0.5"] + args[5:]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "epochs (1 -> 2)" in err and "lr (0.1 -> 0.5)" in err
    assert main(args + ["--quiet"]) == 0  # display options may differ


def test_a_second_process_on_the_same_out_is_refused(tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".lock").write_text(str(holder.pid))
        args = ["train", "--model", "cnn-small", "--epochs", "1", "--objective", "natural", "--out", str(out)]
        assert main(args + COMMON) == 2
        assert f"pid {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: its lock is stale and taken over.
    assert main(args + COMMON) == 0
    assert not (out / ".lock").exists() or (out / ".lock").read_text() == str(__import__("os").getpid())


def test_out_naming_a_file_is_one_clear_line(tmp_path, capsys):
    path = tmp_path / "file"
    path.write_text("x")
    assert main(["train", "--epochs", "1", "--objective", "natural", "--out", str(path)] + COMMON) == 2
    assert "is a file" in capsys.readouterr().err
