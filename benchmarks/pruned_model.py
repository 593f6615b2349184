"""End-to-end CPU benchmark: a pruned multi-domain ResNet-26 serving a mixed batch.

    python benchmarks/pruned_model.py [--n 32] [--domains 4] [--keep 0.5] [--shared 0.7]
                                      [--size 64] [--width 1.0] [--out benchmarks/out]

Each domain keeps ``keep`` of every mask group's filters; ``shared`` of those are
common to all domains (a stand-in for what the sharing losses produce), the rest
are the domain's own. Contenders, on the same mixed batch in one process:

  dense (one domain)   the original single-domain ResNet-26: the cost fastmdl must beat
  masked (convert)     the converted model in eval mode: dense convs, then masks
  pruned auto          fastmdl.prune(model) as it ships: backend=None per layer
  pruned cpp           every convolution on the C++ op
  pruned reference     every convolution on the pure-PyTorch reference op

Every pruned output is checked against the masked model before timing. Useful
GFLOP/s counts, for each sample, only its domain's multiply-adds (x2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from contenders import matmul_gflops, median_seconds, write_atomic  # noqa: E402

import fastmdl  # noqa: E402
from fastmdl.models import resnet26  # noqa: E402


def set_masks(model, keep: float, shared: float, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for group in model.mask_groups():
        d, c = group.scores.shape
        n_keep = max(1, round(keep * c))
        n_core = round(shared * n_keep)
        order = torch.randperm(c, generator=g)
        core, rest = order[:n_core], order[n_core:]
        scores = torch.full((d, c), -1.0)
        scores[:, core] = 1.0
        for dom in range(d):
            own = rest[torch.randperm(len(rest), generator=g)[:n_keep - n_core]]
            scores[dom, own] = 1.0
        group.scores.data.copy_(scores)


def pruned_resnet26(domains: int, keep: float, shared: float, size: int, width: float,
                    seed: int = 0):
    """(dense single-domain ResNet-26, converted model with set masks and per-domain
    BatchNorm statistics, its pruned network), all in eval mode."""
    torch.manual_seed(seed)
    base = resnet26(num_classes=10, width=width).eval()
    model = fastmdl.convert(base, domains, [10] * domains, input_size=(3, size, size))
    set_masks(model, keep, shared, seed)
    model.train()
    with torch.no_grad():  # per-domain BatchNorm statistics that differ between domains
        for _ in range(2):
            model(torch.randn(4 * domains, 3, size, size), torch.arange(4 * domains) % domains)
    model.eval()
    return base, model, fastmdl.prune(model)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--domains", type=int, default=4)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--shared", type=float, default=0.7)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out",
                    default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args(argv)

    base, model, pruned = pruned_resnet26(args.domains, args.keep, args.shared, args.size,
                                          args.width)
    x = torch.randn(args.n, 3, args.size, args.size)
    domain = torch.randperm(args.n) % args.domains

    fns = {"dense (one domain)": lambda: base(x),
           "masked (convert)": lambda: model(x, domain)}
    for backend in ("auto", "cpp", "reference"):
        p = fastmdl.prune(model)
        p.backend = backend
        with torch.no_grad():
            torch.testing.assert_close(p(x, domain), model(x, domain), rtol=1e-4, atol=1e-4)
        fns[f"pruned {backend}"] = (lambda p=p: p(x, domain))

    report = fastmdl.cost_report(pruned)
    per_domain = [r["flops"] for r in report.domains]
    useful = 2 * sum(per_domain[d] for d in domain.tolist())
    peak = matmul_gflops()
    times = {name: median_seconds(fn, repeats=args.repeats) for name, fn in fns.items()}
    ref = times["dense (one domain)"]
    stamp = datetime.date.today().isoformat()
    lines = [f"pruned ResNet-26 (width {args.width}), N={args.n} at {args.size}x{args.size}, "
             f"D={args.domains}, keep={args.keep}, shared={args.shared}; "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, {stamp}; "
             f"matmul {peak:.0f} GFLOP/s", "",
             str(report), "",
             "| contender | ms | speed-up vs dense (one domain) | useful GFLOP/s | % of matmul |",
             "|---|---:|---:|---:|---:|"]
    for name, t in times.items():
        lines.append(f"| {name} | {t * 1e3:.1f} | {ref / t:.2f}x | {useful / t / 1e9:.1f} | "
                     f"{100 * useful / t / 1e9 / peak:.1f} |")
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    write_atomic(os.path.join(args.out, "pruned_model.md"), text + "\n")
    write_atomic(os.path.join(args.out, "pruned_model.json"), json.dumps(
        {"args": vars(args), "date": stamp, "matmul_gflops": peak, "seconds": times,
         "cost": report.to_dict()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
