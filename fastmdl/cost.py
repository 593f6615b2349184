"""What a multi-domain network costs, per domain and for the union of domains.

Counts (FLOPs are multiply-accumulates, as in the pruning papers):

| layer            | params                           | FLOPs                            |
|------------------|----------------------------------|----------------------------------|
| conv (k = kh*kw) | k*c_in*c_out + c_out bias        | k*c_in*c_out*H_out*W_out         |
| grouped conv     | k*g_in*c_out + c_out bias        | k*g_in*c_out*H_out*W_out         |
| BatchNorm        | 2*c (per domain)                 | 0 (folded into the conv)         |
| linear           | f_in*f_out + f_out (bias)        | f_in*f_out                       |
| head of domain d | f_in*classes_d + classes_d       | f_in*classes_d                   |
| conv head of d   | k*c_in*classes_d + classes_d     | k*c_in*classes_d*H_out*W_out     |

where for domain d, c_in and c_out count the channels d's masks keep, and g_in
is the input channels each filter of a grouped convolution reads (1 for a
depthwise one, whose filters are kept or removed with their channels: its cost
scales with the kept channels, not their square; C/groups for a grouped one with
C_in = C_out, kept or removed a group at a time); for the
*union* (what the pruned network holds) a channel counts if any domain keeps it,
and each domain keeps its own BatchNorm and head; the *baseline* is the
single-domain network with every filter. Mask sums go through the
straight-through masks, so these costs are differentiable in the mask scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .masks import segment_masks

METRICS = ("params", "flops")


@dataclass
class CostLayer:
    """One layer's masks and sizes, all the cost model needs."""

    name: str
    kind: str  # "conv", "bn", "linear" or "head"
    in_masks: torch.Tensor  # (D, C_in) 0/1
    out_masks: Optional[torch.Tensor] = None  # (D, C_out) for convs
    repeat: int = 1  # features per input channel (a flattened H x W map)
    kernel: int = 1
    groups: int = 1
    # Input channels each filter reads when groups > 1 (its weight's dim 1); 0 for
    # an ordinary convolution, whose filters read every kept input channel.
    in_per_group: int = 0
    pixels: int = 1
    bias: bool = False
    out_features: int = 0
    num_classes: Sequence[int] = ()


@dataclass
class Costs:
    """Costs in one metric: ``per_domain`` (D,), ``union`` and ``intersection``
    (scalars: the network of channels any / every domain keeps), ``baseline`` (D,)."""

    per_domain: torch.Tensor
    union: torch.Tensor
    intersection: torch.Tensor
    baseline: torch.Tensor


def _reduce(m: torch.Tensor, view: str) -> torch.Tensor:
    if view == "domain":
        return m.sum(dim=1)
    if view == "union":
        return (1 - (1 - m).prod(dim=0)).sum().reshape(1)
    if view == "intersection":
        return m.prod(dim=0).sum().reshape(1)
    return torch.full((m.shape[0],), float(m.shape[1]), device=m.device)  # baseline


def _layer_cost(layer: CostLayer, view: str, metric: str) -> torch.Tensor:
    num_domains = layer.in_masks.shape[0]
    c_in = _reduce(layer.in_masks, view) * layer.repeat
    if layer.kind == "conv":
        c_out = _reduce(layer.out_masks, view)
        if layer.in_per_group:  # each kept filter reads its own group's channels
            weights = layer.kernel * layer.in_per_group * c_out
        else:
            weights = layer.kernel * c_in * c_out / layer.groups
        if metric == "flops":
            return weights * layer.pixels
        return weights + (c_out if layer.bias else 0)
    if layer.kind == "bn":
        return 2 * c_in * (num_domains if view in ("union", "intersection") else 1) * (
            metric == "params")
    if layer.kind == "linear":
        out = c_in * layer.out_features
        return out + layer.out_features * layer.bias if metric == "params" else out
    classes = torch.tensor([float(k) for k in layer.num_classes], device=c_in.device)
    if view in ("union", "intersection"):
        classes = classes.sum().reshape(1)
    out = layer.kernel * c_in * classes  # a linear head's kernel and pixels are 1
    return out + classes * layer.bias if metric == "params" else out * layer.pixels


def costs(layers: Sequence[CostLayer], metric: str) -> Costs:
    """Sum the cost of ``layers`` in ``metric`` ("params" or "flops") in every view."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    views = {}
    for view in ("domain", "union", "intersection", "baseline"):
        total = 0
        for layer in layers:
            total = total + _layer_cost(layer, view, metric)
        views[view] = total
    return Costs(views["domain"], views["union"][0], views["intersection"][0], views["baseline"])


def multidomain_layers(model, input_size: Optional[Tuple[int, int, int]] = None, *,
                       hard: bool = False) -> List[CostLayer]:
    """The cost layers of a :class:`MultiDomainModel`; masks are straight-through
    (differentiable) unless ``hard``."""
    from .convert import analyse_at

    g = analyse_at(model, tuple(input_size or model.input_size))
    d = model.num_domains
    device = next(model.parameters()).device
    out = []
    for info in g.layers.values():
        m = info.module
        in_masks = segment_masks(g.segments(info.in_axis), d, hard=hard, device=device)
        layer = CostLayer(info.name, info.kind, in_masks, repeat=info.in_axis.repeat)
        if info.kind == "conv":
            layer.out_masks = segment_masks(g.segments(info.out_axis), d, hard=hard,
                                            device=device)
            layer.kernel = math.prod(m.kernel_size)
            layer.groups, layer.bias = m.groups, m.bias is not None
            layer.in_per_group = m.weight.shape[1] if m.groups > 1 else 0
            layer.pixels = math.prod(info.out_hw)
        elif info.kind == "linear":
            layer.out_features, layer.bias = m.out_features, m.bias is not None
        elif info.kind == "head":
            describe_head(layer, m, math.prod(info.out_hw))
        out.append(layer)
    return out


def describe_head(layer: CostLayer, m: nn.Module, pixels: int) -> None:
    """Fill in ``layer`` for the head ``m`` (linear or convolutional, multi-domain or
    pruned) with ``pixels`` output pixels per class (1 for a linear head)."""
    weight = m.weights[0] if hasattr(m, "weights") else m.weight
    layer.num_classes = list(m.num_classes)
    layer.bias = (m.biases if hasattr(m, "biases") else m.bias) is not None
    layer.kernel, layer.pixels = math.prod(weight.shape[2:]), pixels


def pruned_layers(model) -> List[CostLayer]:
    """The cost layers of a :class:`PrunedModel`, sized at ``model.input_size``."""
    from .conv_heads import PrunedConvHeads
    from .pruned import PrunedBatchNorm2d, PrunedConv2d, PrunedHeads, PrunedLinear

    pixels: Dict[nn.Module, int] = {}
    hooks = [m.register_forward_hook(lambda mod, args, y: pixels.__setitem__(mod, y[0, 0].numel()))
             for m in model.net.modules() if isinstance(m, (PrunedConv2d, PrunedConvHeads))]
    p = next(model.parameters())
    layout, model.layout = model.layout, "union"  # the layers themselves run (and hook) there
    try:
        with torch.no_grad():
            model(torch.randn((1,) + model.input_size, device=p.device, dtype=p.dtype), 0)
    finally:
        model.layout = layout
        for h in hooks:
            h.remove()
    out = []
    for name, m in model.net.named_modules():
        if isinstance(m, PrunedConv2d):
            in_masks, out_masks = m.masks()
            out.append(CostLayer(name, "conv", in_masks, out_masks,
                                 kernel=m.weight.shape[2] * m.weight.shape[3], groups=m.groups,
                                 in_per_group=m.weight.shape[1] if m.groups > 1 else 0,
                                 pixels=pixels[m], bias=False))
        elif isinstance(m, PrunedBatchNorm2d):
            out.append(CostLayer(name, "bn", m.masks.float()))
        elif isinstance(m, PrunedLinear):
            out.append(CostLayer(name, "linear", m.in_masks.float(), out_features=m.out_features,
                                 bias=m.bias is not None))
        elif isinstance(m, (PrunedHeads, PrunedConvHeads)):
            layer = CostLayer(name, "head", m.in_masks.float())
            describe_head(layer, m, pixels.get(m, 1))
            out.append(layer)
    return out


def baseline_costs(model) -> Dict[str, List[float]]:
    """{"params": [...], "flops": [...]}: the single-domain network's cost for each
    domain (every filter, that domain's head) at ``model.input_size``."""
    layers = multidomain_layers(model, hard=True)
    return {metric: costs(layers, metric).baseline.tolist() for metric in METRICS}


@dataclass
class CostReport:
    """Params and FLOPs per domain, for the union, and for the baseline."""

    domains: List[Dict[str, float]] = field(default_factory=list)
    union: Dict[str, float] = field(default_factory=dict)
    baseline: Dict[str, float] = field(default_factory=dict)
    input_size: Tuple[int, ...] = ()
    # True when nobody gave the size and no training data showed it (convert's
    # (C, 224, 224) default): the figures may not describe the images served.
    input_size_assumed: bool = False
    #: A pruned model's compact layout: weight bytes packed per domain and the
    #: union's, the layers run as union islands, or why it cannot run compact.
    compact: Dict[str, object] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"domains": self.domains, "union": self.union, "baseline": self.baseline,
                "input_size": list(self.input_size),
                "input_size_assumed": self.input_size_assumed, "compact": self.compact}

    def __str__(self) -> str:
        head = ["", "params", "% of baseline", "FLOPs", "% of baseline"]
        rows = []
        for r in self.domains:
            rows.append([f"domain {r['domain']}", _si(r["params"]),
                         f"{100 * r['params'] / r['baseline_params']:.1f}",
                         _si(r["flops"]), f"{100 * r['flops'] / r['baseline_flops']:.1f}"])
        b = self.baseline
        rows.append(["union (one network)", _si(self.union["params"]),
                     f"{100 * self.union['params'] / b['params']:.1f}", _si(self.union["flops"]),
                     f"{100 * self.union['flops'] / b['flops']:.1f}"])
        rows.append(["baseline (one domain)", _si(b["params"]), "100.0", _si(b["flops"]), "100.0"])
        n = len(self.domains)
        rows.append([f"{n} x baseline", _si(n * b["params"]), f"{100.0 * n:.1f}",
                     _si(n * b["flops"]), f"{100.0 * n:.1f}"])
        widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
        lines = [" | ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                            for i, (c, w) in enumerate(zip(r, widths))) for r in [head] + rows]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        text = (f"cost at input size {tuple(self.input_size)} (FLOPs = multiply-adds per "
                f"sample; union FLOPs = a dense pass over the kept channels)\n" + "\n".join(lines))
        if self.input_size_assumed:
            text = (f"NOTE: input size {tuple(self.input_size)} is assumed: it was not given to "
                    "fastmdl.convert(input_size=...) and the model has not been trained on "
                    "images it could read it from.\n" + text)
        c = self.compact
        if c.get("error"):
            text += f"\ncompact layout: unavailable ({c['error']}); inference runs the union layout"
        elif c:
            mib = 2 ** 20
            islands = c["islands"]
            text += (f"\ncompact layout: weights packed per domain {c['packed_bytes'] / mib:.2f} "
                     f"MiB, {c['packed_bytes'] / max(1, c['union_bytes']):.2f}x the union's "
                     f"{c['union_bytes'] / mib:.2f} MiB; {len(islands)} op(s) on the union "
                     f"layout" + (": " + ", ".join(f"{n} ({why})" for n, why in islands)
                                  if islands else ""))
        return text


def _si(v: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return f"{v:.0f}"


def cost_report(model, input_size: Optional[Tuple[int, int, int]] = None) -> CostReport:
    """Params and FLOPs of ``model`` (a :class:`MultiDomainModel` or :class:`PrunedModel`)
    for each domain, for the union of domains and for the single-domain baseline
    (the mean over domains of the full network with that domain's head), at
    ``input_size`` (default: the model's). On a pruned model the union's params
    are the tensors it really holds."""
    from .convert import MultiDomainModel
    from .pruned import PrunedModel

    if isinstance(model, MultiDomainModel):
        with torch.no_grad():
            layers = multidomain_layers(model, input_size, hard=True)
        size = tuple(input_size or model.input_size)
        params, flops = costs(layers, "params"), costs(layers, "flops")
        base_p, base_f = params.baseline.tolist(), flops.baseline.tolist()
        union_params = float(params.union)
    elif isinstance(model, PrunedModel):
        size = tuple(input_size or model.input_size)
        if size != model.input_size:
            raise ValueError(f"a pruned model's baseline is known at its input_size "
                             f"{model.input_size}, not {size}")
        with torch.no_grad():
            layers = pruned_layers(model)
        params, flops = costs(layers, "params"), costs(layers, "flops")
        base_p, base_f = model.baseline["params"], model.baseline["flops"]
        union_params = float(sum(p.numel() for p in model.parameters()))
    else:
        raise TypeError(f"model must be a fastmdl.MultiDomainModel or PrunedModel, got "
                        f"{type(model).__name__}")
    report = CostReport(input_size=size, input_size_assumed=input_size is None and getattr(
        model, "input_size_source", "given") == "assumed")
    for d in range(len(base_p)):
        report.domains.append({"domain": d, "params": float(params.per_domain[d]),
                               "flops": float(flops.per_domain[d]),
                               "baseline_params": base_p[d], "baseline_flops": base_f[d]})
    report.union = {"params": union_params, "flops": float(flops.union)}
    report.baseline = {"params": sum(base_p) / len(base_p), "flops": sum(base_f) / len(base_f)}
    if isinstance(model, PrunedModel):
        plan = model.compact_plan()
        if plan is None:
            report.compact = {"error": model.compact_error}
        else:
            report.compact = {"packed_bytes": plan.packed_bytes, "union_bytes": plan.union_bytes,
                              "islands": [list(i) for i in plan.islands]}
    return report
