"""Which layer of a traced model is its classifier head, found walking back from
the model's output:

- through dropout to an ``nn.Linear`` (or a :class:`fastmdl.DomainHeads`): a
  linear head;
- through ops that keep channels apart and each sample to itself (activations,
  dropout, pooling, a mean or max over the pixels, a flatten or view that leaves
  the channels on dim 1) to an ``nn.Conv2d`` (or a :class:`fastmdl.ConvHeads`)
  called once, when the output is then (N, classes): a convolutional head, as in
  SqueezeNet. Its channel k stays class k up to the output, so each domain's
  classes are its own filters and the padding past them never mixes in.

Anything else is refused with a ``ValueError`` that names the op in the way.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import graph
from .conv_heads import ConvHeads
from .layers import DomainHeads

_LINEAR_PASSES = (nn.Dropout, nn.Identity)
_APART_MODULES = graph._KEEP_MODULES + graph._GATE_MODULES
_APART_METHODS = graph._KEEP_METHODS | graph._GATE_METHODS
_RESHAPES = {torch.flatten, torch.reshape, torch.squeeze, "flatten", "view", "reshape", "squeeze"}
_ALLOWED = ("activations, dropout, pooling, a mean or max over the pixels, a flatten of a "
            "1x1 map")


def find_head(gm: fx.GraphModule) -> str:
    """The name of the classifier head of the shape-propagated trace ``gm`` (see the
    module docstring); raises ``ValueError`` saying why there is none."""
    modules = dict(gm.named_modules())
    output = next(n for n in gm.graph.nodes if n.op == "output")
    node = output.args[0]
    path: List[fx.Node] = []  # the ops between the head and the output, output first
    while isinstance(node, fx.Node) and node.op.startswith("call_"):
        m = modules[node.target] if node.op == "call_module" else None
        if isinstance(m, (nn.Linear, DomainHeads)):
            bad = next((n for n in reversed(path) if not _passes_to_linear(n, modules)), None)
            if bad is None:
                return node.target
            raise ValueError(f"could not find the classifier head: the model's output comes "
                             f"from the linear layer {node.target!r} through "
                             f"{_describe(bad, modules)}; a linear head may be followed by "
                             f"dropout only")
        if isinstance(m, (nn.Conv2d, ConvHeads)):
            _check_conv_head(gm, node, path, modules, output.args[0])
            return node.target
        path.append(node)
        node = node.args[0] if node.args else None
    where = f" (it comes from {_describe(path[-1], modules)})" if path else ""
    raise ValueError("could not find the classifier head: the model's output must come from "
                     "an nn.Linear (possibly through dropout), or from an nn.Conv2d through "
                     f"ops that keep its channels apart ({_ALLOWED}), or be a "
                     f"fastmdl.DomainHeads or fastmdl.ConvHeads{where}")


def _passes_to_linear(node: fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _LINEAR_PASSES)
    return node.op == "call_function" and node.target is F.dropout


def _check_conv_head(gm: fx.GraphModule, conv: fx.Node, path: List[fx.Node],
                     modules: Dict[str, nn.Module], out: fx.Node) -> None:
    name = conv.target
    calls = sum(1 for n in gm.graph.nodes if n.op == "call_module" and n.target == name)
    if calls > 1:
        raise ValueError(f"the classifier head is the convolution {name!r}, but the model "
                         f"calls it {calls} times; a head is called once")
    for node in reversed(path):  # from the convolution on
        why = _mixes(node, modules)
        if why is not None:
            raise ValueError(
                f"the model's output comes from the convolution {name!r} through "
                f"{_describe(node, modules)}, which {why}: a convolutional classifier head "
                f"may reach the output only through ops that keep its channels apart "
                f"({_ALLOWED})")
    shape = _shape(out)
    conv_shape = _shape(conv)
    if shape is None or len(shape) != 2 or conv_shape is None or shape[1] != conv_shape[1]:
        raise ValueError(
            f"the model's output comes from the convolution {name!r} but has shape "
            f"{tuple(shape) if shape is not None else None}, not (N, classes) with its "
            f"{conv_shape[1] if conv_shape else '?'} channels: fastmdl's classifier heads give "
            "(N, classes) logits; pool the map (e.g. nn.AdaptiveAvgPool2d(1), then "
            "torch.flatten(x, 1)) to classify whole images")


def _mixes(node: fx.Node, modules: Dict[str, nn.Module]) -> Optional[str]:
    """None when ``node`` keeps the channels of its first input apart, per sample,
    and reads no other tensor; else what it does instead."""
    found: List[fx.Node] = []
    fx.node.map_arg((node.args[1:], node.kwargs), found.append)
    other = next((a for a in found if _shape(a) is not None), None)
    if other is not None:
        return f"also reads the tensor {other.name!r}"
    target = node.target
    if node.op == "call_module":
        m = modules[target]
        if isinstance(m, _APART_MODULES):
            return None
        if isinstance(m, nn.Flatten):
            return _reshape_mixes(node)
        return f"is a {type(m).__name__}, not one of these ops"
    if node.op == "call_function" and (graph.keeps_channels(target)
                                       or target in graph._GATE_FUNCTIONS):
        return None
    if node.op == "call_method" and target in _APART_METHODS:
        return None
    if target in _RESHAPES:
        return _reshape_mixes(node)
    if target in graph._REDUCE:
        rank = len(_shape(node.args[0]) or ())
        if rank > 2 and graph._reduces_spatial_only(node, rank):
            return None
        return "reduces over the channels or the batch"
    return "is not one of these ops"


def _reshape_mixes(node: fx.Node) -> Optional[str]:
    s_in, s_out = _shape(node.args[0]), _shape(node)
    if s_in is not None and s_out is not None and len(s_out) >= 2 and \
            tuple(s_out[:2]) == tuple(s_in[:2]):
        return None
    return (f"reshapes {tuple(s_in) if s_in is not None else '?'} into "
            f"{tuple(s_out) if s_out is not None else '?'}, moving classes off dim 1 "
            "(a flatten of a map larger than 1x1 mixes classes and pixels)")


def _shape(node) -> Optional[torch.Size]:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


def _describe(node: fx.Node, modules: Dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{type(modules[node.target]).__name__} {node.target!r}"
    if node.op == "call_method":
        return f"Tensor.{node.target} (graph node {node.name!r})"
    fn = node.target
    what = f"{getattr(fn, '__module__', None) or 'torch'}.{getattr(fn, '__name__', fn)}"
    return f"{what.removeprefix('_')} (graph node {node.name!r})"
