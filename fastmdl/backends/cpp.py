"""The C++ CPU kernel (``csrc/domain_conv2d_cpu.cpp``), registered as
``torch.ops.fastmdl.domain_conv2d_cpu`` when the extension ``fastmdl._C`` loads."""

from __future__ import annotations

import functools
import importlib.util
from typing import Optional, Tuple

import torch


@functools.lru_cache(maxsize=None)
def status() -> Tuple[bool, str]:
    """(usable, reason): whether the compiled extension loaded, and why not if it did not."""
    if importlib.util.find_spec("fastmdl._C") is None:
        return False, ("the C++ extension fastmdl._C is not installed: it did not build when "
                       "fastmdl was installed (reinstall with `pip install -v .` to see why)")
    try:
        from .. import _C  # noqa: F401  (importing registers the ops)
    except Exception as exc:  # an ImportError or an undefined-symbol OSError alike
        return False, f"the C++ extension fastmdl._C did not load ({type(exc).__name__}: {exc})"
    if not hasattr(torch.ops.fastmdl, "domain_conv2d_cpu"):
        return False, "fastmdl._C loaded but did not register fastmdl::domain_conv2d_cpu"
    return True, "compiled extension fastmdl._C"


def domain_conv2d(x, weight, domain, in_index, in_offsets, out_index, out_offsets,
                  scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                  residual: Optional[torch.Tensor], relu, stride, padding, dilation):
    """Run the C++ kernel (same arguments as the reference)."""
    return torch.ops.fastmdl.domain_conv2d_cpu(
        x, weight, domain, in_index, in_offsets, out_index, out_offsets,
        scale, shift, residual, relu, list(stride), list(padding), list(dilation))
