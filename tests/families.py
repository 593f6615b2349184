"""Small look-alikes of the block patterns of torchvision's classification families
(torchvision does not import on the CPU build of torch): each network is a stem,
two blocks of one pattern and a classifier, at 32x32.

- ``inverted_se``: MobileNetV3 / EfficientNet, an inverted residual whose
  depthwise convolution is gated by squeeze-and-excitation (Hardsigmoid);
- ``grouped_bottleneck``: ResNeXt / RegNet, a bottleneck with a grouped 3x3;
- ``shuffle_unit``: ShuffleNetV2, split, one branch, concatenate, shuffle;
- ``fire``: SqueezeNet, squeeze and two expands, and a convolution as classifier;
- ``convnext_block``: ConvNeXt, depthwise 7x7, LayerNorm over channels-last,
  Linear MLP, layer scale, permutes;
- ``dense_block``: DenseNet, each layer's output concatenated to its input;
- ``inception``: GoogLeNet / Inception, four branches concatenated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _cbr(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1,
         act: type = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), act())


class _Net(nn.Module):
    """stem -> blocks -> global average pool -> flatten -> linear."""

    def __init__(self, blocks: nn.Module, stem_out: int, features: int, num_classes: int):
        super().__init__()
        self.stem = _cbr(3, stem_out, 3, 2)
        self.blocks = blocks
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class InvertedSE(nn.Module):
    def __init__(self, c: int, expand: int):
        super().__init__()
        hidden = c * expand
        self.expand = _cbr(c, hidden, act=nn.Hardswish)
        self.dw = _cbr(hidden, hidden, 3, groups=hidden, act=nn.Hardswish)
        self.se = SqueezeExcite(hidden, max(8, hidden // 4))
        self.project = nn.Sequential(nn.Conv2d(hidden, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.se(self.dw(self.expand(x))))


def inverted_se(num_classes: int = 10) -> nn.Module:
    return _Net(nn.Sequential(InvertedSE(16, 4), InvertedSE(16, 4)), 16, 16, num_classes)


class GroupedBottleneck(nn.Module):
    def __init__(self, c: int, width: int, groups: int):
        super().__init__()
        self.reduce = _cbr(c, width)
        self.grouped = _cbr(width, width, 3, groups=groups)
        self.restore = nn.Sequential(nn.Conv2d(width, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.relu(x + self.restore(self.grouped(self.reduce(x))))


def grouped_bottleneck(num_classes: int = 10) -> nn.Module:
    blocks = nn.Sequential(GroupedBottleneck(32, 32, 4), GroupedBottleneck(32, 32, 4))
    return _Net(blocks, 32, 32, num_classes)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        half = c // 2
        self.branch = nn.Sequential(
            _cbr(half, half), nn.Conv2d(half, half, 3, 1, 1, groups=half, bias=False),
            nn.BatchNorm2d(half), _cbr(half, half))

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([a, self.branch(b)], 1), 2)


def shuffle_unit(num_classes: int = 10) -> nn.Module:
    return _Net(nn.Sequential(ShuffleUnit(32), ShuffleUnit(32)), 32, 32, num_classes)


class Fire(nn.Module):
    def __init__(self, cin: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Sequential(nn.Conv2d(cin, squeeze, 1), nn.ReLU())
        self.e1 = nn.Sequential(nn.Conv2d(squeeze, expand, 1), nn.ReLU())
        self.e3 = nn.Sequential(nn.Conv2d(squeeze, expand, 3, padding=1), nn.ReLU())

    def forward(self, x):
        s = self.squeeze(x)
        return torch.cat([self.e1(s), self.e3(s)], 1)


class SqueezeNetLike(nn.Module):
    """Its classifier is a 1x1 convolution, ReLU and global pooling: no nn.Linear."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(),
                                      Fire(32, 8, 16), Fire(32, 8, 16))
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(32, num_classes, 1),
                                        nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x):
        return torch.flatten(self.classifier(self.features(x)), 1)


def fire(num_classes: int = 10) -> nn.Module:
    return SqueezeNetLike(num_classes)


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int, scale: float = 0.5):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.fc1 = nn.Linear(c, 4 * c)
        self.fc2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), scale))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 4, 4)
        self.blocks = nn.Sequential(ConvNeXtBlock(32), ConvNeXtBlock(32))
        self.norm = nn.LayerNorm(32, eps=1e-6)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(self.norm(x.mean((2, 3))))


def convnext_block(num_classes: int = 10) -> nn.Module:
    return ConvNeXtLike(num_classes)


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, 2 * growth, 1),
                                  nn.BatchNorm2d(2 * growth), nn.ReLU(),
                                  nn.Conv2d(2 * growth, growth, 3, padding=1))

    def forward(self, x):
        return torch.cat([x, self.body(x)], 1)


def dense_block(num_classes: int = 10) -> nn.Module:
    blocks = nn.Sequential(DenseLayer(16, 8), DenseLayer(24, 8), DenseLayer(32, 8),
                           nn.BatchNorm2d(40), nn.ReLU())
    return _Net(blocks, 16, 40, num_classes)


class Inception(nn.Module):
    def __init__(self, cin: int, b1: int, b3: int, b5: int, bp: int):
        super().__init__()
        self.b1 = _cbr(cin, b1)
        self.b3 = nn.Sequential(_cbr(cin, b3 // 2), _cbr(b3 // 2, b3, 3))
        self.b5 = nn.Sequential(_cbr(cin, b5 // 2), _cbr(b5 // 2, b5, 5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), _cbr(cin, bp))

    def forward(self, x):
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)


def inception(num_classes: int = 10) -> nn.Module:
    blocks = nn.Sequential(Inception(16, 8, 16, 8, 8), Inception(40, 16, 16, 8, 8))
    return _Net(blocks, 16, 48, num_classes)


FAMILIES = ("inverted_se", "grouped_bottleneck", "shuffle_unit", "fire", "convnext_block",
            "dense_block", "inception")
