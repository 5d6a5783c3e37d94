"""workbench.plot: PIL line charts (ticks, number labels, log axis, markers, clipping, font fallback)."""

import math

import numpy as np
import pytest
from PIL import Image

from workbench import plot
from workbench.plot import Marker, Series, format_number, format_ticks, line_chart, log_ticks, nice_ticks

RED, BLUE = (214, 39, 40), (31, 119, 180)


def count_near(image: Image.Image, color, tolerance=40) -> int:
    a = np.asarray(image.convert("RGB")).astype(int)
    return int((np.abs(a - np.array(color)).sum(axis=2) < tolerance).sum())


def test_numbers_are_labelled_compactly():
    assert format_number(0) == "0"
    assert format_number(1.9e-7) == "1.9e-7" and format_number(6.6e-7) == "6.6e-7"
    assert format_number(1.13e-6) == "1.13e-6" and format_number(9.999e-7) == "1e-6"
    assert format_number(0.123456) == "0.123" and format_number(12345) == "12345"
    assert format_number(123456) == "1.23e5" and format_number(-2.5e-5) == "-2.5e-5"
    assert format_number(1.5e-3, sci=False) == "0.0015" and format_number(0.25, sci=True) == "2.5e-1"
    assert format_ticks(nice_ticks(0, 3e-6)) == ["0", "5e-7", "1e-6", "1.5e-6", "2e-6", "2.5e-6", "3e-6"]
    assert format_ticks(nice_ticks(0.1, 0.125)) == ["0.1", "0.105", "0.11", "0.115", "0.12", "0.125"]
    assert format_ticks(nice_ticks(0, 1e-2)) == [
        "0",
        "2e-3",
        "4e-3",
        "6e-3",
        "8e-3",
        "1e-2",
    ]  # one style per axis


def test_ticks():
    assert nice_ticks(0.09, 1.1) == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0, 3e-6) == [0, 5e-7, 1e-6, 1.5e-6, 2e-6, 2.5e-6, 3e-6]  # no 2.4999999e-06
    assert len(nice_ticks(0, 1, max_ticks=4)) <= 4
    assert log_ticks(1e-8, 1e-2) == [1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2]
    assert len(log_ticks(1e-12, 1)) <= 8  # many decades are thinned
    assert log_ticks(2e-7, 3e-6) == pytest.approx([2e-7, 5e-7, 1e-6, 2e-6])
    assert all(1e-6 <= t <= 1.5e-6 for t in log_ticks(1e-6, 1.5e-6)) and len(log_ticks(1e-6, 1.5e-6)) >= 2


def test_a_chart_has_the_requested_size_and_draws_its_series_and_markers(tmp_path):
    x = np.linspace(0, 1e-2, 31)
    y = 1 / (1 + x * 800) + 0.05
    image = line_chart(
        [Series(x, y, "smoothed", color=BLUE), Series(x, y + 0.01, "raw", line=False, points=True)],
        [Marker(1e-3, "lower 1e-3", RED), Marker(5e-3, "upper 5e-3", RED, dashed=False)],
        width=640,
        height=400,
        title="LR range test",
        x_label="learning rate",
        y_label="validation loss",
    )
    path = tmp_path / "chart.png"
    image.save(path)
    again = Image.open(path)
    assert again.size == (640, 400) and again.mode == "RGB"
    pixels = np.asarray(again)
    assert (pixels < 250).any(axis=2).mean() > 0.03  # not blank: axes, text, lines
    assert count_near(again, BLUE) > 300 and count_near(again, RED) > 200


def test_log_axis_nan_values_and_clipping_do_not_break_the_chart():
    x = np.logspace(-8, -3, 50)
    y = np.cos(np.log10(x))
    y[10] = np.nan  # breaks the line
    y[40:] = 1e6  # a blow-up, clipped by y_range
    image = line_chart(
        [
            Series(np.concatenate([[0.0], x]), np.concatenate([[1.0], y]), "loss", color=BLUE)
        ],  # x = 0: skipped
        [Marker(1e-6, "a"), Marker(-1.0, "not drawn"), Marker(math.nan, "nor this")],
        log_x=True,
        y_range=(-1.2, 1.2),
        width=500,
        height=300,
    )
    assert image.size == (500, 300) and count_near(image, BLUE) > 200


def test_degenerate_inputs():
    assert line_chart([], width=300, height=200).size == (300, 200)  # empty: axes only
    assert line_chart([Series([1.0], [2.0], points=True)], width=300, height=200).size == (300, 200)
    assert line_chart([Series([0, 1], [5, 5])], width=300, height=200).size == (300, 200)  # flat
    with pytest.raises(ValueError, match="no room to plot"):
        line_chart([Series([0, 1], [0, 1])], width=40, height=30, title="t", x_label="x", y_label="y")


def test_falls_back_to_pils_font_without_the_shipped_one(monkeypatch, tmp_path):
    assert plot.FONT_PATH.is_file()  # workbench/assets/DejaVuSans.ttf
    monkeypatch.setattr(plot, "FONT_PATH", tmp_path / "missing.ttf")
    plot.font.cache_clear()
    try:
        image = line_chart([Series([0, 1, 2], [3, 1, 2], "loss")], title="fallback", width=400, height=250)
        assert image.size == (400, 250)
    finally:
        monkeypatch.undo()
        plot.font.cache_clear()
