"""Training objectives: natural cross-entropy, PGD adversarial training (Madry et al.) and TRADES
(Zhang et al. 2019, HYDRA's default). Each is a callable (model, x, y) -> scalar loss to minimise.

TRADES' inner maximisation uses the clean prediction, which here is computed once per batch; the
HYDRA code recomputes it inside every attack step (a redundant forward pass per step).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.checks import check_count, check_positive, eval_mode
from ..utils.checks import check_eps
from ..utils.autograd import input_gradient, input_gradients_only
from ..attacks.losses import logits_of
from ..attacks.pgd import PGD
from ..ops.pgd import pgd_step_
from ..nn.sparse.training import attack_view

OBJECTIVES = ("natural", "pgd", "trades", "mart")


def natural_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits_of(model(x)), y)


class PGDTraining:
    """Cross-entropy on PGD examples (random start, ``steps`` steps of ``alpha``, Linf ``eps``)."""

    def __init__(self, eps: float, alpha: float, steps: int, seed: int | None = None):
        self.eps, self.alpha = check_eps(eps), check_positive("alpha", alpha)
        self.steps, self.seed = check_count("steps", steps), seed
        self._attacks: dict[int, PGD] = {}

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        attack = self._attacks.get(id(model))
        if attack is None:
            attack = self._attacks[id(model)] = PGD(model, eps=self.eps, alpha=self.alpha, steps=self.steps)
        return F.cross_entropy(logits_of(model(attack(x, y))), y)


BN_FORWARDS = ("hydra", "once")


class TRADES:
    """CE(f(x), y) + beta * KL(f(x_adv) || f(x)), x_adv maximising that KL within the Linf ball
    (start x + 0.001 N(0, 1), ``steps`` sign steps of ``alpha``); beta 6 in HYDRA's configs.

    ``bn_forwards``: what BatchNorm's running statistics see. "hydra" (default): HYDRA's TRADES
    trainer runs the model in train mode four times per batch (clean for its accuracy meter, clean
    for the loss, adversarial, clean again inside the KL term), so the statistics weigh clean data
    about 74%, and the eval-mode attack of the next batch sees those; here the two extra clean
    passes run without autograd, only for the statistics, and only when the model has BatchNorm
    (given x_adv, the loss is the same either way: in train mode BatchNorm's output does not depend
    on its running statistics). "once": one clean and one adversarial pass (about 47% clean), the
    minimum the loss needs.

    ``norm="l2"``: TRADES' L2 inner maximisation (normalised-gradient steps of ``alpha``, clip to the
    image box, then rescale to the eps-ball; TRADES' code uses alpha = 2 eps / steps).
    """

    def __init__(self, eps: float, alpha: float, steps: int, beta: float = 6.0, bn_forwards: str = "hydra",
                 norm: str = "linf"):
        if norm not in ("linf", "l2"):
            raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
        self.eps, self.alpha, self.norm = check_eps(eps, norm=norm), check_positive("alpha", alpha), norm
        self.steps, self.beta = check_count("steps", steps), check_positive("beta", beta)
        if bn_forwards not in BN_FORWARDS:
            raise ValueError(f"bn_forwards must be one of {BN_FORWARDS}, got {bn_forwards!r}")
        self.bn_forwards = bn_forwards

    def adversarial(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        alpha = torch.full((n,), self.alpha, device=x.device)
        eps = torch.full((n,), self.eps, device=x.device)
        with eval_mode(model), torch.enable_grad(), input_gradients_only():
            net = attack_view(model)  # under sparse finetuning: BatchNorm folded, epilogues fused
            with torch.no_grad():
                p_clean = F.softmax(logits_of(net(x)), dim=1)  # once per batch, not once per step
            x_adv = (x + 0.001 * torch.randn_like(x)).detach()
            for _ in range(self.steps):
                xg = x_adv.requires_grad_(True)
                logits = logits_of(net(xg)).float()
                kl = F.kl_div(F.log_softmax(logits, dim=1), p_clean, reduction="none").sum(dim=1)
                grad = input_gradient(kl, logits, xg)  # under fit(amp=True) on CUDA the KL's gradient starts tiny
                x_adv = xg.detach()
                if self.norm == "linf":
                    pgd_step_(x_adv, grad, x, alpha=alpha, eps=eps, check_values=False)
                else:
                    x_adv = self._l2_step(x_adv, grad, x)
        return x_adv

    def _l2_step(self, x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """TRADES' L2 step as its code takes it: a normalised-gradient step of ``alpha`` (a zero
        gradient replaced by Gaussian noise), then the image clipped to [0, 1], then the
        perturbation rescaled to norm at most eps (renorm_ with maxnorm)."""
        shape = (-1,) + (1,) * (x.dim() - 1)
        gnorm = grad.flatten(1).norm(dim=1).view(shape)
        direction = torch.where(gnorm > 0, grad / gnorm.clamp_min(1e-30), torch.randn_like(grad))
        delta = (x_adv + self.alpha * direction).clamp(0.0, 1.0) - x
        dnorm = delta.flatten(1).norm(dim=1).view(shape)
        scale = torch.where(dnorm > self.eps, self.eps / (dnorm + 1e-7), torch.ones_like(dnorm))
        return x + delta * scale

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        statistics_only = self.bn_forwards == "hydra" and model.training and _has_batchnorm(model)
        if statistics_only:  # HYDRA's accuracy-meter pass, before the attack
            with torch.no_grad():
                model(x)
        x_adv = self.adversarial(model, x)
        logits = logits_of(model(x))
        adv_logits = logits_of(model(x_adv))
        if statistics_only:  # HYDRA's second clean pass inside the KL term
            with torch.no_grad():
                model(x)
        robust = F.kl_div(F.log_softmax(adv_logits, dim=1), F.softmax(logits, dim=1), reduction="batchmean")
        return F.cross_entropy(logits, y) + self.beta * robust


class MART:
    """MART (Wang et al., ICLR 2020), as PwoA's code defines it for its mixed batches: x_adv from
    ``steps`` sign steps of ``alpha`` on the cross-entropy (start x + 0.001 N(0, 1), Linf ``eps``,
    eval mode); then BCE(f(x_adv), y) + beta * mean_i KL(f(x) || f(x_adv))_i * (1 - p_y(x_i)), the
    boosted cross-entropy being CE(f(x_adv), y) - log(1 - max_{k != y} p_k(x_adv))."""

    def __init__(self, eps: float = 0.031, alpha: float = 0.007, steps: int = 10, beta: float = 6.0):
        self.eps, self.alpha = check_eps(eps), check_positive("alpha", alpha)
        self.steps, self.beta = check_count("steps", steps), check_positive("beta", beta)

    def adversarial(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        alpha = torch.full((n,), self.alpha, device=x.device)
        eps = torch.full((n,), self.eps, device=x.device)
        with eval_mode(model), torch.enable_grad(), input_gradients_only():
            net = attack_view(model)  # under sparse finetuning: BatchNorm folded, epilogues fused
            x_adv = (x + 0.001 * torch.randn_like(x)).detach()
            for _ in range(self.steps):
                xg = x_adv.requires_grad_(True)
                logits = logits_of(net(xg)).float()
                loss = F.cross_entropy(logits, y, reduction="none")
                grad = input_gradient(loss, logits, xg)
                x_adv = xg.detach()
                pgd_step_(x_adv, grad, x, alpha=alpha, eps=eps, check_values=False)
        return x_adv

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = self.adversarial(model, x, y)
        logits, adv_logits = logits_of(model(x)), logits_of(model(x_adv))
        adv_probs = F.softmax(adv_logits, dim=1)
        top2 = adv_probs.argsort(dim=1)[:, -2:]
        runner_up = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
        boosted = F.cross_entropy(adv_logits, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), runner_up)
        nat_probs = F.softmax(logits, dim=1)
        true_probs = nat_probs.gather(1, y[:, None]).squeeze(1)
        kl = F.kl_div(torch.log(adv_probs + 1e-12), nat_probs, reduction="none").sum(dim=1)
        return boosted + self.beta * (kl * (1.0000001 - true_probs)).mean()


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def make_objective(name: str, *, eps: float = 0.031, alpha: float = 0.0078, steps: int = 10,
                   beta: float = 6.0, bn_forwards: str = "hydra", norm: str = "linf"):
    """"natural", "pgd", "trades" or "mart" as a callable (model, x, y) -> loss. The defaults are HYDRA's
    CIFAR configs (eps 0.031, step 0.0078, 10 steps, beta 6); 8/255 and 2/255 differ by under 1.2%."""
    if name == "natural":
        return natural_loss
    if name == "pgd":
        if norm != "linf":
            raise ValueError("norm='l2' applies to the TRADES objective (HYDRA's trainers); PGD-AT here is Linf")
        return PGDTraining(eps, alpha, steps)
    if name == "trades":
        return TRADES(eps, alpha, steps, beta, bn_forwards, norm)
    if name == "mart":
        if norm != "linf":
            raise ValueError("norm='l2' applies to the TRADES objective; MART here is Linf")
        return MART(eps, alpha, steps, beta)
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}")
