"""The op ``fastmdl::segment_conv2d``: the compact layout's convolution over all
segments of a batch in one call. Its schema (declared once, here), its fake
implementation for tracing, and its device implementation (a backend pick).

Arguments (all shapes static, so the op traces under torch.compile and a CUDA
graph captures it):

- ``x`` (N, P_in, H, W): rows sorted by domain; segment d is rows
  [offsets[d], offsets[d+1]) and holds its ``cin[d]`` channels in slots
  [0, cin[d]) (the slots past them are not read);
- ``offsets`` (D + 1,) int64 on x's device;
- ``weight``: every domain's packed filters, flat; domain d's block is
  (cout[d], kh, kw, cin[d]) (the reduction axis contiguous) and follows domain
  d-1's; ``bias`` (sum(cout),) likewise, or None;
- ``residual`` (N, out_slots, H_out, W_out) or None; out_slots >= max(1, max(cout)).

Output (N, out_slots, H_out, W_out), channels_last: for rows r of segment d,
``y[r, :cout[d]] = act(W_d * x[r, :cin[d]] + b_d + residual[r, :cout[d]])`` and
``y[r, cout[d]:] = 0``. No autograd formula: the compact layout is for inference
(the union op ``fastmdl::domain_conv2d`` carries training).
"""

from __future__ import annotations

import torch

from . import _shapes
from .backends import reference
from .backends import triton as triton_backend

SCHEMA = (
    "segment_conv2d(Tensor x, Tensor offsets, Tensor weight, Tensor? bias, Tensor? residual, "
    "int[] cin, int[] cout, int out_slots, int[2] kernel, int[2] stride, int[2] padding, "
    "int[2] dilation, bool relu, str backend) -> Tensor"
)
BACKENDS = ("auto", "reference", "triton")

_lib = torch.library.Library("fastmdl", "FRAGMENT")
_lib.define(SCHEMA)


def pick(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs: "auto" is Triton on CUDA (when usable, for its dtypes),
    the reference everywhere else."""
    if backend != "auto":
        return backend
    if device.type == "cuda" and dtype in triton_backend.SUPPORTED_DTYPES and \
            triton_backend.status("cuda")[0]:
        return "triton"
    return "reference"


def _forward(x, offsets, weight, bias, residual, cin, cout, out_slots, kernel, stride, padding,
             dilation, relu, backend):
    name = pick(backend, x.device, x.dtype)
    if name == "triton":
        ok, why = triton_backend.status(x.device.type)
        if not ok:
            raise RuntimeError(f"segment_conv2d backend 'triton' is not usable: {why}")
        return triton_backend.segment_conv2d(x, offsets, weight, bias, residual, cin, cout,
                                             out_slots, kernel, stride, padding, dilation, relu)
    if name != "reference":
        raise ValueError(f"segment_conv2d backend must be one of {BACKENDS}, got {backend!r}")
    return reference.segment_conv2d(x, offsets, weight, bias, residual, cin, cout, out_slots,
                                    kernel, stride, padding, dilation, relu)


_lib.impl("segment_conv2d", _forward, "CompositeExplicitAutograd")


@torch.library.register_fake("fastmdl::segment_conv2d")
def _fake(x, offsets, weight, bias, residual, cin, cout, out_slots, kernel, stride, padding,
          dilation, relu, backend):
    ho, wo = _shapes.conv_output_hw(x.shape[2:], kernel, stride, padding, dilation)
    return x.new_empty((x.shape[0], out_slots, ho, wo)).contiguous(
        memory_format=torch.channels_last)
