"""fastmdl.pruned: fine-tuning a pruned network with its BatchNorms unfolded
(PrunedModel.batchnorm_training) behaves as the unpruned network trains."""

import pytest
import torch
import torch.nn.functional as F

import fastmdl
from fastmdl.pruned import PrunedBatchNorm2d, PrunedConv2d
from models import CatNet, TinyResNet
from test_prune import trained


def _finite(logits):
    """Logits with the -inf past each domain's classes set to 0, for a loss."""
    return torch.where(torch.isfinite(logits), logits, torch.zeros_like(logits))


@pytest.mark.parametrize("make", [TinyResNet, CatNet], ids=["resnet", "cat"])
@pytest.mark.parametrize("fuse", [True, False])
def test_a_training_step_inside_batchnorm_training_equals_one_before_pruning(make, fuse):
    m = trained(make)
    p = fastmdl.prune(m, fuse=fuse)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(12, 3, 8, 8, generator=g) * 1.5 + 0.3
    domain = torch.tensor([0, 1, 2, 2, 1, 0, 0, 1, 2, 0, 2, 1])
    r = torch.randn(12, 7, generator=g)
    lr = 0.05

    m.train()
    out_m = m(x, domain)
    (_finite(out_m) * r).sum().backward()
    with torch.no_grad():  # one SGD step on every convolution weight, the rest fixed
        for c in m.modules():
            if isinstance(c, fastmdl.Conv2d):
                c.weight -= lr * c.weight.grad
    m.eval()

    x2 = torch.randn(7, 3, 8, 8, generator=g)
    d2 = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    with p.batchnorm_training(momentum=0.1):
        p.train()
        out_p = p(x, domain)
        torch.testing.assert_close(out_p, out_m, rtol=1e-4, atol=1e-4)
        (_finite(out_p) * r).sum().backward()
        scale_grads = [c.scale.grad for c in p.modules()
                       if isinstance(c, (PrunedConv2d, PrunedBatchNorm2d)) and c.has_stats]
        assert scale_grads and all(s is not None and s.abs().sum() > 0 for s in scale_grads)
        with torch.no_grad():
            for c in p.modules():
                if isinstance(c, PrunedConv2d):
                    c.weight -= lr * c.weight.grad
            p.eval()
            inside = p(x2, d2)  # eval inside the block: the running statistics
    with torch.no_grad():
        after = p(x2, d2)
        expected = fastmdl.prune(m, fuse=fuse)(x2, d2)
    torch.testing.assert_close(inside, after, rtol=1e-5, atol=1e-5)
    # Weights, running statistics (momentum 0.1) and the refold all agree.
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)


def _layer(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, c = 2, 5
    masks = torch.ones(d, c)
    masks[1, [1, 3]] = 0
    mean = torch.randn(d, c, generator=g, dtype=dtype)
    var = torch.rand(d, c, generator=g, dtype=dtype) + 0.5
    layer = PrunedBatchNorm2d(torch.randn(d, c, generator=g, dtype=dtype),
                              torch.randn(d, c, generator=g, dtype=dtype), masks,
                              bn_stats=(mean, var, 1e-3))
    return layer, masks, mean, var


def test_unfolded_batchnorm_is_batch_norm_with_gamma_and_beta_from_scale_and_shift():
    layer, masks, mean0, var0 = _layer()
    layer.train()
    g = torch.Generator().manual_seed(1)
    z = torch.randn(7, 5, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    domain = torch.tensor([0, 1, 0, 1, 1, 0, 0])
    r = torch.randn(7, 5, 3, 2, generator=g, dtype=torch.float64)
    layer._unfold(masks, momentum=0.25, always_batch=False)
    try:
        y = layer(z, domain)
        (y * r).sum().backward()
        got = (y.detach(), z.grad.clone(), layer.scale.grad.clone(), layer.shift.grad.clone())
        run_mean = layer._unfolded.run_mean.clone()

        # Reference: F.batch_norm per domain, γ = s sqrt(σ0² + ε), β = t + μ0 s.
        s = layer.scale.detach().clone().requires_grad_()
        t = layer.shift.detach().clone().requires_grad_()
        z2 = z.detach().clone().requires_grad_()
        gamma, beta = s * torch.sqrt(var0 + 1e-3), t + mean0 * s
        ref = torch.zeros_like(z2)
        for d in (0, 1):
            rows = (domain == d).nonzero().squeeze(1)
            yd = F.batch_norm(z2[rows], None, None, gamma[d], beta[d], training=True, eps=1e-3)
            ref = ref.index_copy(0, rows, yd * masks[d].to(z2.dtype)[None, :, None, None])
        (ref * r).sum().backward()
        for a, b in zip(got, (ref.detach(), z2.grad, s.grad, t.grad)):
            torch.testing.assert_close(a, b)
        for d in (0, 1):
            batch = z.detach()[domain == d].mean(dim=(0, 2, 3))
            keep = masks[d] > 0
            torch.testing.assert_close(run_mean[d][keep],
                                       0.75 * mean0[d][keep] + 0.25 * batch[keep])
            assert torch.equal(run_mean[d][~keep], mean0[d][~keep])

        # Nothing is detached on the way to scale, shift and the input.
        layer.zero_grad()
        fn = lambda zz, ss, tt: _with(layer, ss, tt, lambda: layer(zz, domain))  # noqa: E731
        assert torch.autograd.gradcheck(
            fn, (z.detach().clone().requires_grad_(), layer.scale.detach().clone().requires_grad_(),
                 layer.shift.detach().clone().requires_grad_()))
    finally:
        layer._refold(commit=False)


def _with(layer, scale, shift, f):
    """f() with the layer's scale and shift swapped for the given tensors."""
    saved = layer.scale, layer.shift
    del layer.scale, layer.shift
    layer.scale, layer.shift = scale, shift
    try:
        return f()
    finally:
        del layer.scale, layer.shift
        layer.scale, layer.shift = saved


def test_batchnorm_training_rejects_what_it_cannot_do_and_leaves_an_aborted_block_as_it_was():
    p = fastmdl.prune(trained(TinyResNet))
    assert p.has_bn_stats
    x = torch.randn(6, 3, 8, 8)
    domain = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        before = p(x, domain)
    for bad, err in ((0, ValueError), (1.5, ValueError), ("0.1", TypeError), (True, TypeError)):
        with pytest.raises(err, match="momentum"):
            with p.batchnorm_training(momentum=bad):
                pass
    with pytest.raises(RuntimeError, match="do not nest"):
        with p.batchnorm_training():
            with p.calibrating():
                pass
    with pytest.raises(KeyError):
        with p.batchnorm_training():
            p.train()
            p(x, domain)  # moves the running statistics...
            raise KeyError("stop")
    p.eval()
    with torch.no_grad():  # ...which an aborted block does not keep
        assert torch.equal(p(x, domain), before)
    assert all(m._unfolded is None for m in p.modules()
               if isinstance(m, (PrunedConv2d, PrunedBatchNorm2d)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        with p.batchnorm_training():
            p.train()
            p(torch.randn(1, 3, 1, 1), 0)
    for m in p.modules():
        if isinstance(m, (PrunedConv2d, PrunedBatchNorm2d)):
            m.set_bn_stats(None)
    assert not p.has_bn_stats
    with pytest.raises(TypeError, match="no BatchNorm statistics"):
        with p.batchnorm_training():
            pass


def test_fine_tuning_inside_batchnorm_training_lowers_the_loss_and_folds_back():
    torch.manual_seed(0)
    p = fastmdl.prune(trained(TinyResNet))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(24, 3, 8, 8, generator=g)
    domain = torch.arange(24) % 3
    y = torch.randint(0, 2, (24,), generator=g)
    with torch.no_grad():
        p.eval()
        start = F.cross_entropy(p(x, domain), y).item()
    opt = torch.optim.Adam(p.parameters(), lr=0.01)
    with p.batchnorm_training(momentum=None):
        p.train()
        for _ in range(30):
            loss = F.cross_entropy(p(x, domain), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        p.eval()
        with torch.no_grad():
            inside = p(x, domain)
    with torch.no_grad():
        after = p(x, domain)
    torch.testing.assert_close(after, inside, rtol=1e-4, atol=1e-4)
    assert F.cross_entropy(after, y).item() < 0.5 * start
