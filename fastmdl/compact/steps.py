"""The steps of a compact network, one per node of the pruned network's graph.

A value of the compact network is one of:

- *batch*: a per-sample tensor, held as one tensor per domain (None for a
  domain with no sample in the batch), each with only that domain's channels
  (see ``support.py``);
- *per-part*: a non-tensor value computed from a batch value, one per domain
  (``x.size(0)`` is each segment's own batch size);
- *plain*: the same for every sample (a constant, a Python number).

Each step's ``run(env, state)`` reads its inputs from ``env`` (node name -> value)
and returns its own value. Steps are built once by ``plan.build`` with every
weight packed per domain; at run time they only call the framework's kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from .. import _shapes
from ..channel_select import as_run
from .segments import Segments
from .support import Move, Support

BATCH, PER_PART, PLAIN, DOMAIN = "batch", "per-part", "plain", "domain"

# A pointwise convolution goes to BLAS below these sizes (multiply-adds of the
# call; elements of its weight), to oneDNN above them; and to oneDNN for a tall,
# narrow product: 8 to 15 filters over at most 16 input channels and at least
# 2048 pixel rows (Fire's and SqueezeNet's layers; measured, NOTES.md).
POINTWISE_BLAS_MACS = 1 << 24
POINTWISE_BLAS_WEIGHTS = 1 << 16
POINTWISE_NARROW_FILTERS = range(8, 16)
POINTWISE_NARROW_INPUTS = 16
POINTWISE_MANY_ROWS = 2048

# oneDNN's fused convolution on prepacked weights (what inductor's CPU freezing
# uses), where this build of torch has it.
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                             "_convolution_pointwise")
_POINTWISE = torch.ops.mkldnn._convolution_pointwise if _ONEDNN else None
_REORDER = torch.ops.mkldnn._reorder_convolution_weight if _ONEDNN else None


class RunState:
    """What one forward pass shares between its steps."""

    def __init__(self, x: torch.Tensor, domain, seg: Segments, num_domains: int):
        self.x, self.domain, self.seg, self.num_domains = x, domain, seg, num_domains
        self.union: Dict[str, torch.Tensor] = {}  # batch values already put back in union form

    def domain_tensor(self) -> torch.Tensor:
        if isinstance(self.domain, int):
            return torch.full((self.x.shape[0],), self.domain, dtype=torch.int64,
                              device=self.x.device)
        return self.domain


class Step:
    """One node of the compact network. ``kind`` is BATCH, PER_PART or PLAIN;
    ``support`` (batch values) says which channels each domain holds."""

    kind = BATCH
    label = "step"

    def __init__(self, name: str, support: Optional[Support] = None):
        self.name, self.support = name, support

    def run(self, env: Dict[str, Any], state: RunState) -> Any:
        raise NotImplementedError

    def to(self, device: torch.device) -> None:
        """Move the step's own tensors (packed weights, index lists) to ``device``."""


# -- moving between the two layouts -----------------------------------------------------


def densify(part: torch.Tensor, support: Support, d: int) -> torch.Tensor:
    """Domain d's compact ``part`` with every channel of the union (the others at
    the support's fill value)."""
    if not support.has_channels or support.size(d) == support.width:
        return part
    out = part.new_full((part.shape[0], support.width) + tuple(part.shape[2:]), support.fill)
    index = support.index(d).to(part.device)
    if index.numel():
        out.index_copy_(1, index, part)
    return out


def to_union(name: str, parts: List[Optional[torch.Tensor]], support: Support,
             state: RunState) -> torch.Tensor:
    """A batch value in the union layout, rows in the caller's order (cached per pass)."""
    if name not in state.union:
        seg = state.seg
        dense = [None if p is None else densify(p, support, d) for d, p in enumerate(parts)]
        state.union[name] = seg.join(dense, state.x)
    return state.union[name]


def from_union(t: torch.Tensor, seg: Segments, memory_format) -> List[Optional[torch.Tensor]]:
    """A union-layout batch tensor (every channel held) split into segments."""
    if t.dim() == 4:
        t = t.contiguous(memory_format=memory_format)
    return seg.split(t)


class Deferred:
    """A union island's batch result, split into segments only when a compact step
    reads it. The next island finds the union tensor itself in ``state.union``, so
    a chain of islands (ConvNeXt's permute, LayerNorm, Linear, ...) runs without a
    split and a join between every two of its ops."""

    __slots__ = ("_tensor", "_seg", "_format", "_parts")

    def __init__(self, t: torch.Tensor, seg: Segments, memory_format):
        self._tensor, self._seg, self._format, self._parts = t, seg, memory_format, None

    def _split(self) -> List[Optional[torch.Tensor]]:
        if self._parts is None:
            self._parts = from_union(self._tensor, self._seg, self._format)
        return self._parts

    def __getitem__(self, d: int) -> Optional[torch.Tensor]:
        return self._split()[d]

    def __len__(self) -> int:
        return len(self._split())

    def __iter__(self):
        return iter(self._split())


# -- argument plumbing ----------------------------------------------------------------


class Args:
    """A node's (args, kwargs) with the nodes it reads, resolved per domain at run time."""

    def __init__(self, args: Sequence, kwargs: Dict[str, Any], kinds: Dict[str, str],
                 moves: Optional[Dict[str, Move]] = None):
        self.args, self.kwargs, self.kinds = tuple(args), dict(kwargs), kinds
        self.moves = moves or {}

    def for_domain(self, env, d: int):
        def pick(node: fx.Node):
            value = env[node.name]
            kind = self.kinds[node.name]
            if kind in (BATCH, PER_PART):
                value = value[d]
                move = self.moves.get(node.name)
                if move is not None:
                    value = move(value, d)
            return value
        return fx.node.map_arg(self.args, pick), fx.node.map_arg(self.kwargs, pick)

    def for_rows(self, env, live: Sequence[int]):
        """The arguments over every live row at once (batch values as one tensor;
        only for a step whose batch inputs move nowhere and hold no per-part value)."""
        def pick(node: fx.Node):
            return rows_of(env[node.name], live) if self.kinds[node.name] == BATCH \
                else env[node.name]
        return fx.node.map_arg(self.args, pick), fx.node.map_arg(self.kwargs, pick)

    def for_union(self, env, state: RunState, supports: Dict[str, Support]):
        def pick(node: fx.Node):
            kind = self.kinds[node.name]
            if kind == BATCH:
                return to_union(node.name, env[node.name], supports[node.name], state)
            if kind == DOMAIN:
                return state.domain_tensor()
            return env[node.name]  # plain (per-part values never reach here: see plan)
        return fx.node.map_arg(self.args, pick), fx.node.map_arg(self.kwargs, pick)

    def to(self, device: torch.device) -> None:
        for move in self.moves.values():
            move.to(device)


class Joined(list):
    """A batch value computed once over the live rows of every domain: per domain a
    view of ``whole`` (the rows of the live domains, in ascending domain order), so
    the next step that also runs once reads ``whole`` without a concatenation."""

    __slots__ = ("whole",)


def rows_of(parts, live: Sequence[int]) -> torch.Tensor:
    """The live domains' parts of a batch value as one tensor, in domain order."""
    whole = getattr(parts, "whole", None)
    if whole is not None:
        return whole
    held = [parts[d] for d in live]
    return held[0] if len(held) == 1 else torch.cat(held)


def joined(y: torch.Tensor, like, live: Sequence[int], num_domains: int) -> Joined:
    """``y``, computed on ``rows_of(like, live)``, cut back into ``like``'s parts."""
    out = Joined([None] * num_domains)
    out.whole, start = y, 0
    for d in live:
        n = like[d].shape[0]
        out[d] = y.narrow(0, start, n)
        start += n
    return out


def row_domains(like, live: Sequence[int], device) -> torch.Tensor:
    """The domain of each live row of ``rows_of(like, live)`` (int64, on ``device``)."""
    counts = torch.tensor([like[d].shape[0] for d in live], device=device)
    return torch.tensor(live, device=device).repeat_interleave(counts)


def per_row(table: torch.Tensor, like, live: Sequence[int],
            rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(rows, C, 1, 1): row i holds ``table[d]`` (a (D, C) per-domain vector) for the
    domain d of live row i (``rows``: those domains, if already made)."""
    if rows is None:
        rows = row_domains(like, live, table.device)
    return table.index_select(0, rows)[:, :, None, None]


def _pointwise_mm(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """A 1x1 convolution of channels-last ``x`` as one matrix product over its pixels."""
    n, c, h, w_ = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(n * h * w_, c)  # a view: no copy
    flat = w.view(w.shape[0], c).t()
    y = torch.mm(rows, flat) if b is None else torch.addmm(b, rows, flat)
    return y.view(n, h, w_, -1).permute(0, 3, 1, 2)


def _live_map(state: RunState, fn: Callable[[int], Any]) -> List[Any]:
    out: List[Any] = [None] * state.num_domains
    for d in state.seg.live:
        out[d] = fn(d)
    return out


# -- the steps ----------------------------------------------------------------------------


class Input(Step):
    """The image batch, sorted by domain and split into segments."""

    label = "input"

    def __init__(self, name: str, support: Support, memory_format):
        super().__init__(name, support)
        self.memory_format = memory_format

    def run(self, env, state):
        x = state.x
        if state.seg.order is not None:
            x = x.index_select(0, state.seg.order)
        return _narrow(x.contiguous(memory_format=self.memory_format), state.seg)


def _narrow(sorted_x: torch.Tensor, seg: Segments) -> List[Optional[torch.Tensor]]:
    return [sorted_x.narrow(0, seg.starts[d], c) if c else None for d, c in enumerate(seg.counts)]


@dataclass(frozen=True)
class Activation:
    """An activation that maps 0 to 0, run in a convolution's epilogue: ``fn`` on the
    result, or inside oneDNN's call as the post-op ``attr`` with ``scalars`` and
    ``algorithm``."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    attr: str
    scalars: tuple = ()
    algorithm: str = ""


@dataclass
class WholeConv:
    r"""A convolution over every live row at once (``Conv.whole``):
    :math:`y = \mathrm{act}(g_{row} \odot (W \star x) + b_{row} + r)`, with ``gains``
    and ``biases`` (D, C) per domain (its BatchNorm). ``prepacked`` and ``winograd``
    are W in oneDNN's and in Winograd's layout, where the plan made them."""

    weight: torch.Tensor
    gains: torch.Tensor
    biases: Optional[torch.Tensor]
    prepacked: Optional[torch.Tensor] = None
    winograd: Optional[torch.Tensor] = None

    def to(self, device: torch.device) -> None:
        cpu = torch.device(device).type == "cpu"
        self.weight, self.gains = self.weight.to(device), self.gains.to(device)
        self.biases = None if self.biases is None else self.biases.to(device)
        if not cpu:
            self.prepacked = self.winograd = None


class Conv(Step):
    r"""A convolution of the pruned network with its domain's BatchNorm folded in:
    per domain d, :math:`y_d = \mathrm{act}(W_d \star x_d + b_d + r_d)` with
    :math:`W_d = (s_d \odot [c \in out_d])\,W[S^{out}_d][:, S^{in}_d]` packed once.
    ``weights[d]`` is None when domain d reads or writes no channel (then
    :math:`y_d = b_d + r_d`). A ``tied`` convolution (depthwise, or grouped with
    C_in = C_out) reads the channels it writes, :math:`S^{in}_d = S^{out}_d`, in
    groups of its weight's C_in/groups channels (one each if depthwise)."""

    label = "conv"

    def __init__(self, name, support, x: str, residual: Optional[str],
                 weights: List[Optional[torch.Tensor]], biases: List[Optional[torch.Tensor]],
                 x_move: Move, residual_move: Optional[Move],
                 stride, padding, dilation, groups: int, padding_mode: str, relu: bool,
                 kernel_size, memory_format, shared=None, tied: bool = False,
                 whole: Optional[WholeConv] = None, whole_same: bool = False):
        super().__init__(name, support)
        self.x, self.residual = x, residual
        self.weights, self.biases = weights, biases
        self.x_move, self.residual_move = x_move, residual_move
        # A grouped conv's (weight, gain (D, C), bias (D, C) or None): one shared
        # convolution and a per-domain epilogue, for the padded storage.
        self.shared = shared
        self.tied = tied
        self.stride, self.dilation = tuple(stride), tuple(dilation)
        self.groups, self.relu, self.kernel_size = groups, relu, tuple(kernel_size)
        self.memory_format = memory_format
        if padding_mode == "zeros":
            self.pad, self.padding = None, tuple(padding)
        else:
            ph, pw = padding
            self.pad, self.padding = ((pw, pw, ph, ph), padding_mode), (0, 0)
        # oneDNN's own blocked layout of each domain's weights (float32 on the CPU),
        # made once (see prepack): F.conv2d reorders the weights on every call, which
        # costs more than the convolution on small images with many channels.
        self.prepacked: Optional[List[Optional[torch.Tensor]]] = None
        # Each domain's Winograd F(4x4, 3x3) weights (fastmdl.winograd), where the
        # plan chose it: 4x fewer multiplies than the direct convolution.
        self.winograd: Optional[List[Optional[torch.Tensor]]] = None
        # A pointwise convolution is a matrix product over the pixels of channels-last
        # rows; for small ones a BLAS call costs a quarter of oneDNN's (6.7 against
        # 25.7 us for a squeeze-and-excitation layer; benchmarks/NOTES.md).
        self.pointwise = (self.kernel_size == (1, 1) and self.stride == (1, 1)
                          and self.padding == (0, 0) and groups == 1 and self.pad is None
                          and memory_format == torch.channels_last)
        # Set by the plan when every domain reads and writes every channel and its
        # weights are one weight W times a per-domain gain g_d on the output channels
        # (a frozen layer with its domain's BatchNorm folded in): then the layer runs
        # once over all rows (``whole``); ``whole_same`` when every g_d and b_d is the
        # same, so domain 0's packed weights serve every row and no epilogue is left.
        self.whole, self.whole_same = whole, whole_same
        # Set by the plan: the activation after this convolution (which then has no
        # residual and no ReLU), applied here instead of by a step of its own.
        self.act: Optional[Activation] = None

    def prepack(self, input_size) -> None:
        """Reorder each domain's weights into oneDNN's layout for inputs like
        ``input_size`` (N, C, H, W, as the convolution sees them, padding included);
        any batch size runs on them."""
        if not _ONEDNN or self.memory_format != torch.channels_last:
            return
        if any(w is not None and (w.device.type != "cpu" or w.dtype != torch.float32)
               for w in self.weights + ([self.whole.weight] if self.whole else [])):
            return
        n, _, h, w_ = input_size

        def reorder(w: torch.Tensor, groups: int) -> torch.Tensor:
            return _REORDER(w.contiguous(memory_format=torch.channels_last), list(self.padding),
                            list(self.stride), list(self.dilation), groups,
                            [n, w.shape[1] * groups, h, w_])
        self.prepacked = [None if w is None else reorder(w, self.groups_of(w))
                          for w in self.weights]
        if self.whole is not None:
            self.whole.prepacked = reorder(self.whole.weight, self.groups)

    def groups_of(self, w: torch.Tensor) -> int:
        """The groups of a domain's packed weight ``w``: its kept groups if tied."""
        return w.shape[0] // w.shape[1] if self.tied else self.groups

    def run(self, env, state):
        xs = env[self.x]
        rs = env[self.residual] if self.residual is not None else None
        live = state.seg.live
        if (self.whole is not None or self.whole_same) and len(live) > 1:
            return joined(self._run_whole(xs, rs, live), xs, live, state.num_domains)

        def one(d: int) -> torch.Tensor:
            r = None if rs is None else self.residual_move(rs[d], d)
            return self._apply(self.x_move(xs[d], d), r, d)
        return _live_map(state, one)

    def _blas(self, x: torch.Tensor, w: torch.Tensor) -> bool:
        if not (self.pointwise and x.is_contiguous(memory_format=torch.channels_last)
                and x.numel() * w.shape[0] <= POINTWISE_BLAS_MACS
                and w.shape[0] * w.shape[1] <= POINTWISE_BLAS_WEIGHTS):
            return False
        cout, cin = w.shape[0], w.shape[1]
        return not (cout in POINTWISE_NARROW_FILTERS and cin <= POINTWISE_NARROW_INPUTS
                    and x.numel() >= POINTWISE_MANY_ROWS * max(1, x.shape[1]))

    def _apply(self, x: torch.Tensor, r: Optional[torch.Tensor], d: int) -> torch.Tensor:
        """Domain d's convolution of ``x`` (already in its input support), plus ``r``
        (already in its output support), then the ReLU or the activation."""
        if self.pad is not None:
            x = F.pad(x, self.pad[0], mode=self.pad[1])
        w, b = self.weights[d], self.biases[d]
        if w is None:
            y = self._constant(x, b, self.support.size(d))
        elif self.winograd is not None:
            r = None if r is None else r.contiguous(memory_format=torch.channels_last)
            y = torch.ops.fastmdl.winograd_conv3x3(
                x.contiguous(memory_format=torch.channels_last), self.winograd[d], b, r,
                self.relu)
            return y if self.act is None else self.act.fn(y)
        elif self._blas(x, w):
            y = _pointwise_mm(x, w, b)
        elif self.prepacked is not None:
            x = x.contiguous(memory_format=torch.channels_last)
            args = (list(self.padding), list(self.stride), list(self.dilation),
                    self.groups_of(w))
            if r is not None:  # conv, bias, + residual, ReLU: one oneDNN call
                r = r.contiguous(memory_format=torch.channels_last)
                return _POINTWISE.binary(x, r, self.prepacked[d], b, *args, "add", None,
                                         "relu" if self.relu else None, [], "")
            act = self.act
            if act is not None:  # in oneDNN's call (never with a residual or a ReLU)
                return _POINTWISE(x, self.prepacked[d], b, *args, act.attr, list(act.scalars),
                                  act.algorithm)
            return _POINTWISE(x, self.prepacked[d], b, *args, "relu" if self.relu else "none",
                              [], "")
        else:
            y = F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups_of(w))
        if r is not None:
            y = y.add_(r)
        y = y.relu_() if self.relu else y
        return y if self.act is None else self.act.fn(y)

    def _run_whole(self, xs, rs, live: Sequence[int]) -> torch.Tensor:
        """The layer over every live row at once (see ``whole``):
        y = act(g_row * (W * x) + b_row + r)."""
        x = rows_of(xs, live)
        r = None if rs is None else rows_of(rs, live)
        if self.whole_same:
            return self._apply(x, r, live[0])
        y = self._conv_whole(x, r, xs, live)
        return y if self.act is None else self.act.fn(y)

    def _conv_whole(self, x, r, xs, live: Sequence[int]) -> torch.Tensor:
        whole = self.whole
        w = whole.weight
        if self.pad is not None:
            x = F.pad(x, self.pad[0], mode=self.pad[1])
        if whole.winograd is not None:
            y = torch.ops.fastmdl.winograd_conv3x3(
                x.contiguous(memory_format=torch.channels_last), whole.winograd, None, None,
                False)
        elif self._blas(x, w):
            y = _pointwise_mm(x, w, None)
        elif whole.prepacked is not None:
            y = _POINTWISE(x.contiguous(memory_format=torch.channels_last), whole.prepacked, None,
                           list(self.padding), list(self.stride), list(self.dilation),
                           self.groups, "none", [], "")
        else:
            y = F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)
        rows = row_domains(xs, live, whole.gains.device)
        g = per_row(whole.gains, xs, live, rows)
        y = y.mul_(g) if whole.biases is None else \
            torch.addcmul(per_row(whole.biases, xs, live, rows), y, g)
        if r is not None:
            y = y.add_(r)
        return y.relu_() if self.relu else y

    def _constant(self, x: torch.Tensor, b: Optional[torch.Tensor], c_out: int) -> torch.Tensor:
        ho, wo = _shapes.conv_output_hw(x.shape[2:], self.kernel_size, self.stride,
                                        self.padding, self.dilation)
        if b is None:
            return x.new_zeros((x.shape[0], c_out, ho, wo)).contiguous(
                memory_format=self.memory_format)
        return b.view(1, -1, 1, 1).expand(x.shape[0], c_out, ho, wo).contiguous(
            memory_format=self.memory_format)

    def to(self, device):
        if torch.device(device).type != "cpu":
            self.prepacked = self.winograd = None
        if self.whole is not None:
            self.whole.to(device)
        self.weights = [None if w is None else w.to(device) for w in self.weights]
        self.biases = [None if b is None else b.to(device) for b in self.biases]
        self.x_move.to(device)
        if self.residual_move is not None:
            self.residual_move.to(device)
        if self.shared is not None:
            self.shared = tuple(None if t is None else t.to(device) for t in self.shared)


class Affine(Step):
    """A BatchNorm that could not be folded: per domain :math:`y_d = x_d s_d + t_d`
    over the domain's channels."""

    label = "batchnorm"

    def __init__(self, name, support, x: str, scales, shifts, x_move: Move):
        super().__init__(name, support)
        self.x, self.scales, self.shifts, self.x_move = x, scales, shifts, x_move

    def run(self, env, state):
        xs = env[self.x]

        def one(d: int) -> torch.Tensor:
            x = self.x_move(xs[d], d)
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return torch.addcmul(self.shifts[d].view(shape), x, self.scales[d].view(shape))
        return _live_map(state, one)

    def to(self, device):
        self.scales = [s.to(device) for s in self.scales]
        self.shifts = [t.to(device) for t in self.shifts]
        self.x_move.to(device)


class Alias(Step):
    """A node whose value another step already computes (an activation fused into
    its convolution): the same value, no work."""

    label = "fused"

    def __init__(self, name, support, x: str):
        super().__init__(name, support)
        self.x = x

    def run(self, env, state):
        return env[self.x]


class ClassPad(Step):
    """The logits of a convolutional head set to -inf past each domain's classes:
    domain d's segment keeps its class columns (``x_move`` drops any others its
    input held) and its support's fill is -inf, so the way back to the union
    layout writes -inf past them. No arithmetic."""

    label = "class padding"

    def __init__(self, name, support, x: str, x_move: Move):
        super().__init__(name, support)
        self.x, self.x_move = x, x_move

    def run(self, env, state):
        xs = env[self.x]
        return _live_map(state, lambda d: self.x_move(xs[d], d))

    def to(self, device):
        self.x_move.to(device)


class Linear(Step):
    r"""A linear layer over the domain's features (a classifier head, or a plain
    ``nn.Linear`` that reads pruned features): :math:`y_d = x_d W_d^T + b_d`.

    Packed (``weights[d]`` given): W_d holds only the columns the domain reads.
    Gathered (``weights[d]`` None): the domain's features are scattered into the
    union's width and multiplied with the one shared weight, which costs no
    memory per domain (chosen where packing would cost too much)."""

    label = "linear"

    def __init__(self, name, support, x: str, weights, biases, in_support: Support,
                 shared: Optional[torch.Tensor] = None, shared_bias: Optional[torch.Tensor] = None):
        super().__init__(name, support)
        self.x, self.weights, self.biases, self.in_support = x, weights, biases, in_support
        self.shared, self.shared_bias = shared, shared_bias

    def run(self, env, state):
        xs = env[self.x]

        def one(d: int) -> torch.Tensor:
            x = xs[d]
            if self.weights[d] is None:
                return F.linear(densify(x, self.in_support, d), self.shared, self.shared_bias)
            return F.linear(x, self.weights[d], self.biases[d])
        return _live_map(state, one)

    def to(self, device):
        self.weights = [None if w is None else w.to(device) for w in self.weights]
        self.biases = [None if b is None else b.to(device) for b in self.biases]
        if self.shared is not None:
            self.shared = self.shared.to(device)
            self.shared_bias = None if self.shared_bias is None else self.shared_bias.to(device)


class Map(Step):
    """A per-sample op applied to each segment: an activation or pooling that keeps
    zeros at zero (the support is unchanged), an elementwise op of two branches,
    a concatenation of channels, a flatten, or a per-sample op whose inputs are
    first given every channel (``densify`` in ``plan``)."""

    label = "map"

    def __init__(self, name, support, fn: Callable, args: Args):
        super().__init__(name, support)
        self.fn, self.args = fn, args
        # Set by the plan when every batch input holds every channel and moves
        # nowhere: the op then runs once over all rows (see ``Joined``), and this
        # names the batch input whose parts give each domain's rows.
        self.whole: Optional[str] = None

    def run(self, env, state):
        live = state.seg.live
        if self.whole and len(live) > 1:
            a, k = self.args.for_rows(env, live)
            return joined(self.fn(*a, **k), env[self.whole], live, state.num_domains)

        def one(d: int):
            a, k = self.args.for_domain(env, d)
            return self.fn(*a, **k)
        return _live_map(state, one)

    def to(self, device):
        self.args.to(device)


class Select(Step):
    """Channels picked by a :class:`fastmdl.ChannelSelect` (a pruned channel shuffle
    or split), ``y = x[:, index]``: per segment, the domain's held channels of y
    gathered from the ones it holds of x (``move``, made once)."""

    label = "select"

    def __init__(self, name, support, x: str, index: torch.Tensor, move: Move):
        super().__init__(name, support)
        self.x, self.index, self.move = x, index, move
        # A domain whose part is a run of its held channels (a split's half) takes
        # a view of them: its reader (a concatenation, a convolution) copies anyway.
        self.runs: List[Optional[Tuple[int, int]]] = [
            None if r is None or r.dst is not None else as_run(r.src) for r in move.steps]

    def run(self, env, state):
        xs = env[self.x]

        def one(d: int) -> torch.Tensor:
            run = self.runs[d]
            return xs[d].narrow(1, run[0], run[1]) if run is not None else self.move(xs[d], d)
        return _live_map(state, one)

    def to(self, device):
        self.move.to(device)


class Flatten(Step):
    """(n, C, H, W) -> (n, C*H*W) per segment, whatever call the graph used for it
    (``torch.flatten(x, 1)``, ``x.view(x.size(0), -1)``, ``nn.Flatten()``)."""

    label = "flatten"

    def __init__(self, name, support, x: str):
        super().__init__(name, support)
        self.x = x

    def run(self, env, state):
        xs = env[self.x]
        return _live_map(state, lambda d: xs[d].flatten(1))


class Shape(Step):
    """A size read of a batch value, per segment, as the union layout would give
    it: the segment's own batch size, and the union's channel count."""

    kind = PER_PART
    label = "shape"

    def __init__(self, name, x: str, x_support: Support, fn: Callable, args: Args):
        super().__init__(name)
        self.x, self.x_support, self.fn, self.args = x, x_support, fn, args

    def run(self, env, state):
        xs = env[self.x]
        width = self.x_support.width

        def one(d: int):
            p = xs[d]
            shape = tuple(p.shape)
            if self.x_support.has_channels:
                shape = (shape[0], width) + shape[2:]
            proxy = _ShapeProxy(torch.Size(shape), p)
            a, k = self.args.for_domain(env, d)
            a = tuple(proxy if isinstance(v, torch.Tensor) and v is p else v for v in a)
            return self.fn(*a, **k)
        return _live_map(state, one)


class _ShapeProxy:
    """Answers shape questions with the union's shape (for ``Shape``)."""

    def __init__(self, shape: torch.Size, part: torch.Tensor):
        self.shape, self._part = shape, part
        self.ndim, self.dtype, self.device = len(shape), part.dtype, part.device

    def size(self, dim: Optional[int] = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return self.ndim


class PerPart(Step):
    """Arithmetic on per-part values (``x.size(0) * 2``), once per segment."""

    kind = PER_PART
    label = "per-part"

    def __init__(self, name, fn: Callable, args: Args):
        super().__init__(name)
        self.fn, self.args = fn, args

    def run(self, env, state):
        def one(d: int):
            a, k = self.args.for_domain(env, d)
            return self.fn(*a, **k)
        return _live_map(state, one)


class Plain(Step):
    """A value independent of the samples (a constant, a parameter read)."""

    kind = PLAIN
    label = "plain"

    def __init__(self, name, fn: Callable, args: Args):
        super().__init__(name)
        self.fn, self.args = fn, args

    def run(self, env, state):
        a, k = self.args.for_domain(env, -1)
        return self.fn(*a, **k)


class Island(Step):
    """An op the compact layout cannot follow (outside the channel analysis, or one
    that mixes samples): its inputs go back to the union layout and the caller's
    order, it runs once on the whole batch, and a batch result is grouped again."""

    label = "union island"

    def __init__(self, name, support: Optional[Support], fn: Callable, args: Args,
                 supports: Dict[str, Support], memory_format, reason: str):
        super().__init__(name, support)
        self.kind = BATCH if support is not None else PLAIN
        self.fn, self.args, self.supports = fn, args, supports
        self.memory_format, self.reason = memory_format, reason

    def run(self, env, state):
        a, k = self.args.for_union(env, state, self.supports)
        out = self.fn(*a, **k)
        if self.kind == PLAIN:
            return out
        state.union[self.name] = out
        return Deferred(out, state.seg, self.memory_format)


class Output(Step):
    """The network's output, every batch tensor in it back in the union layout."""

    kind = PLAIN
    label = "output"

    def __init__(self, name, args: Args, supports: Dict[str, Support]):
        super().__init__(name)
        self.args, self.supports = args, supports

    def run(self, env, state):
        a, _ = self.args.for_union(env, state, self.supports)
        return a[0]
