"""The terminal side shared by every command: consoles, the one-line error, human-readable sizes.

Only command modules import this; library code never prints.
"""

from __future__ import annotations

import functools

import typer
from rich.console import Console

from workbench.errors import WorkbenchError

out = Console()
err = Console(stderr=True)


def fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def friendly(fn):
    """Turn library errors into one line and exit code 2; Ctrl-C into exit 130 with no traceback
    (every writer has removed its temporary file by then)."""

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
