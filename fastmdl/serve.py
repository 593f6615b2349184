"""``fastmdl.serve.Engine``: answer single mixed-domain requests at batch throughput.

Requests arrive one at a time from any number of threads, each an image tensor
and a domain id. Threads of the engine do the work:

- a *collector* waits for a first request, then for up to ``max_delay_ms`` or
  until its share of the queue (see below) is there, and stacks the requests (of
  one shape, see below) into one batch (on CUDA into pinned memory, copied to the
  GPU on a side stream);
- the *runners* run each batch in one pass of the model and hand every request
  its output row (a view of one tensor that holds the batch's outputs).

On CUDA the collector is a thread of its own, the *batcher*, which assembles the
next batch while the runner runs the current one. On the CPU there is one runner
per core, each with one intra-op thread, and the runners take turns collecting:
a free runner collects its own batch, so a request reaches the thread that runs
it with one wake-up, not two. The batch is the queue split evenly between the
runners; when none is free it keeps growing until one is. Measured
(benchmarks/NOTES.md): a model run from a thread other than the main one loses
OpenMP's spin-waiting, and its many small parallel regions then cost 2.3x;
single-threaded runners avoid them and keep every core busy on its own batch.

Requests may have any size the model runs: an image of shape (C, H, W) with the
model's channel count C and any H, W (the model is what decides whether it runs a
size; one that it raises on fails those requests alone, see below). A batch is one
tensor, so it holds requests of one shape only: the collector takes the requests
of the shape of the oldest waiting request, and those of other shapes keep their
places in the queue for the next batches. So every batch that runs before a
request is led by an older one (none is starved), and with one shape the queue is
plain first-in first-out. A batch is cut when the queue as a whole holds its share
(or the delay is up): in traffic of mixed shapes the batches are smaller, never
later.

The engine's own cost per request is kept to a few microseconds of Python and
one wake-up (of the client): ``submit`` wakes the collector only when it has
something to do, and each batch costs O(1) tensor operations outside the model
(every operation releases and retakes the GIL, which under many client threads
costs far more than the operation; benchmarks/NOTES.md, "per-request overhead").

On CUDA, batches of the model's own input size (``input_shape``) are padded to a
few fixed sizes (``buckets``) whose forward passes are captured once as CUDA
graphs, so such a batch costs one graph replay. Batches of other sizes run
eagerly, unpadded: graphs for every size clients send would cost a capture, and
its memory, per size, for a set of sizes the clients choose.

Failures stay with the requests they belong to:

- a bad request fails its own future, never its batch; a full queue makes
  ``submit`` raise :class:`Overloaded` at once;
- a forward pass that raises is retried on the halves of its batch, recursively,
  so that only the requests the model fails on alone fail, each with the exception
  of the pass that held it (the cost is bounded: see :class:`Engine`);
- a model output that cannot be split into one row per request (not a tensor, or
  another number of rows) fails its whole batch with :class:`ModelOutputError`:
  it is the model's fault, not a request's, so it is not retried;
- should a thread of the engine stop (an exception that is not an ``Exception``,
  e.g. ``SystemExit`` out of the model), the requests it held and every queued one
  fail with :class:`EngineFailed`, ``submit`` raises it from then on, and
  ``failure`` says why.

No exception, wherever it is raised in the engine's threads, leaves an accepted
request without an answer or ``close()`` waiting forever: the engine serves on, or
refuses new work. (A model that never returns still holds its batch.)
"""

from __future__ import annotations

import collections
import logging
import math
import queue
import threading
import time
import warnings
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn


class Overloaded(RuntimeError):
    """The engine's queue is full: retry later or raise ``max_queue``."""


class EngineClosed(RuntimeError):
    """``submit`` after ``close()``."""


class EngineFailed(EngineClosed):
    """A thread of the engine stopped: the requests it could not serve fail with
    this, and so does every later ``submit``."""


class ModelOutputError(RuntimeError):
    """The model's output cannot be split into one row per request of the batch."""


_log = logging.getLogger("fastmdl.serve")
# A request's outcome: its output row, or the exception it failed with.
_Outcome = Union[torch.Tensor, BaseException]


# What the collecting thread waits for (Engine._waits_for): who must wake it.
_NOTHING, _FIRST, _FILL, _RUNNER = 0, 1, 2, 3
# CPU runners taking turns to collect (Engine._collector).
_NONE, _SUMMONED, _ACTIVE = 0, 1, 2


@dataclass
class _Request:
    x: torch.Tensor
    domain: int
    future: Future
    arrived: float  # also the request's place in the queue across shapes


@dataclass
class _Batch:
    requests: List[_Request]
    x: torch.Tensor
    domain: torch.Tensor
    ready: Optional[object] = None  # a CUDA event once the copy to the device is queued
    taken: int = 0  # requests taken from the queue for it, cancelled ones included


class Engine:
    """Dynamic batching for a model called as ``model(x, domain)`` (a
    :class:`fastmdl.PrunedModel` or :class:`fastmdl.MultiDomainModel`).

    Args:
        model: the model; it is put in eval mode and moved to ``device``.
        device: where the model runs (default: where its parameters are).
        max_batch_size: the most requests in one pass.
        max_delay_ms: how long the first request of a batch may wait for others.
        max_queue: the most accepted requests not yet batched; beyond it
            ``submit`` raises :class:`Overloaded`.
        input_shape: when given, the (C, H, W) of every request: the only shape
            accepted. By default requests may be of any shape (C, H, W) with
            H, W >= 1 and C the model's channels, ``model.input_size[0]`` (for a
            model without ``input_size``: the channels of the first
            well-formed request); see "Input sizes" below.
        num_domains: valid domain ids are [0, num_domains) (default: the model's).
        cuda_graphs: capture fixed batch-size buckets as CUDA graphs (CUDA only).
        workers: runner threads (default: one per intra-op thread on the CPU, one on CUDA).
        threads_per_worker: intra-op threads of each CPU runner (default 1).

    When the forward pass of a batch of n > 1 requests raises an ``Exception``
    (other than :class:`ModelOutputError`), the engine runs the two halves of the
    batch, and again the halves of each half that raises, down to single requests:
    the requests that fail alone get the exception of their own pass, the others
    their rows. Isolating one such request costs 2*ceil(log2(n)) extra forward
    passes, each on at most half the batch; a batch never gets more than
    4*ceil(log2(n)) of them (enough for two such requests), after which the
    requests of the halves that still raise fail with their half's exception.
    ``stats()["retried_forwards"]`` counts these passes.

    Input sizes: a batch holds requests of one shape, that of the oldest request
    waiting; the others keep their places (see the module docstring). The
    attributes say what is accepted: ``input_shape`` is the nominal (C, H, W), the
    explicit ``input_shape`` or else ``model.input_size`` (None for a model
    without one), the size CUDA graphs are captured for; ``channels`` is the C
    every request must have (None until the first request, for a model without
    ``input_size``); ``fixed_shape`` is True when ``input_shape`` was given, and
    then only that shape is accepted. A size the model raises on (smaller than a
    kernel, or not the size a flatten expects) fails its requests with the
    model's own exception, as any request the model fails on.

    ``failure`` is None while the engine works, else why it stopped (see
    :class:`EngineFailed`).
    """

    def __init__(self, model: nn.Module, device=None, max_batch_size: int = 64,
                 max_delay_ms: float = 2.0, max_queue: int = 4096,
                 input_shape: Optional[Sequence[int]] = None,
                 num_domains: Optional[int] = None, cuda_graphs: bool = True,
                 workers: Optional[int] = None, threads_per_worker: int = 1):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _positive_int(max_batch_size, "max_batch_size")
        _positive_int(max_queue, "max_queue")
        if isinstance(max_delay_ms, bool) or not isinstance(max_delay_ms, (int, float)) \
                or not 0 <= max_delay_ms < math.inf:
            raise ValueError(f"max_delay_ms must be a finite number >= 0, got {max_delay_ms!r}")
        param = next(model.parameters(), None)
        self.device = torch.device(device) if device is not None else (
            param.device if param is not None else torch.device("cpu"))
        self.dtype = param.dtype if param is not None else torch.float32
        self.model = model.eval().to(self.device)
        self.input_shape, self.fixed_shape = _nominal_shape(model, input_shape)
        self.channels: Optional[int] = None if self.input_shape is None else self.input_shape[0]
        self.num_domains = num_domains if num_domains is not None else getattr(
            model, "num_domains", None)
        _positive_int(self.num_domains, "num_domains")
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.max_delay = max_delay_ms / 1e3
        self._cuda = self.device.type == "cuda"
        if workers is None:
            workers = 1 if self._cuda else max(1, torch.get_num_threads() // threads_per_worker)
        _positive_int(workers, "workers")
        _positive_int(threads_per_worker, "threads_per_worker")
        self.workers, self.threads_per_worker = workers, threads_per_worker

        self._lock = threading.Lock()
        # The collecting thread (the batcher, or the CPU runner whose turn it is)
        # waits on _cv; CPU runners waiting for their turn wait on _idle.
        self._cv = threading.Condition(self._lock)
        self._idle = threading.Condition(self._lock)
        self._waits_for = _NOTHING
        self._turns = not self._cuda  # CPU: the runners collect their own batches
        self._collector = _NONE
        # CPU runners on their way back to collect (done with a batch, or starting):
        # while one is, submit wakes no idle runner (a wake-up costs more than the wait).
        self._returning = workers if self._turns else 0
        # The queue: one deque per shape, in order of arrival; a shape other than
        # the nominal one has a deque only while requests of it wait. _queued
        # counts them all.
        self._queues: Dict[Tuple[int, ...], collections.deque] = {}
        self._queued = 0
        self._handoff: "queue.Queue[Optional[_Batch]]" = queue.Queue(maxsize=workers + 1)
        self._closed = False
        self._failure: Optional[EngineFailed] = None
        # Batches handed to runners and not finished; on CUDA one more may wait
        # assembled (its copy to the GPU overlapping the current batch).
        self._in_flight = self._in_flight_requests = 0
        self._capacity = workers + (1 if self._cuda else 0)
        self._stats_lock = threading.Lock()
        self._latencies: collections.deque = collections.deque(maxlen=100_000)
        self._batch_sizes: collections.Counter = collections.Counter()
        self._served = self._failed = self._retried = 0
        self._busy = 0.0  # seconds runners spent in forward passes
        self._first_arrival: Optional[float] = None
        self._last_done: Optional[float] = None

        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._buckets = _buckets(max_batch_size) if self._cuda else []
        self._graphs: Dict[int, Tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor,
                                      torch.Tensor]] = {}
        self.graph_error: Optional[str] = None
        if self._cuda and cuda_graphs and self.input_shape is not None:
            self._capture_graphs()

        self._batcher = None if self._turns else threading.Thread(
            target=self._guard, args=(self._batch_loop,), name="fastmdl-batcher", daemon=True)
        loop = self._collect_and_run_loop if self._turns else self._run_loop
        self._runners = [threading.Thread(target=self._guard, args=(loop,),
                                          name=f"fastmdl-runner-{i}", daemon=True)
                         for i in range(workers)]
        if self._batcher is not None:
            self._batcher.start()
        threads = torch.get_num_threads()
        self._threads_set = threading.Barrier(workers + 1) if self._turns else None
        for t in self._runners:
            t.start()
        if self._threads_set is not None:
            # torch.set_num_threads in a runner also sets the process-wide default
            # that other threads start with: put the caller's back once all are set.
            self._threads_set.wait()
            torch.set_num_threads(threads)

    # -- the public side --------------------------------------------------------------

    @property
    def failure(self) -> Optional[str]:
        """None while the engine works; once a thread of it has died, why."""
        failure = self._failure
        return None if failure is None else str(failure)

    def submit(self, x: torch.Tensor, domain: int) -> Future:
        """Queue one request: ``x`` one image (C, H, W) of an accepted shape (see
        :class:`Engine`), ``domain`` an int.
        Returns a Future of the model's output row for it. A malformed request
        gets an already-failed Future; a full queue raises :class:`Overloaded`, a
        closed engine :class:`EngineClosed` (:class:`EngineFailed` if it stopped
        because a thread of it died)."""
        future: Future = Future()
        problem, shape = self._check(x, domain)
        if problem is not None:
            future.set_exception(problem)
            with self._stats_lock:
                self._failed += 1
            return future
        if x.requires_grad:  # (detach() is a tensor operation: only when needed)
            x = x.detach()
        request = _Request(x, int(domain), future, time.perf_counter())
        with self._lock:
            if self._closed:
                if self._failure is not None:
                    raise EngineFailed(str(self._failure))
                raise EngineClosed("the engine is closed")
            if self._queued >= self.max_queue:
                raise Overloaded(f"the queue holds max_queue={self.max_queue} requests")
            if self._first_arrival is None:
                self._first_arrival = request.arrived
            waiting = self._queues.get(shape)
            if waiting is None:
                waiting = self._queues[shape] = collections.deque()
            waiting.append(request)
            self._queued += 1
            # Wake a thread only when it has something to do: not the collector on
            # every request while a batch fills, nor an idle runner when a busy one
            # is about to come back.
            if self._turns and self._collector == _NONE:
                if not self._returning:
                    self._summon()
            else:
                self._wake_collector(_FIRST)
        return future

    def __call__(self, x: torch.Tensor, domain: int, timeout: Optional[float] = None):
        """Submit and wait: the output row for one request."""
        return self.submit(x, domain).result(timeout)

    def close(self) -> None:
        """Stop accepting requests, answer every accepted one, stop the threads.

        Returns once every accepted request has its answer (its row, or its
        exception; after a thread of the engine died, :class:`EngineFailed` for
        those it could not serve). Called again, it waits the same way. Called from
        one of the engine's own threads (e.g. by a Future's done-callback), it only
        stops the engine: a thread cannot wait for itself."""
        with self._lock:
            self._closed = True
            self._cv.notify_all()
            self._idle.notify_all()
        threads = self._runners + ([self._batcher] if self._batcher is not None else [])
        if threading.current_thread() in threads:
            return
        for t in threads:
            t.join()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        """Throughput (requests/s from the first request to the last answer),
        latency percentiles (ms, submit to answer, over the last 100k requests),
        counts (``failed`` includes refused requests), the histogram {batch size:
        batches}, ``retried_forwards`` (forward passes run to isolate the requests
        of a failed batch that the model fails on, see :class:`Engine`), and
        ``utilisation``: the fraction of that time the runners spent in forward
        passes."""
        with self._stats_lock:
            lat = sorted(self._latencies)
            served, failed, retried = self._served, self._failed, self._retried
            hist = dict(sorted(self._batch_sizes.items()))
            span = (self._last_done - self._first_arrival
                    if self._last_done is not None and self._first_arrival is not None else 0.0)
            busy = self._busy

        def pct(q):
            return 1e3 * lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

        return {"served": served, "failed": failed, "queued": self._queued,
                "throughput": served / span if span > 0 else 0.0,
                "latency_ms": {"p50": pct(0.50), "p99": pct(0.99)},
                "batch_sizes": hist, "retried_forwards": retried,
                "cuda_graphs": sorted(self._graphs),
                "utilisation": busy / (span * self.workers) if span > 0 else 0.0}

    # -- checks -------------------------------------------------------------------------

    def _check(self, x, domain) -> Tuple[Optional[Exception], Optional[Tuple[int, ...]]]:
        """(what is wrong with the request or None, the shape of ``x``)."""
        if not isinstance(x, torch.Tensor):
            return TypeError(f"x must be a torch.Tensor of shape {self._accepted()}, "
                             f"got {type(x).__name__}"), None
        shape = tuple(x.shape)
        if shape != self.input_shape and not self.accepts(shape):  # (the usual case first)
            return ValueError(f"x must have shape {self._accepted()} (one image), "
                              f"got {shape}"), shape
        if x.dtype != self.dtype:
            return TypeError(f"x must have dtype {self.dtype}, got {x.dtype}"), shape
        if isinstance(domain, bool) or not isinstance(domain, int):
            return TypeError(f"domain must be an int, got {type(domain).__name__}"), shape
        if not 0 <= domain < self.num_domains:
            return ValueError(f"domain {domain} is out of range [0, {self.num_domains})"), shape
        if self.channels is None and not self._adopt_channels(shape[0]):
            return ValueError(f"x must have shape {self._accepted()} (one image), "
                              f"got {shape}"), shape
        return None, shape

    def accepts(self, shape: Tuple[int, ...]) -> bool:
        """Whether requests of ``shape`` are accepted (the channels aside while
        they are not known yet)."""
        if self.fixed_shape:
            return shape == self.input_shape
        return len(shape) == 3 and min(shape) >= 1 and (
            self.channels is None or shape[0] == self.channels)

    def _accepted(self) -> str:
        """The accepted shapes, for error messages."""
        if self.fixed_shape:
            return str(self.input_shape)
        c = "C" if self.channels is None else f"C={self.channels}"
        return f"({c}, H, W) with any H, W >= 1"

    def _adopt_channels(self, channels: int) -> bool:
        """For a model without ``input_size``: the first request accepted fixes the
        channels of all. Whether ``channels`` are (now) those."""
        with self._lock:
            if self.channels is None:
                self.channels = channels
            return self.channels == channels

    # -- collecting a batch ---------------------------------------------------------------

    def _next_requests(self) -> Optional[List[_Request]]:
        """The next batch's requests, taken from the queue (None: closed and
        drained). Called by the batcher, or on the CPU by a free runner, one at a
        time."""
        with self._lock:
            if self._turns:
                self._returning -= 1
                while self._collector == _ACTIVE:
                    self._idle.wait()
                self._collector = _ACTIVE
            try:
                return self._collect()
            finally:
                self._waits_for = _NOTHING
                if self._turns:
                    self._collector = _NONE
                    if self._closed:
                        self._idle.notify_all()  # to drain the queue, then stop
                    elif self._queued and not self._returning:
                        self._summon()  # what is left goes to the next free runner

    def _collect(self) -> Optional[List[_Request]]:
        # Holds self._lock. Sets _waits_for before each wait, so that submit and
        # _finished wake this thread exactly when the condition it waits on holds.
        while not self._queued and not self._closed:
            self._waits_for = _FIRST
            self._cv.wait()
        if not self._queued:
            return None  # closed and drained
        # The batch's shape: that of the oldest request. It stays the oldest while
        # this thread waits (newer requests come behind it, and only this thread
        # takes requests off the queue).
        shape = self._oldest_shape()
        deadline = self._queues[shape][0].arrived + self.max_delay
        # Aim for the batch that splits everything outstanding evenly between the
        # runners: waiting for a full max_batch_size would stall a closed loop of
        # fewer clients, sending whatever is queued would fragment it. (Counted
        # over all shapes: with several, the batch is smaller, not later.)
        while not self._closed and self._queued < self._target():
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._waits_for = _FILL
            self._cv.wait(left)
        # No runner free (and, on CUDA, one batch already waiting): let the batch
        # grow until one is.
        while self._in_flight >= self._capacity:
            self._waits_for = _RUNNER
            self._cv.wait()
        if not self._queued:
            return None  # a thread died meanwhile and _crashed failed the queue
        return self._take(shape)

    def _oldest_shape(self) -> Tuple[int, ...]:
        # Holds self._lock, with requests queued: the shape of the oldest request
        # waiting, which the next batch takes (no shape waits behind newer ones).
        queues = self._queues
        if len(queues) == 1:
            return next(iter(queues))
        return min((shape for shape, waiting in queues.items() if waiting),
                   key=lambda shape: queues[shape][0].arrived)

    def _take(self, shape) -> List[_Request]:
        # Holds self._lock: the next batch, the oldest requests of ``shape``, off
        # the queue; those of other shapes stay queued in their order.
        waiting = self._queues[shape]
        n = min(len(waiting), self._target())
        self._in_flight += 1
        self._in_flight_requests += n
        self._queued -= n
        popleft = waiting.popleft
        requests = [popleft() for _ in range(n)]
        if not waiting and shape != self.input_shape:
            # Sizes seen once leave nothing behind; the nominal one keeps its deque
            # (the usual traffic: no deque made and dropped per batch).
            del self._queues[shape]
        return requests

    def _summon(self) -> None:
        # Holds self._lock: let one idle runner (if any) take its turn to collect.
        self._collector = _SUMMONED
        self._idle.notify()

    def _target(self) -> int:
        outstanding = self._queued + self._in_flight_requests
        return max(1, min(self.max_batch_size, -(-outstanding // self.workers)))

    def _prepare(self, requests: List[_Request]) -> Optional[_Batch]:
        """The batch of the requests not cancelled (None: none left, or it could not
        be assembled, and its requests failed)."""
        taken = len(requests)
        requests = [r for r in requests if r.future.set_running_or_notify_cancel()]
        if not requests:
            self._finished(taken)
            return None
        try:
            batch = self._assemble(requests)
        except Exception as e:  # e.g. out of memory while stacking
            self._finished(taken)
            self._fail(requests, e)
            return None
        except BaseException as e:  # this thread must stop: the engine with it
            self._stop(e, requests)
            self._finished(taken)
            raise
        batch.taken = taken
        return batch

    def _batch_loop(self) -> None:  # CUDA: the batcher thread
        while True:
            requests = self._next_requests()
            if requests is None:
                for _ in self._runners:
                    self._handoff.put(None)
                return
            batch = self._prepare(requests)
            if batch is not None:
                self._handoff.put(batch)

    def _assemble(self, requests: List[_Request]) -> _Batch:
        n = len(requests)
        if not self._cuda:  # two tensor operations for the whole batch
            x = torch.stack([r.x for r in requests])
            domain = torch.tensor([r.domain for r in requests], dtype=torch.int64)
            return _Batch(requests, x, domain)
        shape = requests[0].x.shape
        # Only batches of the nominal shape are padded to the buckets (its CUDA
        # graphs' batch sizes); other shapes run eagerly, so padding buys nothing.
        size = next((b for b in self._buckets if b >= n), n) if shape == self.input_shape else n
        x = torch.empty((size,) + tuple(shape), dtype=self.dtype, pin_memory=True)
        torch.stack([r.x for r in requests], out=x[:n])
        if size > n:
            x[n:].zero_()  # padding rows: any valid input, their outputs are dropped
        domain = torch.zeros(size, dtype=torch.int64, pin_memory=True)
        domain[:n] = torch.tensor([r.domain for r in requests], dtype=torch.int64)
        with torch.cuda.stream(self._copy_stream):
            xd = x.to(self.device, non_blocking=True)
            dd = domain.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        return _Batch(requests, xd, dd, ready)

    # -- the runner -----------------------------------------------------------------------

    def _collect_and_run_loop(self) -> None:  # a CPU runner: collects its own batches
        torch.get_num_threads()  # this thread's first query: after it, set keeps to the thread
        torch.set_num_threads(self.threads_per_worker)  # this thread's intra-op threads
        self._threads_set.wait()
        while True:
            requests = self._next_requests()
            if requests is None:
                return
            batch = self._prepare(requests)
            if batch is not None:
                self._run(batch)

    def _run_loop(self) -> None:  # a CUDA runner: takes the batcher's batches
        while True:
            batch = self._handoff.get()
            if batch is None:
                return
            self._run(batch)

    def _guard(self, loop) -> None:
        """Run one of the engine's thread loops; should it raise, stop the engine
        without leaving a request unanswered (:meth:`_crashed`)."""
        try:
            loop()
        except BaseException as e:  # a thread that stops silently would hang its callers
            self._crashed(e)

    def _stop(self, error: BaseException, held: Sequence[_Request] = ()) -> EngineFailed:
        """Mark the engine failed because this thread dies of ``error`` (the first
        such error is kept), refuse new work, then fail the requests this thread
        ``held`` and every queued one. In that order: a client that sees its
        request fail finds ``submit`` refusing, not a queue nobody will serve."""
        with self._lock:
            first = self._failure is None
            if first:
                name = threading.current_thread().name
                self._failure = EngineFailed(f"the engine stopped: its thread {name} died "
                                             f"of {type(error).__name__}: {error}")
            failure = self._failure
            self._closed = True
            dropped = [r for waiting in self._queues.values() for r in waiting]
            self._queues.clear()
            self._queued = 0
            self._cv.notify_all()
            self._idle.notify_all()
        if first:
            _log.error("fastmdl.serve: %s", failure, exc_info=error)
        self._fail_stopping(list(held) + dropped, failure)
        return failure

    def _crashed(self, error: BaseException) -> None:
        """This thread died of ``error`` (having failed what it held): stop the
        engine, and let the other threads finish what they hold and stop, so that
        ``close()`` returns."""
        failure = self._stop(error)
        if self._turns:
            return  # CPU: the other runners find the queue closed and empty
        if threading.current_thread() is self._batcher:
            for _ in self._runners:  # what _batch_loop would have sent
                self._handoff.put(None)
            return
        # A CUDA runner: take its share of the hand-off, one None, so that the
        # batcher is never stuck putting a batch nobody takes.
        while (batch := self._handoff.get()) is not None:
            self._fail_stopping(batch.requests, failure)
            self._finished(batch.taken)

    def _fail_stopping(self, requests: List[_Request], failure: EngineFailed) -> None:
        try:
            self._fail(requests, failure)
        except BaseException:  # a done-callback that raised: this thread stops anyway
            pass

    def _run(self, batch: _Batch) -> None:
        """Answer every request of ``batch``: its row, or the exception it failed
        with. The batch is released (``_finished``) before the answers."""
        requests = batch.requests
        began = time.perf_counter()
        try:
            try:
                outcomes = _rows(self._forward(batch), len(requests), batch.x.shape[0])
                failed = retried = 0
            except Exception as e:
                outcomes, failed, retried = self._isolate(batch, e)
        except BaseException as e:  # this thread must stop: the engine with it
            self._stop(e, requests)
            self._finished(batch.taken)
            raise
        done = time.perf_counter()
        self._finished(batch.taken)
        self._record(requests, outcomes, failed, retried, done - began, done)
        self._settle(requests, outcomes)

    def _isolate(self, batch: _Batch, error: Exception
                 ) -> Tuple[List[_Outcome], int, int]:
        """(outcomes, failures, forward passes run) for a batch whose forward
        raised ``error``: its halves run again, recursively, within the bound the
        class docstring states."""
        n = len(batch.requests)
        if n == 1 or isinstance(error, ModelOutputError):
            return [error] * n, n, 0  # nothing to split / the model's fault for every row
        outcomes: List[_Outcome] = [error] * n
        failed = retried = 0
        budget = 4 * (n - 1).bit_length()  # 4 * ceil(log2(n)): two requests isolated
        failing = [(0, n, error)]  # [lo, hi) and the exception of its forward pass
        while failing:
            lo, hi, err = failing.pop()
            if hi - lo == 1 or retried + 2 > budget:
                outcomes[lo:hi] = [err] * (hi - lo)
                failed += hi - lo
                continue
            mid = (lo + hi) // 2
            for a, b in ((lo, mid), (mid, hi)):
                retried += 1
                try:
                    outcomes[a:b] = _rows(self._forward_part(batch, a, b), b - a, b - a)
                except ModelOutputError as e:
                    outcomes[a:b] = [e] * (b - a)
                    failed += b - a
                except Exception as e:
                    failing.append((a, b, e))
        return outcomes, failed, retried

    def _record(self, requests: List[_Request], outcomes: Sequence[_Outcome], failed: int,
                retried: int, busy: float, done: float) -> None:
        # Before the answers: a client that has one sees it counted.
        with self._stats_lock:
            self._batch_sizes[len(requests)] += 1
            self._busy += busy
            self._retried += retried
            self._failed += failed
            if failed == len(requests):
                return
            self._served += len(requests) - failed
            self._last_done = done
            if failed:
                self._latencies.extend([done - r.arrived for r, o in zip(requests, outcomes)
                                        if not isinstance(o, BaseException)])
            else:
                self._latencies.extend([done - r.arrived for r in requests])

    @staticmethod
    def _settle(requests: List[_Request], outcomes: Sequence[_Outcome]) -> None:
        """Hand each request its outcome. A done-callback that raises past the
        Future's own guard (which catches Exceptions) is re-raised only once every
        request has its answer."""
        stop: Optional[BaseException] = None
        for r, outcome in zip(requests, outcomes):
            try:
                if isinstance(outcome, BaseException):
                    r.future.set_exception(outcome)
                else:
                    r.future.set_result(outcome)
            except InvalidStateError:
                pass  # settled from outside the engine meanwhile
            except BaseException as e:
                stop = stop or e
        if stop is not None:
            raise stop

    def _forward(self, batch: _Batch):
        """The model's output for the whole batch (on CUDA still on the device)."""
        with torch.inference_mode():
            if not self._cuda:
                return self.model(batch.x, batch.domain)
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(batch.ready)
            # The copy stream's tensors are used on this stream: keep them alive until done.
            batch.x.record_stream(stream)
            batch.domain.record_stream(stream)
            size = batch.x.shape[0]
            # The graphs were captured for the nominal shape only.
            if size in self._graphs and batch.x.shape[1:] == self.input_shape:
                graph, sx, sd, sy = self._graphs[size]
                sx.copy_(batch.x)
                sd.copy_(batch.domain)
                graph.replay()
                return sy
            return self.model(batch.x, batch.domain)

    def _forward_part(self, batch: _Batch, lo: int, hi: int):
        """The model's output for requests [lo, hi) of a batch whose whole forward
        pass ran (on CUDA: after _forward, so on the same stream, eagerly)."""
        with torch.inference_mode():
            return self.model(batch.x[lo:hi], batch.domain[lo:hi])

    def _finished(self, taken: int) -> None:
        with self._lock:
            self._in_flight -= 1
            self._in_flight_requests -= taken
            if self._turns:
                self._returning += 1  # this runner collects next
            # A runner is free and the target batch is smaller: the collector may be
            # waiting for either.
            self._wake_collector(_RUNNER)

    def _wake_collector(self, reason: int) -> None:
        """Wake the collector if it waits for ``reason`` (_FIRST or _RUNNER) or for
        its batch to fill and it now has. Called with ``self._lock`` held."""
        if self._waits_for == reason or (
                self._waits_for == _FILL and self._queued >= self._target()):
            self._waits_for = _NOTHING
            self._cv.notify()

    def _fail(self, requests: List[_Request], error: Exception) -> None:
        with self._stats_lock:
            self._failed += len(requests)
        self._settle(requests, [error] * len(requests))

    def _capture_graphs(self) -> None:
        try:
            for size in self._buckets:
                sx = torch.randn((size,) + self.input_shape, device=self.device, dtype=self.dtype)
                sd = torch.arange(size, device=self.device) % self.num_domains
                side = torch.cuda.Stream(self.device)
                side.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(side), torch.inference_mode():
                    for _ in range(2):  # warm-up: kernels compiled, allocator settled
                        self.model(sx, sd)
                torch.cuda.current_stream(self.device).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph), torch.inference_mode():
                    sy = self.model(sx, sd)
                self._graphs[size] = (graph, sx, sd, sy)
        except Exception as e:  # a model that cannot be captured still serves, eagerly
            self._graphs.clear()
            self.graph_error = f"{type(e).__name__}: {e}"
            warnings.warn(f"fastmdl.serve: CUDA graph capture failed ({self.graph_error}); "
                          "batches run eagerly", RuntimeWarning, stacklevel=3)


def _rows(out, n: int, rows: int) -> Tuple[torch.Tensor, ...]:
    """The first ``n`` rows of ``out``, the model's output for a batch of ``rows``
    inputs (``rows > n`` on CUDA: padding rows), as one copy on the CPU (so no
    answer shares memory with the model or another batch) split into row views, in
    O(1) tensor operations whatever n. Raises :class:`ModelOutputError` when
    ``out`` is not a tensor with ``rows`` rows."""
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != rows:
        what = (f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor)
                else f"a {type(out).__name__}")
        raise ModelOutputError(f"the model returned {what}; the engine needs a tensor with "
                               f"one row per request ({rows} rows for this batch)")
    if rows != n:
        out = out[:n]
    return (out.to("cpu") if out.device.type != "cpu" else out.clone()).unbind(0)


def _nominal_shape(model: nn.Module, input_shape) -> Tuple[Optional[Tuple[int, int, int]], bool]:
    """(the engine's nominal (C, H, W) or None, whether it is the only shape
    accepted): ``input_shape`` when given (fixed), else ``model.input_size``."""
    size = getattr(model, "input_size", None)
    if input_shape is None:
        if size is None:
            return None, False  # the channels come with the first request
        if not _is_shape(size):
            raise ValueError(f"the model's input_size must be (C, H, W), three positive ints, "
                             f"got {size!r}; or pass input_shape=(C, H, W)")
        return tuple(size), False
    if not _is_shape(input_shape):
        raise ValueError(f"input_shape must be (C, H, W), three positive ints, "
                         f"got {input_shape!r}")
    shape = tuple(input_shape)
    if size is not None and _is_shape(size) and size[0] != shape[0]:
        raise ValueError(f"input_shape {shape} has {shape[0]} channels, the model's "
                         f"input_size {tuple(size)} has {size[0]}")
    return shape, True


def _is_shape(v) -> bool:
    return isinstance(v, (tuple, list, torch.Size)) and len(v) == 3 and all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in v)


def _buckets(max_batch_size: int) -> List[int]:
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch_size]


def _positive_int(v, name: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
