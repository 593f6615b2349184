"""Basis scaling and double pruning on target domains (Wong et al., arXiv 2108.02893).

    python benchmarks/basis_experiment.py --smoke            # random tensors, seconds
    python benchmarks/basis_experiment.py [--epochs 3] [--ratios 0.5,0.7,0.8,0.9]
                                          [--budget 0.5] [--scope global] [--out benchmarks/out]

For the target domains together (one multi-domain model; each domain has its own
factors, BatchNorm and head, so the domains only share the frozen backbone):

  basis     transfer with basis scaling only (decompose, train factors + BatchNorm +
            a new head; no weight of the backbone changes), then basis pruning at
            each ratio (Taylor importance on the training data, no fine-tuning of
            individual weights; ``--retrain-epochs`` retrains factors/BN/heads only)
  filters   filter masks learned by ``fastmdl.train`` at ``--budget`` (weights frozen)
  double    those filter masks, then the basis rows above on the masked model

Each row: accuracy per domain, its drop against the unpruned basis transfer of the
same method, and params/FLOPs per domain and of the union network as a percentage
of ONE backbone (the single-domain network). Accuracy is given on the validation
split and on the held-out test split: the recipe's settings were chosen on the
first, so the second is the one to quote. Writes basis_experiment.md and .json.
The full run uses ``fastmdl.pretrained.pretrained_backbone`` and the built-in
benchmark's domains other than the backbone's source (Fashion-MNIST). Also writes
basis_experiment.png (accuracy against params, see :func:`plot`).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from contenders import write_atomic  # noqa: E402

import fastmdl  # noqa: E402
from fastmdl import basis  # noqa: E402
from fastmdl._checks import count  # noqa: E402
from fastmdl._plot import pyplot, save_png  # noqa: E402
from fastmdl.pretrained import _bar  # noqa: E402
from fastmdl.train import mixed_batches, recalibrate_bn  # noqa: E402

# (name, num_classes, train_loader, val_loader[, test_loader])
DomainSpec = Tuple[str, int, Sequence, Sequence]
Scores = Dict[str, List[float]]  # split ("val", "test") -> per-domain accuracy
# What distillation distils from (see run's docstring).
TEACHERS = ("transfer", "reference")
# Issue 8's target: a row keeps at most this % of the backbone's params in every
# domain, and loses less than this many points of accuracy.
TARGET_PARAMS_PCT = 30.0
TARGET_DROP = 1.0


def run(backbone: nn.Module, domains: Sequence[DomainSpec], *, epochs: int,
        ratios: Sequence[float] = (0.5, 0.7, 0.8, 0.9), budget: Optional[float] = 0.5,
        scope: str = "global", lr: float = 1e-2, retrain_epochs: int = 0,
        taylor_batches: Optional[int] = None, input_size=None, seed: int = 0,
        weight: str = "components", l1: float = 0.0, gradual: bool = False,
        recalibrate: int = 0, basis_rows: bool = True, schedule: str = "constant",
        distill: float = 0.0, teacher: str = "transfer",
        last_retrain_epochs: Optional[int] = None, log=print, progress: bool = True) -> Dict:
    """Run the experiment (see the module docstring) and return
    ``{"settings", "domains", "rows"}``; each row is a dict (see :func:`_row`).
    ``budget=None`` leaves out the filter-pruning and double-pruning rows,
    ``basis_rows=False`` the basis-only ones.

    The pruning recipe: ``weight`` is :func:`fastmdl.basis.prune`'s; ``l1`` weighs
    :func:`fastmdl.basis.factor_l1` in the transfer loss;
    ``gradual`` reaches the ratios one after the other (Taylor scores recomputed,
    retrained in between) instead of each from the unpruned model; ``recalibrate``
    recomputes the BatchNorm statistics over that many batches per domain after
    each pruning (and retraining); ``schedule`` is :func:`fit`'s learning-rate
    schedule; ``distill`` > 0 retrains each pruned network towards the unpruned
    transfer's outputs too (:func:`distill_loss`, that weight); ``teacher`` says
    which unpruned network: "transfer" (the one just pruned, ``epochs`` of
    training) or "reference" (the reference row's network below, trained as long
    as the deepest pruned row). ``last_retrain_epochs`` retrains the deepest cut
    (the largest ratio) that many epochs instead of ``retrain_epochs``; default the
    same. No individual weight is trained in any case. ``progress`` shows a bar
    for each training call (a full run takes hours on a CPU).
    With L1 or retraining, each method first gets a "(reference)" row: the unpruned
    transfer without L1, trained as many epochs as its deepest pruned row, which
    that method's drops are taken against."""
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
    retrain_epochs = count(retrain_epochs, "retrain_epochs")
    last = (retrain_epochs if last_retrain_epochs is None
            else count(last_retrain_epochs, "last_retrain_epochs"))
    if not ratios:
        raise ValueError("ratios must name at least one basis ratio, got none")
    names = [d[0] for d in domains]
    classes = [int(d[1]) for d in domains]
    train = [d[2] for d in domains]
    val = _scorer(domains)
    if input_size is None:
        input_size = tuple(next(iter(train[0]))[0].shape[1:])
    log = log or (lambda *_: None)
    rows: List[Dict] = []
    start = time.perf_counter()

    recipe = dict(ratios=ratios, scope=scope, lr=lr, retrain_epochs=retrain_epochs,
                  taylor_batches=taylor_batches, weight=weight, l1=l1, gradual=gradual,
                  recalibrate=recalibrate, schedule=schedule, distill=distill,
                  last_retrain_epochs=last, log=log, progress=progress)
    # The deepest pruned row has trained for `matched` epochs in all; its drop is
    # taken against an unpruned transfer (without L1) trained as long, so that extra
    # training cannot pass for pruning that costs nothing.
    matched = epochs + retrain_epochs * (len(ratios) - 1 if gradual else 0) + last
    separate = l1 > 0 or matched > epochs
    if teacher == "reference" and not (distill > 0 and separate):
        raise ValueError("teacher='reference' distils from the reference row's network, so it "
                         "needs distill > 0 and a reference row (retrain_epochs > 0 or l1 > 0)")
    suffix = " + L1" if l1 > 0 else ""

    def reference(method: str, budget_: float, source: nn.Module):
        """(accuracies, network) of the method's reference row, or (None, None)."""
        if not separate:
            return None, None  # the method's own unpruned row is trained as long
        bm = basis.decompose(source)
        fit(bm, train, matched, lr, schedule=schedule,
            desc=f"{method} reference, {_epochs(matched)}" if progress else None)
        acc = val(bm)
        rows.append(_row(f"{method} (reference, {matched} epochs)", budget_, 0.0,
                         basis.cost_report(bm), acc, acc))
        log(_line(rows[-1]))
        return acc, bm.eval()

    def teacher_of(ref_model):
        return ref_model if teacher == "reference" else None

    if basis_rows:
        torch.manual_seed(seed)
        model = _fresh(fastmdl.convert(backbone, len(domains), classes, input_size=input_size))
        ref, ref_model = reference("basis", 1.0, model)
        torch.manual_seed(seed)
        rows += _basis_rows("basis" + suffix, 1.0, model, train, val, epochs, reference=ref,
                            teacher=teacher_of(ref_model), **recipe)
    if budget is not None:
        torch.manual_seed(seed)
        masked = _fresh(fastmdl.convert(backbone, len(domains), classes, input_size=input_size))
        fastmdl.train(masked, train, budget=budget, epochs=epochs, lr=lr, progress=progress,
                      log=None)
        acc = val(masked)
        rows.append(_row("filters", budget, 0.0, fastmdl.cost_report(masked), acc, acc))
        log(_line(rows[-1]))
        ref, ref_model = reference("double", budget, masked)
        torch.manual_seed(seed)
        rows += _basis_rows("double" + suffix, budget, masked, train, val, epochs,
                            reference=ref, teacher=teacher_of(ref_model), **recipe)
    settings = {"epochs": epochs, "ratios": list(ratios), "budget": budget, "scope": scope,
                "lr": lr, "retrain_epochs": retrain_epochs, "last_retrain_epochs": last,
                "taylor_batches": taylor_batches,
                "weight": weight, "l1": l1, "gradual": gradual, "recalibrate": recalibrate,
                "schedule": schedule, "distill": distill, "teacher": teacher,
                "reference_epochs": matched, "basis_rows": basis_rows,
                "input_size": list(input_size), "seed": seed,
                "backbone_params": sum(p.numel() for p in backbone.parameters()),
                "date": datetime.date.today().isoformat(), "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(), "seconds": time.perf_counter() - start}
    return {"settings": settings, "domains": names, "rows": rows}


def _scorer(domains: Sequence[DomainSpec]) -> Callable[[nn.Module], Scores]:
    """``score(model)`` -> per-domain accuracy on each split the domains give: "val"
    always, "test" when every domain has a fifth, held-out loader. The recipe
    (ratios, retraining, distillation) was chosen by looking at "val" across runs,
    so only "test" is an unbiased estimate of what it keeps."""
    splits = {"val": [d[3] for d in domains]}
    if all(len(d) > 4 for d in domains):
        splits["test"] = [d[4] for d in domains]

    def score(model: nn.Module) -> Scores:
        return {name: fastmdl.evaluate(model, loaders) for name, loaders in splits.items()}
    return score


def _fresh(model):
    """A new head per domain: nothing of the backbone's classifier is reused."""
    for m in model.modules():
        if isinstance(m, fastmdl.DomainHeads):
            with torch.no_grad():
                for w in m.weights:
                    nn.init.kaiming_uniform_(w, a=5 ** 0.5)
                for b in (m.biases or []):
                    b.zero_()
    return model


def _basis_rows(method, budget, model, train, val, epochs, *, ratios, scope, lr,
                retrain_epochs, taylor_batches, weight, l1, gradual, recalibrate, reference,
                schedule, distill, log, teacher=None, progress: bool = False,
                last_retrain_epochs: Optional[int] = None) -> List[Dict]:
    """Transfer ``model`` by basis scaling, then one row per pruning ratio; drops are
    against ``reference`` accuracies (default: this transfer unpruned). With
    ``distill`` > 0 every retraining distils from ``teacher`` (frozen; default:
    this transfer unpruned). The deepest cut (the largest ratio) retrains
    ``last_retrain_epochs`` (default ``retrain_epochs``). ``val`` is
    :func:`_scorer`'s ``score``."""
    bm = basis.decompose(model)
    fit(bm, train, epochs, lr, l1=l1, schedule=schedule,
        desc=f"{method} transfer, {_epochs(epochs)}" if progress else None)
    full = val(bm)
    ref = full if reference is None else reference
    rows = [_row(method, budget, 0.0, basis.cost_report(bm), full, ref)]
    log(_line(rows[-1]))
    if distill <= 0:
        teacher = None
    elif teacher is None:
        teacher = copy.deepcopy(bm).eval()  # this transfer, unpruned and frozen
    deepest = max(ratios)
    last = retrain_epochs if last_retrain_epochs is None else last_retrain_epochs
    current, done = bm, 0.0
    for ratio in sorted(ratios) if gradual else ratios:
        # basis.prune's ratio counts what is left, so the step from `done` to `ratio`
        # removes 1 - (1 - ratio) / (1 - done) of it.
        step = 1 - (1 - ratio) / (1 - done) if gradual else ratio
        source = current if gradual else bm
        importance = basis.taylor_importance(source, train, max_batches=taylor_batches)
        pruned = basis.prune(source, importance, ratio=step, scope=scope, weight=weight)
        n = last if ratio == deepest else retrain_epochs
        if n:
            fit(pruned, train, n, lr, schedule=schedule, teacher=teacher, distill=distill,
                desc=f"{method} at {ratio:.2f}, {_epochs(n)}" if progress else None)
        if recalibrate:
            recalibrate_bn(pruned, train, batches=recalibrate)
            pruned.eval()
        rows.append(_row(method, budget, ratio, basis.cost_report(pruned), val(pruned), ref))
        log(_line(rows[-1]))
        current, done = pruned, ratio
    return rows


SCHEDULES = ("constant", "cosine")


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    r""":math:`T^2 \, \mathrm{KL}(\mathrm{softmax}(t/T) \,\|\, \mathrm{softmax}(s/T))`,
    averaged over the batch, over each sample's own classes (the logits are -inf
    past a domain's classes, where both distributions are 0)."""
    own = torch.isfinite(teacher)
    log_t = F.log_softmax(teacher / temperature, dim=1)
    log_s = F.log_softmax(student / temperature, dim=1)
    diff = torch.where(own, log_t - log_s, torch.zeros_like(log_t))
    return temperature ** 2 * (log_t.exp() * diff).sum(1).mean()


def fit(model, loaders: Sequence, epochs: int, lr: float, l1: float = 0.0,
        schedule: str = "constant", teacher: Optional[nn.Module] = None,
        distill: float = 0.0, temperature: float = 4.0, desc: Optional[str] = None) -> None:
    """Adam on the trainable parameters (after decompose: factors, BatchNorm, heads),
    one mixed batch per step with a batch of every domain, as ``fastmdl.train``;
    ``l1`` > 0 adds ``l1 * basis.factor_l1(model)`` to the loss. ``schedule``
    "cosine" anneals the learning rate from ``lr`` to 0 over this call's steps,
    lr_t = lr (1 + cos(pi t / T)) / 2, so each call ends converged rather than at
    the last step of a constant-rate walk. With a ``teacher`` (frozen, evaluation
    mode), the loss is (1 - distill) CE + distill :func:`distill_loss`. A ``desc``
    shows a progress bar of this call's steps under that name."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    steps = max(len(loader) for loader in loaders)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps))
             if schedule == "cosine" else None)
    device = params[0].device
    bar = _bar(epochs * steps, desc is not None, desc or "")
    model.train()
    for _ in range(epochs):
        batches = mixed_batches(loaders)
        for _ in range(steps):
            x, y, dom = (t.to(device) for t in next(batches))
            logits = model(x, dom)
            loss = F.cross_entropy(logits, y)
            if teacher is not None and distill > 0:
                with torch.no_grad():
                    target = teacher(x, dom)
                loss = (1 - distill) * loss + distill * distill_loss(logits, target, temperature)
            if l1 > 0:
                loss = loss + l1 * basis.factor_l1(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    model.eval()


def _accuracy(acc: List[float], ref_acc: List[float]) -> Dict:
    return {"acc": list(acc), "mean_acc": sum(acc) / len(acc),
            "drop_points": [100 * (r - a) for a, r in zip(acc, ref_acc)]}


def _row(method, budget, ratio, report, acc: Scores, ref_acc: Scores) -> Dict:
    """One row: costs, and accuracy and drops on "val" at the top level (as rows
    always had them) and on "test" under ``row["test"]`` when it was measured."""
    base_p, base_f = report.baseline["params"], report.baseline["flops"]
    return {
        "method": method, "filter_budget": budget, "basis_ratio": ratio,
        **_accuracy(acc["val"], ref_acc["val"]),
        **({"test": _accuracy(acc["test"], ref_acc["test"])} if "test" in acc else {}),
        "params": [r["params"] for r in report.domains],
        "flops": [r["flops"] for r in report.domains],
        "params_pct": [100 * r["params"] / base_p for r in report.domains],
        "flops_pct": [100 * r["flops"] / base_f for r in report.domains],
        "union_params_pct": 100 * report.union["params"] / base_p,
        "union_flops_pct": 100 * report.union["flops"] / base_f,
        "backbone_params": base_p, "backbone_flops": base_f,
    }


def _line(r: Dict) -> str:
    test = (f" (test {' '.join(f'{100 * a:.1f}' for a in r['test']['acc'])})"
            if "test" in r else "")
    return (f"{r['method']:7s} budget {r['filter_budget']:.2f} ratio {r['basis_ratio']:.2f}: "
            f"acc {' '.join(f'{100 * a:.1f}' for a in r['acc'])}{test} | params % "
            f"{' '.join(f'{p:.1f}' for p in r['params_pct'])} | union {r['union_params_pct']:.1f}%")


def to_markdown(result: Dict) -> str:
    """The rows as a markdown table (percentages of ONE backbone)."""
    names = result["domains"]
    s = result["settings"]
    head = (["method", "filter budget", "basis ratio"] + [f"acc % {n}" for n in names]
            + ["mean acc %", "mean drop (points)", "max drop (points)", "params % (mean/domain)",
               "FLOPs % (mean/domain)", "union params %", "union FLOPs %"])
    lines = [f"Basis scaling and double pruning, {s['date']}, {s['machine']}, {s['threads']} "
             f"threads, torch {s['torch']}; {s['epochs']} epochs, scope {s['scope']}, "
             f"retrain epochs {s['retrain_epochs']}{_last_cut(s)}, reference epochs "
             f"{s.get('reference_epochs', '-')}, weight {s.get('weight', 'components')}, "
             f"L1 {s.get('l1', 0.0)}, gradual {s.get('gradual', False)}, BatchNorm "
             f"recalibrated on {s.get('recalibrate', 0)} batches, learning rate "
             f"{s.get('lr', '-')} {s.get('schedule', 'constant')}, distillation weight "
             f"{s.get('distill', 0.0)} (teacher: {s.get('teacher', 'transfer')}), input "
             f"{tuple(s['input_size'])}, {_backbone(s)}"
             f"{s['seconds']:.0f} s. Percentages are of ONE backbone (the single-domain "
             "network); drops are against the method's reference row where it has one (the "
             "unpruned transfer without L1, trained as long as its deepest pruned row), else "
             "against its own unpruned row."]
    splits = _splits(result)
    for split in splits:
        if len(splits) > 1:
            lines += ["", {"val": "Validation split (what the recipe was chosen on):",
                           "test": "Held-out test split (not looked at to choose anything):"
                           }[split]]
        lines += ["", "| " + " | ".join(head) + " |",
                  "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
        for r in result["rows"]:
            a = _split(r, split)
            cells = [r["method"], f"{r['filter_budget']:.2f}", f"{r['basis_ratio']:.2f}"]
            cells += [f"{100 * v:.1f}" for v in a["acc"]]
            cells += [f"{100 * a['mean_acc']:.1f}",
                      f"{sum(a['drop_points']) / len(a['drop_points']):.1f}",
                      f"{max(a['drop_points']):.1f}",
                      f"{sum(r['params_pct']) / len(names):.1f}",
                      f"{sum(r['flops_pct']) / len(names):.1f}",
                      f"{r['union_params_pct']:.1f}", f"{r['union_flops_pct']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        lines += target_lines(result, split)
    return "\n".join(lines) + "\n"


def _backbone(settings: Dict) -> str:
    """What was pruned, for the header; runs recorded before these keys existed
    say nothing."""
    parts = [f"width {settings['width']}"] if "width" in settings else []
    if "backbone_params" in settings:
        parts.append(f"{settings['backbone_params']:,} parameters")
    return f"backbone {', '.join(parts)}, " if parts else ""


def _last_cut(settings: Dict) -> str:
    last = settings.get("last_retrain_epochs", settings["retrain_epochs"])
    return "" if last == settings["retrain_epochs"] else f" ({last} after the deepest cut)"


def _splits(result: Dict) -> List[str]:
    """The splits every row was scored on: "val", and "test" when measured."""
    return ["val"] + (["test"] if all("test" in r for r in result["rows"]) else [])


def _split(row: Dict, split: str) -> Dict:
    return row["test"] if split == "test" else row


def target_lines(result: Dict, split: str = "val") -> List[str]:
    """Issue 8's target per method, on ``split`` ("val" or "test"): a pruned row with
    at least 70% fewer params per domain than the backbone and every domain within
    1 point of its reference; the mean drop is stated beside it."""
    out = []
    tag = "" if split == "val" else f" ({split})"
    for method in dict.fromkeys(r["method"] for r in result["rows"]
                                if r["basis_ratio"] > 0):
        rows = [r for r in result["rows"] if r["method"] == method and r["basis_ratio"] > 0]
        hits = [r for r in rows if max(r["params_pct"]) <= TARGET_PARAMS_PCT
                and max(_split(r, split)["drop_points"]) < TARGET_DROP]
        if hits:
            best = min(hits, key=lambda r: max(r["params_pct"]))
            drops = _split(best, split)["drop_points"]
            out.append(f"- {method}{tag}: target met at ratio {best['basis_ratio']:.2f} "
                       f"({100 - max(best['params_pct']):.1f}% fewer params than the backbone "
                       f"in every domain, largest drop {max(drops):.1f} points, mean "
                       f"{sum(drops) / len(drops):.1f})")
        else:
            out.append(f"- {method}{tag}: target (>= 70% fewer params, every domain within 1 "
                       "point) NOT met by any row")
    return out


def plot(result: Dict, path: str) -> bool:
    """basis_experiment.png: mean accuracy against params per domain (% of one
    backbone), one line per method, one panel per split; the dashed line is the
    method's reference, the shaded band 1 point under it, the grey line 70% fewer
    params. Returns False (nothing written) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    splits = _splits(result)
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4), squeeze=False)
    n = len(result["domains"])
    for ax, split in zip(axes[0], splits):
        methods = dict.fromkeys(r["method"] for r in result["rows"]
                                if "reference" not in r["method"] and r["method"] != "filters")
        for method in methods:
            rows = [r for r in result["rows"] if r["method"] == method]
            x = [sum(r["params_pct"]) / n for r in rows]
            y = [100 * _split(r, split)["mean_acc"] for r in rows]
            line, = ax.plot(x, y, "o-", label=method)
            ref = next((r for r in result["rows"] if r["method"].startswith(method + " (ref")),
                       rows[0])
            top = 100 * _split(ref, split)["mean_acc"]
            ax.axhline(top, color=line.get_color(), ls="--", lw=0.8,
                       label=f"{method}: reference, and 1 point under it")
            ax.axhspan(top - TARGET_DROP, top, color=line.get_color(), alpha=0.08)
        ax.axvline(TARGET_PARAMS_PCT, color="grey", lw=0.8, label="70% fewer params")
        ax.invert_xaxis()
        ax.set_xlabel("params per domain, % of one backbone")
        ax.set_ylabel(f"mean accuracy % ({'held-out test' if split == 'test' else 'validation'})")
        ax.legend(fontsize=7)
    save_png(fig, path)
    return True


def _smoke_inputs(seed: int = 0):
    """A random 'backbone' and two domains of random 12x12 greyscale tensors."""
    from torch.utils.data import DataLoader, TensorDataset

    from fastmdl.models import ResNet

    torch.manual_seed(seed)
    backbone = ResNet([4, 8], [1, 1], num_classes=10, in_channels=1).eval()
    g = torch.Generator().manual_seed(seed)
    domains = []
    for name, k in (("random-a", 3), ("random-b", 5)):
        def split(n):
            return TensorDataset(torch.randn(n, 1, 12, 12, generator=g),
                                 torch.randint(0, k, (n,), generator=g))
        domains.append((name, k, DataLoader(split(24), batch_size=12),
                        DataLoader(split(12), batch_size=12), DataLoader(split(12), batch_size=12)))
    return backbone, domains


def _real_inputs(size: int, width: float, batch_size: int, seed: int, progress: bool = True):
    try:
        from fastmdl.data import builtin_benchmark
        from fastmdl.pretrained import pretrained_backbone
    except ImportError as e:
        raise SystemExit(f"the full experiment needs fastmdl.data and fastmdl.pretrained "
                         f"({e}); run with --smoke meanwhile")
    backbone, _ = pretrained_backbone(size=size, width=width, seed=seed, progress=progress)
    data = builtin_benchmark(size, domains=["digits", "faces", "textures"], seed=seed)
    train = data.loaders("train", batch_size, seed=seed)
    val = data.loaders("val", batch_size, shuffle=False)
    test = data.loaders("test", batch_size, shuffle=False)
    return backbone, [(d.name, d.num_classes, t, v, e)
                      for d, t, v, e in zip(data.domains, train, val, test)]


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="random tensors, a few seconds")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--ratios", default="0.5,0.7,0.8,0.9")
    ap.add_argument("--budget", type=lambda v: None if v == "none" else float(v), default=0.5,
                    help="filter budget of the filter and double-pruning rows ('none': skip them)")
    ap.add_argument("--scope", default="global", choices=basis.SCOPES)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--retrain-epochs", type=int, default=0)
    ap.add_argument("--last-retrain-epochs", type=int, default=None,
                    help="retraining epochs after the deepest cut (default: --retrain-epochs)")
    ap.add_argument("--taylor-batches", type=int, default=None)
    ap.add_argument("--no-basis-rows", action="store_true",
                    help="only the filter and double-pruning rows")
    ap.add_argument("--weight", default="components", choices=basis.WEIGHTS,
                    help="what --ratios count: components, or basis parameters (global scope)")
    ap.add_argument("--l1", type=float, default=0.0,
                    help="weight of basis.factor_l1 in the transfer loss")
    ap.add_argument("--gradual", action="store_true",
                    help="reach the ratios one after another, retraining in between")
    ap.add_argument("--recalibrate", type=int, default=0,
                    help="batches per domain to recompute BatchNorm statistics after pruning")
    ap.add_argument("--schedule", default="constant", choices=SCHEDULES,
                    help="learning-rate schedule of every training call")
    ap.add_argument("--distill", type=float, default=0.0,
                    help="weight of distillation from the unpruned transfer when retraining")
    ap.add_argument("--teacher", default="transfer", choices=TEACHERS,
                    help="what --distill distils from: the unpruned transfer being pruned "
                         "(--epochs of training) or the reference row's network (trained as "
                         "long as the deepest pruned row)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true",
                    help="no progress bars (they go to stderr)")
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "out"))
    args = ap.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    threads = torch.get_num_threads()
    if args.smoke:
        backbone, domains = _smoke_inputs(args.seed)
        args.epochs, ratios, args.taylor_batches = 1, [0.5, 0.8], 1
        # Tiny tensors gain nothing from threads, and lose much on a busy machine.
        torch.set_num_threads(1)
    else:
        backbone, domains = _real_inputs(args.size, args.width, args.batch_size, args.seed,
                                         progress=not args.no_progress)
    try:
        result = run(backbone, domains, epochs=args.epochs, ratios=ratios, budget=args.budget,
                     scope=args.scope, lr=args.lr, retrain_epochs=args.retrain_epochs,
                     taylor_batches=args.taylor_batches, seed=args.seed, weight=args.weight,
                     l1=args.l1, gradual=args.gradual, recalibrate=args.recalibrate,
                     basis_rows=not args.no_basis_rows, schedule=args.schedule,
                     distill=args.distill, teacher=args.teacher,
                     last_retrain_epochs=args.last_retrain_epochs,
                     progress=not args.no_progress)
    finally:
        torch.set_num_threads(threads)
    result["settings"]["smoke"] = args.smoke
    if not args.smoke:  # the smoke backbone and data ignore these
        result["settings"].update(width=args.width, size=args.size, batch_size=args.batch_size)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "basis_experiment" + ("_smoke" if args.smoke and
                                                         args.out == ap.get_default("out") else ""))
    md = to_markdown(result)
    write_atomic(stem + ".json", json.dumps(result, indent=1))
    write_atomic(stem + ".md", md)
    png = plot(result, stem + ".png")
    print(md)
    print(f"wrote {stem}.md, {stem}.json" + (f" and {stem}.png" if png else
                                             " (no plot: matplotlib is not installed)"))
    return result


if __name__ == "__main__":
    main()
