"""Epilogue of ``fastmdl::domain_conv2d``, shared by its two paths.

``write_output`` is the epilogue itself (scale, shift, exact zero for the
channels the sample's domain does not use, residual, ReLU, cast, store). The
direct path calls it from the convolution kernel on its accumulator. The
split-K path cannot: each of its programs holds only part of a sum, so the
convolution kernel writes fp32 partial sums to a workspace and
``domain_conv2d_epilogue_kernel`` adds them up and calls ``write_output`` once
per output element. Keeping one epilogue for both paths is what keeps them
bit-for-bit the same function of the accumulated sum.

The workspace is laid out as ``[SPLIT_K, N * H_out * W_out, C_out]`` in the
batch's grouped order (rows: samples sorted by domain, then pixels; columns:
position in the domain's column order), so a split writes its partial with the
same indices the convolution tile already has, and every slice is fully
overwritten on every launch (the autotuner may launch several times).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def write_output(val, d, co, used, row_ok, col_ok, sample, oh, ow,
                 y_ptr, scale_ptr, shift_ptr, res_ptr, C_out,
                 syn, syc, syh, syw, srn, src, srh, srw,
                 HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,
                 RELU: tl.constexpr):
    """Apply the epilogue to the fp32 block ``val`` (BLOCK_M, BLOCK_N) and store it.

    ``d`` (the domain: a scalar, or a (BLOCK_M, 1) column when rows may belong to
    different domains), ``co`` (output channel), ``used`` (column is one of the
    domain's filters) and ``col_ok`` broadcast against the block; ``row_ok``,
    ``sample``, ``oh`` and ``ow`` are per row."""
    if HAS_SCALE:
        val = val * tl.load(scale_ptr + d * C_out + co, mask=used, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        val = val + tl.load(shift_ptr + d * C_out + co, mask=used, other=0.0).to(tl.float32)
    val = tl.where(used, val, 0.0)
    out_ok = row_ok[:, None] & col_ok
    if HAS_RES:
        res = tl.load(res_ptr + sample[:, None] * srn + co * src + (oh * srh + ow * srw)[:, None],
                      mask=out_ok, other=0.0)
        val = val + res.to(tl.float32)
    if RELU:
        val = tl.where(val > 0, val, tl.where(val != val, val, 0.0))
    tl.store(y_ptr + sample[:, None] * syn + co * syc + (oh * syh + ow * syw)[:, None],
             val.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def domain_conv2d_epilogue_kernel(
    ws_ptr, y_ptr, scale_ptr, shift_ptr, res_ptr,
    domain_ptr, order_ptr, out_off_ptr, col_order_ptr,
    M, C_out, H_out, W_out, ws_split_stride,
    syn, syc, syh, syw,
    srn, src, srh, srw,
    SPLIT_K: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Sum the SPLIT_K partials of a (BLOCK_M grouped rows, BLOCK_N column positions)
    block and write it through the epilogue. A block may straddle two domains, so
    the domain, its column order and its filter count are looked up per row."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    hw_out = H_out * W_out

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    sample = tl.load(order_ptr + rows // hw_out, mask=row_ok, other=0).to(tl.int64)
    pix = rows % hw_out
    oh = pix // W_out
    ow = pix % W_out
    d = tl.load(domain_ptr + sample, mask=row_ok, other=0)[:, None]
    n_out = tl.load(out_off_ptr + d + 1) - tl.load(out_off_ptr + d)

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols[None, :] < C_out
    used = (cols[None, :] < n_out) & row_ok[:, None]
    co = tl.load(col_order_ptr + d * C_out + cols[None, :], mask=row_ok[:, None] & col_ok, other=0)

    part = ws_ptr + rows.to(tl.int64)[:, None] * C_out + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part + s * ws_split_stride, mask=used, other=0.0)

    write_output(acc, d, co, used, row_ok, col_ok, sample, oh, ow,
                 y_ptr, scale_ptr, shift_ptr, res_ptr, C_out,
                 syn, syc, syh, syw, srn, src, srh, srw,
                 HAS_SCALE, HAS_SHIFT, HAS_RES, RELU)


def launch_epilogue(ws, y, scale, shift, residual, relu, domain, order, out_offsets, col_order,
                    *, block_m: int, block_n: int, num_warps: int):
    """Reduce the workspace ``ws`` ([SPLIT_K, N*H_out*W_out, C_out] fp32) into ``y``."""
    split_k, m, c_out = ws.shape
    _, _, h_out, w_out = y.shape
    res = residual if residual is not None else y
    grid = (triton.cdiv(m, block_m), triton.cdiv(c_out, block_n))
    domain_conv2d_epilogue_kernel[grid](
        ws, y,
        scale if scale is not None else y,
        shift if shift is not None else y,
        res,
        domain, order, out_offsets, col_order,
        m, c_out, h_out, w_out, ws.stride(0),
        *y.stride(), *res.stride(),
        SPLIT_K=split_k,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        HAS_RES=residual is not None, RELU=bool(relu),
        BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y
