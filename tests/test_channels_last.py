"""Channels-last blocks run channels-first (fastmdl/channels_last.py): the rewrite
computes the same function, prunes the MLP's hidden channels, and refuses what it
cannot follow."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmdl
import zoo
from fastmdl import channels_last
from fastmdl.channels_last import ChannelLayerNorm
from fastmdl.convert import _traced
from layouts import check_every_layout, per_domain_statistics
from pruned_model import set_masks

SIZE = 16


class MethodBlock(nn.Module):
    """A ConvNeXt block written with method permutes, a (C,) layer scale inside the
    channels-last region, and a bias-free second linear layer."""

    def __init__(self, c: int = 12):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.fc1 = nn.Linear(c, 4 * c)
        self.fc2 = nn.Linear(4 * c, c, bias=False)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y))))
        x = x + (self.gamma * y).permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class Functional(nn.Module):
    """torchvision's LayerNorm2d pattern: F.layer_norm on a LayerNorm's own tensors
    between two permutes, then a conv."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.ln = zoo.LayerNorm2d(c, eps=1e-6)
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        return self.head(self.conv(self.ln(self.stem(x))).mean((2, 3)))


class SharedActivation(nn.Module):
    """One GELU module used inside the channels-last MLP and again outside it."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.act = nn.GELU()
        self.fc1 = nn.Linear(c, 2 * c)
        self.fc2 = nn.Linear(2 * c, c)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.act(self.stem(x))
        y = self.fc2(self.act(self.fc1(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        return self.head((x + y).mean((2, 3)))


def _rewritten(net: nn.Module, size: int = SIZE):
    gm = _traced(net, torch.randn(1, 3, size, size), (3, size, size))
    return gm, channels_last.to_channels_first(gm, net)


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


@pytest.mark.parametrize("make", [MethodBlock, Functional, SharedActivation,
                                  lambda: zoo.convnext_tiny(10, layer_scale=0.5)],
                         ids=["method-permutes", "layer-norm-2d", "shared-activation",
                              "convnext-tiny"])
def test_the_rewrite_computes_the_same_function(make):
    torch.manual_seed(0)
    net = make().eval()
    x = torch.randn(3, 3, SIZE * 2, SIZE * 2)
    with torch.no_grad():
        want = net(x)
    gm, done = _rewritten(net, SIZE * 2)
    assert done >= 1
    assert "permute" not in _ops(gm) and torch.permute not in _ops(gm)
    assert not any(isinstance(m, nn.Linear) for n, m in gm.named_modules()
                   if not n.startswith(("head", "classifier")))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), want, rtol=1e-5, atol=1e-5)
        # channels_last inputs take the same path (movedim keeps C contiguous)
        torch.testing.assert_close(gm(x.contiguous(memory_format=torch.channels_last)),
                                   want, rtol=1e-5, atol=1e-5)


class _Refused(nn.Module):
    def __init__(self, how: str, c: int = 8):
        super().__init__()
        self.how = how
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.fc = nn.Linear(c, c)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        y = x.permute(0, 2, 3, 1)
        if self.how == "softmax":  # over the channels: not elementwise
            y = self.fc(y).softmax(-1)
        elif self.how == "linear twice":  # one layer on two inputs
            y = self.fc(self.fc(y))
        elif self.how == "read outside":  # a channels-last value leaves the region
            z = self.fc(y)
            return self.head(z.mean((1, 2)) + z.permute(0, 3, 1, 2).mean((2, 3)))
        elif self.how == "no way back":
            return self.head(self.fc(y).mean((1, 2)))
        elif self.how == "other permute":
            return self.head(self.fc(y).permute(0, 3, 2, 1).mean((2, 3)))
        return self.head(y.permute(0, 3, 1, 2).mean((2, 3)))


@pytest.mark.parametrize("how", ["softmax", "linear twice", "read outside", "no way back",
                                 "other permute"])
def test_regions_it_cannot_follow_stay_as_traced(how):
    torch.manual_seed(0)
    net = _Refused(how).eval()
    gm, done = _rewritten(net)
    assert done == 0
    assert isinstance(gm.get_submodule("fc"), nn.Linear)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the frozen layers, said at convert
        model = fastmdl.convert(net, 2, [5, 5], input_size=(3, SIZE, SIZE))
    assert model.mask_groups() == []  # the stem's channels cross the permute: kept whole
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x, 0), net(x), rtol=1e-5, atol=1e-5)


def test_convert_masks_the_hidden_channels_and_prunes_them(tmp_path):
    torch.manual_seed(0)
    net = MethodBlock().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = fastmdl.convert(net, 3, [5, 3, 4], input_size=(3, SIZE, SIZE))
    # The residual stream meets a LayerNorm over its channels: kept whole. The
    # hidden channels are the one group.
    assert [g.members for g in model.mask_groups()] == [("fc1",)]
    assert isinstance(model.module.get_submodule("fc1"), fastmdl.Conv2d)
    assert isinstance(model.module.get_submodule("norm"), ChannelLayerNorm)
    with torch.no_grad():  # all filters on: still the original network
        x = torch.randn(2, 3, SIZE, SIZE)
        torch.testing.assert_close(model(x, 0)[:, :5], net(x), rtol=1e-5, atol=1e-5)
    set_masks(model, keep=0.5, shared=0.0, seed=3)
    per_domain_statistics(model, SIZE)
    pruned = fastmdl.prune(model)
    assert pruned.compact_plan() is not None and pruned.compact_plan().islands == []
    check_every_layout(pruned, model, "MethodBlock", SIZE, rtol=1e-4, atol=1e-4)
    fc1 = pruned.net.get_submodule("fc1")
    assert fc1.weight.shape[0] < 48  # the hidden channels no domain keeps are gone
    fastmdl.save(pruned, tmp_path / "m.fmdl")
    back = fastmdl.load(tmp_path / "m.fmdl")
    assert isinstance(back.net.get_submodule("norm"), ChannelLayerNorm)
    x, d = torch.randn(4, 3, SIZE, SIZE), torch.tensor([2, 0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(back(x, d), model(x, d), rtol=1e-4, atol=1e-4)


def test_the_rewrite_can_be_turned_off():
    """A user whose code calls the model class's own methods keeps the model as it
    is; its channels-last block is then kept whole, as an op the analysis does not
    follow."""
    torch.manual_seed(0)
    net = MethodBlock().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = fastmdl.convert(net, 2, [5, 5], input_size=(3, SIZE, SIZE),
                                rewrite_channels_last=False)
    assert type(model.module) is MethodBlock
    assert isinstance(model.module.fc1, nn.Linear) and model.mask_groups() == []
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x, 1), net(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="rewrite_channels_last must be a bool"):
        fastmdl.convert(net, 2, [5, 5], rewrite_channels_last="no")


def test_channel_layer_norm_is_a_layer_norm_over_dim_1():
    torch.manual_seed(0)
    ln = nn.LayerNorm(6, eps=1e-4)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    cln = ChannelLayerNorm.from_layer_norm(ln)
    x = torch.randn(2, 6, 5, 3)
    want = ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(cln(x), want)
    torch.testing.assert_close(cln(x.contiguous(memory_format=torch.channels_last)), want)
    assert cln.eps == 1e-4 and cln.normalized_shape == (6,)
    with pytest.raises(ValueError, match="normalized_shape must be C or"):
        ChannelLayerNorm((6, 5))
    with pytest.raises(ValueError, match="ln must normalise one dim"):
        ChannelLayerNorm.from_layer_norm(nn.LayerNorm((6, 5)))


def test_linear_as_conv():
    torch.manual_seed(0)
    lin = nn.Linear(5, 7)
    conv = channels_last.linear_as_conv(lin)
    x = torch.randn(2, 5, 4, 3)
    torch.testing.assert_close(conv(x), lin(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_the_pruned_block_compiles_in_one_graph():
    """What runs on a GPU: the padded storage under torch.compile(fullgraph=True),
    with the channels-first LayerNorm and the MLP's 1x1 convolutions."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = fastmdl.convert(MethodBlock(), 3, [5, 3, 4], input_size=(3, SIZE, SIZE))
    set_masks(model, keep=0.5, shared=0.0, seed=3)
    per_domain_statistics(model, SIZE)
    pruned = fastmdl.prune(model)
    torch._dynamo.reset()
    compiled = torch.compile(pruned, fullgraph=True)
    x, d = torch.randn(6, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, d), model(x, d), rtol=1e-4, atol=1e-4)
