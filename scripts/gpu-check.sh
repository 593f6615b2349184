#!/usr/bin/env bash
# The prepared GPU check: everything a lent GPU machine should run, in one call.
#
#   bash scripts/gpu-check.sh            # about 8 minutes on an H100/H200
#
# On the GPU machine torch and triton are preinstalled and nothing can be
# downloaded: fastmdl runs from this source tree (PYTHONPATH, its C++ extension
# built in place, without the CUDA C++ kernel this check does not need;
# FASTMDL_CUDA=1 builds it too; fastmdl/kernels links to kernels/).
# Then, each step under its own time limit so one that hangs cannot eat the lease:
#   1. the GPU tests (tests/compact/test_gpu.py, the CUDA cases of
#      tests/test_segment_ops.py, tests/backends/test_gpu.py);
#   2. benchmarks/gpu_compact.py: the compact layout's checks, per-layer timings
#      against cuDNN, and the model against one unpruned network;
#   3. if time is left, benchmarks/gpu.py --quick (the union-layout op).
# Everything lands in $OUT (default ./gpu-out): the logs, gpu_compact.md/.json,
# gpu.md. Exit status: that of the first failing step.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
start=$(date +%s)
left() { echo $(( ${GPU_CHECK_BUDGET:-540} - ($(date +%s) - start) )); }
status=0
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local avail; avail=$(left)
  if [ "$avail" -lt 30 ]; then echo "== $name: skipped (time budget)" | tee -a "$OUT/summary.log"; return; fi
  [ "$limit" -gt "$avail" ] && limit=$avail
  echo "== $name (limit ${limit}s)" | tee -a "$OUT/summary.log"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $(( $(date +%s) - start ))s" | tee -a "$OUT/summary.log"
  [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,memory.total --format=csv | tee "$OUT/summary.log"
${PY:-python3} -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$OUT/summary.log"

PY=${PY:-python3}
[ "${FASTMDL_CUDA:-0}" = 1 ] || export FASTMDL_NO_CUDA=1
ln -sfn ../kernels fastmdl/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
step build 240 $PY setup.py -q build_ext --inplace

if $PY -c "import pytest" 2>/dev/null; then
  step tests_compact 150 $PY -m pytest -q -x -p no:cacheprovider tests/compact/test_gpu.py \
    tests/test_segment_ops.py
  step tests_union 120 $PY -m pytest -q -x -p no:cacheprovider tests/backends/test_gpu.py
else
  echo "== tests: skipped (pytest is not installed on this machine)" | tee -a "$OUT/summary.log"
fi
step gpu_compact 240 $PY benchmarks/gpu_compact.py --dtype float16 --budget 220 --out "$OUT"
step gpu_quick 200 $PY benchmarks/gpu.py --quick --budget 180 --out "$OUT"
exit $status
