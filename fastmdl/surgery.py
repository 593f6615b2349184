"""Removing channels from coupled channel groups, physically, for any of fastmdl's
three kinds of network (used by :func:`fastmdl.pagcp`).

A :class:`Network` analyses a model once with ``fastmdl/graph.py``: every
unfrozen channel space is a *group*, written by the convolutions in its
``members`` (tied by residual adds, or by a pruned convolution's fused residual)
and read by convolutions, BatchNorms, linear layers and heads, possibly through
a concatenation or a flatten. A pruning state is ``kept``: group root -> the
ascending indices, among the analysed model's channels, that stay.
:meth:`Network.materialise` turns a state into a new, physically smaller copy:
each member's filters, the BatchNorm/affine entries of those channels and every
reader's input channels (a flattened reader's features) are sliced together.
A space that a grouped convolution (C_in = C_out, groups > 1 and not depthwise)
reads and writes goes in blocks of whole groups (``graph.tied_block``); it is not
a group here and stays whole: PAGCP's cuts are ratios of single channels.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from . import channels_last, graph
from .conv_heads import ConvHeads, PrunedConvHeads
from .convert import MultiDomainModel, _traced
from .cost import CostLayer, costs, describe_head
from .layers import BatchNorm2d, Conv2d, DomainHeads
from .masks import Segment, hard_mask
from .pruned import PrunedBatchNorm2d, PrunedConv2d, PrunedHeads, PrunedLinear, PrunedModel, _csr

Kept = Dict[int, torch.Tensor]


@dataclass(frozen=True)
class Group:
    """A prunable channel group: the space ``root`` of the analysis, named after its
    first member, ``width`` channels in the analysed model."""

    root: int
    name: str
    members: Tuple[str, ...]
    width: int


def _kind(model: nn.Module) -> str:
    if isinstance(model, MultiDomainModel):
        return "multidomain"
    if isinstance(model, PrunedModel):
        return "pruned"
    fastmdl_layers = (Conv2d, BatchNorm2d, DomainHeads, ConvHeads, PrunedConv2d,
                      PrunedBatchNorm2d, PrunedHeads, PrunedConvHeads)
    bad = next((n for n, m in model.named_modules() if isinstance(m, fastmdl_layers)), None)
    if bad is not None:
        raise TypeError(f"model is a plain {type(model).__name__} holding fastmdl layer {bad!r}: "
                        "pass the fastmdl.MultiDomainModel or PrunedModel that owns it")
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise ValueError(f"model ({type(model).__name__}) has no nn.Conv2d: there are no "
                         "filters to prune")
    return "plain"


def _root(model: nn.Module, kind: str) -> nn.Module:
    """The module whose submodule names the analysis uses."""
    return {"plain": lambda: model, "multidomain": lambda: model.module,
            "pruned": lambda: model.net}[kind]()


class Network:
    """``model`` analysed once (on a private copy, so ``model`` itself is never
    changed); ``example_input`` is one batch for a plain model (a multi-domain or
    pruned one defaults to a random input of its ``input_size``)."""

    def __init__(self, model: nn.Module, example_input: Optional[torch.Tensor] = None):
        self.kind = _kind(model)
        self.model = copy.deepcopy(model).eval()
        p = next(self.model.parameters())
        if example_input is None:
            if self.kind == "plain":
                raise ValueError("example_input is required for a plain model: one input batch "
                                 "to trace it with (e.g. torch.randn(1, 3, 224, 224))")
            example_input = torch.randn((1,) + tuple(self.model.input_size), device=p.device,
                                        dtype=p.dtype)
        self.example_input = example_input
        root = _root(self.model, self.kind)
        try:
            if self.kind == "pruned":
                gm = copy.deepcopy(root)  # shape propagation writes into the graph's nodes
                domain = torch.zeros(example_input.shape[0], dtype=torch.int64,
                                     device=example_input.device)
                graph.shape_propagate(gm, example_input, domain)
            else:
                gm = graph.trace(root)
                graph.shape_propagate(gm, example_input)
                if channels_last.to_channels_first(gm, root):
                    # ConvNeXt's MLP cut as 1x1 convolutions: the model becomes the
                    # rewritten graph module (what convert does too).
                    self.model = root = gm
                    gm = graph.trace(root)
                    graph.shape_propagate(gm, example_input)
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"running the model on example_input of shape "
                             f"{tuple(example_input.shape)} failed "
                             f"({type(e).__name__}: {e})") from e
        self.graph = g = graph.analyse(gm)
        self.num_domains = 1 if self.kind == "plain" else self.model.num_domains
        # Channels that pass a shuffle, split or slice stay whole here: materialise
        # slices layers, it does not rewrite the selections the way fastmdl.prune
        # does; nor a depthwise convolution's over several groups (masked run by run).
        selected = {g.find(s) for _, _, axis in g.selects.values() for s, _, _ in axis.segments}
        selected |= {g.find(s) for info in g.layers.values()
                     if info.kind == "conv" and info.out_space is None
                     for s, _, _ in info.out_axis.segments}
        self.groups = [Group(r, names[0], tuple(names), g.widths[r])
                       for r, names in g.groups().items() if g.blocks[r] == 1
                       and r not in selected]
        self.masks = self._domain_masks()

    # -- which domains use each channel ------------------------------------------------

    def _domain_masks(self) -> Dict[int, torch.Tensor]:
        """(D, C) 0/1 per space root: which domains use each channel (all ones for a
        plain model and for frozen spaces)."""
        g, d = self.graph, self.num_domains
        found: Dict[int, torch.Tensor] = {}
        if self.kind == "multidomain":
            found = {r: hard_mask(s.detach(), g.blocks[r]).float().cpu()
                     for r, s in g.scores_by_root().items()}
        elif self.kind == "pruned":
            for info in g.layers.values():
                if info.kind == "conv" and info.module.groups == 1:
                    found.setdefault(g.find(info.out_space), info.module.masks()[1].cpu())
        return {r: found.get(r, torch.ones(d, g.widths[r]))
                for r in {g.find(s) for s in range(len(g.parent))}}

    def kept_or_all(self, kept: Kept, root: int) -> torch.Tensor:
        """The channels of space ``root`` that ``kept`` keeps (all when it is not cut)."""
        return kept[root] if root in kept else torch.arange(self.graph.widths[root])

    def _in_index(self, axis: graph.Axis, kept: Kept) -> Tuple[torch.Tensor, bool]:
        """Kept channel positions along an input axis (before the flatten's repeat),
        and whether any of its runs is cut."""
        idx, start, cut = [], 0, False
        for s, first, w in axis.segments:
            r = self.graph.find(s)
            k = graph.in_run(self.kept_or_all(kept, r), first, w)
            cut = cut or len(k) < w
            idx.append(k - first + start)
            start += w
        return torch.cat(idx), cut

    def _axis_masks(self, axis: graph.Axis, kept: Kept) -> torch.Tensor:
        """(D, kept channels) masks of an axis."""
        g = self.graph
        return torch.cat([self.masks[g.find(s)][:, graph.in_run(self.kept_or_all(kept, g.find(s)),
                                                                first, w)]
                          for s, first, w in axis.segments], dim=1)

    # -- costs -------------------------------------------------------------------------

    def cost_layers(self, kept: Kept) -> List[CostLayer]:
        """The cost model's layers (``fastmdl/cost.py``) of the network ``kept`` describes."""
        g, out = self.graph, []
        for name, info in g.layers.items():
            m = info.module
            in_masks = self._axis_masks(info.in_axis, kept)
            layer = CostLayer(name, info.kind, in_masks, repeat=info.in_axis.repeat)
            if info.kind == "conv":
                layer.out_masks = self._axis_masks(info.out_axis, kept)
                layer.kernel = math.prod(m.weight.shape[2:])
                layer.groups, layer.pixels = m.groups, math.prod(info.out_hw)
                layer.in_per_group = m.weight.shape[1] if m.groups > 1 else 0
                # A pruned conv's bias went into its shift; cost_report counts none.
                layer.bias = not isinstance(m, PrunedConv2d) and m.bias is not None
            elif info.kind == "linear":
                layer.out_features, layer.bias = m.out_features, m.bias is not None
            elif info.kind == "head":
                describe_head(layer, m, math.prod(info.out_hw))
            out.append(layer)
        return out

    def flops(self, kept: Kept) -> float:
        """Multiply-adds per sample of the union network (every channel some domain
        uses), as ``fastmdl.cost_report(...).union["flops"]`` counts them."""
        with torch.no_grad():
            return float(costs(self.cost_layers(kept), "flops").union)

    # -- saliency ----------------------------------------------------------------------

    def saliency(self, model: nn.Module, group: Group, kept: Kept, importance: str) -> torch.Tensor:
        r"""Per channel of ``group`` in ``model`` (the network ``kept`` describes):
        the sum over the member convolutions m of the mean of :math:`|W^{(m)}_c|`
        over its fan-in ("l1", as the PAGCP authors' code does) or the root mean
        square ("l2"), times 0 for channels no domain uses (removing those is
        free). Means, not sums: with sums the members of large fan-in (3x3 layers
        of many channels) drown out the others, a stem of 27 weights per filter
        counting for almost nothing."""
        root = _root(model, self.kind)
        total = 0
        for name in group.members:
            w = root.get_submodule(name).weight.detach().flatten(1).float()
            total = total + (w.abs().mean(1) if importance == "l1" else w.pow(2).mean(1).sqrt())
        used = self.masks[group.root][:, self.kept_or_all(kept, group.root)].amax(dim=0)
        return total.cpu() * used

    # -- physical pruning --------------------------------------------------------------

    def materialise(self, kept: Kept) -> nn.Module:
        """A copy of the analysed model (evaluation mode) with only the ``kept``
        channels of each group; groups not in ``kept`` stay whole."""
        model = copy.deepcopy(self.model)
        root = _root(model, self.kind)
        g = self.graph
        kept = {r: k for r, k in kept.items() if len(k) < g.widths[r]}
        new_scores: Dict[int, nn.Parameter] = {}
        if self.kind == "multidomain":
            for grp in self.groups:
                if grp.root in kept:
                    old = root.get_submodule(grp.name).scores
                    new_scores[grp.root] = _param(old, old[:, kept[grp.root].to(old.device)])
            root_of = {n: grp.root for grp in self.groups for n in grp.members}
            for mg in model._groups:  # the wrapper's list of groups shares these Parameters
                r = root_of.get(mg.members[0])
                if r in new_scores:
                    mg.scores = new_scores[r]
        for name, info in g.layers.items():
            m = root.get_submodule(name)
            chan, cut = self._in_index(info.in_axis, kept)
            r_out = g.find(info.out_space) if info.kind == "conv" and \
                info.out_space is not None else None
            out = kept.get(r_out)
            if not cut and out is None:
                continue
            rep = info.in_axis.repeat
            feat = (chan[:, None] * rep + torch.arange(rep)).flatten() if rep > 1 else chan
            if info.kind == "conv":
                if m.groups != 1 and not graph.is_depthwise(m):
                    raise RuntimeError(f"internal error: grouped convolution {name} was cut")
                _slice_conv(m, out, chan if cut else None)
                if out is not None and isinstance(m, Conv2d):
                    m.scores = new_scores[r_out]
            elif info.kind == "bn":
                _slice_bn(m, chan)
                if isinstance(m, BatchNorm2d) and m.mask_segments is not None:
                    m.mask_segments = [
                        Segment(new_scores.get(g.find(s), seg.scores)
                                if seg.scores is not None else None,
                                len(kept[g.find(s)]), seg.block)
                        if g.find(s) in kept else seg
                        for (s, _, _), seg in zip(info.in_axis.segments, m.mask_segments)]
            else:
                _slice_reader(m, feat)
        return model

    def finish(self, model: nn.Module) -> nn.Module:
        """``model`` (from :meth:`materialise`) made whole: a multi-domain model gets
        its channel graph and mask groups rebuilt for its new widths."""
        if self.kind != "multidomain":
            return model
        example = torch.randn((1,) + model.input_size, device=self.example_input.device,
                              dtype=self.example_input.dtype)
        gm = _traced(model.module, example, model.input_size)
        new = MultiDomainModel(model.module, model.num_domains, model.num_classes,
                               model.input_size, graph.analyse(gm),
                               getattr(model, "input_size_source", "given"))
        return new.train(model.training)


def _param(old: Optional[torch.Tensor], value: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.detach().clone(),
                        requires_grad=True if old is None else old.requires_grad)


def _rows(t: Optional[torch.Tensor], idx: Optional[torch.Tensor], dim: int):
    if t is None or idx is None:
        return t
    return t.index_select(dim, idx.to(t.device))


def _slice_conv(m: nn.Module, out: Optional[torch.Tensor], chan: Optional[torch.Tensor]) -> None:
    """Keep filters ``out`` and input channels ``chan`` (None: all). A depthwise
    convolution reads and writes one space, so ``out`` is ``chan``: it keeps those
    filters, one group each."""
    depthwise = graph.is_depthwise(m)
    if isinstance(m, PrunedConv2d):
        in_masks, out_masks = m.masks()  # before the slice: they read the weight's shape
    m.weight = _param(m.weight, _rows(_rows(m.weight, out, 0), None if depthwise else chan, 1))
    if depthwise:
        m.groups = m.weight.shape[0]
    if isinstance(m, PrunedConv2d):
        for attr in ("scale", "shift"):
            if getattr(m, attr) is not None:
                setattr(m, attr, _param(getattr(m, attr), _rows(getattr(m, attr), out, 1)))
        _slice_stats(m, out)
        # CSR lists index the kept channels: rebuild them from the sliced masks.
        m.in_index, m.in_offsets = _csr(_rows(in_masks, chan, 1))
        m.out_index, m.out_offsets = _csr(_rows(out_masks, out, 1))
        return
    if m.bias is not None and out is not None:
        m.bias = _param(m.bias, _rows(m.bias, out, 0))
    m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups


def _slice_stats(m: nn.Module, chan: Optional[torch.Tensor]) -> None:
    """A pruned layer's folded-BatchNorm statistics follow its channels."""
    if m.has_stats:
        m.bn_mean, m.bn_var = _rows(m.bn_mean, chan, 1), _rows(m.bn_var, chan, 1)


def _slice_bn(m: nn.Module, chan: torch.Tensor) -> None:
    if isinstance(m, PrunedBatchNorm2d):
        m.scale = _param(m.scale, _rows(m.scale, chan, 1))
        m.shift = _param(m.shift, _rows(m.shift, chan, 1))
        m.masks = _rows(m.masks, chan, 1)
        _slice_stats(m, chan)
        return
    dim = 1 if isinstance(m, BatchNorm2d) else 0  # fastmdl's are (D, C)
    for attr in ("weight", "bias"):
        if getattr(m, attr) is not None:
            setattr(m, attr, _param(getattr(m, attr), _rows(getattr(m, attr), chan, dim)))
    m.running_mean = _rows(m.running_mean, chan, dim)
    m.running_var = _rows(m.running_var, chan, dim)
    m.num_features = len(chan)


def _slice_reader(m: nn.Module, feat: torch.Tensor) -> None:
    """A linear layer or head: keep input features ``feat`` (a convolutional head:
    input channels)."""
    if isinstance(m, (DomainHeads, ConvHeads)):
        for d in range(len(m.weights)):
            m.weights[d] = _param(m.weights[d], _rows(m.weights[d], feat, 1))
        if isinstance(m, ConvHeads):
            m.in_channels = len(feat)
        else:
            m.in_features = len(feat)
        return
    m.weight = _param(m.weight, _rows(m.weight, feat, 1))
    if isinstance(m, (PrunedLinear, PrunedHeads, PrunedConvHeads)):
        m.in_masks = _rows(m.in_masks, feat, 1)
    if isinstance(m, nn.Linear):
        m.in_features = len(feat)
