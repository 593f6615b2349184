"""Whether float32 convolutions and matrix products may round to TF32 on a GPU.

torch 2.9 added per-backend ``fp32_precision`` settings ("tf32", "ieee", or "none":
ask the level above) and deprecated the old ``allow_tf32`` flags, whose reading
warns on recent CUDA builds. These read the new settings where they exist and
the old flags elsewhere, so the kernels round as the framework's own
convolutions and matrix products do.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


def _resolve(*levels: Optional[str]) -> Optional[bool]:
    """The first level that is not "none" decides; None when every level defers."""
    for value in levels:
        if value is not None and value != "none":
            return value == "tf32"
    return None


def _new_api(*names: str) -> list:
    found = []
    for name in names:
        obj = torch.backends
        for part in name.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        found.append(obj if isinstance(obj, str) else None)
    return found


def conv_tf32() -> bool:
    """Whether cuDNN's float32 convolutions may use TF32 (torch's default: yes)."""
    conv, cudnn, top = _new_api("cudnn.conv.fp32_precision", "cudnn.fp32_precision",
                                "fp32_precision")
    if conv is None and cudnn is None:
        return bool(torch.backends.cudnn.allow_tf32)
    decided = _resolve(conv, cudnn, top)
    return bool(decided) if decided is not None else False


def matmul_tf32() -> bool:
    """Whether float32 matrix products on CUDA may use TF32 (torch's default: no)."""
    matmul, cuda, top = _new_api("cuda.matmul.fp32_precision", "cuda.fp32_precision",
                                 "fp32_precision")
    if matmul is None:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    decided = _resolve(matmul, cuda, top)
    return bool(decided) if decided is not None else False


@contextlib.contextmanager
def conv_precision(tf32: bool) -> Iterator[None]:
    """Set cuDNN's float32 convolution precision for the block (new API where it
    exists), and put the old value back after it."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and isinstance(getattr(conv, "fp32_precision", None), str):
        old = conv.fp32_precision
        conv.fp32_precision = "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = old
        return
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = old
