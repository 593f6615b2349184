"""The budget-aware pruning experiment on the built-in benchmark (see
fastmdl/experiment.py; also `fastmdl experiment`).

    python benchmarks/experiment.py [--out benchmarks/out/experiment] [--epochs 2]
                                    [--max-train 1000] [--budgets 0.75 0.5 0.25]
                                    [--sharing none intersection union jaccard]
                                    [--seed 0] [--backbone-seed S] [--data-seed S]
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
    ap.add_argument("--seed", type=int, default=0,
                    help="heads, masks and batch order of every row")
    ap.add_argument("--backbone-seed", type=int, default=None,
                    help="the pretrained backbone's seed (default: --seed)")
    ap.add_argument("--data-seed", type=int, default=None,
                    help="the data splits' seed (default: --seed)")
    args = ap.parse_args()
    run(args.out, epochs=args.epochs, max_train=args.max_train, budgets=args.budgets,
        sharing=[None if s == "none" else s for s in args.sharing], progress=False,
        fill=not args.no_fill, seed=args.seed, backbone_seed=args.backbone_seed,
        data_seed=args.data_seed)
    sys.exit(0)
