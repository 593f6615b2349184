"""fastmdl.pagcp: the threshold schedule, the greedy pass's bounds, physical and
exact channel surgery on plain, multi-domain and pruned networks, topk, bad input."""

import json
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmdl
from fastmdl import surgery
from fastmdl.pagcp import GroupResult, _top_groups, schedule, uniform_prune
from fastmdl.pruned import PrunedConv2d
from models import CatNet, TinyResNet, TinyVGG

MODELS = {"resnet": TinyResNet, "vgg": TinyVGG, "cat": CatNet}
FEW_RATIOS = (0.25, 0.5, 0.75)  # keeps the multi-domain runs short


class MultiTaskNet(nn.Module):
    """A shared residual backbone and two heads: classification (pooled, linear)
    and a dense regression (1x1 conv); forward returns a dict."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(12)
        self.conv1 = nn.Conv2d(12, 10, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(10)
        self.conv2 = nn.Conv2d(10, 12, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.wide = nn.Conv2d(12, 16, 3, stride=2, padding=1)
        self.cls = nn.Linear(16 * 4 * 4, 5)
        self.dense = nn.Conv2d(12, 2, 1)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        feats = F.relu(self.wide(x))
        return {"cls": self.cls(torch.flatten(feats, 1)), "dense": self.dense(x)}


def _random_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model


def plain_model_and_tasks(seed=0):
    torch.manual_seed(seed)
    model = _random_bn(MultiTaskNet(), seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(16, 3, 8, 8, generator=g)
    y_cls = torch.randint(0, 5, (16,), generator=g)
    y_dense = torch.randn(16, 2, 8, 8, generator=g)
    tasks = {"cls": lambda m: F.cross_entropy(m(x)["cls"], y_cls).item(),
             "dense": lambda m: F.mse_loss(m(x)["dense"], y_dense).item()}
    return model, tasks, x


def masked_model(make, num_classes=(5, 2, 7), seed=0, keep=0.7):
    """A converted model with random masks and per-domain BatchNorm statistics."""
    torch.manual_seed(seed)
    m = fastmdl.convert(make(), len(num_classes), list(num_classes), input_size=(3, 8, 8))
    g = torch.Generator().manual_seed(seed)
    for group in m.mask_groups():
        group.scores.data = torch.rand(group.scores.shape, generator=g) - (1 - keep)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(12, 3, 8, 8, generator=g) * 2 + 0.5, torch.arange(12) % len(num_classes))
    return m.eval()


def domain_tasks(num_classes=(5, 2, 7), seed=1):
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, k, (8,), generator=g))
               for k in num_classes]
    def task(d):
        return lambda m: F.cross_entropy(m(batches[d][0], d), batches[d][1]).item()
    return {f"domain{d}": task(d) for d in range(len(num_classes))}


def hand_count(model, x):
    """Multiply-adds per sample of a plain model's convolutions and linear layers."""
    total = [0]

    def hook(m, args, y):
        if isinstance(m, nn.Conv2d):
            total[0] += m.weight[0].numel() * m.out_channels * y[0, 0].numel()
        else:
            total[0] += m.in_features * m.out_features
    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x[:1])
    for h in hooks:
        h.remove()
    return total[0]


def check_bounds(report, floors=None):
    """Every accepted step within (1 + d_i) x the baseline (floored by ``floors``),
    baselines only moving up."""
    floors = floors or {}
    prev = None
    cuts = 0  # d_i advances only after a group lost channels (the authors' schedule)
    for i, r in enumerate(report.groups):
        assert r.order == i
        assert r.threshold == pytest.approx(report.initial_rate * report.lam ** cuts)
        cuts += r.kept < r.width
        for t, before in r.loss_before.items():
            assert r.bound[t] == pytest.approx((1 + r.threshold) * max(before,
                                                                      floors.get(t, 0.0)))
            assert r.loss_after[t] <= r.bound[t]
            if prev is not None:
                assert before == pytest.approx(max(prev.loss_before[t], prev.loss_after[t]))
        prev = r
    assert report.groups[0].loss_before == report.losses_before


# -- the threshold schedule ----------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 7, 40, 150])
@pytest.mark.parametrize("d0,total", [(0.05, 5.0), (0.01, 1.5), (0.3, 20.0), (0.06, 6.0)])
def test_schedule_product_equals_initial_threshold(n, d0, total):
    lam, d = schedule(d0, n, total)
    assert len(d) == n and d[0] == pytest.approx(d0)
    assert math.prod(1 + v for v in d) == pytest.approx(total, rel=1e-9)
    for a, b in zip(d, d[1:]):
        assert b == pytest.approx(a * lam)
    assert (lam > 1) == (n * math.log1p(d0) < math.log(total))


def test_schedule_without_exponential_is_flat():
    lam, d = schedule(0.05, 6, 5.0, exponential=False)
    assert lam == 1.0 and d == [0.05] * 6
    assert schedule(0.05, 1, 5.0) == (1.0, [0.05])  # one factor cannot be tuned
    with pytest.raises(ValueError, match="initial_threshold"):
        schedule(0.5, 4, 1.4)  # 1 + d_0 alone passes the bound
    with pytest.raises(ValueError, match="initial_rate"):
        schedule(-0.1, 4, 5.0)


# -- exact surgery --------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_removing_unused_channels_is_exact(name):
    """Slicing away the channels no domain uses leaves every domain's function
    unchanged: filters, BN entries (mask segments after a cat), flattened features."""
    m = masked_model(MODELS[name])
    net = surgery.Network(m)
    kept = {}
    for grp in net.groups:
        used = net.masks[grp.root].amax(0).nonzero().squeeze(1)
        if 0 < len(used) < grp.width:
            kept[grp.root] = used
    assert kept
    small = net.finish(net.materialise(kept))
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        for d in range(3):
            torch.testing.assert_close(small(x, d), m(x, d), rtol=1e-5, atol=1e-5)
    assert sum(g.width for g in small.mask_groups()) < sum(g.width for g in m.mask_groups())
    for g in small.mask_groups():
        assert all(small.module.get_submodule(n).scores is g.scores for n in g.members)
    assert fastmdl.cost_report(small).union["flops"] == pytest.approx(net.flops(kept))
    torch.testing.assert_close(fastmdl.prune(small)(x, 1), m(x, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_surgery_on_a_pruned_model_equals_pruning_more_masks(name):
    """Cutting channels out of a PrunedModel (CSR lists re-indexed, fused residuals
    followed) computes what fastmdl.prune gives when those channels are masked."""
    a = masked_model(MODELS[name])
    pa = fastmdl.prune(a)
    net = surgery.Network(pa)
    b = masked_model(MODELS[name])  # the same model: masks turned off below
    g = torch.Generator().manual_seed(7)
    kept = {}
    for grp in net.groups:
        mg = next(x for x in b.mask_groups() if set(x.members) == set(grp.members))
        used = (mg.scores > 0).any(0).nonzero().squeeze(1)  # pa's channels, as b's indices
        if len(used) != grp.width or grp.width < 2:
            continue
        keep = torch.randperm(grp.width, generator=g)[: grp.width // 2 + 1].sort().values
        kept[grp.root] = keep
        dropped = torch.ones(grp.width, dtype=torch.bool)
        dropped[keep] = False
        mg.scores.data[:, used[dropped]] = -1.0
    assert kept
    small = net.materialise(kept)
    x = torch.randn(6, 3, 8, 8)
    domain = torch.tensor([0, 1, 2, 2, 0, 1])
    with torch.no_grad():
        torch.testing.assert_close(small(x, domain), b(x, domain), rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in pa.parameters())
    assert fastmdl.cost_report(small).union["flops"] == pytest.approx(net.flops(kept))
    assert fastmdl.cost_report(small).union["flops"] == pytest.approx(
        fastmdl.cost_report(b).union["flops"])
    # The folded BatchNorm statistics followed the cut: recalibrating both agrees.
    from fastmdl.train import recalibrate_bn
    data = [[(torch.randn(6, 3, 8, 8, generator=g) * 2 + 1, None) for _ in range(2)]
            for _ in range(3)]
    recalibrate_bn(small, data, batches=2)
    recalibrate_bn(b, data, batches=2)
    with torch.no_grad():
        torch.testing.assert_close(small(x, domain), b(x, domain), rtol=1e-4, atol=1e-4)


# -- the three kinds of model ------------------------------------------------------------------

def test_plain_multitask_network():
    model, tasks, x = plain_model_and_tasks()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned, report = fastmdl.pagcp(model, tasks, example_input=x[:2])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    check_bounds(report)
    assert type(pruned) is MultiTaskNet
    out = pruned(x)
    assert out["cls"].shape == (16, 5) and out["dense"].shape == (16, 2, 8, 8)
    # The residual group: the stem and conv2 write it, conv1, wide and dense read it.
    widths = {pruned.stem.out_channels, pruned.conv2.out_channels, pruned.bn0.num_features,
              pruned.bn2.num_features, pruned.conv1.in_channels, pruned.wide.in_channels,
              pruned.dense.in_channels}
    assert len(widths) == 1
    assert pruned.cls.in_features == pruned.wide.out_channels * 16
    assert report.flops_after < report.flops_before
    assert report.flops_before == hand_count(model, x)
    assert report.flops_after == hand_count(pruned, x)
    assert report.params_after == sum(p.numel() for p in pruned.parameters())
    assert report.params_after < report.params_before == sum(p.numel() for p in model.parameters())
    assert report.losses_after == {t: pytest.approx(fn(pruned)) for t, fn in tasks.items()}
    assert any(r.applied for r in report.groups)
    assert "limited by" in str(report)


@pytest.mark.parametrize("name", ["resnet", "vgg"])
def test_multidomain_model(name):
    m = masked_model(MODELS[name])
    tasks = domain_tasks()
    pruned, report = fastmdl.pagcp(m, tasks, initial_threshold=3.0, ratios=FEW_RATIOS)
    check_bounds(report)
    assert isinstance(pruned, fastmdl.MultiDomainModel)
    before, after = fastmdl.cost_report(m), fastmdl.cost_report(pruned)
    assert report.flops_before == pytest.approx(before.union["flops"])
    assert report.flops_after == pytest.approx(after.union["flops"])
    assert report.params_after == pytest.approx(after.union["params"])
    assert report.flops_after < report.flops_before
    for g in pruned.mask_groups():  # coupled groups stay one width, one Parameter
        convs = [pruned.module.get_submodule(n) for n in g.members]
        assert all(c.scores is g.scores and c.out_channels == g.width for c in convs)
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fastmdl.prune(pruned)(x, 2), pruned(x, 2), rtol=1e-5, atol=1e-5)
    assert report.losses_after == {t: pytest.approx(fn(pruned)) for t, fn in tasks.items()}


def test_pruned_model_is_pruned_further(tmp_path):
    p = fastmdl.prune(masked_model(TinyResNet))
    tasks = domain_tasks()
    pruned, report = fastmdl.pagcp(p, tasks, initial_threshold=3.0, ratios=FEW_RATIOS)
    check_bounds(report)
    assert isinstance(pruned, fastmdl.PrunedModel)
    assert report.flops_before == pytest.approx(fastmdl.cost_report(p).union["flops"])
    assert report.flops_after == pytest.approx(fastmdl.cost_report(pruned).union["flops"])
    assert report.params_after == fastmdl.cost_report(pruned).union["params"]
    assert report.params_after < report.params_before
    convs = dict(pruned.net.named_modules())
    stage2 = {convs[n].weight.shape[0] for n in ("layer2.0.conv2", "layer2.0.downsample.0",
                                                   "layer2.1.conv2")}
    assert len(stage2) == 1 and convs["layer2.1.conv1"].weight.shape[1] in stage2
    for conv in (c for c in convs.values() if isinstance(c, PrunedConv2d)):
        in_m, out_m = conv.masks()
        assert in_m.shape[1] == conv.weight.shape[1] and out_m.shape[1] == conv.weight.shape[0]
    x = torch.randn(5, 3, 8, 8)
    domain = torch.tensor([2, 0, 1, 1, 0])
    with torch.no_grad():
        y = pruned(x, domain)
        for d in range(3):
            torch.testing.assert_close(y[domain == d], pruned(x[domain == d], d))
    path = tmp_path / "p.fastmdl"
    fastmdl.save(pruned, path)
    with torch.no_grad():
        torch.testing.assert_close(fastmdl.load(path)(x, domain), y)


# -- topk and the limiting task --------------------------------------------------------------

def test_topk_keeps_the_lowest_loss_per_flop_groups():
    model, tasks, x = plain_model_and_tasks(seed=3)
    full, r_full = fastmdl.pagcp(model, tasks, topk=1.0, example_input=x[:1])
    half, r_half = fastmdl.pagcp(model, tasks, topk=0.5, example_input=x[:1])
    pruned_groups = [r for r in r_full.groups if r.kept < r.width]
    assert len(pruned_groups) >= 2 and all(r.applied for r in pruned_groups)
    # Same greedy pass; only the selection differs.
    assert [(r.name, r.kept) for r in r_full.groups] == [(r.name, r.kept) for r in r_half.groups]
    k = max(1, int(0.5 * len(r_half.groups)))
    for r in r_half.groups:
        if r.kept < r.width:
            rise = sum(r.loss_after[t] - r.loss_before[t] for t in tasks)
            assert r.score == pytest.approx(rise / r.flops_removed)
    scored = sorted((r for r in r_half.groups if r.kept < r.width), key=lambda r: r.score)
    assert {r.name for r in r_half.groups if r.applied} == {r.name for r in scored[:k]}
    for r in r_half.groups:
        width = half.get_submodule(r.name).out_channels
        assert width == (r.kept if r.applied else r.width)
    assert r_half.flops_after > r_full.flops_after
    assert r_half.flops_after == hand_count(half, x)


def test_top_groups_counts_against_all_groups():
    def result(name, rise, flops, pruned=True):
        r = GroupResult(name, [name], 0, 0.1, 8, 4 if pruned else 8)
        r.loss_before, r.loss_after, r.flops_removed = {"a": 1.0}, {"a": 1.0 + rise}, flops
        return r
    rs = [result("a", 0.5, 10), result("b", 0.1, 10), result("c", 0.0, 0),
          result("d", 0.2, 1), result("e", 0.0, 0, pruned=False)]
    assert _top_groups(rs, 0.4, len(rs)) == {"c", "b"}  # floor(0.4 * 5) = 2; c is free
    assert rs[2].score == -math.inf and rs[4].score is None
    assert _top_groups(rs, 0.01, len(rs)) == {"c"}  # at least one


def test_the_task_that_stops_a_group_is_recorded():
    model, tasks, x = plain_model_and_tasks(seed=5)
    size = sum(p.numel() for p in model.parameters())
    # A loss that rises with every parameter removed: it is the one that stops each group.
    tasks["size"] = lambda m: 1.0 + 20.0 * (1 - sum(p.numel() for p in m.parameters()) / size)
    _, report = fastmdl.pagcp(model, tasks, initial_threshold=1.5, exponential=False,
                              example_input=x[:1])
    check_bounds(report)
    limited = [r.limiting_task for r in report.groups if r.limiting_task]
    assert limited and set(limited) == {"size"}


def test_min_loss_floors_the_baseline_in_the_bound():
    model, tasks, x = plain_model_and_tasks(seed=2)
    # A task the model has all but solved: any cut raises its loss far past a
    # relative bound on its tiny value.
    size = sum(p.numel() for p in model.parameters())
    tasks["solved"] = lambda m: 1e-6 + 1e-3 * (1 - sum(p.numel() for p in m.parameters()) / size)
    kw = dict(initial_threshold=3.0, ratios=FEW_RATIOS, example_input=x[:1])
    _, strict = fastmdl.pagcp(model, tasks, **kw)
    check_bounds(strict)
    assert strict.flops_after == strict.flops_before
    assert {r.limiting_task for r in strict.groups} == {"solved"}
    floors = {"solved": 0.01}
    _, floored = fastmdl.pagcp(model, tasks, min_loss=floors, **kw)
    check_bounds(floored, floors)
    assert floored.flops_after < floored.flops_before
    assert "solved" not in {r.limiting_task for r in floored.groups}
    _, same = fastmdl.pagcp(model, tasks, min_loss=0.01, **kw)  # one number: every task
    check_bounds(same, {t: 0.01 for t in tasks})
    for bad, err in ((-1.0, ValueError), (float("inf"), ValueError), ("0.1", TypeError),
                     ({"nope": 0.1}, ValueError), ({"cls": None}, TypeError)):
        with pytest.raises(err, match="min_loss"):
            fastmdl.pagcp(model, tasks, min_loss=bad, **kw)


@pytest.mark.parametrize("kind", ["multidomain", "pruned"])
def test_calibrate_runs_on_every_candidate_and_on_the_result(kind):
    from fastmdl.train import recalibrate_bn

    m = masked_model(TinyResNet)
    if kind == "pruned":  # folded BatchNorms, recalibrated through their kept statistics
        m = fastmdl.prune(m)
    tasks = domain_tasks()
    g = torch.Generator().manual_seed(4)
    data = [[(torch.randn(6, 3, 8, 8, generator=g), torch.zeros(6, dtype=torch.int64))]
            for _ in range(3)]
    seen = []

    def calibrate(candidate):
        assert candidate is not m
        seen.append(id(candidate))
        recalibrate_bn(candidate, data, batches=1)

    pruned, report = fastmdl.pagcp(m, tasks, initial_threshold=3.0, ratios=FEW_RATIOS,
                                   calibrate=calibrate)
    check_bounds(report)
    assert len(seen) == report.evaluations
    assert report.flops_after < report.flops_before
    # The result carries statistics of its own data, not the input's stale ones.
    again = copy.deepcopy(pruned)
    recalibrate_bn(again, data, batches=1)
    for (name, a), b in zip(pruned.state_dict().items(), again.state_dict().values()):
        if "running" in name or "bn_" in name:
            torch.testing.assert_close(a, b)
    assert report.losses_after == {t: pytest.approx(fn(pruned.eval())) for t, fn in tasks.items()}
    with pytest.raises(TypeError, match="calibrate"):
        fastmdl.pagcp(m, tasks, calibrate="bn")


def test_uniform_prune_matches_a_flops_target():
    model, _, x = plain_model_and_tasks()
    half, info = uniform_prune(model, ratio=0.5, example_input=x[:1])
    assert half.conv1.out_channels == 5 and half.wide.out_channels == 8
    target = info["flops_before"] * 0.6
    matched, info = uniform_prune(model, flops=target, example_input=x[:1])
    assert info["flops_after"] <= target < info["flops_before"]
    assert info["flops_after"] == hand_count(matched, x)
    matched(x)


def test_a_channels_last_mlp_is_cut_as_1x1_convolutions():
    """A plain ConvNeXt-style block: the surgery runs on the block rewritten
    channels-first (fastmdl/channels_last.py), so the MLP's hidden channels are a
    group. The hidden channels with all-zero filters contribute nothing (GELU(0) =
    0) and have the lowest L1 norm: cutting exactly them leaves the output as it was."""
    from test_channels_last import MethodBlock

    torch.manual_seed(0)
    net = MethodBlock(c=8).eval()
    dead = torch.randperm(32)[:8]
    with torch.no_grad():
        net.fc1.weight[dead] = 0
        net.fc1.bias[dead] = 0
    x = torch.randn(3, 3, 16, 16)
    small, info = uniform_prune(net, ratio=0.25, example_input=x[:1])
    assert isinstance(small, torch.fx.GraphModule)
    assert small.get_submodule("fc1").out_channels == 24
    assert small.get_submodule("fc2").in_channels == 24
    assert info["flops_after"] < info["flops_before"]
    with torch.no_grad():
        torch.testing.assert_close(small(x), net(x), rtol=1e-5, atol=1e-5)


# -- bad input ---------------------------------------------------------------------------------

def test_bad_arguments_name_the_argument():
    model, tasks, x = plain_model_and_tasks()
    kw = {"example_input": x[:1]}
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="topk"):
            fastmdl.pagcp(model, tasks, topk=bad, **kw)
    for bad in ((), (0.1, 0.1), (0.2, 0.1), (0.0, 0.5), (0.5, 1.0), ("a",)):
        with pytest.raises(ValueError, match="ratios"):
            fastmdl.pagcp(model, tasks, ratios=bad, **kw)
    with pytest.raises(TypeError, match="ratios"):
        fastmdl.pagcp(model, tasks, ratios=0.5, **kw)
    with pytest.raises(ValueError, match="tasks"):
        fastmdl.pagcp(model, {}, **kw)
    with pytest.raises(TypeError, match="tasks"):
        fastmdl.pagcp(model, {"cls": 1.0}, **kw)
    with pytest.raises(TypeError, match="tasks"):
        fastmdl.pagcp(model, [tasks["cls"]], **kw)
    with pytest.raises(ValueError, match="importance"):
        fastmdl.pagcp(model, tasks, importance="taylor", **kw)
    with pytest.raises(ValueError, match="initial_rate"):
        fastmdl.pagcp(model, tasks, initial_rate=0.0, **kw)
    with pytest.raises(ValueError, match="initial_threshold"):
        fastmdl.pagcp(model, tasks, initial_threshold=1.0, **kw)
    with pytest.raises(TypeError, match="exponential"):
        fastmdl.pagcp(model, tasks, exponential="yes", **kw)
    with pytest.raises(ValueError, match="example_input"):
        fastmdl.pagcp(model, tasks)
    with pytest.raises(TypeError, match="example_input"):
        fastmdl.pagcp(model, tasks, example_input=[1, 2])
    with pytest.raises(TypeError, match="model"):
        fastmdl.pagcp("resnet", tasks, **kw)
    with pytest.raises(ValueError, match="'cls'"):
        fastmdl.pagcp(model, {"cls": lambda m: float("nan")}, **kw)
    with pytest.raises(ValueError, match="'cls'"):
        fastmdl.pagcp(model, {"cls": lambda m: -1.0}, **kw)
    with pytest.raises(TypeError, match="'cls'"):
        fastmdl.pagcp(model, {"cls": lambda m: "low"}, **kw)
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        fastmdl.pagcp(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), tasks, **kw)


def test_experiment_smoke_mode_runs(tmp_path):
    import json

    import pagcp_experiment

    result = pagcp_experiment.main(["--smoke", "--out", str(tmp_path)])
    assert {r["method"].split(" (")[0] for r in result["rows"]} == {"input", "PAGCP", "uniform L1"}
    saved = json.loads((tmp_path / "pagcp_experiment.json").read_text())
    assert set(saved["reports"]) == {"budget 1.0", "prune 0.5"}
    md = (tmp_path / "pagcp_experiment.md").read_text()
    assert "beats uniform L1" in md
    # The verdict is stated once per input, at the pre-declared length only.
    assert md.count("target at the short fine-tune (1 steps") == 2
    assert saved["settings"]["short_steps"] == 1
    assert saved["settings"]["seed"] == 0 and md.startswith("PAGCP experiment, seed 0,")
    assert (tmp_path / "pagcp_experiment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # One input, calibrated: the pruned input's folded BatchNorms are recalibrated too.
    one = pagcp_experiment.main(["--smoke", "--inputs", "prune 0.5", "--calibrate", "1",
                                 "--out", str(tmp_path)])
    assert {r["input"] for r in one["rows"]} == {"prune 0.5"}
    with pytest.raises(SystemExit):
        pagcp_experiment.main(["--smoke", "--inputs", "budget 2", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):  # refused before any training starts
        pagcp_experiment.main(["--short-steps", "30", "--finetune-steps", "50,200",
                               "--out", str(tmp_path)])
    for bad in ("digits,mnist", "digits,digits", ""):
        with pytest.raises(SystemExit):
            pagcp_experiment.main(["--smoke", "--domains", bad, "--out", str(tmp_path)])


# -- the authors' saliency and schedule ----------------------------------------------------

@pytest.mark.parametrize("importance", ["l1", "l2"])
def test_group_saliency_sums_each_members_mean_over_its_fan_in(importance):
    """A residual group's members have fan-ins of very different sizes; each
    counts through its mean, so none drowns the others (the authors' code)."""
    m = masked_model(TinyResNet, keep=1.1)  # every channel used
    net = surgery.Network(m)
    grp = max(net.groups, key=lambda g: len(g.members))
    assert len(grp.members) >= 2
    got = net.saliency(m, grp, {}, importance)
    want = 0
    for name in grp.members:
        w = m.module.get_submodule(name).weight.detach().flatten(1).float()
        want = want + (w.abs().mean(1) if importance == "l1" else w.pow(2).mean(1).sqrt())
    torch.testing.assert_close(got, want)
    fan_ins = {m.module.get_submodule(n).weight[0].numel() for n in grp.members}
    assert len(fan_ins) > 1  # the case where sums and means rank differently


def test_the_allowance_advances_only_after_a_cut():
    """A group that cannot be cut leaves its d_i to the next group visited."""
    model, tasks, x = plain_model_and_tasks(seed=3)
    size = sum(p.numel() for p in model.parameters())
    # A task that refuses any change: every cut fails.
    def picky(m):
        return 1.0 + 10.0 * (1 - sum(p.numel() for p in m.parameters()) / size)

    _, report = fastmdl.pagcp(model, {**tasks, "picky": picky}, initial_threshold=3.0,
                              ratios=FEW_RATIOS, example_input=x[:1])
    check_bounds(report)
    assert all(r.kept == r.width for r in report.groups)  # nothing cut ...
    assert {r.threshold for r in report.groups} == {report.initial_rate}  # ... d_0 throughout


def test_rounds_prune_the_previous_rounds_network_on_a_sloped_schedule():
    model, tasks, x = plain_model_and_tasks(seed=0)
    seen = []
    kw = dict(initial_rate=0.05, initial_threshold=3.0, ratios=FEW_RATIOS, example_input=x[:1])
    net, report = fastmdl.pagcp(model, tasks, rounds=3, rate_slope=0.05, threshold_slope=1.0,
                                between_rounds=seen.append, **kw)
    assert len(report.rounds) == 3 and len(seen) == 2
    for r, rep in enumerate(report.rounds):
        assert rep.initial_rate == pytest.approx(0.05 + 0.05 * r)
        assert rep.initial_threshold == pytest.approx(3.0 + 1.0 * r)
        check_bounds(rep)
    for a, b in zip(report.rounds, report.rounds[1:]):
        assert b.flops_before == pytest.approx(a.flops_after)
        assert b.losses_before == pytest.approx(a.losses_after)
    assert report.flops_before == report.rounds[0].flops_before
    assert report.flops_after == report.rounds[-1].flops_after <= report.flops_before
    assert all(isinstance(m, torch.nn.Module) for m in seen)  # each round's result, in place
    _, single = fastmdl.pagcp(model, tasks, **kw)
    assert single.rounds == [] and single.flops_after == pytest.approx(
        report.rounds[0].flops_after)
    json.dumps(report.to_dict())


def test_rounds_arguments_are_checked():
    model, tasks, x = plain_model_and_tasks(seed=0)
    for bad, err in (({"rounds": 0}, ValueError), ({"rounds": 1.5}, ValueError),
                     ({"rate_slope": float("nan")}, ValueError),
                     ({"threshold_slope": "1"}, ValueError),
                     ({"between_rounds": 3}, TypeError),
                     ({"rounds": 2, "threshold_slope": -10.0}, ValueError)):
        with pytest.raises(err):
            fastmdl.pagcp(model, tasks, example_input=x[:1], **bad)
