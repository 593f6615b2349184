"""``fastmdl demo``: the whole method on the built-in benchmark, in minutes on a CPU.

1. pretrain (or reuse the cached) ResNet-26 on Fashion-MNIST;
2. convert it for the four built-in domains and train masks at budget 0.5;
3. prune to one physically smaller network;
4. serve one mixed-domain batch of held-out images through it (the fused op),
   against a per-domain loop on the same model;
5. print one table and write report.md, report.json and report.png.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Dict, Optional

import torch

from ._io import write_report
from ._plot import pyplot, save_png


def run(out_dir: str = "fastmdl-demo", *, budget: float = 0.5, epochs: int = 3,
        max_train: int = 1500, max_eval: int = 600, size: int = 32, width: float = 0.25,
        batch_size: int = 32,
        progress: bool = True, seed: int = 0, log=print,
        pretrain: Optional[Dict] = None) -> Dict:
    """Run the demo and write its report under ``out_dir``; returns the report dict.
    ``pretrain`` overrides :func:`fastmdl.pretrained.pretrained_backbone`'s settings."""
    from . import convert, cost_report, evaluate, prune, train
    from .data import builtin_benchmark
    from .pretrained import pretrained_backbone

    started = time.perf_counter()
    torch.manual_seed(seed)
    log("[1/5] backbone: ResNet-26 pretrained on Fashion-MNIST (cached after the first run)")
    backbone, info = pretrained_backbone(size=size, width=width, progress=progress, seed=seed,
                                         **(pretrain or {}))
    log(f"      {'reused ' + info['cache'] if info['reused'] else 'trained'}: "
        f"Fashion-MNIST val accuracy {100 * info['val_accuracy']:.1f}%")
    data = builtin_benchmark(size, seed=seed, max_train=max_train, max_eval=max_eval)
    log("[2/5] masks at budget %.2f for %d domains:\n%s"
        % (budget, len(data.domains), data.table()))
    model = convert(backbone, len(data.domains), data.num_classes, input_size=(1, size, size))
    history = train(model, data.loaders("train", batch_size, seed=seed),
                    data.loaders("val", 256), budget=budget, epochs=epochs, train_weights=True,
                    progress=progress, log=lambda s: log("      " + s))
    log("[3/5] pruning")
    pruned = prune(model)
    report = cost_report(pruned)
    test = data.loaders("test", 256)
    acc = evaluate(pruned, test)
    log("[4/5] serving one mixed batch of held-out images")
    images, domains = _mixed_batch(data, min(64, max_eval), seed)
    speed = _serve(pruned, images, domains)
    log("[5/5] report")
    result = {
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "budget": budget, "epochs": epochs,
        "backbone": {k: v for k, v in info.items() if k != "cache"},
        "domains": [{"name": d.name, "classes": d.num_classes, "test_accuracy": a,
                     "params": r["params"], "flops": r["flops"],
                     "params_vs_baseline": r["params"] / r["baseline_params"],
                     "flops_vs_baseline": r["flops"] / r["baseline_flops"]}
                    for d, a, r in zip(data.domains, acc, report.domains)],
        "union": {"params_vs_baseline": report.union["params"] / report.baseline["params"],
                  "flops_vs_baseline": report.union["flops"] / report.baseline["flops"],
                  **report.union},
        "baseline": report.baseline, "serving": speed, "history": history,
        "seconds": time.perf_counter() - started,
    }
    text = _table(result)
    log(text)
    write_report(out_dir, "report", text, result)
    png = _plot(result, os.path.join(out_dir, "report.png"))
    log(f"report written to {os.path.abspath(out_dir)}: report.md, report.json"
        + (", report.png" if png else " (no plot: matplotlib is not installed)"))
    return result


def _mixed_batch(data, per_domain: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    xs, ds = [], []
    for i, d in enumerate(data.domains):
        x = d.test.tensors[0]
        xs.append(x[torch.randperm(len(x), generator=g)[:per_domain]])
        ds.append(torch.full((len(xs[-1]),), i, dtype=torch.int64))
    x, dom = torch.cat(xs), torch.cat(ds)
    order = torch.randperm(len(dom), generator=g)
    return x[order], dom[order]


def _median_time(fn, repeats: int = 7) -> float:
    with torch.inference_mode():
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _serve(pruned, images, domains) -> Dict:
    def mixed():
        return pruned(images, domains)

    def loop():
        out = torch.empty(len(domains), max(pruned.num_classes))
        for d in domains.unique().tolist():
            rows = (domains == d).nonzero().squeeze(1)
            out[rows] = pruned(images[rows], d)
        return out

    with torch.inference_mode():
        torch.testing.assert_close(mixed(), loop(), rtol=1e-4, atol=1e-4)
    t_mixed, t_loop = _median_time(mixed), _median_time(loop)
    n = len(domains)
    return {"images": n, "mixed_images_per_s": n / t_mixed, "loop_images_per_s": n / t_loop,
            "speedup": t_loop / t_mixed}


def _table(r: Dict) -> str:
    rows = ["| domain | classes | test accuracy % | params % of baseline | FLOPs % of baseline |",
            "|---|---:|---:|---:|---:|"]
    for d in r["domains"]:
        rows.append(f"| {d['name']} | {d['classes']} | {100 * d['test_accuracy']:.1f} | "
                    f"{100 * d['params_vs_baseline']:.1f} | {100 * d['flops_vs_baseline']:.1f} |")
    mean = sum(d["test_accuracy"] for d in r["domains"]) / len(r["domains"])
    u = r["union"]
    rows.append(f"| **pruned network (all domains)** | | mean {100 * mean:.1f} | "
                f"{100 * u['params_vs_baseline']:.1f} | {100 * u['flops_vs_baseline']:.1f} |")
    s = r["serving"]
    return "\n".join([
        f"fastmdl demo, {r['date']}: budget {r['budget']}, torch {r['torch']}, "
        f"{r['threads']} threads; baseline = one single-domain ResNet-26 "
        f"({r['baseline']['params'] / 1e3:.0f}k params, {r['baseline']['flops'] / 1e6:.1f}M FLOPs)",
        "", *rows, "",
        f"serving a mixed batch of {s['images']} held-out images: "
        f"{s['mixed_images_per_s']:.0f} images/s in one pass through the fused op vs "
        f"{s['loop_images_per_s']:.0f} images/s for a per-domain loop ({s['speedup']:.2f}x); "
        f"total {r['seconds'] / 60:.1f} min"])


def _plot(r: Dict, path: str) -> Optional[str]:
    plt = pyplot()
    if plt is None:
        return None
    names = [d["name"] for d in r["domains"]] + ["union"]
    acc = [100 * d["test_accuracy"] for d in r["domains"]] + [0]
    flops = ([100 * d["flops_vs_baseline"] for d in r["domains"]]
             + [100 * r["union"]["flops_vs_baseline"]])
    params = ([100 * d["params_vs_baseline"] for d in r["domains"]]
              + [100 * r["union"]["params_vs_baseline"]])
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(names))
    ax.bar([i - 0.27 for i in x], acc, 0.27, label="test accuracy %")
    ax.bar(list(x), flops, 0.27, label="FLOPs % of one baseline")
    ax.bar([i + 0.27 for i in x], params, 0.27, label="params % of one baseline")
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(x))
    ax.set_xticklabels(names)
    ax.set_title(f"fastmdl demo: budget {r['budget']}")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    save_png(fig, path, dpi=120)
    return path
