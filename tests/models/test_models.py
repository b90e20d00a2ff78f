"""Every model: shapes, normalisation inside, parameters that train, bad names."""
import pytest
import torch

from fastprune.models import available_models, get_model
from fastprune.models.common import Normalize

SHAPES = {"cnn-small": (1, 8), "cnn-wide": (1, 8), "lenet": (1, 28), "lenet3": (1, 28), "resnet18": (3, 32),
          "vgg16": (3, 32), "wrn-28-4": (3, 32)}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_forward_backward(name):
    channels, size = SHAPES[name]
    model = get_model(name, num_classes=7, in_channels=channels)
    x = torch.rand(2, channels, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # Normalisation lives inside the model (inputs are [0, 1] images, eps in pixel units); PwoA's
    # LeNet3 takes raw [0, 1] inputs, as its code does.
    assert sum(isinstance(m, Normalize) for m in model.modules()) == (0 if name == "lenet3" else 1)


def test_all_names_build_and_bad_names_fail():
    assert {"cnn-small", "cnn-wide", "lenet", "resnet18", "vgg16", "wrn-28-4", "wrn-28-10", "wrn-34-10"} <= set(available_models())
    with pytest.raises(ValueError, match="unknown model"):
        get_model("alexnet")
    with pytest.raises(ValueError, match="num_classes"):
        get_model("vgg16", num_classes=1)


def test_vgg16_is_hydras_variant():
    model = get_model("vgg16")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(2048, 256), (256, 256), (256, 10)]


def test_lenet3_is_pwoas():
    """PwoA's LeNet3: its layer names and shapes, its three hidden outputs, 28x28 inputs only."""
    from fastprune.prune import block_outputs

    model = get_model("lenet3", 10, 1)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {"conv1.weight": (32, 1, 5, 5), "conv1.bias": (32,), "conv2.weight": (64, 32, 5, 5),
                      "conv2.bias": (64,), "fc1.weight": (1024, 3136), "fc1.bias": (1024,),
                      "fc2.weight": (10, 1024), "fc2.bias": (10,)}
    assert block_outputs(model) == ["relu1", "relu2", "relu3"]
    with pytest.raises(ValueError, match="28, 28"):
        model(torch.rand(2, 1, 8, 8))


def test_raw_input_models():
    """normalize=None: the model takes raw [0, 1] inputs (its Normalize is the identity)."""
    torch.manual_seed(0)
    plain = get_model("resnet18", normalize=None).eval()
    x = torch.rand(2, 3, 32, 32)
    norm = next(m for m in plain.modules() if isinstance(m, Normalize))
    assert torch.equal(norm(x), x)
    default = get_model("resnet18").eval()
    default.load_state_dict({k: v for k, v in plain.state_dict().items() if not k.startswith("normalize.")},
                            strict=False)
    with torch.no_grad():
        assert not torch.allclose(default(x), plain(x))
    with pytest.raises(ValueError, match="normalize"):
        get_model("resnet18", normalize="imagenet")
