"""Pure-PyTorch reference for ``fastmdl::domain_conv2d``: the oracle.

It follows the definition literally, one domain at a time: gather the domain's
samples and input channels, convolve with the matching slice of the weight,
apply the domain's affine, scatter into the domain's output channels of a zero
tensor; then add the residual everywhere and apply ReLU. Every other backend is
tested against this function. It runs on any device torch supports, so a
machine without a compiler or a GPU still computes the right answer.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _shapes


def domain_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    domain: torch.Tensor,
    in_index: torch.Tensor,
    in_offsets: torch.Tensor,
    out_index: torch.Tensor,
    out_offsets: torch.Tensor,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    relu: bool,
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    r"""For sample n of domain d and channel c:
    :math:`y_{n,c} = [c \in out_d]\,(\mathrm{conv}(x_{n,in_d}, W_{c,in_d})\,s_{d,c} + t_{d,c})
    + r_{n,c}`, then ReLU if ``relu``."""
    n, c_out = x.shape[0], weight.shape[0]
    ho, wo = _shapes.conv_output_hw(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    y = x.new_zeros((n, c_out, ho, wo))
    in_off = in_offsets.tolist()
    out_off = out_offsets.tolist()
    for d in range(len(in_off) - 1):
        rows = (domain == d).nonzero().squeeze(1)
        cols = out_index[out_off[d]:out_off[d + 1]]
        if rows.numel() == 0 or cols.numel() == 0:
            continue
        chans = in_index[in_off[d]:in_off[d + 1]]
        if chans.numel() == 0:
            z = y.new_zeros((rows.numel(), cols.numel(), ho, wo))
        else:
            w = weight.index_select(0, cols).index_select(1, chans)
            z = F.conv2d(x.index_select(0, rows).index_select(1, chans), w, None,
                         tuple(stride), tuple(padding), tuple(dilation))
        if scale is not None:
            z = z * scale[d, cols].view(1, -1, 1, 1)
        if shift is not None:
            z = z + shift[d, cols].view(1, -1, 1, 1)
        y[rows.unsqueeze(1), cols.unsqueeze(0)] = z.to(y.dtype)
    if residual is not None:
        y = y + residual
    if relu:
        y = torch.relu(y)
    return y.contiguous(memory_format=_shapes.output_memory_format(x))


def segment_conv2d(
    x: torch.Tensor,
    offsets: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    cin: Sequence[int],
    cout: Sequence[int],
    out_slots: int,
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    relu: bool,
) -> torch.Tensor:
    r"""``fastmdl::segment_conv2d`` one segment at a time (the oracle): for rows r of
    segment d, :math:`y_{r,:cout_d} = \mathrm{act}(W_d \star x_{r,:cin_d} + b_d +
    res_{r,:cout_d})` and the slots past cout_d are 0."""
    kh, kw = kernel
    ho, wo = _shapes.conv_output_hw(x.shape[2:], kernel, stride, padding, dilation)
    y = x.new_zeros((x.shape[0], out_slots, ho, wo)).contiguous(memory_format=torch.channels_last)
    bounds = offsets.tolist()
    w_start = b_start = 0
    for d, (ci, co) in enumerate(zip(cin, cout)):
        s, e = bounds[d], bounds[d + 1]
        w_len = co * kh * kw * ci
        if e > s and co > 0:
            b = None if bias is None else bias[b_start:b_start + co]
            if ci > 0:
                w = weight[w_start:w_start + w_len].view(co, kh, kw, ci).permute(0, 3, 1, 2)
                z = F.conv2d(x[s:e, :ci], w, b, tuple(stride), tuple(padding), tuple(dilation))
            else:  # no input channel: the bias alone
                z = x.new_zeros((e - s, co, ho, wo)) if b is None else \
                    b.view(1, -1, 1, 1).expand(e - s, co, ho, wo)
            if residual is not None:
                z = z + residual[s:e, :co]
            y[s:e, :co] = torch.relu(z) if relu else z
        w_start += w_len
        b_start += co
    return y
