"""A mixed batch grouped by domain: the segments of the compact layout.

On entry the batch is sorted by domain (stably, so the samples of one domain keep
their order); segment d is the run of rows of domain d. On exit the rows go back
to the caller's order. Both happen once per forward pass, never per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class Segments:
    """Where each domain's samples are after sorting.

    ``order[i]`` is the caller's row that sorted row i holds (None when the whole
    batch is one domain and nothing moves); ``counts[d]`` is the number of
    samples of domain d, ``starts[d]`` the first sorted row of segment d, and
    ``live`` the domains with at least one sample, ascending."""

    num_rows: int
    order: Optional[torch.Tensor]
    counts: List[int]
    starts: List[int]
    live: List[int]

    @classmethod
    def of(cls, domain, num_rows: int, num_domains: int, device: torch.device) -> "Segments":
        """The segments of a batch of ``num_rows`` samples whose domains are ``domain``:
        an int (every sample, already checked) or an int64 tensor of shape (N,)
        whose ids this checks. Reads the per-domain counts on the host (once per
        forward pass); raises ``ValueError`` for an id outside [0, num_domains)."""
        if isinstance(domain, int):
            counts = [0] * num_domains
            counts[domain] = num_rows
            return cls._from_counts(num_rows, None, counts)
        # The per-domain counts are also the ids' check: one host read for both.
        try:
            counts = torch.bincount(domain, minlength=num_domains).tolist()
        except RuntimeError:  # a negative id
            raise ValueError(f"domain id {int(domain.min())} is out of range "
                             f"[0, {num_domains})") from None
        if len(counts) > num_domains:
            raise ValueError(f"domain id {len(counts) - 1} is out of range [0, {num_domains})")
        live = [d for d, c in enumerate(counts) if c]
        if len(live) == 1:  # one domain: the batch is already grouped
            return cls._from_counts(num_rows, None, counts)
        order = torch.argsort(domain, stable=True)
        return cls._from_counts(num_rows, order, counts)

    @classmethod
    def _from_counts(cls, num_rows: int, order, counts: List[int]) -> "Segments":
        starts, s = [], 0
        for c in counts:
            starts.append(s)
            s += c
        return cls(num_rows, order, counts, starts, [d for d, c in enumerate(counts) if c])

    def split(self, x: torch.Tensor) -> List[Optional[torch.Tensor]]:
        """Per domain, its samples of ``x`` (rows in the caller's order): views of
        one sorted copy, None for a domain with no sample."""
        if self.order is not None:
            x = x.index_select(0, self.order)
        return [x.narrow(0, self.starts[d], c) if c else None for d, c in enumerate(self.counts)]

    def join(self, parts: List[Optional[torch.Tensor]], like: torch.Tensor) -> torch.Tensor:
        """The rows of ``parts`` (one tensor per live domain, same trailing shape as
        ``like``) back in the caller's order, as one tensor."""
        live = [parts[d] for d in self.live]
        if self.order is None:
            return live[0].contiguous() if len(live) == 1 else torch.cat(live)
        out = like.new_empty((self.num_rows,) + tuple(live[0].shape[1:]))
        return out.index_copy_(0, self.order, torch.cat(live))
