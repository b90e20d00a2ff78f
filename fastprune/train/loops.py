"""The training loop: SGD with momentum 0.9 and a cosine learning rate (as in HYDRA and PwoA's CIFAR
runs) or Adam and step schedules (PwoA's MNIST runs), any objective, keeping the last epoch or the
one with the best robust accuracy (both papers' scripts), an optional run directory with per-epoch
atomic checkpoints, metrics and resume."""
from __future__ import annotations

import csv
import json
import math
import os
import time
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..attacks.base import Attack
from ..utils.checks import check_count, check_positive, eval_mode
from ..attacks.losses import logits_of
from . import distributed as dist
from ..utils.checks import check_images_labels
from ..data.batches import as_tensors
from ..utils.io import atomic_save, safe_load
from .objectives import natural_loss

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "multistep", "cyclic", "constant")
KEEP = ("last", "best_robust")


def lr_factor(schedule: str, step: int, steps_per_epoch: int, total_steps: int, milestones=(), gamma: float = 0.1,
              cycle_epochs: int = 3) -> float:
    """The learning rate at optimiser step ``step`` as a fraction of the initial one.

    cosine: 0.5 (1 + cos(pi step / total)), per step. multistep: ``gamma`` per epoch milestone
    passed. cyclic: restarts every ``cycle_epochs`` epochs and falls tenfold every third of a cycle
    (PwoA's ADMM stage: 0.01, 0.001, 0.0001 over each 3-epoch ADMM period). constant: 1.
    """
    epoch = step // steps_per_epoch
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    if schedule == "multistep":
        return gamma ** sum(epoch >= m for m in milestones)
    if schedule == "cyclic":
        return 0.1 ** int((epoch % cycle_epochs) // (cycle_epochs / 3))
    return 1.0


def fit(model: nn.Module, train, *, objective: Callable = natural_loss, epochs: int, lr: float = 0.1,
        batch_size: int = 128, weight_decay: float = 1e-4, params: Iterable[nn.Parameter] | None = None,
        run_dir: str | None = None, seed: int = 0, progress: bool = True,
        on_epoch_end: Callable[[int, dict], None] | None = None, augment: Callable | None = None,
        amp: bool = False, channels_last: bool = False, extra_state=None, sync_bn: bool = True,
        optimizer: str = "sgd", schedule: str = "cosine", milestones: tuple[int, ...] = (), gamma: float = 0.1,
        cycle_epochs: int = 3, keep: str | None = None, val=None, val_attack: Callable | None = None) -> list[dict]:
    """Train ``model`` on ``train`` (images (M, ...) in [0, 1], labels (M,), moved to the model's device):
    a TensorDataset, an (images, labels) pair, a Dataset or a DataLoader (fastprune.data.batches).

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
    optimizer: "sgd" (momentum 0.9) or "adam"; weight_decay applies to either. schedule: "cosine"
    (per step, to zero), "multistep" (times ``gamma`` at each epoch in ``milestones``), "cyclic"
    (lr, lr/10, lr/100 over each ``cycle_epochs`` epochs, repeating) or "constant" (see
    :func:`lr_factor`).
    keep: "last" epoch, or "best_robust" (the default when ``val`` is given, else "last"): after every
    epoch the model is attacked on ``val``
    ((images, labels) tensors) with ``val_attack(model) -> Attack`` (default PGD-10 at the
    objective's eps, step eps/4), the accuracy goes into the metrics ("val_robust"), and the model
    ends with the weights of the best epoch (the first of equals), as HYDRA's and PwoA's scripts
    keep model_best; the best weights are in every checkpoint, so resuming keeps them.
    Under ``torchrun`` (a process group initialised; see fastprune.train.distributed) each rank
    trains on its share of every batch, gradients are averaged across ranks, and rank 0 writes the
    run directory; the result matches one process on the whole batch up to float rounding.
    Returns the per-epoch metrics.
    """
    check_count("epochs", epochs)
    check_positive("lr", lr, allow_zero=False)
    check_count("batch_size", batch_size)
    device = next(model.parameters()).device
    images, labels = (t.to(device) for t in as_tensors(train, "train"))
    if labels.dtype in (torch.int8, torch.int16, torch.int32, torch.uint8):
        labels = labels.long()  # class indices of any integer type (cross-entropy takes int64)
    if images.shape[0] == 0:
        raise ValueError("train holds no samples")
    # Bad data stops here, with its own message, rather than as a "diverged" loss later.
    check_images_labels(images, labels, model=model, what="train images")
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not params:
        raise ValueError("params: nothing to train (no parameter requires grad)")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "multistep" and (not milestones or any(isinstance(m, bool) or not isinstance(m, int) or m < 1
                                                          for m in milestones)):
        raise ValueError(f"milestones must be epochs >= 1 for schedule='multistep', got {milestones!r}")
    check_positive("gamma", gamma, allow_zero=False)
    check_count("cycle_epochs", cycle_epochs)
    val_check = _validation(keep, val, val_attack, objective, model, device)
    # From here ``optimizer`` and ``schedule`` are the objects the names chose.
    optimizer = (torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay) if optimizer == "sgd" else
                 torch.optim.Adam(params, lr=lr, weight_decay=weight_decay))
    steps_per_epoch = -(-images.shape[0] // batch_size)
    total_steps = epochs * steps_per_epoch
    if schedule == "cosine":  # PyTorch's own (its recursive form; the runs before the other schedules)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    else:
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step, name=schedule: lr_factor(name, step, steps_per_epoch, total_steps, milestones,
                                                              gamma, cycle_epochs))
    best = None  # (robust accuracy, epoch, state_dict on the CPU) with keep="best_robust"
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
        best = state.get("best")
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
            if val_check is not None:
                row["val_robust"] = val_check(trained)
                if best is None or row["val_robust"] > best[0]:
                    best = (row["val_robust"], epoch, {k: v.detach().to("cpu", copy=True)
                                                       for k, v in model.state_dict().items()})
            history.append(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            dist.broadcast_buffers(model)  # every rank holds rank 0's BatchNorm statistics from here
            if on_epoch_end is not None:  # before the checkpoint: its metrics and state changes are saved
                on_epoch_end(epoch, row)
            if run_dir and dist.is_main():
                extra = extra_state.state_dict() if extra_state is not None else None
                _write_epoch(run_dir, model, optimizer, schedule, order_gen, history, epoch, device, extra, best)
            dist.barrier()  # no rank runs ahead of the checkpoint
    if best is not None:
        model.load_state_dict(best[2])
    if history and dist.is_main():
        warn_if_chance(model, images, labels)
    return history


def warn_if_chance(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, sample: int = 512) -> float:
    """Clean accuracy on (up to ``sample``) training images; warns when it is no better than always
    answering the most common class (a schedule too short for real data, a learning rate off by
    orders: the run would otherwise end silently with a useless model)."""
    import warnings

    spread = torch.linspace(0, images.shape[0] - 1, min(sample, images.shape[0])).long()  # sorted data too
    x, y = images[spread.to(images.device)], labels[spread.to(labels.device)]
    device = next((p.device for p in model.parameters()), x.device)
    with torch.no_grad(), eval_mode(model):
        predicted = torch.cat([logits_of(model(x[s:s + 128].to(device))).argmax(1).cpu()
                               for s in range(0, x.shape[0], 128)])
    y = y.cpu()
    accuracy = (predicted == y).float().mean().item()
    majority = y.bincount().max().item() / y.numel()
    if accuracy <= majority + 0.02:
        warnings.warn(f"training ended at chance level: {accuracy:.1%} accuracy on {y.numel()} training images "
                      f"(always answering the most common class gives {majority:.1%}); train longer or change the "
                      f"learning rate", stacklevel=3)
    return accuracy


def _validation(keep: str, val, val_attack, objective, model, device):
    """keep="best_robust": a function trained_model -> robust accuracy on ``val``; else None."""
    if keep is None:
        keep = "best_robust" if val is not None else "last"
    if keep not in KEEP:
        raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
    if keep == "last":
        return None
    if not (isinstance(val, (tuple, list)) and len(val) == 2 and all(isinstance(t, torch.Tensor) for t in val)):
        raise ValueError("keep='best_robust' needs val=(images, labels) tensors: the robust accuracy decides")
    images, labels = (t.to(device) for t in val)
    check_images_labels(images, labels, model=model, what="val images")
    if val_attack is None:
        eps = getattr(objective, "eps", None)
        if eps is None:
            raise ValueError("keep='best_robust' with an objective that has no eps needs val_attack(model) -> attack")
        from ..attacks.pgd import PGD

        def val_attack(m):
            return PGD(m, eps=eps, alpha=eps / 4, steps=10, seed=0)

    def robust_accuracy(trained: nn.Module) -> float:
        model_ = trained.module if hasattr(trained, "module") else trained
        attack = val_attack(model_)
        correct = 0
        for start in range(0, images.shape[0], 256):
            x, y = images[start:start + 256], labels[start:start + 256]
            x_adv = attack(x, y)
            with torch.no_grad(), eval_mode(model_):
                correct += int((logits_of(model_(x_adv)).argmax(1) == y).sum())
        return correct / images.shape[0]

    return robust_accuracy


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


def _write_epoch(run_dir, model, optimizer, schedule, order_gen, history, epoch, device, extra=None,
                 best=None) -> None:
    os.makedirs(run_dir, exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
             "order_rng": order_gen.get_state(), "torch_rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
             "history": history, "epoch": epoch}
    if extra is not None:
        state["extra"] = extra
    if best is not None:
        state["best"] = best
    atomic_save(state, os.path.join(run_dir, CHECKPOINT))
    with open(os.path.join(run_dir, METRICS), "w", newline="") as f:  # rewritten whole: stays consistent on resume
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(history, f, indent=1)


def train_classifier(model: nn.Module, train, *, epochs: int, lr: float = 0.05,
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
