"""Data sets as (train, test) splits of images in [0, 1].

"digits" ships inside scikit-learn (1797 8x8 grey images, 10 classes) and needs no files.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset


@dataclass
class DatasetSplits:
    train: TensorDataset
    test: TensorDataset
    num_classes: int
    in_channels: int
    image_size: tuple[int, int]


def load_digits(test_fraction: float = 0.25, seed: int = 0) -> DatasetSplits:
    """scikit-learn's digits, scaled to [0, 1], as (N, 1, 8, 8) float32 images and int64 labels,
    split stratified by class with a fixed seed (the split is part of the benchmark, never tuned)."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    bunch = sk_load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, bunch.target.astype(np.int64), test_size=test_fraction, stratify=bunch.target, random_state=seed
    )

    def tensors(x, y):
        return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))

    return DatasetSplits(tensors(x_tr, y_tr), tensors(x_te, y_te), num_classes=10, in_channels=1, image_size=(8, 8))


_DATASETS = {"digits": load_digits}


def get_dataset(name: str, root: str | None = None) -> DatasetSplits:
    """Splits of a data set by name (only "digits" so far: it needs no files, so ``root`` is unused)."""
    if name not in _DATASETS:
        raise ValueError(f"unknown data set {name!r}; available: {sorted(_DATASETS)}")
    return _DATASETS[name]()


__all__ = ["DatasetSplits", "get_dataset", "load_digits"]
