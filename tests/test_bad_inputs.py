"""Bad input gets one clear line, never a silent acceptance or an error from deep inside: a table of
calls to every public entry point (the API raises ValueError naming the argument; the command line
exits 2 with one line, no traceback)."""
import errno

import pytest
import torch

import fastprune
from fastprune.attacks import PGD, evaluate
from fastprune.cli import main
from fastprune.models import get_model
from fastprune.nn import prune_model
from fastprune.train import fit, make_objective


@pytest.fixture(scope="module")
def setup(digits):
    torch.manual_seed(0)
    model = get_model("cnn-small", 10, 1).eval()
    x, y = (t[:16] for t in digits.test.tensors)
    return model, x, y


def api_cases(model, x, y):
    bad_labels = y.clone()
    bad_labels[0] = 10
    neg_labels = y.clone()
    neg_labels[0] = -1
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    data = torch.utils.data.TensorDataset
    return [
        ("attack: label past the classes", lambda: PGD(model, eps=0.1, steps=1)(x, bad_labels), "below the model's 10"),
        ("attack: negative label", lambda: PGD(model, eps=0.1, steps=1)(x, neg_labels), ">= 0"),
        ("attack: bool labels", lambda: PGD(model, eps=0.1, steps=1)(x, y > 3), "integer"),
        ("attack: float64 images, float32 model", lambda: PGD(model, eps=0.1, steps=1)(x.double(), y), "float64"),
        ("attack: images in 0-255", lambda: PGD(model, eps=0.1, steps=1)(x * 255, y), "255"),
        ("attack: eps meant as /255", lambda: PGD(model, eps=8, steps=1), "/255"),
        ("evaluate clean: NaN images", lambda: evaluate(model, (nan, y), ["clean"], progress=False), "NaN"),
        ("evaluate clean: images in 0-255", lambda: evaluate(model, (x * 255, y), ["clean"], progress=False), "255"),
        ("evaluate clean: label past the classes", lambda: evaluate(model, (x, bad_labels), ["clean"],
                                                                   progress=False), "labels"),
        ("fit: label past the classes", lambda: fit(model, data(x, bad_labels), epochs=1, progress=False), "labels"),
        ("fit: float64 images", lambda: fit(model, data(x.double(), y), epochs=1, progress=False), "float64"),
        ("fit: NaN images", lambda: fit(model, data(nan, y), epochs=1, progress=False), "NaN"),
        ("fit: empty training set", lambda: fit(model, data(x[:0], y[:0]), epochs=1, progress=False), "no samples"),
        ("fit: not a dataset", lambda: fit(model, 42, epochs=1, progress=False), "Dataset, a DataLoader"),
        ("fit: mismatched pair", lambda: fit(model, (x, y[:-1]), epochs=1, progress=False), "labels"),
        ("objective: eps meant as /255", lambda: make_objective("pgd", eps=8), "/255"),
        ("gaussian_gram: sigma 0", lambda: fastprune.gaussian_gram(x, 0.0), "sigma"),
        ("gaussian_gram: sigma NaN", lambda: fastprune.gaussian_gram(x, float("nan")), "sigma"),
        ("gaussian_gram: sigma -1", lambda: fastprune.gaussian_gram(x, -1.0), "sigma"),
        ("gaussian_gram: sigma '1'", lambda: fastprune.gaussian_gram(x, "1"), "sigma"),
        ("pgd_step: negative per-sample eps", lambda: fastprune.pgd_step(x, x, x, alpha=0.1, eps=-torch.ones(16)),
         "eps"),
        ("pgd_step: NaN per-sample alpha", lambda: fastprune.pgd_step(
            x, x, x, alpha=torch.full((16,), float("nan")), eps=0.1), "alpha"),
        ("prune_model on a pruned model", lambda: prune_model(prune_model(get_model("cnn-small", 10, 1), 0.5), 0.9),
         "already pruned"),
        ("hsic: features that overflow float32", lambda: fastprune.hsic(torch.randn(8, 5) * 1e20, torch.randn(8, 3)),
         "overflow"),
    ]


def test_api_bad_inputs_raise_one_line_naming_the_problem(setup):
    model, x, y = setup
    for what, call, match in api_cases(model, x, y):
        with pytest.raises(ValueError, match=match) as err:
            call()
        assert "\n" not in str(err.value), what


def test_cka_of_a_constant_feature_is_zero():
    value = fastprune.hsic(torch.ones(8, 5), torch.randn(8, 3), estimator="cka", kernel_x="linear")
    assert value.item() == 0.0


def cli_cases(tmp_path, base_model):
    (tmp_path / "folder").mkdir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "broken.yaml").write_text("epochs: [1\n")
    (tmp_path / "list.yaml").write_text("model: [cnn-small, lenet]\n")
    (tmp_path / "choice.yaml").write_text("augment: foo\n")
    (tmp_path / "bool.yaml").write_text("quiet: 'false'\n")
    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x02not a checkpoint")
    (tmp_path / "truncated.pt").write_bytes(base_model.read_bytes()[:100])
    sparse = tmp_path / "model.sparse.pt"
    assert main(["export", "--checkpoint", str(base_model), "--out", str(sparse), "--quiet"]) == 0
    train = ["train", "--epochs", "1", "--objective", "natural", "--quiet"]
    return [
        ("device foo", train + ["--device", "foo"], "--device"),
        ("--out names a file", train + ["--out", str(tmp_path / "file")], "is a file"),
        ("vgg16 on digits", train + ["--model", "vgg16", "--out", str(tmp_path / "v")], "cannot take"),
        ("--config a folder", train + ["--config", str(tmp_path / "folder")], "not a file"),
        ("--config broken YAML", train + ["--config", str(tmp_path / "broken.yaml")], "YAML"),
        ("--config a list for model", train + ["--config", str(tmp_path / "list.yaml")], "one value"),
        ("--config a bad choice", train + ["--config", str(tmp_path / "choice.yaml")], "one of"),
        ("--config a string bool", train + ["--config", str(tmp_path / "bool.yaml")], "true or false"),
        ("--checkpoint a folder", ["eval", "--checkpoint", str(tmp_path / "folder")], "folder"),
        ("corrupt checkpoint", ["eval", "--checkpoint", str(tmp_path / "corrupt.pt")], "corrupt.pt"),
        ("truncated checkpoint", ["prune", "--method", "lwm", "--checkpoint", str(tmp_path / "truncated.pt"),
                                  "--sparsity", "0.5"], "truncated.pt"),
        ("sparse file to prune", ["prune", "--method", "lwm", "--checkpoint", str(sparse), "--sparsity", "0.5"],
         "sparse inference model"),
        ("export without --out", ["export", "--checkpoint", str(base_model)], "--out"),
        ("bench --batch 0", ["bench", "sparse", "--batch", "0"], "--batch"),
        ("demo --out a file", ["demo", "--quick", "--out", str(tmp_path / "file")], "is a file"),
    ]


def test_command_line_mistakes_exit_2_with_one_line(tmp_path, capsys):
    base = tmp_path / "base"
    assert main(["train", "--epochs", "1", "--objective", "natural", "--quiet", "--out", str(base)]) == 0
    for what, argv, match in cli_cases(tmp_path, base / "model.pt"):
        capsys.readouterr()
        assert main(argv) == 2, what
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, (what, err)
        assert err.startswith(f"fastprune {argv[0]}: error:") and match in err, (what, err)
    assert not (tmp_path / "v").exists(), "a refused train leaves no run directory behind"


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    args = ["train", "--epochs", "1", "--objective", "natural", "--quiet", "--out", str(out)]
    assert main(args) == 0
    before = (out / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    assert main(args[:2] + ["2"] + args[3:] + ["--out", str(tmp_path / "run2")]) == 2
    assert "no space left on device" in capsys.readouterr().err
    monkeypatch.setattr(torch, "save", real_save)
    assert (out / "checkpoint.pt").read_bytes() == before
    assert not list((tmp_path / "run2").glob(".tmp-*"))
