"""``fastmdl demo``: the whole method on the built-in benchmark, in minutes on a CPU.

1. pretrain (or reuse the cached) ResNet-26 on Fashion-MNIST;
2. convert it for the four built-in domains and train masks at budget 0.5;
3. prune to one physically smaller network;
4. serve one mixed-domain batch of held-out images through it (the fused op),
   against a per-domain loop on the same model;
5. print one table and write report.md, report.json and report.png, and hand
   the network over: pruned.fmdl (:func:`fastmdl.save`), request.json (one
   held-out image as the HTTP server takes it) and the commands that serve and
   query it.

With the same ``seed`` the table is the same run after run on one machine (same
torch, same thread count), whether the backbone was trained by this run or read
from the cache.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shlex
import time
from typing import Dict, Optional, Tuple

import torch

from ._io import write_atomic_bytes, write_report
from ._plot import legend_below, pyplot, save_png

MODEL_FILE, REQUEST_FILE = "pruned.fmdl", "request.json"
SERVE_PORT = 8000


def run(out_dir: str = "fastmdl-demo", *, budget: float = 0.5, epochs: int = 3,
        max_train: int = 1500, max_eval: int = 600, size: int = 32, width: float = 0.25,
        batch_size: int = 32,
        progress: bool = True, seed: int = 0, log=print,
        pretrain: Optional[Dict] = None) -> Dict:
    """Run the demo and write its report under ``out_dir``; returns the report dict.
    ``pretrain`` overrides :func:`fastmdl.pretrained.pretrained_backbone`'s settings.

    Every random draw comes from ``seed`` (a non-negative int): the backbone's
    initialisation and data order, the benchmark's splits, each domain's training
    order, the heads' initialisation and the served batch. Torch's deterministic
    algorithms are on for the run (warn-only: an op without a deterministic
    version warns rather than stops the demo) and the caller's setting is
    restored after. Raises ``ValueError`` naming the argument for a bad
    ``out_dir``, ``seed`` or ``max_eval``."""
    _check_args(out_dir, seed, max_eval)
    started = time.perf_counter()
    with _deterministic():
        backbone, info, data = _backbone_and_data(size, width, max_train, max_eval, progress,
                                                  seed, log, pretrain)
        pruned, history = _train_and_prune(backbone, data, budget, epochs, size, batch_size,
                                           progress, seed, log)
        measured, batch = _measure(pruned, data, max_eval, seed, log)
        log("[5/5] report")
        handover = _hand_over(pruned, data, batch, out_dir)
    result = {
        "date": datetime.date.today().isoformat(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "seed": seed, "budget": budget, "epochs": epochs,
        "backbone": {k: v for k, v in info.items() if k != "cache"},
        **measured, "history": history, "handover": handover,
        "seconds": time.perf_counter() - started,
    }
    text = _table(result)
    log(text)
    write_report(out_dir, "report", text + "\n\n" + _instructions(handover), result)
    png = _plot(result, os.path.join(out_dir, "report.png"))
    log(f"report written to {os.path.abspath(out_dir)}: report.md, report.json"
        + (", report.png" if png else " (no plot: matplotlib is not installed)")
        + f", {MODEL_FILE}, {REQUEST_FILE}")
    log(_instructions(handover))  # last: what to type next
    return result


def _check_args(out_dir, seed, max_eval) -> None:
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
        raise ValueError(f"out_dir must be a non-empty path, got {out_dir!r}")
    # bool is an int to Python, but seed=True is a mistake, not seed 1.
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if isinstance(max_eval, bool) or not isinstance(max_eval, int) or max_eval < 1:
        raise ValueError(f"max_eval must be a positive int (the held-out images served), "
                         f"got {max_eval!r}")


@contextlib.contextmanager
def _deterministic():
    """Torch's deterministic algorithms on (warn-only) inside the block, the
    caller's setting back after it: the flag is process-wide."""
    was = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def _backbone_and_data(size, width, max_train, max_eval, progress, seed, log, pretrain):
    from .data import builtin_benchmark
    from .pretrained import pretrained_backbone

    log("[1/5] backbone: ResNet-26 pretrained on Fashion-MNIST (cached after the first run)")
    backbone, info = pretrained_backbone(size=size, width=width, progress=progress, seed=seed,
                                         **(pretrain or {}))
    log(f"      {'reused ' + info['cache'] if info['reused'] else 'trained'}: "
        f"Fashion-MNIST val accuracy {100 * info['val_accuracy']:.1f}%")
    data = builtin_benchmark(size, seed=seed, max_train=max_train, max_eval=max_eval)
    return backbone, info, data


def _train_and_prune(backbone, data, budget, epochs, size, batch_size, progress, seed, log):
    from . import convert, prune, train

    log("[2/5] masks at budget %.2f for %d domains:\n%s"
        % (budget, len(data.domains), data.table()))
    # Seeded again: training a backbone draws from the global generator and
    # reading it from the cache does not, and the heads' initialisation (and
    # everything after) must not depend on which of the two happened.
    torch.manual_seed(seed)
    model = convert(backbone, len(data.domains), data.num_classes, input_size=(1, size, size))
    # Each domain's training order comes from its own generator, seeded from `seed`;
    # val and test loaders do not shuffle, and no loader has worker processes.
    history = train(model, data.loaders("train", batch_size, seed=seed),
                    data.loaders("val", 256), budget=budget, epochs=epochs, train_weights=True,
                    progress=progress, log=lambda s: log("      " + s))
    log("[3/5] pruning")
    return prune(model), history


def _measure(pruned, data, max_eval, seed, log) -> Tuple[Dict, Tuple]:
    """The per-domain table (test accuracy, costs) and the serving speed, and the
    served batch (images, domains, labels), from which the handover's request comes."""
    from . import cost_report, evaluate

    report = cost_report(pruned)
    acc = evaluate(pruned, data.loaders("test", 256))
    log("[4/5] serving one mixed batch of held-out images")
    batch = _mixed_batch(data, min(64, max_eval), seed)
    result = {
        "domains": [{"name": d.name, "classes": d.num_classes, "test_accuracy": a,
                     "params": r["params"], "flops": r["flops"],
                     "params_vs_baseline": r["params"] / r["baseline_params"],
                     "flops_vs_baseline": r["flops"] / r["baseline_flops"]}
                    for d, a, r in zip(data.domains, acc, report.domains)],
        "union": {"params_vs_baseline": report.union["params"] / report.baseline["params"],
                  "flops_vs_baseline": report.union["flops"] / report.baseline["flops"],
                  **report.union},
        "baseline": report.baseline, "serving": _serve(pruned, batch[0], batch[1]),
    }
    return result, batch


def _hand_over(pruned, data, batch, out_dir: str) -> Dict:
    """Save ``pruned`` as ``out_dir``/pruned.fmdl and one image of ``batch`` as
    ``out_dir``/request.json, the JSON body ``POST /v1/predict`` takes; returns
    their absolute paths, the image's domain and label, and the class the saved
    model gives it (what the server answers)."""
    from . import load, save

    os.makedirs(out_dir, exist_ok=True)
    model_path = os.path.abspath(os.path.join(out_dir, MODEL_FILE))
    request_path = os.path.abspath(os.path.join(out_dir, REQUEST_FILE))
    save(pruned, model_path)
    x, d, label = _request_image(pruned, *batch)
    # The class from the file read back, as `fastmdl serve` reads it: the same
    # weights, but possibly another layout, whose rounding could split a near tie.
    predicted = _predict_class(load(model_path), x, d)
    # One line, no newline: curl -d @file strips newlines, so none may matter.
    body = json.dumps({"domain": d, "image": x.tolist()}, allow_nan=False)
    write_atomic_bytes(request_path, body.encode())
    domain = data.domains[d]
    return {"model": model_path, "request": request_path, "domain": d,
            "domain_name": domain.name, "label": label, "label_name": domain.classes[label],
            "class": predicted, "class_name": domain.classes[predicted]}


def _predict_class(model, image: torch.Tensor, domain: int) -> int:
    """The class ``model`` gives one ``image`` of shape (C, H, W) of ``domain``, as
    the HTTP server computes it: the argmax over that domain's own logits."""
    with torch.inference_mode():
        logits = model(image[None], domain)[0, :model.num_classes[domain]]
    return int(logits.argmax())


def _request_image(pruned, images, domains, labels):
    """(image, domain, label) for the request: the first image of the served batch
    the pruned model gets right (a request whose answer can be checked by eye),
    else the first."""
    with torch.inference_mode():
        logits = pruned(images, domains)
    for i in range(len(domains)):
        d = int(domains[i])
        if int(logits[i, :pruned.num_classes[d]].argmax()) == int(labels[i]):
            break
    else:
        i = 0
    return images[i], int(domains[i]), int(labels[i])


def _instructions(h: Dict) -> str:
    """How to serve the saved model and what asking it about request.json answers."""
    request = shlex.quote("@" + h["request"])
    return "\n".join([
        "serve the pruned network over HTTP (needs aiohttp, which scripts/bootstrap.sh "
        "installs; elsewhere pip install aiohttp):",
        f"  fastmdl serve {shlex.quote(h['model'])} --port {SERVE_PORT}",
        f"then, from another shell, classify one held-out {h['domain_name']} image "
        f"(domain {h['domain']}, true label {h['label_name']!r}):",
        f"  curl -s localhost:{SERVE_PORT}/v1/predict -H 'Content-Type: application/json' "
        f"-d {request}",
        f"the answer should say \"class\": {h['class']} ({h['domain_name']} class "
        f"{h['class_name']!r})"])


def _mixed_batch(data, per_domain: int, seed: int):
    """(images, domains, labels): up to ``per_domain`` held-out test images of each
    domain, drawn and shuffled together with a generator seeded from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    xs, ys, ds = [], [], []
    for i, d in enumerate(data.domains):
        x, y = d.test.tensors
        pick = torch.randperm(len(x), generator=g)[:per_domain]
        xs.append(x[pick])
        ys.append(y[pick])
        ds.append(torch.full((len(pick),), i, dtype=torch.int64))
    x, y, dom = torch.cat(xs), torch.cat(ys), torch.cat(ds)
    order = torch.randperm(len(dom), generator=g)
    return x[order], dom[order], y[order]


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
        f"fastmdl demo, {r['date']}: budget {r['budget']}, seed {r['seed']}, "
        f"torch {r['torch']}, "
        f"{r['threads']} threads; baseline = one single-domain ResNet-26 "
        f"({r['baseline']['params'] / 1e3:.0f}k params, {r['baseline']['flops'] / 1e6:.1f}M FLOPs)",
        "", *rows, "",
        f"serving a mixed batch of {s['images']} held-out images: "
        f"{s['mixed_images_per_s']:.0f} images/s in one pass through the fused op vs "
        f"{s['loop_images_per_s']:.0f} images/s for a per-domain loop ({s['speedup']:.2f}x); "
        f"total {r['seconds'] / 60:.1f} min"])


def _plot(r: Dict, path: str) -> Optional[str]:
    """Draw :func:`_figure` of the report ``r`` to ``path`` (PNG); returns
    ``path``, or None when matplotlib is missing."""
    fig = _figure(r)
    if fig is None:
        return None
    save_png(fig, path, dpi=120)
    return path


def _figure(r: Dict):
    """The report as a figure (None without matplotlib): per-domain accuracy and
    cost against one baseline on the left, serving speed on the right, one
    legend under both."""
    plt = pyplot()
    if plt is None:
        return None
    fig, (ax, speed) = plt.subplots(1, 2, figsize=(10, 4.2),
                                    gridspec_kw={"width_ratios": [3.2, 1]})
    _cost_panel(ax, r)
    _speed_panel(speed, r["serving"])
    fig.tight_layout()
    legend_below(fig, ncol=3)
    return fig


def _cost_panel(ax, r: Dict) -> None:
    """Bars per domain (test accuracy, FLOPs, params; the union network: costs
    only), with the budget, the one-baseline 100% line and chance accuracy."""
    domains, w = r["domains"], 0.27
    n = len(domains)
    names = [d["name"] for d in domains] + ["union"]
    flops = ([100 * d["flops_vs_baseline"] for d in domains]
             + [100 * r["union"]["flops_vs_baseline"]])
    params = ([100 * d["params_vs_baseline"] for d in domains]
              + [100 * r["union"]["params_vs_baseline"]])
    acc = [100 * d["test_accuracy"] for d in domains]
    ax.bar([i - w for i in range(n)], acc, w, label="test accuracy %")
    ax.bar(range(n + 1), flops, w, label="FLOPs % of one baseline")
    ax.bar([i + w for i in range(n + 1)], params, w, label="params % of one baseline")
    # Chance accuracy (one over the classes) as a tick across each accuracy bar:
    # the reference the demo has for free (a trained single-domain baseline's
    # accuracy is what `fastmdl experiment` measures, in many more minutes).
    ax.hlines([100 / d["classes"] for d in domains], [i - 1.5 * w for i in range(n)],
              [i - 0.5 * w for i in range(n)], colors="black", lw=1.6,
              label="chance accuracy (1 / classes)")
    ax.axhline(100 * r["budget"], color="tab:red", lw=1.2, ls=":",
               label=f"budget: {100 * r['budget']:.0f}% of one baseline's FLOPs per domain")
    ax.axhline(100, color="grey", lw=1, ls="--",
               label="100% = one baseline (a single-domain ResNet-26)")
    top = max([100.0] + acc + flops + params)
    ax.set_ylim(0, top * 1.08)
    ax.set_xticks(range(n + 1))
    ax.set_xticklabels(names)
    ax.set_ylabel("% (accuracy; cost vs one baseline)")
    ax.set_title(f"fastmdl demo: budget {r['budget']}, seed {r['seed']}")


def _speed_panel(ax, s: Dict) -> None:
    """Images per second for one mixed batch through the fused op, against a
    loop over the domains on the same model."""
    rates = [s["mixed_images_per_s"], s["loop_images_per_s"]]
    bars = ax.bar([0, 1], rates, 0.6, color=["tab:purple", "tab:grey"])
    ax.set_xticks([0, 1])
    ax.set_xticklabels(["mixed batch\n(fused op)", "per-domain\nloop"])
    ax.bar_label(bars, [f"{v:.0f}" for v in rates], fontsize=8)
    ax.set_ylim(0, max(rates) * 1.2)
    ax.set_ylabel("images / s")
    ax.set_title(f"serving {s['images']} mixed images: {s['speedup']:.2f}x", fontsize=10)
