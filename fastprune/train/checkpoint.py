"""Model checkpoints: written to a temporary file in the same folder, then renamed, so a crash
never leaves a half-written checkpoint behind."""
from __future__ import annotations

import os
import tempfile

import torch
from torch import nn

from ..models import get_model


def atomic_save(obj, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(path: str, model: nn.Module, name: str, num_classes: int, in_channels: int, **meta) -> None:
    """Save a model of fastprune.models with what is needed to rebuild it (masked layers included:
    their masks are frozen into the file)."""
    from ..nn.masked import MASKED_TYPES

    masked = [n for n, m in model.named_modules() if isinstance(m, MASKED_TYPES)]
    for n, m in model.named_modules():
        if isinstance(m, MASKED_TYPES) and m.source != "fixed":
            raise ValueError(f"layer {n!r} still has a trainable mask: freeze_mask() it before saving")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save({"model": name, "num_classes": num_classes, "in_channels": in_channels,
                 "state_dict": state, "masked_layers": masked, "meta": meta}, path)


def load_model(path: str, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode on ``device``, the checkpoint's fields) from :func:`save_model`'s file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "num_classes", "in_channels", "state_dict"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path!r} lacks {key!r}: not written by fastprune")
    model = get_model(ckpt["model"], ckpt["num_classes"], ckpt["in_channels"])
    if ckpt.get("masked_layers"):
        from ..nn.masked import MASKED_TYPES, prune_model

        skip = [n for n, m in model.named_modules()
                if type(m) in (nn.Conv2d, nn.Linear) and n not in set(ckpt["masked_layers"])]
        prune_model(model, 0.0, method="magnitude", skip=skip)
        for m in model.modules():
            if isinstance(m, MASKED_TYPES):
                m.freeze_mask()  # the saved masks are loaded into these buffers just below
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt
