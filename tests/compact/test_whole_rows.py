"""Steps that run once over every row (fastmdl/compact/steps.py: ``Joined``): a
convolution or map whose every domain holds every channel gives what the
per-domain calls give, with each domain's own BatchNorm applied per row."""

import pytest
import torch
from torch import nn

import fastmdl
from fastmdl.compact import parallel, steps as S
from layouts import check_every_layout, per_domain_statistics
from pruned_model import set_masks

SIZE = 12


def _shuffle(x, groups: int = 2):
    """A channel shuffle that also transposes each image: the channel analysis
    follows shuffles, not this, so the channels stay whole; the compact layout runs
    its views per domain, or once over all rows. -1, not x.size(0): the view reads
    no per-segment size, so it can run once."""
    _, c, h, w = x.shape
    return x.view(-1, groups, c // groups, h, w).transpose(1, 2).transpose(3, 4) \
        .reshape(-1, c, w, h)


class FrozenMiddle(nn.Module):
    """Shuffles with a transpose (``_shuffle``) keep the middle convolutions' channels whole: ``mid`` (with
    a per-domain BatchNorm: weights that differ by a per-channel gain) and ``last``
    (no BatchNorm: the same weights for every domain). ``tail`` prunes: its
    domains write different channels, so it runs per domain."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                 nn.ReLU())
        self.last = nn.Conv2d(8, 8, 1)
        self.tail = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = _shuffle(self.stem(x))
        y = _shuffle(self.mid(x))
        y = self.last(y) + y
        return self.head(self.tail(y).mean((2, 3)))


@pytest.fixture
def pruned():
    torch.manual_seed(0)
    model = fastmdl.convert(FrozenMiddle(), 3, [5, 5, 5], input_size=(3, SIZE, SIZE))
    set_masks(model, keep=0.5, shared=0.0, seed=2)
    per_domain_statistics(model, SIZE)
    return model, fastmdl.prune(model)


def _conv(plan, prefix):
    return next(s for s in plan.steps if isinstance(s, S.Conv) and s.name.startswith(prefix))


def test_frozen_layers_run_once_and_equal_the_masked_model(pruned):
    model, p = pruned
    plan = p.compact_plan()
    mid, last = _conv(plan, "mid"), _conv(plan, "last")
    assert mid.whole is not None and not mid.whole_same  # per-domain BatchNorm: an epilogue
    # Where the per-domain calls would run Winograd (AVX-512 CPUs), the one call does too.
    assert (mid.whole.winograd is not None) == (mid.winograd is not None)
    assert last.whole is None and last.whole_same  # one weight for every domain
    assert _conv(plan, "tail").whole is None and not _conv(plan, "tail").whole_same
    assert any(isinstance(s, S.Map) and s.whole for s in plan.steps)
    check_every_layout(p, model, "FrozenMiddle", SIZE, rtol=1e-5, atol=1e-5)


def test_one_pass_over_rows_gives_joined_views(pruned):
    _, p = pruned
    plan = p.compact_plan()
    x = torch.randn(5, 3, SIZE, SIZE)
    seg = S.Segments.of(torch.tensor([2, 0, 2, 0, 2]), 5, 3, x.device)
    state = S.RunState(x, torch.tensor([2, 0, 2, 0, 2]), seg, 3)
    env = {}
    with torch.no_grad():
        for step in plan.steps:
            env[step.name] = step.run(env, state)
    value = env[_conv(plan, "mid").name]
    assert isinstance(value, S.Joined) and value[1] is None
    assert value.whole.shape[0] == 5
    assert value[0].data_ptr() == value.whole.data_ptr()  # views, not copies
    assert value[2].shape[0] == 3


def test_rows_split_over_threads(pruned, monkeypatch):
    """The parallel runner cuts rows into runs; a step that runs once runs once per run."""
    model, p = pruned
    monkeypatch.setattr(parallel, "MIN_PARALLEL_MACS", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        plan = p.compact_plan()
        assert plan.parallel
        x, d = torch.randn(7, 3, SIZE, SIZE), torch.tensor([0, 1, 2, 2, 1, 0, 0])
        with torch.no_grad():
            p.layout = "compact"
            torch.testing.assert_close(p(x, d), model(x, d), rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(threads)
        p.layout = "auto"


def test_helpers():
    a, c = torch.randn(2, 3, 1, 1), torch.randn(4, 3, 1, 1)
    parts = [a, None, c]
    whole = S.rows_of(parts, [0, 2])
    assert torch.equal(whole, torch.cat([a, c]))
    j = S.joined(whole * 2, parts, [0, 2], 3)
    assert j[1] is None and torch.equal(j[0], a * 2) and torch.equal(j[2], c * 2)
    assert S.rows_of(j, [0, 2]) is j.whole
    table = torch.arange(9.0).view(3, 3)
    rows = S.per_row(table, parts, [0, 2])
    assert rows.shape == (6, 3, 1, 1)
    assert torch.equal(rows[:2, :, 0, 0], table[[0, 0]]) and \
        torch.equal(rows[2:, :, 0, 0], table[[2] * 4])
