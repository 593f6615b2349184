"""The GPU benchmark's dry run (benchmarks/gpu.py --dry-run) end to end on the CPU:
it writes the CSV, markdown and PNG, and checks every contender's output against
the float64 oracle before timing it."""

import csv
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu  # noqa: E402  (benchmarks/gpu.py: its column lists and sweep)

SCRIPT = os.path.join(ROOT, "benchmarks", "gpu.py")
BANNER = "DRY RUN on CPU: tiny shapes, no timing claims"


def _read_csv(path):
    with open(path, newline="") as f:
        first = f.readline()
        return first, list(csv.DictReader(f))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    from fastmdl import backends
    ok, why = backends.status("cpp", "cpu")
    if not ok:
        pytest.skip(f"the dry run's fused backend is cpp: {why}")
    out = tmp_path_factory.mktemp("gpu_bench")
    env = dict(os.environ)
    env.pop("OUT", None)
    # Triton's CPU interpreter would double the run time; its kernel has its own tests.
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_outputs_exist_with_dry_run_header(dry_run):
    out, stdout = dry_run
    assert BANNER in stdout
    for name in ("gpu_ops.csv", "gpu_model.csv", "gpu.md"):
        with open(out / name) as f:
            assert BANNER in f.readline(), name
    md = (out / "gpu.md").read_text()
    assert "| sweep | layer |" in md and "| contender | mode |" in md and "TARGETS" in md
    png = (out / "gpu.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]  # atomic writes left nothing


def test_op_rows_checked_against_the_oracle(dry_run):
    out, _ = dry_run
    _, rows = _read_csv(out / "gpu_ops.csv")
    assert list(rows[0].keys()) == gpu.OP_COLUMNS
    assert len(rows) == len(gpu.sweep_points("dry"))
    # Every axis value the dry sweep names is covered.
    assert {int(r["domains"]) for r in rows} == {1, 4, 10}
    assert {int(r["n"]) for r in rows} == {1, 8, 12}
    assert {float(r["keep"]) for r in rows} == {0.25, 0.5, 1.0}
    for r in rows:
        assert r["check"] == "ok", r
        err, bound = float(r["max_rel_err"]), float(r["rel_err_bound"])
        assert math.isfinite(err) and 0 <= err <= bound, r
        for col in ("ms_a_eager", "ms_b_eager", "ms_c_eager", "ms_d_ideal", "ms_cpp",
                    "ms_best_fused"):
            assert float(r[col]) > 0, (col, r)
        assert r["ms_a_graphed"] == ""  # no CUDA graphs on the CPU
        assert r["best_fused"] == "cpp"
        assert 0 < float(r["useful_fraction"]) <= 1
        assert float(r["speedup_vs_a_eager"]) > 0 and float(r["best_over_ideal"]) > 0


def test_model_rows(dry_run):
    out, _ = dry_run
    _, rows = _read_csv(out / "gpu_model.csv")
    assert list(rows[0].keys()) == gpu.MODEL_COLUMNS
    by = {(r["contender"], r["mode"]): r for r in rows}
    unpruned = "unpruned ResNet-26, one domain (torch)"
    for mode in ("eager", "compile"):
        r = by[(unpruned, mode)]
        assert r["check"] == "ok" and float(r["images_per_s"]) > 0, r
    assert by[(unpruned, "graphed")]["check"] == "skipped"
    mixed = [r for r in rows if "mixed batch [cpp]" in r["contender"]]
    loop = [r for r in rows if "per-domain loop" in r["contender"]]
    assert {r["mode"] for r in mixed} == {"eager", "graphed", "compile"} and loop
    for r in rows:
        if r["check"] == "ok":
            assert (math.isfinite(float(r["rel_err"]))
                    and float(r["rel_err"]) <= float(r["rel_err_bound"]))


def test_without_matplotlib_the_tables_are_written_and_no_png(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu, "pyplot", lambda: None)  # what _plot.pyplot gives without matplotlib
    paths = gpu.write_outputs(str(tmp_path), "header", [], [], "md")
    assert [os.path.basename(p) for p in paths] == ["gpu_ops.csv", "gpu_model.csv", "gpu.md"]
    assert sorted(os.listdir(tmp_path)) == ["gpu.md", "gpu_model.csv", "gpu_ops.csv"]


def test_compact_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_compact.py, the compact layout's one-call GPU check, walks
    through on the CPU: its correctness checks pass and it writes its report."""
    env = dict(os.environ)
    env.pop("OUT", None)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_compact.py"),
                           "--dry-run", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = (tmp_path / "gpu_compact.md").read_text()
    assert text.startswith(BANNER) and "checks: PASS" in text
    assert "FAIL" not in text.replace("PASS/FAIL", "")
    assert (tmp_path / "gpu_compact.json").exists()
