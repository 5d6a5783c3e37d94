"""`wb merge ...`: the Typer sub-app. Each command builds a recipe, calls the engine, prints a summary.

Registered in workbench/cli.py with `app.add_typer(merge_app, name="merge")`. Errors from the library
(WorkbenchError) become one red line and exit code 2, as everywhere in wb.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from workbench.console import err, friendly, human_bytes, out
from workbench.errors import WorkbenchError

merge_app = typer.Typer(
    help="Merge checkpoints, streaming key by key at constant memory. Alpha is the share of B, as in "
    "A1111: 0 keeps A, 1 gives B (ComfyUI's ModelMergeSimple ratio means the opposite).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


ALPHA_HELP = (
    "Share of B, as in A1111: 0 keeps A, 1 gives B. (ComfyUI's ModelMergeSimple ratio is the "
    "share of A: the opposite.)"
)


# ---------------------------------------------------------------------------------------------------
# options shared by every method command


def _output_opt():
    return typer.Option(..., "-o", "--output", help="The merged .safetensors file to write (never an input).")


def _unet_opt():
    return typer.Option(None, "--unet-alpha", help="Weight for the UNet only (default: the method's weight).")


def _te_opt():
    return typer.Option(
        None, "--te-alpha", help="Weight for the text encoder(s) only (default: the method's)."
    )


def _vae_opt():
    return typer.Option(None, "--vae-alpha", help="Merge the VAE with this weight (default: the method's).")


def _blocks_opt():
    return typer.Option(
        None,
        "--blocks",
        help="Block weights overriding the UNet's weight per block: 26 comma-separated numbers for SD1/SD2 "
        "(BASE, IN00..IN11, M00, OUT00..OUT11), 20 for SDXL (BASE, IN00..IN08, M00, OUT00..OUT08). BASE also "
        "weighs the text encoder and time_embed.",
    )


def _dtype_opt(default: str | None = "fp16"):
    return typer.Option(
        default,
        "--dtype",
        help="Output dtype of float tensors: fp16, bf16 or fp32 "
        "(merging is always done in float32; integer tensors are never cast).",
    )


def _vae_from_opt():
    return typer.Option(
        "merge", "--vae-from",
        help="merge (default, A1111's key set: every key named *model*, the VAE and EMA included) or A "
        "(copy the VAE, EMA and buffers from A unless --vae-alpha, wb's earlier default).",
    )  # fmt: skip


def _discard_opt():
    return typer.Option(
        None, "--discard", help="Leave out every key matching this regular expression (A1111's "
        "\"Discard weights with matching name\"), e.g. '^model_ema\\.'.",
    )  # fmt: skip


def _threads_opt():
    return typer.Option(
        2, "--threads", min=1, help="Threads: N workers each read, compute and write keys (1: in turn)."
    )


def _dry_opt():
    return typer.Option(
        False,
        "--dry-run",
        help="Print the plan (inputs, hashes, architecture, keys merged / "
        "copied / missing / dropped, output size) and read no tensor data.",
    )


def _parse_blocks(text: str | None) -> list[float] | None:
    if text is None:
        return None
    from workbench.merge.blocks import parse_blocks

    return parse_blocks(text, None)


def _command_line(name: str, args: list, options: dict) -> str:
    parts = ["wb", "merge", name, *map(str, args)]
    for k, v in options.items():
        if v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        parts += [flag] if v is True else [flag, str(v)]
    return shlex.join(parts)


COMMON_OPTIONS = (
    "output", "unet_alpha", "te_alpha", "vae_alpha", "blocks", "dtype", "threads", "dry_run",
    "vae_from", "discard",
)  # fmt: skip


def _common(values: dict) -> dict:
    """The options every method command has, picked from the command's locals()."""
    return {k: values[k] for k in COMMON_OPTIONS}


def _merge_command(
    name: str,
    paths: list[Path],
    params: dict[str, float],
    *,
    output: Path,
    unet_alpha: float | None,
    te_alpha: float | None,
    vae_alpha: float | None,
    blocks: str | None,
    dtype: str,
    threads: int,
    dry_run: bool,
    vae_from: str = "merge",
    discard: str | None = None,
) -> None:
    from workbench.merge.recipe import single_step

    recipe = single_step(
        name,
        [str(p) for p in paths],
        params,
        {"unet": unet_alpha, "text_encoder": te_alpha, "vae": vae_alpha},
        _parse_blocks(blocks),
        dtype,
        vae_from,
        discard,
    )
    options = {
        **params,
        "unet_alpha": unet_alpha,
        "te_alpha": te_alpha,
        "vae_alpha": vae_alpha,
        "blocks": blocks,
        "dtype": dtype,
        "vae_from": None if vae_from == "merge" else vae_from,
        "discard": discard,
    }
    _run(recipe, output, threads, dry_run, _command_line(name, [*paths, "-o", output], options))


def _run(recipe, output: Path, threads: int, dry_run: bool, command: str, reads=()) -> None:
    from workbench.merge.plan import plan_merge  # no torch yet: bad inputs are refused first

    plan = plan_merge(recipe, output, reads=reads)
    try:
        if dry_run:
            _print_plan(plan, output)
        else:
            _execute(plan, output, threads, command)
    finally:
        plan.close()


def _execute(plan, output: Path, threads: int, command: str) -> None:
    from workbench.merge.engine import execute

    with Progress(
        TextColumn("[bold]merging[/]"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("merge", total=plan.out_bytes)
        result = execute(plan, output, threads, lambda done, total: bar.update(task, completed=done), command)
    _print_result(result)


def _print_plan(plan, output: Path) -> None:
    from workbench.merge.methods import get_method

    table = Table(title="inputs", title_justify="left")
    for col in ("name", "path", "architecture", "size", "sha256"):
        table.add_column(col)
    for src in plan.sources.values():
        variants = f" ({', '.join(src.variants)})" if src.variants else ""
        table.add_row(
            src.name,
            str(src.path),
            f"{src.architecture}{variants}",
            human_bytes(src.size),
            (src.sha256 or "")[:10],
        )
    out.print(table)
    # Every step in one plain Text, printed once: a 1,500-step recipe prints in about 0.1 s (a
    # print per line, with markup parsed, lines wrapped and the names in bold, took 1.5 s).
    lines = []
    for step in plan.recipe.steps:
        method = get_method(step.method)
        params = ", ".join(f"{k} {v:g}" for k, v in step.params.items())
        comps = "".join(f", {k} {v:g}" for k, v in step.components.items())
        blocks = f", blocks {','.join(f'{v:g}' for v in step.blocks)}" if step.blocks else ""
        lines.append(f"step {step.name}: {method.name}({', '.join(step.inputs)}) = {method.formula}")
        lines.append(f"  {params}{comps}{blocks}")
    out.print(Text("\n".join(lines)), soft_wrap=True, highlight=False)
    comp = Table(title="keys", title_justify="left")
    for col in ("component", "merged", "copied from A", "integer (kept)", "position_ids"):
        comp.add_column(col, justify="left" if col == "component" else "right")
    for name, row in sorted(plan.by_component().items()):
        comp.add_row(name, str(row["merge"]), str(row["copy"]), str(row["int"]), str(row["position_ids"]))
    out.print(comp)
    _print_lists(plan)
    out.print(
        f"output [bold]{output}[/]: {plan.architecture} ({plan.layout} layout), {plan.recipe.dtype}, "
        f"{len(plan.keys)} keys, {human_bytes(plan.out_bytes)} of tensors"
    )
    out.print("[dim]dry run: no tensor data was read, nothing was written[/]")


def _print_lists(plan) -> None:
    if plan.missing:
        first = ", ".join(f"{k} ({'/'.join(v)})" for k, v in list(plan.missing.items())[:3])
        out.print(
            f"[yellow]{len(plan.missing)} keys missing from some inputs, copied from A:[/] {first}"
            + (" ..." if len(plan.missing) > 3 else "")
        )
    if plan.dropped:
        first = ", ".join(f"{k} ({'/'.join(v)})" for k, v in list(plan.dropped.items())[:3])
        out.print(
            f"[yellow]{len(plan.dropped)} keys not in A, dropped:[/] {first}"
            + (" ..." if len(plan.dropped) > 3 else "")
        )
    if plan.partial:
        out.print(
            f"inpainting/pix2pix A: input channels of {', '.join(plan.partial)} merged only where B has them"
        )


def _print_result(result) -> None:
    plan = result.plan
    speed = result.bytes / result.seconds / 1e9 if result.seconds else 0
    out.print(
        f"wrote [bold]{result.path}[/] ({human_bytes(result.bytes)}, {plan.recipe.dtype}) in "
        f"{result.seconds:.1f} s ({speed:.2f} GB/s): {plan.count('merge')} keys merged, "
        f"{plan.count('copy')} copied from A, {plan.count('int') + plan.count('position_ids')} integer kept"
    )
    _print_lists(plan)
    if result.position_ids_reset:
        out.print(
            f"[yellow]reset to arange:[/] {', '.join(result.position_ids_reset)} (A's was float or broken)"
        )


# ---------------------------------------------------------------------------------------------------
# commands


@merge_app.command("weighted")
@friendly
def weighted(
    a: Path = typer.Argument(..., help="Model A."),
    b: Path = typer.Argument(..., help="Model B."),
    output: Path = _output_opt(),
    alpha: float = typer.Option(0.5, "--alpha", help=ALPHA_HELP),
    unet_alpha: float | None = _unet_opt(),
    te_alpha: float | None = _te_opt(),
    vae_alpha: float | None = _vae_opt(),
    blocks: str | None = _blocks_opt(),
    dtype: str = _dtype_opt(),
    threads: int = _threads_opt(),
    dry_run: bool = _dry_opt(),
    vae_from: str = _vae_from_opt(),
    discard: str | None = _discard_opt(),
) -> None:
    """Weighted sum: (1 - alpha) * A + alpha * B. Alpha is the share of B, as in A1111."""
    _merge_command("weighted", [a, b], {"alpha": alpha}, **_common(locals()))


@merge_app.command("add-diff")
@friendly
def add_diff(
    a: Path = typer.Argument(..., help="Model A, that the difference is added to."),
    b: Path = typer.Argument(..., help="Model B."),
    c: Path = typer.Argument(..., help="Model C, subtracted from B."),
    output: Path = _output_opt(),
    alpha: float = typer.Option(1.0, "--alpha", help="Multiplier of the difference B - C."),
    unet_alpha: float | None = _unet_opt(),
    te_alpha: float | None = _te_opt(),
    vae_alpha: float | None = _vae_opt(),
    blocks: str | None = _blocks_opt(),
    dtype: str = _dtype_opt(),
    threads: int = _threads_opt(),
    dry_run: bool = _dry_opt(),
    vae_from: str = _vae_from_opt(),
    discard: str | None = _discard_opt(),
) -> None:
    """Add difference: A + alpha * (B - C)."""
    _merge_command("add-diff", [a, b, c], {"alpha": alpha}, **_common(locals()))


@merge_app.command("triple-sum")
@friendly
def triple_sum(
    a: Path = typer.Argument(..., help="Model A."),
    b: Path = typer.Argument(..., help="Model B."),
    c: Path = typer.Argument(..., help="Model C."),
    output: Path = _output_opt(),
    alpha: float = typer.Option(0.33, "--alpha", help="Share of B."),
    beta: float = typer.Option(0.33, "--beta", help="Share of C."),
    unet_alpha: float | None = _unet_opt(),
    te_alpha: float | None = _te_opt(),
    vae_alpha: float | None = _vae_opt(),
    blocks: str | None = _blocks_opt(),
    dtype: str = _dtype_opt(),
    threads: int = _threads_opt(),
    dry_run: bool = _dry_opt(),
    vae_from: str = _vae_from_opt(),
    discard: str | None = _discard_opt(),
) -> None:
    """Triple sum: (1 - alpha - beta) * A + alpha * B + beta * C."""
    _merge_command("triple-sum", [a, b, c], {"alpha": alpha, "beta": beta}, **_common(locals()))


@merge_app.command("sum-twice")
@friendly
def sum_twice(
    a: Path = typer.Argument(..., help="Model A."),
    b: Path = typer.Argument(..., help="Model B."),
    c: Path = typer.Argument(..., help="Model C."),
    output: Path = _output_opt(),
    alpha: float = typer.Option(0.5, "--alpha", help="Share of B in the first sum."),
    beta: float = typer.Option(0.5, "--beta", help="Share of C in the second sum."),
    unet_alpha: float | None = _unet_opt(),
    te_alpha: float | None = _te_opt(),
    vae_alpha: float | None = _vae_opt(),
    blocks: str | None = _blocks_opt(),
    dtype: str = _dtype_opt(),
    threads: int = _threads_opt(),
    dry_run: bool = _dry_opt(),
    vae_from: str = _vae_from_opt(),
    discard: str | None = _discard_opt(),
) -> None:
    """Sum twice: (1 - beta) * ((1 - alpha) * A + alpha * B) + beta * C."""
    _merge_command("sum-twice", [a, b, c], {"alpha": alpha, "beta": beta}, **_common(locals()))


@merge_app.command("slerp")
@friendly
def slerp(
    a: Path = typer.Argument(..., help="Model A."),
    b: Path = typer.Argument(..., help="Model B."),
    output: Path = _output_opt(),
    alpha: float = typer.Option(0.5, "--alpha", help=ALPHA_HELP),
    unet_alpha: float | None = _unet_opt(),
    te_alpha: float | None = _te_opt(),
    vae_alpha: float | None = _vae_opt(),
    blocks: str | None = _blocks_opt(),
    dtype: str = _dtype_opt(),
    threads: int = _threads_opt(),
    dry_run: bool = _dry_opt(),
    vae_from: str = _vae_from_opt(),
    discard: str | None = _discard_opt(),
) -> None:
    """Spherical interpolation per tensor; alpha is the share of B."""
    _merge_command("slerp", [a, b], {"alpha": alpha}, **_common(locals()))


@merge_app.command("ties")
@friendly
def ties(
    base: Path = typer.Argument(..., help="The base model the deltas are taken against (e.g. SD1.5)."),
    models: list[Path] = typer.Argument(..., help="Fine-tuned models whose deltas are merged."),
    output: Path = _output_opt(),
    density: float = typer.Option(0.2, "--density", help="Share of each delta's largest entries kept."),
    lam: float = typer.Option(1.0, "--lambda", help="Scale of the merged delta added to the base."),
    unet_alpha: float | None = _unet_opt(),
    te_alpha: float | None = _te_opt(),
    vae_alpha: float | None = _vae_opt(),
    blocks: str | None = _blocks_opt(),
    dtype: str = _dtype_opt(),
    threads: int = _threads_opt(),
    dry_run: bool = _dry_opt(),
    vae_from: str = _vae_from_opt(),
    discard: str | None = _discard_opt(),
) -> None:
    """TIES-merging: trim each delta to its top density, elect signs, average the agreeing entries.

    Per-component and block weights override --lambda."""
    _merge_command("ties", [base, *models], {"density": density, "lambda": lam}, **_common(locals()))


@merge_app.command("dare")
@friendly
def dare(
    base: Path = typer.Argument(..., help="The base model the deltas are taken against."),
    models: list[Path] = typer.Argument(..., help="Fine-tuned models whose deltas are added."),
    output: Path = _output_opt(),
    drop: float = typer.Option(0.5, "--drop", help="Probability of dropping each delta entry."),
    lam: float = typer.Option(1.0, "--lambda", help="Scale of the summed deltas added to the base."),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the drop masks (per key: thread order never matters)."
    ),
    unet_alpha: float | None = _unet_opt(),
    te_alpha: float | None = _te_opt(),
    vae_alpha: float | None = _vae_opt(),
    blocks: str | None = _blocks_opt(),
    dtype: str = _dtype_opt(),
    threads: int = _threads_opt(),
    dry_run: bool = _dry_opt(),
    vae_from: str = _vae_from_opt(),
    discard: str | None = _discard_opt(),
) -> None:
    """DARE: drop delta entries at random, rescale the rest by 1 / (1 - drop), add them to the base.

    Per-component and block weights override --lambda."""
    _merge_command("dare", [base, *models], {"drop": drop, "lambda": lam, "seed": seed}, **_common(locals()))


@merge_app.command("run")
@friendly
def run(
    recipe_path: Path = typer.Argument(..., metavar="RECIPE.yaml", help="A merge recipe (see recipes/)."),
    output: Path | None = typer.Option(
        None, "-o", "--output", help="Output file (default: the recipe's output.path)."
    ),
    step: str | None = typer.Option(None, "--step", help="Write this step instead of the recipe's output."),
    inputs: list[str] | None = typer.Option(None, "--input", help="NAME=PATH: replace an input's path."),
    dtype: str | None = _dtype_opt(None),
    threads: int = _threads_opt(),
    dry_run: bool = _dry_opt(),
) -> None:
    """Run a merge graph from YAML: named inputs, named steps, one output; streamed key by key, with no
    intermediate file."""
    from workbench.merge.recipe import load_yaml, validate

    overrides = {}
    for item in inputs or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise WorkbenchError(f"--input {item!r}: expected NAME=PATH")
        overrides[name] = path
    recipe, recipe_out = load_yaml(recipe_path, overrides, step)
    if dtype is not None:
        recipe.dtype = dtype
        recipe = validate(recipe, "--dtype")
    target = output or (Path(recipe_out) if recipe_out else None)
    if target is None:
        raise WorkbenchError(f"{recipe_path}: no output path: give -o OUT or output.path in the recipe")
    opts = {"output": target, "step": step, "dtype": dtype}
    command = _command_line("run", [recipe_path], opts) + "".join(
        f" --input {shlex.quote(i)}" for i in inputs or []
    )
    _run(recipe, target, threads, dry_run, command, reads=[("the recipe", recipe_path)])


@merge_app.command("replay")
@friendly
def replay(
    merged: Path = typer.Argument(..., help="A file merged by wb (it carries its recipe)."),
    output: Path = _output_opt(),
    search: list[Path] | None = typer.Option(
        None, "--search", help="Folder to look for moved inputs in, by sha256 (repeatable)."
    ),
    threads: int = _threads_opt(),
    dry_run: bool = _dry_opt(),
) -> None:
    """Re-run the recipe recorded in a merged file, bit-identically; inputs are found by path or sha256."""
    from workbench.checkpoint.files import refuse_overwrite
    from workbench.merge.replay import replay_recipe

    refuse_overwrite(output, [("the merged file replayed", merged)])  # before hashing any input
    recipe = replay_recipe(merged, search or [])
    command = _command_line("replay", [merged], {"output": output})
    _run(recipe, output, threads, dry_run, command, reads=[("the merged file replayed", merged)])


@merge_app.command("copy")
@friendly
def copy(
    a: Path = typer.Argument(..., help="Model A, copied."),
    output: Path = _output_opt(),
    bake_vae: Path | None = typer.Option(
        None, "--bake-vae", help="A VAE file (or a checkpoint) whose VAE replaces A's, as A1111 bakes it in."
    ),
    prune_ema: bool = typer.Option(False, "--prune-ema", help="Leave out the EMA weights (model_ema.*)."),
    dtype: str | None = typer.Option(
        None, "--dtype", help="fp16 or bf16: float32 tensors converted (A1111's rule); fp32: every float."
    ),
    discard: str | None = _discard_opt(),
) -> None:
    """A1111's "No interpolation": copy A, optionally baking in a VAE, pruning the EMA, converting dtypes."""
    from workbench.merge.copy import copy_checkpoint

    options = {"output": output, "bake_vae": bake_vae, "prune_ema": prune_ema, "dtype": dtype,
               "discard": discard}  # fmt: skip
    command = _command_line("copy", [a], options)
    result = copy_checkpoint(a, output, bake_vae, prune_ema, dtype, discard, command)
    out.print(
        f"wrote [bold]{result.path}[/] ({human_bytes(result.bytes)}): {result.keys} keys, "
        f"{result.baked} VAE tensors baked in, {result.cast} converted, {len(result.dropped)} left out",
        highlight=False,
    )
