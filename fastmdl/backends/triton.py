"""The Triton backend: availability checks in front of ``fastmdl.kernels``, and
the batch plan that lets the layers of one forward pass share their metadata.

Triton compiles for CUDA GPUs. On the CPU it runs only under the interpreter,
which Triton reads from ``TRITON_INTERPRET=1`` when the kernels are first
imported; the tests use that on small shapes.

Every convolution of a pruned network gets the same ``domain`` tensor, and the
kernel's grouping of the batch by domain (counts, stable order, sample starts)
depends on nothing else. Inside :func:`shared_batch_plan` the first layer builds
it and the others reuse it; outside, each call builds its own. The plan is a
host-side dict keyed on tensor identity and version counter, so using it reads
no device values and a forward pass stays capturable in a CUDA graph.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import os
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple

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


class BatchPlan:
    """Metadata memoised for the calls inside one :func:`shared_batch_plan` scope.

    An entry is keyed on the anchor tensors it was built from (their ``id`` and
    version counter, so an in-place write such as ``domain[0] = 2`` makes the next
    lookup rebuild) and on a caller's key (D, the layer's sizes, ...); it keeps a
    reference to its anchors and checks them by identity, so a recycled ``id``
    can never return another tensor's metadata. Tensors made under
    ``torch.inference_mode`` have no version counter: for them identity alone
    decides, so do not write into such a tensor inside a scope.

    ``builds`` counts, per kind (the first element of the key), how many entries
    were built: two layers that share one grouping show ``builds["grouping"] == 1``.
    """

    __slots__ = ("_entries", "builds")

    def __init__(self) -> None:
        self._entries: Dict[tuple, Tuple[tuple, Any]] = {}
        self.builds: collections.Counter = collections.Counter()

    def lookup(self, anchors: Sequence[torch.Tensor], key: tuple, build: Callable[[], Any]) -> Any:
        """The value stored for (``anchors``, ``key``), or ``build()``'s, stored."""
        anchors = tuple(anchors)
        full_key = tuple((id(t), _version(t), t.device) for t in anchors) + tuple(key)
        hit = self._entries.get(full_key)
        if hit is not None and all(a is b for a, b in zip(hit[0], anchors)):
            return hit[1]
        value = build()
        self.builds[key[0] if key else None] += 1
        self._entries[full_key] = (anchors, value)
        return value

    def __len__(self) -> int:
        return len(self._entries)


def _version(t: torch.Tensor) -> Optional[int]:
    if t.is_inference():
        return None
    return t._version


_PLAN: contextvars.ContextVar[Optional[BatchPlan]] = contextvars.ContextVar(
    "fastmdl_triton_batch_plan", default=None)


@contextlib.contextmanager
def shared_batch_plan() -> Iterator[BatchPlan]:
    """Let the Triton calls inside the block share their per-batch (and per-layer)
    metadata; yields the :class:`BatchPlan`. Cheap (one empty dict) and harmless
    for other backends, which never look at it. Each scope starts empty and
    drops its entries on exit. ``PrunedModel.forward`` opens one around the
    network (outside torch.compile)."""
    token = _PLAN.set(BatchPlan())
    try:
        yield _PLAN.get()
    finally:
        _PLAN.reset(token)


def current_batch_plan() -> Optional[BatchPlan]:
    """The plan of the innermost :func:`shared_batch_plan` scope, or None."""
    return _PLAN.get()


def domain_conv2d(x, weight, domain, in_index, in_offsets, out_index, out_offsets,
                  scale, shift, residual, relu, stride, padding, dilation):
    """Launch the fused Triton kernel (same arguments as the reference), sharing
    metadata through the current :func:`shared_batch_plan`, if any."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError("backend 'triton' takes x of dtype float32, float16 or bfloat16, "
                        f"got {x.dtype}")
    from ..kernels.domain_conv2d import domain_conv2d as launch
    return launch(x, weight, domain, in_index, in_offsets, out_index, out_offsets,
                  scale, shift, residual, relu, tuple(stride), tuple(padding), tuple(dilation),
                  plan=_PLAN.get())


def segment_conv2d(x, offsets, weight, bias, residual, cin, cout, out_slots, kernel, stride,
                   padding, dilation, relu):
    """Launch the compact layout's grouped convolution (``fastmdl.kernels.segment_conv2d``)."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError("backend 'triton' takes x of dtype float32, float16 or bfloat16, "
                        f"got {x.dtype}")
    from ..kernels.segment_conv2d import segment_conv2d as launch
    return launch(x, offsets, weight, bias, residual, list(cin), list(cout), out_slots,
                  tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), relu)
