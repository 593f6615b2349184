"""The size a model is costed and served at: given to convert, read off the
training images, or (neither) assumed, and then said to be."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fastmdl
from fastmdl.models import resnet26


def _loaders(size, domains=2, n=8):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 1, size, size, generator=g),
                       torch.randint(0, 3, (n,), generator=g))
    return [DataLoader(ds, batch_size=4) for _ in range(domains)]


def _model(**kw):
    torch.manual_seed(0)
    return fastmdl.convert(resnet26(num_classes=3, width=0.25, in_channels=1), 2, [3, 3], **kw)


def test_without_input_size_the_size_is_assumed_and_the_report_says_so():
    m = _model()
    assert m.input_size == (1, 224, 224) and m.input_size_source == "assumed"
    report = fastmdl.cost_report(m)
    assert report.input_size_assumed and str(report).startswith("NOTE: input size (1, 224, 224)")
    assert not fastmdl.cost_report(m, input_size=(1, 32, 32)).input_size_assumed


def test_training_adopts_the_images_size_and_prune_keeps_it():
    m = _model()
    fastmdl.train(m, _loaders(24), epochs=1, progress=False, log=None)
    assert m.input_size == (1, 24, 24) and m.input_size_source == "trained"
    at_24 = fastmdl.cost_report(m, input_size=(1, 24, 24))
    report = fastmdl.cost_report(m)
    assert not report.input_size_assumed and report.input_size == (1, 24, 24)
    assert [d["flops"] for d in report.domains] == [d["flops"] for d in at_24.domains]
    pruned = fastmdl.prune(m)
    assert pruned.input_size == (1, 24, 24) and pruned.input_size_source == "trained"
    assert not fastmdl.cost_report(pruned).input_size_assumed


def test_a_given_size_stays_whatever_the_training_images_are():
    m = _model(input_size=(1, 32, 32))
    fastmdl.train(m, _loaders(24), epochs=1, progress=False, log=None)
    assert m.input_size == (1, 32, 32) and m.input_size_source == "given"


def test_loaders_without_a_dataset_leave_it_assumed_and_the_log_says_so():
    m = _model()
    said = []
    batches = [list(loader) for loader in _loaders(24)]  # plain lists of (x, y) batches
    fastmdl.train(m, batches, epochs=1, progress=False, log=said.append)
    assert m.input_size_source == "assumed"
    assert any("assumed input size" in s for s in said)


def test_set_input_size_checks_its_arguments():
    m = _model()
    with pytest.raises(ValueError, match="input channels"):
        m.set_input_size((3, 32, 32))
    with pytest.raises(ValueError, match="input_size must be"):
        m.set_input_size((1, 0, 32))
    with pytest.raises(ValueError, match="input_size_source"):
        m.set_input_size((1, 32, 32), "guessed")
    m.set_input_size((1, 40, 40))
    assert m.input_size == (1, 40, 40) and m.input_size_source == "given"
    assert fastmdl.cost_report(m).input_size == (1, 40, 40)


def test_save_and_load_keep_where_the_size_came_from(tmp_path):
    m = _model()
    fastmdl.train(m, _loaders(24), epochs=1, progress=False, log=None)
    fastmdl.save(fastmdl.prune(m), tmp_path / "m.fmdl")
    back = fastmdl.load(tmp_path / "m.fmdl")
    assert back.input_size == (1, 24, 24) and back.input_size_source == "trained"
    fastmdl.save(fastmdl.prune(_model()), tmp_path / "a.fmdl")
    assert fastmdl.load(tmp_path / "a.fmdl").input_size_source == "assumed"
