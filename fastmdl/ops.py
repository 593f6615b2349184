"""Public entry points of fastmdl's ops.

``domain_conv2d`` checks and normalises its arguments, then calls the op
``torch.ops.fastmdl.domain_conv2d`` (declared in ``fastmdl/_ops.py``).
``index_lists`` turns per-domain 0/1 masks into the CSR index lists it takes.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from . import _domain, _ops, _segment_ops, _shapes, backends  # noqa: F401  (declare the ops)

IntPair = Union[int, Sequence[int]]
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def domain_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    domain: Union[int, torch.Tensor],
    in_index: torch.Tensor,
    in_offsets: torch.Tensor,
    out_index: torch.Tensor,
    out_offsets: torch.Tensor,
    *,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    relu: bool = False,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""Mixed-domain convolution in one call.

    Domain d reads input channels ``in_d = in_index[in_offsets[d]:in_offsets[d+1]]`` and
    writes output filters ``out_d = out_index[out_offsets[d]:out_offsets[d+1]]``. For
    sample n of domain d = ``domain[n]`` and output channel c:

    .. math::
        y_{n,c} = \mathrm{act}\Big([c \in out_d]\big(\textstyle\sum_{i \in in_d}
                  W_{c,i} \star x_{n,i} \cdot s_{d,c} + t_{d,c}\big) + r_{n,c}\Big)

    with s = ``scale`` (default 1), t = ``shift`` (default 0), r = ``residual``
    (default 0, added on every channel) and act = ReLU if ``relu``. Channels outside
    out_d are exactly 0 before the residual.

    Args:
        x: (N, C_in, H, W), float32/float16/bfloat16 (float64 for gradcheck),
            contiguous, channels_last or strided.
        weight: (C_out, C_in, kh, kw), x's dtype and device.
        domain: an int for the whole batch, or an int64 tensor of shape (N,).
        in_index, in_offsets, out_index, out_offsets: int64 CSR lists; each
            domain's indices sorted, unique and in range; D = len(in_offsets) - 1.
        scale, shift: optional (D, C_out) per-domain affine (folded BatchNorm).
        residual: optional tensor of the output's shape.
        stride, padding, dilation: int or (h, w) pair.
        backend: None/"auto", "reference", "cpp", "triton" or "cuda" (the CUDA C++ kernel).

    Returns:
        (N, C_out, H_out, W_out) in x's dtype and memory format; every element written.
    """
    stride = _pair(stride, "stride", minimum=1)
    padding = _pair(padding, "padding", minimum=0)
    dilation = _pair(dilation, "dilation", minimum=1)
    backend = _backend_name(backend)
    _check_tensor(x, "x", dims=4, dtypes=_FLOAT_DTYPES)
    _check_tensor(weight, "weight", dims=4, dtype=x.dtype, device=x.device)
    n, c_in = x.shape[:2]
    c_out = weight.shape[0]
    if weight.shape[1] != c_in:
        raise ValueError(f"weight must be (C_out, C_in={c_in}, kh, kw) to match x, "
                         f"got shape {tuple(weight.shape)}")
    ho, wo = _shapes.conv_output_hw(x.shape[2:], weight.shape[2:], stride, padding, dilation)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"x of spatial size {tuple(x.shape[2:])} is too small for a "
                         f"{tuple(weight.shape[2:])} kernel with padding {padding} and dilation "
                         f"{dilation}: the output would be {ho}x{wo}")

    for name, t in (("in_index", in_index), ("in_offsets", in_offsets),
                    ("out_index", out_index), ("out_offsets", out_offsets)):
        _check_tensor(t, name, dims=1, dtype=torch.int64, device=x.device)
    num_domains = in_offsets.numel() - 1
    if num_domains < 1:
        raise ValueError(f"in_offsets must have D + 1 >= 2 entries, got {in_offsets.numel()}")
    if out_offsets.numel() != num_domains + 1:
        raise ValueError(f"out_offsets must have D + 1 = {num_domains + 1} entries like "
                         f"in_offsets, got {out_offsets.numel()}")

    # The values of a domain tensor are checked below, in one transfer with the rest.
    domain = _domain.as_tensor(
        _domain.check_domain(domain, n, num_domains, x.device, read_values=False), n, x.device)

    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None:
            _check_tensor(t, name, dims=2, dtype=x.dtype, device=x.device)
            if tuple(t.shape) != (num_domains, c_out):
                raise ValueError(f"{name} must be (D, C_out) = ({num_domains}, {c_out}), "
                                 f"got {tuple(t.shape)}")
    if residual is not None:
        _check_tensor(residual, "residual", dims=4, dtype=x.dtype, device=x.device)
        if tuple(residual.shape) != (n, c_out, ho, wo):
            raise ValueError(f"residual must have the output's shape {(n, c_out, ho, wo)}, "
                             f"got {tuple(residual.shape)}")
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")

    if _domain.can_read_values():
        _check_values(domain, num_domains, in_index, in_offsets, c_in, out_index, out_offsets,
                      c_out)
    return torch.ops.fastmdl.domain_conv2d(x, weight, domain, in_index, in_offsets, out_index,
                                           out_offsets, scale, shift, residual, relu, stride,
                                           padding, dilation, backend)


def segment_conv2d(
    x: torch.Tensor,
    offsets: torch.Tensor,
    weight: torch.Tensor,
    cin: Sequence[int],
    cout: Sequence[int],
    kernel_size: IntPair,
    *,
    bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    relu: bool = False,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    out_slots: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    r"""The compact layout's convolution: D per-domain convolutions over the row
    segments of one batch, in one call (one kernel launch on a GPU).

    Rows [offsets[d], offsets[d+1]) of ``x`` are domain d's samples, holding its
    ``cin[d]`` channels in their first slots. With W_d domain d's block of the flat
    ``weight`` ((cout[d], kh, kw, cin[d]), the blocks in domain order) and b_d its
    block of ``bias``:

    .. math::
        y_{r,:cout_d} = \mathrm{act}\big(W_d \star x_{r,:cin_d} + b_d + res_{r,:cout_d}\big),
        \qquad y_{r,cout_d:} = 0

    Args:
        x: (N, P_in, H, W) float, P_in >= max(cin).
        offsets: (D + 1,) int64 on x's device, non-decreasing, from 0 to N.
        weight: 1-D, sum over d of cout[d] * kh * kw * cin[d] elements, x's dtype.
        cin, cout: D ints >= 0 each.
        kernel_size: (kh, kw) or an int.
        bias: optional 1-D, sum(cout) elements.
        residual: optional (N, out_slots, H_out, W_out).
        out_slots: the output's channel slots (default max(1, max(cout))); the
            slots of a row past its domain's cout[d] are 0.
        backend: None/"auto" (Triton on CUDA, the reference elsewhere), "reference"
            or "triton".

    Returns:
        (N, out_slots, H_out, W_out), channels_last.
    """
    kernel = _pair(kernel_size, "kernel_size", minimum=1)
    stride = _pair(stride, "stride", minimum=1)
    padding = _pair(padding, "padding", minimum=0)
    dilation = _pair(dilation, "dilation", minimum=1)
    if backend is None:
        backend = "auto"
    if backend not in _segment_ops.BACKENDS:
        raise ValueError(f"backend must be one of {_segment_ops.BACKENDS} or None, got {backend!r}")
    _check_tensor(x, "x", dims=4, dtypes=_FLOAT_DTYPES)
    _check_tensor(offsets, "offsets", dims=1, dtype=torch.int64, device=x.device)
    _check_tensor(weight, "weight", dims=1, dtype=x.dtype, device=x.device)
    for name, widths in (("cin", cin), ("cout", cout)):
        if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in widths):
            raise TypeError(f"{name} must be a list of ints >= 0, one per domain, got {widths!r}")
    cin, cout = list(cin), list(cout)
    if len(cin) != len(cout) or len(cin) != offsets.numel() - 1 or not cin:
        raise ValueError(f"cin and cout must list one width per domain, D = len(offsets) - 1 = "
                         f"{offsets.numel() - 1}, got {len(cin)} and {len(cout)}")
    if max(cin) > x.shape[1]:
        raise ValueError(f"x has {x.shape[1]} channel slots, fewer than max(cin) = {max(cin)}")
    kh, kw = kernel
    need = sum(o * kh * kw * i for i, o in zip(cin, cout))
    if weight.numel() != need:
        raise ValueError(f"weight must hold sum(cout[d] * kh * kw * cin[d]) = {need} elements, "
                         f"got {weight.numel()}")
    ho, wo = _shapes.conv_output_hw(x.shape[2:], kernel, stride, padding, dilation)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"x of spatial size {tuple(x.shape[2:])} is too small for a {kernel} "
                         f"kernel with padding {padding} and dilation {dilation}")
    if bias is not None:
        _check_tensor(bias, "bias", dims=1, dtype=x.dtype, device=x.device)
        if bias.numel() != sum(cout):
            raise ValueError(f"bias must hold sum(cout) = {sum(cout)} elements, "
                             f"got {bias.numel()}")
    if out_slots is None:
        out_slots = _shapes.segment_slots(cout)
    if isinstance(out_slots, bool) or not isinstance(out_slots, int) or \
            out_slots < _shapes.segment_slots(cout):
        raise ValueError(f"out_slots must be an int >= max(1, max(cout)) = "
                         f"{_shapes.segment_slots(cout)}, got {out_slots!r}")
    out_shape = (x.shape[0], out_slots, ho, wo)
    if residual is not None:
        _check_tensor(residual, "residual", dims=4, dtype=x.dtype, device=x.device)
        if tuple(residual.shape) != out_shape:
            raise ValueError(f"residual must have the output's shape {out_shape}, "
                             f"got {tuple(residual.shape)}")
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {type(relu).__name__}")
    if _domain.can_read_values():
        bounds = offsets.tolist()
        if bounds[0] != 0 or bounds[-1] != x.shape[0] or any(
                a > b for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"offsets must rise from 0 to N = {x.shape[0]}, got {bounds}")
    return torch.ops.fastmdl.segment_conv2d(x, offsets, weight, bias, residual, cin, cout,
                                            out_slots, kernel, stride, padding, dilation, relu,
                                            backend)


def index_lists(masks: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """CSR lists (index, offsets) of a (D, C) 0/1 mask: domain d's list is
    ``index[offsets[d]:offsets[d+1]] = {c : masks[d, c] != 0}``, ascending."""
    if not isinstance(masks, torch.Tensor) or masks.dim() != 2:
        raise TypeError("masks must be a 2-D tensor of shape (D, C)")
    keep = masks != 0
    index = keep.nonzero()[:, 1].contiguous()
    offsets = torch.zeros(masks.shape[0] + 1, dtype=torch.int64, device=masks.device)
    offsets[1:] = keep.sum(dim=1).cumsum(0)
    return index, offsets


def _check_values(domain, num_domains, in_index, in_offsets, c_in, out_index, out_offsets, c_out):
    # One transfer to the host for every value checked (one synchronisation on a GPU).
    parts = [in_offsets, out_offsets, in_index, out_index]
    if domain.numel():
        parts.append(torch.stack([domain.min(), domain.max()]))
    host = torch.cat(parts).cpu()
    sizes = [t.numel() for t in parts]
    in_off, out_off, in_idx, out_idx, *dom_range = torch.split(host, sizes)
    if dom_range and (int(dom_range[0][0]) < 0 or int(dom_range[0][1]) >= num_domains):
        bad = dom_range[0][0] if int(dom_range[0][0]) < 0 else dom_range[0][1]
        raise ValueError(f"domain id {int(bad)} is out of range [0, {num_domains})")
    for idx, off, width, iname, oname in ((in_idx, in_off, c_in, "in_index", "in_offsets"),
                                          (out_idx, out_off, c_out, "out_index", "out_offsets")):
        if int(off[0]) != 0 or int(off[-1]) != idx.numel():
            raise ValueError(f"{oname} must start at 0 and end at len({iname}) = {idx.numel()}, "
                             f"got {off[0].item()} and {off[-1].item()}")
        if bool((off[1:] < off[:-1]).any()):
            raise ValueError(f"{oname} must be non-decreasing, got {off.tolist()}")
        if idx.numel() == 0:
            continue
        if int(idx.min()) < 0 or int(idx.max()) >= width:
            raise ValueError(f"{iname} entries must lie in [0, {width}), got values in "
                             f"[{idx.min().item()}, {idx.max().item()}]")
        segment_start = torch.zeros(idx.numel(), dtype=torch.bool)
        segment_start[off[:-1][off[:-1] < idx.numel()]] = True
        if not bool(((idx[1:] > idx[:-1]) | segment_start[1:]).all()):
            raise ValueError(f"{iname} must be sorted and unique within each domain")


def _check_tensor(t, name, *, dims, dtype=None, dtypes=None, device=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name} must have one of dtypes {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} must be on x's device {device}, got {t.device}")


def _pair(v, name, *, minimum) -> list:
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        v = (v, v)
    if (not isinstance(v, (tuple, list)) or len(v) != 2
            or not all(isinstance(e, int) and not isinstance(e, bool) for e in v)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    if min(v) < minimum:
        raise ValueError(f"{name} entries must be >= {minimum}, got {tuple(v)}")
    return list(v)


def _backend_name(backend) -> str:
    if backend is None:
        return "auto"
    if not isinstance(backend, str):
        raise TypeError(f"backend must be None or a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in backends.NAMES:
        raise ValueError(f"backend must be one of {backends.NAMES} or None, got {backend!r}")
    return backend
