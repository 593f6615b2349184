"""The op under torch.library.opcheck and torch.compile(fullgraph=True)."""

import pytest
import torch

import fastmdl  # noqa: F401  (registers the ops)
from fastmdl.ops import domain_conv2d

from problems import Case, make, op_args, require_backend


@pytest.mark.parametrize("name", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("case", [Case("opcheck", n=3, c_in=5, c_out=4, hw=(6, 6), d=2),
                                  Case("opcheck_cl", n=3, c_in=5, c_out=4, hw=(6, 6), d=2,
                                       layout="channels_last", epilogue=False, stride=(2, 2))],
                         ids=lambda c: c.name)
def test_opcheck(name, case):
    require_backend(name)
    a = make(case, torch.float32, "cpu", seed=3)
    for k in ("x", "weight", "scale", "shift", "residual"):
        if k in a:
            a[k].requires_grad_()
    torch.library.opcheck(torch.ops.fastmdl.domain_conv2d.default, op_args(a, name))


def test_opcheck_cpp_kernel_op():
    require_backend("cpp")
    a = make(Case("opcheck_cpp", n=3, c_in=5, c_out=4, hw=(6, 6), d=2), torch.float32, "cpu", 4)
    torch.library.opcheck(torch.ops.fastmdl.domain_conv2d_cpu.default, op_args(a),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph_forward_and_backward():
    require_backend("cpp")
    torch._dynamo.reset()
    a = make(Case("compile", n=4, c_in=6, c_out=8, hw=(8, 8), d=2), torch.float32, "cpu", 5)
    keys = ("domain", "in_index", "in_offsets", "out_index", "out_offsets")

    def block(x, weight, scale, shift, residual):
        y = domain_conv2d(x, weight, *(a[k] for k in keys), scale=scale, shift=shift,
                          residual=residual, relu=True, padding=1)
        return (y * 2).sum(dim=(2, 3))

    compiled = torch.compile(block, fullgraph=True)
    tensors = [a[k].detach().clone().requires_grad_()
               for k in ("x", "weight", "scale", "shift", "residual")]
    eager_tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = compiled(*tensors)
    want = block(*eager_tensors)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    want.sum().backward()
    for t, e in zip(tensors, eager_tensors):
        torch.testing.assert_close(t.grad, e.grad, rtol=1e-4, atol=1e-4)
