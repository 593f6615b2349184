"""End-to-end CPU benchmark: a pruned multi-domain ResNet-26 serving a mixed batch.

    python benchmarks/pruned_model.py [--n 32] [--domains 4] [--keep 0.5] [--shared 0.7]
                                      [--size 64] [--width 1.0] [--repeats 7]
                                      [--sweep] [--out benchmarks/out]

Each domain keeps ``keep`` of every mask group's filters; ``shared`` of those are
common to all domains (a stand-in for what the sharing losses produce), the rest
are the domain's own. Contenders, on the same mixed batch in one process, timed
in interleaved rounds:

  dense (one domain)      the original single-domain ResNet-26: the cost to beat
                          (NCHW, and converted to channels_last)
  masked (convert)        the converted model in eval mode: dense convs, then masks
  per-domain nets (e)     one physically sliced ResNet-26 per domain, each with its
                          own BatchNorm and head, run on its own samples (what a
                          per-domain pruning tool deploys); as a user runs it
                          (NCHW) and in channels_last
  pruned compact ragged   fastmdl.prune(model) as it ships on the CPU (3x3 layers as
                          Winograd F(4x4,3x3) where the CPU has AVX-512)
  ... direct convs        the same with every convolution direct (FASTMDL_WINOGRAD=0),
                          the contenders' algorithm
  pruned compact padded   the static-shape storage (torch.compile / GPU) on the CPU
  pruned union            the union layout: every layer through domain_conv2d

Every output is checked against the masked model before timing. Useful GFLOP/s
counts, for each sample, only its domain's multiply-adds (x2). ``--sweep`` adds
N in {1, 8, 32} x D in {2, 4, 10}.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from contenders import (check_same_function, interleaved_medians, matmul_gflops,  # noqa: E402
                         per_domain_networks)

import fastmdl  # noqa: E402
from fastmdl._io import write_report  # noqa: E402
from fastmdl.models import resnet26  # noqa: E402


def set_masks(model, keep: float, shared: float, seed: int = 0) -> None:
    """Each domain keeps a random ``keep`` of every group's channels, of which a
    ``shared`` fraction every domain keeps (a grouped convolution's channels go in
    whole groups: the group's block is the unit)."""
    g = torch.Generator().manual_seed(seed)
    for group in model.mask_groups():
        d, width = group.scores.shape
        c = width // group.block
        n_keep = max(1, round(keep * c))
        n_core = round(shared * n_keep)
        order = torch.randperm(c, generator=g)
        core, rest = order[:n_core], order[n_core:]
        scores = torch.full((d, c), -1.0)
        scores[:, core] = 1.0
        for dom in range(d):
            own = rest[torch.randperm(len(rest), generator=g)[:n_keep - n_core]]
            scores[dom, own] = 1.0
        group.scores.data.copy_(scores.repeat_interleave(group.block, dim=1))


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


def _per_domain(nets, x, domain, channels_last: bool):
    """Contender (e) on a mixed batch: each domain's samples through its own network."""
    if channels_last:
        nets = [n.to(memory_format=torch.channels_last) for n in nets]
    rows = [(domain == d).nonzero().squeeze(1) for d in range(len(nets))]
    live = [(d, r) for d, r in enumerate(rows) if r.numel()]
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def run():
        return [nets[d](x.index_select(0, r).contiguous(memory_format=fmt)) for d, r in live]
    return run, live


def contenders(base, model, pruned, x, domain, *, masked: bool):
    """The timed functions, each checked against the masked model first."""
    with torch.no_grad():
        want = model(x, domain)
    base_cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        check_same_function(base_cl(x_cl), base(x), "dense, channels_last")
    fns = {"dense (one domain)": lambda: base(x),
           "dense (one domain), channels_last": lambda: base_cl(x_cl)}
    if masked:
        fns["masked (convert)"] = lambda: model(x, domain)
    nets = per_domain_networks(model)
    for label, cl in (("per-domain nets (e)", False), ("per-domain nets (e), channels_last", True)):
        run, live = _per_domain(nets, x, domain, cl)
        with torch.no_grad():
            for (d, r), y in zip(live, run()):
                check_same_function(y, want[r][:, :y.shape[1]], f"{label} domain {d}")
        fns[label] = run
    for label, layout, storage, wino in (
            ("pruned compact ragged", "compact", "ragged", "1"),
            ("pruned compact ragged, direct convs", "compact", "ragged", "0"),
            ("pruned compact padded", "compact", "padded", "1"),
            ("pruned union", "union", "auto", "1")):
        saved = os.environ.get("FASTMDL_WINOGRAD")
        os.environ["FASTMDL_WINOGRAD"] = wino  # read when the compact plan is packed
        try:
            p = fastmdl.prune(model)
        finally:
            os.environ.pop("FASTMDL_WINOGRAD") if saved is None else \
                os.environ.__setitem__("FASTMDL_WINOGRAD", saved)
        p.layout, p.storage = layout, storage
        with torch.no_grad():
            check_same_function(p(x, domain), want, label)
        fns[label] = (lambda p=p: p(x, domain))
    return fns


def _useful_flops(pruned, domain) -> float:
    per_domain = [r["flops"] for r in fastmdl.cost_report(pruned).domains]
    return 2 * sum(per_domain[d] for d in domain.tolist())


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
    ap.add_argument("--sweep", action="store_true", help="also N in {1, 8, 32} x D in {2, 4, 10}")
    ap.add_argument("--out",
                    default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = ap.parse_args(argv)

    peak = matmul_gflops()
    stamp = datetime.date.today().isoformat()
    base, model, pruned = pruned_resnet26(args.domains, args.keep, args.shared, args.size,
                                          args.width)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.n, 3, args.size, args.size, generator=g)
    domain = torch.randperm(args.n, generator=g) % args.domains
    fns = contenders(base, model, pruned, x, domain, masked=True)
    times = interleaved_medians(fns, repeats=args.repeats)
    useful = _useful_flops(pruned, domain)
    ref = times["dense (one domain)"]
    e = times["per-domain nets (e)"]
    report = fastmdl.cost_report(pruned)
    lines = [f"pruned ResNet-26 (width {args.width}), N={args.n} at {args.size}x{args.size}, "
             f"D={args.domains}, keep={args.keep}, shared={args.shared}; "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads, {stamp}; "
             f"matmul {peak:.0f} GFLOP/s", "",
             str(report), "",
             "| contender | ms | vs dense (one domain) | vs dense, channels_last | "
             "vs per-domain nets (e) | useful GFLOP/s | % of matmul |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    ref_cl = times["dense (one domain), channels_last"]
    for name, t in times.items():
        lines.append(f"| {name} | {t * 1e3:.1f} | {ref / t:.2f}x | {ref_cl / t:.2f}x | "
                     f"{e / t:.2f}x | {useful / t / 1e9:.1f} | "
                     f"{100 * useful / t / 1e9 / peak:.1f} |")
    result = {"args": vars(args), "date": stamp, "matmul_gflops": peak, "seconds": times,
              "cost": report.to_dict()}

    if args.sweep:
        lines += ["", "Sweep (same masks recipe; medians of interleaved rounds):", "",
                  "| N | D | dense ms | (e) NCHW ms | (e) channels_last ms | compact ms | "
                  "compact direct ms | union ms | compact vs dense | compact vs (e) | "
                  "compact direct vs (e) |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        result["sweep"] = []
        for d in (2, 4, 10):
            base_d, model_d, pruned_d = pruned_resnet26(d, args.keep, args.shared, args.size,
                                                        args.width)
            for n in (1, 8, 32):
                gx = torch.Generator().manual_seed(n * 100 + d)
                xs = torch.randn(n, 3, args.size, args.size, generator=gx)
                ds = torch.randint(0, d, (n,), generator=gx)
                f = contenders(base_d, model_d, pruned_d, xs, ds, masked=False)
                del f["pruned compact padded"]
                t = interleaved_medians(f, repeats=max(3, args.repeats - 2))
                c = t["pruned compact ragged"]
                cd = t["pruned compact ragged, direct convs"]
                e = t["per-domain nets (e)"]
                lines.append(
                    f"| {n} | {d} | {t['dense (one domain)'] * 1e3:.1f} | {e * 1e3:.1f} | "
                    f"{t['per-domain nets (e), channels_last'] * 1e3:.1f} | {c * 1e3:.1f} | "
                    f"{cd * 1e3:.1f} | {t['pruned union'] * 1e3:.1f} | "
                    f"{t['dense (one domain)'] / c:.2f}x | {e / c:.2f}x | {e / cd:.2f}x |")
                result["sweep"].append({"n": n, "domains": d, "seconds": t,
                                        "domains_present": sorted(set(ds.tolist()))})
                print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    write_report(args.out, "pruned_model", text, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
