"""Data-parallel training over processes (``torchrun``), one process per GPU or CPU worker.

``fit`` uses this module when a process group is initialised: the model is wrapped in
DistributedDataParallel (which starts every rank from rank 0's weights and averages gradients
across ranks in its backward hooks), every rank walks the same shuffled order and takes its own
slice of each global batch, so the update is that of one process on the whole batch. Buffers
(BatchNorm statistics) are set to rank 0's at the end of every epoch. Rank 0 alone writes
checkpoints, metrics and reports. The robust objectives' extra forward and backward passes (the
attack's gradient with respect to the input only) go through the wrapper too; they compute no
parameter gradient, so they trigger no all-reduce.
"""
from __future__ import annotations

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
