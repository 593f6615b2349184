"""``fastmdl.save`` / ``fastmdl.load``: a :class:`PrunedModel` on disk, without pickled code.

File format (version 1): ``torch.save`` of a plain dict, read back with
``torch.load(weights_only=True)``::

    {"format": "fastmdl.pruned", "version": 1,
     "spec": <JSON text>, "spec_sha256": <hex digest of the spec's UTF-8 bytes>,
     "tensors": {name: tensor}}        # the names of net.state_dict()

The spec is a JSON object:

- ``num_domains``, ``num_classes``, ``input_size``, ``baseline``: the model's attributes;
- ``class_name``: the graph module's class name (shown in its repr);
- ``modules``: ``[{"name": "layer1.0.conv1", "type": "fastmdl.PrunedConv2d", "config": {...}}]``
  in ``named_modules`` order: every layer of ``net``, the type from an allowlist
  (fastmdl's pruned layers and a few stateless ``torch.nn`` classes, rebuilt from
  their ``__constants__``), ``config`` its hyper-parameters;
- ``nodes``: the fx graph, one ``{"op", "name", "target", "args", "kwargs"}`` per node
  in order. Targets of ``call_function`` are allowlisted names ("operator.add",
  "torch.flatten", "torch.nn.functional.relu", ...), of ``call_method`` allowlisted
  ``torch.Tensor`` method names; node names and keywords are identifiers. In args,
  JSON scalars, strings and lists stand for themselves; ``{"node": name}`` is an
  earlier node, ``{"tuple": [...]}``, ``{"dict": [[key, value], ...]}`` and
  ``{"slice": [start, stop, step]}`` the Python values;
- ``tensors``: ``{name: {"dtype", "shape", "sha256"}}``, the digest over the
  tensor's bytes (C order).

Loading verifies both digests, resolves every name through the allowlists (an
unknown one is an error, never a lookup), checks each layer's tensors against
each other, and rebuilds the graph module from the node list.
"""

from __future__ import annotations

import builtins
import hashlib
import inspect
import io
import json
import keyword
import operator
import os
import re
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.immutable_collections import immutable_dict, immutable_list

from . import _shapes, ops
from ._io import write_atomic_bytes
from .pruned import PrunedBatchNorm2d, PrunedConv2d, PrunedHeads, PrunedLinear, PrunedModel

FORMAT = "fastmdl.pruned"
VERSION = 1

_FUNCTIONS = {f"{mod.__name__}.{name}": getattr(mod, name)
              for mod, names in ((operator, "add iadd sub mul getitem"),
                                 (builtins, "getattr"),
                                 (torch, "flatten cat relu add mean"),
                                 (F, "relu relu6 gelu silu hardswish leaky_relu dropout max_pool2d "
                                     "avg_pool2d adaptive_avg_pool2d adaptive_max_pool2d"))
              for name in names.split()}
_FUNCTION_NAMES = {fn: name for name, fn in _FUNCTIONS.items()}
_GETATTR_NAMES = {"shape", "ndim", "dtype", "device"}
_METHODS = set("""view reshape size dim flatten mean sum amax relu relu_ sigmoid tanh contiguous
                  permute transpose squeeze unsqueeze add add_ sub mul mul_ div chunk split expand
                  expand_as view_as clamp""".split())
_PRUNED_LAYERS = {f"fastmdl.{c.__name__}": c
                  for c in (PrunedConv2d, PrunedBatchNorm2d, PrunedHeads, PrunedLinear)}
_TORCH_LAYERS = {f"torch.nn.{c.__name__}": c
                 for c in (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish,
                           nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten,
                           nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)}
_LAYER_NAMES = {c: name for name, c in {**_PRUNED_LAYERS, **_TORCH_LAYERS}.items()}
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# Names reach the graph module's generated Python source; anything beyond plain
# identifiers and indices could inject code there. A layer named like an attribute
# of the graph module ("training", "forward", "_modules") would replace that attribute.
_NAME_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+")
_RESERVED = frozenset(dir(fx.GraphModule(nn.Module(), fx.Graph())))

PathArg = Union[str, "os.PathLike[str]"]


def save(model: PrunedModel, path: PathArg) -> None:
    """Write ``model`` (a :class:`PrunedModel` from :func:`fastmdl.prune`) to ``path``,
    atomically: an existing file there is replaced only once the new one is complete.

    Raises ``ValueError`` naming the part of the model the format cannot hold (a layer,
    function or method outside the allowlists) and leaves ``path`` untouched then."""
    if not isinstance(model, PrunedModel):
        raise TypeError(f"model must be a fastmdl.PrunedModel (from fastmdl.prune), "
                        f"got {type(model).__name__}")
    path = _check_path(path)
    spec, tensors = _describe(model)
    text = json.dumps(spec, allow_nan=True)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, "spec": text,
                "spec_sha256": hashlib.sha256(text.encode()).hexdigest(), "tensors": tensors}, buf)
    write_atomic_bytes(path, buf.getvalue())


def load(path: PathArg, map_location: Union[None, str, torch.device] = None) -> PrunedModel:
    """Read a model written by :func:`save`: a :class:`PrunedModel` in eval mode on
    ``map_location`` (default CPU), with backend "auto".

    Nothing in the file runs as code. Raises ``ValueError`` naming ``path`` and the
    problem if the file is not a fastmdl model, has another version, is truncated or
    corrupted (a checksum differs) or describes something the format does not allow."""
    path = _check_path(path)
    if map_location is not None and not isinstance(map_location, (str, torch.device)):
        raise TypeError(f"map_location must be None, a str or a torch.device, "
                        f"got {type(map_location).__name__}")
    try:
        device = torch.device("cpu" if map_location is None else map_location)
    except RuntimeError as e:
        raise ValueError(f"map_location {map_location!r} is not a device: {e}") from None
    with open(path, "rb") as f:  # a missing or unreadable file stays an OSError
        try:
            data = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: not a readable fastmdl model file (truncated, corrupted "
                             f"or not written by fastmdl.save): {_reason(e)}") from e
    try:
        spec, tensors = _verified(data)
        model = _build(spec, tensors)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    except Exception as e:  # a well-formed JSON spec of the wrong shape
        raise ValueError(f"{path}: malformed model spec: {type(e).__name__}: {e}") from e
    model = model.to(device).eval()
    model.compact_plan()  # pack each domain's weights now, not at the first request
    return model


def _reason(e: Exception) -> str:
    text = str(e)
    # torch's refusal of a non-tensor object advises weights_only=False, that is running
    # the file's code: keep only the reason itself.
    refused = re.search(r"WeightsUnpickler error:\s*(.*)", text, re.S)
    if refused:
        text = "refused by the weights-only unpickler: " + refused.group(1)
    return f"{type(e).__name__}: {(text.splitlines() or [''])[0].split('. Please')[0]}"


def _check_path(path) -> str:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return os.fsdecode(os.fspath(path))


# ---------------------------------------------------------------------------- saving


def _describe(model: PrunedModel) -> Tuple[dict, Dict[str, torch.Tensor]]:
    net = model.net
    if not isinstance(net, fx.GraphModule):
        raise ValueError(f"model.net must be a torch.fx.GraphModule, got {type(net).__name__}")
    modules, owned = [], set()
    for name, m in net.named_modules():
        if m is net or type(m) is nn.Module:  # the plain containers fx builds
            continue
        layer_type = _LAYER_NAMES.get(type(m))
        if layer_type is None:
            raise ValueError(f"cannot save layer {name!r} of type {type(m).__module__}."
                             f"{type(m).__qualname__}: only fastmdl's pruned layers and "
                             f"{sorted(_TORCH_LAYERS)} are supported")
        _check_module_name(name)
        config = m.config() if layer_type in _PRUNED_LAYERS else _torch_layer_config(m)
        config = {k: _encode(v, f"layer {name!r}") for k, v in config.items()}
        if layer_type in _TORCH_LAYERS:
            # Fail now, not at load, if it cannot be rebuilt.
            _torch_layer(layer_type, _decode_config(name, config))
        modules.append({"name": name, "type": layer_type, "config": config})
        owned.update(f"{name}.{k}" for k in m.state_dict())
    state = net.state_dict()
    stray = sorted(set(state) - owned)
    if stray:
        raise ValueError(f"cannot save tensors outside the supported layers: {stray}")
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in state.items()}
    spec = {"class_name": type(net).__name__, "num_domains": model.num_domains,
            "num_classes": list(model.num_classes), "input_size": list(model.input_size),
            "baseline": model.baseline, "modules": modules,
            "nodes": [_node_spec(n) for n in net.graph.nodes],
            "tensors": {k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                            "sha256": _digest(t)} for k, t in tensors.items()}}
    return spec, tensors


def _node_spec(node: fx.Node) -> dict:
    where = f"graph node {node.name!r}"
    if node.op in ("placeholder", "output", "call_module"):
        target = node.target
    elif node.op == "call_function":
        target = _FUNCTION_NAMES.get(node.target)
        if target is None:
            raise ValueError(f"cannot save {where}: function {_qualname(node.target)} is not "
                             f"in the allowlist {sorted(_FUNCTIONS)}")
    elif node.op == "call_method":
        target = node.target
        if target not in _METHODS:
            raise ValueError(f"cannot save {where}: tensor method {target!r} is not in the "
                             f"allowlist {sorted(_METHODS)}")
    else:
        raise ValueError(f"cannot save {where}: {node.op} nodes are not supported")
    spec = {"op": node.op, "name": node.name, "target": target,
            "args": _encode(list(node.args), where),
            "kwargs": {k: _encode(v, where) for k, v in node.kwargs.items()}}
    _check_node(spec)
    return spec


def _encode(value: Any, where: str) -> Any:
    t = type(value)
    if value is None or t in (bool, int, float, str):
        return value
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if t in (list, immutable_list):  # fx stores node arguments' lists immutable
        return [_encode(v, where) for v in value]
    if t is tuple:
        return {"tuple": [_encode(v, where) for v in value]}
    if t in (dict, immutable_dict) and all(type(k) is str for k in value):
        return {"dict": [[k, _encode(v, where)] for k, v in value.items()]}
    if t is slice:
        return {"slice": [_encode(v, where) for v in (value.start, value.stop, value.step)]}
    raise ValueError(f"cannot save {where}: values of type {t.__name__} are not supported")


def _torch_layer_config(m: nn.Module) -> dict:
    return {c: getattr(m, c) for c in getattr(type(m), "__constants__", [])}


def _qualname(fn) -> str:
    return f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', repr(fn))}"


def _digest(t: torch.Tensor) -> str:
    flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(flat.numpy()).hexdigest()


# ---------------------------------------------------------------------------- loading


def _verified(data) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """The spec and tensors of a loaded file, once its format, version and digests check."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a fastmdl pruned-model file (no format {FORMAT!r} marker; a "
                         f"plain state_dict or another torch.save file?)")
    if data.get("version") != VERSION:
        raise ValueError(f"unsupported file version {data.get('version')!r} (this fastmdl "
                         f"reads version {VERSION})")
    text, tensors = data.get("spec"), data.get("tensors")
    if not isinstance(text, str) or not isinstance(tensors, dict):
        raise ValueError("the file lacks its spec or tensors")
    if hashlib.sha256(text.encode()).hexdigest() != data.get("spec_sha256"):
        raise ValueError("the model spec is corrupted (its sha256 checksum differs)")
    spec = json.loads(text)
    table = spec["tensors"]
    if set(table) != set(tensors):
        raise ValueError(f"the spec lists tensors {sorted(set(table) ^ set(tensors))} that the "
                         f"file lacks, or the other way round")
    for name, t in tensors.items():
        meta = table[name]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"entry {name!r} is not a tensor")
        if str(t.dtype).removeprefix("torch.") != meta["dtype"] or list(t.shape) != meta["shape"]:
            raise ValueError(f"tensor {name!r} is {t.dtype} {tuple(t.shape)} but the spec says "
                             f"{meta['dtype']} {tuple(meta['shape'])}")
        _verify_digest(name, t, meta["sha256"])
    return spec, tensors


def _verify_digest(name: str, t: torch.Tensor, expected: str) -> None:
    if _digest(t) != expected:
        raise ValueError(f"tensor {name!r} is corrupted (its sha256 checksum differs)")


def _build(spec: dict, tensors: Dict[str, torch.Tensor]) -> PrunedModel:
    num_domains = spec["num_domains"]
    _expect(_is_int(num_domains) and num_domains >= 1, f"bad num_domains {num_domains!r}")
    modules: Dict[str, nn.Module] = {}
    for entry in spec["modules"]:
        name, layer_type, config = entry["name"], entry["type"], entry["config"]
        _check_module_name(name)
        _expect(name not in modules, f"layer {name!r} appears twice")
        if layer_type in _TORCH_LAYERS:
            modules[name] = _torch_layer(layer_type, _decode_config(name, config))
        elif layer_type in _PRUNED_LAYERS:
            local = {k[len(name) + 1:]: t for k, t in tensors.items() if k.startswith(name + ".")}
            modules[name] = _pruned_layer(layer_type, name, _decode_config(name, config),
                                          local, num_domains)
        else:
            raise ValueError(f"layer {name!r} has type {layer_type!r}, which is not in the "
                             f"allowlist {sorted(_LAYER_NAMES.values())}")
    for name in modules:  # a layer inside another would overwrite that one's attributes
        _expect(not any(other.startswith(name + ".") for other in modules),
                f"layer {name!r} contains another layer")

    graph, env = fx.Graph(), {}
    for entry in spec["nodes"]:
        _check_node(entry)
        op, name, target = entry["op"], entry["name"], entry["target"]
        _expect(op != "call_module" or target in modules,
                f"graph node {name!r} calls layer {target!r}, which the file does not define")
        if op == "call_function":
            target = _FUNCTIONS[target]
        args = tuple(_decode(entry["args"], env))
        kwargs = {k: _decode(v, env) for k, v in entry["kwargs"].items()}
        env[name] = graph.create_node(op, target, args, kwargs, name=name)
        _expect(env[name].name == name, f"graph node name {name!r} is not allowed")
    outputs = [n for n in graph.nodes if n.op == "output"]
    _expect(len(outputs) == 1 and outputs[0] is list(graph.nodes)[-1],
            "the graph must end in its one output node")
    graph.lint()

    class_name = spec["class_name"]
    _expect(_is_identifier(class_name), f"bad class name {class_name!r}")
    net = fx.GraphModule(modules, graph, class_name)
    _place(net, modules, list(tensors))

    expected = net.state_dict()
    _expect(set(expected) == set(tensors),
            f"the layers' tensors {sorted(set(expected) ^ set(tensors))} are missing or unused")
    for k, t in expected.items():
        _expect(t.shape == tensors[k].shape and t.dtype == tensors[k].dtype,
                f"tensor {k!r} does not fit its layer")
    # Copy the stored bytes exactly (a constructor may have recomputed, e.g. -0.0 as 0.0).
    net.load_state_dict(tensors, strict=True)

    num_classes, input_size, baseline = spec["num_classes"], spec["input_size"], spec["baseline"]
    _expect(isinstance(num_classes, list) and len(num_classes) == num_domains
            and all(_is_int(k) and k > 0 for k in num_classes), f"bad num_classes {num_classes!r}")
    _expect(isinstance(input_size, list) and len(input_size) == 3
            and all(_is_int(k) and k > 0 for k in input_size), f"bad input_size {input_size!r}")
    _expect(isinstance(baseline, dict) and all(
        isinstance(v, list) and all(type(x) in (int, float) for x in v) for v in baseline.values()),
        "bad baseline costs")
    for name, m in modules.items():
        if isinstance(m, PrunedHeads):
            _expect(m.num_classes == num_classes, f"layer {name!r} has num_classes "
                    f"{m.num_classes}, the model {num_classes}")
    return PrunedModel(net, num_domains, num_classes, input_size, baseline)


def _place(net: fx.GraphModule, modules: Dict[str, nn.Module], order: List[str]) -> None:
    # fx attaches layers in graph order, shallowest first; re-attach them in the saved
    # (named_modules) order, and their tensors in the saved state_dict order (fusion
    # registers a convolution's scale after its shift), so that state_dict() and
    # parameters() enumerate exactly as before saving.
    for name, m in modules.items():
        *path, leaf = name.split(".")
        parent = net
        for part in path:
            child = parent._modules.pop(part, None)
            parent._modules[part] = child if child is not None else nn.Module()
            parent = parent._modules[part]
        parent._modules.pop(leaf, None)
        parent._modules[leaf] = m
        for key in (k[len(name) + 1:] for k in order if k.startswith(name + ".")):
            for table in (m._parameters, m._buffers):
                if key in table:
                    table[key] = table.pop(key)


def _decode(value: Any, env: Dict[str, fx.Node]) -> Any:
    t = type(value)
    if value is None or t in (bool, int, float, str):
        return value
    if t is list:
        return [_decode(v, env) for v in value]
    if t is dict and len(value) == 1:
        (tag, body), = value.items()
        if tag == "node" and type(body) is str:
            _expect(body in env, f"a graph node refers to {body!r}, which is not an earlier node")
            return env[body]
        if tag == "tuple" and type(body) is list:
            return tuple(_decode(v, env) for v in body)
        if tag == "dict" and type(body) is list and all(
                type(kv) is list and len(kv) == 2 and type(kv[0]) is str for kv in body):
            return {k: _decode(v, env) for k, v in body}
        if tag == "slice" and type(body) is list and len(body) == 3:
            return slice(*(_decode(v, env) for v in body))
    raise ValueError(f"malformed value {json.dumps(value)[:80]} in the spec")


def _decode_config(name: str, config: Any) -> dict:
    _expect(type(config) is dict, f"layer {name!r} has a malformed config")
    return {k: _decode(v, {}) for k, v in config.items()}


def _torch_layer(layer_type: str, config: dict) -> nn.Module:
    cls = _TORCH_LAYERS[layer_type]
    constants = getattr(cls, "__constants__", [])
    _expect(set(config) == set(constants),
            f"{layer_type} needs the config keys {constants}, got {config!r}")
    accepted = inspect.signature(cls).parameters
    m = cls(**{k: v for k, v in config.items() if k in accepted})
    for k, v in config.items():  # constants its constructor fixes (ReLU6's max_val)
        _expect(getattr(m, k) == v, f"{layer_type} cannot be rebuilt with {k}={v!r}")
    return m.eval()


def _pruned_layer(layer_type: str, name: str, config: dict, t: Dict[str, torch.Tensor],
                  num_domains: int) -> nn.Module:
    """One of fastmdl's pruned layers from its config and tensors, each tensor checked
    against the others, since the kernels trust these shapes and index lists."""
    def take(key: str, dims: int, dtype: Optional[torch.dtype] = None, optional: bool = False):
        if key not in t:
            _expect(optional, f"layer {name!r} lacks its tensor {key!r}")
            return None
        v = t[key]
        _expect(v.dim() == dims and (v.dtype == dtype if dtype else v.is_floating_point()),
                f"tensor {name}.{key} must be {dims}-D {dtype or 'floating point'}, "
                f"got {v.dtype} {tuple(v.shape)}")
        return v

    def shaped(key, v, shape, dtype):
        if v is None:
            return
        _expect(tuple(v.shape) == tuple(shape) and v.dtype == dtype,
                f"tensor {name}.{key} must be {dtype} {tuple(shape)}, "
                f"got {v.dtype} {tuple(v.shape)}")

    D = num_domains
    if layer_type == "fastmdl.PrunedConv2d":
        stats = _take_stats(name, config, take, shaped)
        _expect(set(config) == {"stride", "padding", "dilation", "groups", "padding_mode", "relu"}
                and all(_is_pair(config[k], lo) for k, lo in (("stride", 1), ("padding", 0),
                                                                ("dilation", 1)))
                and _is_int(config["groups"]) and config["groups"] >= 1
                and config["padding_mode"] in _PADDING_MODES and type(config["relu"]) is bool,
                f"layer {name!r} has a bad PrunedConv2d config {config!r}")
        w = take("weight", 4)
        c_in, c_out = w.shape[1] * config["groups"], w.shape[0]
        _expect(c_out % config["groups"] == 0, f"layer {name!r}: groups do not divide C_out")
        scale, shift = take("scale", 2, optional=True), take("shift", 2, optional=True)
        shaped("scale", scale, (D, c_out), w.dtype)
        shaped("shift", shift, (D, c_out), w.dtype)
        _expect(stats is None or (scale is not None and shift is not None),
                f"layer {name!r} has BatchNorm statistics but no scale and shift")
        if stats is not None:
            shaped("bn_mean", stats[0], (D, c_out), stats[0].dtype)
        lists = {k: take(k, 1, torch.int64) for k in ("in_index", "in_offsets", "out_index",
                                                      "out_offsets")}
        _expect(lists["in_offsets"].numel() == D + 1 and lists["out_offsets"].numel() == D + 1,
                f"layer {name!r}: index offsets need D + 1 = {D + 1} entries")
        # The op's own check of the index lists: out-of-range entries would make the
        # kernels read out of bounds.
        ops._check_values(torch.zeros(0, dtype=torch.int64), D, lists["in_index"],
                          lists["in_offsets"], c_in, lists["out_index"], lists["out_offsets"],
                          c_out)
        in_masks = _shapes.domain_masks(lists["in_index"], lists["in_offsets"], c_in, torch.float32)
        out_masks = _shapes.domain_masks(lists["out_index"], lists["out_offsets"], c_out,
                                         torch.float32)
        return PrunedConv2d(w, in_masks, out_masks, scale, shift, bn_stats=stats, **config)
    if layer_type == "fastmdl.PrunedBatchNorm2d":
        stats = _take_stats(name, config, take, shaped)
        _expect(config == {}, f"layer {name!r} has config {config!r}, expected {{}} or "
                              "{'bn_eps': eps}")
        scale, shift, masks = take("scale", 2), take("shift", 2), take("masks", 2, torch.uint8)
        shaped("shift", shift, scale.shape, scale.dtype)
        shaped("masks", masks, scale.shape, torch.uint8)
        if stats is not None:
            shaped("bn_mean", stats[0], scale.shape, stats[0].dtype)
        _expect(scale.shape[0] == D, f"layer {name!r} must have {D} domains")
        return PrunedBatchNorm2d(scale, shift, masks, bn_stats=stats)
    _expect(config == {} or layer_type == "fastmdl.PrunedHeads",
            f"layer {name!r} has config {config!r}, expected {{}}")
    w, b = take("weight", 2), take("bias", 1, optional=True)
    in_masks = take("in_masks", 2, torch.uint8)
    shaped("bias", b, w.shape[:1], w.dtype)
    shaped("in_masks", in_masks, (D, w.shape[1]), torch.uint8)
    if layer_type == "fastmdl.PrunedLinear":
        return PrunedLinear(w, b, in_masks)
    classes = config.get("num_classes")
    _expect(set(config) == {"num_classes"} and isinstance(classes, list)
            and len(classes) == D and all(_is_int(k) and k > 0 for k in classes)
            and sum(classes) == w.shape[0],
            f"layer {name!r}: num_classes {classes!r} must be {D} counts adding up to "
            f"{w.shape[0]} rows")
    return PrunedHeads(w, b, classes, in_masks)


def _take_stats(name: str, config: dict, take, shaped):
    """A folded BatchNorm's (mean, var, eps), popping ``bn_eps`` from ``config``; None
    when the layer has none (files written before they were kept load unchanged)."""
    eps = config.pop("bn_eps", None)
    mean, var = take("bn_mean", 2, optional=True), take("bn_var", 2, optional=True)
    if eps is None and mean is None and var is None:
        return None
    _expect(type(eps) in (int, float) and eps > 0 and mean is not None and var is not None,
            f"layer {name!r}: a config bn_eps > 0 and the tensors bn_mean and bn_var come "
            f"together, got bn_eps {eps!r}, bn_mean {'present' if mean is not None else 'absent'}"
            f", bn_var {'present' if var is not None else 'absent'}")
    shaped("bn_var", var, mean.shape, mean.dtype)
    return mean, var, float(eps)


# ---------------------------------------------------------------------------- shared checks


def _check_module_name(name: Any) -> None:
    _expect(isinstance(name, str) and name != "" and all(
        _NAME_PART.fullmatch(p) and p not in _RESERVED for p in name.split(".")),
        f"layer name {name!r} is not a dotted path of identifiers and indices, or "
        f"shadows a GraphModule attribute")


def _check_node(entry: Any) -> None:
    _expect(isinstance(entry, dict) and set(entry) == {"op", "name", "target", "args", "kwargs"},
            f"malformed graph node {str(entry)[:80]}")
    op, name, target = entry["op"], entry["name"], entry["target"]
    _expect(_is_identifier(name), f"graph node name {name!r} is not an identifier")
    _expect(type(entry["args"]) is list and type(entry["kwargs"]) is dict
            and all(_is_identifier(k) for k in entry["kwargs"]),  # written into the source
            f"graph node {name!r} has malformed args or keyword names")
    if op == "placeholder":
        _expect(_is_identifier(target), f"graph input {target!r} is not an identifier")
    elif op == "output":
        _expect(target == "output", f"output node {name!r} has target {target!r}")
    elif op == "call_module":
        _check_module_name(target)
    elif op == "call_function":
        _expect(target in _FUNCTIONS, f"graph node {name!r} calls function {target!r}, which is "
                                      f"not in the allowlist {sorted(_FUNCTIONS)}")
        if target == "builtins.getattr":
            # getattr is only safe on a fixed set of tensor attributes.
            args = entry["args"]
            _expect(len(args) == 2 and isinstance(args[0], dict) and set(args[0]) == {"node"}
                    and isinstance(args[1], str) and args[1] in _GETATTR_NAMES
                    and not entry["kwargs"],
                    f"graph node {name!r}: getattr is only allowed for {sorted(_GETATTR_NAMES)}")
    elif op == "call_method":
        _expect(target in _METHODS, f"graph node {name!r} calls tensor method {target!r}, "
                                    f"which is not in the allowlist {sorted(_METHODS)}")
    else:
        raise ValueError(f"graph node {name!r} has op {op!r}, which is not supported")


def _is_identifier(v: Any) -> bool:
    return isinstance(v, str) and v.isidentifier() and not keyword.iskeyword(v)


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_pair(v: Any, lo: int) -> bool:
    return type(v) is list and len(v) == 2 and all(_is_int(x) and x >= lo for x in v)


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
