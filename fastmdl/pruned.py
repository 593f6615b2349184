"""Layers of a pruned multi-domain network, and the network itself.

After :func:`fastmdl.prune`, every tensor holds only the channels some domain
uses. Each layer keeps, per domain, which of those channels are the domain's own
(CSR index lists, as ``fastmdl::domain_conv2d`` takes them) and runs a mixed
batch in one call: convolutions through the op, with the domain's BatchNorm
folded into its scale and shift, and the residual add and ReLU that follow fused
into its epilogue where the graph allows.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

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


BatchNormStats = Tuple[torch.Tensor, torch.Tensor, float]  # (mean (D, C), var (D, C), eps)


class _Calibration:
    r"""BatchNorm statistics recomputed on a folded layer, as
    :func:`fastmdl.recalibrate_bn` does on the unfolded network: each forward
    normalises every domain's rows with their own batch statistics,

    .. math:: y = \gamma_d (z - \bar z_d) / \sqrt{\mathrm{var}(z)_d + \epsilon} + \beta_d,

    with :math:`\gamma = s \sqrt{\sigma^2 + \epsilon}` and :math:`\beta = t + \mu s`
    recovered from the folded scale s, shift t and the stored statistics
    :math:`\mu, \sigma^2`; the new statistics are the plain average over the batches
    (unbiased variances), as a BatchNorm with ``momentum=None`` keeps them."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, stats: BatchNormStats,
                 masks: torch.Tensor):
        mean, var, self.eps = stats
        f32 = torch.float32
        self.old_scale, self.old_shift = scale.detach().clone(), shift.detach().clone()
        self.gamma = scale.detach().to(f32) * torch.sqrt(var.to(f32) + self.eps)
        self.beta = shift.detach().to(f32) + mean.to(f32) * scale.detach().to(f32)
        self.old_mean, self.old_var = mean, var
        self.keep = masks.to(mean.device) > 0
        self.sum_mean = torch.zeros_like(self.gamma)
        self.sum_var = torch.zeros_like(self.gamma)
        self.count = torch.zeros(self.gamma.shape[0], dtype=f32, device=self.gamma.device)

    def __call__(self, z: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(z)
        for d in domain.unique().tolist():
            rows = (domain == d).nonzero().squeeze(1)
            zd = z.index_select(0, rows).float()
            n = zd.numel() // zd.shape[1]
            if n < 2:
                raise ValueError("BatchNorm recalibration needs more than 1 value per channel "
                                 f"of each domain in a batch, got {n} for domain {d}: use "
                                 "larger batches")
            var, mean = torch.var_mean(zd, dim=(0, 2, 3), unbiased=False)
            scale = self.gamma[d] * torch.rsqrt(var + self.eps)
            y = (zd - mean[:, None, None]) * scale[:, None, None] + self.beta[d][:, None, None]
            out[rows] = y.to(z.dtype)
            self.sum_mean[d] += mean
            self.sum_var[d] += var * (n / (n - 1))
            self.count[d] += 1
        return out

    def result(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale, shift, mean, var) after the batches seen; a domain that saw none,
        and a channel a domain does not use, keep their statistics."""
        seen = self.count > 0
        n = self.count.clamp(min=1)[:, None]
        keep = self.keep & seen[:, None]
        mean = torch.where(keep, self.sum_mean / n, self.old_mean.float())
        var = torch.where(keep, self.sum_var / n, self.old_var.float())
        keep = keep.to(self.old_scale.device)
        scale = self.gamma * torch.rsqrt(var + self.eps)
        shift = self.beta - mean * scale
        # What is not recomputed stays bit for bit (no round trip through gamma, beta).
        scale = torch.where(keep, scale.to(self.old_scale.dtype), self.old_scale)
        shift = torch.where(keep, shift.to(self.old_shift.dtype), self.old_shift)
        return scale, shift, mean.to(self.old_mean.dtype), var.to(self.old_var.dtype)


class _FoldedBatchNorm(nn.Module):
    """What a layer with a folded BatchNorm (a per-domain ``scale`` and ``shift``)
    needs to be recalibrated: the statistics ``bn_mean``/``bn_var`` ((D, C)
    buffers, None when the layer has none) and ``bn_eps``."""

    def set_bn_stats(self, stats: Optional[BatchNormStats]) -> None:
        """Keep (mean, var, eps) of the BatchNorm folded into this layer (None: none)."""
        mean, var, eps = stats if stats is not None else (None, None, None)
        self.register_buffer("bn_mean", None if mean is None else mean.detach().clone())
        self.register_buffer("bn_var", None if var is None else var.detach().clone())
        self.bn_eps = None if eps is None else float(eps)
        self._calibration: Optional[_Calibration] = None

    @property
    def has_stats(self) -> bool:
        return self.bn_mean is not None

    def stats(self) -> Optional[BatchNormStats]:
        return (self.bn_mean, self.bn_var, self.bn_eps) if self.has_stats else None

    def _start_calibration(self, masks: torch.Tensor) -> None:
        self._calibration = _Calibration(self.scale, self.shift, self.stats(), masks)

    def _end_calibration(self, commit: bool) -> None:
        calibration, self._calibration = self._calibration, None
        if commit and calibration is not None:
            scale, shift, mean, var = calibration.result()
            with torch.no_grad():
                self.scale.copy_(scale)
                self.shift.copy_(shift)
                self.bn_mean.copy_(mean)
                self.bn_var.copy_(var)


class PrunedConv2d(_FoldedBatchNorm):
    r"""A convolution of the pruned network, for a mixed batch in one call:

    .. math:: y_{n,c} = \mathrm{act}\big([c \in out_d](W_{c,in_d} \star x_{n,in_d}
              \cdot s_{d,c} + t_{d,c}) + r_{n,c}\big),\quad d = domain_n

    with ``in_masks``/``out_masks`` the (D, C) 0/1 tables of each domain's input
    channels and filters, s/t the folded BatchNorm (and bias), r an optional
    residual and act an optional ReLU. Grouped convolutions (which fastmdl never
    prunes) run through ``F.conv2d`` with the same epilogue.

    ``bn_stats`` = (mean, var, eps) of the folded BatchNorm, over
    :math:`W \star x` without the bias, lets :func:`fastmdl.recalibrate_bn` recompute
    s and t after the network changes (PAGCP's cuts, a fine-tune).
    """

    def __init__(self, weight: torch.Tensor, in_masks: torch.Tensor, out_masks: torch.Tensor,
                 scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], *,
                 stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1,
                 padding_mode: str = "zeros", relu: bool = False,
                 bn_stats: Optional[BatchNormStats] = None):
        super().__init__()
        if bn_stats is not None and (scale is None or shift is None):
            raise ValueError("bn_stats needs the folded BatchNorm's scale and shift")
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
        self.set_bn_stats(bn_stats)

    @property
    def num_domains(self) -> int:
        return self.in_offsets.numel() - 1

    def config(self) -> dict:
        """Hyper-parameters (everything but tensors) as JSON-able values."""
        config = {"stride": self.stride, "padding": self.padding, "dilation": self.dilation,
                  "groups": self.groups, "padding_mode": self.padding_mode, "relu": self.relu}
        if self.has_stats:
            config["bn_eps"] = self.bn_eps
        return config

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
        if self._calibration is not None:
            z = self._conv(x, domain, padding, None, None, None, False)
            z = self._calibration(z, domain) * self.masks()[1].to(z.dtype)[domain][:, :, None, None]
            if residual is not None:
                z = z + residual
            return torch.relu(z) if self.relu else z
        return self._conv(x, domain, padding, self.scale, self.shift, residual, self.relu)

    def _conv(self, x, domain, padding, scale, shift, residual, relu) -> torch.Tensor:
        if self.groups == 1:
            return torch.ops.fastmdl.domain_conv2d(
                x, self.weight, domain, self.in_index, self.in_offsets, self.out_index,
                self.out_offsets, scale, shift, residual, relu, self.stride,
                padding, self.dilation, self.backend)
        z = F.conv2d(x, self.weight, None, self.stride, padding, self.dilation, self.groups)
        if scale is not None:
            z = z * scale[domain][:, :, None, None]
        if shift is not None:
            z = z + shift[domain][:, :, None, None]
        z = z * self.masks()[1].to(z.dtype)[domain][:, :, None, None]
        if residual is not None:
            z = z + residual
        return torch.relu(z) if relu else z

    def extra_repr(self) -> str:
        c_out, c_in, kh, kw = self.weight.shape
        return (f"{c_in * self.groups}, {c_out}, kernel_size=({kh}, {kw}), stride={tuple(self.stride)}, "
                f"padding={tuple(self.padding)}, dilation={tuple(self.dilation)}, groups={self.groups}, "
                f"relu={self.relu}, domains={self.num_domains}")


class PrunedBatchNorm2d(_FoldedBatchNorm):
    r"""A BatchNorm that could not be folded into a convolution, in evaluation form:
    :math:`y_{n,c} = x_{n,c} s_{d,c} + t_{d,c}` with s = t = 0 on channels that
    domain d does not use (so they stay exactly 0). ``bn_stats`` = (mean, var, eps)
    of its input, for :func:`fastmdl.recalibrate_bn`."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor, masks: torch.Tensor,
                 bn_stats: Optional[BatchNormStats] = None):
        super().__init__()
        keep = masks.to(scale.dtype)
        self.scale = nn.Parameter(scale.detach() * keep)
        self.shift = nn.Parameter(shift.detach() * keep)
        self.register_buffer("masks", (masks != 0).to(torch.uint8))
        self.set_bn_stats(bn_stats)

    def config(self) -> dict:
        return {"bn_eps": self.bn_eps} if self.has_stats else {}

    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        if self._calibration is not None:
            return self._calibration(x, domain) * self.masks.to(x.dtype)[domain][:, :, None, None]
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

    @contextlib.contextmanager
    def calibrating(self) -> Iterator[None]:
        """Within the block, every layer with a folded BatchNorm normalises each
        domain's rows with their batch statistics and averages them; on leaving it
        normally, each layer's statistics, scale and shift are the recomputed ones
        (a domain that ran no batch keeps its own). :func:`fastmdl.recalibrate_bn`
        is the usual way in. Raises ``TypeError`` if no layer kept its statistics."""
        layers = [m for m in self.net.modules()
                  if isinstance(m, _FoldedBatchNorm) and m.has_stats]
        if not layers:
            raise TypeError("this PrunedModel kept no BatchNorm statistics (it was saved by a "
                            "fastmdl without them, or its network has no BatchNorm): "
                            "recalibrate the MultiDomainModel before fastmdl.prune")
        for m in layers:
            masks = m.masks()[1] if isinstance(m, PrunedConv2d) else m.masks
            m._start_calibration(masks)
        ok = False
        try:
            with torch.no_grad():
                yield
            ok = True
        finally:
            for m in layers:
                m._end_calibration(commit=ok)

    def extra_repr(self) -> str:
        return f"num_domains={self.num_domains}, num_classes={self.num_classes}"
