"""Data-parallel training support: who we are in the process group, and the
synchronised per-domain BatchNorm statistics that make N ranks train exactly like
one process on their concatenated (global) batch.

``fastmdl.train`` turns synchronisation on (with :func:`sync_batchnorm`) for its
training steps and BatchNorm recalibration when ``torch.distributed`` is
initialised with more than one rank; layers read it through :func:`sync_group`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Tuple

import torch
import torch.distributed as dist

_SYNC: contextvars.ContextVar[bool] = contextvars.ContextVar("fastmdl_sync_bn", default=False)


def world() -> Tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def distributed() -> bool:
    """True when a default process group with more than one rank exists."""
    return world()[1] > 1


@contextlib.contextmanager
def sync_batchnorm(enabled: bool = True) -> Iterator[None]:
    """Inside the block, fastmdl BatchNorm2d layers in training mode compute each
    domain's batch statistics over every rank's samples (when distributed)."""
    token = _SYNC.set(bool(enabled) and distributed())
    try:
        yield
    finally:
        _SYNC.reset(token)


def sync_group() -> bool:
    """Whether BatchNorm statistics must be summed over the ranks right now."""
    return _SYNC.get()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over ranks of ``t``, differentiable: the gradient of each rank's copy is
    the Σ over ranks of the incoming gradients, as the chain rule asks for a
    statistic that every rank's loss reads. Every rank must call it in the same
    order (the layers run in the same order everywhere)."""
    from torch.distributed.nn.functional import all_reduce
    return all_reduce(t, op=dist.ReduceOp.SUM)


def reduce_host(values, op: str = "sum"):
    """Reduce a list of Python numbers over the ranks (float64 on the CPU; gloo
    and NCCL alike accept it after a move to the group's device)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    if not distributed():
        return t.tolist()
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
                           "min": dist.ReduceOp.MIN}[op])
    return t.cpu().tolist()


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if distributed():
        dist.barrier()


def synced_batch_stats(x: torch.Tensor, domain, num_domains: int
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-domain (D, C) mean and biased variance of ``x`` (N, C, H, W) over the
    samples of every rank, and the (D,) global element counts per channel.

    One differentiable all-reduce of [Σx, Σx², count] per call; domains with no
    sample anywhere come out with count 0 (their mean and variance are 0)."""
    n, c = x.shape[:2]
    if isinstance(domain, int):
        onehot = x.new_zeros(n, num_domains, dtype=torch.float64)
        onehot[:, domain] = 1
    else:
        onehot = torch.nn.functional.one_hot(domain, num_domains)
    per_pixel = x.shape[2] * x.shape[3]
    # float64 sums: E[x²] - E[x]² cancels badly in float32 when |mean| >> std.
    onehot = onehot.to(torch.float64)
    s1 = onehot.t() @ x.sum(dim=(2, 3), dtype=torch.float64)
    s2 = onehot.t() @ (x * x).sum(dim=(2, 3), dtype=torch.float64)
    count = (onehot.sum(0) * per_pixel)[:, None]
    total = all_reduce_sum(torch.cat([s1, s2, count], dim=1))
    s1, s2, count = total[:, :c], total[:, c:2 * c], total[:, 2 * c]
    denom = count.clamp(min=1)[:, None]
    mean = s1 / denom
    var = (s2 / denom - mean * mean).clamp(min=0)
    return mean.to(x.dtype), var.to(x.dtype), count

