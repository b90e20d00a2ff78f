"""Models whose inputs are images in [0, 1]; normalisation lives inside the model, so eps is in
pixel units everywhere."""
from __future__ import annotations

from torch import nn

from .resnet import resnet18
from .small import cnn_small, lenet
from .vgg import vgg16
from .wide_resnet import WideResNet

_MODELS = {
    "cnn-small": cnn_small,
    "cnn-wide": lambda num_classes, in_channels: cnn_small(num_classes, in_channels, width=64),
    "lenet": lenet,
    "resnet18": resnet18,
    "vgg16": vgg16,
    "wrn-28-4": lambda num_classes, in_channels: WideResNet(28, 4, num_classes, in_channels),
    "wrn-28-10": lambda num_classes, in_channels: WideResNet(28, 10, num_classes, in_channels),
    "wrn-34-10": lambda num_classes, in_channels: WideResNet(34, 10, num_classes, in_channels),
}


def available_models() -> list[str]:
    return sorted(_MODELS)


def get_model(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A fresh model by name: ``available_models()`` lists them."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {available_models()}")
    if num_classes < 2 or in_channels < 1:
        raise ValueError(f"num_classes must be >= 2 and in_channels >= 1, got {num_classes}, {in_channels}")
    return _MODELS[name](num_classes=num_classes, in_channels=in_channels)


__all__ = ["WideResNet", "available_models", "get_model", "cnn_small", "lenet", "resnet18", "vgg16"]
