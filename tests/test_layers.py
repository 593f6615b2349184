"""fastmdl.Conv2d, BatchNorm2d and DomainHeads against plain PyTorch."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastmdl
from fastmdl.masks import binarize


def test_conv_is_a_drop_in_and_masks_filters():
    torch.manual_seed(0)
    ref = nn.Conv2d(5, 7, 3, stride=2, padding=1)
    conv = fastmdl.Conv2d(5, 7, 3, stride=2, padding=1, num_domains=3)
    conv.load_state_dict(ref.state_dict())  # no "scores" in it: still loads strictly
    x = torch.randn(4, 5, 9, 9)
    conv.scores.data = torch.randn(3, 7)
    domain = torch.tensor([2, 0, 1, 2])
    y = conv(x, domain)
    keep = (conv.scores > 0).float()[domain][:, :, None, None]
    torch.testing.assert_close(y, ref(x) * keep)
    torch.testing.assert_close(conv(x, 1),
                               ref(x) * (conv.scores[1] > 0).float()[None, :, None, None])


def test_conv_alone_with_one_domain_needs_no_domain():
    conv = fastmdl.Conv2d(3, 4, 1)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias))


def test_conv_rejects_bad_domains():
    conv = fastmdl.Conv2d(3, 4, 1, num_domains=2)
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError, match="out of range"):
        conv(x, 2)
    with pytest.raises(ValueError, match="out of range"):
        conv(x, torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="int64"):
        conv(x, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(N,\)"):
        conv(x, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="call it as"):
        conv(x)
    with pytest.raises(ValueError, match="num_domains"):
        fastmdl.Conv2d(3, 4, 1, num_domains=0)


def test_straight_through_gradient_reaches_scores():
    s = torch.randn(3, 5, requires_grad=True)
    m = binarize(s)
    assert torch.equal(m, (s > 0).float())
    (m * torch.arange(5.0)).sum().backward()
    torch.testing.assert_close(s.grad, torch.arange(5.0).expand(3, 5))


def test_batchnorm_uses_each_domains_own_statistics():
    torch.manual_seed(1)
    bn = fastmdl.BatchNorm2d(6, num_domains=3)
    bn.weight.data = torch.randn(3, 6)
    bn.bias.data = torch.randn(3, 6)
    x = torch.randn(7, 6, 4, 4) * 3 + 1
    domain = torch.tensor([0, 2, 0, 2, 2, 0, 0])
    y = bn(x, domain)
    for d in (0, 2):
        rows = domain == d
        ref = F.batch_norm(x[rows], None, None, bn.weight[d], bn.bias[d], True, 0.0, bn.eps)
        torch.testing.assert_close(y[rows], ref)
        torch.testing.assert_close(bn.running_mean[d], 0.1 * x[rows].mean(dim=(0, 2, 3)))
    assert torch.equal(bn.running_mean[1], torch.zeros(6))  # no samples, no update
    assert bn.num_batches_tracked.tolist() == [1, 0, 1]
    bn.eval()
    y = bn(x, domain)
    for d in (0, 2):
        rows = domain == d
        ref = F.batch_norm(x[rows], bn.running_mean[d], bn.running_var[d], bn.weight[d],
                           bn.bias[d], False, 0.0, bn.eps)
        torch.testing.assert_close(y[rows], ref)


def test_batchnorm_takes_a_plain_state_dict_for_every_domain():
    ref = nn.BatchNorm2d(4)
    ref.running_mean.uniform_()
    ref.weight.data.uniform_()
    bn = fastmdl.BatchNorm2d.from_batchnorm(ref, 3)
    assert torch.equal(bn.running_mean, ref.running_mean.expand(3, 4))
    assert torch.equal(bn.weight.data, ref.weight.data.expand(3, 4))
    x = torch.randn(2, 4, 3, 3)
    bn.eval(), ref.eval()
    torch.testing.assert_close(bn(x, 2), ref(x))


def test_heads_pad_with_minus_infinity_and_train_with_cross_entropy():
    torch.manual_seed(2)
    heads = fastmdl.DomainHeads(6, [3, 5, 2])
    x = torch.randn(4, 6)
    domain = torch.tensor([1, 0, 2, 1])
    y = heads(x, domain)
    assert y.shape == (4, 5)
    for n, d in enumerate(domain.tolist()):
        k = heads.num_classes[d]
        torch.testing.assert_close(y[n, :k], heads.weights[d] @ x[n] + heads.biases[d])
        assert torch.isinf(y[n, k:]).all() and (y[n, k:] < 0).all()
    loss = F.cross_entropy(y, torch.tensor([4, 2, 1, 0]))
    assert torch.isfinite(loss)
    loss.backward()
    assert heads.weights[2].grad.abs().sum() > 0


def test_heads_reject_bad_class_lists():
    with pytest.raises(ValueError, match="num_classes"):
        fastmdl.DomainHeads(4, [3, 0])
    with pytest.raises(TypeError, match="num_classes"):
        fastmdl.DomainHeads(4, 3)
