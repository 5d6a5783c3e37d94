"""Grid axes: the kinds of parameter a grid can vary, and A1111's syntax for their values.

Values are split as A1111's X/Y/Z plot splits them: one CSV row per line, commas separate, double
quotes protect commas only right after a comma (a quote after a space is a literal character, as
Python's csv module reads it without `skipinitialspace`), each field is stripped, empty fields are
kept. Numeric kinds also take A1111's ranges: `1-5`, `1-5 (+2)` (a signed step), `1-10 [5]` (a count
spread evenly, ends included; integers truncated, as A1111 does), and the same with floats.

Where A1111's own result is an arithmetic slip (an integer range counting down loses its end, a float
step overshoots the end, `5-1` is empty), wb keeps the plain inclusive reading and reports the
difference as a note (docs/grid.md lists every case). Every count is computed arithmetically and
checked against MAX_AXIS_VALUES before a single value is made.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

from workbench.errors import WorkbenchError

MAX_AXIS_VALUES = 10_000  # values on one axis; far beyond any grid a person looks at


@dataclass(frozen=True)
class AxisKind:
    """One kind of axis: its wb name, its flag, A1111's label ("X Type") and the type of its values.

    `value_type` is "int", "float", "str" (CSV text) or "permutations" (A1111's Prompt order: every
    ordering of the given tokens). `title` is the "Title: value" prefix of a grid label, or None for
    a label that is the raw value. Other modules register new kinds with `register_kind`.
    """

    name: str
    flag: str
    a1111: str
    value_type: str = "str"
    title: str | None = None


KIND_REGISTRY: dict[str, AxisKind] = {}


def register_kind(kind: AxisKind) -> AxisKind:
    KIND_REGISTRY[kind.name] = kind
    return kind


# In the order the default layout prefers them: the checkpoint first (it becomes X), then prompts
# (Y), then seeds (Z); the rest take whatever position is left.
for _kind in (
    AxisKind("checkpoint", "--ckpts", "Checkpoint name"),
    AxisKind("prompt", "--prompts", "Prompt S/R"),  # written as an S/R over whole prompts
    AxisKind("seed", "--seeds", "Seed", "int", "Seed"),
    AxisKind("sr", "--sr", "Prompt S/R"),
    AxisKind("cfg", "--cfg", "CFG Scale", "float", "CFG"),
    AxisKind("steps", "--steps", "Steps", "int", "Steps"),
    AxisKind("sampler", "--sampler", "Sampler"),
    AxisKind("scheduler", "--scheduler", "Schedule type", "str", "Schedule type"),
    AxisKind("vae", "--vae", "VAE", "str", "VAE"),
    AxisKind("clip_skip", "--clip-skip", "Clip skip", "int", "Clip skip"),
    AxisKind("subseed", "--var-seeds", "Var. seed", "int", "Var. seed"),
    AxisKind("subseed_strength", "--var-strength", "Var. strength", "float", "Var. strength"),
    AxisKind("prompt_order", "--prompt-order", "Prompt order", "permutations"),
    AxisKind("size", "--size", "Size", "str", "Size"),  # not an A1111 axis type: wb's own
):
    register_kind(_kind)


def kinds() -> tuple[str, ...]:
    return tuple(KIND_REGISTRY)


# Kept for callers that read the old constants.
KINDS = kinds()
FLAGS = {k.name: k.flag for k in KIND_REGISTRY.values()}
TITLES = {k.name: k.title for k in KIND_REGISTRY.values() if k.title and k.value_type != "str"}

# A1111's range patterns (scripts/xyz_grid.py), with the float's decimal point escaped.
_INT = r"[+-]?\s*\d+"
_FLOAT = r"[+-]?\s*\d+(?:\.\d*)?"
_INT_STEP = re.compile(rf"\s*({_INT})\s*-\s*({_INT})(?:\s*\(([+-]\d+)\s*\))?\s*")
_INT_COUNT = re.compile(rf"\s*({_INT})\s*-\s*({_INT})\s*\[(\d+)\s*\]\s*")
_FLOAT_STEP = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*")
_FLOAT_COUNT = re.compile(rf"\s*({_FLOAT})\s*-\s*({_FLOAT})\s*\[(\d+)\s*\]\s*")


def a1111_fields(text: str) -> list[str]:
    """A1111's split of an axis text: csv rows (no skipinitialspace), every field stripped, empties kept."""
    try:
        rows = list(csv.reader(StringIO(text)))
    except csv.Error as e:
        raise ValueError(f"cannot split as CSV: {e}") from None
    return [field.strip() for row in rows for field in row]


def split_csv(text: str) -> list[str]:
    """wb's own lists (checkpoint paths): A1111's split, empty fields dropped."""
    return [f for f in a1111_fields(text) if f]


def _int(text: str) -> int:
    digits = text.replace(" ", "")
    if len(digits) > 100:  # Python refuses over 4,300 digits; no seed or count needs 100
        raise ValueError(f"{_clip(text)!r} has {len(digits)} digits")
    return int(digits)


def _float(text: str) -> float:
    value = float(text.replace(" ", ""))
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _check_count(item: str, count: float) -> None:
    if count > MAX_AXIS_VALUES:
        shown = f"{count:,}" if count < 10**30 else "more than 10^30"
        limit = f"over the limit of {MAX_AXIS_VALUES:,} per axis"
        raise ValueError(f"range {_clip(item)!r} gives {shown} values, {limit}")


def _show(values) -> str:
    shown = [format_number(v) for v in list(values[:8])]
    return ", ".join(shown) + (", ..." if len(values) > 8 else "") if shown else "no values"


def _int_range(item: str, notes: list[str]) -> list[int] | None:
    if m := _INT_COUNT.fullmatch(item):
        start, end, count = _int(m[1]), _int(m[2]), int(m[3])
        if count < 1:
            raise ValueError(f"range {item!r}: the count must be at least 1 (A1111 gives no values)")
        _check_count(item, count)
        import numpy as np

        return [int(v) for v in np.linspace(start=start, stop=end, num=count).tolist()]
    m = _INT_STEP.fullmatch(item)
    if not m:
        return None
    start, end = _int(m[1]), _int(m[2])
    a_step = int(m[3]) if m[3] else 1
    if a_step == 0:
        raise ValueError(f"range {item!r}: the step must not be 0")
    step = a_step if m[3] else (1 if end >= start else -1)
    if (end - start) * step < 0:
        raise ValueError(f"range {item!r}: the step {m[3]} never reaches {end}")
    _check_count(item, (end - start) // step + 1)  # counted before anything is made
    ours = range(start, end + (1 if step > 0 else -1), step)
    theirs = range(start, end + 1, a_step)  # A1111: range(start, end + 1, step)
    if ours != theirs:
        notes.append(f"{item.strip()!r}: A1111 gives {_show(theirs)}; wb gives {_show(ours)} (end included)")
    return list(ours)


def _float_range(item: str, notes: list[str]) -> list[float] | None:
    import numpy as np

    if m := _FLOAT_COUNT.fullmatch(item):
        start, end, count = _float(m[1]), _float(m[2]), int(m[3])
        if count < 1:
            raise ValueError(f"range {item!r}: the count must be at least 1 (A1111 gives no values)")
        _check_count(item, count)
        return [round(v, 10) for v in np.linspace(start=start, stop=end, num=count).tolist()]
    m = _FLOAT_STEP.fullmatch(item)
    if not m:
        return None
    start, end = _float(m[1]), _float(m[2])
    a_step = _float(m[3]) if m[3] else 1.0
    if a_step == 0:
        raise ValueError(f"range {item!r}: the step must not be 0")
    step = a_step if m[3] else (1.0 if end >= start else -1.0)
    if (end - start) * step < 0:
        raise ValueError(f"range {item!r}: the step {m[3]} never reaches {m[2].strip()}")
    ratio = (end - start) / step
    if not math.isfinite(ratio) or ratio > MAX_AXIS_VALUES:
        _check_count(item, math.inf if not math.isfinite(ratio) else int(ratio) + 1)
    count = math.floor(ratio + 1e-9) + 1
    _check_count(item, count)
    ours = [round(start + i * step, 10) for i in range(count)]
    # A1111: np.arange(start, end + step, step); its length is computed before anything is made.
    a_count = max(0, math.ceil((end + a_step - start) / a_step))
    theirs = np.arange(start, end + a_step, a_step).tolist() if a_count <= MAX_AXIS_VALUES + 1 else []
    if [round(a, 8) for a in theirs] != [round(b, 8) for b in ours]:
        notes.append(f"{item.strip()!r}: A1111 gives {_show(theirs)}; wb gives {_show(ours)} (end is last)")
    return ours


def parse_numbers(text: str, as_int: bool, notes: list[str] | None = None) -> list[int | float]:
    """Numbers from A1111 axis syntax: CSV of plain numbers and ranges. ValueError when malformed.

    Where A1111 would give other values, a one-line note is appended to `notes`."""
    notes = notes if notes is not None else []
    values: list[int | float] = []
    for item in a1111_fields(text):
        if not item:
            raise ValueError("an empty value (two commas in a row, or a trailing comma)")
        expanded = _int_range(item, notes) if as_int else _float_range(item, notes)
        if expanded is None:
            try:
                expanded = [_int(item) if as_int else _float(item)]
            except ValueError:
                kind = "an integer" if as_int else "a number"
                raise ValueError(f"{item!r} is not {kind} or a range") from None
        values.extend(expanded)
        if len(values) > MAX_AXIS_VALUES:
            raise ValueError(f"{len(values):,} values, over the limit of {MAX_AXIS_VALUES:,} per axis")
    if not values:
        raise ValueError("no values")
    return values


def permutation_values(tokens: list[str]) -> list[tuple[str, ...]]:
    """A1111's Prompt order axis: every ordering of the tokens, counted before they are made."""
    from itertools import permutations

    count = math.factorial(len(tokens))
    if count > MAX_AXIS_VALUES:
        raise ValueError(
            f"{len(tokens)} tokens give {count:,} orders, over the limit of {MAX_AXIS_VALUES:,} per axis"
        )
    return list(permutations(tokens))


def format_number(value: int | float) -> str:
    """7.0 -> "7", 7.5 -> "7.5": how numbers appear in labels and PNG info."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return f"{value:.10g}" if isinstance(value, float) else str(value)


@dataclass
class Axis:
    """One grid axis: a kind, its values (paths, texts or numbers) and the label shown for each."""

    kind: str
    values: list
    labels: list[str]
    text: str | None = None  # the text the values came from (A1111's "X Values"), when known

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
    spec = KIND_REGISTRY.get(kind)
    if kind == "prompt_order":
        return ", ".join(value)
    if spec and spec.title:
        shown = display if display is not None else value
        if display is None and spec.value_type != "str":
            shown = format_number(value)
        return f"{spec.title}: {shown}"
    return display if display is not None else str(value)


def parse_axis_values(kind: str, text: str, notes: list[str] | None = None) -> list:
    """The values of `kind` from a flag's text, in A1111 syntax. WorkbenchError names the flag.

    Notes about strings where A1111 gives other values are appended to `notes` ("--flag 'text': ...")."""
    spec = KIND_REGISTRY.get(kind)
    if spec is None:
        raise WorkbenchError(f"unknown axis kind {kind!r}; known: {', '.join(kinds())}")
    found: list[str] = []
    try:
        if spec.value_type in ("int", "float"):
            values = parse_numbers(text, as_int=spec.value_type == "int", notes=found)
        else:
            values = a1111_fields(text)
            _quote_notes(text, found)
            if spec.value_type == "permutations":
                values = permutation_values(values)
            elif len(values) > MAX_AXIS_VALUES:
                raise ValueError(f"{len(values):,} values, over the limit of {MAX_AXIS_VALUES:,} per axis")
    except ValueError as e:
        raise WorkbenchError(f"{spec.flag} {_clip(text)!r}: {e}") from None
    if not values:
        raise WorkbenchError(f"{spec.flag} {_clip(text)!r}: no values")
    if notes is not None:
        notes.extend(f"{spec.flag} {n}" for n in found)
    return values


def _clip(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _quote_notes(text: str, notes: list[str]) -> None:
    # A quote right after ", " is a literal character for A1111 (and so for wb): say so once.
    if re.search(r',\s+"', text):
        fields = " | ".join(a1111_fields(text))
        notes.append(
            f"{_clip(text)!r}: a quote after a space is a literal character in A1111, so the values are "
            f"{_clip(fields)}; write ,\"a, b\" without the space to keep a comma inside a value"
        )
