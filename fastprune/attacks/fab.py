"""FAB, the Fast Adaptive Boundary attack (Croce and Hein, ICML 2020), Linf and L2, untargeted and
targeted (AutoAttack's FAB-T).

FAB looks for the adversarial example of smallest norm. Each step linearises the model around the
current point x1, picks the decision boundary (towards one wrong class) that is closest in that
linearisation, and projects both x1 and the original image x0 onto that hyperplane inside the image
box. The step is a convex combination of the two projections (biased towards x0 by at most
``alpha_max``), overshooting by ``eta``; when the point becomes adversarial it is recorded if smaller
than the best so far, and pulled back towards x0 by ``beta``. A point counts as fooled only if the
smallest adversarial example found lies inside the eps-ball; otherwise the clean image is returned.

Differences from the reference code (fra31/auto-attack, fab_pt.py), none of which changes a result:
- the hyperplane projections are written for every row at once (a binary search on all rows, the
  cases merged with ``torch.where``), and recording the best adversarial point is a masked update,
  so a step has no host synchronisation;
- the points are compacted once per target class (those still robust and correctly classified), as
  the reference does; that selection is the one host synchronisation per target.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Attack, check_count, check_positive


def _rows(t: torch.Tensor) -> tuple[int, ...]:
    return (-1,) + (1,) * (t.dim() - 1)


def _norm(d: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-row Linf or L2 norm of d (M, ...)."""
    flat = d.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


def project_linf(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Smallest Linf step d with w.(t + d) = b and t + d in [0, 1]^D, per row.

    t, w (M, D), b (M,); returns d (M, D). Where the hyperplane cannot be reached inside the box,
    the step goes to the box corner that gets closest to it (as in the reference).
    """
    sign = torch.where((w * t).sum(1) - b >= 0, 1.0, -1.0)
    w, b = w * sign[:, None], b * sign
    a = (w < 0).to(t.dtype)                  # the box corner each coordinate moves towards
    d = (a - t) * (w != 0)
    p = a - t * (2 * a - 1)                  # distance to that corner per coordinate
    indp = torch.argsort(p, dim=1)
    b = b - (w * t).sum(1)
    b0 = (w * d).sum(1)
    indp2 = indp.flip((1,))
    ws = w.gather(1, indp2)
    bs2 = -ws * d.gather(1, indp2)
    s = torch.cumsum(ws.abs(), dim=1)
    sb = torch.cumsum(bs2, dim=1) + b0[:, None]

    b2 = sb[:, -1] - s[:, -1] * p.gather(1, indp[:, :1]).squeeze(1)
    c_l = b - b2 > 0                         # reachable only by moving every coordinate
    c2 = (b - b0 > 0) & ~c_l                 # reachable: binary search for the active set
    dim = w.shape[1]
    lb = torch.zeros(w.shape[0], device=t.device, dtype=t.dtype)
    ub = torch.full_like(lb, dim - 1)
    for _ in range(math.ceil(math.log2(dim))):
        mid = torch.floor((lb + ub) / 2)
        col = mid.long()[:, None]
        indcurr = indp.gather(1, dim - 1 - col)
        b2 = (sb.gather(1, col) - s.gather(1, col) * p.gather(1, indcurr)).squeeze(1)
        c = b - b2 > 0
        lb, ub = torch.where(c, mid, lb), torch.where(c, ub, mid)
    col = lb.long()[:, None]

    lmbd_l = torch.clamp_min((b - sb[:, -1]) / (-s[:, -1]), 0)[:, None]
    d_l = (2 * a - 1) * lmbd_l
    lmbd = torch.clamp_min((b - sb.gather(1, col).squeeze(1)) / (-s.gather(1, col).squeeze(1)), 0)[:, None]
    d_2 = torch.minimum(lmbd, d) * a + torch.maximum(-lmbd, d) * (1 - a)
    d = torch.where(c_l[:, None], d_l, torch.where(c2[:, None], d_2, d))
    return d * (w != 0)


def project_l2(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Smallest L2 step d with w.(t + d) = b and t + d in [0, 1]^D, per row (see project_linf)."""
    c = (w * t).sum(1) - b
    sign = torch.where(c >= 0, 1.0, -1.0)
    w, c = w * sign[:, None], c * sign
    small = w.abs() < 1e-8
    r = torch.maximum(t / w, (t - 1) / w).clamp(min=-1e12, max=1e12)
    r = r.masked_fill(small, 1e12)
    r = torch.where(r == -1e12, 1e12, r)
    rs, indr = torch.sort(r, dim=1)          # the step sizes at which coordinates hit the box
    rs2 = F.pad(rs[:, 1:], (0, 1))
    rs = rs.masked_fill(rs == 1e12, 0)
    rs2 = rs2.masked_fill(rs2 == 1e12, 0)

    w3s = (w ** 2).gather(1, indr)
    w5 = w3s.sum(dim=1, keepdim=True)
    ws = w5 - torch.cumsum(w3s, dim=1)
    d = -(r * w) * ~small
    s = torch.cat((-w5 * rs[:, :1], torch.cumsum((-rs2 + rs) * ws, dim=1) - w5 * rs[:, :1]), 1)

    c4 = s[:, 0] + c < 0                     # reached before any coordinate hits the box
    c3 = (d * w).sum(dim=1) + c > 0          # not reachable: d goes to the box
    c2 = ~(c4 | c3)
    dim = w.shape[1]
    lb = torch.zeros(w.shape[0], device=t.device, dtype=t.dtype)
    ub = torch.full_like(lb, dim - 1)
    for _ in range(math.ceil(math.log2(dim))):
        mid = torch.floor((lb + ub) / 2)
        c3 = s.gather(1, mid.long()[:, None]).squeeze(1) + c > 0
        lb, ub = torch.where(c3, mid, lb), torch.where(c3, ub, mid)
    col = lb.long()[:, None]

    d_4 = -(c / w5.squeeze(-1))[:, None] * w
    ws_l = ws.gather(1, col).squeeze(1)
    alpha = (s.gather(1, col).squeeze(1) + c) / ws_l + rs.gather(1, col).squeeze(1)
    alpha = torch.where(ws_l == 0, 0.0, alpha)[:, None]
    c5 = (alpha > r).to(t.dtype)
    d_2 = d * c5 - alpha * w * (1 - c5)
    d = torch.where(c4[:, None], d_4, torch.where(c2[:, None], d_2, d))
    return d * ~small


PROJECTIONS = {"linf": project_linf, "l2": project_l2}


class FAB(Attack):
    """FAB (untargeted) or FAB-T (``targeted=True``: each of the ``n_target_classes`` most likely
    wrong classes in turn, on the points still robust).

    Args (beyond :class:`Attack`'s): steps: iterations per run (AutoAttack: 100); restarts: runs per
    target, the first from the image itself, later ones from random points at half the radius of
    the best adversarial example so far (or of eps); alpha_max: the largest weight of the
    projection of the original image in a step; eta: overshoot; beta: the pull back towards the
    image once adversarial.

    Returns (N, ...): the smallest adversarial example found where it lies inside the eps-ball,
    else the image itself. The untargeted attack needs the gradient of every logit: C backward
    passes per step (the targeted one needs one).
    """

    def __init__(self, model, eps: float = 8 / 255, norm: str = "linf", steps: int = 10, restarts: int = 1,
                 alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9, targeted: bool = False,
                 n_target_classes: int = 9, **kwargs):
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        self.steps = check_count("steps", steps)
        self.restarts = check_count("restarts", restarts)
        self.alpha_max = check_positive("alpha_max", alpha_max)
        if self.alpha_max > 1:
            raise ValueError(f"alpha_max must be in [0, 1], got {alpha_max!r}")
        self.eta = check_positive("eta", eta, allow_zero=False)
        self.beta = check_positive("beta", beta)
        if self.beta > 1:
            raise ValueError(f"beta must be in [0, 1], got {beta!r}")
        self.targeted = bool(targeted)
        self.n_target_classes = check_count("n_target_classes", n_target_classes)

    # --- the linearisation ----------------------------------------------------------------------
    def _boundary_untargeted(self, x: torch.Tensor, y: torch.Tensor):
        """f_j - f_y (M, C) with 1e10 at y, and the gradients of f_j - f_y (M, C, ...)."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = self.logits(xg)
            classes = logits.shape[1]
            grads = []
            for j in range(classes):  # one backward per class through the same graph
                (g,) = torch.autograd.grad(logits[:, j].sum(), xg, retain_graph=j < classes - 1)
                grads.append(g)
        logits = logits.detach()
        grads = torch.stack(grads, dim=1)
        rows = torch.arange(x.shape[0], device=x.device)
        df = logits - logits[rows, y][:, None]
        dg = grads - grads[rows, y][:, None]
        df[rows, y] = 1e10
        return df, dg

    def _boundary_targeted(self, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor):
        """f_t - f_y (M, 1) and its gradient (M, 1, ...)."""
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logits = self.logits(xg)
            diff = logits.gather(1, target[:, None]) - logits.gather(1, y[:, None])
            (g,) = torch.autograd.grad(diff.sum(), xg)
        return diff.detach(), g[:, None]

    # --- one run ----------------------------------------------------------------------------------
    def _run(self, x0: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, random_start: bool,
             best: torch.Tensor, best_norm: torch.Tensor, gen) -> tuple[torch.Tensor, torch.Tensor]:
        """FAB from x0 (M, ...) (correctly classified points); updates and returns (best adversarial
        points, their norms), 1e10 where none was found."""
        lo, hi = self.clip
        width = hi - lo
        shape, m = _rows(x0), x0.shape[0]
        project = PROJECTIONS[self.norm]
        x1 = x0.clone()
        if random_start:
            radius = torch.minimum(best_norm, torch.full_like(best_norm, self.eps)).view(shape)
            if self.norm == "linf":
                t = torch.rand(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype) * 2 - 1
            else:
                t = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
            x1 = (x0 + radius * t / _norm(t, self.norm).view(shape) * 0.5).clamp(lo, hi)
        # The projections assume the box [0, 1]: work in u = (x - lo) / width (norms scale by width).
        u0 = ((x0 - lo) / width).flatten(1)
        for _ in range(self.steps):
            if target is None:
                df, dg = self._boundary_untargeted(x1, y)
            else:
                df, dg = self._boundary_targeted(x1, y, target)
            dual = dg.flatten(2).abs().sum(-1) if self.norm == "linf" else dg.flatten(2).norm(dim=-1)
            closest = (df.abs() / (1e-12 + dual)).argmin(dim=1)
            w = dg[torch.arange(m, device=x0.device), closest].flatten(1)
            b = -df.gather(1, closest[:, None]).squeeze(1) + (w * x1.flatten(1)).sum(1)
            # The same hyperplane in u-space: w.(lo + width u) = b.
            w_u, b_u = w * width, b - lo * w.sum(1)
            u1 = ((x1 - lo) / width).flatten(1)
            d3 = project(torch.cat((u1, u0)), torch.cat((w_u, w_u)), torch.cat((b_u, b_u))) * width
            d1, d2 = d3[:m].view_as(x0), d3[m:].view_as(x0)
            a0 = _norm(d3, self.norm).clamp_min(1e-8)
            a1, a2 = a0[:m], a0[m:]
            alpha = (a1 / (a1 + a2)).clamp(0, self.alpha_max).view(shape)
            x1 = ((x1 + self.eta * d1) * (1 - alpha) + (x0 + d2 * self.eta) * alpha).clamp(lo, hi)

            adversarial = self.predict(x1) != y
            size = _norm(x1 - x0, self.norm)
            smaller = adversarial & (size < best_norm)
            best = torch.where(smaller.view(shape), x1, best)
            best_norm = torch.where(smaller, size, best_norm)
            x1 = torch.where(adversarial.view(shape), x0 + (x1 - x0) * self.beta, x1)
        return best, best_norm

    def _targets(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(T, N) targets: the (t+2)-th most likely class for t < T."""
        with torch.no_grad():
            clean = self.logits(x)
        count = min(self.n_target_classes, clean.shape[1] - 1)
        order = clean.argsort(dim=1)
        return torch.stack([order[:, -(t + 2)] for t in range(count)]), count

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        gen = self.generator(x.device)
        x_adv = x.clone()
        robust = self.predict(x) == y
        targets, groups = self._targets(x) if self.targeted else (None, 1)
        for group in range(groups):
            for restart in range(self.restarts):
                # Compaction: the points still robust (one host synchronisation per run).
                index = robust.nonzero().squeeze(1)
                if index.numel() == 0:
                    return x_adv
                x0, y0 = x[index], y[index]
                target = targets[group][index] if targets is not None else None
                best_norm = torch.full((index.numel(),), 1e10, device=x.device, dtype=x.dtype)
                best, best_norm = self._run(x0, y0, target, restart > 0, x0.clone(), best_norm, gen)
                fooled = (best_norm <= self.eps) & (self.predict(best) != y0)
                x_adv[index] = torch.where(fooled.view(_rows(x0)), best, x_adv[index])
                robust[index] = robust[index] & ~fooled
        return x_adv


class FABT(FAB):
    """FAB-T: targeted FAB against each of the ``n_target_classes`` most likely wrong classes
    (AutoAttack's FAB-T)."""

    def __init__(self, model, eps: float = 8 / 255, norm: str = "linf", steps: int = 10,
                 n_target_classes: int = 9, **kwargs):
        super().__init__(model, eps=eps, norm=norm, steps=steps, targeted=True,
                         n_target_classes=n_target_classes, **kwargs)
