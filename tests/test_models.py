"""fastmdl.models: the ResNet-26 backbone."""

import pytest
import torch

import fastmdl
from fastmdl.models import resnet26


def test_resnet26_has_26_weight_layers_and_converts_into_15_groups():
    net = resnet26(num_classes=7, width=0.25)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 24 + 2  # stem, block convs, two 1x1 shortcuts
    assert len(convs) - 2 + 1 == 26  # the "26": stem + block convs + fc
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 7)
    m = fastmdl.convert(net, 2, [7, 3], input_size=(3, 16, 16))
    groups = m.mask_groups()
    assert len(groups) == 12 + 3  # each block's first conv, and one residual stream per stage
    assert sorted(len(g.members) for g in groups)[-3:] == [5, 5, 5]


def test_resnet26_rejects_bad_width():
    with pytest.raises(ValueError, match="width"):
        resnet26(width=0)
