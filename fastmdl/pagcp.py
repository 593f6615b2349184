r"""``fastmdl.pagcp``: performance-aware global channel pruning for multitask and
multi-domain networks (Ye et al., TPAMI 2023, "PAGCP").

Over the prunable channel groups g_0 .. g_{n-1} (coupled channels, see
``fastmdl/graph.py``):

1. saliency of channel c: :math:`\sum_{m \in g} \mathrm{mean}\,|W^{(m)}_c|` over the
   convolutions m that write the group (each member's mean absolute weight over
   its fan-in, as the authors' code does; raw L1 sums let the members of large
   fan-in decide alone);
2. each group is trial-pruned by 30% (its lowest-saliency channels; the FLOPs are
   those of the cost model, what a pruned copy would have) and the FLOPs saved are
   recorded; groups are visited by FLOPs saved, the largest first
   when the thresholds shrink (lambda <= 1) and last when they grow, so the
   groups that save most always get the loosest bounds (as the authors' code does);
3. a visited group gets the threshold :math:`d_i = d_0 \lambda^i`, i the number of
   groups cut before it (i advances only when a group loses channels, as in the
   authors' code: a group that cannot be cut leaves the next one its allowance);
   ``initial_rate`` is d_0 and ``initial_threshold`` the bound T on the whole
   schedule, :math:`\prod_{i<n} (1 + d_i) = T`, solved for lambda (lambda = 1
   without ``exponential``): no task's loss can grow more than T-fold along the pass;
4. sequential greedy pass on the already-pruned network: group i takes the largest
   ratio r (tried in increasing order, stopping at the first failure) with
   :math:`L_t(r) \le (1 + d_i) B_t` for every task t; B_t starts at the
   unpruned loss and then moves up, :math:`B_t \leftarrow \max(B_t, L_t(r_i))`
   (two optional extensions: ``min_loss`` floors B_t in the bound, and
   ``calibrate`` refreshes e.g. BatchNorm statistics of each candidate first);
5. group i scores :math:`\sum_t (L_t(r_i) - B_t) / \Delta\mathrm{FLOPs}_i`; only the
   ``floor(topk * n)`` (at least one) lowest-scoring groups that removed channels
   keep their ratios.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from numbers import Real
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._checks import positive as _positive
from .surgery import Group, Kept, Network

DEFAULT_RATIOS = tuple(round(0.05 * i, 2) for i in range(1, 20))
IMPORTANCES = ("l1", "l2")
TRIAL_RATIO = 0.3


@dataclass
class GroupResult:
    """What the greedy pass did to one group (in visiting order)."""

    name: str
    members: List[str]
    order: int
    threshold: float
    width: int
    kept: int = 0
    ratio: float = 0.0
    limiting_task: Optional[str] = None
    loss_before: Dict[str, float] = field(default_factory=dict)
    loss_after: Dict[str, float] = field(default_factory=dict)
    bound: Dict[str, float] = field(default_factory=dict)
    trial_flops_saved: float = 0.0
    flops_removed: float = 0.0
    score: Optional[float] = None
    applied: bool = False


@dataclass
class PAGCPReport:
    """Per group (visiting order): ratio, limiting task, losses before/after and
    their bounds; then the schedule and the totals before and after."""

    groups: List[GroupResult] = field(default_factory=list)
    lam: float = 1.0
    initial_rate: float = 0.0
    initial_threshold: float = 0.0
    topk: float = 1.0
    losses_before: Dict[str, float] = field(default_factory=dict)
    losses_after: Dict[str, float] = field(default_factory=dict)
    params_before: float = 0.0
    params_after: float = 0.0
    flops_before: float = 0.0
    flops_after: float = 0.0
    evaluations: int = 0
    seconds: float = 0.0
    # With rounds > 1: every round's own report, in order (``groups`` and ``lam``
    # above are the last round's; the totals span all rounds).
    rounds: List["PAGCPReport"] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain JSON-ready values (an infinite score, a free group's, becomes None)."""
        out = asdict(self)
        for part in [out] + out["rounds"]:
            for g in part["groups"]:
                if g["score"] is not None and not math.isfinite(g["score"]):
                    g["score"] = None
        return out

    def to_markdown(self) -> str:
        """The report as a markdown table and a totals line."""
        tasks = list(self.losses_before)
        head = ["#", "group", "d_i", "ratio", "channels", "limited by", "applied",
                "FLOPs removed"] + [f"{t} before -> after" for t in tasks]
        rows = [[str(g.order), g.name, f"{g.threshold:.4f}", f"{g.ratio:.2f}",
                 f"{g.width} -> {g.kept}", g.limiting_task or "-", "yes" if g.applied else "no",
                 f"{g.flops_removed:.4g}"]
                + [f"{g.loss_before[t]:.4g} -> {g.loss_after[t]:.4g}" for t in tasks]
                for g in self.groups]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]

        def pct(a, b):
            return f"{100 * (1 - b / a):.1f}% fewer" if a else "-"
        lines += ["", f"lambda = {self.lam:.6g}; params {self.params_before:.4g} -> "
                      f"{self.params_after:.4g} ({pct(self.params_before, self.params_after)}); "
                      f"FLOPs {self.flops_before:.4g} -> {self.flops_after:.4g} "
                      f"({pct(self.flops_before, self.flops_after)}); losses "
                  + ", ".join(f"{t} {self.losses_before[t]:.4g} -> {self.losses_after[t]:.4g}"
                              for t in tasks)]
        return "\n".join(lines)

    __str__ = to_markdown


def schedule(initial_rate: float, n: int, initial_threshold: float,
             exponential: bool = True) -> Tuple[float, List[float]]:
    r"""(lambda, [d_0 .. d_{n-1}]) with :math:`d_i = d_0 \lambda^i`, d_0 =
    ``initial_rate``. With ``exponential``, lambda solves
    :math:`\sum_i \log(1 + d_0 \lambda^i) = \log T` (T = ``initial_threshold``) by
    bisection on :math:`\log\lambda`; the left side grows with lambda, so the root
    is unique. Without it, or when n < 2 (one factor cannot be tuned), lambda = 1."""
    _positive(initial_rate, "initial_rate")
    _positive(initial_threshold, "initial_threshold")
    if not initial_threshold > 1:
        raise ValueError(f"initial_threshold must be > 1 (the product of the (1 + d_i) "
                         f"factors), got {initial_threshold!r}")
    if not exponential or n < 2:
        return 1.0, [float(initial_rate)] * n
    if 1 + initial_rate >= initial_threshold:
        raise ValueError(f"initial_threshold ({initial_threshold}) must exceed 1 + "
                         f"initial_rate ({1 + initial_rate}): the first factor alone reaches it")
    log_d0, log_t = math.log(initial_rate), math.log(initial_threshold)

    def excess(u: float) -> float:  # log of the product minus log T, at lambda = e^u
        total = 0.0
        for i in range(n):
            a = log_d0 + i * u
            total += a + math.log1p(math.exp(-a)) if a > 30 else math.log1p(math.exp(a))
        return total - log_t

    lo, hi = -1.0, 1.0
    while excess(lo) > 0:
        lo *= 2
    while excess(hi) < 0:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if excess(mid) < 0:
            lo = mid
        else:
            hi = mid
    lam = math.exp((lo + hi) / 2)
    return lam, [initial_rate * lam ** i for i in range(n)]


def pagcp(model: nn.Module, tasks: Mapping[str, Callable[[nn.Module], float]], *,
          initial_rate: float = 0.05, initial_threshold: float = 5.0, topk: float = 0.8,
          exponential: bool = True, ratios: Sequence[float] = DEFAULT_RATIOS,
          importance: str = "l1", example_input: Optional[torch.Tensor] = None,
          calibrate: Optional[Callable[[nn.Module], None]] = None,
          min_loss: Union[float, Mapping[str, float]] = 0.0,
          rounds: int = 1, rate_slope: float = 0.0, threshold_slope: float = 0.0,
          between_rounds: Optional[Callable[[nn.Module], None]] = None,
          log: Optional[Callable[[str], None]] = None) -> Tuple[nn.Module, PAGCPReport]:
    r"""PAGCP in ``rounds`` passes (one by default; the algorithm of one pass is in
    this module's docstring and :func:`_one_pass`'s). Round r (from 0) prunes the
    previous round's network with :math:`d_0 = ` ``initial_rate + rate_slope * r``
    and :math:`T = ` ``initial_threshold + threshold_slope * r``, as the authors'
    code schedules its rounds; ``between_rounds(net)``, when given, runs on each
    round's result before the next (the authors fine-tune there), in place.
    Returns ``(pruned, report)``: the report's groups and lambda are the last
    round's, its totals span every round, and ``report.rounds`` holds each round's
    own report when there are several. The other arguments are :func:`_one_pass`'s.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive int, got {rounds!r}")
    for name, v in (("rate_slope", rate_slope), ("threshold_slope", threshold_slope)):
        if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if between_rounds is not None and not callable(between_rounds):
        raise TypeError(f"between_rounds must be a callable between_rounds(model) -> None, "
                        f"got {type(between_rounds).__name__}")
    # Every round's schedule must be valid before any work.
    for r in range(rounds):
        schedule(initial_rate + rate_slope * r, 2, initial_threshold + threshold_slope * r,
                 exponential)
    say = log or (lambda line: None)
    reports: List[PAGCPReport] = []
    current = model
    for r in range(rounds):
        if rounds > 1:
            say(f"pagcp: round {r + 1}/{rounds}")
        current, rep = _one_pass(
            current, tasks, initial_rate=initial_rate + rate_slope * r,
            initial_threshold=initial_threshold + threshold_slope * r, topk=topk,
            exponential=exponential, ratios=ratios, importance=importance,
            example_input=example_input, calibrate=calibrate, min_loss=min_loss, log=log)
        reports.append(rep)
        if between_rounds is not None and r + 1 < rounds:
            between_rounds(current)
    if rounds == 1:
        return current, reports[0]
    last, first = reports[-1], reports[0]
    total = PAGCPReport(groups=last.groups, lam=last.lam, initial_rate=first.initial_rate,
                        initial_threshold=first.initial_threshold, topk=topk,
                        losses_before=first.losses_before, losses_after=last.losses_after,
                        params_before=first.params_before, params_after=last.params_after,
                        flops_before=first.flops_before, flops_after=last.flops_after,
                        evaluations=sum(x.evaluations for x in reports),
                        seconds=sum(x.seconds for x in reports), rounds=reports)
    return current, total


def _one_pass(model: nn.Module, tasks: Mapping[str, Callable[[nn.Module], float]], *,
              initial_rate: float = 0.05, initial_threshold: float = 5.0, topk: float = 0.8,
              exponential: bool = True, ratios: Sequence[float] = DEFAULT_RATIOS,
              importance: str = "l1", example_input: Optional[torch.Tensor] = None,
              calibrate: Optional[Callable[[nn.Module], None]] = None,
              min_loss: Union[float, Mapping[str, float]] = 0.0,
              log: Optional[Callable[[str], None]] = None) -> Tuple[nn.Module, PAGCPReport]:
    r"""Prune ``model`` channel group by channel group while every task's loss stays
    within its bound (the algorithm is in this module's docstring); returns
    ``(pruned, report)``, ``pruned`` a physically smaller copy of the same kind.

    ``model`` is a plain multitask network (``nn.Conv2d``/``nn.BatchNorm2d``; then
    ``example_input``, one input batch, is required to trace it), a
    :class:`fastmdl.MultiDomainModel` or a :class:`fastmdl.PrunedModel` (pruned
    further); it is never modified. A plain network with channels-last blocks
    (ConvNeXt's MLP) is cut as :func:`fastmdl.convert` sees it, rewritten to run
    channels-first (``fastmdl/channels_last.py``), and ``pruned`` is then that
    ``torch.fx.GraphModule``. ``tasks`` maps each task's name to
    ``loss(model) -> float`` (>= 0) on that task's held-out data; it is called on
    candidate networks in evaluation mode under ``torch.no_grad()``.
    ``ratios``: the fractions of a group's channels tried, increasing in (0, 1);
    ``floor(ratio * width)`` channels go, at least one stays. ``importance``:
    "l1" (the paper) or "l2" filter norms. ``log`` receives progress lines.

    ``calibrate(candidate)``, when given, is called on every candidate network (a
    fresh copy, in place) before its losses are taken, and on the returned network:
    e.g. recompute the BatchNorm statistics on a few training batches, so a cut is
    judged by what the remaining channels can do rather than by the statistics it
    left stale (an addition to the paper's method, off by default).

    ``min_loss`` (a number, or one per task name) puts a floor under each task's
    baseline in its bound, :math:`(1 + d_i) \max(B_t, m_t)`: a relative bound on
    a loss near 0 (a task the model has all but solved) is met only if no
    prediction moves at all, which stops every cut. The default 0 is the paper's
    bound; an extension, like ``calibrate``.
    """
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tasks = _check_tasks(tasks)
    ratios = _check_ratios(ratios)
    topk = _check_topk(topk)
    if not isinstance(exponential, bool):
        raise TypeError(f"exponential must be a bool, got {type(exponential).__name__}")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    _check_example(example_input)
    floors = _check_min_loss(min_loss, tasks)
    if calibrate is not None and not callable(calibrate):
        raise TypeError(f"calibrate must be a callable calibrate(model) -> None, got "
                        f"{type(calibrate).__name__}")
    schedule(initial_rate, 2, initial_threshold, exponential)  # argument errors before work
    net = Network(model, example_input)
    say = log or (lambda line: None)

    evaluations = [0]

    def evaluate(m: nn.Module) -> Dict[str, float]:
        evaluations[0] += 1
        if calibrate is not None:
            calibrate(m)
            m.eval()
        with torch.no_grad():
            return {name: _loss(fn(m), name) for name, fn in tasks.items()}

    current = net.materialise({})
    base = evaluate(current)
    report = PAGCPReport(initial_rate=float(initial_rate),
                         initial_threshold=float(initial_threshold), topk=topk,
                         losses_before=dict(base), params_before=_params(model, net.kind),
                         flops_before=net.flops({}))
    groups = net.groups
    trial = {grp.root: report.flops_before - net.flops(
        {grp.root: _keep(net, current, grp, {}, TRIAL_RATIO, importance)}) for grp in groups}
    lam, thresholds = schedule(initial_rate, len(groups), initial_threshold, exponential)
    order = sorted(groups, key=lambda grp: trial[grp.root], reverse=lam <= 1)
    report.lam = lam
    say(f"pagcp: {len(groups)} groups, lambda={lam:.6g}, losses {base}")

    kept: Kept = {}
    flops_now = report.flops_before
    cuts = 0  # d_i's index: groups cut so far
    for i, grp in enumerate(order):
        d_i = thresholds[cuts]
        res = GroupResult(grp.name, list(grp.members), i, d_i, grp.width, grp.width,
                          loss_before=dict(base), loss_after=dict(base),
                          bound={t: (1 + d_i) * max(b, floors[t]) for t, b in base.items()},
                          trial_flops_saved=trial[grp.root])
        ranked = _ranked(net, current, grp, kept, importance)
        accepted, tried = None, 0
        for ratio in ratios:
            n_cut = _n_cut(ratio, grp.width)
            if n_cut == tried:
                continue  # the same network as the last ratio tried
            tried = n_cut
            keep = ranked[n_cut:].sort().values
            candidate = net.materialise({**kept, grp.root: keep})
            losses = evaluate(candidate)
            over = {t: losses[t] / res.bound[t] if res.bound[t] > 0 else math.inf
                    for t in tasks if losses[t] > res.bound[t]}
            if over:
                res.limiting_task = max(over, key=over.get)
                break
            accepted = (ratio, keep, losses, candidate)
        if accepted is not None:
            res.ratio, keep, res.loss_after, current = accepted
            kept[grp.root] = keep
            cuts += 1
            res.kept = len(keep)
            flops_after = net.flops(kept)
            res.flops_removed, flops_now = flops_now - flops_after, flops_after
            base = {t: max(base[t], res.loss_after[t]) for t in tasks}
        say(f"pagcp {i + 1}/{len(order)} {grp.name}: ratio {res.ratio:.2f} ({res.width} -> "
            f"{res.kept}), limited by {res.limiting_task}, losses {res.loss_after}")
        report.groups.append(res)

    chosen = _top_groups(report.groups, topk, len(groups))
    final_kept = {grp.root: kept[grp.root] for grp in order if grp.name in chosen}
    pruned = net.finish(net.materialise(final_kept))
    report.losses_after = evaluate(pruned)
    pruned.train(model.training)
    report.params_after = _params(pruned, net.kind)
    report.flops_after = net.flops(final_kept)
    report.evaluations = evaluations[0]
    report.seconds = time.perf_counter() - start
    say(f"pagcp: FLOPs {report.flops_before:.4g} -> {report.flops_after:.4g}, params "
        f"{report.params_before:.4g} -> {report.params_after:.4g}")
    return pruned, report


def uniform_prune(model: nn.Module, *, ratio: Optional[float] = None,
                  flops: Optional[float] = None, importance: str = "l1",
                  example_input: Optional[torch.Tensor] = None) -> Tuple[nn.Module, dict]:
    """The comparison PAGCP is measured against: every group loses the same
    fraction of its lowest-norm channels (``floor(ratio * width)``, at least one
    kept), in one shot. Give ``ratio``, or ``flops`` (a target in the units of
    ``report.flops_after``) to take the smallest ratio whose network is at most
    that costly (bisection; the cost only falls as the ratio grows). Returns
    ``(pruned, {"ratio", "flops_before", "flops_after", "params_before", "params_after"})``."""
    if (ratio is None) == (flops is None):
        raise ValueError("give exactly one of ratio and flops")
    if importance not in IMPORTANCES:
        raise ValueError(f"importance must be one of {IMPORTANCES}, got {importance!r}")
    if ratio is not None and not (isinstance(ratio, Real) and 0 <= ratio < 1):
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    if flops is not None and not (isinstance(flops, Real) and flops >= 0):
        raise ValueError(f"flops must be a number >= 0, got {flops!r}")
    _check_example(example_input)
    net = Network(model, example_input)
    ranked = {grp.root: _ranked(net, net.model, grp, {}, importance) for grp in net.groups}

    def kept_at(r: float) -> Kept:
        return {grp.root: ranked[grp.root][_n_cut(r, grp.width):].sort().values
                for grp in net.groups}

    if ratio is None:
        lo, hi = 0.0, 0.999
        if net.flops(kept_at(hi)) > flops:
            ratio = hi  # the target is out of reach: prune as far as it goes
        else:
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if net.flops(kept_at(mid)) > flops else (lo, mid)
            ratio = hi
    kept = kept_at(ratio)
    pruned = net.finish(net.materialise(kept))
    pruned.train(model.training)
    return pruned, {"ratio": float(ratio), "flops_before": net.flops({}),
                    "flops_after": net.flops(kept), "params_before": _params(model, net.kind),
                    "params_after": _params(pruned, net.kind)}


# -- helpers -----------------------------------------------------------------------------

def _n_cut(ratio: float, width: int) -> int:
    # The epsilon keeps 0.3 * 10 at 3 despite 0.3 being 0.29999... in binary.
    return min(int(math.floor(ratio * width + 1e-9)), width - 1)


def _ranked(net: Network, model: nn.Module, grp: Group, kept: Kept,
            importance: str) -> torch.Tensor:
    """The group's current channels (as indices of the analysed model), least salient first."""
    sal = net.saliency(model, grp, kept, importance)
    return net.kept_or_all(kept, grp.root)[torch.argsort(sal, stable=True)]


def _keep(net: Network, model: nn.Module, grp: Group, kept: Kept, ratio: float,
          importance: str) -> torch.Tensor:
    return _ranked(net, model, grp, kept, importance)[_n_cut(ratio, grp.width):].sort().values


def _top_groups(results: List[GroupResult], topk: float, n: int) -> set:
    """Score the groups that removed channels, mark the best ``floor(topk * n)`` (at
    least one) applied, and return their names."""
    candidates = [r for r in results if r.kept < r.width]
    for r in candidates:
        rise = sum(r.loss_after[t] - r.loss_before[t] for t in r.loss_before)
        if r.flops_removed > 0:
            r.score = rise / r.flops_removed
        else:  # channels no domain used: free when the loss did not rise
            r.score = -math.inf if rise <= 0 else math.inf
    k = max(1, int(math.floor(topk * n + 1e-9)))
    best = sorted(candidates, key=lambda r: r.score)[:k]
    for r in best:
        r.applied = True
    return {r.name for r in best}


def _params(model: nn.Module, kind: str) -> float:
    """Parameters held; for a multi-domain model, those of its union network (what
    ``fastmdl.prune`` would keep), as ``cost_report`` counts them."""
    if kind == "multidomain":
        from .cost import cost_report
        return float(cost_report(model).union["params"])
    return float(sum(p.numel() for p in model.parameters()))


def _loss(value, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"task {name!r} must return one number, got a tensor of shape "
                             f"{tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"task {name!r} must return a float loss, got {type(value).__name__}")
    value = float(value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"task {name!r} returned the loss {value}: PAGCP's bounds are "
                         "multiples of the loss, so it must be finite and >= 0")
    return value


def _check_tasks(tasks) -> Dict[str, Callable]:
    if not isinstance(tasks, Mapping):
        raise TypeError(f"tasks must map task names to loss(model) callables, got "
                        f"{type(tasks).__name__}")
    if not tasks:
        raise ValueError("tasks must name at least one task")
    for name, fn in tasks.items():
        if not isinstance(name, str):
            raise TypeError(f"tasks' names must be strings, got {name!r}")
        if not callable(fn):
            raise TypeError(f"tasks[{name!r}] must be a callable loss(model) -> float, got "
                            f"{type(fn).__name__}")
    return dict(tasks)


def _check_ratios(ratios) -> Tuple[float, ...]:
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence):
        raise TypeError(f"ratios must be a sequence of numbers, got {type(ratios).__name__}")
    if not ratios or not all(isinstance(r, Real) and not isinstance(r, bool) for r in ratios):
        raise ValueError(f"ratios must be a non-empty sequence of numbers, got {ratios!r}")
    if not all(0 < r < 1 for r in ratios) or any(b <= a for a, b in zip(ratios, ratios[1:])):
        raise ValueError(f"ratios must increase strictly within (0, 1), got {list(ratios)!r}")
    return tuple(float(r) for r in ratios)


def _check_min_loss(min_loss, tasks: Mapping[str, Callable]) -> Dict[str, float]:
    if isinstance(min_loss, Mapping):
        unknown = sorted(set(min_loss) - set(tasks))
        if unknown:
            raise ValueError(f"min_loss names tasks that are not in tasks: {unknown}")
        floors = {t: min_loss.get(t, 0.0) for t in tasks}
    else:
        floors = {t: min_loss for t in tasks}
    for t, v in floors.items():
        if isinstance(v, bool) or not isinstance(v, Real):
            raise TypeError(f"min_loss must be a number or a {{task: number}} mapping, got "
                            f"{type(v).__name__} for task {t!r}")
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"min_loss must be finite and >= 0, got {v!r} for task {t!r}")
    return {t: float(v) for t, v in floors.items()}


def _check_topk(topk) -> float:
    if isinstance(topk, bool) or not isinstance(topk, Real):
        raise TypeError(f"topk must be a number, got {type(topk).__name__}")
    if not 0 < topk <= 1:
        raise ValueError(f"topk must be in (0, 1], got {topk!r}")
    return float(topk)


def _check_example(example_input) -> None:
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor (one input batch), got "
                        f"{type(example_input).__name__}")
