from __future__ import annotations

import torch
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


class LeNet3(nn.Module):
    """PwoA's MNIST model (LeNet3 in neu-spiral/PwoA, after "Adversarial Robustness vs. Model
    Compression, or Both?"): conv 5x5 32 - ReLU - pool 2 - conv 5x5 64 - ReLU - pool 2 - fc 1024 -
    ReLU - fc. (N, C, 28, 28) raw [0, 1] inputs (no normalisation, as there) -> logits (N, classes).
    Its layer names are PwoA's (conv1, conv2, fc1, fc2), so PwoA's checkpoints' tensors fit, and its
    hidden outputs are the three ReLUs PwoA's forward returns. (PwoA's forward ends in log_softmax,
    a shift of the logits that changes no prediction, cross-entropy or softened softmax.)"""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 32, 5, 1, 2)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(32, 64, 5, 1, 2)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2, 2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(7 * 7 * 64, 1024)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(1024, num_classes)

    def hidden_outputs(self) -> list[str]:
        """PwoA's HSIC layers for LeNet3: the outputs of the three ReLUs."""
        return ["relu1", "relu2", "relu3"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[-2:]) != (28, 28):
            raise ValueError(f"lenet3 takes (N, C, 28, 28) images (PwoA's MNIST LeNet3), got {tuple(x.shape)}")
        x = self.pool(self.relu1(self.conv1(x)))
        x = self.pool(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


def _hydra_init(model: nn.Sequential) -> nn.Sequential:
    """HYDRA's initialisation of its small CNNs: conv weights N(0, 2 / (k_h k_w C_out)), conv biases 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            m.weight.data.normal_(0, (2.0 / n) ** 0.5)
            m.bias.data.zero_()
    return model


def hydra_cnn_small(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """HYDRA's small CIFAR CNN (the convex-adversarial-training "small" model): conv 4x4/2 16 - ReLU -
    conv 4x4/2 32 - ReLU - fc 100 - ReLU - fc. (N, C, 32, 32) raw [0, 1] inputs -> (N, classes). One
    nn.Sequential with HYDRA's layer indices (0, 2, 5, 7), so its state_dicts' tensors fit."""
    return _hydra_init(nn.Sequential(
        nn.Conv2d(in_channels, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 8 * 8, 100), nn.ReLU(),
        nn.Linear(100, num_classes),
    ))


def hydra_cnn_large(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """HYDRA's large CIFAR CNN: conv 3x3 32 - conv 4x4/2 32 - conv 3x3 64 - conv 4x4/2 64 (each with
    ReLU) - fc 512 - ReLU - fc 512 - ReLU - fc. (N, C, 32, 32) raw [0, 1] inputs -> (N, classes);
    HYDRA's layer indices (0, 2, 4, 6, 9, 11, 13)."""
    return _hydra_init(nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=1, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 4, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 512), nn.ReLU(),
        nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, num_classes),
    ))
