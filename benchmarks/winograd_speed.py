"""Winograd F(4x4,3x3) CPU convolution (fastmdl.winograd) vs oneDNN's direct convolution.

The baseline is what the library runs per domain today: oneDNN's fused
``mkldnn._convolution_pointwise`` with weights reordered once (prepacked), on
channels_last float32 input, with ReLU (and, for the residual rows, the fused
binary add). Contenders run interleaved in rounds (one call of each per round)
and the median per contender is reported, so load changes on a shared machine
hit all of them alike. GFLOP/s count direct-convolution FLOPs, 2*N*H*W*C_in*C_out*9,
for every contender.

    python benchmarks/winograd_speed.py [--rounds 30] [--shapes 8x32x64,...] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fastmdl import winograd  # noqa: E402

DEFAULT_SHAPES = [  # N x C x H (C_in = C_out, H = W)
    (8, 32, 64), (8, 64, 32), (8, 128, 16),
    (2, 32, 64), (2, 64, 32), (2, 128, 16),
    (16, 32, 64), (16, 64, 32), (16, 128, 16),
    (8, 48, 64), (8, 96, 32), (8, 192, 16),
]


def _load_avg() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def contenders(n, c, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, h, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, c, 3, 3, generator=g) / (3 * c ** 0.5)
    b = torch.randn(c, generator=g)
    r = torch.randn(n, c, h, h, generator=g).contiguous(memory_format=torch.channels_last)
    P = torch.ops.mkldnn._convolution_pointwise
    wp = torch.ops.mkldnn._reorder_convolution_weight(
        w.contiguous(memory_format=torch.channels_last), [1, 1], [1, 1], [1, 1], 1, list(x.shape))
    pk = winograd.prepack(w)
    one = [1, 1]
    fns = {
        "onednn": lambda: P(x, wp, b, one, one, one, 1, "relu", [], ""),
        "wino": lambda: winograd.conv3x3(x, pk, b, None, True),
        "onednn+res": lambda: P.binary(x, r, wp, b, one, one, one, 1, "add", None, "relu", [], ""),
        "wino+res": lambda: winograd.conv3x3(x, pk, b, r, True),
    }
    # the contenders must agree before they are timed
    ref = fns["onednn"]()
    err = ((fns["wino"]() - ref).abs().max() / ref.abs().max()).item()
    ref_r = fns["onednn+res"]()
    err_r = ((fns["wino+res"]() - ref_r).abs().max() / ref_r.abs().max()).item()
    assert err < 1e-4 and err_r < 1e-4, (err, err_r)
    return fns, max(err, err_r)


def time_shape(n, c, h, rounds, warmup=3):
    fns, err = contenders(n, c, h)
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, err


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--shapes", default=None, help="comma-separated NxCxH, e.g. 8x32x64,8x64x32")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not winograd.available():
        sys.exit("fastmdl.winograd is not available: the C++ extension did not build or load")
    shapes = DEFAULT_SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"AVX-512 path: {winograd.has_avx512()}, load average before: {_load_avg()}")
    print()
    print("| N | C | HxW | oneDNN ms | Winograd ms | speed-up | oneDNN+res ms | Winograd+res ms "
          "| speed-up | oneDNN GFLOP/s | Winograd GFLOP/s | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, c, h in shapes:
        t, err = time_shape(n, c, h, args.rounds)
        flop = 2 * n * h * h * c * c * 9
        print(f"| {n} | {c} | {h}x{h} | {t['onednn'] * 1e3:.3f} | {t['wino'] * 1e3:.3f} | "
              f"{t['onednn'] / t['wino']:.2f}x | {t['onednn+res'] * 1e3:.3f} | "
              f"{t['wino+res'] * 1e3:.3f} | {t['onednn+res'] / t['wino+res']:.2f}x | "
              f"{flop / t['onednn'] / 1e9:.0f} | {flop / t['wino'] / 1e9:.0f} | {err:.1e} |",
              flush=True)
    print()
    print(f"load average after: {_load_avg()}")


if __name__ == "__main__":
    main()
