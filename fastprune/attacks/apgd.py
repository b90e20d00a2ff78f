"""Auto-PGD (Croce and Hein, ICML 2020): APGD-CE, APGD-DLR and the targeted APGD-T.

The step size starts at 2 * eps and halves at checkpoints where the loss oscillated (increased in
fewer than rho of the steps since the last checkpoint) or stalled (no new best since the last
checkpoint, which itself did not halve); a halving restarts from the best point. Steps use
momentum 0.75. Checkpoints come every 0.22 * steps iterations at first, the period shrinking by
0.03 * steps down to 0.06 * steps.

Unlike the reference code, every decision is a per-sample tensor operation, so there is no host
synchronisation in the loop, and all restarts run as rows of one batch. APGD-T's target classes run
one after another on the points still robust, as in the reference (one synchronisation per target:
the selection), or, with ``batch_targets``, all as rows of one batch (one shape for CUDA graphs, but
every target attacks every point).
"""
from __future__ import annotations

import torch

from ..ops.pgd import pgd_step
from .base import Attack, check_count, check_positive, project, select_strongest


class APGD(Attack):
    """APGD with the ``loss`` "ce" (APGD-CE) or "dlr"; ``targeted=True`` is APGD-T (DLR loss,
    the ``n_target_classes`` most likely wrong classes each attacked as a target).

    Returns, per sample, the first-found best adversarial point (highest loss among iterates that
    fool the model), else the highest-loss iterate, over all restarts (and, for APGD-T, the first
    target that fools the model, else the most likely wrong class's run).

    ``batch_targets`` (APGD-T): run every target on every point in one batch (default: only with
    ``cuda_graph``, whose captured step needs one shape); otherwise targets run in turn on the
    points no earlier target fooled.
    """

    def __init__(self, model, eps: float = 8 / 255, norm: str = "linf", steps: int = 100, restarts: int = 1,
                 loss: str = "ce", rho: float = 0.75, targeted: bool = False, n_target_classes: int = 9,
                 batch_targets: bool | None = None, **kwargs):
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        self.batch_targets = self.cuda_graph if batch_targets is None else bool(batch_targets)
        self.steps = check_count("steps", steps)
        self.restarts = check_count("restarts", restarts)
        self.rho = check_positive("rho", rho, allow_zero=False)
        if self.rho > 1:
            raise ValueError(f"rho must be in (0, 1], got {rho!r}")
        self.targeted = bool(targeted)
        self.n_target_classes = check_count("n_target_classes", n_target_classes)
        if self.targeted and loss != "dlr":
            raise ValueError(f"loss must be 'dlr' for the targeted APGD-T, got {loss!r}")
        self.loss_name = loss
        self.loss = self.loss_fn(loss)

    def _targets(self, x: torch.Tensor, y: torch.Tensor):
        """(T * N,) target classes, the (t+2)-th most likely class for t < T, and T."""
        with torch.no_grad():
            clean = self.logits(x)
        classes = clean.shape[1]
        if classes < 4:
            raise ValueError(f"APGD-T's targeted DLR loss needs at least 4 classes, the model has {classes}")
        count = min(self.n_target_classes, classes - 1)
        order = clean.argsort(dim=1)  # ascending: the last column is the predicted class
        return torch.cat([order[:, -(t + 2)] for t in range(count)]), count

    def _init_point(self, x_nat: torch.Tensor, eps: torch.Tensor, gen) -> torch.Tensor:
        """AutoAttack's start: a random point on the sphere of the ball (Linf: scaled to the box
        corner in its largest coordinate; L2: a random direction at radius eps)."""
        shape = (-1,) + (1,) * (x_nat.dim() - 1)
        if self.norm == "linf":
            t = torch.rand(x_nat.shape, generator=gen, device=x_nat.device, dtype=x_nat.dtype) * 2 - 1
            t = t / t.flatten(1).abs().amax(dim=1).clamp_min(1e-12).view(shape)
        else:
            t = torch.randn(x_nat.shape, generator=gen, device=x_nat.device, dtype=x_nat.dtype)
            t = t / t.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
        return (x_nat + eps.view(shape) * t).clamp(*self.clip)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.targeted or self.batch_targets:
            return self._perturb_rows(x, y)
        targets, count = self._targets(x, y)
        targets = targets.view(count, -1)
        gen = self.generator(x.device)
        x_adv = self._perturb_rows(x, y, targets[0], gen)  # every point: also the fallback candidates
        robust = self.predict(x_adv) == y
        for t in range(1, count):
            index = robust.nonzero().squeeze(1)  # the points no earlier target fooled (a sync)
            if index.numel() == 0:
                break
            candidate = self._perturb_rows(x[index], y[index], targets[t][index], gen)
            fooled = self.predict(candidate) != y[index]
            x_adv[index] = torch.where(fooled.view((-1,) + (1,) * (x.dim() - 1)), candidate, x_adv[index])
            robust[index] = ~fooled
        return x_adv

    def _perturb_rows(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None = None,
                      gen: torch.Generator | None = None) -> torch.Tensor:
        """APGD on x (N, ...): untargeted, all targets batched (targeted, ``target`` None), or at one
        target per point (``target`` (N,))."""
        n = x.shape[0]
        if target is not None:
            targets, groups = target, 1
        elif self.targeted:
            targets, groups = self._targets(x, y)
        else:
            targets, groups = None, 1
        groups *= self.restarts
        repeat = (groups,) + (1,) * (x.dim() - 1)
        x_nat = x.repeat(repeat) if groups > 1 else x
        labels = y.repeat(groups) if groups > 1 else y
        if targets is not None and self.restarts > 1:
            targets = targets.repeat(self.restarts)
        rows, shape = x_nat.shape[0], (-1,) + (1,) * (x.dim() - 1)
        eps = torch.full((rows,), self.eps, device=x.device, dtype=torch.float32)
        eta = 2 * eps
        loss_and_grad = self._loss_and_grad_fn(x_nat, labels, targets)

        x_adv = self._init_point(x_nat, eps, gen if gen is not None else self.generator(x.device))
        loss, grad, logits = loss_and_grad(x_adv)
        fooled_ever = logits.argmax(dim=1) != labels
        x_best_adv = x_adv.clone()
        x_best, grad_best, loss_best = x_adv.clone(), grad.clone(), loss.clone()
        loss_prev = loss
        increases = torch.zeros(rows, device=x.device)
        halved_last = torch.zeros(rows, dtype=torch.bool, device=x.device)
        loss_best_last = loss_best.clone()
        period = max(int(0.22 * self.steps), 1)
        period_decrease, period_min = max(int(0.03 * self.steps), 1), max(int(0.06 * self.steps), 1)
        since_check = 0
        x_prev = x_adv

        for i in range(self.steps):
            z = pgd_step(x_adv, grad, x_nat, alpha=eta, eps=eps, norm=self.norm, clip=self.clip, check_values=False)
            if i > 0:  # momentum: 0.75 of the new step, 0.25 of the previous move
                z = project(x_adv + 0.75 * (z - x_adv) + 0.25 * (x_adv - x_prev), x_nat, eps, self.norm, self.clip)
            x_prev, x_adv = x_adv, z
            loss, grad, logits = loss_and_grad(x_adv)

            fooled = logits.argmax(dim=1) != labels
            x_best_adv = torch.where(fooled.view(shape), x_adv, x_best_adv)
            fooled_ever |= fooled
            increases += (loss > loss_prev).float()
            loss_prev = loss
            improved = loss > loss_best
            x_best = torch.where(improved.view(shape), x_adv, x_best)
            grad_best = torch.where(improved.view(shape), grad, grad_best)
            loss_best = torch.where(improved, loss, loss_best)

            since_check += 1
            if since_check == period:  # a checkpoint: iteration numbers only, no data-dependent branch
                oscillating = increases <= period * self.rho
                stalled = ~halved_last & (loss_best_last >= loss_best)
                halve = oscillating | stalled
                halved_last, loss_best_last = halve, loss_best.clone()
                eta = torch.where(halve, eta / 2, eta)
                x_adv = torch.where(halve.view(shape), x_best, x_adv)
                grad = torch.where(halve.view(shape), grad_best, grad)
                increases.zero_()
                since_check, period = 0, max(period - period_decrease, period_min)

        candidates = torch.where(fooled_ever.view(shape), x_best_adv, x_best)
        if groups == 1:
            return candidates
        return select_strongest(candidates.view((groups, n) + x.shape[1:]), fooled_ever.view(groups, n),
                                loss_best.view(groups, n))

    def _loss_and_grad_fn(self, x_nat, labels, targets):
        """x -> (loss, grad, logits), through a CUDA graph of the forward and backward if asked."""
        if not self.cuda_graph:
            return lambda x: self.loss_and_grad(x, labels, self.loss, targets)

        def build():
            buf = {"x": x_nat.clone(), "y": labels.clone()}
            if targets is not None:
                buf["t"] = targets.clone()
            return buf, lambda: self.loss_and_grad(buf["x"], buf["y"], self.loss, buf.get("t"))

        key = ("apgd", tuple(x_nat.shape), x_nat.stride(), x_nat.dtype, x_nat.device, targets is not None)
        buf, replay = self.graphed(key, build)
        buf["y"].copy_(labels)
        if targets is not None:
            buf["t"].copy_(targets)

        def run(x):
            buf["x"].copy_(x)
            return tuple(t.clone() for t in replay())  # the next replay overwrites the outputs

        return run


class APGDT(APGD):
    """Targeted APGD with the DLR loss (AutoAttack's APGD-T)."""

    def __init__(self, model, eps: float = 8 / 255, norm: str = "linf", steps: int = 100,
                 n_target_classes: int = 9, **kwargs):
        kwargs.setdefault("loss", "dlr")
        super().__init__(model, eps=eps, norm=norm, steps=steps, targeted=True, n_target_classes=n_target_classes,
                         **kwargs)
