"""Line charts with matplotlib (Agg, no pyplot): loss.png, lr_find.png and any other plot wb writes.

`line_chart(series, markers=..., log_x=..., title=...)` returns a matplotlib `Figure` of
`width` x `height` pixels: one or more series (lines, points or both; NaN breaks a line, x <= 0 is
left out on a log axis), optional vertical markers with labels near the top of the plot (stacked in
rows so that close markers do not hide each other's labels), axis labels, a title and a legend.
`save_png(figure, path)` writes it atomically. Tests and callers can inspect the returned figure
(its lines, texts, scales and legend) instead of pixels.

The figure is built on the object-oriented API with its own Agg canvas: no global pyplot state,
no GUI backend, safe in threads and in worker processes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

Color = tuple[int, int, int] | str

INK = (30, 30, 30)
# matplotlib's "tab10" cycle: what the colours of a series default to
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
LABEL_BOX = {"boxstyle": "square,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85}
DPI = 100  # figure inches x DPI = the requested pixel size


@dataclass
class Series:
    """One data series. Non-finite y values (and x <= 0 on a log axis) break the line."""

    x: Sequence[float]
    y: Sequence[float]
    label: str | None = None
    color: Color | None = None  # None: the next palette colour
    line: bool = True  # join consecutive points
    points: bool = False  # a dot at each point
    dashed: bool = False  # a dashed line (to tell apart curves that may lie on each other)
    width: float = 2.0  # line width in pixels
    radius: float = 2.5  # dot radius in pixels


@dataclass
class Marker:
    """A vertical line at `x`, labelled near the top of the plot."""

    x: float
    label: str = ""
    color: Color = INK
    dashed: bool = True


# --- numbers ------------------------------------------------------------------------------------


def format_number(value: float, step: float | None = None, sci: bool | None = None) -> str:
    """A short label: `0`, `0.25`, `12`, `1e-6`, `2.5e-7`, `3e+4`.

    With `step` (the spacing of neighbouring values) just enough digits are kept to tell them
    apart; without it, three significant digits. Very small and very large magnitudes use the
    compact scientific style (no zero padding, no `+0`): `1e-6` rather than `1.0e-06`; `sci` forces
    the choice."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else str(value)
    magnitude = math.floor(math.log10(abs(value)))
    if step is not None and step > 0:
        places = magnitude - math.floor(math.log10(step) + 1e-9)
        if abs(step / 10 ** math.floor(math.log10(step) + 1e-9) - 2.5) < 1e-6:
            places += 1  # 2.5, 7.5: one more digit than the step's magnitude suggests
        places = min(max(places, 0), 6)
    else:
        places = 2
    if sci if sci is not None else (magnitude < -3 or magnitude >= 5):
        mantissa = value / 10**magnitude
        text = f"{mantissa:.{places}f}"
        if text.lstrip("-").startswith("10"):  # 9.99 rounded up to 10.0
            magnitude += 1
            text = f"{value / 10**magnitude:.{places}f}"
        return f"{_strip(text)}e{magnitude}"
    decimals = max(0, places - magnitude)
    return _strip(f"{value:.{decimals}f}")


def _strip(text: str) -> str:
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _mpl_color(color: Color | None):
    if color is None or isinstance(color, str):
        return color
    return tuple(c / 255 for c in color)


# --- the chart ----------------------------------------------------------------------------------


def line_chart(
    series: Sequence[Series],
    markers: Sequence[Marker] = (),
    *,
    width: int = 900,
    height: int = 540,
    title: str = "",
    x_label: str = "",
    y_label: str = "",
    log_x: bool = False,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
    legend: bool = True,
):
    """A `width` x `height` pixel matplotlib Figure with the series (and markers) on one axes.

    Ranges default to matplotlib's autoscaling of the finite data; points outside `y_range` are
    clipped at the plot's edge, so a diverging tail does not squash the interesting part. Markers
    outside the x range, non-finite, or <= 0 on a log axis are not drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if width < 120 or height < 90:
        raise ValueError(f"a {width}x{height} chart leaves no room to plot")
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.grid(True, color="#e4e4e4", linewidth=0.8)
    ax.set_axisbelow(True)
    if log_x:
        ax.set_xscale("log", nonpositive="mask")
    else:
        ax.xaxis.set_major_formatter(_tick_formatter())
    ax.yaxis.set_major_formatter(_tick_formatter())

    def usable_x(x: float) -> bool:
        return math.isfinite(x) and (x > 0 if log_x else True)

    pixel = 72 / DPI  # matplotlib sizes lines and markers in points
    for i, ser in enumerate(series):
        color = _mpl_color(ser.color) or _mpl_color(PALETTE[i % len(PALETTE)])
        xs = [float(x) if usable_x(float(x)) else math.nan for x in ser.x]
        ys = [float(y) if math.isfinite(float(y)) else math.nan for y in ser.y]
        ax.plot(
            xs,
            ys,
            color=color,
            linestyle=("--" if ser.dashed else "-") if ser.line else "none",
            linewidth=ser.width * pixel,
            marker="o" if ser.points else None,
            markersize=2 * ser.radius * pixel,
            markeredgewidth=0,
            label=ser.label if ser.label else "_nolegend_",
        )
    if x_range is not None and (not log_x or x_range[0] > 0):
        ax.set_xlim(*x_range)
    if y_range is not None and y_range[1] > y_range[0]:
        ax.set_ylim(*y_range)
    if title:
        ax.set_title(title)
    if x_label:
        ax.set_xlabel(x_label)
    if y_label:
        ax.set_ylabel(y_label)

    x0, x1 = sorted(ax.get_xlim())
    shown = [m for m in markers if usable_x(m.x) and x0 <= m.x <= x1]
    for m in shown:
        ax.axvline(
            m.x,
            color=_mpl_color(m.color),
            linestyle=(0, (6, 6)) if m.dashed else "-",
            linewidth=1.5 * pixel * 1.4,
            gid=f"marker:{m.label}",
            label="_nolegend_",
        )
    below = _label_markers(fig, ax, [m for m in shown if m.label])
    if legend and any(ser.label for ser in series):  # top right, under the marker labels
        ax.legend(loc="upper right", bbox_to_anchor=(1, below), fontsize="small", framealpha=0.9)
    return fig


def _tick_formatter():
    """Tick labels in one style per axis: all `1e-3`-style when any tick is under 0.01 or from
    1e5 up, else plain (`0.25`), with the digits the tick spacing needs."""
    from matplotlib.ticker import Formatter

    class Ticks(Formatter):
        ticks: list[float] = []

        def set_locs(self, locs):
            self.ticks = sorted(float(v) for v in locs)

        def __call__(self, value, pos=None):
            locs = [v for v in self.ticks if v]
            sci = bool(locs) and (min(map(abs, locs)) < 1e-2 or max(map(abs, locs)) >= 1e5)
            gaps = sorted(b - a for a, b in zip(self.ticks, self.ticks[1:], strict=False) if b > a)
            step = gaps[0] if gaps else None
            return format_number(value, step, sci)

    return Ticks()


def _label_markers(fig, ax, markers: list[Marker]) -> float:
    """Each marker's label near the top of the plot beside its line, in the first row where it
    overlaps no other label (rows go down from the top). Returns the height (as a fraction of the
    axes) below the lowest label."""
    if not markers:
        return 1.0
    from matplotlib.transforms import blended_transform_factory, offset_copy

    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()  # the constrained layout: where the axes finally are
    to_axes = blended_transform_factory(ax.transData, ax.transAxes)
    rows: list[list] = []  # the window extents taken in each row
    right = ax.get_window_extent(renderer).x1
    for m in sorted(markers, key=lambda m: m.x):
        for r in range(len(markers) + 1):
            shift = offset_copy(to_axes, fig=fig, x=4, y=-4 - 15 * r, units="points")
            text = ax.text(
                m.x, 1.0, m.label, transform=shift, ha="left", va="top", fontsize="small",
                color=_mpl_color(m.color), gid=f"marker-label:{m.label}",
                bbox=LABEL_BOX,
            )  # fmt: skip
            box = text.get_window_extent(renderer)
            if box.x1 > right:  # no room to the right of the line: put the label on its left
                text.set_transform(offset_copy(to_axes, fig=fig, x=-4, y=-4 - 15 * r, units="points"))
                text.set_horizontalalignment("right")
                box = text.get_window_extent(renderer)
            if r == len(rows):
                rows.append([])
            if not any(box.overlaps(other) for other in rows[r]):
                rows[r].append(box)
                break
            text.remove()
    axes_box = ax.get_window_extent(renderer)
    lowest = min(box.y0 for row in rows for box in row)
    return max(0.0, (lowest - 2 - axes_box.y0) / axes_box.height)


def save_png(figure, path: str | os.PathLike) -> Path:
    """Write `figure` as a PNG of its pixel size, atomically (a temporary file, then a rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png", dpi=DPI, facecolor="white")
    os.replace(tmp, path)
    return path
