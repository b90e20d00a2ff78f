from __future__ import annotations

from torch import nn

from .common import Normalize


def cnn_small(num_classes: int = 10, in_channels: int = 1) -> nn.Sequential:
    """A four-layer CNN for small images (digits 8x8, MNIST 28x28): (N, C, H, W) -> (N, classes)."""
    return nn.Sequential(
        Normalize([0.5] * in_channels, [0.5] * in_channels),
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True),
        nn.AdaptiveMaxPool2d(4),
        nn.Flatten(),
        nn.Linear(64 * 16, 128), nn.ReLU(inplace=True),
        nn.Linear(128, num_classes),
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
