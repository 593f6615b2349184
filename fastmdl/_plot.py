"""The two things every plot of fastmdl and its benchmarks needs: a headless
pyplot, or None when matplotlib is missing (the plot is then skipped, never the
run that makes it), and an atomic PNG write."""

from __future__ import annotations

from ._io import atomic_write


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed), or None."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_png(fig, path: str, dpi: int = 110) -> None:
    """Write ``fig`` to ``path`` as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
