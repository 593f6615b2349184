"""fastmdl.serve.Engine serving images of several sizes: every request answered as
if alone, every batch of one shape, the oldest request's shape first, a size the
model cannot run failing only its requests. A real pruned network, real threads;
every wait has a timeout."""

import re
import threading

import pytest
import torch
from torch import nn

import fastmdl
from fastmdl.serve import Engine

TIMEOUT = 30  # seconds, for any one wait
NUM_CLASSES = [4, 3]
SMALL, LARGE, NOMINAL = (3, 24, 24), (3, 32, 32), (3, 8, 8)


@pytest.fixture(scope="module")
def pruned():
    """A pruned network with global pooling: it runs any image of at least 5x5
    (its first convolution is 5x5, unpadded)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 5, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, max(NUM_CLASSES)))
    m = fastmdl.convert(net, len(NUM_CLASSES), NUM_CLASSES, input_size=NOMINAL)
    g = torch.Generator().manual_seed(0)
    for group in m.mask_groups():
        group.scores.data = torch.rand(group.scores.shape, generator=g) - 0.4
    m.train()
    with torch.no_grad():
        m(torch.randn(8, *NOMINAL), torch.arange(8) % 2)
    return fastmdl.prune(m.eval())


class ShapeLog(nn.Module):
    """``model`` as is, but it records the shape of every batch it is given, and
    with ``hold()`` its next forward pass waits for ``release`` (a way to let
    requests queue up)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.input_size, self.num_domains = model.input_size, model.num_domains
        self.shapes = []
        self.lock = threading.Lock()
        self.held, self.entered, self.release = False, threading.Event(), threading.Event()

    def hold(self):
        self.held = True
        self.entered.clear()
        self.release.clear()

    def forward(self, x, domain):
        with self.lock:
            self.shapes.append(tuple(x.shape))
            held, self.held = self.held, False
        if held:
            self.entered.set()
            assert self.release.wait(TIMEOUT), "never released"
        return self.model(x, domain)


def runs_per_shape(log):
    """{image shape: requests the model ran of it}, over all the batches it saw."""
    runs = {}
    for n, *shape in log.shapes:
        runs[tuple(shape)] = runs.get(tuple(shape), 0) + n
    return runs


def alone(pruned, x, d):
    with torch.no_grad():
        return pruned(x[None], d)[0]


def queue_behind_a_held_batch(engine, log, requests):
    """Futures of ``requests`` [(x, domain)], queued while the engine's runner
    waits in a held batch of one nominal image, which is then released."""
    log.hold()
    first = engine.submit(torch.randn(NOMINAL), 0)
    assert log.entered.wait(TIMEOUT), "the runner never took the first request"
    futures = [engine.submit(x, d) for x, d in requests]
    log.release.set()
    first.result(TIMEOUT)
    return futures


@pytest.mark.parametrize("workers", [1, 2])
def test_mixed_sizes_from_many_threads_each_answered_as_alone(pruned, workers):
    log = ShapeLog(pruned)
    submitted, lock = [], threading.Lock()

    def client(k):
        g = torch.Generator().manual_seed(k)
        for i in range(12):
            shape = (SMALL, LARGE, NOMINAL)[(k + i) % 3]
            x, d = torch.randn(shape, generator=g), (k * 7 + i) % 2
            f = engine.submit(x, d)
            with lock:
                submitted.append((x, d, f))

    with Engine(log, max_batch_size=16, max_delay_ms=2, workers=workers) as engine:
        # Held: the first requests queue up, so batches really hold several.
        log.hold()
        engine.submit(torch.randn(NOMINAL), 1)
        assert log.entered.wait(TIMEOUT)
        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        log.release.set()
        answers = [f.result(TIMEOUT) for _, _, f in submitted]
    for (x, d, _), got in zip(submitted, answers):
        torch.testing.assert_close(got, alone(pruned, x, d), rtol=1e-5, atol=1e-5)
    # Every batch held one shape (else it could not be stacked), and each request
    # was run once: the batches of each shape add up to its requests.
    seen = runs_per_shape(log)
    want = {s: sum(1 for x, _, _ in submitted if tuple(x.shape) == s) for s in (SMALL, LARGE)}
    want[NOMINAL] = 1 + sum(1 for x, _, _ in submitted if tuple(x.shape) == NOMINAL)
    assert seen == want
    stats = engine.stats()
    assert stats["served"] == 73 and stats["failed"] == 0
    if workers == 1:  # everything queued behind the held batch: batched
        assert max(stats["batch_sizes"]) > 1
    assert engine._in_flight == engine._in_flight_requests == engine._queued == 0
    # Only the nominal shape keeps a (now empty) deque: other sizes leave nothing.
    assert set(engine._queues) == {NOMINAL} and not engine._queues[NOMINAL]


def test_each_batch_takes_the_oldest_requests_shape_and_others_keep_their_place(pruned):
    log = ShapeLog(pruned)
    order = [SMALL, LARGE, SMALL, SMALL, SMALL, LARGE, NOMINAL, SMALL]
    requests = [(torch.randn(s), i % 2) for i, s in enumerate(order)]
    with Engine(log, max_batch_size=2, max_delay_ms=0, workers=1) as engine:
        futures = queue_behind_a_held_batch(engine, log, requests)
        answers = [f.result(TIMEOUT) for f in futures]
    for (x, d), got in zip(requests, answers):
        torch.testing.assert_close(got, alone(pruned, x, d), rtol=1e-5, atol=1e-5)
    # After the held batch: the two oldest small ones; then the large one that
    # arrived second, not the small ones queued after it; and so on, by age.
    assert log.shapes[1:] == [(2,) + SMALL, (2,) + LARGE, (2,) + SMALL,
                              (1,) + NOMINAL, (1,) + SMALL]


def test_requests_of_one_shape_are_batched_together_and_in_order(pruned):
    log = ShapeLog(pruned)
    order = [SMALL, LARGE] * 4
    requests = [(torch.randn(s), i % 2) for i, s in enumerate(order)]
    with Engine(log, max_batch_size=64, max_delay_ms=0, workers=1) as engine:
        futures = queue_behind_a_held_batch(engine, log, requests)
        answers = [f.result(TIMEOUT) for f in futures]
    for (x, d), got in zip(requests, answers):
        torch.testing.assert_close(got, alone(pruned, x, d), rtol=1e-5, atol=1e-5)
    assert log.shapes[1:] == [(4,) + SMALL, (4,) + LARGE]


def test_a_size_the_model_cannot_run_fails_only_its_requests(pruned):
    log = ShapeLog(pruned)
    tiny = (3, 3, 3)  # smaller than the 5x5 kernel
    order = [SMALL, tiny, LARGE, tiny, SMALL, tiny]
    requests = [(torch.randn(s), i % 2) for i, s in enumerate(order)]
    with Engine(log, max_batch_size=64, max_delay_ms=0, workers=1) as engine:
        futures = queue_behind_a_held_batch(engine, log, requests)
        for (x, d), f in zip(requests, futures):
            if tuple(x.shape) == tiny:
                with pytest.raises(RuntimeError, match="Kernel size can't be greater than "
                                                       "actual input size"):
                    f.result(TIMEOUT)
            else:
                torch.testing.assert_close(f.result(TIMEOUT), alone(pruned, x, d),
                                           rtol=1e-5, atol=1e-5)
        # Alone, too; and the engine serves on.
        with pytest.raises(RuntimeError, match="Kernel size"):
            engine.submit(torch.randn(tiny), 0).result(TIMEOUT)
        x = torch.randn(SMALL)
        torch.testing.assert_close(engine(x, 1, TIMEOUT), alone(pruned, x, 1),
                                   rtol=1e-5, atol=1e-5)
    stats = engine.stats()
    assert stats["failed"] == 4 and stats["served"] == 1 + 3 + 1
    assert engine.failure is None
    # The tiny ones were a batch of their own, bisected down to single requests;
    # every other request was run once, never retried with them.
    assert log.shapes[1:3] == [(2,) + SMALL, (3,) + tiny] and stats["retried_forwards"] > 0
    runs = runs_per_shape(log)
    assert (runs[NOMINAL], runs[SMALL], runs[LARGE]) == (1, 3, 1)


def test_wrong_channels_or_empty_images_are_refused(pruned):
    with Engine(pruned, max_delay_ms=0) as engine:
        assert engine.input_shape == NOMINAL and engine.channels == 3
        assert not engine.fixed_shape
        bad = {shape: engine.submit(torch.randn(shape), 0)
               for shape in [(1, 24, 24), (4, 8, 8), (3, 0, 8), (3, 8, 0), (24, 24)]}
        x = torch.randn(3, 9, 13)  # any H, W: accepted
        torch.testing.assert_close(engine(x, 0, TIMEOUT), alone(pruned, x, 0),
                                   rtol=1e-5, atol=1e-5)
    for shape, f in bad.items():
        words = f"x must have shape (C=3, H, W) with any H, W >= 1 (one image), got {shape}"
        with pytest.raises(ValueError, match=re.escape(words)):
            f.result(TIMEOUT)


def test_an_explicit_input_shape_is_the_only_shape_accepted(pruned):
    with Engine(pruned, input_shape=NOMINAL, max_delay_ms=0) as engine:
        assert engine.fixed_shape and engine.input_shape == NOMINAL
        refused = engine.submit(torch.randn(SMALL), 0)
        x = torch.randn(NOMINAL)
        torch.testing.assert_close(engine(x, 1, TIMEOUT), alone(pruned, x, 1),
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"x must have shape \(3, 8, 8\) \(one image\), "
                                         r"got \(3, 24, 24\)"):
        refused.result(TIMEOUT)


class Pool(nn.Module):
    """No input_size: any channel count runs; the answer is the mean of each
    channel plus the domain."""

    num_domains = 2

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x, domain):
        return x.mean((2, 3)) * self.w + domain[:, None]


def test_a_model_without_input_size_takes_the_channels_of_the_first_request():
    with Engine(Pool(), max_delay_ms=0) as engine:
        assert engine.input_shape is None and engine.channels is None
        assert not engine.fixed_shape
        assert engine(torch.full((2, 5, 5), 3.0), 1, TIMEOUT).tolist() == [4.0, 4.0]
        assert engine.channels == 2
        assert engine(torch.ones(2, 7, 9), 0, TIMEOUT).tolist() == [1.0, 1.0]
        with pytest.raises(ValueError, match=r"C=2"):
            engine(torch.ones(3, 5, 5), 0, TIMEOUT)
