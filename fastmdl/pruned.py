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
from .conv_heads import ClassPadding, PrunedConvHeads
from .layers import _column_table, gather_logits


def _csr(masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    index, offsets = ops.index_lists(masks)
    return index.to(torch.int64), offsets


BatchNormStats = Tuple[torch.Tensor, torch.Tensor, float]  # (mean (D, C), var (D, C), eps)


class _UnfoldedBatchNorm:
    r"""The BatchNorm folded into a layer, unfolded again so it can use batch
    statistics: with :math:`\mu_0, \sigma_0^2` the statistics the folded scale s and
    shift t were computed with (held fixed, so that

    .. math:: \gamma = s \sqrt{\sigma_0^2 + \epsilon},\qquad \beta = t + \mu_0 s

    is a fixed linear reparametrisation and gradients reach s and t), each forward
    with batch statistics normalises every domain's rows with their own,

    .. math:: y = \gamma_d (z - \bar z_d) / \sqrt{\mathrm{var}(z)_d + \epsilon} + \beta_d,

    and moves the running statistics r towards them, :math:`r \leftarrow (1 - m) r + m\,
    \mathrm{stat}` (unbiased variance; with ``momentum=None``, m = 1/k at a domain's
    k-th batch: the plain average, as :func:`fastmdl.recalibrate_bn` keeps). A forward
    without batch statistics uses the running ones. Channels a domain does not
    use are 0 in its rows. :meth:`result` folds γ, β and the running statistics
    back into (s, t)."""

    def __init__(self, layer: "_FoldedBatchNorm", masks: torch.Tensor,
                 momentum: Optional[float], always_batch: bool):
        mean, var, self.eps = layer.stats()
        self.layer, self.momentum, self.always_batch = layer, momentum, always_batch
        self.ref_mean, self.ref_var = mean, var
        self.keep = masks.to(mean.device) > 0
        # At least float32 (half statistics drift), float64 kept for float64 models.
        self.acc = torch.promote_types(layer.scale.dtype, torch.float32)
        self.run_mean = mean.detach().to(self.acc).clone()
        self.run_var = var.detach().to(self.acc).clone()
        self.count = torch.zeros(mean.shape[0], dtype=torch.float32, device=mean.device)

    def affine(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(γ, β), (D, C), as functions of the layer's live scale and shift."""
        s = self.layer.scale.to(self.acc)
        gamma = s * torch.sqrt(self.ref_var.to(self.acc) + self.eps)
        return gamma, self.layer.shift.to(self.acc) + self.ref_mean.to(self.acc) * s

    def __call__(self, z: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.affine()
        mask = self.keep.to(device=z.device, dtype=z.dtype)[domain][:, :, None, None]
        if not (self.always_batch or self.layer.training):
            scale = gamma * torch.rsqrt(self.run_var + self.eps)
            shift = beta - self.run_mean * scale
            return (z.to(self.acc) * scale[domain][:, :, None, None]
                    + shift[domain][:, :, None, None]).to(z.dtype) * mask
        out = torch.zeros_like(z)
        for d in domain.unique().tolist():
            rows = (domain == d).nonzero().squeeze(1)
            zd = z.index_select(0, rows).to(self.acc)
            n = zd.numel() // zd.shape[1]
            if n < 2:
                raise ValueError("BatchNorm with batch statistics needs more than 1 value per "
                                 f"channel of each domain in a batch, got {n} for domain {d}: "
                                 "use larger batches")
            var, mean = torch.var_mean(zd, dim=(0, 2, 3), unbiased=False)
            scale = gamma[d] * torch.rsqrt(var + self.eps)
            y = (zd - mean[:, None, None]) * scale[:, None, None] + beta[d][:, None, None]
            out = out.index_copy(0, rows, y.to(z.dtype))
            self._track(d, mean.detach(), var.detach() * (n / (n - 1)))
        return out * mask

    @torch.no_grad()
    def _track(self, d: int, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.count[d] += 1
        m = 1.0 / float(self.count[d]) if self.momentum is None else self.momentum
        keep = self.keep[d]  # a channel the domain does not use has no statistics
        self.run_mean[d] = torch.where(keep, (1 - m) * self.run_mean[d] + m * mean,
                                       self.run_mean[d])
        self.run_var[d] = torch.where(keep, (1 - m) * self.run_var[d] + m * var, self.run_var[d])

    @torch.no_grad()
    def result(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scale, shift, mean, var) folded from γ, β and the running statistics; a
        domain that saw no batch, and a channel a domain does not use, keep their
        scale, shift and statistics bit for bit."""
        scale, shift = self.layer.scale.detach(), self.layer.shift.detach()
        keep = self.keep & (self.count > 0)[:, None]
        gamma, beta = self.affine()
        new_scale = gamma * torch.rsqrt(self.run_var + self.eps)
        new_shift = beta - self.run_mean * new_scale
        keep_p = keep.to(scale.device)
        return (torch.where(keep_p, new_scale.to(scale.dtype), scale),
                torch.where(keep_p, new_shift.to(shift.dtype), shift),
                torch.where(keep, self.run_mean.to(self.ref_mean.dtype), self.ref_mean),
                torch.where(keep, self.run_var.to(self.ref_var.dtype), self.ref_var))


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
        self._unfolded: Optional[_UnfoldedBatchNorm] = None

    @property
    def has_stats(self) -> bool:
        return self.bn_mean is not None

    def stats(self) -> Optional[BatchNormStats]:
        return (self.bn_mean, self.bn_var, self.bn_eps) if self.has_stats else None

    def _unfold(self, masks: torch.Tensor, momentum: Optional[float], always_batch: bool) -> None:
        self._unfolded = _UnfoldedBatchNorm(self, masks, momentum, always_batch)

    def _refold(self, commit: bool) -> None:
        unfolded, self._unfolded = self._unfolded, None
        if commit and unfolded is not None:
            scale, shift, mean, var = unfolded.result()
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
    residual and act an optional ReLU. Grouped convolutions run through
    ``F.conv2d`` with the same epilogue: a depthwise one, or a grouped one with
    C_in = C_out, holds the filters of its kept channels' groups (groups = their
    number; ``out_masks`` equal ``in_masks``, as group j reads group j alone), any
    other grouped one every channel.

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
        return (_shapes.domain_masks(self.in_index, self.in_offsets,
                                     self.weight.shape[1] * self.groups, torch.float32),
                _shapes.domain_masks(self.out_index, self.out_offsets, self.weight.shape[0],
                                     torch.float32))

    def forward(self, x: torch.Tensor, domain: torch.Tensor,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        padding = self.padding
        if self.padding_mode != "zeros":
            ph, pw = padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
            padding = [0, 0]
        if self._unfolded is not None:
            z = self._conv(x, domain, padding, None, None, None, False)
            z = self._unfolded(z, domain)
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
        return (f"{c_in * self.groups}, {c_out}, kernel_size=({kh}, {kw}), "
                f"stride={tuple(self.stride)}, padding={tuple(self.padding)}, "
                f"dilation={tuple(self.dilation)}, groups={self.groups}, "
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
        if self._unfolded is not None:
            return self._unfolded(x, domain)
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


# The layers of a pruned network that take the batch's domain ids as a second input.
DOMAIN_LAYERS = (PrunedConv2d, PrunedBatchNorm2d, PrunedHeads, PrunedConvHeads, ClassPadding)
LAYOUTS = ("auto", "compact", "union")
STORAGES = ("auto", "ragged", "padded")


def _sources(net: fx.GraphModule) -> tuple:
    """What a compact plan is built from: the graph's code, every (parent, name, child)
    module link, and every (module, name, tensor, version, data pointer) of a
    parameter or buffer. Holding the objects keeps their ids from being reused."""
    links, tensors = [], []
    for module in net.modules():
        links += [(module, name, child) for name, child in module._modules.items()]
        for table in (module._parameters, module._buffers):
            tensors += [(table, name, t, t._version, t.data_ptr())
                        for name, t in table.items() if t is not None]
    return net.code, net, tuple(links), tuple(tensors)


def _unchanged(net: fx.GraphModule, sources: tuple) -> bool:
    """Whether nothing in ``sources`` changed: a module swapped, a tensor replaced,
    written in place (its version counter) or moved (its data pointer)."""
    code, old_net, links, tensors = sources
    if net is not old_net or net.code is not code:
        return False
    for parent, name, child in links:
        if parent._modules.get(name) is not child:
            return False
    for table, name, t, version, ptr in tensors:
        if table.get(name) is not t or t._version != version or t.data_ptr() != ptr:
            return False
    return True


class _PlanCache:
    """A PrunedModel's compact network and the tensors it was packed from. A copy
    of the model (``copy.deepcopy``, pickling) starts empty and packs its own."""

    def __init__(self):
        self.plan = None
        self.error: Optional[str] = None
        self.sources: Optional[tuple] = None
        self.unfolded = False  # inside batchnorm_training() or calibrating()

    def __deepcopy__(self, memo):
        return _PlanCache()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


class PrunedModel(nn.Module):
    """The pruned multi-domain network: ``forward(x, domain)`` with ``domain`` an
    int or an int64 tensor of shape (N,), returning (N, max(num_classes)) logits
    (-inf past each domain's classes).

    Two layouts compute the same function (to float rounding):

    - **compact** (inference: eval mode, and no gradient asked for): the batch is
      grouped by domain once, each domain's samples carry only its own channels
      from layer to layer, and every convolution runs on weights packed per
      domain with its BatchNorm folded in (``fastmdl/compact``);
    - **union**: the torch.fx graph ``net``, whose layers take every channel of
      the union and the per-sample domain tensor through ``fastmdl::domain_conv2d``.
      Training, :meth:`batchnorm_training`, :meth:`calibrating` and gradients
      run here.

    ``layout`` = "auto" (the default) picks compact wherever it applies, "union"
    always runs the union graph, "compact" insists on the compact network (an
    error where it cannot run). ``baseline`` holds the single-domain network's
    cost per domain, for :func:`fastmdl.cost_report`.
    """

    def __init__(self, net: fx.GraphModule, num_domains: int, num_classes: Sequence[int],
                 input_size: Sequence[int], baseline: Dict[str, List[float]],
                 input_size_source: str = "given"):
        super().__init__()
        self.net = net
        self.num_domains = num_domains
        self.num_classes = list(num_classes)
        self.input_size = tuple(input_size)
        # Where input_size comes from: "given", "trained" or "assumed" (see convert).
        self.input_size_source = input_size_source
        self.baseline = {k: [float(v) for v in vs] for k, vs in baseline.items()}
        self._layout = "auto"
        self._storage = "auto"
        self._plan_cache = _PlanCache()

    @property
    def layout(self) -> str:
        """Which layout ``forward`` runs: "auto", "compact" or "union" (see the class)."""
        return self._layout

    @layout.setter
    def layout(self, value: str) -> None:
        if not isinstance(value, str) or value not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {value!r}")
        self._layout = value

    @property
    def storage(self) -> str:
        """How the compact layout stores a batch: "ragged" (one tensor per domain with
        its own rows and channels; per-domain calls, what runs fastest on a CPU),
        "padded" (one tensor per value, every segment padded to the widest domain;
        static shapes, one kernel launch per convolution: what runs on CUDA and
        under torch.compile), or "auto" (padded on CUDA and when compiling, ragged
        otherwise)."""
        return self._storage

    @storage.setter
    def storage(self, value: str) -> None:
        if not isinstance(value, str) or value not in STORAGES:
            raise ValueError(f"storage must be one of {STORAGES}, got {value!r}")
        self._storage = value

    def compact_plan(self):
        """The compact network for the current weights (a
        :class:`fastmdl.compact.CompactPlan`), packed on first use and again after
        any parameter or buffer of ``net`` changed (an optimizer step, a
        ``load_state_dict``, ``.to()``); None if the network cannot run compact,
        with the reason in :attr:`compact_error`."""
        from .compact import Unsupported, build

        cache = self._plan_cache
        if cache.sources is not None and _unchanged(self.net, cache.sources):
            return cache.plan
        try:
            with torch.no_grad():
                cache.plan, cache.error = build(self), None
        except Unsupported as e:
            cache.plan, cache.error = None, str(e)
        cache.sources = _sources(self.net)
        return cache.plan

    @property
    def compact_error(self) -> Optional[str]:
        """Why the network cannot run in the compact layout (None when it can, or
        before :meth:`compact_plan` first ran)."""
        return self._plan_cache.error

    def _compact_reason(self, x: torch.Tensor) -> Optional[str]:
        """None when this forward can run compact, else why not."""
        if self.training:
            return "the model is in training mode"
        if self._plan_cache.unfolded:
            return "inside batchnorm_training() or calibrating()"
        if torch.is_grad_enabled() and (x.requires_grad or
                                        any(p.requires_grad for p in self.parameters())):
            return "gradients are enabled (the compact network is for inference)"
        if self._storage == "ragged" and (torch.compiler.is_compiling() or
                                          not _domain.can_read_values()):
            return "the ragged storage reads each domain's sample count on the host"
        return None

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
            raise ValueError(
                "x must be a 4-D (N, C, H, W) tensor, got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.shape[1] != self.input_size[0]:
            raise ValueError(f"x must have {self.input_size[0]} channels, "
                             f"got shape {tuple(x.shape)}")
        dtype = next(self.parameters()).dtype
        if x.dtype != dtype:
            raise TypeError(f"x must have the model's dtype {dtype}, got {x.dtype}")
        domain = _domain.check_domain(domain, x.shape[0], self.num_domains, x.device,
                                      read_values=False)
        # The ids' values: checked once, where each path reads them cheapest.
        read = isinstance(domain, torch.Tensor) and x.shape[0] > 0 and _domain.can_read_values()
        if isinstance(domain, torch.Tensor) and torch.compiler.is_compiling():
            # Tracing cannot read them: the compiled graph checks them when it runs.
            domain = _domain.checked_domain(domain, self.num_domains)
        if self._layout != "union":
            why = self._compact_reason(x)
            plan = None
            if why is None:
                # Under torch.compile the weights packed before tracing are used as they are.
                compiling = torch.compiler.is_compiling()
                plan = self._plan_cache.plan if compiling else self.compact_plan()
            if plan is not None:
                padded = self._storage == "padded" or (self._storage == "auto" and (
                    compiling or x.device.type != "cpu" or not _domain.can_read_values()))
                if not padded:
                    return plan(x, domain)  # its grouping of the batch checks the ids
                if read:
                    _domain.check_values(domain, self.num_domains)
                return plan.padded(x, domain)
            if self._layout == "compact":
                raise RuntimeError(f"layout='compact' cannot run here: "
                                   f"{why or self.compact_error}")
        if read:
            _domain.check_values(domain, self.num_domains)
        domain = _domain.as_tensor(domain, x.shape[0], x.device)
        if torch.compiler.is_compiling():
            return self.net(x, domain)
        # Every layer gets this same domain tensor: let the Triton kernels group
        # the batch once for all of them (a no-op for the other backends).
        with shared_batch_plan():
            return self.net(x, domain)

    @property
    def has_bn_stats(self) -> bool:
        """Whether some folded BatchNorm kept its statistics, so that
        :meth:`calibrating` and :meth:`batchnorm_training` can work."""
        return bool(self._stat_layers())

    def _stat_layers(self) -> List[_FoldedBatchNorm]:
        return [m for m in self.net.modules() if isinstance(m, _FoldedBatchNorm) and m.has_stats]

    @contextlib.contextmanager
    def calibrating(self) -> Iterator[None]:
        """Within the block (run under ``torch.no_grad``), every layer with a folded
        BatchNorm normalises each domain's rows with their batch statistics and
        averages them; on leaving it normally, each layer's statistics, scale and
        shift are the recomputed ones (a domain that ran no batch keeps its own).
        :func:`fastmdl.recalibrate_bn` is the usual way in. Raises ``TypeError`` if
        no layer kept its statistics."""
        with self._unfolded_batchnorm(None, always_batch=True), torch.no_grad():
            yield

    @contextlib.contextmanager
    def batchnorm_training(self, momentum: Optional[float] = 0.1) -> Iterator[None]:
        r"""Fine-tune a pruned network as its unpruned form trained: within the block,
        every folded BatchNorm is a BatchNorm again. A layer in training mode
        normalises each domain's rows with their batch statistics, with gradients
        through them and through its scale s and shift t (γ = s·sqrt(σ²+ε) and
        β = t + μs, with the statistics held at entry), and moves its running
        statistics by ``momentum`` (None: their plain average, as
        :func:`fastmdl.recalibrate_bn`); in eval mode it uses the running ones.
        On leaving the block normally, γ, β and the running statistics are folded
        back into scale and shift (an exception leaves the statistics as they were
        at entry, which the trained s and t still match). Parameters stay the
        same tensors, so an optimizer made before the block keeps working; each
        exit rebases s and t, so wrap a whole fine-tune in one block.

        A mixed batch then takes one pass through the op per convolution (without
        its fused epilogue) plus the normalisation, per domain, in PyTorch. Raises
        ``TypeError`` if no layer kept its statistics, ``ValueError`` for a
        momentum outside (0, 1]."""
        if momentum is not None:
            if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
                raise TypeError(f"momentum must be a float in (0, 1] or None, got "
                                f"{type(momentum).__name__}")
            if not 0 < momentum <= 1:
                raise ValueError(f"momentum must be in (0, 1] or None, got {momentum}")
            momentum = float(momentum)
        with self._unfolded_batchnorm(momentum, always_batch=False):
            yield

    @contextlib.contextmanager
    def _unfolded_batchnorm(self, momentum: Optional[float], always_batch: bool) -> Iterator[None]:
        layers = self._stat_layers()
        if not layers:
            raise TypeError("this PrunedModel kept no BatchNorm statistics (it was saved by a "
                            "fastmdl without them, or its network has no BatchNorm): "
                            "recalibrate or fine-tune the MultiDomainModel before fastmdl.prune")
        if any(m._unfolded is not None for m in layers):
            raise RuntimeError("this PrunedModel is already inside calibrating() or "
                               "batchnorm_training(); they do not nest")
        for m in layers:
            masks = m.masks()[1] if isinstance(m, PrunedConv2d) else m.masks
            m._unfold(masks, momentum, always_batch)
        ok = False
        self._plan_cache.unfolded = True
        try:
            yield
            ok = True
        finally:
            self._plan_cache.unfolded = False
            for m in layers:
                m._refold(commit=ok)

    def extra_repr(self) -> str:
        return f"num_domains={self.num_domains}, num_classes={self.num_classes}"
