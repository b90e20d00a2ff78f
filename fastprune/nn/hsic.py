"""The HSIC bottleneck as a module, fed by forward hooks: a model needs no changed forward."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..attacks.losses import logits_of
from ..ops.hsic import hsic_bottleneck


class FeatureTaps:
    """Records the outputs of named submodules of ``model`` on every forward pass.

    ``taps.features`` maps each name to the latest output (the first element of a tuple output).
    Use as a context manager, or call ``remove()`` to take the hooks off.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        modules = dict(model.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise ValueError(f"layers {missing} are not submodules of the model; some valid names: "
                             f"{[n for n in modules if n][:10]}")
        if not layers:
            raise ValueError("layers must name at least one submodule")
        self.layers = list(layers)
        self.features: dict[str, torch.Tensor] = {}
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.layers]

    def _hook(self, name):
        def record(module, inputs, output):
            self.features[name] = logits_of(output)

        return record

    def ordered(self) -> list[torch.Tensor]:
        missing = [name for name in self.layers if name not in self.features]
        if missing:
            raise RuntimeError(f"no output recorded for layers {missing}: run the model's forward pass first")
        return [self.features[name] for name in self.layers]

    def clear(self) -> None:
        self.features.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


class HSICBottleneck(nn.Module):
    """HBaR/PwoA's regulariser over the outputs of ``layers`` of ``model``.

    >>> bottleneck = HSICBottleneck(model, ["layer1", "layer2", "layer3", "layer4"], lambda_x=2e-5, lambda_y=1e-4)
    >>> logits = model(images)                      # the hooks record the hidden outputs
    >>> loss = distillation + bottleneck(images, labels)

    forward(x (m, ...), labels (m,)) -> 0-dim tensor: sum over layers of
    lambda_x HSIC(X, Z_l) - lambda_y HSIC(Y, Z_l) (see fastprune.hsic_bottleneck), using the
    features recorded by the model's latest forward pass; they are released afterwards.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], *, lambda_x: float, lambda_y: float,
                 sigma: float = 5.0, scale_sigma_by_dim: bool = True, estimator: str = "nocco",
                 num_classes: int | None = None, check_inputs: bool = False):
        super().__init__()
        self.taps = FeatureTaps(model, layers)
        self.options = dict(lambda_x=lambda_x, lambda_y=lambda_y, sigma=sigma, scale_sigma_by_dim=scale_sigma_by_dim,
                            estimator=estimator, num_classes=num_classes, check_inputs=check_inputs)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        features = self.taps.ordered()
        try:
            return hsic_bottleneck(x, labels, features, **self.options)
        finally:
            self.taps.clear()

    def remove(self) -> None:
        """Take the hooks off the model."""
        self.taps.remove()
