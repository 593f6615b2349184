"""Triton kernel for ``fastmdl::domain_conv2d``: mixed-domain implicit-GEMM convolution.

One launch computes the whole mixed batch. Samples are grouped by domain (a stable
sort on the device), and the M dimension of the implicit GEMM (output pixels) is
cut into tiles that each belong to ONE domain d:

    rows  m : pixels of d's samples               (M_d = n_d * H_out * W_out)
    cols  j : d's column order, its filters first, then the channels it does not use
    K       : (tap r, s) x d's input channels      (K_d = |in_d| * kh * kw)

Each program loads its rows' input patches with the domain's channel gather done
inside the load (``x[n, in_idx[k], ih, iw]``), multiplies with the matching
weights, and writes a BLOCK_M x BLOCK_N block of the output through the epilogue:
scale, shift, zero for columns past |out_d|, residual, ReLU. Column blocks that
hold only unused channels skip the K loop, so every output element is written
exactly once. The grid is an upper bound computed from N and D alone, so the
launch needs no host synchronisation; programs past the last tile do nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._shapes import conv_output_hw, domain_masks, output_memory_format


@triton.jit
def domain_conv2d_kernel(
    x_ptr, w_ptr, y_ptr, scale_ptr, shift_ptr, res_ptr,
    in_idx_ptr, in_off_ptr, out_off_ptr, col_order_ptr,
    order_ptr, sample_start_ptr, tile_start_ptr, tile_domain_ptr,
    D, C_in, H, W, C_out, H_out, W_out,
    sxn, sxc, sxh, sxw,
    swo, swi, swh, sww,
    syn, syc, syh, syw,
    srn, src, srh, srw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,
    RELU: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)

    # Which domain this row tile belongs to; padding programs (d == D) map onto the
    # last domain with rows past its end, so every mask below comes out false.
    d = tl.minimum(tl.load(tile_domain_ptr + pid_m), D - 1)
    m0 = (pid_m - tl.load(tile_start_ptr + d)) * BLOCK_M
    s0 = tl.load(sample_start_ptr + d)
    hw_out = H_out * W_out
    m_d = (tl.load(sample_start_ptr + d + 1) - s0) * hw_out

    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < m_d
    sample = tl.load(order_ptr + s0 + rows // hw_out, mask=row_ok, other=0).to(tl.int64)
    pix = rows % hw_out
    oh = pix // W_out
    ow = pix % W_out

    out_begin = tl.load(out_off_ptr + d)
    n_out = tl.load(out_off_ptr + d + 1) - out_begin
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < C_out
    used = cols < n_out
    co = tl.load(col_order_ptr + d * C_out + cols, mask=col_ok, other=0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if (m0 < m_d) & (pid_n * BLOCK_N < n_out):
        in_begin = tl.load(in_off_ptr + d)
        n_in = tl.load(in_off_ptr + d + 1) - in_begin
        for r in tl.static_range(KH):
            ih = oh * stride_h - pad_h + r * dil_h
            for s in tl.static_range(KW):
                iw = ow * stride_w - pad_w + s * dil_w
                pix_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                x_row = x_ptr + sample * sxn + ih * sxh + iw * sxw
                w_col = w_ptr + co * swo + r * swh + s * sww
                for k0 in range(0, n_in, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_ok = ks < n_in
                    ci = tl.load(in_idx_ptr + in_begin + ks, mask=k_ok, other=0)
                    a = tl.load(x_row[:, None] + ci[None, :] * sxc,
                                mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
                    b = tl.load(w_col[None, :] + ci[:, None] * swi,
                                mask=k_ok[:, None] & used[None, :], other=0.0)
                    acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    val = acc
    if HAS_SCALE:
        val = val * tl.load(scale_ptr + d * C_out + co, mask=used, other=0.0).to(tl.float32)[None, :]
    if HAS_SHIFT:
        val = val + tl.load(shift_ptr + d * C_out + co, mask=used, other=0.0).to(tl.float32)[None, :]
    val = tl.where(used[None, :], val, 0.0)
    out_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_RES:
        res = tl.load(res_ptr + sample[:, None] * srn + co[None, :] * src
                      + (oh * srh + ow * srw)[:, None], mask=out_ok, other=0.0)
        val = val + res.to(tl.float32)
    if RELU:
        val = tl.where(val > 0, val, tl.where(val != val, val, 0.0))
    tl.store(y_ptr + sample[:, None] * syn + co[None, :] * syc + (oh * syh + ow * syw)[:, None],
             val.to(y_ptr.dtype.element_ty), mask=out_ok)


def _blocks(device_type: str):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for the device.

    The CPU interpreter is only for tests: small tiles keep it quick."""
    if device_type == "cuda":
        return 64, 64, 32, 4, 3
    return 16, 16, 16, 1, 1


def domain_conv2d(x, weight, domain, in_index, in_offsets, out_index, out_offsets,
                  scale, shift, residual, relu, stride, padding, dilation):
    """Launch ``domain_conv2d_kernel`` once for the whole batch; returns y.

    The grouping metadata (sample order, per-domain tile starts, each program's
    domain, each domain's column order) is built with device ops only."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    num_domains = in_offsets.numel() - 1
    h_out, w_out = conv_output_hw((h, w), (kh, kw), stride, padding, dilation)
    y = torch.empty((n, c_out, h_out, w_out), dtype=x.dtype, device=x.device,
                    memory_format=output_memory_format(x))
    if n == 0:
        return y
    block_m, block_n, block_k, num_warps, num_stages = _blocks(x.device.type)
    dev = x.device

    counts = torch.zeros(num_domains, dtype=torch.int64, device=dev)
    counts.index_add_(0, domain, torch.ones_like(domain))
    order = torch.argsort(domain, stable=True)
    sample_start = torch.zeros(num_domains + 1, dtype=torch.int64, device=dev)
    sample_start[1:] = counts.cumsum(0)
    tiles = (counts * (h_out * w_out) + block_m - 1) // block_m
    tile_start = torch.zeros(num_domains + 1, dtype=torch.int64, device=dev)
    tile_start[1:] = tiles.cumsum(0)
    grid_m = triton.cdiv(n * h_out * w_out, block_m) + num_domains
    tile_domain = torch.searchsorted(tile_start[1:].contiguous(),
                                     torch.arange(grid_m, device=dev), right=True)

    # Each domain's columns: its filters in ascending order, then the rest.
    used = domain_masks(out_index, out_offsets, c_out, torch.int8)
    col_order = torch.argsort(1 - used, dim=1, stable=True).contiguous()

    if x.dtype == torch.float32:
        precision = "tf32" if torch.backends.cudnn.allow_tf32 and dev.type == "cuda" else "ieee"
    else:
        precision = "ieee"
    res = residual if residual is not None else y
    grid = (grid_m, triton.cdiv(c_out, block_n))
    domain_conv2d_kernel[grid](
        x, weight, y,
        scale.contiguous() if scale is not None else y,
        shift.contiguous() if shift is not None else y,
        res,
        in_index.contiguous(), in_offsets.contiguous(), out_offsets.contiguous(), col_order,
        order, sample_start, tile_start, tile_domain,
        num_domains, c_in, h, w, c_out, h_out, w_out,
        *x.stride(), *weight.stride(), *y.stride(), *res.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kh, KW=kw,
        HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
        HAS_RES=residual is not None, RELU=bool(relu), INPUT_PRECISION=precision,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return y
