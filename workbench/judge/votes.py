"""votes.jsonl: the append-only log of a grid's votes, one JSON object per line.

A vote is on disk (written, flushed and fsynced) before the server acknowledges it, so a closed
tab or a killed server loses no acknowledged vote. Appends take a lock for the threads of one
server and an exclusive `flock` on the file for any other process (a second `wb judge` on the same
grid), so two writers never interleave their lines. Undo appends an `{"undo": ID}` line: nothing
is ever rewritten. A line cut short by a crash mid-write (never acknowledged) is skipped on reading,
and the next append starts on a fresh line.
"""

from __future__ import annotations

import json
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: the thread lock still serialises one server
    fcntl = None

VOTES_FILE = "votes.jsonl"


@dataclass
class LogContents:
    votes: list[dict] = field(default_factory=list)  # in order, undone ones removed
    undone: int = 0
    bad_lines: int = 0  # lines that are not a JSON object (a write cut short by a crash)


class VoteLog:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()

    @contextmanager
    def _locked(self, mode: str):
        with self._lock, open(self.path, mode) as f:
            if fcntl is not None:
                fcntl.flock(f, fcntl.LOCK_EX if "a" in mode else fcntl.LOCK_SH)
            try:
                yield f
            finally:
                if fcntl is not None:
                    fcntl.flock(f, fcntl.LOCK_UN)

    def append(self, record: dict) -> None:
        """Append one record and return only once it is on disk."""
        line = json.dumps(record, ensure_ascii=False, separators=(", ", ": "))
        if "\n" in line:  # json.dumps escapes newlines inside strings; this cannot happen
            raise ValueError("a vote record must fit on one line")
        data = (line + "\n").encode("utf-8")
        created = not self.path.exists()
        with self._locked("ab+") as f:
            end = f.seek(0, os.SEEK_END)
            if end > 0:
                f.seek(end - 1)
                if f.read(1) != b"\n":  # the previous writer died mid-line: start a fresh one
                    data = b"\n" + data
            f.write(data)  # append mode: always at the end, whatever the position
            f.flush()
            os.fsync(f.fileno())
        if created:
            _fsync_dir(self.path.parent)

    def read(self) -> LogContents:
        """Every vote not undone, in order."""
        contents = LogContents()
        if not self.path.exists():
            return contents
        with self._locked("rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        votes: dict[str, dict] = {}
        for raw in text.splitlines():
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                contents.bad_lines += 1
                continue
            if not isinstance(record, dict):
                contents.bad_lines += 1
            elif "undo" in record:
                if votes.pop(str(record["undo"]), None) is not None:
                    contents.undone += 1
            elif "id" in record:
                votes[str(record["id"])] = record
        contents.votes = list(votes.values())
        return contents


def _fsync_dir(path: Path) -> None:
    """Make a new file's directory entry durable too (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
