"""Ahead-of-time check of the compact layout's Triton kernel, with no GPU needed.

    python benchmarks/triton_aot.py [--arch 90 80] [--dtype float16 bfloat16 float32]
                                    [--out benchmarks/results/triton_aot] [--jobs 2]

Every configuration the autotuner may pick (``TUNING_SPACE`` and
``TUNING_SPACE_FP32`` of ``fastmdl.kernels.segment_conv2d``, as ``select_configs``
keeps them for a large layer in that dtype) is compiled with ``triton.compile`` for each target GPU and dtype, the PTX
is assembled by Triton's own ptxas with ``-v``, and the table records registers
per thread, spill stores and loads, shared memory, and whether the K loop got
asynchronous copies (``cp.async``) and tensor-core instructions (``wgmma`` on
sm_90, ``mma.sync`` on sm_80). Exit status 1 if any configuration spills: a
spill in the K loop would cost more than the tile gains.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import inspect
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Tuple

DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}
ELEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}
_POINTERS = ("x_ptr", "w_ptr", "b_ptr", "r_ptr", "y_ptr")
_INDEX_POINTERS = ("offsets_ptr", "table_ptr")
# Arguments Triton sees as multiples of 16 at run time when the plan aligns them.
_ALIGNED = _POINTERS + _INDEX_POINTERS + ("P_in", "P_out")


def compile_config(arch: int, dtype: str, config: Tuple[int, int, int, int, int],
                   kernel_size: int = 3) -> Dict:
    """Compile one configuration for sm_<arch>; its resources and instruction mix."""
    import triton
    import triton.backends.nvidia.compiler as nvidia
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastmdl.kernels.segment_conv2d import segment_conv2d_kernel as kernel

    bm, bn, bk, warps, stages = config
    params = list(inspect.signature(kernel.fn).parameters)
    const = dict(KH=kernel_size, KW=kernel_size, D_PAD=16, K_ALIGN=16, HAS_BIAS=True,
                 HAS_RES=True, RELU=True,
                 INPUT_PRECISION="tf32" if dtype == "float32" else "ieee",
                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    signature = {}
    for p in params:
        if p in _POINTERS:
            signature[p] = "*" + DTYPES[dtype]
        elif p in _INDEX_POINTERS:
            signature[p] = "*i64"
        elif p in const:
            signature[p] = "constexpr"
        else:
            signature[p] = "i32"
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(params.index(k),): v for k, v in const.items()},
                       attrs={(params.index(k),): [["tt.divisibility", 16]] for k in _ALIGNED})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    ptx = compiled.asm["ptx"]
    ptxas = nvidia.get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
        run = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", path, "-o",
                              os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{arch} {dtype} {config}: {run.stderr}")
    regs = re.search(r"Used (\d+) registers", run.stderr)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", run.stderr)
    return {"arch": arch, "dtype": dtype, "block_m": bm, "block_n": bn, "block_k": bk,
            "warps": warps, "stages": stages, "registers": int(regs.group(1)) if regs else None,
            "spill_stores": int(spills.group(1)) if spills else 0,
            "spill_loads": int(spills.group(2)) if spills else 0,
            "shared_bytes": int(compiled.metadata.shared),
            "cp_async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
            "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync")}


def configs_for(dtype: str) -> List[Tuple[int, int, int, int, int]]:
    """The configurations the autotuner may time for ``dtype`` on a large layer."""
    import triton

    from fastmdl.kernels import segment_conv2d as module

    kept = module.select_configs(module.tuning_configs(), 1 << 16, 1 << 10, 1 << 12, 3, 3,
                                 ELEM_BYTES[dtype])
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps,
             c.num_stages) for c in kept]


def _table(rows: List[Dict]) -> str:
    head = ("| arch | dtype | tile (M x N x K) | warps | stages | registers | spills (st/ld B) "
            "| shared KiB | cp.async | tensor-core ops |")
    lines = [head, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        tc = r["wgmma"] if r["arch"] >= 90 else r["mma_sync"]
        lines.append(f"| sm_{r['arch']} | {r['dtype']} | {r['block_m']}x{r['block_n']}x"
                     f"{r['block_k']} | {r['warps']} | {r['stages']} | {r['registers']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['shared_bytes'] / 1024:.0f} | "
                     f"{r['cp_async']} | {tc} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "triton_aot"))
    args = ap.parse_args(argv)
    import torch
    import triton

    work = [(arch, dtype, cfg) for arch in args.arch for dtype in args.dtype
            for cfg in configs_for(dtype)]
    rows: List[Dict] = []
    with cf.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(compile_config, *w) for w in work]
        for i, f in enumerate(cf.as_completed(futures), 1):
            rows.append(f.result())
            print(f"\r{i}/{len(work)} compiled", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    rows.sort(key=lambda r: (-r["arch"], r["dtype"], -r["block_m"], -r["block_n"], -r["block_k"]))
    stamp = datetime.date.today().isoformat()
    text = (f"segment_conv2d_kernel compiled ahead of time ({stamp}; triton {triton.__version__}, "
            f"torch {torch.__version__}; 3x3 kernel, K_ALIGN=16, bias, residual and ReLU)\n\n"
            + _table(rows))
    print(text)
    from fastmdl._io import write_report
    write_report(args.out, "triton_aot", text,
                 {"date": stamp, "triton": triton.__version__, "rows": rows})
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    if spilled:
        print(f"FAIL: {len(spilled)} configuration(s) spill registers", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
