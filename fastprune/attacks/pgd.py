"""PGD (Madry et al. 2018) with batched restarts, and FGSM and CW as its special cases."""
from __future__ import annotations

import torch

from ..ops.pgd import pgd_step_
from .base import Attack, check_count, check_positive, select_strongest
from .losses import cw_margin_loss


class PGD(Attack):
    """Projected gradient ascent on ``loss`` within the eps-ball; torchattacks-compatible call.

    ``atk = PGD(model, eps=8/255, alpha=2/255, steps=10)`` then ``x_adv = atk(images, labels)``.
    All ``restarts`` run in one batch (R * N rows through the model); each sample keeps the
    restart that fools the model, else the one with the highest margin, selected on the device.
    Each step is one forward, one backward w.r.t. the input and one fused ``pgd_step_`` kernel.

    Args (beyond :class:`Attack`'s): alpha: step size; steps: iterations; random_start: start
    from a uniform point of the ball; loss: "ce", "cw" or "dlr"; restarts: independent runs.
    """

    def __init__(self, model, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10,
                 random_start: bool = True, norm: str = "linf", loss: str = "ce", restarts: int = 1, **kwargs):
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        self.alpha = check_positive("alpha", alpha)
        self.steps = check_count("steps", steps)
        self.restarts = check_count("restarts", restarts)
        self.random_start = bool(random_start)
        self.loss_name = loss
        self.loss = self.loss_fn(loss)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n, r = x.shape[0], self.restarts
        # Restarts are extra rows of one batch: (R * N, ...), restart-major.
        x_nat = x.repeat((r,) + (1,) * (x.dim() - 1)) if r > 1 else x
        labels = y.repeat(r) if r > 1 else y
        rows = x_nat.shape[0]
        alpha = torch.full((rows,), self.alpha, device=x.device, dtype=torch.float32)
        eps = torch.full((rows,), self.eps, device=x.device, dtype=torch.float32)
        if self.random_start:
            x_adv = self.random_init(x_nat, eps, self.generator(x.device))
        else:
            x_adv = x_nat.clone()

        if self.cuda_graph:
            x_adv = self._run_graphed(x_adv, x_nat, labels, alpha, eps)
        else:
            for _ in range(self.steps):
                _, grad, _ = self.loss_and_grad(x_adv, labels, self.loss)
                pgd_step_(x_adv, grad, x_nat, alpha=alpha, eps=eps, norm=self.norm, clip=self.clip, check_values=False)

        if r == 1:
            return x_adv
        with torch.no_grad():
            margin = cw_margin_loss(self.logits(x_adv), labels)
        candidates = x_adv.view((r, n) + x.shape[1:])
        return select_strongest(candidates, (margin > 0).view(r, n), margin.view(r, n))

    def _run_graphed(self, x_adv, x_nat, labels, alpha, eps):
        def build():
            buf = {"x": x_adv.clone(), "x_nat": x_nat.clone(), "y": labels.clone(),
                   "alpha": alpha.clone(), "eps": eps.clone()}

            def step():
                _, grad, _ = self.loss_and_grad(buf["x"], buf["y"], self.loss)
                pgd_step_(buf["x"], grad, buf["x_nat"], alpha=buf["alpha"], eps=buf["eps"], norm=self.norm,
                          clip=self.clip, check_values=False)

            return buf, step

        key = ("pgd", tuple(x_adv.shape), x_adv.stride(), x_adv.dtype, x_adv.device)
        buf, replay = self.graphed(key, build)
        for name, value in (("x", x_adv), ("x_nat", x_nat), ("y", labels), ("alpha", alpha), ("eps", eps)):
            buf[name].copy_(value)
        for _ in range(self.steps):
            replay()
        return buf["x"].clone()


class FGSM(PGD):
    """Fast gradient sign method: one step of size eps from the natural image (Goodfellow et al.)."""

    def __init__(self, model, eps: float = 8 / 255, norm: str = "linf", loss: str = "ce", **kwargs):
        super().__init__(model, eps=eps, alpha=eps, steps=1, random_start=False, norm=norm, loss=loss, **kwargs)


class CW(PGD):
    """PGD on the Carlini-Wagner margin loss max_{j != y} z_j - z_y (the "CW-inf" of robustness
    papers; not the optimisation-based CW-L2 attack)."""

    def __init__(self, model, eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 30, **kwargs):
        kwargs.setdefault("loss", "cw")
        super().__init__(model, eps=eps, alpha=alpha, steps=steps, **kwargs)
