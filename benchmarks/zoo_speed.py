"""The pruned mixed batch against the dense network on torchvision-like families.

    python benchmarks/zoo_speed.py [--size 64] [--n 8] [--domains 3] [--keep 0.5]
                                   [--repeats 7] [--out benchmarks/out]

For ResNet-18/50, ResNeXt-50, DenseNet-121, MobileNetV2, EfficientNet-B0, ConvNeXt-Tiny,
RegNetY-400MF and ShuffleNetV2 x1.0 (the plain-PyTorch
look-alikes in tests/zoo.py; torchvision does not import on the CPU build of
torch) and the block patterns of tests/families.py, each domain keeps a random
half of every mask group's filters. The table says how much of the convolution
weights the channel analysis keeps frozen and how much pruning removes, from the
union network and from each domain's own network on average. Contenders
on one mixed batch, timed in interleaved rounds after a check against the masked
model: the dense single-domain network, one sliced network per domain (e), and
the pruned network in its compact and union layouts. The dense network and (e)
run in both memory formats (NCHW and channels-last, "CL"); the ratios are against
the faster of the two. The table also counts the layers the compact plan runs as
union islands and its packed-weight memory.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from contenders import check_same_function, interleaved_medians, per_domain_networks  # noqa: E402
from pruned_model import set_masks  # noqa: E402

import fastmdl  # noqa: E402
from fastmdl._io import write_report  # noqa: E402

ARCHS = ("resnet18", "resnet50", "resnext50_32x4d", "densenet121", "mobilenet_v2",
         "efficientnet_b0", "convnext_tiny", "regnet_y_400mf", "shufflenet_v2_x1_0")
# A layer scale the MLP's pruned channels show through (torchvision starts at 1e-6,
# under which the check against the masked model would see nothing).
_KWARGS = {"convnext_tiny": {"layer_scale": 0.5}}
# Block patterns of the other families (tests/families.py).
FAMILIES = ("inverted_se", "grouped_bottleneck", "shuffle_unit", "convnext_block",
            "dense_block", "inception", "fire")


def _network(arch: str):
    import families
    import zoo

    return getattr(zoo if arch in ARCHS else families, arch)(num_classes=10,
                                                               **_KWARGS.get(arch, {}))


def conv_weights(net: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.Conv2d)
               or type(m).__name__ == "PrunedConv2d")


def dense_conv_weights(base: torch.nn.Module, model) -> int:
    """The dense network's convolution weights, counting the linear layers that
    convert ran as 1x1 convolutions (a channels-last MLP) among them."""
    converted = dict(model.module.named_modules())
    return sum(m.weight.numel() for name, m in base.named_modules()
               if isinstance(m, torch.nn.Conv2d) or (isinstance(m, torch.nn.Linear) and
                                                     isinstance(converted.get(name),
                                                                torch.nn.Conv2d)))


def build(arch: str, size: int, domains: int, keep: float, seed: int = 0):
    """(dense network, converted model with masks and per-domain statistics, pruned)."""
    import warnings

    torch.manual_seed(seed)
    base = _network(arch).eval()
    for m in base.modules():  # each domain's statistics from its own batches alone
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    with warnings.catch_warnings():  # frozen layers are in the table, not on stderr
        warnings.simplefilter("ignore", UserWarning)
        model = fastmdl.convert(base, domains, [10] * domains, input_size=(3, size, size))
    if model.mask_groups():
        set_masks(model, keep, 0.0, seed)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4 * domains, 3, size, size), torch.arange(4 * domains) % domains)
    model.eval()
    return base, model, fastmdl.prune(model)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--domains", type=int, default=3)
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--arch", nargs="+", default=list(ARCHS) + list(FAMILIES),
                    choices=ARCHS + FAMILIES)
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    args = ap.parse_args(argv)
    stamp = datetime.date.today().isoformat()
    lines = [f"zoo at {args.size}x{args.size}, batch {args.n}, D={args.domains}, keep "
             f"{args.keep} of every group per domain; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {stamp}", "",
             "| network | conv weights frozen | conv weights removed: union | ... per domain "
             "| dense ms | dense CL ms | (e) per-domain ms | (e) CL ms | compact ms | union ms | "
             "compact vs dense | compact vs (e) | union islands | packed / union weights |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = []
    for arch in args.arch:
        base, model, pruned = build(arch, args.size, args.domains, args.keep)
        g = torch.Generator().manual_seed(7)
        x = torch.randn(args.n, 3, args.size, args.size, generator=g)
        domain = torch.arange(args.n) % args.domains
        with torch.no_grad():
            want = model(x, domain)
        nets = per_domain_networks(model)
        live = [(d, (domain == d).nonzero().squeeze(1)) for d in range(args.domains)]
        live = [(d, r) for d, r in live if r.numel()]
        with torch.no_grad():
            for d, r in live:
                check_same_function(nets[d](x[r]), want[r], f"{arch} (e) domain {d}")
        union = fastmdl.prune(model)
        union.layout = "union"
        with torch.no_grad():
            for p in (pruned, union):
                check_same_function(p(x, domain), want, f"{arch} {p.layout}")
        # The baselines in both memory formats: oneDNN runs channels-last convolutions
        # faster, and a user who cares about speed converts the network to it.
        x_cl = x.contiguous(memory_format=torch.channels_last)
        base_cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
        nets_cl = [copy.deepcopy(n).to(memory_format=torch.channels_last) for n in nets]
        with torch.no_grad():
            check_same_function(base_cl(x_cl), base(x), f"{arch} dense, channels-last")
            for d, r in live:
                check_same_function(nets_cl[d](x_cl[r]), want[r], f"{arch} (e) CL domain {d}")
        fns = {"dense": lambda: base(x),
               "dense_cl": lambda: base_cl(x_cl),
               "e": lambda: [nets[d](x.index_select(0, r)) for d, r in live],
               "e_cl": lambda: [nets_cl[d](x_cl.index_select(0, r)) for d, r in live],
               "compact": lambda: pruned(x, domain),
               "union": lambda: union(x, domain)}
        t = interleaved_medians(fns, repeats=args.repeats)
        dense_best, e_best = min(t["dense"], t["dense_cl"]), min(t["e"], t["e_cl"])
        plan = pruned.compact_plan()
        dense_w = dense_conv_weights(base, model)
        removed = 1 - conv_weights(pruned.net) / dense_w
        per_domain = 1 - sum(conv_weights(n) for n in nets) / len(nets) / dense_w
        held = model.frozen_layers()["held"]
        lines.append(f"| {arch} | {100 * held:.0f}% | {100 * removed:.0f}% | "
                     f"{100 * per_domain:.0f}% | {t['dense'] * 1e3:.1f} | "
                     f"{t['dense_cl'] * 1e3:.1f} | {t['e'] * 1e3:.1f} | {t['e_cl'] * 1e3:.1f} | "
                     f"{t['compact'] * 1e3:.1f} | {t['union'] * 1e3:.1f} | "
                     f"{dense_best / t['compact']:.2f}x | {e_best / t['compact']:.2f}x | "
                     f"{len(plan.islands)} | {plan.packed_bytes / plan.union_bytes:.2f}x |")
        print(lines[-1], flush=True)
        rows.append({"arch": arch, "seconds": t, "islands": plan.islands, "frozen_held": held,
                     "conv_removed_union": removed, "conv_removed_per_domain": per_domain,
                     "packed_bytes": plan.packed_bytes, "union_bytes": plan.union_bytes})
    text = "\n".join(lines)
    print(text)
    write_report(args.out, "zoo_speed", text, {"args": vars(args), "date": stamp, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
