"""GPU-only checks of the CUDA backends ("triton" and the CUDA C++ kernel "cuda"):
every edge case of tests/problems.py against the reference in float32, float16 and
bfloat16, opcheck on CUDA tensors, and capture in a CUDA graph (the launch path
must not synchronise with the host)."""

import zlib

import pytest
import torch

from fastmdl._tf32 import conv_precision
from fastmdl.ops import domain_conv2d

from problems import CASES, Case, check_close, make, op_args, require_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_BACKENDS = ["triton", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _seed(name):
    return zlib.crc32(name.encode()) % 1000


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_matches_reference(name, dtype, case, poisoned_empty):
    require_backend(name, "cuda")
    args = make(case, dtype, "cuda", seed=_seed(case.name))
    got = domain_conv2d(**args, backend=name)
    check_close(got, args)
    want_format = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    assert got.is_contiguous(memory_format=want_format)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_many_tiles_column_blocks_and_k_steps(name, dtype, poisoned_empty):
    """Several row tiles per domain, several column blocks (used and unused), a K
    loop of many steps, in both layouts."""
    require_backend(name, "cuda")
    for layout in ("contiguous", "channels_last"):
        case = Case("large", n=12, c_in=96, c_out=160, hw=(14, 14), d=4, layout=layout,
                    out_sizes={1: 150, 2: 3})
        args = make(case, dtype, "cuda", seed=_seed(layout))
        check_close(domain_conv2d(**args, backend=name), args)


def test_cuda_float32_without_tf32_is_float32_accurate():
    require_backend("cuda", "cuda")
    # The kernel then uses float FMAs, cuDNN ieee.
    with conv_precision(tf32=False):
        for case in (Case("fp32_3x3"),
                     Case("fp32_1x1_cl", k=1, padding=(0, 0), layout="channels_last")):
            args = make(case, torch.float32, "cuda", seed=_seed(case.name))
            check_close(domain_conv2d(**args, backend="cuda"), args, tf32=False)


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_relu_keeps_nan(name):
    require_backend(name, "cuda")
    args = make(Case("nan"), torch.float32, "cuda", seed=7)
    args["x"][0, :, 4, 4] = float("nan")
    got = domain_conv2d(**args, backend=name)
    want = domain_conv2d(**args, backend="reference")
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.isnan(got).any()


def test_cuda_empty_batch_and_bad_dtype():
    require_backend("cuda", "cuda")
    args = make(Case("empty", n=0, domains=[]), torch.float16, "cuda")
    y = domain_conv2d(**args, backend="cuda")
    assert y.shape == (0, 21, 9, 9) and y.device.type == "cuda"
    args = make(Case("double"), torch.float64, "cuda")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        domain_conv2d(**args, backend="cuda")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        torch.ops.fastmdl.domain_conv2d_cuda(*op_args(args))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_opcheck_cuda(name, dtype):
    require_backend(name, "cuda")
    a = make(Case("opcheck_gpu", n=5, c_in=20, c_out=24, hw=(8, 8), d=3), dtype, "cuda", seed=1)
    for k in ("x", "weight", "scale", "shift", "residual"):
        a[k].requires_grad_()
    torch.library.opcheck(torch.ops.fastmdl.domain_conv2d.default, op_args(a, name))


def test_opcheck_cuda_kernel_op():
    require_backend("cuda", "cuda")
    for layout in ("contiguous", "channels_last"):
        a = make(Case("opcheck_cuda_op", n=3, c_in=5, c_out=4, hw=(6, 6), d=2, layout=layout),
                 torch.float16, "cuda", seed=4)
        torch.library.opcheck(torch.ops.fastmdl.domain_conv2d_cuda.default, op_args(a),
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("name", GPU_BACKENDS)
def test_cuda_graph_capture_and_replay(name):
    require_backend(name, "cuda")
    a = make(Case("graph", n=16, c_in=48, c_out=64, hw=(14, 14), d=4), torch.float16, "cuda",
             seed=2)
    eager = domain_conv2d(**a, backend=name)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        domain_conv2d(**a, backend=name)  # warm-up (compiles a Triton kernel) outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = domain_conv2d(**a, backend=name)
    # New inputs in place: the replay must follow them, including a new domain mix.
    a["x"].copy_(torch.randn_like(a["x"]))
    a["domain"].copy_(torch.randint(0, 4, a["domain"].shape, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    want = domain_conv2d(**a, backend="reference")
    torch.testing.assert_close(captured, want, rtol=2e-2, atol=2e-2)
    assert not torch.equal(captured, eager)
