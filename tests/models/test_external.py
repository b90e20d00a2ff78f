"""Models from outside the zoo (fastprune/models/external.py): torchvision, timm and a factory in the
user's own file, through get_model, checkpoints, plain state_dicts, sparsify's files and the CLI."""
import json
import textwrap

import pytest
import torch
from torch import nn

from fastprune.cli import main
from fastprune.models import ImageInput, from_recipe, get_model, load_pretrained, unwrap
from fastprune.models.external import NORMALIZATIONS
from fastprune.nn import fold_masks, load_sparse, prune_model, save_sparse, sparsify
from fastprune.train import load_model, save_model

torchvision = pytest.importorskip("torchvision")

FACTORY = textwrap.dedent("""
    from torch import nn

    def make(num_classes, in_channels=3):
        return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                             nn.Flatten(), nn.Linear(32, num_classes))

    def not_a_model():
        return 3
""")


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "mynets.py"
    path.write_text(FACTORY)
    return str(path)


def test_torchvision_model_takes_one_channel_images_in_0_1_and_normalises_them():
    torch.manual_seed(0)
    model = get_model("torchvision:resnet18", 7, 1, normalize="imagenet").eval()
    assert isinstance(model, ImageInput) and model.fastprune_recipe["normalize"] == "imagenet"
    x = torch.rand(3, 1, 16, 16)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATIONS["imagenet"])
    with torch.no_grad():
        want = unwrap(model)((x.expand(-1, 3, -1, -1) - mean) / std)
        torch.testing.assert_close(model(x), want)
    assert want.shape == (3, 7)


def test_no_wrapper_where_nothing_is_needed_and_the_recipe_rebuilds_the_same_architecture():
    model = get_model("torchvision:mobilenet_v2", 10, 3)
    assert not isinstance(model, ImageInput)
    again = from_recipe(model.fastprune_recipe)
    assert type(again) is type(model)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name,match", [
    ("torchvision:no_such_net", "torchvision has no classification model"),
    ("nowhere:resnet18", "expected a zoo name, torchvision:NAME"),
    ("missing_file.py:make", "no such file"),
    ("resnet19", "unknown model"),
])
def test_bad_model_names_give_one_line(name, match):
    with pytest.raises(ValueError, match=match):
        get_model(name, 10, 3)


def test_bad_normalize_and_channels():
    with pytest.raises(ValueError, match="normalize must be one of"):
        get_model("torchvision:resnet18", 10, 3, normalize="mnist")
    with pytest.raises(ValueError, match="3-channel"):
        get_model("torchvision:resnet18", 10, 4)
    with pytest.raises(ValueError, match="normalize for a zoo model"):
        get_model("cnn-small", 10, 1, normalize="imagenet")


def test_a_file_factory_gets_the_keywords_it_accepts(factory_file):
    model = get_model(f"{factory_file}:make", 5, 2)
    assert model(torch.rand(2, 2, 8, 8)).shape == (2, 5)
    with pytest.raises(ValueError, match="returned a int, not an nn.Module"):
        get_model(f"{factory_file}:not_a_model", 5, 2)
    with pytest.raises(ValueError, match="defines no function 'absent'"):
        get_model(f"{factory_file}:absent", 5, 2)


def test_a_file_factory_is_rebuilt_only_when_the_caller_names_it(factory_file, tmp_path):
    spec = f"{factory_file}:make"
    model = get_model(spec, 4, 1)
    path = str(tmp_path / "model.pt")
    save_model(path, model, spec, 4, 1)
    with pytest.raises(ValueError, match="does not import a Python file"):
        load_model(path)
    loaded, ckpt = load_model(path, model=spec)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    with pytest.raises(ValueError, match="does not import a Python file"):
        from_recipe(model.fastprune_recipe)


def test_checkpoint_round_trip_keeps_the_normalisation(tmp_path):
    torch.manual_seed(1)
    model = get_model("torchvision:resnet18", 10, 3, normalize="cifar10").eval()
    path = str(tmp_path / "model.pt")
    save_model(path, model, "torchvision:resnet18", 10, 3)
    loaded, ckpt = load_model(path)
    assert ckpt["normalize"] == "cifar10" and isinstance(loaded, ImageInput)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_plain_state_dict_of_a_torchvision_model_loads_into_the_wrapped_model(tmp_path):
    torch.manual_seed(2)
    bare = torchvision.models.resnet18(num_classes=10).eval()
    path = str(tmp_path / "plain.pt")
    torch.save({"state_dict": {"module." + k: v for k, v in bare.state_dict().items()}}, path)
    model = load_pretrained("torchvision:resnet18", path, 10, 3, normalize="imagenet")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATIONS["imagenet"])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), bare((x - mean) / std))
    with pytest.raises(ValueError, match="does not fit --model torchvision:resnet34"):
        load_pretrained("torchvision:resnet34", path, 10, 3)
    with pytest.raises(ValueError, match="shapes differ"):
        load_pretrained("torchvision:resnet18", path, 7, 3)


@pytest.mark.parametrize("name,size", [("torchvision:resnet18", 32), ("torchvision:resnet50", 32),
                                       ("torchvision:mobilenet_v2", 32), ("torchvision:efficientnet_b0", 32),
                                       ("torchvision:convnext_tiny", 32), ("torchvision:vit_b_16", 224)])
def test_sparsify_and_its_file_round_trip_on_torchvision_models(name, size, tmp_path):
    torch.manual_seed(3)
    model = prune_model(get_model(name, 10, 3, normalize="imagenet").eval(), 0.9, method="magnitude")
    for module in model.modules():  # a non-zero head (ViT's starts at zero), so the outputs say something
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.bias, std=0.1)
    dense = fold_masks(model)
    sparse = sparsify(dense, benchmark=False)
    path = str(tmp_path / "model.sparse.pt")
    save_sparse(sparse, path)
    loaded = load_sparse(path)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        want = dense(x)
        scale = want.abs().max().item()
        assert scale > 0
        for got in (sparse(x), loaded(x)):
            torch.testing.assert_close(got, want, atol=1e-4 * scale, rtol=1e-4)


def test_timm_models_when_timm_is_installed(tmp_path):
    pytest.importorskip("timm")
    model = get_model("timm:resnet18", 10, 1)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="timm has no model"):
        get_model("timm:no_such_model_here", 10, 3)
    torch.manual_seed(4)
    dense = fold_masks(prune_model(get_model("timm:resnet18", 10, 3).eval(), 0.9, method="magnitude"))
    sparse = sparsify(dense, benchmark=False)
    save_sparse(sparse, str(tmp_path / "timm.pt"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        want = dense(x)
        torch.testing.assert_close(load_sparse(str(tmp_path / "timm.pt"))(x), want,
                                   atol=1e-4 * want.abs().max().item(), rtol=1e-4)


def test_cli_trains_evaluates_prunes_and_exports_a_file_factory_model(factory_file, tmp_path, capsys):
    spec = f"{factory_file}:make"
    run = tmp_path / "train"
    assert main(["train", "--model", spec, "--epochs", "1", "--objective", "natural", "--out", str(run),
                 "--quiet"]) == 0
    assert main(["eval", "--checkpoint", str(run / "model.pt"), "--attacks", "clean", "--quiet"]) == 2
    assert "does not import a Python file" in capsys.readouterr().err
    pruned = tmp_path / "pruned"
    assert main(["prune", "--method", "lwm", "--checkpoint", str(run / "model.pt"), "--model", spec,
                 "--sparsity", "0.5", "--finetune-epochs", "1", "--objective", "natural", "--out", str(pruned),
                 "--quiet"]) == 0
    exported = tmp_path / "model.sparse.pt"
    assert main(["export", "--checkpoint", str(pruned / "model.pt"), "--model", spec, "--out", str(exported),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(exported), "--model", spec, "--attacks", "clean", "--json",
                 "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= report["clean"] <= 1.0


def test_cli_evaluates_a_plain_torchvision_state_dict(tmp_path, capsys):
    bare = torchvision.models.resnet18(num_classes=10)
    path = tmp_path / "plain.pt"
    torch.save(bare.state_dict(), path)
    assert main(["eval", "--checkpoint", str(path), "--attacks", "clean", "--quiet"]) == 2
    assert "torchvision:NAME" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(path), "--model", "torchvision:resnet18", "--normalize", "imagenet",
                 "--attacks", "clean", "--quiet"]) == 0


def test_sparsify_says_which_sparse_convs_no_kernel_takes():
    model = prune_model(get_model("torchvision:mobilenet_v2", 10, 3).eval(), 0.9, method="magnitude")
    sparse = sparsify(model, benchmark=False)
    depthwise = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert sparse.no_kernel == depthwise and len(depthwise) == 17
    assert "17 layers" in sparse.summary() and "depthwise" in sparse.summary()
