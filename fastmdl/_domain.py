"""How a sample's domain reaches the layers.

``MultiDomainModel.forward(x, domain)`` runs the user's unmodified ``forward(x)``;
the domain travels beside it in a :class:`contextvars.ContextVar`. Each thread
(and each asyncio task) sees its own value, so several threads may run forward
at once on one model without seeing each other's domains.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional, Sequence, Union

import torch

Domain = Union[int, torch.Tensor]

_CURRENT: contextvars.ContextVar[Optional[Domain]] = contextvars.ContextVar(
    "fastmdl_domain", default=None)


@contextlib.contextmanager
def domain_scope(domain: Domain) -> Iterator[None]:
    """Make ``domain`` the current domain of fastmdl layers called inside the block."""
    token = _CURRENT.set(domain)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_domain() -> Optional[Domain]:
    """The domain set by the innermost :func:`domain_scope`, or None."""
    return _CURRENT.get()


def check_domain(domain, n: int, num_domains: int, device: torch.device, *,
                 read_values: bool = True) -> Domain:
    """Validate ``domain`` for a batch of ``n`` samples: an int in [0, D), or an int64
    tensor of shape (n,) on ``device`` with values in [0, D) (the values are read only
    with ``read_values``, for callers that check them in a transfer of their own).
    Returns it unchanged."""
    if isinstance(domain, bool) or not isinstance(domain, (int, torch.Tensor)):
        raise TypeError(f"domain must be an int or an int64 tensor of shape (N,), "
                        f"got {type(domain).__name__}")
    if isinstance(domain, int):
        if not 0 <= domain < num_domains:
            raise ValueError(f"domain {domain} is out of range [0, {num_domains})")
        return domain
    if domain.dtype != torch.int64:
        raise TypeError(f"domain must have dtype torch.int64, got {domain.dtype}")
    if domain.dim() != 1 or domain.shape[0] != n:
        raise ValueError(f"domain must have shape (N,) = ({n},), got {tuple(domain.shape)}")
    if domain.device != device:
        raise ValueError(f"domain must be on the input's device {device}, got {domain.device}")
    if read_values and n and can_read_values():
        check_values(domain, num_domains)
    return domain


def check_values(domain: torch.Tensor, num_domains: int) -> None:
    """Every id in the (non-empty) int64 tensor ``domain`` lies in [0, D) (reads the
    ids' range on the host)."""
    lo, hi = torch.stack([domain.min(), domain.max()]).tolist()
    if lo < 0 or hi >= num_domains:
        bad = lo if lo < 0 else hi
        raise ValueError(f"domain id {bad} is out of range [0, {num_domains})")


@torch.library.custom_op("fastmdl::checked_domain", mutates_args=())
def checked_domain(domain: torch.Tensor, num_domains: int) -> torch.Tensor:
    """A copy of the int64 ids ``domain`` once :func:`check_values` passed on them:
    how a graph compiled by torch.compile checks the ids each time it runs (tracing
    cannot read them, and an out-of-range id would otherwise index past the
    per-domain tables silently). The copy is what the graph then uses, so the
    compiler cannot drop the check. Under CUDA graph capture, and on its replays,
    nothing can read the ids and none are checked."""
    if domain.numel() and can_read_values():
        check_values(domain, num_domains)
    return domain.clone()


@checked_domain.register_fake
def _checked_domain_fake(domain: torch.Tensor, num_domains: int) -> torch.Tensor:
    return torch.empty_like(domain)


def run(module, x: torch.Tensor, domain, num_domains: int):
    """``module(x)`` with ``domain`` checked and made current for the fastmdl layers
    inside it (how a wrapper runs an unmodified ``forward(x)`` per domain)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D (N, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    domain = check_domain(domain, x.shape[0], num_domains, x.device)
    with domain_scope(domain):
        return module(x)


def as_tensor(domain: Domain, n: int, device: torch.device) -> torch.Tensor:
    """``domain`` as an int64 tensor of shape (n,) (an int fills the batch)."""
    if isinstance(domain, int):
        return torch.full((n,), domain, dtype=torch.int64, device=device)
    return domain


def can_read_values() -> bool:
    """False inside torch.compile or a CUDA graph capture, where reading a tensor's
    values on the host would break the graph."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def check_per_domain(items, name: str, num_domains: int) -> None:
    """``items`` must be a list (any non-string Sequence) with one entry per domain."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise TypeError(f"{name} must be a list with one loader per domain, got "
                        f"{type(items).__name__}")
    if len(items) != num_domains:
        raise ValueError(f"{name} must have one loader per domain ({num_domains}), "
                         f"got {len(items)}")
