"""The papers' and RobustBench's public checkpoints in the zoo's architectures.

Those checkpoints are plain state_dicts (often inside {"state_dict": ...} or {"model": ...}, with
DataParallel's "module." prefixes) of models that take raw [0, 1] images and name their layers their
own way. :func:`load_pretrained` reads one with ``weights_only=True`` (tensors and plain data only),
maps the names onto the zoo's model, and sets the model's input normalisation to what the file's
model does: none (raw inputs), or the file's own mean and std where it has them (RobustBench's
``mu``/``sigma``).

Name maps (checked on state_dicts built from the original layer names, tests/models/test_pretrained.py):
- TRADES-style WideResNets (TRADES' and LBGAT's WRN-34-10 that PwoA distils from, RobustBench's
  WRN-28-10/34-10): ``block{k}.layer.{i}.*`` -> ``block{k}.{i}.*``, ``convShortcut`` -> ``shortcut``,
  the last ``bn1``/``fc`` -> ``bn``/``linear``; their unused ``sub_block1`` is dropped.
- PwoA's (HBaR's) ResNet-18 and LeNet3: the zoo's ``resnet18`` and ``lenet3`` use the same names.
- HYDRA's score checkpoints (SubnetConv/SubnetLinear layers: ``weight``, ``bias``, ``popup_scores``)
  of an architecture whose names match the zoo's (e.g. a VGG16 named ``features``/``classifier``, as
  the zoo's ``vgg16`` is): each layer's ``popup_scores`` give its mask as HYDRA's GetSubnet computes
  it (the lowest int((1 - k) n) |score|s dropped, k = 1 - sparsity); the file does not hold k, so
  ``sparsity`` must be given. Other name layouts fail with the keys that differ.
- fastprune's own state_dicts load as they are.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from ..utils.io import safe_load
from . import get_model
from .external import is_external, unwrap

_WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "state")


def _unwrap(obj, path: str) -> dict[str, torch.Tensor]:
    """The state_dict inside a checkpoint object, "module." prefixes removed."""
    for _ in range(3):  # {"state_dict": {...}} or {"model": {"state_dict": ...}}
        if isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path!r} holds no state_dict (a dict of tensors, possibly under one of {_WRAPPERS})")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


def _map_wide_resnet(key: str) -> str | None:
    """A TRADES-style WideResNet name -> the zoo's (None: a tensor the zoo's model does not have)."""
    if key.startswith("sub_block1."):
        return None
    key = re.sub(r"^(block\d)\.layer\.(\d+)\.", r"\1.\2.", key)
    key = key.replace(".convShortcut.", ".shortcut.")
    key = re.sub(r"^bn1\.", "bn.", key)
    return re.sub(r"^fc\.", "linear.", key)


def hydra_mask(scores: torch.Tensor, k: float) -> torch.Tensor:
    """HYDRA's GetSubnet: ones at the weights whose |score| is not among the lowest int((1 - k) n)."""
    flat = scores.detach().abs().flatten()
    order = flat.argsort()
    mask = torch.ones_like(flat)
    mask[order[: int((1 - k) * flat.numel())]] = 0
    return mask.view_as(scores)


def map_keys(arch: str, state: dict[str, torch.Tensor], sparsity: float | None = None) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` under the zoo model ``arch``'s names (see the module docstring);
    HYDRA's ``popup_scores`` become ``mask`` buffers (``sparsity`` needed)."""
    scores = [k for k in state if k.endswith(".popup_scores")]
    if scores:
        if sparsity is None:
            raise ValueError("this is a HYDRA score checkpoint (popup_scores): pass the sparsity it was pruned to "
                             "(sparsity=..., --checkpoint-sparsity; HYDRA's k is 1 - sparsity)")
        state = dict(state)
        for key in scores:
            state[key[: -len("popup_scores")] + "mask"] = hydra_mask(state.pop(key), 1 - sparsity)
    mapped = {}
    for key, value in state.items():
        if key in ("mu", "sigma"):  # RobustBench's models that normalise inside
            mapped["normalize.mean" if key == "mu" else "normalize.std"] = value
            continue
        # (the map leaves fastprune's own WRN names unchanged: they never match it)
        new = _map_wide_resnet(key) if arch.startswith("wrn-") else key
        if new is not None:
            mapped[new] = value
    return mapped


def load_pretrained(arch: str, path: str, num_classes: int = 10, in_channels: int = 3,
                    map_location="cpu", sparsity: float | None = None, normalize: str | None = "none") -> nn.Module:
    """The model ``arch`` with the weights of the state_dict in ``path`` (the papers' or
    RobustBench's format, or fastprune's, or for ``torchvision:``/``timm:``/``file.py:factory``
    models the library's own names), in eval mode. Inputs stay [0, 1] images: a zoo model normalises
    as the file's model did (not at all, for the papers' and most RobustBench models); an external
    model as ``normalize`` says ("none", "imagenet", "cifar10": get_model). A file whose tensors do
    not fit ``arch`` raises ValueError naming the keys that differ. HYDRA's score checkpoints need
    ``sparsity``: their masks are folded into the weights and kept in ``model.hydra_masks``
    ({layer: mask}); ``fastprune.nn.apply_masks(model, model.hydra_masks)`` makes those layers
    fixed-mask layers (the command line does)."""
    state = _unwrap(safe_load(path, "pretrained checkpoint", map_location=map_location), path)
    mapped = map_keys(arch, state, sparsity)
    # HYDRA's pruned layers: the masks are folded into the weights (their zeros) and kept in
    # ``model.hydra_masks`` for fastprune.nn.apply_masks (fixed-mask layers; the CLI applies them).
    masks = {k[: -len(".mask")]: mapped.pop(k) for k in [k for k in mapped if k.endswith(".mask")]}
    if is_external(arch):
        # The file holds the bare model's tensors; fastprune's input wrapper (if any) adds none of its own.
        model = get_model(arch, num_classes, in_channels, normalize=normalize)
        target = unwrap(model)
        prefix = "model." if target is not model else ""
    else:
        raw_inputs = not any(k.startswith("normalize.") for k in mapped)
        # The file's model took raw [0, 1] inputs (no mu/sigma): the zoo model's normalisation is the identity.
        model = get_model(arch, num_classes, in_channels, normalize=None if raw_inputs else "default")
        target, prefix = model, ""
        if raw_inputs:
            mapped.update({k: v for k, v in model.state_dict().items() if k.startswith("normalize.")})
    expected = target.state_dict()
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path!r} does not fit --model {arch}: missing {missing[:6]}"
                         f"{' ...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                         f"{' ...' if len(unexpected) > 6 else ''}")
    wrong = [f"{k} {tuple(mapped[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if tuple(mapped[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"{path!r} does not fit --model {arch} (num_classes={num_classes}, "
                         f"in_channels={in_channels}): shapes differ for {wrong[:4]}")
    unknown = sorted(n for n in masks if f"{n}.weight" not in expected)
    if unknown:
        raise ValueError(f"{path!r} does not fit --model {arch}: scores for {unknown[:4]}, which it does not have")
    for name, mask in masks.items():
        mapped[f"{name}.weight"] = mapped[f"{name}.weight"] * mask.to(mapped[f"{name}.weight"].dtype)
    target.load_state_dict({k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in mapped.items()})
    if masks:
        model.hydra_masks = {prefix + name: mask for name, mask in masks.items()}
    return model.eval()
