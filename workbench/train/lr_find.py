"""`wb lr-find`: the learning-rate range test (Leslie Smith; seed 003) in one command.

Seed 003 ramps the lr linearly from 0 to a value known to be too high over a whole run, reads the
validation loss against the lr by eye, takes a lower bound (where the loss starts falling) and an
upper bound (where it flattens or turns up), and trains at their midpoint. This module does the
reading, as a pure function of (lr, loss) points, and runs the test through the ordinary training
loop (`workbench.train.loop.train`): same recipe, data, validation split and deterministic
validation loss, with the lr ramped over `steps` optimizer steps, an evaluation every `val_every`
steps, no checkpoints, and a stop once the loss diverges (over 4x the best so far).

The analysis (`analyze`), along the axis the ramp is even in (lr for a linear ramp, log10 lr for
a log one); docs/lr_find.md has the why and how precise it is:
- divergence: the first point that is not finite or over 4x the best loss before it; it and
  everything after it are left out of the rest;
- noise: sigma from the second differences of the losses (`noise_sigma`), independent of smoothing;
- smoothing: a robust LOWESS (`lowess`): a local straight-line fit around each point (tricube weights
  over its k nearest neighbours, k about a tenth of the points, at least 7; 5 under 30 points), a
  point far from the median of its five neighbours discounted. A local line is unbiased on a slope
  and at the ends of the range, where a moving average flattens the curve and an EMA lags;
- the fall: from the highest smoothed point before the lowest one down to the lowest one. Within
  6 noise sigmas (more with fewer than 15 points) or 0.1% of the loss, there is no learning signal:
  no numbers, a message;
- a bound only where the data shows it: the loss beyond it flat within its noise (or turning up,
  or diverging); else None, with "rerun with --lr-max X" (or --lr-min), and no midpoint;
- lower and upper: the fall approximated by one straight line, fitted to the smoothed points from
  15% to 85% of it done, extended to the starting level (lower) and to the lowest level (upper),
  kept within the fall. For a fall that is straight between two knees this gives the knees, for an
  S-shaped one roughly the points where a tenth and nine tenths of it are done. It is Smith's
  reading by eye made repeatable: where the loss starts falling decisively, and where it stops
  (flattens, bottoms out before turning up, or runs into the divergence);
- midpoint: (lower + upper) / 2, seed 003's constant-lr choice;
- valley (fastai): the middle of the longest falling stretch of the smoothed loss, its flat ends
  trimmed (`_longest_fall`);
- steep (fastai): where the smoothed loss falls fastest against log10 lr;
- minimum (fastai): the lr of the lowest smoothed loss, divided by 10.
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from workbench.errors import WorkbenchError

DIVERGE_FACTOR = 4.0  # a loss over this many times the best so far has diverged
FLAT_NOISE = 6.0  # a fall within this many noise sigmas is no learning signal
FLAT_RELATIVE = 1e-3  # ... nor is one under this share of the loss
MIN_POINTS = 4
PICKS = ("midpoint", "valley", "steep", "minimum")
COMPONENTS = ("unet", "text_encoder", "both")
REPORT_FORMAT = "wb-lr-find/1"


def format_lr(value: float | None) -> str:
    """An lr as people write them: 1.9e-7, 6.6e-7, 1.46e-3, 0.05, 0."""
    if value is None:
        return "-"
    from workbench.plot import format_number

    return format_number(value, sci=0 < abs(value) < 1e-2)


# --- the analysis ---------------------------------------------------------------------------------


@dataclass
class Finding:
    """What a range test found. Learning rates are None when there is no learning signal."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float | None]  # None where left out (diverged, or lr <= 0 on a log axis)
    axis: str  # "linear" or "log": what the ramp is even in, and what the analysis measures along
    lower: float | None = None
    upper: float | None = None
    midpoint: float | None = None
    valley: float | None = None
    steep: float | None = None
    minimum: float | None = None
    upper_reason: str | None = None  # "flattens", "turns up", "diverges", "not seen"
    lower_seen: bool = False  # a bound is only reported when the data shows it
    upper_seen: bool = False
    lower_limit: float | None = None  # the range's edge, standing in for a bound not seen (--force)
    upper_limit: float | None = None
    rerun: str | None = None  # the flag that would show the missing bound, e.g. "--lr-max 3e-3"
    diverged_at: float | None = None
    message: str = ""
    notes: list[str] = field(default_factory=list)
    noise: float = 0.0
    window: int = 0
    steps: list[int] | None = None
    metric: str = "loss/val"
    component: str | None = None
    run_dir: str | None = None

    @property
    def found(self) -> bool:
        """Both bounds are in the data (only then is there a midpoint)."""
        return self.lower is not None and self.upper is not None

    def forced(self, pick: str = "midpoint") -> tuple[float, str]:
        """For --force: the suggestion, with a range edge standing in for a bound that was not seen
        (said in the returned note)."""
        if pick != "midpoint" or self.found:
            return self.suggestion(pick), ""
        if self.lower_limit is None and self.lower is None:
            raise WorkbenchError(f"no {pick} suggestion, even with --force: {self.message}")
        lower = self.lower if self.lower is not None else self.lower_limit
        upper = self.upper if self.upper is not None else self.upper_limit
        missing = [n for n, v in (("lower", self.lower), ("upper", self.upper)) if v is None]
        note = f"--force: the {' and '.join(missing)} bound not seen; the range's edge used instead"
        return (lower + upper) / 2, note

    def suggestion(self, pick: str = "midpoint") -> float:
        if pick not in PICKS:
            raise WorkbenchError(f"--pick {pick}: choose one of {', '.join(PICKS)}")
        value = getattr(self, pick)
        if value is None:
            raise WorkbenchError(f"no {pick} suggestion: {self.message}")
        return value

    def to_json(self) -> dict:
        data = asdict(self)
        points = []
        for i, (lr, loss, smooth) in enumerate(zip(self.lrs, self.losses, self.smoothed, strict=True)):
            point = {"lr": lr, "loss": loss if math.isfinite(loss) else None, "smoothed": smooth}
            if self.steps is not None:
                point = {"step": self.steps[i], **point}
            points.append(point)
        for key in ("lrs", "losses", "smoothed", "steps"):
            data.pop(key)
        return {"format": REPORT_FORMAT, **data, "found": self.found, "points": points}


def analyze(
    lrs: Sequence[float],
    losses: Sequence[float],
    *,
    log: bool | None = None,
    window: int | None = None,
    steps: Sequence[int] | None = None,
) -> Finding:
    """Read an LR range test: (lr, loss) points in the order they were measured, lr rising.

    `log`: whether the ramp was even in log lr (None: decide from the spacing of the lrs).
    `window`: the smoother's neighbourhood in points (default: a tenth of them, at least 7; 5 under 30)."""
    lr = np.asarray(lrs, dtype=float)
    y = np.asarray(losses, dtype=float)
    if lr.shape != y.shape or lr.ndim != 1:
        raise WorkbenchError(f"lrs and losses differ in length ({lr.size} and {y.size})")
    if lr.size < MIN_POINTS:
        raise WorkbenchError(f"a range test needs at least {MIN_POINTS} losses, got {lr.size}")
    if not np.isfinite(lr).all() or (np.diff(lr) < 0).any():
        raise WorkbenchError("the learning rates must be finite and rise (never fall) from point to point")
    if lr[-1] <= lr[0]:
        raise WorkbenchError(f"the learning rate does not change ({format_lr(lr[0])}): not a range test")
    if log is None:
        log = _looks_geometric(lr)
    finding = Finding(
        lrs=lr.tolist(),
        losses=y.tolist(),
        smoothed=[None] * lr.size,
        axis="log" if log else "linear",
        steps=list(steps) if steps is not None else None,
    )
    notes = finding.notes

    # Divergence: everything from the first non-finite loss or loss over 4x the best before it.
    end = lr.size
    for i in range(1, lr.size):
        best = np.nanmin(np.where(np.isfinite(y[:i]), y[:i], np.nan)) if np.isfinite(y[:i]).any() else np.inf
        if not math.isfinite(y[i]) or y[i] > DIVERGE_FACTOR * best:
            end = i
            finding.diverged_at = float(lr[i])
            break
    use = np.arange(end)
    if log:
        use = use[lr[use] > 0]
        if use.size < end:
            notes.append(f"{end - use.size} point(s) at lr 0 left out of the log-axis analysis")
    use = use[np.isfinite(y[use])]
    first, last = format_lr(lr[0]), format_lr(lr[end - 1])
    if use.size < MIN_POINTS:
        if finding.diverged_at is not None:
            finding.message = (
                f"the loss diverges at lr {format_lr(finding.diverged_at)} after {use.size} usable "
                "losses: lower --lr-max, or evaluate more often"
            )
        else:
            finding.message = f"only {use.size} usable losses: a range test needs at least {MIN_POINTS}"
        return finding

    # Merge points measured at the same lr (a ramp that stops rising) so x strictly increases.
    lr_u, y_u = lr[use], y[use]
    keys, index = np.unique(lr_u, return_inverse=True)
    if keys.size < lr_u.size:
        y_u = np.bincount(index, weights=y_u) / np.bincount(index)
        lr_u = keys
        notes.append("losses measured at the same lr were averaged")
    x = np.log10(lr_u) if log else lr_u
    n = x.size
    # a tenth of the points, at least 7 (5 for a short test: a wide window cuts its corners)
    k = min(n, window or max(7 if n >= 30 else 5, round(n / 10)))
    noise = noise_sigma(y_u)
    s = lowess(x, y_u, k, noise)
    finding.window, finding.noise = k, noise
    smoothed_at = dict(zip(lr_u.tolist(), s.tolist(), strict=True))
    used = set(use.tolist())
    finding.smoothed = [smoothed_at.get(v) if i in used else None for i, v in enumerate(lr.tolist())]
    # How big a change has to be to count: a pure-noise curve's smoothed fall stays under 6 sigma in
    # 99% of cases from about 15 points on; fewer points make both the curve and sigma shakier.
    significant = max(FLAT_NOISE * max(1.0, 15 / n) * noise, FLAT_RELATIVE * abs(float(np.median(y_u))))

    # The fall: from the highest point before the lowest one, down to the lowest one.
    i_min = int(np.argmin(s))
    i_top = int(np.argmax(s[: i_min + 1]))
    fall = float(s[i_top] - s[i_min])
    if fall <= significant:
        why = (
            "the loss only rises: try a lower --lr-max"
            if float(s.max() - s[0]) > significant
            else "it does not fall beyond its noise: try a higher --lr-max or more --steps"
        )
        finding.message = f"no learning signal between lr {first} and {last}: {why}"
        return finding

    # Lower and upper: a straight line through the middle of the fall, met with its two levels.
    lower_x, upper_x = _fall_line(x, s, i_top, i_min, fall)
    to_lr = (lambda v: float(10.0**v)) if log else float
    finding.lower_limit, finding.upper_limit = float(lr_u[0]), float(lr_u[-1])
    # A bound counts only where the data shows it: the loss flat (within its noise) on the far side
    # of it, or turning up, or diverging. Otherwise the bound lies outside the range tried.
    width = upper_x - lower_x  # the fall's extent along x
    rise = float(s[i_min:].max() - s[i_min])
    if finding.diverged_at is not None:
        finding.upper_reason = "diverges"
        notes.append(
            f"the loss diverges (over {DIVERGE_FACTOR:g}x its best) at lr {format_lr(finding.diverged_at)}"
        )
    elif rise > max(significant, 0.1 * fall):
        finding.upper_reason = "turns up"
        notes.append(f"the loss bottoms out at lr {format_lr(lr_u[i_min])} and turns up after it")
    elif _levels_off(x, y_u, x > upper_x, fall, width, noise, n):
        finding.upper_reason = "flattens"
    else:
        finding.upper_reason = "not seen"
    finding.upper_seen = finding.upper_reason != "not seen"
    # From lr 0 (a linear ramp's start) the range covers every lower lr: the bound is in it.
    finding.lower_seen = bool(lr_u[0] <= 0) or _levels_off(
        x[::-1], y_u[::-1], x[::-1] < lower_x, fall, width, noise, n
    )
    finding.lower = to_lr(lower_x) if finding.lower_seen else None
    finding.upper = to_lr(upper_x) if finding.upper_seen else None
    if finding.found:
        finding.midpoint = (finding.lower + finding.upper) / 2
    if i_top == 0 and lower_x <= float(x[0]) and finding.lower_seen:
        notes.append(
            f"the loss falls from the first lr tried ({format_lr(lr_u[0])}): "
            "the lower bound is at or below it"
        )

    # fastai's suggestions.
    a, b = _longest_fall(s, tol=max(2 * noise, 1e-9 * float(np.abs(s).max())))
    finding.valley = to_lr(float(np.interp((a + b) / 2, np.arange(n), x)))
    positive = lr_u > 0
    if positive.sum() >= 3:
        gradient = np.gradient(s[positive], np.log10(lr_u[positive]))
        finding.steep = float(lr_u[positive][int(np.argmin(gradient))])
    finding.minimum = float(lr_u[i_min]) / 10
    if finding.found:
        finding.message = (
            f"lower {format_lr(finding.lower)}, upper {format_lr(finding.upper)} ({finding.upper_reason}): "
            f"midpoint {format_lr(finding.midpoint)}"
        )
        return finding
    parts, reruns = [], []
    if not finding.lower_seen:
        proposal = float(lr_u[0]) / 10 if log else 0.0
        reruns.append(f"--lr-min {format_lr(proposal)}")
        parts.append(
            f"no lower bound above lr-min {format_lr(lr_u[0])}: the loss already falls there; "
            f"rerun with {reruns[-1]}"
        )
    if not finding.upper_seen:
        proposal = float(lr_u[-1]) * (10 if log else 3)
        reruns.append(f"--lr-max {format_lr(proposal)}")
        parts.append(
            f"no upper bound below lr-max {format_lr(lr_u[-1])}: the loss is still falling there; "
            f"rerun with {reruns[-1]}"
        )
    bounds = (("lower", finding.lower), ("upper", finding.upper))
    seen = [f"{name} {format_lr(v)}" for name, v in bounds if v is not None]
    finding.message = "; ".join(parts) + (
        f" ({', '.join(seen)} seen; no midpoint)" if seen else " (no midpoint)"
    )
    finding.rerun = " ".join(reruns)
    return finding


def _levels_off(
    x: np.ndarray, y: np.ndarray, beyond: np.ndarray, fall: float, fall_width: float, noise: float, n: int
) -> bool:
    """Whether the losses `beyond` a bound (a mask; x ordered away from the fall) show that the fall
    has stopped by the end of the range: enough points beyond the bound (at least 4 and 8% of
    them); a least-squares line through all of them that, even two standard errors steeper, falls
    at under half the fall's rate; and a line through the far half of them (at least as many) that
    does not fall beyond its noise (two standard errors) at all: a loss still falling at lr-max,
    however slowly, has not shown where the fall stops."""
    idx = np.nonzero(beyond)[0]
    least = max(4, round(0.08 * n))
    if idx.size < least:
        return False
    drop, se, width = _drop(x[idx], y[idx], noise)
    if width <= 0 or drop + 2 * se >= 0.5 * fall / max(fall_width, 1e-12) * width:
        return False
    far = idx[-max(least, math.ceil(idx.size / 2)) :]
    drop, se, width = _drop(x[far], y[far], noise)
    return width > 0 and drop <= 2 * se


def _drop(xs: np.ndarray, ys: np.ndarray, noise: float) -> tuple[float, float, float]:
    """How much a least-squares line through the points falls across them (in their order), its
    standard error for noise `noise`, and their width along x."""
    dx = xs - xs.mean()
    sxx = float(np.sum(dx * dx))
    width = abs(float(xs[-1] - xs[0]))
    if sxx <= 0:
        return 0.0, 0.0, 0.0
    slope = float(np.sum(dx * (ys - ys.mean())) / sxx)
    drop = (-slope if xs[-1] >= xs[0] else slope) * width
    return drop, max(noise, 1e-12) * width / math.sqrt(sxx), width


def lowess(x: np.ndarray, y: np.ndarray, k: int, noise: float | None = None) -> np.ndarray:
    """A robust LOWESS: at each x, a weighted straight-line fit to its k nearest neighbours, with
    tricube weights by distance times a robustness weight per point.

    The robustness weight is bisquare(r / 6 sigma), r being the point's distance from the median of
    the five points around it and sigma the noise (`noise_sigma`): a wild point (or two side by
    side) is discounted, while a point on a sharp bend keeps its full weight, because on a monotone
    stretch every point is the median of its neighbours. (Cleveland's refits on the residuals of a
    first fit would call the bend itself an outlier where the noise is small, and kink the curve.)
    Each value is kept within the range of the losses it was fitted to, so the end of a curved fall
    does not overshoot."""
    n = x.size
    k = max(2, min(k, n))
    sigma = noise_sigma(y) if noise is None else noise
    robust = np.ones(n)
    if sigma > 0 and n >= 5:
        medians = np.empty(n)
        medians[2 : n - 2] = np.median(np.lib.stride_tricks.sliding_window_view(y, 5), axis=1)
        for i in (0, 1, n - 2, n - 1):  # the ends: the neighbours there are
            medians[i] = np.median(y[max(0, i - 2) : i + 3])
        u = (y - medians) / (6 * sigma)
        robust = np.where(np.abs(u) < 1, (1 - u**2) ** 2, 0.0)
    # All n local fits at once: row i holds point i's k nearest neighbours.
    distance = np.abs(x[None, :] - x[:, None])
    near = np.argsort(distance, axis=1, kind="stable")[:, :k]
    d = np.take_along_axis(distance, near, axis=1)
    reach = d.max(axis=1, keepdims=True) * 1.001
    reach[reach == 0] = 1.0
    w = (1 - (d / reach) ** 3) ** 3 * robust[near]
    yn, dx = y[near], x[near] - x[:, None]
    total = w.sum(axis=1)
    safe = np.where(total > 0, total, 1.0)
    mx, my = (w * dx).sum(axis=1) / safe, (w * yn).sum(axis=1) / safe
    spread = (w * (dx - mx[:, None]) ** 2).sum(axis=1)
    cross = (w * (dx - mx[:, None]) * (yn - my[:, None])).sum(axis=1)
    slope = np.where(spread > 0, cross / np.where(spread > 0, spread, 1.0), 0.0)
    fit = my - slope * mx
    fit = np.clip(fit, yn.min(axis=1), yn.max(axis=1))
    return np.where(total > 0, fit, np.median(yn, axis=1))


def _fall_line(x: np.ndarray, s: np.ndarray, i_top: int, i_min: int, fall: float) -> tuple[float, float]:
    """(lower, upper) on the x axis: the least-squares line through the smoothed points in the middle
    of the fall (from 15% to 85% of it done), extended to the starting level s[i_top] and the lowest
    level s[i_min], and kept within [x[i_top], x[i_min]]. With fewer than three such points (a fall
    over a step or two), the line through the 1/4 and 3/4 crossings of the smoothed curve's running
    minimum, which always gives lower < upper."""
    top, bottom = float(s[i_top]), float(s[i_min])
    middle = [i for i in range(i_top, i_min + 1) if top - 0.85 * fall <= s[i] <= top - 0.15 * fall]
    if len(middle) >= 3:
        slope, intercept = np.polyfit(x[middle], s[middle], 1)
        if slope < 0:
            lower = max(float((top - intercept) / slope), float(x[i_top]))
            upper = min(float((bottom - intercept) / slope), float(x[i_min]))
            if lower < upper:
                return lower, upper
    envelope = np.minimum.accumulate(s[i_top : i_min + 1])
    xs = x[i_top : i_min + 1]
    x25, x50, x75 = (_crossing(xs, envelope, top - q * fall) for q in (0.25, 0.5, 0.75))
    return max(x50 - (x75 - x25), float(x[i_top])), min(x50 + (x75 - x25), float(x[i_min]))


def _crossing(x: np.ndarray, falling: np.ndarray, level: float) -> float:
    """The x where a non-increasing curve first reaches `level`, linearly interpolated."""
    j = int(np.argmax(falling <= level))
    if j == 0:
        return float(x[0])
    a, b = falling[j - 1], falling[j]
    return float(x[j - 1] + (a - level) / (a - b) * (x[j] - x[j - 1]))


def _longest_fall(s: np.ndarray, tol: float) -> tuple[int, int]:
    """First and last index of the longest falling stretch of `s`: a run of points that never rises
    more than `tol` above its lowest value so far, with its flat ends (within `tol` of its first and
    its lowest value) trimmed off, so that a plateau before or after the fall is not counted."""
    best, n, i = (0, 0), s.size, 0
    while i < n - 1:
        j, low = i, s[i]
        while j + 1 < n and s[j + 1] <= low + tol:
            j += 1
            low = min(low, s[j])
        run = s[i : j + 1]
        a = i + int(np.argmax(run < s[i] - tol)) - 1 if (run < s[i] - tol).any() else i
        b = i + int(np.argmax(run <= low + tol))
        if b - a > best[1] - best[0]:
            best = (a, b)
        i = j + 1
    return best


def noise_sigma(y: np.ndarray) -> float:
    """The standard deviation of the noise on a smooth curve, from its second differences (each
    has variance 6 sigma^2; the median absolute deviation makes it robust to outliers and bends)."""
    if y.size < 3:
        return 0.0
    d2 = y[:-2] - 2 * y[1:-1] + y[2:]
    return 1.4826 * float(np.median(np.abs(d2 - np.median(d2)))) / math.sqrt(6)


def _looks_geometric(lr: np.ndarray) -> bool:
    """Whether the lrs are more evenly spaced in log than in linear terms (a log ramp)."""
    if (lr <= 0).any() or lr.size < 3:
        return False
    d, r = np.diff(lr), np.diff(np.log(lr))
    if (d <= 0).any():
        return False

    def spread(v: np.ndarray) -> float:
        return float(np.std(v) / np.mean(v))

    return spread(r) < spread(d)


# --- reading a run ----------------------------------------------------------------------------------


def analyze_run(run_dir: str | os.PathLike, log: bool | None = None) -> Finding:
    """Analyze an existing run: its validation losses (else its training losses) against the lr
    each evaluated step used (`lr/unet`, or `lr/text_encoder` when only that one trained)."""
    from workbench.train.runs import read_metrics

    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise WorkbenchError(f"--from {run_dir}: no such run folder")
    if not metrics_path.is_file():
        raise WorkbenchError(f"{metrics_path}: no such file (not a wb train run, or it logged nothing yet)")
    try:
        records = read_metrics(run_dir)
    except json.JSONDecodeError as e:
        raise WorkbenchError(f"{metrics_path}: not valid JSON lines ({e.msg}, line {e.lineno})") from None
    test = range_test_record(run_dir)
    if log is None and test is not None:
        log = bool(test.get("log"))
    notes = []
    metric = "loss/val"
    if not any(metric in r for r in records):
        metric = "loss/train"
        notes.append("the run has no validation loss: the (noisy) training loss is used")
    points = sorted((r["step"], r[metric]) for r in records if metric in r and "step" in r)
    if not points:
        raise WorkbenchError(f"{metrics_path}: no loss/val or loss/train values")
    component = test.get("component") if test else None
    keys = ("lr/text_encoder", "lr/unet") if component == "text_encoder" else ("lr/unet", "lr/text_encoder")
    key = next((k for k in keys if any(k in r for r in records)), None)
    if key is None:
        raise WorkbenchError(
            f"{metrics_path}: no lr/unet or lr/text_encoder values to put the losses against"
        )
    if component is None:
        component = key.removeprefix("lr/")
    lr_steps = sorted({r["step"]: float(r[key]) for r in records if key in r}.items())
    table_steps = np.array([s for s, _ in lr_steps], dtype=float)
    table_lrs = np.array([v for _, v in lr_steps], dtype=float)
    if log is None:
        log = _looks_geometric(table_lrs)

    # Only the part of the run where the lr rises is a range test.
    top = int(np.argmax(table_lrs))
    if table_lrs[top] <= table_lrs.min():
        raise WorkbenchError(
            f"{run_dir}: the lr stays at {format_lr(table_lrs[0])} for the whole run: not a range test "
            "(wb lr-find RECIPE.yaml runs one)"
        )
    rise_from = int(np.argmin(table_lrs[: top + 1]))
    last_step, first_step = table_steps[top], table_steps[rise_from] - 1
    kept = [(s, v) for s, v in points if first_step <= s <= last_step]
    if len(kept) < len(points):
        notes.append(
            f"only the losses while the lr rises (steps {first_step:g}..{last_step:g}) are used; "
            f"{len(points) - len(kept)} left out"
        )
    if len(kept) < MIN_POINTS:
        raise WorkbenchError(
            f"{run_dir}: {len(kept)} {metric} values while the lr rises; a range test needs at least "
            f"{MIN_POINTS} (evaluate more often)"
        )
    steps = [int(s) for s, _ in kept]
    lrs = [_lr_at(s, table_steps, table_lrs, log) for s in steps]
    finding = analyze(lrs, [float(v) for _, v in kept], log=log, steps=steps)
    finding.notes[:0] = notes
    finding.metric, finding.component, finding.run_dir = metric, component, str(run_dir)
    return finding


def range_test_record(run_dir: str | os.PathLike) -> dict | None:
    """What `wb lr-find` recorded in run.json about the test (source.lr_find), if it ran one."""
    try:
        record = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return (record.get("source") or {}).get("lr_find")


def _lr_at(step: float, steps: np.ndarray, lrs: np.ndarray, log: bool) -> float:
    """The lr logged at `step`; between logged steps, interpolated; before the first (the baseline
    evaluation at step 0), extrapolated along the ramp (in log terms for a log ramp), never below 0."""
    hit = np.nonzero(steps == step)[0]
    if hit.size:
        return float(lrs[hit[0]])
    if steps.size == 1:
        return float(lrs[0])
    if log and (lrs > 0).all():
        values = np.log(lrs)
        if step < steps[0]:
            slope = (values[1] - values[0]) / (steps[1] - steps[0])
            return float(np.exp(values[0] - slope * (steps[0] - step)))
        return float(np.exp(np.interp(step, steps, values)))
    if step < steps[0]:
        slope = (lrs[1] - lrs[0]) / (steps[1] - steps[0])
        return max(0.0, float(lrs[0] - slope * (steps[0] - step)))
    return float(np.interp(step, steps, lrs))


# --- running the test -----------------------------------------------------------------------------


@dataclass
class RangeTest:
    """How the range test runs: the lr goes from lr_min to lr_max over `steps` optimizer steps."""

    lr_min: float = 0.0
    lr_max: float = 3e-6
    steps: int = 400
    val_every: int = 10
    log: bool = False
    component: str = "both"  # what trains (and ramps): unet, text_encoder or both

    def check(self) -> None:
        """Refuse settings that cannot make a range test; errors name the flag."""
        if not self.lr_min >= 0:
            raise WorkbenchError(f"--lr-min {self.lr_min:g}: must be 0 or more")
        if not self.lr_max > self.lr_min:
            raise WorkbenchError(f"--lr-max {self.lr_max:g}: must be above --lr-min ({self.lr_min:g})")
        if self.log and self.lr_min <= 0:
            raise WorkbenchError("--lr-min 0: a log ramp (--log) needs --lr-min above 0, e.g. 1e-9")
        if self.steps < MIN_POINTS:
            raise WorkbenchError(f"--steps {self.steps}: a range test needs at least {MIN_POINTS}")
        if self.val_every < 1 or self.steps // self.val_every + 1 < MIN_POINTS + 1:
            raise WorkbenchError(
                f"--val-every {self.val_every}: gives {self.steps // max(1, self.val_every) + 1} "
                f"evaluations in {self.steps} steps; a range test needs at least {MIN_POINTS + 1}"
            )
        if self.component not in COMPONENTS:
            raise WorkbenchError(f"--component {self.component}: choose one of {', '.join(COMPONENTS)}")

    def factor(self) -> Callable[[int], float] | None:
        """The log ramp as a factor of lr_max for optimizer step i; None for the linear ramps, which
        are recipe schedules (linear_ramp from 0, triangular's rising half from lr_min)."""
        if not self.log:
            return None
        ratio, last = self.lr_min / self.lr_max, max(1, self.steps - 1)
        return lambda i: ratio ** (1 - min(i, last) / last)


def default_component(recipe) -> str:
    """`both` when the recipe trains the UNet and the text encoder, else the one it trains."""
    trained = [c for c in ("unet", "text_encoder") if recipe.trains(c)]
    return "both" if len(trained) == 2 else trained[0]


def range_test_recipe(recipe, test: RangeTest):
    """The recipe the range test trains: `recipe` with the lr ramp, `steps` optimizer steps, the
    deterministic validation every `val_every` steps (and before the first), no checkpoints, no
    samples, the lr logged every step."""
    from workbench.train.recipe import parse_recipe

    data = recipe.to_dict()
    opt = data["optimizer"]
    if test.component in ("unet", "both"):
        opt["lr"] = test.lr_max
    if test.component == "both":
        opt["text_encoder"]["lr"] = None  # the same ramp for both
    if test.component == "text_encoder":
        opt["text_encoder"]["lr"] = test.lr_max
    data["unet"]["train"] = test.component in ("unet", "both")
    data["text_encoder"]["train"] = test.component in ("text_encoder", "both")
    if test.log:
        data["schedule"] = {"name": "constant"}  # the loop's lr_factor hook draws the log ramp
    elif test.lr_min > 0:
        # triangular's first half-cycle rises linearly from min_lr_ratio * lr to lr
        half = max(1, test.steps - 1)
        data["schedule"] = {
            "name": "triangular",
            "half_cycle_steps": half,
            "min_lr_ratio": test.lr_min / test.lr_max,
        }
    else:
        data["schedule"] = {"name": "linear_ramp"}  # seed 003's: (i + 1) / N
    data["training"].update(max_steps=test.steps, max_epochs=None)
    data["validation"].update(
        enabled=True, every_n_steps=test.val_every, every_n_epochs=None, at_start=True,
        stabilize_train=False, early_stop_after=None,
    )  # fmt: skip
    data["saving"].update(every_n_epochs=None, every_n_steps=None, every_n_minutes=None, keep_last=None)
    data["sampling"]["prompts"] = []
    data["logging"]["every_n_steps"] = 1
    return parse_recipe(data, "the range test's recipe")


def divergence_stop(factor: float = DIVERGE_FACTOR) -> Callable:
    """A `stop_when` hook for the loop: stop once a validation loss is not finite or over `factor`
    times the best one so far."""
    best = math.inf

    def check(progress) -> str | None:
        nonlocal best
        loss = progress.val_loss
        if loss is None:
            return None
        if not math.isfinite(loss) or loss > factor * best:
            return (
                f"validation loss {loss:.4g} at step {progress.step} is over {factor:g}x the best "
                f"({best:.4g}): the loss diverged; stopped"
            )
        best = min(best, loss)
        return None

    return check


def run_range_test(recipe, test: RangeTest, out_dir, progress=None, source: dict | None = None):
    """Train the range test into the new folder `out_dir` and analyze it: (TrainResult, Finding).

    run.json's source records the test and the recipe it started from (under `lr_find`), so
    `wb lr-find --from` can read the run again and `--write-recipe` knows the original recipe."""
    from workbench.train.loop import train

    test.check()
    test_recipe = range_test_recipe(recipe, test)
    record = dict(source or {})
    record["lr_find"] = {**asdict(test), "recipe": recipe.to_dict()}
    result = train(
        test_recipe,
        out_dir,
        progress=progress,
        source=record,
        checkpoints=False,
        lr_factor=test.factor(),
        stop_when=divergence_stop(),
    )
    finding = analyze_run(result.run_dir, log=test.log)
    if result.stopped == "nan":
        finding.notes.append(result.message)
    return result, finding


def recipe_at(recipe_data: dict, lr: float, component: str, source: str = "the written recipe"):
    """`recipe_data` (a resolved recipe dict) with a constant schedule at `lr` for `component`
    (unet, text_encoder or both); the other component keeps its own lr. The lr is rounded to three
    significant digits, as a person would write it (the bounds are not more precise than that)."""
    from workbench.train.recipe import parse_recipe

    lr = float(f"{lr:.3g}")
    data = json.loads(json.dumps(recipe_data))
    current = parse_recipe(data, source)
    opt = data["optimizer"]
    if component == "both":
        opt["lr"], opt["text_encoder"]["lr"] = lr, None
        data["unet"]["train"] = data["text_encoder"]["train"] = True
    elif component == "unet":
        if opt["text_encoder"].get("lr") is None:
            opt["text_encoder"]["lr"] = current.optimizer.settings("text_encoder").lr  # keep it as it was
        opt["lr"] = lr
        data["unet"]["train"] = True
    elif component == "text_encoder":
        opt["text_encoder"]["lr"] = lr
        data["text_encoder"]["train"] = True
    else:
        raise WorkbenchError(f"--component {component}: choose one of {', '.join(COMPONENTS)}")
    data["schedule"] = {"name": "constant"}
    return parse_recipe(data, source)


def base_recipe_of(run_dir: str | os.PathLike) -> dict:
    """The recipe a run started from: the one before the range test's changes when it is an
    lr-find run, else the run's own (from run.json)."""
    from workbench.train.runs import read_run

    record = read_run(run_dir)
    test = (record.get("source") or {}).get("lr_find") or {}
    recipe = test.get("recipe") or record.get("recipe")
    if not isinstance(recipe, dict):
        raise WorkbenchError(f"{run_dir}/run.json: no recipe recorded")
    return recipe


def write_recipe(path: str | os.PathLike, recipe, note: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "".join(f"# {line}\n" for line in note.splitlines())
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(header + recipe.to_yaml(), encoding="utf-8")
    os.replace(tmp, path)
    return path


# --- the report: lr_find.png, lr_find.json, index.html -------------------------------------------------

MARKERS = (  # (field, label, colour): what the plot marks
    ("lower", "lower", (214, 39, 40)),
    ("upper", "upper", (214, 39, 40)),
    ("midpoint", "midpoint", (44, 160, 44)),
    ("valley", "valley", (148, 103, 189)),
    ("steep", "steep", (255, 127, 14)),
    ("diverged_at", "diverged", (127, 127, 127)),
)
MEANINGS = {
    "lower": "the loss starts falling decisively",
    "upper": "the fall ends: the loss flattens, turns up or diverges",
    "midpoint": "(lower + upper) / 2: seed 003's constant lr",
    "valley": "fastai: middle of the longest falling stretch",
    "steep": "fastai: steepest fall against log lr",
    "minimum": "fastai: lr at the lowest loss / 10",
}


def plot_finding(finding: Finding, width: int = 900, height: int = 540):
    """Loss against lr, a matplotlib Figure: the raw losses as points, the smoothed curve (whatever
    points `finding.smoothed` has, None left out) as a line, and each bound or suggestion that is not
    None as a labelled vertical line (solid for the bounds, dashed for the rest)."""
    from workbench.plot import Marker, Series, line_chart

    log = finding.axis == "log"
    raw = Series(
        finding.lrs, finding.losses, label=finding.metric, line=False, points=True, color=(31, 119, 180)
    )
    pairs = [(x, s) for x, s in zip(finding.lrs, finding.smoothed, strict=True) if s is not None]
    smooth = Series(
        [x for x, _ in pairs], [s for _, s in pairs], label="smoothed", color=(255, 127, 14), width=2.5
    )
    markers = [
        Marker(
            getattr(finding, name),
            f"{label} {format_lr(getattr(finding, name))}",
            color,
            dashed=name != "lower" and name != "upper",
        )
        for name, label, color in MARKERS
        if getattr(finding, name) is not None
    ]
    # The y range covers the losses before any divergence, so a blow-up does not flatten the rest.
    kept = [
        v for v, s in zip(finding.losses, finding.smoothed, strict=True) if s is not None and math.isfinite(v)
    ]
    kept += [s for s in finding.smoothed if s is not None]
    y_range = None
    if kept:
        lo, hi = min(kept), max(kept)
        pad = 0.06 * (hi - lo) or 0.05 * abs(hi) or 0.5
        y_range = (lo - pad, hi + pad)
    name = Path(finding.run_dir).name if finding.run_dir else ""
    title = f"LR range test{': ' + name if name else ''}"
    if not finding.found:
        missing = [b for b, v in (("lower", finding.lower), ("upper", finding.upper)) if v is None]
        title += " (no bounds)" if len(missing) == 2 else f" (no {missing[0]} bound in the range)"
    who = {"both": "UNet and text encoder", "unet": "UNet", "text_encoder": "text encoder"}.get(
        finding.component or "", ""
    )
    metric = {"loss/val": "validation loss", "loss/train": "training loss"}.get(
        finding.metric, finding.metric
    )
    return line_chart(
        [raw, smooth],
        markers,
        width=width,
        height=height,
        title=title,
        x_label=f"learning rate{' (' + who + ')' if who else ''}{', log scale' if log else ''}",
        y_label=metric,
        log_x=log,
        y_range=y_range,
    )


def write_report(finding: Finding, out_dir: str | os.PathLike, extra: dict | None = None) -> dict[str, Path]:
    """lr_find.png, lr_find.json and index.html in `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": out / "lr_find.png", "json": out / "lr_find.json", "html": out / "index.html"}
    from workbench.plot import save_png

    save_png(plot_finding(finding), paths["png"])
    data = {**finding.to_json(), **(extra or {}), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    paths["html"].write_text(report_html(finding, extra or {}), encoding="utf-8")
    return paths


def report_html(finding: Finding, extra: dict) -> str:
    """A static page: the plot, the numbers and what they mean. No scripts, no external assets."""
    e = html.escape
    rows = "".join(
        f"<tr><th>{name}</th><td>{e(format_lr(getattr(finding, name)))}</td><td>{e(MEANINGS[name])}</td></tr>"
        for name in ("lower", "upper", "midpoint", "valley", "steep", "minimum")
    )
    notes = "".join(f"<li>{e(n)}</li>" for n in finding.notes)
    facts = {
        "run": finding.run_dir,
        "loss": finding.metric,
        "component": finding.component,
        "lr axis": finding.axis,
        "points": str(len(finding.lrs)),
        "smoothing": f"LOWESS, {finding.window} nearest points; noise sigma {finding.noise:.3g}",
        **{k: str(v) for k, v in extra.items() if isinstance(v, (str, int, float))},
    }
    fact_rows = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in facts.items() if v)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>LR range test</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; max-width: 960px; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
th {{ background: #f4f4f4; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
.message {{ font-size: 1.15em; font-weight: bold; }}
</style></head><body>
<h1>LR range test</h1>
<p class="message">{e(finding.message)}</p>
<img src="lr_find.png" alt="loss against learning rate">
<table><tr><th></th><th>lr</th><th>meaning</th></tr>{rows}</table>
{"<ul>" + notes + "</ul>" if notes else ""}
<table>{fact_rows}</table>
<p>Numbers in lr_find.json; how they are found: docs/lr_find.md.</p>
</body></html>
"""
