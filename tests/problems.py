"""Random mixed-domain convolution problems for the tests (never zeros)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch

from fastmdl.ops import index_lists


@dataclass
class Case:
    """One problem shape. Masks are drawn at random unless given per domain."""

    name: str
    n: int = 6
    c_in: int = 19
    c_out: int = 21
    d: int = 3
    hw: Sequence[int] = (9, 9)
    k: int = 3
    stride: Sequence[int] = (1, 1)
    padding: Sequence[int] = (1, 1)
    dilation: Sequence[int] = (1, 1)
    domains: Optional[Sequence[int]] = None       # per-sample domain ids; random if None
    out_sizes: Dict[int, int] = field(default_factory=dict)   # domain -> number of filters
    in_sizes: Dict[int, int] = field(default_factory=dict)    # domain -> number of channels
    layout: str = "contiguous"                    # contiguous | channels_last | strided
    epilogue: bool = True


def _mask(gen, d, width, sizes):
    m = torch.rand(d, width, generator=gen) < 0.5
    for dom, size in sizes.items():
        m[dom] = False
        m[dom, torch.randperm(width, generator=gen)[:size]] = True
    return m


def make(case: Case, dtype=torch.float32, device="cpu", seed=0):
    """The op's arguments for ``case`` as a dict, on ``device`` in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    h, w = case.hw
    x = torch.randn(case.n, case.c_in, h, w, generator=gen)
    if case.layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif case.layout == "strided":
        big = torch.randn(case.n, case.c_in, h, 2 * w, generator=gen)
        big[..., ::2] = x
        x = big[..., ::2]
    weight = (torch.randn(case.c_out, case.c_in, case.k, case.k, generator=gen)
              / (case.c_in * case.k) ** 0.5)
    if case.domains is not None:
        domain = torch.tensor(case.domains, dtype=torch.int64)
    else:
        domain = torch.randint(0, case.d, (case.n,), generator=gen)
    in_idx, in_off = index_lists(_mask(gen, case.d, case.c_in, case.in_sizes))
    out_idx, out_off = index_lists(_mask(gen, case.d, case.c_out, case.out_sizes))
    ho = (h + 2 * case.padding[0] - case.dilation[0] * (case.k - 1) - 1) // case.stride[0] + 1
    wo = (w + 2 * case.padding[1] - case.dilation[1] * (case.k - 1) - 1) // case.stride[1] + 1
    args = dict(x=x, weight=weight, domain=domain, in_index=in_idx, in_offsets=in_off,
                out_index=out_idx, out_offsets=out_off, stride=tuple(case.stride),
                padding=tuple(case.padding), dilation=tuple(case.dilation))
    if case.epilogue:
        args.update(scale=1 + 0.5 * torch.randn(case.d, case.c_out, generator=gen),
                    shift=torch.randn(case.d, case.c_out, generator=gen),
                    residual=torch.randn(case.n, case.c_out, ho, wo, generator=gen), relu=True)
    return {k: _to(v, dtype, device) for k, v in args.items()}


def _to(v, dtype, device):
    if not isinstance(v, torch.Tensor):
        return v
    if v.is_floating_point():
        return v.to(device=device, dtype=dtype)  # keeps channels_last / strides
    return v.to(device)


def upcast(args, dtype=torch.float64):
    """The same problem in another dtype (for the high-precision oracle)."""
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in args.items()}


CASES = [
    Case("base"),
    Case("domain_without_samples", domains=[0, 2, 2, 0, 0, 2]),
    Case("one_filter_and_all_filters", out_sizes={0: 1, 1: 21}),
    Case("one_input_channel_and_none", in_sizes={0: 1, 2: 0}),
    Case("batch_of_one", n=1),
    Case("wide_not_multiple_of_16", c_in=37, c_out=45, hw=(7, 7)),
    Case("stride2_padding1", stride=(2, 2)),
    Case("asymmetric_stride", stride=(2, 1), padding=(0, 1)),
    Case("dilation2", dilation=(2, 2), padding=(2, 2)),
    Case("kernel1x1", k=1, padding=(0, 0)),
    Case("kernel1x1_stride2", k=1, padding=(0, 0), stride=(2, 2)),
    Case("channels_last", layout="channels_last"),
    Case("non_contiguous", layout="strided"),
    Case("no_epilogue", epilogue=False),
    Case("single_domain", d=1),
]


OP_ORDER = ("x", "weight", "domain", "in_index", "in_offsets", "out_index", "out_offsets",
            "scale", "shift", "residual", "relu", "stride", "padding", "dilation")


def op_args(args, backend=None):
    """``args`` as the positional arguments of torch.ops.fastmdl.domain_conv2d
    (with ``backend`` appended), or of domain_conv2d_cpu when backend is None."""
    full = {"scale": None, "shift": None, "residual": None, "relu": False, **args}
    out = tuple(list(full[k]) if k in ("stride", "padding", "dilation") else full[k]
                for k in OP_ORDER)
    return out if backend is None else out + (backend,)


def require_backend(name, device="cpu"):
    """Skip the calling test, with the reason, when backend ``name`` can't run on
    ``device``; fail it instead when the CUDA kernel is missing from an install that
    should hold it (a CUDA torch and nvcc, no FASTMDL_NO_CUDA=1): a failed build."""
    import pytest

    from fastmdl import backends
    from fastmdl.backends import cuda

    ok, why = backends.status(name, device)
    if not ok:
        expected, because = cuda.build_expected()
        if name == "cuda" and expected and not cuda.compiled()[0]:
            pytest.fail(f"backend 'cuda' is missing although {because}: {why}. The CUDA "
                        "build failed; FASTMDL_NO_CUDA=1 marks a CPU-only build as intended.")
        pytest.skip(why)


ULP = {torch.float64: 2.0 ** -52, torch.float32: 2.0 ** -23,
       torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def check_close(got, args, *, tf32=None):
    """The kernel's error against a float64 oracle stays within a small multiple of
    the error the reference itself makes in x's dtype, plus a few ulps of the
    output's scale (as in flash-attention's kernel tests); with ``tf32`` (default:
    on CUDA) float32 also gets TF32's rounding, as cuDNN uses for convolutions."""
    from fastmdl.ops import domain_conv2d

    dtype = args["x"].dtype
    if tf32 is None:
        tf32 = args["x"].device.type == "cuda"
    oracle = domain_conv2d(**upcast(args), backend="reference")
    same_dtype = domain_conv2d(**args, backend="reference")
    assert got.dtype == dtype and got.shape == oracle.shape and got.device == args["x"].device
    assert not torch.isnan(got).any(), "unwritten (NaN-poisoned) or NaN output"
    scale = oracle.abs().max().item() + 1e-6
    err = (got.double() - oracle).abs().max().item()
    ref_err = (same_dtype.double() - oracle).abs().max().item()
    bound = 4 * ref_err + 16 * ULP[dtype] * scale
    if dtype == torch.float32 and tf32:
        bound += 2e-3 * scale
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g} (reference's own: {ref_err:.3g})"
