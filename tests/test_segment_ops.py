"""fastmdl::segment_conv2d, the compact layout's grouped convolution: the Triton
kernel (under the interpreter here) against the reference, opcheck, bad input."""

import pytest
import torch
import torch.nn.functional as F

import fastmdl  # noqa: F401  (registers the ops)
from fastmdl.ops import segment_conv2d
from problems import ULP, require_backend


def problem(counts, cin, cout, *, slots_in=None, hw=(7, 6), k=3, dtype=torch.float32, seed=0,
            bias=True, residual=True, stride=1, padding=1, dilation=1, out_slots=None):
    """Random arguments (never zeros) for one segment_conv2d call; the slots of x
    past a row's own channels hold garbage, which the op must not read."""
    g = torch.Generator().manual_seed(seed)
    n = sum(counts)
    p_in = slots_in or max(1, max(cin))
    x = torch.randn(n, p_in, *hw, generator=g).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0).tolist()))
    w = torch.randn(sum(o * k * k * i for i, o in zip(cin, cout)), generator=g) / (3 * k)
    out_slots = out_slots or max(1, max(cout))
    sh, sw = stride if isinstance(stride, tuple) else (stride, stride)
    ho = (hw[0] + 2 * padding - dilation * (k - 1) - 1) // sh + 1
    wo = (hw[1] + 2 * padding - dilation * (k - 1) - 1) // sw + 1
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, out_slots=out_slots)
    if bias:
        kwargs["bias"] = torch.randn(sum(cout), generator=g).to(dtype)
    if residual:
        kwargs["residual"] = torch.randn(n, out_slots, ho, wo, generator=g).to(dtype)
    return (x, offsets, w.to(dtype), cin, cout, k), kwargs


CASES = {
    "base": dict(counts=[3, 2, 4], cin=[5, 7, 3], cout=[6, 2, 9]),
    "domain_without_samples": dict(counts=[2, 0, 3], cin=[5, 7, 3], cout=[6, 2, 9]),
    "one_filter_and_no_filter": dict(counts=[2, 3, 1], cin=[5, 7, 3], cout=[1, 0, 4]),
    "no_input_channel": dict(counts=[2, 2, 2], cin=[0, 7, 3], cout=[4, 2, 5]),
    "batch_of_one": dict(counts=[0, 1, 0], cin=[5, 7, 3], cout=[6, 2, 9]),
    "aligned_16": dict(counts=[2, 3], cin=[16, 32], cout=[32, 16], slots_in=32),
    "wide_slots": dict(counts=[2, 3], cin=[5, 9], cout=[6, 7], slots_in=24, out_slots=16),
    "stride2": dict(counts=[3, 2], cin=[4, 6], cout=[5, 3], stride=2),
    "asymmetric_stride": dict(counts=[3, 2], cin=[4, 6], cout=[5, 3], stride=(2, 1)),
    "dilation2": dict(counts=[2, 2], cin=[4, 6], cout=[5, 3], dilation=2, padding=2),
    "kernel1x1": dict(counts=[2, 3], cin=[4, 6], cout=[5, 3], k=1, padding=0),
    "one_domain": dict(counts=[4], cin=[6], cout=[5]),
    "no_epilogue": dict(counts=[2, 3], cin=[4, 6], cout=[5, 3], bias=False, residual=False),
}


def _close(got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype
    assert got.is_contiguous(memory_format=torch.channels_last)
    scale = want.abs().max().item() + 1e-6
    tol = 64 * ULP[dtype] * scale if dtype != torch.float32 else 1e-5 * scale
    err = (got.double() - want.double()).abs().max().item()
    assert err <= tol, f"max error {err:.3g} > {tol:.3g}"


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _on(device, args, kwargs):
    move = (lambda v: v.to(device) if isinstance(v, torch.Tensor) else v)
    return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("name", list(CASES))
def test_triton_matches_the_reference(name, dtype, device):
    require_backend("triton", device)
    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("Triton's CPU interpreter has no bfloat16 (it runs on a GPU)")
    args, kwargs = problem(**CASES[name], dtype=dtype, seed=len(name))
    want = segment_conv2d(*(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point()
                            else a for a in args),
                          **{k: (v.double() if isinstance(v, torch.Tensor) else v)
                             for k, v in kwargs.items()}, backend="reference").to(dtype)
    args, kwargs = _on(device, args, kwargs)  # float32: IEEE unless matmul TF32 is allowed
    got = segment_conv2d(*args, **kwargs, backend="triton").cpu()
    _close(got, want, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_launch_is_captured_in_a_cuda_graph_and_replays_a_new_domain_mix():
    (x, offsets, w, cin, cout, k), kw = problem(counts=[5, 3, 8], cin=[16, 32, 16],
                                                cout=[32, 16, 48], slots_in=32, hw=(14, 14))
    args, kwargs = _on("cuda", (x, offsets, w, cin, cout, k), kw)
    x, offsets = args[0], args[1]
    segment_conv2d(*args, **kwargs, backend="triton")  # autotune outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = segment_conv2d(*args, **kwargs, backend="triton")
    offsets.copy_(torch.tensor([0, 9, 9, 16], device="cuda"))  # domain 1 now has no sample
    graph.replay()
    want = segment_conv2d(*args, **kwargs, backend="reference")
    torch.testing.assert_close(y, want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", list(CASES))
def test_reference_is_each_domain_on_its_own(name):
    """The reference against a plain F.conv2d per domain, zeros past cout[d]."""
    (x, offsets, w, cin, cout, k), kw = problem(**CASES[name], seed=3)
    y = segment_conv2d(x, offsets, w, cin, cout, k, **kw, backend="reference")
    bounds, ws, bs = offsets.tolist(), 0, 0
    for d, (ci, co) in enumerate(zip(cin, cout)):
        s, e = bounds[d], bounds[d + 1]
        wd = w[ws:ws + co * k * k * ci].view(co, k, k, ci).permute(0, 3, 1, 2)
        ws += co * k * k * ci
        if e == s:
            bs += co
            continue
        z = F.conv2d(x[s:e, :ci], wd, None, kw["stride"], kw["padding"], kw["dilation"]) \
            if ci and co else torch.zeros_like(y[s:e, :co])
        if "bias" in kw:
            z = z + kw["bias"][bs:bs + co].view(1, -1, 1, 1)
        bs += co
        if "residual" in kw:
            z = z + kw["residual"][s:e, :co]
        torch.testing.assert_close(y[s:e, :co], z)
        assert torch.equal(y[s:e, co:], torch.zeros_like(y[s:e, co:]))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    require_backend(backend)
    (x, offsets, w, cin, cout, k), kw = problem(counts=[2, 1, 2], cin=[3, 4, 2], cout=[2, 3, 4],
                                                hw=(5, 5))
    torch.library.opcheck(torch.ops.fastmdl.segment_conv2d.default,
                          (x, offsets, w, kw["bias"], kw["residual"], cin, cout, 4, [k, k],
                           [1, 1], [1, 1], [1, 1], True, backend))


def test_relu_and_the_output_slots():
    (x, offsets, w, cin, cout, k), kw = problem(counts=[2, 3], cin=[4, 6], cout=[5, 3],
                                                out_slots=8)
    y = segment_conv2d(x, offsets, w, cin, cout, k, **kw, relu=True, backend="reference")
    assert y.shape[1] == 8 and (y >= 0).all() and (y > 0).any()
    assert torch.equal(y[:2, 5:], torch.zeros_like(y[:2, 5:]))


def test_bad_arguments_name_the_argument():
    (x, offsets, w, cin, cout, k), kw = problem(counts=[2, 3], cin=[4, 6], cout=[5, 3])
    with pytest.raises(ValueError, match="weight"):
        segment_conv2d(x, offsets, w[:-1], cin, cout, k)
    with pytest.raises(ValueError, match="cin and cout"):
        segment_conv2d(x, offsets, w, cin, cout[:1], k)
    with pytest.raises(TypeError, match="cin"):
        segment_conv2d(x, offsets, w, [4, -6], cout, k)
    with pytest.raises(ValueError, match="channel slots"):
        segment_conv2d(x[:, :5], offsets, w, cin, cout, k)
    with pytest.raises(ValueError, match="offsets"):
        segment_conv2d(x, torch.tensor([0, 4, 2]), w, cin, cout, k)
    with pytest.raises(TypeError, match="offsets"):
        segment_conv2d(x, offsets.int(), w, cin, cout, k)
    with pytest.raises(ValueError, match="residual"):
        segment_conv2d(x, offsets, w, cin, cout, k, residual=kw["residual"][:, :2], padding=1)
    with pytest.raises(ValueError, match="out_slots"):
        segment_conv2d(x, offsets, w, cin, cout, k, out_slots=3)
    with pytest.raises(ValueError, match="backend"):
        segment_conv2d(x, offsets, w, cin, cout, k, backend="cpp")
    with pytest.raises(TypeError, match="weight"):
        segment_conv2d(x, offsets, w.double(), cin, cout, k)
