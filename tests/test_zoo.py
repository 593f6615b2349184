"""torchvision's classification networks (their look-alikes in tests/zoo.py)
through convert and prune, the way a new user would run them."""

import functools

import pytest
import torch
from torch import nn

import fastmdl
import zoo
from fastmdl.pruned import PrunedConv2d
from pruned_model import set_masks  # benchmarks/pruned_model.py

SIZE = 64  # every network here divides by 32: a 2x2 map before the pooling
NUM_CLASSES = [10, 4, 7]
ZOO = {
    "resnet18": zoo.resnet18,
    "resnet50": zoo.resnet50,
    "resnext50_32x4d": zoo.resnext50_32x4d,
    "densenet121": zoo.densenet121,
    "mobilenet_v2": zoo.mobilenet_v2,
    "efficientnet_b0": zoo.efficientnet_b0,
    # A layer scale of 0.5, not 1e-6: the MLP's pruned channels must move the output.
    "convnext_tiny": functools.partial(zoo.convnext_tiny, layer_scale=0.5),
    "regnet_y_400mf": zoo.regnet_y_400mf,
    "shufflenet_v2_x1_0": zoo.shufflenet_v2_x1_0,
}

# torchvision's published parameter counts (the weights' meta) at 1000 classes.
TORCHVISION_PARAMS = {
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "resnext50_32x4d": 25_028_904,
    "densenet121": 7_978_856,
    "mobilenet_v2": 3_504_872,
    "efficientnet_b0": 5_288_548,
    "convnext_tiny": 28_589_128,
    "regnet_y_400mf": 4_344_144,
    "shufflenet_v2_x1_0": 2_278_604,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on two cores with one busy elsewhere, two threads made
    the densenet121 case take 26 s instead of 2.7 s (each of its hundreds of small
    ops waits for both threads); on these small batches one thread costs little."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(ZOO))
def test_parameter_counts_match_torchvision(name):
    net = ZOO[name](num_classes=1000)
    assert sum(p.numel() for p in net.parameters()) == TORCHVISION_PARAMS[name]


@pytest.mark.parametrize("name", list(ZOO))
def test_pruned_equals_the_masked_model(name, tmp_path):
    torch.manual_seed(0)
    net = ZOO[name](num_classes=10).eval()
    for bn in net.modules():
        if isinstance(bn, nn.BatchNorm2d):
            # A cumulative average: the statistics become the domain's own batches'.
            # With momentum 0.1 two batches leave them 81% the initial (0, 1), which
            # saturates ReLU6s and lets signals vanish; dropping a filter of an early
            # group then moved the logits by under 1e-8, which no check could see.
            bn.momentum = None
    model = fastmdl.convert(net, num_domains=3, num_classes=NUM_CLASSES,
                            input_size=(3, SIZE, SIZE))
    assert len(model.mask_groups()) > 0
    set_masks(model, keep=0.5, shared=0.0, seed=0)  # each domain its own random half
    for group in model.mask_groups():
        assert ((group.scores > 0).sum(dim=1) >= 1).all(), group.name

    model.train()
    with torch.no_grad():  # per-domain BatchNorm statistics, from each domain's samples
        for _ in range(2):
            model(torch.randn(6, 3, SIZE, SIZE) * 2 + 0.5, torch.arange(6) % 3)
    model.eval()
    pruned = fastmdl.prune(model)

    x = torch.randn(6, 3, SIZE, SIZE)
    cases = {"mixed batch": (x, torch.tensor([0, 1, 2, 2, 1, 0])),
             "one domain": (x, 1),
             "batch of 1": (x[:1], 2),
             "batch of 1, tensor domain": (x[:1], torch.tensor([0]))}
    assert pruned.compact_plan() is not None, pruned.compact_error
    with torch.no_grad():
        for layout in ("compact", "union"):
            pruned.layout = layout
            for case, (xs, domain) in cases.items():
                torch.testing.assert_close(
                    pruned(xs, domain), model(xs, domain), rtol=1e-4, atol=1e-4,
                    msg=lambda m, case=case, layout=layout: f"{layout}, {case}: {m}")
        # Saved and loaded, it is the same network (every layer and function of the
        # family is on the allowlist; RegNet's "block1-0" names included).
        fastmdl.save(pruned, tmp_path / "m.fmdl")
        back = fastmdl.load(tmp_path / "m.fmdl")
        xs, domain = cases["mixed batch"]
        torch.testing.assert_close(back(xs, domain), model(xs, domain), rtol=1e-4, atol=1e-4)
    n_conv_before = sum(c.weight.numel() for c in model.modules()
                        if isinstance(c, fastmdl.Conv2d))
    n_conv_after = sum(c.weight.numel() for c in pruned.modules()
                       if isinstance(c, PrunedConv2d))
    assert n_conv_after < n_conv_before
