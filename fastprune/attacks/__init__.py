"""Batched, host-sync-free adversarial attacks with a torchattacks-compatible call:
``x_adv = fastprune.attacks.PGD(model, eps=8/255, alpha=2/255, steps=10)(images, labels)``."""
from .apgd import APGD, APGDT
from .autoattack import AutoAttack
from .base import Attack
from .evaluate import ATTACK_NAMES, DEFAULT_ATTACKS, evaluate, format_table, make_attack
from .fab import FAB, FABT
from .losses import ce_loss, cw_margin_loss, dlr_loss
from .pgd import CW, FGSM, PGD
from .square import Square

__all__ = [
    "APGD", "APGDT", "ATTACK_NAMES", "Attack", "AutoAttack", "CW", "DEFAULT_ATTACKS", "FAB", "FABT", "FGSM", "PGD",
    "Square", "ce_loss", "cw_margin_loss", "dlr_loss", "evaluate", "format_table", "make_attack",
]
