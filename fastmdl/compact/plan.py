"""Building the compact network of a :class:`fastmdl.PrunedModel`, and running it.

``build(model)`` walks the pruned network's torch.fx graph once, follows which
channels each domain holds through every node (``support.py``), packs every
convolution's and linear layer's weights per domain with the BatchNorm folded in,
and turns each node into a step (``steps.py``). ``CompactPlan.__call__`` then
groups the batch by domain, runs the steps, and puts the result back in the
caller's order: no channel gather, no zero-filled output and no argument check
inside the network.

A channel shuffle or split that prune made a ``ChannelSelect`` is a per-domain
gather made once (``steps.Select``). Ops on channels the analysis keeps whole (a
gate's sigmoid, a shuffle or split it did not follow) run per domain on every
channel;
nodes the analysis cannot follow run as *union islands* (``steps.Island``):
counted in :attr:`CompactPlan.islands`, so a user can see what stays slow.
A convolution or map whose every domain holds every channel (a frozen layer)
runs once over all rows instead of once per domain (``Conv.whole``, ``Map.whole``).
"""

from __future__ import annotations

import builtins
import functools
import math
import operator
import os
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch._subclasses import FakeTensorMode
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .. import graph, winograd
from ..channel_select import ChannelSelect
from ..conv_heads import ClassPadding, PrunedConvHeads
from ..pruned import DOMAIN_LAYERS, PrunedBatchNorm2d, PrunedConv2d, PrunedHeads, PrunedLinear
from . import parallel, steps as S
from .segments import Segments
from .support import Move, Support

# A linear layer is packed per domain unless that holds more than this many times
# its one shared weight; beyond it the domain's features are scattered instead.
PACK_LIMIT = 2.0
_EXAMPLE_ROWS = 5  # the batch size of the shape pass: a batch axis is one of this size

_DENSE_MODULES = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus)
_DENSE_FUNCTIONS = {torch.sigmoid, F.sigmoid, F.hardsigmoid, torch.exp, F.softplus}
_DENSE_METHODS = {"sigmoid", "exp"}
_BINARY_FUNCTIONS = {operator.add: "add", operator.iadd: "add", torch.add: "add",
                     operator.sub: "sub", operator.isub: "sub", torch.sub: "sub",
                     operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
                     operator.truediv: "div", operator.itruediv: "div", torch.div: "div"}
_BINARY_METHODS = {"add": "add", "add_": "add", "sub": "sub", "sub_": "sub", "mul": "mul",
                   "mul_": "mul", "div": "div", "div_": "div"}
_INPLACE = {operator.iadd: operator.add, operator.isub: operator.sub,
            operator.imul: operator.mul, operator.itruediv: operator.truediv,
            "add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div"}
_SHAPE_METHODS = {"size", "dim"}
_SHAPE_ATTRS = {"shape", "ndim", "dtype", "device"}
_FLATTENS = {torch.flatten, "flatten", "view", "reshape"}
_RESHAPES = {torch.reshape, "view", "reshape", torch.transpose, "transpose", torch.permute,
             "permute"}
_PARTS = "parts"  # a split's tuple: no step of its own (see _Builder.split_part)
_REDUCES = {torch.mean, torch.sum, torch.amax, "mean", "sum", "amax"}


class Unsupported(ValueError):
    """The network cannot run in the compact layout (the reason says why); it runs
    in the union layout instead."""


class CompactPlan:
    """The compact network: ``plan(x, domain)`` equals the pruned network's union
    forward to float rounding. ``islands`` lists (node, reason) for the nodes that
    run in the union layout; ``packed_bytes`` / ``union_bytes`` are the weight
    memory of the per-domain packing and of the union network's own layers."""

    def __init__(self, steps: List[S.Step], num_domains: int, memory_format,
                 device: torch.device, dtype: torch.dtype, packed_bytes: int, union_bytes: int,
                 domain_cost: List[float]):
        self.steps, self.num_domains, self.memory_format = steps, num_domains, memory_format
        self.device, self.dtype = device, dtype
        self.packed_bytes, self.union_bytes = packed_bytes, union_bytes
        self.islands = [(s.name, s.reason) for s in steps if isinstance(s, S.Island)]
        self.kinds = {s.name: s.kind for s in steps}
        #: Multiply-adds per sample of each domain's convolutions and linear layers.
        self.domain_cost = domain_cost
        self._drop = _last_uses(steps)
        self._phases = parallel.phases(steps, self.kinds, self._drop)
        #: Run a batch's rows side by side on the CPU's threads (see parallel.py).
        self.parallel = device.type == "cpu"
        from .padded import PaddedPlan
        #: The same network in the padded storage (static shapes: torch.compile, CUDA).
        self.padded = PaddedPlan(self)

    def __call__(self, x: torch.Tensor, domain) -> torch.Tensor:
        """The network's output for ``x`` (N, C, H, W) and ``domain`` (an int, or an
        int64 tensor of shape (N,)), both already checked by the caller."""
        seg = Segments.of(domain, x.shape[0], self.num_domains, x.device)
        state = S.RunState(x, domain, seg, self.num_domains)
        threads = torch.get_num_threads()
        if self.parallel and threads > 1 and x.shape[0] > 1 and \
                sum(seg.counts[d] * self.domain_cost[d] for d in seg.live) >= \
                parallel.MIN_PARALLEL_MACS:
            runs = parallel.chunks(seg, self.domain_cost, threads)
            if len(runs) > 1:
                workers = parallel.pool(threads, 1)
                env: Dict[str, Any] = {}
                for start, stop, how in self._phases:
                    if how == parallel.WHOLE:
                        self._run(start, stop, env, state)
                    else:
                        env = parallel.run_phase(
                            self, start, stop, env, state,
                            runs if how == parallel.ROWS else parallel.whole_domains(seg), workers)
                return env[self.steps[-1].name]
        return self._run(0, len(self.steps), {}, state)

    def _run(self, start: int, stop: int, env: Dict[str, Any], state: S.RunState) -> Any:
        out = None
        for i in range(start, stop):
            step = self.steps[i]
            out = env[step.name] = step.run(env, state)
            for name in self._drop[i]:  # free activations after their last reader
                del env[name]
                state.union.pop(name, None)
        return out

    def summary(self) -> str:
        kinds: Dict[str, int] = {}
        for s in self.steps:
            kinds[s.label] = kinds.get(s.label, 0) + 1
        parts = ", ".join(f"{n} {k}" for k, n in kinds.items())
        return (f"compact plan: {len(self.steps)} steps ({parts}); {len(self.islands)} union "
                f"islands; packed weights {self.packed_bytes / 2**20:.2f} MiB "
                f"({self.packed_bytes / max(1, self.union_bytes):.2f}x the union's "
                f"{self.union_bytes / 2**20:.2f} MiB)")


def _activation(node: fx.Node, module, target) -> Optional[S.Activation]:
    """The :class:`steps.Activation` of ``node`` if it is one oneDNN can run as a
    convolution's post-op (each maps 0 to 0) with no argument but its input and
    these settings; else None."""
    if module is not None:
        if node.kwargs or len(node.args) != 1:
            return None
        if type(module) is nn.GELU:
            a = module.approximate
            return S.Activation(functools.partial(F.gelu, approximate=a), "gelu", (), a)
        if type(module) is nn.LeakyReLU:
            slope = float(module.negative_slope)
            return S.Activation(functools.partial(F.leaky_relu, negative_slope=slope),
                                "leaky_relu", (slope,))
        fn = {nn.SiLU: (F.silu, "swish"), nn.Hardswish: (F.hardswish, "hardswish"),
              nn.Tanh: (torch.tanh, "tanh")}.get(type(module))
        if fn is not None:
            return S.Activation(fn[0], fn[1])
        if type(module) is nn.ReLU6:
            return S.Activation(F.relu6, "hardtanh", (0.0, 6.0))
        return None
    extra = set(node.kwargs) - {"inplace"}
    if len(node.args) != 1:
        return None
    if target is F.gelu and extra <= {"approximate"}:
        a = node.kwargs.get("approximate", "none")
        return S.Activation(functools.partial(F.gelu, approximate=a), "gelu", (), a) \
            if a in ("none", "tanh") else None
    if extra:
        return None
    fn = {F.silu: (F.silu, "swish", ()), F.hardswish: (F.hardswish, "hardswish", ()),
          F.relu6: (F.relu6, "hardtanh", (0.0, 6.0)), torch.tanh: (torch.tanh, "tanh", ())}
    if target in fn:
        f, attr, scalars = fn[target]
        return S.Activation(f, attr, scalars)
    return None


def _last_uses(steps: List[S.Step]) -> List[List[str]]:
    users: Dict[str, int] = {}
    reads: List[List[str]] = []
    for i, s in enumerate(steps):
        names = _reads(s)
        reads.append(names)
        for n in names:
            users[n] = i
    drop: List[List[str]] = [[] for _ in steps]
    for name, i in users.items():
        drop[i].append(name)
    for i, s in enumerate(steps):  # a value no step reads is dropped at once
        if s.name not in users and i != len(steps) - 1:
            drop[i].append(s.name)
    return drop


def _reads(step: S.Step) -> List[str]:
    names = [getattr(step, a) for a in ("x", "residual") if getattr(step, a, None) is not None]
    args = getattr(step, "args", None)
    if isinstance(args, S.Args):
        fx.node.map_arg((args.args, args.kwargs), lambda n: names.append(n.name))
    return names


# ------------------------------------------------------------------------------- building


def build(model, memory_format: Optional[torch.memory_format] = None) -> CompactPlan:
    """The compact network of ``model`` (a :class:`fastmdl.PrunedModel`), on the device
    and dtype of its parameters. ``memory_format`` of the activations: by default
    channels_last (oneDNN on the CPU and the GPU kernels read channels
    contiguously). Raises :class:`Unsupported` with the reason if the network
    cannot run compact."""
    net: fx.GraphModule = model.net
    p = next(model.parameters())
    fmt = torch.channels_last if memory_format is None else memory_format
    builder = _Builder(net, model.num_domains, p.device, p.dtype, fmt)
    builder.shapes(model.input_size)
    for node in net.graph.nodes:
        builder.add(node)
    return CompactPlan(builder.steps, model.num_domains, fmt, p.device, p.dtype,
                       builder.packed_bytes, builder.union_bytes, builder.cost)


def _method(name: str) -> Callable:
    def call(obj, *args, **kwargs):
        return getattr(obj, name)(*args, **kwargs)
    call.__name__ = name
    return call


class _Builder:
    def __init__(self, net: fx.GraphModule, num_domains: int, device, dtype, fmt):
        self.net, self.D, self.device, self.dtype, self.fmt = net, num_domains, device, dtype, fmt
        self.modules = dict(net.named_modules())
        self.kinds: Dict[str, str] = {}
        self.supports: Dict[str, Support] = {}
        self.steps: List[S.Step] = []
        self.nodes: Dict[str, fx.Node] = {}
        self.packed_bytes = self.union_bytes = 0
        self.cost = [0.0] * num_domains  # multiply-adds per sample, per domain
        self.inputs: List[fx.Node] = []
        self.splits: Dict[str, fx.Node] = {}
        self.step_of: Dict[str, S.Step] = {}

    # -- shapes ----------------------------------------------------------------------

    def shapes(self, input_size) -> None:
        placeholders = [n for n in self.net.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 2:
            raise Unsupported(f"the pruned graph must take (x, domain), got "
                              f"{len(placeholders)} inputs")
        x = torch.empty((_EXAMPLE_ROWS,) + tuple(input_size), dtype=self.dtype)
        domain = torch.arange(_EXAMPLE_ROWS) % self.D
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        try:
            with torch.no_grad():
                ShapeProp(self.net, fake_mode=mode).propagate(x.to(self.device),
                                                              domain.to(self.device))
        except Exception as e:  # a graph the fake pass cannot run: say so, stay in union
            raise Unsupported(f"the shape pass failed ({type(e).__name__}: {e})") from e

    def shape(self, node) -> Optional[torch.Size]:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return getattr(meta, "shape", None)

    def is_batch_tensor(self, node: fx.Node) -> bool:
        s = self.shape(node)
        return s is not None and len(s) >= 1 and s[0] == _EXAMPLE_ROWS

    # -- node by node --------------------------------------------------------------------

    def arg_nodes(self, node: fx.Node) -> List[fx.Node]:
        found: List[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), found.append)
        return found

    def add(self, node: fx.Node) -> None:
        self.nodes[node.name] = node
        step = self.make(node)
        if step is None:
            return
        self.kinds[node.name] = step.kind
        if step.support is not None:
            self.supports[node.name] = step.support
        if isinstance(step, S.Map):
            step.whole = self.runs_whole(node, step)
        self.steps.append(step)
        self.step_of[node.name] = step

    def runs_whole(self, node: fx.Node, step: S.Map) -> Optional[str]:
        """``Map.whole``: a batch input's name if the map can run once over all rows
        (it returns one tensor, and every batch input, like its output, holds every
        channel and moves nowhere, so channel j is the same channel in every row);
        else None."""
        if self.D == 1 or step.support is None or not step.support.is_dense or \
                not isinstance(node.meta.get("tensor_meta"), TensorMetadata):
            return None
        args = self.arg_nodes(node)
        if any(self.kinds[a.name] not in (S.BATCH, S.PLAIN) for a in args):
            return None
        batch = [a for a in args if self.kinds[a.name] == S.BATCH]
        if batch and all(self.support_of(a).is_dense for a in batch) and \
                not any(m.moves_anything for m in step.args.moves.values()):
            return batch[0].name
        return None

    def make(self, node: fx.Node) -> Optional[S.Step]:
        op = node.op
        if op == "placeholder":
            self.inputs.append(node)
            if len(self.inputs) == 2:
                self.kinds[node.name] = S.DOMAIN
                return None
            s = self.shape(node)
            return S.Input(node.name, Support.dense(self.D, s[1]), self.fmt)
        if op == "output":
            for a in self.arg_nodes(node):
                if self.kinds[a.name] == S.PER_PART:
                    raise Unsupported(f"the output reads {a.name!r}, a size of one segment")
            return S.Output(node.name, self.args(node), self.supports)
        if op == "get_attr":
            target = node.target
            return S.Plain(node.name, lambda: graph.fetch_attr(self.net, target),
                           S.Args((), {}, {}))
        if self.is_split(node):
            self.splits[node.name] = node
            self.kinds[node.name] = _PARTS
            return None
        if op == "call_function" and node.target is operator.getitem and \
                isinstance(node.args[0], fx.Node) and node.args[0].name in self.splits:
            return self.split_part(node)
        kinds = [self.kinds[a.name] for a in self.arg_nodes(node)]
        if op == "call_module":
            m = self.modules[node.target]
            if isinstance(m, DOMAIN_LAYERS):
                return self.layer(node, m)
            if isinstance(m, PrunedLinear):
                return self.linear(node, m)
            if isinstance(m, ChannelSelect):
                return self.select(node, m)
            fn: Callable = m
        elif op == "call_function":
            fn = node.target
        else:
            fn = _method(node.target)
        if S.DOMAIN not in kinds and S.BATCH not in kinds:
            if S.PER_PART in kinds:
                return S.PerPart(node.name, fn, self.args(node))
            return S.Plain(node.name, fn, self.args(node))
        if S.DOMAIN in kinds:
            return self.island(node, fn, "reads the per-sample domain")
        return self.op(node, fn, op)

    def args(self, node: fx.Node, moves=None) -> S.Args:
        return S.Args(node.args, node.kwargs, self.kinds, moves)

    def support_of(self, node: fx.Node) -> Support:
        return self.supports[node.name]

    def island(self, node: fx.Node, fn: Callable, reason: str) -> S.Step:
        for a in self.arg_nodes(node):
            if self.kinds[a.name] == S.PER_PART:
                raise Unsupported(f"node {node.name!r} ({reason}) reads {a.name!r}, a size of "
                                  f"one segment, which the union layout does not have")
        meta = node.meta.get("tensor_meta")
        if isinstance(meta, (tuple, list, dict)) and not isinstance(meta, TensorMetadata):
            raise Unsupported(f"node {node.name!r} ({reason}) returns several tensors")
        support = None
        if self.is_batch_tensor(node):
            s = self.shape(node)
            support = Support.dense(self.D, s[1]) if len(s) >= 2 else Support.rows()
        return S.Island(node.name, support, fn, self.args(node), self.supports, self.fmt, reason)

    # -- ops outside fastmdl's layers -----------------------------------------------------------

    def op(self, node: fx.Node, fn: Callable, op: str) -> S.Step:
        name = node.target if op == "call_method" else None
        target = node.target if op != "call_method" else None
        module = self.modules.get(node.target) if op == "call_module" else None
        first = node.args[0] if node.args else None
        x = first if isinstance(first, fx.Node) and self.kinds.get(first.name) == S.BATCH else None
        out_shape = self.shape(node)

        if name in _SHAPE_METHODS or (target is builtins.getattr and len(node.args) == 2
                                      and node.args[1] in _SHAPE_ATTRS):
            if x is None:
                return self.island(node, fn, "a size read of something other than a batch")
            return S.Shape(node.name, x.name, self.support_of(x), fn, self.args(node))
        if not self.is_batch_tensor(node) and out_shape is not None:
            return self.island(node, fn, "mixes the samples of the batch")
        if x is not None and out_shape is not None:
            fused = self.fused_activation(node, module, target, x)
            if fused is not None:
                return fused
            if (module is not None and isinstance(module, graph._KEEP_MODULES)) or \
                    (target is not None and graph.keeps_channels(target)) or \
                    name in graph._KEEP_METHODS:
                return self.keep(node, fn, x)
            if (isinstance(module, nn.Flatten) or target in _FLATTENS or name in _FLATTENS):
                flat = self.flatten(node, x)
                if flat is not None:
                    return flat
            if (target in _REDUCES or name in _REDUCES) and self.shape(x) is not None and \
                    graph._reduces_spatial_only(node, len(self.shape(x))) and \
                    out_shape[1:2] == self.shape(x)[1:2]:
                return self.keep(node, fn, x)
            if (target in _RESHAPES or name in _RESHAPES) and self.keeps_rows(node):
                return self.dense_map(node, fn)  # a channel shuffle's view and transpose
        if target in _BINARY_FUNCTIONS or name in _BINARY_METHODS:
            return self.binary(node, fn, _BINARY_FUNCTIONS.get(target) or _BINARY_METHODS[name])
        if target is torch.cat or name == "cat":
            step = self.cat(node, fn)
            if step is not None:
                return step
        if (module is not None and isinstance(module, _DENSE_MODULES)) or \
                target in _DENSE_FUNCTIONS or name in _DENSE_METHODS:
            return self.dense_map(node, fn)
        if x is not None and out_shape is not None and self.normalises_each_sample(node, module):
            return self.dense_map(node, fn)
        what = type(module).__name__ if module is not None else (
            name or getattr(target, "__name__", str(target)))
        return self.island(node, fn, f"{what} is outside the channel analysis")

    def fused_activation(self, node: fx.Node, module, target, x: fx.Node) -> Optional[S.Step]:
        """An activation that maps 0 to 0 right after a convolution that nothing else
        reads (and that has no residual or ReLU of its own): it runs in that
        convolution's epilogue (inside oneDNN's call on the CPU), and the node
        becomes an alias of the convolution's value."""
        conv = self.step_of.get(x.name)
        if not isinstance(conv, S.Conv) or conv.residual is not None or conv.relu or \
                conv.act is not None or len(x.users) != 1:
            return None
        act = _activation(node, module, target)
        if act is None:
            return None
        conv.act = act
        return S.Alias(node.name, conv.support, x.name)

    def normalises_each_sample(self, node: fx.Node, module) -> bool:
        """Whether ``node`` is a LayerNorm or GroupNorm layer: each sample normalised
        alone (a LayerNorm's normalized dims never reach dim 0), so it runs on each
        domain's rows given every channel."""
        if isinstance(module, nn.GroupNorm):
            return True
        rank = len(self.shape(node.args[0]) or ())
        return isinstance(module, nn.LayerNorm) and len(module.normalized_shape) < rank

    def keeps_rows(self, node: fx.Node) -> bool:
        """Whether a view, reshape, transpose or permute keeps dim 0 as the samples:
        then it runs on each domain's rows alone. A view's first size must be a
        segment's own size read (``x.size(0)``) or -1, never a number fixed at
        trace time; a transpose or permute must leave dim 0 in place."""
        rank_in = len(self.shape(node.args[0]) or ())
        rest = list(node.args[1:])
        if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
            rest = list(rest[0])
        what = node.target if node.op == "call_method" else node.target.__name__
        if node.kwargs or not rest or rank_in < 1:
            return False
        if what in ("view", "reshape"):
            first = rest[0]
            return first == -1 if not isinstance(first, fx.Node) else \
                self.kinds.get(first.name) == S.PER_PART
        if what == "transpose":
            return len(rest) == 2 and all(isinstance(d, int) and d % rank_in != 0 for d in rest)
        return isinstance(rest[0], int) and rest[0] % rank_in == 0  # permute

    def is_split(self, node: fx.Node) -> bool:
        """Whether ``node`` cuts a batch value into a tuple along a non-batch dim
        (``x.chunk(2, 1)``: ShuffleNet's split) with sizes fixed in the graph, and
        only indexing reads the tuple."""
        if not ((node.op == "call_function" and node.target in graph.SPLIT_OPS) or
                (node.op == "call_method" and node.target in graph.SPLIT_OPS)):
            return False
        x = node.args[0] if node.args else None
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        x_shape = self.shape(x)
        if not isinstance(x, fx.Node) or self.kinds.get(x.name) != S.BATCH or \
                x_shape is None or len(x_shape) < 2 or not isinstance(dim, int) or \
                dim % len(x_shape) == 0:
            return False
        sizes: List[fx.Node] = []  # sizes computed in the graph (from a segment's shape)
        fx.node.map_arg((node.args[1:], node.kwargs), sizes.append)
        if sizes:
            return False
        return all(u.op == "call_function" and u.target is operator.getitem
                   and isinstance(u.args[1], int) for u in node.users)

    def split_part(self, node: fx.Node) -> S.Step:
        """Part i of a split, cut again from the split's (densified) input: a view,
        so each part costs no copy and the tuple needs no value of its own."""
        src, index = self.splits[node.args[0].name], node.args[1]
        split = src.target if src.op == "call_function" else _method(src.target)

        def part(*args, **kwargs):
            return split(*args, **kwargs)[index]
        x = src.args[0]
        sup = self.support_of(x)
        moves = {} if sup.is_dense else {x.name: Move(sup, Support.dense(self.D, sup.width))}
        s = self.shape(node)
        return S.Map(node.name, Support.dense(self.D, s[1]), part, self.args(src, moves))

    def select(self, node: fx.Node, m: ChannelSelect) -> S.Step:
        """A pruned shuffle or split: each domain's held channels of ``x[:, index]``,
        gathered per segment from the channels it holds of x."""
        x = node.args[0] if node.args else None
        if len(node.args) != 1 or node.kwargs or not isinstance(x, fx.Node) or \
                self.kinds[x.name] != S.BATCH or not self.support_of(x).has_channels:
            return self.island(node, m, "a channel selection of a value the analysis lost")
        x_sup = self.support_of(x)
        index = m.index.detach().cpu()
        out = Support(index.numel(), x_sup.masks[:, index], x_sup.fill)
        step = S.Select(node.name, out, x.name, index, Move(x_sup, out, index))
        step.to(self.device)
        return step

    def keep(self, node, fn, x) -> S.Step:
        sup = self.support_of(x)
        if sup.fill != 0:
            return self.dense_map(node, fn)
        return S.Map(node.name, sup, fn, self.args(node))

    def flatten(self, node, x) -> Optional[S.Step]:
        s_in, s_out = self.shape(x), self.shape(node)
        if len(s_in) < 2 or len(s_out) != 2:
            return None
        pixels = 1
        for v in s_in[2:]:
            pixels *= v
        if s_out[1] != s_in[1] * pixels:
            return None
        sup = self.support_of(x)
        if not sup.has_channels or sup.fill != 0:
            return None
        masks = sup.masks.repeat_interleave(pixels, dim=1)
        return S.Flatten(node.name, Support(s_out[1], masks), x.name)

    def dense_map(self, node, fn) -> S.Step:
        """A per-sample op given every channel of its batch inputs."""
        moves = {}
        for a in self.arg_nodes(node):
            if self.kinds[a.name] == S.BATCH:
                src = self.support_of(a)
                if src.has_channels and not src.is_dense:
                    moves[a.name] = Move(src, Support.dense(self.D, src.width, src.fill))
        s = self.shape(node)
        if s is None or not self.is_batch_tensor(node):
            return self.island(node, fn, "a per-sample op with a non-batch result")
        out = Support.dense(self.D, s[1]) if len(s) >= 2 else Support.rows()
        return S.Map(node.name, out, fn, self.args(node, moves))

    def binary(self, node, fn, kind: str) -> S.Step:
        args = list(node.args[:2])
        if len(args) < 2 and "other" in node.kwargs:
            args.append(node.kwargs["other"])
        batch = [a for a in args if isinstance(a, fx.Node) and self.kinds[a.name] == S.BATCH]
        others = [a for a in args if not (isinstance(a, fx.Node) and self.kinds[a.name] == S.BATCH)]
        out_shape = self.shape(node)
        if len(args) != 2 or out_shape is None or len(out_shape) < 2 or \
                any(self.kinds.get(getattr(a, "name", None)) == S.PER_PART for a in others):
            return self.island(node, fn, f"{kind} of operands the analysis does not follow")
        sups = [self.support_of(a) for a in batch]
        numbers = all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in others)
        if any(not s.has_channels or s.fill != 0 for s in sups) or not numbers:
            return self.dense_map(node, fn)
        width = out_shape[1]
        wide = [s for s in sups if s.width == width and width != 1]
        if len(batch) == 1:  # x op number
            if kind in ("mul", "div") or (kind in ("add", "sub") and others[0] == 0):
                return S.Map(node.name, sups[0], fn, self.args(node))
            return self.dense_map(node, fn)
        if kind == "div" or len(wide) == 0:
            return self.dense_map(node, fn)
        if len(wide) == 2:
            a, b = wide[0].masks, wide[1].masks
            target = Support(width, a & b if kind == "mul" else a | b)
        else:  # a (n, C, ...) tensor times a (n, 1, ...) one: it keeps the wide one's zeros
            if kind != "mul":
                return self.dense_map(node, fn)
            target = wide[0]
        moves, copied = {}, False
        for a, s in zip(batch, sups):
            m = Move(s, target if s.width == width else Support.dense(self.D, s.width))
            moves[a.name] = m
            copied = copied or (m.moves_anything and a is args[0])
        inplace = node.target in _INPLACE
        if copied and inplace:
            # The in-place op would write a reindexed copy, not the value later readers see.
            if any(u is not node for u in args[0].users):
                return self.island(node, fn, f"an in-place {kind} on a tensor read elsewhere")
            fn = _INPLACE[fn] if callable(node.target) else _method(_INPLACE[node.target])
        return S.Map(node.name, target, fn, self.args(node, moves))

    def cat(self, node, fn) -> Optional[S.Step]:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        out_shape = self.shape(node)
        if not isinstance(tensors, (list, tuple)) or out_shape is None or len(out_shape) < 2:
            return None
        if not all(isinstance(t, fx.Node) and self.kinds[t.name] == S.BATCH for t in tensors):
            return None
        sups = [self.support_of(t) for t in tensors]
        if not isinstance(dim, int) or dim % len(out_shape) != 1 or \
                any(not s.has_channels or s.fill != 0 for s in sups):
            return None
        return S.Map(node.name, Support(out_shape[1], torch.cat([s.masks for s in sups], dim=1)),
                     fn, self.args(node))

    # -- fastmdl's layers: packed weights ------------------------------------------------

    def layer(self, node: fx.Node, m: nn.Module) -> S.Step:
        if len(node.args) < 2 or node.args[1] is not self.inputs[1] or node.kwargs:
            return self.island(node, m, "a fastmdl layer called without the batch's domain")
        x = node.args[0]
        if not isinstance(x, fx.Node) or self.kinds[x.name] != S.BATCH or \
                not self.support_of(x).has_channels or self.support_of(x).fill != 0:
            return self.island(node, m, "a fastmdl layer on an input the analysis lost")
        if isinstance(m, PrunedConv2d):
            residual = node.args[2] if len(node.args) > 2 else None
            if residual is not None and (not isinstance(residual, fx.Node)
                                         or self.kinds[residual.name] != S.BATCH
                                         or self.support_of(residual).fill != 0
                                         or self.support_of(residual).width != m.weight.shape[0]):
                return self.island(node, m, "a residual the analysis lost")
            if m._unfolded is not None:
                raise Unsupported("a BatchNorm is unfolded (inside batchnorm_training)")
            return self.conv(node, m, x, residual)
        if isinstance(m, PrunedBatchNorm2d):
            return self.affine(node, m, x)
        if isinstance(m, PrunedConvHeads):
            return self.conv_head(node, m, x)
        if isinstance(m, ClassPadding):
            return self.class_padding(node, m, x)
        return self.head(node, m, x)

    def _acc(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``t`` in at least float32 for folding (then rounded once to the model's dtype)."""
        if t is None:
            return None
        return t.detach().to(torch.promote_types(t.dtype, torch.float32))

    def _count(self, packed: List[Optional[torch.Tensor]], union: List[Optional[torch.Tensor]]):
        self.packed_bytes += sum(t.numel() * t.element_size() for t in packed if t is not None)
        self.union_bytes += sum(t.numel() * t.element_size() for t in union if t is not None)

    def conv(self, node, m: PrunedConv2d, x: fx.Node, residual: Optional[fx.Node]) -> S.Step:
        in_masks, out_masks = (t.detach().to("cpu") > 0 for t in m.masks())
        w = self._acc(m.weight)
        scale, shift = self._acc(m.scale), self._acc(m.shift)
        x_sup = self.support_of(x)
        c_out = w.shape[0]
        shared = None
        block = graph.tied_block(m)  # 1: depthwise, > 1: grouped with C_in = C_out
        if m.groups == 1 or block:
            out = out_masks.clone()
            if residual is not None:
                out |= self.support_of(residual).masks
            out_sup = Support(c_out, out)
            # Packed over every channel the input holds (zero columns where the conv
            # reads none): the input never moves. A depthwise or grouped conv's
            # group j reads group j alone, so it reads exactly the channels it writes.
            target_in = out_sup if block else x_sup
        else:  # any other grouped conv is frozen: it reads and writes every channel
            target_in = Support.dense(self.D, x_sup.width)
            out_sup = Support.dense(self.D, c_out)
        if m.groups > 1 and block != 1:  # grouped, and not depthwise
            # The padded storage runs grouped convs as one union convolution with a
            # per-domain epilogue (its slots need not hold whole groups).
            gains = out_masks.to(device=w.device, dtype=w.dtype)
            if scale is not None:
                gains = gains * scale
            bias = None if shift is None else shift * out_masks.to(shift)
            shared = (m.weight.detach(), gains.to(self.dtype),
                      None if bias is None else bias.to(self.dtype))
        blocks, biases = [], []
        for d in range(self.D):
            rows, cols = out_sup.index(d).to(w.device), target_in.index(d).to(w.device)
            gain = out_masks[d].to(device=w.device, dtype=w.dtype)
            if scale is not None:
                gain = gain * scale[d]
            wd = w * gain[:, None, None, None]
            if m.groups == 1:
                wd = wd.index_select(0, rows).index_select(1, cols) * \
                    in_masks[d].to(device=w.device, dtype=w.dtype)[cols][None, :, None, None]
            elif block:  # the domain's groups of filters, each reading its own group
                if not bool(out_masks[d].any()):
                    # It writes nothing: its support's stand-in channel (an exact
                    # zero) is part of no group; no weight, the output is the bias.
                    wd = wd[:0]
                elif rows.numel() % block:
                    raise RuntimeError(f"internal error: {node.name} keeps part of a group "
                                       f"of {block} channels for domain {d}")
                else:
                    wd = wd.index_select(0, rows)
            bd = None if shift is None else (shift[d] * out_masks[d].to(shift)).index_select(0, rows)
            blocks.append(wd.permute(0, 2, 3, 1).to(self.dtype))  # (cout_d, kh, kw, cin_d)
            biases.append(None if bd is None else bd.to(self.dtype))
        r_move = Move(self.support_of(residual), out_sup) if residual is not None else None
        whole, whole_same = self._whole_conv(m, x_sup, out_sup, residual, in_masks, out_masks,
                                             scale, shift)
        return self.packed_conv(
            node, x, blocks, biases, [m.weight, m.scale, m.shift],
            self._winograd(m, self.shape(x), self.shape(node)),
            support=out_sup, residual=residual.name if residual is not None else None,
            x_move=Move(x_sup, target_in), residual_move=r_move, stride=m.stride,
            padding=m.padding, dilation=m.dilation, groups=m.groups,
            padding_mode=m.padding_mode, relu=m.relu, kernel_size=m.weight.shape[2:],
            shared=shared, tied=bool(block), whole=whole, whole_same=whole_same)

    def _whole_conv(self, m: PrunedConv2d, x_sup: Support, out_sup: Support,
                    residual: Optional[fx.Node], in_masks, out_masks, scale, shift):
        """(whole, whole_same) of :class:`steps.Conv`: where every domain reads and
        writes every channel (a frozen layer), domain d's weights are W scaled by
        its BatchNorm gain g_d per output channel, and the layer can run once over
        every row with g_d and the bias b_d applied per row."""
        if self.D == 1 or not (x_sup.is_dense and out_sup.is_dense and bool(in_masks.all())
                               and bool(out_masks.all())):
            return None, False
        if residual is not None and not self.support_of(residual).is_dense:
            return None, False
        w = m.weight.detach()
        gains = torch.ones((self.D, w.shape[0]), dtype=w.dtype, device=w.device) \
            if scale is None else scale
        same = bool((gains == gains[:1]).all()) and \
            (shift is None or bool((shift == shift[:1]).all()))
        if same:  # domain 0's packed weights and bias are every domain's
            return None, True
        whole = S.WholeConv(w.to(self.dtype), gains.to(self.dtype),
                            None if shift is None else shift.to(self.dtype))
        self._count([whole.weight], [])
        return whole, False

    def packed_conv(self, node, x: fx.Node, blocks: List[torch.Tensor],
                    biases: List[Optional[torch.Tensor]], union: List[Optional[torch.Tensor]],
                    use_winograd: bool, **conv) -> S.Conv:
        """The :class:`steps.Conv` of ``node`` on ``blocks``, each domain's weights as
        (cout_d, kh, kw, cin_d), and ``biases``; ``union`` are the union layer's
        tensors (for the memory count) and ``conv`` the step's other arguments."""
        # One flat buffer per layer, every domain's block after the previous one's:
        # the ragged storage reads views of it, the padded one the buffer itself.
        packed = Packed(blocks, biases, self.device)
        pixels = math.prod((self.shape(node) or ())[2:])
        for d, b in enumerate(blocks):
            self.cost[d] += b.numel() * pixels
        weights = [None if b.numel() == 0 else v.permute(0, 3, 1, 2)
                   for b, v in zip(blocks, packed.views())]
        self._count([packed.weight, packed.bias], union)
        step = S.Conv(node.name, x=x.name, weights=weights, biases=packed.bias_views(),
                      memory_format=self.fmt, **conv)
        step.packed = packed
        step.to(self.device)
        x_shape = self.shape(x)
        if use_winograd:
            step.winograd = [None if v is None else winograd.prepack(v.contiguous())
                             for v in weights]
            self._count(step.winograd, [])
            if step.whole is not None:  # the one weight all rows share, likewise
                step.whole.winograd = winograd.prepack(step.whole.weight.contiguous())
                self._count([step.whole.winograd], [])
        elif x_shape is not None and len(x_shape) == 4:
            h, w_ = x_shape[2:]
            if step.pad is not None:
                h, w_ = h + 2 * conv["padding"][0], w_ + 2 * conv["padding"][1]
            step.prepack((x_shape[0], x_shape[1], h, w_))
            if step.prepacked is not None:  # oneDNN's copy of the packed weights
                self._count(step.prepacked, [])
            if step.whole is not None and step.whole.prepacked is not None:
                self._count([step.whole.prepacked], [])  # and of the all-rows weight
        return step

    def _winograd(self, m: PrunedConv2d, x_shape, out_shape) -> bool:
        """Whether this convolution runs as Winograd F(4x4, 3x3) (fastmdl.winograd):
        float32 on a CPU with AVX-512 (elsewhere its portable path is no faster than
        oneDNN), 3x3 with stride 1, padding 1 and no dilation, and outputs of at
        least 8x8 pixels, with at least 16x16 or at most 128x128 channels (with few
        pixels and many channels its 4x larger weights cost more than it saves;
        measured in benchmarks/NOTES.md). FASTMDL_WINOGRAD=0 turns it off."""
        if os.environ.get("FASTMDL_WINOGRAD", "1") == "0" or self.dtype != torch.float32 \
                or self.device.type != "cpu" or self.fmt != torch.channels_last:
            return False
        if tuple(m.weight.shape[2:]) != (3, 3) or list(m.stride) != [1, 1] or \
                list(m.padding) != [1, 1] or list(m.dilation) != [1, 1] or m.groups != 1 \
                or m.padding_mode != "zeros" or m._unfolded is not None:
            return False
        if x_shape is None or out_shape is None or len(out_shape) != 4:
            return False
        h, w = out_shape[2:]
        if h < 8 or w < 8:
            return False
        if h * w < 256 and m.weight.shape[0] * m.weight.shape[1] > 128 * 128:
            return False
        return winograd.has_avx512()

    def affine(self, node, m: PrunedBatchNorm2d, x: fx.Node) -> S.Step:
        out_sup = Support(m.scale.shape[1], m.masks.detach().to("cpu") > 0)
        scales, shifts = [], []
        for d in range(self.D):
            idx = out_sup.index(d).to(m.scale.device)
            scales.append(m.scale.detach()[d].index_select(0, idx).contiguous())
            shifts.append(m.shift.detach()[d].index_select(0, idx).contiguous())
        self._count(scales + shifts, [m.scale, m.shift])
        step = S.Affine(node.name, out_sup, x.name, scales, shifts,
                        Move(self.support_of(x), out_sup))
        step.to(self.device)
        return step

    def head(self, node, m: PrunedHeads, x: fx.Node) -> S.Step:
        x_sup = self.support_of(x)
        widest = max(m.num_classes)
        masks = torch.zeros((self.D, widest), dtype=torch.bool)
        blocks, biases, start = [], [], 0
        for d, k in enumerate(m.num_classes):
            masks[d, :k] = True
            cols = x_sup.index(d).to(m.weight.device)
            blocks.append(m.weight.detach()[start:start + k].index_select(1, cols))
            biases.append(None if m.bias is None else m.bias.detach()[start:start + k])
            start += k
        packed = Packed(blocks, biases, self.device)
        for d, b in enumerate(blocks):
            self.cost[d] += b.numel()
        self._count([packed.weight, packed.bias], [m.weight, m.bias])
        out_sup = Support(widest, masks, float("-inf"))
        step = S.Linear(node.name, out_sup, x.name, packed.views(), packed.bias_views(), x_sup)
        step.packed = packed
        return step

    def conv_head(self, node, m: PrunedConvHeads, x: fx.Node) -> S.Step:
        """Each domain's own filters over the channels its input holds: a convolution
        whose output holds the domain's classes, 0 past them in the union."""
        x_sup = self.support_of(x)
        masks = torch.zeros((self.D, max(m.num_classes)), dtype=torch.bool)
        blocks, biases = [], []
        for d, k in enumerate(m.num_classes):
            masks[d, :k] = True
            rows, cols = m.domain_rows(d), x_sup.index(d).to(m.weight.device)
            blocks.append(m.weight.detach()[rows].index_select(1, cols).permute(0, 2, 3, 1)
                          .to(self.dtype))
            biases.append(None if m.bias is None else m.bias.detach()[rows].to(self.dtype))
        return self.packed_conv(
            node, x, blocks, biases, [m.weight, m.bias], False,
            support=Support(masks.shape[1], masks), residual=None,
            x_move=Move(x_sup, x_sup), residual_move=None, stride=m.stride,
            padding=m.padding, dilation=m.dilation, groups=1, padding_mode="zeros", relu=False,
            kernel_size=m.weight.shape[2:])

    def class_padding(self, node, m: ClassPadding, x: fx.Node) -> S.Step:
        """The logits' -inf past each domain's classes: each domain keeps its class
        columns (moved only where its input held others), held with fill -inf."""
        x_sup = self.support_of(x)
        classes = torch.logical_not(m.past.detach().to("cpu"))
        if x_sup.width != classes.shape[1]:
            return self.island(node, m, "class padding of a value that is not the logits")
        move = Move(x_sup, Support(x_sup.width, classes, x_sup.fill))
        return S.ClassPad(node.name, Support(x_sup.width, classes, float("-inf")), x.name, move)

    def linear(self, node, m: PrunedLinear) -> S.Step:
        x = node.args[0] if node.args else None
        if len(node.args) != 1 or node.kwargs or not isinstance(x, fx.Node) or \
                self.kinds[x.name] != S.BATCH or not self.support_of(x).has_channels or \
                self.support_of(x).fill != 0:
            return self.island(node, m, "a linear layer on an input the analysis lost")
        x_sup = self.support_of(x)
        out_sup = Support.dense(self.D, m.out_features)
        held = sum(x_sup.size(d) for d in range(self.D))
        if held > PACK_LIMIT * x_sup.width:
            self._count([], [m.weight, m.bias])
            step = S.Linear(node.name, out_sup, x.name, [None] * self.D, [None] * self.D, x_sup,
                            m.weight.detach(), None if m.bias is None else m.bias.detach())
            step.to(self.device)
            return step
        blocks = [m.weight.detach().index_select(1, x_sup.index(d).to(m.weight.device))
                  for d in range(self.D)]
        biases = [None if m.bias is None else m.bias.detach()] * self.D
        packed = Packed(blocks, biases, self.device)
        self._count([packed.weight, packed.bias], [m.weight, m.bias])
        step = S.Linear(node.name, out_sup, x.name, packed.views(), packed.bias_views(), x_sup)
        step.packed = packed
        return step


class Packed:
    """A layer's per-domain weights in one flat buffer (domain d's block, of any
    shape, after domain d-1's) and its per-domain biases likewise (None when the
    layer has none)."""

    def __init__(self, blocks: List[torch.Tensor], biases: List[Optional[torch.Tensor]],
                 device: torch.device):
        self.shapes = [tuple(b.shape) for b in blocks]
        self.weight = torch.cat([b.reshape(-1) for b in blocks]).to(device)
        self.bias_sizes = [0 if b is None else b.numel() for b in biases]
        have = [b for b in biases if b is not None]
        self.bias = torch.cat(have).to(device) if len(have) == len(biases) and have else None

    def views(self) -> List[torch.Tensor]:
        out, start = [], 0
        for shape in self.shapes:
            n = 1
            for v in shape:
                n *= v
            out.append(self.weight[start:start + n].view(shape))
            start += n
        return out

    def bias_views(self) -> List[Optional[torch.Tensor]]:
        if self.bias is None:
            return [None] * len(self.shapes)
        out, start = [], 0
        for n in self.bias_sizes:
            out.append(self.bias[start:start + n])
            start += n
        return out


