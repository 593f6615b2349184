"""fastmdl.convert: module swaps, coupled channel groups found by tracing, the
domain hand-over, and bad input."""

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmdl
from models import CatNet, TinyResNet, TinyVGG


def random_masks(model, seed=0, keep=0.6):
    g = torch.Generator().manual_seed(seed)
    for group in model.mask_groups():
        group.scores.data = torch.rand(group.scores.shape, generator=g) - (1 - keep)


def test_resnet_groups_follow_the_residual_adds():
    m = fastmdl.convert(TinyResNet(), 3, [5, 2, 7], input_size=(3, 8, 8))
    members = {g.members for g in m.mask_groups()}
    assert ("conv1", "layer1.0.conv2") in members  # stem output meets layer1's add
    assert ("layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2") in members
    assert ("layer3.0.conv2", "layer3.0.downsample.0") in members
    for name in ("layer1.0.conv1", "layer2.0.conv1", "layer2.1.conv1", "layer3.0.conv1"):
        assert (name,) in members
    for g in m.mask_groups():
        convs = [m.module.get_submodule(n) for n in g.members]
        assert all(c.scores is g.scores for c in convs)
        assert g.scores.shape == (3, convs[0].out_channels)
    assert isinstance(m.module.fc, fastmdl.DomainHeads) and m.module.fc.num_classes == [5, 2, 7]
    assert isinstance(m.module.layer2[0].downsample[1], fastmdl.BatchNorm2d)


def test_convert_copies_weights_and_leaves_the_original_alone():
    torch.manual_seed(0)
    net = TinyResNet(num_classes=5).eval()
    for mod in net.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
    m = fastmdl.convert(net, 2, [5, 5], input_size=(3, 8, 8)).eval()
    assert isinstance(net.conv1, nn.Conv2d) and not isinstance(net.conv1, fastmdl.Conv2d)
    x = torch.randn(3, 3, 8, 8)
    for d in range(2):
        torch.testing.assert_close(m(x, d), net(x))  # every filter kept: the original function


def test_concatenation_masks_each_branch_and_the_bn_after_the_cat():
    m = fastmdl.convert(CatNet(), 2, [3, 4], input_size=(3, 8, 8))
    assert {g.members for g in m.mask_groups()} == {("a",), ("b",), ("mix",)}
    bn = m.module.bn_cat
    assert [(s.width, s.block, s.start) for s in bn.mask_segments] == [(6, 1, 0), (5, 1, 0)]
    assert bn.mask_segments[0][0] is m.module.a.scores


def test_vgg_linear_after_flatten_is_shared_and_the_last_linear_is_the_head():
    m = fastmdl.convert(TinyVGG(), 2, [4, 3], input_size=(3, 8, 8))
    assert isinstance(m.module.classifier[0], nn.Linear)
    assert isinstance(m.module.classifier[3], fastmdl.DomainHeads)
    info = m.layer_infos()["classifier.0"]
    assert info.in_axis.repeat == 4  # a 2x2 map per channel


def test_unknown_ops_freeze_channels_instead_of_guessing():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            y = torch.sigmoid(self.a(x))  # sigmoid(0) != 0: a's filters cannot be masked
            y = self.b(y) + 1.0  # adding a constant: b's cannot either
            return self.fc(y.mean((2, 3)))

    m = fastmdl.convert(Odd(), 2, [2, 2], input_size=(3, 6, 6))
    assert m.mask_groups() == []
    assert not m.module.a.prunable and not m.module.b.prunable


def test_mixed_batch_rows_equal_one_domain_at_a_time():
    torch.manual_seed(3)
    m = fastmdl.convert(TinyResNet(), 3, [5, 2, 7], input_size=(3, 8, 8))
    random_masks(m)
    m.eval()
    x = torch.randn(6, 3, 8, 8)
    domain = torch.tensor([2, 0, 1, 1, 0, 2])
    y = m(x, domain)
    for d in range(3):
        rows = domain == d
        torch.testing.assert_close(y[rows], m(x[rows], d))


def test_threads_each_see_their_own_domain():
    torch.manual_seed(4)
    m = fastmdl.convert(TinyResNet(), 4, [5, 5, 5, 5], input_size=(3, 8, 8))
    random_masks(m)
    m.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = [m(x, d) for d in range(4)]
    errors, barrier = [], threading.Barrier(8)

    def run(d):
        barrier.wait()
        with torch.no_grad():
            for _ in range(20):
                if not torch.equal(m(x, d), expected[d]):
                    errors.append(d)

    threads = [threading.Thread(target=run, args=(i % 4,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_training_step_moves_scores_bn_and_heads():
    torch.manual_seed(5)
    m = fastmdl.convert(TinyResNet(), 2, [5, 3], input_size=(3, 8, 8))
    y = m(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 1, 0]))
    F.cross_entropy(y, torch.tensor([4, 2, 0, 1])).backward()
    assert all(g.scores.grad is not None and g.scores.grad.abs().sum() > 0 for g in m.mask_groups())
    assert m.module.bn1.weight.grad[1].abs().sum() > 0
    assert m.module.fc.weights[1].grad.abs().sum() > 0


def test_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        fastmdl.convert(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), 2)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fastmdl.convert("resnet", 2)
    with pytest.raises(ValueError, match="one class count per domain"):
        fastmdl.convert(TinyResNet(), 3, [5, 2], input_size=(3, 8, 8))
    with pytest.raises(ValueError, match="num_classes"):
        fastmdl.convert(TinyResNet(), 2, [5, 0], input_size=(3, 8, 8))
    with pytest.raises(ValueError, match="input_size"):
        fastmdl.convert(TinyResNet(), 2, input_size=(8, 8))
    with pytest.raises(ValueError, match="input_size"):
        fastmdl.convert(TinyVGG(), 2, input_size=(3, 5, 5))  # the flatten needs 8x8

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: not traceable
                x = self.c(x)
            return self.fc(x.mean((2, 3)))

    with pytest.raises(ValueError, match="could not trace"):
        fastmdl.convert(Branchy(), 2, input_size=(3, 4, 4))

    class NoHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 1)

        def forward(self, x):
            return self.c(x)

    with pytest.raises(ValueError, match="classifier head"):
        fastmdl.convert(NoHead(), 2, input_size=(3, 4, 4))

    m = fastmdl.convert(TinyResNet(), 3, input_size=(3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="out of range"):
        m(x, 3)
    with pytest.raises(ValueError, match="out of range"):
        m(x, torch.tensor([0, -1]))
    with pytest.raises(TypeError, match="domain"):
        m(x, 1.0)
    with pytest.raises(ValueError, match="4-D"):
        m(x[0], 0)
