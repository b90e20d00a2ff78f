"""Models from outside the zoo: torchvision's, timm's, or a factory in the user's own Python file.

A model is named by one string, the same in the Python API (``get_model``) and on the command line
(``--model``):

    torchvision:resnet18              torchvision.models.get_model(name, weights=None, num_classes=...)
    timm:deit_tiny_patch16_224        timm.create_model(name, pretrained=False, num_classes=..., in_chans=...)
    path/to/models.py:make_net        the function make_net of that file, called with the num_classes /
                                      in_channels keywords it accepts

The model takes images in [0, 1] (eps is in pixel units everywhere in fastprune); a model trained on
normalised inputs gets the normalisation as its first step (``normalize="imagenet"`` or
``"cifar10"``: :class:`ImageInput`), and torchvision's 3-channel models take 1-channel images by
repeating the channel. The model remembers how it was built (``fastprune_recipe``), so fastprune's
files rebuild it from plain data. A file factory is the exception that needs consent: a file
fastprune loads never makes it import a Python file; the caller names the same factory again.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os

import torch
from torch import nn

from .common import Normalize

NORMALIZATIONS = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
}
SOURCES = ("torchvision", "timm")


def is_external(name: str) -> bool:
    """Whether a model name points outside the zoo (``source:name`` or ``file.py:factory``)."""
    return isinstance(name, str) and ":" in name


def is_file_spec(name: str) -> bool:
    return is_external(name) and name.rsplit(":", 1)[0].endswith(".py")


class ImageInput(nn.Module):
    """[0, 1] images in, the wrapped model's expected input out: channels repeated (1 -> 3) and/or
    normalised per channel. The wrapped model is ``.model``: plain state_dicts load into it."""

    def __init__(self, model: nn.Module, mean=None, std=None, repeat_channels: int = 1):
        super().__init__()
        self.repeat_channels = int(repeat_channels)
        self.normalize = Normalize(mean, std) if mean is not None else nn.Identity()
        self.model = model

    def forward(self, x: torch.Tensor):
        if self.repeat_channels > 1:
            x = x.expand(-1, self.repeat_channels, -1, -1) if x.shape[1] == 1 else x
        return self.model(self.normalize(x))


def check_normalize(normalize) -> str:
    """The normalisation's name: "none", "imagenet" or "cifar10" (None and "default" mean none)."""
    name = "none" if normalize in (None, "default") else normalize
    if name != "none" and name not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of none, {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    return name


def _torchvision(name: str, num_classes: int, in_channels: int) -> tuple[nn.Module, int]:
    try:
        import torchvision
    except ImportError:
        raise ValueError("model torchvision:...: torchvision is not installed (pip install torchvision)") from None
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ValueError(f"model torchvision:{name}: torchvision has no classification model {name!r} "
                         f"(some it has: {', '.join(sorted(known)[:12])}, ...)")
    if in_channels not in (1, 3):
        raise ValueError(f"model torchvision:{name} takes 3-channel images (1-channel ones are repeated); "
                         f"the data have {in_channels} channels")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    return model, 3 if in_channels == 1 else 1


def _timm(name: str, num_classes: int, in_channels: int) -> tuple[nn.Module, int]:
    try:
        import timm
    except ImportError:
        raise ValueError("model timm:...: timm is not installed (pip install timm)") from None
    if not timm.is_model(name):
        raise ValueError(f"model timm:{name}: timm has no model {name!r} (timm.list_models() lists them)")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels), 1


def _from_file(path: str, factory: str, num_classes: int, in_channels: int) -> nn.Module:
    if not os.path.isfile(path):
        raise ValueError(f"model {path}:{factory}: no such file {path!r}")
    module_name = "fastprune_user_model_" + hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's file: say where it failed, in one line
        raise ValueError(f"model {path}:{factory}: importing {path!r} failed: {type(exc).__name__}: {exc}") from None
    make = getattr(module, factory, None)
    if not callable(make):
        raise ValueError(f"model {path}:{factory}: {path!r} defines no function {factory!r}")
    try:
        accepted = inspect.signature(make).parameters
    except (TypeError, ValueError):
        accepted = {}
    kwargs = {k: v for k, v in (("num_classes", num_classes), ("in_channels", in_channels)) if k in accepted}
    model = make(**kwargs)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {path}:{factory}: the factory returned a {type(model).__name__}, not an nn.Module")
    return model


def build_external(name: str, num_classes: int, in_channels: int, normalize="none") -> nn.Module:
    """The model ``name`` (see the module's docstring), taking [0, 1] images with ``in_channels``
    channels and giving ``num_classes`` logits, wrapped in :class:`ImageInput` where it needs
    normalising or repeated channels."""
    norm = check_normalize(normalize)
    source, _, rest = name.partition(":")
    if is_file_spec(name):
        path, factory = name.rsplit(":", 1)
        model, repeat = _from_file(path, factory, num_classes, in_channels), 1
    elif source == "torchvision":
        model, repeat = _torchvision(rest, num_classes, in_channels)
    elif source == "timm":
        model, repeat = _timm(rest, num_classes, in_channels)
    else:
        raise ValueError(f"model {name!r}: expected a zoo name, torchvision:NAME, timm:NAME or path/to/file.py:factory")
    if norm != "none" or repeat > 1:
        mean, std = NORMALIZATIONS[norm] if norm != "none" else (None, None)
        model = ImageInput(model, mean, std, repeat)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside an :class:`ImageInput` (the one plain state_dicts were saved from)."""
    return model.model if isinstance(model, ImageInput) else model
