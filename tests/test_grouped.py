"""Grouped convolutions with C_in = C_out (ResNeXt, RegNet) prune in whole groups.

Output group j of such a convolution reads input group j alone, so its output
channels are its input's, kept or removed a group (a *block* of C/groups
channels) at a time: one mask decision per block, by the block's mean score,
with a straight-through gradient to every score. The pruned network keeps the
groups some domain uses and must compute what the masked model computes, in both
layouts and after save/load; grouped convolutions with C_in != C_out, and ones
over a concatenation, keep their channels whole."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmdl
from fastmdl import graph
from fastmdl.cost import costs, multidomain_layers
from fastmdl.masks import binarize, hard_mask
from fastmdl.pruned import PrunedConv2d
from layouts import check_every_layout, per_domain_statistics

SIZE = 16
NUM_CLASSES = [5, 3, 4]
TOL = dict(rtol=1e-4, atol=1e-4)


def _cbr(cin, cout, k=1, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU())


class XBlock(nn.Module):
    """RegNet's X block / ResNeXt's bottleneck: 1x1, grouped 3x3 (maybe strided),
    1x1, and a projection shortcut when the shape changes."""

    def __init__(self, cin, cout, width, groups, stride=1):
        super().__init__()
        self.a = _cbr(cin, width)
        self.b = _cbr(width, width, 3, stride, groups)
        self.c = nn.Sequential(nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.proj = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        short = x if self.proj is None else self.proj(x)
        return F.relu(short + self.c(self.b(self.a(x))))


class GroupedNet(nn.Module):
    """Blocks with 4, 6 and 3 channels per group, a stride, and a grouped 3x3 that
    reads the residual stream itself (its groups then tie the stream in blocks)."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.stem = _cbr(3, 12, 3)
        self.blocks = nn.Sequential(XBlock(12, 12, 16, 4), XBlock(12, 24, 24, 4, stride=2))
        self.on_stream = nn.Sequential(nn.Conv2d(24, 24, 3, 1, 1, groups=8, bias=False),
                                       nn.BatchNorm2d(24))
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        x = F.relu(x + self.on_stream(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _convert(net=None, **kwargs):
    torch.manual_seed(0)
    net = (net or GroupedNet(NUM_CLASSES[0])).eval()
    for bn in net.modules():
        if isinstance(bn, nn.BatchNorm2d):
            bn.momentum = None  # each domain's statistics: its own batches' average
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # frozen layers are reported
        return fastmdl.convert(net, 3, NUM_CLASSES, input_size=(3, SIZE, SIZE), **kwargs)


def _group_of(model, name):
    found = [g for g in model.mask_groups() if name in g.members]
    assert len(found) == 1, f"{name} is in {len(found)} mask groups"
    return found[0]


def _random_scores(model, seed=0):
    """Random scores per channel (so blocks mix signs and their mean decides);
    domain 1 keeps nothing of the first blocked group, domain 2 one block of it."""
    g = torch.Generator().manual_seed(seed)
    for group in model.mask_groups():
        group.scores.data = torch.rand(group.scores.shape, generator=g) - 0.5
    first = next(grp for grp in model.mask_groups() if grp.block > 1)
    first.scores.data[1] = -1.0
    first.scores.data[2] = -1.0
    first.scores.data[2, :first.block] = 0.3
    return first


def _per_domain_statistics(model):
    per_domain_statistics(model, SIZE)


def test_block_masks_decide_by_the_mean_with_a_straight_through_gradient():
    scores = torch.tensor([[0.5, -0.2, -0.1, -0.1, 0.3, 0.4]], requires_grad=True)
    m = binarize(scores, 3)
    assert m.tolist() == [[1.0, 1.0, 1.0, 1.0, 1.0, 1.0]]  # means 0.067 and 0.2
    assert hard_mask(scores.detach() - 0.1, 3).tolist() == [[False] * 3 + [True] * 3]
    (m * torch.arange(6.0)).sum().backward()
    assert scores.grad.tolist() == [[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]
    with pytest.raises(ValueError, match="block must divide the 6 channels"):
        hard_mask(scores, 4)


def test_grouped_convs_join_their_inputs_group_in_blocks():
    model = _convert()
    g_inner = _group_of(model, "blocks.0.b.0")
    assert g_inner.members == ("blocks.0.a.0", "blocks.0.b.0") and g_inner.block == 4
    assert _group_of(model, "blocks.1.b.0").block == 6
    # The stream's group is read by the grouped conv with groups of 3 channels.
    stream = _group_of(model, "on_stream.0")
    assert stream.block == 3 and "blocks.1.c.0" in stream.members
    for group in model.mask_groups():
        for name in group.members:
            conv = model.module.get_submodule(name)
            assert conv.scores is group.scores and conv.mask_block == group.block
    assert model.frozen_layers()["layers"] == []


def test_masks_are_constant_on_blocks_everywhere_they_are_read():
    model = _convert()
    _random_scores(model)
    for group in model.mask_groups():
        m = group.mask().reshape(3, -1, group.block)
        assert torch.equal(m, m[..., :1].expand_as(m))
    conv = model.module.get_submodule("blocks.0.b.0")
    bn = model.module.get_submodule("blocks.0.b.1")
    from fastmdl.masks import segment_masks

    # binarize's straight-through sum s + (m - s) is m only to float rounding
    torch.testing.assert_close(conv.masks().detach(),
                               segment_masks(bn.mask_segments, 3, hard=True))


@pytest.fixture(scope="module")
def pruned_pair():
    model = _convert()
    _random_scores(model)
    _per_domain_statistics(model)
    return model, fastmdl.prune(model)


def test_pruned_keeps_whole_groups(pruned_pair):
    model, pruned = pruned_pair
    for name, block in (("blocks.0.b.0", 4), ("blocks.1.b.0", 6), ("on_stream.0", 3)):
        kept = _group_of(model, name).mask().amax(0)
        conv = pruned.net.get_submodule(name)
        assert isinstance(conv, PrunedConv2d)
        assert conv.weight.shape[0] == int(kept.sum()) and conv.weight.shape[1] == block
        assert conv.groups == int(kept.sum()) // block
    # Domain 1 masks every block of the first blocked group: the union still holds
    # one whole group there, so no tensor is empty.
    assert pruned.net.get_submodule("blocks.0.b.0").weight.shape[0] % 4 == 0


def test_pruned_equals_the_masked_model(pruned_pair):
    model, pruned = pruned_pair
    check_every_layout(pruned, model, "grouped", SIZE, **TOL)


def test_save_and_load(pruned_pair, tmp_path):
    model, pruned = pruned_pair
    fastmdl.save(pruned, tmp_path / "grouped.fmdl")
    back = fastmdl.load(tmp_path / "grouped.fmdl")
    x, d = torch.randn(6, 3, SIZE, SIZE), torch.tensor([2, 0, 1, 1, 0, 2])
    with torch.no_grad():
        torch.testing.assert_close(back(x, d), model(x, d), **TOL)


def test_a_grouped_conv_costs_its_kept_groups():
    model = _convert()
    _random_scores(model, seed=3)
    layer = next(la for la in multidomain_layers(model, hard=True) if la.name == "blocks.0.b.0")
    kept = _group_of(model, "blocks.0.b.0").mask().sum(1)  # (D,) channels kept
    flops = costs([layer], "flops").per_domain
    torch.testing.assert_close(flops, 9 * 4 * kept * SIZE * SIZE)


def test_fill_budget_turns_whole_groups_back_on():
    model = _convert()
    for group in model.mask_groups():
        group.scores.data.fill_(-1.0)  # every domain below any budget
    added = fastmdl.fill_budget(model, 0.5)
    assert all(a > 0 for a in added)
    for group in model.mask_groups():
        s = group.scores.detach().reshape(3, -1, group.block)
        assert torch.equal(s, s[..., :1].expand_as(s))  # no block half switched on
    c = costs(multidomain_layers(model, hard=True), "flops")
    assert bool((c.per_domain / c.baseline <= 0.5).all())


def test_other_grouped_convs_stay_whole():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _cbr(3, 8), _cbr(3, 8)
            self.widen = _cbr(8, 16, 3, groups=4)  # C_in != C_out
            self.over_cat = _cbr(24, 24, 3, groups=4)  # reads a concatenation
            self.fc = nn.Linear(24, 5)

        def forward(self, x):
            y = torch.cat([self.widen(self.a(x)), self.b(x)], 1)
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.over_cat(y), 1), 1))

    model = _convert(Odd())
    frozen = [name for name, _ in model.frozen_layers()["layers"]]
    assert {"widen.0", "over_cat.0"} <= set(frozen)
    assert not any(g.block > 1 for g in model.mask_groups())
    _random_scores_plain(model)
    _per_domain_statistics(model)
    pruned = fastmdl.prune(model)
    x, d = torch.randn(4, 3, SIZE, SIZE), torch.tensor([0, 2, 1, 0])
    with torch.no_grad():
        for layout in ("union", "compact"):
            pruned.layout = layout
            torch.testing.assert_close(pruned(x, d), model(x, d), **TOL)


def _random_scores_plain(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for group in model.mask_groups():
        group.scores.data = torch.rand(group.scores.shape, generator=g) - 0.5


def test_pagcp_leaves_blocked_groups_whole():
    from fastmdl.surgery import Network

    model = _convert()
    net = Network(model)
    names = {grp.name for grp in net.groups}
    blocked = {g.name for g in model.mask_groups() if g.block > 1}
    assert blocked and not (blocked & names)
    assert {g.name for g in model.mask_groups() if g.block == 1} <= names


def test_train_step_keeps_blocks_whole():
    model = _convert()
    g = torch.Generator().manual_seed(1)
    loaders = [[(torch.randn(4, 3, SIZE, SIZE, generator=g),
                 torch.randint(0, k, (4,), generator=g))] * 3 for k in NUM_CLASSES]
    fastmdl.train(model, loaders, epochs=2, budget=0.5, progress=False, log=None,
                  recalibrate=1)
    for group in model.mask_groups():
        m = group.mask().reshape(3, -1, group.block)
        assert torch.equal(m, m[..., :1].expand_as(m))
    _per_domain_statistics(model)
    pruned = fastmdl.prune(model)
    x, d = torch.randn(5, 3, SIZE, SIZE), torch.tensor([1, 0, 2, 2, 1])
    with torch.no_grad():
        torch.testing.assert_close(pruned(x, d), model(x, d), **TOL)


def test_tied_block_of_layers():
    assert graph.tied_block(nn.Conv2d(8, 8, 3, groups=8)) == 1
    assert graph.tied_block(nn.Conv2d(8, 8, 3, groups=2)) == 4
    assert graph.tied_block(nn.Conv2d(8, 16, 3, groups=2)) == 0
    assert graph.tied_block(nn.Conv2d(8, 8, 3)) == 0
