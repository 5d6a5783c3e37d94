"""A judging session over one or more grids: which cells can be compared, the next pair to show,
recording and undoing votes, and the ranking they add up to. The server is a thin HTTP layer over
`Judge`; `wb judge --report` calls `ranking` directly.

What is compared: the values of one axis of the grid (by default the checkpoint axis, else X). Two
cells are a pair when every other coordinate is equal: same prompt, seed and settings, different
checkpoint (or LoRA weight, CFG, ... whatever that axis holds).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from workbench import __version__
from workbench.errors import WorkbenchError
from workbench.judge import stats
from workbench.judge.votes import VOTES_FILE, VoteLog

POSITIONS = ("x", "y", "z")
CHOICES = {"left": 1.0, "right": 0.0, "same": 0.5}  # the score of the left cell
RANKING_FILE = "ranking.json"


@dataclass
class JudgedGrid:
    key: str  # "0", "1", ...: the grid's place on the command line, used in URLs
    name: str  # the folder's name (with its parent when two grids share a name)
    root: Path
    by: str  # the kind compared: checkpoint, cfg, ...
    items: list[str]  # the compared values' labels
    cells: list[dict]  # grid.json's cells
    item_of: dict[int, int]  # cell index -> item
    groups: dict[tuple, dict[int, int]]  # the other coordinates -> {item -> cell index}
    context: dict[int, str]  # cell index -> what both cells of a pair share, as shown to the voter
    log: VoteLog = field(repr=False, default=None)

    def pairs_for(self, a: int, b: int) -> list[tuple]:
        return [g for g, members in self.groups.items() if a in members and b in members]


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WorkbenchError(f"{path}: not found; give a folder written by wb grid") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WorkbenchError(f"{path}: cannot read: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("cells"), list) or "axes" not in data:
        raise WorkbenchError(f"{path}: not a wb grid.json (no 'cells' list or 'axes')")
    return data


def _choose_axis(data: dict, by: str | None, where: Path) -> str:
    axes = {p: a for p, a in data["axes"].items() if p in POSITIONS and a}
    kinds = {a.get("kind"): p for p, a in axes.items()}
    if by is None:
        by = "checkpoint" if "checkpoint" in kinds else (axes["x"]["kind"] if "x" in axes else None)
        if by is None:
            raise WorkbenchError(f"{where}: the grid has no X axis; pick one with --by")
    if by not in kinds:
        have = ", ".join(sorted(k for k in kinds if k)) or "none"
        raise WorkbenchError(f"--by {by}: {where} has no {by} axis (its axes: {have})")
    return kinds[by]


def load_grid(folder: str | os.PathLike, key: str = "0", by: str | None = None,
              name: str | None = None) -> JudgedGrid:  # fmt: skip
    """Read GRID/grid.json and work out which of its cells can be compared."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise WorkbenchError(f"{folder}: not a folder")
    data = _load_json(root / "grid.json")
    position = _choose_axis(data, by, root / "grid.json")
    axis = data["axes"][position]
    items = [str(label) for label in axis["labels"]]
    if len(items) < 2:
        raise WorkbenchError(f"{root / 'grid.json'}: one {axis['kind']} only; nothing to compare")
    others = [p for p in POSITIONS if p != position]
    item_of: dict[int, int] = {}
    groups: dict[tuple, dict[int, int]] = {}
    context: dict[int, str] = {}
    for k, cell in enumerate(data["cells"]):
        try:
            index, file, item = int(cell["index"]), str(cell["file"]), int(cell[position])
        except (KeyError, TypeError, ValueError):
            raise WorkbenchError(f"{root / 'grid.json'}: cells[{k}] lacks index, file or {position}") \
                from None
        path = safe_path(root, file)
        if path is None or not path.is_file():
            raise WorkbenchError(f"{root / 'grid.json'}: cells[{k}].file {file!r}: no such image in {root}")
        if not 0 <= item < len(items) or index != k:
            raise WorkbenchError(f"{root / 'grid.json'}: cells[{k}] does not match the axes")
        item_of[index] = item
        groups.setdefault(tuple(cell.get(p) for p in others), {})[item] = index
        context[index] = cell.get("prompt", "") if axis["kind"] != "prompt" else ""
    groups = {g: m for g, m in groups.items() if len(m) >= 2}
    if not groups:
        raise WorkbenchError(f"{root / 'grid.json'}: no two cells differ only in {axis['kind']}")
    return JudgedGrid(key, name or root.name, root, axis["kind"], items, data["cells"], item_of, groups,
                      context, VoteLog(root / VOTES_FILE))  # fmt: skip


def load_grids(folders: list[str | os.PathLike], by: str | None = None) -> list[JudgedGrid]:
    roots = [Path(f).resolve() for f in folders]
    if len(set(roots)) < len(roots):
        raise WorkbenchError("the same grid folder is given twice")
    names = [r.name for r in roots]
    if len(set(names)) < len(names):
        names = [f"{r.parent.name}/{r.name}" for r in roots]
    return [load_grid(f, str(k), by, names[k]) for k, f in enumerate(folders)]


def safe_path(root: Path, relative: str) -> Path | None:
    """`root / relative` if it names something inside root (after following links), else None.
    Absolute paths, drive letters, `..` and NUL bytes are refused outright."""
    if not relative or "\0" in relative or "\\" in relative:
        return None
    parts = relative.split("/")
    if relative.startswith("/") or ":" in parts[0] or any(p in ("..", "") for p in parts):
        return None
    path = (root / relative).resolve()
    try:
        path.relative_to(root.resolve())
    except ValueError:
        return None
    return path


class BadVote(ValueError):
    """A request the server answers with 400: the message says what is wrong."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def grid_votes(grid: JudgedGrid) -> tuple[list[tuple[int, int, float]], dict]:
    """The votes of a grid as (item of left, item of right, score of left), and what was skipped."""
    contents = grid.log.read()
    votes, stale = [], 0
    for record in contents.votes:
        try:
            left, right = int(record["left"]["index"]), int(record["right"]["index"])
            a, b = grid.item_of[left], grid.item_of[right]
            items = (record["left"]["item"], record["right"]["item"])
            score = CHOICES[record["choice"]]
        except (KeyError, TypeError, ValueError):
            stale += 1
            continue
        if items != (grid.items[a], grid.items[b]) or a == b:
            stale += 1  # the grid was re-rendered with other values since
            continue
        votes.append((a, b, score))
    return votes, {"undone": contents.undone, "unreadable_lines": contents.bad_lines, "stale": stale}


class Judge:
    """The state of a judging session: the grids, and a random source for pairs and sides."""

    def __init__(self, grids: list[JudgedGrid], who: str = "anonymous", seed: int | None = None):
        self.grids = {g.key: g for g in grids}
        self.who = who
        self.rng = np.random.default_rng(seed)
        self._lock = threading.Lock()

    def next_pair(self) -> dict:
        """The next two cells to show, in random left/right order, with no label of what differs."""
        with self._lock:
            counted = [(grid_votes(g)[0], g) for g in self.grids.values()]
            # The grid with the fewest votes per pair of items goes next, so every grid gets judged.
            votes, grid = min(counted, key=lambda vg: (len(vg[0]) / math.comb(len(vg[1].items), 2),
                                                       self.rng.random()))  # fmt: skip
            wins = stats.win_matrix(len(grid.items), votes)
            strength = stats.fit_strengths(wins)
            a, b = stats.next_pair(strength, wins, self.rng)
            options = grid.pairs_for(a, b)
            # The prompt/seed/settings this pair was shown with least often, so votes spread over them.
            used = {g: 0 for g in options}
            for record in grid.log.read().votes:
                cells = {_index(record.get("left")), _index(record.get("right"))}
                for g in options:
                    if cells == {grid.groups[g][a], grid.groups[g][b]}:
                        used[g] += 1
            fewest = min(used.values())
            choices = [g for g in options if used[g] == fewest]
            group = choices[self.rng.integers(len(choices))]
            left, right = grid.groups[group][a], grid.groups[group][b]
            if self.rng.random() < 0.5:
                left, right = right, left
        return {
            "grid": grid.key,
            "left": {"index": left, "url": f"/g/{grid.key}/{grid.cells[left]['file']}"},
            "right": {"index": right, "url": f"/g/{grid.key}/{grid.cells[right]['file']}"},
            "context": grid.context.get(left, ""),
            "votes": sum(len(v) for v, _ in counted),
        }

    def vote(self, payload: object) -> dict:
        """Validate a vote from the page, append it to the grid's votes.jsonl (on disk on return)."""
        if not isinstance(payload, dict):
            raise BadVote("the body must be a JSON object")
        grid = self._grid(payload)
        choice = payload.get("choice")
        if not isinstance(choice, str) or choice not in CHOICES:
            raise BadVote(f"choice must be one of {', '.join(CHOICES)}")
        left, right = (self._cell(grid, payload, side) for side in ("left", "right"))
        a, b = grid.item_of[left], grid.item_of[right]
        if a == b or not any(m.get(a) == left and m.get(b) == right for m in grid.groups.values()):
            raise BadVote(f"cells {left} and {right} are not a pair (same settings, different {grid.by})")
        who = payload.get("who") or self.who
        if not isinstance(who, str) or len(who) > 100:
            raise BadVote("who must be a name of at most 100 characters")
        record = {
            "id": secrets.token_hex(8),
            "when": _now(),
            "who": who,
            "by": grid.by,
            "left": {"index": left, "file": grid.cells[left]["file"], "item": grid.items[a]},
            "right": {"index": right, "file": grid.cells[right]["file"], "item": grid.items[b]},
            "choice": choice,
        }
        grid.log.append(record)
        return {"ok": True, "id": record["id"], "grid": grid.key}

    def undo(self, payload: object) -> dict:
        """Withdraw a vote by its id (an `undo` line is appended; nothing is rewritten)."""
        if not isinstance(payload, dict):
            raise BadVote("the body must be a JSON object")
        grid = self._grid(payload)
        vote_id = payload.get("id")
        if not isinstance(vote_id, str) or not any(v.get("id") == vote_id for v in grid.log.read().votes):
            raise BadVote("id: no such vote in this grid (or it was already undone)")
        grid.log.append({"undo": vote_id, "when": _now(), "who": payload.get("who") or self.who})
        return {"ok": True, "undone": vote_id}

    def ranking(self, reps: int = stats.BOOTSTRAP) -> dict:
        return {
            "wb_version": __version__,
            "method": f"Bradley-Terry (a 'same' vote is half a win each way; Gaussian prior on the "
            f"log-strengths, sd {stats.PRIOR_SD}), {round(stats.LEVEL * 100)}% percentile bootstrap "
            f"interval over {reps} resamples of the votes",
            "grids": [ranking(g, reps) for g in self.grids.values()],
        }

    def _grid(self, payload: dict) -> JudgedGrid:
        grid = self.grids.get(str(payload.get("grid")))
        if grid is None:
            raise BadVote(f"grid must be one of {', '.join(self.grids)}")
        return grid

    @staticmethod
    def _cell(grid: JudgedGrid, payload: dict, side: str) -> int:
        value = payload.get(side)
        if isinstance(value, dict):
            value = value.get("index")
        if isinstance(value, bool) or not isinstance(value, int) or value not in grid.item_of:
            raise BadVote(f"{side} must be a cell index of grid {grid.key}")
        return value


def _index(side: object) -> object:
    return side.get("index") if isinstance(side, dict) else None


def percent(p: float) -> str:
    """82%; never a rounded 100% or 0% that is not exact."""
    if 0.995 < p < 1:
        return ">99%"
    if 0 < p < 0.005:
        return "<1%"
    return f"{round(100 * p)}%"


def _mean(values: list) -> float | None:
    values = [v for v in values if isinstance(v, (int, float))]
    return float(np.mean(values)) if values else None


def ranking(grid: JudgedGrid, reps: int = stats.BOOTSTRAP) -> dict:
    """The ranking of one grid's items from its votes, best first, with the automatic scores beside."""
    votes, skipped = grid_votes(grid)
    result = stats.fit(grid.items, votes, reps=reps)
    n = len(grid.items)
    burn = [_mean([c["scores"].get("burn") for c in grid.cells if grid.item_of[c["index"]] == i
                   and isinstance(c.get("scores"), dict)]) for i in range(n)]  # fmt: skip
    clip = [_mean([c["scores"].get("clip") for c in grid.cells if grid.item_of[c["index"]] == i
                   and isinstance(c.get("scores"), dict)]) for i in range(n)]  # fmt: skip
    nan = lambda xs, sign: [math.nan if x is None else sign * x for x in xs]  # noqa: E731
    correlation = {
        "burn": stats.spearman(result.strength, nan(burn, -1)) if votes else None,
        "clip": stats.spearman(result.strength, nan(clip, 1)) if votes else None,
    }
    order = sorted(range(n), key=lambda i: -result.strength[i])
    wins = result.wins
    ties = np.zeros((n, n))
    for a, b, s in votes:
        if s == 0.5:
            ties[a, b] += 1
            ties[b, a] += 1
    items = []
    for rank, i in enumerate(order, 1):
        items.append({
            "rank": rank,
            "name": grid.items[i],
            "strength": round(float(result.strength[i]), 4),
            "low": round(float(result.low[i]), 4),
            "high": round(float(result.high[i]), 4),
            "p_best": round(float(result.p_best[i]), 4),
            "votes": int(round((wins[i] + wins[:, i]).sum())),
            "wins": round(float(wins[i].sum() - ties[i].sum() / 2), 1),
            "ties": int(ties[i].sum()),
            "burn": None if burn[i] is None else round(burn[i], 3),
            "clip": None if clip[i] is None else round(clip[i], 3),
        })  # fmt: skip
    best = items[0]
    compared = int(np.count_nonzero(np.triu(wins + wins.T, 1)))
    if compared < math.comb(n, 2):
        sentence = (f"too few votes to say which is best: {compared} of the {math.comb(n, 2)} pairs "
                    "compared so far; every pair needs a vote")  # fmt: skip
    else:
        sentence = f"{best['name']} is best with {percent(best['p_best'])} probability"
        beaten = [it["name"] for it in items[1:] if it["high"] < best["low"]]
        if len(beaten) == n - 1:
            sentence += f"; its {round(100 * result.level)}% interval lies above every other's"
    return {
        "name": grid.name,
        "path": str(grid.root),
        "by": grid.by,
        "votes": len(votes),
        "pairs_compared": compared,
        "skipped": skipped,
        "level": result.level,
        "sentence": sentence,
        "items": items,
        "win_matrix": {
            "names": [grid.items[i] for i in order],
            "wins": [[round(float(wins[i, j]), 1) for j in order] for i in order],
            "note": "wins[row][col]: votes for row against col; a 'same' vote counts 0.5 each way",
        },
        "correlation": {
            **{k: None if v is None else round(v, 4) for k, v in correlation.items()},
            "note": "Spearman's rank correlation of the human strength with low burn, and with high CLIP",
        },
    }


def write_ranking(grid_ranking: dict, folder: str | os.PathLike, extra: dict | None = None) -> Path:
    """GRID/ranking.json, written through a temporary file and a rename."""
    path = Path(folder) / RANKING_FILE
    data = {**(extra or {}), **grid_ranking}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
