"""`wb demo`: the field reports' whole story, offline, on the toy model, on a CPU.

1. the base: the toy model that ships with wb (`wb toy pretrain` made it; it draws shapes);
2. two fine-tunes of it on another procedural set: "v4" (AdamW with a deliberately high UNet lr:
   a burnt UNet, as Vodka V4 was) and "dadapt" (D-Adaptation Adam, lr 1.0 as a multiplier);
3. the LR range test on the toy recipe (a fresh toy model), bounds found automatically;
4. the V4 mixes: v4 + dadapt (weighted 0.5), v4 + (dadapt - base) (add-difference), and the
   kitchen sink through a merge recipe;
5. the swap matrix of base and v4, with its verdict;
6. a grid of every model over prompts and seeds, with scores;
7. `index.html` linking all of it.
Every step is the same library call its command makes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from PIL import Image

from workbench.errors import WorkbenchError

PROMPTS = [
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a purple triangle on a white background",
    "an orange circle on a green background",
]
# The fine-tunes learn a set the base has seen less of: purple and orange shapes.
FINETUNE_DATA = {"n": 48, "seed": 7, "fg": ["purple", "orange"]}

Log = Callable[[str], None]


@dataclass
class Settings:
    """How much work each step does: the full demo fits 10 minutes on 2 cores, --quick 2."""

    finetune_steps: int
    lr_find_steps: int
    seeds: list[int]
    prompts: list[str]
    grid_steps: int
    matrix_prompts: list[str]

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        if quick:
            return cls(12, 16, [1], PROMPTS[:2], 4, PROMPTS[:1])
        return cls(160, 80, [1, 2], PROMPTS, 12, PROMPTS[:2])


@dataclass
class DemoResult:
    out_dir: Path
    models: dict[str, Path]
    runs: dict[str, Path]
    lr_find: dict
    verdicts: list[str]
    grid: Path
    scores: dict[str, dict[str, float]]  # model -> mean burn and shape-scorer results
    index_html: Path
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def base_model() -> Path:
    from workbench.toy.pretrain import toy_base_path

    path = toy_base_path()
    if not path.is_file():
        raise WorkbenchError(
            f"{path}: the shipped toy base model is missing; run `wb toy pretrain -o {path}`"
        )
    return path


def _resolution(base: Path) -> int:
    from workbench.checkpoint.reader import open_checkpoint

    meta = open_checkpoint(base).metadata
    return int(meta.get("wb.toy_resolution", 32))


def _finetune_recipe(base: Path, name: str, steps: int, resolution: int, optimizer: dict) -> dict:
    return {
        "model": {"base": str(base)},
        "data": {"root": "toy:shapes", "resolution": resolution, "toy": FINETUNE_DATA, "cond_dropout": 0.1},
        "validation": {
            "split": 0.15,
            "seed": 555,
            "every_n_steps": max(steps // 4, 1),
            "every_n_epochs": None,
        },
        "optimizer": optimizer,
        "schedule": {"name": "constant"},
        "training": {"max_steps": steps, "batch_size": 4, "seed": 555},
        "saving": {
            "name": name,
            "every_n_epochs": None,
            "every_n_steps": None,
            "keep_last": 1,
            "dtype": "fp16",
        },
        "sampling": {"prompts": [], "every_n_steps": None},
        "logging": {"every_n_steps": 1},
    }


OPTIMIZERS = {
    # Vodka V4's lesson: a UNet lr far above the TE's burns the UNet early.
    "v4": {"name": "adamw", "lr": 3.0e-3, "weight_decay": 0.01, "text_encoder": {"lr": 1.0e-5}},
    # seed 000: D-Adaptation Adam, lr is a multiplier of the adapted step; decoupled weight decay.
    "dadapt": {"name": "dadapt_adam", "lr": 1.0, "weight_decay": 0.02, "decouple": True, "d0": 1.0e-6,
               "text_encoder": {"lr": 0.5}},
}  # fmt: skip


def _train(recipe_data: dict, run_dir: Path):
    from workbench.train.loop import train
    from workbench.train.recipe import parse_recipe

    recipe = parse_recipe(recipe_data, f"wb demo ({run_dir.name})")
    result = train(recipe, run_dir, source={"made_by": "wb demo"})
    if result.stopped == "interrupted":  # Ctrl-C stops the whole demo, not just this fine-tune
        raise KeyboardInterrupt
    if not result.checkpoints:
        raise WorkbenchError(f"{run_dir}: the demo fine-tune saved no checkpoint ({result.message})")
    return result


def _copy(src: Path, dst: Path) -> Path:
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return dst


KITCHEN_SINK = """# Seed 004's kitchen sink on the demo's models: (v4 + dadapt) / 2 + 0.5 (v4 - base).
inputs:
  v4: {v4}
  dadapt: {dadapt}
  base: {base}
steps:
  v4_dadapt: {{method: weighted, inputs: [v4, dadapt], alpha: 0.5}}
  kitchen_sink: {{method: add-diff, inputs: [v4_dadapt, v4, base], alpha: 0.5}}
output: {{step: kitchen_sink}}
dtype: fp16
"""


def run_demo(out_dir: str | os.PathLike, quick: bool = False, log: Log | None = None) -> DemoResult:
    """Run the whole demo into `out_dir` (created; an existing demo there is replaced)."""
    from workbench.grids.plan import GridRequest, make_plan
    from workbench.grids.run import make_grid
    from workbench.merge.engine import merge
    from workbench.merge.recipe import load_yaml, single_step
    from workbench.swap.matrix import swap_matrix
    from workbench.toy.shapes import score_image
    from workbench.train import lr_find as lf
    from workbench.train.recipe import parse_recipe

    say = log or (lambda message: None)
    settings = Settings.for_mode(quick)
    started = time.time()
    timings: dict[str, float] = {}
    out = Path(out_dir)
    for sub in ("runs", "lr_find", "matrix", "grid"):
        shutil.rmtree(out / sub, ignore_errors=True)  # runs refuse to overwrite a run folder
    (out / "models").mkdir(parents=True, exist_ok=True)

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.time() - t0, 1)

    t0 = time.time()
    base = _copy(base_model(), out / "models" / "base.safetensors")
    size = _resolution(base)
    models = {"base": base}
    runs = {}
    for name, optimizer in OPTIMIZERS.items():
        say(f"fine-tuning {name} ({optimizer['name']}, {settings.finetune_steps} steps)")
        t0 = time.time()
        recipe = _finetune_recipe(base, name, settings.finetune_steps, size, optimizer)
        result = _train(recipe, out / "runs" / name)
        models[name] = _copy(result.checkpoints[-1], out / "models" / f"{name}.safetensors")
        runs[name] = result.run_dir
        lap(f"train {name}", t0)

    # The range test of recipes/toy.yaml: a fresh toy model on the toy shapes, lr ramped from 0.
    say(f"LR range test on the toy recipe ({settings.lr_find_steps} steps)")
    t0 = time.time()
    ramp_data = _finetune_recipe(base, "lr_find", settings.lr_find_steps, size, OPTIMIZERS["v4"])
    ramp_data["model"] = {"base": "toy:init", "init_seed": 0}
    ramp_data["data"] = {"root": "toy:shapes", "resolution": size, "toy": {"n": 96, "seed": 0}}
    ramp_data["validation"]["stabilize_train"] = False  # the range test reads loss/val only
    ramp = parse_recipe(ramp_data, "wb demo (the toy recipe)")
    # A log ramp over six decades: the toy from scratch already learns at 1e-4 and still learns
    # faster at 1e-2 (a linear ramp to 1e-2 never sees the upper bound), and diverges before 1, so
    # both bounds are in this range.
    test = lf.RangeTest(lr_min=1e-6, lr_max=1.0, steps=settings.lr_find_steps, log=True,
                        val_every=max(settings.lr_find_steps // 20, 1))  # fmt: skip
    _, finding = lf.run_range_test(ramp, test, out / "lr_find", source={"made_by": "wb demo"})
    lf.write_report(finding, out / "lr_find", {"recipe": "the toy recipe (a fresh toy model on toy:shapes)"})
    lap("lr-find", t0)

    say("merging: weighted, add-difference, and the kitchen sink recipe")
    t0 = time.time()
    v4, dadapt = models["v4"], models["dadapt"]
    merges = {
        "v4_dadapt": single_step("weighted", [v4, dadapt], {"alpha": 0.5}),
        "v4_plus_dadapt_delta": single_step("add-diff", [v4, dadapt, base], {"alpha": 1.0}),
    }
    for name, recipe in merges.items():
        models[name] = merge(recipe, out / "models" / f"{name}.safetensors").path
    sink_yaml = out / "models" / "kitchen_sink.yaml"
    sink_yaml.write_text(KITCHEN_SINK.format(v4=v4, dadapt=dadapt, base=base))
    sink_recipe, _ = load_yaml(sink_yaml)
    models["kitchen_sink"] = merge(sink_recipe, out / "models" / "kitchen_sink.safetensors").path
    lap("merges", t0)

    say("swap matrix: UNet x TE of base and v4")
    t0 = time.time()
    matrix = swap_matrix([base, v4], settings.matrix_prompts, settings.seeds[:1], out / "matrix",
                         steps=settings.grid_steps, cfg=5.0, width=size, height=size)  # fmt: skip
    lap("swap matrix", t0)

    say(f"grid: {len(models)} models x {len(settings.prompts)} prompts x {len(settings.seeds)} seeds")
    t0 = time.time()
    request = GridRequest(checkpoints=list(models.values()), prompts=settings.prompts, seeds=settings.seeds,
                          cfgs=[5.0], steps=[settings.grid_steps], samplers=["euler_a"], width=size,
                          height=size)  # fmt: skip
    plan = make_plan(request)
    grid = make_grid(plan, out / "grid", batch=8)
    scores: dict[str, dict[str, float]] = {}
    for cell, result in zip(plan.cells, grid.cells, strict=True):
        s = score_image(Image.open(out / "grid" / result.file), cell.prompt)
        entry = scores.setdefault(cell.checkpoint_name, {"burn": 0.0, "shape score": 0.0, "n": 0})
        entry["burn"] += result.burn
        entry["shape score"] += s.total
        entry["n"] += 1
    for entry in scores.values():
        n = entry.pop("n")
        entry["burn"] = round(entry["burn"] / n, 2)
        entry["shape score"] = round(entry["shape score"] / n, 3)
    lap("grid", t0)

    finding_json = json.loads((out / "lr_find" / "lr_find.json").read_text())
    lr_summary = {
        k: finding_json.get(k) for k in ("lower", "upper", "midpoint", "valley", "steep", "message")
    }
    seconds = round(time.time() - started, 1)
    index = out / "index.html"
    matrix_width = Image.open(matrix.grid_png).width
    html = _index_html(models, runs, lr_summary, matrix.verdicts, scores, timings, seconds, quick,
                       grid.size[0], matrix_width)  # fmt: skip
    index.write_text(html)
    return DemoResult(out, models, runs, lr_summary, matrix.verdicts, grid.grid_png, scores, index, seconds,
                      timings)  # fmt: skip


def _index_html(models, runs, lr, verdicts, scores, timings, seconds, quick, grid_width, matrix_width) -> str:
    """The demo's front page; the tiny toy images are shown 3x, with square pixels."""
    model_rows = "".join(
        f"<tr><td>{escape(name)}</td><td class=num>{scores.get(name, {}).get('burn', '-')}</td>"
        f"<td class=num>{scores.get(name, {}).get('shape score', '-')}</td>"
        f"<td>models/{escape(path.name)}</td></tr>"
        for name, path in models.items()
    )
    run_links = " ".join(
        f'<a href="runs/{escape(n)}/loss.png">{escape(n)} loss</a> '
        f'(<a href="runs/{escape(n)}/run.json">run.json</a>)'
        for n in runs
    )
    lr_rows = "".join(
        f"<tr><td>{k}</td><td class=num>{'-' if v is None else f'{v:.3g}'}</td></tr>"
        for k, v in lr.items()
        if k != "message"
    )
    verdict_html = "".join(f"<p><b>{escape(v)}</b></p>" for v in verdicts)
    timing = ", ".join(f"{k} {v} s" for k, v in timings.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>wb demo</title>
<style>body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 70em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ddd; padding: 3px 8px; }}
td.num {{ text-align: right; }}
img {{ max-width: 100%; border: 1px solid #ddd; image-rendering: pixelated; }}</style>
</head><body>
<h1>wb demo{" (quick)" if quick else ""}</h1>
<p>The field reports' story on the toy model, offline, in {seconds} s on this machine ({escape(timing)}).</p>
<h2>1-2. Base and fine-tunes</h2>
<p>base: the shipped toy model. v4: AdamW with a deliberately high UNet lr (burnt UNet).
dadapt: D-Adaptation Adam. Training curves: {run_links}.</p>
<h2>3. LR range test</h2>
<p><img src="lr_find/lr_find.png" width="600" alt="lr range test"></p>
<table>{lr_rows}</table><p>{escape(str(lr.get("message") or ""))} <a href="lr_find/index.html">details</a></p>
<h2>4. Merges</h2>
<p>v4_dadapt = 0.5 v4 + 0.5 dadapt; v4_plus_dadapt_delta = v4 + (dadapt - base); kitchen_sink =
v4_dadapt + 0.5 (v4 - base), from <a href="models/kitchen_sink.yaml">its recipe</a>.</p>
<h2>5. Swap matrix: which part of v4 is burnt?</h2>
{verdict_html}
<p><a href="matrix/index.html">
<img src="matrix/grid.png" alt="swap matrix" width="{3 * matrix_width}"></a></p>
<h2>6. The grid</h2>
<table><tr><th>model</th><th>mean burn</th><th>mean shape score</th><th>file</th></tr>{model_rows}</table>
<p><a href="grid/index.html"><img src="grid/grid.png" alt="grid" width="{3 * grid_width}"></a></p>
</body></html>
"""
