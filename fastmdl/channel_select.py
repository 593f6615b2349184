"""A fixed selection of channels: what a channel shuffle or split becomes when pruned.

ShuffleNet's channel shuffle (view to (N, g, C/g, H, W), transpose, view back) and
its split (``x.chunk(2, 1)``) are fixed reorderings of the channels. Once each
space keeps only some of its channels, the reshape no longer permutes the right
channels (it depends on C), so ``fastmdl.prune`` replaces each one by the index
list it computes on the kept channels:

    y[:, j] = x[:, index[j]]

The channel analysis reads the same module in a pruned graph as it reads the
ops it replaced.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn


def as_run(index: torch.Tensor) -> Optional[Tuple[int, int]]:
    """(first, count) if the 1-D ``index`` is first, first + 1, ..., first + count - 1
    (then ``x[:, index]`` is the view ``x.narrow(1, first, count)``); else None."""
    idx = index.cpu()
    if idx.numel() == 0:
        return None
    first = int(idx[0])
    whole = torch.equal(idx, torch.arange(first, first + idx.numel(), dtype=idx.dtype))
    return (first, int(idx.numel())) if whole else None


class ChannelSelect(nn.Module):
    r"""``y = x[:, index]``: channel j of the output is channel ``index[j]`` of the
    input (dim 1). ``index`` is a non-empty 1-D int64 tensor of channels, each at
    least 0; a run of consecutive channels is a view (``narrow``), anything else one
    gather."""

    def __init__(self, index: torch.Tensor):
        super().__init__()
        if not isinstance(index, torch.Tensor):
            raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
        if index.dtype != torch.int64 or index.dim() != 1 or index.numel() == 0:
            raise ValueError(f"index must be a non-empty 1-D int64 tensor, got "
                             f"{index.dtype} of shape {tuple(index.shape)}")
        if bool((index < 0).any()):
            raise ValueError("index must hold channel numbers >= 0")
        self.register_buffer("index", index.clone())
        self._refresh()

    def _refresh(self) -> None:
        # Plain Python facts, so the forward pass reads no tensor to decide its path.
        self._run = as_run(self.index)
        self._needs = int(self.index.max()) + 1

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._refresh()

    def config(self) -> dict:
        """Its settings for ``fastmdl.save`` (none: the index is its one tensor)."""
        return {}

    @property
    def in_channels_needed(self) -> int:
        """The fewest input channels this selection reads: ``max(index) + 1``."""
        return self._needs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] < self._needs:
            raise ValueError(f"ChannelSelect needs an input with at least {self._needs} "
                             f"channels in dim 1, got shape {tuple(x.shape)}")
        if self._run is not None:
            return x.narrow(1, self._run[0], self._run[1])
        return x.index_select(1, self.index)

    def extra_repr(self) -> str:
        return f"channels={self.index.numel()}, of {self._needs}+"
