"""Issue 8's target read over several seeds of ``basis_experiment.py``.

    python benchmarks/basis_seeds.py out/s0/basis_experiment.json out/s1/basis_experiment.json ...
                                     [--method basis] [--ratio 0.75] [--split test] [--out FILE.md]
                                     [--against base/s0/basis_experiment.json ...]

One run's drop on one domain is noisier than the target's 1-point bar (a test
split of 270 digits gives a binomial standard error of about 1 point at 97%), so
besides each seed's own figures this reports the per-domain drop averaged over
the seeds. The readings, for one method's row at one basis ratio (default: the
deepest ratio of the first run):

- R1: every seed's mean drop over the domains is under 1 point;
- R2: every domain's drop, averaged over the seeds, is under 1 point;
- R3: the seeds on which every domain is within 1 point (reported, not a verdict);

and, for all three, every seed's row must have at least 70% fewer params per
domain than the backbone. Runs that differ in anything but the seed (and the
date, machine and time taken) are refused: the readings are about one recipe.

Under each mean over the seeds stands its standard error (the seeds' sample
standard deviation over the square root of their number), so a reader can tell
a mean that misses the bar by less than its own noise from one that misses by more.

``--against`` names the runs of an earlier recipe: the seeds both recipes ran are
then compared pair by pair (:func:`compare`), each domain's drop before and after
and its change, and whether the pair shares its reference row to the digit (the
two recipes then differ only after the reference, and the change is the recipe's
alone, free of the noise between seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Dict, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from basis_experiment import TARGET_DROP, TARGET_PARAMS_PCT, _split  # noqa: E402
from contenders import write_atomic  # noqa: E402

# Settings that may differ between the runs being summarised.
PER_RUN = ("seed", "date", "machine", "threads", "seconds", "torch", "smoke")


def _recipe(settings: Dict) -> Dict:
    out = {k: v for k, v in settings.items() if k not in PER_RUN}
    # Runs from before --last-retrain-epochs existed retrained every cut alike.
    out.setdefault("last_retrain_epochs", out.get("retrain_epochs"))
    return out


def pick(result: Dict, method: str, ratio: float, split: str) -> Dict:
    """``result``'s row of ``method`` at basis ratio ``ratio``, as
    ``{"seed", "drops", "small", "params_pct"}`` with the drops on ``split`` and
    ``small`` whether every domain is within the target's share of params."""
    rows = [r for r in result["rows"] if r["method"] == method
            and abs(r["basis_ratio"] - ratio) < 1e-9]
    if len(rows) != 1:
        raise ValueError(f"the run of seed {result['settings'].get('seed')} has {len(rows)} rows "
                         f"of method {method!r} at ratio {ratio}, expected 1")
    row = rows[0]
    if split != "val" and split not in row:
        raise ValueError(f"the run of seed {result['settings'].get('seed')} was not scored on "
                         f"split {split!r}")
    drops = list(_split(row, split)["drop_points"])
    return {"seed": result["settings"].get("seed"), "drops": drops,
            "small": max(row["params_pct"]) <= TARGET_PARAMS_PCT,
            "params_pct": list(row["params_pct"])}


def summarise(results: Sequence[Dict], *, method: str = "basis", ratio: Optional[float] = None,
              split: str = "test") -> Dict:
    """The readings R1-R3 (module docstring) over ``results`` (parsed
    basis_experiment.json files of one recipe, one per seed), each domain's mean
    drop over the seeds and its standard error :math:`s / \\sqrt{n}` (``domain_se``;
    ``mean_drop_se`` for the seeds' mean drops; None with one seed)."""
    if not results:
        raise ValueError("results must hold at least one basis_experiment.json run, got none")
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    recipe = _recipe(results[0]["settings"])
    for r in results[1:]:
        other = _recipe(r["settings"])
        if other != recipe:
            diff = sorted(k for k in set(recipe) | set(other) if recipe.get(k) != other.get(k))
            raise ValueError(f"the runs differ in {', '.join(diff)}: summarise runs of one "
                             "recipe that differ only in the seed")
    seeds = [r["settings"].get("seed") for r in results]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"each run must be of a different seed, got seeds {seeds}")
    if ratio is None:
        ratio = max(recipe["ratios"])
    picked = [pick(r, method, ratio, split) for r in results]
    domains = list(results[0]["domains"])
    by_domain = [[p["drops"][i] for p in picked] for i in range(len(domains))]
    seed_means = [sum(p["drops"]) / len(p["drops"]) for p in picked]
    per_domain = [sum(c) / len(c) for c in by_domain]
    small = all(p["small"] for p in picked)
    r1 = small and all(m < TARGET_DROP for m in seed_means)
    r2 = small and all(d < TARGET_DROP for d in per_domain)
    r3 = [p["seed"] for p in picked if p["small"] and max(p["drops"]) < TARGET_DROP]
    return {"method": method, "ratio": ratio, "split": split, "domains": domains,
            "seeds": picked, "domain_mean_drops": per_domain, "params_ok": small,
            "domain_se": [_standard_error(c) for c in by_domain] if len(picked) > 1 else None,
            "mean_drop_se": _standard_error(seed_means),
            "R1": r1, "R2": r2, "R3": r3, "settings": recipe}


def _standard_error(values: Sequence[float]) -> Optional[float]:
    """:math:`s / \\sqrt{n}` of ``values`` (None for fewer than two)."""
    return statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else None


def _reference_acc(result: Dict, method: str, split: str) -> list:
    """The accuracies on ``split`` that ``method``'s drops are taken against: its
    "(reference, ...)" row when it has one, else its unpruned row."""
    rows = ([r for r in result["rows"] if r["method"].startswith(f"{method} (reference")]
            or [r for r in result["rows"] if r["method"] == method and r["basis_ratio"] == 0])
    if not rows:
        raise ValueError(f"the run of seed {result['settings'].get('seed')} has no reference or "
                         f"unpruned row of method {method!r}")
    return list(_split(rows[0], split)["acc"])


def compare(base: Sequence[Dict], new: Sequence[Dict], *, method: str = "basis",
            ratio: Optional[float] = None, split: str = "test") -> Dict:
    r"""Recipe ``new`` against recipe ``base`` (each a list of runs of one recipe,
    as for :func:`summarise`) on the seeds both ran: per seed and domain the drop
    before and after and the change :math:`\Delta = \mathrm{drop}_{new} -
    \mathrm{drop}_{base}` (negative: ``new`` loses less), each domain's mean drop
    over those seeds before and after and its change, and per seed whether both
    reference rows have the same accuracies (then :math:`\Delta` is the recipe's
    alone). ``ratio`` defaults to the deepest of ``new``; ``base`` must have a row
    there too."""
    after = summarise(new, method=method, ratio=ratio, split=split)
    before = summarise(base, method=method, ratio=after["ratio"], split=split)
    if before["domains"] != after["domains"]:
        raise ValueError(f"the recipes cover different domains: {before['domains']} and "
                         f"{after['domains']}")
    old = {r["settings"].get("seed"): r for r in base}
    fresh = {r["settings"].get("seed"): r for r in new}
    shared = [s for s in fresh if s in old]
    if not shared:
        raise ValueError(f"no seed was run by both recipes: base has {sorted(old)}, new has "
                         f"{sorted(fresh)}")
    drops_a = {p["seed"]: p["drops"] for p in before["seeds"]}
    drops_b = {p["seed"]: p["drops"] for p in after["seeds"]}
    pairs = []
    for seed in shared:
        a, b = drops_a[seed], drops_b[seed]
        same = _reference_acc(old[seed], method, split) == _reference_acc(fresh[seed], method,
                                                                          split)
        pairs.append({"seed": seed, "before": a, "after": b,
                      "change": [y - x for x, y in zip(a, b)], "same_reference": same})
    n = len(after["domains"])
    mean_a = [sum(p["before"][i] for p in pairs) / len(pairs) for i in range(n)]
    mean_b = [sum(p["after"][i] for p in pairs) / len(pairs) for i in range(n)]
    changed = sorted(k for k in set(before["settings"]) | set(after["settings"])
                     if before["settings"].get(k) != after["settings"].get(k))
    return {"method": method, "ratio": after["ratio"], "split": split, "domains": after["domains"],
            "pairs": pairs,
            "mean_before": mean_a, "mean_after": mean_b,
            "mean_change": [y - x for x, y in zip(mean_a, mean_b)],
            "unpaired": sorted(set(old) ^ set(fresh)),
            "settings_changed": {k: (before["settings"].get(k), after["settings"].get(k))
                                 for k in changed}}


def _seeds(n: int) -> str:
    return f"{n} seed" + ("" if n == 1 else "s")


def _num(v: float, digits: int = 1) -> str:
    text = f"{v:.{digits}f}"
    return text[1:] if text.startswith("-") and text.strip("-0.") == "" else text  # no "-0.0"


def to_markdown(s: Dict) -> str:
    """The summary as a markdown table (one row per seed, then the mean over seeds)
    and the three readings."""
    names = s["domains"]
    head = (["seed", "fewer params than the backbone (least, over domains)"]
            + [f"drop {n}" for n in names] + ["mean drop", "max drop"])
    lines = [f"Method {s['method']!r} at basis ratio {s['ratio']:.2f}, {s['split']} split, "
             f"{_seeds(len(s['seeds']))}; drops in points against each run's reference row.", "",
             "| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for p in s["seeds"]:
        d = p["drops"]
        lines.append("| " + " | ".join(
            [str(p["seed"]), f"{100 - max(p['params_pct']):.1f}%"]
            + [_num(v) for v in d] + [_num(sum(d) / len(d)), _num(max(d))]) + " |")
    m = s["domain_mean_drops"]
    lines.append("| " + " | ".join(["mean over seeds", ""] + [_num(v, 2) for v in m]
                                   + [_num(sum(m) / len(m), 2), _num(max(m), 2)]) + " |")
    if s["domain_se"] is not None:
        lines.append("| " + " | ".join(["standard error of that mean", ""]
                                       + [_num(v, 2) for v in s["domain_se"]]
                                       + [_num(s["mean_drop_se"], 2), ""]) + " |")
    n = len(s["seeds"])
    verdict = {True: "met", False: "NOT met"}
    lines += ["",
              f"- R1 (every seed's mean drop under 1 point): {verdict[s['R1']]}",
              f"- R2 (every domain's drop, averaged over the seeds, under 1 point): "
              f"{verdict[s['R2']]}",
              f"- R3 (every domain within 1 point): {len(s['R3'])} of {n} seeds "
              f"({', '.join(str(x) for x in s['R3']) or 'none'})"]
    if not s["params_ok"]:
        lines.append(f"- some seed's row keeps more than {TARGET_PARAMS_PCT:g}% of the "
                     "backbone's params in a domain: no reading can be met")
    return "\n".join(lines) + "\n"


def comparison_markdown(c: Dict) -> str:
    """:func:`compare`'s result as a markdown table, one row per shared seed."""
    names = c["domains"]

    def cell(a: float, b: float, digits: int = 1) -> str:
        return f"{_num(a, digits)} -> {_num(b, digits)} ({_num(b - a, digits)})"
    head = ["seed", "same reference"] + [f"drop {n}" for n in names] + ["mean drop"]
    what = "; ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in c["settings_changed"].items())
    lines = [f"Paired by seed: method {c['method']!r} at basis ratio {c['ratio']:.2f}, "
             f"{c['split']} split, {_seeds(len(c['pairs']))} run by both recipes"
             + (f" (unpaired: {', '.join(map(str, c['unpaired']))})" if c["unpaired"] else "")
             + f". Drops in points, base -> new (change); the recipes differ in: "
             f"{what or 'nothing'}.", "",
             "| " + " | ".join(head) + " |", "|---:|---|" + "---:|" * (len(head) - 2)]
    for p in c["pairs"]:
        a, b = p["before"], p["after"]
        lines.append("| " + " | ".join(
            [str(p["seed"]), "yes" if p["same_reference"] else "no"]
            + [cell(x, y) for x, y in zip(a, b)] + [cell(sum(a) / len(a), sum(b) / len(b))])
            + " |")
    mean_a, mean_b = c["mean_before"], c["mean_after"]
    lines.append("| " + " | ".join(
        ["mean over seeds", ""] + [cell(x, y, 2) for x, y in zip(mean_a, mean_b)]
        + [cell(sum(mean_a) / len(names), sum(mean_b) / len(names), 2)]) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> Dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="basis_experiment.json files, one per seed")
    ap.add_argument("--method", default="basis")
    ap.add_argument("--ratio", type=float, default=None,
                    help="basis ratio of the row to read (default: the deepest)")
    ap.add_argument("--split", default="test", choices=("val", "test"))
    ap.add_argument("--out", default=None, help="also write the markdown here")
    ap.add_argument("--against", nargs="+", default=None, metavar="RUN",
                    help="basis_experiment.json files of an earlier recipe: compare seed by seed")
    args = ap.parse_args(argv)
    results = [_load(path) for path in args.runs]
    summary = summarise(results, method=args.method, ratio=args.ratio, split=args.split)
    md = to_markdown(summary)
    if args.against:
        summary["comparison"] = compare([_load(p) for p in args.against], results,
                                        method=args.method, ratio=args.ratio, split=args.split)
        md += "\n" + comparison_markdown(summary["comparison"])
    print(md, end="")
    if args.out:
        write_atomic(args.out, md)
    return summary


def _load(path: str) -> Dict:
    with open(path) as f:
        return json.load(f)


if __name__ == "__main__":
    main()
