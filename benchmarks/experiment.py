"""The budget-aware pruning experiment on the built-in benchmark (see
fastmdl/experiment.py; also `fastmdl experiment`).

    python benchmarks/experiment.py [--out benchmarks/out/experiment] [--epochs 2]
                                    [--max-train 1000] [--budgets 0.75 0.5 0.25]
                                    [--sharing none intersection union jaccard]
"""

import argparse
import os
import sys

from fastmdl.experiment import run

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "out", "experiment"))
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--max-train", type=int, default=1000)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    ap.add_argument("--sharing", nargs="+", default=["none", "intersection", "union", "jaccard"],
                    choices=["none", "intersection", "union", "jaccard"])
    ap.add_argument("--no-fill", action="store_true",
                    help="train without fastmdl.fill_budget at the end of the anneal")
    args = ap.parse_args()
    run(args.out, epochs=args.epochs, max_train=args.max_train, budgets=args.budgets,
        sharing=[None if s == "none" else s for s in args.sharing], progress=False,
        fill=not args.no_fill)
    sys.exit(0)
