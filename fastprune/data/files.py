"""Readers of the standard local files of MNIST, CIFAR-10/100 and SVHN (the layouts torchvision
downloads into ``root``), returning uint8 images (N, C, H, W) and int64 labels. Nothing is ever
downloaded: a missing file is an error that names the files and where to put them.

The files are parsed directly rather than through torchvision's dataset classes, which verify MD5
sums of the official archives (so small test files in the same formats could not be used).
"""
from __future__ import annotations

import gzip
import os
import pickle
from typing import Callable

import numpy as np

SOURCES = {
    "mnist": "https://yann.lecun.com/exdb/mnist/ (or torchvision.datasets.MNIST(root, download=True) elsewhere)",
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extracted",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, extracted",
    "svhn": "http://ufldl.stanford.edu/housenumbers/ (train_32x32.mat, test_32x32.mat)",
}


def _require(name: str, root: str, paths: list[str]) -> None:
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(
            f"{name}: missing {', '.join(os.path.relpath(p, root) for p in missing)} under {root!r}. "
            f"Put the standard files there ({SOURCES[name]}); fastprune never downloads."
        )


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def read_idx(path: str) -> np.ndarray:
    """An IDX file (MNIST's format): magic (0, 0, dtype 0x08, ndim), big-endian sizes, uint8 data."""
    with _open(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path!r} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path!r}: header says {shape}, file holds {array.size} values")
    return array.reshape(shape).copy()  # writable: torch.from_numpy needs it


def _first_existing(candidates: list[str]) -> str:
    return next((p for p in candidates if os.path.exists(p)), candidates[0])


def load_mnist(root: str, train: bool):
    folder = os.path.join(root, "MNIST", "raw")
    stem = "train" if train else "t10k"
    paths = [_first_existing([os.path.join(folder, f"{stem}-{kind}"), os.path.join(folder, f"{stem}-{kind}.gz")])
             for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    _require("mnist", root, paths)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"mnist: images {images.shape} and labels {labels.shape} do not match")
    return images[:, None], labels.astype(np.int64)


class _ArraysOnly(pickle.Unpickler):
    """Unpickles the CIFAR batch files' contents (dicts, lists, bytes, str, numbers and numpy
    arrays) and refuses every other global, so a planted file cannot run code."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a data file")


def _read_cifar_batch(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="bytes").load()
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{path!r} is not a CIFAR batch file (refused: {exc})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"{path!r} is not a readable CIFAR batch file (truncated or corrupt?): {exc}") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path!r} is not a CIFAR batch file (it holds a {type(batch).__name__}, not a dict)")
    return batch


def _load_cifar(root: str, train: bool, folder: str, files: list[str], label_key: bytes, name: str):
    paths = [os.path.join(root, folder, f) for f in files]
    _require(name, root, paths)
    images, labels = [], []
    for path in paths:
        batch = _read_cifar_batch(path)
        if b"data" not in batch or label_key not in batch:
            raise ValueError(f"{path!r} lacks {b'data'!r} or {label_key!r}: not a {name} batch file")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def load_cifar10(root: str, train: bool):
    files = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    return _load_cifar(root, train, "cifar-10-batches-py", files, b"labels", "cifar10")


def load_cifar100(root: str, train: bool):
    return _load_cifar(root, train, "cifar-100-python", ["train" if train else "test"], b"fine_labels", "cifar100")


def load_svhn(root: str, train: bool):
    from scipy.io import loadmat

    path = os.path.join(root, "train_32x32.mat" if train else "test_32x32.mat")
    _require("svhn", root, [path])
    mat = loadmat(path)
    images = np.transpose(mat["X"], (3, 2, 0, 1)).astype(np.uint8)  # (H, W, C, N) -> (N, C, H, W)
    labels = mat["y"].astype(np.int64).reshape(-1)
    labels[labels == 10] = 0  # SVHN stores the digit 0 as class 10
    return images, labels


LOADERS: dict[str, tuple[Callable, int]] = {
    "mnist": (load_mnist, 10),
    "cifar10": (load_cifar10, 10),
    "cifar100": (load_cifar100, 100),
    "svhn": (load_svhn, 10),
}
