"""Winograd F(4x4, 3x3) convolution on the CPU (``csrc/winograd_cpu.cpp``).

A float32 3x3 convolution with stride 1, dilation 1, padding 1 and groups 1 on
channels_last input, with the epilogue fused::

    y = relu?(conv2d(x, weight, padding=1) + bias + residual)

The weights are transformed once (:func:`prepack`) into a plain float32 tensor of
shape ``(36, C_in, C_out)`` that can be stored with the model; :func:`conv3x3`
then runs the op ``torch.ops.fastmdl.winograd_conv3x3``. Winograd F(4x4, 3x3)
does 4x fewer multiplies than the direct convolution; its float32 error is about
1e-5 of max|y| (direct float32: about 3e-7), see ``tests/test_winograd.py``.

On a 2-core AVX-512 (Zen 4) machine it is 1.9-3.1x faster than oneDNN's direct
convolution with prepacked weights on the pruned ResNet-26 layers (C = 32..192,
N = 2..16, with or without the residual; ``benchmarks/winograd_speed.py``). It loses where the transformed weights
(4x the size of the plain ones) dominate: few pixels and very many channels, e.g.
2 x 512 x 8x8. Machines without AVX-512 run a portable path (same results, GEMMs
through ATen's BLAS), which is not faster than oneDNN.

Unlike the direct convolution, an inf or NaN input spreads to the whole 4x4 output
tile around it (the transforms subtract neighbouring pixels).

Fake (meta) implementations are registered for the ops, so they trace under
``torch.compile`` / ``torch.export``; there is no autograd formula (inference only).
``torch.ops.fastmdl.winograd_conv3x3_portable`` runs the portable path anywhere (tests).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

__all__ = ["available", "prepack", "conv3x3", "has_avx512"]

_OPS = ("winograd_prepack", "winograd_conv3x3", "winograd_conv3x3_portable",
        "winograd_has_avx512")


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Whether the compiled extension loaded and registered the Winograd ops."""
    try:
        from . import _C  # noqa: F401  (importing registers the ops)
    except Exception:  # not built, or did not load
        return False
    if not all(hasattr(torch.ops.fastmdl, name) for name in _OPS):
        return False
    _register_fakes()
    return True


def has_avx512() -> bool:
    """Whether the op runs its AVX-512 code path on this machine (else the portable one)."""
    return available() and bool(torch.ops.fastmdl.winograd_has_avx512())


def _require() -> None:
    if not available():
        raise RuntimeError("fastmdl.winograd needs the C++ extension fastmdl._C with the "
                           "winograd ops; it is not built or did not load (see `fastmdl info`)")


_fakes_registered = False


def _register_fakes() -> None:
    global _fakes_registered
    if _fakes_registered:
        return
    _fakes_registered = True

    def prepack_fake(weight):
        return weight.new_empty((36, weight.shape[1], weight.shape[0]))

    def conv_fake(x, packed, bias, residual, relu):
        torch._check(x.dim() == 4, lambda: "winograd_conv3x3: x must be 4-D")
        torch._check(packed.dim() == 3, lambda: "winograd_conv3x3: packed must be 3-D")
        n, _, h, w = x.shape
        return torch.empty((n, packed.shape[2], h, w), dtype=x.dtype, device=x.device,
                           memory_format=torch.channels_last)

    torch.library.register_fake("fastmdl::winograd_prepack", prepack_fake)
    torch.library.register_fake("fastmdl::winograd_conv3x3", conv_fake)
    torch.library.register_fake("fastmdl::winograd_conv3x3_portable", conv_fake)


def _check_tensor(name: str, t, dtype_msg: str = "float32") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be {dtype_msg}, got {t.dtype}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got device {t.device}")


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """Transform 3x3 filters ``(C_out, C_in, 3, 3)`` for :func:`conv3x3`.

    Returns a float32 tensor ``(36, C_in, C_out)``: ``packed[6a + b, ci, co]`` is entry
    ``(a, b)`` of ``G g G^T`` for the filter ``g = weight[co, ci]`` (computed in float64).
    """
    _check_tensor("weight", weight)
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must have shape (C_out, C_in, 3, 3), got {tuple(weight.shape)}")
    _require()
    return torch.ops.fastmdl.winograd_prepack(weight.detach())


def conv3x3(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor] = None,
            residual: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
    """``relu?(conv2d(x, W, padding=1) + bias + residual)`` for ``packed = prepack(W)``.

    ``x`` is ``(N, C_in, H, W)`` float32; channels_last is the fast layout, any other
    layout is converted first (a copy). ``residual`` (optional) has the output's shape.
    Returns ``(N, C_out, H, W)`` in channels_last memory format.
    """
    _check_tensor("x", x)
    _check_tensor("packed", packed)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C_in, H, W), got shape {tuple(x.shape)}")
    if packed.dim() != 3 or packed.shape[0] != 36:
        raise ValueError("packed must have shape (36, C_in, C_out) as returned by "
                         f"fastmdl.winograd.prepack, got {tuple(packed.shape)}")
    if x.shape[1] != packed.shape[1]:
        raise ValueError(f"x has {x.shape[1]} input channels but packed was made for "
                         f"C_in = {packed.shape[1]}")
    c_out = packed.shape[2]
    if bias is not None:
        _check_tensor("bias", bias)
        if tuple(bias.shape) != (c_out,):
            raise ValueError(f"bias must have shape (C_out,) = ({c_out},), got {tuple(bias.shape)}")
    if residual is not None:
        _check_tensor("residual", residual)
        want = (x.shape[0], c_out, x.shape[2], x.shape[3])
        if tuple(residual.shape) != want:
            raise ValueError(f"residual must have the output's shape {want}, "
                             f"got {tuple(residual.shape)}")
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    _require()
    if not x.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return torch.ops.fastmdl.winograd_conv3x3(x, packed, bias, residual, relu)


available()  # registers the fake implementations when the extension has the ops
