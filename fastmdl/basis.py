r"""Basis scaling and double pruning (Wong et al., arXiv 2108.02893), multi-domain.

Each convolution's weight, reshaped to :math:`W \in \mathbb{R}^{C_{out} \times
C_{in} k_h k_w}`, is split by SVD, :math:`W = U S V^\top`, into

1. a *basis* convolution whose r filters are the orthonormal rows of
   :math:`V^\top` (same stride, padding and dilation as the original);
2. per-domain *scaling factors* :math:`s \in \mathbb{R}^{D \times r}`;
3. a 1x1 *mapping* convolution :math:`M = U S` back to the C_out channels, plus
   the original bias.

.. math:: y_n = M\,\big(s_{d_n} \odot (V^\top \star x_n)\big) + b

S is folded into the mapping and every factor starts at 1, so at full rank
(:math:`r = \min(C_{out}, C_{in} k_h k_w)`) the layer computes the original
convolution to float rounding, and every factor of every layer lives on the same
scale (one learning rate fits all). The first-order Taylor importance
:math:`|s \cdot \partial L / \partial s|` estimates the loss change of setting a
factor to 0, which does not depend on how S is split.

Transfer to new domains trains only the D x r factors (plus BatchNorm and the
heads); the basis and the mapping stay frozen. :func:`prune` then removes the
basis components that are unimportant for *every* domain; each domain keeps its
own subset of the rest, and the basis convolution of a mixed batch runs in one
call of ``fastmdl::domain_conv2d``, with each domain's components as its "output
filters" and the factors as the op's per-domain ``scale``.

**Double pruning** is filter pruning followed by basis pruning. Filter masks
(learned by :func:`fastmdl.train` or set by hand) stay on each decomposed
layer's output, and the SVD only spans the filters and input channels that some
domain keeps, so no rank is spent on pruned filters::

    model = fastmdl.convert(backbone, num_domains=2, num_classes=[10, 5], input_size=(3, 32, 32))
    fastmdl.train(model, train_loaders, budget=0.5)             # 1. filter masks (weights frozen)
    bm = fastmdl.basis.decompose(model)                         # 2. SVD of each kept sub-block
    ...train the factors, BatchNorm and heads of bm (those are the only trainable parameters)...
    imp = fastmdl.basis.taylor_importance(bm, train_loaders)
    small = fastmdl.basis.prune(bm, imp, ratio=0.7)             # 3. basis pruning
    print(fastmdl.basis.cost_report(small))

With PAGCP as the filter-pruning half, its result is a physically smaller
:class:`fastmdl.MultiDomainModel`, decomposed the same way::

    small, report = fastmdl.pagcp(model, tasks)                  # 1. PAGCP's channel cut
    bm = fastmdl.basis.decompose(small)                          # 2., 3. as above

A :class:`fastmdl.PrunedModel` is not decomposed (its BatchNorm is folded into
the convolutions): step 1's masks already remove, from the basis and from
:func:`cost_report`, what :func:`fastmdl.prune` would remove. Skip step 1 for
basis pruning alone. Grouped convolutions are left as they are.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import _domain
from .basis_conv import BasisConv2d
from .conv_heads import ClassPadding, ConvHeads
from .convert import MultiDomainModel, _replace
from .cost import CostLayer, CostReport, costs, multidomain_layers
from .layers import BatchNorm2d, Conv2d, DomainHeads, _check_num_domains
from .pruned import PrunedModel

__all__ = ["BasisConv2d", "BasisModel", "decompose", "taylor_importance", "prune",
           "factor_l1", "cost_report", "basis_layers"]

SCOPES = ("layer", "global")
WEIGHTS = ("components", "params")


class BasisModel(nn.Module):
    """What :func:`decompose` makes of a :class:`fastmdl.MultiDomainModel`: the same
    network with :class:`BasisConv2d` layers, ``forward(x, domain)`` as before.

    It is a type of its own, not a MultiDomainModel, because ``fastmdl.cost_report``,
    ``fastmdl.prune`` and ``fastmdl.train`` do not know basis layers: use
    :func:`cost_report` for its cost. ``cost_layers`` are the source model's layers
    with their channel masks as they were at decompose time, and ``baseline`` the
    original single-domain network's cost per domain. ``class_padding`` is the
    source model's (the -inf past each domain's classes of a convolutional head).
    """

    def __init__(self, module: nn.Module, num_domains: int, num_classes: Sequence[int],
                 input_size: Sequence[int], cost_layers: List[CostLayer],
                 class_padding: Optional[ClassPadding] = None):
        super().__init__()
        self.module = module
        self.class_padding = class_padding
        self.num_domains = num_domains
        self.num_classes = list(num_classes)
        self.input_size = tuple(input_size)
        self.cost_layers = cost_layers
        self.baseline = {metric: costs(cost_layers, metric).baseline.tolist()
                         for metric in ("params", "flops")}

    def forward(self, x: torch.Tensor, domain: _domain.Domain) -> torch.Tensor:
        out = _domain.run(self.module, x, domain, self.num_domains)
        if self.class_padding is not None:
            out = self.class_padding(out, domain)
        return out

    def extra_repr(self) -> str:
        return f"num_domains={self.num_domains}, num_classes={self.num_classes}"


def basis_layers(model: nn.Module) -> Dict[str, BasisConv2d]:
    """{name: layer} of every :class:`BasisConv2d` in ``model``; names are relative
    to the wrapped network for a :class:`BasisModel` (as in the original model)."""
    root = model.module if isinstance(model, BasisModel) else model
    return {n: m for n, m in root.named_modules() if isinstance(m, BasisConv2d)}


def decompose(model: nn.Module, num_domains: Optional[int] = None) -> nn.Module:
    """A copy of ``model`` with every ``nn.Conv2d`` / :class:`fastmdl.Conv2d` of
    groups=1 replaced by its full-rank :class:`BasisConv2d` (grouped convolutions
    are left as they are); ``model`` itself is untouched.

    ``model`` is a :class:`fastmdl.MultiDomainModel` (then ``num_domains`` is its own,
    filter masks stay on, and a :class:`BasisModel` comes back) or a plain network
    (``num_domains`` defaults to 1; with more, call it inside
    ``fastmdl._domain.domain_scope(d)``, or better convert it first).

    Only the factors, BatchNorm parameters and the heads (:class:`fastmdl.DomainHeads`,
    :class:`fastmdl.ConvHeads`) are trainable afterwards; everything else (bases,
    mappings, biases, mask scores, other layers such as a hidden ``nn.Linear``) gets
    ``requires_grad=False``.

    The filter masks are read once, here: the SVD spans the filters and input
    channels some domain keeps now, and :func:`cost_report` counts these masks.
    Each layer still multiplies its output by the (frozen) shared mask scores.
    """
    if isinstance(model, BasisModel):
        raise TypeError("model is already a BasisModel: decompose once, before basis.prune")
    if isinstance(model, PrunedModel):
        raise TypeError("model must be a plain network or a MultiDomainModel, got a PrunedModel "
                        "(its BatchNorm is folded into the convolutions, and only factors and "
                        "BatchNorm train here): for double pruning, decompose the MultiDomainModel "
                        "that fastmdl.prune was given (its filter masks stay on, and the basis "
                        "spans only the filters some domain keeps), or the MultiDomainModel "
                        "fastmdl.pagcp returns")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    is_mdm = isinstance(model, MultiDomainModel)
    if is_mdm:
        if num_domains is not None and num_domains != model.num_domains:
            raise ValueError(f"num_domains={num_domains} does not match the model's "
                             f"{model.num_domains} domains")
        num_domains = model.num_domains
    num_domains = _check_num_domains(1 if num_domains is None else num_domains)
    src = copy.deepcopy(model)
    inner = src.module if is_mdm else src
    convs = [(n, m) for n, m in inner.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"model ({type(model).__name__}) has no nn.Conv2d to decompose")
    if all(m.groups != 1 for _, m in convs):
        raise ValueError("every convolution of model is grouped; BasisConv2d needs groups=1")
    # Channel masks come from the source's graph, read before any layer is replaced.
    cost_layers = multidomain_layers(src, hard=True) if is_mdm else []
    in_masks = {c.name: c.in_masks for c in cost_layers if c.kind == "conv"}
    for name, m in convs:
        if isinstance(m, Conv2d) and m.num_domains != num_domains:
            raise ValueError(f"{name} has {m.num_domains} domains, not num_domains={num_domains}")
        if m.groups == 1:
            _replace(inner, name, BasisConv2d.from_conv(m, num_domains, in_masks.get(name)))
    trainable = set()
    for m in inner.modules():
        if isinstance(m, BasisConv2d):
            trainable.add(id(m.factors))
        elif isinstance(m, (BatchNorm2d, nn.BatchNorm2d, DomainHeads, ConvHeads)):
            trainable.update(id(p) for p in m.parameters())
    for p in inner.parameters():
        p.requires_grad_(id(p) in trainable)
    if not is_mdm:
        return inner
    return BasisModel(inner, num_domains, model.num_classes, model.input_size, cost_layers,
                      getattr(src, "class_padding", None))


def _call(model: nn.Module, x: torch.Tensor, d: int) -> torch.Tensor:
    if isinstance(model, BasisModel):
        return model(x, d)
    with _domain.domain_scope(d):
        return model(x)


def _layers_or_raise(model) -> Dict[str, BasisConv2d]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    layers = basis_layers(model)
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no BasisConv2d: call "
                         "fastmdl.basis.decompose first")
    return layers


def taylor_importance(model: nn.Module, loader_per_domain: Sequence, *,
                      loss_fn: Callable = F.cross_entropy,
                      max_batches: Optional[int] = None) -> Dict[str, torch.Tensor]:
    r"""First-order Taylor importance of every factor, per domain:

    .. math:: I_{d,k} = \frac{1}{B_d} \sum_{b=1}^{B_d} \Big| s_{d,k}
              \frac{\partial L_b}{\partial s_{d,k}} \Big|

    over the first ``max_batches`` (default all) batches ``(x, y)`` of
    ``loader_per_domain[d]``, with :math:`L_b` = ``loss_fn(model(x, d), y)``.
    :math:`I_{d,k}` estimates how much domain d's loss changes when component k's
    factor is set to 0. The model runs in eval mode (BatchNorm uses its running
    statistics), so the scores are a deterministic function of the data.

    Returns {layer name (as :func:`basis_layers`): (D, r) tensor}.
    """
    layers = _layers_or_raise(model)
    num_domains = next(iter(layers.values())).num_domains
    _domain.check_per_domain(loader_per_domain, "loader_per_domain", num_domains)
    if max_batches is not None and (isinstance(max_batches, bool) or
                                    not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be None or a positive int, got {max_batches!r}")
    names = list(layers)
    factors = [layers[n].factors for n in names]
    scores = {n: torch.zeros_like(f, dtype=torch.float64) for n, f in zip(names, factors)}
    device = factors[0].device
    flags, was_training = [f.requires_grad for f in factors], model.training
    model.eval()
    try:
        for f in factors:
            f.requires_grad_(True)
        for d, loader in enumerate(loader_per_domain):
            seen = 0
            for x, y in loader:
                if max_batches is not None and seen >= max_batches:
                    break
                with torch.enable_grad():
                    loss = loss_fn(_call(model, x.to(device), d), y.to(device))
                    grads = torch.autograd.grad(loss, factors, allow_unused=True)
                for n, f, g in zip(names, factors, grads):
                    if g is not None:
                        scores[n][d] += (f[d].detach() * g[d]).abs().double()
                seen += 1
            if seen == 0:
                raise ValueError(f"loader_per_domain[{d}] gave no batch")
            for n in names:
                scores[n][d] /= seen
    finally:
        for f, flag in zip(factors, flags):
            f.requires_grad_(flag)
        model.train(was_training)
    return {n: s.to(f.dtype) for (n, s), f in zip(scores.items(), factors)}


def prune(model: nn.Module, importance: Optional[Dict[str, torch.Tensor]] = None, *,
          ratio: Optional[float] = None, threshold: Optional[float] = None,
          scope: str = "layer", weight: str = "components", loaders: Optional[Sequence] = None,
          loss_fn: Callable = F.cross_entropy, max_batches: Optional[int] = None) -> nn.Module:
    r"""A copy of ``model`` without the basis components that no domain needs.

    Domain d keeps component k of a layer when its importance :math:`I_{d,k}`
    (``importance``, e.g. from :func:`taylor_importance`; computed from
    ``loaders`` when omitted) is

    - ``threshold``: above the threshold, :math:`I_{d,k} > t`;
    - ``ratio``: among the top :math:`\max(1, \mathrm{round}((1 - \rho) n_d))` of
      the :math:`n_d` components d still uses, ranked per layer (``scope="layer"``)
      or over all layers at once (``scope="global"``, raw Taylor scores, which
      estimate loss changes and so compare across layers; each domain still
      keeps its best component of every layer).

    ``weight="params"`` (with ``scope="global"``) makes ``ratio`` a fraction of
    each domain's basis parameters instead of its components: a component k of a
    layer costs :math:`c_k = k_h k_w\,c_{in,d} + c_{out,d}` weights for domain d
    (its basis filter over the inputs d reads, its mapping column over the filters
    d keeps), and domain d drops its components in increasing order of
    :math:`I_{d,k} / c_k` while the dropped cost stays within
    :math:`\rho \sum_k c_k`: the estimated loss per parameter saved, so a
    parameter budget goes where it costs least.

    A component that no domain keeps is removed from the layer; the others form
    each domain's own subset, used in one ``fastmdl::domain_conv2d`` call per layer
    for a mixed batch. No weight is changed (``factors`` may still be trained).
    A layer where no domain keeps anything holds one component no domain uses,
    so no tensor is empty. Pruning a pruned model again narrows it further.
    """
    layers = _layers_or_raise(model)
    if (ratio is None) == (threshold is None):
        raise ValueError("give exactly one of ratio= and threshold=, got "
                         f"ratio={ratio!r} and threshold={threshold!r}")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise TypeError(f"ratio must be a float in (0, 1), got {type(ratio).__name__}")
        if not 0 < ratio < 1:
            raise ValueError(f"ratio must lie in (0, 1), got {ratio!r}")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise TypeError(f"threshold must be a number >= 0, got {type(threshold).__name__}")
        if not (math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if weight not in WEIGHTS:
        raise ValueError(f"weight must be one of {WEIGHTS}, got {weight!r}")
    if weight != "components" and (scope != "global" or ratio is None):
        raise ValueError(f"weight={weight!r} ranks by importance per parameter over all "
                         "layers: it needs scope='global' and ratio=")
    if importance is None:
        if loaders is None:
            raise ValueError("give importance= (from taylor_importance) or loaders= to compute it")
        importance = taylor_importance(model, loaders, loss_fn=loss_fn, max_batches=max_batches)
    importance = _check_importance(importance, layers)
    if weight == "params":
        keep = _select_by_cost(importance, layers, ratio)
    else:
        keep = _select(importance, layers, ratio, threshold, scope)
    new = copy.deepcopy(model)
    for name, layer in basis_layers(new).items():
        masked = importance[name].masked_fill(layers[name].components.cpu() == 0, float("-inf"))
        layer._prune_(keep[name].to(layer.basis.device), int(masked.amax(dim=0).argmax()))
    return new


def _check_importance(importance, layers) -> Dict[str, torch.Tensor]:
    if not isinstance(importance, dict):
        raise TypeError(f"importance must be a dict {{layer name: (D, r) tensor}}, got "
                        f"{type(importance).__name__}")
    extra = sorted(set(importance) - set(layers))
    if extra:
        raise ValueError(f"importance names layers that are not BasisConv2d of model: {extra}")
    out = {}
    for name, layer in layers.items():
        t = importance.get(name)
        if t is None:
            raise ValueError(f"importance has no entry for layer {name!r}")
        shape = tuple(layer.factors.shape)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"importance[{name!r}] must be a tensor of shape (D, r) = {shape}, "
                             f"got {tuple(t.shape) if isinstance(t, torch.Tensor) else t!r}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"importance[{name!r}] has NaN or infinite entries")
        out[name] = t.detach().to(torch.float64).cpu()
    return out


def _top(imp: torch.Tensor, used: torch.Tensor, ratio: float) -> torch.Tensor:
    """(D, R) bool: per row, the top max(1, round((1 - ratio) n)) of the n used entries."""
    n = used.sum(dim=1)
    n_keep = torch.where(n > 0, ((1 - ratio) * n).round().clamp(min=1), n)
    order = imp.masked_fill(~used, float("-inf")).argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    return ranks < n_keep[:, None]


def _select(importance, layers, ratio, threshold, scope) -> Dict[str, torch.Tensor]:
    used = {n: layers[n].components.detach().cpu() > 0 for n in layers}
    if threshold is not None:
        return {n: (importance[n] > threshold) & used[n] for n in layers}
    if scope == "layer":
        return {n: _top(importance[n], used[n], ratio) for n in layers}
    names = list(layers)
    flat = _top(torch.cat([importance[n] for n in names], dim=1),
                torch.cat([used[n] for n in names], dim=1), ratio)
    keep = dict(zip(names, flat.split([importance[n].shape[1] for n in names], dim=1)))
    return _with_best(keep, importance, used)


def _with_best(keep, importance, used) -> Dict[str, torch.Tensor]:
    """``keep`` plus, per layer, each domain's most important component among those
    it uses: a global ranking must not empty a layer for a domain."""
    out = {}
    for n, k in keep.items():
        best = importance[n].masked_fill(~used[n], float("-inf")).argmax(dim=1, keepdim=True)
        out[n] = k | (torch.zeros_like(used[n]).scatter_(1, best, True) & used[n])
    return out


def _component_params(layer: BasisConv2d) -> torch.Tensor:
    """(D,) weights one component of ``layer`` costs each domain: its basis filter
    over the input channels the domain reads plus its mapping column over the
    filters the domain keeps (as :func:`cost_report` counts them)."""
    kernel = layer.kernel_size[0] * layer.kernel_size[1]
    c_in = layer.in_masks.detach().sum(dim=1).cpu().double()
    masks = layer.masks()
    c_out = (masks.detach().sum(dim=1).cpu().double() if masks is not None
             else torch.full((layer.num_domains,), float(layer.out_channels), dtype=torch.float64))
    return kernel * c_in + c_out


def _select_by_cost(importance, layers, ratio) -> Dict[str, torch.Tensor]:
    """``weight="params"``: per domain, drop the components of least importance per
    parameter while the dropped parameters stay within ``ratio`` of the total."""
    names = list(layers)
    used_by_layer = {n: layers[n].components.detach().cpu() > 0 for n in names}
    used = torch.cat([used_by_layer[n] for n in names], dim=1)
    imp = torch.cat([importance[n] for n in names], dim=1)
    cost = torch.cat([_component_params(layers[n])[:, None].expand_as(importance[n])
                      for n in names], dim=1).clamp(min=1.0)
    live = cost * used  # what each component in use costs its domain; 0 elsewhere
    key = (imp / cost).masked_fill(~used, float("inf"))
    order = key.argsort(dim=1, stable=True)
    dropped = live.gather(1, order).cumsum(dim=1)
    allowance = ratio * live.sum(dim=1, keepdim=True)
    drop_sorted = (dropped <= allowance * (1 + 1e-12)) & used.gather(1, order)
    drop = torch.zeros_like(used).scatter_(1, order, drop_sorted)
    flat = used & ~drop
    keep = dict(zip(names, flat.split([importance[n].shape[1] for n in names], dim=1)))
    return _with_best(keep, importance, used_by_layer)


def factor_l1(model: nn.Module) -> torch.Tensor:
    r""":math:`\sum_{\ell} \operatorname{mean}_{(d,k) \in U_\ell} |s^{(\ell)}_{d,k}|`
    over the basis layers :math:`\ell` of ``model``, :math:`U_\ell` the (domain,
    component) pairs in use: the mean absolute factor of each layer, summed. Added to
    the task loss with a small weight while the factors train, it drives the
    factors of unneeded components towards 0, where pruning them costs little."""
    layers = _layers_or_raise(model)
    total = 0
    for layer in layers.values():
        used = layer.components
        total = total + (layer.factors.abs() * used).sum() / used.sum().clamp(min=1)
    return total


def cost_report(model: BasisModel) -> CostReport:
    """Params and FLOPs (multiply-adds) of a :class:`BasisModel` per domain, for the
    union of domains and for the original single-domain network, at the model's
    ``input_size``, in the conventions of :func:`fastmdl.cost_report` (a channel
    or component counts for the union if some domain keeps it).

    A basis layer costs :math:`k r c_{in}` (basis) + :math:`r c_{out}` (mapping)
    weights, FLOPs those times the output pixels, with r, c_in, c_out the
    components, input channels and filters a domain uses (any domain uses, for
    the union); its factors add r per domain and D x (held components) to the union.
    """
    if not isinstance(model, BasisModel):
        raise TypeError(f"model must be a fastmdl.basis.BasisModel (from decompose of a "
                        f"MultiDomainModel), got {type(model).__name__}")
    num_domains = model.num_domains
    held = basis_layers(model)
    with torch.no_grad():
        layers: List[CostLayer] = []
        factor_domain = torch.zeros(num_domains)
        factor_union = 0.0
        for layer in model.cost_layers:
            m = held.get(layer.name)
            if m is None:
                layers.append(layer)
                continue
            comps = m.components.detach().float().to(layer.in_masks.device)
            layers.append(CostLayer(layer.name + ".basis", "conv", layer.in_masks, comps,
                                    kernel=layer.kernel, pixels=layer.pixels))
            layers.append(CostLayer(layer.name + ".mapping", "conv", comps, layer.out_masks,
                                    pixels=layer.pixels, bias=layer.bias))
            factor_domain += comps.sum(dim=1).cpu()
            factor_union += num_domains * m.rank
        params, flops = costs(layers, "params"), costs(layers, "flops")
    report = CostReport(input_size=model.input_size)
    base_p, base_f = model.baseline["params"], model.baseline["flops"]
    for d in range(num_domains):
        report.domains.append({"domain": d,
                               "params": float(params.per_domain[d] + factor_domain[d]),
                               "flops": float(flops.per_domain[d]),
                               "baseline_params": base_p[d], "baseline_flops": base_f[d]})
    report.union = {"params": float(params.union) + factor_union, "flops": float(flops.union)}
    report.baseline = {"params": sum(base_p) / len(base_p), "flops": sum(base_f) / len(base_f)}
    return report
