"""Small line charts drawn with PIL alone (wb does not depend on matplotlib).

`line_chart(series, markers=..., log_x=..., title=...)` returns a PIL image: one or more series
(lines, points or both), optional vertical markers with labels, axis ticks at "nice" numbers
(1, 2, 2.5, 5 x 10^k; decades on a log axis) labelled compactly (`1e-6`, `2.5e-7`, `0.25`), axis
labels, a title and a legend. `wb lr-find` draws its loss-vs-LR plot with it; it is general enough
for a training `loss.png`.

The chart is drawn at twice the requested size and scaled down, which anti-aliases lines and text
without any extra dependency. Text uses the DejaVu Sans shipped in workbench/assets, so a chart
looks the same everywhere; PIL's built-in font is the fallback.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT_PATH = Path(__file__).resolve().parent / "assets" / "DejaVuSans.ttf"
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
GRID = (228, 228, 228)
# matplotlib's "tab10": distinct, readable on white, and familiar to anyone who reads loss plots
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
SCALE = 2  # supersampling factor


@dataclass
class Series:
    """One data series. Non-finite y values (and x <= 0 on a log axis) break the line."""

    x: Sequence[float]
    y: Sequence[float]
    label: str | None = None
    color: tuple[int, int, int] | None = None  # None: the next palette colour
    line: bool = True  # join consecutive points
    points: bool = False  # a dot at each point
    width: float = 2.0  # line width in output pixels
    radius: float = 2.5  # dot radius in output pixels


@dataclass
class Marker:
    """A vertical line at `x`, labelled near the top of the plot."""

    x: float
    label: str = ""
    color: tuple[int, int, int] = INK
    dashed: bool = True


# --- numbers ------------------------------------------------------------------------------------


def format_number(value: float, step: float | None = None, sci: bool | None = None) -> str:
    """A short label: `0`, `0.25`, `12`, `1e-6`, `2.5e-7`, `3e+4`.

    With `step` (the tick spacing) just enough digits are kept to tell neighbouring ticks apart;
    without it, three significant digits. Very small and very large magnitudes use the compact
    scientific style (no zero padding, no `+0`): `1e-6` rather than `1.0e-06`; `sci` forces the
    choice (an axis labels all its ticks one way)."""
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


def format_ticks(ticks: Sequence[float]) -> list[str]:
    """Labels for one axis: all scientific or all plain, with the digits the spacing needs."""
    step = _tick_step(list(ticks))
    nonzero = [abs(t) for t in ticks if t]
    sci = bool(nonzero) and (min(nonzero) < 1e-2 or max(nonzero) >= 1e5)
    geometric = len(nonzero) > 2 and max(nonzero) / min(nonzero) > 50  # log ticks: no common step
    return [format_number(t, None if geometric else step, sci) for t in ticks]


def nice_ticks(lo: float, hi: float, max_ticks: int = 7) -> list[float]:
    """Ticks at multiples of 1, 2, 2.5 or 5 x 10^k inside [lo, hi], at most `max_ticks` of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    raw = (hi - lo) / max(1, max_ticks - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw * (1 - 1e-9))
    first = math.ceil(lo / step - 1e-9)
    ticks = []
    k = first
    while k * step <= hi + step * 1e-9:
        ticks.append(0.0 if abs(k * step) < step * 1e-9 else float(f"{k * step:.12g}"))
        k += 1
    return ticks


def log_ticks(lo: float, hi: float, max_ticks: int = 8) -> list[float]:
    """Ticks for a log axis over [lo, hi] (both > 0): decades, thinned if there are many; 1-2-5
    within a decade when the range is narrow; plain nice ticks when it is narrower still."""
    if lo <= 0 or hi <= lo:
        return nice_ticks(lo, hi, max_ticks)
    a, b = math.log10(lo), math.log10(hi)
    decades = [10.0**k for k in range(math.ceil(a - 1e-9), math.floor(b + 1e-9) + 1)]
    if len(decades) >= 3:
        every = math.ceil(len(decades) / max_ticks)
        return decades[::every]
    ticks = [
        m * 10.0**k
        for k in range(math.floor(a) - 1, math.ceil(b) + 1)
        for m in (1, 2, 5)
        if lo * (1 - 1e-9) <= m * 10.0**k <= hi * (1 + 1e-9)
    ]
    if len(ticks) >= 3:
        return ticks[:: math.ceil(len(ticks) / max_ticks)]
    return [t for t in nice_ticks(lo, hi, min(max_ticks, 5)) if t > 0]


def _tick_step(ticks: list[float]) -> float | None:
    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False) if b > a]
    return min(gaps) if gaps else None


# --- drawing ------------------------------------------------------------------------------------


@lru_cache(maxsize=32)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The shipped DejaVu Sans at `size` pixels, else PIL's own font."""
    try:
        return ImageFont.truetype(str(FONT_PATH), size)
    except OSError:
        try:
            return ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1 has one bitmap size only
            return ImageFont.load_default()


def _text_size(f, text: str) -> tuple[int, int]:
    left, top, right, bottom = f.getbbox(text or " ")
    return right - left, bottom - top


def _range(values: list[float], pad: float) -> tuple[float, float]:
    if not values:
        return 0.0, 1.0
    lo, hi = min(values), max(values)
    if hi == lo:
        span = abs(hi) * 0.05 or 0.5
        return lo - span, hi + span
    return lo - pad * (hi - lo), hi + pad * (hi - lo)


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
) -> Image.Image:
    """Draw the series (and markers) into a new `width` x `height` RGB image.

    Ranges default to the finite data (plus 4% padding on y). Points outside `y_range` are clipped
    at the plot's edge, so a diverging tail does not squash the interesting part."""
    s = SCALE
    W, H = width * s, height * s
    image = Image.new("RGB", (W, H), BACKGROUND)
    draw = ImageDraw.Draw(image)
    base = max(9, round(min(width, height) / 40))  # font size in output pixels
    f_tick, f_label, f_title = font(base * s), font(round(base * 1.1) * s), font(round(base * 1.3) * s)

    def usable_x(x: float) -> bool:
        return math.isfinite(x) and (x > 0 if log_x else True)

    xs = [x for ser in series for x, y in zip(ser.x, ser.y, strict=False) if usable_x(x) and math.isfinite(y)]
    xs += [m.x for m in markers if usable_x(m.x)]
    ys = [y for ser in series for y in ser.y if math.isfinite(y)]
    if x_range is None:
        if log_x and xs:
            lo, hi = min(xs), max(xs)
            x_range = (lo / 1.1, hi * 1.1) if hi > lo else (lo / 2, hi * 2)
        else:
            x_range = _range(xs, 0.0)
    if y_range is None:
        y_range = _range(ys, 0.04)
    x0, x1 = x_range
    y0, y1 = y_range
    if log_x and (x0 <= 0 or x1 <= x0):
        x0, x1 = (min(xs) if xs else 1e-3), (max(xs) if xs else 1.0)
        x1 = x1 if x1 > x0 else x0 * 10
    if x1 <= x0:
        x1 = x0 + 1.0
    if y1 <= y0:
        y1 = y0 + 1.0

    x_ticks = log_ticks(x0, x1) if log_x else nice_ticks(x0, x1)
    y_ticks = nice_ticks(y0, y1, max_ticks=max(3, height // 70))
    x_texts, y_texts = format_ticks(x_ticks), format_ticks(y_ticks)

    # --- layout: margins from the text that goes in them -------------------------------------
    pad = 8 * s
    tick_h = _text_size(f_tick, "0123456789e-")[1]
    label_h = _text_size(f_label, "Ag")[1]
    title_h = _text_size(f_title, "Ag")[1] if title else 0
    y_text_w = max((_text_size(f_tick, t)[0] for t in y_texts), default=0)
    left = pad + (label_h + pad if y_label else 0) + y_text_w + pad
    right = W - max(pad * 3, _text_size(f_tick, x_texts[-1])[0] // 2 + pad if x_texts else 0)
    top = pad + (title_h + pad if title else 0)
    bottom = H - (pad + (label_h + pad if x_label else 0) + tick_h + pad)
    if right - left < 20 * s or bottom - top < 20 * s:
        raise ValueError(f"a {width}x{height} chart leaves no room to plot")

    def px(x: float) -> float:
        if log_x:
            return left + (math.log10(x) - math.log10(x0)) / (math.log10(x1) - math.log10(x0)) * (
                right - left
            )
        return left + (x - x0) / (x1 - x0) * (right - left)

    def py(y: float) -> float:
        return bottom - (y - y0) / (y1 - y0) * (bottom - top)

    # --- grid, axes, ticks --------------------------------------------------------------------
    for t, text in zip(x_ticks, x_texts, strict=True):
        x = px(t)
        draw.line([(x, top), (x, bottom)], fill=GRID, width=s)
        tw = _text_size(f_tick, text)[0]
        draw.text((x - tw / 2, bottom + pad), text, font=f_tick, fill=INK)
    for t, text in zip(y_ticks, y_texts, strict=True):
        y = py(t)
        draw.line([(left, y), (right, y)], fill=GRID, width=s)
        tw, th = _text_size(f_tick, text)
        draw.text((left - pad - tw, y - th / 2 - f_tick.getbbox(text)[1]), text, font=f_tick, fill=INK)
    draw.rectangle([left, top, right, bottom], outline=INK, width=s)
    if title:
        tw = _text_size(f_title, title)[0]
        draw.text(((left + right) / 2 - tw / 2, pad), title, font=f_title, fill=INK)
    if x_label:
        tw = _text_size(f_label, x_label)[0]
        draw.text(((left + right) / 2 - tw / 2, H - pad - label_h - s * 2), x_label, font=f_label, fill=INK)
    if y_label:
        tw, th = _text_size(f_label, y_label)
        band = Image.new("RGB", (tw + 4 * s, label_h + 4 * s), BACKGROUND)
        ImageDraw.Draw(band).text((2 * s, 0), y_label, font=f_label, fill=INK)
        band = band.rotate(90, expand=True)
        image.paste(band, (pad, round((top + bottom) / 2 - band.height / 2)))

    # --- the data, drawn on the plot area's own canvas so anything outside is clipped ----------
    area = Image.new("RGB", (round(right - left) - s, round(bottom - top) - s), BACKGROUND)
    area.paste(image.crop((left + s, top + s, left + s + area.width, top + s + area.height)))
    ad = ImageDraw.Draw(area)
    ox, oy = left + s, top + s
    colors = []
    for i, ser in enumerate(series):
        color = ser.color or PALETTE[i % len(PALETTE)]
        colors.append(color)
        segment: list[tuple[float, float]] = []
        runs = []
        for x, y in zip(ser.x, ser.y, strict=False):
            if usable_x(x) and math.isfinite(y):
                # clamp far-away values: PIL misbehaves with huge coordinates
                segment.append((px(x) - ox, min(max(py(y) - oy, -H), 2 * H)))
            elif segment:
                runs.append(segment)
                segment = []
        if segment:
            runs.append(segment)
        for run in runs:
            if ser.line and len(run) > 1:
                ad.line(run, fill=color, width=max(1, round(ser.width * s)), joint="curve")
            if ser.points:
                r = ser.radius * s
                for x, y in run:
                    ad.ellipse([x - r, y - r, x + r, y + r], fill=color)
    for m in markers:
        if not usable_x(m.x) or not x0 <= m.x <= x1:
            continue
        x = px(m.x) - ox
        if m.dashed:
            dash = 6 * s
            for y in range(0, area.height, 2 * dash):
                ad.line([(x, y), (x, min(y + dash, area.height))], fill=m.color, width=max(1, round(1.5 * s)))
        else:
            ad.line([(x, 0), (x, area.height)], fill=m.color, width=max(1, round(1.5 * s)))
    image.paste(area, (ox, oy))

    # --- marker labels: near the top, each in the first row where it overlaps nothing -------------
    rows: list[list[tuple[float, float]]] = []
    row_h = tick_h + 6 * s
    for m in sorted((m for m in markers if m.label and usable_x(m.x) and x0 <= m.x <= x1), key=lambda m: m.x):
        x = px(m.x)
        tw = _text_size(f_tick, m.label)[0]
        start = x + 4 * s if x + 4 * s + tw <= right - 2 * s else x - 4 * s - tw
        box = (start - 2 * s, start + tw + 2 * s)
        r = next((i for i, taken in enumerate(rows) if all(box[1] < a or box[0] > b for a, b in taken)), None)
        if r is None:
            rows.append([])
            r = len(rows) - 1
        rows[r].append(box)
        y = top + 4 * s + r * row_h
        draw.rectangle([box[0], y, box[1], y + tick_h + 3 * s], fill=BACKGROUND)
        draw.text((start, y - f_tick.getbbox(m.label)[1] + s), m.label, font=f_tick, fill=m.color)

    # --- legend, top right inside the plot ----------------------------------------------------------
    labelled = [(ser, c) for ser, c in zip(series, colors, strict=True) if ser.label]
    if legend and labelled:
        swatch = 22 * s
        lw = max(_text_size(f_tick, ser.label)[0] for ser, _ in labelled) + swatch + 3 * pad // 2
        lx1 = right - pad
        lx0 = lx1 - lw
        ly0 = top + pad + len(rows) * row_h
        ly1 = ly0 + len(labelled) * row_h + pad // 2
        draw.rectangle([lx0, ly0, lx1, ly1], fill=BACKGROUND, outline=GRID, width=s)
        for i, (ser, color) in enumerate(labelled):
            y = ly0 + pad // 2 + i * row_h + row_h / 2 - 2 * s
            if ser.line:
                draw.line([(lx0 + pad // 2, y), (lx0 + pad // 2 + swatch, y)], fill=color, width=2 * s)
            if ser.points:
                cx, r = lx0 + pad // 2 + swatch / 2, ser.radius * s
                draw.ellipse([cx - r, y - r, cx + r, y + r], fill=color)
            th = f_tick.getbbox(ser.label)
            draw.text((lx0 + pad + swatch, y - (th[3] + th[1]) / 2), ser.label, font=f_tick, fill=INK)

    return image.resize((width, height), Image.LANCZOS)
