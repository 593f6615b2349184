"""Channel shuffles, splits and slices carry the masks (fastmdl/graph.py follows
them run by run; fastmdl.prune turns each into a ChannelSelect of the kept
channels). Every spelling of a shuffle and a split the analysis follows, a
depthwise convolution (with a bias) over the shuffled mixture of two groups,
uses it does not follow (they keep their channels whole), a split half that
would keep nothing, and the ChannelSelect layer itself, saved and loaded."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmdl
from fastmdl import graph
from fastmdl.channel_select import ChannelSelect
from fastmdl.masks import segment_masks
from layouts import check_every_layout, per_domain_statistics
from pruned_model import set_masks  # benchmarks/pruned_model.py
from test_serialize import _rewrite

SIZE, CLASSES = 8, [4, 3, 5]
TOL = dict(rtol=1e-5, atol=1e-5)


def _cbr(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class ShuffleSplit(nn.Module):
    """Two groups a, b (6 channels each) concatenated and shuffled, then cut in two
    parts p, q: p feeds a convolution c, q a depthwise convolution with a bias
    (its channels are a mixture of a's and b's) and a BatchNorm."""

    def __init__(self, shuffle: str, split: str):
        super().__init__()
        self.how, self.split = shuffle, split
        self.a, self.b = _cbr(3, 6), _cbr(3, 6)
        wp = {"chunk": 6, "split": 5, "slice": 4}[split]
        wq = 12 - wp
        self.shuffle = nn.ChannelShuffle(3) if shuffle == "module" else None
        self.c = _cbr(wp, 8)
        self.dw = nn.Conv2d(wq, wq, 3, padding=1, groups=wq, bias=True)
        self.bn = nn.BatchNorm2d(wq)
        self.head = nn.Linear(8 + wq, CLASSES[0])

    def _shuffled(self, x):
        n, c, h, w = x.shape
        if self.how == "view":  # torchvision's spelling
            return x.view(n, 3, c // 3, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        if self.how == "permute":
            return x.reshape(n, 2, c // 2, h, w).permute(0, 2, 1, 3, 4).flatten(1, 2)
        if self.how == "module":
            return self.shuffle(x)
        return torch.channel_shuffle(x, 4)

    def forward(self, x):
        y = self._shuffled(torch.cat([self.a(x), self.b(x)], 1))
        if self.split == "chunk":
            p, q = y.chunk(2, dim=1)
        elif self.split == "split":
            p, q = torch.split(y, [5, 7], dim=1)
        else:
            p, q = y[:, :4], y[:, 4:]
        q = F.relu(self.bn(self.dw(q)))
        z = torch.cat([self.c(p), q], 1)
        return self.head(z.mean((2, 3)))


def _convert(net):
    return fastmdl.convert(net, len(CLASSES), CLASSES, input_size=(3, SIZE, SIZE))


@pytest.mark.parametrize("split", ["chunk", "split", "slice"])
@pytest.mark.parametrize("shuffle", ["view", "permute", "module", "function"])
def test_shuffles_and_splits_prune_and_equal_the_masked_model(shuffle, split, tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is frozen: convert has nothing to say
        model = _convert(ShuffleSplit(shuffle, split))
    assert model.frozen_layers()["layers"] == []
    assert sorted(g.members for g in model.mask_groups()) == [("a.0",), ("b.0",), ("c.0",)]
    dw = model.module.dw
    assert not dw.prunable and dw.out_segments is not None  # masked like its input
    set_masks(model, keep=0.5, shared=0.0, seed=3)
    per_domain_statistics(model, SIZE)
    pruned = fastmdl.prune(model)

    selects = [m for m in pruned.net.modules() if isinstance(m, ChannelSelect)]
    assert len(selects) == 2  # the two parts, each composed with the shuffle
    assert not any(isinstance(m, nn.ChannelShuffle) for m in pruned.net.modules())
    kept = [pruned.net.get_submodule(n).weight.shape[0] for n in ("a.0", "b.0", "dw")]
    assert kept[0] + kept[1] < 12 and kept[2] <= model.module.dw.out_channels
    assert pruned.compact_plan().islands == []
    check_every_layout(pruned, model, f"{shuffle}/{split}", SIZE, **TOL)

    fastmdl.save(pruned, tmp_path / "m.fmdl")
    back = fastmdl.load(tmp_path / "m.fmdl")
    x, d = torch.randn(5, 3, SIZE, SIZE), torch.tensor([2, 0, 1, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(back(x, d), model(x, d), **TOL)


def test_a_depthwise_convolution_over_a_mixture_is_masked_like_its_input():
    """In the converted model (training and evaluation) its output is exactly 0 in
    every channel its input's masks switch off for the sample's domain, bias and
    all; and its masks come from both groups' scores, so they get gradients."""
    torch.manual_seed(0)
    model = _convert(ShuffleSplit("view", "chunk"))
    set_masks(model, keep=0.5, shared=0.0, seed=1)
    dw = model.module.dw
    seen = {}
    dw.register_forward_hook(lambda m, args, y: seen.__setitem__("y", y))
    x, d = torch.randn(6, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 0, 1, 2])
    masks = segment_masks(dw.out_segments, 3, hard=True)
    assert {id(s.scores) for s in dw.out_segments} == {
        id(model.module.a[0].scores), id(model.module.b[0].scores)}
    for mode in (True, False):
        model.train(mode)
        out = model(x, d)
        off = masks[d] == 0
        assert off.any() and (~off).any()
        assert (seen["y"][off] == 0).all() and (seen["y"][~off] != 0).any()
    model.train()
    model(x, d).logsumexp(1).sum().backward()
    assert model.module.a[0].scores.grad.abs().sum() > 0


class Unfollowed(nn.Module):
    """A split whose tuple is reversed by slicing, and a grouped view that is summed
    instead of transposed and merged back: neither is a selection the analysis
    follows, so a, b and their readers keep their channels whole."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.keep = _cbr(3, 6), _cbr(3, 6), _cbr(3, 4)
        self.c = _cbr(6, 4)
        self.head = nn.Linear(4 + 3 + 4, CLASSES[0])

    def forward(self, x):
        parts = self.a(x).chunk(2, 1)
        y = torch.cat(parts[::-1], 1)
        n, c, h, w = y.shape
        z = self.b(x).view(n, 2, 3, h, w).sum(1)
        return self.head(torch.cat([self.c(y), z, self.keep(x)], 1).mean((2, 3)))


def test_selections_the_analysis_does_not_follow_keep_their_channels_whole():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = _convert(Unfollowed())
    frozen = {name for name, _ in model.frozen_layers()["layers"]}
    assert {"a.0", "b.0"} <= frozen and "keep.0" not in frozen
    set_masks(model, keep=0.5, shared=0.0, seed=2)
    model.module.keep[0].scores.data[:, 0] = -1.0  # no domain uses it
    per_domain_statistics(model, SIZE)
    pruned = fastmdl.prune(model)
    assert pruned.net.get_submodule("a.0").weight.shape[0] == 6
    assert pruned.net.get_submodule("keep.0").weight.shape[0] < 4
    # The reversed tuple has no compact form either: the union layout runs it.
    assert pruned.compact_plan() is None and "returns several tensors" in pruned.compact_error
    x, d = torch.randn(5, 3, SIZE, SIZE), torch.tensor([2, 0, 1, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x, d), model(x, d), **TOL)


class Halves(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = _cbr(3, 4), _cbr(3, 4)
        self.c, self.d = _cbr(4, 3), _cbr(4, 3)
        self.head = nn.Linear(6, CLASSES[0])

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        p, q = y.chunk(2, 1)  # p: channels 0, 1 of a and of b; q: channels 2, 3
        return self.head(torch.cat([self.c(p), self.d(q)], 1).mean((2, 3)))


def test_a_split_half_that_keeps_no_channel_keeps_one_zero_channel():
    torch.manual_seed(0)
    model = _convert(Halves())
    set_masks(model, keep=0.5, shared=0.0, seed=0)
    for name in ("a.0", "b.0"):  # every domain keeps channels 2 and 3 only
        scores = model.module.get_submodule(name).scores
        scores.data[:] = torch.tensor([-1.0, -1.0, 1.0, 1.0])
    per_domain_statistics(model, SIZE)
    pruned = fastmdl.prune(model)
    first, second = (m for m in pruned.net.modules() if isinstance(m, ChannelSelect)
                     and m.index.numel() < 5)
    assert min(first.index.numel(), second.index.numel()) == 1  # one (zero) channel, not none
    assert pruned.net.get_submodule("c.0").weight.shape[1] == 1
    check_every_layout(pruned, model, "Halves", SIZE, **TOL)


def test_runs_of_an_axis():
    axis = graph.Axis(((0, 0, 4), (1, 0, 4)))
    shuffled = axis.select(graph._shuffle_index(8, 2).tolist())
    assert shuffled.segments == ((0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1),
                                 (0, 2, 1), (1, 2, 1), (0, 3, 1), (1, 3, 1))
    assert axis.select(range(2, 6)).segments == ((0, 2, 2), (1, 0, 2))
    assert shuffled.select([0, 2, 4]).segments == ((0, 0, 3),)  # consecutive: one run
    assert graph._shuffle_index(6, 3).tolist() == [0, 2, 4, 1, 3, 5]


def test_channel_select():
    x = torch.randn(2, 7, 3, 3)
    gather = ChannelSelect(torch.tensor([4, 0, 6]))
    run = ChannelSelect(torch.arange(2, 5))
    assert torch.equal(gather(x), x[:, [4, 0, 6]])
    assert torch.equal(run(x), x[:, 2:5]) and run(x).data_ptr() == x[:, 2:].data_ptr()
    with pytest.raises(ValueError, match="at least 7 channels"):
        gather(x[:, :6])
    with pytest.raises(TypeError, match="index must be a torch.Tensor"):
        ChannelSelect([1, 2])
    with pytest.raises(ValueError, match="non-empty 1-D int64"):
        ChannelSelect(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="non-empty 1-D int64"):
        ChannelSelect(torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match=">= 0"):
        ChannelSelect(torch.tensor([1, -1]))


def test_load_refuses_a_selection_past_its_input(tmp_path):
    torch.manual_seed(0)
    model = _convert(ShuffleSplit("view", "chunk"))
    set_masks(model, keep=0.5, shared=0.0, seed=3)
    pruned = fastmdl.prune(model.eval())
    path = tmp_path / "m.fmdl"
    fastmdl.save(pruned, path)
    name = next(n for n, m in pruned.net.named_modules() if isinstance(m, ChannelSelect))

    def far(tensors):
        tensors[f"{name}.index"][0] = 999

    _rewrite(path, edit_tensors=far)
    with pytest.raises(ValueError, match=f"{name}.*selects channels up to 999"):
        fastmdl.load(path)

    def negative(tensors):
        tensors[f"{name}.index"][0] = -1

    fastmdl.save(pruned, path)
    _rewrite(path, edit_tensors=negative)
    with pytest.raises(ValueError, match="numbered from 0"):
        fastmdl.load(path)


def test_pagcp_keeps_shuffled_channels_whole_and_counts_them_right():
    """PAGCP's surgery slices layers and does not rewrite selections: the groups
    whose channels are shuffled (a, b) keep their width, the others may be cut, and
    its FLOP counts are cost_report's, the mixture's masks included."""
    torch.manual_seed(0)
    model = _convert(ShuffleSplit("view", "chunk"))
    set_masks(model, keep=0.5, shared=0.0, seed=3)
    per_domain_statistics(model, SIZE)
    x, y = torch.randn(6, 3, SIZE, SIZE), torch.randint(0, 3, (6,))

    def task(d):
        def loss(net):
            with torch.no_grad():
                return float(F.cross_entropy(net(x, d)[:, :3], y))
        return loss

    tasks = {f"domain {d}": task(d) for d in range(3)}
    out, report = fastmdl.pagcp(model, tasks, initial_threshold=5.0, ratios=(0.25, 0.5))
    assert report.flops_before == pytest.approx(fastmdl.cost_report(model).union["flops"])
    assert report.flops_after == pytest.approx(fastmdl.cost_report(out).union["flops"])
    assert {r.name for r in report.groups} == {"c.0"}
    assert out.module.a[0].out_channels == out.module.b[0].out_channels == 6
    with torch.no_grad():
        want, got = out(x, 2), fastmdl.prune(out)(x, 2)
    torch.testing.assert_close(got, want, **TOL)


def test_the_padded_storage_with_selections_compiles_in_one_graph():
    torch.manual_seed(0)
    model = _convert(ShuffleSplit("view", "chunk"))
    set_masks(model, keep=0.5, shared=0.0, seed=3)
    per_domain_statistics(model, SIZE)
    pruned = fastmdl.prune(model)
    x = torch.randn(6, 3, SIZE, SIZE)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(pruned, fullgraph=True)  # inductor
        with torch.no_grad():
            for d in (torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([2, 2, 0, 2, 2, 0])):
                torch.testing.assert_close(compiled(x, d), model(x, d), **TOL)
    finally:
        torch._dynamo.reset()


def test_the_budget_sees_the_mixture_and_training_moves_both_groups():
    """The budget's cost of the depthwise convolution over the mixture is a function
    of both groups' masks: its gradient reaches the scores of a and b."""
    torch.manual_seed(0)
    model = _convert(ShuffleSplit("view", "chunk"))
    loss = fastmdl.BudgetLoss(model, budget=0.3, metric="flops", sharing="jaccard")
    layers = {layer.name: layer for layer in fastmdl.cost.multidomain_layers(model)}
    assert layers["dw"].out_masks.shape == (3, 6) and layers["dw"].out_masks.requires_grad
    loss().backward()
    for name in ("a", "b"):
        assert model.module.get_submodule(name)[0].scores.grad.abs().sum() > 0
    fastmdl.train(model, [_batches(k) for k in CLASSES], epochs=1, budget=0.5,
                  train_weights=True, progress=False, log=None, recalibrate=1)
    pruned = fastmdl.prune(model.eval())
    x, d = torch.randn(5, 3, SIZE, SIZE), torch.tensor([2, 0, 1, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x, d), model(x, d), **TOL)


def _batches(classes: int):
    g = torch.Generator().manual_seed(classes)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, SIZE, SIZE, generator=g),
                                          torch.randint(0, classes, (8,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4)


class CatDepthwise(nn.Module):
    """A depthwise convolution (with a bias) over the concatenation of two groups:
    the same mixture as a shuffle's, in whole runs."""

    def __init__(self):
        super().__init__()
        self.a, self.b = _cbr(3, 5), _cbr(3, 4)
        self.dw = nn.Conv2d(9, 9, 3, padding=1, groups=9)
        self.c = _cbr(9, 6)
        self.head = nn.Linear(6, CLASSES[0])

    def forward(self, x):
        y = self.dw(torch.cat([self.a(x), self.b(x)], 1))
        return self.head(self.c(F.relu(y)).mean((2, 3)))


def test_a_depthwise_convolution_over_a_concatenation_prunes_with_both_groups(tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = _convert(CatDepthwise())
    assert [s.width for s in model.module.dw.out_segments] == [5, 4]
    set_masks(model, keep=0.5, shared=0.0, seed=4)
    per_domain_statistics(model, SIZE)
    pruned = fastmdl.prune(model)
    kept = [pruned.net.get_submodule(n).weight.shape[0] for n in ("a.0", "b.0", "dw")]
    assert kept[2] == kept[0] + kept[1] < 9
    check_every_layout(pruned, model, "CatDepthwise", SIZE, **TOL)
    # PAGCP's surgery does not cut the groups the depthwise convolution mixes.
    x, y = torch.randn(6, 3, SIZE, SIZE), torch.randint(0, 3, (6,))
    tasks = {"all": lambda net: float(F.cross_entropy(net(x, 0)[:, :3], y))}
    with torch.no_grad():
        out, report = fastmdl.pagcp(model, tasks, initial_threshold=5.0, ratios=(0.5,))
    assert {r.name for r in report.groups} == {"c.0"}
