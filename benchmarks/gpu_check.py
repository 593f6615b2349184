"""One-call GPU check for the foundation issue: ceilings, then the Triton backend
against the cuDNN contenders on ResNet-like layers (channels_last, cuDNN benchmark
mode, CUDA-event medians through triton.testing.do_bench, correctness first).

    python benchmarks/gpu_check.py [--out DIR] [--dtype float16]

Superseded by benchmarks/gpu.py, the one-command GPU benchmark (more D, N and keep
fractions, ResNet-26 and ResNet-50 shapes, the CUDA C++ backend, graphed baselines,
the model level, CSV/markdown/PNG output); this first cut is kept as it was.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from contenders import (BASELINES, RESNET_LAYERS, contenders, make_problem,  # noqa: E402
                        write_atomic)


def ceilings(dtype):
    from triton.testing import do_bench
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    tflops = 2 * n ** 3 / ms / 1e9
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms_copy = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    gbs = 2 * src.numel() * 4 / ms_copy / 1e6
    return tflops, gbs


def graphed(fn):
    """fn captured in a CUDA graph: its replay times the GPU work without the host."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/out"))
    ap.add_argument("--dtype", default="float16")
    args = ap.parse_args(argv)
    from triton.testing import do_bench
    import triton

    dtype = getattr(torch, args.dtype)
    torch.backends.cudnn.benchmark = True
    peak, bw = ceilings(dtype)
    gpu = torch.cuda.get_device_name(0)
    stamp = datetime.date.today().isoformat()
    print(f"{gpu}, torch {torch.__version__}, triton {triton.__version__}, {stamp}")
    print(f"ceilings: {args.dtype} matmul {peak:.0f} TFLOP/s, device copy {bw:.0f} GB/s\n")
    names = [*BASELINES, "triton", "triton graphed"]
    rows = []
    for n in (8, 64, 256):
        for (label, c_in, c_out, hw, k, s, pad) in RESNET_LAYERS:
            p = make_problem(c_in, c_out, hw, k, s, pad, n=n, domains=4, keep=0.5, dtype=dtype,
                             device="cuda", channels_last=True, seed=n)
            fns = contenders(p, ["triton", "reference"])
            fns["triton graphed"] = graphed(fns["triton"])
            got, want = fns["triton"](), fns["reference"]()
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            assert err < 2e-2, f"{label} N={n}: triton relative error {err:.2e}"
            t = {k_: do_bench(fns[k_], warmup=25, rep=100, return_mode="median") for k_ in names}
            useful = p.useful_flops()
            ideal = t["(c) dense"] * useful / p.dense_flops()
            rows.append(dict(n=n, layer=label, **{f"ms {k_}": t[k_] for k_ in names},
                             ideal_ms=ideal, rel_err=err,
                             useful_tflops=useful / t["triton graphed"] / 1e9,
                             of_peak=useful / t["triton graphed"] / 1e9 / peak))
    head = ("| N | layer | (a) loop ms | (b) mask ms | (c) dense ms | (d) ideal ms | triton ms | "
            "triton graphed ms | graphed vs (a) | graphed vs (b) | useful TFLOP/s (graphed) | "
            "of matmul peak |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(f"| {r['n']} | {r['layer']} | {r['ms (a) loop']:.3f} | "
                     f"{r['ms (b) mask']:.3f} | "
                     f"{r['ms (c) dense']:.3f} | {r['ideal_ms']:.3f} | {r['ms triton']:.3f} | "
                     f"{r['ms triton graphed']:.3f} | "
                     f"{r['ms (a) loop'] / r['ms triton graphed']:.2f}x | "
                     f"{r['ms (b) mask'] / r['ms triton graphed']:.2f}x | "
                     f"{r['useful_tflops']:.1f} | {100 * r['of_peak']:.1f}% |")
    table = "\n".join(lines)
    header = (f"GPU op check, {stamp}: {gpu}; torch {torch.__version__}; "
              f"triton {triton.__version__}; {args.dtype}, channels_last, D=4, keep=0.5; "
              f"matmul {peak:.0f} TFLOP/s, copy {bw:.0f} GB/s")
    print(table)
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, "gpu_check.md"), header + "\n\n" + table + "\n")
    write_atomic(os.path.join(args.out, "gpu_check.json"),
                 json.dumps(dict(gpu=gpu, date=stamp, peak_tflops=peak, copy_gbs=bw, rows=rows),
                            indent=2))


if __name__ == "__main__":
    main()
