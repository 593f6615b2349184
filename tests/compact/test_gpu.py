"""The compact layout on a CUDA device: the padded storage with one Triton launch per
convolution against the union layout, in each dtype, and the whole forward pass
captured in a CUDA graph and replayed on another domain mix."""

import pytest
import torch

import fastmdl
from models import CatNet, OddNet, SEBlockNet, TinyResNet, TinyVGG
from test_prune import trained

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MODELS = {"resnet": TinyResNet, "vgg": TinyVGG, "cat": CatNet, "se": SEBlockNet, "odd": OddNet}
BOUND = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def _rel(got, want):
    fin = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), fin)
    return ((got.double() - want)[fin].norm() / want[fin].norm()).item()


@pytest.mark.parametrize("dtype", list(BOUND), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("name", list(MODELS))
def test_compact_on_cuda_equals_the_union_layout(name, dtype):
    p = fastmdl.prune(trained(MODELS[name]))
    want_model = fastmdl.prune(trained(MODELS[name])).cuda().double()
    want_model.layout = "union"
    p = p.cuda().to(dtype)
    x = torch.randn(12, 3, 8, 8, device="cuda")
    for domain in (torch.tensor([0, 1, 2] * 4), torch.tensor([2, 2, 0] * 4), torch.tensor([1])):
        d = domain.cuda()
        xs = x[:d.numel()]
        with torch.inference_mode():
            got = p(xs.to(dtype), d)
            want = want_model(xs.double(), d)
        assert _rel(got, want) <= BOUND[dtype], (name, domain.tolist())


def test_the_whole_forward_is_captured_in_a_cuda_graph():
    p = fastmdl.prune(trained(TinyResNet)).cuda().half()
    x = torch.randn(16, 3, 8, 8, device="cuda", dtype=torch.half)
    domain = (torch.arange(16) % 3).cuda()
    with torch.inference_mode():
        p(x, domain)  # pack, tune and compile outside the capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            p(x, domain)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = p(x, domain)
        domain.copy_(torch.tensor([2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2]).cuda())
        graph.replay()
        want = p(x, domain)
    torch.testing.assert_close(y.nan_to_num(0, 0, 0), want.nan_to_num(0, 0, 0), rtol=1e-2,
                               atol=1e-2)
