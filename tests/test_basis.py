"""fastmdl.basis: SVD basis scaling, Taylor importance and basis pruning."""

import copy

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmdl
from fastmdl import basis
from fastmdl._domain import domain_scope
from models import CatNet, TinyResNet, TinyVGG
from problems import require_backend
from test_prune import trained

MODELS = {"resnet": TinyResNet, "vgg": TinyVGG, "cat": CatNet}
CLASSES = (5, 2, 7)


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def loaders(num_classes=CLASSES, batches=1, n=6, size=8, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(n, 3, size, size, generator=g, dtype=dtype),
              torch.randint(0, k, (n,), generator=g)) for _ in range(batches)]
            for k in num_classes]


def randomise_factors(model, seed=0, lo=0.5, hi=1.5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in basis.basis_layers(model).values():
            layer.factors.copy_(torch.rand(layer.factors.shape, generator=g,
                                           dtype=layer.factors.dtype) * (hi - lo) + lo)


MIXED = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2])


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("cfg", [
    dict(cin=5, cout=7, k=3, stride=1, padding=1, dilation=1, bias=True),
    dict(cin=3, cout=30, k=3, stride=2, padding=0, dilation=1, bias=False),  # rank C_in*k*k < C_out
    dict(cin=6, cout=4, k=3, stride=1, padding=2, dilation=2, bias=True),
    dict(cin=9, cout=11, k=1, stride=1, padding=0, dilation=1, bias=True),
    dict(cin=4, cout=5, k=3, stride=1, padding=1, dilation=1, bias=True, padding_mode="reflect"),
])
def test_full_rank_reconstructs_the_conv(cfg, dtype, tol):
    torch.manual_seed(0)
    cfg = dict(cfg)
    conv = nn.Conv2d(cfg.pop("cin"), cfg.pop("cout"), cfg.pop("k"), **cfg).to(dtype)
    layer = basis.BasisConv2d.from_conv(conv, num_domains=2)
    assert layer.rank == min(conv.out_channels, conv.weight[0].numel())
    x = torch.randn(3, conv.in_channels, 9, 10, dtype=dtype)
    with torch.no_grad():
        ref = conv(x)
        close(layer(x, 0), ref, tol)
        close(layer(x, torch.tensor([1, 0, 1])), ref, tol)
    # The basis is orthonormal: V^T V = I.
    v = layer.basis.reshape(layer.rank, -1).double()
    close(v @ v.T, torch.eye(layer.rank, dtype=torch.float64), 1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_decomposed_model_equals_the_masked_model(name):
    m = trained(MODELS[name])
    bm = basis.decompose(m).eval()
    assert isinstance(bm, basis.BasisModel)
    assert not any(isinstance(mod, fastmdl.Conv2d) for mod in bm.modules())
    x = torch.randn(9, 3, 8, 8)
    with torch.no_grad():
        close(bm(x, MIXED), m(x, MIXED))
        for d in range(3):
            close(bm(x, d), m(x, d))


def test_plain_model_decomposes_and_reads_the_domain_from_context():
    torch.manual_seed(0)
    net = TinyResNet().eval()
    x = torch.randn(4, 3, 8, 8)
    one = basis.decompose(net)
    assert isinstance(one, TinyResNet) and isinstance(net.conv1, nn.Conv2d)  # input untouched
    with torch.no_grad():
        close(one(x), net(x))
        two = basis.decompose(net, num_domains=2)
        randomise_factors(two)
        with domain_scope(torch.tensor([0, 1, 1, 0])):
            mixed = two(x)
        with domain_scope(1):
            close(mixed[1:3], two(x)[1:3])
        with pytest.raises(ValueError, match="2 domains"):
            two(x)


def test_the_basis_spans_only_filters_and_inputs_some_domain_keeps():
    m = trained(TinyResNet)
    group = next(g for g in m.mask_groups() if g.members == ("layer2.0.conv1",))
    group.scores.data[:, :5] = -1.0  # filters 0..4 of layer2.0.conv1: no domain keeps them
    group.scores.data[:, 5:] = 1.0
    bm = basis.decompose(m).eval()
    layers = basis.basis_layers(bm)
    assert layers["layer2.0.conv1"].rank == 12 - 5
    assert layers["layer2.0.conv2"].in_masks[:, :5].sum() == 0
    assert layers["layer2.0.conv2"].basis[:, :5].abs().sum() == 0
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        for d in range(3):
            close(bm(x, d), m(x, d))


def test_only_factors_batchnorm_and_heads_train():
    m = trained(TinyVGG)  # has a hidden nn.Linear, which must freeze too
    bm = basis.decompose(m).train()
    trainable = {n for n, p in bm.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith("factors") or ".weights." in n or ".biases." in n
                             or _is_bn(bm, n) for n in trainable)
    assert not any(p.requires_grad for p in bm.module.classifier[0].parameters())
    for layer in basis.basis_layers(bm).values():
        assert not layer.basis.requires_grad and not layer.mapping.requires_grad
        assert layer.factors.shape == (3, layer.rank) and layer.factors.requires_grad
        if layer.scores is not None:
            assert not layer.scores.requires_grad
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 1, 0, 3])
    F.cross_entropy(bm(x, torch.tensor([0, 1, 2, 0, 1, 2])), y).backward()
    for layer in basis.basis_layers(bm).values():
        assert layer.factors.grad is not None and layer.factors.grad.abs().sum() > 0
        assert layer.basis.grad is None and layer.mapping.grad is None


def _is_bn(model, name):
    mod = model.get_submodule(name.rpartition(".")[0])
    return isinstance(mod, (fastmdl.BatchNorm2d, nn.BatchNorm2d))


def _tiny_double_model():
    torch.manual_seed(0)
    net = TinyResNet(widths=(4, 5, 6)).double()
    m = fastmdl.convert(net, 2, [3, 4], input_size=(3, 6, 6))
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.randn(8, 3, 6, 6, dtype=torch.float64), torch.arange(8) % 2)
    bm = basis.decompose(m).eval()
    randomise_factors(bm)
    return bm


def test_taylor_importance_matches_finite_differences():
    bm = _tiny_double_model()
    data = loaders((3, 4), batches=2, n=5, size=6, dtype=torch.float64)
    imp = basis.taylor_importance(bm, data, max_batches=1)  # first batch only
    layers = basis.basis_layers(bm)
    assert set(imp) == set(layers)
    assert all(imp[n].shape == layers[n].factors.shape for n in layers)
    eps = 1e-6
    checked = 0
    for name in ("conv1", "layer2.0.conv2", "layer3.0.downsample.0"):
        f = layers[name].factors
        for d in range(2):
            x, y = data[d][0]
            for k in range(0, f.shape[1], 2):
                s = float(f.detach()[d, k])
                losses = []
                with torch.no_grad():
                    for v in (s + eps, s - eps):
                        f[d, k] = v
                        losses.append(float(F.cross_entropy(bm(x, d), y)))
                    f[d, k] = s
                fd = abs(s * (losses[0] - losses[1]) / (2 * eps))
                assert float(imp[name][d, k]) == pytest.approx(fd, rel=1e-5, abs=1e-9)
                checked += 1
    assert checked >= 10
    assert bm.training is False and all(layer.factors.requires_grad for layer in layers.values())


def test_removing_zero_factors_leaves_the_output_unchanged():
    bm = basis.decompose(trained(TinyResNet)).eval()
    randomise_factors(bm)
    g = torch.Generator().manual_seed(3)
    zeroed_all, zeroed_d0 = {}, {}
    with torch.no_grad():
        for name, layer in basis.basis_layers(bm).items():
            perm = torch.randperm(layer.rank, generator=g)
            zeroed_all[name] = perm[: layer.rank // 3]
            zeroed_d0[name] = perm[layer.rank // 3: layer.rank // 3 + 1]
            layer.factors[:, zeroed_all[name]] = 0.0
            layer.factors[0, zeroed_d0[name]] = 0.0  # unimportant for domain 0 only
    imp = basis.taylor_importance(bm, loaders())
    for name, layer in basis.basis_layers(bm).items():
        assert (imp[name][:, zeroed_all[name]] == 0).all()  # |0 * dL/ds| = 0
    explicit = {n: layer.factors.detach().abs() for n, layer in basis.basis_layers(bm).items()}
    p = basis.prune(bm, explicit, threshold=0.0)
    for name, layer in basis.basis_layers(p).items():
        before = basis.basis_layers(bm)[name]
        assert layer.pruned and layer.rank == before.rank - len(zeroed_all[name])
        assert layer.components[0].sum() == layer.rank - 1  # domain 0 dropped one more
        assert layer.components[1:].sum() == 2 * layer.rank
    x = torch.randn(9, 3, 8, 8)
    with torch.no_grad():
        close(p(x, MIXED), bm(x, MIXED))
        for d in range(3):
            close(p(x, d), bm(x, d))


def test_a_layer_no_domain_needs_keeps_one_unused_component():
    bm = basis.decompose(trained(TinyVGG)).eval()
    randomise_factors(bm)
    imp = {n: torch.ones_like(layer.factors) for n, layer in basis.basis_layers(bm).items()}
    imp["features.4"] = torch.zeros_like(imp["features.4"])
    p = basis.prune(bm, imp, threshold=0.5)
    layer = basis.basis_layers(p)["features.4"]
    assert layer.rank == 1 and layer.components.sum() == 0
    ref = copy.deepcopy(bm)
    with torch.no_grad():
        basis.basis_layers(ref)["features.4"].factors.zero_()
        x = torch.randn(9, 3, 8, 8)
        close(p(x, MIXED), ref(x, MIXED))


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("name", list(MODELS))
def test_pruned_mixed_batch_equals_one_domain_at_a_time(name, scope):
    bm = basis.decompose(trained(MODELS[name])).eval()
    randomise_factors(bm)
    p = basis.prune(bm, ratio=0.6, scope=scope, loaders=loaders())
    # Reference: the dense model with each domain's dropped components' factors set to 0.
    ref = _dense_equivalent(bm, p)
    x = torch.randn(9, 3, 8, 8)
    with torch.no_grad():
        mixed = p(x, MIXED)
        close(mixed, ref(x, MIXED))
        for d in range(3):
            one = p(x, d)
            close(one, ref(x, d))
            close(mixed[MIXED == d], one[MIXED == d])


def test_double_pruning_after_pagcp_decomposes_its_smaller_network():
    """Double pruning with PAGCP as the filter-pruning half: PAGCP returns a physically
    smaller MultiDomainModel, which decomposes exactly and prunes like any other."""
    from test_pagcp import FEW_RATIOS, domain_tasks, masked_model

    m = masked_model(TinyResNet)
    small, _ = fastmdl.pagcp(m, domain_tasks(), initial_threshold=3.0, ratios=FEW_RATIOS)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in m.parameters())
    bm = basis.decompose(small).eval()
    x = torch.randn(9, 3, 8, 8)
    with torch.no_grad():
        close(bm(x, MIXED), small(x, MIXED))
    randomise_factors(bm)
    double = basis.prune(bm, ratio=0.5, scope="global", loaders=loaders())
    with torch.no_grad():
        mixed = double(x, MIXED)
        close(mixed, _dense_equivalent(bm, double)(x, MIXED))
        for d in range(3):
            close(mixed[MIXED == d], double(x, d)[MIXED == d])
    # PAGCP's cut shows in the cost: fewer params than basis pruning alone at the ratio.
    alone = basis.decompose(m).eval()
    randomise_factors(alone)
    single = basis.prune(alone, ratio=0.5, scope="global", loaders=loaders())
    assert basis.cost_report(double).union["params"] < basis.cost_report(single).union["params"]


def _dense_equivalent(bm, p):
    """A copy of the dense bm with factors zeroed where p's domains dropped a component."""
    ref = copy.deepcopy(bm)
    with torch.no_grad():
        for name, layer in basis.basis_layers(ref).items():
            small = basis.basis_layers(p)[name]
            use = torch.zeros_like(layer.factors)
            use[:, _held(layer, small)] = small.components.to(use.dtype)
            layer.factors.mul_(use)
    assert not any(layer.pruned for layer in basis.basis_layers(ref).values())
    return ref


def _held(full, small):
    """Indices into full's components of the components small holds."""
    f = full.basis.reshape(full.rank, -1)
    s = small.basis.reshape(small.rank, -1)
    return torch.cdist(s, f).argmin(dim=1)


def test_ratio_keeps_each_domains_top_components():
    bm = basis.decompose(trained(TinyResNet)).eval()
    g = torch.Generator().manual_seed(0)
    imp = {n: torch.rand(layer.factors.shape, generator=g)
           for n, layer in basis.basis_layers(bm).items()}
    p = basis.prune(bm, imp, ratio=0.5, scope="layer")
    for name, layer in basis.basis_layers(p).items():
        full = basis.basis_layers(bm)[name]
        want = imp[name].argsort(dim=1, descending=True)[:, : max(1, round(0.5 * full.rank))]
        held = _held(full, layer)
        assert sorted(held.tolist()) == sorted(set(want.flatten().tolist()))  # the union
        for d in range(3):
            mine = held[layer.components[d] > 0]
            assert sorted(mine.tolist()) == sorted(want[d].tolist())
    q = basis.prune(bm, imp, ratio=0.8, scope="global")
    total = sum(layer.rank for layer in basis.basis_layers(bm).values())
    for d in range(3):
        kept = [int(layer.components[d].sum()) for layer in basis.basis_layers(q).values()]
        assert min(kept) >= 1  # every domain keeps its best component of every layer
        assert sum(kept) <= round(0.2 * total) + len(kept)
    # Pruning again narrows further; a domain never regains a component.
    r = basis.prune(p, {n: torch.rand(layer.factors.shape, generator=g)
                        for n, layer in basis.basis_layers(p).items()}, ratio=0.5)
    for name, layer in basis.basis_layers(r).items():
        before = basis.basis_layers(p)[name]
        assert layer.rank <= before.rank
        held = _held(before, layer)
        assert (before.components[:, held] >= layer.components).all()


def test_weight_params_drops_least_importance_per_parameter_within_the_ratio():
    model = trained(TinyResNet)
    bm = basis.decompose(model).eval()
    layers = basis.basis_layers(bm)
    g = torch.Generator().manual_seed(3)
    imp = {n: torch.rand(layer.factors.shape, generator=g, dtype=torch.float64)
           for n, layer in layers.items()}
    cost = {n: basis._component_params(layer) for n, layer in layers.items()}
    assert len({tuple(c.tolist()) for c in cost.values()}) > 1  # layers differ in cost
    ratio = 0.6
    p = basis.prune(bm, imp, ratio=ratio, scope="global", weight="params")
    small = basis.basis_layers(p)
    for d in range(3):
        dropped, kept_keys, dropped_keys, total = 0.0, [], [], 0.0
        for n, full in layers.items():
            held = _held(full, small[n])
            mine = set(held[small[n].components[d] > 0].tolist())
            best = int(imp[n][d].argmax())
            c = float(cost[n][d])
            for k in range(full.rank):
                total += c
                key = float(imp[n][d, k]) / c
                if k in mine:
                    if k != best:  # the per-layer best is kept whatever it costs
                        kept_keys.append(key)
                else:
                    dropped += c
                    dropped_keys.append(key)
        assert dropped <= ratio * total + 1e-6
        assert dropped >= 0.4 * total  # the greedy used most of the allowance
        # What went has less importance per parameter than what stayed.
        assert max(dropped_keys) <= min(kept_keys)
    with pytest.raises(ValueError, match="weight"):
        basis.prune(bm, imp, ratio=0.5, scope="layer", weight="params")
    with pytest.raises(ValueError, match="weight"):
        basis.prune(bm, imp, threshold=0.5, scope="global", weight="params")
    with pytest.raises(ValueError, match="weight must be one of"):
        basis.prune(bm, imp, ratio=0.5, scope="global", weight="flops!")


def test_factor_l1_is_the_mean_absolute_factor_per_layer_summed():
    bm = basis.decompose(trained(TinyResNet))
    randomise_factors(bm, lo=-1.0, hi=1.0)
    layers = basis.basis_layers(bm)
    want = sum(float(layer.factors.detach().abs().mean()) for layer in layers.values())
    value = basis.factor_l1(bm)
    assert value.requires_grad
    close(value.detach(), torch.tensor(want, dtype=value.dtype))
    value.backward()
    for layer in layers.values():  # d|s|/ds = sign(s), over the layer's count
        close(layer.factors.grad, layer.factors.detach().sign() / layer.factors.numel())
    # Components a domain no longer uses do not count.
    imp = {n: torch.rand(layer.factors.shape) for n, layer in layers.items()}
    p = basis.prune(bm, imp, ratio=0.5, scope="layer")
    want = sum(float((layer.factors.detach().abs() * layer.components).sum()
                     / layer.components.sum())
               for layer in basis.basis_layers(p).values())
    close(basis.factor_l1(p).detach(), torch.tensor(want))
    with pytest.raises(ValueError, match="BasisConv2d"):
        basis.factor_l1(nn.Linear(2, 2))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_pruned_basis_runs_through_the_op(backend, monkeypatch):
    require_backend(backend, "cpu")
    bm = basis.decompose(trained(TinyResNet)).eval()
    p = basis.prune(bm, ratio=0.5, loaders=loaders())
    calls = []
    op = torch.ops.fastmdl.domain_conv2d

    def spy(*args):
        calls.append(args[1].shape)
        return op(*args)

    x = torch.randn(9, 3, 8, 8)
    with torch.no_grad():
        want = p(x, MIXED)
    for layer in basis.basis_layers(p).values():
        layer.backend = backend
    monkeypatch.setattr(torch.ops.fastmdl, "domain_conv2d", spy, raising=False)
    with torch.no_grad():
        close(p(x, MIXED), want)
    assert len(calls) == len(basis.basis_layers(p))  # one call per layer for the mixed batch


def test_factors_still_train_after_pruning():
    p = basis.prune(basis.decompose(trained(TinyResNet)), ratio=0.5, loaders=loaders())
    p.train()
    y = p(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))
    F.cross_entropy(y, torch.tensor([1, 0, 3, 4])).backward()
    layer = basis.basis_layers(p)["layer1.0.conv1"]
    assert layer.factors.grad is not None and layer.factors.grad.abs().sum() > 0
    assert layer.basis.grad is None


def test_grouped_convolutions_are_left_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.Conv2d(6, 4, 1)).eval()
    bm = basis.decompose(net)
    assert isinstance(bm[2], nn.Conv2d) and isinstance(bm[3], basis.BasisConv2d)
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        close(bm(x), net(x))
    with pytest.raises(ValueError, match="grouped"):
        basis.decompose(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))
    with pytest.raises(ValueError, match="groups=1"):
        basis.BasisConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2), 1)


def test_cost_report():
    m = trained(TinyResNet)
    for group in m.mask_groups():
        group.scores.data.fill_(1.0)  # every filter kept: union counts equal held tensors
    bm = basis.decompose(m)
    before = fastmdl.cost_report(m)
    full = basis.cost_report(bm)
    layers = basis.basis_layers(bm)
    convs = [mod for mod in m.modules() if isinstance(mod, fastmdl.Conv2d)]
    held = sum(layer.basis.numel() + layer.mapping.numel() + layer.factors.numel()
               for layer in layers.values())
    assert full.union["params"] == pytest.approx(
        before.union["params"] - sum(c.weight.numel() for c in convs) + held)
    assert full.baseline == pytest.approx(before.baseline)
    p = basis.prune(bm, ratio=0.7, loaders=loaders())
    small = basis.cost_report(p)
    assert small.union["params"] < full.union["params"]
    assert small.union["flops"] < full.union["flops"]
    for d, row in enumerate(small.domains):
        assert row["params"] < full.domains[d]["params"]
        assert row["flops"] < full.domains[d]["flops"]
        comps = sum(float(layer.components[d].sum()) for layer in basis.basis_layers(p).values())
        per_layer = sum(layer.components[d].sum() * (layer.in_masks[d].sum() *
                                                     layer.basis[0, 0].numel() + layer.out_channels)
                        for layer in basis.basis_layers(p).values())
        other = before.domains[d]["params"] - sum(c.weight.numel() for c in convs)
        assert row["params"] == pytest.approx(float(per_layer) + comps + other)
    assert "union (one network)" in str(small)
    with pytest.raises(TypeError, match="MultiDomainModel"):
        fastmdl.cost_report(p)  # fastmdl's own cost model does not know basis layers
    with pytest.raises(TypeError, match="BasisModel"):
        basis.cost_report(m)


def test_bad_input_is_rejected_with_the_argument_named():
    bm = basis.decompose(trained(TinyResNet))
    imp = basis.taylor_importance(bm, loaders())
    for bad in (0, 1, 1.5, -0.1, 0.0, 1.0):
        with pytest.raises(ValueError, match="ratio"):
            basis.prune(bm, imp, ratio=bad)
    with pytest.raises(TypeError, match="ratio"):
        basis.prune(bm, imp, ratio="half")
    with pytest.raises(ValueError, match="scope"):
        basis.prune(bm, imp, ratio=0.5, scope="model")
    with pytest.raises(ValueError, match="ratio.*threshold"):
        basis.prune(bm, imp, ratio=0.5, threshold=0.1)
    with pytest.raises(ValueError, match="ratio.*threshold"):
        basis.prune(bm, imp)
    with pytest.raises(ValueError, match="threshold"):
        basis.prune(bm, imp, threshold=float("nan"))
    with pytest.raises(ValueError, match="importance"):
        basis.prune(bm, ratio=0.5)
    with pytest.raises(ValueError, match="importance"):
        basis.prune(bm, {k: v for k, v in list(imp.items())[1:]}, ratio=0.5)
    with pytest.raises(ValueError, match="importance"):
        basis.prune(bm, {k: v[:, :1] for k, v in imp.items()}, ratio=0.5)
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        basis.decompose(nn.Sequential(nn.Linear(3, 3)))
    with pytest.raises(ValueError, match="no BasisConv2d"):
        basis.prune(nn.Sequential(nn.Conv2d(3, 3, 1)), imp, ratio=0.5)
    with pytest.raises(ValueError, match="no BasisConv2d"):
        basis.taylor_importance(trained(TinyResNet), loaders())
    with pytest.raises(TypeError, match="model"):
        basis.decompose("resnet")
    with pytest.raises(TypeError, match="already a BasisModel"):
        basis.decompose(bm)
    with pytest.raises(TypeError, match="got a PrunedModel.*fastmdl.pagcp"):
        basis.decompose(fastmdl.prune(trained(TinyResNet)))
    with pytest.raises(ValueError, match="num_domains"):
        basis.decompose(trained(TinyResNet), num_domains=2)
    with pytest.raises(ValueError, match="loader_per_domain"):
        basis.taylor_importance(bm, loaders()[:2])
    with pytest.raises(ValueError, match="max_batches"):
        basis.taylor_importance(bm, loaders(), max_batches=0)
    with pytest.raises(ValueError, match="out of range"):
        bm(torch.randn(2, 3, 8, 8), 3)


def test_experiment_smoke_mode_runs(tmp_path, capsys):
    import basis_experiment

    result = basis_experiment.main(["--smoke", "--out", str(tmp_path)])
    # Each training call shows a bar (stderr) under its name; --no-progress hides them.
    assert "basis transfer, 1 epoch:" in capsys.readouterr().err
    assert (tmp_path / "basis_experiment.json").exists()
    assert (tmp_path / "basis_experiment.md").exists()
    methods = {row["method"] for row in result["rows"]}
    assert methods == {"basis", "filters", "double"}
    md = (tmp_path / "basis_experiment.md").read_text()
    assert "- basis: target" in md and "- basis (test): target" in md
    assert "Held-out test split" in md
    # The header names what was pruned; the smoke backbone has no width setting.
    backbone, _ = basis_experiment._smoke_inputs(0)
    n = sum(p.numel() for p in backbone.parameters())
    assert result["settings"]["backbone_params"] == n and "width" not in result["settings"]
    assert f"backbone {n:,} parameters, " in md
    assert basis_experiment._backbone({"width": 0.5, "backbone_params": 1471978}) == (
        "backbone width 0.5, 1,471,978 parameters, ")
    assert basis_experiment._backbone({}) == ""
    assert (tmp_path / "basis_experiment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(len(row["test"]["acc"]) == 2 for row in result["rows"])
    only = basis_experiment.main(["--smoke", "--no-basis-rows", "--no-progress",
                                  "--out", str(tmp_path)])
    assert "transfer, 1 epoch:" not in capsys.readouterr().err
    assert {row["method"] for row in only["rows"]} == {"filters", "double"}
    recipe = basis_experiment.main(["--smoke", "--budget", "none", "--gradual", "--retrain-epochs",
                                    "1", "--schedule", "cosine", "--distill", "0.5",
                                    "--out", str(tmp_path)])
    assert recipe["settings"]["distill"] == 0.5 and recipe["settings"]["schedule"] == "cosine"
    assert all(math.isfinite(a) for row in recipe["rows"] for a in row["acc"])
    taught = basis_experiment.main(["--smoke", "--budget", "none", "--gradual", "--retrain-epochs",
                                    "1", "--schedule", "cosine", "--distill", "0.5",
                                    "--teacher", "reference",
                                    "--out", str(tmp_path)])
    assert taught["settings"]["teacher"] == "reference"
    assert "(teacher: reference)" in (tmp_path / "basis_experiment.md").read_text()
    # The teacher changes what the pruned rows learn, not the reference or the transfer.
    assert taught["rows"][:2] == recipe["rows"][:2] and taught["rows"][2:] != recipe["rows"][2:]
    longer = basis_experiment.main(["--smoke", "--budget", "none", "--gradual", "--retrain-epochs",
                                    "1", "--schedule", "cosine", "--distill", "0.5",
                                    "--last-retrain-epochs", "3", "--out", str(tmp_path)])
    # The deepest cut (0.8) retrains 3 epochs: 1 of transfer + 1 after 0.5 + 3 for the reference.
    assert longer["settings"]["last_retrain_epochs"] == 3
    assert longer["settings"]["reference_epochs"] == 5 == recipe["settings"]["reference_epochs"] + 2
    md = (tmp_path / "basis_experiment.md").read_text()
    assert "retrain epochs 1 (3 after the deepest cut)" in md
    # Only the reference row and the deepest cut's row are trained differently: the
    # transfer and the 0.5 cut score as before (their drops move with the reference).
    def scores(row):
        return row["acc"], row["test"]["acc"], row["params"]
    assert [r["basis_ratio"] for r in longer["rows"]] == [0.0, 0.0, 0.5, 0.8]
    assert [scores(r) for r in longer["rows"][1:3]] == [scores(r) for r in recipe["rows"][1:3]]
    assert longer["rows"][0]["method"] == "basis (reference, 5 epochs)"
    assert scores(longer["rows"][3]) != scores(recipe["rows"][3])


def test_distill_loss_is_the_kl_divergence_over_each_samples_own_classes():
    from basis_experiment import distill_loss

    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(4, 5, generator=g)
    student = torch.randn(4, 5, generator=g)
    teacher[:2, 3:] = student[:2, 3:] = float("-inf")  # samples of a 3-class domain
    loss = distill_loss(student, teacher, 2.0)
    expected = 0.0
    for t, s_ in zip(teacher, student):
        own = torch.isfinite(t)
        p, q = torch.softmax(t[own] / 2, 0), torch.softmax(s_[own] / 2, 0)
        expected += 4 * float((p * (p / q).log()).sum()) / 4
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(distill_loss(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    student.requires_grad_(True)
    distill_loss(student, teacher, 2.0).backward()
    assert torch.isfinite(student.grad).all()


def test_experiment_target_needs_70_percent_fewer_params_and_every_domain_within_a_point():
    import basis_experiment

    def row(method, ratio, params, drops):
        return {"method": method, "basis_ratio": ratio, "params_pct": params,
                "drop_points": drops}
    rows = [row("basis", 0.0, [112, 112], [0.0, 0.0]),
            row("basis", 0.7, [34, 33], [0.2, -1.0]),     # too many params
            row("basis", 0.75, [29, 30], [0.9, 0.5]),     # met
            row("basis", 0.8, [23, 23], [1.5, 0.0]),      # one domain drops too far
            row("double", 0.8, [20, 20], [0.0, 1.0])]     # exactly 1 point is not "under"
    lines = basis_experiment.target_lines({"rows": rows})
    assert lines[0] == ("- basis: target met at ratio 0.75 (70.0% fewer params than the "
                        "backbone in every domain, largest drop 0.9 points, mean 0.7)")
    assert lines[1] == ("- double: target (>= 70% fewer params, every domain within 1 point) "
                        "NOT met by any row")
    # On the test split the drops under row["test"] decide, not the validation ones.
    for r in rows:
        r["test"] = {"drop_points": [d + 0.5 for d in r["drop_points"]]}
    lines = basis_experiment.target_lines({"rows": rows}, "test")
    assert lines[0] == ("- basis (test): target (>= 70% fewer params, every domain within 1 "
                        "point) NOT met by any row")


def test_experiment_refuses_bad_settings_before_training():
    import basis_experiment

    backbone, domains = basis_experiment._smoke_inputs()
    with pytest.raises(ValueError, match="teacher must be one of"):
        basis_experiment.run(backbone, domains, epochs=1, teacher="backbone", log=None)
    with pytest.raises(ValueError, match="last_retrain_epochs must be >= 0"):
        basis_experiment.run(backbone, domains, epochs=1, last_retrain_epochs=-1, log=None)
    with pytest.raises(TypeError, match="last_retrain_epochs must be an int"):
        basis_experiment.run(backbone, domains, epochs=1, last_retrain_epochs=2.0, log=None)
    with pytest.raises(ValueError, match="ratios must name at least one"):
        basis_experiment.run(backbone, domains, epochs=1, ratios=(), log=None)
    # No distillation, or no reference row to distil from: the flag would do nothing.
    for settings in (dict(retrain_epochs=1), dict(distill=0.5)):
        with pytest.raises(ValueError, match="teacher='reference'"):
            basis_experiment.run(backbone, domains, epochs=1, teacher="reference", log=None,
                                 **settings)
