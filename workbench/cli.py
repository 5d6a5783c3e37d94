"""The `wb` command line: each command parses options, calls one library function, prints a summary.

Library code never prints; a WorkbenchError becomes one red line on stderr and exit code 2.
Heavy imports (torch, diffusers) happen inside the commands so `wb --help` stays instant.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from workbench.errors import WorkbenchError

app = typer.Typer(
    name="wb",
    help="wb, the fine-tune workbench: inspect, train, merge, swap and judge Stable Diffusion checkpoints.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
toy_app = typer.Typer(help="The tiny offline toy model that tests and the demo run on.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")

out = Console()
err = Console(stderr=True)


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def friendly(fn):
    """Turn library errors into one line and exit code 2; Ctrl-C into exit 130 with no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except WorkbenchError as e:
            fail(str(e))
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]: nothing half-written was left behind")
            raise typer.Exit(130) from None

    return wrapper


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{n} B"


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
    """Tell what a checkpoint is: architecture, components, dtypes, parameters, metadata and hashes."""
    from workbench.checkpoint.describe import describe

    d = describe(path, with_hash=not no_hash)
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
    shown = {k: v for k, v in d.metadata.items() if k not in ("sd_merge_recipe", "sd_merge_models")}
    if shown:
        meta = Table(title="metadata", title_justify="left", show_header=False)
        meta.add_column("key", style="dim")
        meta.add_column("value", overflow="fold")
        for k, v in sorted(shown.items()):
            meta.add_row(k, v if len(v) <= 300 else v[:300] + " ...")
        out.print(meta)
    if d.ancestry:
        out.print("[bold]merge ancestry[/] (sd_merge_recipe / sd_merge_models present)")


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


def main() -> None:  # pragma: no cover - console script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
