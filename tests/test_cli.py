"""The command line: train, prune, finetune, export and eval end to end; errors (the demo: test_study.py)."""
import pytest
import torch

from fastprune.cli import main


def test_eval_errors_are_reported(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["no-such-command"])


def test_train_prune_finetune_export_eval_pipeline(tmp_path, capsys):
    import json

    base = tmp_path / "base"
    args = ["--epochs", "2", "--objective", "pgd", "--eps", "0.1", "--alpha", "0.025", "--steps", "2",
            "--batch-size", "64", "--quiet"]
    assert main(["train", "--model", "cnn-small", "--out", str(base)] + args) == 0
    assert {"config.json", "checkpoint.pt", "metrics.csv", "metrics.json", "model.pt", "report.json"} <= {
        p.name for p in base.iterdir()}
    rows = (base / "metrics.csv").read_text().strip().splitlines()
    # Running again with the same directory resumes: nothing left to train, same metrics.
    assert main(["train", "--model", "cnn-small", "--out", str(base)] + args) == 0
    assert (base / "metrics.csv").read_text().strip().splitlines() == rows
    short = ["--eps", "0.1", "--objective", "natural", "--batch-size", "64", "--quiet"]
    for method, extra in (("hydra", ["--prune-epochs", "1", "--finetune-epochs", "1"]),
                          ("lwm", ["--finetune-epochs", "1"]),
                          ("pwoa", ["--teacher", str(base / "model.pt"), "--admm-epochs", "1",
                                    "--retrain-epochs", "1", "--temperature", "4", "--kd-alpha", "1",
                                    "--prune-layers", "all"])):
        out = tmp_path / method
        assert main(["prune", "--method", method, "--checkpoint", str(base / "model.pt"), "--sparsity", "0.9",
                     "--out", str(out)] + short + extra) == 0
        report = json.loads((out / "report.json").read_text())
        assert abs(report["sparsity"] - 0.9) < 0.01 and 0 <= report["pgd20"] <= report["clean"] <= 1
    config = tmp_path / "ft.yaml"
    config.write_text(f"checkpoint: {tmp_path / 'hydra' / 'model.pt'}\nepochs: 1\nobjective: natural\neps: 0.1\n")
    assert main(["finetune", "--config", str(config), "--out", str(tmp_path / "ft"), "--quiet"]) == 0
    sparse = tmp_path / "model.sparse.pt"
    assert main(["export", "--checkpoint", str(tmp_path / "ft" / "model.pt"), "--out", str(sparse),
                 "--batch-size", "32", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(sparse), "--eps", "0.1", "--attacks", "clean", "--json", "--quiet"]) == 0
    sparse_eval = capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(tmp_path / "ft" / "model.pt"), "--eps", "0.1", "--attacks", "clean",
                 "--json", "--quiet"]) == 0
    dense_eval = capsys.readouterr().out
    # the exported file is the finetuned model: the same accuracy, and outputs equal per bucket tuned
    assert json.loads(sparse_eval.splitlines()[-1]) == json.loads(dense_eval.splitlines()[-1])
    # the default suite is AutoAttack standard, reported per component, here through the sparse kernels
    assert main(["eval", "--checkpoint", str(sparse), "--eps", "0.1", "--square-queries", "20",
                 "--autoattack-steps", "3", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert list(result) == ["clean", "autoattack/apgd-ce", "autoattack/apgd-t", "autoattack/fab-t",
                            "autoattack/square", "autoattack", "worst", "n"]
    assert result["worst"] == result["autoattack"] <= result["autoattack/apgd-ce"] <= result["clean"]
    from fastprune.nn import load_sparse
    from fastprune.train import load_model

    loaded, (model, _) = load_sparse(str(sparse)), load_model(str(tmp_path / "ft" / "model.pt"))
    assert len(loaded.tuned(torch.device("cpu"))) == 5  # one config per batch-size bucket
    x = torch.rand(300, 1, 8, 8)
    with torch.no_grad():
        for batch in (1, 5, 32, 100, 300):
            torch.testing.assert_close(loaded(x[:batch]), model(x[:batch]), atol=1e-5, rtol=1e-5)


def test_bad_configs_are_reported(tmp_path, capsys):
    assert main(["train", "--model", "nope", "--epochs", "1", "--out", str(tmp_path / "a"), "--quiet"]) == 2
    assert "unknown model" in capsys.readouterr().err
    ckpt = tmp_path / "missing.pt"
    assert main(["prune", "--method", "lwm", "--checkpoint", str(ckpt), "--sparsity", "1.5"]) == 2
    assert "sparsity" in capsys.readouterr().err
    assert main(["prune", "--method", "pwoa", "--checkpoint", str(ckpt), "--sparsity", "0.5"]) == 2
    assert "--teacher is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", "--method", "snip", "--checkpoint", str(ckpt), "--sparsity", "0.5"])
    config = tmp_path / "c.yaml"
    config.write_text("epochz: 3\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "unknown options ['epochz']" in capsys.readouterr().err


def test_training_options_reach_fit():
    from fastprune.cli import _fit_options, build_parser
    from fastprune.data import get_dataset
    from fastprune.data.augment import random_crop_flip

    parser = build_parser()
    data = get_dataset("digits")
    cifar = _fit_options(parser.parse_args(["train", "--data", "cifar10", "--amp", "--channels-last"]), data)
    assert cifar["augment"] is random_crop_flip and cifar["amp"] and cifar["channels_last"]
    digits = _fit_options(parser.parse_args(["train", "--data", "digits"]), data)
    assert digits["augment"] is None and not digits["amp"]
    forced = _fit_options(parser.parse_args(["prune", "--method", "lwm", "--checkpoint", "x", "--sparsity", "0.9",
                                             "--augment", "crop-flip"]), data)
    assert forced["augment"] is random_crop_flip
    # the papers' scripts keep the best robust epoch: the test split decides, by default
    assert digits["keep"] == "best_robust" and digits["val"][0] is data.test.tensors[0]
    last = _fit_options(parser.parse_args(["train", "--keep", "last", "--optimizer", "adam", "--schedule",
                                           "multistep", "--milestones", "75", "90"]), data)
    assert last["keep"] == "last" and "val" not in last
    assert (last["optimizer"], last["schedule"], last["milestones"]) == ("adam", "multistep", (75, 90))


def test_plain_state_dicts_need_and_take_model(tmp_path, capsys):
    """A plain state_dict (the papers', RobustBench's, or a model's own) loads with --model ARCH; without
    it the command says so in one line."""
    import json

    from fastprune.data import get_dataset
    from fastprune.models import get_model

    torch.manual_seed(0)
    model = get_model("cnn-small", 10, 1).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "plain.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "plain.pt"), "--attacks", "clean", "--quiet"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "plain.pt"), "--model", "cnn-small", "--attacks", "clean",
                 "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    x, y = get_dataset("digits").test.tensors
    with torch.no_grad():
        assert result["clean"] * result["n"] == pytest.approx(int((model(x).argmax(1) == y).sum()))
    assert main(["eval", "--checkpoint", str(tmp_path / "plain.pt"), "--model", "lenet3", "--attacks", "clean",
                 "--quiet"]) == 2
    assert "does not fit --model lenet3" in capsys.readouterr().err
    # a HYDRA score checkpoint: --checkpoint-sparsity gives its masks; the model evaluates pruned
    state = dict(model.state_dict())
    for name in ("1", "3", "7", "9"):
        state[f"{name}.popup_scores"] = torch.randn_like(state[f"{name}.weight"])
    torch.save(state, tmp_path / "hydra.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "hydra.pt"), "--model", "cnn-small", "--attacks", "clean",
                 "--quiet"]) == 2
    assert "sparsity" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tmp_path / "hydra.pt"), "--model", "cnn-small", "--checkpoint-sparsity",
                 "0.5", "--attacks", "clean", "--quiet", "--json"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out.splitlines()[-1])["clean"] <= 1
