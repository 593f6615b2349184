"""Gradients of fastmdl::domain_conv2d: gradcheck in float64, and each backend's
gradients against the reference's."""

import pytest
import torch

from fastmdl.ops import domain_conv2d

from problems import Case, make, require_backend

GRAD_ARGS = ("x", "weight", "scale", "shift", "residual")
SMALL = Case("grad", n=4, c_in=5, c_out=6, d=3, hw=(5, 5), stride=(2, 1), padding=(1, 1),
             domains=[2, 0, 2, 1])


@pytest.mark.parametrize("name", ["reference", "cpp"])
@pytest.mark.parametrize("relu", [False, True])
def test_gradcheck_float64(name, relu):
    require_backend(name)
    a = make(SMALL, torch.float64, "cpu", seed=2)
    a["relu"] = relu
    inputs = tuple(a[k].detach().clone().requires_grad_() for k in GRAD_ARGS)

    def f(*tensors):
        return domain_conv2d(**{**a, **dict(zip(GRAD_ARGS, tensors))}, backend=name)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_channels_last_and_dilation():
    require_backend("cpp")
    case = Case("grad_cl", n=3, c_in=4, c_out=5, d=2, hw=(7, 6), dilation=(2, 1), padding=(2, 1),
                layout="channels_last")
    a = make(case, torch.float64, "cpu", seed=4)
    x = a["x"].detach().clone().requires_grad_()
    w = a["weight"].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w: domain_conv2d(**{**a, "x": x, "weight": w}, backend="cpp"), (x, w))


def _grads(a, name):
    leaves = {k: a[k].detach().clone().requires_grad_() for k in GRAD_ARGS}
    y = domain_conv2d(**{**a, **leaves}, backend=name)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(y)
    y.backward(g)
    return {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("name", ["cpp", "triton"])
def test_backend_gradients_equal_reference(name):
    require_backend(name)
    a = make(SMALL, torch.float32, "cpu", seed=6)
    want, got = _grads(a, "reference"), _grads(a, name)
    for k in GRAD_ARGS:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4, msg=k)


def test_unused_channels_get_no_gradient():
    """Input channels a sample's domain does not read get exactly zero gradient,
    and so do weights outside every domain's (filter, channel) block."""
    a = make(SMALL, torch.float64, "cpu", seed=8)
    grads = _grads(a, "reference")
    for n, d in enumerate(a["domain"].tolist()):
        used = set(a["in_index"][a["in_offsets"][d]:a["in_offsets"][d + 1]].tolist())
        for c in range(SMALL.c_in):
            if c not in used:
                assert grads["x"][n, c].abs().max() == 0
    live = torch.zeros(SMALL.c_out, SMALL.c_in, dtype=torch.bool)
    for d in set(a["domain"].tolist()):
        rows = a["out_index"][a["out_offsets"][d]:a["out_offsets"][d + 1]]
        cols = a["in_index"][a["in_offsets"][d]:a["in_offsets"][d + 1]]
        live[rows[:, None], cols[None, :]] = True
    assert grads["weight"][~live].abs().max() == 0
