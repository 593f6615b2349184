"""Running the ragged storage's domains side by side on the CPU's cores.

Each domain of the compact network is a network of its own until a union island
or the output joins them. With T intra-op threads and several domains in the
batch, the domains are dealt to min(T, domains) worker threads (heaviest first,
each to the least loaded worker), and each worker runs its domains' steps with
T // workers intra-op threads of its own. A convolution then runs on one core
without any OpenMP fork and join, where a layer-by-layer pass on T threads pays
one per call, and every core stays busy on its own work.
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

_POOLS: Dict[Tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
# A forked child inherits the pools but not their threads: it makes its own.
os.register_at_fork(after_in_child=_POOLS.clear)


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
            made = ThreadPoolExecutor(workers, thread_name_prefix=f"fastmdl-domains-{threads_each}t",
                                      initializer=_init_worker, initargs=(threads_each, ready))
            for _ in range(workers):  # start every worker now, each through its initializer
                made.submit(int)
            ready.wait()
            torch.set_num_threads(threads)
            _POOLS[key] = made
        return _POOLS[key]


def groups(seg: Segments, cost: Sequence[float], workers: int) -> List[List[int]]:
    """The live domains dealt to ``workers`` groups by their work (samples x the
    domain's cost per sample), heaviest first to the lightest group."""
    work = sorted(seg.live, key=lambda d: -seg.counts[d] * cost[d])
    out: List[List[int]] = [[] for _ in range(workers)]
    load = [0.0] * workers
    for d in work:
        i = min(range(workers), key=load.__getitem__)
        out[i].append(d)
        load[i] += seg.counts[d] * cost[d]
    return [sorted(g) for g in out if g]


def phases(steps: Sequence[S.Step]) -> List[Tuple[int, int, bool]]:
    """(start, stop, per_domain) runs of steps: the per-domain runs between the
    steps that see the whole batch (union islands and the output)."""
    out, start = [], 0
    for i, s in enumerate(steps):
        if isinstance(s, (S.Island, S.Output)):
            if i > start:
                out.append((start, i, True))
            out.append((i, i + 1, False))
            start = i + 1
    if start < len(steps):
        out.append((start, len(steps), True))
    return out


def run_phase(plan, start: int, stop: int, env: Dict[str, Any], state: S.RunState,
              domain_groups: List[List[int]], threads_each: int) -> Dict[str, Any]:
    """Steps [start, stop) of ``plan``, each group of domains on a worker thread;
    returns ``env`` with the phase's values merged back (domain by domain)."""
    inference = torch.is_inference_mode_enabled()

    def work(group: List[int]) -> Dict[str, Any]:
        # Grad and inference modes are per thread: take the caller's.
        with (torch.inference_mode() if inference else torch.no_grad()):
            sub = S.RunState(state.x, state.domain,
                             dataclasses.replace(state.seg, live=group), state.num_domains)
            local = dict(env)
            for i in range(start, stop):
                step = plan.steps[i]
                local[step.name] = step.run(local, sub)
                for name in plan._drop[i]:
                    del local[name]
            return local

    results = list(pool(len(domain_groups), threads_each).map(work, domain_groups))
    merged = dict(results[0])
    for name in list(merged):
        if name in env and env[name] is merged[name]:
            continue  # from before the phase: already whole
        if plan.kinds[name] == S.PLAIN:
            continue
        whole: List[Any] = [None] * state.num_domains
        for group, local in zip(domain_groups, results):
            parts = local[name]
            for d in group:
                whole[d] = parts[d]
        merged[name] = whole
    return merged
