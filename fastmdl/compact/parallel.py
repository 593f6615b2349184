"""Running the ragged storage's samples side by side on the CPU's cores.

Every sample of the compact network goes through its own domain's network until
a union island or the output joins the batch again. With T intra-op threads, the
batch (sorted by domain) is cut into T runs of rows of equal work (each domain's
multiply-adds per sample times its samples; a run may hold the end of one domain
and the start of the next), and each worker thread runs its rows' steps with one
intra-op thread. A convolution then runs on one core without OpenMP's fork and
join at every call, and the cores stay busy whatever the domain mix; measured
in benchmarks/NOTES.md.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Sequence, Tuple

import torch

from . import steps as S
from .segments import Segments

#: Below this many multiply-adds a batch runs on the calling thread, each op on
#: all the threads. Measured (NOTES.md): the pruned ResNet-26 of pruned_model.py
#: gains 2-6% from the workers at N=32 (28 G multiply-adds); the zoo's networks at
#: batch 8 and 64x64 (0.05-0.3 G) lose 20-60% (more, smaller oneDNN calls).
MIN_PARALLEL_MACS = 2e9

_POOLS: Dict[Tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
# A forked child inherits the pools but not their threads: it makes its own.
os.register_at_fork(after_in_child=_POOLS.clear)

Piece = Tuple[int, int, int]  # (domain, first row within its segment, rows)


def _init_worker(threads_each: int, ready: threading.Barrier) -> None:
    # torch.set_num_threads also sets the process-wide default that a thread reads
    # on its first parallel op or thread count query: query first, so this thread
    # keeps threads_each; the pool's maker restores the default once all are here.
    torch.get_num_threads()
    torch.set_num_threads(threads_each)
    ready.wait()


def pool(workers: int, threads_each: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` threads with ``threads_each`` intra-op
    threads each (made once per pair), which leaves every other thread's
    intra-op thread count as it was."""
    key = (workers, threads_each)
    with _POOLS_LOCK:
        if key not in _POOLS:
            ready = threading.Barrier(workers + 1)
            threads = torch.get_num_threads()
            made = ThreadPoolExecutor(workers, thread_name_prefix=f"fastmdl-rows-{threads_each}t",
                                      initializer=_init_worker, initargs=(threads_each, ready))
            for _ in range(workers):  # start every worker now, each through its initializer
                made.submit(int)
            ready.wait()
            torch.set_num_threads(threads)
            _POOLS[key] = made
        return _POOLS[key]


def chunks(seg: Segments, cost: Sequence[float], workers: int) -> List[List[Piece]]:
    """The sorted batch cut into at most ``workers`` runs of rows of equal work
    (``cost[d]`` per sample of domain d); each run is a list of pieces."""
    total = sum(seg.counts[d] * (cost[d] if cost[d] > 0 else 1.0) for d in seg.live)
    out: List[List[Piece]] = [[] for _ in range(workers)]
    done = 0.0
    for d in seg.live:
        w_cost = cost[d] if cost[d] > 0 else 1.0
        for row in range(seg.counts[d]):
            # A row belongs to the run its middle falls into.
            w = min(workers - 1, int((done + 0.5 * w_cost) * workers / max(total, 1e-30)))
            if not out[w] or out[w][-1][0] != d:
                out[w].append((d, row, 0))
            dd, start, n = out[w][-1]
            out[w][-1] = (dd, start, n + 1)
            done += w_cost
    return [run for run in out if run]


WHOLE, ROWS, DOMAINS = "whole", "rows", "domains"


def phases(steps: Sequence[S.Step], kinds: Dict[str, str],
           drop: Sequence[Sequence[str]]) -> List[Tuple[int, int, str]]:
    """(start, stop, how) runs of steps. The input, the union islands and the
    output see the WHOLE batch on the calling thread; the runs between them are
    split by ROWS, or by whole DOMAINS where a per-part value (a segment's size)
    crosses their border."""
    out, start = [], 0
    for i, s in enumerate(steps):
        if isinstance(s, (S.Input, S.Island, S.Output)):
            if i > start:
                out.append((start, i, ROWS))
            out.append((i, i + 1, WHOLE))
            start = i + 1
    if start < len(steps):
        out.append((start, len(steps), ROWS))
    live_after, alive = [], set()  # the names alive after each step
    for i, s in enumerate(steps):
        alive.add(s.name)
        alive -= set(drop[i])
        live_after.append(set(alive))
    result = []
    for a, b, how in out:
        if how == ROWS:
            crossing = (live_after[a - 1] if a else set()) | live_after[b - 1]
            if any(kinds.get(n) == S.PER_PART for n in crossing):
                how = DOMAINS
        result.append((a, b, how))
    return result


def run_phase(plan, start: int, stop: int, env: Dict[str, Any], state: S.RunState,
              runs: List[List[Piece]], workers: ThreadPoolExecutor) -> Dict[str, Any]:
    """Steps [start, stop) of ``plan``, each run of rows on a worker thread; returns
    ``env`` with the phase's batch values joined back, domain by domain."""
    inference = torch.is_inference_mode_enabled()
    n = state.num_domains

    def work(run: List[Piece]) -> Dict[str, Any]:
        # Grad and inference modes are per thread: take the caller's.
        with (torch.inference_mode() if inference else torch.no_grad()):
            mine = {d: (lo, rows) for d, lo, rows in run}
            sub = S.RunState(state.x, state.domain,
                             dataclasses.replace(state.seg, live=sorted(mine)), n)
            local = {}
            for name, value in env.items():
                if plan.kinds.get(name) == S.BATCH:
                    value = [value[d].narrow(0, *mine[d]) if d in mine else None
                             for d in range(n)]
                local[name] = value
            for i in range(start, stop):
                step = plan.steps[i]
                local[step.name] = step.run(local, sub)
                for name in plan._drop[i]:
                    del local[name]
            return local

    results = list(workers.map(work, runs))
    merged: Dict[str, Any] = {}
    for name, value in results[0].items():
        kind = plan.kinds.get(name)
        if kind not in (S.BATCH, S.PER_PART):
            merged[name] = value  # plain: the same in every worker
            continue
        pieces: List[List[Any]] = [[] for _ in range(n)]
        for run, local in zip(runs, results):  # runs are in row order
            for d, _, _ in run:
                pieces[d].append(local[name][d])
        # A per-part value crosses only phases run by whole domains: one piece each.
        merged[name] = [None if not p else p[0] if len(p) == 1 else torch.cat(p)
                        for p in pieces]
    return merged


def whole_domains(seg: Segments) -> List[List[Piece]]:
    """One run per live domain, whole (for a phase whose rows cannot be split)."""
    return [[(d, 0, seg.counts[d])] for d in seg.live]
