from __future__ import annotations

from torch import nn

from .common import Normalize


def cnn_small(num_classes: int = 10, in_channels: int = 1, width: int = 32) -> nn.Sequential:
    """A four-layer CNN for small images (digits 8x8, MNIST 28x28): (N, C, H, W) -> (N, classes).
    Convolutions of ``width`` and 2 ``width`` channels, a hidden layer of 4 ``width`` units
    ("cnn-small": width 32; "cnn-wide": width 64, which keeps enough weights to learn at 99% sparsity)."""
    return nn.Sequential(
        Normalize([0.5] * in_channels, [0.5] * in_channels),
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveMaxPool2d(4),
        nn.Flatten(),
        nn.Linear(2 * width * 16, 4 * width), nn.ReLU(inplace=True),
        nn.Linear(4 * width, num_classes),
    )


def lenet(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """The LeNet-style MNIST network of adversarial-robustness work (two 5x5 conv + pool stages,
    a 1024-unit hidden layer): (N, C, 28, 28) -> (N, classes). Other input sizes are pooled to the
    7x7 grid that 28x28 inputs produce."""
    return nn.Sequential(
        Normalize([0.5] * in_channels, [0.5] * in_channels),
        nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(7),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 1024), nn.ReLU(inplace=True),
        nn.Linear(1024, num_classes),
    )
