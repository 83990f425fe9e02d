"""Plotting helpers shared by the claims: one look for every figure, PNG bytes out.

Figures are drawn on matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so the
study can run in any process, with or without a display. Every curve over seeds is drawn as its mean with a 95%
t-interval band (:func:`normdrop.stats.t_interval` at each x), the same interval the verdicts use.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import math
import textwrap
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure

from normdrop.claims.results import Figure, Measurement
from normdrop.stats import t_interval

DPI = 96
WIDTH_IN = 6.6
HEIGHT_IN = 3.5

COLORS: dict[str, str] = {
    "none": "#6b6b6b",
    "batch": "#1f6fb4",
    "dropout": "#d2691e",
    "no dropout": "#6b6b6b",
    "ensemble": "#2e8b57",
    "mc": "#d2691e",
    "weight scaled": "#8b008b",
}
"""Colours by arm, the same in every figure: plain grey, BN blue, dropout orange."""

LABELS: dict[str, str] = {"none": "no BN", "batch": "BN"}

_CYCLE = ["#1f6fb4", "#d2691e", "#2e8b57", "#8b008b", "#b22222", "#6b6b6b", "#daa520"]


def color(key: str, index: int = 0) -> str:
    """The colour of an arm, or the ``index``-th colour of the cycle for keys without one."""
    return COLORS.get(key, _CYCLE[index % len(_CYCLE)])


def new_figure(ncols: int = 1, nrows: int = 1, width: float = WIDTH_IN, height: float = HEIGHT_IN) -> tuple:
    """A figure and its axes (an array when there are several), with an Agg canvas attached."""
    figure = MplFigure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=True)
    for ax in np.atleast_1d(axes).ravel():
        ax.grid(True, color="#e4e4e4", linewidth=0.6)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return figure, axes


def to_png(figure: MplFigure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def finish(figure: MplFigure, title: str, caption: str, alt: str | None = None) -> Figure:
    """Render a matplotlib figure into a report :class:`~normdrop.claims.base.Figure`.

    A log-scaled axis with nothing positive to show (every run failed) cannot be drawn; such axes fall back to a
    linear scale, so a figure is always produced. Inside :func:`not_rendered` the PNG is left empty.
    """
    if not _RENDER.get():
        return Figure(title=title, caption=caption, png=b"", alt=alt or title)
    try:
        png = to_png(figure)
    except ValueError:
        for ax in figure.axes:
            ax.set_xscale("linear")
            ax.set_yscale("linear")
        png = to_png(figure)
    return Figure(title=title, caption=caption, png=png, alt=alt or title)


def message_figure(title: str, message: str) -> Figure:
    """A figure that says, in words, why there is nothing to plot (used when runs failed or a probe is missing)."""
    figure, ax = new_figure(height=1.8)
    ax.axis("off")
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(message, 90)), ha="center", va="center", fontsize=9, color="#444")
    return finish(figure, title, f"No data to plot: {message}", alt=f"{title}: {message}")


def reason_figures(title: str, reason: str, draw: bool) -> list[Figure]:
    """The figures of a claim that could not be measured: its reason, drawn (none in a re-analysis, ``draw``
    False)."""
    return [message_figure(title, reason)] if draw else []


def legend(ax: Axes, **kwargs: object) -> None:
    """A legend, when the axes have labelled artists (an empty plot gets none, rather than a warning)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


def mean_band(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per column of a (seeds, points) array with NaN for missing values: mean and 95% t-interval bounds.

    A column with one finite value has that value as mean and no band (NaN bounds); none: NaN.
    """
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    mean = np.full(values.shape[1], np.nan)
    low = np.full(values.shape[1], np.nan)
    high = np.full(values.shape[1], np.nan)
    for column in range(values.shape[1]):
        finite = values[:, column][np.isfinite(values[:, column])]
        if len(finite):
            mean[column] = finite.mean()
        estimate = t_interval(finite)
        if estimate is not None:
            low[column], high[column] = estimate.ci_low, estimate.ci_high
    return mean, low, high


def plot_band(
    ax: Axes,
    x: Sequence[float] | np.ndarray,
    per_seed: np.ndarray,
    label: str,
    key: str = "",
    index: int = 0,
    marker: str | None = None,
    linestyle: str = "-",
) -> None:
    """Mean over seeds (rows) at each x, with its 95% interval as a shaded band."""
    mean, low, high = mean_band(per_seed)
    c = color(key or label, index)
    n = int(np.isfinite(np.atleast_2d(per_seed)).any(axis=1).sum())
    ax.plot(x, mean, color=c, label=f"{label} (n={n})", marker=marker, linestyle=linestyle, linewidth=1.6)
    ax.fill_between(x, low, high, color=c, alpha=0.18, linewidth=0)


def align(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Curves ``(steps, values)`` of several seeds on the union of their steps: (steps, (seeds, steps) array with
    NaN where a seed has no value, e.g. after it diverged)."""
    steps = np.unique(np.concatenate([s for s, _ in curves])) if curves else np.empty(0)
    table = np.full((len(curves), len(steps)), np.nan)
    for row, (s, v) in enumerate(curves):
        table[row, np.searchsorted(steps, s)] = v
    return steps, table


def seeds_by_x(values: Mapping[float, Mapping[int, float | None]], seeds: Sequence[int]) -> np.ndarray:
    """``values[x][seed]`` as a (seeds, xs) array in the order of ``values``, NaN where missing."""
    table = np.full((len(seeds), len(values)), np.nan)
    for column, by_seed in enumerate(values.values()):
        for row, seed in enumerate(seeds):
            value = by_seed.get(seed)
            if value is not None and math.isfinite(value):
                table[row, column] = value
    return table


def forest(ax: Axes, measurements: Sequence[Measurement], scale: float = 1.0) -> None:
    """Effects with their 95% intervals, one row each, with the null value marked."""
    rows = [m for m in measurements if m.estimate is not None]
    for row, m in enumerate(rows):
        e = m.estimate
        assert e is not None
        c = {"supported": "#2e7d32", "contradicted": "#c62828"}.get(m.verdict, "#8d6e00")
        ax.errorbar(
            e.value * scale,
            row,
            xerr=[[(e.value - e.ci_low) * scale], [(e.ci_high - e.value) * scale]],
            fmt="o",
            color=c,
            capsize=4,
        )
    ax.set_yticks(range(len(rows)), ["\n".join(textwrap.wrap(m.name, 34)) for m in rows], fontsize=8)
    ax.axvline(0.0, color="#333", linewidth=0.8)
    ax.invert_yaxis()


# ---- re-analyses: figures built but not rendered (study engine) --------------------------------------------

_RENDER: contextvars.ContextVar[bool] = contextvars.ContextVar("normdrop_render_figures", default=True)


@contextlib.contextmanager
def not_rendered() -> Iterator[None]:
    """Within the block, :func:`finish` returns figures with empty PNG bytes: the study's re-analyses (half the
    seeds, smaller budgets) discard their figures, and rendering them is most of an analysis's time."""
    token = _RENDER.set(False)
    try:
        yield
    finally:
        _RENDER.reset(token)
