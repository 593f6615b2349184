"""fastmdl.serve.Engine against a model that misbehaves: outputs it cannot split,
a request that makes the forward pass raise, a thread that dies. Real engine,
real (tiny) torch model; every wait has a timeout, every close() must return."""

import math
import threading

import pytest
import torch
from torch import nn

from fastmdl.serve import Engine, EngineClosed, EngineFailed, ModelOutputError

TIMEOUT = 30  # seconds, for any one wait

# Pixel values that make Probe misbehave on the batch that holds them.
GATE, POISON, DICT, SHORT, EXTRA, EXIT = 1000.0, -1.0, -2.0, -3.0, -4.0, -5.0


class Probe(nn.Module):
    """Answers each request with 4 * its pixel value + its domain. A batch holding
    GATE waits for ``release``; one holding POISON raises ValueError, EXIT raises
    SystemExit (not an Exception); DICT, SHORT and EXTRA return a dict, one row
    too few, one row too many. ``sizes`` records every forward pass's batch size."""

    input_size = (1, 2, 2)
    num_domains = 2

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.entered, self.release = threading.Event(), threading.Event()
        self.sizes = []

    def forward(self, x, domain):
        v = x[:, 0, 0, 0]
        self.sizes.append(len(x))
        if bool((v == GATE).any()):
            self.entered.set()
            self.release.wait(TIMEOUT)
        if bool((v == POISON).any()):
            raise ValueError(f"poisoned input in a batch of {len(x)}")
        if bool((v == EXIT).any()):
            raise SystemExit("the model exited")
        y = x.flatten(1).sum(1, keepdim=True) * self.w + domain[:, None]
        if bool((v == DICT).any()):
            return {"logits": y}
        if bool((v == SHORT).any()):
            return y[:-1]
        if bool((v == EXTRA).any()):
            return torch.cat([y, y[:1]])
        return y


def image(value):
    return torch.full(Probe.input_size, float(value))


def one_batch(engine, model, values, domains=None):
    """Futures for ``values``, all taken by the engine's one runner as one batch:
    they queue while the runner waits in a GATE batch, which it then leaves."""
    gate = engine.submit(image(GATE), 0)
    assert model.entered.wait(TIMEOUT), "the runner never took the gate request"
    domains = domains or [i % 2 for i in range(len(values))]
    futures = [engine.submit(image(v), d) for v, d in zip(values, domains)]
    model.release.set()
    assert float(gate.result(TIMEOUT)) == 4 * GATE
    return futures


def close_within(engine, timeout=TIMEOUT):
    t = threading.Thread(target=engine.close, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "close() did not return"


def assert_serves(engine):
    assert engine.submit(image(2), 1).result(TIMEOUT).tolist() == [9.0]


# ------------------------------------------------------------------ outputs it cannot split


@pytest.mark.parametrize("sentinel, what", [
    (DICT, "returned a dict"),
    (SHORT, "returned a tensor of shape (7, 1)"),
    (EXTRA, "returned a tensor of shape (9, 1)"),
])
def test_an_output_without_one_row_per_request_fails_its_batch_and_the_engine_serves_on(
        sentinel, what):
    model = Probe()
    engine = Engine(model, max_batch_size=64, workers=1)
    try:
        futures = one_batch(engine, model, [1, 2, sentinel, 3, 4, 5, 6, 7])
        for f in futures:  # the model's fault for every request: all fail, none hangs
            with pytest.raises(ModelOutputError, match="one row per request") as e:
                f.result(TIMEOUT)
            assert what in str(e.value) and "8 rows for this batch" in str(e.value)
        stats = engine.stats()
        assert stats["retried_forwards"] == 0  # not a poisoned request: no bisection
        assert stats["failed"] == 8 and stats["batch_sizes"].get(8) == 1
        assert_serves(engine)
        assert engine.failure is None
    finally:
        model.release.set()
        close_within(engine)


# ------------------------------------------------------------------ a poisoned request


def test_a_poisoned_request_fails_alone_and_its_batch_is_answered():
    model = Probe()
    engine = Engine(model, max_batch_size=64, workers=1)
    try:
        values = [float(i + 1) for i in range(30)]
        values[17] = POISON
        futures = one_batch(engine, model, values)
        for i, (v, f) in enumerate(zip(values, futures)):
            if i == 17:
                with pytest.raises(ValueError, match="poisoned input in a batch of 1"):
                    f.result(TIMEOUT)
            else:  # each its own row, after the bisection put the halves back together
                assert f.result(TIMEOUT).tolist() == [4 * v + i % 2]
        stats = engine.stats()
        assert stats["batch_sizes"].get(30) == 1  # really one batch of 30
        assert stats["failed"] == 1 and stats["served"] == 1 + 29
        # Isolating one request costs 2 forward passes per level of halving.
        assert 0 < stats["retried_forwards"] <= 2 * math.ceil(math.log2(30))
        assert_serves(engine)
    finally:
        model.release.set()
        close_within(engine)


def test_two_poisoned_requests_are_both_isolated():
    model = Probe()
    engine = Engine(model, max_batch_size=64, workers=1)
    try:
        values = [float(i + 1) for i in range(64)]
        values[3] = values[50] = POISON
        futures = one_batch(engine, model, values)
        outcomes = [f.exception(TIMEOUT) for f in futures]
        assert [i for i, e in enumerate(outcomes) if e is not None] == [3, 50]
        assert all(isinstance(outcomes[i], ValueError) for i in (3, 50))
        assert all(futures[i].result(0).tolist() == [4 * values[i] + i % 2]
                   for i in range(64) if i not in (3, 50))
        assert engine.stats()["retried_forwards"] <= 4 * math.ceil(math.log2(64))
    finally:
        model.release.set()
        close_within(engine)


def test_retries_of_a_batch_are_bounded_when_every_request_fails():
    model = Probe()
    engine = Engine(model, max_batch_size=64, workers=1)
    try:
        futures = one_batch(engine, model, [POISON] * 64)
        for f in futures:
            with pytest.raises(ValueError, match="poisoned input"):
                f.result(TIMEOUT)
        retried = engine.stats()["retried_forwards"]
        assert 0 < retried <= 4 * math.ceil(math.log2(64))
        # The passes the model saw: the batch's own, then the retries, each on at
        # most half the batch.
        assert model.sizes[-retried - 1] == 64 and max(model.sizes[-retried:]) <= 32
        assert engine.stats()["failed"] == 64
        assert_serves(engine)
    finally:
        model.release.set()
        close_within(engine)


# ------------------------------------------------------------------ a thread that dies


def test_a_runner_that_dies_fails_its_batch_and_the_queue_and_refuses_new_work():
    model = Probe()
    engine = Engine(model, max_batch_size=2, workers=1)
    try:
        # The runner takes [EXIT, 1] and dies; [2, 3, 4] wait in the queue.
        futures = one_batch(engine, model, [EXIT, 1, 2, 3, 4])
        for f in futures:
            with pytest.raises(EngineFailed, match="SystemExit: the model exited"):
                f.result(TIMEOUT)
        with pytest.raises(EngineFailed, match="fastmdl-runner-0 died of SystemExit"):
            engine.submit(image(1), 0)
        assert isinstance(EngineFailed("x"), EngineClosed)  # callers of close() see it too
        assert "SystemExit" in engine.failure
    finally:
        model.release.set()
        close_within(engine)
    with pytest.raises(EngineFailed):
        engine.submit(image(1), 0)
    close_within(engine)  # again: still returns


def test_one_of_several_runners_dying_stops_the_engine_cleanly():
    model = Probe()
    engine = Engine(model, max_batch_size=4, workers=3)
    try:
        f = engine.submit(image(EXIT), 0)
        with pytest.raises(EngineFailed, match="SystemExit"):
            f.result(TIMEOUT)
        with pytest.raises(EngineFailed):
            engine.submit(image(1), 0)
    finally:
        close_within(engine)
    assert not any(t.is_alive() for t in engine._runners)


def test_a_done_callback_that_raises_systemexit_leaves_no_request_unanswered():
    model = Probe()
    engine = Engine(model, max_batch_size=64, workers=1)
    try:
        gate = engine.submit(image(GATE), 0)
        assert model.entered.wait(TIMEOUT)
        futures = [engine.submit(image(v), 0) for v in (1, 2, 3, 4)]

        def bomb(_):
            raise SystemExit("a callback exited")

        futures[1].add_done_callback(bomb)
        model.release.set()
        gate.result(TIMEOUT)
        assert [float(f.result(TIMEOUT)) for f in futures] == [4.0, 8.0, 12.0, 16.0]
        # The runner dies once the batch is answered: a request now is refused, or
        # (submitted before it died) failed.
        with pytest.raises(EngineFailed, match="a callback exited"):
            engine.submit(image(1), 0).result(TIMEOUT)
    finally:
        model.release.set()
        close_within(engine)


def test_close_from_a_done_callback_returns():
    model = Probe()
    engine = Engine(model, max_batch_size=8, workers=1)
    closed = threading.Event()

    def close_engine(_):
        engine.close()  # on the runner's own thread: must not wait for itself
        closed.set()

    try:
        f = engine.submit(image(1), 0)
        f.add_done_callback(close_engine)
        assert float(f.result(TIMEOUT)) == 4.0
        assert closed.wait(TIMEOUT)
        with pytest.raises(EngineClosed):
            engine.submit(image(1), 0)
    finally:
        close_within(engine)
    assert engine.failure is None
