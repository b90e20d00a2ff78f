"""VGG16 for 32x32 inputs in HYDRA's variant: conv-BN-ReLU blocks, adaptive average pooling to 2x2,
then fully connected layers 2048 -> 256 -> 256 -> classes."""
from __future__ import annotations

import torch
from torch import nn

from .common import Normalize
from .resnet import CIFAR_MEAN, CIFAR_STD

VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, layers=VGG16_LAYERS, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        mean = CIFAR_MEAN if in_channels == 3 else (0.5,) * in_channels
        std = CIFAR_STD if in_channels == 3 else (0.5,) * in_channels
        self.normalize = Normalize(mean, std)
        blocks, channels = [], in_channels
        for spec in layers:
            if spec == "M":
                blocks.append(nn.MaxPool2d(2))
            else:
                blocks += [nn.Conv2d(channels, spec, 3, padding=1, bias=False), nn.BatchNorm2d(spec), nn.ReLU(inplace=True)]
                channels = spec
        self.features = nn.Sequential(*blocks)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 4, 256), nn.ReLU(inplace=True),
            nn.Linear(256, 256), nn.ReLU(inplace=True),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, 32, 32) in [0, 1] -> logits (N, classes)."""
        return self.classifier(torch.flatten(self.avgpool(self.features(self.normalize(x))), 1))


def vgg16(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG(VGG16_LAYERS, num_classes, in_channels)
