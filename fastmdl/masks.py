"""Binary per-domain filter masks learned through real-valued scores.

A mask group owns a Parameter ``scores`` of shape (D, C): entry [d, c] > 0 means
filter c is kept for domain d. The forward pass uses the binary mask
``m = [scores > 0]``; the backward pass is straight-through, dm/dscores = 1, so
the task loss and the budget loss both move the scores.

Channels may be tied in *blocks* of ``block`` consecutive channels (a grouped
convolution's groups, which are kept or removed whole): each block is then one
decision, ``m_{d,c} = [mean of s_{d,c'} over c's block > 0]``, still with a
straight-through gradient to every score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import nn

class Segment(NamedTuple):
    """A run of a channel axis: ``width`` channels masked by a group's ``scores``
    (its columns ``start`` .. ``start + width - 1``; a shuffled or split tensor
    holds parts of groups) in blocks of ``block``, or, with ``scores`` None,
    channels that are never pruned (the image, outputs of layers fastmdl cannot
    prune)."""

    scores: Optional[nn.Parameter]
    width: int
    block: int = 1
    start: int = 0


def hard_mask(scores: torch.Tensor, block: int = 1) -> torch.Tensor:
    """The boolean mask ``[scores > 0]``, decided per block of ``block`` channels
    (along the last dim) by the block's mean score."""
    if block == 1:
        return scores > 0
    c = scores.shape[-1]
    if c % block:
        raise ValueError(f"block must divide the {c} channels of the scores, got {block}")
    means = scores.reshape(scores.shape[:-1] + (c // block, block)).mean(-1)
    return (means > 0).repeat_interleave(block, dim=-1)


def binarize(scores: torch.Tensor, block: int = 1) -> torch.Tensor:
    """:func:`hard_mask` in the forward pass, identity gradient in the backward pass."""
    hard = hard_mask(scores, block).to(scores.dtype)
    return scores + (hard - scores).detach()


def segment_masks(segments: Sequence[Segment], num_domains: int, *, hard: bool = False,
                  device=None, dtype=torch.float32) -> torch.Tensor:
    """(D, C) mask of a channel axis made of ``segments``: binarised scores where a
    segment has scores, ones where it has none. ``hard`` detaches the scores."""
    parts = []
    decided = {}  # one binarisation per group, however many runs it has here
    for seg in segments:
        scores, width, block, start = Segment(*seg)  # (scores, width, block) too
        if scores is None:
            parts.append(torch.ones((num_domains, width), device=device, dtype=dtype))
            continue
        key = (id(scores), block)
        if key not in decided:
            m = hard_mask(scores, block).to(dtype) if hard else binarize(scores, block).to(dtype)
            decided[key] = m.to(device) if device is not None else m
        m = decided[key]
        parts.append(m if start == 0 and width == m.shape[1] else m[:, start:start + width])
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def apply_mask(y: torch.Tensor, masks: torch.Tensor,
               domain: Union[int, torch.Tensor]) -> torch.Tensor:
    """Multiply channel c of sample n by ``masks[domain[n], c]`` (broadcast over pixels)."""
    m = masks[domain].to(y.dtype)
    shape = (1, -1) if isinstance(domain, int) else (y.shape[0], -1)
    return y * m.reshape(shape + (1,) * (y.dim() - 2))


@dataclass
class MaskGroup:
    """Filters whose masks are tied: the convolutions in ``members`` all write the
    same channels (e.g. they meet at a residual add), so one (D, C) ``scores``
    Parameter decides, per domain, which of those C channels exist. Write
    ``group.scores.data`` to set masks directly. With ``block`` > 1 (the channels
    a grouped convolution reads and writes) the channels are kept or removed in
    blocks of that many, each by its mean score (:func:`hard_mask`)."""

    name: str
    members: Tuple[str, ...]
    scores: nn.Parameter
    block: int = 1

    @property
    def width(self) -> int:
        """Number of channels C in the group."""
        return self.scores.shape[1]

    def mask(self) -> torch.Tensor:
        """The current (D, C) 0/1 mask, detached."""
        return hard_mask(self.scores.detach(), self.block).to(torch.float32)
