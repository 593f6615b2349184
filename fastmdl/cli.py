"""Command line: ``fastmdl info`` (also ``python -m fastmdl info``)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="fastmdl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, and which backends are usable here")
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import report

        print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
