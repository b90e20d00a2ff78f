"""Batched, host-sync-free adversarial attacks with a torchattacks-compatible call:
``x_adv = fastprune.attacks.PGD(model, eps=8/255, alpha=2/255, steps=10)(images, labels)``."""
from .apgd import APGD, APGDT
from .base import Attack
from .evaluate import DEFAULT_ATTACKS, evaluate, format_table, make_attack
from .losses import ce_loss, cw_margin_loss, dlr_loss
from .pgd import CW, FGSM, PGD

__all__ = [
    "APGD", "APGDT", "Attack", "CW", "DEFAULT_ATTACKS", "FGSM", "PGD",
    "ce_loss", "cw_margin_loss", "dlr_loss", "evaluate", "format_table", "make_attack",
]
