"""The CUDA C++ kernel (``csrc/domain_conv2d_cuda.cu``), registered as
``torch.ops.fastmdl.domain_conv2d_cuda`` when the extension ``fastmdl._C`` loads.

It is compiled into ``fastmdl._C`` only when fastmdl was installed with a CUDA
build of torch and nvcc at hand (see setup.py); on any other install the backend
reports why it is missing instead of failing.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from . import cpp

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def compiled() -> Tuple[bool, str]:
    """(present, reason): whether ``fastmdl._C`` loaded and contains the CUDA kernel."""
    ok, why = cpp.status()  # imports fastmdl._C, which registers its ops
    if not ok:
        return False, why
    if hasattr(torch.ops.fastmdl, "domain_conv2d_cuda"):
        return True, "compiled extension fastmdl._C (CUDA kernel)"
    if torch.version.cuda is None:
        return False, ("torch is a CPU build, so fastmdl._C was built without its CUDA kernel "
                       "(install a CUDA build of torch, then reinstall fastmdl with nvcc on PATH)")
    return False, ("fastmdl._C was built without CUDA sources (nvcc or a CUDA build of torch was "
                   "missing at install; reinstall with `pip install -v .` to see why)")


def build_expected() -> Tuple[bool, str]:
    """(expected, why): whether this install should hold the CUDA kernel, i.e. torch
    is a CUDA build, nvcc is on PATH or under CUDA_HOME, and FASTMDL_NO_CUDA=1 (the
    explicit opt-out setup.py honours) is not set. Where it is expected, its
    absence is a failed build, not a missing feature."""
    import os
    import shutil

    if os.environ.get("FASTMDL_NO_CUDA") == "1":
        return False, "FASTMDL_NO_CUDA=1: built without the CUDA kernel on purpose"
    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        from torch.utils import cpp_extension

        home = cpp_extension.CUDA_HOME
        candidate = os.path.join(home, "bin", "nvcc") if home else None
        nvcc = candidate if candidate and os.path.exists(candidate) else None
    if nvcc is None:
        return False, "no nvcc on PATH or under CUDA_HOME"
    return True, f"torch {torch.__version__} is a CUDA build and nvcc is at {nvcc}"


def status() -> Tuple[bool, str]:
    """(usable, reason) for CUDA tensors."""
    if torch.version.cuda is None:
        return False, "torch is a CPU build"
    ok, why = compiled()
    if not ok:
        return False, why
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, why


def domain_conv2d(x, weight, domain, in_index, in_offsets, out_index, out_offsets,
                  scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                  residual: Optional[torch.Tensor], relu, stride, padding, dilation):
    """Run the CUDA C++ kernel (same arguments as the reference)."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError("backend 'cuda' takes x of dtype float32, float16 or bfloat16, "
                        f"got {x.dtype}")
    return torch.ops.fastmdl.domain_conv2d_cuda(
        x, weight, domain, in_index, in_offsets, out_index, out_offsets,
        scale, shift, residual, relu, list(stride), list(padding), list(dilation))
