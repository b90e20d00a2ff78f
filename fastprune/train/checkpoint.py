"""Model checkpoints: written to a temporary file in the same folder, then renamed, so a crash
never leaves a half-written checkpoint behind."""
from __future__ import annotations

import torch
from torch import nn

from ..models import from_recipe
from ..utils.io import atomic_save, safe_load  # noqa: F401 - re-exported (fastprune.train.atomic_save)


def save_model(path: str, model: nn.Module, name: str, num_classes: int, in_channels: int, **meta) -> None:
    """Save a model of fastprune.models with what is needed to rebuild it (masked layers included:
    their masks are frozen into the file)."""
    from ..nn.masked import MASKED_TYPES

    masked = [n for n, m in model.named_modules() if isinstance(m, MASKED_TYPES)]
    for n, m in model.named_modules():
        if isinstance(m, MASKED_TYPES) and m.source != "fixed":
            raise ValueError(f"layer {n!r} still has a trainable mask: freeze_mask() it before saving")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    fields = {"model": name, "num_classes": num_classes, "in_channels": in_channels,
              "state_dict": state, "masked_layers": masked, "meta": meta}
    normalize = (getattr(model, "fastprune_recipe", None) or {}).get("normalize")
    if normalize is not None:  # an external model's input normalisation (get_model's normalize)
        fields["normalize"] = normalize
    atomic_save(fields, path)


def load_model(path: str, device: str | torch.device = "cpu", *, model: str | None = None) -> tuple[nn.Module, dict]:
    """(model in eval mode on ``device``, the checkpoint's fields) from :func:`save_model`'s file.
    A model built by a factory in a Python file is rebuilt only when ``model`` names that factory
    again (a checkpoint never makes fastprune import code)."""
    ckpt = safe_load(path, "checkpoint")
    if not isinstance(ckpt, dict):
        raise ValueError(f"checkpoint {path!r} is not a dict: not written by fastprune")
    if ckpt.get("format") == "fastprune-sparse":
        raise ValueError(f"{path!r} is a sparse inference model (fastprune export); this command takes a training "
                         f"checkpoint (a run's model.pt)")
    for key in ("model", "num_classes", "in_channels", "state_dict"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {path!r} lacks {key!r}: not written by fastprune")
    requested = model
    model = from_recipe({"zoo": ckpt["model"], "num_classes": ckpt["num_classes"], "in_channels": ckpt["in_channels"],
                         "normalize": ckpt.get("normalize", "default")}, model=requested)
    from ..nn.attention import swappable_attention

    state, masked = ckpt["state_dict"], set(ckpt.get("masked_layers") or ())
    # Attentions saved as PrunableMultiheadAttention (their projections as layers: prune_model's doing).
    swapped = [n for n in swappable_attention(model) if f"{n}.in_proj.weight" in state]
    if masked or swapped:
        from ..nn.masked import MASKED_OF, MASKED_TYPES, prune_model

        skip = [n for n, m in model.named_modules() if type(m) in MASKED_OF and n not in masked]
        skip += [n for n in swappable_attention(model) if n not in swapped]
        skip += [f"{n}.{proj}" for n in swapped for proj in ("in_proj", "out_proj") if f"{n}.{proj}" not in masked]
        prune_model(model, 0.0, method="magnitude", skip=skip)
        for m in model.modules():
            if isinstance(m, MASKED_TYPES):
                m.freeze_mask()  # the saved masks are loaded into these buffers just below
    model.load_state_dict(state)
    return model.to(device).eval(), ckpt
