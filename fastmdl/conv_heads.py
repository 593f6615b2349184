"""A convolutional classifier as per-domain heads (SqueezeNet's classifier).

A classifier that is a convolution, whose output reaches the model's output only
through ops that keep its channels apart (activations, dropout, pooling, a
flatten of a 1x1 map), is a head like a linear one: domain d has its own
convolution with ``num_classes[d]`` filters, and output channel k of a sample is
its domain's class k. Past a domain's classes the head gives 0, not -inf: the
ops after it would turn a -inf into a number (ReLU makes it 0). The -inf goes
onto the model's output instead (:class:`ClassPadding`), so a mixed batch gives
(N, max(num_classes)) logits exactly as with a linear head.

:class:`ConvHeads` is the multi-domain layer, :class:`PrunedConvHeads` its form
in a pruned network (over the kept input channels), :class:`ClassPadding` the
last step of both networks.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from . import _domain
from .layers import (PerDomainHeads, _check_classes, _column_table, _resolve_domain,
                     gather_logits)


class ConvHeads(PerDomainHeads):
    r"""One convolutional classifier per domain, with its own number of classes.

    For sample n of domain d, output channel k is
    :math:`W^{(d)}_k \star x_n + b^{(d)}_k` for k < num_classes[d] and 0 for the
    rest: (N, max(num_classes), H', W'). The :class:`fastmdl.MultiDomainModel`
    it heads sets its output to -inf past each domain's classes.
    """

    def __init__(self, in_channels: int, num_classes: Sequence[int], kernel_size, stride=1,
                 padding=0, dilation=1, bias: bool = True, device=None, dtype=None):
        kernel_size = _pair(kernel_size)
        super().__init__(num_classes, (in_channels,) + kernel_size, bias, device, dtype)
        self.in_channels, self.kernel_size = in_channels, kernel_size
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, num_classes: Sequence[int]) -> "ConvHeads":
        """Heads on ``conv``'s inputs with its kernel, stride, padding and dilation. A
        domain with as many classes as ``conv`` has filters starts from its weights;
        the others start from a fresh initialisation. Raises ``ValueError`` for a
        grouped convolution, a padding mode other than zeros or a padding given as
        a string, which a head does not take."""
        if conv.groups != 1:
            raise ValueError(f"it is grouped (groups={conv.groups}); a convolutional head "
                             "must read every input channel (groups=1)")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"its padding ({conv.padding_mode!r}, {conv.padding!r}) is not "
                             "a number of zeros; a convolutional head pads with zeros")
        new = cls(conv.in_channels, num_classes, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.bias is not None, conv.weight.device, conv.weight.dtype)
        new.start_from(conv.weight, conv.bias)
        return new

    def forward(self, x: torch.Tensor, domain: Optional[_domain.Domain] = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ConvHeads expects (N, {self.in_channels}, H, W), got shape "
                             f"{tuple(x.shape)}")
        domain = _resolve_domain(self, x, domain)
        z = F.conv2d(x, *self.stacked(), self.stride, self.padding, self.dilation)
        return gather_logits(z, self.columns, domain, fill=0.0)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_classes={self.num_classes}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}")


class PrunedConvHeads(nn.Module):
    """Every domain's convolutional classifier over the kept input channels, run as
    one convolution; each sample then takes its domain's channels (0 past its
    classes). ``weight`` is (sum(num_classes), C_in, kh, kw), domain d's filters
    after domain d-1's; ``in_masks`` (D, C_in) say which channels each domain
    reads, for the cost report."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 num_classes: Sequence[int], in_masks: torch.Tensor, *, stride=(1, 1),
                 padding=(0, 0), dilation=(1, 1)):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.register_buffer("in_masks", (in_masks != 0).to(torch.uint8))
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.num_classes = list(num_classes)
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)
        self.register_buffer("columns", _column_table(self.num_classes, weight.device),
                             persistent=False)

    def config(self) -> dict:
        """Hyper-parameters (everything but tensors) as JSON-able values."""
        return {"num_classes": self.num_classes, "stride": self.stride,
                "padding": self.padding, "dilation": self.dilation}

    def domain_rows(self, d: int) -> slice:
        """Domain d's filters: rows of ``weight`` and entries of ``bias``."""
        start = sum(self.num_classes[:d])
        return slice(start, start + self.num_classes[d])

    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        z = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
        return gather_logits(z, self.columns, domain, fill=0.0)


class ClassPadding(nn.Module):
    """Sets (N, max(num_classes)) logits to -inf past each sample's domain's classes:
    the last step of a network with a convolutional head, as ``F.cross_entropy``
    and the argmax of the logits must never pick a class the domain lacks.
    ``forward(x, domain)`` takes the domain already checked (an int or an int64
    tensor of shape (N,))."""

    def __init__(self, num_classes: Sequence[int], device=None):
        super().__init__()
        self.num_classes = _check_classes(num_classes)
        self.num_domains = len(self.num_classes)
        past = torch.arange(max(self.num_classes))[None, :] >= \
            torch.tensor(self.num_classes)[:, None]
        self.register_buffer("past", past.to(device), persistent=False)

    def config(self) -> dict:
        """Hyper-parameters (everything but tensors) as JSON-able values."""
        return {"num_classes": self.num_classes}

    def forward(self, x: torch.Tensor, domain: _domain.Domain) -> torch.Tensor:
        return x.masked_fill(self.past[domain], float("-inf"))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"
