"""Layers of a pruned multi-domain network, and the network itself.

After :func:`fastmdl.prune`, every tensor holds only the channels some domain
uses. Each layer keeps, per domain, which of those channels are the domain's own
(CSR index lists, as ``fastmdl::domain_conv2d`` takes them) and runs a mixed
batch in one call: convolutions through the op, with the domain's BatchNorm
folded into its scale and shift, and the residual add and ReLU that follow fused
into its epilogue where the graph allows.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import _domain, _shapes, ops
from .backends.triton import shared_batch_plan
from .layers import _column_table, gather_logits


def _csr(masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    index, offsets = ops.index_lists(masks)
    return index.to(torch.int64), offsets


class PrunedConv2d(nn.Module):
    r"""A convolution of the pruned network, for a mixed batch in one call:

    .. math:: y_{n,c} = \mathrm{act}\big([c \in out_d](W_{c,in_d} \star x_{n,in_d}
              \cdot s_{d,c} + t_{d,c}) + r_{n,c}\big),\quad d = domain_n

    with ``in_masks``/``out_masks`` the (D, C) 0/1 tables of each domain's input
    channels and filters, s/t the folded BatchNorm (and bias), r an optional
    residual and act an optional ReLU. Grouped convolutions (which fastmdl never
    prunes) run through ``F.conv2d`` with the same epilogue.
    """

    def __init__(self, weight: torch.Tensor, in_masks: torch.Tensor, out_masks: torch.Tensor,
                 scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], *,
                 stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1,
                 padding_mode: str = "zeros", relu: bool = False):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.scale = nn.Parameter(scale.detach().clone()) if scale is not None else None
        self.shift = nn.Parameter(shift.detach().clone()) if shift is not None else None
        in_index, in_offsets = _csr(in_masks)
        out_index, out_offsets = _csr(out_masks)
        self.register_buffer("in_index", in_index)
        self.register_buffer("in_offsets", in_offsets)
        self.register_buffer("out_index", out_index)
        self.register_buffer("out_offsets", out_offsets)
        self.stride, self.padding, self.dilation = list(stride), list(padding), list(dilation)
        self.groups, self.padding_mode, self.relu = groups, padding_mode, relu
        self.backend = "auto"

    @property
    def num_domains(self) -> int:
        return self.in_offsets.numel() - 1

    def config(self) -> dict:
        """Hyper-parameters (everything but tensors) as JSON-able values."""
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation,
                "groups": self.groups, "padding_mode": self.padding_mode, "relu": self.relu}

    def masks(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(in_masks, out_masks): (D, C_in) and (D, C_out) 0/1 float tables."""
        return (_shapes.domain_masks(self.in_index, self.in_offsets, self.weight.shape[1] * self.groups,
                                     torch.float32),
                _shapes.domain_masks(self.out_index, self.out_offsets, self.weight.shape[0],
                                     torch.float32))

    def forward(self, x: torch.Tensor, domain: torch.Tensor,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            ph, pw = padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            padding = [0, 0]
        if self.groups == 1:
            return torch.ops.fastmdl.domain_conv2d(
                x, self.weight, domain, self.in_index, self.in_offsets, self.out_index,
                self.out_offsets, self.scale, self.shift, residual, self.relu, self.stride,
                padding, self.dilation, self.backend)
        z = F.conv2d(x, self.weight, None, self.stride, padding, self.dilation, self.groups)
        if self.scale is not None:
            z = z * self.scale[domain][:, :, None, None]
        if self.shift is not None:
            z = z + self.shift[domain][:, :, None, None]
        z = z * self.masks()[1].to(z.dtype)[domain][:, :, None, None]
        if residual is not None:
            z = z + residual
        return torch.relu(z) if self.relu else z

    def extra_repr(self) -> str:
        c_out, c_in, kh, kw = self.weight.shape
        return (f"{c_in * self.groups}, {c_out}, kernel_size=({kh}, {kw}), stride={tuple(self.stride)}, "
                f"padding={tuple(self.padding)}, dilation={tuple(self.dilation)}, groups={self.groups}, "
                f"relu={self.relu}, domains={self.num_domains}")


class PrunedBatchNorm2d(nn.Module):
    r"""A BatchNorm that could not be folded into a convolution, in evaluation form:
    :math:`y_{n,c} = x_{n,c} s_{d,c} + t_{d,c}` with s = t = 0 on channels that
    domain d does not use (so they stay exactly 0)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, masks: torch.Tensor):
        super().__init__()
        keep = masks.to(scale.dtype)
        self.scale = nn.Parameter(scale.detach() * keep)
        self.shift = nn.Parameter(shift.detach() * keep)
        self.register_buffer("masks", (masks != 0).to(torch.uint8))

    def config(self) -> dict:
        return {}

    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        return x * self.scale[domain][:, :, None, None] + self.shift[domain][:, :, None, None]


class PrunedHeads(nn.Module):
    """Every domain's classifier over the kept features, computed as one matrix
    product; each sample then takes its domain's logits (-inf past its classes)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 num_classes: Sequence[int], in_masks: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.register_buffer("in_masks", (in_masks != 0).to(torch.uint8))
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.num_classes = list(num_classes)
        self.register_buffer("columns", _column_table(self.num_classes, weight.device),
                             persistent=False)

    def config(self) -> dict:
        return {"num_classes": self.num_classes}

    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        return gather_logits(F.linear(x, self.weight, self.bias), self.columns, domain)


class PrunedLinear(nn.Linear):
    """``nn.Linear`` over pruned features, remembering which features each domain
    uses (``in_masks``, (D, in_features)) for the cost report."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], in_masks: torch.Tensor):
        super().__init__(weight.shape[1], weight.shape[0], bias is not None,
                         device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.weight.copy_(weight)
            if bias is not None:
                self.bias.copy_(bias)
        self.register_buffer("in_masks", (in_masks != 0).to(torch.uint8))

    def config(self) -> dict:
        return {}


DOMAIN_LAYERS = (PrunedConv2d, PrunedBatchNorm2d, PrunedHeads)


class PrunedModel(nn.Module):
    """The pruned multi-domain network: ``forward(x, domain)`` with ``domain`` an
    int or an int64 tensor of shape (N,), returning (N, max(num_classes)) logits
    (-inf past each domain's classes). It runs a torch.fx graph whose
    domain-aware layers take the per-sample domain tensor explicitly.

    ``baseline`` holds the single-domain network's cost per domain, for
    :func:`fastmdl.cost_report`.
    """

    def __init__(self, net: fx.GraphModule, num_domains: int, num_classes: Sequence[int],
                 input_size: Sequence[int], baseline: Dict[str, List[float]]):
        super().__init__()
        self.net = net
        self.num_domains = num_domains
        self.num_classes = list(num_classes)
        self.input_size = tuple(input_size)
        self.baseline = {k: [float(v) for v in vs] for k, vs in baseline.items()}

    @property
    def backend(self) -> str:
        """The op backend every convolution uses ("auto" picks per device)."""
        return next((m.backend for m in self.net.modules() if isinstance(m, PrunedConv2d)), "auto")

    @backend.setter
    def backend(self, name: str) -> None:
        for m in self.net.modules():
            if isinstance(m, PrunedConv2d):
                m.backend = ops._backend_name(name)

    def forward(self, x: torch.Tensor, domain: _domain.Domain) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError("x must be a 4-D (N, C, H, W) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.input_size[0]:
            raise ValueError(f"x must have {self.input_size[0]} channels, got shape {tuple(x.shape)}")
        dtype = next(self.parameters()).dtype
        if x.dtype != dtype:
            raise TypeError(f"x must have the model's dtype {dtype}, got {x.dtype}")
        domain = _domain.check_domain(domain, x.shape[0], self.num_domains, x.device)
        domain = _domain.as_tensor(domain, x.shape[0], x.device)
        if torch.compiler.is_compiling():
            return self.net(x, domain)
        # Every layer gets this same domain tensor: let the Triton kernels group
        # the batch once for all of them (a no-op for the other backends).
        with shared_batch_plan():
            return self.net(x, domain)

    def extra_repr(self) -> str:
        return f"num_domains={self.num_domains}, num_classes={self.num_classes}"
