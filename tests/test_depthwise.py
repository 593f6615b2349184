"""Depthwise convolutions and squeeze-and-excitation gates prune for real.

A depthwise convolution's filter c reads input channel c alone, so its output
channels are its input's (one mask group: the filters go with the channels);
a gate ``x * sigmoid(conv(...))`` multiplies channel c of x by gate c, so the
gate's last convolution is tied to x's channels too. Blocks as MobileNetV2,
MobileNetV3 and EfficientNet build them (tests/zoo.py) go through convert ->
one training step -> random per-domain masks -> prune, and the pruned network
must compute what the masked model computes, in both layouts and after
save/load. Also: a gate used any other way keeps its channels whole; so does a
Linear over channels-last features; a channel split and a shuffle carry the
masks through (tests/test_shuffle.py has the rest); stochastic depth keeps a
residual stream prunable; pagcp's surgery cuts depthwise convolutions with their
channels."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmdl
import zoo
from layouts import check_every_layout, per_domain_statistics
from fastmdl import graph
from fastmdl.cost import costs, multidomain_layers
from fastmdl.pruned import PrunedConv2d

SIZE = 16
NUM_CLASSES = [5, 3, 4]
TOL = dict(rtol=1e-4, atol=1e-4)


class V2Net(nn.Module):
    """MobileNetV2's inverted residuals: with a residual, with a stride and a new
    width, and with expansion 1 (the depthwise conv reads the residual stream)."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.features = nn.Sequential(
            zoo.Conv2dNormActivation(3, 8, activation_layer=nn.ReLU6),
            zoo.InvertedResidual(8, 8, 1, expand_ratio=3),
            zoo.InvertedResidual(8, 16, 2, expand_ratio=4),
            zoo.InvertedResidual(16, 16, 1, expand_ratio=1),
            zoo.Conv2dNormActivation(16, 32, kernel_size=1, activation_layer=nn.ReLU6))
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class V3Net(nn.Module):
    """MobileNetV3's blocks: hard-sigmoid squeeze-and-excitation right after a stem
    (no expansion), a 5x5 depthwise conv with Hardswish, a residual block with SE."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.features = nn.Sequential(
            zoo.Conv2dNormActivation(3, 16, stride=2, activation_layer=nn.Hardswish),
            zoo.InvertedResidualV3(16, 3, 16, 16, True, "RE", 1),
            zoo.InvertedResidualV3(16, 5, 48, 24, False, "HS", 2),
            zoo.InvertedResidualV3(24, 5, 72, 24, True, "HS", 1),
            zoo.Conv2dNormActivation(24, 48, kernel_size=1, activation_layer=nn.Hardswish))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(48, 32), nn.Hardswish(),
                                        nn.Dropout(0.2), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class EfficientNetBlocks(nn.Module):
    """EfficientNet's MBConv: SiLU, sigmoid squeeze-and-excitation (squeezed from
    the block's input width), expansion 1 after the stem, then 6 with a stride."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.features = nn.Sequential(
            zoo.Conv2dNormActivation(3, 16, activation_layer=nn.SiLU),
            zoo.MBConv(zoo.MBConvConfig(1, 3, 1, 16, 16, 1)),
            zoo.MBConv(zoo.MBConvConfig(6, 5, 2, 16, 24, 1)),
            zoo.MBConv(zoo.MBConvConfig(6, 3, 1, 24, 24, 1)))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(24, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


NETS = {"mobilenet_v2": V2Net, "mobilenet_v3": V3Net, "efficientnet": EfficientNetBlocks}


def _convert(make):
    torch.manual_seed(0)
    net = make(NUM_CLASSES[0]).eval()
    for bn in net.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = None  # each domain's statistics: its own batches' average
    return fastmdl.convert(net, 3, NUM_CLASSES, input_size=(3, SIZE, SIZE))


def _convert_frozen(net, *args, **kwargs):
    """convert a network that keeps some layers whole (which convert warns about)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return fastmdl.convert(net, *args, **kwargs)


def _depthwise(model):
    return [n for n, m in model.module.named_modules()
            if isinstance(m, fastmdl.Conv2d) and graph.is_depthwise(m)]


def _gates(model):
    """The last convolution of every squeeze-and-excitation gate."""
    return [n + ".fc2" for n, m in model.module.named_modules()
            if isinstance(m, (zoo.SqueezeExcitation, zoo.SqueezeExcitationV3))]


def _group_of(model, name):
    found = [g for g in model.mask_groups() if name in g.members]
    assert len(found) == 1, f"{name} is in {len(found)} mask groups"
    return found[0]


def _one_training_step(model):
    g = torch.Generator().manual_seed(1)
    loaders = [[(torch.randn(4, 3, SIZE, SIZE, generator=g),
                 torch.randint(0, k, (4,), generator=g))] for k in NUM_CLASSES]
    fastmdl.train(model, loaders, epochs=1, budget=0.8, progress=False, log=None,
                  recalibrate=1)


def _random_masks(model, seed=0):
    """Each domain keeps a random ~half of every group; domain 1 keeps nothing of
    the first group (its channels are all zero), domain 2 one filter of it."""
    g = torch.Generator().manual_seed(seed)
    for group in model.mask_groups():
        group.scores.data = torch.rand(group.scores.shape, generator=g) - 0.5
    first = model.mask_groups()[0].scores.data
    first[1] = -1.0
    first[2] = -1.0
    first[2, 1] = 1.0


def _per_domain_statistics(model):
    per_domain_statistics(model, SIZE)


def _check_same(pruned, model, what):
    check_every_layout(pruned, model, what, SIZE, **TOL)


@pytest.fixture(scope="module")
def trained():
    """name -> (masked model, its pruned network), built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            model = _convert(NETS[name])
            _one_training_step(model)
            _random_masks(model)
            _per_domain_statistics(model)
            cache[name] = (model, fastmdl.prune(model))
        return cache[name]
    return get


@pytest.mark.parametrize("name", list(NETS))
def test_depthwise_convs_join_their_inputs_group(name):
    model = _convert(NETS[name])
    assert _depthwise(model)
    for dw in _depthwise(model):
        conv = model.module.get_submodule(dw)
        assert conv.prunable, dw
        group = _group_of(model, dw)
        assert conv.scores is group.scores
        # The filter of channel c goes with channel c: the conv that wrote the
        # depthwise conv's input is in the same group.
        assert group.members.index(dw) > 0
    assert model.frozen_layers()["layers"] == []


@pytest.mark.parametrize("name", ["mobilenet_v3", "efficientnet"])
def test_a_gates_last_conv_joins_the_gated_channels_group(name):
    model = _convert(NETS[name])
    assert _gates(model)
    for gate in _gates(model):
        block = gate.rsplit(".", 2)[0]  # the block's Sequential
        dw = next(n for n in _depthwise(model) if n.startswith(block + "."))
        assert _group_of(model, gate) is _group_of(model, dw)
        # The squeeze conv writes its own group, read by the gate conv.
        assert model.module.get_submodule(gate.replace("fc2", "fc1")).prunable


@pytest.mark.parametrize("name", list(NETS))
def test_pruned_equals_the_masked_model(name, trained):
    model, pruned = trained(name)
    assert pruned.compact_plan() is not None, pruned.compact_error
    assert pruned.compact_plan().islands == []
    for dw in _depthwise(model):
        conv = pruned.net.get_submodule(dw)
        assert isinstance(conv, PrunedConv2d)
        kept = int(((_group_of(model, dw).scores > 0).any(dim=0)).sum())
        assert conv.groups == conv.weight.shape[0] == max(kept, 1), dw
        assert conv.weight.shape[1] == 1
    _check_same(pruned, model, name)


@pytest.mark.parametrize("name", list(NETS))
def test_unfused_prune_equals_the_masked_model(name, trained):
    model, _ = trained(name)
    _check_same(fastmdl.prune(model, fuse=False), model, name + " unfused")


@pytest.mark.parametrize("name", list(NETS))
def test_save_and_load_give_the_same_outputs(name, trained, tmp_path):
    model, pruned = trained(name)
    fastmdl.save(pruned, tmp_path / "m.fmdl")
    back = fastmdl.load(tmp_path / "m.fmdl")
    _check_same(back, model, name + " loaded")


@pytest.mark.parametrize("name", list(NETS))
def test_a_depthwise_conv_costs_its_kept_channels_not_their_square(name, trained):
    model, pruned = trained(name)
    layers = {c.name: c for c in multidomain_layers(model, hard=True)}
    for dw in _depthwise(model):
        layer = layers[dw]
        conv = model.module.get_submodule(dw)
        kernel = conv.weight.shape[2] * conv.weight.shape[3]
        masks = (_group_of(model, dw).scores.detach() > 0).float()
        params = costs([layer], "params")
        torch.testing.assert_close(params.per_domain, kernel * masks.sum(dim=1))
        assert float(params.union) == kernel * float(masks.amax(dim=0).sum())
        assert params.baseline.tolist() == [float(conv.weight.numel())] * 3
    # The pruned network's own count agrees with the masked model's union.
    before = fastmdl.cost_report(model).union["flops"]
    after = fastmdl.cost_report(pruned).union["flops"]
    assert after == pytest.approx(before, rel=1e-6)


def test_no_convolution_of_the_mobile_networks_is_frozen():
    """MobileNetV2/V3 and EfficientNet-B0 whole: every convolution is in a mask
    group (before depthwise convolutions and gates were understood, 34 of
    MobileNetV2's 52 and 48 of EfficientNet-B0's 81 kept all their filters)."""
    for make in (zoo.mobilenet_v2, zoo.mobilenet_v3_small, zoo.efficientnet_b0):
        torch.manual_seed(0)
        model = fastmdl.convert(make().eval(), 2, [10, 10], input_size=(3, 32, 32))
        assert model.frozen_layers()["layers"] == [], make.__name__


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet"])
def test_recalibrating_the_pruned_model_equals_recalibrating_before_pruning(name, trained):
    """The BatchNorm folded into a pruned depthwise conv unfolds per domain too."""
    import copy

    from fastmdl.train import recalibrate_bn

    model, pruned = trained(name)
    model, pruned = copy.deepcopy(model), copy.deepcopy(pruned)
    g = torch.Generator().manual_seed(3)
    data = [[(torch.randn(6, 3, SIZE, SIZE, generator=g) * (1 + d) - d,
              torch.zeros(6, dtype=torch.long))] for d in range(3)]
    recalibrate_bn(pruned, data, batches=1)
    recalibrate_bn(model, data, batches=1)
    _check_same(pruned, model, name + " recalibrated")


class Gated(nn.Module):
    """Squeeze-and-excitation written out with functions (``torch.sigmoid``,
    ``F.hardsigmoid``, ``Tensor.sigmoid``), a swish ``x * sigmoid(x)``, and a
    gate multiplied from either side."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn_a = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.squeeze = nn.Conv2d(8, 4, 1)
        self.excite = nn.Conv2d(4, 8, 1)
        self.b = nn.Conv2d(8, 6, 1)
        self.gate_b = nn.Conv2d(6, 6, 1)
        self.head = nn.Linear(6, num_classes)

    def forward(self, x):
        x = F.relu(self.bn_a(self.a(x)))
        x = self.dw(x)
        x = x * torch.sigmoid(x)  # swish: the gate of x's own channels
        s = F.relu(self.squeeze(F.adaptive_avg_pool2d(x, 1)))
        x = torch.sigmoid(self.excite(s)) * x
        y = self.b(x)
        y = y * F.hardsigmoid(self.gate_b(y.mean((2, 3), keepdim=True))).mul(2.0)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


def test_gates_written_with_functions_tie_their_convs():
    torch.manual_seed(0)
    model = fastmdl.convert(Gated(), 3, NUM_CLASSES, input_size=(3, 8, 8))
    assert model.frozen_layers()["layers"] == []
    groups = {g.members for g in model.mask_groups()}
    assert ("a", "dw", "excite") in groups
    assert ("b", "gate_b") in groups
    assert ("squeeze",) in groups
    _random_masks(model)
    model.train()
    with torch.no_grad():
        model(torch.randn(9, 3, 8, 8), torch.arange(9) % 3)
    model.eval()
    x = torch.randn(5, 3, 8, 8)
    d = torch.tensor([0, 2, 2, 1, 0])
    pruned = fastmdl.prune(model)
    with torch.no_grad():
        for layout in ("union", "compact"):
            pruned.layout = layout
            torch.testing.assert_close(pruned(x, d), model(x, d), **TOL)


class GateMisused(nn.Module):
    """A gate added to its input, and a conv reading a gate: masked channels are
    not 0 there, so those channels stay whole."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = nn.Conv2d(8, 8, 1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.d = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        a = self.a(x)
        a = a + torch.sigmoid(self.gate(a.mean((2, 3), keepdim=True)))  # an add: frozen
        b = self.c(F.hardsigmoid(self.b(x)))  # b's gate read by c: b frozen
        b = self.d(b)  # c and d are fine
        return self.head(torch.cat([a, b], 1).mean((2, 3)))


def test_a_gate_that_is_added_or_convolved_keeps_its_channels_whole():
    model = _convert_frozen(GateMisused(), 2, [2, 2], input_size=(3, 8, 8))
    frozen = {name for name, _ in model.frozen_layers()["layers"]}
    assert frozen == {"a", "gate", "b"}
    assert [g.members for g in model.mask_groups()] == [("c",), ("d",)]


class ChannelsLastMLP(nn.Module):
    """ConvNeXt's block (depthwise 7x7, permute to channels-last, LayerNorm and a
    Linear MLP over the last dim, permute back, residual), and a Linear over the
    last dim of an (N, C, H) tensor: dim 1 is not their features."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.a = nn.Conv2d(3, 10, 3, padding=1)
        self.b = nn.Conv2d(10, 6, 3, padding=1)
        self.dw = nn.Conv2d(6, 6, 7, padding=3, groups=6)
        self.norm = nn.LayerNorm(6)
        self.pw1 = nn.Linear(6, 12)
        self.pw2 = nn.Linear(12, 6)
        self.c = nn.Conv2d(6, 6, 1)
        self.rows = nn.Linear(8, 4)
        self.head = nn.Linear(6 * 4, num_classes)

    def forward(self, x):
        x = self.b(F.relu(self.a(x)))
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))).permute(0, 3, 1, 2)
        x = x + y
        z = self.rows(F.relu(self.c(x)).mean(3))  # (N, 6, 8) -> (N, 6, 4)
        return self.head(z.flatten(1))


def test_a_linear_over_the_last_dim_is_left_whole_unless_it_is_a_channels_last_mlp():
    """The MLP between the permutes runs channels-first after convert (1x1
    convolutions: its hidden channels are a mask group); the Linear over the last
    dim of (N, C, H) is no such block and stays whole, with its neighbours."""
    torch.manual_seed(0)
    model = _convert_frozen(ChannelsLastMLP(), 3, NUM_CLASSES, input_size=(3, 8, 8))
    infos = model.layer_infos()
    assert "rows" not in infos and {"pw1", "pw2"} <= set(infos)
    assert [g.members for g in model.mask_groups()] == [("a",), ("pw1",)]
    _random_masks(model)
    model.eval()
    pruned = fastmdl.prune(model)
    assert type(pruned.net.get_submodule("rows")) is nn.Linear
    for name in ("pw1", "pw2"):
        assert isinstance(pruned.net.get_submodule(name), PrunedConv2d)
    x = torch.randn(5, 3, 8, 8)
    d = torch.tensor([0, 2, 2, 1, 0])
    with torch.no_grad():
        for layout in ("union", "compact"):
            pruned.layout = layout
            torch.testing.assert_close(pruned(x, d), model(x, d), **TOL)


def test_channel_surgery_cuts_depthwise_convs_with_their_channels():
    """fastmdl.pagcp's surgery on a plain network and on a pruned one."""
    from fastmdl.pagcp import uniform_prune

    torch.manual_seed(0)
    plain = V2Net().eval()
    x = torch.randn(4, 3, SIZE, SIZE)
    small, info = uniform_prune(plain, ratio=0.5, example_input=x[:1])
    assert info["flops_after"] < info["flops_before"]
    for name, m in small.named_modules():
        if isinstance(m, nn.Conv2d) and name in dict(plain.named_modules()):
            before = plain.get_submodule(name)
            if before.groups > 1:
                assert m.groups == m.in_channels == m.out_channels < before.groups, name
    with torch.no_grad():
        assert small(x).shape == (4, NUM_CLASSES[0])

    model = _convert(V2Net)
    _random_masks(model)
    _per_domain_statistics(model)
    smaller, info = uniform_prune(fastmdl.prune(model), ratio=0.5)
    assert fastmdl.cost_report(smaller).union["flops"] == pytest.approx(info["flops_after"])
    d = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        smaller.layout = "union"
        union = smaller(x, d)
        smaller.layout = "compact"
        torch.testing.assert_close(smaller(x, d), union, **TOL)


def stochastic_depth(input, p, mode, training=True):
    """A look-alike of torchvision.ops.stochastic_depth (its qualified name, its
    semantics), kept whole by fx as torchvision's is."""
    if not training or p == 0.0:
        return input
    keep = torch.empty([input.shape[0]] + [1] * (input.ndim - 1)).bernoulli_(1 - p)
    return input * keep / (1 - p)


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
torch.fx.wrap("stochastic_depth")


class StochasticDepthMBConv(nn.Module):
    """torchvision's MBConv ends ``result = self.stochastic_depth(result); result +=
    input``: zeroing whole samples keeps zero channels zero, so the residual
    stream stays one prunable group."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = zoo.Conv2dNormActivation(3, 16, activation_layer=nn.SiLU)
        self.block = zoo.MBConv(zoo.MBConvConfig(4, 3, 1, 16, 16, 1))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + stochastic_depth(self.block(x), 0.2, "row", self.training)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_stochastic_depth_keeps_the_residual_stream_prunable(tmp_path):
    torch.manual_seed(0)
    model = fastmdl.convert(StochasticDepthMBConv(), 3, NUM_CLASSES, input_size=(3, 8, 8))
    assert model.frozen_layers()["layers"] == []
    assert "stem.0" in _group_of(model, "block.block.3.0").members
    _random_masks(model)
    model.eval()
    pruned = fastmdl.prune(model)
    assert pruned.compact_plan().islands == []
    fastmdl.save(pruned, tmp_path / "m.fmdl")
    back = fastmdl.load(tmp_path / "m.fmdl")
    assert back.compact_plan().islands == []
    x = torch.randn(5, 3, 8, 8)
    d = torch.tensor([0, 2, 2, 1, 0])
    with torch.no_grad():
        for p in (pruned, back):
            for layout in ("union", "compact"):
                p.layout = layout
                torch.testing.assert_close(p(x, d), model(x, d), **TOL)


class ShuffleV2Unit(nn.Module):
    """ShuffleNetV2's unit: split the channels in two, a branch (1x1, depthwise 3x3,
    1x1) on one half, concatenate, shuffle the channels. The masks go through the
    split and the shuffle: the stem's channels and the branch's prune, and both
    become channel selections that the compact layout runs per domain."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = zoo.Conv2dNormActivation(3, 16)
        self.branch = nn.Sequential(
            zoo.Conv2dNormActivation(8, 8, kernel_size=1),
            zoo.Conv2dNormActivation(8, 8, groups=8, activation_layer=None),
            zoo.Conv2dNormActivation(8, 8, kernel_size=1))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.branch(b)], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_a_channel_split_and_shuffle_prune_and_run_compact():
    torch.manual_seed(0)
    model = _convert_frozen(ShuffleV2Unit(), 3, NUM_CLASSES, input_size=(3, 8, 8))
    assert model.frozen_layers()["layers"] == []
    assert [g.members for g in model.mask_groups()] == [
        ("stem.0",), ("branch.0.0", "branch.1.0"), ("branch.2.0",)]
    _random_masks(model)
    _per_domain_statistics_at(model, 8)
    pruned = fastmdl.prune(model)
    assert pruned.net.get_submodule("branch.1.0").groups < 8
    assert pruned.net.get_submodule("stem.0").weight.shape[0] < 16
    assert pruned.compact_plan().islands == []
    x = torch.randn(5, 3, 8, 8)
    d = torch.tensor([0, 2, 2, 1, 0])
    with torch.no_grad():
        for layout, storage in (("union", "auto"), ("compact", "ragged"), ("compact", "padded")):
            pruned.layout, pruned.storage = layout, storage
            torch.testing.assert_close(pruned(x, d), model(x, d), **TOL)
            torch.testing.assert_close(pruned(x[:1], 2), model(x[:1], 2), **TOL)


def _per_domain_statistics_at(model, size):
    model.train()
    with torch.no_grad():
        model(torch.randn(9, 3, size, size) * 2 + 0.5, torch.arange(9) % 3)
    model.eval()
