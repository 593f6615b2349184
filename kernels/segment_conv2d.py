"""Triton kernel for ``fastmdl::segment_conv2d``: the compact layout's convolution,
one launch over every domain's segment of the batch (a grouped implicit GEMM).

Layout. ``x`` is channels_last (N, H, W, P_in) with its rows sorted by domain;
domain d's rows hold their cin[d] channels in slots [0, cin[d]). Domain d's
weights are one contiguous block (cout[d], kh, kw, cin[d]) of a flat buffer.
For segment d the GEMM is

    rows  m : pixels of d's rows            (M_d = n_d * H_out * W_out)
    cols  j : d's own filters               (cout[d], then zero slots up to P_out)
    K       : (tap, channel)                (cin[d] * kh * kw, channels contiguous)

so both operands are read along contiguous channels: with ``K_ALIGN`` = 16
(every cin[d] and P_in multiples of 16, as the compact plan packs them) the
compiler knows each K block is 16-aligned and emits vector loads and
asynchronous copies into shared memory, which the pipelined K loop overlaps
with the tensor-core products. There is no gather: it happened once, when the
weights were packed.

Tiles. A program owns a BLOCK_M x BLOCK_N tile of ONE segment (a tile never
straddles two domains, as in a grouped GEMM). The grid is an upper bound from
N and D alone, (cdiv(N H_out W_out, BLOCK_M) + D) x cdiv(P_out, BLOCK_N), so
the launch needs no host synchronisation and a CUDA graph replays it for any
domain mix; each program finds its segment from the D + 1 offsets (D is small)
and programs past the last tile do nothing. A tile whose columns are all past
cout[d] skips the K loop and writes its zeros.

Epilogue: bias, residual, ReLU, in fp32, one store. Every element of y is
written exactly once.
"""

from __future__ import annotations

import inspect
from typing import Dict, List, Sequence

import torch
import triton
import triton.language as tl

from .._shapes import conv_output_hw
from .._tf32 import matmul_tf32


@triton.jit(do_not_specialize=["M_EST", "N_EST", "K_EST"])
def segment_conv2d_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr, offsets_ptr, table_ptr,
    D, H, W, P_in, H_out, W_out, P_out,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    M_EST, N_EST, K_EST,
    KH: tl.constexpr, KW: tl.constexpr, D_PAD: tl.constexpr, K_ALIGN: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # M_EST, N_EST, K_EST are not read: they are the autotuner's key.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    hw_out = H_out * W_out

    # This row tile's segment: those whose tiles all end at or before pid_m.
    dl = tl.arange(0, D_PAD)
    d_ok = dl < D
    lo = tl.load(offsets_ptr + dl, mask=d_ok, other=0)
    hi = tl.load(offsets_ptr + dl + 1, mask=d_ok, other=0)
    tiles = ((hi - lo) * hw_out + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    d = tl.minimum(tl.sum((tile_end <= pid_m).to(tl.int32), 0), D - 1)
    tile_start = tl.sum(tl.where(dl == d, tile_end - tiles, 0), 0)
    m0 = (pid_m - tile_start) * BLOCK_M
    s0 = tl.load(offsets_ptr + d)
    m_d = (tl.load(offsets_ptr + d + 1) - s0) * hw_out

    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < m_d
    r = (s0 + rows // hw_out).to(tl.int64)
    pix = rows % hw_out
    oh = pix // W_out
    ow = pix % W_out

    # table[d] = (first weight element, cin, cout, first bias element)
    w_start = tl.load(table_ptr + d * 4)
    cin = tl.multiple_of(tl.load(table_ptr + d * 4 + 1).to(tl.int32), K_ALIGN)
    cout = tl.load(table_ptr + d * 4 + 2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < P_out
    used = cols < cout

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if (m0 < m_d) & (pid_n * BLOCK_N < cout):
        # One loop over (tap, channel block), so that one software pipeline runs
        # across the taps (an unrolled loop per tap costs a pipeline's registers each).
        n_kb = tl.cdiv(cin, BLOCK_K)
        img = r * H  # int64: the row's first image line
        w_col = w_ptr + w_start + cols.to(tl.int64) * (KH * KW * cin)
        for step in range(0, KH * KW * n_kb):
            tap = step // n_kb
            ks = (step - tap * n_kb) * BLOCK_K + tl.arange(0, BLOCK_K)
            kh = tap // KW
            kw = tap - kh * KW
            ih = oh * stride_h - pad_h + kh * dil_h
            iw = ow * stride_w - pad_w + kw * dil_w
            pix_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            k_ok = ks < cin
            a = tl.load(x_ptr + ((img + ih) * W + iw)[:, None] * P_in + ks[None, :],
                        mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_col[None, :] + (tap * cin + ks)[:, None],
                        mask=k_ok[:, None] & used[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if HAS_BIAS:
        b_start = tl.load(table_ptr + d * 4 + 3)
        acc += tl.load(b_ptr + b_start + cols, mask=used, other=0.0).to(tl.float32)[None, :]
    out = ((r * H_out + oh) * W_out + ow) * P_out
    if HAS_RES:
        acc += tl.load(r_ptr + out[:, None] + cols[None, :],
                       mask=row_ok[:, None] & used[None, :], other=0.0).to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    acc = tl.where(used[None, :], acc, 0.0)
    tl.store(y_ptr + out[:, None] + cols[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------
# Configurations (pure Python) and the launch wrapper.

#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) the autotuner may try on CUDA
#: for 16-bit operands: tensor-core tiles for sm_80/sm_90, large ones for big
#: segments, 32-wide ones for narrow domains, BLOCK_K 64 for long reductions.
#: Every one compiles without a register spill on sm_80 and sm_90
#: (``benchmarks/triton_aot.py``; 4-warp 64-deep tiles and 128x128x64 spilled).
TUNING_SPACE = (
    (128, 128, 32, 8, 3),
    (128, 64, 32, 4, 4),
    (128, 64, 64, 8, 3),
    (64, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (64, 64, 64, 8, 3),
    (128, 32, 32, 4, 4),
    (64, 32, 32, 4, 4),
    (32, 64, 32, 4, 4),
    (32, 32, 32, 2, 4),
)
#: The same for float32 operands (TF32 tensor cores): twice the registers per
#: operand tile, so fewer shapes compile without spills.
TUNING_SPACE_FP32 = (
    (128, 128, 32, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (64, 32, 32, 4, 4),
    (32, 64, 32, 4, 4),
    (32, 32, 32, 2, 4),
)

#: The one configuration under the interpreter (tests): small tiles keep it quick.
INTERPRETER_BLOCKS = (16, 16, 16, 1, 1)

#: Bytes of shared memory the pipelined operand tiles may take (sm_80: 163 KiB).
SHARED_MEMORY_BYTES = 160 * 1024


def _bucket(v: float) -> int:
    b = 1
    while b < v:
        b *= 2
    return b


def estimate(n: int, hw_out: int, cin: Sequence[int], cout: Sequence[int], kh: int,
             kw: int) -> Dict[str, int]:
    """The autotuner's key, from host values only: the mean segment's GEMM
    (M over the domains that can be present, mean filters and reduction),
    each rounded up to a power of two."""
    num_domains = len(cin)
    present = max(1, min(n, num_domains))
    return {"M_EST": _bucket(n * hw_out / present),
            "N_EST": _bucket(sum(cout) / num_domains),
            "K_EST": _bucket(sum(cin) / num_domains * kh * kw)}


def select_configs(configs: Sequence, m_est: int, n_est: int, k_est: int, kh: int, kw: int,
                   elem_bytes: int) -> List:
    """The configurations worth timing for one key; never empty. Keeps the space of
    the operands' element size, then drops tiles taller than the segment's M or
    wider than its filters (at least 32), BLOCK_K past the per-tap channels, and
    pipelines over the shared-memory budget."""
    max_m, max_n = max(32, m_est), max(32, n_est)
    max_k = max(32, _bucket(k_est / (kh * kw)))

    space = set(TUNING_SPACE_FP32 if elem_bytes >= 4 else TUNING_SPACE)

    def key(c):
        k = c.kwargs
        return (k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], c.num_warps, c.num_stages)

    def smem(c):
        k = c.kwargs
        return (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * elem_bytes * c.num_stages

    ours = [c for c in configs if key(c) in space] or list(configs)
    keep = [c for c in ours if c.kwargs["BLOCK_M"] <= max_m and c.kwargs["BLOCK_N"] <= max_n
            and c.kwargs["BLOCK_K"] <= max_k and smem(c) <= SHARED_MEMORY_BYTES]
    return keep or [min(ours, key=smem)]


def tuning_configs() -> List[triton.Config]:
    """TUNING_SPACE and TUNING_SPACE_FP32 as ``triton.Config``s (``select_configs``
    keeps the ones of the operands' dtype)."""
    space = list(TUNING_SPACE) + [c for c in TUNING_SPACE_FP32 if c not in TUNING_SPACE]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                          num_warps=w, num_stages=s) for bm, bn, bk, w, s in space]


def _early_prune(configs, named_args, **kwargs):
    a = {**named_args, **kwargs}
    return select_configs(configs, a["M_EST"], a["N_EST"], a["K_EST"], a["KH"], a["KW"],
                          a["x_ptr"].element_size())


_autotune_options = dict(configs=tuning_configs(), key=["M_EST", "N_EST", "K_EST", "KH", "KW"],
                         prune_configs_by={"early_config_prune": _early_prune})
if "cache_results" in inspect.signature(triton.autotune).parameters:
    _autotune_options["cache_results"] = True
#: The autotuned kernel (CUDA); the plain kernel runs under the interpreter.
segment_conv2d_tuned = triton.autotune(**_autotune_options)(segment_conv2d_kernel)


def domain_table(cin: Sequence[int], cout: Sequence[int], kh: int, kw: int,
                 device: torch.device) -> torch.Tensor:
    """(D, 4) int64: each domain's first weight element, cin, cout, first bias element."""
    rows, w, b = [], 0, 0
    for ci, co in zip(cin, cout):
        rows.append((w, ci, co, b))
        w += co * kh * kw * ci
        b += co
    return torch.tensor(rows, dtype=torch.int64).to(device)


def segment_conv2d(x, offsets, weight, bias, residual, cin, cout, out_slots, kernel, stride,
                   padding, dilation, relu, *, table=None):
    """Launch ``segment_conv2d_kernel`` over every segment; returns y (channels_last).
    ``table`` (from :func:`domain_table`) may be passed in when cached per layer."""
    n, p_in, h, w = x.shape
    kh, kw = kernel
    h_out, w_out = conv_output_hw((h, w), (kh, kw), stride, padding, dilation)
    y = torch.empty((n, out_slots, h_out, w_out), dtype=x.dtype, device=x.device,
                    memory_format=torch.channels_last)
    if n == 0:
        return y
    x = x.contiguous(memory_format=torch.channels_last)
    res = residual.contiguous(memory_format=torch.channels_last) if residual is not None else y
    if table is None:
        table = domain_table(cin, cout, kh, kw, x.device)
    num_domains = len(cin)
    on_gpu = x.device.type == "cuda"
    aligned = p_in % 16 == 0 and all(c % 16 == 0 for c in cin)
    precision = "ieee"
    if x.dtype == torch.float32 and on_gpu and matmul_tf32():
        precision = "tf32"

    def grid(meta):
        return (triton.cdiv(n * h_out * w_out, meta["BLOCK_M"]) + num_domains,
                triton.cdiv(out_slots, meta["BLOCK_N"]))

    est = estimate(n, h_out * w_out, cin, cout, kh, kw)
    args = (x, weight, bias if bias is not None else y, res, y, offsets.contiguous(), table,
            num_domains, h, w, p_in, h_out, w_out, out_slots,
            stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
            est["M_EST"], est["N_EST"], est["K_EST"])
    meta = dict(KH=kh, KW=kw, D_PAD=max(16, triton.next_power_of_2(num_domains)),
                K_ALIGN=16 if aligned else 1, HAS_BIAS=bias is not None,
                HAS_RES=residual is not None, RELU=bool(relu), INPUT_PRECISION=precision)
    if on_gpu:
        segment_conv2d_tuned[grid](*args, **meta)
    else:
        bm, bn, bk, warps, stages = INTERPRETER_BLOCKS
        segment_conv2d_kernel[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                    num_warps=warps, num_stages=stages)
    return y
