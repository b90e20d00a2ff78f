"""No file runs code when fastprune loads it: a pickle whose unpickling would create a marker folder
is planted on every loading path (checkpoints, run resumption, sparse models, `fastprune eval`, the
CIFAR loader); the marker must never appear and the error must be one clear line."""
import os
import pickle

import pytest
import torch

import fastprune
from fastprune.cli import main
from fastprune.data import get_dataset
from fastprune.train import load_model


class Payload:
    """Unpickling this calls os.mkdir(marker): code execution, harmless and visible."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a planted file ran code while being loaded"


def plant_torch_file(path, marker, **fields):
    """A torch file that looks like a fastprune file but carries the payload."""
    torch.save({**fields, "payload": Payload(marker)}, path)


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_load_model_refuses_a_planted_checkpoint(tmp_path, marker):
    path = tmp_path / "model.pt"
    plant_torch_file(path, marker, model="cnn-small", num_classes=10, in_channels=1, state_dict={})
    with pytest.raises(ValueError, match="refused") as err:
        load_model(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_load_sparse_refuses_a_planted_file(tmp_path, marker):
    path = tmp_path / "model.sparse.pt"
    plant_torch_file(path, marker, format="fastprune-sparse", version=1)
    with pytest.raises(ValueError, match="refused"):
        fastprune.load_sparse(str(path))
    # The old format (the whole module pickled) is refused the same way, whatever it holds.
    torch.save({"fastprune_sparse_model": Payload(marker)}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="refused"):
        fastprune.load_sparse(str(tmp_path / "old.pt"))


def test_load_pretrained_refuses_a_planted_state_dict(tmp_path, marker, capsys):
    from fastprune.models import load_pretrained

    path = tmp_path / "trades.pt"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": Payload(marker)}, path)
    with pytest.raises(ValueError, match="refused"):
        load_pretrained("wrn-28-4", str(path))
    assert main(["eval", "--checkpoint", str(path), "--model", "wrn-28-4", "--data", "digits", "--attacks",
                 "clean"]) == 2
    assert "refused" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("command", ["eval", "prune"])
def test_cli_refuses_a_planted_checkpoint_in_one_line(tmp_path, marker, capsys, command):
    path = tmp_path / "model.pt"
    plant_torch_file(path, marker, model="cnn-small", num_classes=10, in_channels=1, state_dict={})
    args = {"eval": ["eval", "--checkpoint", str(path), "--data", "digits", "--attacks", "clean"],
            "prune": ["prune", "--method", "lwm", "--checkpoint", str(path), "--sparsity", "0.5",
                      "--out", str(tmp_path / "run"), "--quiet"]}[command]
    assert main(args) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"fastprune {command}: error:") and "refused" in line


def test_resuming_a_run_refuses_a_planted_run_checkpoint(tmp_path, marker, capsys):
    run = tmp_path / "run"
    run.mkdir()
    plant_torch_file(run / "checkpoint.pt", marker, model={}, epoch=0)
    args = ["train", "--model", "cnn-small", "--epochs", "1", "--objective", "natural", "--out", str(run), "--quiet"]
    assert main(args) == 2
    line = one_line(capsys.readouterr().err)
    assert "run checkpoint" in line and "refused" in line


def test_resuming_a_prune_phase_refuses_a_planted_run_checkpoint(tmp_path, marker, capsys):
    base = tmp_path / "base"
    assert main(["train", "--model", "cnn-small", "--epochs", "1", "--objective", "natural", "--out", str(base),
                 "--quiet"]) == 0
    capsys.readouterr()
    run = tmp_path / "prune"
    (run / "prune").mkdir(parents=True)
    plant_torch_file(run / "prune" / "checkpoint.pt", marker, model={}, epoch=0)
    assert main(["prune", "--method", "hydra", "--checkpoint", str(base / "model.pt"), "--sparsity", "0.5",
                 "--prune-epochs", "1", "--finetune-epochs", "1", "--objective", "natural", "--out", str(run),
                 "--quiet"]) == 2
    assert "refused" in one_line(capsys.readouterr().err)


def test_cifar_loader_refuses_a_planted_batch_file(tmp_path, marker):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": Payload(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(ValueError, match="not allowed") as err:
        get_dataset("cifar10", root=str(tmp_path))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage", b"PK\x03\x04truncated zip"])
def test_corrupt_files_give_one_clear_line(tmp_path, content, capsys):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="model.pt"):
        load_model(str(path))
    with pytest.raises(ValueError, match="model.pt"):
        fastprune.load_sparse(str(path))
    assert main(["eval", "--checkpoint", str(path)]) == 2
    assert "model.pt" in one_line(capsys.readouterr().err)
    assert main(["eval", "--checkpoint", str(tmp_path)]) == 2  # a folder
    assert "folder" in one_line(capsys.readouterr().err)


def test_a_whole_pickled_model_is_refused_with_the_way_out(tmp_path, capsys):
    """torch.save(model) files are refused (they would run code) and the one line says what to do."""
    from torch import nn

    torch.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "whole.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "whole.pt"), "--attacks", "clean"]) == 2
    line = one_line(capsys.readouterr().err)
    assert "refused" in line and "Sequential" in line and "state_dict()" in line and "--model" in line
