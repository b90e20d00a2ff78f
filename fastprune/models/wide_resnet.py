"""Wide ResNets for 32x32 inputs (Zagoruyko and Komodakis 2016): pre-activation basic blocks,
depth 6n + 4, widths 16k, 32k, 64k. WRN-28-4 is HYDRA's, WRN-34-10 PwoA's and TRADES'."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import Normalize
from .resnet import CIFAR_MEAN, CIFAR_STD


class WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + skip


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen: int = 4, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        mean = CIFAR_MEAN if in_channels == 3 else (0.5,) * in_channels
        std = CIFAR_STD if in_channels == 3 else (0.5,) * in_channels
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        stages, in_planes = [], widths[0]
        for i, planes in enumerate(widths[1:]):
            blocks = []
            for j in range(n):
                blocks.append(WideBlock(in_planes, planes, stride=2 if (i > 0 and j == 0) else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())  # a module: tappable by name
        self.linear = nn.Linear(in_planes, num_classes)

    def hidden_outputs(self) -> list[str]:
        """Names of the modules whose outputs are the network's hidden representations, the ones
        PwoA's WideResNet returns and regularises with HSIC: conv1, every block and the pooled
        feature (17 for WRN-34-10)."""
        return ["conv1", *(n for n, m in self.named_modules() if isinstance(m, WideBlock)), "pool"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, C, 32, 32) in [0, 1] -> logits (N, classes)."""
        out = self.block3(self.block2(self.block1(self.conv1(self.normalize(x)))))
        out = F.relu(self.bn(out))
        return self.linear(self.pool(out))
