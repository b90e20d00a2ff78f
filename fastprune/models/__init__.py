"""Models whose inputs are images in [0, 1]; normalisation lives inside the model (LeNet3, PwoA's,
takes the raw [0, 1] images as PwoA does), so eps is in pixel units everywhere."""
from __future__ import annotations

from torch import nn

from .common import Normalize
from .resnet import resnet18
from .small import LeNet3, cnn_small, lenet
from .vgg import vgg16
from .wide_resnet import WideResNet

_MODELS = {
    "cnn-small": cnn_small,
    "cnn-wide": lambda num_classes, in_channels: cnn_small(num_classes, in_channels, width=64),
    "lenet": lenet,
    "lenet3": LeNet3,
    "resnet18": resnet18,
    "vgg16": vgg16,
    "wrn-28-4": lambda num_classes, in_channels: WideResNet(28, 4, num_classes, in_channels),
    "wrn-28-10": lambda num_classes, in_channels: WideResNet(28, 10, num_classes, in_channels),
    "wrn-34-10": lambda num_classes, in_channels: WideResNet(34, 10, num_classes, in_channels),
}


def available_models() -> list[str]:
    return sorted(_MODELS)


def get_model(name: str, num_classes: int = 10, in_channels: int = 3, normalize: str | None = "default") -> nn.Module:
    """A fresh model by name: ``available_models()`` lists them. The model remembers how it was
    built (``model.fastprune_recipe``), so that files holding only its tensors (save_sparse) can
    rebuild it without unpickling code. ``normalize=None``: the model takes raw [0, 1] inputs, as the
    papers' and RobustBench's models do (its normalisation becomes the identity; the mean and std
    are buffers of the state_dict, so a saved model keeps this)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {available_models()}")
    if num_classes < 2 or in_channels < 1:
        raise ValueError(f"num_classes must be >= 2 and in_channels >= 1, got {num_classes}, {in_channels}")
    if normalize not in ("default", None):
        raise ValueError(f"normalize must be 'default' or None (raw [0, 1] inputs), got {normalize!r}")
    model = _MODELS[name](num_classes=num_classes, in_channels=in_channels)
    if normalize is None:
        for module in model.modules():
            if isinstance(module, Normalize):
                module.mean.zero_()
                module.std.fill_(1.0)
    model.fastprune_recipe = recipe(name, num_classes, in_channels)
    return model


def recipe(name: str, num_classes: int, in_channels: int) -> dict:
    """How to rebuild a zoo model: plain data (JSON-able)."""
    return {"zoo": name, "num_classes": int(num_classes), "in_channels": int(in_channels)}


def from_recipe(spec) -> nn.Module:
    """The model a :func:`recipe` describes; ValueError naming what is wrong otherwise."""
    if not isinstance(spec, dict) or not {"zoo", "num_classes", "in_channels"} <= set(spec):
        raise ValueError(f"recipe must be a dict with zoo, num_classes and in_channels, got {spec!r}")
    return get_model(spec["zoo"], spec["num_classes"], spec["in_channels"])


__all__ = ["WideResNet", "available_models", "from_recipe", "get_model", "cnn_small", "lenet", "recipe", "resnet18",
           "vgg16"]


from .pretrained import load_pretrained  # noqa: E402 - needs get_model above
