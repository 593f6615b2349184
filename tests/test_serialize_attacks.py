"""fastmdl.load on files an attacker crafted: each file is a real pruned model saved
by fastmdl.save and then rewritten, and each is refused with a ValueError naming
the problem, at load, within bounded memory and time. Also the other ways in: a
FIFO for a path, a device this torch lacks, domain ids under torch.compile, and
the temporary file a killed checkpoint write leaves."""

import collections
import hashlib
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import traceback
import types
import zipfile

import pytest
import torch

import fastmdl
from fastmdl import _io

sys.path.insert(0, os.path.dirname(__file__))
from models import TinyVGG  # noqa: E402
from test_serialize import _raw, _rewrite, pruned  # noqa: E402

# Headroom of address space the loading child gets above what it uses once torch
# and fastmdl are imported: a legitimate load fits in it, the attacks' gigabytes not.
HEADROOM = 1536 << 20
CHILD_TIMEOUT = 180  # seconds; a load within bounds takes a few


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model.fmdl"
    fastmdl.save(pruned(), path)
    return path


def _conv(spec, name):
    return next(m for m in spec["modules"] if m["name"] == name)


# ------------------------------------------------------------------ loading in a bounded child

_LOADER = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    import fastmdl

    def address_space():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

    limit = address_space() + int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    start = time.monotonic()
    try:
        fastmdl.load(sys.argv[1])
        result = {"error": None}
    except BaseException as e:
        result = {"error": type(e).__name__, "message": str(e)}
    result["seconds"] = time.monotonic() - start
    print(json.dumps(result))
""")


def _load_bounded(path, headroom=HEADROOM):
    """fastmdl.load(path) in a child process limited to ``headroom`` bytes of address
    space above its baseline and to CHILD_TIMEOUT seconds: {"error", "message", "seconds"}."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2")  # few thread arenas
    done = subprocess.run([sys.executable, "-c", _LOADER, str(path), str(headroom)],
                          capture_output=True, text=True, timeout=CHILD_TIMEOUT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


bounded = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_AS and /proc are Linux's")


@bounded
def test_a_legitimate_file_loads_within_the_bound(saved):
    # The control for the tests below: the bound leaves room for a real load.
    assert _load_bounded(saved)["error"] is None


@bounded
def test_one_stored_element_expanded_to_a_billion(saved):
    # The attack: a 31 KB file whose tensor is one element expanded (stride 0) to
    # 10^9, the spec claiming that shape; the checksum used to materialise 4 GB.
    data = _raw(saved)
    spec = json.loads(data["spec"])
    name = "layer2.0.conv2.weight"
    data["tensors"][name] = torch.zeros(1).expand(10**9)
    spec["tensors"][name]["shape"] = [10**9]
    data["spec"] = json.dumps(spec)
    data["spec_sha256"] = hashlib.sha256(data["spec"].encode()).hexdigest()
    torch.save(data, saved)
    assert saved.stat().st_size < 100_000

    result = _load_bounded(saved)
    assert result["error"] == "ValueError"
    assert name in result["message"] and "not stored as its elements in C order" in \
        result["message"] and "strides (0,)" in result["message"]
    assert result["seconds"] < 30


def _save_claiming(data, path, claims):
    """torch.save(data), except that each tensor in ``claims`` is pickled as a view of
    shape claims[t] (C-order strides) over a one-element storage."""
    class Pickler(pickle.Pickler):
        def reducer_override(self, obj):
            if not any(obj is t for t in claims):
                return NotImplemented
            size = next(s for t, s in claims.items() if t is obj)
            strides = tuple(int(torch.tensor(size[i + 1:]).prod()) for i in range(len(size)))
            storage = torch.storage.TypedStorage(wrap_storage=torch.zeros(1).untyped_storage(),
                                                 dtype=torch.float32, _internal=True)
            return (torch._utils._rebuild_tensor_v2,
                    (storage, 0, size, strides, False, collections.OrderedDict()))

    torch.save(data, path, pickle_module=types.SimpleNamespace(Pickler=Pickler,
                                                               __name__="pickle"))


@bounded
def test_a_tensor_claiming_more_than_its_storage(saved):
    data = _raw(saved)
    spec = json.loads(data["spec"])
    name = "layer2.0.conv2.weight"
    spec["tensors"][name]["shape"] = [10**9]
    data["spec"] = json.dumps(spec)
    data["spec_sha256"] = hashlib.sha256(data["spec"].encode()).hexdigest()
    _save_claiming(data, saved, {data["tensors"][name]: (10**9,)})

    result = _load_bounded(saved)
    assert result["error"] == "ValueError"
    assert "claims more elements than its stored data holds" in result["message"]


@pytest.mark.parametrize("case", ["transposed", "offset into a larger storage", "shared storage"])
def test_tensors_not_stored_as_saved(saved, case):
    data = _raw(saved)
    t = data["tensors"]
    if case == "transposed":
        t["fc.weight"] = t["fc.weight"].t().contiguous().t()
        message = "not stored as its elements in C order"
    elif case == "offset into a larger storage":
        t["fc.bias"] = torch.cat([t["fc.bias"][:1], t["fc.bias"]])[1:]
        message = "storage offset 1"
    else:
        t["conv1.bn_var"] = t["conv1.bn_mean"]  # the same shape, one storage
        message = "share one storage"
    torch.save(data, saved)  # the digests still match: only the layout differs
    with pytest.raises(ValueError, match=message):
        fastmdl.load(saved)


def test_compressed_records(saved):
    # A deflated record expands to up to ~1000 times its stored size inside
    # torch.load: a zip bomb. fastmdl.save stores every record as it is.
    original = zipfile.ZipFile(io.BytesIO(saved.read_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for info in original.infolist():
            z.writestr(info.filename, original.read(info),
                       compress_type=zipfile.ZIP_DEFLATED if "/data/" in info.filename
                       else zipfile.ZIP_STORED)
    saved.write_bytes(out.getvalue())
    assert torch.load(saved, weights_only=True)["format"] == "fastmdl.pruned"  # torch reads it
    with pytest.raises(ValueError, match=r"not a readable fastmdl model file.*is compressed"):
        fastmdl.load(saved)


# ------------------------------------------------------------------ configurations that lie


def _empty_conv(groups, in_channels=None):
    """Edits for _rewrite: layer1.0.conv1 loses every filter (weight (0, C_in, 3, 3)),
    its config says ``groups``; ``in_channels`` sets C_in / groups."""
    name = "layer1.0.conv1"

    def tensors(t):
        w = t[f"{name}.weight"]
        t[f"{name}.weight"] = w.new_zeros((0, in_channels or w.shape[1]) + tuple(w.shape[2:]))
        for key in ("scale", "shift", "bn_mean", "bn_var"):
            t[f"{name}.{key}"] = t[f"{name}.{key}"].new_zeros((t[f"{name}.{key}"].shape[0], 0))
        t[f"{name}.out_index"] = t[f"{name}.out_index"].new_zeros(0)
        t[f"{name}.out_offsets"] = torch.zeros_like(t[f"{name}.out_offsets"])

    def spec(s):
        _conv(s, name)["config"]["groups"] = groups

    return spec, tensors


@bounded
def test_groups_on_a_convolution_without_filters(saved):
    # The attack: a 28 KB file, groups=10^8 on a convolution with no filters
    # (0 % groups == 0): C_in = 7 * 10^8, and the (D, C_in) mask table took 8 GB.
    _rewrite(saved, *_empty_conv(10**8))
    assert saved.stat().st_size < 100_000
    result = _load_bounded(saved)
    assert result["error"] == "ValueError"
    assert "layer1.0.conv1" in result["message"] and "groups=100000000" in result["message"]


@bounded
def test_input_width_no_tensor_pays_for(saved):
    # The same table from a convolution without filters that claims 10^9 inputs:
    # its weight (0, 10^9, 3, 3) costs no byte.
    _rewrite(saved, *_empty_conv(1, in_channels=10**9))
    result = _load_bounded(saved)
    assert result["error"] == "ValueError"
    assert "layer1.0.conv1" in result["message"] and \
        "channel tables and weights packed per domain" in result["message"]


def _conv_config(name, **changes):
    def edit(spec):
        _conv(spec, name)["config"].update(changes)
    return edit


def _wider_input(t):
    w = t["layer1.0.conv2.weight"]  # (7, 6, 3, 3) after a layer with 6 filters
    t["layer1.0.conv2.weight"] = torch.cat([w, w[:, :1]], dim=1)


def _set(key, value):
    def edit(spec):
        spec[key] = value
    return edit


def _set_node(name, **changes):
    def edit(spec):
        next(n for n in spec["nodes"] if n["name"] == name).update(changes)
    return edit


def _zero_kernel(t):
    t["conv1.weight"] = t["conv1.weight"].new_zeros((7, 3, 0, 0))


CHAINS = {
    "C_in after a C_out of another size": (
        None, _wider_input, r"layer 'layer1\.0\.conv2' takes 4-D input with 7 channels, "
                            r"got \(2, 6, 8, 8\)"),
    "padding 10^9": (
        _conv_config("layer2.1.conv1", padding=[10**9, 10**9]), None,
        r"layer 'layer2\.1\.conv1': padding \[1000000000, 1000000000\] exceeds half"),
    "padding past the int range": (
        _conv_config("conv1", padding=[2**40, 1]), None,
        r"layer 'conv1': padding must be a list of 2 ints"),
    "AdaptiveAvgPool output 10^6": (
        lambda s: _conv(s, "avgpool")["config"].update(output_size={"tuple": [10**6, 10**6]}),
        None, r"layer 'avgpool' \(graph node 'avgpool'\) makes a value of shape "
              r"\(2, 12, 1000000, 1000000\).*per sample, more than"),
    "non-int start_dim": (
        _set_node("flatten", args=[{"node": "avgpool"}, "1"]), None,
        r"graph node 'flatten' \(torch\.flatten\) fails at the recorded input size "
        r"\(3, 8, 8\): TypeError"),
    "kernel of size 0": (None, _zero_kernel, r"layer 'conv1': kernel size \(0, 0\)"),
    "output that is not the logits": (
        _set_node("output", args=[{"node": "avgpool"}]), None,
        r"the network returns \(2, 12, 1, 1\) .* not logits of shape \(2, 7\)"),
    "huge recorded input size": (
        _set("input_size", [3, 10**5, 10**5]), None, r"input_size .* values per sample"),
    "padding a 1x1 convolution": (
        _conv_config("layer2.0.downsample.0", padding=[1, 1]), None,
        r"layer 'layer2\.0\.downsample\.0': padding \[1, 1\] exceeds .* at most 0"),
}


@pytest.mark.parametrize("case", sorted(CHAINS))
def test_layers_must_chain_at_the_recorded_input_size(saved, case):
    edit_spec, edit_tensors, message = CHAINS[case]
    _rewrite(saved, edit_spec, edit_tensors)
    with pytest.raises(ValueError, match=message) as e:
        fastmdl.load(saved)
    assert str(saved) in str(e.value) and "While executing" not in str(e.value)


def test_save_refuses_what_load_would(tmp_path):
    path = tmp_path / "model.fmdl"
    path.write_bytes(b"precious")
    p = pruned()
    p.net.get_submodule("layer2.0.downsample.0").padding = [1, 1]  # a 1x1 convolution
    with pytest.raises(ValueError, match=r"cannot save layer 'layer2\.0\.downsample\.0': "
                                         r"padding \[1, 1\] exceeds"):
        fastmdl.save(p, path)
    assert path.read_bytes() == b"precious"


# ------------------------------------------------------------------ other ways in


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without a CUDA device")
@pytest.mark.parametrize("where", ["cuda", "cuda:1", torch.device("cuda")])
def test_map_location_cuda_without_cuda(saved, where):
    with pytest.raises(ValueError, match=r"map_location .*(built without CUDA|no CUDA device)"):
        fastmdl.load(saved, map_location=where)


class _Payload:
    """Pickles to a call that creates ``marker`` when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_refused_global_says_why_and_never_suggests_weights_only_false(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "m.fmdl"
    torch.save({"format": "fastmdl.pruned", "version": 1, "spec": _Payload(marker)}, path)
    with pytest.raises(ValueError) as e:
        fastmdl.load(path)
    # Neither the message nor any exception a traceback would show with it.
    shown = "".join(traceback.format_exception_only(e.value))
    cause = e.value.__cause__ or (None if e.value.__suppress_context__ else e.value.__context__)
    assert cause is None
    assert "weights_only" not in shown and "trust" not in shown
    assert "references the Python object io.open" in str(e.value)
    assert "never contain; refused for safety" in str(e.value)
    assert not marker.exists()


_OPEN_FIFO = textwrap.dedent("""
    import sys
    import fastmdl
    try:
        fastmdl.load(sys.argv[1])
    except ValueError as e:
        print(e)
""")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "model.fmdl"
    os.mkfifo(fifo)
    # In a child with a timeout: opening a FIFO for reading waits for a writer forever.
    done = subprocess.run([sys.executable, "-c", _OPEN_FIFO, str(fifo)], capture_output=True,
                          text=True, timeout=CHILD_TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{fifo}: is a FIFO; fastmdl.load reads regular files only" in done.stdout


def test_a_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        fastmdl.load(tmp_path)


# A writer that is killed inside atomic_write. It loads _io.py alone: importing torch
# would take seconds.
_WRITER = textwrap.dedent("""
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location("fastmdl_io", sys.argv[1])
    io = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(io)
    with io.atomic_write(sys.argv[2]) as f:
        f.write(b"half a checkpoint")
        f.flush()
        print("writing", flush=True)
        time.sleep(600)
""")


def _start_writer(target):
    child = subprocess.Popen([sys.executable, "-c", _WRITER, _io.__file__, str(target)],
                             stdout=subprocess.PIPE)
    assert child.stdout.readline() == b"writing\n"  # b"" if it failed: no hang
    return child


def _kill(child):
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=CHILD_TIMEOUT)
    child.stdout.close()


def _temporaries(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(".tmp"))


@pytest.mark.skipif(sys.platform == "win32", reason="the clean-up needs flock")
def test_the_next_write_removes_a_killed_writes_temporary_file(tmp_path):
    target = tmp_path / "model.fmdl"
    _kill(_start_writer(target))
    [left] = _temporaries(tmp_path)
    assert left.startswith(".model.fmdl.")
    other = tmp_path / ".other.fmdl.0123456789ab.tmp"  # another target's: not ours to remove
    other.write_bytes(b"x")

    fastmdl.save(pruned(), target)
    assert sorted(os.listdir(tmp_path)) == sorted([target.name, other.name])
    assert fastmdl.load(target).num_domains == 3


@pytest.mark.skipif(sys.platform == "win32", reason="the clean-up needs flock")
def test_a_live_writes_temporary_file_is_left_alone(tmp_path):
    target = tmp_path / "model.fmdl"
    child = _start_writer(target)
    try:
        [live] = _temporaries(tmp_path)
        fastmdl.save(pruned(), target)  # another write of the same target meanwhile
        assert _temporaries(tmp_path) == [live]
    finally:
        _kill(child)
    fastmdl.save(pruned(), target)  # now it is a killed write's
    assert os.listdir(tmp_path) == [target.name]


def _vgg():
    torch.manual_seed(0)
    m = fastmdl.convert(TinyVGG(), 3, [5, 2, 7], input_size=(3, 8, 8))
    for g in m.mask_groups():
        g.scores.data = torch.randn_like(g.scores)
    return fastmdl.prune(m.eval())


@pytest.mark.parametrize("layout", ["auto", "union"])
def test_compiled_model_refuses_domain_ids_out_of_range(layout):
    # Compiled, an id of -1 used to index the per-domain tables from their end (a
    # wrong domain's logits) and one past the end to give a zero row or an IndexError.
    p = _vgg()
    p.layout = layout
    x = torch.randn(4, 3, 8, 8)
    good = torch.tensor([0, 1, 2, 2])
    torch._dynamo.reset()
    compiled = torch.compile(p, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, good), p(x, good))
        for bad in (-1, 3):
            domain = torch.tensor([0, 1, bad, 2])
            with pytest.raises(ValueError, match=rf"domain id {bad} is out of range \[0, 3\)"):
                p(x, domain)  # eager
            with pytest.raises(ValueError, match=rf"domain id {bad} is out of range \[0, 3\)"):
                compiled(x, domain)
    torch._dynamo.reset()
