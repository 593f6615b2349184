"""``fastmdl.save`` / ``fastmdl.load``: a :class:`PrunedModel` on disk, without pickled code.

File format (version 1): ``torch.save`` of a plain dict, read back with
``torch.load(weights_only=True)``::

    {"format": "fastmdl.pruned", "version": 1,
     "spec": <JSON text>, "spec_sha256": <hex digest of the spec's UTF-8 bytes>,
     "tensors": {name: tensor}}        # the names of net.state_dict()

The spec is a JSON object:

- ``num_domains``, ``num_classes``, ``input_size``, ``input_size_source``, ``baseline``: the
  model's attributes;
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

Loading reads only a regular file holding torch's zip layout with every record
stored uncompressed (so that what torch.load allocates is bounded by the file's
size), refuses any tensor that is not stored as exactly its elements in C order
(a stride-0 expansion of one element to 10^9 would cost nothing on disk),
verifies both digests, resolves every name through the allowlists (an unknown
one is an error, never a lookup), checks each layer's configuration and tensors
against each other, bounds the per-domain tables and packed weights the model
will build by the file's size, rebuilds the graph module from the node list, and
runs it once on fake tensors (shapes only) at the recorded input size: layers
that do not chain, or values far larger than the input, are refused at load,
naming the layer, instead of failing at the first request.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import inspect
import io
import json
import keyword
import logging
import math
import operator
import os
import re
import stat
import zipfile
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch._subclasses import FakeTensorMode
from torch.fx.immutable_collections import immutable_dict, immutable_list
from torch.utils import _pytree

from . import _shapes, ops
from ._io import write_atomic_bytes
from .channel_select import ChannelSelect
from .channels_last import ChannelLayerNorm
from .conv_heads import ClassPadding, PrunedConvHeads
from .convert import INPUT_SIZE_SOURCES
from .pruned import PrunedBatchNorm2d, PrunedConv2d, PrunedHeads, PrunedLinear, PrunedModel

FORMAT = "fastmdl.pruned"
VERSION = 1

def _stochastic_depth(input: torch.Tensor, p: float, mode: str, training: bool = True):
    """torchvision.ops.stochastic_depth, rewritten so files that use it load without
    torchvision: with probability p, zero a whole sample ("row") or the whole batch
    ("batch") and scale the survivors by 1 / (1 - p); the identity when not training."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"stochastic depth probability must be in [0, 1], got {p}")
    if mode not in ("batch", "row"):
        raise ValueError(f"stochastic depth mode must be 'batch' or 'row', got {mode!r}")
    if not training or p == 0.0:
        return input
    shape = [input.shape[0]] + [1] * (input.ndim - 1) if mode == "row" else [1] * input.ndim
    keep = torch.empty(shape, dtype=input.dtype, device=input.device).bernoulli_(1.0 - p)
    return input * (keep / (1.0 - p) if p < 1.0 else keep)


_FUNCTIONS = {f"{mod.__name__}.{name}": getattr(mod, name)
              for mod, names in ((operator, "add iadd sub mul truediv floordiv getitem"),
                                 (builtins, "getattr"),
                                 (torch, "flatten cat relu add mul mean sigmoid permute "
                                         "transpose reshape squeeze unsqueeze"),
                                 (F, "relu relu6 gelu silu hardswish hardsigmoid sigmoid mish "
                                     "leaky_relu dropout max_pool2d avg_pool2d layer_norm "
                                     "adaptive_avg_pool2d adaptive_max_pool2d"))
              for name in names.split()}
# Functions of other libraries, known by their qualified name (the library need not
# be importable to save or load them) and run by fastmdl's own implementation.
_FOREIGN_FUNCTIONS = {"torchvision.ops.stochastic_depth.stochastic_depth": _stochastic_depth}
_FUNCTIONS.update(_FOREIGN_FUNCTIONS)
_FUNCTION_NAMES = {fn: name for name, fn in _FUNCTIONS.items()}
_GETATTR_NAMES = {"shape", "ndim", "dtype", "device"}
_METHODS = set("""view reshape size dim flatten mean sum amax relu relu_ sigmoid tanh contiguous
                  permute transpose squeeze unsqueeze add add_ sub mul mul_ div chunk split expand
                  expand_as view_as clamp""".split())
_PRUNED_LAYERS = {f"fastmdl.{c.__name__}": c
                  for c in (PrunedConv2d, PrunedBatchNorm2d, PrunedHeads, PrunedLinear,
                            PrunedConvHeads, ClassPadding, ChannelSelect)}
_TORCH_LAYERS = {f"torch.nn.{c.__name__}": c
                 for c in (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish,
                           nn.Hardsigmoid, nn.Mish, nn.ELU, nn.SELU, nn.Hardtanh,
                           nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten,
                           nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)}
# Layers with tensors: their sizes come from the config, so the config is checked
# against the stored tensors before the constructor allocates anything.
_TORCH_LAYERS.update({f"torch.nn.{c.__name__}": c for c in (nn.LayerNorm, nn.GroupNorm,
                                                               nn.Linear)})
# fastmdl's own, rebuilt the same way: a LayerNorm over dim 1 (a rewritten channels-last block).
_TORCH_LAYERS["fastmdl.ChannelLayerNorm"] = ChannelLayerNorm
# Settings a constructor takes that __constants__ does not list.
_EXTRA_CONFIG = {nn.LayerNorm: {"bias": lambda m: m.bias is not None},
                 ChannelLayerNorm: {"bias": lambda m: m.bias is not None},
                 nn.Linear: {"bias": lambda m: m.bias is not None}}
# Layers and functions a user registered (register_layer, register_function).
_USER_LAYERS: Dict[str, Tuple[Callable, Callable]] = {}  # name -> (config, build)
_LAYER_NAMES = {c: name for name, c in {**_PRUNED_LAYERS, **_TORCH_LAYERS}.items()}
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# Names reach the graph module's generated Python source; anything beyond plain
# identifiers and indices could inject code there. A layer named like an attribute
# of the graph module ("training", "forward", "_modules") would replace that attribute.
# A hyphen is allowed inside a part (torchvision's RegNet names blocks "block1-0"):
# fx reaches such a layer through getattr(self, "block1-0"), never as code.
_NAME_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:-[A-Za-z0-9_]+)*|[0-9]+")
_RESERVED = frozenset(dir(fx.GraphModule(nn.Module(), fx.Graph())))
# The dtypes fastmdl.save writes: the model's floating point tensors, int64 index
# lists and uint8 masks.
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.uint8)}

# What a file may make fastmdl.load (and the first request) cost. A file spends a
# few bytes per domain, per configuration value and per node, and nothing on a
# tensor with a zero-sized dimension; without these bounds a file of kilobytes
# could claim gigabytes.
_INT_LIMIT = 2**31 - 1  # any size, stride, padding, dilation or group count in a config
# The per-domain tables (channel masks, logit columns) and the compact network's
# weights, packed once per domain, that the loaded model builds: at most this many
# bytes per byte of the file, plus _TABLE_FLOOR. A model of up to 256 domains
# always fits, as its packed weights take at most num_domains times the file.
_TABLE_BYTES_PER_FILE_BYTE = 1024
_TABLE_FLOOR = 1 << 30
# The shape pass: a batch of _SHAPE_ROWS at the recorded input size, which may hold
# at most _MAX_INPUT values per sample. No value of the network may hold more than
# _MAX_GROWTH times the input's values per sample (VGG's first layer holds 21
# times, 64 channels at full resolution from 3), or _VALUE_FLOOR for tiny inputs:
# beyond it a padding, pooling size or expand count was chosen to exhaust memory.
_SHAPE_ROWS = 2
_MAX_INPUT = 1 << 26
_MAX_GROWTH = 4096
_VALUE_FLOOR = 1 << 20
_NOT_READABLE = ("not a readable fastmdl model file (truncated, corrupted or not written "
                 "by fastmdl.save)")

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

    Nothing in the file runs as code, and what loading costs in memory and time is
    bounded by the file's size. Raises ``ValueError`` naming ``path`` and the
    problem if it is not a regular file, not a fastmdl model, has another version,
    is truncated or corrupted (a checksum differs) or describes something the
    format does not allow (a layer whose configuration does not fit its tensors,
    layers that do not chain at the recorded input size); ``ValueError`` too for a
    ``map_location`` this torch cannot use (a CUDA device without CUDA)."""
    path = _check_path(path)
    device = _target_device(map_location)
    with _open_regular_file(path) as f:  # a missing or unreadable file stays an OSError
        size = os.fstat(f.fileno()).st_size
        data = _read_archive(f, path, size)
    try:
        spec, tensors = _verified(data, size)
        model = _build(spec, tensors, size)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e
    except Exception as e:  # a well-formed JSON spec of the wrong shape
        raise ValueError(f"{path}: malformed model spec: {type(e).__name__}: {e}") from e
    try:
        model = model.to(device).eval()
    except (AssertionError, RuntimeError) as e:  # torch asserts on devices it lacks
        raise ValueError(f"map_location {map_location!r}: cannot place the model on "
                         f"{device}: {_first_line(e)}") from None
    model.compact_plan()  # pack each domain's weights now, not at the first request
    return model


def _target_device(map_location) -> torch.device:
    """``map_location`` as a device this torch can place a model on."""
    if map_location is not None and not isinstance(map_location, (str, torch.device)):
        raise TypeError(f"map_location must be None, a str or a torch.device, "
                        f"got {type(map_location).__name__}")
    try:
        device = torch.device("cpu" if map_location is None else map_location)
    except RuntimeError as e:
        raise ValueError(f"map_location {map_location!r} is not a device: {e}") from None
    if device.type == "cuda":
        # Checked here: torch itself fails late, with a bare AssertionError.
        if not torch.backends.cuda.is_built():
            raise ValueError(f"map_location {map_location!r}: this torch {torch.__version__} "
                             f"was built without CUDA; use 'cpu' or a CUDA build of torch")
        if not torch.cuda.is_available():
            raise ValueError(f"map_location {map_location!r}: no CUDA device is available "
                             f"(driver missing or CUDA_VISIBLE_DEVICES empty); use 'cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"map_location {map_location!r}: there are only "
                             f"{torch.cuda.device_count()} CUDA devices")
    return device


def _open_regular_file(path: str):
    """``path`` opened for binary reading, refused unless it is a regular file: a FIFO
    would block the read forever, a device would never end."""
    _expect_regular(path, os.stat(path).st_mode)
    # O_NONBLOCK: if the path was swapped for a FIFO since the stat, opening it
    # returns at once instead of waiting for a writer; fstat then refuses it.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)
    try:
        _expect_regular(path, os.fstat(fd).st_mode)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _expect_regular(path: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((k for test, k in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                                        (stat.S_ISSOCK, "a socket"),
                                        (stat.S_ISCHR, "a character device"),
                                        (stat.S_ISBLK, "a block device")) if test(mode)),
                    "not a regular file")
        raise ValueError(f"{path}: is {kind}; fastmdl.load reads regular files only")


def _read_archive(f, path: str, size: int):
    """What ``torch.load(weights_only=True)`` reads from ``f``, once its zip layout is
    checked; every failure is a ValueError naming ``path``."""
    try:
        _check_archive(f, size)
    except ValueError as e:
        raise ValueError(f"{path}: {_NOT_READABLE}: {e}") from None
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        refused = _refusal(e)
        if refused is not None:
            # torch's message (and so the chained exception) advises loading with
            # weights_only=False, that is running the file's code: give neither.
            raise ValueError(f"{path}: {_NOT_READABLE}: {refused}") from None
        raise ValueError(f"{path}: {_NOT_READABLE}: {_reason(e)}") from e


def _check_archive(f, size: int) -> None:
    """``f`` holds a zip archive, as torch.save writes, whose records are all stored
    uncompressed: a compressed record (or a legacy, non-zip torch file, whose
    storages are allocated at the sizes its pickle claims) could make torch.load
    allocate far more than the file holds. Leaves ``f`` at its start."""
    try:
        if f.read(4) != b"PK\x03\x04":
            raise ValueError("not a zip archive (fastmdl.save writes torch's zip format)")
        f.seek(0)
        try:
            with zipfile.ZipFile(f) as archive:
                records = archive.infolist()
        except Exception as e:  # any parser failure on untrusted bytes
            raise ValueError(f"a damaged zip archive ({type(e).__name__}: {e})") from None
        for r in records:
            if r.compress_type != zipfile.ZIP_STORED or r.compress_size != r.file_size:
                raise ValueError(f"record {r.filename!r} is compressed ({r.compress_size} "
                                 f"bytes expanding to {r.file_size}); fastmdl.save stores "
                                 f"every record as it is")
        if sum(r.file_size for r in records) > size:
            raise ValueError(f"its records claim more bytes than the file's {size}")
    finally:
        f.seek(0)


def _refusal(e: Exception) -> Optional[str]:
    """The reason, in fastmdl's words, when the weights-only unpickler refused the
    file's contents; None for any other failure."""
    text = str(e)
    if "WeightsUnpickler" not in text and "Weights only load failed" not in text:
        return None
    found = re.search(r"GLOBAL (\S+) was not an allowed global", text)
    if found:
        what = f"it references the Python object {found.group(1)}"
    else:
        detail = re.search(r"WeightsUnpickler error:\s*(.*)", text, re.S)
        detail = _first_line(detail.group(1)).split(". Please")[0] if detail else ""
        what = "it holds pickled objects other than tensors and plain values" + (
            f" ({detail})" if detail and "weights_only" not in detail else "")
    return (f"{what}, which fastmdl model files never contain; refused for safety, and "
            f"nothing in the file was run")


def _reason(e: Exception) -> str:
    text = _first_line(e).split(". Please")[0]
    if "not resizable" in text:  # torch.load's own bound on a tensor's storage
        text += " (a tensor claims more elements than its stored data holds)"
    return f"{type(e).__name__}: {text}"


def _first_line(e: Any) -> str:
    return (str(e).strip().splitlines() or [""])[0]


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
        if layer_type in _PRUNED_LAYERS:
            config = m.config()
        elif layer_type in _USER_LAYERS:
            config = _USER_LAYERS[layer_type][0](m)
            if not isinstance(config, dict):
                raise TypeError(f"the config function registered for {layer_type!r} must "
                                f"return a dict, got {type(config).__name__}")
        else:
            config = _torch_layer_config(m)
        config = {k: _encode(v, f"layer {name!r}") for k, v in config.items()}
        if layer_type in _TORCH_LAYERS:
            # Fail now, not at load, if it cannot be rebuilt.
            _torch_layer(layer_type, _decode_config(name, config))
        elif isinstance(m, (PrunedConv2d, PrunedConvHeads)):  # nor if load refuses its padding
            try:
                _check_conv_padding(name, config, tuple(m.weight.shape[2:]))
            except ValueError as e:
                raise ValueError(f"cannot save {e}") from None
        modules.append({"name": name, "type": layer_type, "config": config})
        owned.update(f"{name}.{k}" for k in m.state_dict())
    # Tensors the graph reads directly (get_attr), e.g. ConvNeXt's layer scale.
    attributes = _graph_tensors(net)
    owned.update(attributes)
    state = net.state_dict()
    stray = sorted(set(state) - owned)
    if stray:
        raise ValueError(f"cannot save tensors outside the supported layers: {stray}")
    tensors = {k: t.detach().to("cpu").contiguous().clone() for k, t in state.items()}
    spec = {"class_name": type(net).__name__, "num_domains": model.num_domains,
            "num_classes": list(model.num_classes), "input_size": list(model.input_size),
            "input_size_source": getattr(model, "input_size_source", "given"),
            "baseline": model.baseline, "modules": modules, "attributes": attributes,
            "nodes": [_node_spec(n) for n in net.graph.nodes],
            "tensors": {k: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                            "sha256": _digest(t)} for k, t in tensors.items()}}
    return spec, tensors


def _graph_tensors(net: fx.GraphModule) -> List[str]:
    """The parameters and buffers the graph reads with get_attr, in graph order;
    any other attribute (a module, a Python value) cannot be saved."""
    tensors = dict(net.named_parameters())
    tensors.update(net.named_buffers())
    found: List[str] = []
    for node in net.graph.nodes:
        if node.op != "get_attr" or node.target in found:
            continue
        if node.target not in tensors:
            raise ValueError(f"cannot save graph node {node.name!r}: it reads {node.target!r}, "
                             "which is not a parameter or buffer of the network")
        _check_module_name(node.target)
        found.append(node.target)
    return found


def _node_spec(node: fx.Node) -> dict:
    where = f"graph node {node.name!r}"
    if node.op in ("placeholder", "output", "call_module", "get_attr"):
        target = node.target
    elif node.op == "call_function":
        target = _FUNCTION_NAMES.get(node.target)
        if target is None and _qualname(node.target) in _FOREIGN_FUNCTIONS:
            target = _qualname(node.target)
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


def _config_keys(cls: type) -> List[str]:
    """The settings a stock torch layer is saved with: its ``__constants__`` and
    what ``_EXTRA_CONFIG`` adds."""
    return list(getattr(cls, "__constants__", [])) + list(_EXTRA_CONFIG.get(cls, {}))


def _torch_layer_config(m: nn.Module) -> dict:
    extra = _EXTRA_CONFIG.get(type(m), {})
    return {k: extra[k](m) if k in extra else getattr(m, k) for k in _config_keys(type(m))}


def register_layer(name: str, cls: type, *, config: Optional[Callable[[nn.Module], dict]] = None,
                   build: Optional[Callable[[dict], nn.Module]] = None) -> None:
    """Let :func:`save` and :func:`load` handle layers of your own class ``cls``.

    ``save`` writes such a layer as the type ``name`` with ``config(layer)`` (a
    dict of JSON-like values: numbers, strings, bools, None, lists, tuples;
    default ``{}``) and its ``state_dict`` tensors. ``load`` rebuilds it with
    ``build(config)`` (default ``cls(**config)``), then loads the stored tensors,
    which must match the rebuilt layer's names, shapes and dtypes exactly. The
    file only names the layer: the code that runs is what you registered in this
    process, so loading still never unpickles code. ``build`` runs on values from
    the file: check them before allocating anything their size depends on.
    Register before :func:`fastmdl.convert`: from then on the tracer keeps the
    class whole (one call in the graph, its tensors its own), and the channel
    analysis treats it as an op it does not know, so the channels it reads and
    writes are kept whole (``convert``'s warning says which)."""
    _check_dotted_name(name, ", e.g. 'mylib.Swish',")
    if name in _PRUNED_LAYERS or name in _TORCH_LAYERS:
        raise ValueError(f"name {name!r} is fastmdl's own; choose another")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be a torch.nn.Module subclass, got {cls!r}")
    for arg, fn in (("config", config), ("build", build)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{arg} must be callable, got {type(fn).__name__}")
    if cls in _LAYER_NAMES and _LAYER_NAMES[cls] != name:
        raise ValueError(f"{cls.__qualname__} is already saved as {_LAYER_NAMES[cls]!r}")
    _USER_LAYERS[name] = (config or (lambda m: {}), build or (lambda c: cls(**c)))
    _LAYER_NAMES[cls] = name
    from .graph import USER_LEAVES
    USER_LEAVES.add(cls)  # traced as one call, so its tensors stay its own


def _check_dotted_name(name: Any, example: str) -> None:
    if not isinstance(name, str) or not all(p.isidentifier() for p in name.split(".")):
        raise ValueError(f"name must be a dotted Python identifier{example} got {name!r}")


def register_function(name: str, fn: Callable) -> None:
    """Let :func:`save` and :func:`load` handle graph calls of your function ``fn``
    (one fx keeps whole, e.g. with ``torch.fx.wrap``): saved as ``name``, run as
    ``fn`` after ``load``. As with :func:`register_layer`, the file names the
    function and never carries its code."""
    _check_dotted_name(name, ",")
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if name in _FUNCTIONS and _FUNCTIONS[name] is not fn:
        raise ValueError(f"name {name!r} already names {_qualname(_FUNCTIONS[name])}")
    _FUNCTIONS[name] = fn
    _FUNCTION_NAMES[fn] = name


def _check_torch_layer_sizes(name: str, layer_type: str, config: dict,
                             t: Dict[str, torch.Tensor]) -> None:
    """A norm layer's constructor allocates what its config claims: the claim must
    be what the stored tensors hold (or, without them, a bounded size)."""
    if layer_type in ("torch.nn.LayerNorm", "fastmdl.ChannelLayerNorm"):
        shape = config.get("normalized_shape")
        _expect(isinstance(shape, (list, tuple)) and 0 < len(shape) <= 8
                and all(_is_int(k) and 0 < k <= _INT_LIMIT for k in shape),
                f"layer {name!r}: bad normalized_shape {shape!r}")
        if config.get("elementwise_affine"):
            _expect("weight" in t and tuple(t["weight"].shape) == tuple(shape),
                    f"layer {name!r}: normalized_shape {tuple(shape)} does not match its weight")
    elif layer_type == "torch.nn.Linear":
        # A linear layer the channel analysis kept whole (ConvNeXt's channels-last MLP).
        i, o = config.get("in_features"), config.get("out_features")
        _expect("weight" in t and tuple(t["weight"].shape) == (o, i),
                f"layer {name!r}: in_features/out_features {i!r}/{o!r} do not match its weight")
    elif layer_type == "torch.nn.GroupNorm":
        c, g = config.get("num_channels"), config.get("num_groups")
        _expect(_is_int(c) and _is_int(g) and 0 < g <= c <= _INT_LIMIT and c % g == 0,
                f"layer {name!r}: bad num_channels/num_groups {c!r}/{g!r}")
        if config.get("affine"):
            _expect("weight" in t and tuple(t["weight"].shape) == (c,),
                    f"layer {name!r}: num_channels {c} does not match its weight")


def _qualname(fn) -> str:
    return f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', repr(fn))}"


def _digest(t: torch.Tensor) -> str:
    flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(flat.numpy()).hexdigest()


# ---------------------------------------------------------------------------- loading


def _verified(data, file_size: int) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """The spec and tensors of a loaded file, once its format, version, tensor
    layouts and digests check."""
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
    # Every layout first, so that no digest below reads (or copies) more than the file holds.
    held, owners = 0, {}
    for name, t in tensors.items():
        meta = table[name]
        if type(t) is not torch.Tensor:
            raise ValueError(f"entry {name!r} is not a tensor")
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {dtype}; fastmdl files hold only "
                             f"{sorted(_DTYPES)}")
        if dtype != meta["dtype"] or list(t.shape) != meta["shape"]:
            raise ValueError(f"tensor {name!r} is {t.dtype} {tuple(t.shape)} but the spec says "
                             f"{meta['dtype']} {tuple(meta['shape'])}")
        _check_stored_layout(name, t)
        held += t.numel() * t.element_size()
        if t.numel():  # one stored record read as several tensors would multiply it
            owner = owners.setdefault(t.untyped_storage().data_ptr(), name)
            _expect(owner == name, f"tensors {owner!r} and {name!r} share one storage, "
                                   f"which fastmdl.save never writes")
    _expect(held <= file_size, f"the tensors hold {held} bytes, more than the file's "
                               f"{file_size}")
    for name, t in tensors.items():
        _verify_digest(name, t, table[name]["sha256"])
    return spec, tensors


def _check_stored_layout(name: str, t: torch.Tensor) -> None:
    """``t`` must be stored as fastmdl.save writes it: a dense CPU tensor whose own
    storage holds exactly its elements, in C order. Anything else (a stride-0
    expansion of one stored element, a view into a larger or shared storage) is
    refused before any step reads or copies it, as the copy could be far larger than
    the file."""
    if t.layout != torch.strided or t.device.type != "cpu":
        raise ValueError(f"tensor {name!r} is a {t.layout} tensor on {t.device}; fastmdl "
                         f"files hold dense CPU tensors")
    nbytes = t.numel() * t.element_size()
    if t.storage_offset() != 0 or not t.is_contiguous() or \
            t.untyped_storage().nbytes() != nbytes:
        raise ValueError(
            f"tensor {name!r} is not stored as its elements in C order: shape "
            f"{tuple(t.shape)}, strides {t.stride()}, storage offset {t.storage_offset()}, "
            f"{t.untyped_storage().nbytes()} bytes of storage for {nbytes} bytes of elements "
            f"(fastmdl.save writes each tensor contiguous, in a storage of its own)")


def _verify_digest(name: str, t: torch.Tensor, expected: str) -> None:
    if _digest(t) != expected:
        raise ValueError(f"tensor {name!r} is corrupted (its sha256 checksum differs)")


def _build(spec: dict, tensors: Dict[str, torch.Tensor], file_size: int) -> PrunedModel:
    num_domains = spec["num_domains"]
    _expect(_is_int(num_domains) and num_domains >= 1, f"bad num_domains {num_domains!r}")
    num_classes, input_size, baseline = spec["num_classes"], spec["input_size"], spec["baseline"]
    # Files written before the source was recorded had a given or trained size.
    source = spec.get("input_size_source", "given")
    _check_model_values(num_domains, num_classes, input_size, source, baseline)
    budget = _TableBudget(file_size)
    modules: Dict[str, nn.Module] = {}
    for entry in spec["modules"]:
        name, layer_type, config = entry["name"], entry["type"], entry["config"]
        _check_module_name(name)
        _expect(name not in modules, f"layer {name!r} appears twice")
        local = {k[len(name) + 1:]: t for k, t in tensors.items() if k.startswith(name + ".")}
        if layer_type in _TORCH_LAYERS:
            decoded = _decode_config(name, config)
            _check_torch_layer_sizes(name, layer_type, decoded, local)
            try:
                modules[name] = _torch_layer(layer_type, decoded, local)
            except (TypeError, ValueError) as e:  # torch's own checks of the arguments
                raise ValueError(f"layer {name!r}: {e}") from None
        elif layer_type in _USER_LAYERS:
            try:
                m = _USER_LAYERS[layer_type][1](_decode_config(name, config))
            except (TypeError, ValueError) as e:
                raise ValueError(f"layer {name!r} ({layer_type}): {e}") from None
            _expect(isinstance(m, nn.Module), f"the build function registered for "
                                              f"{layer_type!r} returned {type(m).__name__}")
            modules[name] = _as_stored_dtype(m, local).eval()
        elif layer_type in _PRUNED_LAYERS:
            modules[name] = _pruned_layer(layer_type, name, _decode_config(name, config),
                                          local, num_domains, budget)
        else:
            raise ValueError(f"layer {name!r} has type {layer_type!r}, which is not in the "
                             f"allowlist {sorted(_LAYER_NAMES.values())}")
    for name in modules:  # a layer inside another would overwrite that one's attributes
        _expect(not any(other.startswith(name + ".") for other in modules),
                f"layer {name!r} contains another layer")

    attributes = spec.get("attributes", [])
    _expect(isinstance(attributes, list) and len(set(map(str, attributes))) == len(attributes),
            "malformed list of graph tensors")
    graph_tensors = {}
    for attr in attributes:
        _check_module_name(attr)
        _expect(attr in tensors, f"graph tensor {attr!r} is not among the file's tensors")
        _expect(not any(attr == m or attr.startswith(m + ".") for m in modules),
                f"graph tensor {attr!r} lies inside layer of the same name")
        # Filled (and checked) by the strict load_state_dict below.
        graph_tensors[attr] = nn.Parameter(torch.empty_like(tensors[attr]))

    graph, env = fx.Graph(), {}
    for entry in spec["nodes"]:
        _check_node(entry)
        op, name, target = entry["op"], entry["name"], entry["target"]
        _expect(op != "call_module" or target in modules,
                f"graph node {name!r} calls layer {target!r}, which the file does not define")
        _expect(op != "get_attr" or target in graph_tensors,
                f"graph node {name!r} reads {target!r}, which the file does not list")
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
    net = fx.GraphModule({**modules, **graph_tensors}, graph, class_name)
    _place(net, modules, list(tensors))

    expected = net.state_dict()
    _expect(set(expected) == set(tensors),
            f"the layers' tensors {sorted(set(expected) ^ set(tensors))} are missing or unused")
    for k, t in expected.items():
        _expect(t.shape == tensors[k].shape and t.dtype == tensors[k].dtype,
                f"tensor {k!r} does not fit its layer")
    # Copy the stored bytes exactly (a constructor may have recomputed, e.g. -0.0 as 0.0).
    net.load_state_dict(tensors, strict=True)

    for name, m in modules.items():
        if isinstance(m, (PrunedHeads, PrunedConvHeads, ClassPadding)):
            _expect(m.num_classes == num_classes, f"layer {name!r} has num_classes "
                    f"{m.num_classes}, the model {num_classes}")
    _check_graph(net, num_domains, num_classes, input_size)
    return PrunedModel(net, num_domains, num_classes, input_size, baseline, source)


def _check_model_values(num_domains: int, num_classes, input_size, source, baseline) -> None:
    _expect(isinstance(num_classes, list) and len(num_classes) == num_domains
            and all(_is_int(k) and 0 < k <= _INT_LIMIT for k in num_classes),
            f"bad num_classes {num_classes!r}: expected {num_domains} positive ints")
    _expect(isinstance(input_size, list) and len(input_size) == 3
            and all(_is_int(k) and 0 < k <= _INT_LIMIT for k in input_size),
            f"bad input_size {input_size!r}: expected [C, H, W], 3 positive ints")
    _expect(math.prod(input_size) <= _MAX_INPUT,
            f"input_size {input_size} holds {math.prod(input_size)} values per sample, more "
            f"than the {_MAX_INPUT} fastmdl files allow")
    _expect(source in INPUT_SIZE_SOURCES,
            f"bad input_size_source {source!r}: expected one of {INPUT_SIZE_SOURCES}")
    _expect(isinstance(baseline, dict) and all(
        isinstance(v, list) and all(type(x) in (int, float) for x in v) for v in baseline.values()),
        "bad baseline costs")


class _TableBudget:
    """Counts, layer by layer and before each is built, the bytes of the per-domain
    tables and packed weights the loaded model will hold, and refuses a file that
    claims more than its size allows (see _TABLE_BYTES_PER_FILE_BYTE): these grow
    with the number of domains and channels a config claims, not with the bytes
    the file stores."""

    def __init__(self, file_size: int):
        self.file_size, self.used = file_size, 0
        self.limit = _TABLE_BYTES_PER_FILE_BYTE * file_size + _TABLE_FLOOR

    def spend(self, name: str, nbytes: int, what: str) -> None:
        self.used += nbytes
        _expect(self.used <= self.limit,
                f"layer {name!r}: its {what} ({nbytes} bytes) bring the per-domain tables "
                f"and packed weights of the model to {self.used} bytes, more than a "
                f"{self.file_size}-byte file may claim ({_TABLE_BYTES_PER_FILE_BYTE} times its "
                f"size + {_TABLE_FLOOR})")


class _ShapeCheck(fx.Interpreter):
    """Runs the graph on fake tensors (shapes and dtypes only: no data, no memory)
    and refuses, naming the node, any step that fails, a pruned layer whose input
    does not have the width its tensors take, and any value larger than
    ``limit`` values per sample."""

    def __init__(self, net: fx.GraphModule, limit: int, input_size):
        super().__init__(net)
        self.extra_traceback = False  # our messages name the node already
        self.limit, self.input_size = limit, tuple(input_size)

    def run_node(self, n: fx.Node) -> Any:
        try:
            out = super().run_node(n)
        except _LayerMismatch:
            raise
        except Exception as e:
            raise ValueError(f"{_node_label(n)} fails at the recorded input size "
                             f"{self.input_size}: {type(e).__name__}: {_first_line(e)}") from None
        for t in _pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() > self.limit * _SHAPE_ROWS:
                raise _LayerMismatch(
                    f"{_node_label(n)} makes a value of shape {tuple(t.shape)} for a batch of "
                    f"{_SHAPE_ROWS} at the recorded input size {self.input_size}: "
                    f"{t.numel() // _SHAPE_ROWS} values per sample, more than {self.limit} "
                    f"({_MAX_GROWTH} times the input's, at least {_VALUE_FLOOR})")
        return out

    def call_module(self, target, args, kwargs) -> Any:
        m = self.fetch_attr(target)
        _check_layer_input(target, m, args)
        out = super().call_module(target, args, kwargs)
        residual = kwargs.get("residual", args[2] if len(args) > 2 else None)
        if isinstance(m, PrunedConv2d) and residual is not None:
            _expect_layer(isinstance(residual, torch.Tensor) and residual.shape == out.shape,
                          f"layer {target!r} adds a residual of shape "
                          f"{_shape_of(residual)} to its output of shape {tuple(out.shape)}")
        return out


class _LayerMismatch(ValueError):
    """A problem _ShapeCheck found and already described."""


def _expect_layer(ok: bool, message: str) -> None:
    if not ok:
        raise _LayerMismatch(message)


def _shape_of(v: Any) -> Any:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__


def _node_label(n: fx.Node) -> str:
    if n.op == "call_module":
        return f"layer {n.target!r} (graph node {n.name!r})"
    what = _FUNCTION_NAMES.get(n.target, n.target) if n.op == "call_function" else \
        f"Tensor.{n.target}" if n.op == "call_method" else n.op
    return f"graph node {n.name!r} ({what})"


def _check_layer_input(name: str, m: nn.Module, args: tuple) -> None:
    """A pruned layer's input must have the channels (features) its tensors take,
    and the domain ids as its second argument: nothing else checks either before
    a kernel trusts them."""
    if isinstance(m, PrunedConv2d):
        dims, axis, width = 4, 1, m.weight.shape[1] * m.groups
    elif isinstance(m, PrunedBatchNorm2d):
        dims, axis, width = 4, 1, m.scale.shape[1]
    elif isinstance(m, PrunedHeads):
        dims, axis, width = 2, 1, m.weight.shape[1]
    elif isinstance(m, PrunedConvHeads):
        dims, axis, width = 4, 1, m.weight.shape[1]
    elif isinstance(m, ClassPadding):
        dims, axis, width = 2, 1, max(m.num_classes)
    elif isinstance(m, PrunedLinear):
        dims, axis, width = None, -1, m.weight.shape[1]
    elif isinstance(m, ChannelSelect):
        x = args[0] if args else None
        _expect_layer(isinstance(x, torch.Tensor) and x.dim() >= 2
                      and x.shape[1] >= m.in_channels_needed,
                      f"layer {name!r} selects channels up to {m.in_channels_needed - 1}, "
                      f"got input {_shape_of(x)}")
        return
    else:
        return
    x = args[0] if args else None
    ok = isinstance(x, torch.Tensor) and x.dim() >= 1 and (dims is None or x.dim() == dims)
    _expect_layer(ok and x.shape[axis] == width,
                  f"layer {name!r} takes {f'{dims}-D input' if dims else 'input'} with {width} "
                  f"{'features' if dims != 4 else 'channels'}, got {_shape_of(x)}")
    if not isinstance(m, PrunedLinear):
        domain = args[1] if len(args) > 1 else None
        _expect_layer(isinstance(domain, torch.Tensor) and domain.dtype == torch.int64
                      and domain.dim() == 1 and domain.shape[0] == x.shape[0],
                      f"layer {name!r} must get the domain ids as its second argument, got "
                      f"{_shape_of(domain)}")


def _check_graph(net: fx.GraphModule, num_domains: int, num_classes: List[int],
                 input_size: List[int]) -> None:
    """Run ``net`` once on fake tensors at the recorded input size (see _ShapeCheck):
    its layers must chain, and it must return (N, max(num_classes)) logits."""
    placeholders = [n for n in net.graph.nodes if n.op == "placeholder"]
    _expect(len(placeholders) == 2, f"the graph must take (x, domain), got "
                                    f"{len(placeholders)} inputs")
    params = list(net.parameters())
    _expect(bool(params), "the network has no parameters")
    numel = math.prod(input_size)
    limit = max(_MAX_GROWTH * numel, _VALUE_FLOOR)
    # The layers' real tensors enter the fake pass as fakes of themselves (no copy).
    with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad(), \
            _silenced(logging.getLogger("torch._subclasses.fake_tensor")):
        x = torch.empty((_SHAPE_ROWS, *input_size), dtype=params[0].dtype)
        domain = torch.arange(_SHAPE_ROWS) % num_domains
        out = _ShapeCheck(net, limit, input_size).run(x, domain)
    want = (_SHAPE_ROWS, max(num_classes))
    _expect(isinstance(out, torch.Tensor) and tuple(out.shape) == want
            and out.is_floating_point(),
            f"the network returns {_shape_of(out)} for a batch of {_SHAPE_ROWS} at the recorded "
            f"input size {tuple(input_size)}, not logits of shape {want}")


@contextlib.contextmanager
def _silenced(logger: logging.Logger):
    """Drop ``logger``'s records within the block: FakeTensorMode logs every meta
    kernel that fails, with a traceback, and failing is what the shape pass expects
    of a crafted file (its ValueError says what failed)."""
    def drop(record) -> bool:
        return False
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


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


def _torch_layer(layer_type: str, config: dict,
                 tensors: Optional[Dict[str, torch.Tensor]] = None) -> nn.Module:
    cls = _TORCH_LAYERS[layer_type]
    keys = _config_keys(cls)
    _expect(set(config) == set(keys), f"{layer_type} needs the config keys {keys}, got {config!r}")
    accepted = inspect.signature(cls).parameters
    m = cls(**{k: v for k, v in config.items() if k in accepted})
    rebuilt = _torch_layer_config(m)
    for k, v in config.items():  # constants its constructor fixes (ReLU6's max_val)
        got = rebuilt[k]
        if isinstance(got, tuple) and isinstance(v, list):
            v = tuple(v)
        _expect(got == v, f"{layer_type} cannot be rebuilt with {k}={v!r}")
    return _as_stored_dtype(m, tensors or {}).eval()


def _as_stored_dtype(m: nn.Module, tensors: Dict[str, torch.Tensor]) -> nn.Module:
    """A rebuilt layer in the floating dtype its stored tensors have (constructors
    make float32; the strict load afterwards checks every tensor's dtype)."""
    floating = {t.dtype for t in tensors.values() if t.is_floating_point()}
    return m.to(floating.pop()) if len(floating) == 1 else m


def _pruned_layer(layer_type: str, name: str, config: dict, t: Dict[str, torch.Tensor],
                  num_domains: int, budget: "_TableBudget") -> nn.Module:
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
    if layer_type == "fastmdl.ChannelSelect":
        _expect(config == {}, f"layer {name!r} has config {config!r}, expected {{}}")
        index = take("index", 1, torch.int64)
        _expect(index.numel() > 0 and bool((index >= 0).all()) and int(index.max()) < _INT_LIMIT,
                f"layer {name!r} must select at least one channel, each numbered from 0")
        return ChannelSelect(index)
    if layer_type == "fastmdl.PrunedConv2d":
        return _pruned_conv(name, config, take, shaped, D, budget)
    if layer_type == "fastmdl.PrunedConvHeads":
        return _pruned_conv_heads(name, config, take, shaped, D, budget)
    if layer_type == "fastmdl.ClassPadding":
        _expect(set(config) == {"num_classes"},
                f"layer {name!r} has config {config!r}, expected {{'num_classes': [...]}}")
        classes = _class_counts(name, config, D)
        budget.spend(name, D * max(classes), "table of each domain's padded classes")
        return ClassPadding(classes)
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
    _expect(set(config) == {"num_classes"},
            f"layer {name!r} has config {config!r}, expected {{'num_classes': [...]}}")
    classes = _class_counts(name, config, D, w.shape[0])
    budget.spend(name, D * max(classes) * 8, "table of each domain's logit columns")
    return PrunedHeads(w, b, classes, in_masks)


def _class_counts(name: str, config: dict, D: int, rows: Optional[int] = None) -> List[int]:
    """A head's ``num_classes``: D positive counts (adding up to its weight's ``rows``)."""
    classes = config.get("num_classes")
    _expect(isinstance(classes, list) and len(classes) == D
            and all(_is_int(k) and 0 < k <= _INT_LIMIT for k in classes)
            and (rows is None or sum(classes) == rows),
            f"layer {name!r}: num_classes {classes!r} must be {D} positive counts" +
            (f" adding up to {rows} rows" if rows is not None else ""))
    return classes


def _pruned_conv_heads(name: str, config: dict, take, shaped, D: int,
                       budget: "_TableBudget") -> PrunedConvHeads:
    keys = {"num_classes", "stride", "padding", "dilation"}
    _expect(set(config) == keys, f"layer {name!r}: a PrunedConvHeads config has the keys "
                                 f"{sorted(keys)}, got {config!r}")
    _check_pairs(name, config)
    w, b = take("weight", 4), take("bias", 1, optional=True)
    in_masks = take("in_masks", 2, torch.uint8)
    shaped("bias", b, w.shape[:1], w.dtype)
    shaped("in_masks", in_masks, (D, w.shape[1]), torch.uint8)
    _check_kernel(name, config, tuple(w.shape[2:]))
    classes = _class_counts(name, config, D, w.shape[0])
    # Each domain's filters are packed once, and its class columns tabled.
    budget.spend(name, D * max(classes) * 8 + w.numel() * w.element_size(),
                 "class tables and weights packed per domain")
    return PrunedConvHeads(w, b, classes, in_masks, stride=config["stride"],
                           padding=config["padding"], dilation=config["dilation"])


def _pruned_conv(name: str, config: dict, take, shaped, D: int,
                 budget: "_TableBudget") -> PrunedConv2d:
    stats = _take_stats(name, config, take, shaped)
    _check_conv_config(name, config)
    w = take("weight", 4)
    c_out, groups, kernel = w.shape[0], config["groups"], tuple(w.shape[2:])
    # A convolution without filters stores no weights whatever its input width, and
    # C_in = weight.shape[1] * groups: groups is bounded by the filters it splits.
    _expect(c_out % groups == 0 and groups <= max(c_out, 1),
            f"layer {name!r}: groups={groups} must divide its {c_out} filters and be at most "
            f"their number (1 for a convolution without filters)")
    _check_kernel(name, config, kernel)
    c_in = w.shape[1] * groups
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
                      lists["in_offsets"], c_in, lists["out_index"], lists["out_offsets"], c_out)
    # Before the (D, C) tables below are built, and the compact network packs the
    # weights once per domain.
    budget.spend(name, D * ((c_in + c_out) * 4 + w.numel() * w.element_size()),
                 "channel tables and weights packed per domain")
    in_masks = _shapes.domain_masks(lists["in_index"], lists["in_offsets"], c_in, torch.float32)
    out_masks = _shapes.domain_masks(lists["out_index"], lists["out_offsets"], c_out,
                                     torch.float32)
    return PrunedConv2d(w, in_masks, out_masks, scale, shift, bn_stats=stats, **config)


def _check_conv_config(name: str, config: dict) -> None:
    keys = {"stride", "padding", "dilation", "groups", "padding_mode", "relu"}
    _expect(set(config) == keys, f"layer {name!r}: a PrunedConv2d config has the keys "
                                 f"{sorted(keys)} (and bn_eps), got {config!r}")
    _check_pairs(name, config)
    groups = config["groups"]
    _expect(_is_int(groups) and 1 <= groups <= _INT_LIMIT,
            f"layer {name!r}: groups must be an int in [1, {_INT_LIMIT}], got {groups!r}")
    _expect(config["padding_mode"] in _PADDING_MODES,
            f"layer {name!r}: padding_mode must be one of {_PADDING_MODES}, "
            f"got {config['padding_mode']!r}")
    _expect(type(config["relu"]) is bool,
            f"layer {name!r}: relu must be a bool, got {config['relu']!r}")


def _check_pairs(name: str, config: dict) -> None:
    for key, lo in (("stride", 1), ("padding", 0), ("dilation", 1)):
        _expect(_is_pair(config[key], lo), f"layer {name!r}: {key} must be a list of 2 ints "
                                           f"in [{lo}, {_INT_LIMIT}], got {config[key]!r}")


def _check_kernel(name: str, config: dict, kernel: Tuple[int, int]) -> None:
    """A stored kernel of at least 1x1, and padding it allows (_check_conv_padding)."""
    _expect(min(kernel) >= 1, f"layer {name!r}: kernel size {kernel} must be at least 1x1")
    _check_conv_padding(name, config, kernel)


def _check_conv_padding(name: str, config: dict, kernel: Tuple[int, int]) -> None:
    """Padding at most half the kernel's extent, the bound PyTorch sets for pooling:
    a convolution then never outgrows its input by more than a pixel, whatever
    size the input has. More only adds output computed mostly from padding, which
    no trained network needs, and lets a file claim an output of any size."""
    for axis, p, d, k in zip("HW", config["padding"], config["dilation"], kernel):
        extent = d * (k - 1) + 1
        _expect(2 * p <= extent,
                f"layer {name!r}: padding {config['padding']} exceeds half the kernel's extent "
                f"along {axis} (dilation * (kernel - 1) + 1 = {extent}); at most {extent // 2}")


def _take_stats(name: str, config: dict, take, shaped):
    """A folded BatchNorm's (mean, var, eps), popping ``bn_eps`` from ``config``; None
    when the layer has none (files written before they were kept load unchanged)."""
    eps = config.pop("bn_eps", None)
    mean, var = take("bn_mean", 2, optional=True), take("bn_var", 2, optional=True)
    if eps is None and mean is None and var is None:
        return None
    _expect(type(eps) in (int, float) and 0 < eps < math.inf and mean is not None
            and var is not None,
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
    elif op in ("call_module", "get_attr"):
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
    return type(v) is list and len(v) == 2 and all(_is_int(x) and lo <= x <= _INT_LIMIT
                                                   for x in v)


def _expect(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
