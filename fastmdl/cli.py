"""fastmdl's command line (also python -m fastmdl from outside a source checkout).

  fastmdl info                    versions, and which backends really run here
  fastmdl demo [--out DIR]        the whole method on the built-in benchmark:
                                  pretrain, train masks, prune, serve (minutes on a CPU)
  fastmdl experiment [--out DIR]  the budget x sharing-loss table against
                                  fine-tuned baselines (about 40 minutes on 2 cores)
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
