"""Every backend of fastmdl::domain_conv2d against the reference, on fresh random data.

The error of a backend against a float64 oracle must stay within a small multiple
of the error that the reference itself makes in the same dtype (plus a floor of
a few ulps of the output's scale), as in flash-attention's kernel tests.
"""

import pytest
import torch
import torch.nn.functional as F

from fastmdl import backends
from fastmdl.ops import domain_conv2d

from problems import CASES, Case, check_close, make

def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _backend_dtypes():
    """(backend, device, dtype) triples that can run on this machine."""
    out = []
    for device in _devices():
        for name in backends.NAMES:
            ok, why = backends.status(name, device)
            if name == "cpp":
                dtypes = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
            elif name == "triton":
                # The interpreter has no bfloat16; on the GPU all three run.
                dtypes = ((torch.float32, torch.float16) if device == "cpu"
                          else (torch.float32, torch.float16, torch.bfloat16))
            else:
                dtypes = (torch.float32, torch.float16)
            for dtype in dtypes:
                marks = [] if ok else [pytest.mark.skip(reason=f"{name} on {device}: {why}")]
                out.append(pytest.param(name, device, dtype, marks=marks,
                                        id=f"{name}-{device}-{str(dtype)[6:]}"))
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("name,device,dtype", _backend_dtypes())
def test_matches_reference(name, device, dtype, case, poisoned_empty):
    args = make(case, dtype, device, seed=hash(case.name) % 1000)
    got = domain_conv2d(**args, backend=name)
    check_close(got, args)
    want_format = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    assert got.is_contiguous(memory_format=want_format)


@pytest.mark.parametrize("device", _devices())
def test_reference_matches_masked_dense_formula(device):
    """The oracle itself, against an independent formulation: zero the channels a
    sample's domain does not read, run the dense convolution, keep the domain's
    filters, then affine, residual and ReLU."""
    case = Case("oracle", n=7, d=4, c_in=12, c_out=10, stride=(2, 2), dilation=(1, 2),
                padding=(1, 2))
    a = make(case, torch.float64, device, seed=3)
    d = a["domain"]
    def masks(index, offsets, width):
        m = torch.zeros(offsets.numel() - 1, width, dtype=torch.float64, device=device)
        for k in range(offsets.numel() - 1):
            m[k, index[offsets[k]:offsets[k + 1]]] = 1
        return m[d][:, :, None, None]
    in_m = masks(a["in_index"], a["in_offsets"], case.c_in)
    out_m = masks(a["out_index"], a["out_offsets"], case.c_out)
    z = F.conv2d(a["x"] * in_m, a["weight"], None, a["stride"], a["padding"], a["dilation"])
    want = torch.relu((z * a["scale"][d][:, :, None, None] + a["shift"][d][:, :, None, None])
                      * out_m + a["residual"])
    got = domain_conv2d(**a, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", _devices())
def test_auto_backend_matches_reference(device):
    args = make(Case("auto"), torch.float32, device, seed=11)
    check_close(domain_conv2d(**args), args)


@pytest.mark.parametrize("name,device,dtype", [p for p in _backend_dtypes()
                                               if p.values[2] == torch.float32])
def test_int_domain_equals_tensor_domain(name, device, dtype):
    args = make(Case("int_domain"), dtype, device, seed=5)
    args["domain"] = torch.full_like(args["domain"], 1)
    by_tensor = domain_conv2d(**args, backend=name)
    args["domain"] = 1
    torch.testing.assert_close(domain_conv2d(**args, backend=name), by_tensor, rtol=0, atol=0)


@pytest.mark.parametrize("name,device,dtype", [p for p in _backend_dtypes()
                                               if p.values[2] == torch.float32])
def test_mixed_batch_rows_equal_single_domain_calls(name, device, dtype):
    """Each row of a mixed batch is what a batch of that sample alone gives."""
    args = make(Case("rows", n=5), dtype, device, seed=9)
    mixed = domain_conv2d(**args, backend=name)
    for i in range(5):
        one = dict(args, x=args["x"][i:i + 1], domain=args["domain"][i:i + 1],
                   residual=args["residual"][i:i + 1])
        torch.testing.assert_close(domain_conv2d(**one, backend=name), mixed[i:i + 1],
                                   rtol=1e-5, atol=1e-5)
