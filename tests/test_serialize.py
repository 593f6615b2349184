"""fastmdl.save / fastmdl.load: exact round trips, and clear errors (never a wrong
model, never code run) for files that are corrupted, foreign or crafted."""

import copy
import functools
import hashlib
import json
import operator
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fastmdl
from fastmdl import _io, serialize
from fastmdl.train import recalibrate_bn

sys.path.insert(0, os.path.dirname(__file__))
from models import CatNet, TinyResNet, TinyVGG  # noqa: E402

MODELS = {"resnet": TinyResNet, "vgg": TinyVGG, "cat": CatNet}
DOMAINS = torch.tensor([0, 1, 2, 1, 0, 2, 2])


@functools.lru_cache(maxsize=None)
def _pruned_cached(name: str, fuse: bool) -> fastmdl.PrunedModel:
    torch.manual_seed(len(name) + fuse)
    m = fastmdl.convert(MODELS[name](), 3, [5, 2, 7], input_size=(3, 8, 8))
    for g in m.mask_groups():
        g.scores.data = torch.randn_like(g.scores)
    m.train()
    with torch.no_grad():  # BatchNorm statistics that differ per domain
        for _ in range(3):
            m(torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 1, 0, 2]))
    m.eval()
    return fastmdl.prune(m, fuse=fuse)


def pruned(name: str = "resnet", fuse: bool = True) -> fastmdl.PrunedModel:
    return copy.deepcopy(_pruned_cached(name, fuse))


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model.fmdl"
    fastmdl.save(pruned(), path)
    return path


def _raw(path):
    return torch.load(path, weights_only=True)


def _rewrite(path, edit_spec=None, edit_tensors=None):
    """Re-save the file with its spec and/or tensors edited and every checksum
    recomputed, as a crafted (not corrupted) file would be."""
    data = _raw(path)
    spec = json.loads(data["spec"])
    if edit_tensors is not None:
        edit_tensors(data["tensors"])
        for k, t in data["tensors"].items():
            spec["tensors"][k] = {"dtype": str(t.dtype).removeprefix("torch."),
                                  "shape": list(t.shape), "sha256": serialize._digest(t)}
    if edit_spec is not None:
        edit_spec(spec)
    data["spec"] = json.dumps(spec)
    data["spec_sha256"] = hashlib.sha256(data["spec"].encode()).hexdigest()
    torch.save(data, path)


def _outputs(model, x):
    with torch.no_grad():
        return model(x, DOMAINS), model(x, 1)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_round_trip_is_exact(tmp_path, name, fuse):
    p = pruned(name, fuse)
    path = tmp_path / "m.fmdl"
    fastmdl.save(p, path)
    q = fastmdl.load(path)

    assert isinstance(q, fastmdl.PrunedModel)
    assert not q.training and q.backend == "auto"
    x = torch.randn(len(DOMAINS), 3, 8, 8)
    for a, b in zip(_outputs(p, x), _outputs(q, x)):
        assert torch.equal(a, b)
    sp, sq = p.state_dict(), q.state_dict()
    assert list(sp) == list(sq)  # same names, in the same order
    for k in sp:
        assert sp[k].dtype == sq[k].dtype and torch.equal(sp[k], sq[k]), k
    assert [n for n, _ in p.named_modules()] == [n for n, _ in q.named_modules()]
    assert str(q.net.graph) == str(p.net.graph)
    assert q.net.code == p.net.code
    assert (q.num_domains, q.num_classes, q.input_size, q.baseline) == \
        (p.num_domains, p.num_classes, p.input_size, p.baseline)
    assert str(fastmdl.cost_report(q)) == str(fastmdl.cost_report(p))
    assert repr(q) == repr(p)
    assert os.listdir(tmp_path) == ["m.fmdl"]  # no temporary file left behind


def test_batchnorm_statistics_survive_a_round_trip_and_files_without_them_load(tmp_path):
    p = pruned()
    path = tmp_path / "m.fmdl"
    fastmdl.save(p, path)
    q = fastmdl.load(path)
    g = torch.Generator().manual_seed(3)
    data = [[(torch.randn(6, 3, 8, 8, generator=g) * 2 - 1, None)] for _ in range(3)]
    recalibrate_bn(p, data, batches=1)
    recalibrate_bn(q, data, batches=1)
    x = torch.randn(len(DOMAINS), 3, 8, 8)
    for a, b in zip(_outputs(p, x), _outputs(q, x)):
        assert torch.equal(a, b)
    # A file from before the statistics were kept: it loads, runs, and says why it
    # cannot be recalibrated.
    for m in p.modules():
        if hasattr(m, "set_bn_stats"):
            m.set_bn_stats(None)
    fastmdl.save(p, path)
    old = fastmdl.load(path)
    assert not any(k.endswith(("bn_mean", "bn_var")) for k in old.state_dict())
    for a, b in zip(_outputs(p, x), _outputs(old, x)):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="no BatchNorm statistics"):
        recalibrate_bn(old, data, batches=1)


def test_load_takes_pathlike_and_str_and_map_location(saved):
    p = fastmdl.load(saved)
    for path in (str(saved), Path(saved)):
        for where in (None, "cpu", torch.device("cpu")):
            q = fastmdl.load(path, map_location=where)
            assert next(q.parameters()).device.type == "cpu"
            assert all(torch.equal(a, b) for a, b in zip(p.state_dict().values(),
                                                         q.state_dict().values()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_onto_cuda(saved):
    q = fastmdl.load(saved, map_location="cuda")
    assert all(t.is_cuda for t in q.state_dict().values())
    x = torch.randn(len(DOMAINS), 3, 8, 8, device="cuda")
    y = q(x, DOMAINS.cuda())
    ref = fastmdl.load(saved)(x.cpu(), DOMAINS)
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-4, atol=1e-4)


def test_save_replaces_an_existing_file(saved):
    fastmdl.save(pruned("cat"), saved)
    assert fastmdl.load(saved).num_classes == [5, 2, 7]
    assert "mix" in dict(fastmdl.load(saved).net.named_modules())
    assert os.listdir(saved.parent) == [saved.name]


def test_graph_with_shape_getattr_and_getitem(tmp_path):
    p = pruned("vgg")
    g = p.net.graph
    size = next(n for n in g.nodes if n.op == "call_method" and n.target == "size")
    with g.inserting_before(size):
        shape = g.call_function(getattr, (size.args[0], "shape"))
        first = g.call_function(operator.getitem, (shape, 0))
    size.replace_all_uses_with(first)
    g.erase_node(size)
    p.net.recompile()
    fastmdl.save(p, tmp_path / "m.fmdl")
    q = fastmdl.load(tmp_path / "m.fmdl")
    assert q.net.code == p.net.code and "getattr" in q.net.code
    x = torch.randn(len(DOMAINS), 3, 8, 8)
    for a, b in zip(_outputs(p, x), _outputs(q, x)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layer_type", sorted(serialize._TORCH_LAYERS))
def test_every_torch_layer_rebuilds(layer_type):
    cls = serialize._TORCH_LAYERS[layer_type]
    m = {"torch.nn.MaxPool2d": lambda: cls((3, 2), stride=1, padding=1, ceil_mode=True),
         "torch.nn.AvgPool2d": lambda: cls(3, 2, 1, count_include_pad=False, divisor_override=2),
         "torch.nn.AdaptiveAvgPool2d": lambda: cls((2, None)),
         "torch.nn.AdaptiveMaxPool2d": lambda: cls(3, return_indices=False),
         "torch.nn.LeakyReLU": lambda: cls(0.3),
         "torch.nn.GELU": lambda: cls("tanh"),
         "torch.nn.Dropout": lambda: cls(0.25),
         "torch.nn.Flatten": lambda: cls(2, -1),
         "torch.nn.LayerNorm": lambda: cls((4, 5), eps=1e-6, bias=False),
         "fastmdl.ChannelLayerNorm": lambda: cls(6, eps=1e-6, bias=False),
         "torch.nn.GroupNorm": lambda: cls(2, 6, affine=False),
         "torch.nn.Linear": lambda: cls(5, 3, bias=False)}.get(layer_type, cls)()
    config = serialize._torch_layer_config(m)
    spec = json.loads(json.dumps({k: serialize._encode(v, "test") for k, v in config.items()}))
    rebuilt = serialize._torch_layer(layer_type, serialize._decode_config("m", spec))
    assert type(rebuilt) is cls and repr(rebuilt) == repr(m)
    assert serialize._torch_layer_config(rebuilt) == config


# ------------------------------------------------------------------ bad arguments


def test_type_errors(tmp_path, saved):
    with pytest.raises(TypeError, match="model"):
        fastmdl.save(nn.Linear(2, 2), tmp_path / "x")
    with pytest.raises(TypeError, match="path"):
        fastmdl.save(pruned(), 3)
    with pytest.raises(TypeError, match="path"):
        fastmdl.load(None)
    with pytest.raises(TypeError, match="map_location"):
        fastmdl.load(saved, map_location=0.5)
    with pytest.raises(FileNotFoundError):
        fastmdl.load(tmp_path / "missing.fmdl")


# ------------------------------------------------------------------ corrupted and foreign files


@pytest.mark.parametrize("keep", [0.5, 0.99, 100])
def test_truncated_file(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(ValueError, match="not a readable fastmdl model file") as e:
        fastmdl.load(saved)
    assert str(saved) in str(e.value)


def _flip_inside_largest_tensor(path):
    data = bytearray(path.read_bytes())
    name, t = max(_raw(path)["tensors"].items(), key=lambda kv: kv[1].numel())
    start = data.find(t.numpy().tobytes())
    assert start > 0 and t.numel() > 16
    data[start + t.numel() * t.element_size() // 2] ^= 0x01  # still a valid float
    path.write_bytes(bytes(data))
    return name


def test_flipped_byte_in_tensor_data(saved):
    name = _flip_inside_largest_tensor(saved)
    with pytest.raises(ValueError, match="checksum") as e:
        fastmdl.load(saved)
    assert str(saved) in str(e.value) and name in str(e.value)


def test_flipped_byte_goes_unnoticed_without_the_checksum(saved, monkeypatch):
    # The control for the test above: torch.load itself reads the flipped file, so
    # the checksum is what stands between a corrupted file and a wrong model.
    original = fastmdl.load(saved)
    _flip_inside_largest_tensor(saved)
    monkeypatch.setattr(serialize, "_verify_digest", lambda *args: None)
    wrong = fastmdl.load(saved)
    assert not all(torch.equal(a, b) for a, b in zip(original.state_dict().values(),
                                                     wrong.state_dict().values()))


def test_flipped_byte_in_spec(saved):
    data = bytearray(saved.read_bytes())
    at = data.find(b'"num_domains": 3')
    assert at > 0
    data[at + len(b'"num_domains": ')] = ord("4")
    saved.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="spec is corrupted"):
        fastmdl.load(saved)


def test_plain_state_dict(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(pruned().state_dict(), path)
    with pytest.raises(ValueError, match="not a fastmdl pruned-model file") as e:
        fastmdl.load(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("content", [b"", os.urandom(4096), b"PK\x03\x04" + os.urandom(500)],
                         ids=["empty", "random", "zip-magic"])
def test_random_bytes(tmp_path, content):
    path = tmp_path / "junk.fmdl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a readable fastmdl model file"):
        fastmdl.load(path)


def test_wrong_version(saved):
    data = _raw(saved)
    data["version"] = 2
    torch.save(data, saved)
    with pytest.raises(ValueError, match="version 2"):
        fastmdl.load(saved)


# ------------------------------------------------------------------ crafted files


def _set_node(pred, **changes):
    def edit(spec):
        node = next(n for n in spec["nodes"] if pred(n))
        node.update(changes)
    return edit


def _set_module(pred, **changes):
    def edit(spec):
        m = next(m for m in spec["modules"] if pred(m))
        m.update(changes)
    return edit


def _flatten(n):
    return n["target"] == "torch.flatten"


def _first_conv(m):
    return m["type"] == "fastmdl.PrunedConv2d"


def _shape_says(spec):
    meta = next(iter(spec["tensors"].values()))
    meta["shape"] = meta["shape"] + [1]


def _out_of_range_index(t):
    k = next(k for k in t if k.endswith("in_index"))
    t[k] = t[k].clone()
    t[k][-1] = 10_000


def _bad_scale_shape(t):
    k = next(k for k in t if k.endswith(".scale"))
    t[k] = torch.cat([t[k], t[k][:1]])


def _drop_bn_var(t):
    del t[next(k for k in t if k.endswith(".bn_var"))]


def _unlist_bn_var(spec):
    del spec["tensors"][next(k for k in spec["tensors"] if k.endswith(".bn_var"))]


def _bad_bn_stats_shape(t):
    k = next(k for k in t if k.endswith(".bn_mean"))
    for key in (k, k[:-len("mean")] + "var"):
        t[key] = t[key][:, :-1].contiguous()


CRAFTED = {
    "tensor shape differs from spec": (_shape_says, None, "spec says"),
    "function outside allowlist": (_set_node(_flatten, target="os.system"), None, "os.system"),
    "getattr of a dunder": (_set_node(_flatten, target="builtins.getattr",
                                      args=[{"node": "avgpool"}, "__class__"]), None, "getattr"),
    "method outside allowlist": (_set_node(_flatten, op="call_method", target="register_hook"),
                                 None, "register_hook"),
    "unknown op": (_set_node(_flatten, op="call_anything"), None, "not supported"),
    "get_attr of a tensor the file does not list": (_set_node(_flatten, op="get_attr"), None,
                                                    "does not list"),
    "layer named like an attribute": (_set_module(lambda m: m["name"] == "avgpool",
                                                  name="training"), None, "layer name"),
    "layer type outside allowlist": (_set_module(lambda m: m["name"] == "avgpool",
                                                 type="torch.nn.Sequential"), None,
                                     "torch.nn.Sequential"),
    "builtin as layer type": (_set_module(lambda m: m["name"] == "avgpool", type="builtins.eval"),
                              None, "builtins.eval"),
    "code in a layer name": (_set_module(_first_conv, name='x"); import os; ("'), None,
                             "layer name"),
    "code in a keyword name": (_set_node(lambda n: n["op"] == "output",
                                         kwargs={"x); import os; (y": 1}), None, "keyword"),
    "code in a node name": (_set_node(_flatten, name="a=1;import os"), None, "not an identifier"),
    "reference to a later node": (_set_node(_flatten, args=[{"node": "fc"}, 1]), None,
                                  "not an earlier node"),
    "bad conv config": (_set_module(_first_conv, config={"stride": [0, 1]}), None, "config"),
    "index out of range": (None, _out_of_range_index, "in_index"),
    "scale of the wrong shape": (None, _bad_scale_shape, "scale"),
    "BatchNorm mean without its variance": (_unlist_bn_var, _drop_bn_var,
                                             "bn_var absent"),
    "BatchNorm statistics of the wrong shape": (None, _bad_bn_stats_shape, "bn_mean"),
    "BatchNorm eps of zero": (_set_module(_first_conv, config={
        "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1,
        "padding_mode": "zeros", "relu": True, "bn_eps": 0.0}), None, "bn_eps > 0"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_file(saved, case):
    edit_spec, edit_tensors, message = CRAFTED[case]
    _rewrite(saved, edit_spec, edit_tensors)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        fastmdl.load(saved)
    assert str(saved) in str(e.value)


class _Payload:
    """Pickles to a call that creates ``marker`` when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    zipped, legacy = tmp_path / "zipped.fmdl", tmp_path / "legacy.fmdl"
    torch.save({"format": "fastmdl.pruned", "version": 1, "spec": _Payload(marker)}, zipped)
    legacy.write_bytes(pickle.dumps(_Payload(marker), protocol=2))
    for path in (zipped, legacy):
        with pytest.raises(ValueError, match="not a readable fastmdl model file"):
            fastmdl.load(path)
        assert not marker.exists()
    # Control: the payload is live, so the above shows it was never run.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(_Payload(control))).close()
    assert control.exists()


# ------------------------------------------------------------------ unsupported models


class _MyReLU(nn.Module):
    def forward(self, x):
        return x.clamp(min=0)


def _shout(x):
    return x


def test_unsupported_layer_leaves_existing_file_alone(tmp_path):
    path = tmp_path / "model.fmdl"
    path.write_bytes(b"precious")
    p = pruned("vgg")
    assert type(p.net.classifier.get_submodule("1")) is nn.ReLU
    setattr(p.net.classifier, "1", _MyReLU())
    with pytest.raises(ValueError, match=r"classifier\.1.*_MyReLU"):
        fastmdl.save(p, path)
    assert path.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["model.fmdl"]


def test_unsupported_function_and_method(tmp_path):
    path = tmp_path / "model.fmdl"
    p = pruned("resnet")
    node = next(n for n in p.net.graph.nodes if n.op == "call_function")
    node.target = _shout
    with pytest.raises(ValueError, match="_shout"):
        fastmdl.save(p, path)
    node.op, node.target = "call_method", "register_hook"
    with pytest.raises(ValueError, match="register_hook"):
        fastmdl.save(p, path)
    assert not path.exists() and os.listdir(tmp_path) == []


def test_unsupported_value_in_graph(tmp_path):
    p = pruned("resnet")
    node = next(n for n in p.net.graph.nodes if n.op == "call_function")
    node.args = (node.args[0], torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        fastmdl.save(p, tmp_path / "m.fmdl")


# ------------------------------------------------------------------ atomic writes


def test_atomic_write_failure_keeps_old_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with _io.atomic_write(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("boom")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_atomic_write_replace_failure_cleans_up(tmp_path):
    target = tmp_path / "dir"
    target.mkdir()
    (target / "inside").write_bytes(b"x")
    with pytest.raises(OSError):
        _io.write_atomic_bytes(target, b"data")  # cannot replace a non-empty directory
    assert sorted(os.listdir(tmp_path)) == ["dir"]


def test_write_atomic_bytes(tmp_path):
    path = tmp_path / "f.bin"
    _io.write_atomic_bytes(path, b"one")
    _io.write_atomic_bytes(str(path), b"two")
    assert path.read_bytes() == b"two"
    with _io.atomic_write(path, "w") as f:
        f.write("text é")
    assert path.read_text(encoding="utf-8") == "text é"
    assert os.listdir(tmp_path) == ["f.bin"]
