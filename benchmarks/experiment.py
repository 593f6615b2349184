"""The budget-aware pruning experiment on the built-in benchmark (see
fastmdl/experiment.py; also `fastmdl experiment`).

    python benchmarks/experiment.py [--out benchmarks/out/experiment] [--epochs 2]
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
    args = ap.parse_args()
    run(args.out, epochs=args.epochs, max_train=args.max_train, progress=False)
    sys.exit(0)
