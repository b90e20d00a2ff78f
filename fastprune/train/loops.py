"""The training loop: SGD with momentum 0.9 and a cosine learning rate (as in HYDRA and PwoA), any
objective, optional run directory with per-epoch atomic checkpoints, metrics and resume."""
from __future__ import annotations

import csv
import json
import math
import os
import time
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from ..attacks.base import Attack
from ..utils.checks import check_count, check_positive
from ..attacks.losses import logits_of
from . import distributed as dist
from ..utils.checks import check_images_labels
from ..utils.io import atomic_save, safe_load
from .objectives import natural_loss

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"


def fit(model: nn.Module, train: TensorDataset, *, objective: Callable = natural_loss, epochs: int, lr: float = 0.1,
        batch_size: int = 128, weight_decay: float = 1e-4, params: Iterable[nn.Parameter] | None = None,
        run_dir: str | None = None, seed: int = 0, progress: bool = True,
        on_epoch_end: Callable[[int, dict], None] | None = None, augment: Callable | None = None,
        amp: bool = False, channels_last: bool = False, extra_state=None, sync_bn: bool = True) -> list[dict]:
    """Train ``model`` on ``train`` (images (M, ...) in [0, 1], labels (M,), moved to the model's device).

    objective: (model, x, y) -> loss (see fastprune.train.objectives). params: what the optimiser
    updates (default every parameter that requires grad; HYDRA's prune phase passes the scores).
    run_dir: after every epoch, a checkpoint (model, optimiser, schedule, random states; written
    atomically) and a row of metrics.csv; calling again with the same run_dir resumes after the last
    finished epoch and gives the same result as an uninterrupted run. augment: a batch transform run
    on the device (e.g. fastprune.data.augment.random_crop_flip). amp: autocast (bfloat16 on CPU;
    float16 with loss scaling on CUDA). channels_last: model and batches in that memory format.
    on_epoch_end(epoch, row): called after each epoch, before its checkpoint is written (it may add
    metrics to ``row`` and update state). extra_state: an object with ``state_dict()`` (tensors and
    plain data) and ``load_state_dict(d)``, saved with every checkpoint and restored on resume (the
    objective's own state, e.g. PwoA's ADMM variables), so a resumed run is exact. sync_bn: under
    torchrun, BatchNorm layers normalise with the statistics of the global batch (all ranks), so
    the run matches one process on the whole batch; off, each rank uses its own slice's.
    Under ``torchrun`` (a process group initialised; see fastprune.train.distributed) each rank
    trains on its share of every batch, gradients are averaged across ranks, and rank 0 writes the
    run directory; the result matches one process on the whole batch up to float rounding.
    Returns the per-epoch metrics.
    """
    check_count("epochs", epochs)
    check_positive("lr", lr, allow_zero=False)
    check_count("batch_size", batch_size)
    device = next(model.parameters()).device
    if not isinstance(train, TensorDataset) or len(train.tensors) != 2:
        raise ValueError(f"train must be a TensorDataset of (images, labels), got {type(train).__name__}")
    images, labels = (t.to(device) for t in train.tensors)
    if images.shape[0] == 0:
        raise ValueError("train holds no samples")
    # Bad data stops here, with its own message, rather than as a "diverged" loss later.
    check_images_labels(images, labels, model=model, what="train images")
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not params:
        raise ValueError("params: nothing to train (no parameter requires grad)")
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = -(-images.shape[0] // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    order_gen = torch.Generator().manual_seed(seed)  # batch order; the global RNG (attacks) is the caller's
    history, start_epoch = [], 0
    ckpt_path = os.path.join(run_dir, CHECKPOINT) if run_dir else None
    if run_dir and dist.is_main():
        remove_stale_temporaries(run_dir)
    if ckpt_path and os.path.exists(ckpt_path):
        state = safe_load(ckpt_path, "run checkpoint", map_location=device)  # tensors and plain data only
        if not isinstance(state, dict) or not {"model", "optimizer", "schedule", "history", "epoch"} <= set(state):
            raise ValueError(f"run checkpoint {ckpt_path!r} is not a fastprune run checkpoint")
        if extra_state is not None:
            if "extra" not in state:
                raise ValueError(f"run checkpoint {ckpt_path!r} lacks the state this objective keeps: "
                                 "it was written by another command")
            extra_state.load_state_dict(state["extra"])
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        order_gen.set_state(state["order_rng"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], device)
        history, start_epoch = state["history"], state["epoch"] + 1
    progress = progress and dist.is_main()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    trained = dist.wrap(model)  # DistributedDataParallel under torchrun (rank 0's weights everywhere)
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)
    model.train()
    with dist.synced_batchnorm(model, sync_bn):  # the swap is undone when training ends
        bar = tqdm(range(start_epoch, epochs), desc="train", unit="epoch", disable=not progress, leave=False)
        for epoch in bar:
            started = time.perf_counter()
            order = torch.randperm(images.shape[0], generator=order_gen).to(device)
            total_loss, seen = 0.0, 0
            for start in range(0, images.shape[0], batch_size):
                batch = order[start:start + batch_size]
                if batch.shape[0] < dist.world_size():  # a last batch too small to give every rank a sample
                    continue
                index = dist.local_slice(batch)  # this rank's share of the global batch
                x = images[index]
                if augment is not None:
                    x = augment(x)
                if channels_last and x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                    loss = objective(trained, x, labels[index])
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                total_loss += loss.detach() * index.shape[0]
                seen += index.shape[0]
            total_loss = dist.sum_across_ranks(torch.as_tensor(total_loss, dtype=torch.float64, device=device))
            seen = int(dist.sum_across_ranks(torch.tensor(seen, device=device)))
            row = {"epoch": epoch, "loss": (total_loss / seen).item(), "lr": schedule.get_last_lr()[0],
                   "seconds": time.perf_counter() - started}
            if not math.isfinite(row["loss"]):  # stop before a diverged model overwrites the last good checkpoint
                raise FloatingPointError(f"the training loss became {row['loss']} in epoch {epoch}: the run "
                                         f"diverged (the data were checked finite); lower lr (was {lr}) or the "
                                         f"loss weights")
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            dist.broadcast_buffers(model)  # every rank holds rank 0's BatchNorm statistics from here
            if on_epoch_end is not None:  # before the checkpoint: its metrics and state changes are saved
                on_epoch_end(epoch, row)
            if run_dir and dist.is_main():
                extra = extra_state.state_dict() if extra_state is not None else None
                _write_epoch(run_dir, model, optimizer, schedule, order_gen, history, epoch, device, extra)
            dist.barrier()  # no rank runs ahead of the checkpoint
    return history


def remove_stale_temporaries(run_dir: str) -> None:
    """Delete the temporary files a killed write left behind (atomic_save's .tmp-*.pt)."""
    if not os.path.isdir(run_dir):
        return
    for name in os.listdir(run_dir):
        if name.startswith(".tmp-") and name.endswith(".pt"):
            try:
                os.unlink(os.path.join(run_dir, name))
            except FileNotFoundError:
                pass


def _write_epoch(run_dir, model, optimizer, schedule, order_gen, history, epoch, device, extra=None) -> None:
    os.makedirs(run_dir, exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "order_rng": order_gen.get_state(), "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
             "history": history, "epoch": epoch}
    if extra is not None:
        state["extra"] = extra
    atomic_save(state, os.path.join(run_dir, CHECKPOINT))
    with open(os.path.join(run_dir, METRICS), "w", newline="") as f:  # rewritten whole: stays consistent on resume
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(history, f, indent=1)


def train_classifier(model: nn.Module, train: TensorDataset, *, epochs: int, lr: float = 0.05,
                     batch_size: int = 64, weight_decay: float = 5e-4, attack: Attack | None = None,
                     seed: int = 0, progress: bool = True) -> nn.Module:
    """Cross-entropy training on clean images, or on ``attack``'s adversarial examples (PGD
    adversarial training with a ready-made attack). Returns the model, in train mode."""
    if attack is None:
        objective = natural_loss
    else:
        def objective(m, x, y):
            return torch.nn.functional.cross_entropy(logits_of(m(attack(x, y))), y)
    fit(model, train, objective=objective, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay,
        seed=seed, progress=progress)
    return model
