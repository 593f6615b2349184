"""Small plain-PyTorch models the tests convert: written like torchvision's, with
forward(x) methods that know nothing of domains."""

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    """Stem, three stages of basic blocks (the second and third downsample), head."""

    def __init__(self, widths=(8, 12, 16), num_classes=5, in_channels=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(widths[0], widths[0]))
        self.layer2 = nn.Sequential(BasicBlock(widths[0], widths[1], 2),
                                    BasicBlock(widths[1], widths[1]))
        self.layer3 = nn.Sequential(BasicBlock(widths[1], widths[2], 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class TinyVGG(nn.Module):
    """Plain conv/BN/ReLU stack with max pooling, a flatten of a 2x2 map and two
    linear layers (the first is pruned along its inputs, the second is the head)."""

    def __init__(self, num_classes=4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(10, 14, 3, padding=1), nn.BatchNorm2d(14), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(14, 9, 3, padding=1, dilation=1), nn.ReLU())
        self.classifier = nn.Sequential(nn.Linear(9 * 2 * 2, 20), nn.ReLU(), nn.Dropout(0.1),
                                        nn.Linear(20, num_classes))

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


class CatNet(nn.Module):
    """Two branches concatenated on channels, then a 1x1 conv with a bias and no BN,
    a functional ReLU, and a mean over pixels."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(6)
        self.b = nn.Conv2d(3, 5, 3, stride=1, padding=2, dilation=2)
        self.bn_b = nn.BatchNorm2d(5)
        self.mix = nn.Conv2d(11, 7, 1)
        self.bn_cat = nn.BatchNorm2d(11)
        self.head = nn.Linear(7, num_classes)

    def forward(self, x):
        y = torch.cat([F.relu(self.bn_a(self.a(x))), F.relu(self.bn_b(self.b(x)))], dim=1)
        y = F.relu(self.mix(self.bn_cat(y)))
        return self.head(y.mean(dim=(2, 3)))


class SEBlockNet(nn.Module):
    """A stem and one residual block with squeeze-and-excitation (global pooling,
    1x1 conv, ReLU, 1x1 conv, sigmoid, channel-wise multiply) before the add."""

    def __init__(self, width=10, num_classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.squeeze = nn.Conv2d(width, 4, 1)
        self.excite = nn.Conv2d(4, width, 1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        s = F.adaptive_avg_pool2d(y, 1)
        s = torch.sigmoid(self.excite(F.relu(self.squeeze(s))))
        y = F.relu(y * s + x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class OddNet(nn.Module):
    """What the compact layout must take in its stride: a grouped conv, reflect
    padding, dilation and stride 2, an op outside the channel analysis (a roll of
    the channels), a per-sample op that does not keep zeros (adding 0.5), and a
    flatten of a 2x2 map through ``view``."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect", bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2)
        self.b = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.bn_b = nn.BatchNorm2d(12)
        self.c = nn.Conv2d(12, 6, 1, stride=2)
        self.head = nn.Linear(6 * 2 * 2, num_classes)

    def forward(self, x):
        x = F.relu(self.bn_a(self.a(x)))
        x = self.grouped(x)
        x = torch.roll(x, 1, dims=1)
        x = F.relu(self.bn_b(self.b(x))) + 0.5
        x = self.c(x)
        return self.head(x.view(x.size(0), -1))


class ScaledNet(nn.Module):
    """Residual blocks with a learnt per-channel layer scale (ConvNeXt's): after a
    BatchNorm (shape (C, 1, 1)), after a bias (a (C,) vector viewed as (1, C, 1, 1)),
    and after a ReLU (which a scale cannot move past)."""

    def __init__(self, c=8, num_classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU())
        self.a1 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, padding=1, bias=False),
                                nn.BatchNorm2d(2 * c), nn.ReLU())
        self.a2 = nn.Sequential(nn.Conv2d(2 * c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.scale_a = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.b = nn.Conv2d(c, c, 1)
        self.scale_b = nn.Parameter(torch.rand(c) - 0.5)
        self.c = nn.Conv2d(c, c, 1)
        self.scale_c = nn.Parameter(torch.rand(c, 1, 1) - 0.5)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.scale_a * self.a2(self.a1(x))
        x = x + self.b(x) * self.scale_b.view(1, -1, 1, 1)
        x = x + F.relu(self.c(x)) * self.scale_c
        return self.fc(x.mean((2, 3)))
