"""convert says which convolutions the channel analysis had to keep whole, and
how much of the network that leaves unprunable."""

import warnings

import pytest
import torch
from torch import nn

import fastmdl
from fastmdl.models import resnet26


class Flipped(nn.Module):
    """conv1's channels go through a flip along the channel axis, an op the
    analysis does not follow: conv1's filters are frozen, conv2's are not."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x)).flip(1)
        x = torch.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


def test_frozen_layers_are_named_and_their_share_counted():
    with pytest.warns(UserWarning, match=r"1 of 2 convolutions keep all their filters.*"
                                         r"conv1.*They hold 42\.9%.*42\.9% cannot be pruned"):
        model = fastmdl.convert(Flipped(), 2, input_size=(3, 8, 8))
    report = model.frozen_layers()
    assert report["layers"] == [("conv1", 8 * 3 * 9)]
    # conv1 reads the image (frozen) and writes frozen channels: all 216 of its
    # weights stay; conv2's 288 are prunable through its filters.
    assert report["held"] == pytest.approx(216 / 504)
    assert report["unprunable"] == pytest.approx(216 / 504)
    assert [g.members for g in model.mask_groups()] == [("conv2",)]


def test_a_fully_understood_network_converts_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = fastmdl.convert(resnet26(num_classes=3, width=0.25), 2, input_size=(3, 16, 16))
    assert model.frozen_layers() == {"layers": [], "held": 0.0, "unprunable": 0.0}
