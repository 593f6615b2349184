"""A convolutional classifier (SqueezeNet's: a convolution, ReLU and global pooling)
is a per-domain head: convert, train, prune in every layout and storage,
save/load, costs, and the convolutional heads fastmdl refuses."""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import families
import fastmdl
from fastmdl import basis, cost
from fastmdl.conv_heads import ClassPadding, ConvHeads, PrunedConvHeads
from fastmdl.pagcp import uniform_prune
from layouts import check_every_layout, per_domain_statistics
from pruned_model import set_masks

CLASSES = [10, 4, 7]
SIZE = 16


class WideHead(nn.Module):
    """A 3x3 convolutional head with padding on an 8x8 map, then ReLU, max pooling
    and a mean over the pixels: kernel and pixels both count in its cost."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                                      families.Fire(16, 8, 8))
        self.head = nn.Conv2d(16, num_classes, 3, padding=1)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.head(self.features(x))), 2)
        return y.mean((2, 3))


def _convert(net, classes=CLASSES):
    return fastmdl.convert(net, 3, classes, input_size=(3, SIZE, SIZE))


def _masked(net, seed: int = 1):
    """``net`` converted, with random per-domain masks and BatchNorm statistics."""
    torch.manual_seed(seed)
    model = _convert(net)
    set_masks(model, keep=0.25, shared=0.5, seed=seed)
    per_domain_statistics(model, SIZE)
    return model


def _head(model):
    return next(m for m in model.modules() if isinstance(m, ConvHeads))


# -- convert -------------------------------------------------------------------------


def test_the_head_convolution_becomes_per_domain_heads_from_its_weights():
    torch.manual_seed(0)
    net = families.fire()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing frozen: convert has nothing to warn about
        model = _convert(net)
    head = model.module.classifier[1]
    assert isinstance(head, ConvHeads) and head.num_classes == CLASSES
    conv = net.classifier[1]
    for d, k in enumerate(CLASSES):
        assert head.weights[d].shape == (k, 32, 1, 1) and head.biases[d].shape == (k,)
    # Domain 0 has the original's 10 classes: it starts from its weights; the
    # others start afresh.
    assert torch.equal(head.weights[0], conv.weight) and torch.equal(head.biases[0], conv.bias)
    assert isinstance(model.class_padding, ClassPadding)
    # The heads train per domain: the optimizer's "shared" weights leave them out.
    from fastmdl.train import _shared_weights
    shared = {id(p) for p in _shared_weights(model)}
    assert not any(id(p) in shared for p in head.parameters())


def test_default_classes_are_the_convolutions_and_a_converted_model_converts_again():
    model = fastmdl.convert(families.fire(6), 2, input_size=(3, SIZE, SIZE))
    assert model.num_classes == [6, 6]
    again = fastmdl.convert(model.module, 2, input_size=(3, SIZE, SIZE))
    assert _head(again).num_classes == [6, 6] and again.class_padding is not None
    with pytest.raises(ValueError, match=r"ConvHeads has num_classes \[6, 6\]"):
        fastmdl.convert(model.module, 2, [6, 3], input_size=(3, SIZE, SIZE))


def test_each_sample_gets_its_domains_classes_and_minus_inf_past_them():
    model = _masked(families.fire())
    x = torch.randn(6, 3, SIZE, SIZE)
    domain = torch.tensor([2, 0, 1, 1, 2, 0])
    with torch.no_grad():
        out = model(x, domain)
        assert out.shape == (6, max(CLASSES))
        for n, d in enumerate(domain.tolist()):
            k = CLASSES[d]
            assert torch.isfinite(out[n, :k]).all() and torch.isneginf(out[n, k:]).all()
            # A mixed batch gives each sample what its domain alone gives it.
            torch.testing.assert_close(out[n], model(x[n:n + 1], d)[0])
        one = model(x, 1)
    assert torch.isneginf(one[:, 4:]).all() and torch.isfinite(one[:, :4]).all()


def test_the_frozen_layer_report_leaves_the_head_out():
    model = _convert(families.fire())
    report = model.frozen_layers()
    assert report == {"layers": [], "held": 0.0, "unprunable": 0.0}
    # The head reads the last Fire's concatenation: both expands stay prunable.
    members = {n for g in model.mask_groups() for n in g.members}
    assert {"features.3.e1.0", "features.3.e3.0"} <= members
    assert "classifier.1" not in members
    assert model.layer_infos()["classifier.1"].kind == "head"


# -- training --------------------------------------------------------------------------


def test_one_training_step_runs_with_a_finite_loss_and_moves_the_heads():
    torch.manual_seed(0)
    model = _convert(families.fire())
    g = torch.Generator().manual_seed(0)
    loaders = [DataLoader(TensorDataset(torch.randn(8, 3, SIZE, SIZE, generator=g),
                                        torch.randint(0, k, (8,), generator=g)), batch_size=8)
               for k in CLASSES]
    before = [w.detach().clone() for w in _head(model).weights]
    history = fastmdl.train(model, loaders, epochs=1, budget=0.75, train_weights=True,
                            progress=False, log=None, recalibrate=1)
    assert len(history) == 1 and math.isfinite(history[0]["loss"])
    after = _head(model).weights
    assert all(not torch.equal(b, a) for b, a in zip(before, after))

    model.train()
    out = model(torch.randn(6, 3, SIZE, SIZE), torch.arange(6) % 3)
    loss = F.cross_entropy(out, torch.tensor([9, 3, 6, 0, 1, 2]))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(w.grad).all()
                                        for w in _head(model).weights)


# -- prune -------------------------------------------------------------------------------


@pytest.mark.parametrize("net", [families.fire, WideHead], ids=["squeezenet", "3x3 head"])
def test_the_pruned_network_equals_the_masked_model_in_every_layout(net):
    model = _masked(net())
    pruned = fastmdl.prune(model)
    heads = [m for m in pruned.modules() if isinstance(m, PrunedConvHeads)]
    assert len(heads) == 1 and heads[0].weight.shape[0] == sum(CLASSES)
    # The head reads only the channels some domain keeps.
    assert heads[0].weight.shape[1] < _head(model).in_channels
    plan = pruned.compact_plan()
    assert plan is not None and plan.islands == [], pruned.compact_error
    check_every_layout(pruned, model, net.__name__, SIZE, rtol=1e-4, atol=1e-4)


def test_a_batch_of_one_domain_absent_and_an_unpruned_pass_agree():
    model = _masked(families.fire(), seed=3)
    pruned = fastmdl.prune(model, fuse=False)
    check_every_layout(pruned, model, "unfused", SIZE, rtol=1e-4, atol=1e-4)


# -- costs -------------------------------------------------------------------------------


@pytest.mark.parametrize("net, kernel, pixels", [(families.fire, 1, 64), (WideHead, 9, 64)],
                         ids=["squeezenet", "3x3 head"])
def test_the_cost_report_counts_the_head_per_domain(net, kernel, pixels):
    model = _masked(net())
    layers = cost.multidomain_layers(model, hard=True)
    head = next(c for c in layers if c.kind == "head")
    assert (head.kernel, head.pixels) == (kernel, pixels)
    kept_in = head.in_masks.sum(dim=1)
    classes = torch.tensor(CLASSES, dtype=torch.float32)
    flops = cost.costs([head], "flops")
    torch.testing.assert_close(flops.per_domain, kernel * kept_in * classes * pixels)
    params = cost.costs([head], "params")
    torch.testing.assert_close(params.per_domain, kernel * kept_in * classes + classes)
    assert float(flops.baseline[0]) == kernel * head.in_masks.shape[1] * 10 * pixels

    pruned = fastmdl.prune(model)
    p_head = next(c for c in cost.pruned_layers(pruned) if c.kind == "head")
    assert (p_head.kernel, p_head.pixels) == (kernel, pixels)
    torch.testing.assert_close(cost.costs([p_head], "flops").per_domain, flops.per_domain)
    before, after = fastmdl.cost_report(model), fastmdl.cost_report(pruned)
    for a, b in zip(before.domains, after.domains):
        assert a["flops"] == pytest.approx(b["flops"])


# -- save / load ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_fire():
    model = _masked(families.fire())
    return model, fastmdl.prune(model)


def test_save_and_load_give_the_same_outputs(pruned_fire, tmp_path):
    model, pruned = pruned_fire
    path = tmp_path / "fire.fmdl"
    fastmdl.save(pruned, path)
    spec = json.loads(torch.load(path, weights_only=True)["spec"])
    types = {m["type"] for m in spec["modules"]}
    assert {"fastmdl.PrunedConvHeads", "fastmdl.ClassPadding"} <= types
    back = fastmdl.load(path)
    check_every_layout(back, model, "loaded", SIZE, rtol=1e-4, atol=1e-4)


def _edit(path, edit_spec=None, edit_tensors=None):
    from test_serialize import _rewrite
    _rewrite(path, edit_spec, edit_tensors)


def _set_config(layer_type, **changes):
    def edit(spec):
        m = next(m for m in spec["modules"] if m["type"] == layer_type)
        m["config"] = {**m["config"], **changes}
    return edit


def _head_tensor(suffix, change):
    def edit(t):
        k = next(k for k in t if k.startswith("classifier.1.") and k.endswith(suffix))
        t[k] = change(t[k]).contiguous()
    return edit


CRAFTED = {
    "classes that do not add up": (_set_config("fastmdl.PrunedConvHeads",
                                               num_classes=[10, 4, 8]), None, "adding up to 21"),
    "padding beyond the kernel": (_set_config("fastmdl.PrunedConvHeads", padding=[3, 3]), None,
                                  "exceeds half the kernel"),
    "a stride of 0": (_set_config("fastmdl.PrunedConvHeads", stride=[0, 1]), None, "stride"),
    "an unknown setting": (_set_config("fastmdl.PrunedConvHeads", groups=2), None,
                           "PrunedConvHeads config has the keys"),
    "input masks of another width": (None, _head_tensor("in_masks", lambda t: t[:, :-1]),
                                     "in_masks"),
    "a bias of another length": (None, _head_tensor("bias", lambda t: t[:-1]), "bias"),
    "padding for other classes": (_set_config("fastmdl.ClassPadding", num_classes=[10, 4, 6]),
                                  None, "num_classes"),
    "padding for two domains": (_set_config("fastmdl.ClassPadding", num_classes=[10, 4]), None,
                                "3 positive counts"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_load_checks_the_heads_config_against_its_tensors(pruned_fire, tmp_path, case):
    path = tmp_path / "fire.fmdl"
    fastmdl.save(pruned_fire[1], path)
    edit_spec, edit_tensors, message = CRAFTED[case]
    _edit(path, edit_spec, edit_tensors)
    with pytest.raises(ValueError, match=message) as e:
        fastmdl.load(path)
    assert str(path) in str(e.value)


# -- heads that are not convolutional classifiers ------------------------------------------


class ConvThenLinear(nn.Module):
    """A convolution pooled into a linear classifier: the linear layer is the head,
    the convolution an ordinary (prunable) one."""

    def __init__(self):
        super().__init__()
        self.features = families.Fire(3, 8, 8)
        self.conv = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(self.conv(self.features(x))),
                                                            1), 1))


def test_a_convolution_before_a_linear_layer_is_an_ordinary_one():
    model = _masked(ConvThenLinear())
    assert model.class_padding is None
    assert isinstance(model.module.fc, fastmdl.DomainHeads)
    assert any("conv" in g.members for g in model.mask_groups())
    check_every_layout(fastmdl.prune(model), model, "conv then linear", SIZE,
                       rtol=1e-4, atol=1e-4)


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 10, 1)
        self.b = nn.Conv2d(3, 10, 1)

    def forward(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(self.a(x) + self.b(x), 1), 1)


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(8, 10, 1, groups=2)

    def forward(self, x):
        return self.c(self.stem(x)).amax((2, 3))


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.c(self.c(x)).mean((2, 3))


class OneConv(nn.Module):
    """A 1x1 convolution to 10 channels, then ``tail``."""

    def __init__(self, tail):
        super().__init__()
        self.c = nn.Conv2d(3, 10, 1)
        self.bn = nn.BatchNorm2d(10)
        self.tail = tail

    def forward(self, x):
        return self.tail(self, self.c(x))


def _one_conv(tail):
    return lambda: OneConv(tail)


REFUSED = {
    "added to another convolution": (
        Residual, r"convolution 'a' through .*add.*also reads the tensor 'b'"),
    "a flatten of a 2x2 map": (
        _one_conv(lambda m, y: torch.flatten(F.adaptive_avg_pool2d(y, 2), 1)),
        r"convolution 'c' through .*flatten.*reshapes \(1, 10, 2, 2\) into \(1, 40\)"),
    "a softmax over the classes": (
        _one_conv(lambda m, y: torch.softmax(y.mean((2, 3)), 1)),
        r"convolution 'c' through torch.softmax.*not one of these ops"),
    "a BatchNorm after the head": (
        _one_conv(lambda m, y: m.bn(y).mean((2, 3))),
        r"convolution 'c' through BatchNorm2d 'bn'"),
    "a map as output": (
        _one_conv(lambda m, y: F.relu(y)),
        r"convolution 'c' but has shape \(1, 10, 16, 16\), not \(N, classes\)"),
    "a grouped convolution": (Grouped, r"convolution 'c', but it is grouped \(groups=2\)"),
    "a convolution called twice": (Twice, r"calls it 2 times"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_convolution_whose_channels_mix_on_the_way_out_is_refused(case):
    net, message = REFUSED[case]
    with pytest.raises(ValueError, match="classifier head") as e:
        fastmdl.convert(net(), 3, CLASSES, input_size=(3, SIZE, SIZE))
    assert e.match(message)


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="num_classes"):
        ConvHeads(8, 4, 1)
    with pytest.raises(ValueError, match="num_classes"):
        ConvHeads(8, [4, 0], 1)
    with pytest.raises(ValueError, match="num_classes"):
        ClassPadding([])
    head = ConvHeads(8, [4, 2], 1)
    with pytest.raises(ValueError, match=r"ConvHeads expects \(N, 8, H, W\)"):
        head(torch.randn(2, 3, 4, 4), 0)
    with pytest.raises(ValueError, match="2 domains"):
        head(torch.randn(2, 8, 4, 4))  # no domain given, none current
    with pytest.raises(ValueError, match="out of range"):
        head(torch.randn(2, 8, 4, 4), torch.tensor([0, 2]))
    model = _convert(families.fire())
    with pytest.raises(ValueError, match="out of range"):
        model(torch.randn(2, 3, SIZE, SIZE), 3)


# -- the other tools on the same models ---------------------------------------------------


def test_basis_decomposition_keeps_the_padding():
    model = _masked(families.fire())
    decomposed = basis.decompose(model)
    x, d = torch.randn(4, 3, SIZE, SIZE), torch.tensor([1, 2, 0, 1])
    with torch.no_grad():
        torch.testing.assert_close(decomposed.eval()(x, d), model(x, d), rtol=1e-4, atol=1e-4)
    assert all(p.requires_grad for p in _head(decomposed).parameters())


@pytest.mark.parametrize("which", ["multidomain", "pruned"])
def test_channel_surgery_cuts_the_heads_input_channels(pruned_fire, which):
    model, pruned = pruned_fire
    source = model if which == "multidomain" else pruned
    smaller, report = uniform_prune(source, ratio=0.75)
    assert report["flops_after"] < report["flops_before"]

    def head_inputs(net) -> int:
        m = next(m for m in net.modules() if isinstance(m, (ConvHeads, PrunedConvHeads)))
        return (m.weights[0] if isinstance(m, ConvHeads) else m.weight).shape[1]
    assert head_inputs(smaller) < head_inputs(source)
    x, d = torch.randn(4, 3, SIZE, SIZE), torch.tensor([1, 2, 0, 1])
    with torch.no_grad():
        out = smaller.eval()(x, d)
    for n, dom in enumerate(d.tolist()):
        k = CLASSES[dom]
        assert torch.isfinite(out[n, :k]).all() and torch.isneginf(out[n, k:]).all()
