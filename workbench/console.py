"""The terminal side shared by every command: consoles, the one-line error, human-readable sizes.

Only command modules import this; library code never prints.
"""

from __future__ import annotations

import functools
import signal
import threading
from collections.abc import Iterable

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from workbench.errors import WorkbenchError

out = Console()
err = Console(stderr=True)


def fail(message: str) -> None:
    # escaped: a message naming "[single_file]" or "[unet]" must not lose it as a markup tag
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _sigterm_as_ctrl_c(signum, frame) -> None:
    """SIGTERM does what Ctrl-C does at that moment: the handler installed for SIGINT runs (the
    train loop's stops at the next step and saves), else KeyboardInterrupt unwinds every writer."""
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not signal.default_int_handler:
        handler(signal.SIGINT, frame)
        return
    raise KeyboardInterrupt


def friendly(fn):
    """Turn library errors into one line and exit code 2; Ctrl-C (and SIGTERM) into exit 130 with
    no traceback (every writer has removed its temporary file by then)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from workbench.checkpoint.files import completed_files

        done_before = len(completed_files())
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _sigterm_as_ctrl_c)
        try:
            return fn(*args, **kwargs)
        except WorkbenchError as e:
            fail(str(e))
        except KeyboardInterrupt:
            kept = completed_files()[done_before:]
            if kept:
                names = ", ".join(str(p) for p in kept[-3:])
                err.print(
                    f"[yellow]interrupted[/]: {len(kept)} finished file(s) were written and kept "
                    f"(last: {names}); nothing half-written was left behind",
                    highlight=False, soft_wrap=True,
                )  # fmt: skip
            else:
                err.print("[yellow]interrupted[/]: nothing was written; nothing half-written was left behind")
            raise typer.Exit(130) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    return f"{n} B"


def metadata_table(title: str, items: Iterable[tuple[str, str]], cut: str = " ...") -> Table:
    """A headerless key/value table (a file's metadata); values past 120 characters end in `cut`."""
    table = Table(title=title, title_justify="left", show_header=False)
    table.add_column("key", style="dim")
    table.add_column("value", overflow="fold")
    for k, v in items:
        table.add_row(k, v if len(v) <= 120 else v[:120] + cut)
    return table
