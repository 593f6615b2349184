"""``fastmdl.prune``: remove the filters no domain uses and fuse the rest.

From the traced graph of a :class:`MultiDomainModel`:

1. every channel space keeps the channels some domain's mask keeps (frozen
   spaces keep all); a space no domain uses keeps one channel that every domain
   masks, so no tensor is ever empty;
2. each fastmdl layer is replaced by its pruned form (weights sliced to the kept
   channels, per-domain index lists relative to them; a depthwise or grouped
   convolution keeps the filters of its kept channels' groups), and a plain
   ``nn.Linear`` that reads pruned features is sliced along its inputs; a
   convolutional head (:class:`fastmdl.ConvHeads`) becomes
   :class:`PrunedConvHeads`, and the graph ends in the model's
   :class:`ClassPadding` (the -inf past each domain's classes); each channel
   shuffle, split part and slice the analysis followed becomes a
   :class:`ChannelSelect` of the kept channels (a selection that would keep none
   keeps one channel every domain masks);
3. fusion: a BatchNorm that only reads a convolution is folded into the
   convolution's per-domain scale and shift, and so is a product with one constant
   per channel after it (ConvNeXt's layer scale); a residual add that only reads the
   convolution becomes its residual input; a ReLU after either becomes its
   ``relu`` flag. Each fused step is exact: masked channels stay 0 throughout.
   The BatchNorm's running statistics stay with the layer that absorbed it, so
   ``fastmdl.recalibrate_bn`` can recompute them on the pruned network.
"""

from __future__ import annotations

import copy
import operator
from typing import Dict, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import graph
from .channel_select import ChannelSelect
from .conv_heads import ClassPadding, ConvHeads, PrunedConvHeads
from .convert import MultiDomainModel, _traced
from .cost import baseline_costs
from .layers import BatchNorm2d, Conv2d, DomainHeads
from .masks import hard_mask
from .pruned import (DOMAIN_LAYERS, PrunedBatchNorm2d, PrunedConv2d, PrunedHeads, PrunedLinear,
                     PrunedModel)

_ADDS = {operator.add, operator.iadd, torch.add}
_RELUS = {F.relu, torch.relu, torch.relu_}


@torch.no_grad()
def prune(model: MultiDomainModel, *, fuse: bool = True) -> PrunedModel:
    """A physically smaller :class:`PrunedModel` computing the same function as
    ``model.eval()``: for every domain d, ``prune(model)(x, d) == model.eval()(x, d)``
    up to float rounding; a mixed batch gives the same rows as one domain at a time.
    ``fuse=False`` keeps BatchNorm, residual adds and ReLUs as separate steps."""
    if not isinstance(model, MultiDomainModel):
        raise TypeError(f"model must be a fastmdl.MultiDomainModel (from fastmdl.convert), "
                        f"got {type(model).__name__}")
    inner = copy.deepcopy(model.module).eval()
    p = next(inner.parameters())
    example = torch.randn((1,) + model.input_size, device=p.device, dtype=p.dtype)
    gm = _traced(inner, example, model.input_size)
    g = graph.analyse(gm)
    kept, masks = _kept_channels(g, model.num_domains, p.device)
    _keep_selections_nonempty(g, kept)

    def axis_masks(axis: graph.Axis):
        """(kept index, (D, kept) masks) of an axis, in the axis' channel order."""
        idx, ms, start = [], [], 0
        for s, first, w in axis.segments:
            root = g.find(s)
            k = graph.in_run(kept[root], first, w)
            idx.append(k - first + start)
            ms.append(masks[root][:, k])
            start += w
        idx, m = torch.cat(idx), torch.cat(ms, dim=1)
        if axis.repeat > 1:
            idx = (idx[:, None] * axis.repeat
                   + torch.arange(axis.repeat, device=idx.device)).flatten()
            m = m.repeat_interleave(axis.repeat, dim=1)
        return idx, m

    replacements: Dict[str, nn.Module] = {}
    for name, info in g.layers.items():
        m = info.module
        in_idx, in_m = axis_masks(info.in_axis)
        if info.kind == "conv":
            out_idx, out_m = axis_masks(info.out_axis)
            w, groups = _conv_weight(name, m, in_idx, out_idx)
            shift = None
            if m.bias is not None:
                shift = m.bias[out_idx].expand(model.num_domains, -1)
            replacements[name] = PrunedConv2d(
                w, in_m, out_m, None, shift,
                stride=m.stride, padding=m.padding, dilation=m.dilation, groups=groups,
                padding_mode=m.padding_mode)
        elif info.kind == "bn":
            scale, shift = m.scale_shift()
            stats = (m.running_mean[:, in_idx], m.running_var[:, in_idx], m.eps)
            replacements[name] = PrunedBatchNorm2d(scale[:, in_idx], shift[:, in_idx], in_m,
                                                   bn_stats=stats)
        elif info.kind == "head":
            weight, bias = m.stacked()
            weight = weight[:, in_idx]
            if isinstance(m, ConvHeads):
                replacements[name] = PrunedConvHeads(
                    weight, bias, m.num_classes, in_m, stride=m.stride, padding=m.padding,
                    dilation=m.dilation)
            else:
                replacements[name] = PrunedHeads(weight, bias, m.num_classes, in_m)
        elif info.kind == "linear":
            replacements[name] = PrunedLinear(m.weight[:, in_idx], m.bias, in_m)

    net = _rebuild(gm, replacements)
    _replace_selections(net, g, kept)
    if getattr(model, "class_padding", None) is not None:
        _pad_classes(net, ClassPadding(model.num_classes, p.device))
    if fuse:
        _fuse(net)
    net.delete_all_unused_submodules()
    net.recompile()
    pruned = PrunedModel(net, model.num_domains, model.num_classes, model.input_size,
                         baseline_costs(model),
                         getattr(model, "input_size_source", "given")).eval()
    pruned.compact_plan()  # each domain's weights packed once, here
    return pruned


def _conv_weight(name: str, m: nn.Conv2d, in_idx: torch.Tensor, out_idx: torch.Tensor):
    """(weight, groups) of convolution ``m`` keeping input channels ``in_idx`` and
    filters ``out_idx``."""
    if m.groups == 1:
        return m.weight[out_idx][:, in_idx], 1
    block = graph.tied_block(m)
    if block:
        # Output group j reads input group j alone; the analysis gave both one space
        # kept in whole groups, so the kept filters are the kept channels' groups
        # (a depthwise conv's groups are single channels).
        if not torch.equal(in_idx, out_idx) or out_idx.numel() % block:
            raise RuntimeError(f"internal error: grouped convolution {name} keeps other "
                               "input channels than filters, or part of a group")
        return m.weight[out_idx], int(out_idx.numel()) // block
    # Any other grouped convolution reads and writes frozen spaces: it stays whole.
    if in_idx.numel() != m.in_channels or out_idx.numel() != m.out_channels:
        raise RuntimeError(f"internal error: grouped convolution {name} was cut")
    return m.weight, m.groups


def _kept_channels(g: graph.ChannelGraph, num_domains: int, device: torch.device):
    """Per space root: the kept channel indices (ascending) and the (D, C) masks."""
    kept, masks = {}, {}
    scores_of = g.scores_by_root()
    for s in range(len(g.parent)):
        root = g.find(s)
        if root in kept:
            continue
        width = g.widths[root]
        scores = scores_of.get(root) if not g.frozen[root] else None
        block = g.blocks[root]
        if scores is None:
            m = torch.ones((num_domains, width), device=device)
        else:
            m = hard_mask(scores.detach(), block).float().to(device)
        any_domain = m.amax(dim=0) > 0
        if not bool(any_domain.any()):
            # Keep one channel (one block: a whole group of a grouped conv) that
            # every domain masks: no empty tensors downstream.
            first = int(scores.detach().amax(dim=0).argmax()) // block * block
            any_domain[first:first + block] = True
        kept[root] = any_domain.nonzero().squeeze(1)
        masks[root] = m
    return kept, masks


def _kept_flags(axis: graph.Axis, g: graph.ChannelGraph, kept) -> torch.Tensor:
    """(axis width,) bool: which positions of ``axis`` hold a kept channel."""
    flags = []
    for s, first, w in axis.segments:
        f = torch.zeros(w, dtype=torch.bool)
        f[graph.in_run(kept[g.find(s)], first, w).cpu() - first] = True
        flags.append(f)
    return torch.cat(flags)


def _keep_selections_nonempty(g: graph.ChannelGraph, kept) -> None:
    """A selection (a shuffled tensor's split half) may hold parts of spaces none of
    whose kept channels it picks; it keeps its first channel then (one that every
    domain may mask), so no tensor is ever empty."""
    for _, index, axis in g.selects.values():
        if bool(_kept_flags(axis, g, kept)[index].any()):
            continue
        space, channel = axis.channels()[int(index[0])]
        root = g.find(space)
        k = kept[root]
        kept[root] = torch.unique(torch.cat([k, k.new_tensor([channel])]))


def _replace_selections(gm: fx.GraphModule, g: graph.ChannelGraph, kept) -> None:
    """Each channel selection the analysis followed (a shuffle's view, transpose and
    view; a split's part; a slice) becomes one :class:`ChannelSelect` of the kept
    channels: the reshape it replaces would mix the wrong channels once spaces
    lost some."""
    if not g.selects:
        return
    nodes = {n.name: n for n in gm.graph.nodes}
    # name -> (the node it selects from, the kept channels it picks there)
    made: Dict[str, Tuple[fx.Node, torch.Tensor]] = {}
    for name, (source, index, axis) in g.selects.items():
        flags = _kept_flags(axis, g, kept)
        position = flags.long().cumsum(0) - 1  # where each kept channel lands
        picked = position[index[flags[index]]]
        if source in made:
            # A selection of a selection (a shuffle's split half) is one selection:
            # one gather, and the shuffled tensor itself is never made.
            src, inner = made[source]
            picked = inner[picked]
        else:
            src = nodes[source]
        target = "channel_select_" + name
        while hasattr(gm, target):
            target = "_" + target
        gm.add_submodule(target, ChannelSelect(picked).to(next(gm.parameters()).device))
        node = nodes[name]
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(target, (src,))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        made[name] = (src, picked)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _rebuild(gm: fx.GraphModule, replacements: Dict[str, nn.Module]) -> fx.GraphModule:
    """The traced graph with pruned layers, and ``domain`` as a second input passed
    to every domain-aware layer."""
    for name, new in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, child, new)
    g = gm.graph
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"prune needs a model whose forward takes one input, got "
                         f"{len(placeholders)}")
    with g.inserting_after(placeholders[-1]):
        domain = g.placeholder("domain")
    for node in list(g.nodes):
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), DOMAIN_LAYERS):
            node.args = (node.args[0], domain)
            node.kwargs = {}
    for node in list(g.nodes):
        m = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(m, (Conv2d, BatchNorm2d, DomainHeads, ConvHeads)):
            raise RuntimeError(f"internal error: {node.target} was not pruned")
    gm.recompile()
    return gm


def _pad_classes(gm: fx.GraphModule, padding: ClassPadding) -> None:
    """End the pruned graph with ``padding`` (the multi-domain model applies it
    outside its wrapped network): the output, -inf past each domain's classes."""
    name = "class_padding"
    while hasattr(gm, name):
        name = "_" + name
    gm.add_submodule(name, padding)
    g = gm.graph
    domain = [n for n in g.nodes if n.op == "placeholder"][-1]
    out = next(n for n in g.nodes if n.op == "output")
    with g.inserting_before(out):
        padded = g.call_module(name, (out.args[0], domain))
    out.args = (padded,)
    gm.recompile()


_MULS = {operator.mul, torch.mul}


def _channel_gain(gm: fx.GraphModule, node: fx.Node, x: fx.Node,
                  channels: int) -> Optional[Tuple[torch.Tensor, str]]:
    """(g (C,), the tensor's name) if ``node`` multiplies ``x`` (N, C, H, W) by a
    tensor of the graph holding one number per channel (shape (C, 1, 1) or
    (1, C, 1, 1), possibly through a view or reshape with constant sizes); else None."""
    is_mul = (node.op == "call_function" and node.target in _MULS) or \
        (node.op == "call_method" and node.target == "mul")
    if not is_mul or len(node.args) != 2 or node.kwargs or x not in node.args or \
            node.args[0] is node.args[1]:
        return None
    other = node.args[1] if node.args[0] is x else node.args[0]
    shapes = []
    while isinstance(other, fx.Node) and other.op == "call_method" and \
            other.target in ("view", "reshape") and not other.kwargs and \
            all(isinstance(a, int) for a in other.args[1:]):
        shapes.append(other.args[1:])
        other = other.args[0]
    if not isinstance(other, fx.Node) or other.op != "get_attr":
        return None
    t = graph.fetch_attr(gm, other.target)
    if not isinstance(t, torch.Tensor):
        return None
    for shape in reversed(shapes):
        t = t.reshape(*shape)
    if t.numel() != channels or t.dim() not in (3, 4) or tuple(t.shape[-3:]) != (channels, 1, 1):
        return None
    return t.reshape(channels), other.target


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_relu(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELUS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _fuse(gm: fx.GraphModule) -> None:
    calls: Dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = set()  # the graph tensors folded into a convolution
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or calls.get(node.target) != 1:
            continue
        conv = gm.get_submodule(node.target)
        if not isinstance(conv, PrunedConv2d):
            continue
        tail = node
        nxt = _only_user(tail)
        # Conv -> BatchNorm: fold into the per-domain scale and shift.
        if (nxt is not None and nxt.op == "call_module" and calls.get(nxt.target) == 1
                and isinstance(gm.get_submodule(nxt.target), PrunedBatchNorm2d)
                and nxt.args[0] is tail):
            bn = gm.get_submodule(nxt.target)
            shift = bn.shift.detach().clone()
            bias = None if conv.shift is None else conv.shift.detach()
            if conv.shift is not None:
                shift = shift + conv.shift.detach() * bn.scale.detach()
            conv.scale = nn.Parameter(bn.scale.detach().clone())
            conv.shift = nn.Parameter(shift)
            # The convolution's statistics are of W * x without its bias (now in the shift).
            if bn.has_stats:
                mean, var, eps = bn.stats()
                conv.set_bn_stats((mean if bias is None else mean - bias, var, eps))
            nxt.replace_all_uses_with(tail)
            gm.graph.erase_node(nxt)
            nxt = _only_user(tail)
        # Conv -> times one constant per channel (ConvNeXt's layer scale): into the
        # scale and shift too, (s, t) -> (g s, g t).
        gain = _channel_gain(gm, nxt, tail, conv.weight.shape[0]) if nxt is not None else None
        if gain is not None:
            gain, target = gain
            folded.add(target)
            gain = gain.detach().to(conv.weight)
            scale = gain.expand(conv.num_domains, -1) if conv.scale is None \
                else conv.scale.detach() * gain
            conv.scale = nn.Parameter(scale.clone())
            if conv.shift is not None:
                conv.shift = nn.Parameter(conv.shift.detach() * gain)
            nxt.replace_all_uses_with(tail)
            gm.graph.erase_node(nxt)
            nxt = _only_user(tail)
        # Conv -> add(other): the other operand becomes the residual.
        if (nxt is not None and nxt.op == "call_function" and nxt.target in _ADDS
                and len(nxt.args) == 2 and not nxt.kwargs
                and all(isinstance(a, fx.Node) for a in nxt.args) and tail in nxt.args
                and nxt.args[0] is not nxt.args[1]):
            other = nxt.args[1] if nxt.args[0] is tail else nxt.args[0]
            other_shape = other.meta.get("tensor_meta")
            tail_shape = tail.meta.get("tensor_meta")
            if other_shape is not None and tail_shape is not None and \
                    tuple(other_shape.shape) == tuple(tail_shape.shape):
                with gm.graph.inserting_before(nxt):
                    fused = gm.graph.call_module(node.target, (node.args[0], node.args[1], other))
                fused.meta = dict(nxt.meta)
                nxt.replace_all_uses_with(fused)
                gm.graph.erase_node(nxt)
                gm.graph.erase_node(node)
                node = tail = fused
                nxt = _only_user(tail)
        # -> ReLU: the epilogue's last step.
        if nxt is not None and _is_relu(gm, nxt) and nxt.args[0] is tail:
            conv.relu = True
            nxt.replace_all_uses_with(tail)
            gm.graph.erase_node(nxt)
    gm.graph.eliminate_dead_code()
    # A folded layer scale is read by nothing now: not a tensor of the network.
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in folded - read:
        owner, _, attr = name.rpartition(".")
        delattr(gm.get_submodule(owner) if owner else gm, attr)
