"""fastmdl._plot: the headless pyplot and the atomic PNG write every plot uses
(the experiment, the demo and the benchmarks; gpu.py's fallback without
matplotlib is tested beside its dry run)."""

import os

import pytest

from fastmdl import _plot


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

