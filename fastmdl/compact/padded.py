"""The compact network with static shapes: every segment padded to the widest domain.

The ragged storage (one tensor per domain, ``steps.py``) needs each domain's
sample count on the host, so its shapes change with the batch's domain mix.
This storage keeps ONE tensor per value, (N, P, ...) with the rows sorted by
domain: row r of domain d holds its |S_d| channels in slots [0, |S_d|) and
zeros in the slots after them (``P`` is the widest domain, rounded up to 16 so
the GPU kernel's channel loads are aligned). The grouping is computed with device
ops only, and each convolution is one ``fastmdl::segment_conv2d`` call over all
segments, so a forward pass traces under ``torch.compile(fullgraph=True)`` and
replays from a CUDA graph for any domain mix: it is what runs on a GPU (one
Triton launch per convolution) and under torch.compile.

Where a value must change support (a concatenation, an add of two branches that
hold different channels, the way back to the union layout) a per-domain slot
table turns into one indexed gather.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.immutable_collections import immutable_dict, immutable_list

from .. import _shapes
from . import steps as S
from .support import Support

SLOT_ALIGN = 16


def slots(support: Support, align: int = 1) -> int:
    """The channel slots of a value with this support: the union's width when every
    domain holds every channel (nothing to pad), else the widest domain, rounded
    up to ``align``."""
    if not support.has_channels:
        return 0
    if support.is_dense:
        return support.width
    widest = max(support.size(d) for d in range(support.masks.shape[0]))
    return -(-max(1, widest) // align) * align


class State:
    """The batch grouped by domain with device ops only (no host synchronisation)."""

    def __init__(self, x: torch.Tensor, domain, num_domains: int):
        n, dev = x.shape[0], x.device
        if isinstance(domain, int):
            domain = torch.full((n,), domain, dtype=torch.int64, device=dev)
        self.x, self.domain, self.num_domains = x, domain, num_domains
        self.order = torch.argsort(domain, stable=True)
        self.inverse = torch.empty_like(self.order).scatter_(
            0, self.order, torch.arange(n, device=dev))
        self.row_domain = domain.index_select(0, self.order)
        counts = torch.zeros(num_domains, dtype=torch.int64, device=dev).index_add_(
            0, domain, torch.ones_like(domain))
        self.offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        self.rows = torch.arange(n, device=dev)
        self.union: Dict[str, torch.Tensor] = {}


class Layout:
    """A batch value's support and slot count."""

    __slots__ = ("support", "slots")

    def __init__(self, support: Support, n_slots: int):
        self.support, self.slots = support, n_slots


def _table(src: Layout, dst: Layout, through: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(D, dst.slots) int64: for each slot of the destination, the source slot holding
    the same union channel (with ``through``, union channel ``through[c]`` for the
    destination's channel c: a channel selection), or src.slots (the fill column)
    where the source has none."""
    d_count = dst.support.masks.shape[0]
    out = torch.full((d_count, dst.slots), src.slots, dtype=torch.int64)
    for d in range(d_count):
        rank = torch.full((src.support.width,), src.slots, dtype=torch.int64)
        s = src.support.index(d)
        rank[s] = torch.arange(s.numel())
        t = dst.support.index(d)
        out[d, :t.numel()] = rank[t if through is None else through[t]]
    return out


def _take(t: torch.Tensor, table: torch.Tensor, state: State, fill: float) -> torch.Tensor:
    """Row r's slot j of the result is slot table[domain_r, j] of t (fill past its slots)."""
    ext = torch.cat([t, t.new_full((t.shape[0], 1) + tuple(t.shape[2:]), fill)], dim=1)
    index = table.index_select(0, state.row_domain)
    out = ext[state.rows[:, None], index]
    return out.contiguous(memory_format=torch.channels_last) if out.dim() == 4 else out


class PaddedPlan:
    """Runs a :class:`CompactPlan` in the padded storage. ``backend`` of the
    convolutions: "auto" (Triton on CUDA, the reference elsewhere), "reference"
    or "triton"; ``align``: channel slots and packed channels rounded up to a
    multiple of it (default SLOT_ALIGN on CUDA, 1 elsewhere)."""

    def __init__(self, plan, backend: str = "auto", align: Optional[int] = None):
        self.plan, self.backend = plan, backend
        # Aligned channel slots feed the GPU kernel's vector loads; the CPU's
        # per-segment convolutions gain nothing from them.
        if align is None:
            align = SLOT_ALIGN if plan.device.type == "cuda" else 1
        self.align = align
        self.layouts: Dict[str, Layout] = {}
        self.prepared: Dict[str, Any] = {}
        self.union_tables: Dict[str, Optional[torch.Tensor]] = {}
        device = plan.device
        for step in plan.steps:
            self.prepared[step.name] = self._prepare(step, device)
            lay = self.layouts.get(step.name)
            if lay is not None and lay.support is not None:
                self.union_tables[step.name] = self._union_table(lay, device)

    def _union_table(self, lay: Layout, device) -> Optional[torch.Tensor]:
        """The gather that puts a value back in the union's channels, None if it holds them."""
        sup = lay.support
        if not sup.has_channels or (sup.is_dense and lay.slots == sup.width):
            return None
        dense = Layout(Support.dense(self.plan.num_domains, sup.width, sup.fill), sup.width)
        return _table(lay, dense).to(device)

    # -- preparation (once) -------------------------------------------------------------

    def slots(self, support: Support) -> int:
        return slots(support, self.align)

    def _layout(self, name: str) -> Layout:
        return self.layouts[name]

    def _move_table(self, src: Layout, dst: Layout, device) -> Optional[torch.Tensor]:
        if src.slots == dst.slots and src.support.same_channels(dst.support):
            return None
        if not src.support.has_channels:
            return None
        return _table(src, dst).to(device)

    def _prepare(self, step: S.Step, device) -> Any:
        if isinstance(step, S.Input):
            self.layouts[step.name] = Layout(step.support, step.support.width)
            return None
        if isinstance(step, S.Conv):
            return self._prepare_conv(step, device)
        if isinstance(step, S.ClassPad):
            return self._reindexed(step, device)[2]
        if isinstance(step, S.Affine):
            _, out, table = self._reindexed(step, device)
            scale = torch.zeros((self.plan.num_domains, out.slots), dtype=self.plan.dtype)
            shift = torch.zeros_like(scale)
            for d in range(self.plan.num_domains):
                k = step.support.size(d)
                scale[d, :k] = step.scales[d].cpu()
                shift[d, :k] = step.shifts[d].cpu()
            return (table, scale.to(device), shift.to(device))
        if isinstance(step, S.Linear):
            return self._prepare_linear(step, device)
        if isinstance(step, S.Select):
            x = self._layout(step.x)
            out = Layout(step.support, self.slots(step.support))
            self.layouts[step.name] = out
            return _table(x, out, step.index).to(device)
        if isinstance(step, S.Flatten):
            x = self._layout(step.x)
            pixels = step.support.width // x.support.width
            self.layouts[step.name] = Layout(step.support, x.slots * pixels)
            return None
        if isinstance(step, S.Map):
            return self._prepare_map(step, device)
        if isinstance(step, S.Alias):
            self.layouts[step.name] = self._layout(step.x)
            return None
        if isinstance(step, S.Island):
            if step.support is not None:
                self.layouts[step.name] = Layout(step.support, step.support.width)
            return None
        return None

    def _reindexed(self, step: S.Step, device):
        """(input layout, output layout, the gather between them or None) of a step
        whose value is its input's on the step's own support."""
        x = self._layout(step.x)
        out = Layout(step.support, x.slots if x.support.same_channels(step.support)
                     else self.slots(step.support))
        self.layouts[step.name] = out
        return x, out, self._move_table(x, out, device)

    def _prepare_map(self, step: S.Map, device):
        batch = []
        fx.node.map_arg((step.args.args, step.args.kwargs), lambda n: batch.append(n.name)
                        if step.args.kinds[n.name] == S.BATCH else None)
        out_sup = step.support
        cat = step.fn is torch.cat or getattr(step.fn, "__name__", None) == "cat"
        if cat:
            # torch.cat of padded parts leaves each part's slots after the previous
            # part's padding; one gather closes the gaps.
            parts = [self._layout(n) for n in batch]
            glued = Layout(out_sup, sum(p.slots for p in parts))
            table = torch.full((self.plan.num_domains, self.slots(out_sup)), glued.slots,
                               dtype=torch.int64)
            for d in range(self.plan.num_domains):
                j = base = 0
                for p in parts:
                    k = p.support.size(d)
                    table[d, j:j + k] = torch.arange(base, base + k)
                    j, base = j + k, base + p.slots
            out = Layout(out_sup, self.slots(out_sup))
            self.layouts[step.name] = out
            return ("cat", table.to(device))
        if out_sup is None or not out_sup.has_channels:
            self.layouts[step.name] = Layout(out_sup, 0) if out_sup is not None else None
            return ("map", {})
        same = [self._layout(n).slots for n in batch
                if self._layout(n).support.same_channels(out_sup)]
        n_slots = max(same) if same else self.slots(out_sup)
        out = Layout(out_sup, n_slots)
        self.layouts[step.name] = out
        tables = {}
        for n in batch:
            src = self._layout(n)
            move = step.args.moves.get(n)
            target = move.target if move is not None else src.support
            if target.width != out_sup.width:  # a broadcast operand: (n, 1, ...) stays whole
                dst = Layout(target, self.slots(target))
            else:
                dst = Layout(target, n_slots)
            table = self._move_table(src, dst, device)
            if table is not None:
                tables[n] = (table, src.support.fill)
        return ("map", tables)

    def _prepare_conv(self, step: S.Conv, device):
        x = self._layout(step.x)
        out = Layout(step.support, self.slots(step.support))
        self.layouts[step.name] = out
        res_table = None
        if step.residual is not None:
            res_table = self._move_table(self._layout(step.residual), out, device)
        if step.tied and step.shared is None:  # depthwise
            return self._prepare_depthwise(step, x, out, res_table, device)
        if step.shared is not None:  # any other grouped conv: dense in, dense out
            dense_in = Layout(Support.dense(self.plan.num_domains, x.support.width),
                              x.support.width)
            c_out = step.shared[0].shape[0]
            dense_out = Layout(Support.dense(self.plan.num_domains, c_out), c_out)
            # A tied grouped conv's output lives in the domains' own slots.
            return ("shared", self._move_table(x, dense_in, device), res_table,
                    self._move_table(dense_out, out, device))
        cin = [step.x_move.target.size(d) for d in range(self.plan.num_domains)]
        cout = [step.support.size(d) for d in range(self.plan.num_domains)]
        flat, cin = self._aligned(step.packed, cin, cout, x.slots, step.kernel_size)
        return ("segment", flat, step.packed.bias, cin, cout, res_table)

    def _prepare_depthwise(self, step: S.Conv, x: Layout, out: Layout, res_table, device):
        """A depthwise conv reads the slots it writes: (D, slots, kh, kw) filters and
        (D, slots) biases, domain d's in its first |S_d| slots and zeros after them
        (so the padding slots stay 0)."""
        kh, kw = step.kernel_size
        num_domains = self.plan.num_domains
        weight = torch.zeros((num_domains, out.slots, kh, kw), dtype=self.plan.dtype)
        bias = None if step.packed.bias is None else \
            torch.zeros((num_domains, out.slots), dtype=self.plan.dtype)
        for d, (w, b) in enumerate(zip(step.packed.views(), step.packed.bias_views())):
            weight[d, :w.shape[0]] = w[..., 0].cpu()  # (cout_d, kh, kw, 1) as packed
            if bias is not None:
                bias[d, :b.numel()] = b.cpu()
        x_table = self._move_table(x, Layout(step.x_move.target, out.slots), device)
        return ("depthwise", x_table, weight.to(device),
                None if bias is None else bias.to(device), res_table)

    def _aligned(self, packed, cin: List[int], cout: List[int], x_slots: int, kernel):
        """The layer's flat weights, each domain's channels padded to the alignment
        with zero filters' columns when the input's slots allow it (a copy on a GPU;
        the ragged storage's own buffer otherwise)."""
        if self.align == 1 or x_slots % self.align:
            return packed.weight, cin
        padded = [-(-c // self.align) * self.align for c in cin]
        if padded == cin:
            return packed.weight, cin
        kh, kw = kernel
        blocks = []
        for view, ci, cp, co in zip(packed.views(), cin, padded, cout):
            block = view.new_zeros((co, kh * kw, cp))
            block[..., :ci] = view.reshape(co, kh * kw, ci)
            blocks.append(block.reshape(-1))
        return torch.cat(blocks), padded

    def _prepare_linear(self, step: S.Linear, device):
        x = self._layout(step.x)
        if step.weights[0] is None:  # the shared weight, on scattered features
            dense = Layout(Support.dense(self.plan.num_domains, x.support.width), x.support.width)
            self.layouts[step.name] = Layout(step.support, step.support.width)
            return ("shared", self._move_table(x, dense, device))
        self.layouts[step.name] = Layout(step.support, self.slots(step.support))
        cin = [w.shape[1] for w in step.weights]
        cout = [w.shape[0] for w in step.weights]
        flat, cin = self._aligned(step.packed, cin, cout, x.slots, (1, 1))
        return ("segment", flat, step.packed.bias, cin, cout, None)

    # -- running --------------------------------------------------------------------------------

    def __call__(self, x: torch.Tensor, domain) -> Any:
        state = State(x, domain, self.plan.num_domains)
        env: Dict[str, Any] = {}
        out = None
        for step, drop in zip(self.plan.steps, self.plan._drop):
            out = env[step.name] = self._run(step, env, state)
            for name in drop:
                del env[name]
                state.union.pop(name, None)
        return out

    def _union(self, name: str, env, state: State) -> torch.Tensor:
        if name not in state.union:
            t = env[name]
            table = self.union_tables[name]
            if table is not None:
                t = _take(t, table, state, self._layout(name).support.fill)
            state.union[name] = t.index_select(0, state.inverse)
        return state.union[name]

    def _args(self, args: S.Args, env, state: State, tables=None, union=False):
        def pick(node: fx.Node):
            kind = args.kinds[node.name]
            if kind == S.DOMAIN:
                return state.domain
            if kind == S.BATCH:
                if union:
                    return self._union(node.name, env, state)
                value = env[node.name]
                if tables and node.name in tables:
                    table, fill = tables[node.name]
                    value = _take(value, table, state, fill)
                return value
            return env[node.name]
        return _plain(fx.node.map_arg(args.args, pick)), _plain(fx.node.map_arg(args.kwargs, pick))

    def _run(self, step: S.Step, env, state: State) -> Any:
        prep = self.prepared[step.name]
        if isinstance(step, S.Input):
            return state.x.index_select(0, state.order).contiguous(
                memory_format=torch.channels_last)
        if isinstance(step, S.Conv):
            return self._conv(step, prep, env, state)
        if isinstance(step, S.Affine):
            table, scale, shift = prep
            x = env[step.x]
            if table is not None:
                x = _take(x, table, state, 0.0)
            shape = (x.shape[0], -1) + (1,) * (x.dim() - 2)
            return torch.addcmul(shift.index_select(0, state.row_domain).view(shape), x,
                                 scale.index_select(0, state.row_domain).view(shape))
        if isinstance(step, S.ClassPad):
            x = env[step.x]
            return x if prep is None else _take(x, prep, state, self._layout(step.x).support.fill)
        if isinstance(step, S.Linear):
            x = env[step.x]
            if prep[0] == "shared":
                if prep[1] is not None:
                    x = _take(x, prep[1], state, 0.0)
                return F.linear(x, step.shared, step.shared_bias)
            _, flat, bias, cin, cout, _ = prep
            y = torch.ops.fastmdl.segment_conv2d(
                x.reshape(x.shape[0], -1, 1, 1), state.offsets, flat, bias, None, cin, cout,
                self.layouts[step.name].slots, [1, 1], [1, 1], [0, 0], [1, 1], False,
                self.backend)
            return y.reshape(y.shape[0], -1)
        if isinstance(step, S.Select):
            return _take(env[step.x], prep, state, self._layout(step.x).support.fill)
        if isinstance(step, S.Flatten):
            return env[step.x].flatten(1)
        if isinstance(step, S.Alias):
            return env[step.x]
        if isinstance(step, S.Map):
            if prep[0] == "cat":
                a, k = self._args(step.args, env, state)
                return _take(step.fn(*a, **k), prep[1], state, 0.0)
            a, k = self._args(step.args, env, state, prep[1])
            return step.fn(*a, **k)
        if isinstance(step, S.Shape):
            x = env[step.x]
            sup = step.x_support
            shape = tuple(x.shape)
            if sup.has_channels:
                shape = (shape[0], sup.width) + shape[2:]
            proxy = S._ShapeProxy(torch.Size(shape), x)
            a, k = self._args(step.args, env, state)
            a = tuple(proxy if v is x else v for v in a)
            return step.fn(*a, **k)
        if isinstance(step, (S.PerPart, S.Plain)):
            a, k = self._args(step.args, env, state)
            return step.fn(*a, **k)
        if isinstance(step, S.Island):
            a, k = self._args(step.args, env, state, union=True)
            out = step.fn(*a, **k)
            if step.kind == S.PLAIN:
                return out
            state.union[step.name] = out
            out = out.index_select(0, state.order)
            return out.contiguous(memory_format=torch.channels_last) if out.dim() == 4 else out
        if isinstance(step, S.Output):
            a, _ = self._args(step.args, env, state, union=True)
            return a[0]
        raise TypeError(f"internal error: no padded form of step {type(step).__name__}")

    def _conv(self, step: S.Conv, prep, env, state: State) -> torch.Tensor:
        # A fused activation maps 0 to 0: the padding slots stay 0.
        y = self._conv_relu(step, prep, env, state)
        return y if step.act is None else step.act.fn(y)

    def _conv_relu(self, step: S.Conv, prep, env, state: State) -> torch.Tensor:
        x = env[step.x]
        residual = env[step.residual] if step.residual is not None else None
        if prep[0] == "depthwise":
            _, x_table, weight, bias, res_table = prep
            if x_table is not None:
                x = _take(x, x_table, state, 0.0)
            if step.pad is not None:
                x = F.pad(x, step.pad[0], mode=step.pad[1])
            z = _rowwise_depthwise(x, weight.index_select(0, state.row_domain), step)
            if bias is not None:
                z = z + bias.index_select(0, state.row_domain)[:, :, None, None]
        elif prep[0] == "shared":
            _, x_table, res_table, out_table = prep
            if x_table is not None:
                x = _take(x, x_table, state, 0.0)
            if step.pad is not None:
                x = F.pad(x, step.pad[0], mode=step.pad[1])
            weight, gain, bias = step.shared
            z = F.conv2d(x, weight, None, step.stride, step.padding, step.dilation, step.groups)
            z = z * gain.index_select(0, state.row_domain)[:, :, None, None]
            if bias is not None:
                z = z + bias.index_select(0, state.row_domain)[:, :, None, None]
            if out_table is not None:
                z = _take(z, out_table, state, 0.0)
        else:
            _, flat, bias, cin, cout, res_table = prep
            if step.pad is not None:
                x = F.pad(x, step.pad[0], mode=step.pad[1])
            if residual is not None and res_table is not None:
                residual = _take(residual, res_table, state, 0.0)
            return torch.ops.fastmdl.segment_conv2d(
                x, state.offsets, flat, bias, residual, cin, cout, self.layouts[step.name].slots,
                list(step.kernel_size), list(step.stride), list(step.padding),
                list(step.dilation), step.relu, self.backend)
        if residual is not None:
            if res_table is not None:
                residual = _take(residual, res_table, state, 0.0)
            z = z + residual
        z = torch.relu(z) if step.relu else z
        return z.contiguous(memory_format=torch.channels_last)


def _plain(value: Any) -> Any:
    """fx's immutable lists and dicts as plain ones: torch.compile cannot pass an
    immutable_list (``torch.cat``'s tensors) to an op."""
    if isinstance(value, immutable_list) or type(value) is list:
        return [_plain(v) for v in value]
    if type(value) is tuple:
        return tuple(_plain(v) for v in value)
    if isinstance(value, immutable_dict) or type(value) is dict:
        return {k: _plain(v) for k, v in value.items()}
    return value


def _rowwise_depthwise(x: torch.Tensor, weight: torch.Tensor, step: S.Conv) -> torch.Tensor:
    """Row r of ``x`` (N, P, H, W) filtered slot by slot with its own ``weight[r]``
    (N, P, kh, kw): the batch folded into the channels of one depthwise call."""
    n, p = x.shape[0], x.shape[1]
    if n * p == 0:
        ho, wo = _shapes.conv_output_hw(x.shape[2:], step.kernel_size, step.stride,
                                        step.padding, step.dilation)
        return x.new_zeros((n, p, ho, wo))
    z = F.conv2d(x.reshape((1, n * p) + tuple(x.shape[2:])),
                 weight.reshape((n * p, 1) + tuple(weight.shape[2:])), None, step.stride,
                 step.padding, step.dilation, n * p)
    return z.reshape((n, p) + tuple(z.shape[2:]))
