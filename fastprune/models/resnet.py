"""ResNet-18 for 32x32 inputs (CIFAR): 3x3 stem, no max pool (He et al. 2016, as used by PwoA)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import Normalize

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, blocks=(2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        mean = CIFAR_MEAN if in_channels == 3 else (0.5,) * in_channels
        std = CIFAR_STD if in_channels == 3 else (0.5,) * in_channels
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.stem_relu = nn.ReLU()  # modules (no parameters), so the stem's and the pooled outputs
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # can be tapped by name
        layers, in_planes = [], 64
        for i, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks)):
            stage = []
            for j in range(count):
                stage.append(BasicBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)

    def hidden_outputs(self) -> list[str]:
        """Names of the modules whose outputs are the network's hidden representations, the ones
        PwoA's ResNet returns and regularises with HSIC: the stem, every residual block and the
        pooled feature (10 for ResNet-18)."""
        return ["stem_relu", *(n for n, m in self.named_modules() if isinstance(m, BasicBlock)), "pool"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, H, W) in [0, 1] -> logits (N, classes)."""
        out = self.stem_relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(self.pool(out))


def resnet18(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)
