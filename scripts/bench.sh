#!/usr/bin/env bash
# The main job, from nothing: set up ./.venv, then run the CPU op benchmark
# (table on stdout; markdown and JSON under benchmarks/out/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/python benchmarks/cpu_op.py "$@"
