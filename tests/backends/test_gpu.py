"""GPU-only checks of the Triton backend: opcheck on CUDA tensors, and capture in a
CUDA graph (the launch path must not synchronise with the host)."""

import pytest
import torch

from fastmdl.ops import domain_conv2d

from problems import Case, make, op_args, require_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck_cuda(dtype):
    require_backend("triton", "cuda")
    a = make(Case("opcheck_gpu", n=5, c_in=20, c_out=24, hw=(8, 8), d=3), dtype, "cuda", seed=1)
    for k in ("x", "weight", "scale", "shift", "residual"):
        a[k].requires_grad_()
    torch.library.opcheck(torch.ops.fastmdl.domain_conv2d.default, op_args(a, "triton"))


def test_cuda_graph_capture_and_replay():
    require_backend("triton", "cuda")
    a = make(Case("graph", n=16, c_in=48, c_out=64, hw=(14, 14), d=4), torch.float16, "cuda", seed=2)
    eager = domain_conv2d(**a, backend="triton")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        domain_conv2d(**a, backend="triton")  # warm-up compiles the kernel outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = domain_conv2d(**a, backend="triton")
    # New inputs in place: the replay must follow them, including a new domain mix.
    a["x"].copy_(torch.randn_like(a["x"]))
    a["domain"].copy_(torch.randint(0, 4, a["domain"].shape, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    want = domain_conv2d(**a, backend="reference")
    torch.testing.assert_close(captured, want, rtol=2e-2, atol=2e-2)
    assert not torch.equal(captured, eager)
