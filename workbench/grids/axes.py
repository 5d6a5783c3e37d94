"""Grid axes: the kinds of parameter a grid can vary, and A1111's syntax for their values.

Values are CSV with quoting (`"a, b",c`). Numeric kinds also take ranges, as A1111's XYZ plot does:
`1-5` (inclusive), `1-5 (+2)` (a step, negative steps count down), `1-10 [5]` (a count spread evenly,
ends included; integers are truncated, as A1111 does) and the same with floats: `5-8 (+0.5)`,
`5.5-7.5 [3]`. A range and plain values mix freely: `1,3,10-12`.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

from workbench.errors import WorkbenchError

# The kinds, in the order the default layout prefers them: the checkpoint first (it becomes X),
# then prompts (Y), then seeds (Z); the rest take whatever position is left.
KINDS = ("checkpoint", "prompt", "seed", "sr", "cfg", "steps", "sampler", "lora", "lora_weight")
INT_KINDS = ("seed", "steps")
FLOAT_KINDS = ("cfg", "lora_weight")
# What each kind is called in a "Label: value" title and which flag supplies its values.
TITLES = {"seed": "Seed", "steps": "Steps", "cfg": "CFG", "lora_weight": "LoRA weight"}
FLAGS = {
    "checkpoint": "--ckpts",
    "prompt": "--prompts",
    "seed": "--seeds",
    "sr": "--sr",
    "cfg": "--cfg",
    "steps": "--steps",
    "sampler": "--sampler",
    "lora": "--loras",  # LoRA files (or none): grids/lora_apply.py
    "lora_weight": "--lora-weight",
}

_NUM = r"[+-]?\s*\d+(?:\.\d*)?"
_INT = r"[+-]?\s*\d+"


def _patterns(n: str) -> tuple[re.Pattern, re.Pattern, re.Pattern]:
    """Regexes for `a-b (+s)`, `a-b [count]` and `a-b`, with `n` the pattern of one number."""
    return (
        re.compile(rf"^\s*({n})\s*-\s*({n})\s*\(\s*([+-]\s*{n})\s*\)\s*$"),
        re.compile(rf"^\s*({n})\s*-\s*({n})\s*\[\s*(\d+)\s*\]\s*$"),
        re.compile(rf"^\s*({n})\s*-\s*({n})\s*$"),
    )


_INT_PATTERNS = _patterns(_INT)
_FLOAT_PATTERNS = _patterns(_NUM)


def split_csv(text: str) -> list[str]:
    """A1111's CSV: commas separate, double quotes protect commas, surrounding spaces are dropped."""
    try:
        rows = list(csv.reader(StringIO(text), skipinitialspace=True))
    except csv.Error as e:
        raise ValueError(f"cannot split {text!r} as CSV: {e}") from None
    return [field.strip() for row in rows for field in row if field.strip()]


def _number(text: str, as_int: bool) -> int | float:
    text = text.replace(" ", "")
    return int(text) if as_int else float(text)


def _expand_range(item: str, as_int: bool) -> list[int | float] | None:
    """The values of one range item, or None when the item is not a range."""
    step_re, count_re, plain_re = _INT_PATTERNS if as_int else _FLOAT_PATTERNS
    if m := step_re.match(item):
        start, end = _number(m[1], as_int), _number(m[2], as_int)
        step = _number(m[3], as_int)
        if step == 0 or (end - start) * step < 0:
            raise ValueError(f"range {item!r}: the step {m[3].strip()} never reaches {m[2].strip()}")
        # Count first, then compute each value from the start: repeated float addition drifts.
        count = math.floor((end - start) / step + 1e-9) + 1
        values = [start + i * step for i in range(count)]
    elif m := count_re.match(item):
        start, end, count = _number(m[1], as_int), _number(m[2], as_int), int(m[3])
        if count < 1:
            raise ValueError(f"range {item!r}: the count must be at least 1")
        if count == 1:
            values = [start]
        else:
            values = [start + (end - start) * i / (count - 1) for i in range(count)]
            values = [int(v) for v in values] if as_int else values
    elif m := plain_re.match(item):
        start, end = _number(m[1], as_int), _number(m[2], as_int)
        if not as_int:
            raise ValueError(f"range {item!r}: a float range needs a step (+0.5) or a count [5]")
        step = 1 if end >= start else -1
        values = list(range(start, end + step, step))
    else:
        return None
    return [v if as_int else round(float(v), 10) for v in values]


def parse_numbers(text: str, as_int: bool) -> list[int | float]:
    """Numbers from A1111 axis syntax: CSV of plain numbers and ranges. ValueError when malformed."""
    values: list[int | float] = []
    for item in split_csv(text):
        expanded = _expand_range(item, as_int)
        if expanded is None:
            try:
                expanded = [_number(item, as_int)]
            except ValueError:
                kind = "an integer" if as_int else "a number"
                raise ValueError(f"{item!r} is not {kind} or a range") from None
        values.extend(expanded)
    if not values:
        raise ValueError("no values")
    return values


def format_number(value: int | float) -> str:
    """7.0 -> "7", 7.5 -> "7.5": how numbers appear in labels and PNG info."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class Axis:
    """One grid axis: a kind, its values (paths, texts or numbers) and the label shown for each."""

    kind: str
    values: list
    labels: list[str]

    def __len__(self) -> int:
        return len(self.values)

    def to_json(self) -> dict:
        values = [str(v) if isinstance(v, Path) else v for v in self.values]
        return {"kind": self.kind, "values": values, "labels": self.labels}


def checkpoint_names(paths: list[Path]) -> list[str]:
    """Label for each checkpoint: its file stem; where stems collide, enough parent folders to tell apart."""
    names = [p.stem for p in paths]
    depth = 1
    while len(set(names)) < len(names) and depth < 8:
        depth += 1
        names = ["/".join(p.with_suffix("").parts[-depth:]) for p in paths]
    return names


def label_for(kind: str, value, display: str | None = None) -> str:
    """The label of one value: "CFG: 7" for numbers, raw text for prompts, names and samplers."""
    if kind in TITLES:
        return f"{TITLES[kind]}: {format_number(value)}"
    return display if display is not None else str(value)


def parse_axis_values(kind: str, text: str) -> list:
    """The values of `kind` from a flag's text, in A1111 syntax. WorkbenchError names the flag."""
    if kind not in KINDS:
        raise WorkbenchError(f"unknown axis kind {kind!r}; known: {', '.join(KINDS)}")
    try:
        if kind in INT_KINDS:
            return parse_numbers(text, as_int=True)
        if kind in FLOAT_KINDS:
            return parse_numbers(text, as_int=False)
        values = split_csv(text)
    except ValueError as e:
        raise WorkbenchError(f"{FLAGS[kind]} {text!r}: {e}") from None
    if not values:
        raise WorkbenchError(f"{FLAGS[kind]} {text!r}: no values")
    return values
