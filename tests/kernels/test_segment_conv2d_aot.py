"""The compact layout's Triton kernel compiled ahead of time for sm_90 and sm_80 on a
machine with no GPU (benchmarks/triton_aot.py does every configuration; here a
few, under a time bound): no register spills, asynchronous copies into shared
memory, tensor-core instructions. And the autotuner keeps to the spill-free
configurations of the operands' dtype."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Compiling one configuration takes 1-10 s here; the bound catches a compiler that
# hangs or a kernel whose compile time explodes, not a slow machine.
TIME_BOUND_S = 300

CASES = [(90, "float16", (128, 128, 32, 8, 3)), (90, "float32", (64, 64, 32, 4, 4)),
         (80, "bfloat16", (64, 64, 64, 8, 3))]


def _compile_in_subprocess(cases, cwd):
    # Not from the checkout's root: `python -c` puts the working directory first on
    # sys.path, where the source tree's fastmdl/ (no kernels/ inside) would shadow
    # the installed package.
    code = (f"import json, sys; sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r});"
            "from triton_aot import compile_config;"
            f"print(json.dumps([compile_config(a, d, tuple(c)) for a, d, c in {cases!r}]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=TIME_BOUND_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_configurations_compile_without_spills_within_the_time_bound(tmp_path):
    pytest.importorskip("triton.backends.nvidia.compiler")
    rows = _compile_in_subprocess([(a, d, list(c)) for a, d, c in CASES], tmp_path)
    for (arch, dtype, config), row in zip(CASES, rows):
        where = f"sm_{arch} {dtype} {config}"
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, where
        assert 0 < row["registers"] <= 255, where
        assert row["cp_async"] > 0, f"{where}: no asynchronous copies in the K loop"
        tensor_core = row["wgmma"] if arch >= 90 else row["mma_sync"]
        assert tensor_core > 0, f"{where}: no tensor-core instructions"


def test_the_autotuner_keeps_the_dtype_s_spill_free_space():
    from fastmdl.kernels import segment_conv2d as k

    configs = k.tuning_configs()

    def keys(elem_bytes):
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
                 c.num_stages) for c in k.select_configs(configs, 1 << 16, 1 << 10, 1 << 12,
                                                          3, 3, elem_bytes)}

    assert keys(2) <= set(k.TUNING_SPACE) and keys(4) <= set(k.TUNING_SPACE_FP32)
    assert keys(4) != keys(2)
    small = keys(2) and k.select_configs(configs, 64, 16, 16 * 9, 3, 3, 2)
    assert small and all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 32
                         for c in small)
