"""Headless matplotlib for the figure layer and the leaderboard: figures on their own Agg canvases.

A light module (matplotlib is imported when a figure is made, never at import): the leaderboard and
the other light commands draw with it without importing torch or Lightning.
"""

from __future__ import annotations

from typing import Any

#: Series of at most this many points get markers (a line through one point draws nothing).
FEW_POINTS = 30


class _Pyplot:
    """The few pyplot calls the figures use, on matplotlib's object-oriented API: every figure has
    its own Agg canvas (no display, no backend switch, no global figure list), so drawing is
    headless and leaves a notebook's or a GUI session's matplotlib alone. Text is DejaVu Sans,
    the font matplotlib ships."""

    def figure(self, figsize: tuple[float, float] | None = None, dpi: float | None = None) -> Any:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize, dpi=dpi)
        FigureCanvasAgg(fig)
        return fig

    def subplots(self, nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Any, Any]:
        fig = self.figure(kwargs.pop("figsize", None), kwargs.pop("dpi", None))
        return fig, fig.subplots(nrows, ncols, **kwargs)

    @staticmethod
    def get_cmap(name: str) -> Any:
        import matplotlib

        return matplotlib.colormaps[name]

    @property
    def Line2D(self) -> Any:  # noqa: N802 (pyplot's name)
        from matplotlib.lines import Line2D

        return Line2D

    @staticmethod
    def close(fig: Any) -> None:
        """Nothing to release: the figure is not registered anywhere."""


_PYPLOT = _Pyplot()


def pyplot() -> _Pyplot:
    """Figure making for the figure layer (see :class:`_Pyplot`): ``pyplot().subplots(...)``."""
    return _PYPLOT


def fixed_layout(fig: Any, left: float, right: float, top: float, bottom: float, wspace: float = 0.0,
                 hspace: float = 0.0) -> None:
    """Margins and gaps in inches, set once (``subplots_adjust``).

    The after-test figures use this instead of ``tight_layout``, which lays the figure out by
    drawing it once more before saving: that extra draw was ~40 % of their drawing time.
    ``wspace``/``hspace`` are the gaps between panels.
    """
    width, height = fig.get_size_inches()
    grid = fig.axes[0].get_subplotspec().get_gridspec() if fig.axes else None
    ncols, nrows = (grid.ncols, grid.nrows) if grid is not None else (1, 1)
    panel_w = max(1e-3, (width - left - right - wspace * (ncols - 1)) / ncols)
    panel_h = max(1e-3, (height - top - bottom - hspace * (nrows - 1)) / nrows)
    fig.subplots_adjust(left=left / width, right=1 - right / width, top=1 - top / height, bottom=bottom / height,
                        wspace=wspace / panel_w, hspace=hspace / panel_h)


def point_markers(count: int, size: float = 3.0) -> dict[str, Any]:
    """``plot`` keywords that keep a short series visible: markers on a series of at most
    :data:`FEW_POINTS` points (a line through a single point draws nothing), none on a longer one."""
    return {"marker": "o", "markersize": size} if count <= FEW_POINTS else {}
