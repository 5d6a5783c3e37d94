"""workbench.plot: matplotlib line charts (labels, log axis, markers, clipping) and the lr-find plot.

The charts are checked through the Figure that line_chart returns (its lines, texts, scales and
legend), and through the PNG written from it (size, not blank)."""

import math

import numpy as np
import pytest
from PIL import Image

from workbench.plot import Marker, Series, format_number, line_chart, save_png
from workbench.train.lr_find import Finding, plot_finding

RED, BLUE = (214, 39, 40), (31, 119, 180)


def marker_lines(ax) -> dict[str, object]:
    return {
        line.get_gid()[len("marker:") :]: line
        for line in ax.lines
        if (line.get_gid() or "").startswith("marker:")
    }


def label_texts(ax) -> dict[str, object]:
    return {t.get_text(): t for t in ax.texts if (t.get_gid() or "").startswith("marker-label:")}


def tick_texts(figure, axis: str) -> list[str]:
    figure.canvas.draw()
    ax = figure.axes[0]
    lo, hi = sorted(getattr(ax, f"get_{axis}lim")())
    ticks = getattr(ax, f"get_{axis}ticklabels")()
    return [t.get_text() for t in ticks if lo <= t.get_position()[0 if axis == "x" else 1] <= hi]


def test_numbers_are_labelled_compactly():
    assert format_number(0) == "0"
    assert format_number(1.9e-7) == "1.9e-7" and format_number(6.6e-7) == "6.6e-7"
    assert format_number(1.13e-6) == "1.13e-6" and format_number(9.999e-7) == "1e-6"
    assert format_number(0.123456) == "0.123" and format_number(12345) == "12345"
    assert format_number(123456) == "1.23e5" and format_number(-2.5e-5) == "-2.5e-5"
    assert format_number(1.5e-3, sci=False) == "0.0015" and format_number(0.25, sci=True) == "2.5e-1"
    assert format_number(2.5e-6, step=5e-7) == "2.5e-6" and format_number(0.105, step=0.005) == "0.105"


def test_a_chart_has_its_series_markers_labels_and_legend(tmp_path):
    x = np.linspace(0, 1e-2, 31)
    y = 1 / (1 + x * 800) + 0.05
    figure = line_chart(
        [Series(x, y, "smoothed", color=BLUE), Series(x, y + 0.01, "raw", line=False, points=True)],
        [Marker(1e-3, "lower 1e-3", RED, dashed=False), Marker(5e-3, "upper 5e-3", RED)],
        width=640,
        height=400,
        title="LR range test",
        x_label="learning rate",
        y_label="validation loss",
    )
    ax = figure.axes[0]
    assert ax.get_title() == "LR range test" and ax.get_xlabel() == "learning rate"
    assert ax.get_ylabel() == "validation loss" and ax.get_xscale() == "linear"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["smoothed", "raw"]
    smooth, raw = ax.lines[0], ax.lines[1]
    assert smooth.get_linestyle() == "-" and smooth.get_marker() in (None, "None", "")
    assert raw.get_linestyle() == "None" and raw.get_marker() == "o"
    assert np.allclose(smooth.get_ydata(), y) and np.allclose(raw.get_ydata(), y + 0.01)
    assert smooth.get_color() == pytest.approx((31 / 255, 119 / 255, 180 / 255))
    lines = marker_lines(ax)
    assert set(lines) == {"lower 1e-3", "upper 5e-3"}
    assert lines["lower 1e-3"].get_xdata()[0] == 1e-3 and lines["lower 1e-3"].get_linestyle() == "-"
    assert lines["upper 5e-3"].get_linestyle() == "--"  # dashed
    assert set(label_texts(ax)) == {"lower 1e-3", "upper 5e-3"}
    # one label style per axis: the lr axis is all 1e-3 style, with 0 as 0
    assert tick_texts(figure, "x") == ["0", "2e-3", "4e-3", "6e-3", "8e-3", "1e-2"]

    path = save_png(figure, tmp_path / "chart.png")
    assert path == tmp_path / "chart.png" and [p.name for p in tmp_path.iterdir()] == ["chart.png"]
    again = Image.open(path)
    assert again.size == (640, 400)
    pixels = np.asarray(again.convert("RGB"))
    assert (pixels < 250).any(axis=2).mean() > 0.03  # not blank: axes, text, lines


def test_close_markers_get_labels_in_different_rows_and_the_legend_goes_below_them():
    figure = line_chart(
        [Series([1e-6, 1e-5, 1e-4], [1.0, 0.5, 0.7], "loss")],
        [Marker(1e-5, "steep 1e-5"), Marker(1.1e-5, "valley 1.1e-5"), Marker(1.2e-5, "midpoint 1.2e-5")],
        log_x=True,
        width=600,
        height=360,
    )
    ax = figure.axes[0]
    renderer = figure.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in label_texts(ax).values()]
    assert len(boxes) == 3
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    legend = ax.get_legend().get_window_extent(renderer)
    assert legend.y1 <= min(b.y0 for b in boxes) + 1  # under the lowest label


def test_log_axis_nan_values_and_clipping():
    x = np.logspace(-8, -3, 50)
    y = np.cos(np.log10(x))
    y[10] = np.nan  # breaks the line
    y[40:] = 1e6  # a blow-up, clipped by y_range
    figure = line_chart(
        [Series(np.concatenate([[0.0], x]), np.concatenate([[1.0], y]), "loss", color=BLUE)],
        [Marker(1e-6, "a"), Marker(-1.0, "not drawn"), Marker(math.nan, "nor this"), Marker(1.0, "past")],
        log_x=True,
        y_range=(-1.2, 1.2),
        width=500,
        height=300,
    )
    ax = figure.axes[0]
    assert ax.get_xscale() == "log" and ax.get_ylim() == pytest.approx((-1.2, 1.2))
    assert set(marker_lines(ax)) == {"a"} and set(label_texts(ax)) == {"a"}
    xs, ys = ax.lines[0].get_xdata(), ax.lines[0].get_ydata()
    assert math.isnan(xs[0])  # x = 0 has no place on a log axis
    assert math.isnan(ys[11]) and ys[12] == pytest.approx(y[11])
    lo, hi = ax.get_xlim()
    assert 1e-9 < lo <= 1e-8 and 1e-3 <= hi < 1e-2


def test_degenerate_inputs(tmp_path):
    for series in ([], [Series([1.0], [2.0], points=True)], [Series([0, 1], [5, 5])]):
        path = save_png(line_chart(series, width=300, height=200), tmp_path / "c.png")
        assert Image.open(path).size == (300, 200)
    with pytest.raises(ValueError, match="no room to plot"):
        line_chart([Series([0, 1], [0, 1])], width=40, height=30)


def finding(**bounds) -> Finding:
    lrs = [1e-7, 1e-6, 1e-5, 1e-4, 1e-3]
    losses = [0.30, 0.29, 0.22, 0.20, 5.0]
    smoothed = [0.30, 0.28, 0.23, 0.21, None]  # the diverged point left out
    return Finding(lrs, losses, smoothed, "log", run_dir="/runs/lf", component="unet", **bounds)


def test_lr_find_plot_draws_the_bounds_it_has_and_the_smoothed_points_it_is_given():
    figure = plot_finding(
        finding(lower=1e-6, upper=1e-4, midpoint=5.05e-5, valley=2e-5, steep=1e-5, diverged_at=1e-3)
    )
    ax = figure.axes[0]
    assert ax.get_xscale() == "log" and ax.get_title() == "LR range test: lf"
    assert ax.get_xlabel() == "learning rate (UNet), log scale" and ax.get_ylabel() == "validation loss"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["loss/val", "smoothed"]
    raw, smooth = ax.lines[0], ax.lines[1]
    assert list(raw.get_ydata()) == [0.30, 0.29, 0.22, 0.20, 5.0]
    assert list(smooth.get_xdata()) == [1e-7, 1e-6, 1e-5, 1e-4] and list(smooth.get_ydata()) == [
        0.30,
        0.28,
        0.23,
        0.21,
    ]
    lines = marker_lines(ax)
    assert set(lines) == {
        "lower 1e-6",
        "upper 1e-4",
        "midpoint 5.05e-5",
        "valley 2e-5",
        "steep 1e-5",
        "diverged 1e-3",
    }
    assert lines["lower 1e-6"].get_linestyle() == "-" and lines["midpoint 5.05e-5"].get_linestyle() == "--"
    # the y range covers what came before the divergence: 0.20 .. 0.30 plus 6% padding
    assert ax.get_ylim() == pytest.approx((0.20 - 0.006, 0.30 + 0.006))


def test_lr_find_plot_without_an_upper_bound_draws_no_upper_and_no_midpoint():
    ax = plot_finding(finding(lower=1e-6, valley=2e-5)).axes[0]
    assert set(marker_lines(ax)) == {"lower 1e-6", "valley 2e-5"}
    assert set(label_texts(ax)) == {"lower 1e-6", "valley 2e-5"}
    ax = plot_finding(finding()).axes[0]
    assert marker_lines(ax) == {} and ax.get_title() == "LR range test: lf (no bounds)"
