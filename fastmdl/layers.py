"""Multi-domain layers: drop-ins for ``nn.Conv2d``, ``nn.BatchNorm2d`` and a
classifier head, each taking ``forward(x, domain)``.

``domain`` is an int (the whole batch) or an int64 tensor of shape (N,); when it
is omitted the layer reads the domain set by the enclosing
:class:`fastmdl.MultiDomainModel` (see ``fastmdl/_domain.py``).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _dist, _domain
from .masks import Segment, apply_mask, binarize, segment_masks


def _check_num_domains(num_domains) -> int:
    if isinstance(num_domains, bool) or not isinstance(num_domains, int):
        raise TypeError(f"num_domains must be an int, got {type(num_domains).__name__}")
    if num_domains < 1:
        raise ValueError(f"num_domains must be >= 1, got {num_domains}")
    return num_domains


def _resolve_domain(layer: nn.Module, x: torch.Tensor, domain) -> _domain.Domain:
    if domain is not None:
        return _domain.check_domain(domain, x.shape[0], layer.num_domains, x.device)
    # Set (and already checked) by MultiDomainModel.forward.
    domain = _domain.current_domain()
    if domain is not None:
        return domain
    if layer.num_domains == 1:
        return 0
    raise ValueError(f"{type(layer).__name__} has {layer.num_domains} domains: call it as "
                     "layer(x, domain) or inside a fastmdl.MultiDomainModel")


def _forgive_missing(missing_keys: List[str], prefix: str, names: Sequence[str]) -> None:
    # A plain torch.nn state_dict has no mask scores: keep ours instead of failing.
    for name in names:
        if prefix + name in missing_keys:
            missing_keys.remove(prefix + name)


class Conv2d(nn.Conv2d):
    r"""``torch.nn.Conv2d`` with per-domain filter masks.

    .. math:: y_{n,c} = [s_{d_n,c} > 0]\,\big(W_c \star x_n + b_c\big)

    where ``scores`` s has shape (D, C_out) and d_n is sample n's domain. The mask
    is binary in the forward pass with a straight-through gradient. ``weight`` and
    ``bias`` are those of ``nn.Conv2d`` (an ``nn.Conv2d`` state_dict loads as is).
    Inside a converted model, filters tied to others share one ``scores``
    Parameter, and ``prunable`` is False where fastmdl must keep every filter. A
    depthwise convolution (groups = C_in = C_out) shares its input's group's
    scores: its filter c is masked exactly where input channel c is; so does a
    grouped one with C_in = C_out, whose channels then go in blocks of
    ``mask_block`` = C/groups (one decision per block: a group is kept or removed).
    A depthwise convolution over parts of several groups (after a channel shuffle)
    masks its output with its input's masks, ``out_segments``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, *, num_domains: int = 1, score_init: float = 1.0):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        self.num_domains = _check_num_domains(num_domains)
        self.scores = nn.Parameter(torch.full((num_domains, out_channels), float(score_init),
                                              device=self.weight.device))
        self.prunable = True
        # Filters kept or removed together, in blocks (a grouped conv's groups).
        self.mask_block = 1
        # Set by convert for a depthwise convolution over parts of several groups
        # (a shuffled tensor): its output is masked like its input, run by run,
        # instead of by its own scores.
        self.out_segments: Optional[List[Segment]] = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, num_domains: int, score_init: float = 1.0) -> "Conv2d":
        """A copy of ``conv`` (same weight, bias and hyper-parameters) with every
        filter kept for each of ``num_domains`` domains."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                  conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                  conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
                  num_domains=num_domains, score_init=score_init)
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        new.weight.requires_grad_(conv.weight.requires_grad)
        return new

    def masks(self) -> torch.Tensor:
        """(D, C_out) binary filter masks (straight-through), decided per block of
        ``mask_block`` filters (see :func:`fastmdl.masks.hard_mask`)."""
        return binarize(self.scores, self.mask_block)

    def forward(self, x: torch.Tensor, domain: Optional[_domain.Domain] = None) -> torch.Tensor:
        domain = _resolve_domain(self, x, domain)
        y = self._conv_forward(x, self.weight, self.bias)
        if self.out_segments is not None:
            return apply_mask(y, segment_masks(self.out_segments, self.num_domains,
                                               device=x.device), domain)
        return apply_mask(y, self.masks(), domain) if self.prunable else y

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        _forgive_missing(missing_keys, prefix, ["scores"])

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_domains={self.num_domains}"


class BatchNorm2d(nn.Module):
    r"""Batch normalisation with per-domain statistics and affine parameters.

    .. math:: y_{n,c} = \frac{x_{n,c} - \mu_{d_n,c}}{\sqrt{\sigma^2_{d_n,c} + \epsilon}}
              \gamma_{d_n,c} + \beta_{d_n,c}

    In training, each domain's samples in a (mixed) batch are normalised with that
    domain's own batch statistics, which update that domain's running statistics;
    in evaluation the domain's running statistics are used (a channel the domain's
    mask switches off keeps its statistics from before). ``weight``, ``bias``,
    ``running_mean`` and ``running_var`` have shape (D, C); a 1-D ``nn.BatchNorm2d``
    state_dict loads into every domain. Inside a converted model the output is
    multiplied by the masks of its channels, so a pruned channel is exactly 0.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, device=None, dtype=None, *, num_domains: int = 1):
        super().__init__()
        self.num_features = num_features
        self.num_domains = _check_num_domains(num_domains)
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        shape = (num_domains, num_features)
        kw = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(shape, **kw))
            self.bias = nn.Parameter(torch.zeros(shape, **kw))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(shape, **kw))
        self.register_buffer("running_var", torch.ones(shape, **kw))
        self.register_buffer("num_batches_tracked",
                             torch.zeros(num_domains, dtype=torch.long, device=device))
        self.mask_segments: Optional[List[Segment]] = None

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, num_domains: int) -> "BatchNorm2d":
        """Every domain starts from ``bn``'s statistics and affine parameters."""
        if not bn.track_running_stats:
            raise ValueError("BatchNorm2d without running statistics cannot be made "
                             "per-domain: set track_running_stats=True")
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.running_mean.device,
                  bn.running_mean.dtype, num_domains=num_domains)
        new.load_state_dict(bn.state_dict())
        return new

    def scale_shift(self):
        """Per-domain (D, C) scale and shift of evaluation mode: y = x * scale + shift."""
        inv = torch.rsqrt(self.running_var + self.eps)
        scale = inv * self.weight if self.affine else inv
        shift = -self.running_mean * scale
        if self.affine:
            shift = shift + self.bias
        return scale, shift

    def forward(self, x: torch.Tensor, domain: Optional[_domain.Domain] = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm2d expects (N, {self.num_features}, H, W), "
                             f"got shape {tuple(x.shape)}")
        domain = _resolve_domain(self, x, domain)
        if self.training:
            y = self._train_forward(x, domain)
        else:
            scale, shift = self.scale_shift()
            shape = (1, -1, 1, 1) if isinstance(domain, int) else (x.shape[0], -1, 1, 1)
            y = x * scale[domain].reshape(shape) + shift[domain].reshape(shape)
        if self.mask_segments is not None:
            masks = segment_masks(self.mask_segments, self.num_domains, device=x.device)
            y = apply_mask(y, masks, domain)
        return y

    def _one_domain(self, x: torch.Tensor, d: int) -> torch.Tensor:
        momentum = self.momentum
        with torch.no_grad():
            self.num_batches_tracked[d] += 1
        if momentum is None:
            momentum = 1.0 / float(self.num_batches_tracked[d])
        # Fresh copies take the update (the op keeps them for its backward pass);
        # a channel the domain has switched off carries zeros, and its statistics
        # would decay to 0 and blow the channel up in evaluation the moment the
        # mask turns it back on, so it keeps its last real statistics.
        mean, var = self.running_mean[d].clone(), self.running_var[d].clone()
        y = F.batch_norm(x, mean, var, self.weight[d] if self.affine else None,
                         self.bias[d] if self.affine else None, True, momentum, self.eps)
        with torch.no_grad():
            if self.mask_segments is not None:
                keep = segment_masks(self.mask_segments, self.num_domains, hard=True,
                                     device=x.device)[d] > 0
                mean = torch.where(keep, mean, self.running_mean[d])
                var = torch.where(keep, var, self.running_var[d])
            self.running_mean[d] = mean
            self.running_var[d] = var
        return y

    def _synced_train_forward(self, x: torch.Tensor, domain) -> torch.Tensor:
        # Data-parallel training: statistics over every rank's samples of the
        # domain, so N ranks normalise exactly as one process on the global batch.
        mean, var, count = _dist.synced_batch_stats(x, domain, self.num_domains)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight
        shift = -mean * scale
        if self.affine:
            shift = shift + self.bias
        if isinstance(domain, int):
            y = x * scale[domain][None, :, None, None] + shift[domain][None, :, None, None]
        else:
            y = x * scale[domain][:, :, None, None] + shift[domain][:, :, None, None]
        with torch.no_grad():
            keep = None
            if self.mask_segments is not None:
                keep = segment_masks(self.mask_segments, self.num_domains, hard=True,
                                     device=x.device) > 0
            for d, n in enumerate(count.tolist()):
                if n == 0:
                    continue
                self.num_batches_tracked[d] += 1
                m = self.momentum if self.momentum is not None else \
                    1.0 / float(self.num_batches_tracked[d])
                unbiased = var[d].detach() * (n / max(n - 1, 1))
                new_mean = (1 - m) * self.running_mean[d] + m * mean[d].detach()
                new_var = (1 - m) * self.running_var[d] + m * unbiased
                if keep is not None:  # a switched-off channel keeps its statistics
                    new_mean = torch.where(keep[d], new_mean, self.running_mean[d])
                    new_var = torch.where(keep[d], new_var, self.running_var[d])
                self.running_mean[d] = new_mean
                self.running_var[d] = new_var
        return y

    def _train_forward(self, x: torch.Tensor, domain) -> torch.Tensor:
        if _dist.sync_group():
            return self._synced_train_forward(x, domain)
        if isinstance(domain, int):
            return self._one_domain(x, domain)
        parts = []
        for d in torch.unique(domain).tolist():
            rows = (domain == d).nonzero().squeeze(1)
            parts.append((rows, self._one_domain(x.index_select(0, rows), d)))
        if len(parts) == 1:
            return parts[0][1]
        y = x.new_empty(x.shape)
        for rows, yd in parts:
            y = y.index_copy(0, rows, yd)
        return y

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # An nn.BatchNorm2d state_dict has 1-D entries: give them to every domain.
        for name in ("weight", "bias", "running_mean", "running_var"):
            v = state_dict.get(prefix + name)
            if v is not None and v.dim() == 1 and v.shape[0] == self.num_features:
                state_dict[prefix + name] = v.unsqueeze(0).expand(self.num_domains, -1).clone()
        v = state_dict.get(prefix + "num_batches_tracked")
        if v is not None and v.dim() == 0:
            state_dict[prefix + "num_batches_tracked"] = v.expand(self.num_domains).clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, num_domains={self.num_domains}")


class PerDomainHeads(nn.Module):
    """What every per-domain classifier holds: domain d's weight (num_classes[d],
    in, ...) in ``weights[d]`` and its bias in ``biases[d]`` (``biases`` None
    without bias), and the ``columns`` table of :func:`gather_logits`."""

    def __init__(self, num_classes: Sequence[int], weight_shape: tuple, bias: bool,
                 device=None, dtype=None):
        super().__init__()
        num_classes = _check_classes(num_classes)
        self.num_classes = list(num_classes)
        self.num_domains = len(num_classes)
        kw = {"device": device, "dtype": dtype}
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty((k,) + tuple(weight_shape), **kw)) for k in num_classes])
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.zeros(k, **kw)) for k in num_classes]) if bias else None
        for w in self.weights:
            nn.init.kaiming_uniform_(w, a=5 ** 0.5)
        self.register_buffer("columns", _column_table(num_classes, device), persistent=False)

    @torch.no_grad()
    def start_from(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        """Every domain with as many classes as ``weight`` has rows takes ``weight``
        and ``bias`` (a single-domain classifier's); the others keep theirs."""
        for d, k in enumerate(self.num_classes):
            if k == weight.shape[0]:
                self.weights[d].copy_(weight)
                if bias is not None:
                    self.biases[d].copy_(bias)

    def stacked(self):
        """(weight, bias): every domain's, domain d's rows after domain d-1's."""
        bias = torch.cat(list(self.biases)) if self.biases is not None else None
        return torch.cat(list(self.weights)), bias


class DomainHeads(PerDomainHeads):
    r"""One linear classifier per domain, with its own number of classes.

    For sample n of domain d: :math:`y_{n,k} = W^{(d)}_k x_n + b^{(d)}_k` for
    k < num_classes[d] and :math:`-\infty` for the rest, so a mixed batch gives
    one (N, max(num_classes)) tensor that ``F.cross_entropy`` takes as is.
    """

    def __init__(self, in_features: int, num_classes: Sequence[int], bias: bool = True,
                 device=None, dtype=None):
        super().__init__(num_classes, (in_features,), bias, device, dtype)
        self.in_features = in_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, num_classes: Sequence[int]) -> "DomainHeads":
        """Heads on ``linear``'s inputs. A domain with as many classes as ``linear``
        starts from its weights; the others start from a fresh initialisation."""
        new = cls(linear.in_features, num_classes, linear.bias is not None,
                  linear.weight.device, linear.weight.dtype)
        new.start_from(linear.weight, linear.bias)
        return new

    def forward(self, x: torch.Tensor, domain: Optional[_domain.Domain] = None) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"DomainHeads expects (N, {self.in_features}), got shape "
                             f"{tuple(x.shape)}")
        domain = _resolve_domain(self, x, domain)
        return gather_logits(F.linear(x, *self.stacked()), self.columns, domain)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}"


def gather_logits(z: torch.Tensor, columns: torch.Tensor, domain,
                  fill: float = float("-inf")) -> torch.Tensor:
    """Pick each sample's domain's logits out of the concatenated logits ``z`` of
    every head, (N, sum(num_classes), ...) with any trailing (spatial) dims;
    ``columns[d, k]`` is the column of domain d's class k, or z's width (a column
    of ``fill``) past its classes."""
    z = torch.cat([z, z.new_full((z.shape[0], 1) + tuple(z.shape[2:]), fill)], dim=1)
    if isinstance(domain, int):
        return z.index_select(1, columns[domain])
    index = columns[domain]
    if z.dim() > 2:
        index = index.view(index.shape + (1,) * (z.dim() - 2)).expand(
            (-1, -1) + tuple(z.shape[2:]))
    return z.gather(1, index)


def _check_classes(num_classes) -> List[int]:
    if isinstance(num_classes, (str, bytes)) or not hasattr(num_classes, "__len__"):
        raise TypeError(f"num_classes must be a list of ints, one per domain, got "
                        f"{type(num_classes).__name__}")
    if len(num_classes) == 0 or not all(isinstance(k, int) and not isinstance(k, bool) and k > 0
                                        for k in num_classes):
        raise ValueError(f"num_classes must list a positive int per domain, got {num_classes!r}")
    return list(num_classes)


def _column_table(num_classes: Sequence[int], device=None) -> torch.Tensor:
    total, width = sum(num_classes), max(num_classes)
    table = torch.full((len(num_classes), width), total, dtype=torch.int64, device=device)
    start = 0
    for d, k in enumerate(num_classes):
        table[d, :k] = torch.arange(start, start + k)
        start += k
    return table
