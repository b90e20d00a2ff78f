"""save_sparse / load_sparse: a sparse model as plain data (its zoo recipe, sparsify's plan and the
state_dict), rebuilt on load without running code from the file or timing anything."""
from __future__ import annotations

from torch import nn

from ...models import from_recipe
from ...utils.io import atomic_save, safe_load
from ..masked import _replace
from .layers import SparseConv2d, SparseLinear
from .model import UNTUNED, SparseModel
from .passes import _fast_pooling, fold_batchnorm, fuse_epilogues


_FORMAT = "fastprune-sparse"


# 2: one SparseModel, its plan per device and batch-size bucket (1: one tuned layout per file).
_FORMAT_VERSION = 2


def _rebuild(recipe: dict, plan: dict, state: dict, device, model_name: str | None = None) -> SparseModel:
    """The SparseModel a file describes: the zoo model rebuilt and passed through the same graph
    passes, the layers the state_dict holds as CSR made sparse, then filled from ``state``
    (strictly: a missing or extra tensor is an error). Nothing is timed."""
    net = _fast_pooling(fold_batchnorm(from_recipe(recipe, model=model_name).eval(), inplace=True))
    for name, module in list(net.named_modules()):
        key = "net." + name + "."
        if key + "row_ptr" not in state:
            continue
        arrays = [state[key + k] for k in ("row_ptr", "col_idx", "values")]
        if isinstance(module, nn.Conv2d):
            twin = SparseConv2d.from_csr(*arrays, state.get(key + "bias"), module)
        elif isinstance(module, nn.Linear):
            twin = SparseLinear.from_csr(*arrays, state.get(key + "bias"), module)
        else:
            raise ValueError(f"layer {name!r} holds CSR weights but is a {type(module).__name__} in the model")
        _replace(net, name, twin)
    model = SparseModel(fuse_epilogues(net), plan=plan, recipe=recipe)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()


def save_sparse(model: SparseModel, path: str) -> None:
    """Write a :class:`SparseModel` (what :func:`sparsify` returns) as tensors and plain data only:
    its recipe (fastprune.models.get_model's name, classes, channels, normalisation), its plan (per device and
    batch-size bucket: layout, micro-batching, each layer's choice) and its state_dict (CSR buffers:
    the file grows with the number of non-zeros, not the dense size). Nothing in it runs code when
    loaded. Written atomically."""
    if not isinstance(model, SparseModel):
        raise ValueError("model: save_sparse takes a model returned by fastprune.nn.sparsify")
    plan, recipe = model.plan, model.fastprune_recipe
    if recipe is None:
        raise ValueError("model: sparsify's input was not built by fastprune.models.get_model (a zoo name, "
                         "torchvision:NAME, timm:NAME or file.py:factory), so the file could not say how to rebuild "
                         "it; build it with get_model, or save the dense model's state_dict instead")
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    atomic_save({"format": _FORMAT, "version": _FORMAT_VERSION, "recipe": recipe, "plan": plan, "state_dict": state},
                path)


def load_sparse(path: str, map_location="cpu", *, retune: bool = False, untuned: str | None = None,
                model: str | None = None) -> SparseModel:
    """Read a model written by :func:`save_sparse` (tensors and plain data only: loading runs no
    code from the file) and rebuild it on ``map_location``, with its plan: nothing is timed. On a
    device the plan was not tuned for, or with ``retune``, each batch-size bucket is handled as the
    plan's ``untuned`` says ("tune": timed on its first call), or as ``untuned`` overrides. A model
    built by a factory in a Python file needs ``model`` to name that factory again."""
    if untuned is not None and untuned not in UNTUNED:
        raise ValueError(f"untuned must be one of {UNTUNED}, got {untuned!r}")
    obj = safe_load(path, "sparse model file")
    if not isinstance(obj, dict) or obj.get("format") != _FORMAT:
        raise ValueError(f"{path!r} was not written by fastprune.save_sparse")
    if obj.get("version") != _FORMAT_VERSION:
        raise ValueError(f"{path!r}: sparse format version {obj.get('version')!r}, this fastprune reads "
                         f"{_FORMAT_VERSION}")
    try:
        model = _rebuild(obj["recipe"], obj["plan"], obj["state_dict"], map_location, model)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{path!r}: the sparse model file is inconsistent "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
    if retune:
        model.plan["devices"] = {}
    if untuned is not None:
        model.untuned = untuned
    return model
