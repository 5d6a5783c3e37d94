"""`wb train`, `wb recipe ...` and `wb runs diff`: parse options, call one library function, print.

Registered in workbench/cli.py (see docs/train.md); `train` and `runs_diff` are plain functions that
the registration wraps with `friendly`, the `recipe_app` commands wrap themselves (through the same
`workbench.cli.friendly`, looked up when called so this module does not import workbench.cli).
Nothing heavy is imported at module level: `wb --help` stays instant.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from workbench.errors import WorkbenchError

out = Console()
err = Console(stderr=True)

recipe_app = typer.Typer(
    help="Training recipes: show one resolved, or import an EveryDream2 train.json.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _friendly(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from workbench.cli import friendly

        return friendly(fn)(*args, **kwargs)

    return wrapper


SET_HELP = "Override a recipe field: --set training.max_steps=40 (the value is YAML). Repeatable."


def _load(recipe: Path | None, ed2: Path | None, overrides: list[str]):
    """(Recipe, source record, import warnings) from a recipe file or an EveryDream2 train.json."""
    from workbench.train.recipe import load_recipe, parse_recipe

    if (recipe is None) == (ed2 is None):
        raise WorkbenchError("give a recipe file or --ed2 train.json (one of them)")
    if ed2 is not None:
        from workbench.train.ed2 import import_ed2

        imported = import_ed2(ed2)
        r = parse_recipe(imported.recipe, str(ed2), overrides)
        return r, {"ed2": str(ed2), "overrides": overrides}, imported
    return load_recipe(recipe, overrides), {"recipe": str(recipe), "overrides": overrides}, None


def _print_import_notes(imported, written: Path | None = None) -> None:
    """Unsupported keys as a warning (they would change training), notes, and a count of the keys
    that have no effect in wb (listed in full at the top of the written recipe)."""
    if imported is None:
        return
    if imported.unsupported:
        listed = ", ".join(imported.unsupported)
        err.print(
            f"[yellow]warning:[/] not imported (wb has no equivalent yet): {listed}",
            highlight=False,
            soft_wrap=True,
        )
    for note in imported.notes:
        err.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    if imported.ignored:
        keys = ", ".join(item.split("=", 1)[0] for item in imported.ignored)
        where = f" (listed with their values at the top of {written})" if written else ""
        err.print(f"[dim]ignored, no effect in wb{where}: {keys}[/]", highlight=False, soft_wrap=True)


def train(
    recipe: Path = typer.Argument(None, metavar="RECIPE.yaml", help="The training recipe (see recipes/)."),
    overrides: list[str] = typer.Option(None, "--set", help=SET_HELP),
    output: Path = typer.Option(None, "-o", "--output", help="The new run folder (default: runs/NAME-TIME)."),
    ed2: Path = typer.Option(None, "--ed2", help="Train from an EveryDream2 train.json instead of a recipe."),
) -> None:
    """Fine-tune a Stable Diffusion checkpoint as a recipe says, into a new run folder.

    The folder gets run.json (resolved recipe, versions, device, data fingerprint), split.json,
    metrics.jsonl, TensorBoard events and checkpoints/NAME-epNN-gsNNNNN.safetensors.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from workbench.train.loop import train as run_training

    overrides = list(overrides or [])
    r, source, imported = _load(recipe, ed2, overrides)
    _print_import_notes(imported)
    if output is None:
        stem = (recipe or ed2).stem
        output = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task("training", total=None, status="starting")
        shown = {"loss": "", "val": ""}

        def update(p) -> None:
            if p.loss is not None:
                shown["loss"] = f"loss {p.loss:.4f}"
            if p.val_loss is not None:
                shown["val"] = f"val {p.val_loss:.4f}"
            status = "  ".join(s for s in (f"ep {p.epoch}", shown["loss"], shown["val"]) if s)
            bar.update(task, total=p.total_steps, completed=p.step, status=status)

        result = run_training(r, output, progress=update, source=source)
    table = Table(title=f"run {result.run_dir}", title_justify="left", show_header=False)
    table.add_column("what", style="dim")
    table.add_column("value")
    table.add_row("steps", f"{result.steps} of {result.total_steps} ({result.epochs} epochs started)")
    table.add_row("time", f"{result.seconds:.1f} s, {result.steps_per_second:.2f} optimizer steps/s")
    if result.last_loss is not None:
        table.add_row("last loss/train", f"{result.last_loss:.5f}")
    if result.val_losses:
        step, loss = result.val_losses[-1]
        table.add_row("loss/val", f"{loss:.5f} at step {step} ({len(result.val_losses)} evaluations)")
    if result.checkpoints:
        table.add_row("checkpoint", str(result.checkpoints[-1]))
    out.print(table)
    if result.stopped == "nan":
        raise WorkbenchError(result.message)
    if result.stopped:
        out.print(f"[yellow]{result.message}[/]")


def runs_diff(
    run_a: Path = typer.Argument(..., metavar="RUN_A", help="A run folder (or its run.json)."),
    run_b: Path = typer.Argument(..., metavar="RUN_B", help="Another run folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the differences as JSON."),
) -> None:
    """Print every difference between two runs' records: recipe, optimizers, versions, device, data."""
    from workbench.train.runs import diff_runs

    diffs = diff_runs(run_a, run_b)
    if as_json:
        print(json.dumps([{"key": d.key, "a": d.a, "b": d.b} for d in diffs], indent=2))
        return
    if not diffs:
        out.print("no differences")
        return
    table = Table(title=f"{len(diffs)} differences", title_justify="left")
    table.add_column("key")
    table.add_column(str(run_a), overflow="fold")
    table.add_column(str(run_b), overflow="fold")
    for d in diffs:
        table.add_row(d.key, _show(d.a), _show(d.b))
    out.print(table)


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


@recipe_app.command("show")
@_friendly
def recipe_show(
    recipe: Path = typer.Argument(..., metavar="RECIPE.yaml"),
    overrides: list[str] = typer.Option(None, "--set", help=SET_HELP),
    as_json: bool = typer.Option(False, "--json", help="JSON instead of YAML."),
) -> None:
    """Validate a recipe and print it resolved (every default filled in), as run.json records it."""
    from workbench.train.recipe import load_recipe

    r = load_recipe(recipe, list(overrides or []))
    print(r.to_json() if as_json else r.to_yaml(), end="" if not as_json else "\n")


@recipe_app.command("from-ed2")
@_friendly
def recipe_from_ed2(
    train_json: Path = typer.Argument(..., metavar="TRAIN.json", help="EveryDream2's train.json."),
    output: Path = typer.Option(..., "-o", "--output", help="The recipe YAML to write."),
) -> None:
    """Convert an EveryDream2 train.json (with its optimizer_config and validation_config files,
    read from beside it) into a wb recipe. Keys wb cannot honour are listed, never dropped silently."""
    from workbench.train.ed2 import import_ed2, write_recipe

    imported = import_ed2(train_json)
    path = write_recipe(imported, output)
    _print_import_notes(imported, path)
    out.print(f"wrote [bold]{path}[/] (from {train_json}; check it with wb recipe show {path})")
