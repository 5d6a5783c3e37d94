"""`wb train`, `wb recipe ...` and `wb runs diff`: parse options, call one library function, print.

Registered in workbench/cli.py (see docs/train.md); `train` and `runs_diff` are plain functions that
the registration wraps with `friendly`, the `recipe_app` commands wrap themselves (through the same
`workbench.cli.friendly`, looked up when called so this module does not import workbench.cli).
Nothing heavy is imported at module level: `wb --help` stays instant.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path

import typer
from rich.table import Table

from workbench.checkpoint.files import refuse_overwrite
from workbench.console import err, friendly, out
from workbench.errors import WorkbenchError

recipe_app = typer.Typer(
    help="Training recipes: show one resolved, or import an EveryDream2 train.json.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
    for component, text in getattr(imported, "schedules", {}).items():
        err.print(f"{component}: {text}", highlight=False, soft_wrap=True)
    if imported.unsupported:
        listed = ", ".join(imported.unsupported)
        err.print(
            f"[yellow]warning:[/] trained differently from EveryDream2 (wb cannot do it): {listed}",
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
    resume: Path = typer.Option(
        None, "--resume", metavar="RUNDIR", help="Continue an interrupted run from its state/ folder."
    ),
    processes: int = typer.Option(
        1, "--processes", min=1, help="Train in N processes (GPUs, or CPU processes) through accelerate."
    ),
) -> None:
    """Fine-tune a Stable Diffusion checkpoint as a recipe says, into a new run folder.

    The folder gets run.json (resolved recipe, versions, device, data fingerprint), split.json,
    metrics.jsonl, TensorBoard events and checkpoints/NAME-epNN-gsNNNNN.safetensors. Ctrl-C saves
    a checkpoint and a resumable state; `wb train --resume RUNDIR` continues exactly from there.
    `--processes N` trains N x batch_size examples per step, each process its share (docs/train.md).
    """
    overrides = list(overrides or [])
    if resume is not None:
        from workbench.train.loop import resume_training

        if recipe is not None or ed2 is not None or overrides or output is not None:
            raise WorkbenchError(
                "--resume: continues the run with the recipe its run.json records; "
                "give no recipe, --ed2, --set or -o with it"
            )
        result = _run(resume_training, (resume,), processes, _recorded_recipe(resume))
        _print_result(result)
        return
    r, source, imported = _load(recipe, ed2, overrides)
    _print_import_notes(imported)
    if r.network is not None:
        from workbench.train.network import alpha_warning

        warning = alpha_warning(r.network)
        if warning:
            err.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if output is None:
        stem = (recipe or ed2).stem
        output = Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    from workbench.train.loop import train as run_training  # torch: after the recipe was checked

    result = _run(functools.partial(run_training, source=source), (r, output), processes, r)
    _print_result(result)


def _run(fn, args: tuple, processes: int, recipe):
    """fn(*args, progress=...) here, or in `processes` processes (distributed.launch); under a
    launcher (`accelerate launch`, torchrun) only the main process shows progress and results."""
    from workbench.train.distributed import is_worker, launch

    if os.environ.get("WORLD_SIZE", "1") != "1":
        if processes != 1:
            raise WorkbenchError("--processes: already started by a launcher (accelerate launch, torchrun)")
        if is_worker():
            return fn(*args)
    if processes == 1:
        return _with_progress(lambda update: fn(*args, progress=update))
    import torch

    cpu = recipe is None or recipe.training.device == "cpu" or not torch.cuda.is_available()
    # CPU processes are forked (they start in a second, not re-importing torch); with no thread
    # running here then (the bar refreshes on updates only). GPU processes are spawned, as CUDA needs.
    start = "fork" if cpu else "spawn"
    return _with_progress(
        lambda update: launch(fn, args, processes, cpu=cpu, progress=update, start_method=start),
        refresh_thread=False,
    )


def _recorded_recipe(run_dir: Path):
    from workbench.train.recipe import parse_recipe
    from workbench.train.runs import read_run

    try:
        return parse_recipe(read_run(run_dir)["recipe"], str(run_dir / "run.json"))
    except (WorkbenchError, KeyError):
        return None  # resume_training says what is wrong


def _with_progress(run, refresh_thread: bool = True):
    """Call run(update) under a progress bar that shows step, epoch and the latest losses."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False, auto_refresh=refresh_thread) as bar:
        task = bar.add_task("training", total=None, status="starting")
        shown = {"loss": "", "val": "", "any": ""}

        def update(p) -> None:
            shown["any"] = "yes"
            if p.loss is not None:
                shown["loss"] = f"loss {p.loss:.4f}"
            if p.val_loss is not None:
                shown["val"] = f"val {p.val_loss:.4f}"
            status = "  ".join(s for s in (f"ep {p.epoch}", shown["loss"], shown["val"]) if s)
            bar.update(task, total=p.total_steps, completed=p.step, status=status, refresh=not refresh_thread)

        try:
            return run(update)
        except BaseException:
            if not shown["any"]:  # refused while setting up: the error's one line stands alone
                bar.live.transient = True
            raise


def _print_result(result) -> None:
    from workbench.train.distributed import is_worker

    if result is None or is_worker():  # (a launcher's other processes: the main one reports)
        return
    table = Table(title=f"run {result.run_dir}", title_justify="left", show_header=False)
    table.add_column("what", style="dim")
    table.add_column("value")
    table.add_row("steps", f"{result.steps} of {result.total_steps} ({result.epochs} epochs started)")
    if result.resumed_from is not None:
        table.add_row("resumed", f"from step {result.resumed_from}")
    table.add_row("time", f"{result.seconds:.1f} s, {result.steps_per_second:.2f} optimizer steps/s")
    if result.last_loss is not None:
        table.add_row("last loss/train", f"{result.last_loss:.5f}")
    if result.val_losses:
        step, loss = result.val_losses[-1]
        table.add_row("loss/val", f"{loss:.5f} at step {step} ({len(result.val_losses)} evaluations)")
    if result.checkpoints:
        table.add_row("checkpoint", str(result.checkpoints[-1]))
    if result.ema_checkpoints:
        table.add_row("EMA checkpoint", str(result.ema_checkpoints[-1]))
    if (result.run_dir / "index.html").is_file():
        table.add_row("report", str(result.run_dir / "index.html"))
    out.print(table)
    for warning in result.data_warnings:  # also in run.json's data.skipped_files / data.notes
        err.print(f"[yellow]warning:[/] data: {warning}", highlight=False, soft_wrap=True)
    if result.stopped == "nan":
        raise WorkbenchError(result.message)
    if result.stopped == "interrupted":
        err.print(f"[yellow]{result.message}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(130)  # the shell's code for "stopped by Ctrl-C"
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
@friendly
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
@friendly
def recipe_from_ed2(
    train_json: Path = typer.Argument(..., metavar="TRAIN.json", help="EveryDream2's train.json."),
    output: Path = typer.Option(..., "-o", "--output", help="The recipe YAML to write."),
) -> None:
    """Convert an EveryDream2 train.json (with its optimizer_config and validation_config files,
    read from beside it) into a wb recipe. Keys wb cannot honour are listed, never dropped silently."""
    from workbench.train.ed2 import import_ed2, write_recipe

    refuse_overwrite(output, [("the ED2 file", train_json)])  # before reading it
    imported = import_ed2(train_json)
    path = write_recipe(imported, output)  # refuses -o onto any other file it read
    _print_import_notes(imported, path)
    out.print(f"wrote [bold]{path}[/] (from {train_json}; check it with wb recipe show {path})")


LR_FIND_HELP = {
    "lr_min": "Where the ramp starts (default 0; with --log, lr-max / 1000).",
    "lr_max": "Where it ends: a value known to be too high (default 3e-6).",
    "steps": "Optimizer steps the ramp takes (default 400).",
    "val_every": "Evaluate every N steps (default steps / 40: 10 for 400 steps).",
    "log": "Ramp the lr log-linearly (evenly in log lr) instead of linearly.",
    "component": "What trains and ramps: unet, text_encoder or both (default: what the recipe trains).",
    "output": "The new folder (default runs/NAME-lr-find-TIME; with --from, RUNDIR itself).",
    "from": "Analyze an existing run (its metrics.jsonl) instead of training.",
    "write_recipe": "Write the recipe with a constant lr at the suggestion (see --pick).",
    "pick": "The suggestion --write-recipe uses: midpoint (seed 003's), valley, steep or minimum.",
    "force": "With --write-recipe: write it even when a bound was not seen (the range's edge stands in).",
}


def lr_find(
    recipe: Path = typer.Argument(None, metavar="RECIPE.yaml", help="The recipe to find an lr for."),
    lr_min: float = typer.Option(None, "--lr-min", help=LR_FIND_HELP["lr_min"]),
    lr_max: float = typer.Option(None, "--lr-max", help=LR_FIND_HELP["lr_max"]),
    steps: int = typer.Option(None, "--steps", help=LR_FIND_HELP["steps"]),
    val_every: int = typer.Option(None, "--val-every", help=LR_FIND_HELP["val_every"]),
    log: bool = typer.Option(False, "--log", help=LR_FIND_HELP["log"]),
    component: str = typer.Option(None, "--component", help=LR_FIND_HELP["component"]),
    overrides: list[str] = typer.Option(None, "--set", help=SET_HELP),
    output: Path = typer.Option(None, "-o", "--output", help=LR_FIND_HELP["output"]),
    from_run: Path = typer.Option(None, "--from", metavar="RUNDIR", help=LR_FIND_HELP["from"]),
    write_recipe: Path = typer.Option(
        None, "--write-recipe", metavar="OUT.yaml", help=LR_FIND_HELP["write_recipe"]
    ),
    pick: str = typer.Option("midpoint", "--pick", help=LR_FIND_HELP["pick"]),
    force: bool = typer.Option(False, "--force", help=LR_FIND_HELP["force"]),
) -> None:
    """LR range test: ramp the lr from --lr-min to --lr-max over a short run, evaluating the
    deterministic validation loss every --val-every steps, and find the bounds automatically.

    Writes DIR/lr_find.png, DIR/lr_find.json and DIR/index.html (and the run's own records; no
    checkpoints). Stops early once the loss diverges (over 4x the best). See docs/lr_find.md.
    """
    from workbench.train import lr_find as lf

    if pick not in lf.PICKS:
        raise WorkbenchError(f"--pick {pick}: choose one of {', '.join(lf.PICKS)}")
    reads = [("the recipe", recipe), ("the run record", from_run / "run.json" if from_run else None)]
    if write_recipe is not None:  # refused now, not after minutes of range test
        refuse_overwrite(write_recipe, reads)
    started = time.time()
    if from_run is not None:
        if recipe is not None:
            raise WorkbenchError("give RECIPE.yaml or --from RUNDIR, not both")
        given = {"--lr-min": lr_min, "--lr-max": lr_max, "--steps": steps, "--val-every": val_every,
                 "--component": component, "--set": overrides or None, "--log": log or None}  # fmt: skip
        for flag, value in given.items():
            if value is not None:
                raise WorkbenchError(f"{flag}: only with RECIPE.yaml (--from reads a finished run)")
        finding = lf.analyze_run(from_run)
        out_dir = output or from_run
        base = None  # read from run.json only when a recipe is written
        test_record = lf.range_test_record(from_run) or {}
        extra: dict = {"from": str(from_run)}
        if test_record:
            extra["test"] = {k: v for k, v in test_record.items() if k != "recipe"}
    else:
        if recipe is None:
            raise WorkbenchError("give RECIPE.yaml to run a range test, or --from RUNDIR to read one")
        from workbench.train.recipe import load_recipe

        overrides = list(overrides or [])
        lr_max = 3e-6 if lr_max is None else lr_max
        if lr_min is None:
            lr_min = lr_max / 1000 if log else 0.0
        steps = 400 if steps is None else steps
        val_every = max(1, round(steps / 40)) if val_every is None else val_every
        test = lf.RangeTest(lr_min, lr_max, steps, val_every, log, component or "both")
        test.check()  # before loading anything: a bad flag is one line, at once
        r = load_recipe(recipe, overrides)
        test.component = component or lf.default_component(r)
        out_dir = output or Path("runs") / f"{recipe.stem}-lr-find-{time.strftime('%Y%m%d-%H%M%S')}"
        source = {"recipe": str(recipe), "overrides": overrides}
        result, finding = _run_range_test(lf, r, test, out_dir, source)
        for warning in result.data_warnings:  # files skipped, data settings ignored
            err.print(f"[yellow]warning:[/] data: {warning}", highlight=False, soft_wrap=True)
        base = r.to_dict()
        extra = {
            "recipe": str(recipe),
            "overrides": overrides,
            "test": dataclasses.asdict(test),
            "stopped": result.message if result.stopped else None,
            "seconds": round(result.seconds, 1),
        }
    paths = lf.write_report(finding, out_dir, extra)
    _print_finding(finding, pick)
    seconds = time.time() - started
    out.print(f"wrote [bold]{paths['png']}[/], {paths['json'].name}, {paths['html'].name} ({seconds:.0f} s)")
    if write_recipe is not None:
        if not finding.found and not force:
            raise WorkbenchError(
                f"--write-recipe {write_recipe}: nothing written: {finding.message} (or --force)"
            )
        lr, forced_note = finding.forced(pick) if force else (finding.suggestion(pick), "")
        if forced_note:
            err.print(f"[yellow]warning:[/] {forced_note}", highlight=False, soft_wrap=True)
        base = base if base is not None else lf.base_recipe_of(from_run)
        component = finding.component if finding.component in lf.COMPONENTS else "unet"
        written = lf.recipe_at(base, lr, component, str(write_recipe))
        shown, low, high = (lf.format_lr(v) for v in (lr, finding.lower, finding.upper))
        note = (
            f"written by wb lr-find from {recipe or from_run}: constant lr {shown} for {component}\n"
            f"({pick}; lower {low}, upper {high}){'; ' + forced_note if forced_note else ''}"
        )
        path = lf.write_recipe(write_recipe, written, note, reads)
        out.print(f"wrote [bold]{path}[/]: constant lr {shown} ({pick}) for {component}")


def _run_range_test(lf, recipe, test, out_dir: Path, source: dict):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}"), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=err, transient=False) as bar:
        task = bar.add_task("lr range test", total=test.steps, status="starting")

        def update(p) -> None:
            status = f"val {p.val_loss:.4f}" if p.val_loss is not None else None
            bar.update(task, total=p.total_steps, completed=p.step, **({"status": status} if status else {}))

        return lf.run_range_test(recipe, test, out_dir, progress=update, source=source)


def _print_finding(finding, pick: str) -> None:
    from workbench.train.lr_find import MEANINGS, format_lr

    title = f"LR range test: {finding.metric} against lr ({finding.axis} ramp, {len(finding.lrs)} points)"
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column("lr", justify="right")
    table.add_column("what it is", style="dim")
    for name in ("lower", "upper", "midpoint", "valley", "steep", "minimum"):
        value = getattr(finding, name)
        shown = format_lr(value)
        label = f"[bold green]{name} *[/]" if name == pick and value is not None else name
        meaning = MEANINGS[name]
        if name == "upper" and finding.upper_reason:
            meaning += f" ({finding.upper_reason})"
        if name in ("lower", "upper") and value is None and finding.upper_reason:
            shown = "not seen"
        table.add_row(label, shown, meaning)
    out.print(table)
    style = "bold" if finding.found else "bold yellow"
    out.print(f"[{style}]{finding.message}[/]", highlight=False)
    for note in finding.notes:
        out.print(f"[dim]note: {note}[/]", highlight=False, soft_wrap=True)
