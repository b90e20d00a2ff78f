"""Training-time masked layers: HYDRA's learned-score masks, magnitude masks and fixed masks.

HYDRA's released code re-sorts every layer's scores on every forward pass, attack steps included.
Here a mask is recomputed only when its source tensor (the scores, or the weights for magnitude
masks) has changed since the last computation, detected through the tensor's version counter; the
top-k is a selection (torch.kthvalue), not a sort, and keeps exactly k entries, ties broken
towards the lower flat index so that masks are deterministic.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.autograd import frozen_cache, parameter_gradients_wanted
from .attention import PrunableMultiheadAttention, dense_attention, swappable_attention, to_prunable_attention

MASK_SOURCES = ("scores", "magnitude", "fixed")
SCORE_INITS = ("scaled", "kaiming_uniform", "kaiming_normal")


def check_sparsity(sparsity, name: str = "sparsity") -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise ValueError(f"{name} must be a float in [0, 1), got {sparsity!r}")
    return float(sparsity)


def kept_count(numel: int, sparsity: float) -> int:
    """Entries a layer keeps: numel - floor(sparsity * numel), so at least one (HYDRA's rule)."""
    return numel - int(math.floor(sparsity * numel))


def topk_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """A float 0/1 mask of ``values``' shape keeping exactly the k largest entries.

    Threshold by selection: t = the k-th largest value; keep everything above t, then the entries
    equal to t in flat-index order until k are kept. No sort, no host synchronisation.
    """
    flat = values.detach().reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(values)
    if k <= 0:
        return torch.zeros_like(values)
    threshold = torch.kthvalue(flat, n - k + 1).values
    above = flat > threshold
    ties = flat == threshold
    need = k - above.sum()
    keep = above | (ties & (torch.cumsum(ties, 0) <= need))
    return keep.to(values.dtype).view_as(values)


def parse_pattern(pattern) -> tuple[int, int] | None:
    """"N:M" (keep N of every M consecutive weights along the reduction dimension) -> (N, M)."""
    if pattern is None:
        return None
    try:
        n, m = (int(v) for v in str(pattern).split(":"))
    except ValueError:
        raise ValueError(f"pattern must be 'N:M' such as '2:4', got {pattern!r}") from None
    if not 0 < n < m:
        raise ValueError(f"pattern must have 0 < N < M, got {pattern!r}")
    return n, m


def nm_applicable(weight_shape, m: int) -> bool:
    """Whether a weight (out, ...) splits into groups of m along its flattened reduction dimension."""
    reduction = math.prod(weight_shape[1:])
    return reduction % m == 0


def nm_mask(values: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """A float 0/1 mask keeping the n largest of every m consecutive entries along the flattened
    reduction dimension of ``values`` (out, ...) (2:4 is NVIDIA's semi-structured sparsity); ties go
    to the lower index. values (out, K...) with prod(K...) divisible by m."""
    if not nm_applicable(values.shape, m):
        raise ValueError(f"values of shape {tuple(values.shape)}: the reduction size is not a multiple of {m}")
    groups = values.detach().reshape(values.shape[0], -1, m)
    order = groups.argsort(dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(groups).scatter_(-1, order[..., :n], 1.0)
    return keep.view_as(values)


class _ScoreMaskedWeight(torch.autograd.Function):
    """w * mask, with HYDRA's straight-through gradient for the scores: the top-k is treated as
    the identity, so dL/dscores = dL/dw_eff * w * sign(scores)."""

    @staticmethod
    def forward(ctx, weight, scores, mask):
        ctx.save_for_backward(weight, scores, mask)
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        weight, scores, mask = ctx.saved_tensors
        grad_weight = grad * mask if ctx.needs_input_grad[0] else None
        grad_scores = grad * weight * torch.sign(scores) if ctx.needs_input_grad[1] else None
        return grad_weight, grad_scores, None


class _MaskedMixin:
    """What MaskedConv2d and MaskedLinear share: the mask, its cache, and the masked weight."""

    weight: nn.Parameter

    def __init__(self, *args, source: str = "scores", sparsity: float = 0.0, mask: torch.Tensor | None = None,
                 pattern: str | None = None, **kwargs):
        """The layer's own arguments (*args, **kwargs: nn.Conv2d's or nn.Linear's), then the mask's."""
        super().__init__(*args, **kwargs)
        self._init_mask(source, sparsity, mask, pattern)

    @classmethod
    def from_dense(cls, dense: nn.Module, source: str = "scores", sparsity: float = 0.0,
                   mask: torch.Tensor | None = None, pattern: str | None = None, score_init: str = "scaled"):
        """A masked copy of ``dense`` (the matching nn layer: same weights, device and dtype).
        pattern "N:M" (with sparsity 1 - N/M): keep N of every M consecutive weights of each output
        channel (2:4: semi-structured). source, sparsity, mask, score_init: see prune_model."""
        layer = cls(**cls._dense_args(dense), device=dense.weight.device, dtype=dense.weight.dtype,
                    source="magnitude")
        return layer._adopt(dense, source, sparsity, mask, pattern, score_init)

    def _init_mask(self, source: str, sparsity: float, mask: torch.Tensor | None, pattern=None,
                   score_init: str = "scaled") -> None:
        if source not in MASK_SOURCES:
            raise ValueError(f"source must be one of {MASK_SOURCES}, got {source!r}")
        self.source = source
        self.sparsity = check_sparsity(sparsity)
        self.pattern = parse_pattern(pattern)
        if self.pattern is not None:
            n, m = self.pattern
            if source == "fixed":
                raise ValueError("pattern applies to 'scores' and 'magnitude' masks; a fixed mask is given as is")
            if not math.isclose(self.sparsity, 1 - n / m):
                raise ValueError(f"pattern {n}:{m} prunes {1 - n / m:g} of the weights; sparsity is {self.sparsity!r}")
            if not nm_applicable(self.weight.shape, m):
                raise ValueError(f"pattern {n}:{m}: the weight {tuple(self.weight.shape)} has a reduction size "
                                 f"that is not a multiple of {m}")
        self.k = kept_count(self.weight.numel(), self.sparsity)
        if source == "fixed":
            if mask is None:
                raise ValueError("mask must be given for source='fixed'")
            if mask.shape != self.weight.shape:
                raise ValueError(f"mask has shape {tuple(mask.shape)}, expected the weight's {tuple(self.weight.shape)}")
            self.register_buffer("mask", (mask != 0).to(self.weight.dtype))
            self.k = int(self.mask.sum().item())
        else:
            if mask is not None:
                raise ValueError(f"mask is only used with source='fixed', not {source!r}")
            self.register_buffer("mask", torch.ones_like(self.weight))
        if source == "scores":
            if score_init not in SCORE_INITS:
                raise ValueError(f"score_init must be one of {SCORE_INITS}, got {score_init!r}")
            fan_in = self.weight[0].numel()
            w = self.weight.detach()
            if score_init == "scaled":
                # HYDRA's scaled score initialisation (its scripts' --scaled-score-init): the first
                # mask equals the magnitude mask.
                self.scores = nn.Parameter(math.sqrt(6.0 / fan_in) * w / w.abs().max().clamp_min(1e-12))
            else:
                # HYDRA's SubnetConv default: the scores drawn as nn.Conv2d draws weights (the first
                # mask is then random, not the magnitude mask).
                scores = torch.empty_like(w)
                if score_init == "kaiming_uniform":
                    nn.init.kaiming_uniform_(scores, a=math.sqrt(5))
                else:
                    nn.init.kaiming_normal_(scores)
                self.scores = nn.Parameter(scores)
        self._mask_key = None

    def _source_tensor(self) -> torch.Tensor:
        return self.scores if self.source == "scores" else self.weight

    def refresh_mask(self, force: bool = False) -> torch.Tensor:
        """Recompute the mask if its source changed (in-place updates bump the version counter)."""
        if self.source == "fixed":
            return self.mask
        src = self._source_tensor()
        key = (src._version, src.data_ptr(), self.k)
        if force or key != self._mask_key:
            with torch.no_grad():
                if self.pattern is not None:
                    self.mask.copy_(nm_mask(src.detach().abs(), *self.pattern))
                else:
                    self.mask.copy_(topk_mask(src.detach().abs(), self.k))
            self._mask_key = key
        return self.mask

    def set_sparsity(self, sparsity: float) -> None:
        """Change the fraction pruned; the mask follows on the next forward pass."""
        if self.source == "fixed":
            raise ValueError("a fixed mask has no sparsity to set")
        if self.pattern is not None:
            raise ValueError(f"an {self.pattern[0]}:{self.pattern[1]} mask has a fixed sparsity")
        self.sparsity = check_sparsity(sparsity)
        self.k = kept_count(self.weight.numel(), self.sparsity)

    def freeze_mask(self) -> None:
        """Turn the current mask into a fixed one (HYDRA's finetune phase: weights train, mask stays)."""
        self.refresh_mask()
        if self.source == "scores":
            del self.scores
        self.source = "fixed"

    def masked_weight(self) -> torch.Tensor:
        mask = self.refresh_mask()
        cache = frozen_cache()
        if cache is not None and (not torch.is_grad_enabled() or not parameter_gradients_wanted()):
            # Inside an attack (frozen_parameters) nothing differentiates the weight: the product
            # is computed once per attack call instead of at every step.
            key = (self.weight._version, self.weight.data_ptr(), mask._version, mask.data_ptr())
            hit = cache.get(id(self))
            if hit is None or hit[0] != key:
                with torch.no_grad():
                    hit = cache[id(self)] = (key, self.weight * mask)
            return hit[1]
        if self.source == "scores":
            return _ScoreMaskedWeight.apply(self.weight, self.scores, mask)
        return self.weight * mask

    def _check_input(self, x: torch.Tensor, dims: tuple[int, ...]) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() not in dims:
            raise ValueError(f"input must be a {' or '.join(f'{d}D' for d in dims)} tensor, got "
                             f"{'shape ' + str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__}")
        # Under autocast the op casts input and weight itself (a bf16 activation meets fp32 weights).
        dtype_ok = x.dtype == self.weight.dtype or (x.is_floating_point() and
                                                    torch.is_autocast_enabled(x.device.type))
        if not dtype_ok or x.device != self.weight.device:
            raise ValueError(f"input is {x.dtype} on {x.device}, the layer {self.weight.dtype} on {self.weight.device}")

    def _adopt(self, dense: nn.Module, source: str, sparsity: float, mask: torch.Tensor | None, pattern=None,
               score_init: str = "scaled"):
        """Take ``dense``'s weights, then set up the mask. The layer was built as a magnitude layer
        because scores must be initialised from the copied weights, not the random ones."""
        with torch.no_grad():
            self.weight.copy_(dense.weight)
            if dense.bias is not None:
                self.bias.copy_(dense.bias)
        del self.mask
        self._init_mask(source, sparsity, mask, pattern, score_init)
        return self

    def extra_repr(self) -> str:
        pattern = f", pattern={self.pattern[0]}:{self.pattern[1]}" if self.pattern else ""
        return f"{super().extra_repr()}, source={self.source}, sparsity={self.sparsity}{pattern}"


class MaskedConv2d(_MaskedMixin, nn.Conv2d):
    """nn.Conv2d whose weight is multiplied by a mask: (N, C, H, W) -> (N, C_out, H', W')."""

    @staticmethod
    def _dense_args(conv: nn.Conv2d) -> dict:
        return dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                    stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, (4,))
        return self._conv_forward(x, self.masked_weight(), self.bias)


class MaskedLinear(_MaskedMixin, nn.Linear):
    """nn.Linear whose weight is multiplied by a mask: (..., in) -> (..., out)."""

    @staticmethod
    def _dense_args(linear: nn.Linear) -> dict:
        return dict(in_features=linear.in_features, out_features=linear.out_features, bias=linear.bias is not None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, tuple(range(1, 9)))
        return F.linear(x, self.masked_weight(), self.bias)


class MaskedConv1d(_MaskedMixin, nn.Conv1d):
    """nn.Conv1d whose weight is multiplied by a mask: (N, C, L) or (C, L) -> (N, C_out, L')."""

    _dense_args = staticmethod(MaskedConv2d._dense_args)  # the same constructor arguments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, (2, 3))
        return self._conv_forward(x, self.masked_weight(), self.bias)


class MaskedConvTranspose2d(_MaskedMixin, nn.ConvTranspose2d):
    """nn.ConvTranspose2d whose weight (C_in, C_out / groups, kH, kW) is multiplied by a mask:
    (N, C_in, H, W) -> (N, C_out, H', W'); ``output_size`` as nn.ConvTranspose2d takes it."""

    @staticmethod
    def _dense_args(conv: nn.ConvTranspose2d) -> dict:
        return dict(MaskedConv2d._dense_args(conv), output_padding=conv.output_padding)

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        self._check_input(x, (3, 4))
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2,
                                              self.dilation)
        return F.conv_transpose2d(x, self.masked_weight(), self.bias, self.stride, self.padding, output_padding,
                                  self.groups, self.dilation)


MASKED_TYPES = (MaskedConv2d, MaskedLinear, MaskedConv1d, MaskedConvTranspose2d)
# The layer types prune_model masks, and the masked type of each. Subclasses are not included
# (type(m) is looked up): nn.MultiheadAttention's out_proj is a Linear subclass whose weight the
# attention reads directly, so a masked twin would not be used; sparsity_report counts it.
MASKED_OF = {nn.Conv2d: MaskedConv2d, nn.Linear: MaskedLinear, nn.Conv1d: MaskedConv1d,
             nn.ConvTranspose2d: MaskedConvTranspose2d}
DENSE_OF = {masked: dense for dense, masked in MASKED_OF.items()}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def prune_model(model: nn.Module, sparsity: float, method: str = "scores", skip=(), pattern: str | None = None,
                score_init: str = "scaled") -> nn.Module:
    """Swap every nn.Conv2d, nn.Linear, nn.Conv1d and nn.ConvTranspose2d of ``model`` (first and last
    included, unless named in ``skip``) for a masked layer keeping a (1 - sparsity) fraction of its
    weights, per layer; nn.MultiheadAttention's two projections are pruned as linear layers
    ("<name>.in_proj", "<name>.out_proj" of a PrunableMultiheadAttention; skip the attention's own
    name to leave it as it is).
    method: "scores" (HYDRA) or "magnitude". pattern: "N:M" (e.g. "2:4", with sparsity 1 - N/M)
    keeps N of every M consecutive weights along each layer's reduction dimension, the form GPUs
    with semi-structured sparsity accelerate; layers whose reduction size is not a multiple of M
    get an unstructured mask of the same sparsity. score_init (method "scores"): "scaled" (HYDRA's
    scripts: scores proportional to the weights, so the first mask is the magnitude mask),
    "kaiming_uniform" (HYDRA's layers' own default) or "kaiming_normal". Modifies ``model`` in place
    and returns it. A model that already has masked layers is refused (ValueError), not silently
    left as it is."""
    check_sparsity(sparsity)
    if method not in ("scores", "magnitude"):
        raise ValueError(f"method must be 'scores' or 'magnitude', got {method!r}")
    if score_init not in SCORE_INITS:
        raise ValueError(f"score_init must be one of {SCORE_INITS}, got {score_init!r}")
    nm = parse_pattern(pattern)
    if nm is not None and not math.isclose(sparsity, 1 - nm[0] / nm[1]):
        raise ValueError(f"pattern {pattern!r} prunes {1 - nm[0] / nm[1]:g} of the weights; sparsity is {sparsity!r}")
    masked = [n for n, m in model.named_modules() if isinstance(m, MASKED_TYPES)]
    if masked:
        raise ValueError(f"model is already pruned ({len(masked)} masked layers, e.g. {masked[0]!r}): to prune it "
                         "again, fold_masks(model) first (keeps its zeros) or change its layers' set_sparsity()")
    # Attention projections become linear layers of their own (PrunableMultiheadAttention:
    # "<attention>.in_proj", ".out_proj", names skip may use); a skipped attention stays as it is.
    skip = set(skip)
    names = {n for n, _ in model.named_modules()}
    names |= {f"{n}.{proj}" for n in swappable_attention(model, skip) for proj in ("in_proj", "out_proj")}
    unknown = sorted(s for s in skip if s not in names)
    if unknown:
        raise ValueError(f"skip names {unknown} are not modules of the model")
    to_prunable_attention(model, skip)
    targets = [(n, m) for n, m in model.named_modules()
               if type(m) in MASKED_OF and n not in skip]
    for name, module in targets:
        cls = MASKED_OF[type(module)]
        layer_pattern = pattern if nm is not None and nm_applicable(module.weight.shape, nm[1]) else None
        _replace(model, name, cls.from_dense(module, source=method, sparsity=sparsity, pattern=layer_pattern,
                                             score_init=score_init))
    return model


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Make the named conv and linear layers fixed-mask layers with the given masks ({layer name:
    mask of its weight's shape}); e.g. a HYDRA checkpoint's (fastprune.models.load_pretrained's
    ``model.hydra_masks``). Modifies ``model`` in place and returns it."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        module = modules.get(name)
        if type(module) not in MASKED_OF:
            raise ValueError(f"masks names {name!r}, which is not a conv or linear layer of the model")
        cls = MASKED_OF[type(module)]
        _replace(model, name, cls.from_dense(module, source="fixed", mask=mask.to(module.weight.device)))
    return model


def dense_twin(module: nn.Module) -> nn.Module:
    """A plain nn layer (Conv1d/Conv2d/ConvTranspose2d/Linear) computing what ``module`` computes
    (masks folded in); other modules are returned as they are."""
    if not isinstance(module, MASKED_TYPES):
        return module
    dense = DENSE_OF[type(module)](**module._dense_args(module), device=module.weight.device,
                                   dtype=module.weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(effective_weight(module))
        if module.bias is not None:
            dense.bias.copy_(module.bias)
    return dense


def fold_masks(model: nn.Module) -> nn.Module:
    """Replace every masked layer of ``model`` by its :func:`dense_twin`, and every
    PrunableMultiheadAttention by the nn.MultiheadAttention it computes (in place; returns it)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, PrunableMultiheadAttention):
            _replace(model, name, dense_attention(module, effective_weight(module.in_proj),
                                                  effective_weight(module.out_proj)))
    for name, module in list(model.named_modules()):
        twin = dense_twin(module)
        if twin is not module:
            _replace(model, name, twin)
    return model


def effective_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight a layer computes with (masked where it is masked), or None for other modules."""
    if isinstance(module, MASKED_TYPES):
        with torch.no_grad():
            return module.weight * module.refresh_mask()
    dense = getattr(module, "dense_weight", None)  # sparse inference layers
    if callable(dense):
        return dense()
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return module.weight.detach()
    if isinstance(module, nn.MultiheadAttention):  # its input projections (out_proj is a Linear of its own)
        if module.in_proj_weight is not None:
            return module.in_proj_weight.detach()
        return torch.cat([w.detach().flatten() for w in (module.q_proj_weight, module.k_proj_weight,
                                                          module.v_proj_weight)])
    return None


def sparsity_report(model: nn.Module) -> dict:
    """Per-layer and global sparsity of every weight matrix a model multiplies with: conv (1-D, 2-D,
    3-D, transposed) and linear layers' effective weights (masked where masked) and
    nn.MultiheadAttention's input projections (its out_proj is a linear layer of its own):
    {"layers": {name: {"params", "zeros", "sparsity"}}, "params", "zeros", "sparsity"}."""
    layers, total, zeros = {}, 0, 0
    for name, module in model.named_modules():
        w = effective_weight(module)
        if w is None:
            continue
        n, z = w.numel(), int((w == 0).sum().item())
        layers[name] = {"params": n, "zeros": z, "sparsity": z / n}
        total, zeros = total + n, zeros + z
    return {"layers": layers, "params": total, "zeros": zeros, "sparsity": zeros / total if total else 0.0}
