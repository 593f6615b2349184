"""Each block pattern of torchvision's classification families (tests/families.py)
through the whole pipeline: convert -> one training step -> per-domain masks ->
prune -> the pruned network equals the masked model on mixed batches, in both
layouts -> save/load -> the same outputs."""

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import families
import fastmdl
from fastmdl.pruned import PrunedConv2d
from pruned_model import set_masks

SIZE, CLASSES = 32, [10, 4, 7]
PIPELINE = list(families.FAMILIES)


def _loaders(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [DataLoader(TensorDataset(torch.randn(8, 3, SIZE, SIZE, generator=g),
                                     torch.randint(0, k, (8,), generator=g)), batch_size=8)
            for k in CLASSES]


def _conv_weights(model, kind) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, kind))


@pytest.mark.parametrize("family", PIPELINE)
def test_family_converts_trains_prunes_saves_and_loads(family, tmp_path):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # frozen layers are reported, not failed
        model = fastmdl.convert(getattr(families, family)(), 3, CLASSES,
                                input_size=(3, SIZE, SIZE))
    fastmdl.train(model, _loaders(0), epochs=1, budget=0.75, train_weights=True,
                  progress=False, log=None, recalibrate=1)
    set_masks(model, keep=0.5, shared=0.0, seed=1)
    model.train()
    with torch.no_grad():  # each domain's BatchNorm statistics from its own samples
        for _ in range(2):
            model(torch.randn(6, 3, SIZE, SIZE) * 1.5 + 0.3, torch.arange(6) % 3)
    model.eval()
    pruned = fastmdl.prune(model)
    assert _conv_weights(pruned, PrunedConv2d) <= _conv_weights(model, fastmdl.Conv2d)

    x = torch.randn(5, 3, SIZE, SIZE)
    cases = {"mixed, domain 1 absent": (x, torch.tensor([0, 2, 2, 0, 2])),
             "mixed": (x, torch.tensor([1, 0, 2, 1, 1])),
             "batch of 1": (x[:1], torch.tensor([1]))}
    with torch.no_grad():
        want = {k: model(xs, d) for k, (xs, d) in cases.items()}
        for layout in ("compact", "union"):
            pruned.layout = layout
            for k, (xs, d) in cases.items():
                torch.testing.assert_close(pruned(xs, d), want[k], rtol=1e-4, atol=1e-4,
                                           msg=lambda m, k=k, lay=layout: f"{lay}, {k}: {m}")
        fastmdl.save(pruned, tmp_path / "m.fmdl")
        back = fastmdl.load(tmp_path / "m.fmdl")
        for k, (xs, d) in cases.items():
            torch.testing.assert_close(back(xs, d), want[k], rtol=1e-4, atol=1e-4)



def test_a_convolutional_classifier_is_a_per_domain_head():
    model = fastmdl.convert(families.fire(), 3, CLASSES, input_size=(3, SIZE, SIZE))
    head = model.module.classifier[1]
    assert isinstance(head, fastmdl.ConvHeads) and head.num_classes == CLASSES
    with torch.no_grad():
        out = model(torch.randn(3, 3, SIZE, SIZE), torch.tensor([0, 1, 2]))
    assert out.shape == (3, 10) and torch.isneginf(out[1, 4:]).all()
    assert torch.isneginf(out[2, 7:]).all() and torch.isfinite(out[0]).all()
