"""A data set of the user's own image files, ``folder:PATH`` (torchvision's ImageFolder layout):

    PATH/train/<class name>/<image files>
    PATH/test/<class name>/<image files>      (or PATH/val/...)

Classes are the train folder's subfolders in sorted order (label 0 the first); the test split may
lack some classes but not have others. Images are read with Pillow into memory as float32 [0, 1]
(N, C, H, W): one channel if every image is greyscale, else RGB (C = 3). All images must have one
size (fastprune does not resize: the robustness radius is in pixels of that size).
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import TensorDataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def _files(split_dir: str, classes: list[str]) -> list[tuple[str, int]]:
    out = []
    for label, name in enumerate(classes):
        folder = os.path.join(split_dir, name)
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            if entry.lower().endswith(IMAGE_EXTENSIONS):
                out.append((os.path.join(folder, entry), label))
    return out


def _read(files: list[tuple[str, int]], grey: bool, size) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    images = []
    for path, _ in files:
        try:
            with Image.open(path) as img:
                array = np.asarray(img.convert("L" if grey else "RGB"), dtype=np.uint8)
        except OSError as exc:
            raise ValueError(f"data folder: cannot read image {path!r}: {exc}") from None
        if array.shape[:2] != size:
            raise ValueError(f"data folder: {path!r} is {array.shape[1]}x{array.shape[0]}, the first image "
                             f"{size[1]}x{size[0]}; all images must have one size (resize them first)")
        images.append(array[None] if grey else array.transpose(2, 0, 1))
    return np.stack(images), np.array([label for _, label in files], dtype=np.int64)


def load_folder(root: str):
    """The :class:`~fastprune.data.DatasetSplits` of an image folder (see the module docstring)."""
    from . import DatasetSplits
    from PIL import Image

    if not os.path.isdir(root):
        raise ValueError(f"data folder:{root}: no such folder")
    train_dir = os.path.join(root, "train")
    test_dir = next((os.path.join(root, s) for s in ("test", "val") if os.path.isdir(os.path.join(root, s))), None)
    if not os.path.isdir(train_dir) or test_dir is None:
        raise ValueError(f"data folder:{root}: expected {root}/train/<class>/... and {root}/test/<class>/... "
                         f"(or val/), as torchvision's ImageFolder")
    classes = sorted(e for e in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, e)))
    if len(classes) < 2:
        raise ValueError(f"data folder:{root}: {train_dir} must hold at least two class folders, found {classes}")
    extra = sorted(e for e in os.listdir(test_dir) if os.path.isdir(os.path.join(test_dir, e)) and e not in classes)
    if extra:
        raise ValueError(f"data folder:{root}: {test_dir} has classes the train split lacks: {extra[:5]}")
    train_files, test_files = _files(train_dir, classes), _files(test_dir, classes)
    for split, files in (("train", train_files), ("test", test_files)):
        if not files:
            raise ValueError(f"data folder:{root}: the {split} split holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    with Image.open(train_files[0][0]) as first:
        size = (first.height, first.width)
    modes = set()
    for path, _ in train_files + test_files:
        with Image.open(path) as img:
            modes.add(img.mode)
    grey = modes <= {"L", "1", "I", "I;16", "F"}

    def split(files):
        x, y = _read(files, grey, size)
        return TensorDataset(torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y))

    train, test = split(train_files), split(test_files)
    return DatasetSplits(train, test, num_classes=len(classes), in_channels=1 if grey else 3, image_size=size)
