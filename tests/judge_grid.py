"""A small grid folder as `wb grid` writes it (grid.json + cells/NNNN.png), without rendering:
the judge tests need its layout, not a model. Columns: checkpoints; rows: prompts; sub-grids: seeds."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def write_fake_grid(
    folder: Path, checkpoints=("base", "v4", "dadapt"), prompts=("a red circle", "a blue square"),
    seeds=(1, 2), burn=None,
) -> Path:  # fmt: skip
    """Cells in reading order (seed, prompt, checkpoint), each a 16 px image of its own colour.
    `burn`: checkpoint -> burn score (default: 30 + its position)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cells").mkdir(exist_ok=True)
    cells = []
    for z, seed in enumerate(seeds):
        for y, prompt in enumerate(prompts):
            for x, name in enumerate(checkpoints):
                index = len(cells)
                file = f"cells/{index:04d}.png"
                Image.new("RGB", (16, 16), (40 * x % 256, 60 * y % 256, 90 * z % 256)).save(folder / file)
                score = (burn or {}).get(name, 30.0 + x)
                cells.append({
                    "index": index, "file": file, "x": x, "y": y, "z": z, "checkpoint": name,
                    "model_hash": f"{x:010d}", "prompt": prompt, "negative_prompt": "", "seed": seed,
                    "cfg": 5.0, "steps": 4, "sampler": "Euler a", "size": [16, 16], "parameters": prompt,
                    "scores": {"burn": score, "clip": None},
                })  # fmt: skip
    data = {
        "wb_version": "test",
        "grid": "grid.png",
        "axes": {
            "x": {"kind": "checkpoint", "values": [f"{c}.safetensors" for c in checkpoints],
                  "labels": list(checkpoints)},
            "y": {"kind": "prompt", "values": list(prompts), "labels": list(prompts)},
            "z": {"kind": "seed", "values": list(seeds), "labels": [f"Seed: {s}" for s in seeds]},
        },  # fmt: skip
        "fixed": {"cfg": 5.0, "steps": 4, "sampler": "euler_a"},
        "checkpoints": [{"name": c, "path": f"{c}.safetensors"} for c in checkpoints],
        "scores": {"burn": "formula", "clip": None, "note": "CLIP score skipped"},
        "cells": cells,
    }
    (folder / "grid.json").write_text(json.dumps(data, indent=2))
    return folder
