"""CPU benchmark of fastmdl::domain_conv2d against the per-domain loop, the masked
dense convolution and the dense convolution, on ResNet-like layers.

    python benchmarks/cpu_op.py [--n 32] [--domains 4] [--keep 0.5] [--out benchmarks/out]

Prints a table and writes cpu_op.md and cpu_op.json under --out. Every contender
runs on the same inputs in one process; the cpp result is checked against the
reference before it is timed. Ratios are medians of repeated timings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from contenders import (BASELINES, RESNET_LAYERS, contenders, make_problem,  # noqa: E402
                        matmul_gflops, median_seconds, write_atomic)

import fastmdl  # noqa: E402
from fastmdl import backends  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--domains", type=int, default=4)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out",
                    default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    ap.add_argument("--quick", action="store_true",
                    help="two small layers, three repeats (smoke run)")
    args = ap.parse_args(argv)

    ok, why = backends.status("cpp", "cpu")
    if not ok:
        print(f"the cpp backend is not usable here: {why}", file=sys.stderr)
        return 1
    layers = RESNET_LAYERS[2:4] if args.quick else RESNET_LAYERS
    repeats = 3 if args.quick else args.repeats
    peak = matmul_gflops()
    stamp = datetime.date.today().isoformat()
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads"
    print(f"fastmdl {fastmdl.__version__}, torch {torch.__version__}, {machine}, {stamp}")
    print(f"measured float32 matmul: {peak:.1f} GFLOP/s; N={args.n}, D={args.domains}, "
          f"keep={args.keep} of input channels and output filters per domain\n")

    names = [*BASELINES, "cpp"]
    rows = []
    try:
        from tqdm import tqdm
        # On stderr, and only on a terminal: in a log that merges both streams its
        # carriage-return frames would run into the table's first line.
        it = tqdm(layers, desc="layers", leave=False, file=sys.stderr,
                  disable=not sys.stderr.isatty())
    except ImportError:
        it = layers
    for (label, c_in, c_out, hw, k, s, pad) in it:
        p = make_problem(c_in, c_out, hw, k, s, pad, n=args.n, domains=args.domains, keep=args.keep)
        fns = contenders(p, ["cpp", "reference"])
        got, want = fns["cpp"](), fns["reference"]()
        err = ((got - want).abs().max() / want.abs().max()).item()
        if err > 1e-4:
            raise SystemExit(f"{label}: cpp disagrees with the reference "
                             f"(relative error {err:.2e})")
        t = {name: median_seconds(fns[name], repeats=repeats) for name in names}
        useful = p.useful_flops()
        rows.append({
            "layer": label, "useful_fraction": useful / p.dense_flops(),
            **{f"ms {n}": 1e3 * t[n] for n in names},
            "ms (d) ideal": 1e3 * t["(c) dense"] * useful / p.dense_flops(),
            "speedup vs (a)": t["(a) loop"] / t["cpp"],
            "speedup vs (b)": t["(b) mask"] / t["cpp"],
            "useful GFLOP/s cpp": useful / t["cpp"] / 1e9,
            "fraction of matmul peak": useful / t["cpp"] / 1e9 / peak,
            "max rel err": err,
        })

    head = ["layer", "ms (a) loop", "ms (b) mask", "ms (c) dense", "ms (d) ideal", "ms cpp",
            "cpp vs (a)", "cpp vs (b)", "useful GFLOP/s", "of peak"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['ms (a) loop']:.2f} | {r['ms (b) mask']:.2f} | "
                     f"{r['ms (c) dense']:.2f} | {r['ms (d) ideal']:.2f} | {r['ms cpp']:.2f} | "
                     f"{r['speedup vs (a)']:.2f}x | {r['speedup vs (b)']:.2f}x | "
                     f"{r['useful GFLOP/s cpp']:.1f} | {100 * r['fraction of matmul peak']:.0f}% |")
    med_a = statistics.median(r["speedup vs (a)"] for r in rows)
    med_b = statistics.median(r["speedup vs (b)"] for r in rows)
    summary = (f"median over layers: cpp is {med_a:.2f}x the speed of (a) the per-domain loop and "
               f"{med_b:.2f}x the speed of (b) the masked dense conv")
    table = "\n".join(lines)
    print(table)
    print("\n" + summary)

    os.makedirs(args.out, exist_ok=True)
    header = (f"CPU op benchmark, {stamp}: {machine}; torch {torch.__version__}; matmul "
              f"{peak:.1f} GFLOP/s; N={args.n}, D={args.domains}, keep={args.keep}; "
              f"medians of {repeats} runs")
    write_atomic(os.path.join(args.out, "cpu_op.md"), f"{header}\n\n{table}\n\n{summary}\n")
    write_atomic(os.path.join(args.out, "cpu_op.json"), json.dumps(
        {"date": stamp, "machine": machine, "torch": torch.__version__, "matmul_gflops": peak,
         "n": args.n, "domains": args.domains, "keep": args.keep, "rows": rows,
         "median_speedup_vs_loop": med_a, "median_speedup_vs_mask": med_b}, indent=2))
    print(f"\nwrote {args.out}/cpu_op.md and cpu_op.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
