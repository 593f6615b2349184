"""The one-command GPU benchmark (issue 5): fastmdl::domain_conv2d against the cuDNN
contenders on the convolution shapes of ResNet-26 and ResNet-50, and a pruned
10-domain ResNet-26 against one unpruned ResNet-26, all measured in one run.

    python benchmarks/gpu.py              # the full sweep: about 6 minutes on one H100
    python benchmarks/gpu.py --quick      # fewer points: about 3 minutes
    python benchmarks/gpu.py --dry-run    # CPU, tiny shapes, under a minute: no timing claims
    options: --out DIR (default $OUT if set, else benchmarks/out)
             --dtype bfloat16|float16|float32 (default bfloat16; float32 in a dry run)
             --budget SECONDS (time guard, default 450; 240 with --quick)

It prints a table and writes, atomically, under --out: gpu_ops.csv (one row per op
point), gpu_model.csv (one row per model contender and mode), gpu.md (both tables,
the ceilings and the PASS/FAIL block) and gpu.png (speed-ups per op point, images/s
per model contender). Every file starts with a header line naming the GPU, torch,
triton, the dtype and the date, or "DRY RUN on CPU: tiny shapes, no timing claims".

Ceilings, measured first in the same run: an 8192^3 matmul in the benchmark dtype
(TFLOP/s) and a 1 GiB device-to-device copy (GB/s, bytes read + written).

Op level. Layers: the unique convolutions of fastmdl.models.resnet26 at 64x64 (the
Visual-Decathlon ResNet-26: 64/128/256 filters at 64/32/16 pixels) and of a
ResNet-50 (v1.5 bottlenecks) at 224x224, stems left out (3 input channels, never
pruned): contenders.resnet26_layers() and resnet50_layers(), 7 + 22 shapes. Each
domain keeps a random ``keep`` fraction of the layer's input channels and filters;
the layer is then cut to the union of the domains' channels, as fastmdl.prune
leaves it (contenders.union_problem). Axes: D in {1, 2, 4, 10}, N in {1, 8, 64,
256}, keep in {0.25, 0.5, 1.0}; target point D=10, N=64, keep=0.5. The cross
product (29 x 48 points) does not fit in 8 minutes, so the sweep, in this order
(a point already run is not repeated; a time guard reports what it could not run
as skipped), is:
  1. target: every layer at the target point (29 points, the target layers first:
     3x3 with >= 64 channels);
  2. axes: one axis at a time through every value, the others at the target, on
     R26 3x3 64, 128 and 256, R50 3x3 256 @14 and R50 1x1 1024->256 @14;
  3. grid: the full grid D in {4, 10} x N in {8, 64, 256} x keep in {0.25, 0.5,
     1.0} around the target on R26 3x3 128->128 @32.
  81 points in all; at about 2.5 s a point (10 timed variants) about 3.5 minutes.
  --quick: the target point on the 7 ResNet-26 layers and the 4 stride-1 ResNet-50
  3x3 layers, plus the axis sweeps on R26 3x3 128 (19 points, every axis value).

Contenders at each point (all on channels_last inputs, cuDNN benchmark mode):
  (a) per-domain loop over cuDNN with cached sliced weights (gather, conv, scatter),
      eager and CUDA-graphed; each domain's rows are computed once per batch;
  (b) dense conv of the union then a per-sample mask, (c) dense conv of the union
      alone, each eager and graphed, the faster of the two reported;
  (d) ideal = (c) x the fraction of the union's FLOPs the batch needs;
  fastmdl's fused backends (triton, and cuda when fastmdl.backends reports it
  usable), eager and graphed, called as a pruned layer calls them.
Every variant's output (a graph's: after a replay) is checked first against a
float64 oracle computed from the same rounded inputs: the reference backend for
(a) and the fused backends, the dense conv (times the mask) for (c) (and (b)).
A relative error ||got - want|| / ||want|| over the bound for the dtype marks that
variant's timing invalid in the row; it does not stop the run. Times are CUDA-event
medians (triton.testing.do_bench, return_mode="median"). Reported per point:
useful TFLOP/s of the best fused variant (only the FLOPs of the filters each
sample's domain uses) and its fraction of the measured matmul rate, and the ratios
best fused vs (a) eager, vs (a) graphed, vs (b) (times faster) and best / (d).

Model level: a pruned 10-domain ResNet-26 (fastmdl.convert + random masks keeping
0.5 of each layer's filters per domain, 0.7 of them shared, + fastmdl.prune, as in
benchmarks/pruned_model.py) serving a mixed batch of N=64 at 64x64, in images/s:
as one mixed batch on each fused backend, as a per-domain loop (each domain's
sub-batch ready-made, one forward per domain), as a mixed batch on the reference
backend (a per-layer, per-domain cuDNN loop; eager only: it synchronises with the
host), and the unpruned single-domain ResNet-26 (plain torch). Each eager, under a
CUDA graph and under torch.compile (a failure is reported in its row). Logits are
checked against the float64 converted (masked) model, or the float64 unpruned one.

Targets (the PASS/FAIL block; stated for H100, bfloat16, N=64, D=10, keep 0.5, 3x3
layers with >= 64 channels): best fused >= 2x faster than (a) eager and never
slower than (a) graphed, faster than (b) and within 1.3x of (d), on every such
layer; model level: the pruned 10-domain network >= 1.5x the images/s of ONE
unpruned ResNet-26 (each at its best mode).

--dry-run runs all of this on the CPU: three tiny layers (9 points), the reference
and cpp backends (triton too when TRITON_INTERPRET=1 is set), a ResNet-26 of width
0.125 at 16x16, perf_counter medians, no CUDA graphs or GPU ceilings (noted), and
torch.compile with the "eager" backend (graph capture only, no code generation).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import gc
import io
import math
import os
import statistics
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

T0 = time.perf_counter()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from contenders import (Problem, contenders, cuda_graphed, gpu_ceilings, make_problem,  # noqa: E402
                        matmul_gflops, median_seconds, rel_error, resnet26_layers,
                        resnet50_layers, union_problem, write_atomic)
from pruned_model import pruned_resnet26  # noqa: E402

import fastmdl  # noqa: E402
from fastmdl import backends  # noqa: E402
from fastmdl._plot import pyplot, save_png  # noqa: E402
from fastmdl.ops import domain_conv2d  # noqa: E402

DRY_BANNER = "DRY RUN on CPU: tiny shapes, no timing claims"
TARGET = (10, 64, 0.5)  # (D, N, keep)
AXES = {"D": (1, 2, 4, 10), "N": (1, 8, 64, 256), "keep": (0.25, 0.5, 1.0)}
GRID = {"D": (4, 10), "N": (8, 64, 256), "keep": (0.25, 0.5, 1.0)}
FUSED = ("triton", "cuda", "cpp")  # the op's fast backends, each run where usable
MODEL_DOMAINS, MODEL_KEEP, MODEL_SHARED = 10, 0.5, 0.7

# Tiny layers of the dry run, in RESNET_LAYERS' format.
DRY_LAYERS = [("tiny 3x3 16->16 @6", 16, 16, 6, 3, 1, 1),
              ("tiny 3x3 16->32 s2 @6", 16, 32, 6, 3, 2, 1),
              ("tiny 1x1 32->16 @4", 32, 16, 4, 1, 1, 0)]

OP_COLUMNS = [
    "sweep", "layer", "c_in", "c_out", "hw", "k", "stride", "domains", "n", "keep", "dtype",
    "c_in_union", "c_out_union", "useful_fraction", "useful_gflop",
    "ms_a_eager", "ms_a_graphed", "ms_b_eager", "ms_b_graphed", "ms_c_eager", "ms_c_graphed",
    "ms_d_ideal", "ms_triton", "ms_triton_graphed", "ms_cuda", "ms_cuda_graphed", "ms_cpp",
    "best_fused", "ms_best_fused", "useful_tflops_best", "of_matmul_best",
    "speedup_vs_a_eager", "speedup_vs_a_graphed", "speedup_vs_b", "best_over_ideal",
    "max_rel_err", "rel_err_bound", "check", "notes",
]
MODEL_COLUMNS = [
    "contender", "mode", "n", "domains", "size", "width", "dtype", "ms", "images_per_s",
    "vs_unpruned_same_mode", "rel_err", "rel_err_bound", "check", "notes",
]


# ----------------------------------------------------------------------------- set-up

@dataclass
class Run:
    """What every phase needs: device, dtype, mode, backends, timers, the clock."""
    device: torch.device
    dtype: torch.dtype
    dry: bool
    quick: bool
    budget: float
    fused: List[str]
    notes: List[str] = field(default_factory=list)
    peak_tflops: float = float("nan")

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def elapsed(self) -> float:
        return time.perf_counter() - T0

    def time_op(self, fn: Callable) -> float:
        """Median milliseconds of fn()."""
        if self.cuda:
            from triton.testing import do_bench
            return do_bench(fn, warmup=5, rep=25, return_mode="median")
        return 1e3 * median_seconds(fn, warmup=0, repeats=3)  # the check was the warm-up

    def time_once(self, fn: Callable) -> float:
        """One timed call: Triton's CPU interpreter in a dry run (seconds a call)."""
        return 1e3 * median_seconds(fn, warmup=0, repeats=1)

    def time_model(self, fn: Callable) -> float:
        if self.cuda:
            from triton.testing import do_bench
            return do_bench(fn, warmup=25, rep=100, return_mode="median")
        return 1e3 * median_seconds(fn, warmup=0, repeats=3)


def op_bound(dtype: torch.dtype, device_type: str) -> float:
    """Relative-error bound of one convolution against the float64 oracle: a few
    units of output rounding (cuDNN runs float32 convolutions in TF32 on the GPU)."""
    if dtype == torch.bfloat16:
        return 3e-2
    if dtype == torch.float16:
        return 5e-3
    return 5e-3 if device_type == "cuda" else 1e-4


def model_bound(dtype: torch.dtype, device_type: str) -> float:
    """Bound on the logits after 26 layers: rounding compounds through the depth."""
    return {torch.bfloat16: 8e-2, torch.float16: 1.5e-2}.get(
        dtype, 2e-2 if device_type == "cuda" else 1e-4)


def usable_fused(device_type: str, dtype: torch.dtype, notes: List[str]) -> List[str]:
    """The fused backends that run here; why each other one does not goes in notes."""
    names = []
    for name in FUSED:
        if name not in backends.NAMES:
            notes.append(f"backend {name}: not in fastmdl.backends.NAMES "
                         "(not built into this checkout)")
            continue
        try:
            ok, why = backends.status(name, device_type)
        except Exception as exc:  # a backend being added may not answer yet
            ok, why = False, _reason(exc)
        supported = getattr(getattr(backends, name, None), "SUPPORTED_DTYPES", None)
        if ok and supported is not None and dtype not in supported:
            ok, why = False, f"it does not take {dtype}"
        if ok:
            names.append(name)
        elif not (name == "cpp" and device_type == "cuda"):
            notes.append(f"backend {name}: not usable here ({why})")
    return names


def header_line(run: Run) -> str:
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    versions = (f"fastmdl {fastmdl.__version__}; torch {torch.__version__}; triton {tv}; "
                f"{str(run.dtype).replace('torch.', '')}; {stamp}")
    if run.dry:
        return f"{DRY_BANNER} ({versions})"
    gpu = torch.cuda.get_device_name(run.device)
    return (f"fastmdl GPU benchmark: {gpu}; CUDA {torch.version.cuda}; {versions}; "
            "channels_last; cuDNN benchmark mode")


def ceilings(run: Run) -> str:
    """Measure the ceilings (sets run.peak_tflops); returns the line that reports them."""
    if run.dry:
        run.peak_tflops = matmul_gflops(size=512, repeats=5) / 1e3
        return ("ceilings: GPU matmul and device copy skipped (dry run on CPU); 'of matmul' "
                f"uses this CPU's float32 matmul, {1e3 * run.peak_tflops:.1f} GFLOP/s")
    tflops, gbs = gpu_ceilings(run.dtype)
    run.peak_tflops = tflops
    return (f"ceilings measured in this run: {str(run.dtype).replace('torch.', '')} matmul "
            f"{tflops:.0f} TFLOP/s (8192^3), device-to-device copy {gbs:.0f} GB/s "
            "(bytes read + written)")


# ----------------------------------------------------------------------------- the sweep

@dataclass(frozen=True)
class Point:
    sweep: str
    layer: Tuple  # (name, C_in, C_out, H=W, k, stride, padding)
    domains: int
    n: int
    keep: float


def is_target_layer(layer: Sequence) -> bool:
    """3x3 with >= 64 channels: the layers the targets speak of."""
    return layer[4] == 3 and min(layer[1], layer[2]) >= 64


def _find(layers: Sequence[Tuple], name: str) -> Tuple:
    return next(l for l in layers if l[0] == name)


def sweep_points(mode: str) -> List[Point]:
    """The op-level points, in run order, without repeats (see the module docstring)."""
    if mode == "dry":
        target, axes, grid = (4, 8, 0.5), {"D": (1, 10), "N": (1, 12), "keep": (0.25, 1.0)}, None
        target_layers, axis_layers, grid_layer = DRY_LAYERS, DRY_LAYERS[:1], None
    else:
        r26, r50 = resnet26_layers(64), resnet50_layers(224)
        target, axes = TARGET, AXES
        if mode == "quick":
            target_layers = r26 + [l for l in r50 if l[4] == 3 and l[5] == 1]
            axis_layers, grid, grid_layer = [_find(r26, "R26 3x3 128->128 @32")], None, None
        else:
            target_layers = sorted(r26 + r50, key=lambda l: not is_target_layer(l))
            axis_layers = [_find(r26, "R26 3x3 64->64 @64"), _find(r26, "R26 3x3 128->128 @32"),
                           _find(r26, "R26 3x3 256->256 @16"), _find(r50, "R50 3x3 256->256 @14"),
                           _find(r50, "R50 1x1 1024->256 @14")]
            grid, grid_layer = GRID, _find(r26, "R26 3x3 128->128 @32")
    points, seen = [], set()

    def add(sweep, layer, d, n, keep):
        key = (layer[0], d, n, keep)
        if key not in seen:
            seen.add(key)
            points.append(Point(sweep, tuple(layer), d, n, keep))

    d0, n0, k0 = target
    for layer in target_layers:
        add("target", layer, d0, n0, k0)
    for layer in axis_layers:
        for d in axes["D"]:
            add("D", layer, d, n0, k0)
        for n in axes["N"]:
            add("N", layer, d0, n, k0)
        for keep in axes["keep"]:
            add("keep", layer, d0, n0, keep)
    if grid is not None:
        for d in grid["D"]:
            for n in grid["N"]:
                for keep in grid["keep"]:
                    add("grid", grid_layer, d, n, keep)
    return points


# ----------------------------------------------------------------------------- measuring

def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}".rstrip(": ")


def _recover(run: Run) -> None:
    """After a failure, let queued GPU work finish (or fail) before the next variant."""
    if run.cuda:
        try:
            torch.cuda.synchronize()
        except Exception:
            pass


class _NoCudnnSearch:
    """cuDNN benchmark mode off for the float64 oracle (its search is slow in float64)."""

    def __enter__(self):
        self.saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = False

    def __exit__(self, *exc):
        torch.backends.cudnn.benchmark = self.saved


def measure(run: Run, label: str, fn: Callable, want: torch.Tensor, bound: float, *,
            graph: bool = False, assemble: Callable = lambda y: y,
            timer: Optional[Callable] = None) -> Tuple[Optional[float], float, str]:
    """(ms, rel_err, note) of one variant: its output (after a replay, for a CUDA graph)
    is checked against ``want`` before it is timed; ms is None if anything failed."""
    timer = timer or run.time_op
    try:
        if graph:
            replay, out = cuda_graphed(fn)
            timed = replay

            def output():
                replay()
                return out
        else:
            timed = output = fn
        got = assemble(output())
        err = rel_error(got, want)
        del got
    except Exception as exc:
        _recover(run)
        return None, float("nan"), f"{label}: failed: {_reason(exc)}"
    if not err <= bound:
        return None, err, f"{label}: FAILED check (rel err {err:.2e} > {bound:.0e}); timing invalid"
    try:
        return timer(timed), err, ""
    except Exception as exc:
        _recover(run)
        return None, err, f"{label}: timing failed: {_reason(exc)}"


def oracle(p: Problem) -> Dict[str, torch.Tensor]:
    """Expected outputs in float64 from the problem's own (rounded) inputs: the op by the
    reference backend, the dense conv of the union, and the dense conv masked."""
    x = p.x.to(torch.float64).contiguous()
    w = p.weight.to(torch.float64)
    in_idx, in_off, out_idx, out_off = p.lists
    with _NoCudnnSearch():
        op = domain_conv2d(x, w, p.domain, in_idx, in_off, out_idx, out_off, stride=p.stride,
                           padding=p.padding, backend="reference")
        dense = F.conv2d(x, w, None, p.stride, p.padding)
    mask = dense * p.out_masks.to(torch.float64)[p.domain][:, :, None, None]
    return {"op": op, "mask": mask, "dense": dense}


def _min(*vals: Optional[float]) -> Optional[float]:
    vals = [v for v in vals if v is not None]
    return min(vals) if vals else None


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if num is not None and den else None


def op_variants(run: Run, fns: Dict[str, Callable]) -> List[Tuple[str, str, Callable, str, bool]]:
    """(label, CSV column, callable, oracle kind, graphed) for every variant timed."""
    out = []
    for label, base, kind in (("(a) loop", "a", "op"), ("(b) mask", "b", "mask"),
                              ("(c) dense", "c", "dense")):
        out.append((label, f"ms_{base}_eager", fns[label], kind, False))
        if run.cuda:
            out.append((f"{label} graphed", f"ms_{base}_graphed", fns[label], kind, True))
    for name in run.fused:
        out.append((name, f"ms_{name}", fns[name], "op", False))
        if run.cuda:
            out.append((f"{name} graphed", f"ms_{name}_graphed", fns[name], "op", True))
    return out


def point_row(pt: Point, run: Run) -> Dict[str, Any]:
    name, c_in, c_out, hw, k, s, _ = pt.layer
    return {"sweep": pt.sweep, "layer": name, "c_in": c_in, "c_out": c_out, "hw": hw, "k": k,
            "stride": s, "domains": pt.domains, "n": pt.n, "keep": pt.keep,
            "dtype": str(run.dtype).replace("torch.", ""),
            "rel_err_bound": op_bound(run.dtype, run.device.type), "_invalid": set()}


def run_point(pt: Point, run: Run) -> Dict[str, Any]:
    """Check, then time, every variant on one point; derive the reported figures."""
    row = point_row(pt, run)
    name, c_in, c_out, hw, k, s, pad = pt.layer
    seed = zlib.crc32(f"{name}|{pt.domains}|{pt.n}|{pt.keep}".encode())
    notes, errs = [], []
    try:
        p = union_problem(make_problem(c_in, c_out, hw, k, s, pad, n=pt.n, domains=pt.domains,
                                       keep=pt.keep, dtype=run.dtype, device=run.device,
                                       channels_last=True, seed=seed))
        want = oracle(p)
        fns = contenders(p, run.fused, fixed_rows=True, raw_op=True)
    except Exception as exc:
        _recover(run)
        row.update(check=f"FAIL: set-up failed: {_reason(exc)}", notes=_reason(exc))
        return row
    useful, dense = p.useful_flops(), p.dense_flops()
    row.update(c_in_union=p.weight.shape[1], c_out_union=p.weight.shape[0],
               useful_fraction=useful / dense, useful_gflop=useful / 1e9)
    failed = []
    for label, col, fn, kind, graph in op_variants(run, fns):
        interpreted = run.device.type == "cpu" and label == "triton"
        ms, err, note = measure(run, label, fn, want[kind], row["rel_err_bound"], graph=graph,
                                timer=run.time_once if interpreted else None)
        row[col] = ms
        if not math.isnan(err):
            errs.append(err)
        if note:
            notes.append(note)
            failed.append(label)
            row["_invalid"].add(col)
    del want, fns, p
    finish_row(row, useful, run.peak_tflops)
    row["max_rel_err"] = max(errs) if errs else None
    row["check"] = "ok" if not failed else "FAIL: " + ", ".join(failed)
    row["notes"] = "; ".join(notes)
    return row


def finish_row(row: Dict[str, Any], useful: float, peak_tflops: float) -> None:
    """(d), the best fused variant, useful TFLOP/s and the ratios, from the timings."""
    c = _min(row.get("ms_c_eager"), row.get("ms_c_graphed"))
    b = _min(row.get("ms_b_eager"), row.get("ms_b_graphed"))
    row["ms_d_ideal"] = c * row["useful_fraction"] if c is not None else None
    fused = {}
    for name in FUSED:
        for suffix, label in (("", name), ("_graphed", f"{name} graphed")):
            ms = row.get(f"ms_{name}{suffix}")
            if ms is not None:
                fused[label] = ms
    if not fused:
        row["best_fused"] = None
        return
    best_name = min(fused, key=fused.get)
    best = fused[best_name]
    tflops = useful / best / 1e9  # FLOPs per ms -> TFLOP/s
    row.update(best_fused=best_name, ms_best_fused=best, useful_tflops_best=tflops,
               of_matmul_best=tflops / peak_tflops if peak_tflops > 0 else None,
               speedup_vs_a_eager=_ratio(row.get("ms_a_eager"), best),
               speedup_vs_a_graphed=_ratio(row.get("ms_a_graphed"), best),
               speedup_vs_b=_ratio(b, best),
               best_over_ideal=_ratio(best, row["ms_d_ideal"]))


def op_level(run: Run) -> List[Dict[str, Any]]:
    points = sweep_points("dry" if run.dry else "quick" if run.quick else "full")
    deadline = run.budget * 0.55
    rows = []
    print(f"op level: {len(points)} points; fused backends: {', '.join(run.fused) or 'none'}")
    for i, pt in enumerate(points, 1):
        if run.elapsed() > deadline:
            row = point_row(pt, run)
            row.update(check="skipped: time budget", notes=f"not run: past {deadline:.0f} s of "
                       f"the {run.budget:.0f} s budget (--budget)")
            rows.append(row)
            continue
        row = run_point(pt, run)
        rows.append(row)
        print(f"[{run.elapsed():5.0f} s] {i}/{len(points)} {pt.layer[0]} D={pt.domains} N={pt.n} "
              f"keep={pt.keep}: best {row.get('best_fused')} {_f(row.get('ms_best_fused'))} ms, "
              f"vs (a) {_x(row.get('speedup_vs_a_eager'))}, vs (b) {_x(row.get('speedup_vs_b'))}, "
              f"best/(d) {_f(row.get('best_over_ideal'))}, check {row['check']}", flush=True)
        gc.collect()
    return rows


# ----------------------------------------------------------------------------- model level

@dataclass
class ModelContender:
    name: str
    module: torch.nn.Module
    call: Callable[[torch.nn.Module], Any]  # one batch through the module
    want: torch.Tensor
    assemble: Callable[[Any], torch.Tensor] = lambda y: y  # output -> mixed-batch logits
    compile_call: Optional[Callable[[torch.nn.Module], Any]] = None
    modes: Tuple[str, ...] = ("eager", "graphed", "compile")
    note: str = ""


def model_setup(run: Run) -> Tuple[List[ModelContender], Dict[str, Any]]:
    """The model-level contenders on one mixed batch, and what describes them."""
    size, width, n = (16, 0.125, 16) if run.dry else (64, 1.0, 64)
    base, masked, pruned = pruned_resnet26(MODEL_DOMAINS, MODEL_KEEP, MODEL_SHARED, size, width)
    report = fastmdl.cost_report(pruned)
    info = {"n": n, "size": size, "width": width,
            "domain_flops": statistics.mean(r["flops"] / r["baseline_flops"]
                                            for r in report.domains),
            "union_flops": report.union["flops"] / report.baseline["flops"]}
    dev, dtype, cl = run.device, run.dtype, torch.channels_last
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(n, 3, size, size, generator=gen).to(device=dev, dtype=dtype)
         .contiguous(memory_format=cl))
    domain_cpu = (torch.arange(n) % MODEL_DOMAINS)[torch.randperm(n, generator=gen)]
    domain = domain_cpu.to(dev)
    x64 = x.to(torch.float64).contiguous()
    with _NoCudnnSearch():
        want_mixed = copy.deepcopy(masked).to(device=dev, dtype=torch.float64)(x64, domain)
        want_base = copy.deepcopy(base).to(device=dev, dtype=torch.float64)(x64)
    del x64

    def pruned_on(backend):
        m = copy.deepcopy(pruned).to(device=dev, dtype=dtype)
        m.backend = backend
        m.layout = "union"  # the op's backends run the union layout
        return m

    compact = copy.deepcopy(pruned).to(device=dev, dtype=dtype)

    unpruned = copy.deepcopy(base).to(device=dev, dtype=dtype).to(memory_format=cl)
    out = [ModelContender("unpruned ResNet-26, one domain (torch)", unpruned, lambda m: m(x),
                          want_base)]
    model_fused = [b for b in run.fused if not (b == "triton" and dev.type == "cpu")]
    if "triton" in run.fused and dev.type == "cpu":
        run.notes.append("model level: triton left out (the CPU interpreter is too slow for a "
                         "whole network)")
    out.append(ModelContender(f"pruned {MODEL_DOMAINS}-domain, mixed batch [compact]", compact,
                              lambda m: m(x, domain), want_mixed,
                              note="the compact layout (padded storage, segment_conv2d)"))
    for b in model_fused:
        out.append(ModelContender(f"pruned {MODEL_DOMAINS}-domain, mixed batch [{b}]",
                                  pruned_on(b), lambda m: m(x, domain), want_mixed))

    # The per-domain loop: each domain's sub-batch ready-made (one queue per domain).
    groups = []
    for d in range(MODEL_DOMAINS):
        rows = (domain_cpu == d).nonzero().squeeze(1)
        if rows.numel():
            xd = x.index_select(0, rows.to(dev)).contiguous(memory_format=cl)
            groups.append((d, rows.to(dev), xd, torch.full((rows.numel(),), d, device=dev)))

    def assemble(outs):
        y = torch.empty((n,) + tuple(outs[0].shape[1:]), dtype=outs[0].dtype, device=dev)
        for (_, rows, _, _), o in zip(groups, outs):
            y[rows] = o
        return y

    loop_backend = model_fused[0] if model_fused else "auto"
    out.append(ModelContender(
        f"pruned {MODEL_DOMAINS}-domain, per-domain loop [{loop_backend}]", pruned_on(loop_backend),
        lambda m: [m(xd, d) for d, _, xd, _ in groups], want_mixed, assemble,
        compile_call=lambda m: [m(xd, dd) for _, _, xd, dd in groups],
        note="one forward per domain on its ready-made sub-batch (int domain; a (n_d,) "
             "domain tensor under torch.compile, so one compile serves every domain)"))
    out.append(ModelContender(
        f"pruned {MODEL_DOMAINS}-domain, mixed batch [reference]", pruned_on("reference"),
        lambda m: m(x, domain), want_mixed, modes=("eager",),
        note="per-layer, per-domain cuDNN loop; eager only (it reads indices on the host)"))
    return out, info


def model_row(run: Run, mc: ModelContender, mode: str, info: Dict[str, Any]) -> Dict[str, Any]:
    return {"contender": mc.name, "mode": mode, "n": info["n"], "domains": MODEL_DOMAINS,
            "size": info["size"], "width": info["width"],
            "dtype": str(run.dtype).replace("torch.", ""),
            "rel_err_bound": model_bound(run.dtype, run.device.type), "_invalid": set()}


def run_model_mode(run: Run, mc: ModelContender, mode: str, info: Dict[str, Any]) -> Dict[str, Any]:
    row = model_row(run, mc, mode, info)
    notes = [mc.note] if mc.note else []
    fn, graph = (lambda: mc.call(mc.module)), mode == "graphed"
    if mode == "compile":
        try:
            cm = torch.compile(mc.module, dynamic=False, backend="eager" if run.dry else "inductor")
            call = mc.compile_call or mc.call
            fn = lambda: call(cm)  # noqa: E731
            t = time.perf_counter()
            fn()  # compiles (every shape the call meets)
            _recover(run)
            notes.append(f"compile {time.perf_counter() - t:.0f} s"
                         + (" (dynamo, backend='eager': no code generation)" if run.dry else ""))
        except Exception as exc:
            _recover(run)
            row.update(check=f"failed: {_reason(exc)}",
                       notes="; ".join(notes + [f"compile failed: {_reason(exc)}"]))
            row["_invalid"].add("ms")
            return row
    ms, err, note = measure(run, f"{mc.name} [{mode}]", fn, mc.want, row["rel_err_bound"],
                            graph=graph, assemble=mc.assemble, timer=run.time_model)
    row.update(ms=ms, images_per_s=info["n"] / ms * 1e3 if ms else None,
               rel_err=None if math.isnan(err) else err)
    if note:
        notes.append(note)
        row["_invalid"].add("ms")
    if not note:
        row["check"] = "ok"
    elif "FAILED check" in note:
        row["check"] = "FAIL"
    else:  # "<label>: failed: <reason>" or "<label>: timing failed: <reason>"
        row["check"] = note.split("]: ", 1)[-1]
    row["notes"] = "; ".join(notes)
    return row


def model_level(run: Run) -> Tuple[List[Dict[str, Any]], Dict[str, Any]]:
    """Eager and graphed for every contender first, then torch.compile while time is left."""
    try:
        cs, info = model_setup(run)
    except Exception as exc:
        _recover(run)
        run.notes.append(f"model level: set-up failed: {_reason(exc)}")
        return [], {}
    print(f"\nmodel level: {len(cs)} contenders, N={info['n']} at {info['size']}x{info['size']}, "
          f"D={MODEL_DOMAINS}; each domain {100 * info['domain_flops']:.0f}% of the baseline's "
          f"FLOPs, union {100 * info['union_flops']:.0f}%", flush=True)
    rows = {}
    compile_cutoff = run.budget - 60
    for mode in ("eager", "graphed", "compile"):
        for mc in cs:
            if mode not in mc.modes:
                continue
            row = model_row(run, mc, mode, info)
            if mode == "graphed" and not run.cuda:
                row.update(check="skipped", notes="CUDA graphs skipped (dry run on CPU)")
            elif mode == "compile" and run.elapsed() > compile_cutoff:
                row.update(check="skipped",
                           notes=f"skipped: time budget (past {compile_cutoff:.0f} s "
                                 f"of the {run.budget:.0f} s budget, --budget)")
            else:
                row = run_model_mode(run, mc, mode, info)
            rows[(mc.name, mode)] = row
            print(f"[{run.elapsed():5.0f} s] {mc.name} [{mode}]: {_f(row.get('ms'))} ms, "
                  f"{_f(row.get('images_per_s'))} images/s, check {row['check']}", flush=True)
            gc.collect()
    ordered = [rows[(mc.name, m)] for mc in cs for m in ("eager", "graphed", "compile")
               if (mc.name, m) in rows]
    unpruned = {r["mode"]: r.get("ms") for r in ordered if r["contender"].startswith("unpruned")}
    for r in ordered:
        r["vs_unpruned_same_mode"] = _ratio(unpruned.get(r["mode"]), r.get("ms"))
    return ordered, info


# ----------------------------------------------------------------------------- reporting

def _f(v: Optional[float]) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"


def _x(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _md(text: Any) -> str:
    """Text safe inside a markdown table cell."""
    return str(text).replace("|", "/").replace("\n", " ")


def _cell(row: Dict[str, Any], col: str, fmt: Callable = _f) -> str:
    if row.get(col) is None and col in row.get("_invalid", ()):
        return "invalid"
    return fmt(row.get(col))


def op_table(rows: List[Dict[str, Any]]) -> str:
    head = ["sweep", "layer", "D", "N", "keep", "useful", "(a) ms", "(a) graphed", "(b) ms",
            "(c) ms", "(d) ideal", "best fused", "best ms", "useful TFLOP/s", "of matmul",
            "vs (a)", "vs (a) graphed", "vs (b)", "best/(d)", "max err", "check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        b = _min(r.get("ms_b_eager"), r.get("ms_b_graphed"))
        c = _min(r.get("ms_c_eager"), r.get("ms_c_graphed"))
        cells = [r["sweep"], r["layer"], str(r["domains"]), str(r["n"]), str(r["keep"]),
                 f"{100 * r['useful_fraction']:.0f}%" if r.get("useful_fraction") else "-",
                 _cell(r, "ms_a_eager"), _cell(r, "ms_a_graphed"),
                 ("invalid" if b is None and {"ms_b_eager", "ms_b_graphed"} & r["_invalid"]
                  else _f(b)),
                 ("invalid" if c is None and {"ms_c_eager", "ms_c_graphed"} & r["_invalid"]
                  else _f(c)),
                 _f(r.get("ms_d_ideal")), r.get("best_fused") or "-", _f(r.get("ms_best_fused")),
                 _f(r.get("useful_tflops_best")),
                 f"{100 * r['of_matmul_best']:.1f}%" if r.get("of_matmul_best") else "-",
                 _x(r.get("speedup_vs_a_eager")), _x(r.get("speedup_vs_a_graphed")),
                 _x(r.get("speedup_vs_b")), _f(r.get("best_over_ideal")),
                 f"{r['max_rel_err']:.1e}" if r.get("max_rel_err") is not None else "-",
                 _md(r["check"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def op_notes(rows: List[Dict[str, Any]]) -> str:
    """The points whose variants failed or were skipped, with why."""
    lines = [f"- {r['layer']} D={r['domains']} N={r['n']} keep={r['keep']}: {r['notes']}"
             for r in rows if r.get("notes")]
    return "\n".join(lines) if lines else "- every variant of every point passed its check"


def model_table(rows: List[Dict[str, Any]]) -> str:
    head = ["contender", "mode", "ms / batch", "images/s", "vs unpruned (same mode)", "max err",
            "check", "notes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["contender"], r["mode"], _cell(r, "ms"), _cell(r, "images_per_s"),
            _x(r.get("vs_unpruned_same_mode")),
            f"{r['rel_err']:.1e}" if r.get("rel_err") is not None else "-", _md(r["check"]),
            _md(r.get("notes", ""))]) + " |")
    return "\n".join(lines)


def _judge(name: str, rows: List[Dict[str, Any]], col: str, ok: Callable[[float], bool],
           worst: Callable) -> str:
    """One PASS/FAIL line: every target row must have a value of col that passes."""
    valid = [r for r in rows if r.get(col) is not None]
    if not valid:
        return f"FAIL  {name}: no valid measurement"
    values = [r[col] for r in valid]
    w = worst(values)
    w_layer = next(r["layer"] for r in valid if r[col] == w)
    verdict = "PASS" if len(valid) == len(rows) and all(ok(v) for v in values) else "FAIL"
    missing = f"; {len(rows) - len(valid)} of {len(rows)} rows without a valid timing" \
        if len(valid) < len(rows) else ""
    return (f"{verdict}  {name}: worst {w:.2f} ({w_layer}), median {statistics.median(values):.2f} "
            f"over {len(valid)} layers{missing}")


def targets_block(run: Run, op_rows: List[Dict[str, Any]], model_rows: List[Dict[str, Any]]) -> str:
    lines = ["TARGETS (stated for H100, bfloat16, N=64, D=10, keep 0.5, 3x3 layers "
             "with >= 64 channels)"]
    if run.dry:
        lines.append("n/a   every target: dry run on CPU, no timing claims")
        return "\n".join(lines)
    gpu = torch.cuda.get_device_name(run.device)
    if "H100" not in gpu or run.dtype != torch.bfloat16:
        lines.append(f"note: this run is {gpu}, {str(run.dtype).replace('torch.', '')}; "
                     "the targets are judged on it all the same")
    d0, n0, k0 = TARGET
    sel = [r for r in op_rows if (r["domains"], r["n"], r["keep"]) == (d0, n0, k0)
           and is_target_layer((r["layer"], r["c_in"], r["c_out"], r["hw"], r["k"]))]
    lines.append(_judge("best fused >= 2x faster than (a) eager ((a) / best)", sel,
                        "speedup_vs_a_eager", lambda v: v >= 2, min))
    lines.append(_judge("best fused never slower than (a) graphed ((a) graphed / best)", sel,
                        "speedup_vs_a_graphed", lambda v: v >= 1, min))
    lines.append(_judge("best fused faster than (b) ((b) / best)", sel, "speedup_vs_b",
                        lambda v: v > 1, min))
    lines.append(_judge("best fused within 1.3x of (d) ideal (best / (d))", sel, "best_over_ideal",
                        lambda v: v <= 1.3, max))
    pruned = [r["images_per_s"] for r in model_rows if r.get("images_per_s")
              and "mixed batch" in r["contender"] and "[reference]" not in r["contender"]]
    base = [r["images_per_s"] for r in model_rows if r.get("images_per_s")
            and r["contender"].startswith("unpruned")]
    if pruned and base:
        ratio = max(pruned) / max(base)
        lines.append(f"{'PASS' if ratio >= 1.5 else 'FAIL'}  model: pruned {MODEL_DOMAINS}-domain "
                     f">= 1.5x images/s of one unpruned ResNet-26: {ratio:.2f}x "
                     f"({max(pruned):.0f} vs {max(base):.0f} images/s, each at its best mode)")
    else:
        lines.append("FAIL  model: pruned vs unpruned images/s: no valid measurement")
    return "\n".join(lines)


def csv_text(header: str, columns: List[str], rows: List[Dict[str, Any]]) -> str:
    buf = io.StringIO()
    buf.write(f"# {header}\n")
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        w.writerow(["" if r.get(c) is None else (f"{r[c]:.6g}" if isinstance(r[c], float) else r[c])
                    for c in columns])
    return buf.getvalue()


def plot(path: str, header: str, op_rows: List[Dict[str, Any]],
         model_rows: List[Dict[str, Any]]) -> bool:
    """gpu.png: speed-ups of the best fused variant per op point; images/s per model
    contender and mode, written atomically. Returns False (no file) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return False

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(10, 0.16 * len(op_rows) + 4), 11),
                                   gridspec_kw={"height_ratios": [3, 2]})
    xs = list(range(len(op_rows)))
    series = [("vs (a) eager", "speedup_vs_a_eager", "o"),
              ("vs (a) graphed", "speedup_vs_a_graphed", "s"),
              ("vs (b)", "speedup_vs_b", "^"), ("(d) / best", "best_over_ideal", "x")]
    any_value = False
    for label, col, marker in series:
        ys = [r.get(col) for r in op_rows]
        if col == "best_over_ideal":
            ys = [1 / v if v else None for v in ys]
        ys = [float("nan") if v is None else v for v in ys]
        if any(v > 0 for v in ys if not math.isnan(v)):
            any_value = True
            ax1.plot(xs, ys, marker, linestyle="none", label=label, markersize=4)
    if any_value:
        ax1.set_yscale("log")
        ax1.legend(fontsize=7, loc="best")
    else:
        ax1.text(0.5, 0.5, "no valid timings", ha="center", transform=ax1.transAxes)
    for y, style in ((1.0, "-"), (2.0, "--"), (1 / 1.3, ":")):
        ax1.axhline(y, color="grey", linestyle=style, linewidth=0.8)
    ax1.set_xticks(xs)
    ax1.set_xticklabels([f"{r['sweep']}: {r['layer']} D{r['domains']} N{r['n']} k{r['keep']}"
                         for r in op_rows], rotation=90, fontsize=5)
    ax1.set_ylabel("times faster than the baseline (best fused)")
    ax1.set_title("op level: best fused backend vs (a), (b); (d)/best <= 1 (dotted: 1/1.3)",
                  fontsize=9)
    valid = [r for r in model_rows if r.get("images_per_s")]
    if valid:
        ax2.barh([f"{r['contender']} [{r['mode']}]" for r in valid],
                 [r["images_per_s"] for r in valid])
        ax2.invert_yaxis()
        ax2.tick_params(axis="y", labelsize=6)
    else:
        ax2.text(0.5, 0.5, "no valid model timings", ha="center", transform=ax2.transAxes)
    ax2.set_xlabel("images/s (mixed batch)")
    ax2.set_title("model level", fontsize=9)
    fig.suptitle(header, fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    save_png(fig, path)
    return True


def write_outputs(out_dir: str, header: str, op_rows, model_rows, md: str) -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, n)
             for n in ("gpu_ops.csv", "gpu_model.csv", "gpu.md", "gpu.png")]
    write_atomic(paths[0], csv_text(header, OP_COLUMNS, op_rows))
    write_atomic(paths[1], csv_text(header, MODEL_COLUMNS, model_rows))
    write_atomic(paths[2], md)
    if not plot(paths[3], header, op_rows, model_rows):
        paths.pop()  # no matplotlib: every table is written, the picture is not
    return paths


# ----------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or
                    os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    ap.add_argument("--quick", action="store_true",
                    help="19 op points (every axis value) instead of 81")
    ap.add_argument("--dry-run", action="store_true",
                    help="end to end on the CPU with tiny shapes; no timing claims")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds: op points stop at 55%%, compiles are not started in the "
                         "last 60 s")
    return ap.parse_args(argv)


def make_run(args: argparse.Namespace) -> Run:
    dtype = getattr(torch, args.dtype or ("float32" if args.dry_run else "bfloat16"))
    device = torch.device("cpu" if args.dry_run else "cuda")
    budget = args.budget or (600.0 if args.dry_run else 240.0 if args.quick else 450.0)
    notes: List[str] = []
    run = Run(device, dtype, args.dry_run, args.quick, budget,
              usable_fused(device.type, dtype, notes), notes)
    if run.dry:
        # a shared CPU: no spinning OpenMP threads; no timing claims anyway
        torch.set_num_threads(1)
        run.notes.append("CUDA graphs: skipped (dry run on CPU); torch.compile uses "
                         "backend='eager'; 1 CPU thread")
    else:
        torch.backends.cudnn.benchmark = True
    return run


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device here: run with --dry-run for the CPU smoke run", file=sys.stderr)
        return 2
    run = make_run(args)
    header = header_line(run)
    print(header, flush=True)
    with torch.no_grad():
        ceiling = ceilings(run)
        print(ceiling, flush=True)
        for note in run.notes:
            print(f"note: {note}")
        op_rows = op_level(run)
        model_rows, info = model_level(run)
    targets = targets_block(run, op_rows, model_rows)
    ops_md, model_md = op_table(op_rows), model_table(model_rows)
    skipped = sum(r["check"].startswith("skipped") for r in op_rows)
    model_head = (f"pruned {MODEL_DOMAINS}-domain ResNet-26 (width {info.get('width')}, keep "
                  f"{MODEL_KEEP} of the filters per domain, {MODEL_SHARED} of them shared), "
                  f"mixed batch N={info.get('n')} at {info.get('size')}x{info.get('size')}; each "
                  f"domain runs {100 * info.get('domain_flops', float('nan')):.0f}% of the "
                  f"baseline's FLOPs, the union "
                  f"{100 * info.get('union_flops', float('nan')):.0f}%"
                  if info else "model level failed")
    md = "\n".join([
        header, "", ceiling, *[f"- note: {n}" for n in run.notes], "",
        "## Op level: fastmdl::domain_conv2d on ResNet-26 / ResNet-50 layer shapes", "",
        "Times: medians, ms. (b), (c): the faster of eager and CUDA-graphed. Ratios: baseline time "
        "/ best fused time; best/(d) = best fused time / ideal time. useful = the fraction of the "
        "union's FLOPs the batch needs. max err: largest relative error of any variant against "
        f"the float64 oracle. {len(op_rows) - skipped} points run, {skipped} skipped.", "",
        ops_md, "", "Failures and skips:", "", op_notes(op_rows), "",
        "## Model level", "", model_head, "", model_md, "", "## Targets", "",
        "```", targets, "```", ""])
    print("\n" + ops_md + "\n\n" + model_head + "\n\n" + model_md + "\n\n" + targets)
    paths = write_outputs(args.out, header, op_rows, model_rows, md)
    print(f"\nwrote {', '.join(paths)} in {run.elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
