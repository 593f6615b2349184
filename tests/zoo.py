"""Plain-PyTorch look-alikes of torchvision's classification networks.

torchvision's wheel cannot be imported on the test machines, so these mirror its
ResNet-18/50, ResNeXt-50, DenseNet-121, MobileNetV2/V3, EfficientNet-B0,
ConvNeXt-Tiny, RegNetY-400MF and ShuffleNetV2 x1.0 module by module: the
same layers, in the same order, under the same attribute names (so
``state_dict()`` keys should line up with torchvision's; the parameter counts at
``num_classes=1000`` are checked against torchvision's in test_zoo.py). Only
standard ``torch.nn`` layers are used. Differences from torchvision are listed
in each factory's docstring; common to all of them: ``num_classes`` defaults to
10 (torchvision: 1000) and there are no pretrained weights.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import List, Optional, Sequence, Type, Union

import torch
import torch.nn.functional as F
from torch import nn


def _make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    """torchvision's channel rounding (from the TensorFlow MobileNet code): to a
    multiple of ``divisor``, never more than 10% below ``v``."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation: conv, BatchNorm, activation as a
    Sequential, so the submodules are named "0", "1", "2" as in torchvision."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3,
                 stride: int = 1, groups: int = 1,
                 activation_layer: Optional[Type[nn.Module]] = nn.ReLU):
        padding = (kernel_size - 1) // 2
        layers: List[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_channels)]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)


# --------------------------------------------------------------------------- ResNet

def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """ResNet V1.5: the stride sits on the 3x3 conv, as in torchvision."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, groups: int = 1,
                 base_width: int = 64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: Sequence[int],
                 num_classes: int = 10, zero_init_residual: bool = False, groups: int = 1,
                 width_per_group: int = 64):
        super().__init__()
        # ResNeXt: the bottleneck's 3x3 conv in `groups` groups of `width_per_group`.
        self.block_options = {} if block is BasicBlock else \
            {"groups": groups, "base_width": width_per_group}
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, self.inplanes, 7, 2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:  # each block then starts as the identity
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(_conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, **self.block_options)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **self.block_options) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(num_classes: int = 10, **kwargs) -> ResNet:
    """torchvision.models.resnet18: BasicBlocks in stages of [2, 2, 2, 2].

    Differences: no ``groups``/``width_per_group``/``replace_stride_with_dilation``/
    ``norm_layer`` options (torchvision's resnet18 rejects the first two anyway)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, **kwargs)


def resnet50(num_classes: int = 10, **kwargs) -> ResNet:
    """torchvision.models.resnet50 (V1.5, stride on the 3x3 conv): Bottlenecks in
    stages of [3, 4, 6, 3].

    Differences: no ``replace_stride_with_dilation`` or ``norm_layer`` options."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, **kwargs)


def resnext50_32x4d(num_classes: int = 10, **kwargs) -> ResNet:
    """torchvision.models.resnext50_32x4d: ResNet-50 whose bottleneck 3x3 convs run
    in 32 groups of 4 channels per 64 planes (grouped convs with C_in = C_out)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, groups=32, width_per_group=4, **kwargs)


# ------------------------------------------------------------------------- DenseNet

class _DenseLayer(nn.Module):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int,
                 drop_rate: float):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, 1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, prev_features: List[torch.Tensor]) -> torch.Tensor:
        concated_features = torch.cat(prev_features, 1)
        bottleneck_output = self.conv1(self.relu1(self.norm1(concated_features)))
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class _DenseBlock(nn.ModuleDict):
    def __init__(self, num_layers: int, num_input_features: int, bn_size: int,
                 growth_rate: int, drop_rate: float):
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size,
                                drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, init_features: torch.Tensor) -> torch.Tensor:
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, 1, 1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)


class DenseNet(nn.Module):
    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0.0,
                 num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv0", nn.Conv2d(3, num_init_features, 7, 2, padding=3, bias=False)),
            ("norm0", nn.BatchNorm2d(num_init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", nn.MaxPool2d(3, 2, padding=1)),
        ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, num_features, bn_size, growth_rate, drop_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                trans = _Transition(num_features, num_features // 2)
                self.features.add_module(f"transition{i + 1}", trans)
                num_features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        out = F.relu(features, inplace=True)
        out = F.adaptive_avg_pool2d(out, (1, 1))
        out = torch.flatten(out, 1)
        return self.classifier(out)


def densenet121(num_classes: int = 10, growth_rate: int = 32,
                block_config: Sequence[int] = (6, 12, 24, 16), num_init_features: int = 64,
                bn_size: int = 4, drop_rate: float = 0.0) -> DenseNet:
    """torchvision.models.densenet121: growth rate 32, dense blocks of
    (6, 12, 24, 16) layers, 64 initial features, bottleneck width 4 x growth.

    Differences: ``growth_rate``, ``block_config``, ``num_init_features``,
    ``bn_size`` and ``drop_rate`` may be overridden here (torchvision's
    densenet121 fixes the first three; its DenseNet class takes them all), to
    shrink the network for quick tests. There is no ``memory_efficient``
    (gradient checkpointing) mode, which computes the same function. As in
    torchvision, the final ReLU and pooling are functional (``F.relu``,
    ``F.adaptive_avg_pool2d``) rather than modules."""
    return DenseNet(growth_rate, block_config, num_init_features, bn_size, drop_rate,
                    num_classes)


# ---------------------------------------------------------------------- MobileNetV2

class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2 instead of {stride}")
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(inp, hidden_dim, kernel_size=1,
                                               activation_layer=nn.ReLU6))
        layers += [
            Conv2dNormActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim,
                                 activation_layer=nn.ReLU6),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10, width_mult: float = 1.0,
                 round_nearest: int = 8, dropout: float = 0.2):
        super().__init__()
        input_channel, last_channel = 32, 1280
        inverted_residual_setting = [
            # expand ratio t, channels c, repeats n, first stride s
            [1, 16, 1, 1],
            [6, 24, 2, 2],
            [6, 32, 3, 2],
            [6, 64, 4, 2],
            [6, 96, 3, 1],
            [6, 160, 3, 2],
            [6, 320, 1, 1],
        ]
        input_channel = _make_divisible(input_channel * width_mult, round_nearest)
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult), round_nearest)
        features: List[nn.Module] = [
            Conv2dNormActivation(3, input_channel, stride=2, activation_layer=nn.ReLU6)]
        for t, c, n, s in inverted_residual_setting:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel,
                                                  s if i == 0 else 1, expand_ratio=t))
                input_channel = output_channel
        features.append(Conv2dNormActivation(input_channel, self.last_channel, kernel_size=1,
                                             activation_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout),
                                        nn.Linear(self.last_channel, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(num_classes: int = 10, width_mult: float = 1.0,
                 dropout: float = 0.2) -> MobileNetV2:
    """torchvision.models.mobilenet_v2: a 3x3 stride-2 stem, 17 inverted residual
    blocks (1x1 expand, 3x3 depthwise, 1x1 linear projection; ReLU6), a 1x1 conv
    to 1280 channels, global pooling, dropout and a linear classifier.

    Differences: no ``inverted_residual_setting``, ``block`` or ``norm_layer``
    options. As in torchvision, the global pooling is functional
    (``F.adaptive_avg_pool2d``)."""
    return MobileNetV2(num_classes, width_mult, dropout=dropout)


# ------------------------------------------------------------------- EfficientNet

class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: per-channel gates from the pooled input."""

    def __init__(self, input_channels: int, squeeze_channels: int,
                 activation: Type[nn.Module] = nn.SiLU):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        scale = self.avgpool(input)
        scale = self.activation(self.fc1(scale))
        scale = self.scale_activation(self.fc2(scale))
        return scale * input


class MBConvConfig:
    def __init__(self, expand_ratio: float, kernel: int, stride: int, input_channels: int,
                 out_channels: int, num_layers: int, width_mult: float = 1.0,
                 depth_mult: float = 1.0):
        self.expand_ratio = expand_ratio
        self.kernel = kernel
        self.stride = stride
        self.input_channels = self.adjust_channels(input_channels, width_mult)
        self.out_channels = self.adjust_channels(out_channels, width_mult)
        self.num_layers = int(math.ceil(num_layers * depth_mult))

    @staticmethod
    def adjust_channels(channels: int, width_mult: float) -> int:
        return _make_divisible(channels * width_mult, 8)


class MBConv(nn.Module):
    """Stochastic depth is left out: it is the identity in eval mode, where
    outputs are compared; in training mode this block never drops its branch."""

    def __init__(self, cnf: MBConvConfig):
        super().__init__()
        if not 1 <= cnf.stride <= 2:
            raise ValueError("illegal stride value")
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        layers: List[nn.Module] = []
        expanded_channels = cnf.adjust_channels(cnf.input_channels, cnf.expand_ratio)
        if expanded_channels != cnf.input_channels:
            layers.append(Conv2dNormActivation(cnf.input_channels, expanded_channels,
                                               kernel_size=1, activation_layer=nn.SiLU))
        layers.append(Conv2dNormActivation(expanded_channels, expanded_channels,
                                           kernel_size=cnf.kernel, stride=cnf.stride,
                                           groups=expanded_channels, activation_layer=nn.SiLU))
        # torchvision sizes the squeeze from the block's input, not its expansion
        layers.append(SqueezeExcitation(expanded_channels, max(1, cnf.input_channels // 4)))
        layers.append(Conv2dNormActivation(expanded_channels, cnf.out_channels, kernel_size=1,
                                           activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = cnf.out_channels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class EfficientNet(nn.Module):
    def __init__(self, inverted_residual_setting: Sequence[MBConvConfig], dropout: float,
                 num_classes: int = 10):
        super().__init__()
        layers: List[nn.Module] = [
            Conv2dNormActivation(3, inverted_residual_setting[0].input_channels, stride=2,
                                 activation_layer=nn.SiLU)]
        for cnf in inverted_residual_setting:
            stage: List[nn.Module] = []
            for _ in range(cnf.num_layers):
                block_cnf = copy.copy(cnf)
                if stage:  # only a stage's first block changes width or resolution
                    block_cnf.input_channels = block_cnf.out_channels
                    block_cnf.stride = 1
                stage.append(MBConv(block_cnf))
            layers.append(nn.Sequential(*stage))
        lastconv_input_channels = inverted_residual_setting[-1].out_channels
        lastconv_output_channels = 4 * lastconv_input_channels
        layers.append(Conv2dNormActivation(lastconv_input_channels, lastconv_output_channels,
                                           kernel_size=1, activation_layer=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout, inplace=True),
                                        nn.Linear(lastconv_output_channels, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                init_range = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -init_range, init_range)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)


def efficientnet_b0(num_classes: int = 10, width_mult: float = 1.0,
                    depth_mult: float = 1.0, dropout: float = 0.2) -> EfficientNet:
    """torchvision.models.efficientnet_b0: a 3x3 stride-2 stem, seven stages of
    MBConv blocks (1x1 expand, kxk depthwise, squeeze-and-excitation, 1x1
    projection; SiLU), a 1x1 conv to 1280 channels, pooling, dropout, linear.

    Differences: no stochastic depth (torchvision drops residual branches with
    probability up to 0.2 in training; in eval mode it is the identity, so eval
    outputs are the same). ``width_mult`` and ``depth_mult`` are exposed
    (torchvision's b0 fixes both at 1.0; b1..b7 are these with other values,
    larger inputs and, for b5..b7, other BatchNorm settings)."""
    conf = [
        # expand ratio, kernel, stride, in, out, repeats
        (1, 3, 1, 32, 16, 1),
        (6, 3, 2, 16, 24, 2),
        (6, 5, 2, 24, 40, 2),
        (6, 3, 2, 40, 80, 3),
        (6, 5, 1, 80, 112, 3),
        (6, 5, 2, 112, 192, 4),
        (6, 3, 1, 192, 320, 1),
    ]
    setting = [MBConvConfig(*c, width_mult=width_mult, depth_mult=depth_mult) for c in conf]
    return EfficientNet(setting, dropout, num_classes)


# ---------------------------------------------------------------------- MobileNetV3

class SqueezeExcitationV3(nn.Module):
    """torchvision.ops.SqueezeExcitation as MobileNetV3 builds it: ReLU between the
    two 1x1 convolutions and a hard sigmoid gate."""

    def __init__(self, input_channels: int, squeeze_channels: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        scale = self.avgpool(input)
        scale = self.activation(self.fc1(scale))
        scale = self.scale_activation(self.fc2(scale))
        return scale * input


class InvertedResidualV3(nn.Module):
    """torchvision.models.mobilenetv3.InvertedResidual: 1x1 expand (when the
    expansion differs from the input), kxk depthwise, optional squeeze-and-excitation
    (squeezed to the expansion / 4, rounded to 8), 1x1 projection; ReLU ("RE") or
    Hardswish ("HS"); a residual add at stride 1 with equal widths.

    Differences: no dilation (torchvision's mobilenet_v3 uses it only with
    ``dilated=True``)."""

    def __init__(self, input_channels: int, kernel: int, expanded_channels: int,
                 out_channels: int, use_se: bool, activation: str, stride: int):
        super().__init__()
        if not 1 <= stride <= 2:
            raise ValueError("illegal stride value")
        self.use_res_connect = stride == 1 and input_channels == out_channels
        act = nn.Hardswish if activation == "HS" else nn.ReLU
        layers: List[nn.Module] = []
        if expanded_channels != input_channels:
            layers.append(Conv2dNormActivation(input_channels, expanded_channels, kernel_size=1,
                                               activation_layer=act))
        layers.append(Conv2dNormActivation(expanded_channels, expanded_channels,
                                           kernel_size=kernel, stride=stride,
                                           groups=expanded_channels, activation_layer=act))
        if use_se:
            layers.append(SqueezeExcitationV3(expanded_channels,
                                              _make_divisible(expanded_channels // 4, 8)))
        layers.append(Conv2dNormActivation(expanded_channels, out_channels, kernel_size=1,
                                           activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MobileNetV3(nn.Module):
    def __init__(self, setting: Sequence[tuple], last_channel: int, num_classes: int = 10,
                 dropout: float = 0.2):
        super().__init__()
        first = setting[0][0]
        layers: List[nn.Module] = [Conv2dNormActivation(3, first, stride=2,
                                                        activation_layer=nn.Hardswish)]
        layers += [InvertedResidualV3(*cnf) for cnf in setting]
        last_in = setting[-1][3]
        layers.append(Conv2dNormActivation(last_in, 6 * last_in, kernel_size=1,
                                           activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(6 * last_in, last_channel), nn.Hardswish(inplace=True),
            nn.Dropout(p=dropout, inplace=True), nn.Linear(last_channel, num_classes))

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.classifier(x)


def mobilenet_v3_small(num_classes: int = 10, dropout: float = 0.2) -> MobileNetV3:
    """torchvision.models.mobilenet_v3_small: a 3x3 stride-2 stem (Hardswish), 11
    inverted residual blocks (depthwise 3x3/5x5, hard-sigmoid squeeze-and-excitation
    in 9 of them), a 1x1 conv to 576 channels, pooling, and a classifier
    Linear(576, 1024), Hardswish, Dropout, Linear.

    Differences: no ``dilated``, ``reduced_tail`` or ``norm_layer`` options;
    BatchNorm keeps torch's default eps and momentum (torchvision: 0.001, 0.01)."""
    setting = [
        # in, kernel, expanded, out, SE, activation, stride
        (16, 3, 16, 16, True, "RE", 2),
        (16, 3, 72, 24, False, "RE", 2),
        (24, 3, 88, 24, False, "RE", 1),
        (24, 5, 96, 40, True, "HS", 2),
        (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 120, 48, True, "HS", 1),
        (48, 5, 144, 48, True, "HS", 1),
        (48, 5, 288, 96, True, "HS", 2),
        (96, 5, 576, 96, True, "HS", 1),
        (96, 5, 576, 96, True, "HS", 1),
    ]
    return MobileNetV3(setting, 1024, num_classes, dropout)


# ---------------------------------------------------------------------- ConvNeXt


class Permute(nn.Module):
    """torchvision.ops.misc.Permute: ``torch.permute(x, dims)`` as a layer."""

    def __init__(self, dims: List[int]):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class LayerNorm2d(nn.LayerNorm):
    """torchvision's LayerNorm2d: a LayerNorm over the channels of (N, C, H, W),
    run channels-last between two permutes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    def __init__(self, dim: int, layer_scale: float):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim, bias=True),
            nn.GELU(),
            nn.Linear(4 * dim, dim, bias=True),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        result = self.layer_scale * self.block(input)
        result += input
        return result


class ConvNeXt(nn.Module):
    def __init__(self, stages: Sequence[tuple], layer_scale: float, num_classes: int):
        super().__init__()
        first = stages[0][0]
        # torchvision's Conv2dNormActivation with a LayerNorm2d and no activation.
        layers: List[nn.Module] = [nn.Sequential(
            nn.Conv2d(3, first, kernel_size=4, stride=4, padding=0, bias=True),
            LayerNorm2d(first, eps=1e-6))]
        for dim, out, depth in stages:
            layers.append(nn.Sequential(*[CNBlock(dim, layer_scale) for _ in range(depth)]))
            if out is not None:
                layers.append(nn.Sequential(LayerNorm2d(dim, eps=1e-6),
                                            nn.Conv2d(dim, out, kernel_size=2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        last = stages[-1][1] or stages[-1][0]
        self.classifier = nn.Sequential(LayerNorm2d(last, eps=1e-6), nn.Flatten(1),
                                        nn.Linear(last, num_classes))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(x)


def convnext_tiny(num_classes: int = 10, layer_scale: float = 1e-6) -> ConvNeXt:
    """torchvision.models.convnext_tiny: a 4x4 stride-4 stem with a LayerNorm over
    channels, four stages of 3, 3, 9, 3 ConvNeXt blocks (depthwise 7x7, permute to
    channels-last, LayerNorm, Linear(C, 4C), GELU, Linear(4C, C), permute back,
    layer scale, residual) at 96, 192, 384, 768 channels with a LayerNorm and a
    2x2 stride-2 convolution between stages, pooling, LayerNorm, Linear.

    Differences: no stochastic depth (torchvision drops residual branches with
    probability up to 0.1 in training; the identity in eval mode); ``layer_scale``
    is exposed (torchvision fixes 1e-6 before training; tests pass a larger one,
    so the MLP's pruned channels move the output by more than rounding)."""
    stages = [(96, 192, 3), (192, 384, 3), (384, 768, 9), (768, None, 3)]
    return ConvNeXt(stages, layer_scale, num_classes)


# --------------------------------------------------------------------------- RegNet


class ResBottleneckBlock(nn.Module):
    """torchvision's RegNet block: 1x1, grouped 3x3 (maybe strided), squeeze-and-
    excitation, 1x1, added to the input (projected when the shape changes), ReLU."""

    def __init__(self, width_in: int, width_out: int, stride: int, group_width: int,
                 se_ratio: Optional[float]):
        super().__init__()
        self.proj = None
        if width_in != width_out or stride != 1:
            self.proj = Conv2dNormActivation(width_in, width_out, 1, stride,
                                             activation_layer=None)
        w_b = width_out  # bottleneck multiplier 1.0
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        layers["a"] = Conv2dNormActivation(width_in, w_b, 1)
        layers["b"] = Conv2dNormActivation(w_b, w_b, 3, stride, groups=w_b // group_width)
        if se_ratio:
            layers["se"] = SqueezeExcitation(w_b, int(round(se_ratio * width_in)), nn.ReLU)
        layers["c"] = Conv2dNormActivation(w_b, width_out, 1, activation_layer=None)
        self.f = nn.Sequential(layers)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            x = self.proj(x) + self.f(x)
        else:
            x = x + self.f(x)
        return self.activation(x)


class RegNet(nn.Module):
    def __init__(self, stages: Sequence[tuple], se_ratio: Optional[float], num_classes: int,
                 stem_width: int = 32):
        super().__init__()
        self.stem = Conv2dNormActivation(3, stem_width, 3, 2)
        blocks, width = [], stem_width
        for i, (width_out, depth, group_width) in enumerate(stages, start=1):
            stage = nn.Sequential()
            for j in range(depth):
                # torchvision's names: "block1-0", hyphen and all.
                stage.add_module(f"block{i}-{j}", ResBottleneckBlock(
                    width if j == 0 else width_out, width_out, 2 if j == 0 else 1, group_width,
                    se_ratio))
            blocks.append((f"block{i}", stage))
            width = width_out
        self.trunk_output = nn.Sequential(OrderedDict(blocks))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.trunk_output(self.stem(x))
        return self.fc(self.avgpool(x).flatten(start_dim=1))


def _regnet_stages(depth: int, w_0: int, w_a: float, w_m: float, group_width: int):
    """torchvision's BlockParams.from_init_params (bottleneck multiplier 1.0): the
    linear widths w_0 + w_a * i quantised to powers of w_m and multiples of 8, runs
    of equal width made stages, each width rounded to a multiple of its group width.
    Returns (width, depth, group width) per stage."""
    cont = torch.arange(depth) * w_a + w_0
    capacity = torch.round(torch.log(cont / w_0) / math.log(w_m))
    widths = (torch.round(torch.divide(w_0 * torch.pow(w_m, capacity), 8)) * 8).int().tolist()
    stages: List[list] = []
    for w in widths:
        if stages and stages[-1][0] == w:
            stages[-1][1] += 1
        else:
            stages.append([w, 1])
    out = []
    for w, d in stages:
        g = min(group_width, w)
        out.append((_make_divisible(w, g), d, g))
    return out


def regnet_y_400mf(num_classes: int = 10) -> RegNet:
    """torchvision.models.regnet_y_400mf: a 3x3 stride-2 stem, four stages (widths
    48, 104, 208, 440; depths 1, 3, 6, 6) of ResBottleneckBlocks with group width 8
    and squeeze-and-excitation (ratio 0.25 of the block's input width), pooling,
    linear. Layers keep torchvision's names ("trunk_output.block1.block1-0.f.b").

    Differences: none in the layers; no weight initialisation beyond torch's."""
    return RegNet(_regnet_stages(16, 48, 27.89, 2.09, 8), 0.25, num_classes)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """torchvision's ShuffleNetV2 shuffle, written as it writes it: sizes unpacked
    from ``x.size()``, a floor division, view, transpose, contiguous, view."""
    batchsize, num_channels, height, width = x.size()
    channels_per_group = num_channels // groups
    x = x.view(batchsize, groups, channels_per_group, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batchsize, num_channels, height, width)


class ShuffleUnit(nn.Module):
    """torchvision's shufflenetv2.InvertedResidual. Stride 1: split the channels,
    branch2 (1x1, depthwise 3x3, 1x1) on the second half, concatenate, shuffle.
    Stride 2: branch1 (depthwise 3x3 stride 2, 1x1) and branch2 both read the whole
    input; concatenate, shuffle."""

    def __init__(self, inp: int, oup: int, stride: int):
        super().__init__()
        self.stride = stride
        half = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, bias=False, groups=inp), nn.BatchNorm2d(inp),
                nn.Conv2d(inp, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else half, half, 1, bias=False), nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, stride, 1, bias=False, groups=half), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, repeats: Sequence[int], widths: Sequence[int], num_classes: int):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False),
                                   nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        cin = widths[0]
        for name, n, cout in zip(("stage2", "stage3", "stage4"), repeats, widths[1:]):
            units = [ShuffleUnit(cin, cout, 2)] + [ShuffleUnit(cout, cout, 1) for _ in range(n - 1)]
            setattr(self, name, nn.Sequential(*units))
            cin = cout
        self.conv5 = nn.Sequential(nn.Conv2d(cin, widths[-1], 1, bias=False),
                                   nn.BatchNorm2d(widths[-1]), nn.ReLU(inplace=True))
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        x = self.conv5(x).mean([2, 3])
        return self.fc(x)


def shufflenet_v2_x1_0(num_classes: int = 10) -> ShuffleNetV2:
    """torchvision.models.shufflenet_v2_x1_0: a 3x3 stride-2 stem and max pooling,
    three stages (4, 8, 4 units; 116, 232, 464 channels), each opening with a
    stride-2 unit, then a 1x1 convolution to 1024 channels, a global mean and a
    linear layer.

    Differences: none in the layers; no weight initialisation beyond torch's."""
    return ShuffleNetV2((4, 8, 4), (24, 116, 232, 464, 1024), num_classes)
