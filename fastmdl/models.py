"""Backbones written as plain PyTorch (their ``forward(x)`` knows nothing of
domains; :func:`fastmdl.convert` makes them multi-domain)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv/BN layers and a residual add; a 1x1 conv/BN shortcut where the
    shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A stem conv, stages of basic blocks (every stage after the first halves the
    resolution), global average pooling and a linear classifier."""

    def __init__(self, widths: Sequence[int], blocks: Sequence[int], num_classes: int,
                 in_channels: int = 3):
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"widths and blocks must list one entry per stage, got "
                             f"{list(widths)} and {list(blocks)}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            layers = [BasicBlock(cin, w, 1 if i == 0 else 2)]
            layers += [BasicBlock(w, w) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet26(num_classes: int = 10, width: float = 1.0, in_channels: int = 3) -> ResNet:
    """The ResNet-26 of the Visual Decathlon papers: a 3x3 stem and three stages of
    four basic blocks with 64, 128 and 256 filters (times ``width``); 1 + 24 convs + fc.
    Any input size works (global pooling); the papers use 64x64."""
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    widths = [max(1, round(c * width)) for c in (64, 128, 256)]
    return ResNet(widths, [4, 4, 4], num_classes, in_channels)
