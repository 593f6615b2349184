"""The budget-aware pruning experiment on the built-in benchmark (``fastmdl experiment``):

- per domain, a fine-tuned single-domain baseline (the whole backbone trained on
  that domain): its test accuracy; D of them cost D times one network;
- the multi-domain model at budget 1.0;
- pruned multi-domain models at budgets 0.75, 0.5 and 0.25, with no sharing loss
  and with each of intersection, union and Jaccard.

For every row: test accuracy per domain, mean accuracy, decathlon score (against
the baselines), params and FLOPs of the deployed network relative to ONE
baseline, and each domain's own FLOPs. Writes experiment.md, experiment.json and
experiment.png (budget against accuracy and FLOPs).
"""

from __future__ import annotations

import datetime
import itertools
import os
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ._io import write_report
from ._plot import pyplot, save_png

from .budget import SHARING


def run(out_dir: str = "fastmdl-experiment", *, budgets: Sequence[float] = (0.75, 0.5, 0.25),
        sharing: Sequence[Optional[str]] = SHARING, epochs: int = 2, max_train: int = 1000,
        max_eval: int = 600,
        size: int = 32, width: float = 0.25, batch_size: int = 32, seed: int = 0,
        progress: bool = True, log=print, pretrain: Optional[Dict] = None,
        fill: bool = True, backbone_seed: Optional[int] = None,
        data_seed: Optional[int] = None) -> Dict:
    """Run the experiment and write its report under ``out_dir``. ``pretrain``
    overrides :func:`fastmdl.pretrained.pretrained_backbone`'s settings.

    ``seed`` draws the heads, masks and batch order of every row; the pretrained
    backbone and the data splits use ``backbone_seed`` and ``data_seed`` (default:
    ``seed``). Holding those two fixed while ``seed`` varies measures the noise of
    training alone, on the same test images (``benchmarks/experiment_seeds.py``)."""
    from . import convert, cost_report, evaluate, prune, train
    from .data import builtin_benchmark
    from .pretrained import pretrained_backbone

    backbone_seed = seed if backbone_seed is None else backbone_seed
    data_seed = seed if data_seed is None else data_seed
    started = time.perf_counter()
    backbone, info = pretrained_backbone(size=size, width=width, progress=progress,
                                         seed=backbone_seed, **(pretrain or {}))
    data = builtin_benchmark(size, seed=data_seed, max_train=max_train, max_eval=max_eval)
    test = data.loaders("test", 256)
    rows: List[Dict] = []

    log("single-domain baselines")
    base_acc = []
    train_loaders = data.loaders("train", batch_size, seed=seed)
    # Every baseline takes as many steps as the multi-domain training does (the
    # longest domain's batches per epoch): a small domain cycled through its
    # loader as often as `train` cycles it, not starved of steps.
    steps = epochs * max(len(loader) for loader in train_loaders)
    for i, d in enumerate(data.domains):
        torch.manual_seed(seed)
        net = convert(backbone, 1, [d.num_classes], input_size=(1, size, size))
        _finetune(net, train_loaders[i], steps)
        base_acc.append(evaluate(net, [test[i]])[0])
    one = cost_report(convert(backbone, len(data.domains), data.num_classes,
                              input_size=(1, size, size)))
    rows.append({"name": f"{len(data.domains)} fine-tuned baselines", "budget": None,
                 "sharing": None, "accuracy": base_acc, "params_vs_one": float(len(data.domains)),
                 "flops_vs_one": float(len(data.domains)), "domain_flops": [1.0] * len(base_acc)})
    base_err = [1 - a for a in base_acc]

    configs = [(1.0, None)] + [(b, s) for b in budgets for s in sharing]
    for budget, share in configs:
        name = f"budget {budget}" + (f", {share}" if share else "")
        log(name)
        torch.manual_seed(seed)
        model = convert(backbone, len(data.domains), data.num_classes, input_size=(1, size, size))
        train(model, data.loaders("train", batch_size, seed=seed), None, budget=budget,
              epochs=epochs, sharing=share, train_weights=True, progress=progress, log=None,
              fill=fill)
        pruned = prune(model)
        rows.append({"name": name, "budget": budget, "sharing": share,
                     **pruned_row(pruned, evaluate(pruned, test))})
    score_rows(rows, base_err)
    result = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "domains": data.names, "epochs": epochs, "max_train": max_train, "size": size,
              "fill": fill, "seed": seed, "backbone_seed": backbone_seed,
              "data_seed": data_seed, "threads": torch.get_num_threads(),
              "backbone": {k: v for k, v in info.items() if k != "cache"},
              "baseline_cost": one.baseline, "rows": rows,
              "seconds": time.perf_counter() - started}
    text = table(result)
    log(text)
    write_report(out_dir, "experiment", text, result)
    _plot(result, os.path.join(out_dir, "experiment.png"))
    log(f"written to {os.path.abspath(out_dir)}")
    return result


def _finetune(model, loader, steps: int) -> None:
    """Train every weight of a one-domain model (no budget) for ``steps`` batches,
    cycling through ``loader``: the baseline."""
    params = [p for n, p in model.named_parameters() if not n.endswith("scores")]
    opt = torch.optim.Adam(params, lr=1e-3)
    model.train()
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for x, y in itertools.islice(batches, steps):
        loss = F.cross_entropy(model(x, 0), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def pruned_row(pruned, accuracy: List[float]) -> Dict:
    """A pruned network's row: its per-domain ``accuracy``, params and FLOPs of the
    union against one single-domain network, and each domain's FLOPs against it."""
    from . import cost_report

    rep = cost_report(pruned)
    return {"accuracy": accuracy,
            "params_vs_one": rep.union["params"] / rep.baseline["params"],
            "flops_vs_one": rep.union["flops"] / rep.baseline["flops"],
            "domain_flops": [r["flops"] / r["baseline_flops"] for r in rep.domains]}


def score_rows(rows: List[Dict], reference_error: List[float]) -> None:
    """Add each row's mean accuracy and decathlon score against ``reference_error``
    (per domain; Emax = 2x it), in place."""
    from .metrics import decathlon_score

    for r in rows:
        r["mean_accuracy"] = sum(r["accuracy"]) / len(r["accuracy"])
        r["decathlon"] = decathlon_score([1 - a for a in r["accuracy"]], reference_error)


def table(result: Dict) -> str:
    """The experiment's rows as a markdown table (a row with ``over_budget`` true is
    marked so)."""
    names = result["domains"]
    head = ("| model | " + " | ".join(f"{n} %" for n in names) + " | mean % | decathlon | "
            "params vs one | FLOPs vs one | each domain's FLOPs vs one |")
    rows = [head, "|---|" + "---:|" * (len(names) + 5)]
    for r in result["rows"]:
        accs = " | ".join(f"{100 * a:.1f}" for a in r["accuracy"])
        own = " ".join(f"{100 * f:.0f}%" for f in r["domain_flops"])
        mark = " (over budget)" if r.get("over_budget") else ""
        rows.append(f"| {r['name']}{mark} | {accs} | {100 * r['mean_accuracy']:.1f} | "
                    f"{r['decathlon']:.0f} | {r['params_vs_one']:.2f} | {r['flops_vs_one']:.2f} | "
                    f"{own} |")
    return "\n".join(rows)


def _plot(result: Dict, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for share in SHARING:
        pts = sorted((r["budget"], r) for r in result["rows"]
                     if r["budget"] is not None and (r["sharing"] == share or r["budget"] == 1.0))
        if not any(budget < 1.0 for budget, _ in pts):
            continue  # this sharing loss was not run: a lone budget-1.0 point says nothing
        b = [p[0] for p in pts]
        a1.plot(b, [100 * p[1]["mean_accuracy"] for p in pts], "o-", label=share or "no sharing")
        a2.plot(b, [100 * p[1]["flops_vs_one"] for p in pts], "o-", label=share or "no sharing")
    base = result["rows"][0]["mean_accuracy"]
    a1.axhline(100 * base, color="grey", ls="--", lw=0.8, label="fine-tuned baselines")
    a2.axhline(100, color="grey", ls="--", lw=0.8, label="one baseline")
    a1.set_xlabel("budget")
    a1.set_ylabel("mean test accuracy %")
    a2.set_xlabel("budget")
    a2.set_ylabel("deployed network FLOPs, % of one baseline")
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    fig.tight_layout()
    save_png(fig, path, dpi=120)
