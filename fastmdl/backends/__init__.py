"""Backends of ``fastmdl::domain_conv2d`` and how one is chosen.

| name        | runs on                                     | module                  |
|-------------|---------------------------------------------|-------------------------|
| `reference` | any device (pure PyTorch, the oracle)       | `backends/reference.py` |
| `cpp`       | CPU, when the extension `fastmdl._C` built  | `backends/cpp.py`       |
| `triton`    | CUDA; CPU only under `TRITON_INTERPRET=1`   | `backends/triton.py`    |
| `cuda`      | CUDA, when `fastmdl._C` was built with nvcc | `backends/cuda.py`      |

``backend=None`` (or ``"auto"``) picks the fastest usable one for the device and
kernel: on the CPU ``cpp`` for 1x1 kernels and the reference for larger ones (its
per-domain oneDNN convolutions measured faster there than the C++ kernel's
im2col + GEMM: see benchmarks/NOTES.md), ``triton`` on CUDA (the CUDA C++
kernel ``cuda`` runs only when asked for by name, for now), the reference
otherwise. When the fast backend is missing, the reference runs and a warning
says so once.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Tuple

import torch

from . import cpp, cuda, reference, triton

NAMES = ("reference", "cpp", "triton", "cuda")

_IMPLS: Dict[str, Callable] = {
    "reference": reference.domain_conv2d,
    "cpp": cpp.domain_conv2d,
    "triton": triton.domain_conv2d,
    "cuda": cuda.domain_conv2d,
}

_warned = set()


def status(name: str, device_type: str) -> Tuple[bool, str]:
    """(usable, reason) for backend ``name`` on tensors of ``device_type``."""
    if name == "reference":
        return True, "pure PyTorch"
    if name == "cpp":
        if device_type != "cpu":
            return False, f"the C++ kernel takes CPU tensors, not {device_type}"
        return cpp.status()
    if name == "triton":
        return triton.status(device_type)
    if name == "cuda":
        if device_type != "cuda":
            return False, f"the CUDA kernel takes CUDA tensors, not {device_type}"
        return cuda.status()
    raise ValueError(f"backend must be one of {NAMES} or None, got {name!r}")


def _auto(device_type: str, dtype: torch.dtype, kernel_elems: int = 1) -> str:
    preferred = {"cpu": "cpp", "cuda": "triton"}.get(device_type)
    if device_type == "cpu" and kernel_elems > 1:
        return "reference"
    if preferred is None:
        return "reference"
    ok, why = status(preferred, device_type)
    if preferred == "triton" and dtype not in triton.SUPPORTED_DTYPES:
        ok, why = False, f"Triton does not take {dtype}"
    if ok:
        return preferred
    key = (device_type, preferred, why)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"fastmdl: backend '{preferred}' is not usable on {device_type} ({why}); "
                      "domain_conv2d runs on the pure-PyTorch reference instead. "
                      "`fastmdl info` shows every backend's state.", RuntimeWarning, stacklevel=4)
    return "reference"


def resolve(name: str, device: torch.device, dtype: torch.dtype,
            kernel_elems: int = 1) -> Callable:
    """The implementation to run for backend ``name`` ("auto" or one of NAMES) on a
    convolution whose kernel has ``kernel_elems`` = kh * kw taps."""
    if name == "auto":
        return _IMPLS[_auto(device.type, dtype, kernel_elems)]
    ok, why = status(name, device.type)
    if not ok:
        raise RuntimeError(f"backend {name!r} is not usable for {device.type} tensors: {why}")
    return _IMPLS[name]
