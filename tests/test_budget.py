"""BudgetLoss and the differentiable cost model."""

import math

import pytest
import torch

import fastmdl
from fastmdl.cost import costs, multidomain_layers
from models import TinyResNet, TinyVGG


def model(num_domains=3, make=TinyResNet):
    torch.manual_seed(0)
    return fastmdl.convert(make(), num_domains, input_size=(3, 8, 8))


def conv_flops(m, d):
    """FLOPs of domain d counted by hand with forward hooks: k*c_in*c_out*H*W over
    the channels that really carry signal for d (non-zero somewhere)."""
    total = 0

    def hook(conv, args, y):
        nonlocal total
        x = args[0]
        live_in = int((x.abs().sum(dim=(0, 2, 3)) > 0).sum())
        live_out = int((conv.scores[d] > 0).sum()) if conv.prunable else conv.out_channels
        total += (conv.kernel_size[0] * conv.kernel_size[1] * live_in * live_out
                  * y.shape[2] * y.shape[3])

    hooks = [c.register_forward_hook(hook) for c in m.modules() if isinstance(c, fastmdl.Conv2d)]
    with torch.no_grad():
        m.eval()(torch.randn(64, 3, 8, 8), d)
    for h in hooks:
        h.remove()
    return total


def test_cost_model_counts_kept_inputs_and_outputs():
    m = model()
    g = torch.Generator().manual_seed(1)
    for group in m.mask_groups():
        group.scores.data = torch.rand(group.scores.shape, generator=g) - 0.5
    layers = multidomain_layers(m, hard=True)
    flops = costs(layers, "flops")
    head = next(l for l in layers if l.kind == "head")
    for d in range(3):
        head_flops = float(head.in_masks[d].sum()) * 5  # kept features x classes
        assert float(flops.per_domain[d]) == pytest.approx(conv_flops(m, d) + head_flops)
    assert bool((flops.per_domain <= flops.union).all())
    assert float(flops.intersection) <= float(flops.per_domain.min())


def test_budget_loss_is_zero_under_budget_and_pushes_scores_down_above_it():
    m = model()
    loss = fastmdl.BudgetLoss(m, budget=1.0)
    assert float(loss().detach()) == 0.0
    loss = fastmdl.BudgetLoss(m, budget=0.25, metric="params")
    value = loss()
    assert float(value.detach()) == pytest.approx(3 * 0.75, rel=1e-4)
    # exponentiated dual ascent: x exp(dual_lr (r - b)), dual_lr 1, r - b = 0.75
    assert loss.multipliers.tolist() == pytest.approx([math.exp(0.75)] * 3)
    value.backward()
    for group in m.mask_groups():
        assert (group.scores.grad > 0).all()  # descending lowers every score
    parts = loss.parts()
    assert parts["cost"] == pytest.approx([1.0, 1.0, 1.0])
    assert set(parts) >= {"cost", "union", "intersection", "sharing", "sharing_weight", "total"}


@pytest.mark.parametrize("sharing", ["intersection", "union", "jaccard"])
def test_sharing_is_zero_when_domains_agree_and_positive_when_they_differ(sharing):
    m = model(2, TinyVGG)
    loss = fastmdl.BudgetLoss(m, 1.0, sharing=sharing, sharing_weight=1.0)
    loss()
    assert loss.parts()["sharing"] == pytest.approx(0.0, abs=1e-6)
    for group in m.mask_groups():
        group.scores.data[0, ::2] = -1.0
        group.scores.data[1, 1::2] = -1.0
    loss()
    assert loss.parts()["sharing"] > 0.1


def test_learnable_sharing_weight_is_a_parameter():
    m = model(2)
    loss = fastmdl.BudgetLoss(m, 0.5, sharing="jaccard")
    assert [n for n, _ in loss.named_parameters()] == ["sharing_param"]
    assert float(loss.sharing_weight().detach()) == pytest.approx(1.0)


def test_bad_arguments():
    m = model(2)
    for budget in (0, 1.5, -0.1, "half", True):
        with pytest.raises(ValueError, match="budget"):
            fastmdl.BudgetLoss(m, budget)
    with pytest.raises(ValueError, match="metric"):
        fastmdl.BudgetLoss(m, 0.5, metric="latency")
    with pytest.raises(ValueError, match="sharing"):
        fastmdl.BudgetLoss(m, 0.5, sharing="dice")
    with pytest.raises(ValueError, match="sharing_weight"):
        fastmdl.BudgetLoss(m, 0.5, sharing="union", sharing_weight=-1.0)
    with pytest.raises(TypeError, match="MultiDomainModel"):
        fastmdl.BudgetLoss(TinyResNet(), 0.5)


def test_multipliers_fall_back_once_under_budget_and_stay_put_in_eval():
    m = model(2)
    loss = fastmdl.BudgetLoss(m, 0.5, dual_lr=1.0, budget_weight=0.5)
    for _ in range(3):  # every filter on: each domain 0.5 over budget
        loss()
    grown = 0.5 * math.exp(1.5)  # exponentiated dual ascent: x e^(0.5) a call
    assert loss.multipliers.tolist() == pytest.approx([grown, grown])
    for group in m.mask_groups():
        group.scores.data[:] = -1.0  # everything off: far under budget
    loss()
    assert all(0.5 <= v < grown for v in loss.multipliers.tolist())
    for _ in range(40):
        loss()
    assert loss.multipliers.tolist() == pytest.approx([0.5, 0.5])  # back to the floor
    loss.eval()
    before = loss.multipliers.clone()
    loss()
    assert torch.equal(loss.multipliers, before)


@pytest.mark.parametrize("steps", [64, 192])
@pytest.mark.parametrize("case", ["jaccard, w* > 1", "union, w* < 1"])
def test_the_learnable_sharing_weight_reaches_its_optimum_one_over_s(steps, case):
    """With the masks held (S fixed), w minimises w S - ln w at 1/S; stepped as
    train steps it (Adam at sharing_lr), it gets there within the experiment's
    step counts, from w = 1, above 1 or below."""
    if case.startswith("jaccard"):  # domain 0 keeps odd filters, 1 keeps 0, 1 mod 4
        m = model(2, TinyVGG)
        for group in m.mask_groups():
            group.scores.data[0, ::2] = -1.0
            group.scores.data[1, 2::4] = -1.0
            group.scores.data[1, 3::4] = -1.0
    else:  # three domains on disjoint thirds: the union costs several times the mean
        m = model(3, TinyVGG)
        for group in m.mask_groups():
            for d in range(3):
                keep = torch.zeros(group.scores.shape[1], dtype=torch.bool)
                keep[d::3] = True
                group.scores.data[d, ~keep] = -1.0
    loss = fastmdl.BudgetLoss(m, 1.0, sharing=case.split(",")[0])
    opt = torch.optim.Adam([loss.sharing_param], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()
    S = loss.parts()["sharing"]
    w = float(loss.sharing_weight().detach())
    assert (1 / S > 1.2) if "> 1" in case else (1 / S < 0.8), S
    assert w == pytest.approx(1 / S, rel=0.1), (S, w)


def test_the_sharing_weight_still_learns_after_sitting_at_its_bound():
    """The old clamp passed no gradient below its cap: w froze at 10 for good. Here
    w near the bound comes back when S grows (S = 5 wants w = 0.2)."""
    m = model(2, TinyVGG)
    loss = fastmdl.BudgetLoss(m, 1.0, sharing="union")
    with torch.no_grad():
        loss.sharing_param.fill_(6.0)  # w = 10 sigmoid(6) = 9.98
    for group in m.mask_groups():
        group.scores.data[0, ::2] = -1.0
        group.scores.data[1, 1::2] = -1.0
    loss()
    assert loss.parts()["sharing"] > 0.5
    opt = torch.optim.Adam([loss.sharing_param], lr=0.05)
    w0 = float(loss.sharing_weight().detach())
    for _ in range(64):
        opt.zero_grad()
        loss().backward()
        assert loss.sharing_param.grad.abs() > 0
        opt.step()
    assert float(loss.sharing_weight().detach()) < w0 - 1.0
