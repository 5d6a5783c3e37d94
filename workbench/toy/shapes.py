"""Procedural "coloured shape on a coloured background" images with captions, and an analytic judge.

The toy model is trained and judged on these: every image is one shape (circle, square, triangle,
cross or ring) of one palette colour on a flat background of another, captioned
"a red circle on a blue background". Because the images are this simple, a model's samples can be
scored without any learned judge: `score_image` measures, from pixels alone, whether the background,
the foreground colour and the shape match a caption, and `classify_image` reads the caption back.

Everything is deterministic: sampling uses a private `random.Random(seed)` and rendering is a fixed
4x4 supersampled coverage, so the same spec gives the same bytes on every machine.
"""

from __future__ import annotations

import math
import os
import random
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

# Well-separated colours: the closest pair (orange/yellow) is ~107 apart in 0-255 RGB, about twice
# COLOR_SIGMA, so a colour judged against the wrong name scores exp(-(107/60)^2) ~ 0.04.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (255, 140, 0),
    "yellow": (250, 235, 50),
    "green": (30, 170, 60),
    "blue": (30, 80, 220),
    "purple": (140, 50, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

# Every shape fills a square box of side `size`; all are axis-aligned (the triangle points up), so a
# fit needs only a centre and a side. Each stays recognisable at 32 px for the default size range.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring")

# Fraction of its box each shape covers: used to fit a shape's side to a mask's area.
_AREA_FRACTION = {
    "circle": math.pi / 4,
    "square": 1.0,
    "triangle": 0.5,
    "cross": 5 / 9,  # two bars of width side/3 overlapping in a (side/3)^2 square
    "ring": math.pi / 4 * (1 - 0.25),  # hole radius is half the outer radius
}
# Distance from the box centre down to the shape's centroid, in sides (only the triangle is lopsided:
# its centroid sits 2/3 of the way from apex to base, i.e. side/6 below the box centre).
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1 / 6, "cross": 0.0, "ring": 0.0}

DEFAULT_SIZE_RANGE = (0.4, 0.7)
# Gap kept between a sampled shape and the image edge: wider than the border band the background
# score reads (1/16 of the side), so a rendered border is pure background.
EDGE_MARGIN = 0.08
SUPERSAMPLE = 4

# Scoring constants (see score_image).
COLOR_SIGMA = 60.0  # RGB distance at which a colour's closeness falls to 1/e
OBJECT_TAU = 50.0  # RGB distance from the background beyond which a pixel may be the object
MIN_OBJECT_FRACTION = 0.01  # an "object" smaller than 1% of the image counts as no object
IOU_FLOOR, IOU_FULL = 0.5, 0.9  # fit quality maps IoU 0.5 -> 0 and IoU 0.9 -> 1
SHAPE_MARGIN = 0.1  # beating every other shape's IoU by this much gives full confidence


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class ShapeSpec:
    """One image: a `fg`-coloured `shape` centred at (cx, cy) on a `bg` background.

    cx, cy are fractions of the image width/height; size is the side of the shape's square box as a
    fraction of the image side. The whole box must lie inside the image.
    """

    shape: str
    fg: str
    bg: str
    cx: float = 0.5
    cy: float = 0.5
    size: float = 0.5

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {', '.join(SHAPES)}")
        for role, name in (("fg", self.fg), ("bg", self.bg)):
            if name not in COLORS:
                raise ValueError(f"unknown {role} colour {name!r}; expected one of {', '.join(COLORS)}")
        if self.fg == self.bg:
            raise ValueError(f"fg and bg are both {self.fg!r}; the shape would be invisible")
        if not 0 < self.size <= 1:
            raise ValueError(f"size {self.size} must be in (0, 1]")
        half = self.size / 2
        for axis, centre in (("cx", self.cx), ("cy", self.cy)):
            if not half - 1e-9 <= centre <= 1 - half + 1e-9:
                raise ValueError(f"{axis}={centre} puts a shape of size {self.size} outside the image")

    @property
    def caption(self) -> str:
        return f"{_article(self.fg)} {self.fg} {self.shape} on {_article(self.bg)} {self.bg} background"


_CAPTION_RE = re.compile(r"^\s*an?\s+(\w+)\s+(\w+)\s+on\s+an?\s+(\w+)\s+background\s*\.?\s*$", re.IGNORECASE)


def parse_caption(text: str) -> tuple[str, str, str]:
    """Read a caption back: 'a red circle on a blue background' -> ("circle", "red", "blue").

    Either article ("a"/"an"), any case and a final "." are accepted; anything else is a ValueError.
    """
    match = _CAPTION_RE.match(text)
    if match:
        fg, shape, bg = (word.lower() for word in match.groups())
        if shape in SHAPES and fg in COLORS and bg in COLORS:
            return shape, fg, bg
    raise ValueError(
        f"cannot parse caption {text!r}: expected 'a <colour> <shape> on a <colour> background' with "
        f"colour one of {', '.join(COLORS)} and shape one of {', '.join(SHAPES)}"
    )


# --- geometry -------------------------------------------------------------------------------------


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, half: float) -> np.ndarray:
    """Whether points at offset (dx, dy) from the box centre lie in `shape` with box half-side `half`."""
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        # Apex at dy = -half, base at dy = +half; the half-width grows linearly from 0 to half.
        return (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    if shape == "cross":
        arm = half / 3
        adx, ady = np.abs(dx), np.abs(dy)
        return ((adx <= half) & (ady <= arm)) | ((ady <= half) & (adx <= arm))
    if shape == "ring":
        r2 = dx * dx + dy * dy
        return (r2 <= half * half) & (r2 >= half * half / 4)
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def shape_coverage(
    shape: str, cx: float, cy: float, side: float, height: int, width: int, supersample: int = 1
) -> np.ndarray:
    """Fraction of each pixel covered by `shape`, as float32 (height, width); all lengths in pixels.

    Pixel (row i, column j) spans [j, j+1) x [i, i+1). It is sampled on a supersample x supersample
    grid, so supersample=1 gives a 0/1 mask sampled at pixel centres. Only the shape's bounding box
    is evaluated, which keeps rendering and fitting cheap.
    """
    half = side / 2
    out = np.zeros((height, width), dtype=np.float32)
    r0, r1 = max(0, math.floor(cy - half) - 1), min(height, math.ceil(cy + half) + 1)
    c0, c1 = max(0, math.floor(cx - half) - 1), min(width, math.ceil(cx + half) + 1)
    if r0 >= r1 or c0 >= c1:
        return out
    s = supersample
    ys = r0 + (np.arange((r1 - r0) * s, dtype=np.float64) + 0.5) / s
    xs = c0 + (np.arange((c1 - c0) * s, dtype=np.float64) + 0.5) / s
    hit = _inside(shape, xs[None, :] - cx, ys[:, None] - cy, half)
    out[r0:r1, c0:c1] = hit.reshape(r1 - r0, s, c1 - c0, s).mean(axis=(1, 3))
    return out


def render_array(spec: ShapeSpec, size: int = 64) -> np.ndarray:
    """The image for `spec` as a uint8 (size, size, 3) array (see `render`)."""
    coverage = shape_coverage(
        spec.shape, spec.cx * size, spec.cy * size, spec.size * size, size, size, SUPERSAMPLE
    )
    fg = np.array(COLORS[spec.fg], dtype=np.float32)
    bg = np.array(COLORS[spec.bg], dtype=np.float32)
    pixels = bg + (fg - bg) * coverage[:, :, None]
    return np.rint(pixels).astype(np.uint8)


def render(spec: ShapeSpec, size: int = 64) -> Image.Image:
    """Render `spec` as a size x size RGB image, antialiased by 4x4 supersampling (deterministic)."""
    return Image.fromarray(render_array(spec, size))  # uint8 (H, W, 3) is RGB


# --- sampling and writing -------------------------------------------------------------------------


def _restriction(kind: str, names: Sequence[str] | None, known: Sequence[str]) -> list[str]:
    if names is None:
        return list(known)
    if isinstance(names, str):  # a bare string would otherwise be read as a list of letters
        names = [names]
    chosen = list(dict.fromkeys(names))
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise ValueError(
            f"unknown {kind} {', '.join(map(repr, unknown))}; expected one of {', '.join(known)}"
        )
    if not chosen:
        raise ValueError(f"the {kind} restriction is empty")
    return chosen


def sample_specs(
    n: int,
    seed: int,
    shapes: Sequence[str] | None = None,
    fg: Sequence[str] | None = None,
    bg: Sequence[str] | None = None,
    size_range: tuple[float, float] = DEFAULT_SIZE_RANGE,
) -> list[ShapeSpec]:
    """`n` random specs, a pure function of the arguments (a private `random.Random(seed)`).

    `shapes`, `fg` and `bg` restrict the choices (e.g. fg=["purple", "orange"] for a fine-tuning set
    the base model never saw); (fg, bg) pairs are drawn uniformly from those with fg != bg. Sizes are
    uniform in `size_range`; centres are uniform over positions keeping the shape EDGE_MARGIN from the
    image edge.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    shape_names = _restriction("shapes", shapes, SHAPES)
    pairs = [
        (f, b)
        for f in _restriction("fg colours", fg, tuple(COLORS))
        for b in _restriction("bg colours", bg, tuple(COLORS))
        if f != b
    ]
    if not pairs:
        raise ValueError(f"no fg/bg pair with different colours in fg={fg!r}, bg={bg!r}")
    lo, hi = size_range
    if not 0 < lo <= hi <= 1 - 2 * EDGE_MARGIN:
        raise ValueError(f"size_range {size_range} must satisfy 0 < lo <= hi <= {1 - 2 * EDGE_MARGIN:g}")

    rng = random.Random(seed)
    specs = []
    for _ in range(n):
        shape = rng.choice(shape_names)
        f, b = rng.choice(pairs)
        size = rng.uniform(lo, hi)
        span = (size / 2 + EDGE_MARGIN, 1 - size / 2 - EDGE_MARGIN)
        specs.append(ShapeSpec(shape, f, b, cx=rng.uniform(*span), cy=rng.uniform(*span), size=size))
    return specs


def write_dataset(
    folder: str | os.PathLike[str],
    n: int,
    seed: int,
    size: int = 64,
    **restrictions: object,
) -> list[Path]:
    """Write `n` sampled images as NNNN.png with NNNN.txt captions (EveryDream2 / kohya layout).

    `restrictions` go to `sample_specs` (shapes, fg, bg, size_range). Files are built in a temporary
    sibling folder and moved in only once all are written, so an error leaves `folder` as it was.
    Same-named files already in `folder` are replaced. Returns the image paths in index order.
    """
    specs = sample_specs(n, seed, **restrictions)  # type: ignore[arg-type]
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    digits = max(4, len(str(max(n - 1, 0))))
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        names = []
        for index, spec in enumerate(specs):
            stem = f"{index:0{digits}d}"
            render(spec, size).save(staging / f"{stem}.png")
            # No trailing newline: both trainers strip it anyway, and the file then equals the caption.
            (staging / f"{stem}.txt").write_text(spec.caption, encoding="utf-8")
            names.append(stem)
        folder.mkdir(exist_ok=True)  # only now, so a failed run does not even leave an empty folder
        for stem in names:
            for suffix in (".png", ".txt"):
                os.replace(staging / f"{stem}{suffix}", folder / f"{stem}{suffix}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [folder / f"{stem}.png" for stem in names]


class ShapesDataset:
    """In-memory map-style dataset (usable by torch's DataLoader): item i -> (image, caption).

    The image is a float32 tensor (3, size, size) in [-1, 1], the range SD's VAE expects. Images are
    rendered on access (about a millisecond), so memory stays flat for any `n`.
    """

    def __init__(self, n: int, seed: int, size: int = 64, **restrictions: object) -> None:
        self.size = size
        self.specs = sample_specs(n, seed, **restrictions)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, index: int):
        import torch  # only this helper needs torch; the rest of the module is numpy/PIL

        spec = self.specs[index]  # IndexError past the end, as iteration expects
        pixels = torch.from_numpy(render_array(spec, self.size)).permute(2, 0, 1).float()
        return pixels / 127.5 - 1.0, spec.caption


# --- scoring --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeScore:
    """Per-aspect agreement of an image with a caption, each in [0, 1]; `total` is their mean."""

    background: float
    foreground: float
    shape: float
    total: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", (self.background + self.foreground + self.shape) / 3)


@dataclass(frozen=True)
class _Analysis:
    """What the image says, independent of any caption."""

    border: np.ndarray  # float32 (K, 3): the outer band of pixels
    bg_color: np.ndarray  # median border colour
    fg_color: np.ndarray | None  # median colour of the object's core, None when there is no object
    core: np.ndarray  # float32 (M, 3): object pixels at least as far from bg_color as the median one
    ious: dict[str, float]  # best soft IoU of each shape's ideal coverage with the object's


def _as_pixels(img: Image.Image | np.ndarray) -> np.ndarray:
    """RGB pixels as float32 (H, W, 3) in 0-255 from a PIL image or an HWC / CHW array.

    uint8 arrays are 0-255; float arrays must be 0-1 (convert model output in [-1, 1] with (x + 1) / 2).
    """
    if isinstance(img, Image.Image):
        return np.asarray(img.convert("RGB"), dtype=np.float32)
    arr = np.asarray(img)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"expected an RGB image array (H, W, 3) or (3, H, W), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"expected a uint8 or float image array, got dtype {arr.dtype}")
    lo, hi = float(arr.min()), float(arr.max())
    if lo < -0.02 or hi > 1.02:
        raise ValueError(
            f"float image values span [{lo:.3g}, {hi:.3g}]; expected [0, 1] (map [-1, 1] with (x + 1) / 2)"
        )
    return (np.clip(arr, 0.0, 1.0) * 255.0).astype(np.float32)


def _closeness(pixels: np.ndarray, color: Sequence[float]) -> np.ndarray:
    """exp(-(d / COLOR_SIGMA)^2) for each pixel's RGB distance d to `color`."""
    d2 = ((pixels - np.asarray(color, dtype=np.float32)) ** 2).sum(axis=-1)
    return np.exp(-d2 / (COLOR_SIGMA * COLOR_SIGMA))


def fit_shapes(coverage: np.ndarray, supersample: int = 4) -> dict[str, float]:
    """Best soft IoU of each shape's ideal coverage with an (H, W) object `coverage` in [0, 1].

    Soft IoU = sum(min(a, b)) / sum(max(a, b)); comparing coverages rather than 0/1 masks keeps thin
    parts (a cross's arms, a ring's band) from being judged by how they happen to fall on the pixel
    grid. Each shape is fitted two ways and the better IoU kept: to the centroid and area of the
    coverage (exact for a clean render) and to the bounding box of its > 0.5 part (robust to a faint
    haze that inflates the area). All zeros if nothing is covered.
    """
    coverage = np.asarray(coverage, dtype=np.float32)
    height, width = coverage.shape
    area = float(coverage.sum())
    solid = coverage > 0.5
    if area <= 0 or not solid.any():
        return dict.fromkeys(SHAPES, 0.0)
    rows, cols = np.nonzero(solid)
    box_cx = (cols.min() + cols.max() + 1) / 2
    box_cy = (rows.min() + rows.max() + 1) / 2
    box_side = ((cols.max() + 1 - cols.min()) + (rows.max() + 1 - rows.min())) / 2
    mean_x = float((coverage.sum(axis=0) * (np.arange(width) + 0.5)).sum()) / area
    mean_y = float((coverage.sum(axis=1) * (np.arange(height) + 0.5)).sum()) / area
    ious = {}
    for shape in SHAPES:
        side = math.sqrt(area / _AREA_FRACTION[shape])
        fits = ((mean_x, mean_y - _CENTROID_DROP[shape] * side, side), (box_cx, box_cy, box_side))
        best = 0.0
        for cx, cy, s in fits:
            ideal = shape_coverage(shape, cx, cy, s, height, width, supersample)
            overlap = float(np.minimum(ideal, coverage).sum())
            best = max(best, overlap / (area + float(ideal.sum()) - overlap))
        ious[shape] = best
    return ious


def _analyse(img: Image.Image | np.ndarray) -> _Analysis:
    pixels = _as_pixels(img)
    height, width, _ = pixels.shape
    band = max(1, round(min(height, width) / 16))
    border = np.concatenate(
        [
            pixels[:band].reshape(-1, 3),
            pixels[-band:].reshape(-1, 3),
            pixels[band:-band, :band].reshape(-1, 3),
            pixels[band:-band, -band:].reshape(-1, 3),
        ]
    )
    bg_color = np.median(border, axis=0)
    dist_bg = np.sqrt(((pixels - bg_color) ** 2).sum(axis=-1))
    candidate = dist_bg > OBJECT_TAU
    if candidate.sum() < max(4, MIN_OBJECT_FRACTION * height * width):
        return _Analysis(border, bg_color, None, np.zeros((0, 3), np.float32), dict.fromkeys(SHAPES, 0.0))
    # The core (the farther half of the candidates) skips antialiased edge pixels, which are blends
    # of the two colours, so the object's colour is read from its interior.
    core_mask = candidate & (dist_bg >= np.median(dist_bg[candidate]))
    core = pixels[core_mask]
    fg_color = np.median(core, axis=0)
    # Each pixel's position on the line from the background to the object colour is its coverage:
    # exactly the antialiasing coverage for a clean render, and a sensible blend weight otherwise.
    direction = fg_color - bg_color
    coverage = np.clip((pixels - bg_color) @ direction / float(direction @ direction), 0.0, 1.0)
    return _Analysis(border, bg_color, fg_color, core, fit_shapes(coverage))


def _shape_confidence(ious: dict[str, float], shape: str) -> float:
    named = ious[shape]
    rival = max(iou for other, iou in ious.items() if other != shape)
    fit = min(1.0, max(0.0, (named - IOU_FLOOR) / (IOU_FULL - IOU_FLOOR)))
    lead = min(1.0, max(0.0, 0.5 + (named - rival) / (2 * SHAPE_MARGIN)))
    return fit * lead


def score_image(img: Image.Image | np.ndarray, spec_or_caption: ShapeSpec | str) -> ShapeScore:
    """Score how well `img` shows the spec's (or caption's) shape, foreground and background colour.

    With closeness(p, c) = exp(-(|p - c| / 60)^2) for RGB (0-255) distance:
      background = mean closeness of the border band (outer 1/16 of the side) to the named bg colour.
      foreground = mean closeness to the named fg colour of the object's core. The object is found
        without the caption: b = median border colour, candidates = pixels > 50 from b, core = the
        candidates at least as far from b as their median, f = median core colour.
      shape = fit * lead, from the soft IoU of the object coverage a = clip((p - b).(f - b) / |f - b|^2)
        with each shape's ideal coverage fitted to it (`fit_shapes`): fit = clip((IoU_named - 0.5) / 0.4),
        lead = clip(0.5 + (IoU_named - max IoU_other) / 0.2); so it needs a good fit that clearly beats
        every rival (a clean render has IoU ~0.99 and its nearest rival ~0.84, circle vs square).
    An image without an object (fewer than 1% of pixels away from the background) scores 0 for
    foreground and shape. Reading the object from the image, not the caption, keeps the three
    scores independent: a wrong background name does not spoil the shape score.
    """
    if isinstance(spec_or_caption, ShapeSpec):
        shape, fg, bg = spec_or_caption.shape, spec_or_caption.fg, spec_or_caption.bg
    else:
        shape, fg, bg = parse_caption(spec_or_caption)
    found = _analyse(img)
    background = float(_closeness(found.border, COLORS[bg]).mean())
    if found.fg_color is None:
        return ShapeScore(background=background, foreground=0.0, shape=0.0)
    foreground = float(_closeness(found.core, COLORS[fg]).mean())
    return ShapeScore(
        background=background, foreground=foreground, shape=_shape_confidence(found.ious, shape)
    )


def _nearest_color(color: np.ndarray, exclude: str | None = None) -> str:
    return min(
        (name for name in COLORS if name != exclude),
        key=lambda name: float(((color - np.asarray(COLORS[name], dtype=np.float32)) ** 2).sum()),
    )


def classify_image(img: Image.Image | np.ndarray) -> tuple[str | None, str | None, str]:
    """Best guess (shape, fg, bg) for an image, in parse_caption's order.

    bg is the palette colour nearest the median border colour; fg the one nearest the object's core
    colour (other than bg); shape the one whose ideal mask fits the object best. Without an object
    (see score_image) shape and fg are None.
    """
    found = _analyse(img)
    bg = _nearest_color(found.bg_color)
    if found.fg_color is None:
        return None, None, bg
    shape = max(SHAPES, key=lambda name: found.ious[name])
    return shape, _nearest_color(found.fg_color, exclude=bg), bg
