"""Square Attack (Andriushchenko et al., ECCV 2020), Linf and L2: a score-based black-box attack.

It uses only the model's logits, never a gradient, so it is what exposes gradient masking. Each
iteration proposes one random square window (the same position for the whole batch, a random sign
or pattern per image and channel), keeps the proposal where it lowers the margin loss, and shrinks
the window on a fixed schedule of the iteration number. Linf starts from vertical stripes of +-eps;
L2 from a grid of the paper's "eta" patterns scaled to radius eps.

Differences from the reference code (fra31/auto-attack, square.py), none of which changes the
algorithm:
- random numbers come from the attack's own device generator, and windows are placed with index
  tensors, so an iteration has no host synchronisation (the reference draws positions on the host);
- the reference attacks only the rows not yet fooled, re-selected every iteration (a host
  synchronisation each time); here all rows run and the fooled ones are frozen by a mask, and the
  batch is compacted to the rows still robust every ``compact_every`` iterations (default: every
  iteration on the CPU, where a synchronisation is free, every 20 on CUDA). Every random draw has
  the whole batch's shape, so the result does not depend on when compaction happens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .base import Attack, check_count, check_positive
from .losses import cw_margin_loss


def p_schedule(iteration: int, n_queries: int, p_init: float, rescale: bool) -> float:
    """The fraction of pixels a window covers at ``iteration`` (the paper's piecewise schedule,
    defined for 10000 queries; ``rescale`` stretches it to ``n_queries``)."""
    it = int(iteration / n_queries * 10000) if rescale else iteration
    for bound, divisor in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64),
                           (6000, 128), (8000, 256)):
        if it <= bound:
            return p_init / divisor
    return p_init / 512


def eta_pattern(s: int, device, dtype=torch.float32) -> torch.Tensor:
    """The L2 attack's (s, s) window pattern: two opposite-signed stacks of nested squares of weight
    1 / (k + 1)^2, unit L2 norm (the reference's ``eta``, before its random transpose)."""

    def rectangles(rows: int, cols: int) -> torch.Tensor:
        delta = torch.zeros(rows, cols, device=device, dtype=dtype)
        cr, cc = rows // 2, cols // 2  # the reference's (x_c - 1, y_c - 1)
        for k in range(max(rows // 2 + 1, cols // 2 + 1)):
            r0, c0 = cr - k, cc - k
            delta[max(r0, 0):min(r0 + 2 * k + 1, rows), max(c0, 0):min(c0 + 2 * k + 1, cols)] += 1.0 / (k + 1) ** 2
        return delta / delta.pow(2).sum().sqrt()

    delta = torch.cat([rectangles(s // 2, s), -rectangles(s - s // 2, s)]) if s > 1 else \
        -rectangles(1, 1)
    return delta / delta.pow(2).sum().sqrt()


class Square(Attack):
    """Square Attack, untargeted, minimising the margin (or cross-entropy) loss.

    Args (beyond :class:`Attack`'s): n_queries: iterations after the initial query (AutoAttack:
    5000); p_init: initial fraction of pixels per window; loss: "margin" or "ce"; rescale_schedule:
    stretch the window schedule to n_queries (AutoAttack turns it off); restarts: independent runs
    on the points still robust; compact_every: see the module docstring.

    Images must be (N, C, H, W). Returns the first adversarial point found for each image, else
    the point of lowest loss.
    """

    def __init__(self, model, eps: float = 8 / 255, norm: str = "linf", n_queries: int = 5000,
                 p_init: float = 0.8, loss: str = "margin", rescale_schedule: bool = True, restarts: int = 1,
                 compact_every: int | None = None, **kwargs):
        super().__init__(model, eps=eps, norm=norm, **kwargs)
        self.n_queries = check_count("n_queries", n_queries)
        self.p_init = check_positive("p_init", p_init, allow_zero=False)
        if self.p_init > 1:
            raise ValueError(f"p_init must be in (0, 1], got {p_init!r}")
        if loss not in ("margin", "ce"):
            raise ValueError(f"loss must be 'margin' or 'ce', got {loss!r}")
        self.loss_name = loss
        self.rescale_schedule = bool(rescale_schedule)
        self.restarts = check_count("restarts", restarts)
        self.compact_every = None if compact_every is None else check_count("compact_every", compact_every)

    # --- pieces ---------------------------------------------------------------------------------
    def _margin_and_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_y - max_{j != y} z_j, the loss to minimise), each (M,)."""
        with torch.no_grad():
            logits = self.logits(x)
        margin = -cw_margin_loss(logits, y)
        if self.loss_name == "margin":
            return margin, margin
        return margin, -F.cross_entropy(logits, y, reduction="none")

    def _signs(self, shape, gen, device) -> torch.Tensor:
        """Random +-1 of ``shape`` (the reference's sign(2 u - 1))."""
        return torch.sign(2 * torch.rand(shape, generator=gen, device=device) - 1)

    def _position(self, size: int, s: int, gen, device) -> torch.Tensor:
        """A random window start in [0, size - s) as a 0-d device tensor (the reference's random_int;
        its upper end is exclusive, so the last offset is never drawn)."""
        return ((size - s) * torch.rand((), generator=gen, device=device)).long()

    def _window_mask(self, vh, vw, s: int, h: int, w: int, device) -> torch.Tensor:
        """(h, w) float mask of the s x s window at (vh, vw)."""
        rows = torch.arange(h, device=device)
        cols = torch.arange(w, device=device)
        in_rows = (rows >= vh) & (rows < vh + s)
        in_cols = (cols >= vw) & (cols < vw + s)
        return (in_rows[:, None] & in_cols[None, :]).float()

    def _window(self, t: torch.Tensor, vh, vw, s: int) -> torch.Tensor:
        """The s x s window at (vh, vw) of an (M, C, h, w) tensor, (M, C, s, s), gathered with
        index_select (no host synchronisation for the device-side offsets)."""
        offsets = torch.arange(s, device=t.device)
        return t.index_select(2, vh + offsets).index_select(3, vw + offsets)

    def _eta(self, s: int, gen, device) -> torch.Tensor:
        """The (s, s) pattern, transposed with probability 1/2 (chosen on the device)."""
        pattern = eta_pattern(s, device)
        flip = torch.rand((), generator=gen, device=device) > 0.5
        return torch.where(flip, pattern.t(), pattern)

    def _normalize(self, d: torch.Tensor) -> torch.Tensor:
        flat = d.flatten(1)
        size = flat.abs().amax(dim=1) if self.norm == "linf" else flat.norm(dim=1)
        return d / (size.view(-1, 1, 1, 1) + 1e-12)

    # --- the attack -----------------------------------------------------------------------------
    def _init(self, x: torch.Tensor, gen) -> torch.Tensor:
        n, c, h, w = x.shape
        lo, hi = self.clip
        if self.norm == "linf":
            return (x + self.eps * self._signs((n, c, 1, w), gen, x.device)).clamp(lo, hi)
        s = h // 5
        delta = torch.zeros_like(x)
        start = (h - s * 5) // 2
        vh = start
        for _ in range(h // s):
            vw = start
            for _ in range(w // s):
                pattern = self._eta(s, gen, x.device).to(x.dtype)
                delta[:, :, vh:vh + s, vw:vw + s] += pattern * self._signs((n, c, 1, 1), gen, x.device)
                vw += s
            vh += s
        return (x + self._normalize(delta) * self.eps).clamp(lo, hi)

    def _proposal(self, x: torch.Tensor, x_best: torch.Tensor, p: float, gen, rows: torch.Tensor,
                  total: int) -> torch.Tensor:
        """One iteration's candidate for the rows ``rows`` (M,) of the batch of ``total`` images;
        x, x_best are those rows (M, C, H, W). Per-image random draws are made for all ``total``
        rows and then selected, so no image's draws depend on which others are still attacked."""
        m, c, h, w = x.shape
        lo, hi = self.clip
        device = x.device
        features = c * h * w
        if self.norm == "linf":
            s = max(int(round(math.sqrt(p * features / c))), 1)
            s = min(s, h, w)
            vh, vw = self._position(h, s, gen, device), self._position(w, s, gen, device)
            mask = self._window_mask(vh, vw, s, h, w, device)
            step = 2.0 * self.eps * self._signs((c, 1, 1), gen, device) * mask  # one sign per channel
            x_new = torch.minimum(torch.maximum(x_best + step, x - self.eps), x + self.eps)
            return x_new.clamp(lo, hi)

        s = max(int(round(math.sqrt(p * features / c))), 3)
        if s % 2 == 0:
            s += 1
        s = min(s, h, w)
        delta = x_best - x
        vh, vw = self._position(h, s, gen, device), self._position(w, s, gen, device)
        vh2, vw2 = self._position(h, s, gen, device), self._position(w, s, gen, device)
        window = self._window(delta, vh, vw, s)                          # (M, C, s, s)
        norms_window = window.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt()
        norms_image = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        both = torch.maximum(self._window_mask(vh, vw, s, h, w, device), self._window_mask(vh2, vw2, s, h, w, device))
        norms_windows = (delta * both).flatten(1).norm(dim=1).view(-1, 1, 1, 1)

        new = self._eta(s, gen, device).to(x.dtype) * self._signs((total, c, 1, 1), gen, device)[rows]
        new = new + window / (1e-12 + norms_window)
        budget = (torch.clamp_min(self.eps ** 2 - norms_image ** 2, 0) / c + norms_windows ** 2).sqrt()
        new = new / (1e-12 + new.pow(2).sum(dim=(-2, -1), keepdim=True).sqrt()) * budget
        # The second window cleared, then the first one set to ``new``, with masks and a gather:
        # assigning through the index tensors (index_put_) synchronises with the host on CUDA.
        mask = self._window_mask(vh, vw, s, h, w, device).bool()
        delta = delta * (1 - self._window_mask(vh2, vw2, s, h, w, device))
        rows_in = (torch.arange(h, device=device) - vh).clamp(0, s - 1)
        cols_in = (torch.arange(w, device=device) - vw).clamp(0, s - 1)
        placed = new.index_select(2, rows_in).index_select(3, cols_in)  # (M, C, h, w): new where mask is set
        delta = torch.where(mask, placed, delta)
        return (x + self._normalize(delta) * self.eps).clamp(lo, hi)

    def _run(self, x: torch.Tensor, y: torch.Tensor, gen) -> torch.Tensor:
        """One run on x (M, C, H, W); returns the best points (M, C, H, W)."""
        compact_every = self.compact_every or (1 if x.device.type == "cpu" else 20)
        x_best = self._init(x, gen)
        margin_min, loss_min = self._margin_and_loss(x_best, y)
        # The rows still attacked (indices into x); ``x_best`` etc. are kept for all rows.
        rows = torch.arange(x.shape[0], device=x.device)
        xr, yr, best_r, margin_r, loss_r = x, y, x_best.clone(), margin_min.clone(), loss_min.clone()
        total = x.shape[0]
        for i in range(self.n_queries):
            if i % compact_every == 0:
                # Write the active rows back, then keep those not yet fooled.
                x_best[rows], margin_min[rows], loss_min[rows] = best_r, margin_r, loss_r
                keep = (margin_min[rows] > 0).nonzero().squeeze(1)
                if keep.numel() == 0:
                    return x_best
                rows = rows[keep]
                xr, yr, best_r, margin_r, loss_r = x[rows], y[rows], x_best[rows], margin_min[rows], loss_min[rows]
            p = p_schedule(i, self.n_queries, self.p_init, self.rescale_schedule)
            x_new = self._proposal(xr, best_r, p, gen, rows, total)
            margin, loss = self._margin_and_loss(x_new, yr)
            active = margin_r > 0
            lower = (loss < loss_r) & active
            loss_r = torch.where(lower, loss, loss_r)
            accept = (lower | (margin <= 0)) & active
            margin_r = torch.where(accept, margin, margin_r)
            best_r = torch.where(accept.view(-1, 1, 1, 1), x_new, best_r)
        x_best[rows], margin_min[rows], loss_min[rows] = best_r, margin_r, loss_r
        return x_best

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"Square needs images (N, C, H, W), got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        if min(h, w) < (2 if self.norm == "linf" else 5):
            raise ValueError(f"Square needs images at least {2 if self.norm == 'linf' else 5} pixels on a side "
                             f"for norm {self.norm!r}, got {h}x{w}")
        gen = self.generator(x.device)
        x_adv = x.clone()
        margin, _ = self._margin_and_loss(x, y)
        robust = margin > 0
        for _ in range(self.restarts):
            index = robust.nonzero().squeeze(1)
            if index.numel() == 0:
                break
            best = self._run(x[index], y[index], gen)
            fooled = self._margin_and_loss(best, y[index])[0] <= 0
            x_adv[index] = torch.where(fooled.view(-1, 1, 1, 1), best, x_adv[index])
            robust[index] = ~fooled
        return x_adv
