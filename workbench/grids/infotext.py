"""A1111's infotext for wb's cells and grids: which fields, in which order, named how.

A cell's line follows A1111's `create_infotext` (modules/processing.py): Steps, Sampler, Schedule
type, CFG scale, Seed, Size, Model hash, Model, VAE hash, VAE, Variation seed, Variation seed
strength, Clip skip; a field A1111 leaves out (no VAE file, strength 0, clip skip 1) is left out.
`Model` is the checkpoint's file stem, as A1111 writes it, even where grid labels add folders to
tell two stems apart. A grid's line is its first cell's plus the X/Y/Z plot's fields (`Script`,
`X Type`, `X Values`, `Fixed X Values` for seeds, ...), as scripts/xyz_grid.py adds them.
"""

from __future__ import annotations

import csv
from io import StringIO
from pathlib import Path

from workbench.grids.axes import KIND_REGISTRY, format_number
from workbench.grids.lora_apply import lora_hashes_field
from workbench.grids.plan import POSITIONS, Cell, Plan, effective_schedule_label
from workbench.grids.samplers import resolve

MODEL_SUFFIXES = {".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin"}


def model_name(path: Path) -> str:
    """A1111's `Model:`: the file name without its extension (a diffusers folder: its name)."""
    path = Path(path)
    return path.stem if path.suffix.lower() in MODEL_SUFFIXES else path.name


def cell_fields(cell: Cell, model_hash: str | None, vae_hash: str | None = None) -> dict[str, object]:
    """The `Key: value` line of a cell's PNG info, in A1111's order and spelling."""
    fields: dict[str, object] = {
        "Steps": cell.steps,
        "Sampler": resolve(cell.sampler).display,
        "Schedule type": effective_schedule_label(cell),
        "CFG scale": format_number(cell.cfg),
        "Seed": cell.seed,
        "Size": f"{cell.width}x{cell.height}",
        "Model hash": model_hash,
        "Model": model_name(cell.checkpoint),
    }
    if cell.vae is not None:  # A1111 names the VAE only when one is loaded from a file
        fields["VAE hash"] = vae_hash
        fields["VAE"] = Path(cell.vae).name
    if cell.subseed_strength != 0:
        fields["Variation seed"] = cell.subseed
        fields["Variation seed strength"] = format_number(cell.subseed_strength)
    if cell.clip_skip > 1:
        fields["Clip skip"] = cell.clip_skip
    fields.update(lora_hashes_field(cell.prompt, cell.loras))  # A1111's `Lora hashes: "name: hash"`
    # a diffusers folder has no file hash; A1111 then leaves the key out too
    return {k: v for k, v in fields.items() if v is not None}


def csv_row(values: list[str]) -> str:
    """One CSV row as A1111's xyz_grid writes a value list (quotes only where needed)."""
    out = StringIO()
    csv.writer(out).writerow(values)
    return out.getvalue().strip()


def axis_values_text(plan: Plan, position: str) -> str:
    """A1111's "X Values": the text the values came from, or one made from the values."""
    axis = plan.axes[position]
    if axis.text is not None:
        return axis.text
    if axis.kind == "checkpoint":
        return csv_row([model_name(p) for p in axis.values])
    if axis.kind == "vae":
        names = {None: "None", "automatic": "Automatic"}
        return csv_row([names[v] if v in names else Path(v).name for v in axis.values])
    if axis.kind == "prompt_order":
        return csv_row(list(axis.values[0]))
    if axis.kind == "lora":  # the names the cells' <lora:NAME:W> tags use
        return csv_row([v or "none" for v in axis.values])
    return csv_row([format_number(v) if isinstance(v, (int, float)) else str(v) for v in axis.values])


def grid_fields(plan: Plan, first: Cell, cell_line: dict[str, object], with_z: bool) -> dict[str, object]:
    """A grid's line: the first cell's fields plus A1111's X/Y/Z plot fields."""
    fields = dict(cell_line)
    fields["Script"] = "X/Y/Z plot"
    for position in POSITIONS if with_z else POSITIONS[:2]:
        axis = plan.axes[position]
        if axis is None:
            continue
        letter = position.upper()
        fields[f"{letter} Type"] = KIND_REGISTRY[axis.kind].a1111
        fields[f"{letter} Values"] = axis_values_text(plan, position)
        if axis.kind in ("seed", "subseed"):  # A1111 records the seeds it fixed (-1 drawn)
            fields[f"Fixed {letter} Values"] = ", ".join(str(v) for v in axis.values)
    return fields


def subgrid_firsts(plan: Plan) -> list[Cell]:
    """The first cell (x 0, y 0) of each Z sub-grid."""
    return [c for c in plan.cells if c.x == 0 and c.y == 0]
