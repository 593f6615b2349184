"""The budget experiment's table read over several seeds (``experiment.py --seed S``).

    python benchmarks/experiment_seeds.py out/seed_0/experiment.json out/seed_1/experiment.json ...
                                          [--out DIR] [--within 2.0]

Every row of one seed moves by a point or more from noise alone (faces has 30 test
images: one image is 3.3 points), so one seed's table cannot say whether a budget
row is "within 2 points" of the unpruned model. This prints, per row, each value as
its mean over the seeds and the standard error of that mean (the seeds' sample
standard deviation over the square root of their number), and for every row under
budget 1.0 the paper's claim, read three ways:

- at budget: every domain's own FLOPs are within ``BUDGET_SLACK`` of the budget on
  every seed (a row far over its budget has not been pruned to it, whatever its
  accuracy says);
- cheaper: the deployed network is below ONE single-domain network in params AND in
  FLOPs on every seed;
- accuracy against budget 1.0 and against the fine-tuned baselines: the per-seed
  paired difference of mean accuracy (row minus reference), its mean and standard
  error over the seeds, and whether it is within ``within`` points on the mean and
  on every seed.

Runs that differ in anything but the training seed (and the date, threads and time
taken) are refused: the spread must be the seeds', not two recipes'.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from typing import Dict, List, Sequence

# How far over its budget a domain may end (a filter is a few % of a small net's cost).
BUDGET_SLACK = 0.02
# Result keys that may differ between the runs being summarised.
PER_RUN = ("seed", "date", "threads", "seconds", "torch", "rows")


def mean_se(values: Sequence[float]) -> Dict[str, float]:
    """``{"mean", "se"}`` of ``values``; se = sample standard deviation / sqrt(n)
    (0 for a single value, which has no spread to estimate)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_se needs at least one value")
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "se": se}


def _recipe(result: Dict) -> Dict:
    recipe = {k: v for k, v in result.items() if k not in PER_RUN}
    recipe["row_names"] = [r["name"] for r in result["rows"]]
    return recipe


def summarise(results: Sequence[Dict], *, within: float = 2.0) -> Dict:
    """The seeds' table and claim readings (see the module docstring) as a dict."""
    if len(results) < 2:
        raise ValueError(f"results must hold at least two runs, got {len(results)}")
    first = _recipe(results[0])
    for r in results[1:]:
        other = _recipe(r)
        diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if diff:
            raise ValueError(f"the runs differ in more than the seed: {', '.join(diff)}")
    seeds = [r.get("seed") for r in results]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"each run must have its own seed, got {seeds}")
    names = first["row_names"]
    baseline, reference = names[0], next(n for n in names if n.startswith("budget 1.0"))
    by_name = [{row["name"]: row for row in r["rows"]} for r in results]
    rows = []
    for name in names:
        runs = [b[name] for b in by_name]
        row = {"name": name, "budget": runs[0]["budget"], "sharing": runs[0]["sharing"]}
        row["accuracy"] = [mean_se([100 * r["accuracy"][d] for r in runs])
                           for d in range(len(runs[0]["accuracy"]))]
        for key, scale in (("mean_accuracy", 100), ("decathlon", 1), ("params_vs_one", 1),
                           ("flops_vs_one", 1)):
            row[key] = mean_se([scale * r[key] for r in runs])
        row["domain_flops"] = [mean_se([100 * r["domain_flops"][d] for r in runs])
                               for d in range(len(runs[0]["domain_flops"]))]
        if row["budget"] is not None and row["budget"] < 1.0:
            row["cheaper_every_seed"] = all(r["params_vs_one"] < 1 and r["flops_vs_one"] < 1
                                            for r in runs)
            row["at_budget_every_seed"] = all(
                max(r["domain_flops"]) <= r["budget"] + BUDGET_SLACK for r in runs)
            for label, ref in (("vs_budget_1", reference), ("vs_baselines", baseline)):
                diffs = [100 * (b[name]["mean_accuracy"] - b[ref]["mean_accuracy"])
                         for b in by_name]
                row[label] = {**mean_se(diffs), "per_seed": diffs,
                              "within_on_mean": statistics.fmean(diffs) >= -within,
                              "within_every_seed": all(d >= -within for d in diffs)}
        rows.append(row)
    return {"seeds": seeds, "domains": results[0]["domains"], "within": within,
            "recipe": {k: v for k, v in first.items() if k != "row_names"}, "rows": rows}


def _ms(v: Dict[str, float], digits: int = 1) -> str:
    return f"{v['mean']:.{digits}f} ± {v['se']:.{digits}f}"


def to_markdown(s: Dict) -> str:
    """The summary as markdown: the table over seeds, then the claim per budget row."""
    names = s["domains"]
    out = [f"Seeds {', '.join(str(x) for x in s['seeds'])}: mean ± standard error over the "
           f"seeds ({len(s['seeds'])} runs).", "",
           "| model | " + " | ".join(f"{n} %" for n in names) + " | mean % | decathlon | "
           "params vs one | FLOPs vs one | each domain's FLOPs vs one (%) |",
           "|---|" + "---:|" * (len(names) + 5)]
    for r in s["rows"]:
        accs = " | ".join(_ms(a) for a in r["accuracy"])
        own = " ".join(f"{f['mean']:.0f}" for f in r["domain_flops"])
        out.append(f"| {r['name']} | {accs} | {_ms(r['mean_accuracy'])} | "
                   f"{_ms(r['decathlon'], 0)} | {_ms(r['params_vs_one'], 2)} | "
                   f"{_ms(r['flops_vs_one'], 2)} | {own} |")
    out += ["", f"The claim (all domains together, below ONE network in params and FLOPs, "
            f"mean accuracy within {s['within']:g} points); differences are row minus "
            "reference, per seed, in points:", "",
            "| row | every domain at its budget (every seed) | below one network (every "
            "seed) | vs budget 1.0 | per seed | within (mean / every seed) | vs baselines | "
            "per seed | within (mean / every seed) |",
            "|---|---|---|---:|---|---|---:|---|---|"]
    yn = {True: "yes", False: "no"}
    for r in s["rows"]:
        if "cheaper_every_seed" not in r:
            continue
        cells = []
        for label in ("vs_budget_1", "vs_baselines"):
            v = r[label]
            cells += [_ms(v), " ".join(f"{d:+.1f}" for d in v["per_seed"]),
                      f"{yn[v['within_on_mean']]} / {yn[v['within_every_seed']]}"]
        out.append(f"| {r['name']} | {yn[r['at_budget_every_seed']]} | "
                   f"{yn[r['cheaper_every_seed']]} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: List[str] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="experiment.json of each seed")
    ap.add_argument("--out", default=None,
                    help="directory for experiment_seeds.md and .json (default: print only)")
    ap.add_argument("--within", type=float, default=2.0,
                    help="the accuracy bar in points (default 2)")
    args = ap.parse_args(argv)
    results = []
    for path in args.runs:
        with open(path) as f:
            results.append(json.load(f))
    try:
        s = summarise(results, within=args.within)
    except ValueError as e:
        print(f"experiment_seeds: error: {e}", file=sys.stderr)
        return 2
    text = to_markdown(s)
    print(text)
    if args.out:
        from fastmdl._io import write_report

        write_report(args.out, "experiment_seeds", text, s)
        print(f"written to {os.path.abspath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
