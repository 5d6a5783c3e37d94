"""The labelled grid image: X along columns, Y along rows, one X*Y sub-grid per Z value, side by side.

Each sub-grid has a column of row labels on its left and a band of column labels on top; when there
is a Z axis, a title band above names the sub-grid's Z value. Sub-grids are separated by a white gap.
Labels are wrapped to their box and the font shrinks until the text fits. The font is the DejaVu
Sans that ships in workbench/assets, so a grid looks the same on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

FONT_PATH = Path(__file__).resolve().parent.parent / "assets" / "DejaVuSans.ttf"
MIN_FONT = 6
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


@dataclass(frozen=True)
class Geometry:
    """Where everything goes. Sizes in pixels; a band or column that is not drawn has size 0."""

    cols: int
    rows: int
    subgrids: int
    cell_w: int
    cell_h: int
    label_w: int  # the row-label column left of each sub-grid
    band_h: int  # the column-label band above each sub-grid
    title_h: int  # the Z title band above the column labels
    gap: int  # white space between sub-grids

    @property
    def subgrid_w(self) -> int:
        return self.label_w + self.cols * self.cell_w

    @property
    def width(self) -> int:
        return self.subgrids * self.subgrid_w + (self.subgrids - 1) * self.gap

    @property
    def height(self) -> int:
        return self.title_h + self.band_h + self.rows * self.cell_h

    def subgrid_left(self, z: int) -> int:
        return z * (self.subgrid_w + self.gap)

    def cell_box(self, x: int, y: int, z: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of cell (x, y) in sub-grid z."""
        left = self.subgrid_left(z) + self.label_w + x * self.cell_w
        top = self.title_h + self.band_h + y * self.cell_h
        return left, top, left + self.cell_w, top + self.cell_h


def geometry(
    cols: int,
    rows: int,
    subgrids: int,
    cell_w: int,
    cell_h: int,
    row_labels: bool = True,
    col_labels: bool = True,
    titles: bool = True,
) -> Geometry:
    """The grid's geometry. Margins scale with the cell so labels stay legible at 64 px and 1024 px."""
    band = max(cell_h // 5, 32)
    return Geometry(
        cols=cols,
        rows=rows,
        subgrids=subgrids,
        cell_w=cell_w,
        cell_h=cell_h,
        # A1111 gives row labels three quarters of a cell; tiny cells still need room for a word or two.
        label_w=max(cell_w * 3 // 4, 96) if row_labels else 0,
        band_h=band if col_labels else 0,
        title_h=band if titles else 0,
        gap=max(cell_w // 8, 16) if subgrids > 1 else 0,
    )


@lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_PATH), size)


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; a word longer than a line is broken between characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if font.getlength(candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:
                if font.getlength(line + ch) > width and line:
                    lines.append(line)
                    line = ""
                line += ch
        lines.append(line)
    return lines


def fit_text(text: str, width: int, height: int, max_size: int) -> tuple[ImageFont.FreeTypeFont, list[str]]:
    """The largest font (down to MIN_FONT) at which `text` wrapped to `width` fits in `height`.

    At the smallest size, lines that still do not fit are dropped and the last one ends in "...".
    """
    for size in range(max(max_size, MIN_FONT), MIN_FONT - 1, -1):
        font = _font(size)
        lines = _wrap(text, font, width)
        if len(lines) * _line_height(font) <= height:
            return font, lines
    keep = max(1, height // _line_height(font))
    if len(lines) > keep:
        lines = lines[:keep]
        last = lines[-1]
        while last and font.getlength(last + "...") > width:
            last = last[:-1]
        lines[-1] = last + "..."
    return font, lines


def _line_height(font: ImageFont.FreeTypeFont) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent


def _draw_label(draw: ImageDraw.ImageDraw, text: str, box: tuple[int, int, int, int], max_size: int) -> None:
    left, top, right, bottom = box
    pad = 2
    width, height = right - left - 2 * pad, bottom - top - 2 * pad
    if width <= 0 or height <= 0 or not text:
        return
    font, lines = fit_text(text, width, height, max_size)
    line_h = _line_height(font)
    y = top + pad + (height - line_h * len(lines)) // 2
    for line in lines:
        x = left + pad + (width - font.getlength(line)) / 2
        draw.text((x, y), line, font=font, fill=INK)
        y += line_h


def draw_grid(
    images: dict[tuple[int, int, int], Image.Image],
    geo: Geometry,
    col_labels: list[str] | None = None,
    row_labels: list[str] | None = None,
    titles: list[str] | None = None,
) -> Image.Image:
    """Paste each (x, y, z) image into its place and draw the labels. Missing cells stay white.

    An image smaller than the cell (a size axis) is centred in it; a larger one is an error."""
    canvas = Image.new("RGB", (geo.width, geo.height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    max_size = max(MIN_FONT, geo.band_h // 3 if geo.band_h else geo.cell_h // 8)
    for (x, y, z), image in images.items():
        if image.width > geo.cell_w or image.height > geo.cell_h:  # never resample silently: it hides bugs
            raise ValueError(f"cell {(x, y, z)} is {image.size}; cells are {geo.cell_w}x{geo.cell_h}")
        left, top = geo.cell_box(x, y, z)[:2]
        offset = ((geo.cell_w - image.width) // 2, (geo.cell_h - image.height) // 2)
        canvas.paste(image.convert("RGB"), (left + offset[0], top + offset[1]))
    for z in range(geo.subgrids):
        left = geo.subgrid_left(z)
        if titles and geo.title_h:
            _draw_label(draw, titles[z], (left, 0, left + geo.subgrid_w, geo.title_h), max_size)
        if col_labels and geo.band_h:
            for x, label in enumerate(col_labels):
                cell_left = left + geo.label_w + x * geo.cell_w
                box = (cell_left, geo.title_h, cell_left + geo.cell_w, geo.title_h + geo.band_h)
                _draw_label(draw, label, box, max_size)
        if row_labels and geo.label_w:
            for y, label in enumerate(row_labels):
                top = geo.title_h + geo.band_h + y * geo.cell_h
                _draw_label(draw, label, (left, top, left + geo.label_w, top + geo.cell_h), max_size)
    return canvas
