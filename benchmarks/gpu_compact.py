"""The compact layout on a GPU, in one call: correctness first, then the issue's targets.

    python benchmarks/gpu_compact.py [--dtype float16] [--budget 420] [--out DIR]
    python benchmarks/gpu_compact.py --dry-run     # CPU, tiny shapes, no timing claims

1. Checks (each a PASS/FAIL line): a pruned 10-domain ResNet-26 in the compact
   layout (padded storage, one Triton launch per convolution) against its union
   layout in float64 on mixed, single-domain and empty-domain batches and a batch
   of one; the same forward captured in a CUDA graph and replayed on a new
   domain mix; torch.compile(fullgraph=True).
2. Layers: ResNet-26's convolutions at 64x64 and three ResNet-50 3x3 layers, N=64,
   D=10, each domain a random half of the union's channels and filters (the layer
   cut to the union, as prune leaves it). ``segment_conv2d`` on its compact input
   (rows sorted by domain, channels-last, slots rounded to 16) against (c) the
   dense cuDNN convolution of the union layer, (b) the same followed by a
   per-sample mask, and (d) the ideal: (c) times the fraction of its FLOPs the
   batch needs. All CUDA-graphed, CUDA-event medians. Targets: within 1.3x of
   (d) at 128 channels or more, faster than (b) everywhere.
3. Model: the pruned 10-domain ResNet-26 serving mixed batches (N=64 and 256 at
   64x64), compact and union layouts, against ONE unpruned ResNet-26 (cuDNN,
   channels-last), each CUDA-graphed: images/s. Target: compact >= 1.5x the
   unpruned network.

Writes gpu_compact.md and gpu_compact.json under --out (default $OUT, else
benchmarks/out); the first line names the GPU, torch, triton, dtype and date.
A time guard (--budget seconds) skips what would not fit and says so.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import time
from typing import Callable, List

T0 = time.perf_counter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from contenders import (cuda_graphed, gpu_ceilings, make_problem, median_seconds,  # noqa: E402
                        resnet26_layers, resnet50_layers, union_problem)
from pruned_model import pruned_resnet26  # noqa: E402

import fastmdl  # noqa: E402
from fastmdl._io import write_report  # noqa: E402
from fastmdl.compact.padded import SLOT_ALIGN  # noqa: E402
from fastmdl.ops import segment_conv2d  # noqa: E402

DOMAINS, KEEP, N = 10, 0.5, 64


def _round(c: int, align: int) -> int:
    return -(-c // align) * align


def compact_problem(p, align: int):
    """The layer problem ``p`` in the compact layout: (x, offsets, weight, cin, cout,
    out_slots, order) with x's rows sorted by domain and each row's channels packed."""
    order = torch.argsort(p.domain.cpu(), stable=True)
    domain = p.domain.cpu()[order]
    d_count = p.in_masks.shape[0]
    counts = torch.bincount(domain, minlength=d_count)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    ins = [p.in_masks[d].nonzero().squeeze(1).cpu() for d in range(d_count)]
    outs = [p.out_masks[d].nonzero().squeeze(1).cpu() for d in range(d_count)]
    cin = [_round(i.numel(), align) for i in ins]
    cout = [o.numel() for o in outs]
    p_in, p_out = max(1, max(cin)), _round(max(1, max(cout)), align)
    dev, dt = p.x.device, p.x.dtype
    xs = p.x.index_select(0, order.to(dev))
    x = torch.zeros((xs.shape[0], p_in) + tuple(xs.shape[2:]), device=dev, dtype=dt)
    blocks = []
    kh, kw = p.weight.shape[2:]
    for d in range(d_count):
        s, e = int(offsets[d]), int(offsets[d + 1])
        x[s:e, :ins[d].numel()] = xs[s:e].index_select(1, ins[d].to(dev))
        w = p.weight.index_select(0, outs[d].to(dev)).index_select(1, ins[d].to(dev))
        block = torch.zeros((cout[d], kh, kw, cin[d]), device=dev, dtype=dt)
        block[..., :ins[d].numel()] = w.permute(0, 2, 3, 1)
        blocks.append(block.reshape(-1))
    x = x.contiguous(memory_format=torch.channels_last)
    return x, offsets.to(dev), torch.cat(blocks), cin, cout, p_out, order, outs


def timer(run_cuda: bool) -> Callable[[Callable], float]:
    """ms of one call: a CUDA graph's replay under CUDA-event medians, else wall medians."""
    def time_it(fn: Callable) -> float:
        if run_cuda:
            from triton.testing import do_bench
            replay, _ = cuda_graphed(fn)
            return do_bench(replay, warmup=10, rep=100, return_mode="median")
        return 1e3 * median_seconds(fn, warmup=1, repeats=3)
    return time_it


def check_model(pruned, dev, dtype, lines: List[str]) -> bool:
    """The compact layout against the union layout (float64) on every kind of batch."""
    ok = True
    p64 = copy.deepcopy(pruned).to(device=dev, dtype=torch.float64)
    p64.layout = "union"
    p64.backend = "reference"
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 3, *pruned.input_size[1:], generator=g)
    cases = {"mixed": torch.arange(24) % DOMAINS,
             "empty domains": torch.tensor([0, 3, 3, 7] * 6),
             "one domain": torch.full((24,), 5)}
    for name, domain in cases.items():
        with torch.inference_mode():
            got = pruned(x.to(dev, dtype), domain.to(dev)).double()
            want = p64(x.to(dev, torch.float64), domain.to(dev))
        fin = torch.isfinite(want)
        err = ((got - want)[fin].norm() / want[fin].norm()).item()
        bound = 2e-2 if dtype != torch.float32 else 1e-2
        good = err <= bound and torch.equal(torch.isfinite(got), fin)
        ok &= good
        lines.append(f"- {'PASS' if good else 'FAIL'} compact vs union, {name}: relative error "
                     f"{err:.2e} (bound {bound:.0e})")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--budget", type=float, default=420.0)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "out")))
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("no CUDA device: run with --dry-run on a CPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype) if cuda else torch.float32
    backend = "triton" if cuda else "reference"  # the interpreter is tested elsewhere
    align = SLOT_ALIGN if cuda else 1
    if cuda:
        torch.backends.cudnn.benchmark = True
        import triton
        head = (f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}; triton "
                f"{triton.__version__}; {args.dtype}; {datetime.date.today().isoformat()}")
    else:
        head = "DRY RUN on CPU: tiny shapes, no timing claims"
    lines, result = [head, ""], {"header": head, "layers": [], "model": []}
    time_it = timer(cuda)

    def left() -> float:
        return args.budget - (time.perf_counter() - T0)

    if cuda:
        tflops, gbs = gpu_ceilings(dtype)
        lines.append(f"ceilings: matmul {tflops:.0f} TFLOP/s, copy {gbs:.0f} GB/s")
        result["ceilings"] = {"matmul_tflops": tflops, "copy_gbs": gbs}

    # 1. checks
    size, width = (64, 1.0) if cuda else (16, 0.125)
    base, masked, pruned = pruned_resnet26(DOMAINS, KEEP, 0.7, size, width)
    pruned = pruned.to(device=dev, dtype=dtype)
    lines += ["", "Checks:"]
    ok = check_model(pruned, dev, dtype, lines)
    x = torch.randn(N, 3, size, size, device=dev, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    domain = (torch.arange(N) % DOMAINS).to(dev)
    if cuda:
        with torch.inference_mode():
            replay, out = cuda_graphed(lambda: pruned(x, domain))
            other = domain.flip(0).clone()
            domain.copy_(other)
            replay()
            want = pruned(x, other)
        good = torch.allclose(out.nan_to_num(0, 0, 0), want.nan_to_num(0, 0, 0), rtol=1e-3,
                              atol=1e-3)
        ok &= good
        lines.append(f"- {'PASS' if good else 'FAIL'} CUDA graph replay on a new domain mix")
        domain = (torch.arange(N) % DOMAINS).to(dev)
    try:
        compiled = torch.compile(pruned, fullgraph=True, backend="inductor" if cuda else "eager")
        with torch.inference_mode():
            good = torch.allclose(compiled(x, domain).nan_to_num(0, 0, 0),
                                  pruned(x, domain).nan_to_num(0, 0, 0), rtol=1e-2, atol=1e-2)
        lines.append(f"- {'PASS' if good else 'FAIL'} torch.compile(fullgraph=True)")
    except Exception as exc:
        good = False
        lines.append(f"- FAIL torch.compile(fullgraph=True): {type(exc).__name__}: {exc}")
    ok &= good

    # 2. layers
    layers = resnet26_layers(64) + [l for l in resnet50_layers() if l[4] == 3][:3]
    if not cuda:
        layers = [("tiny 3x3 16->16 @8", 16, 16, 8, 3, 1, 1),
                  ("tiny 1x1 24->8 @6", 24, 8, 6, 1, 1, 0)]
    lines += ["", f"Layers (N={N if cuda else 8}, D={DOMAINS}, keep {KEEP}; CUDA-graphed ms):", "",
              "| layer | compact ms | (c) dense ms | (b) dense+mask ms | (d) ideal ms | "
              "compact / (d) | (b) / compact | useful TFLOP/s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c_in, c_out, hw, k, s, pad in layers:
        if left() < 60:
            lines.append(f"| {name} | skipped: time budget | | | | | | |")
            continue
        p = union_problem(make_problem(c_in, c_out, hw, k, s, pad, n=N if cuda else 8,
                                       domains=DOMAINS, keep=KEEP, dtype=dtype, device=dev,
                                       channels_last=True, seed=c_in * 7 + c_out))
        xc, off, w, cin, cout, slots, order, outs = compact_problem(p, align)

        def compact():
            return segment_conv2d(xc, off, w, cin, cout, k, stride=s, padding=pad,
                                  out_slots=slots, backend=backend)
        mask = p.out_masks.to(dtype)[p.domain][:, :, None, None]
        fns = {"compact": compact,
               "c": lambda: F.conv2d(p.x, p.weight, None, s, pad),
               "b": lambda: F.conv2d(p.x, p.weight, None, s, pad) * mask}
        y = compact()
        in_mask = p.in_masks.double()[p.domain][:, :, None, None]  # each sample's channels
        want = F.conv2d(p.x.double() * in_mask, p.weight.double(), None, s, pad).index_select(
            0, order.to(dev))
        bounds = off.tolist()
        err = 0.0
        for d in range(DOMAINS):
            a, b_ = bounds[d], bounds[d + 1]
            if b_ > a:
                ref = want[a:b_].index_select(1, outs[d].to(dev))
                got = y[a:b_, :cout[d]].double()
                err = max(err, ((got - ref).norm() / (ref.norm() + 1e-12)).item())
        ms = {k_: time_it(f) for k_, f in fns.items()}
        useful = p.useful_flops()
        ideal = ms["c"] * useful / p.dense_flops()
        row = {"layer": name, "ms": ms, "ideal_ms": ideal, "rel_err": err,
               "useful_tflops": useful / ms["compact"] / 1e9}
        result["layers"].append(row)
        flag = "" if err < 2e-2 else f" (FAIL: error {err:.1e})"
        ok &= err < 2e-2
        lines.append(f"| {name}{flag} | {ms['compact']:.3f} | {ms['c']:.3f} | {ms['b']:.3f} | "
                     f"{ideal:.3f} | {ms['compact'] / ideal:.2f}x | "
                     f"{ms['b'] / ms['compact']:.2f}x | {row['useful_tflops']:.1f} |")
        print(lines[-1], flush=True)

    # 3. model
    lines += ["", "Model (CUDA-graphed images/s):", "",
              "| N | unpruned ResNet-26 | pruned compact | pruned union | compact vs unpruned |",
              "|---:|---:|---:|---:|---:|"]
    unpruned = base.to(device=dev, dtype=dtype).to(memory_format=torch.channels_last).eval()
    union = copy.deepcopy(pruned)
    union.layout = "union"
    union.backend = backend if cuda else "auto"
    for n in ((64, 256) if cuda else (8,)):
        if left() < 45:
            lines.append(f"| {n} | skipped: time budget | | | |")
            continue
        xn = torch.randn(n, 3, size, size, device=dev, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        dn = (torch.randperm(n) % DOMAINS).to(dev)
        with torch.inference_mode():
            ms = {"unpruned": time_it(lambda: unpruned(xn)),
                  "compact": time_it(lambda: pruned(xn, dn)),
                  "union": time_it(lambda: union(xn, dn))}
        ips = {k_: n / v * 1e3 for k_, v in ms.items()}
        result["model"].append({"n": n, "ms": ms, "images_per_s": ips})
        lines.append(f"| {n} | {ips['unpruned']:.0f} | {ips['compact']:.0f} | "
                     f"{ips['union']:.0f} | {ips['compact'] / ips['unpruned']:.2f}x |")
        print(lines[-1], flush=True)
    lines += ["", f"checks: {'PASS' if ok else 'FAIL'}; {time.perf_counter() - T0:.0f} s"]
    text = "\n".join(lines)
    print(text)
    result["checks_pass"] = ok
    write_report(args.out, "gpu_compact", text, result)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
