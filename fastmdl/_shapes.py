"""Shape and layout rules shared by every backend and the fake implementation."""

from __future__ import annotations

from typing import Sequence, Tuple

import torch


def conv_output_hw(hw: Sequence[int], khw: Sequence[int], stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int]) -> Tuple[int, int]:
    """Output height and width of a convolution:
    ``(H + 2p - d(k - 1) - 1) // s + 1`` per spatial dimension."""
    return tuple(  # type: ignore[return-value]
        (hw[i] + 2 * padding[i] - dilation[i] * (khw[i] - 1) - 1) // stride[i] + 1
        for i in range(2))


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The op's output takes x's memory format: channels_last when x is densely
    channels_last (and not also plainly contiguous), contiguous otherwise.
    The C++ kernel applies the same rule."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def domain_masks(index: torch.Tensor, offsets: torch.Tensor, width: int,
                 dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """(D, width) table with entry [d, i] = 1 iff i is in ``index[offsets[d]:offsets[d+1]]``.

    Built with device ops only (no host synchronisation), so it can run under
    torch.compile and CUDA graph capture."""
    num_domains = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]
    owner = torch.repeat_interleave(torch.arange(num_domains, device=index.device), counts,
                                    output_size=index.numel())
    mask = torch.zeros((num_domains, width), dtype=dtype, device=index.device)
    # A device scalar: a Python 1 would be a host copy, which CUDA graph capture forbids.
    mask.index_put_((owner, index), torch.ones((), dtype=dtype, device=index.device))
    return mask


def segment_slots(widths: Sequence[int]) -> int:
    """The channel slots of a padded compact tensor: its widest domain, at least 1
    (so that no tensor of the network has an empty channel axis)."""
    return max(1, max(widths, default=0))
