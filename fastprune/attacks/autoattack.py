"""AutoAttack (Croce and Hein, ICML 2020): its attacks in sequence, each on the points still robust.

"standard" (the number RobustBench ranks by): APGD-CE (100 steps), APGD-T (100 steps, 9 target
classes), FAB-T (100 steps, 9 target classes), Square (5000 queries), one run each, with the
settings of the reference code (fra31/auto-attack). "plus" adds APGD-DLR, untargeted FAB (5 restarts
each) and restarts APGD-CE 5 times. A custom list of component names (or Attack objects) runs those.

Between components the batch is compacted to the points still robust: one host synchronisation per
component, which is what the method is (each later attack sees only what the earlier ones missed).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .apgd import APGD, APGDT
from .base import Attack, check_count
from .fab import FAB
from .square import Square

VERSIONS = {
    "standard": ("apgd-ce", "apgd-t", "fab-t", "square"),
    "plus": ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"),
}
COMPONENTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")


class AutoAttack(Attack):
    """AutoAttack: ``x_adv = AutoAttack(model, eps=8/255)(images, labels)``.

    Args (beyond :class:`Attack`'s options, which every component gets):
        version: "standard", "plus", or a list of component names (from ``COMPONENTS``) or
            :class:`Attack` objects, run in that order.
        steps: iterations of the APGD and FAB components (AutoAttack: 100).
        n_queries: Square's queries (AutoAttack: 5000).
        n_target_classes: targets of APGD-T and FAB-T (AutoAttack: 9; at most classes - 1).
        seed: every component's seed (as in the reference, each component starts from it).

    After a call, ``robust_after`` maps "clean" and each component's name to a bool tensor (N,):
    the images still classified correctly after it (cumulative); :meth:`run` also returns the
    report of robust accuracies.
    """

    def __init__(self, model, eps: float = 8 / 255, norm: str = "linf", version: str | Sequence = "standard",
                 steps: int = 100, n_queries: int = 5000, n_target_classes: int = 9, seed: int | None = 0,
                 **options):
        super().__init__(model, eps=eps, norm=norm, seed=seed, **options)
        self.steps = check_count("steps", steps)
        self.n_queries = check_count("n_queries", n_queries)
        self.n_target_classes = check_count("n_target_classes", n_target_classes)
        if isinstance(version, str):
            if version not in VERSIONS:
                raise ValueError(f"version must be one of {tuple(VERSIONS)} or a list of components "
                                 f"{COMPONENTS}, got {version!r}")
            names, plus = VERSIONS[version], version == "plus"
        else:
            names, plus = list(version), False
            if not names:
                raise ValueError("version must name at least one component")
        self.version = version
        options = dict(options, seed=seed)
        self.components: dict[str, Attack] = {}
        for item in names:
            name, attack = (item.__class__.__name__.lower(), item) if isinstance(item, Attack) else \
                (item, self._component(item, plus, options))
            if name in self.components:
                raise ValueError(f"version names {name!r} twice")
            self.components[name] = attack
        self.robust_after: dict[str, torch.Tensor] = {}

    def _component(self, name: str, plus: bool, options: dict) -> Attack:
        """One component with AutoAttack's settings."""
        common = dict(eps=self.eps, norm=self.norm, **options)
        restarts = 5 if plus else 1
        if name == "apgd-ce":
            return APGD(self.model, steps=self.steps, restarts=restarts, loss="ce", **common)
        if name == "apgd-dlr":
            return APGD(self.model, steps=self.steps, restarts=restarts, loss="dlr", **common)
        if name == "apgd-t":
            return APGDT(self.model, steps=self.steps, n_target_classes=self.n_target_classes, **common)
        if name == "fab":
            return FAB(self.model, steps=self.steps, restarts=restarts, **common)
        if name == "fab-t":
            return FAB(self.model, steps=self.steps, targeted=True, n_target_classes=self.n_target_classes,
                       **common)
        if name == "square":
            return Square(self.model, n_queries=self.n_queries, p_init=0.8, rescale_schedule=False, **common)
        raise ValueError(f"unknown AutoAttack component {name!r}: use {COMPONENTS}")

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = x.clone()
        robust = self.predict(x) == y
        self.robust_after = {"clean": robust.clone()}
        for name, attack in self.components.items():
            index = robust.nonzero().squeeze(1)  # compaction: the one synchronisation per component
            if index.numel() > 0:
                candidate = attack.perturb(x[index], y[index])
                fooled = self.predict(candidate) != y[index]
                x_adv[index] = torch.where(fooled.view((-1,) + (1,) * (x.dim() - 1)), candidate, x_adv[index])
                robust[index] = ~fooled
            self.robust_after[name] = robust.clone()
        return x_adv

    def run(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """(adversarial examples (N, ...), {"clean": accuracy, component: robust accuracy after it,
        ..., "autoattack": the final robust accuracy})."""
        x_adv = self(images, labels)
        report = {name: flags.float().mean().item() for name, flags in self.robust_after.items()}
        report["autoattack"] = report[list(self.components)[-1]]
        return x_adv, report
