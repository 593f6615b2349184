"""fastmdl.serve.Engine under load: every request answered with its own row."""

import threading
import time

import pytest
import torch
from torch import nn

import fastmdl
from fastmdl.serve import Engine, EngineClosed, Overloaded
from models import TinyResNet


@pytest.fixture(scope="module")
def pruned():
    torch.manual_seed(0)
    m = fastmdl.convert(TinyResNet(), 3, [5, 2, 7], input_size=(3, 8, 8))
    g = torch.Generator().manual_seed(0)
    for group in m.mask_groups():
        group.scores.data = torch.rand(group.scores.shape, generator=g) - 0.4
    m.train()
    with torch.no_grad():
        m(torch.randn(12, 3, 8, 8), torch.arange(12) % 3)
    return fastmdl.prune(m.eval())


class Gate(nn.Module):
    """A model that waits for ``open`` before each batch, and fails a batch that
    holds domain 2: a way to fill the queue and to make a batch raise."""

    input_size = (3, 4, 4)
    num_domains = 3

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.open = threading.Event()
        self.open.set()

    def forward(self, x, domain):
        self.open.wait()
        if bool((domain == 2).any()):
            raise RuntimeError("domain 2 is broken")
        return x.flatten(1).sum(1, keepdim=True) * self.w + domain[:, None]


def test_many_clients_each_get_their_own_row(pruned):
    requests, results, errors = {}, {}, []
    lock = threading.Lock()

    def client(seed):
        g = torch.Generator().manual_seed(seed)
        for i in range(15):
            x = torch.randn(3, 8, 8, generator=g)
            d = int(torch.randint(0, 3, (), generator=g))
            f = engine.submit(x, d)
            with lock:
                requests[(seed, i)] = (x, d, f)

    with Engine(pruned, max_batch_size=16, max_delay_ms=5) as engine:
        threads = [threading.Thread(target=client, args=(s,)) for s in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for key, (x, d, f) in requests.items():
            results[key] = f.result(timeout=30)
        stats = engine.stats()
    with torch.no_grad():
        for key, (x, d, f) in requests.items():
            want = pruned(x[None], d)[0]
            try:
                torch.testing.assert_close(results[key], want, rtol=1e-5, atol=1e-5)
            except AssertionError as e:
                errors.append((key, e))
    assert not errors
    assert stats["served"] == 180 and sum(k * v for k, v in stats["batch_sizes"].items()) == 180
    assert max(stats["batch_sizes"]) > 1  # requests were really batched
    assert stats["throughput"] > 0 and stats["latency_ms"]["p50"] <= stats["latency_ms"]["p99"]


def test_bad_requests_fail_alone(pruned):
    with Engine(pruned, max_batch_size=8, max_delay_ms=20) as engine:
        good = [engine.submit(torch.randn(3, 8, 8), d) for d in (0, 1, 2)]
        bad = {
            "channels": engine.submit(torch.randn(1, 8, 8), 0),
            "empty": engine.submit(torch.randn(3, 0, 8), 0),
            "a batch": engine.submit(torch.randn(2, 3, 8, 8), 0),
            "dtype": engine.submit(torch.randn(3, 8, 8).double(), 0),
            "domain": engine.submit(torch.randn(3, 8, 8), 3),
            "domain type": engine.submit(torch.randn(3, 8, 8), 1.0),
            "not a tensor": engine.submit([[0.0]], 0),
        }
        more = [engine.submit(torch.randn(3, 8, 8), d) for d in (2, 1)]
        for f in good + more:
            assert f.result(timeout=30).shape == (7,)
    with pytest.raises(ValueError, match=r"shape \(C=3, H, W\) with any H, W >= 1"):
        bad["channels"].result()
    for name in ("empty", "a batch"):
        with pytest.raises(ValueError, match="shape"):
            bad[name].result()
    with pytest.raises(TypeError, match="dtype"):
        bad["dtype"].result()
    with pytest.raises(ValueError, match="out of range"):
        bad["domain"].result()
    with pytest.raises(TypeError, match="domain must be an int"):
        bad["domain type"].result()
    with pytest.raises(TypeError, match="torch.Tensor"):
        bad["not a tensor"].result()


def test_full_queue_raises_at_once_and_loses_nothing():
    model = Gate()
    model.open.clear()
    engine = Engine(model, max_batch_size=2, max_delay_ms=0, max_queue=4)
    accepted = []
    t0 = time.perf_counter()
    with pytest.raises(Overloaded, match="max_queue=4"):
        for _ in range(50):
            accepted.append(engine.submit(torch.ones(3, 4, 4), 0))
    assert time.perf_counter() - t0 < 5
    model.open.set()
    engine.close()
    assert all(f.result(timeout=0) is not None for f in accepted)
    with pytest.raises(EngineClosed):
        engine.submit(torch.ones(3, 4, 4), 0)


def test_a_failing_batch_fails_only_its_requests():
    model = Gate()
    with Engine(model, max_batch_size=1, max_delay_ms=0) as engine:
        before = engine.submit(torch.ones(3, 4, 4), 0)
        broken = engine.submit(torch.ones(3, 4, 4), 2)
        after = engine.submit(torch.ones(3, 4, 4), 1)
        assert float(before.result(timeout=30)) == 48.0
        with pytest.raises(RuntimeError, match="domain 2 is broken"):
            broken.result(timeout=30)
        assert float(after.result(timeout=30)) == 49.0
    assert engine.stats()["failed"] == 1


def test_close_under_load_serves_every_accepted_request(pruned):
    engine = Engine(pruned, max_batch_size=8, max_delay_ms=1)
    accepted, refused = [], []
    lock = threading.Lock()

    def client():
        for _ in range(200):
            try:
                f = engine.submit(torch.randn(3, 8, 8), 1)
            except EngineClosed:
                with lock:
                    refused.append(1)
                return
            with lock:
                accepted.append(f)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    engine.close()
    for t in threads:
        t.join()
    assert all(f.done() and f.exception() is None for f in accepted)
    assert engine.stats()["served"] == len(accepted)


def test_bad_arguments(pruned):
    with pytest.raises(ValueError, match="max_batch_size"):
        Engine(pruned, max_batch_size=0)
    with pytest.raises(ValueError, match="max_delay_ms"):
        Engine(pruned, max_delay_ms=-1)
    with pytest.raises(ValueError, match="max_queue"):
        Engine(pruned, max_queue=0)
    with pytest.raises(TypeError, match="nn.Module"):
        Engine(lambda x, d: x)
    with pytest.raises(ValueError, match="input_shape"):
        Engine(nn.Linear(2, 2), num_domains=2, input_shape=(3, 8))
    with pytest.raises(ValueError, match="input_shape"):
        Engine(nn.Linear(2, 2), num_domains=2, input_shape=(3, 0, 8))
    with pytest.raises(ValueError, match="input_shape .* has 1 channels"):
        Engine(pruned, input_shape=(1, 8, 8))


def test_cancelled_requests_are_skipped():
    model = Gate()
    model.open.clear()
    engine = Engine(model, max_batch_size=1, max_delay_ms=0, workers=1)
    first = engine.submit(torch.ones(3, 4, 4), 0)  # taken by the runner, which waits
    time.sleep(0.2)
    queued = [engine.submit(torch.ones(3, 4, 4), 1) for _ in range(3)]
    assert queued[1].cancel()
    model.open.set()
    engine.close()
    assert float(first.result()) == 48.0
    assert [float(f.result()) for f in (queued[0], queued[2])] == [49.0, 49.0]
    assert queued[1].cancelled()
    assert engine.stats()["served"] == 3
    assert engine._in_flight == engine._in_flight_requests == 0


class Rows(nn.Module):
    """Answers each request with (sum of its pixels, domain); ``reuse`` returns one
    buffer it overwrites on every call, ``short`` drops the last row of a batch,
    ``junk`` returns something that is not a tensor, both for a batch holding
    domain 2."""

    input_size = (3, 4, 4)
    num_domains = 3

    def __init__(self, reuse=False):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.reuse = reuse
        self.buffer = torch.zeros(64, 2)
        self.mode = None

    def forward(self, x, domain):
        y = torch.stack([x.flatten(1).sum(1) * self.w, domain.to(x.dtype)], 1)
        if self.reuse:
            self.buffer[:len(y)] = y
            y = self.buffer[:len(y)]
        if bool((domain == 2).any()):
            if self.mode == "short":
                return y[:-1]
            if self.mode == "junk":
                return [row for row in y]
        return y


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_every_request_answered_with_its_own_row_whatever_the_runners(workers):
    model = Rows()
    results = {}
    lock = threading.Lock()

    def client(k):
        for i in range(40):
            x = torch.full((3, 4, 4), float(k * 100 + i))
            f = engine.submit(x, (k + i) % 3)
            with lock:
                results[(k, i)] = f
            if i % 3 == 0:
                f.result(timeout=30)  # a mix of closed-loop and bursty clients

    with Engine(model, max_batch_size=8, max_delay_ms=1, workers=workers) as engine:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = {key: f.result(timeout=30).tolist() for key, f in results.items()}
    assert got == {(k, i): [48.0 * (k * 100 + i), float((k + i) % 3)] for k, i in results}
    assert engine.stats()["served"] == 400
    assert engine._in_flight == engine._in_flight_requests == 0


def test_answers_do_not_share_memory_with_the_model_output():
    model = Rows(reuse=True)  # overwrites the tensor it returned on every call
    with Engine(model, max_batch_size=4, max_delay_ms=0) as engine:
        first = engine.submit(torch.ones(3, 4, 4), 1).result(timeout=30)
        for _ in range(5):
            engine.submit(torch.full((3, 4, 4), 7.0), 0).result(timeout=30)
    assert first.tolist() == [48.0, 1.0]


@pytest.mark.parametrize("mode", ["short", "junk"])
def test_a_model_without_a_row_per_request_fails_only_that_batch(mode):
    model = Rows()
    model.mode = mode
    with Engine(model, max_batch_size=1, max_delay_ms=0) as engine:
        broken = engine.submit(torch.ones(3, 4, 4), 2)
        with pytest.raises(RuntimeError, match="one row per request"):
            broken.result(timeout=30)
        # The runner lives on: every later request is answered.
        assert [engine.submit(torch.ones(3, 4, 4), d).result(timeout=30).tolist()
                for d in (0, 1, 0)] == [[48.0, 0.0], [48.0, 1.0], [48.0, 0.0]]
    assert engine.stats()["failed"] == 1


def test_submit_wakes_the_engine_only_when_it_has_work():
    # Every runner busy: the requests that queue up behind them wake no thread each
    # (a wake-up per request was most of the engine's cost per request).
    model = Gate()
    model.open.clear()
    engine = Engine(model, max_batch_size=64, max_delay_ms=0, workers=2)
    wakes = []
    for cv in (engine._cv, engine._idle):
        notify = cv.notify
        cv.notify = lambda n=1, notify=notify: (wakes.append(n), notify(n))
    try:
        first = [engine.submit(torch.ones(3, 4, 4), 0) for _ in range(2)]
        deadline = time.monotonic() + 30
        while engine._in_flight_requests < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # both requests taken by the runners, which wait at the gate
        before = len(wakes)
        queued = [engine.submit(torch.ones(3, 4, 4), 1) for _ in range(50)]
        assert len(wakes) - before <= 2
    finally:
        model.open.set()
        engine.close()
    assert [float(f.result(timeout=0)) for f in first] == [48.0, 48.0]
    assert all(float(f.result(timeout=0)) == 49.0 for f in queued)
    assert engine.stats()["served"] == 52


def test_runners_leave_the_callers_thread_count_alone():
    """Runner threads run with one intra-op thread each; torch.set_num_threads also
    sets the default a new thread starts with, which the engine puts back."""
    import threading

    class Echo(nn.Module):
        num_domains, input_size = 2, (3, 4, 4)

        def forward(self, x, domain):
            return x.flatten(1) * (1 + domain[:, None])

    before = torch.get_num_threads()
    with Engine(Echo(), workers=2) as engine:
        x = torch.randn(3, 4, 4)
        torch.testing.assert_close(engine(x, 1), 2 * x.flatten())
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
    assert torch.get_num_threads() == before and seen == [before]
