"""Which channels of a tensor each domain can hold: the compact layout's index.

In the union layout a tensor (N, C, ...) of the pruned network carries every
channel some domain uses; a sample of domain d has exact zeros outside its own
channels. Its compact form keeps, for each sample, only the channels of its
domain's *support* S_d, in ascending order of the union's channel index:

    compact_d(T) = T[rows of d][:, S_d],     T[rows of d][:, c] = fill for c not in S_d

(fill is 0, or -inf for the padding columns of the classifier's logits). Every
layer of the compact network maps supports to supports, and where two operands
disagree (an add of two branches that keep different channels, a layer that reads
fewer channels than its input holds) a precomputed :class:`Reindex` moves one
form to the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch


@dataclass(frozen=True)
class Support:
    """The channels (dim 1) of a batch tensor that each of D domains may hold.

    ``masks`` is a (D, width) bool table on the CPU, or None for a tensor with no
    channel axis (rank 1: one value per sample, always held whole). A support is
    an upper bound: a channel in it may still be 0, so a domain with no channel
    at all is given channel 0 (an exact zero) to hold."""

    width: int
    masks: Optional[torch.Tensor]
    fill: float = 0.0
    _index: Tuple[torch.Tensor, ...] = field(default=(), compare=False, repr=False)

    _sizes: Tuple[int, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.masks is not None and self.width > 0 and not bool(self.masks.any(dim=1).all()):
            # A domain that holds no channel holds one zero instead: an empty channel
            # axis is something pooling and other ops refuse.
            masks = self.masks.clone()
            masks[~masks.any(dim=1), 0] = True
            object.__setattr__(self, "masks", masks)
        # Plain Python facts, so that code traced by torch.compile reads no tensor.
        if self.masks is not None:
            object.__setattr__(self, "_index", tuple(m.nonzero().squeeze(1) for m in self.masks))
            object.__setattr__(self, "_sizes", tuple(int(i.numel()) for i in self._index))

    @classmethod
    def dense(cls, num_domains: int, width: int, fill: float = 0.0) -> "Support":
        """Every domain holds every channel (the image, a frozen layer's output)."""
        return cls(width, torch.ones((num_domains, width), dtype=torch.bool), fill)

    @classmethod
    def rows(cls) -> "Support":
        """A per-sample value with no channel axis."""
        return cls(0, None)

    @property
    def has_channels(self) -> bool:
        return self.masks is not None

    def index(self, d: int) -> torch.Tensor:
        """Domain d's channels, ascending (int64, CPU)."""
        return self._index[d]

    def size(self, d: int) -> int:
        return self._sizes[d]

    @property
    def is_dense(self) -> bool:
        return self.masks is None or all(n == self.width for n in self._sizes)

    def same_channels(self, other: "Support") -> bool:
        if self.masks is None or other.masks is None:
            return self.masks is None and other.masks is None
        return self.width == other.width and torch.equal(self.masks, other.masks)


@dataclass
class Reindex:
    """Moves domain d's compact form from one support to another: channel j of
    the result is channel ``src[k]`` of the input where ``dst[k] = j``; every other
    channel of the result is ``fill`` (the input's value outside its support)."""

    src: torch.Tensor
    dst: Optional[torch.Tensor]  # None: dst is 0..width-1 (a pure gather)
    width: int
    fill: float

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if self.dst is None:
            if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
                # Gather the columns of its (pixels, C) matrix: the result stays
                # channels-last for the next convolution (a gather along dim 1
                # returns NCHW), and the 2-D gather is 2-6x faster than either 4-D
                # one. (A scatter the same way was slower: benchmarks/NOTES.md.)
                n, c, h, w = t.shape
                cols = t.permute(0, 2, 3, 1).reshape(n * h * w, c).index_select(1, self.src)
                return cols.view(n, h, w, -1).permute(0, 3, 1, 2)
            return t.index_select(1, self.src)
        out = t.new_full((t.shape[0], self.width) + tuple(t.shape[2:]), self.fill)
        if self.src.numel():
            out.index_copy_(1, self.dst, t.index_select(1, self.src))
        return out

    def to(self, device: torch.device) -> "Reindex":
        dst = None if self.dst is None else self.dst.to(device)
        return Reindex(self.src.to(device), dst, self.width, self.fill)


def reindex(source: Support, target: Support,
            through: Optional[torch.Tensor] = None) -> List[Optional[Reindex]]:
    """Per domain, the :class:`Reindex` from ``source`` to ``target`` (same union
    width), or None where the two hold the same channels. With ``through``, target
    channel j is source channel ``through[j]`` (a channel selection, ``x[:, through]``)."""
    if through is None and source.width != target.width:
        raise ValueError(f"internal error: supports of widths {source.width} and "
                         f"{target.width} cannot be reindexed")
    if source.masks is None:
        return [None] * (1 if target.masks is None else target.masks.shape[0])
    out: List[Optional[Reindex]] = []
    for d in range(source.masks.shape[0]):
        s, t = source.index(d), target.index(d)
        wanted = t if through is None else through[t]  # the source channel of each
        if torch.equal(s, wanted):
            out.append(None)
            continue
        rank = torch.full((source.width,), -1, dtype=torch.int64)
        rank[s] = torch.arange(s.numel())
        pos = rank[wanted]  # where each target channel sits in the source's form, or -1
        kept = pos >= 0
        if bool(kept.all()):
            out.append(Reindex(pos, None, t.numel(), source.fill))
        else:
            out.append(Reindex(pos[kept], kept.nonzero().squeeze(1), t.numel(), source.fill))
    return out


class Move:
    """Domain by domain, the :class:`Reindex` that brings a batch value from its own
    support to ``target`` (None where nothing moves); with ``through``, to the
    channels ``x[:, through]`` held on ``target``."""

    def __init__(self, source: Support, target: Support,
                 through: Optional[torch.Tensor] = None):
        self.source, self.target = source, target
        self.steps = reindex(source, target, through)

    @property
    def moves_anything(self) -> bool:
        return any(r is not None for r in self.steps)

    def __call__(self, part: torch.Tensor, d: int) -> torch.Tensor:
        r = self.steps[d]
        return part if r is None else r(part)

    def to(self, device: torch.device) -> "Move":
        self.steps = [None if r is None else r.to(device) for r in self.steps]
        return self

