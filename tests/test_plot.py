"""fastmdl._plot: the headless pyplot and the atomic PNG write every plot uses
(the experiment, the demo and the benchmarks)."""

import os
import sys

import pytest

from fastmdl import _plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pyplot_is_headless_and_save_png_writes_a_whole_png_atomically(tmp_path):
    plt = _plot.pyplot()
    if plt is None:
        pytest.skip("matplotlib is not installed")
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"
    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [3, 1, 2])
    path = tmp_path / "fig.png"
    path.write_bytes(b"old")  # replaced whole, never appended to
    _plot.save_png(fig, str(path))
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 500
    assert os.listdir(tmp_path) == ["fig.png"]  # no temporary file left behind
    assert not plt.fignum_exists(fig.number)  # closed: long runs do not pile up figures


def test_gpu_benchmark_without_matplotlib_writes_its_tables_and_no_png(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import gpu

    monkeypatch.setattr(gpu, "pyplot", lambda: None)  # what _plot.pyplot gives without matplotlib
    paths = gpu.write_outputs(str(tmp_path), "header", [], [], "md")
    assert [os.path.basename(p) for p in paths] == ["gpu_ops.csv", "gpu_model.csv", "gpu.md"]
    assert sorted(os.listdir(tmp_path)) == ["gpu.md", "gpu_model.csv", "gpu_ops.csv"]
