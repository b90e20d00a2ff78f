"""Models whose inputs are images in [0, 1]; normalisation lives inside the model (LeNet3, PwoA's,
takes the raw [0, 1] images as PwoA does), so eps is in pixel units everywhere."""
from __future__ import annotations

from torch import nn

from .common import Normalize
from .external import ImageInput, build_external, check_normalize, is_external, is_file_spec, unwrap
from .resnet import resnet18
from .small import LeNet3, cnn_small, hydra_cnn_large, hydra_cnn_small, lenet
from .vgg import vgg16
from .wide_resnet import WideResNet

_MODELS = {
    "cnn-small": cnn_small,
    "cnn-wide": lambda num_classes, in_channels: cnn_small(num_classes, in_channels, width=64),
    "hydra-cnn-small": hydra_cnn_small,
    "hydra-cnn-large": hydra_cnn_large,
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
    """A fresh model by name: a zoo model (``available_models()``), ``torchvision:NAME``,
    ``timm:NAME`` or ``path/to/file.py:factory`` (fastprune.models.external). The model remembers
    how it was built (``model.fastprune_recipe``), so that files holding only its tensors
    (save_sparse, checkpoints) can rebuild it without unpickling code.

    normalize: for a zoo model, "default" (its own normalisation, the first layer) or None / "none"
    (raw [0, 1] inputs, as the papers' and RobustBench's models take; its normalisation becomes the
    identity, and the mean and std are buffers of the state_dict, so a saved model keeps this). For
    another model, "none" (the default) or "imagenet" / "cifar10": the model is wrapped so that it
    takes [0, 1] images and normalises them first."""
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {type(name).__name__}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2 \
            or isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"num_classes must be an int >= 2 and in_channels an int >= 1, got {num_classes!r}, "
                         f"{in_channels!r}")
    if is_external(name):
        model = build_external(name, num_classes, in_channels, normalize)
        model.fastprune_recipe = recipe(name, num_classes, in_channels, check_normalize(normalize))
        return model
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {available_models()}, or torchvision:NAME, "
                         f"timm:NAME, path/to/file.py:factory")
    if normalize == "none":
        normalize = None
    if normalize not in ("default", None):
        raise ValueError(f"normalize for a zoo model must be 'default' or None / 'none' (raw [0, 1] inputs), "
                         f"got {normalize!r}")
    model = _MODELS[name](num_classes=num_classes, in_channels=in_channels)
    if normalize is None:
        for module in model.modules():
            if isinstance(module, Normalize):
                module.mean.zero_()
                module.std.fill_(1.0)
    model.fastprune_recipe = recipe(name, num_classes, in_channels)
    return model


def recipe(name: str, num_classes: int, in_channels: int, normalize: str | None = None) -> dict:
    """How to rebuild a model of :func:`get_model`: plain data (JSON-able). ``zoo`` holds the name
    get_model took (a zoo name or an external one); ``normalize`` is kept for external models."""
    out = {"zoo": name, "num_classes": int(num_classes), "in_channels": int(in_channels)}
    if normalize is not None:
        out["normalize"] = normalize
    return out


def from_recipe(spec, *, model: str | None = None) -> nn.Module:
    """The model a :func:`recipe` describes; ValueError naming what is wrong otherwise.

    A model built by a factory in a Python file is rebuilt only when the caller names that factory
    again (``model="path/to/file.py:factory"``): a file fastprune reads never makes it import code."""
    if not isinstance(spec, dict) or not {"zoo", "num_classes", "in_channels"} <= set(spec):
        raise ValueError(f"recipe must be a dict with zoo, num_classes and in_channels, got {spec!r}")
    name = spec["zoo"]
    if is_file_spec(name) and model != name:
        raise ValueError(f"this model was built by {name!r}; fastprune does not import a Python file named inside "
                         f"a file it reads: pass model={name!r} (--model {name}) to rebuild it")
    return get_model(name, spec["num_classes"], spec["in_channels"], spec.get("normalize", "default"))


__all__ = ["ImageInput", "Normalize", "WideResNet", "available_models", "unwrap", "from_recipe", "get_model", "cnn_small", "lenet", "recipe", "resnet18",
           "vgg16"]


from .pretrained import load_pretrained  # noqa: E402 - needs get_model above
