"""Channels-last blocks, rewritten to run channels-first (ConvNeXt's MLP).

ConvNeXt-style blocks permute (N, C, H, W) to (N, H, W, C), apply a LayerNorm
and ``nn.Linear`` layers over the last dim, and permute back. The channel
analysis follows dim 1 only, so such a block kept all its channels. But a linear
layer over the last dim of a channels-last tensor is a 1x1 convolution of the
channels-first one, a LayerNorm over it is a LayerNorm over dim 1, and
elementwise ops do not care where the channels are:

    permute(0,2,3,1) -> LayerNorm(C) -> Linear(C, 4C) -> GELU -> Linear(4C, C) -> * g -> permute(0,3,1,2)
    ==  ChannelLayerNorm(C) -> Conv2d(C, 4C, 1) -> GELU -> Conv2d(4C, C, 1) -> * g.view(C, 1, 1)

:func:`to_channels_first` makes that rewrite on a traced model, so the MLP's
hidden channels become an ordinary mask group (prunable per domain) and the
norm one step of the compact layout instead of three. It rewrites a *region*
only when every op between the two permutes is one it knows (see ``_convertible``)
and nothing outside the region reads a channels-last value; otherwise the region
is left as traced and the analysis keeps its channels whole, as before.
"""

from __future__ import annotations

import operator
from typing import List, Optional, Set

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

_TO_LAST = (0, 2, 3, 1)
_TO_FIRST = (0, 3, 1, 2)

# Ops that act on each element alone: the same result in either layout.
_ELEMENTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Mish,
                        nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Dropout,
                        nn.Identity)
_ELEMENTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu,
                          F.mish, F.hardswish, F.hardsigmoid, torch.sigmoid, F.sigmoid,
                          torch.tanh, F.dropout, torch.clone}
_ELEMENTWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone"}
_BINARY_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul,
                     operator.imul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div}
_BINARY_METHODS = {"add", "sub", "mul", "div"}


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over dim 1 of (N, C, ...): for each sample and pixel,
    y_c = (x_c - mean_c x) / sqrt(var_c x + eps) * weight_c + bias_c, the LayerNorm
    a channels-last block applies before its permute back (torchvision's
    ``LayerNorm2d``). ``normalized_shape`` is C or (C,); the arguments are
    ``nn.LayerNorm``'s."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True, device=None, dtype=None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"normalized_shape must be C or (C,): a norm over the channels "
                             f"alone, got {tuple(self.normalized_shape)}")

    @classmethod
    def from_layer_norm(cls, ln: nn.LayerNorm) -> "ChannelLayerNorm":
        """The same normalisation as ``ln`` (over the last dim), applied over dim 1."""
        if len(ln.normalized_shape) != 1:
            raise ValueError(f"ln must normalise one dim, got normalized_shape "
                             f"{tuple(ln.normalized_shape)}")
        p = ln.weight
        out = cls(ln.normalized_shape[0], ln.eps, ln.elementwise_affine, ln.bias is not None,
                  device=None if p is None else p.device, dtype=None if p is None else p.dtype)
        out.load_state_dict(ln.state_dict())
        out.train(ln.training)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # movedim makes a channels_last tensor's C the contiguous last dim: no copy.
        y = F.layer_norm(x.movedim(1, -1), self.normalized_shape, self.weight, self.bias,
                         self.eps)
        return y.movedim(-1, 1)


def linear_as_conv(linear: nn.Linear) -> nn.Conv2d:
    """The 1x1 convolution computing ``linear`` over dim 1 of (N, C, H, W):
    conv(x)[n, o, h, w] = sum_i W[o, i] x[n, i, h, w] + b[o]."""
    w = linear.weight
    conv = nn.Conv2d(linear.in_features, linear.out_features, 1, bias=linear.bias is not None,
                     device=w.device, dtype=w.dtype)
    with torch.no_grad():
        conv.weight.copy_(w[:, :, None, None])
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    conv.train(linear.training)
    return conv


def to_channels_first(gm: fx.GraphModule, root: Optional[nn.Module] = None) -> int:
    """Rewrite, in place, every channels-last region of the shape-propagated ``gm``
    (see the module docstring) to run channels-first; return how many were
    rewritten. ``gm`` computes the same function afterwards, to float rounding.
    ``root``, the module ``gm`` was traced from, tells which layer owns the tensors
    of a traced-through LayerNorm (``gm`` keeps only the tensors themselves)."""
    modules = dict((root if root is not None else gm).named_modules())
    calls = _module_calls(gm)
    done = 0
    for node in list(gm.graph.nodes):
        if not _is_permute(node, _TO_LAST) or _rank(node.args[0]) != 4:
            continue
        region = _region(node, modules, calls)
        if region is not None:
            _rewrite(gm, node, *region, modules, calls)
            done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _region(start: fx.Node, modules, calls):
    """(inside, exits) of the channels-last region that ``start`` opens, or None if
    it cannot be rewritten. ``inside`` holds the ops on channels-last values (in
    graph order), ``exits`` the permutes back."""
    inside: List[fx.Node] = []
    values: Set[fx.Node] = {start}
    exits: List[fx.Node] = []
    node = start.next
    while node.op != "root":
        reads = [a for a in _tensor_args(node) if a in values]
        if reads:
            if _is_permute(node, _TO_FIRST) and node.args[0] in values:
                exits.append(node)
            elif _convertible(node, values, modules, calls):
                inside.append(node)
                values.add(node)
            else:
                return None
        node = node.next
    return (inside, exits) if exits else None


def _convertible(node: fx.Node, values: Set[fx.Node], modules, calls) -> bool:
    """Whether ``node``, which reads some of the channels-last ``values``, computes
    the same channels-first."""
    args = _tensor_args(node)
    if node.op == "call_module":
        m = modules[node.target]
        if len(args) != 1 or node.kwargs:
            return False
        if type(m) in (nn.Linear, nn.LayerNorm):
            # Replaced by its channels-first form: no other call may still need it.
            return calls.get(node.target, 0) == 1 and (
                type(m) is nn.Linear or len(m.normalized_shape) == 1)
        return isinstance(m, _ELEMENTWISE_MODULES)  # shared ones are fine
    if node.op == "call_function" and node.target is F.layer_norm:
        return _layer_norm_module(node, modules, calls) is not None
    fn = node.target if node.op == "call_function" else None
    name = node.target if node.op == "call_method" else None
    if fn in _ELEMENTWISE_FUNCTIONS or name in _ELEMENTWISE_METHODS:
        return len(args) == 1 and all(not isinstance(v, fx.Node) for v in node.kwargs.values())
    if fn in _BINARY_FUNCTIONS or name in _BINARY_METHODS:
        operands = list(node.args[:2])
        if len(operands) != 2 or set(node.kwargs) - {"alpha"}:
            return False
        c = _shape(node)[-1] if _shape(node) is not None else None
        return all(a in values or _is_number(a) or _is_channel_vector(a, c) for a in operands)
    return False


def _layer_norm_module(node: fx.Node, modules, calls) -> Optional[str]:
    """The LayerNorm module that owns ``F.layer_norm``'s weight and bias in ``node``
    (torchvision's ``LayerNorm2d`` calls the function on its own tensors), if any."""
    args = list(node.args) + [None] * (5 - len(node.args))
    kw = node.kwargs
    shape = kw.get("normalized_shape", args[1])
    weight, bias = kw.get("weight", args[2]), kw.get("bias", args[3])
    if not isinstance(weight, fx.Node) or weight.op != "get_attr" or \
            not isinstance(shape, (list, tuple)) or len(shape) != 1:
        return None
    owner = weight.target.rpartition(".")[0]
    m = modules.get(owner)
    if not isinstance(m, nn.LayerNorm) or weight.target != f"{owner}.weight" or \
            list(m.normalized_shape) != list(shape) or \
            kw.get("eps", args[4] if args[4] is not None else 1e-5) != m.eps:
        return None
    if (bias is None) != (m.bias is None) or \
            (bias is not None and (not isinstance(bias, fx.Node) or bias.target != f"{owner}.bias")):
        return None
    if calls.get(owner, 0) != 0 or _attr_reads(node.graph, owner) != (2 if bias is not None else 1):
        return None
    return owner


def _rewrite(gm: fx.GraphModule, start: fx.Node, inside: List[fx.Node],
             exits: List[fx.Node], modules, calls) -> None:
    g = gm.graph
    for node in inside:
        if node.op == "call_module":
            m = gm.get_submodule(node.target)
            if type(m) is nn.Linear:
                _set_module(gm, node.target, linear_as_conv(m))
            elif type(m) is nn.LayerNorm:
                _set_module(gm, node.target, ChannelLayerNorm.from_layer_norm(m))
        elif node.op == "call_function" and node.target is F.layer_norm:
            owner = _layer_norm_module(node, modules, calls)
            _set_module(gm, owner, ChannelLayerNorm.from_layer_norm(modules[owner]))
            with g.inserting_before(node):
                new = g.call_module(owner, (node.args[0],))
            node.replace_all_uses_with(new)
            attrs = [a for a in _tensor_args(node) if a.op == "get_attr"]
            g.erase_node(node)
            for a in attrs:
                if not a.users:
                    g.erase_node(a)
            inside[inside.index(node)] = new
        else:
            for i, a in enumerate(node.args[:2]):
                if isinstance(a, fx.Node) and a.op == "get_attr" and a not in inside:
                    with g.inserting_before(node):
                        column = g.call_method("view", (a, -1, 1, 1))
                    node.update_arg(i, column)
    for node in exits:
        node.replace_all_uses_with(node.args[0])
        g.erase_node(node)
    start.replace_all_uses_with(start.args[0])
    g.erase_node(start)


def _module_calls(gm: fx.GraphModule) -> dict:
    calls: dict = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    return calls


def _attr_reads(g: fx.Graph, owner: str) -> int:
    return sum(len(n.users) for n in g.nodes
               if n.op == "get_attr" and n.target.startswith(owner + "."))


def _set_module(gm: fx.GraphModule, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, child, new)


def _is_permute(node: fx.Node, dims) -> bool:
    if node.op == "call_function" and node.target is torch.permute:
        given = node.args[1] if len(node.args) > 1 else node.kwargs.get("dims")
    elif node.op == "call_method" and node.target == "permute":
        given = node.args[1:]
        if len(given) == 1 and isinstance(given[0], (list, tuple)):
            given = given[0]
        given = given or node.kwargs.get("dims")
    else:
        return False
    if not isinstance(given, (list, tuple)) or len(given) != 4 or \
            not all(isinstance(d, int) for d in given):
        return False
    return tuple(d % 4 for d in given) == dims


def _shape(node) -> Optional[torch.Size]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


def _rank(node) -> int:
    s = _shape(node)
    return len(s) if s is not None else -1


def _tensor_args(node: fx.Node) -> List[fx.Node]:
    found: List[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), found.append)
    return found


def _is_number(a) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool)


def _is_channel_vector(a, width: Optional[int]) -> bool:
    """A parameter or buffer of shape (C,): it scales or shifts the last dim of a
    channels-last value, and dim 1 once viewed as (C, 1, 1)."""
    return isinstance(a, fx.Node) and a.op == "get_attr" and width is not None and \
        _shape(a) is not None and tuple(_shape(a)) == (width,)
