"""fastmdl.prune: a physically smaller network that computes the same function."""

import operator

import pytest
import torch
from torch import nn

import fastmdl
from fastmdl.pruned import PrunedBatchNorm2d, PrunedConv2d
from fastmdl.train import recalibrate_bn
from models import CatNet, ScaledNet, TinyResNet, TinyVGG
from problems import require_backend

MODELS = {"resnet": TinyResNet, "vgg": TinyVGG, "cat": CatNet, "scaled": ScaledNet}


def trained(make, num_classes=(5, 2, 7), seed=0, keep=0.55):
    """A converted model with random masks and per-domain BatchNorm statistics
    from a few mixed training batches."""
    torch.manual_seed(seed)
    m = fastmdl.convert(make(), len(num_classes), list(num_classes), input_size=(3, 8, 8))
    g = torch.Generator().manual_seed(seed)
    for group in m.mask_groups():
        group.scores.data = torch.rand(group.scores.shape, generator=g) - (1 - keep)
    groups = m.mask_groups()
    groups[0].scores.data[1] = -1.0  # domain 1 keeps exactly one filter of the first group
    groups[0].scores.data[1, 2] = 1.0
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(12, 3, 8, 8) * 2 + 0.5, torch.arange(12) % len(num_classes))
    return m.eval()


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("fuse", [True, False])
def test_pruned_equals_the_masked_model(name, fuse):
    m = trained(MODELS[name])
    p = fastmdl.prune(m, fuse=fuse)
    x = torch.randn(9, 3, 8, 8)
    domain = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2])
    with torch.no_grad():
        mixed = p(x, domain)
        for d in range(3):
            ref = m(x, d)
            torch.testing.assert_close(p(x, d), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mixed[domain == d], ref[domain == d], rtol=1e-5, atol=1e-5)
    n_pruned = sum(t.numel() for t in p.parameters())
    n_conv_before = sum(c.weight.numel() for c in m.modules() if isinstance(c, fastmdl.Conv2d))
    n_conv_after = sum(c.weight.numel() for c in p.modules() if isinstance(c, PrunedConv2d))
    assert n_conv_after < n_conv_before
    assert n_pruned == fastmdl.cost_report(p).union["params"]


def _calibration_data(seed=1, n=2):
    """Per domain, ``n`` batches whose statistics differ from the training batches'."""
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(6, 3, 8, 8, generator=g) * (1 + d) - d, torch.zeros(6, dtype=torch.long))
             for _ in range(n)] for d in range(3)]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("fuse", [True, False])
def test_recalibrating_the_pruned_model_equals_recalibrating_before_pruning(name, fuse):
    m = trained(MODELS[name])
    p = fastmdl.prune(m, fuse=fuse)
    data = _calibration_data()
    x = torch.randn(9, 3, 8, 8)
    domain = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2])
    with torch.no_grad():
        before = p(x, domain)
    recalibrate_bn(p, data, batches=2)
    recalibrate_bn(m, data, batches=2)
    ref = fastmdl.prune(m, fuse=fuse)
    with torch.no_grad():
        after, expected = p(x, domain), ref(x, domain)
    assert not torch.allclose(before, after, atol=1e-3)  # the statistics did change
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)
    for a, b in zip(p.net.modules(), ref.net.modules()):
        if isinstance(a, (PrunedConv2d, PrunedBatchNorm2d)) and a.has_stats:
            keep = (a.masks()[1] if isinstance(a, PrunedConv2d) else a.masks) > 0
            torch.testing.assert_close(a.bn_mean[keep], b.bn_mean[keep], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(a.bn_var[keep], b.bn_var[keep], rtol=1e-4, atol=1e-4)


def test_recalibration_of_one_domain_leaves_the_others_and_rejects_what_it_cannot_do():
    p = fastmdl.prune(trained(TinyResNet))
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        before = p(x, torch.tensor([0, 1, 2, 0, 1, 2]))
    data = _calibration_data()
    recalibrate_bn(p, [data[0], [], []], batches=2)  # domains 1 and 2 see no batch
    with torch.no_grad():
        after = p(x, torch.tensor([0, 1, 2, 0, 1, 2]))
    assert torch.equal(after[[1, 2, 4, 5]], before[[1, 2, 4, 5]])
    assert not torch.allclose(after[[0, 3]], before[[0, 3]], atol=1e-3)
    with pytest.raises(ValueError, match="sync"):
        recalibrate_bn(p, data, batches=1, sync=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        recalibrate_bn(p, [[(torch.randn(1, 3, 1, 1), None)], [], []], batches=1)
    for m in p.modules():  # a failed recalibration changes nothing
        if isinstance(m, (PrunedConv2d, PrunedBatchNorm2d)):
            assert m._unfolded is None
    with torch.no_grad():
        assert torch.equal(p(x, torch.tensor([0, 1, 2, 0, 1, 2])), after)
    for m in p.modules():
        if isinstance(m, (PrunedConv2d, PrunedBatchNorm2d)):
            m.set_bn_stats(None)
    with pytest.raises(TypeError, match="no BatchNorm statistics"):
        recalibrate_bn(p, data, batches=1)


def test_resnet_fuses_bn_residual_and_relu_into_the_op():
    p = fastmdl.prune(trained(TinyResNet))
    assert not any(isinstance(mod, (PrunedBatchNorm2d, nn.BatchNorm2d)) for mod in p.modules())
    convs = dict(p.net.named_modules())
    assert convs["layer2.0.conv2"].relu and convs["conv1"].relu
    code = p.net.code
    assert "relu" not in code.replace("relu = ", "")  # every ReLU went into an epilogue
    assert "add" not in code


def test_a_layer_scale_folds_into_the_convolution_before_it():
    """ConvNeXt's layer scale: a product with one constant per channel after a
    convolution (and its BatchNorm) joins the convolution's scale and shift, so the
    residual add fuses too; after a ReLU it cannot, and stays."""
    p = fastmdl.prune(trained(ScaledNet))
    ops = [n.target for n in p.net.graph.nodes if n.op in ("call_function", "call_method")]
    assert ops.count(operator.mul) + ops.count("mul") == 1  # scale_c, after the ReLU
    names = dict(p.net.named_parameters())
    assert "scale_a" not in names and "scale_b" not in names and "scale_c" in names
    for conv in ("a2.0", "b"):
        layer = p.net.get_submodule(conv)
        assert layer.scale is not None
        assert any(n.op == "call_module" and n.target == conv and len(n.args) == 3
                   for n in p.net.graph.nodes)  # the residual add is its third input


def test_removes_filters_no_domain_uses():
    m = trained(TinyResNet)
    g = next(g for g in m.mask_groups() if g.members == ("layer2.0.conv1",))
    g.scores.data[:, :5] = -1.0  # no domain keeps filters 0..4
    g.scores.data[:, 5:] = 1.0
    p = fastmdl.prune(m)
    assert p.net.get_submodule("layer2.0.conv1").weight.shape[0] == 12 - 5
    assert p.net.get_submodule("layer2.0.conv2").weight.shape[1] == 12 - 5
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(p(x, 1), m(x, 1), rtol=1e-5, atol=1e-5)


def test_a_group_nobody_uses_keeps_one_dead_channel():
    m = trained(TinyVGG)
    m.mask_groups()[1].scores.data[:] = -1.0
    p = fastmdl.prune(m)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(p(x, 2), m(x, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_backends_agree(backend):
    require_backend(backend, "cpu")
    m = trained(TinyResNet)
    p = fastmdl.prune(m)
    p.backend = backend
    p.layout = "union"  # the backends run the union layout's op
    x = torch.randn(5, 3, 8, 8)
    domain = torch.tensor([2, 2, 0, 1, 0])
    with torch.no_grad():
        torch.testing.assert_close(p(x, domain), m(x, domain), rtol=1e-5, atol=1e-5)


def test_pruned_model_fine_tunes_on_mixed_batches():
    p = fastmdl.prune(trained(TinyResNet))
    p.train()
    y = p(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    torch.nn.functional.cross_entropy(y, torch.tensor([1, 0, 3, 4])).backward()
    conv = p.net.get_submodule("layer1.0.conv1")
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert conv.scale.grad is not None


def test_cost_report_of_pruned_matches_the_masked_model():
    m = trained(TinyResNet)
    p = fastmdl.prune(m)
    before, after = fastmdl.cost_report(m), fastmdl.cost_report(p)
    assert after.union["flops"] == pytest.approx(before.union["flops"])
    for a, b in zip(after.domains, before.domains):
        assert a["flops"] == pytest.approx(b["flops"])
        assert a["baseline_flops"] == pytest.approx(b["baseline_flops"])
    assert after.union["params"] < after.baseline["params"] * 3
    text = str(after)
    assert "union (one network)" in text and "domain 2" in text


def test_prune_and_pruned_forward_reject_bad_input():
    with pytest.raises(TypeError, match="MultiDomainModel"):
        fastmdl.prune(TinyResNet())
    p = fastmdl.prune(trained(TinyResNet))
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="out of range"):
        p(x, 3)
    with pytest.raises(ValueError, match="out of range"):
        p(x, torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="channels"):
        p(torch.randn(2, 4, 8, 8), 0)
    with pytest.raises(TypeError, match="dtype"):
        p(x.double(), 0)
    with pytest.raises(ValueError, match="backend"):
        p.backend = "cuda-magic"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pruned_runs_on_cuda():
    m = trained(TinyResNet)
    p = fastmdl.prune(m).cuda()
    x = torch.randn(6, 3, 8, 8)
    domain = torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        torch.testing.assert_close(p(x.cuda(), domain.cuda()).cpu(), m(x, domain),
                                   rtol=1e-2, atol=1e-2)  # TF32 on the GPU


@pytest.mark.parametrize("layout", ["auto", "union"])
def test_pruned_model_compiles_in_one_graph(layout):
    m = trained(TinyResNet)
    p = fastmdl.prune(m)
    p.layout = layout  # auto: the compact layout's padded storage
    torch._dynamo.reset()
    compiled = torch.compile(p, fullgraph=True)
    x = torch.randn(6, 3, 8, 8)
    domain = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, domain), p(x, domain))
