"""Per-sample attack objectives, all to be *maximised*. logits: (N, C) -> (N,)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..utils.checks import logits_of  # noqa: F401 - re-exported: models may return logits, a tuple or a dict


def ce_loss(logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the true class (untargeted)."""
    return F.cross_entropy(logits, labels, reduction="none")


def _top_other(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j. (scatter, not F.one_hot: one_hot checks its input with a host sync on CUDA.)"""
    return logits.scatter(1, labels[:, None], float("-inf")).amax(dim=1)


def cw_margin_loss(logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Carlini-Wagner margin: max_{j != y} z_j - z_y (positive once misclassified)."""
    return _top_other(logits, labels) - logits.gather(1, labels[:, None]).squeeze(1)


def dlr_loss(logits: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Difference of logits ratio (Croce and Hein 2020), shift and scale invariant.

    Untargeted: -(z_y - max_{j != y} z_j) / (z_pi1 - z_pi3).
    Targeted at t: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), pi the logits sorted descending.
    """
    top = logits.sort(dim=1, descending=True).values
    z_y = logits.gather(1, labels[:, None]).squeeze(1)
    if target is None:
        return -(z_y - _top_other(logits, labels)) / (top[:, 0] - top[:, 2] + 1e-12)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


LOSSES = {"ce": ce_loss, "cw": cw_margin_loss, "dlr": dlr_loss}
