"""`wb grid`: parse the flags, show the plan, render with a progress bar, print where things went.

Registered in workbench/cli.py with `app.command("grid")(friendly(grid))`; WorkbenchError from here
or the library becomes one red line and exit code 2.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from workbench.errors import WorkbenchError
from workbench.grids.axes import FLAGS, kinds, parse_axis_values, split_csv
from workbench.grids.plan import POSITIONS, GridRequest, Plan, make_plan  # (registers the LoRA kinds)

KINDS_HELP = ", ".join(kinds())


MAX_PROMPT_FILE_BYTES = 1_000_000  # ~10,000 long prompts; /dev/zero or a model file is refused


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file (a regular file of at most 1 MB)."""
    from workbench.checkpoint.files import read_text_file

    text = read_text_file(path, "--prompts", MAX_PROMPT_FILE_BYTES)
    return [line.strip() for line in text.splitlines() if line.strip()]


def parse_size(text: str) -> tuple[int, int]:
    """`512x768` (width x height) or `512` (square)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX*]\s*(\d+))?\s*", text)
    if not m:
        raise WorkbenchError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 512x512")
    width = int(m[1])
    return width, int(m[2]) if m[2] else width


def _vae_value(text: str) -> Path | str | None:
    # A1111's "None" is the checkpoint's own VAE; "Automatic" a <stem>.vae.* file beside the
    # checkpoint when there is one, else its own.
    if text.strip().lower() in ("none", ""):
        return None
    if text.strip().lower() in ("automatic", "auto"):
        return "automatic"
    return Path(os.path.expanduser(text))


def build_request(
    ckpts: str, prompts: Path, seeds: str, cfg: str, steps: str, sampler: str, size: str, negative: str,
    sr: str | None, axes: dict[str, str | None], scheduler: str = "automatic", vae: str = "none",
    clip_skip: str = "1", var_seeds: str = "-1", var_strength: str = "0", prompt_order: str | None = None,
    notes: list[str] | None = None, loras: str | None = None, lora_weight: str = "1",
    lora_dirs: list[Path] | None = None,
) -> GridRequest:  # fmt: skip
    """The request from the flags' texts; notes about values A1111 would read otherwise go to `notes`."""
    sizes = [parse_size(s) for s in split_csv(size)] or [parse_size(size)]
    width, height = sizes[0]
    paths = [Path(os.path.expanduser(p)) for p in split_csv(ckpts)]
    if not paths:
        raise WorkbenchError(f"{FLAGS['checkpoint']}: give at least one checkpoint")
    texts = {"seed": seeds, "cfg": cfg, "steps": steps, "sampler": sampler, "scheduler": scheduler,
             "vae": vae, "clip_skip": clip_skip, "subseed": var_seeds,
             "subseed_strength": var_strength, "size": size}  # fmt: skip
    if sr is not None:
        texts["sr"] = sr
    extra = {}  # the LoRA axes (kinds registered by grids/lora_apply.py)
    if loras is not None:
        extra["lora"] = parse_axis_values("lora", loras, notes)
    if loras is not None or lora_weight.strip() != "1":
        extra["lora_weight"] = parse_axis_values("lora_weight", lora_weight, notes)
        texts["lora_weight"] = lora_weight

    def values(kind: str) -> list:
        return parse_axis_values(kind, texts[kind], notes)

    return GridRequest(
        checkpoints=paths,
        prompts=read_prompts(prompts),
        seeds=values("seed"),
        cfgs=values("cfg"),
        steps=values("steps"),
        samplers=values("sampler"),
        sr=values("sr") if sr is not None else [],
        negative=negative,
        width=width,
        height=height,
        axes={p: k.strip().lower() for p, k in axes.items() if k},
        schedulers=values("scheduler"),
        vaes=[_vae_value(v) for v in values("vae")],
        clip_skips=values("clip_skip"),
        subseeds=values("subseed"),
        subseed_strengths=values("subseed_strength"),
        prompt_order=parse_axis_values("prompt_order", prompt_order, notes) if prompt_order else [],
        sizes=sizes if len(sizes) > 1 else [],
        texts={**texts, **({"prompt_order": prompt_order} if prompt_order else {})},
        extra=extra,
        lora_dirs=[Path(os.path.expanduser(d)) for d in lora_dirs or []],
    )


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plan_table(plan: Plan) -> Table:
    table = Table(title="grid plan", title_justify="left")
    table.add_column("axis")
    table.add_column("kind")
    table.add_column("n", justify="right")
    table.add_column("values", overflow="fold")
    for position in POSITIONS:
        axis = plan.axes[position]
        if axis:
            shown = ", ".join(_shorten(label, 40) for label in axis.labels)
            table.add_row(position.upper(), axis.kind, str(len(axis)), _shorten(shown, 200))
    first = plan.cells[0]
    on_axis = {a.kind for a in plan.axes.values() if a}
    fixed = {
        "checkpoint": first.checkpoint_name, "prompt": _shorten(first.prompt), "seed": str(first.seed),
        "cfg": f"{first.cfg:g}", "steps": str(first.steps), "sampler": first.sampler,
        "scheduler": first.scheduler, "vae": "none" if first.vae is None else str(first.vae),
        "clip_skip": str(first.clip_skip), "subseed_strength": f"{first.subseed_strength:g}",
    }  # fmt: skip
    for kind, value in fixed.items():
        if kind not in on_axis:
            table.add_row("-", kind, "1", value)
    return table


def plan_summary(plan: Plan) -> str:
    geo = plan.geometry
    drawn = ", ".join(str(s) for s in plan.resolved_seeds.values())
    seeds = f"; seed -1 resolved to {drawn}" if drawn else ""
    return (
        f"{plan.images} cells = {plan.images} images, {plan.total_steps} denoising steps, "
        f"{len(plan.checkpoints)} checkpoint load(s); grid {geo.width}x{geo.height} "
        f"= {plan.megapixels:.2f} MP{seeds}"
    )


def grid(
    ckpts: str = typer.Option(
        ..., "--ckpts", help="Checkpoints, comma-separated (quote a path holding a comma)."
    ),
    prompts: Path = typer.Option(..., "--prompts", help="Text file: one prompt per non-empty line."),
    seeds: str = typer.Option(
        "-1", "--seeds", help="Seeds: 1,2 or 1-4 or 1-10 [5]; -1 = random, drawn once."
    ),
    cfg: str = typer.Option("7", "--cfg", help="CFG scale(s): 7 or 5,7,9 or 4-10 (+1.5)."),
    steps: str = typer.Option("25", "--steps", help="Sampling steps: 25 or 10-30 (+10)."),
    sampler: str = typer.Option(
        "euler_a",
        "--sampler",
        help="Sampler(s): euler, euler_a, dpm++2m, dpm++2m_sde, dpm2, dpm2_a, ddim, pndm, unipc, heun, lms "
        '(A1111 names work too: "DPM++ 2M"; "DPM++ 2M Karras" names the schedule type as well).',
    ),
    scheduler: str = typer.Option(
        "automatic", "--scheduler",
        help="A1111 schedule type(s): automatic (the sampler's default: Karras for DPM++ 2M), uniform, "
        "karras, exponential, sgm_uniform, beta, ddim.",
    ),
    vae: str = typer.Option(
        "none", "--vae",
        help="VAE(s): none (the checkpoint's own), automatic (a <stem>.vae.* beside the checkpoint), a VAE "
        "file, or a checkpoint whose VAE is used.",
    ),
    clip_skip: str = typer.Option(
        "1", "--clip-skip", help="A1111 clip skip(s): 1 = the last layer, 2 = penultimate."
    ),
    var_seeds: str = typer.Option(
        "-1", "--var-seeds", help="Variation seed(s) (A1111's Var. seed); -1 = drawn once."
    ),
    var_strength: str = typer.Option(
        "0", "--var-strength", help="Variation strength(s) 0..1 (A1111's Var. strength); 0 = off."
    ),
    prompt_order: str | None = typer.Option(
        None, "--prompt-order",
        help='Prompt order axis: "tok1,tok2,..." gives every order of these prompt parts.'
    ),
    size: str = typer.Option(
        "512x512", "--size", help="Image size(s) WIDTHxHEIGHT (multiples of 8); several make a size axis."
    ),
    negative: str = typer.Option("", "--negative", help="Negative prompt for every cell."),
    sr: str | None = typer.Option(
        None, "--sr", help='Prompt S/R: "search,rep1,rep2"; the first cell keeps the original prompt.'
    ),
    loras: str | None = typer.Option(
        None, "--loras", help="LoRA files as an axis, comma-separated; none = without (a.safetensors,none)."
    ),
    lora_weight: str = typer.Option(
        "1", "--lora-weight", help="Strength of the --loras LoRA(s): 0.8 or 0,0.5,1 or 0-1 [5] (an axis)."
    ),
    lora_dir: list[Path] = typer.Option(
        None, "--lora-dir", help="Folder where <lora:NAME:W> prompt tags are found (repeatable; then the "
        "first checkpoint's folder, then models/Lora)."
    ),
    x: str | None = typer.Option(None, "--x", help=f"Kind along columns: {KINDS_HELP} (default checkpoint)."),
    y: str | None = typer.Option(None, "--y", help=f"Kind along rows: {KINDS_HELP} (default prompt)."),
    z: str | None = typer.Option(
        None, "--z", help=f"Kind of the side-by-side sub-grids: {KINDS_HELP} (default seed)."
    ),
    batch: int = typer.Option(
        4, "--batch", help="Images per pipeline call (cells of one checkpoint sharing steps, CFG, sampler)."
    ),
    out_dir: Path | None = typer.Option(
        None, "-o", "--out", help="Folder for grid.png, cells/, grid.json and index.html."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and stop; nothing is rendered."),
    force: bool = typer.Option(False, "--force", help="Allow a grid over 200 megapixels."),
    clip_model: str = typer.Option(
        "ViT-B-32", "--clip-model", help="open-clip model name for the CLIP score."
    ),
    clip_weights: Path | None = typer.Option(
        None, "--clip-weights", help="LOCAL open-clip weights file; without it the CLIP score is skipped."
    ),
    device: str = typer.Option(
        "auto", "--device", help="auto (cuda + fp16 if available, else CPU fp32), cpu or cuda."
    ),
    threads: int = typer.Option(
        0, "--threads", help="CPU threads for torch (0: torch's default); 1 is steadier on a shared machine."
    ),
) -> None:
    """Render an XYZ grid: checkpoints x prompts x seeds (or CFG, steps, sampler, prompt S/R), scored."""
    out = Console()
    if batch < 1:
        raise WorkbenchError(f"--batch {batch}: must be at least 1")
    if threads < 0:
        raise WorkbenchError(f"--threads {threads}: must be 0 (default) or more")
    if device not in ("auto", "cpu", "cuda"):
        raise WorkbenchError(f"--device {device!r}: expected auto, cpu or cuda")
    if clip_weights is not None and not clip_weights.is_file():
        raise WorkbenchError(f"--clip-weights {clip_weights}: no such file")
    if out_dir is None and not dry_run:
        raise WorkbenchError("-o/--out: give the folder to write the grid to")
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise WorkbenchError(f"-o {out_dir}: exists and is not a folder")
    notes: list[str] = []
    request = build_request(ckpts, prompts, seeds, cfg, steps, sampler, size, negative, sr,
                            {"x": x, "y": y, "z": z}, scheduler, vae, clip_skip, var_seeds, var_strength,
                            prompt_order, notes, loras, lora_weight, lora_dir)  # fmt: skip
    plan = make_plan(request, force=force)
    for note in notes:  # after the plan: a refused request prints its one error line and nothing else
        out.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    out.print(plan_table(plan))
    out.print(plan_summary(plan), highlight=False)
    if dry_run:
        out.print("dry run: nothing rendered")
        return

    import torch

    from workbench.grids.run import make_grid

    if device == "cuda" and not torch.cuda.is_available():
        raise WorkbenchError("--device cuda: no CUDA device is available")
    if threads:
        torch.set_num_threads(threads)
    dev, dtype = (None, None) if device == "auto" else (device, torch.float16 if device == "cuda" else None)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=out, transient=True) as bar:
        task = bar.add_task("starting", total=plan.images)

        def progress(done: int, total: int, note: str) -> None:
            bar.update(task, completed=done, total=total, description=note)

        result = make_grid(plan, out_dir, batch=batch, clip_model=clip_model, clip_weights=clip_weights,
                           device=dev, dtype=dtype, progress=progress)  # fmt: skip
    r = result.render
    burns = [c.burn for c in result.cells]
    out.print(
        f"wrote [bold]{result.grid_png}[/] ({result.size[0]}x{result.size[1]}), {len(result.cells)} cells in "
        f"{result.out_dir / 'cells'}, {result.grid_json.name}, {result.index_html.name}",
        highlight=False,
    )
    out.print(
        f"{r.device} {r.dtype}: {r.total_seconds:.1f} s rendering ({r.sampling_seconds:.1f} s sampling, "
        f"{r.loading_seconds:.1f} s loading); burn {min(burns):.1f}-{max(burns):.1f}",
        highlight=False,
    )
    out.print(result.clip_note, highlight=False)
