"""``fastmdl info``: versions, and which backends really run here.

Each backend is not only imported but run once on a tiny problem and compared
with the reference, so the table says what works, not what is installed.
"""

from __future__ import annotations

import os
import platform
from typing import List, Tuple

import torch

from . import __version__, backends


def _smoke(name: str, device: str) -> Tuple[bool, str]:
    ok, why = backends.status(name, device)
    if not ok:
        return False, why
    from .ops import domain_conv2d

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 6, 6, generator=gen).to(device)
    w = torch.randn(4, 5, 3, 3, generator=gen).to(device)
    dom = torch.tensor([1, 0, 1], device=device)
    ii = torch.tensor([0, 2, 4, 1, 2, 3], device=device)
    io = torch.tensor([0, 3, 6], device=device)
    oi = torch.tensor([1, 3, 0, 1, 2, 3], device=device)
    oo = torch.tensor([0, 2, 6], device=device)
    try:
        got = domain_conv2d(x, w, dom, ii, io, oi, oo, padding=1, backend=name)
    except Exception as exc:  # report, don't crash: this is a diagnostic
        return False, f"{why}; but a test call failed: {type(exc).__name__}: {exc}"
    want = domain_conv2d(x, w, dom, ii, io, oi, oo, padding=1, backend="reference")
    if not torch.allclose(got, want, rtol=1e-2, atol=1e-2):
        return False, f"{why}; but it disagrees with the reference"
    return True, why


def rows() -> List[Tuple[str, str, str]]:
    """(backend, device, 'yes'/'no' with the reason) for every backend and device."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = []
    for device in devices:
        for name in backends.NAMES:
            if (name == "cpp" and device != "cpu") or (name == "cuda" and device != "cuda"):
                continue
            if name == "triton" and device == "cpu" and not backends.triton.interpreting():
                ok, why = backends.triton._import_status()
                out.append((name, device, ("installed; " if ok else "no: ") + why
                            + ("; runs on CPU only under TRITON_INTERPRET=1" if ok else "")))
                continue
            ok, why = _smoke(name, device)
            out.append((name, device, ("yes: " if ok else "no: ") + why))
    if not torch.cuda.is_available():
        out.append(("triton", "cuda", "no: no CUDA device"))
        out.append(("cuda", "cuda", "no: " + backends.cuda.status()[1]))
    return out


def _smoke_segment(name: str, device: str) -> Tuple[bool, str]:
    """Run ``fastmdl::segment_conv2d`` on ``name`` once and compare with the reference."""
    from . import _segment_ops
    from .backends import triton as triton_backend
    from .ops import segment_conv2d

    if name == "triton":
        ok, why = triton_backend.status(device)
        if not ok:
            return False, why
    else:
        why = "pure PyTorch"
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, 5, generator=gen).to(device)
    offsets = torch.tensor([0, 1, 4], device=device)
    cin, cout = [6, 4], [3, 5]
    w = torch.randn(sum(o * 9 * i for i, o in zip(cin, cout)), generator=gen).to(device)
    try:
        got = segment_conv2d(x, offsets, w, cin, cout, 3, padding=1, backend=name)
    except Exception as exc:
        return False, f"{why}; but a test call failed: {type(exc).__name__}: {exc}"
    want = segment_conv2d(x, offsets, w, cin, cout, 3, padding=1, backend="reference")
    if not torch.allclose(got, want, rtol=1e-2, atol=1e-2):
        return False, f"{why}; but it disagrees with the reference"
    auto = _segment_ops.pick("auto", torch.device(device), torch.float32)
    return True, why + (" (what auto picks)" if auto == name else "")


def compact_rows() -> List[Tuple[str, str, str]]:
    """The compact layout (a PrunedModel's inference): how each device runs it."""
    from . import winograd

    out = [("ragged", "cpu", "yes: per-domain oneDNN convolutions on prepacked weights, "
            "BLAS for small pointwise ones; what a PrunedModel runs on the CPU")]
    if not winograd.available():
        out.append(("ragged/winograd", "cpu", "no: fastmdl._C has no Winograd ops (not built)"))
    elif not winograd.has_avx512():
        out.append(("ragged/winograd", "cpu", "no: no AVX-512 here (its portable path is no "
                    "faster than oneDNN, so 3x3 layers stay on oneDNN)"))
    elif os.environ.get("FASTMDL_WINOGRAD", "1") == "0":
        out.append(("ragged/winograd", "cpu", "no: turned off (FASTMDL_WINOGRAD=0)"))
    else:
        out.append(("ragged/winograd", "cpu", "yes: Winograd F(4x4,3x3), AVX-512, for 3x3 "
                    "stride-1 layers of 8x8 pixels or more"))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for name in ("reference", "triton"):
            if name == "triton" and device == "cpu" and not backends.triton.interpreting():
                out.append((f"padded/{name}", device, "no: Triton runs on CUDA (on the CPU "
                            "only under TRITON_INTERPRET=1)"))
                continue
            ok, why = _smoke_segment(name, device)
            out.append((f"padded/{name}", device, ("yes: " if ok else "no: ") + why))
    if not torch.cuda.is_available():
        out.append(("padded/triton", "cuda", "no: no CUDA device"))
    return out


def extension() -> str:
    """What the compiled extension fastmdl._C holds (or why it did not load)."""
    ok, why = backends.cpp.status()
    if not ok:
        return f"not loaded: {why}"
    has_cuda, why_not = backends.cuda.compiled()
    if has_cuda:
        return "loaded; kernels: CPU (domain_conv2d_cpu) and CUDA (domain_conv2d_cuda)"
    expected, because = backends.cuda.build_expected()
    if expected:  # a CUDA torch and nvcc: the kernel should be there
        return (f"loaded; kernels: CPU (domain_conv2d_cpu) only; the CUDA kernel is MISSING "
                f"although {because}: the CUDA build failed ({why_not})")
    return f"loaded; kernels: CPU (domain_conv2d_cpu) only; no CUDA kernel: {why_not}"


def unbuilt_source_tree() -> str:
    """A warning when fastmdl is imported from a source checkout that was never
    built in place (no ``fastmdl.kernels``, which setup.py maps from ``kernels/``,
    and no compiled extension), '' otherwise. That is what ``python -m fastmdl``
    imports when run from the checkout's root, whatever is installed."""
    package = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(package)
    checkout = (os.path.isfile(os.path.join(root, "setup.py"))
                and os.path.isdir(os.path.join(root, "kernels")))
    if not checkout:
        return ""
    try:
        import importlib.util
        has_kernels = importlib.util.find_spec("fastmdl.kernels") is not None
    except (ImportError, ValueError):
        has_kernels = False
    has_ext = any(name.startswith("_C.") for name in os.listdir(package))
    if has_kernels and has_ext:
        return ""
    return (f"NOTE: this is the unbuilt source tree at {root}, not an installed fastmdl "
            "(python puts the current directory first on its path). Its compiled "
            "extension and fastmdl.kernels exist only once built, so the rows below "
            "describe this tree, not your install. Run `fastmdl info` (the console "
            "script), run python from another directory, or build the checkout in place "
            "with `python -m pip install --no-build-isolation -e .`.")


def report() -> str:
    """The text ``fastmdl info`` prints."""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    lines = [
        f"fastmdl  {__version__}",
        f"python   {platform.python_version()} ({platform.machine()})",
        f"torch    {torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
        f"CUDA device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'})",
        f"triton   {triton_version}",
        f"threads  {torch.get_num_threads()}",
        f"_C       {extension()}",
    ]
    note = unbuilt_source_tree()
    if note:
        lines = [note, ""] + lines
    lines += [
        "",
        f"{'backend':<10} {'device':<7} usable",
        f"{'-' * 10} {'-' * 7} {'-' * 50}",
    ]
    lines += [f"{name:<10} {device:<7} {state}" for name, device, state in rows()]
    lines += ["", "compact layout (PrunedModel inference; padded = torch.compile and CUDA):",
              f"{'storage':<17} {'device':<7} usable", f"{'-' * 17} {'-' * 7} {'-' * 50}"]
    lines += [f"{name:<17} {device:<7} {state}" for name, device, state in compact_rows()]
    return "\n".join(lines)
