"""Shared checks of the hardening tests: a refused command gives exit code 2, exactly one `error:`
line naming what was wrong, no traceback, no new file, and leaves its inputs byte-identical."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from typer.testing import CliRunner

from workbench.cli import app


def wb(*args, input: str | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def snapshot(*folders: Path) -> dict[str, str]:
    """Every file under the folders (hidden ones included) -> sha256 of its bytes."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = _digest(p)
            elif p.is_dir():
                out[str(p)] = "dir"
    return out


def _digest(path: Path) -> str:
    st = path.stat()
    if st.st_size <= 64 * 1024 * 1024:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    with open(path, "rb") as f:  # a huge (sparse) file: its size, times and both ends
        head = f.read(1 << 20)
        f.seek(-(1 << 20), 2)
        tail = f.read()
    return f"{st.st_size}:{st.st_mtime_ns}:{hashlib.sha256(head + tail).hexdigest()}"


def assert_refused(res, *needles: str) -> str:
    """Exit code 2, one `error:` line containing every needle, no traceback. Returns the line."""
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert res.exit_code == 2, (res.exit_code, res.output)
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in res.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def refused_cleanly(folder: Path, args: list, *needles: str) -> str:
    """Run wb in `folder`'s terms: refused in one line, and the folder is exactly as before."""
    before = snapshot(folder)
    line = assert_refused(wb(*args), *needles)
    assert snapshot(folder) == before
    return line


def safetensors_bytes(header: object, data: bytes = b"", raw_header: bytes | None = None) -> bytes:
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data
