"""Modules and functions torchvision's classification models use, through
convert -> prune -> save -> load: Hardsigmoid (MobileNetV3), stochastic depth
(EfficientNet; a look-alike module path, as torchvision does not import here),
floor division of sizes (ShuffleNet), hyphenated layer names (RegNet)."""

import torch
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
