"""fastmdl's command line (also python -m fastmdl from outside a source checkout).

  fastmdl info                    versions, and which backends really run here
  fastmdl demo [--out DIR]        the whole method on the built-in benchmark:
                                  pretrain, train masks, prune, serve (minutes on a CPU)
  fastmdl experiment [--out DIR]  the budget x sharing-loss table against
                                  fine-tuned baselines (about 40 minutes on 2 cores)
  fastmdl decathlon ROOT          the papers' protocol on your Visual Decathlon devkit:
                                  ResNet-26, budgets 1.0/0.75/0.5/0.25, decathlon score
  fastmdl serve MODEL_FILE        serve a model saved by fastmdl.save over HTTP
                                  (needs aiohttp)

fastmdl COMMAND --help describes each command's options.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the
    exit status: 0 on success, 2 for a usage error, a missing dependency or a
    model file that cannot be served."""
    parser = argparse.ArgumentParser(prog="fastmdl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, and which backends are usable here")
    dp = sub.add_parser("demo", help="pretrain, train masks at budget 0.5, prune and serve, "
                                     "on the built-in benchmark")
    dp.add_argument("--out", default="fastmdl-demo", help="report directory: report.md, report.json, report.png and the "
                         "pruned model (default: %(default)s)")
    dp.add_argument("--budget", type=float, default=0.5,
                    help="each domain's cost limit, a fraction in (0, 1] of one "
                         "single-domain network's FLOPs (default: %(default)s)")
    dp.add_argument("--epochs", type=int, default=3,
                    help="mask-training epochs (default: %(default)s)")
    ep = sub.add_parser("experiment", help="budgets 1.0/0.75/0.5/0.25 x sharing losses against "
                                           "fine-tuned baselines, on the built-in benchmark")
    ep.add_argument("--out", default="fastmdl-experiment",
                    help="report directory: experiment.md, experiment.json, experiment.png "
                         "(default: %(default)s)")
    ep.add_argument("--epochs", type=int, default=2,
                    help="training epochs of every run, masks and baselines alike "
                         "(default: %(default)s)")
    _add_decathlon(sub)
    sp = sub.add_parser("serve", help="serve a saved pruned model over HTTP",
                        description="Serve a model saved by fastmdl.save over HTTP: "
                                    "POST /v1/predict, GET /health, GET /metrics. "
                                    "Stops on SIGINT or SIGTERM.")
    sp.add_argument("model_file", metavar="MODEL_FILE", help="a file written by fastmdl.save")
    sp.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: %(default)s)")
    sp.add_argument("--port", type=int, default=8000,
                    help="port to listen on; 0 lets the OS pick one (default: %(default)s)")
    sp.add_argument("--device", default=None, help="where the model runs, e.g. cpu or cuda:0 "
                                                   "(default: cpu)")
    sp.add_argument("--max-batch-size", type=int, default=64,
                    help="most requests in one pass of the model (default: %(default)s)")
    sp.add_argument("--max-delay-ms", type=float, default=2.0,
                    help="how long a request may wait for others to batch with "
                         "(default: %(default)s)")
    sp.add_argument("--max-queue", type=int, default=4096,
                    help="most requests waiting; beyond it clients get 503 (default: %(default)s)")
    sp.add_argument("--max-body-mb", type=float, default=None,
                    help="largest request body in MiB; larger ones get 413 (default: room for "
                         "one image as JSON)")
    sp.add_argument("--body-timeout-s", type=float, default=30.0,
                    help="seconds a request body has to arrive; slower ones get 408 "
                         "(default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import report

        print(report())
        return 0
    if args.command == "experiment":
        from .data import SourceMissing
        from .experiment import run as run_experiment

        try:
            run_experiment(args.out, epochs=args.epochs)
        except (SourceMissing, ValueError) as e:
            print(f"fastmdl experiment: error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "decathlon":
        return _decathlon(args)
    if args.command == "demo":
        from .data import SourceMissing
        from .demo import run

        try:
            run(args.out, budget=args.budget, epochs=args.epochs)
        except (SourceMissing, ValueError) as e:
            print(f"fastmdl demo: error: {e}", file=sys.stderr)
            return 2
        return 0
    return _serve(args)


def _add_decathlon(sub) -> None:
    from .decathlon import BUDGETS, DOMAINS, SHARING

    p = sub.add_parser(
        "decathlon", help="the papers' protocol on a Visual Decathlon devkit you have",
        description="Run the budget-aware pruning protocol of dos Santos et al. on the Visual "
                    "Decathlon devkit at ROOT (annotations/<domain>_<split>.json, data/<domain>/"
                    "..., and optionally decathlon_mean_std.pickle): for each budget, a "
                    "ResNet-26 converted for the domains, its masks trained on the train "
                    "splits (random 64x64 crops and flips of images scaled to a shorter side "
                    "of 72, the devkit's per-domain mean and std), pruned and evaluated on the "
                    "val splits (72x72 centre crops). Reports val accuracy, the decathlon score "
                    "against the budget-1.0 model (Emax = 2 x its error) and the params and "
                    "FLOPs of each pruned network.",
        epilog="Budgets, ResNet-26, the sharing losses and the score follow the papers; "
               "epochs, batch size, learning rates and the default sharing loss are fastmdl's "
               "defaults, not the papers' (see the docstring of fastmdl.decathlon). Tiny CPU "
               "check: fastmdl decathlon ROOT --domains dtd gtsrb --budgets 1.0 0.5 --epochs 1 "
               "--width 0.25 --max-train 64 --max-eval 64")
    p.add_argument("root", metavar="ROOT", help="the devkit's directory")
    p.add_argument("--domains", nargs="+", default=list(DOMAINS), metavar="NAME",
                   help="domains to train together, as the devkit names them "
                        f"(default: all ten: {' '.join(DOMAINS)})")
    p.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS), metavar="B",
                   help="each domain's FLOPs limit, a fraction in (0, 1] of one ResNet-26's; "
                        "1.0 is always run, first, as the score's reference "
                        f"(default: {' '.join(map(str, BUDGETS))})")
    p.add_argument("--sharing", choices=["none", *SHARING],
                   default="jaccard",
                   help="parameter-sharing loss below budget 1.0 (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=5,
                   help="training epochs per budget; an epoch is as many steps as the largest "
                        "domain has batches (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="images per domain in each mixed-domain step (default: %(default)s)")
    p.add_argument("--width", type=float, default=1.0,
                   help="ResNet-26 filter multiplier; 1.0 is the papers' 64/128/256 "
                        "(default: %(default)s)")
    p.add_argument("--backbone", default=None, metavar="PATH",
                   help="state_dict of a pretrained fastmdl.models.resnet26 at --width, saved "
                        "with torch.save and read with weights_only=True (default: random "
                        "initialisation)")
    p.add_argument("--train-weights", action="store_true",
                   help="train the shared weights with the masks even with --backbone "
                        "(without --backbone they always train)")
    p.add_argument("--max-train", type=int, default=None, metavar="N",
                   help="at most N train images per domain, a seeded random subset "
                        "(default: all)")
    p.add_argument("--max-eval", type=int, default=None, metavar="N",
                   help="at most N val images per domain, a seeded random subset (default: all)")
    p.add_argument("--workers", type=int, default=0,
                   help="DataLoader processes reading images per domain (default: %(default)s, "
                        "in the main process)")
    p.add_argument("--device", default=None,
                   help="where to train, e.g. cpu or cuda:0 (default: cuda if available, "
                        "else cpu)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of initialisation, data order, crops and subsets "
                        "(default: %(default)s)")
    p.add_argument("--out", default="fastmdl-decathlon",
                   help="report directory: decathlon.md and decathlon.json "
                        "(default: %(default)s)")


def _decathlon(args: argparse.Namespace) -> int:
    from .decathlon import run

    try:
        run(args.root, args.out, domains=args.domains, budgets=args.budgets,
            sharing=None if args.sharing == "none" else args.sharing, epochs=args.epochs,
            batch_size=args.batch_size, width=args.width, backbone=args.backbone,
            train_weights=True if args.train_weights else None, max_train=args.max_train,
            max_eval=args.max_eval, workers=args.workers, device=args.device, seed=args.seed)
    except (ValueError, OSError) as e:
        # One line, no traceback: these are the user's directory, files or options.
        print(f"fastmdl decathlon: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


def _serve(args: argparse.Namespace) -> int:
    def fail(message: str) -> int:
        print(f"fastmdl serve: error: {message}", file=sys.stderr)
        return 2

    try:
        from .server import require_aiohttp

        require_aiohttp()  # before loading a model: say at once what is missing
    except ImportError as e:
        return fail(str(e))
    from .server import serve

    max_body = None
    if args.max_body_mb is not None:
        if not 0 < args.max_body_mb < float("inf"):
            return fail(f"--max-body-mb must be a positive number, got {args.max_body_mb}")
        max_body = max(1, int(args.max_body_mb * 2**20))
    if not 0 <= args.port <= 65535:
        return fail(f"--port must be in [0, 65535], got {args.port}")
    try:
        serve(args.model_file, args.host, args.port, device=args.device,
              max_batch_size=args.max_batch_size, max_delay_ms=args.max_delay_ms,
              max_queue=args.max_queue, max_body_bytes=max_body,
              body_timeout_s=args.body_timeout_s)
    except KeyboardInterrupt:  # a SIGINT before the server installed its handler
        return 130
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        # One line, no traceback: these are the user's file, device or port.
        text = " ".join(str(e).split()) or type(e).__name__
        return fail(text if isinstance(e, (ValueError, OSError)) else
                    f"{type(e).__name__}: {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
