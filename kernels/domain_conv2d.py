"""Triton kernel for ``fastmdl::domain_conv2d``: mixed-domain implicit-GEMM convolution.

One launch computes the whole mixed batch. Samples are grouped by domain (a stable
sort on the device), and the M dimension of the implicit GEMM (output pixels) is
cut into tiles that each belong to ONE domain d:

    rows  m : pixels of d's samples               (M_d = n_d * H_out * W_out)
    cols  j : d's column order, its filters first, then the channels it does not use
    K       : (tap r, s) x d's input channels      (K_d = |in_d| * kh * kw)

Each program loads its rows' input patches with the domain's channel gather done
inside the load (``x[n, in_idx[k], ih, iw]``), multiplies with the matching
weights, and writes a BLOCK_M x BLOCK_N block of the output through the epilogue
(``domain_conv2d_epilogue.write_output``): scale, shift, zero for columns past
|out_d|, residual, ReLU. Column blocks that hold only unused channels skip the K
loop, so every output element is written exactly once. The grid is an upper
bound computed from N and D alone, so the launch needs no host synchronisation;
programs past the last tile do nothing.

Why each program finds its own domain. The row tiling depends on BLOCK_M, which
the autotuner picks only after the host has queued its metadata ops, so no
tile -> domain table can be prepared for it. Each program instead rebuilds the
per-domain tile counts from the per-domain sample starts (D values, D is small)
and counts the domains that end before its tile. The only metadata is then a
property of the batch (sample order and starts) or of the layer (column order),
never of the configuration.

Why autotune, and on what. The best tile depends on the per-domain GEMM, not on
the batch's: a batch of 64 spread over 8 domains is 8 GEMMs of M_d = 8 H_out
W_out rows with only the domains' own filters and channels. Those sizes are
estimated from host metadata alone (N, H_out W_out, D and the lengths of the
index lists: ``out_index.numel() / D`` filters and ``in_index.numel() / D``
channels per domain), never from the device's values, so choosing a
configuration costs no synchronisation and a CUDA graph can replay the choice.
The autotuner's key is the power-of-two bucket of each estimate, with KH, KW,
SPLIT_K and (added by Triton for every tensor argument) the dtypes: one tuning
per bucket, not per batch size. ``select_configs`` prunes the list from the key
alone: no tile taller than the per-domain M or wider than the per-domain filter
count (rounded up to a power of two; the rest would be masked work), no BLOCK_K
past the per-tap channels, and nothing whose pipelined operand tiles would not
fit in shared memory on sm_80. Under ``TRITON_INTERPRET=1`` one small fixed
configuration runs instead: the interpreter is for correctness, and timing it
says nothing about a GPU.

Why split-K. Late layers of a small or many-domain batch have few output tiles
(M_d and C_out small) but long reductions (K_d = channels x 9): a grid of 40
programs leaves most of an H100's 132 SMs idle however well each one runs.
When the estimated tile count (with the 64 x 64 reference tile) is below the
SM count, ``choose_split_k`` cuts each tile's K loop (taps x channel blocks,
flattened) into SPLIT_K contiguous ranges run by separate programs (the grid's
third axis). Each writes its fp32 partial sum to its own slice of a workspace,
and a second small kernel adds the slices in a fixed order and applies the
epilogue, so the result is deterministic and every launch overwrites the whole
workspace (the autotuner's trial launches need no reset). SPLIT_K can be forced
(``split_k=`` or ``FASTMDL_TRITON_SPLIT_K``) so the path is tested on the CPU.

Why a shared plan. The grouping (per-domain counts, stable order, sample
starts) depends only on the batch's ``domain`` tensor, which every layer of a
pruned network receives unchanged. Given a ``plan`` (see
``fastmdl.backends.triton.shared_batch_plan``), the wrapper builds it once per
forward pass instead of once per layer, and likewise each layer's column order;
the builds use device ops only, so the whole network can still be captured in a
CUDA graph (after a first, tuning, call outside the capture).
"""

from __future__ import annotations

import inspect
import math
import os
from typing import Dict, List, Optional, Sequence

import torch
import triton
import triton.language as tl

from .._shapes import conv_output_hw, domain_masks, output_memory_format
from .._tf32 import conv_tf32
from .domain_conv2d_epilogue import launch_epilogue, write_output


@triton.jit(do_not_specialize=["M_EST", "N_EST", "K_EST"])
def domain_conv2d_kernel(
    x_ptr, w_ptr, y_ptr, ws_ptr, scale_ptr, shift_ptr, res_ptr,
    in_idx_ptr, in_off_ptr, out_off_ptr, col_order_ptr,
    order_ptr, sample_start_ptr,
    D, C_in, H, W, C_out, H_out, W_out,
    sxn, sxc, sxh, sxw,
    swo, swi, swh, sww,
    syn, syc, syh, syw,
    srn, src, srh, srw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    ws_split_stride,
    M_EST, N_EST, K_EST,
    KH: tl.constexpr, KW: tl.constexpr, D_PAD: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_RES: tl.constexpr,
    RELU: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # M_EST, N_EST, K_EST are not read: they are the autotuner's key.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    hw_out = H_out * W_out

    # This row tile's domain: domains whose tiles all end at or before pid_m.
    # Padding programs (past the last tile) map onto the last domain with rows
    # past its end, so every mask below comes out false.
    dl = tl.arange(0, D_PAD)
    d_ok = dl < D
    ss_lo = tl.load(sample_start_ptr + dl, mask=d_ok, other=0)
    ss_hi = tl.load(sample_start_ptr + dl + 1, mask=d_ok, other=0)
    tiles = ((ss_hi - ss_lo) * hw_out + BLOCK_M - 1) // BLOCK_M
    tile_end = tl.cumsum(tiles, 0)
    d = tl.minimum(tl.sum((tile_end <= pid_m).to(tl.int32), 0), D - 1)
    tile_start = tl.sum(tl.where(dl == d, tile_end - tiles, 0), 0)
    m0 = (pid_m - tile_start) * BLOCK_M
    s0 = tl.load(sample_start_ptr + d)
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
        if SPLIT_K > 1:
            # The K loop flattened as (tap, channel block) steps; this program
            # runs steps [step_lo, step_hi).
            n_kb = tl.cdiv(n_in, BLOCK_K)
            n_steps = KH * KW * n_kb
            per_split = tl.cdiv(n_steps, SPLIT_K)
            step_lo = tl.program_id(2) * per_split
            step_hi = tl.minimum(step_lo + per_split, n_steps)
        for r in tl.static_range(KH):
            ih = oh * stride_h - pad_h + r * dil_h
            for s in tl.static_range(KW):
                iw = ow * stride_w - pad_w + s * dil_w
                pix_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                x_row = x_ptr + sample * sxn + ih * sxh + iw * sxw
                w_col = w_ptr + co * swo + r * swh + s * sww
                if SPLIT_K > 1:
                    tap_step = (r * KW + s) * n_kb
                    k_lo = tl.maximum(step_lo - tap_step, 0) * BLOCK_K
                    k_hi = tl.minimum(step_hi - tap_step, n_kb) * BLOCK_K
                else:
                    k_lo = 0
                    k_hi = n_in
                for k0 in range(k_lo, k_hi, BLOCK_K):
                    ks = k0 + tl.arange(0, BLOCK_K)
                    k_ok = ks < n_in
                    ci = tl.load(in_idx_ptr + in_begin + ks, mask=k_ok, other=0)
                    a = tl.load(x_row[:, None] + ci[None, :] * sxc,
                                mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
                    b = tl.load(w_col[None, :] + ci[:, None] * swi,
                                mask=k_ok[:, None] & used[None, :], other=0.0)
                    acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

    if SPLIT_K > 1:
        # Partial sums, in grouped order; the epilogue kernel reads only the
        # domain's own columns, the ones stored here.
        part = (ws_ptr + tl.program_id(2) * ws_split_stride
                + (s0 * hw_out + rows).to(tl.int64)[:, None] * C_out + cols[None, :])
        tl.store(part, acc, mask=row_ok[:, None] & used[None, :])
    else:
        write_output(acc, d, co[None, :], used[None, :], row_ok, col_ok[None, :],
                     sample, oh, ow, y_ptr, scale_ptr, shift_ptr, res_ptr, C_out,
                     syn, syc, syh, syw, srn, src, srh, srw,
                     HAS_SCALE, HAS_SHIFT, HAS_RES, RELU)


# ---------------------------------------------------------------------------
# Configurations and the heuristics that choose among them (pure Python).

#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) the autotuner may try on CUDA.
#: Tensor-core tiles for sm_80/sm_90 in float16/bfloat16 and tf32: large tiles
#: with 8 warps for big per-domain GEMMs, 64-wide tiles with 4 warps and deeper
#: pipelines for the common case, 32-wide ones for small domains, BLOCK_K 64/128
#: for long reductions over few output tiles (1x1 layers with many channels).
TUNING_SPACE = (
    (128, 128, 32, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (128, 64, 64, 8, 3),
    (64, 128, 64, 8, 3),
    (128, 32, 32, 4, 4),
    (32, 128, 32, 4, 4),
    (64, 64, 32, 4, 4),
    (64, 64, 64, 4, 3),
    (64, 64, 128, 4, 2),
    (64, 32, 32, 4, 4),
    (32, 64, 32, 4, 4),
    (32, 32, 32, 2, 4),
    (32, 32, 64, 2, 3),
)

#: The one configuration under the interpreter (tests): small tiles keep it quick.
INTERPRETER_BLOCKS = (16, 16, 16, 1, 1)

#: Bytes of shared memory the pipelined operand tiles may take (sm_80 allows
#: 163 KiB per block, sm_90 227 KiB; Triton needs a little for itself).
SHARED_MEMORY_BYTES = 160 * 1024

#: Split-K limits: at most this many splits, each with at least this many
#: (tap, 32-channel block) steps of the K loop, and a workspace below this size.
MAX_SPLIT_K = 16
MIN_STEPS_PER_SPLIT = 4
WORKSPACE_BYTES = 256 << 20

#: The SM count assumed where no CUDA device can be asked (H100 SXM).
DEFAULT_NUM_SMS = 132

#: Tile used to estimate the grid when deciding on split-K (the untuned default).
REFERENCE_TILE = 64

_SPLIT_K_ENV = "FASTMDL_TRITON_SPLIT_K"
_EPILOGUE_BLOCKS = {"cuda": (64, 64, 4), "cpu": (16, 16, 1)}


def bucket(v: float) -> int:
    """The smallest power of two >= v (1 for v <= 1)."""
    return 1 << max(0, math.ceil(math.log2(v))) if v > 1 else 1


def estimate(n: int, hw_out: int, num_domains: int, in_numel: int, out_numel: int,
             kh: int, kw: int) -> Dict[str, int]:
    """Bucketed per-domain GEMM sizes from host metadata only (the autotuner's key).

    M_d = N H_out W_out / (domains present, at most min(N, D)), N_d = filters per
    domain, K_d = channels per domain x taps; each rounded up to a power of two."""
    present = max(1, min(n, num_domains))
    return {"M_EST": bucket(n * hw_out / present),
            "N_EST": bucket(out_numel / num_domains),
            "K_EST": bucket(in_numel / num_domains * kh * kw)}


def select_configs(configs: Sequence, m_est: int, n_est: int, k_est: int, kh: int, kw: int,
                   split_k: int, elem_bytes: int) -> List:
    """The configurations worth timing for one autotuning key (``triton.Config``s
    with BLOCK_M/BLOCK_N/BLOCK_K in ``kwargs``); never empty.

    Drops tiles taller than the per-domain M or wider than the per-domain filter
    count (as bucketed, at least 32), BLOCK_K past the per-tap channels, operand
    tiles over the shared-memory budget, and, for split-K (a grid already too small
    to fill the GPU), tiles past the 64 x 64 reference the split was sized for."""
    channels = bucket(k_est / (kh * kw))
    max_m, max_n, max_k = max(32, m_est), max(32, n_est), max(32, channels)
    if split_k > 1:
        max_m, max_n = min(max_m, REFERENCE_TILE), min(max_n, REFERENCE_TILE)

    def smem(c):
        kw_ = c.kwargs
        return (kw_["BLOCK_M"] + kw_["BLOCK_N"]) * kw_["BLOCK_K"] * elem_bytes * c.num_stages

    keep = [c for c in configs
            if c.kwargs["BLOCK_M"] <= max_m and c.kwargs["BLOCK_N"] <= max_n
            and c.kwargs["BLOCK_K"] <= max_k and smem(c) <= SHARED_MEMORY_BYTES]
    return keep or [min(configs, key=smem)]


def choose_split_k(n: int, hw_out: int, num_domains: int, in_numel: int, out_numel: int,
                   kh: int, kw: int, c_out: int, num_sms: int) -> int:
    """How many programs share each output tile's K loop (a power of two, 1 = no split).

    Split only when the estimated grid, with the 64 x 64 reference tile over the
    domains present, has fewer tiles than the GPU has SMs; then double SPLIT_K
    until the grid fills the SMs, while each split keeps at least
    MIN_STEPS_PER_SPLIT steps of 32 channels x one tap and the fp32 workspace
    (SPLIT_K x N H_out W_out x C_out) stays under WORKSPACE_BYTES."""
    present = max(1, min(n, num_domains))
    m_d = math.ceil(n * hw_out / present)
    n_d = math.ceil(out_numel / num_domains)
    ch_d = math.ceil(in_numel / num_domains)
    if m_d == 0 or n_d == 0 or ch_d == 0:
        return 1
    bm = min(REFERENCE_TILE, max(32, bucket(m_d)))
    bn = min(REFERENCE_TILE, max(32, bucket(n_d)))
    tiles = present * triton.cdiv(m_d, bm) * triton.cdiv(n_d, bn)
    steps = kh * kw * triton.cdiv(ch_d, 32)
    split = 1
    while (tiles * split < num_sms and split * 2 <= MAX_SPLIT_K
           and steps // (split * 2) >= MIN_STEPS_PER_SPLIT
           and split * 2 * n * hw_out * c_out * 4 <= WORKSPACE_BYTES):
        split *= 2
    return split


def tuning_configs() -> List[triton.Config]:
    """TUNING_SPACE as ``triton.Config``s."""
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                          num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in TUNING_SPACE]


def _early_prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    return select_configs(configs, args["M_EST"], args["N_EST"], args["K_EST"], args["KH"],
                          args["KW"], args["SPLIT_K"], args["x_ptr"].element_size())


_autotune_options = dict(
    configs=tuning_configs(),
    key=["M_EST", "N_EST", "K_EST", "KH", "KW", "SPLIT_K"],
    prune_configs_by={"early_config_prune": _early_prune},
)
if "cache_results" in inspect.signature(triton.autotune).parameters:
    _autotune_options["cache_results"] = True  # keep tunings across processes
#: The autotuned kernel (CUDA); the plain ``domain_conv2d_kernel`` runs under the interpreter.
domain_conv2d_tuned = triton.autotune(**_autotune_options)(domain_conv2d_kernel)

_NUM_SMS: Dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (DEFAULT_NUM_SMS off CUDA); host query, cached."""
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def forced_split_k() -> Optional[int]:
    """SPLIT_K from ``FASTMDL_TRITON_SPLIT_K``, or None when unset."""
    value = os.environ.get(_SPLIT_K_ENV, "").strip()
    if not value:
        return None
    try:
        split = int(value)
    except ValueError:
        raise ValueError(f"{_SPLIT_K_ENV} must be a positive int, got {value!r}") from None
    if split < 1:
        raise ValueError(f"{_SPLIT_K_ENV} must be a positive int, got {value!r}")
    return split


# ---------------------------------------------------------------------------
# Metadata (device ops only) and the launch wrapper.

def batch_grouping(domain: torch.Tensor, num_domains: int):
    """(order, sample_start): the samples sorted by domain (stable) and where each
    domain's samples start in that order (D + 1 entries). Depends only on the batch."""
    dev = domain.device
    counts = torch.zeros(num_domains, dtype=torch.int64, device=dev)
    counts.index_add_(0, domain, torch.ones_like(domain))
    order = torch.argsort(domain, stable=True)
    sample_start = torch.zeros(num_domains + 1, dtype=torch.int64, device=dev)
    sample_start[1:] = counts.cumsum(0)
    return order, sample_start


def column_order(out_index: torch.Tensor, out_offsets: torch.Tensor, c_out: int) -> torch.Tensor:
    """(D, C_out): each domain's filters in ascending order, then the channels it
    does not use. Depends only on the layer."""
    used = domain_masks(out_index, out_offsets, c_out, torch.int8)
    return torch.argsort(1 - used, dim=1, stable=True).contiguous()


def _memo(plan, anchors, key, build):
    return build() if plan is None else plan.lookup(anchors, key, build)


def domain_conv2d(x, weight, domain, in_index, in_offsets, out_index, out_offsets,
                  scale, shift, residual, relu, stride, padding, dilation, *,
                  plan=None, split_k: Optional[int] = None):
    """Launch ``domain_conv2d_kernel`` for the whole batch (and, with split-K, the
    epilogue kernel after it); returns y.

    ``plan`` (an object with ``lookup(anchors, key, build)``, see
    ``fastmdl.backends.triton.BatchPlan``) memoises the grouping metadata across
    calls; ``split_k`` forces SPLIT_K (else ``FASTMDL_TRITON_SPLIT_K``, else
    ``choose_split_k`` on CUDA and 1 under the interpreter)."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    num_domains = in_offsets.numel() - 1
    h_out, w_out = conv_output_hw((h, w), (kh, kw), stride, padding, dilation)
    y = torch.empty((n, c_out, h_out, w_out), dtype=x.dtype, device=x.device,
                    memory_format=output_memory_format(x))
    if n == 0:
        return y
    dev = x.device
    on_gpu = dev.type == "cuda"
    hw_out = h_out * w_out

    order, sample_start = _memo(plan, (domain,), ("grouping", num_domains),
                                lambda: batch_grouping(domain, num_domains))
    col_order = _memo(plan, (out_index, out_offsets), ("columns", c_out),
                      lambda: column_order(out_index, out_offsets, c_out))

    sizes = (n, hw_out, num_domains, in_index.numel(), out_index.numel(), kh, kw)
    if split_k is None:
        split_k = forced_split_k()
    if split_k is None:
        split_k = choose_split_k(*sizes, c_out, num_sms(dev)) if on_gpu else 1
    if split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}")
    ws = (torch.empty((split_k, n * hw_out, c_out), dtype=torch.float32, device=dev)
          if split_k > 1 else y)

    if x.dtype == torch.float32:
        precision = "tf32" if on_gpu and conv_tf32() else "ieee"
    else:
        precision = "ieee"
    res = residual if residual is not None else y
    scale = scale.contiguous() if scale is not None else None
    shift = shift.contiguous() if shift is not None else None
    out_offsets = out_offsets.contiguous()

    def grid(meta):
        return (triton.cdiv(n * hw_out, meta["BLOCK_M"]) + num_domains,
                triton.cdiv(c_out, meta["BLOCK_N"]), meta["SPLIT_K"])

    args = (
        x, weight, y, ws,
        scale if scale is not None else y,
        shift if shift is not None else y,
        res,
        in_index.contiguous(), in_offsets.contiguous(), out_offsets, col_order,
        order, sample_start,
        num_domains, c_in, h, w, c_out, h_out, w_out,
        *x.stride(), *weight.stride(), *y.stride(), *res.stride(),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        ws.stride(0) if split_k > 1 else 0,
    )
    est = estimate(*sizes)
    fused = split_k == 1  # else the epilogue kernel applies the epilogue
    meta = dict(
        M_EST=est["M_EST"], N_EST=est["N_EST"], K_EST=est["K_EST"],
        KH=kh, KW=kw, D_PAD=max(16, triton.next_power_of_2(num_domains)),
        HAS_SCALE=fused and scale is not None, HAS_SHIFT=fused and shift is not None,
        HAS_RES=fused and residual is not None, RELU=fused and bool(relu),
        INPUT_PRECISION=precision, SPLIT_K=split_k,
    )
    if on_gpu:
        domain_conv2d_tuned[grid](*args, **meta)
    else:
        block_m, block_n, block_k, num_warps, num_stages = INTERPRETER_BLOCKS
        domain_conv2d_kernel[grid](*args, **meta, BLOCK_M=block_m, BLOCK_N=block_n,
                                   BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)

    if split_k > 1:
        block_m, block_n, num_warps = _EPILOGUE_BLOCKS["cuda" if on_gpu else "cpu"]
        launch_epilogue(ws, y, scale, shift, residual, relu, domain.contiguous(), order,
                        out_offsets, col_order, block_m=block_m, block_n=block_n,
                        num_warps=num_warps)
    return y
