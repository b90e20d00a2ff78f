from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from ..attacks.base import Attack, check_count, check_positive
from ..attacks.losses import logits_of


def train_classifier(model: nn.Module, train: TensorDataset, *, epochs: int, lr: float = 0.05,
                     batch_size: int = 64, weight_decay: float = 5e-4, attack: Attack | None = None,
                     seed: int = 0, progress: bool = True) -> nn.Module:
    """SGD (momentum 0.9, cosine lr) on cross-entropy; with ``attack``, on its adversarial examples
    (PGD adversarial training, Madry et al.). train: images (M, ...) in [0, 1], labels (M,).
    Runs on the model's device and returns the model, in train mode."""
    check_count("epochs", epochs)
    check_positive("lr", lr, allow_zero=False)
    check_count("batch_size", batch_size)
    device = next(model.parameters()).device
    images, labels = (t.to(device) for t in train.tensors)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = -(-images.shape[0] // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    order_gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in tqdm(range(epochs), desc="train", unit="epoch", disable=not progress, leave=False):
        order = torch.randperm(images.shape[0], generator=order_gen).to(device)
        for start in range(0, images.shape[0], batch_size):
            index = order[start:start + batch_size]
            x, y = images[index], labels[index]
            if attack is not None:
                x = attack(x, y)  # the attack runs in eval mode and restores train mode
            loss = F.cross_entropy(logits_of(model(x)), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model
