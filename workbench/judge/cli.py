"""`wb judge`: serve the voting page over one or more grids, or print and write the ranking.

Registered in workbench/cli.py with `app.command("judge")(friendly(judge))`.
"""

from __future__ import annotations

import getpass
import webbrowser
from pathlib import Path

import typer
from rich.table import Table

from workbench.console import err, out
from workbench.errors import WorkbenchError


def ranking_table(grid: dict) -> Table:
    from workbench.judge.session import percent

    level = round(100 * grid["level"])
    table = Table(title=f"{grid['name']}: {grid['votes']} votes, by {grid['by']}", title_justify="left")
    for col in ("rank", grid["by"], "strength", f"{level}% interval", "P(best)", "votes", "wins", "ties",
                "burn", "CLIP"):  # fmt: skip
        table.add_column(col, justify="left" if col == grid["by"] else "right")
    num = lambda v, d=2: "-" if v is None else f"{round(v, d) + 0.0:.{d}f}"  # noqa: E731 - no "-0.00"
    for it in grid["items"]:
        table.add_row(
            str(it["rank"]), it["name"], num(it["strength"]), f"{num(it['low'])} .. {num(it['high'])}",
            percent(it["p_best"]), str(it["votes"]), f"{it['wins']:g}", str(it["ties"]),
            num(it["burn"]), num(it["clip"]),
        )  # fmt: skip
    return table


def judge(
    grids: list[Path] = typer.Argument(..., metavar="GRID_DIR...", help="Folders written by wb grid."),
    port: int = typer.Option(8765, "--port", help="Port to serve on (0: any free port)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; anything but loopback exposes "
                             "the page (and the votes) to the network."),  # fmt: skip
    by: str = typer.Option(
        None, "--by", help="The axis kind to compare (default: checkpoint, else the X axis)."
    ),
    who: str = typer.Option(None, "--who", help="Name recorded with each vote (default: your user name; "
                            "the page can set its own)."),  # fmt: skip
    report: bool = typer.Option(False, "--report", help="Print the ranking and write GRID_DIR/ranking.json; "
                                "serve nothing."),  # fmt: skip
    open_browser: bool = typer.Option(False, "--open", help="Open the page in the default browser."),
) -> None:
    """Blind side-by-side votes between a grid's checkpoints (or any X values) in the browser,
    turned into a Bradley-Terry ranking with bootstrap intervals."""
    from workbench.judge.session import Judge, load_grids, write_ranking

    judged = load_grids(grids, by=by)
    session = Judge(judged, who=who or _user())
    if report:
        data = session.ranking()
        for grid, folder in zip(data["grids"], grids, strict=True):
            out.print(ranking_table(grid))
            out.print(f"[bold]{grid['sentence']}[/]", highlight=False)
            corr = grid["correlation"]
            fmt = lambda v: "-" if v is None else f"{v:+.2f}"  # noqa: E731
            out.print(f"rank correlation with low burn {fmt(corr['burn'])}, with CLIP {fmt(corr['clip'])}",
                      highlight=False)  # fmt: skip
            skipped = grid["skipped"]
            if skipped["stale"] or skipped["unreadable_lines"]:
                out.print(f"[yellow]skipped[/] {skipped['stale']} votes for cells this grid no longer has, "
                          f"{skipped['unreadable_lines']} unreadable lines", highlight=False)  # fmt: skip
            path = write_ranking(grid, folder, {"wb_version": data["wb_version"], "method": data["method"]})
            out.print(f"wrote {path}", highlight=False)
        return

    from workbench.judge.server import make_server

    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"[bold yellow]warning:[/] --host {host} exposes the voting page and every image of "
                  "these grids to the network; anyone who reaches it can vote", highlight=False)  # fmt: skip
    try:
        server = make_server(session, host=host, port=port)
    except OSError as e:
        raise WorkbenchError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); "
                             "try another --port, or --port 0 for any free one") from None  # fmt: skip
    for g in judged:
        out.print(f"{g.name}: {len(g.items)} {g.by}s, {len(g.groups)} settings to compare them on, "
                  f"votes in {g.log.path}", highlight=False)  # fmt: skip
    out.print(f"judge at [bold]{server.url}[/], ranking at {server.url}ranking  (Ctrl-C stops)",
              highlight=False)  # fmt: skip
    if open_browser:
        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        out.print("stopped; every acknowledged vote is in votes.jsonl")
    finally:
        server.server_close()


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in this environment
        return "anonymous"
