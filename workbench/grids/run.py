"""Make a whole grid: render the plan, write the cells with their PNG info, the grid image, the scores,
grid.json and index.html. This is the one library call behind `wb grid`.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from workbench import __version__
from workbench.checkpoint import files
from workbench.checkpoint.files import remove_empty_dirs
from workbench.checkpoint.hashing import autov2, sha256_file
from workbench.grids import layout, metrics, report
from workbench.grids.infotext import cell_fields, grid_fields, subgrid_firsts
from workbench.grids.plan import POSITIONS, Cell, Plan, effective_schedule_label
from workbench.grids.pnginfo import format_parameters, save_png
from workbench.grids.render import Progress, RenderResult, render_cells
from workbench.grids.samplers import resolve

CLIP_SKIPPED = "CLIP score skipped: no --clip-weights given (wb never downloads weights)"


@dataclass
class CellResult:
    index: int
    file: str
    parameters: str
    burn: float
    clip: float | None


@dataclass
class GridResult:
    out_dir: Path
    grid_png: Path
    grid_json: Path
    index_html: Path
    cells: list[CellResult]
    render: RenderResult
    clip_note: str  # what was done about the CLIP score, in one line
    size: tuple[int, int]  # grid.png's width and height


def checkpoint_hashes(path: Path) -> tuple[str | None, str | None]:
    """(sha256, AutoV2) of a checkpoint file (cached), or (None, None) for a diffusers folder."""
    if not path.is_file():
        return None, None
    sha = sha256_file(path)
    return sha, autov2(sha)


def write_atomic(path: Path, write) -> Path:
    """Write through a temporary file and rename, so an interrupted run leaves no half-written file;
    a full disk is one line naming the file (see checkpoint/files.py)."""
    return files.write_atomic(path, write, path.name)


def clear_old_cells(folder: Path) -> None:
    # A previous, larger grid in the same folder would leave cells that this one does not own.
    for old in folder.glob("*.png"):
        if re.fullmatch(r"\d{4,}\.png", old.name):
            old.unlink()


def _grid_json(plan: Plan, hashes: dict[Path, tuple[str | None, str | None]], results: list[CellResult],
               rendered: RenderResult, clip_info: dict | None, clip_note: str, size) -> dict:  # fmt: skip
    on_axis = {a.kind for a in plan.axes.values() if a}
    first = plan.cells[0]
    fixed = {
        "checkpoint": first.checkpoint_name, "prompt": first.prompt, "seed": first.seed, "cfg": first.cfg,
        "steps": first.steps, "sampler": first.sampler,
    }  # fmt: skip
    by_index = {r.index: r for r in results}
    names = {c.checkpoint: c.checkpoint_name for c in plan.cells}
    return {
        "wb_version": __version__,
        "grid": "grid.png",
        "size": list(size),
        "axes": {p: (plan.axes[p].to_json() if plan.axes[p] else None) for p in POSITIONS},
        "fixed": {k: v for k, v in fixed.items() if k not in on_axis},
        "negative_prompt": first.negative,  # cell 0 holds every axis's first value: the original text
        "resolved_seeds": {str(k): v for k, v in plan.resolved_seeds.items()},
        "checkpoints": [
            {"name": names[path], "path": str(path), "sha256": sha, "model_hash": short}
            for path, (sha, short) in hashes.items()
        ],
        "scores": {
            "burn": "100 * (0.4 * chroma + 0.4 * clipped + 0.2 * hf / (hf + 0.05)); higher = more burnt",
            "clip": clip_info,
            "note": clip_note,
        },
        "cells": [
            {
                "index": c.index,
                "file": c.file,
                "x": c.x,
                "y": c.y,
                "z": c.z,
                "checkpoint": c.checkpoint_name,
                "model_hash": hashes[c.checkpoint][1],
                "prompt": c.prompt,
                "negative_prompt": c.negative,
                "seed": c.seed,
                "cfg": c.cfg,
                "steps": c.steps,
                "sampler": resolve(c.sampler).display,
                "schedule_type": effective_schedule_label(c),
                "vae": None if c.vae is None else str(c.vae),
                "clip_skip": c.clip_skip,
                "variation_seed": c.subseed if c.subseed_strength else None,
                "variation_strength": c.subseed_strength,
                "size": [c.width, c.height],
                "parameters": by_index[c.index].parameters,
                "loras": [{"file": f, "te": te, "unet": unet} for f, te, unet in c.loras],
                "scores": {"burn": round(by_index[c.index].burn, 3), "clip": _round(by_index[c.index].clip)},
            }
            for c in plan.cells
        ],
        "render": {
            "device": rendered.device,
            "dtype": rendered.dtype,
            "pipelines_built": rendered.pipelines_built,
            "reloaded": rendered.reloaded,
            "sampling_seconds": round(rendered.sampling_seconds, 3),
            "loading_seconds": round(rendered.loading_seconds, 3),
            "total_seconds": round(rendered.total_seconds, 3),
        },
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def make_grid(
    plan: Plan,
    out_dir: str | os.PathLike,
    batch: int = 4,
    clip_model: str = "ViT-B-32",
    clip_weights: str | os.PathLike | None = None,
    clip_scorer: metrics.ClipScorer | None = None,
    device: str | None = None,
    dtype=None,
    progress: Progress | None = None,
) -> GridResult:
    """Render `plan` into `out_dir`: cells/NNNN.png, grid.png, grid.json, index.html.

    The CLIP score needs local weights (`clip_weights`) or a ready `clip_scorer`; without either it
    is skipped and `GridResult.clip_note` says so.
    """
    out = Path(out_dir)
    cells_dir = out / "cells"
    # Load the CLIP model before anything else: a bad --clip-weights should fail in seconds, not after.
    if clip_scorer is None and clip_weights is not None:
        clip_scorer = metrics.load_clip_scorer(clip_model, clip_weights, device or "cpu")
    made = [d for d in (cells_dir, out) if not d.exists()]
    cells_dir.mkdir(parents=True, exist_ok=True)
    clear_old_cells(cells_dir)
    try:
        return _render_into(plan, out, cells_dir, batch, clip_scorer, clip_weights, device, dtype, progress)
    except BaseException:
        remove_empty_dirs(*made)  # a refused run leaves no empty cells/ (nor the folder it made)
        raise


def _render_into(  # noqa: PLR0913
    plan, out: Path, cells_dir: Path, batch, clip_scorer, clip_weights, device, dtype, progress
) -> GridResult:

    # Hash in the background: a first look at a 7 GB file takes seconds to read, and the first PNG
    # needs its checkpoint's hash only once the pipeline is built and a batch sampled.
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wb-hash")
    pending = {path: pool.submit(checkpoint_hashes, path) for path in plan.checkpoints}
    vaes = {c.vae for c in plan.cells if c.vae is not None}
    pending.update({vae: pool.submit(checkpoint_hashes, vae) for vae in vaes if vae not in pending})
    results: dict[int, CellResult] = {}

    def fields_of(cell: Cell) -> dict[str, object]:
        vae_hash = pending[cell.vae].result()[1] if cell.vae is not None else None
        return cell_fields(cell, pending[cell.checkpoint].result()[1], vae_hash)

    def write_cell(cell: Cell, image: Image.Image) -> None:
        text = format_parameters(cell.prompt, cell.negative, fields_of(cell))
        write_atomic(out / cell.file, lambda tmp: save_png(image, tmp, text))
        results[cell.index] = CellResult(cell.index, cell.file, text, metrics.burn_score(image), None)

    try:
        rendered = render_cells(
            plan, batch=batch, device=device, dtype=dtype, progress=progress, on_image=write_cell
        )
        hashes = {path: pending[path].result() for path in plan.checkpoints}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)

    clip_info, clip_note = None, CLIP_SKIPPED
    if clip_scorer is not None:
        if progress:
            progress(len(plan.cells), len(plan.cells), "CLIP scores")
        scores = clip_scorer.score(
            [rendered.images[c.index] for c in plan.cells], [c.prompt for c in plan.cells]
        )
        for cell, score in zip(plan.cells, scores, strict=True):
            results[cell.index].clip = score
        clip_info = {"model": clip_scorer.name, "weights": str(clip_weights) if clip_weights else None}
        clip_note = f"CLIP score with {clip_scorer.name or 'the given model'}"

    geo = plan.geometry
    labels = {p: (plan.axes[p].labels if plan.axes[p] else None) for p in POSITIONS}
    grid = layout.draw_grid(
        {(c.x, c.y, c.z): rendered.images[c.index] for c in plan.cells},
        geo, col_labels=labels["x"], row_labels=labels["y"], titles=labels["z"],
    )  # fmt: skip
    def grid_text(cell: Cell, with_z: bool) -> str:
        return format_parameters(cell.prompt, cell.negative, grid_fields(plan, cell, fields_of(cell), with_z))

    main_text = grid_text(plan.cells[0], True)
    grid_png = write_atomic(out / "grid.png", lambda tmp: save_png(grid, tmp, main_text))
    if plan.axes["z"] is not None:  # each Z sub-grid on its own, with its own infotext, as A1111 saves them
        (out / "subgrids").mkdir(exist_ok=True)
        for z, cell in enumerate(subgrid_firsts(plan)):
            left = geo.subgrid_left(z)
            part = grid.crop((left, 0, left + geo.subgrid_w, geo.height))
            text = grid_text(cell, False)
            write_atomic(out / "subgrids" / f"{z:02d}.png", lambda tmp, p=part, t=text: save_png(p, tmp, t))
    ordered = [results[c.index] for c in plan.cells]
    data = _grid_json(plan, hashes, ordered, rendered, clip_info, clip_note, grid.size)
    grid_json = write_atomic(out / "grid.json", lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))
    index_html = write_atomic(out / "index.html", lambda tmp: tmp.write_text(report.build_html(data)))
    return GridResult(out, grid_png, grid_json, index_html, ordered, rendered, clip_note, grid.size)
