"""What every function that takes "data" accepts: an (images, labels) pair of tensors, a Dataset of
(image, label) items (a TensorDataset included), or a DataLoader / iterable of (images, labels)
batches. evaluate() walks it batch by batch; fit() gathers it into two tensors."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import TensorDataset


def _is_pair(data) -> bool:
    return isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


def iter_batches(data, batch_size: int, what: str = "data") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of ``data`` in order (a DataLoader keeps its own batch size)."""
    if _is_pair(data):
        images, labels = data
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{what}: {images.shape[0]} images but {labels.shape[0]} labels")
        for start in range(0, images.shape[0], batch_size):
            yield images[start:start + batch_size], labels[start:start + batch_size]
        return
    if isinstance(data, torch.utils.data.Dataset):
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    if not hasattr(data, "__iter__"):
        raise ValueError(f"{what} must be a Dataset, a DataLoader or an (images, labels) pair, got "
                         f"{type(data).__name__}")
    for batch in data:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2):
            raise ValueError(f"{what}: each batch must be (images, labels), got {type(batch).__name__}")
        yield torch.as_tensor(batch[0]), torch.as_tensor(batch[1])


def as_tensors(data, what: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """(images (M, ...), labels (M,)) of ``data``, without a copy where it already is two tensors."""
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return data.tensors
    if _is_pair(data):
        next(iter_batches(data, 1, what), None)  # the length check
        return data[0], data[1]
    batches = list(iter_batches(data, 512, what))
    if not batches:
        raise ValueError(f"{what} holds no samples")
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def length(data) -> int | None:
    """The number of samples, where ``data`` says (None for a bare iterable)."""
    if _is_pair(data):
        return data[0].shape[0]
    try:
        return len(data.dataset) if hasattr(data, "dataset") else len(data)
    except TypeError:
        return None
