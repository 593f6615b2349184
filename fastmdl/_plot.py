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


def legend_below(fig, ncol: int = 3, fontsize: float = 8):
    """One legend for all of ``fig``'s axes (every labelled artist, each label
    once; bars first, then the lines and markers drawn over them), placed under
    the figure, below every axes and its tick labels, so it never covers what is
    plotted. Call it after ``fig.tight_layout()``: the layout does not make room
    for it, the tight bounding box :func:`save_png` writes grows to include it.
    Returns the legend."""
    from matplotlib.container import BarContainer

    if isinstance(ncol, bool) or not isinstance(ncol, int) or ncol < 1:
        raise ValueError(f"ncol must be a positive int, got {ncol!r}")
    entries = {}
    for ax in fig.axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, h)
    # matplotlib lists bars after lines; the data comes before its references.
    order = sorted(entries, key=lambda label: not isinstance(entries[label], BarContainer))
    handles, labels = [entries[label] for label in order], order
    # Anchored at the figure's bottom edge (y=0, figure coordinates) and hanging
    # from it: below the lowest tick label whatever its height.
    return fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                      ncol=ncol, fontsize=fontsize, frameon=False)
