"""The Triton backend: availability checks in front of ``fastmdl.kernels``.

Triton compiles for CUDA GPUs. On the CPU it runs only under the interpreter,
which Triton reads from ``TRITON_INTERPRET=1`` when the kernels are first
imported; the tests use that on small shapes.
"""

from __future__ import annotations

import functools
import os
from typing import Tuple

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs its kernels in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _import_status() -> Tuple[bool, str]:
    try:
        import triton  # noqa: F401
        from ..kernels import domain_conv2d  # noqa: F401
    except Exception as exc:
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    return True, f"triton {triton.__version__}"


def status(device_type: str) -> Tuple[bool, str]:
    """(usable, reason) for tensors on ``device_type``."""
    ok, why = _import_status()
    if not ok:
        return ok, why
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device"
        return True, why
    if device_type == "cpu":
        if interpreting():
            return True, why + " (interpreter, TRITON_INTERPRET=1)"
        return False, "Triton needs CUDA tensors, or TRITON_INTERPRET=1 for the CPU interpreter"
    return False, f"Triton does not run on {device_type} tensors"


def domain_conv2d(x, weight, domain, in_index, in_offsets, out_index, out_offsets,
                  scale, shift, residual, relu, stride, padding, dilation):
    """Launch the fused Triton kernel (same arguments as the reference)."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"backend 'triton' takes x of dtype float32, float16 or bfloat16, got {x.dtype}")
    from ..kernels.domain_conv2d import domain_conv2d as launch
    return launch(x, weight, domain, in_index, in_offsets, out_index, out_offsets,
                  scale, shift, residual, relu, tuple(stride), tuple(padding), tuple(dilation))
