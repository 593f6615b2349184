"""fastmdl.finetune: the fine-tune a pruned multi-domain network gets, against the
plain loop it stands for."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import fastmdl
from fastmdl.train import mixed_batches, recalibrate_bn
from models import TinyResNet
from test_prune import trained

CLASSES = (5, 2, 7)


def _loaders(seed=0, n=(10, 6, 8), batch=4):
    """Fixed-order loaders (no shuffling), so two runs see the same batches."""
    g = torch.Generator().manual_seed(seed)
    return [DataLoader(TensorDataset(torch.randn(k, 3, 8, 8, generator=g) * 1.3 + 0.2,
                                     torch.randint(0, c, (k,), generator=g)), batch_size=batch)
            for k, c in zip(n, CLASSES)]


def _by_hand(model, loaders, steps, lr):
    """The loop finetune stands for: Adam on everything but the mask scores, one
    mixed batch per step, a PrunedModel inside batchnorm_training."""
    params = [p for n, p in model.named_parameters() if not n.endswith("scores")]
    opt = torch.optim.Adam(params, lr=lr)
    batches = mixed_batches(loaders)
    ctx = (model.batchnorm_training() if isinstance(model, fastmdl.PrunedModel)
           else torch.enable_grad())
    with ctx:
        model.train()
        for _ in range(steps):
            x, y, d = next(batches)
            opt.zero_grad()
            F.cross_entropy(model(x, d), y).backward()
            opt.step()
    return model.eval()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("pruned", [True, False], ids=["PrunedModel", "MultiDomainModel"])
def test_finetune_is_the_plain_loop_then_recalibration(pruned):
    m = trained(TinyResNet, CLASSES)
    model = fastmdl.prune(m) if pruned else m
    loaders = _loaders()
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    losses = fastmdl.finetune(ours, loaders, 6, lr=0.02, recalibrate=2, progress=False)
    _by_hand(theirs, loaders, 6, lr=0.02)
    recalibrate_bn(theirs, loaders, 2)
    theirs.eval()
    assert len(losses) == 6 and all(loss > 0 for loss in losses)
    assert not ours.training
    a, b = _state(ours), _state(theirs)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    before = _state(model)
    moved = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], before[k])]
    assert moved, "nothing trained"
    assert not any(k.endswith("scores") for k in moved), "a mask moved"
    x, d = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 2, 1, 0])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, d), theirs(x, d), rtol=1e-4, atol=1e-5)


def test_checkpoints_see_the_network_as_a_shorter_finetune_returns_it():
    model = fastmdl.prune(trained(TinyResNet, CLASSES))
    loaders = _loaders(1)
    seen = {}

    def callback(k, net):
        assert not net.training
        seen[k] = (net, _state(net))

    ours = copy.deepcopy(model)
    fastmdl.finetune(ours, loaders, 5, lr=0.02, recalibrate=1, checkpoints=[3, 0, 5, 3],
                     callback=callback, progress=False)
    assert sorted(seen) == [0, 3, 5]
    assert seen[5][0] is ours and seen[3][0] is not ours
    for k in (0, 3):
        short = copy.deepcopy(model)
        fastmdl.finetune(short, loaders, k, lr=0.02, recalibrate=1, progress=False)
        for name, v in _state(short).items():
            torch.testing.assert_close(seen[k][1][name], v, rtol=1e-5, atol=1e-6, msg=name)


def test_finetune_lowers_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = fastmdl.prune(trained(TinyResNet, CLASSES))
    loaders = _loaders(2, n=(4, 4, 4))  # one batch per domain, seen every step
    losses = fastmdl.finetune(model, loaders, 30, lr=0.01, progress=False)
    assert losses[-1] < 0.5 * losses[0]


def test_finetune_rejects_bad_arguments():
    model = fastmdl.prune(trained(TinyResNet, CLASSES))
    loaders = _loaders()
    with pytest.raises(TypeError, match="model"):
        fastmdl.finetune(TinyResNet(), loaders, 1)
    with pytest.raises(TypeError, match="steps"):
        fastmdl.finetune(model, loaders, 2.5)
    with pytest.raises(TypeError, match="steps"):
        fastmdl.finetune(model, loaders, True)
    with pytest.raises(ValueError, match="steps"):
        fastmdl.finetune(model, loaders, -1)
    for lr in (0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lr"):
            fastmdl.finetune(model, loaders, 1, lr=lr)
    with pytest.raises(ValueError, match="recalibrate"):
        fastmdl.finetune(model, loaders, 1, recalibrate=-2)
    with pytest.raises(ValueError, match="checkpoints"):
        fastmdl.finetune(model, loaders, 3, checkpoints=[4], callback=print)
    with pytest.raises(TypeError, match="callback"):
        fastmdl.finetune(model, loaders, 3, checkpoints=[2])
    with pytest.raises(ValueError, match="train_loaders"):
        fastmdl.finetune(model, loaders[:2], 1)
    bad = _loaders()
    bad[2] = DataLoader(TensorDataset(torch.randn(4, 3, 8, 8), torch.full((4,), 7)), batch_size=4)
    with pytest.raises(ValueError, match="domain 2"):
        fastmdl.finetune(model, bad, 1, progress=False)
