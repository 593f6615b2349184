#!/usr/bin/env bash
# The main job, from a fresh machine: set everything up (scripts/bootstrap.sh),
# then run `fastmdl demo` (pretrain or reuse the backbone, train masks at budget
# 0.5 on the built-in benchmark, prune, serve a mixed batch, write a report).
#   FASTMDL_DEMO_OUT  the report directory (default ./fastmdl-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/fastmdl demo --out "${FASTMDL_DEMO_OUT:-fastmdl-demo}"
