"""Modules and functions torchvision's classification models use, through
convert -> prune -> save -> load: Hardsigmoid (MobileNetV3), stochastic depth
(EfficientNet; a look-alike module path, as torchvision does not import here),
floor division of sizes (ShuffleNet), hyphenated layer names (RegNet)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmdl


def stochastic_depth(input, p, mode, training=True):
    """A look-alike of torchvision.ops.stochastic_depth (its qualified name, its
    semantics), kept whole by fx as torchvision's is."""
    if not training or p == 0.0:
        return input
    keep = torch.empty([input.shape[0]] + [1] * (input.ndim - 1)).bernoulli_(1 - p)
    return input * keep / (1 - p)


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
torch.fx.wrap("stochastic_depth")


class Gate(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Conv2d(c, c, 1)
        self.act = nn.Hardsigmoid()

    def forward(self, x):
        return self.act(self.fc(x.mean((2, 3), keepdim=True)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.add_module("block1-0", nn.Sequential(nn.Conv2d(16, 16, 3, padding=1),
                                                  nn.BatchNorm2d(16), nn.Hardswish()))
        self.gate = Gate(16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        y = getattr(self, "block1-0")(x)
        y = y * self.gate(y)
        x = x + stochastic_depth(y, 0.2, "row", self.training)
        half = x.size(1) // 2  # ShuffleNet-style size arithmetic
        x = torch.cat([x[:, :half], x[:, half:]], 1)
        return self.head(torch.flatten(x.mean((2, 3), keepdim=True), 1))


def test_torchvision_style_ops_save_and_load(tmp_path):
    torch.manual_seed(0)
    net = Net().eval()
    model = fastmdl.convert(net, 2, [5, 3], input_size=(3, 16, 16)).eval()
    pruned = fastmdl.prune(model)
    fastmdl.save(pruned, tmp_path / "m.fmdl")
    back = fastmdl.load(tmp_path / "m.fmdl")
    x = torch.randn(6, 3, 16, 16)
    d = torch.tensor([0, 1, 1, 0, 1, 0])
    with torch.no_grad():
        want = model(x, d)
        torch.testing.assert_close(pruned(x, d), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(back(x, d), want, rtol=1e-4, atol=1e-4)
    assert any("block1-0" in n for n, _ in back.net.named_modules())
    targets = {getattr(n.target, "__module__", None) for n in back.net.graph.nodes
               if n.op == "call_function"}
    assert "fastmdl.serialize" in targets  # the stochastic depth node, run by fastmdl


class ChannelsLastNorm(nn.Module):
    """ConvNeXt's LayerNorm over channels: permute, normalise the last axis, permute back."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.LayerNorm(c, eps=1e-6)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Swish(nn.Module):
    """A user's own layer with a learnt parameter."""

    def __init__(self, channels: int, beta: float = 1.0):
        super().__init__()
        self.channels = channels
        self.beta = nn.Parameter(torch.full((channels, 1, 1), beta))

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


def shift_channels(x):
    """A user's own function, kept whole by fx."""
    return torch.roll(x, 1, dims=1)


torch.fx.wrap("shift_channels")


# Registered before any convert, as the docs ask (the tracer then keeps Swish whole).
fastmdl.serialize.register_layer("tests.Swish", Swish, config=lambda m: {"channels": m.channels},
                                 build=lambda c: Swish(int(c["channels"])))
fastmdl.serialize.register_function("tests.shift_channels", shift_channels)


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = ChannelsLastNorm(8)
        self.gn = nn.GroupNorm(2, 8)
        self.act = Swish(8, 0.7)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        x = self.act(self.gn(self.norm(self.conv1(x))))
        x = shift_channels(x)
        return self.head(self.ln(self.conv2(x).mean((2, 3))))


def test_layernorm_groupnorm_and_registered_user_layers_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = fastmdl.convert(Normed(), 2, [4, 3], input_size=(3, 8, 8)).eval()
    with torch.no_grad():  # trained-looking norm parameters, not the constructor's
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    pruned = fastmdl.prune(model)
    fastmdl.save(pruned, tmp_path / "n.fmdl")
    back = fastmdl.load(tmp_path / "n.fmdl")
    x, d = torch.randn(5, 3, 8, 8), torch.tensor([1, 0, 0, 1, 1])
    with torch.no_grad():
        torch.testing.assert_close(back(x, d), model(x, d), rtol=1e-4, atol=1e-4)
    kinds = {type(m).__name__ for m in back.net.modules()}
    # ChannelsLastNorm's permutes and LayerNorm ran channels-first from convert on.
    assert {"ChannelLayerNorm", "LayerNorm", "GroupNorm", "Swish"} <= kinds


def test_register_layer_checks_its_arguments():
    from fastmdl import serialize

    with pytest.raises(ValueError, match="name must be a dotted Python identifier"):
        serialize.register_layer("my lib.Swish", Swish)
    with pytest.raises(ValueError, match="fastmdl's own"):
        serialize.register_layer("torch.nn.ReLU", Swish)
    with pytest.raises(TypeError, match="cls must be a torch.nn.Module subclass"):
        serialize.register_layer("tests.NotAModule", int)
    with pytest.raises(TypeError, match="fn must be callable"):
        serialize.register_function("tests.nothing", 3)


@pytest.mark.parametrize("layer_type", ["torch.nn.LayerNorm", "fastmdl.ChannelLayerNorm"])
def test_a_layernorm_whose_config_claims_more_than_its_tensors_is_refused(tmp_path, layer_type):
    """The constructor would allocate what normalized_shape claims: checked first,
    on a file crafted with every checksum recomputed."""
    from test_serialize import _rewrite

    model = fastmdl.convert(Normed(), 2, [4, 3], input_size=(3, 8, 8)).eval()
    path = tmp_path / "n.fmdl"
    fastmdl.save(fastmdl.prune(model), path)

    def claim(spec):
        layer = next(m for m in spec["modules"] if m["type"] == layer_type)
        layer["config"]["normalized_shape"] = {"tuple": [10**9]}

    _rewrite(path, claim)
    with pytest.raises(ValueError, match="normalized_shape"):
        fastmdl.load(path)


class LayerNorm2d(nn.LayerNorm):
    """torchvision's ConvNeXt LayerNorm2d: a LayerNorm over channels, by functions."""

    def forward(self, x):
        x = torch.permute(x, (0, 2, 3, 1))
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return torch.permute(x, (0, 3, 1, 2))


class ShuffleAndNorm(nn.Module):
    """ShuffleNetV2's channel_shuffle (torch.transpose, view) and ConvNeXt's
    LayerNorm2d, as torchvision writes them with torch functions."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = LayerNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv(x)
        n, c, h, w = x.size()
        x = torch.transpose(x.view(n, 2, c // 2, h, w), 1, 2).contiguous()
        x = torch.reshape(x, (n, c, h, w))
        x = self.norm(x)
        x = torch.squeeze(torch.unsqueeze(x.mean((2, 3)), 1), 1)
        return self.head(x)


def test_torchvision_function_spellings_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = fastmdl.convert(ShuffleAndNorm(), 2, [4, 3], input_size=(3, 8, 8)).eval()
    with torch.no_grad():
        model.module.norm.weight.uniform_(0.5, 1.5)
    pruned = fastmdl.prune(model)
    fastmdl.save(pruned, tmp_path / "s.fmdl")
    back = fastmdl.load(tmp_path / "s.fmdl")
    x, d = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        torch.testing.assert_close(back(x, d), model(x, d), rtol=1e-4, atol=1e-4)
