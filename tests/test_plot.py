"""fastmdl._plot: the headless pyplot and the atomic PNG write every plot uses
(the experiment, the demo and the benchmarks; gpu.py's fallback without
matplotlib is tested beside its dry run), the legend kept under the figure, and
the demo's report figure drawn from a made-up report (no training)."""

import os
import struct
import zlib

import pytest

from fastmdl import _plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Bytes per pixel of each PNG colour type at 8 bits per channel.
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def png_size(data: bytes):
    """(width, height) of ``data``, after checking it is a whole, valid PNG: the
    signature, every chunk's CRC, IHDR first and IEND last, and image data that
    inflates to exactly one filtered row per line of the image."""
    assert data.startswith(PNG_SIGNATURE), "not a PNG signature"
    pos, chunks = len(PNG_SIGNATURE), []
    while pos < len(data):
        assert pos + 12 <= len(data), "truncated chunk header"
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        assert len(body) == length, f"truncated {kind!r} chunk"
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in {kind!r} chunk"
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert depth == 8 and colour in _CHANNELS and interlace == 0  # what Agg writes
    pixels = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(pixels) == height * (1 + width * _CHANNELS[colour])
    return width, height


def test_pyplot_is_headless_and_save_png_writes_a_whole_png_atomically(tmp_path):
    plt = _plot.pyplot()
    if plt is None:
        pytest.skip("matplotlib is not installed")
    import matplotlib

    assert matplotlib.get_backend().lower() == "agg"
    fig, ax = plt.subplots()  # 6.4 x 4.8 inches
    ax.plot([0, 1, 2], [3, 1, 2])
    path = tmp_path / "fig.png"
    path.write_bytes(b"old")  # replaced whole, never appended to
    _plot.save_png(fig, str(path), dpi=100)
    data = path.read_bytes()
    width, height = png_size(data)
    # The tight bounding box trims the margins of a 640 x 480 figure, never grows it.
    assert 400 <= width <= 640 and 300 <= height <= 480
    assert os.listdir(tmp_path) == ["fig.png"]  # no temporary file left behind
    assert not plt.fignum_exists(fig.number)  # closed: long runs do not pile up figures


def test_png_size_refuses_a_damaged_png(tmp_path):
    plt = _plot.pyplot()
    if plt is None:
        pytest.skip("matplotlib is not installed")
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    _plot.save_png(fig, str(tmp_path / "f.png"))
    data = (tmp_path / "f.png").read_bytes()
    png_size(data)
    for bad in (data[:-20], data[:100] + bytes([data[100] ^ 1]) + data[101:], b"GIF89a"):
        with pytest.raises(AssertionError):
            png_size(bad)


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_legend_below_sits_under_every_axes_and_lists_each_label_once():
    plt = _plot.pyplot()
    if plt is None:
        pytest.skip("matplotlib is not installed")
    fig, (a, b) = plt.subplots(1, 2)
    a.plot([0, 1], [0, 1], label="line")
    a.bar([0, 1], [1, 2], label="bars")
    b.plot([0, 1], [1, 0], label="line")  # the same label on a second panel: listed once
    a.set_xticks([0, 1], ["a\nvery\ntall\nlabel"] * 2)
    fig.tight_layout()
    legend = _plot.legend_below(fig, ncol=2)
    assert [t.get_text() for t in legend.get_texts()] == ["bars", "line"]  # bars first
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = legend.get_window_extent(renderer)
    for ax in fig.axes:  # below each axes, its tick labels included
        assert box.y1 <= ax.get_tightbbox(renderer).y0
    with pytest.raises(ValueError, match="ncol"):
        _plot.legend_below(fig, ncol=0)
    plt.close(fig)


def report(budget=0.5):
    """A made-up demo report with everything demo._plot reads."""
    names = [("fashion", 10), ("digits", 10), ("faces", 2), ("textures", 3)]
    return {
        "budget": budget, "seed": 0,
        "domains": [{"name": n, "classes": k, "test_accuracy": 0.6 + 0.05 * i,
                     "params_vs_baseline": 0.4 + 0.02 * i, "flops_vs_baseline": 0.5}
                    for i, (n, k) in enumerate(names)],
        "union": {"params_vs_baseline": 1.05, "flops_vs_baseline": 0.9},
        "serving": {"images": 256, "mixed_images_per_s": 3000.0,
                    "loop_images_per_s": 1500.0, "speedup": 2.0},
    }


def test_demo_figure_shows_the_budget_the_baseline_chance_and_serving_speed():
    from matplotlib.collections import LineCollection

    from fastmdl import demo

    fig = demo._figure(report(budget=0.25))
    if fig is None:
        pytest.skip("matplotlib is not installed")
    try:
        cost, speed = fig.axes
        assert all(ax.get_ylabel() for ax in fig.axes)  # every panel says what its y is
        flat = {tuple(line.get_ydata()): line.get_label() for line in cost.lines}
        assert "budget" in flat[(25.0, 25.0)]
        assert "100%" in flat[(100.0, 100.0)] and "baseline" in flat[(100.0, 100.0)]
        chance = [c for c in cost.collections if isinstance(c, LineCollection)]
        assert len(chance) == 1 and "chance" in chance[0].get_label()
        ticks = sorted(seg[0][1] for seg in chance[0].get_segments())
        assert ticks == pytest.approx([10, 10, 100 / 3, 50])  # 1 / classes, per domain
        assert [p.get_height() for p in speed.patches] == [3000.0, 1500.0]
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legend = fig.legends[0].get_window_extent(renderer)
        for ax in fig.axes:  # the legend covers no bar, line or label
            assert not _overlap(legend, ax.get_tightbbox(renderer))
    finally:
        _plot.pyplot().close(fig)


def test_demo_plot_writes_a_valid_png_of_the_expected_size(tmp_path):
    from fastmdl import demo

    path = str(tmp_path / "report.png")
    if demo._plot(report(), path) is None:
        pytest.skip("matplotlib is not installed")
    check_report_png(path)


def check_report_png(path):
    """The demo's report.png is a valid PNG of about its 10 x 4.2 inch figure at
    120 dpi (1200 x 504 pixels), trimmed to its content and grown by the legend."""
    with open(path, "rb") as f:
        width, height = png_size(f.read())
    assert 900 <= width <= 1400 and 450 <= height <= 800, (width, height)
