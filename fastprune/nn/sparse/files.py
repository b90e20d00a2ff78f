"""save_sparse / load_sparse: a sparse model as plain data (its zoo recipe, sparsify's plan and the
state_dict), rebuilt on load without running code from the file or timing anything."""
from __future__ import annotations

import torch
from torch import nn

from ...models import from_recipe
from ...utils.io import atomic_save, safe_load
from ..masked import _replace
from .layers import SemiStructuredLinear, SparseConv2d, SparseLinear
from .layout import BatchInnermostInput, ChannelsLastInput, MicroBatched, _LayoutInput
from .passes import _fast_pooling, fold_batchnorm, fuse_epilogues


_FORMAT = "fastprune-sparse"


_FORMAT_VERSION = 1


def _unwrap(model: nn.Module) -> tuple[nn.Module, int, int | None, str]:
    """(innermost model, wrapper depth, micro-batch size or None, layout) of a sparsify result."""
    depth, micro, layout = 0, None, "contiguous"
    if isinstance(model, MicroBatched):
        model, depth, micro = model.model, depth + 1, model.micro_batch
    if isinstance(model, _LayoutInput):
        layout = "channels_last" if isinstance(model, ChannelsLastInput) else "batch innermost"
        model, depth = model.model, depth + 1
    return model, depth, micro, layout


def _plan_of(result: nn.Module, kind: str) -> dict:
    """What sparsify chose, as plain data: enough to rebuild the model from its zoo recipe and a
    state_dict without timing anything (save_sparse / load_sparse)."""
    inner, _, micro, layout = _unwrap(result)
    layers = {}
    for name, m in inner.named_modules():
        if isinstance(m, SparseConv2d):
            layers[name] = {"format": "csr", "algo": int(m.algo), "epilogue": int(m.epilogue)}
        elif isinstance(m, SparseLinear):
            layers[name] = {"format": "csr"}
        elif isinstance(m, SemiStructuredLinear):
            layers[name] = {"format": "2:4"}
    return {"kind": kind, "layout": layout, "micro_batch": micro, "layers": layers}


def _rebuild(recipe: dict, plan: dict, state: dict, device) -> nn.Module:
    """The sparsified model a plan describes, rebuilt from the zoo and filled from ``state``."""
    dense = _fast_pooling(fold_batchnorm(from_recipe(recipe).eval()))
    if plan["layout"] == "channels_last":
        dense = dense.to(memory_format=torch.channels_last)
    prefix = "model." * ((plan["layout"] != "contiguous") + (plan["micro_batch"] is not None))
    for name, spec in plan["layers"].items():
        module = dense.get_submodule(name)
        key = prefix + name + "."
        if spec["format"] == "2:4":
            twin = SemiStructuredLinear(state[key + "weight"].to(device), state.get(key + "bias"))
        elif isinstance(module, nn.Conv2d):
            twin = SparseConv2d.from_csr(*(state[key + k] for k in ("row_ptr", "col_idx", "values")),
                                         state.get(key + "bias"), module)
            twin.algo = spec["algo"]
        else:
            twin = SparseLinear.from_csr(*(state[key + k] for k in ("row_ptr", "col_idx", "values")),
                                         state.get(key + "bias"), module)
        _replace(dense, name, twin)
    if plan["kind"] == "sparse":
        dense = fuse_epilogues(dense)
        for name, spec in plan["layers"].items():
            if "epilogue" in spec and dense.get_submodule(name).epilogue != spec["epilogue"]:
                raise ValueError(f"layer {name!r}: the file's fused epilogue does not match its rebuilt graph")
    model = {"channels_last": ChannelsLastInput, "batch innermost": BatchInnermostInput}.get(
        plan["layout"], lambda m: m)(dense)
    if plan["micro_batch"] is not None:
        model = MicroBatched(model, plan["micro_batch"])
    model.load_state_dict({k: v for k, v in state.items() if not _is_semi_structured_key(k, plan, prefix)},
                          strict=False)
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise ValueError(f"the file lacks {sorted(missing)[:3]}{' ...' if len(missing) > 3 else ''}")
    model.sparsify_plan, model.fastprune_recipe = plan, recipe
    return model.to(device).eval()


def _is_semi_structured_key(key: str, plan: dict, prefix: str) -> bool:
    name = key[len(prefix):].rpartition(".")[0]
    return plan["layers"].get(name, {}).get("format") == "2:4"


def save_sparse(model: nn.Module, path: str) -> None:
    """Write a model returned by :func:`sparsify` as tensors and plain data only: its zoo recipe
    (fastprune.models.get_model's name, classes, channels), sparsify's plan (layout, micro-batching,
    per-layer format, algorithm and fused epilogue) and its state_dict (CSR buffers: the file grows
    with the number of non-zeros, not the dense size). Nothing in it runs code when loaded.
    Written atomically."""
    plan = getattr(model, "sparsify_plan", None)
    recipe = getattr(model, "fastprune_recipe", None)
    if plan is None:
        raise ValueError("model: save_sparse takes a model returned by fastprune.nn.sparsify")
    if recipe is None:
        raise ValueError("model: sparsify's input was not built by fastprune.models.get_model, so the file could "
                         "not say how to rebuild it; save the dense model's state_dict instead")
    state = {}
    for key, value in model.state_dict().items():
        if getattr(value, "is_sparse_semi_structured", False) or type(value).__name__.startswith("SparseSemi"):
            value = value.to_dense()
        state[key] = value.detach().cpu()
    atomic_save({"format": _FORMAT, "version": _FORMAT_VERSION, "recipe": recipe, "plan": plan, "state_dict": state},
                path)


def load_sparse(path: str, map_location="cpu") -> nn.Module:
    """Read a model written by :func:`save_sparse` (tensors and plain data only: loading runs no
    code from the file) and rebuild it on ``map_location``."""
    obj = safe_load(path, "sparse model file")
    if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
        raise ValueError(f"{path!r} was not written by fastprune.save_sparse")
    if obj.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{path!r}: sparse format version {obj.get('version')!r}, this fastprune reads "
                         f"{_FORMAT_VERSION}")
    try:
        return _rebuild(obj["recipe"], obj["plan"], obj["state_dict"], map_location)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path!r}: the sparse model file is inconsistent ({type(exc).__name__}: {exc})") from None
