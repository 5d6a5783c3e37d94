"""A1111's "PNG Info": the generation parameters in a PNG `parameters` text chunk, written and read.

The text is the prompt, then `Negative prompt: ...` (only when there is one), then one line of
`Key: value` pairs: `Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512,
Model hash: 0123456789, Model: name`. A value holding a comma, colon or quote is written as a
JSON string, as A1111 does, so names like "v1, final" survive the round trip.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from PIL import Image, PngImagePlugin

NEGATIVE = "Negative prompt:"
# One `Key: value` pair of the last line; a value is a JSON string or runs to the next comma.
_PAIR = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _quote(value: str) -> str:
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ',:"\n') else value


def format_parameters(prompt: str, negative: str, fields: dict[str, object]) -> str:
    """The `parameters` text: prompt line(s), the negative prompt if any, the `Key: value` line."""
    lines = [prompt]
    if negative:
        lines.append(f"{NEGATIVE} {negative}")
    lines.append(", ".join(f"{k}: {_quote(str(v))}" for k, v in fields.items()))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, str]:
    """Read a `parameters` text back: {"prompt", "negative_prompt", and each key of the last line}.

    Values stay strings, exactly as written ("7", "512x512"), so nothing is lost to rounding.
    """
    lines = text.strip("\n").split("\n")
    last = lines[-1]
    pairs = _PAIR.findall(last)
    # A last line with fewer than three pairs is part of the prompt, not the parameters (A1111's rule).
    fields: dict[str, str] = {}
    if len(pairs) >= 3:
        lines = lines[:-1]
        for key, value in pairs:
            fields[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    target = prompt_lines
    for line in lines:
        if line.startswith(NEGATIVE):
            target = negative_lines
            line = line[len(NEGATIVE) :].lstrip()
        target.append(line)
    return {"prompt": "\n".join(prompt_lines), "negative_prompt": "\n".join(negative_lines), **fields}


def save_png(image: Image.Image, path: str | os.PathLike, parameters: str) -> Path:
    """Write `image` as a PNG whose `parameters` text chunk carries the generation parameters."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    path = Path(path)
    image.save(path, format="PNG", pnginfo=info)
    return path


def read_parameters(path: str | os.PathLike) -> str | None:
    """The `parameters` text chunk of a PNG, or None when it has none."""
    with Image.open(path) as image:
        return image.info.get("parameters")
