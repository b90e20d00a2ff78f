"""Data-parallel training over processes (``torchrun``), one process per GPU or CPU worker.

``fit`` uses this module when a process group is initialised: the model is wrapped in
DistributedDataParallel (which starts every rank from rank 0's weights and averages gradients
across ranks in its backward hooks), every rank walks the same shuffled order and takes its own
slice of each global batch, so the update is that of one process on the whole batch. BatchNorm in
training mode normalises with the global batch's statistics (``synced_batchnorm``, fit's
``sync_bn``, on by default; otherwise each rank would use its own slice's), and buffers are set to
rank 0's at the end of every epoch. Rank 0 alone writes
checkpoints, metrics and reports. The robust objectives' extra forward and backward passes (the
attack's gradient with respect to the input only) go through the wrapper too; they compute no
parameter gradient, so they trigger no all-reduce.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str | None = None) -> torch.device | None:
    """Join the process group that ``torchrun`` describes in the environment (WORLD_SIZE > 1):
    NCCL on GPUs, gloo on CPUs. Returns this rank's device, or None when not launched that way."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return torch.device("cuda", local) if use_cuda else torch.device("cpu")


def local_slice(index: torch.Tensor) -> torch.Tensor:
    """This rank's share of a global batch's indices (every world_size-th, starting at the rank)."""
    return index[rank()::world_size()] if is_distributed() else index


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel when running distributed (on its parameters' device),
    else ``model`` itself."""
    if not is_distributed():
        return model
    device = next(model.parameters()).device
    # broadcast_buffers=False: DDP would broadcast every buffer on every forward pass, and the
    # attacks run ten or more per step; fit() syncs buffers to rank 0's once per epoch instead.
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                               broadcast_buffers=False)


class _SyncedBatchNorm:
    """BatchNorm whose training-mode statistics are those of the global batch, all ranks together
    (the forward of a BatchNorm1d/2d/3d, swapped in by :func:`synced_batchnorm`). Mean and variance
    come from two differentiable all-reduces (sum, then sum of squared deviations), so gradients
    flow across ranks as in one process on the whole batch; running statistics update with the
    global unbiased variance, as nn.BatchNorm would. Works with gloo on the CPU and NCCL on GPUs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.tensor(float(x.numel() // x.shape[1]), dtype=torch.float64, device=x.device)
        dist.all_reduce(count)
        mean = all_reduce(x.float().sum(dims)) / count.float()
        var = all_reduce((x.float() - mean.view(shape)).square().sum(dims)) / count.float()
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (count / (count - 1).clamp_min(1)).float()
                self.running_mean.mul_(1 - m).add_(mean.to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        y = (x.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


_SYNCED = {cls: type(f"Synced{cls.__name__}", (_SyncedBatchNorm, cls), {})
           for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)}


@contextlib.contextmanager
def synced_batchnorm(model: nn.Module, enabled: bool = True):
    """Inside the block, every BatchNorm of ``model`` normalises with the global batch's statistics
    when running distributed (see _SyncedBatchNorm); the modules' classes are restored after, so
    the model (and its state_dict) is unchanged for single-process use."""
    swapped = []
    if enabled and is_distributed():
        for module in model.modules():
            if type(module) in _SYNCED:
                swapped.append((module, type(module)))
                module.__class__ = _SYNCED[type(module)]
    try:
        yield bool(swapped)
    finally:
        for module, cls in swapped:
            module.__class__ = cls


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank."""
    if is_distributed():
        for b in model.buffers():
            dist.broadcast(b.data, src=0)


def sum_across_ranks(value: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        value = value.clone()
        dist.all_reduce(value)
    return value


def barrier() -> None:
    if is_distributed():
        dist.barrier()
