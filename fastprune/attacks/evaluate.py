"""Robustness evaluation: per-attack accuracy and the per-sample worst case over all attacks."""
from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.batches import iter_batches, length
from .apgd import APGD, APGDT
from ..utils.checks import check_eps, check_images_labels
from .autoattack import AutoAttack
from .base import Attack, check_count, eval_mode
from .fab import FAB
from .losses import logits_of
from .pgd import CW, FGSM, PGD
from .square import Square

DEFAULT_ATTACKS = ("clean", "autoattack")
ATTACK_NAMES = ("clean", "fgsm", "pgdN", "cw", "cwN", "apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square",
                "autoattack", "autoattack-plus")


def make_attack(name: str, model: nn.Module, *, eps: float, norm: str = "linf", **options) -> Attack:
    """An attack from its short name.

    "fgsm"; "pgdN" (N steps, alpha = max(eps / 4, 2.5 eps / N), random start); "cw" or "cwN"
    (PGD on the CW margin, 30 steps by default); "apgd-ce", "apgd-dlr", "apgd-t" (100 steps);
    "fab", "fab-t" (100 steps, as in AutoAttack); "square" (5000 queries); "autoattack" (standard),
    "autoattack-plus". ``options`` (amp, channels_last, cuda_graph, seed, clip, and any argument of
    the attack's class, e.g. n_queries) go to the attack.
    """
    key = name.lower()
    match = re.fullmatch(r"(pgd|cw)(\d*)", key)
    if match:
        steps = int(match.group(2) or (30 if match.group(1) == "cw" else 20))
        alpha = max(eps / 4, 2.5 * eps / steps)
        cls = CW if match.group(1) == "cw" else PGD
        return cls(model, eps=eps, alpha=alpha, steps=steps, norm=norm, **options)
    if key == "fgsm":
        return FGSM(model, eps=eps, norm=norm, **options)
    if key in ("apgd-ce", "apgd-dlr"):
        return APGD(model, eps=eps, norm=norm, loss=key.split("-")[1], **options)
    if key == "apgd-t":
        return APGDT(model, eps=eps, norm=norm, **options)
    if key in ("fab", "fab-t"):
        return FAB(model, eps=eps, norm=norm, **{"steps": 100, "targeted": key == "fab-t", **options})
    if key == "square":
        return Square(model, eps=eps, norm=norm, **options)
    if key in ("autoattack", "autoattack-plus"):
        return AutoAttack(model, eps=eps, norm=norm, version="plus" if key.endswith("plus") else "standard",
                          **options)
    raise ValueError(f"unknown attack {name!r}: use one of {', '.join(ATTACK_NAMES)}")


def evaluate(model: nn.Module, data, attacks: Sequence[str] = DEFAULT_ATTACKS, *, eps: float = 8 / 255,
             norm: str = "linf", batch_size: int = 256, device: str | torch.device | None = None,
             progress: bool = True, settings: dict[str, dict] | None = None, **options) -> dict[str, float]:
    """Accuracy of ``model`` under each attack, and under the worst case per sample.

    Args:
        data: (images (M, ...), labels (M,)) tensors, a Dataset, or an iterable of batches.
        attacks: names for :func:`make_attack`, plus "clean" (default: clean and AutoAttack standard).
        eps, norm: the threat model (eps in pixel units).
        device: where to run (default: the model's device).
        settings: per attack name, extra arguments of its class (e.g. ``{"autoattack": {"n_queries":
            1000}}``).
        options: amp, channels_last, cuda_graph, seed, clip for every attack.

    Returns:
        {name: accuracy for each attack, "worst": fraction of samples correct under every attack,
        "n": number of samples}. AutoAttack adds "autoattack/<component>": the robust accuracy after
        each of its components (cumulative). As in RobustBench and AutoAttack, a sample counts as
        robust to an attack only if its clean image is classified correctly too, so no attack's
        accuracy exceeds the clean accuracy (an attack can stumble onto the right class from a wrong
        one).
    """
    check_eps(eps, options.get("clip", (0.0, 1.0)), norm)
    check_count("batch_size", batch_size)
    if not attacks:
        raise ValueError("attacks must name at least one attack")
    if device is None:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(attacks))
    if unknown:
        raise ValueError(f"settings names attacks that are not in attacks: {unknown}")
    built = {name: (None if name == "clean" else
                    make_attack(name, model, eps=eps, norm=norm, **{**options, **settings.get(name, {})}))
             for name in attacks}
    correct = {}
    for name, attack in built.items():  # AutoAttack's components first, then its final figure
        for component in (attack.components if isinstance(attack, AutoAttack) else ()):
            correct[f"{name}/{component}"] = torch.zeros((), dtype=torch.long, device=device)
        correct[name] = torch.zeros((), dtype=torch.long, device=device)
    worst = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    bar = tqdm(total=length(data), desc="evaluate", unit="img", disable=not progress, leave=False)
    clip, classes = options.get("clip", (0.0, 1.0)), None
    for images, labels in iter_batches(data, batch_size):
        images, labels = images.to(device), labels.to(device)
        # "clean" too: NaN, 0-255, bad labels (the model's class count read once)
        classes = check_images_labels(images, labels, clip=clip, model=model, num_classes=classes)
        with torch.no_grad(), eval_mode(model):
            clean_right = logits_of(model(images)).argmax(dim=1) == labels
        robust = clean_right.clone()
        for name, attack in built.items():
            if attack is None:
                right = clean_right
            else:
                x_adv = attack(images, labels)
                with torch.no_grad(), eval_mode(model):
                    right = (logits_of(model(x_adv)).argmax(dim=1) == labels) & clean_right
                if isinstance(attack, AutoAttack):
                    for component in attack.components:
                        correct[f"{name}/{component}"] += (attack.robust_after[component] & clean_right).sum()
            correct[name] += right.sum()
            robust &= right
        worst += robust.sum()
        total += labels.shape[0]
        bar.update(labels.shape[0])
    bar.close()
    if total == 0:
        raise ValueError("data holds no samples")
    result = {name: count.item() / total for name, count in correct.items()}
    result["worst"] = worst.item() / total
    result["n"] = total
    return result


def format_table(result: dict[str, float]) -> str:
    """A two-column text table of an :func:`evaluate` result."""
    rows = [(k, f"{v * 100:.2f}%") for k, v in result.items() if k != "n"]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'attack'.ljust(width)}  accuracy", f"{'-' * width}  --------"]
    lines += [f"{k.ljust(width)}  {v:>8}" for k, v in rows]
    lines.append(f"({result['n']} samples)")
    return "\n".join(lines)
