"""The swap matrix: every (UNet from i, text encoder from j) combination, rendered side by side,
with a verdict naming the component that carries the change.

Seed 004 swapped the UNet and the text encoder between a fresh model and a fine-tune by hand and
looked at the pictures. Here one pipeline is built from the first checkpoint (the base); for each
row the UNet of checkpoint i is loaded into it in place, for each column the text encoder(s) of
checkpoint j, and the same prompts and seeds are rendered, so no N^2 files are ever written. The VAE
stays the base's throughout, so the matrix isolates the UNet and the text encoder.

Scores per image: the grid's burn score (pixels only, 0..100) and the drift from the base image
(UNet and TE of checkpoint 0) for the same prompt and seed: the mean absolute pixel difference,
0 (identical) .. 1. A component's effect is the mean over prompts and seeds of its row (UNet of k
with the base TE) or column (TE of k with the base UNet) against the base cell; the component whose
swap moves the pictures most (drift, plus any rise in burn / 100) is named in the verdict.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from html import escape
from pathlib import Path

import numpy as np
from PIL import Image

from workbench import __version__
from workbench.errors import WorkbenchError
from workbench.grids import layout, metrics, report
from workbench.grids.axes import checkpoint_names
from workbench.grids.plan import Cell
from workbench.grids.pnginfo import format_parameters, save_png
from workbench.grids.render import Progress, PromptCache, configs_and_scheduler, pick_device, sample_batch
from workbench.grids.run import cell_fields, clear_old_cells, write_atomic
from workbench.grids.samplers import resolve

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# Below these a swap is taken to change nothing visible (8-bit rounding, sampler noise).
QUIET_DRIFT = 0.01
QUIET_BURN = 1.0


@dataclass
class MatrixCell:
    index: int
    unet: int  # row: the checkpoint the UNet came from
    te: int  # column: the checkpoint the text encoder came from
    prompt: str
    seed: int
    file: str
    burn: float
    drift: float
    parameters: str


@dataclass
class Effect:
    checkpoint: str
    component: str  # "UNet" or "TE"
    burn_delta: float  # mean burn of its cells minus the base cells'
    drift: float  # mean drift of its cells from the base cells

    @property
    def impact(self) -> float:
        return self.drift + max(0.0, self.burn_delta) / 100.0


@dataclass
class MatrixResult:
    out_dir: Path
    grid_png: Path
    matrix_json: Path
    index_html: Path
    names: list[str]
    cells: list[MatrixCell]
    effects: list[Effect]
    verdicts: list[str]  # one sentence per non-base checkpoint


def drift(image: Image.Image, base: Image.Image) -> float:
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    b = np.asarray(base.convert("RGB"), dtype=np.float32)
    return float(np.abs(a - b).mean() / 255.0)


def verdict(name: str, unet: Effect, te: Effect) -> str:
    """One sentence naming the component of checkpoint `name` that carries most of the change."""
    parts = (
        f"UNet of {name}: {unet.burn_delta:+.1f} burn, {unet.drift:.3f} drift; "
        f"TE of {name}: {te.burn_delta:+.1f} burn, {te.drift:.3f} drift."
    )
    quiet = [e.drift < QUIET_DRIFT and abs(e.burn_delta) < QUIET_BURN for e in (unet, te)]
    if all(quiet):
        return f"{parts} Neither component of {name} changes the pictures visibly."
    winner, other = (unet, te) if unet.impact >= te.impact else (te, unet)
    full = {"UNet": "UNet", "TE": "text encoder"}
    strength = "most" if winner.impact > 2 * other.impact else "more"
    return f"{parts} The {full[winner.component]} of {name} carries {strength} of the change."


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def check_matrix_size(
    n_ckpts: int, n_prompts: int, n_seeds: int, width: int, height: int, force: bool
) -> int:
    """The number of images the matrix would render, refused over the grid's megapixel limit."""
    from workbench.grids.plan import MAX_MEGAPIXELS

    images = n_ckpts * n_ckpts * n_prompts * n_seeds
    megapixels = images * width * height / 1e6
    if megapixels > MAX_MEGAPIXELS and not force:
        raise WorkbenchError(
            f"the swap matrix would render {images:,} images ({n_ckpts}x{n_ckpts} checkpoints x "
            f"{n_prompts:,} prompts x {n_seeds:,} seeds, {megapixels:,.0f} megapixels, over the limit "
            f"of {MAX_MEGAPIXELS:.0f}); use fewer prompts or seeds, or --force"
        )
    return images


def swap_matrix(
    checkpoints: list[str | os.PathLike],
    prompts: list[str],
    seeds: list[int],
    out_dir: str | os.PathLike,
    steps: int = 20,
    cfg: float = 7.0,
    sampler: str = "euler_a",
    width: int = 512,
    height: int = 512,
    negative: str = "",
    batch: int = 4,
    device: str | None = None,
    dtype=None,
    progress: Progress | None = None,
    force: bool = False,
) -> MatrixResult:
    """Render every UNet x TE combination of `checkpoints` (the first is the base) into `out_dir`.
    Like the grid, a matrix over MAX_MEGAPIXELS of images is refused (counted, not built) unless
    `force`."""
    import torch

    from workbench.pipeline import build_pipeline, load_weights_into

    paths = [Path(p) for p in checkpoints]
    if len(paths) < 2:
        raise WorkbenchError("--ckpts: the swap matrix needs at least two checkpoints (the base first)")
    if not prompts:
        raise WorkbenchError("--prompts: no prompts")
    check_matrix_size(len(paths), len(prompts), len(seeds), width, height, force)
    resolve(sampler)  # an unknown sampler fails before anything is loaded
    configs = [configs_and_scheduler(p) for p in paths]
    for path, (cfgs, _) in zip(paths[1:], configs[1:], strict=True):
        if cfgs != configs[0][0]:
            raise WorkbenchError(
                f"{path}: not the same architecture as {paths[0]}: components cannot be swapped"
            )
    scheduler_config = configs[0][1]
    names = checkpoint_names(paths)
    if device is None:
        device, dtype = pick_device()
    dtype = dtype or torch.float32

    out = Path(out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    clear_old_cells(out / "cells")
    pairs = [(p, s) for p in prompts for s in seeds]
    n = len(paths)
    total = n * n * len(pairs)
    report_progress = progress or (lambda done, total, note: None)

    # <lora:NAME:W> tags in the prompts: looked up beside the base (then models/Lora), checked
    # against every checkpoint before anything renders, applied in place on each combination
    from workbench.grids.lora_apply import LoraLookup, LoraState, cell_loras, check_cells, default_folders

    lookup = LoraLookup({}, default_folders([], paths[0]))
    lora_sets = {p: cell_loras(p, lookup) for p in prompts}
    check_cells([Cell(0, 0, 0, 0, path, "", p, "", 0, 0.0, 1, sampler, 8, 8, loras=lora_sets[p])
                 for path in paths for p in prompts])  # fmt: skip

    pipe = build_pipeline(paths[0], dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    texts = PromptCache(pipe, device)
    loras = LoraState(pipe, paths[0])
    images: dict[tuple[int, int, int], Image.Image] = {}
    cells: list[Cell] = []
    for i, unet_path in enumerate(paths):
        if loras.text_encoder_changed:
            texts.clear()
        loras.restore()  # the originals back before other weights come in
        load_weights_into(pipe, unet_path, components=("unet",))
        for j, te_path in enumerate(paths):
            report_progress(len(images), total, f"UNet {names[i]} + TE {names[j]}")
            if loras.text_encoder_changed:
                texts.clear()
            loras.restore()
            if load_weights_into(pipe, te_path, components=TEXT_ENCODERS):
                texts.clear()
            group = [
                Cell(index=(i * n + j) * len(pairs) + k, x=j, y=i, z=k, checkpoint=unet_path,
                     checkpoint_name=f"UNet {names[i]} + TE {names[j]}", prompt=prompt, negative=negative,
                     seed=seed, cfg=cfg, steps=steps, sampler=sampler, width=width, height=height,
                     loras=lora_sets[prompt])
                for k, (prompt, seed) in enumerate(pairs)
            ]  # fmt: skip
            by_loras = [[c for c in group if c.loras == s] for s in sorted({c.loras for c in group})]
            step = max(1, batch)
            for chunk in [same[k : k + step] for same in by_loras for k in range(0, len(same), step)]:
                if loras.apply(chunk[0].loras):  # in place (grids/lora_apply.py)
                    texts.clear()
                with torch.inference_mode():
                    rendered = sample_batch(pipe, chunk, scheduler_config, device, dtype, texts)
                for cell, image in zip(chunk, rendered, strict=True):
                    images[(cell.x, cell.y, cell.z)] = image
                report_progress(len(images), total, f"UNet {names[i]} + TE {names[j]}")
            cells.extend(group)

    results = []
    for cell in cells:
        image = images[(cell.x, cell.y, cell.z)]
        text = format_parameters(cell.prompt, cell.negative, cell_fields(cell, None))
        write_atomic(out / cell.file, lambda tmp, image=image, text=text: save_png(image, tmp, text))
        base = images[(0, 0, cell.z)]
        results.append(MatrixCell(cell.index, cell.y, cell.x, cell.prompt, cell.seed, cell.file,
                                  metrics.burn_score(image), drift(image, base), text))  # fmt: skip

    def cells_of(unet: int, te: int) -> list[MatrixCell]:
        return [c for c in results if c.unet == unet and c.te == te]

    base_burn = _mean([c.burn for c in cells_of(0, 0)])
    effects, verdicts = [], []
    for k in range(1, n):
        row, col = cells_of(k, 0), cells_of(0, k)
        unet = Effect(
            names[k], "UNet", _mean([c.burn for c in row]) - base_burn, _mean([c.drift for c in row])
        )
        te = Effect(names[k], "TE", _mean([c.burn for c in col]) - base_burn, _mean([c.drift for c in col]))
        effects += [unet, te]
        verdicts.append(verdict(names[k], unet, te))

    titles = [f"{prompt} / seed {seed}" for prompt, seed in pairs]
    geo = layout.geometry(cols=n, rows=n, subgrids=len(pairs), cell_w=width, cell_h=height)
    grid = layout.draw_grid(
        images,
        geo,
        col_labels=[f"TE: {x}" for x in names],
        row_labels=[f"UNet: {x}" for x in names],
        titles=titles,
    )
    grid_png = write_atomic(out / "grid.png", lambda tmp: grid.save(tmp, format="PNG"))
    data = _matrix_json(paths, names, pairs, results, effects, verdicts, grid.size, steps, cfg, sampler)
    matrix_json = write_atomic(
        out / "matrix.json", lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n")
    )
    html = report.build_html(data, title="wb swap matrix", intro_html=_verdict_html(effects, verdicts))
    index_html = write_atomic(out / "index.html", lambda tmp: tmp.write_text(html))
    return MatrixResult(out, grid_png, matrix_json, index_html, names, results, effects, verdicts)


def _matrix_json(paths, names, pairs, results, effects, verdicts, size, steps, cfg, sampler) -> dict:
    """matrix.json, in the grid.json shape (so the grid's report draws it) plus the verdict."""
    display = resolve(sampler).display
    return {
        "wb_version": __version__,
        "grid": "grid.png",
        "size": list(size),
        "axes": {
            "x": {"kind": "text encoder from", "values": [str(p) for p in paths], "labels": names},
            "y": {"kind": "UNet from", "values": [str(p) for p in paths], "labels": names},
            "z": {
                "kind": "prompt / seed",
                "values": [list(p) for p in pairs],
                "labels": [f"{p} / {s}" for p, s in pairs],
            },
        },
        "checkpoints": [{"name": nm, "path": str(p)} for nm, p in zip(names, paths, strict=True)],
        "score_names": ["burn", "drift"],
        "scores": {
            "burn": "pixels only, 0..100, higher = more burnt (see docs/grid.md)",
            "drift": "mean |pixel - base pixel| / 255 against UNet and TE of the first checkpoint",
            "note": "VAE of the first checkpoint in every cell",
        },
        "effects": [asdict(e) | {"impact": e.impact} for e in effects],
        "verdicts": verdicts,
        "cells": [
            {
                "index": c.index,
                "file": c.file,
                "x": c.te,
                "y": c.unet,
                "z": pairs.index((c.prompt, c.seed)),
                "checkpoint": f"UNet {names[c.unet]} + TE {names[c.te]}",
                "model_hash": None,
                "prompt": c.prompt,
                "seed": c.seed,
                "cfg": cfg,
                "steps": steps,
                "sampler": display,
                "parameters": c.parameters,
                "scores": {"burn": round(c.burn, 3), "drift": round(c.drift, 4)},
            }
            for c in results
        ],  # fmt: skip
    }


def _verdict_html(effects: list[Effect], verdicts: list[str]) -> str:
    rows = "".join(
        f"<tr><td>{escape(e.component)} of {escape(e.checkpoint)}</td>"
        f'<td class="num">{e.burn_delta:+.2f}</td><td class="num">{e.drift:.4f}</td></tr>'
        for e in effects
    )
    sentences = "".join(f"<p><b>{escape(v)}</b></p>" for v in verdicts)
    return (
        f"{sentences}<table><thead><tr><th>swapped in</th><th>burn vs base</th><th>drift from base</th>"
        f"</tr></thead><tbody>{rows}</tbody></table>"
    )
