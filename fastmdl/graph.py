"""Which channels are tied together: tracing a model with torch.fx.

Every tensor's channel axis (dim 1) is labelled with the *space* each channel
belongs to, as runs (space, first channel, width): a convolution's output opens
a new space; BatchNorm, ReLU, pooling, stochastic depth and other ops that map 0
to 0 channel-wise keep the label; an elementwise add/sub/mul of two tensors ties
their spaces into one (a residual block's convolutions then share one mask);
``cat`` on channels concatenates labels; a flatten to features repeats each
channel's label over its pixels. A *selection* picks channels by a fixed index:
a channel shuffle (view as (N, g, C/g, H, W), transpose, view back; or
``nn.ChannelShuffle``), a part of a split (``chunk``, ``split``) or a slice of
dim 1, so a shuffled tensor's runs interleave spaces one channel at a time. Its
index is recorded (``ChannelGraph.selects``) for ``fastmdl.prune`` to rewrite.
A depthwise convolution over such a mixture keeps its input's runs: filter c is
kept exactly where its channel is, and masked like it.

A depthwise convolution (groups = C_in = C_out: output channel c filters input
channel c alone) writes the space it reads, so its filters are kept and removed
with their channels. So does any grouped convolution with C_in = C_out (ResNeXt,
RegNet): output group j reads input group j alone, so the space is kept or removed
in *blocks* of C/groups channels (a space read by several grouped convolutions
takes the least common multiple of their block sizes), and a removed block takes
a whole group of the convolution with it. A sigmoid or hard sigmoid keeps the
labels but not the zeros (sigmoid(0) = 0.5): its output is a *gate*, which may
go through ops that keep channels apart and multiply a tensor whose channels are
zero where masked (squeeze-and-excitation, ``x * gate``: the product is 0 wherever x is, and the
gate's last convolution joins x's space); any other use of a gate (an add, a
convolution reading it) keeps its spaces whole.

Spaces that fastmdl must not prune are *frozen*: the image, anything that
reaches the model's output other than through the classifier head, and anything
touched by an op it does not understand (a conservative default: it can only
cost pruning opportunities, never correctness). Frozen so far: grouped
convolutions with C_in != C_out (a depthwise one with a channel multiplier > 1),
grouped (not depthwise) convolutions over a concatenation or part of a space,
splits whose parts are read other than by indexing with a number, reshapes of
the channel axis other than a shuffle, runs of different spaces tied by an add,
and an ``nn.Linear`` over anything but (N, features), e.g. a
channels-last MLP after a permute that ``fastmdl/channels_last.py`` could not
rewrite to run channels-first (``convert`` tries that first). Each unfrozen space
becomes one mask group.

Three kinds of network are understood: a plain one (``nn.Conv2d``,
``nn.BatchNorm2d``, ``nn.Linear``), a converted one (fastmdl's layers) and the
graph of a :class:`fastmdl.PrunedModel` (its layers take the domain tensor as a
second input, and a convolution with a fused residual writes the residual's
space).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from . import _domain
from .channel_select import ChannelSelect
from .channels_last import ChannelLayerNorm
from .conv_heads import ConvHeads, PrunedConvHeads
from .layers import BatchNorm2d, Conv2d, DomainHeads
from .masks import Segment
from .pruned import PrunedBatchNorm2d, PrunedConv2d, PrunedHeads

LEAVES = (Conv2d, BatchNorm2d, DomainHeads, ConvHeads, ChannelLayerNorm, ChannelSelect)
# fastmdl.Conv2d is an nn.Conv2d; PrunedLinear an nn.Linear.
_CONVS = (nn.Conv2d, PrunedConv2d)
_BNS = (BatchNorm2d, nn.BatchNorm2d, PrunedBatchNorm2d)
_HEADS = (DomainHeads, PrunedHeads, ConvHeads, PrunedConvHeads)


# Classes of users' own layers kept whole (fastmdl.serialize.register_layer adds
# them): the channel analysis treats them as unknown ops, and save/load rebuild them.
USER_LEAVES: set = set()


class Tracer(fx.Tracer):
    """torch.fx tracer that keeps fastmdl's layers and registered user layers as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, LEAVES) or type(m) in USER_LEAVES
                or super().is_leaf_module(m, qualname))


def fetch_attr(module: nn.Module, target: str) -> Any:
    """What a ``get_attr`` node with this dotted ``target`` reads from ``module``."""
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def trace(module: nn.Module) -> fx.GraphModule:
    """Symbolically trace ``module``; a clear error if its forward cannot be traced."""
    try:
        graph = Tracer().trace(module)
    except Exception as e:  # fx raises many types for untraceable code
        raise ValueError(
            f"fastmdl could not trace {type(module).__name__}.forward with torch.fx to find "
            f"which channels are tied ({type(e).__name__}: {e}). Data-dependent control flow "
            "is the usual cause; move it out of forward or into a leaf module.") from e
    return fx.GraphModule(module, graph, type(module).__name__)


def shape_propagate(gm: fx.GraphModule, example: torch.Tensor, *more: Any) -> None:
    """Record every node's output shape (``node.meta['tensor_meta']``) for ``example``
    (and ``more`` inputs, e.g. a pruned graph's domain), in evaluation mode and
    without touching running statistics."""
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad(), _domain.domain_scope(0):
            ShapeProp(gm).propagate(example, *more)
    finally:
        for m, mode in modes.items():
            m.training = mode


# -- channel spaces ---------------------------------------------------------------------

# A run of an axis: (space id, first channel, width), channels
# first .. first + width - 1 of that space, in order.
Run = Tuple[int, int, int]


def in_run(channels: torch.Tensor, first: int, width: int) -> torch.Tensor:
    """The entries of ``channels`` (a space's channel numbers, ascending) that a run
    holds: those in first .. first + width - 1."""
    return channels[(channels >= first) & (channels < first + width)]


@dataclass(frozen=True)
class Axis:
    """A channel axis: consecutive runs, each (space id, first channel, width) of
    one space's channels in order (a whole space is (s, 0, its width); a shuffled
    or split tensor holds parts of spaces), each channel repeated ``repeat`` times
    (a flattened (C, H, W) map has repeat H*W). ``keeps_zeros`` is False for a
    gate (a sigmoid's output): its channels are the spaces' but a channel a domain
    masks is not 0 there."""

    segments: Tuple[Run, ...]
    repeat: int = 1
    keeps_zeros: bool = True

    @classmethod
    def of(cls, space: int, width: int) -> "Axis":
        """The axis of one whole space of ``width`` channels."""
        return cls(((space, 0, width),))

    @property
    def width(self) -> int:
        return sum(w for _, _, w in self.segments)

    def channels(self) -> List[Tuple[int, int]]:
        """(space, channel) of every position of the axis (repeats not expanded)."""
        return [(s, a + i) for s, a, w in self.segments for i in range(w)]

    def select(self, index: Sequence[int]) -> "Axis":
        """The axis of ``x[:, index]`` (``index`` into this axis' positions)."""
        labels = self.channels()
        runs: List[List[int]] = []
        for j in index:
            s, c = labels[j]
            if runs and runs[-1][0] == s and runs[-1][1] + runs[-1][2] == c:
                runs[-1][2] += 1
            else:
                runs.append([s, c, 1])
        return dataclasses.replace(self, segments=tuple(tuple(r) for r in runs))


@dataclass
class LayerInfo:
    """A layer whose cost or masks depend on channel spaces."""

    name: str
    kind: str  # "conv", "bn", "linear" or "head"
    module: nn.Module
    in_axis: Optional[Axis]
    out_space: Optional[int] = None  # the one whole space it writes, if it writes one
    out_hw: Tuple[int, ...] = ()  # the output's pixels (a convolution's, a conv head's)
    # What a convolution writes: the out space, or for a depthwise one over parts of
    # several spaces (a shuffled tensor) its input's runs.
    out_axis: Optional[Axis] = None


@dataclass
class ChannelGraph:
    """The result of :func:`analyse`: every layer with the spaces it reads and
    writes, spaces merged with union-find, frozen spaces marked."""

    layers: Dict[str, LayerInfo] = field(default_factory=dict)
    parent: List[int] = field(default_factory=list)
    widths: List[int] = field(default_factory=list)
    frozen: List[bool] = field(default_factory=list)
    blocks: List[int] = field(default_factory=list)
    head: Optional[str] = None
    # Channel selections the analysis followed (a shuffle, a split's part, a slice),
    # in graph order: node name -> (the node whose channels it selects, the index
    # into them, that node's axis).
    selects: Dict[str, Tuple[str, torch.Tensor, Axis]] = field(default_factory=dict)

    def new_space(self, width: int, frozen: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.widths.append(width)
        self.frozen.append(frozen)
        self.blocks.append(1)
        return len(self.parent) - 1

    def block(self, s: int) -> int:
        """Channels of space ``s`` that are kept or removed together (1: each alone)."""
        return self.blocks[self.find(s)]

    def tie_blocks(self, s: int, block: int) -> None:
        """Space ``s`` is read by a grouped convolution with groups of ``block``
        channels; a block size that does not divide the space's width freezes it."""
        root = self.find(s)
        new = math.lcm(self.blocks[root], block)
        if self.widths[root] % new:
            self.frozen[root] = True
        else:
            self.blocks[root] = new

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            if self.widths[a] != self.widths[b]:
                self.frozen[a] = self.frozen[b] = True
                return
            self.parent[b] = a
            self.frozen[a] = self.frozen[a] or self.frozen[b]
            self.tie_blocks(a, self.blocks[b])

    def freeze(self, axis: Optional[Axis]) -> None:
        if axis is not None:
            for s, _, _ in axis.segments:
                self.frozen[self.find(s)] = True

    def is_whole(self, run: Run) -> bool:
        """Whether ``run`` holds every channel of its space."""
        s, first, width = run
        return first == 0 and width == self.widths[self.find(s)]

    def is_frozen(self, s: int) -> bool:
        return self.frozen[self.find(s)]

    def scores_by_root(self) -> Dict[int, nn.Parameter]:
        """Unfrozen space root -> the mask scores its convolutions share (a
        depthwise convolution's are its input group's)."""
        out = {}
        for info in self.layers.values():
            m = info.module
            if (info.kind == "conv" and isinstance(m, Conv2d) and info.out_space is not None
                    and (m.groups == 1 or tied_block(m)) and m.prunable
                    and not self.is_frozen(info.out_space)):
                out[self.find(info.out_space)] = m.scores
        return out

    def segments(self, axis: Axis) -> List[Segment]:
        """``axis`` as :class:`fastmdl.masks.Segment` runs, scores None where channels
        are kept whole."""
        scores = self.scores_by_root()
        return [Segment(scores.get(self.find(s)), w, self.block(s), first)
                for s, first, w in axis.segments]

    def groups(self) -> Dict[int, List[str]]:
        """Unfrozen spaces (roots) -> the convolutions that write them, in graph order
        (a depthwise convolution writes the space it reads)."""
        out: Dict[int, List[str]] = {}
        for info in self.layers.values():
            if info.kind == "conv" and info.out_space is not None:
                root = self.find(info.out_space)
                if not self.frozen[root]:
                    out.setdefault(root, []).append(info.name)
        return out


def is_depthwise(conv: nn.Module) -> bool:
    """Whether ``conv`` (an ``nn.Conv2d`` or a :class:`PrunedConv2d`) is depthwise with
    channel multiplier 1 (groups == C_in == C_out > 1): output channel c is input
    channel c filtered alone. (A pruned one that kept a single channel has groups=1
    and is an ordinary convolution.)"""
    return tied_block(conv) == 1


def tied_block(conv: nn.Module) -> int:
    """The channels per group of ``conv`` (an ``nn.Conv2d`` or a :class:`PrunedConv2d`)
    if it is grouped with C_in == C_out (groups > 1; 1 for a depthwise one), so that
    output group j reads input group j alone; else 0."""
    w = conv.weight
    return int(w.shape[1]) if conv.groups > 1 and w.shape[0] == conv.groups * w.shape[1] else 0


# Ops that map a zero channel to a zero channel and keep channels where they are.
_KEEP_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish,
                 nn.Hardswish, nn.Tanh, nn.Dropout, nn.Dropout2d, nn.Identity, nn.MaxPool2d,
                 nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_KEEP_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.mish,
                   F.hardswish, torch.tanh, F.dropout, F.dropout2d, F.max_pool2d, F.avg_pool2d,
                   F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.clone, torch.relu_}
_KEEP_METHODS = {"relu", "relu_", "tanh", "contiguous", "clone", "detach"}
# The same, in other libraries, known by qualified name (the library need not be
# importable): stochastic depth (EfficientNet, ConvNeXt) zeroes whole samples and
# scales the rest; a loaded network runs fastmdl.serialize's copy of it.
_KEEP_BY_NAME = {"torchvision.ops.stochastic_depth.stochastic_depth",
                 "fastmdl.serialize._stochastic_depth"}


def keeps_channels(fn: Any) -> bool:
    """Whether calling function ``fn`` maps a zero channel to a zero channel and
    keeps channels where they are."""
    if fn in _KEEP_FUNCTIONS:
        return True
    return f"{getattr(fn, '__module__', None)}.{getattr(fn, '__name__', None)}" in _KEEP_BY_NAME

# Ops that keep channels where they are but map 0 elsewhere (sigmoid(0) = 0.5): a
# squeeze-and-excitation gate. Its channels stay labelled, with keeps_zeros False.
_GATE_MODULES = (nn.Sigmoid, nn.Hardsigmoid)
_GATE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.sigmoid_}
_GATE_METHODS = {"sigmoid", "sigmoid_"}
_TIE_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul,
                  operator.imul, torch.add, torch.sub, torch.mul}
_TIE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_"}
_SCALE_FUNCTIONS = {operator.mul, operator.imul, torch.mul}  # times a number keeps 0
_SCALE_METHODS = {"mul", "mul_"}
_FLATTEN = {torch.flatten, "flatten", "view", "reshape"}
_REDUCE = {torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"}


def analyse(gm: fx.GraphModule, selections: bool = True) -> ChannelGraph:
    """Label every node of a shape-propagated trace with channel spaces (see the
    module docstring) and collect the layers. ``selections=False`` keeps the spaces
    of channel shuffles, splits and slices whole (for a pass that cannot rewrite
    them the way ``fastmdl.prune`` does)."""
    g = ChannelGraph()
    labels: Dict[fx.Node, Optional[Axis]] = {}
    modules = dict(gm.named_modules())
    seen_modules: Dict[str, Axis] = {}

    def shape(node) -> Optional[torch.Size]:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return getattr(meta, "shape", None)

    def fresh(node, frozen=True) -> Optional[Axis]:
        s = shape(node)
        if s is None or len(s) < 2:
            return None
        return Axis.of(g.new_space(s[1], frozen), s[1])

    def tensor_args(node) -> List[Any]:
        found: List[Any] = []
        fx.node.map_aggregate((node.args, node.kwargs), found.append)
        return [a for a in found if isinstance(a, fx.Node) and shape(a) is not None]

    def tie(a: Axis, b: Axis) -> Axis:
        if a.repeat == b.repeat and [r[2] for r in a.segments] == [r[2] for r in b.segments]:
            for ra, rb in zip(a.segments, b.segments):
                if g.is_whole(ra) and g.is_whole(rb):
                    g.union(ra[0], rb[0])
                elif not (g.find(ra[0]) == g.find(rb[0]) and ra[1] == rb[1]):
                    # Parts of two spaces meet: keep both whole (a union of spaces
                    # is all or nothing).
                    g.freeze(Axis((ra,)))
                    g.freeze(Axis((rb,)))
        else:
            g.freeze(a)
            g.freeze(b)
        return a

    def unknown(node) -> Optional[Axis]:
        for a in tensor_args(node):
            g.freeze(labels.get(a))
        return fresh(node)

    def freeze_gates(node) -> None:
        # A gate's masked channels are not 0: only ops that keep channels apart
        # (activations, pooling, a product with zero-keeping channels) may read it
        # without every channel; anything else keeps its spaces whole.
        for a in tensor_args(node):
            axis = labels.get(a)
            if axis is not None and not axis.keeps_zeros:
                g.freeze(axis)

    # Selections followed over several nodes: a shuffle's grouped view and its
    # transpose (node -> (source, the source's channels as laid out in dims 1, 2)),
    # and a split's tuple (node -> (source, each part's channels)).
    grouped: Dict[fx.Node, Tuple[fx.Node, torch.Tensor]] = {}
    splits: Dict[fx.Node, Tuple[fx.Node, List[torch.Tensor]]] = {}

    def select(node, source, index: torch.Tensor) -> Axis:
        g.selects[node.name] = (source.name, index, labels[source])
        return labels[source].select(index.tolist())

    def follow(node) -> Tuple[bool, Optional[Axis]]:
        """(True, label) if ``node`` is a channel selection or a step of one."""
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node):
            return False, None
        if first in grouped:
            src, idx = grouped[first]
            step = _shuffle_step(node, shape(first), shape(node), shape(src))
            if step == "transpose":
                grouped[node] = (src, idx.t())
            elif step == "keep":
                grouped[node] = (src, idx)
            elif step == "merge":
                return True, select(node, src, idx.reshape(-1))
            return step is not None, None
        if first in splits:
            part = node.args[1] if len(node.args) > 1 else None
            if node.op == "call_function" and node.target is operator.getitem and \
                    isinstance(part, int) and -len(splits[first][1]) <= part < len(splits[first][1]):
                return True, select(node, splits[first][0], splits[first][1][part])
            return False, None
        axis = labels.get(first)
        s_in, s_out = shape(first), shape(node)
        if axis is None or axis.repeat != 1 or s_in is None or len(s_in) < 2:
            return False, None
        index = _selection(node, modules, s_in, s_out)
        if index is not None:
            return True, select(node, first, index)
        if _splits_view(node, s_in, s_out):
            grouped[node] = (first, torch.arange(s_in[1]).view(s_out[1], s_out[2]))
            return True, None
        parts = _split_parts(node, s_in)
        if parts is not None:
            splits[node] = (first, parts)
            return True, None
        return False, None

    for node in gm.graph.nodes:
        op, target = node.op, node.target
        first = node.args[0] if node.args else None
        in_axis = labels.get(first) if isinstance(first, fx.Node) else None
        out: Optional[Axis]
        if selections:
            handled, out = follow(node)
            if handled:
                labels[node] = out
                continue
            for a in node.all_input_nodes:  # a selection read some other way
                src = grouped.get(a, splits.get(a, (None,)))[0]
                if src is not None:
                    g.freeze(labels.get(src))
        if not _reads_gates(node, modules):
            freeze_gates(node)
        if op == "placeholder":
            out = fresh(node)
        elif op == "get_attr":
            out = None
        elif op == "output":
            for a in tensor_args(node):
                g.freeze(labels.get(a))
            continue
        elif op == "call_module":
            m = modules[target]
            if isinstance(m, _CONVS + _BNS + _HEADS + (nn.Linear,)) and target in seen_modules:
                # A layer applied twice has one mask for two inputs: keep it whole.
                g.freeze(seen_modules[target])
                g.freeze(in_axis)
                out = unknown(node)
            elif isinstance(m, _CONVS) and in_axis is not None:
                seen_modules[target] = in_axis
                s = shape(node)
                if m.groups == 1:
                    width = m.weight.shape[0]
                    out = Axis.of(g.new_space(width), width)
                elif tied_block(m) and len(in_axis.segments) == 1 and \
                        g.is_whole(in_axis.segments[0]):
                    # Output group j reads input group j alone: the same space, so
                    # the filters are removed with the channels they read, a whole
                    # group at a time (a depthwise conv's groups are single channels).
                    out = in_axis
                    g.tie_blocks(in_axis.segments[0][0], tied_block(m))
                elif selections and is_depthwise(m) and in_axis.repeat == 1:
                    # Over parts of several spaces (a shuffled tensor): filter c still
                    # reads channel c alone and is kept exactly where channel c is.
                    out = in_axis
                else:  # other grouped convs (and grouped ones over a concatenation)
                    g.freeze(in_axis)
                    out = fresh(node)
                residual = node.args[2] if len(node.args) > 2 else node.kwargs.get("residual")
                if isinstance(m, PrunedConv2d) and isinstance(residual, fx.Node):
                    # A fused residual add: the output lives in the residual's space.
                    r_axis = labels.get(residual)
                    out = tie(out, r_axis) if r_axis is not None else unknown(node)
                one = len(out.segments) == 1 and g.is_whole(out.segments[0])
                g.layers[target] = LayerInfo(target, "conv", m, in_axis,
                                             out.segments[0][0] if one else None,
                                             tuple(s[2:]), out_axis=out)
            elif isinstance(m, _BNS) and in_axis is not None:
                seen_modules[target] = in_axis
                out = in_axis
                g.layers[target] = LayerInfo(target, "bn", m, in_axis, None, tuple(shape(node)[2:]))
            elif isinstance(m, nn.Linear) and len(shape(first) or ()) != 2:
                # Over the last dim of (N, ..., F) (a channels-last MLP after a
                # permute), dim 1 is not its features: keep it and its neighbours whole.
                out = unknown(node)
            elif isinstance(m, (nn.Linear,) + _HEADS) and in_axis is not None:
                seen_modules[target] = in_axis
                kind = "head" if isinstance(m, _HEADS) else "linear"
                if kind == "head":
                    g.head = target
                out = fresh(node)
                g.layers[target] = LayerInfo(target, kind, m, in_axis,
                                             out.segments[0][0] if out else None,
                                             tuple((shape(node) or ())[2:]))
            elif isinstance(m, _KEEP_MODULES):
                out = in_axis
            elif isinstance(m, _GATE_MODULES):
                out = _gate(in_axis) or unknown(node)
            elif isinstance(m, nn.Flatten):
                out = _flatten(in_axis, shape(first), shape(node)) if in_axis else None
                if out is None:
                    out = unknown(node)
            else:
                out = unknown(node)
        else:  # call_function / call_method
            name = target if op == "call_method" else None
            fn = target if op == "call_function" else None
            if (fn is not None and keeps_channels(fn)) or name in _KEEP_METHODS:
                out = in_axis
            elif fn in _GATE_FUNCTIONS or name in _GATE_METHODS:
                out = _gate(in_axis) or unknown(node)
            elif fn in _TIE_FUNCTIONS or name in _TIE_METHODS:
                out = _binary(node, labels, g, tie, unknown,
                              scale_ok=fn in _SCALE_FUNCTIONS or name in _SCALE_METHODS)
            elif fn is torch.cat or name == "cat":
                out = _cat(node, labels, g, shape, unknown)
            elif (fn in _FLATTEN or name in _FLATTEN) and in_axis is not None:
                out = _flatten(in_axis, shape(first), shape(node)) or unknown(node)
            elif (fn in _REDUCE or name in _REDUCE) and in_axis is not None:
                s_in, s_out = shape(first), shape(node)
                same = (s_out is not None and len(s_out) >= 2 and s_out[0] == s_in[0]
                        and s_out[1] == s_in[1] and _reduces_spatial_only(node, len(s_in)))
                out = in_axis if same else unknown(node)
            elif shape(node) is None and not _returns_tensors(node):
                out = None  # sizes, dims, dtypes: read, never mixed into channels
            else:  # including ops that return several tensors (chunk, split)
                out = unknown(node)
        labels[node] = out
    return g


_VIEWS = {torch.reshape, "view", "reshape"}
_COPIES = {torch.clone, "contiguous", "clone"}
# Ops that cut a tensor into parts (the compact plan runs frozen ones per domain).
SPLIT_OPS = {torch.chunk, torch.split, "chunk", "split"}
_CHANNEL_SHUFFLES = {getattr(torch, "channel_shuffle", None), getattr(F, "channel_shuffle", None),
                     getattr(torch, "native_channel_shuffle", None)} - {None}


def _key(node: fx.Node) -> Any:
    return node.target if node.op in ("call_function", "call_method") else None


def _shuffle_index(channels: int, groups: int) -> torch.Tensor:
    """The channel shuffle's selection: output channel b*g + a is input channel
    a*(C/g) + b (view as (g, C/g), transpose, view back)."""
    return torch.arange(channels).view(groups, channels // groups).t().reshape(-1)


def _splits_view(node: fx.Node, s_in, s_out) -> bool:
    """Whether ``node`` views (N, C, ...) as (N, g, C/g, ...): a channel shuffle's first step."""
    return (_key(node) in _VIEWS and s_out is not None and len(s_out) == len(s_in) + 1
            and s_out[0] == s_in[0] and tuple(s_out[3:]) == tuple(s_in[2:])
            and s_out[1] * s_out[2] == s_in[1])


def _shuffle_step(node: fx.Node, s_first, s_out, s_src) -> Optional[str]:
    """What ``node`` does to a grouped view (N, a, b, ...) of a tensor of shape
    ``s_src``: "transpose" (swaps a and b), "keep" (a copy), "merge" (back to
    ``s_src``, dims 1 and 2 merged in order), or None (anything else)."""
    key, rank = _key(node), len(s_first)
    rest = list(node.args[1:])
    if key in _COPIES and not rest and set(node.kwargs) <= {"memory_format"}:
        return "keep"
    if key in (torch.transpose, "transpose") and len(rest) == 2 and not node.kwargs and \
            all(isinstance(d, int) for d in rest) and {d % rank for d in rest} == {1, 2}:
        return "transpose"
    if key in (torch.permute, "permute") and not node.kwargs:
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        if all(isinstance(d, int) for d in dims) and \
                [d % rank for d in dims] == [0, 2, 1] + list(range(3, rank)):
            return "transpose"
    if s_out is None or tuple(s_out) != tuple(s_src):
        return None
    if key in _VIEWS:
        return "merge"  # (N, a, b, ...) to (N, a*b, ...): only a merge of dims 1, 2 gives it
    if key in (torch.flatten, "flatten"):
        dims = list(node.args[1:3]) + [node.kwargs.get(k) for k in ("start_dim", "end_dim")
                                       if k in node.kwargs]
        if len(dims) == 2 and all(isinstance(d, int) for d in dims) and \
                [d % rank for d in dims] == [1, 2]:
            return "merge"
    return None


def _selection(node: fx.Node, modules, s_in, s_out) -> Optional[torch.Tensor]:
    """The channels ``node`` picks from its first input (``y = x[:, index]``) if it is
    a channel selection of one step: a :class:`ChannelSelect`, ``nn.ChannelShuffle``
    or ``torch.channel_shuffle``, or a slice of dim 1 (``x[:, a:b]``); else None."""
    channels = s_in[1]
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, ChannelSelect) and m.in_channels_needed <= channels:
            return m.index.detach().cpu()
        if isinstance(m, nn.ChannelShuffle) and len(node.args) == 1 and channels % m.groups == 0:
            return _shuffle_index(channels, m.groups)
        return None
    if node.op == "call_function" and node.target in _CHANNEL_SHUFFLES and len(node.args) == 2 \
            and not node.kwargs and isinstance(node.args[1], int) and node.args[1] > 0 \
            and channels % node.args[1] == 0:
        return _shuffle_index(channels, node.args[1])
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
        key = node.args[1]
        if not isinstance(key, tuple) or len(key) < 2 or key[0] != slice(None) or \
                not isinstance(key[1], slice) or \
                not all(k == slice(None) or k is Ellipsis for k in key[2:]):
            return None
        sl = key[1]
        if not all(v is None or (isinstance(v, int) and not isinstance(v, bool))
                   for v in (sl.start, sl.stop, sl.step)):
            return None
        picked = list(range(channels))[sl]
        if picked and s_out is not None and len(s_out) == len(s_in) and s_out[1] == len(picked):
            return torch.tensor(picked, dtype=torch.int64)
    return None


def _split_parts(node: fx.Node, s_in) -> Optional[List[torch.Tensor]]:
    """Each part's channels if ``node`` splits its input along dim 1 (``x.chunk(2, 1)``,
    ``torch.split``) and only indexing by a number reads the parts; else None."""
    if _key(node) not in SPLIT_OPS:
        return None
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    meta = node.meta.get("tensor_meta")
    if not isinstance(dim, int) or dim % len(s_in) != 1 or \
            not isinstance(meta, (tuple, list)) or isinstance(meta, TensorMetadata) or \
            not all(isinstance(m, TensorMetadata) for m in meta):
        return None
    if not all(u.op == "call_function" and u.target is operator.getitem
               and isinstance(u.args[1], int) for u in node.users):
        return None
    widths = [int(m.shape[1]) for m in meta]
    if sum(widths) != s_in[1] or not all(w > 0 for w in widths):
        return None
    starts = [sum(widths[:i]) for i in range(len(widths))]
    return [torch.arange(a, a + w) for a, w in zip(starts, widths)]


def _reads_gates(node: fx.Node, modules) -> bool:
    """Whether ``node`` may read a gate (see ``Axis.keeps_zeros``) channel by channel:
    an op that keeps channels apart, or a product/sum that ``_binary`` judges."""
    if node.op == "call_module":
        return isinstance(modules[node.target], _KEEP_MODULES + _GATE_MODULES + (nn.Flatten,))
    if node.op == "call_function":
        fn = node.target
        return (keeps_channels(fn) or fn in _GATE_FUNCTIONS or fn in _TIE_FUNCTIONS
                or fn in _FLATTEN or fn in _REDUCE)
    if node.op == "call_method":
        return node.target in (_KEEP_METHODS | _GATE_METHODS | _TIE_METHODS | _FLATTEN | _REDUCE)
    return False


def _returns_tensors(node: fx.Node) -> bool:
    """Whether ``node`` returns tensors in a tuple or list (``x.chunk(2, 1)``): its
    parts are taken apart later by indexing, which the analysis does not follow."""
    def holds(meta) -> bool:
        if isinstance(meta, TensorMetadata):  # a NamedTuple itself: test it first
            return True
        if isinstance(meta, (tuple, list)):
            return any(holds(m) for m in meta)
        return isinstance(meta, dict) and any(holds(m) for m in meta.values())
    return holds(node.meta.get("tensor_meta"))


def _gate(axis: Optional[Axis]) -> Optional[Axis]:
    return dataclasses.replace(axis, keeps_zeros=False) if axis is not None else None


def _binary(node, labels, g, tie, unknown, scale_ok):
    args = list(node.args[:2])
    if len(args) < 2 and "other" in node.kwargs:
        args.append(node.kwargs["other"])
    axes = [labels.get(a) if isinstance(a, fx.Node) else None for a in args]
    nodes = [a for a in args if isinstance(a, fx.Node)]
    if len(args) == 2 and len(nodes) == 2 and None not in axes:
        if node.kwargs.get("alpha", 1) == 0:
            return unknown(node)
        gated = [not a.keeps_zeros for a in axes]
        if any(gated) and not scale_ok:
            # gate + x: a channel x's domain masks is the gate's value, not 0.
            return unknown(node)
        out = tie(axes[0], axes[1])
        # x * gate is 0 wherever x is: the product keeps zeros if either side does.
        return dataclasses.replace(out, keeps_zeros=not all(gated))
    # x * number keeps a zero channel zero; x + number does not.
    numbers = [a for a in args if not isinstance(a, fx.Node)]
    if (len(nodes) == 1 and labels.get(nodes[0]) is not None and scale_ok
            and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in numbers)):
        return labels[nodes[0]]
    return unknown(node)


def _cat(node, labels, g, shape, unknown):
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    rank = len(shape(node)) if shape(node) is not None else 0
    axes = [labels.get(t) for t in tensors] if isinstance(tensors, (list, tuple)) else [None]
    if rank < 2 or any(a is None for a in axes):
        return unknown(node)
    if dim % rank == 1 and len({a.repeat for a in axes}) == 1:
        return Axis(tuple(s for a in axes for s in a.segments), axes[0].repeat)
    if dim % rank == 0:  # stacking batches: the same channels in each part
        if all(a == axes[0] for a in axes):
            return axes[0]
    return unknown(node)


def _flatten(axis: Axis, s_in, s_out) -> Optional[Axis]:
    # (N, C, H, W) -> (N, C*H*W) with channel-major order: each label repeats H*W times.
    if s_in is None or s_out is None or len(s_out) != 2 or len(s_in) < 2:
        return None
    pixels = 1
    for v in s_in[2:]:
        pixels *= v
    if s_out[0] != s_in[0] or s_out[1] != s_in[1] * pixels:
        return None
    return dataclasses.replace(axis, repeat=axis.repeat * pixels)


def _reduces_spatial_only(node, rank: int) -> bool:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    if dims is None:
        return False
    dims = dims if isinstance(dims, (list, tuple)) else [dims]
    return all(isinstance(d, int) and d % rank >= 2 for d in dims)
