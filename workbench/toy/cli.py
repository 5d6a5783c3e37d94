"""`wb toy pretrain`: parse options, call `workbench.toy.pretrain.pretrain_toy`, show progress, print.

Registered in workbench/cli.py as `toy_app.command("pretrain")(friendly(toy_pretrain))`, beside
`wb toy init`. Nothing heavy is imported at module level: `wb --help` stays instant.
"""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from workbench.errors import WorkbenchError

out = Console()
err = Console(stderr=True)

# Keep in step with pretrain_toy's defaults (checked by tests/test_toy_pretrain.py).
DEFAULT_SIZE = 32
DEFAULT_VAE_STEPS = 800

HELP = {
    "output": "The checkpoint to write; its run record goes to OUT_run/ beside it.",
    "seed": "Seed of everything: initial weights, the VAE's images, training noise and order.",
    "vae_steps": "Stage 1: VAE optimizer steps (batch 16).",
    "steps": "Stage 2: UNet + text encoder optimizer steps [default: the recipe's training.max_steps].",
    "size": "Image size the model trains (and is judged) at: 32 or 64.",
    "workdir": "New or empty folder for everything the run makes, checkpoints included "
    "[default: runs/toy-pretrain-TIME].",
    "recipe": "The stage-2 recipe [default: recipes/toy_pretrain.yaml].",
    "threads": "torch CPU threads [default: torch's]; on a busy machine 1 can be several times faster.",
    "judge": "Sample the judge prompts at the end and score them (a few seconds).",
}


def toy_pretrain(
    output: Path = typer.Option(..., "-o", "--output", metavar="OUT.safetensors", help=HELP["output"]),
    seed: int = typer.Option(0, "--seed", help=HELP["seed"]),
    vae_steps: int = typer.Option(DEFAULT_VAE_STEPS, "--vae-steps", help=HELP["vae_steps"]),
    steps: int = typer.Option(None, "--steps", help=HELP["steps"]),
    size: int = typer.Option(DEFAULT_SIZE, "--size", help=HELP["size"]),
    workdir: Path = typer.Option(None, "--workdir", help=HELP["workdir"]),
    recipe: Path = typer.Option(None, "--recipe", metavar="RECIPE.yaml", help=HELP["recipe"]),
    threads: int = typer.Option(None, "--threads", help=HELP["threads"]),
    judge: bool = typer.Option(True, "--judge/--no-judge", help=HELP["judge"]),
) -> None:
    """Make a toy base model that draws shapes and colours: train the toy VAE on the shapes, then
    the UNet and text encoder with wb train's loop (recipes/toy_pretrain.yaml). See docs/toy.md."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from workbench.toy.pretrain import SIZES, pretrain_toy

    if size not in SIZES:
        raise WorkbenchError(f"--size {size}: choose {' or '.join(map(str, SIZES))}")
    if threads is not None and threads < 1:
        raise WorkbenchError(f"--threads {threads}: must be at least 1")
    if workdir is None:
        workdir = Path("runs") / f"toy-pretrain-{time.strftime('%Y%m%d-%H%M%S')}"
    columns = (
        TextColumn("[bold]{task.description:<5}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as bar:
        tasks: dict[str, int] = {}
        shown = {"loss": "", "val": ""}

        def update(p) -> None:
            if p.stage == "done":
                return
            if p.stage not in tasks:
                tasks[p.stage] = bar.add_task(p.stage, total=p.total or None, status="")
                shown["loss"] = shown["val"] = ""
            if p.loss is not None:
                shown["loss"] = f"loss {p.loss:.4f}"
            if p.note and p.note.startswith("val "):
                shown["val"] = p.note
            status = p.note if p.stage == "judge" else "  ".join(s for s in shown.values() if s)
            bar.update(tasks[p.stage], total=p.total, completed=p.step, status=status or "")

        result = pretrain_toy(
            output,
            workdir,
            seed=seed,
            image_size=size,
            vae_steps=vae_steps,
            unet_steps=steps,
            progress=update,
            recipe=recipe,
            threads=threads,
            judge=judge,
        )
        if "judge" in tasks:
            bar.update(tasks["judge"], completed=bar.tasks[tasks["judge"]].total, status="done")
    _print_summary(result)


def _print_summary(result) -> None:
    table = Table(title=f"wrote {result.path}", title_justify="left", show_header=False)
    table.add_column("what", style="dim")
    table.add_column("value")
    table.add_row("made by", result.made_by)
    table.add_row(
        "time", f"{result.seconds:.0f} s (VAE {result.vae_seconds:.0f} s, UNet {result.unet_seconds:.0f} s)"
    )
    v = result.vae
    table.add_row(
        "VAE",
        f"PSNR {v.psnr:.1f} dB (random: {v.psnr_before:.1f}), scaling_factor {v.scaling_factor:.4f}",
    )
    loss = f"last loss/train {result.last_loss:.4f}" if result.last_loss is not None else ""
    val = f", loss/val {result.val_loss:.4f}" if result.val_loss is not None else ""
    table.add_row(
        "UNet + TE", f"{result.unet_steps} steps ({result.unet_steps_per_second:.2f}/s), {loss}{val}"
    )
    j = result.judge
    if j is not None:
        table.add_row(
            "judge scores",
            f"background {j.background:.2f}, foreground {j.foreground:.2f}, shape {j.shape:.2f} "
            f"(chance {j.chance_background:.2f} / {j.chance_foreground:.2f} / {j.chance_shape:.2f})",
        )
        table.add_row(
            "judge accuracy",
            f"bg {j.background_accuracy:.0%}, fg {j.foreground_accuracy:.0%}, shape {j.shape_accuracy:.0%}, "
            f"all three {j.accuracy:.0%}, circle vs square {j.circle_square:.0%}",
        )
    table.add_row("run record", str(result.record_dir))
    table.add_row("workdir", f"{result.workdir} (checkpoints; safe to delete)")
    out.print(table)
