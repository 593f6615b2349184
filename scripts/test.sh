#!/usr/bin/env bash
# The test suite, from nothing: set up ./.venv (scripts/bootstrap.sh), then run pytest.
# On a machine without CUDA, Triton kernels run in its CPU interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/fastmdl info   # the console script: the source tree in the CWD must not shadow the install
exec .venv/bin/pytest "$@"
