"""The `wb` command line: each command parses options, calls one library function, prints a summary.

Library code never prints; a WorkbenchError becomes one red line on stderr and exit code 2.
Heavy imports (torch, diffusers) happen inside the commands so `wb --help` stays instant.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import typer
from rich.table import Table

app = typer.Typer(
    name="wb",
    help="wb, the fine-tune workbench: inspect, train, merge, swap and judge Stable Diffusion checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
toy_app = typer.Typer(help="The tiny offline toy model that tests and the demo run on.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")

from workbench.console import err, fail, friendly, human_bytes, metadata_table, out  # noqa: E402, F401


@app.callback()
def _everywhere(
    threads: int = typer.Option(
        None,
        "--threads",
        envvar="WB_THREADS",
        metavar="N",
        help="CPU threads for torch in any command (default: torch's). On a busy machine 1 is often "
        "several times faster: torch's threads spin waiting for each other.",
    ),
) -> None:
    """Options that apply to every command: wb --threads 1 train ..."""
    if threads is None:
        return
    if threads < 1:
        fail(f"--threads {threads}: must be at least 1")
    import torch

    torch.set_num_threads(threads)


def human_count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


@app.command()
@friendly
def inspect(
    path: Path = typer.Argument(..., help="A .safetensors or .ckpt file, or a diffusers folder."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    no_hash: bool = typer.Option(False, "--no-hash", help="Skip the sha256 (reads the whole file once)."),
) -> None:
    """Tell what a checkpoint or LoRA file is: architecture (LoRA: kind, family, ranks, alphas, training
    metadata), components, dtypes, parameters, metadata and hashes."""
    from workbench.checkpoint.describe import describe
    from workbench.lora.describe import is_lora

    if is_lora(path):
        from workbench.lora.cli import print_lora_description
        from workbench.lora.describe import describe_lora

        print_lora_description(describe_lora(path, with_hash=not no_hash), as_json)
        return
    d = describe(path, with_hash=not no_hash)
    for warning in d.warnings:
        err.print(f"[yellow]warning:[/] {d.path}: metadata {warning}", highlight=False, soft_wrap=True)
    if as_json:
        sys.stdout.write(json.dumps(d.to_json(), indent=2) + "\n")
        return
    variants = f" ({', '.join(d.variants)})" if d.variants else ""
    out.print(
        f"[bold]{d.path}[/]  {d.format}, [cyan]{d.architecture}[/]{variants}, {human_bytes(d.size_bytes)}"
    )
    if d.architecture == "toy":
        out.print(f"  a small model in the {d.layout} key layout")
    if d.sha256:
        out.print(f"  sha256 {d.sha256}  AutoV2 [bold]{d.autov2}[/]")
    table = Table(title="components", title_justify="left")
    for col in ("component", "keys", "params", "size", "dtypes"):
        table.add_column(col, justify="right" if col in ("keys", "params", "size") else "left")
    for name, c in d.components.items():
        dtypes = ", ".join(f"{k} {human_count(v)}" for k, v in sorted(c.dtypes.items()))
        table.add_row(name, str(c.keys), human_count(c.params), human_bytes(c.bytes), dtypes)
    out.print(table)
    hidden = ("sd_merge_recipe", "sd_merge_models", "wb.swap")
    shown = {k: v for k, v in d.metadata.items() if k not in hidden}
    if shown:
        out.print(metadata_table("metadata", sorted(shown.items()), " ... (--json shows all)"))
    usable = d.usable_metadata()
    if "wb.swap" in usable:
        swap_table = Table(title="assembled by wb swap", title_justify="left")
        for col in ("component", "from", "sha256"):
            swap_table.add_column(col)
        for component, src in json.loads(usable["wb.swap"]).items():
            swap_table.add_row(component, src.get("path", ""), (src.get("sha256") or "")[:10])
        out.print(swap_table)
    if "wb.merge_recipe" in usable:
        from workbench.lora.cli import print_baked

        print_baked(usable)
    if d.ancestry:
        from workbench.merge.provenance import render_ancestry

        tree = render_ancestry(usable)
        if tree is not None:
            out.print(tree)


from workbench.toy.cli import toy_pretrain  # noqa: E402

toy_app.command("pretrain")(friendly(toy_pretrain))


@toy_app.command("init")
@friendly
def toy_init(
    out_path: Path = typer.Argument(
        ..., metavar="OUT.safetensors", help="Where to write the toy checkpoint."
    ),
    seed: int = typer.Option(0, help="Seed of the random initialisation."),
) -> None:
    """Write a tiny randomly initialised SD1-layout checkpoint (no GPU, no network)."""
    from workbench.toy.model import toy_init as make

    path = make(out_path, seed=seed)
    out.print(f"wrote [bold]{path}[/] (toy model, seed {seed}, {human_bytes(path.stat().st_size)})")


# Training: the commands live with the train package; registered here so `wb --help` lists them.
from workbench.train.cli import recipe_app, runs_diff  # noqa: E402
from workbench.train.cli import train as train_command  # noqa: E402

app.command("train")(friendly(train_command))
from workbench.train.cli import lr_find as lr_find_command  # noqa: E402

app.command("lr-find")(friendly(lr_find_command))
app.add_typer(recipe_app, name="recipe")
runs_app = typer.Typer(help="Training runs: compare what ran.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")
runs_app.command("diff")(friendly(runs_diff))

from workbench.grids.cli import grid  # noqa: E402
from workbench.merge.cli import merge_app  # noqa: E402

app.add_typer(merge_app, name="merge")
from workbench.lora.cli import lora_app  # noqa: E402

app.add_typer(lora_app, name="lora")

app.command("grid")(friendly(grid))

from workbench.judge.cli import judge  # noqa: E402

app.command("judge")(friendly(judge))

swap_app = typer.Typer(
    help="Swap components: the UNet of one checkpoint with the text encoder of another.",
    invoke_without_command=True,
)
app.add_typer(swap_app, name="swap")


@swap_app.callback()
@friendly
def swap(
    ctx: typer.Context,
    unet: Path = typer.Option(None, "--unet", help="Checkpoint whose UNet (and EMA) to take."),
    te: Path = typer.Option(None, "--te", help="Checkpoint whose text encoder(s) to take (SDXL: both)."),
    vae: Path = typer.Option(
        None, "--vae", help="Checkpoint whose VAE to take (default: --base, else --te)."
    ),
    base: Path = typer.Option(None, "--base", help="Checkpoint for every other key (default: --te)."),
    te_l: Path = typer.Option(None, "--te-l", help="SDXL: checkpoint whose CLIP-L text encoder to take."),
    te_g: Path = typer.Option(None, "--te-g", help="SDXL: checkpoint whose OpenCLIP-G text encoder to take."),
    output: Path = typer.Option(None, "-o", "--output", help="The checkpoint to write (.safetensors)."),
) -> None:
    """Write a checkpoint with every UNet key from --unet and every text encoder key from --te.

    Tensors are copied byte for byte; the output's metadata records the sha256 of the file each
    component came from (see `wb inspect`). `wb swap matrix` renders every UNet x TE combination.
    """
    if ctx.invoked_subcommand is not None:
        return
    if unet is None or output is None or not (te or te_l or te_g):
        fail("wb swap needs --unet X, --te Y (or --te-l/--te-g) and -o OUT; see wb swap --help")
    from workbench.swap.assemble import swap_components

    result = swap_components(output, unet, te, vae=vae, base=base, te_l=te_l, te_g=te_g)
    table = Table(title=f"wrote {result.path}", title_justify="left")
    table.add_column("component")
    table.add_column("from")
    table.add_column("keys", justify="right")
    for component, source in result.sources.items():
        if component == "other" and not result.keys.get("other"):
            continue
        table.add_row(component, source, str(result.keys.get(component, 0)))
    out.print(table)


@swap_app.command("matrix")
@friendly
def swap_matrix_command(
    ckpts: str = typer.Option(..., "--ckpts", help="Checkpoints, comma-separated; the FIRST is the base."),
    prompts: Path = typer.Option(..., "--prompts", help="Text file: one prompt per non-empty line."),
    seeds: str = typer.Option("1", "--seeds", help="Seeds: 1,2 or 1-4; -1 = random, drawn once."),
    cfg: float = typer.Option(7.0, "--cfg", help="CFG scale."),
    steps: int = typer.Option(20, "--steps", help="Sampling steps."),
    sampler: str = typer.Option("euler_a", "--sampler", help="Sampler (as in wb grid)."),
    size: str = typer.Option("512x512", "--size", help="Image size WIDTHxHEIGHT."),
    negative: str = typer.Option("", "--negative", help="Negative prompt."),
    batch: int = typer.Option(4, "--batch", help="Images per pipeline call."),
    out_dir: Path = typer.Option(
        ..., "-o", "--out", help="Folder for grid.png, cells/, matrix.json, index.html."
    ),
    force: bool = typer.Option(False, "--force", help="Render a matrix over 200 megapixels anyway."),
) -> None:
    """Render every (UNet from i, text encoder from j) combination and name the component that
    carries the change: rows are UNet sources, columns TE sources."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from workbench.grids.axes import parse_axis_values, split_csv
    from workbench.grids.cli import parse_size, read_prompts
    from workbench.grids.plan import resolve_seeds
    from workbench.swap.matrix import swap_matrix

    width, height = parse_size(size)
    from workbench.swap.matrix import check_matrix_size

    seed_list, _ = resolve_seeds(parse_axis_values("seed", seeds))
    paths = [Path(p) for p in split_csv(ckpts)]
    prompt_list = read_prompts(prompts)
    check_matrix_size(len(paths), len(prompt_list), len(seed_list), width, height, force)
    n_pairs = len(prompt_list) * len(seed_list)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=out, transient=True) as bar:
        task = bar.add_task("building the pipeline", total=len(paths) ** 2 * n_pairs)

        def progress(done: int, total: int, note: str) -> None:
            bar.update(task, completed=done, total=total, description=note)

        result = swap_matrix(
            paths, prompt_list, seed_list, out_dir, steps=steps, cfg=cfg, sampler=sampler,
            width=width, height=height, negative=negative, batch=batch, progress=progress, force=force,
        )  # fmt: skip
    table = Table(title="swap matrix verdict", title_justify="left")
    for col in ("swapped in", "burn vs base", "drift from base"):
        table.add_column(col, justify="left" if col == "swapped in" else "right")
    for e in result.effects:
        table.add_row(f"{e.component} of {e.checkpoint}", f"{e.burn_delta:+.2f}", f"{e.drift:.4f}")
    out.print(table)
    for sentence in result.verdicts:
        out.print(f"[bold]{sentence}[/]", highlight=False)
    out.print(f"wrote {result.grid_png}, {len(result.cells)} cells, {result.index_html}", highlight=False)


@app.command()
@friendly
def demo(
    out_dir: Path = typer.Option(
        Path("out/demo"), "-o", "--out", help="Folder for everything the demo makes."
    ),
    quick: bool = typer.Option(False, "--quick", help="A smaller run (under 2 minutes on 2 CPU cores)."),
) -> None:
    """The whole story offline on the toy model: fine-tune, lr-find, merge, swap matrix, grid, report."""
    from workbench.demo import run_demo

    with err.status("starting") as status:
        result = run_demo(out_dir, quick=quick, log=lambda message: status.update(message))
    table = Table(title=f"wb demo in {result.seconds:.0f} s", title_justify="left")
    for col in ("model", "mean burn", "mean shape score", "file"):
        table.add_column(col, justify="right" if col.startswith("mean") else "left")
    for name, path in result.models.items():
        s = result.scores.get(name, {})
        table.add_row(
            name, f"{s.get('burn', float('nan')):.2f}", f"{s.get('shape score', float('nan')):.3f}", str(path)
        )
    out.print(table)
    lr = result.lr_find
    fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
    if lr.get("midpoint") is not None:
        bounds = f"lower {fmt(lr['lower'])}, upper {fmt(lr['upper'])}"
        out.print(f"lr-find: {bounds}, midpoint {fmt(lr['midpoint'])}")
    else:
        out.print(f"lr-find: {lr.get('message')}", highlight=False)
    for sentence in result.verdicts:
        out.print(f"swap matrix: [bold]{sentence}[/]", highlight=False)
    out.print(f"open [bold]{result.index_html}[/] (grid: {result.grid})", highlight=False)


def main() -> None:  # pragma: no cover - console script entry (`wb`, `python -m workbench.cli`)
    # What the imports made (torch's ~200,000 objects among them) lives as long as the process: out
    # of the garbage collector's sight, a full collection no longer rescans it (0.1 s of a 1,500-step
    # merge dry-run's 0.4 s; a little of every collection in a long run). Not at import: a test
    # process imports this module and keeps collecting its own garbage.
    gc.freeze()
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
