"""Helpers shared by the benchmark scripts (`python bench/x.py` puts bench/ on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def fsync_path(path: Path) -> None:
    """Flush a file already written and closed to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def status_kb(pid: int, field: str) -> int | None:
    """One kB field (RssAnon, VmHWM, ...) of /proc/PID/status; None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def wait_peak_rss_anon_kb(proc: subprocess.Popen) -> int:
    """Wait for `proc`, sampling its RssAnon every 5 ms; its peak in kB (0 if never seen)."""
    peak = 0
    while proc.poll() is None:
        anon = status_kb(proc.pid, "RssAnon")
        if anon:
            peak = max(peak, anon)
        time.sleep(0.005)
    return peak


def drop_from_cache(paths: list[Path]) -> None:
    """Evict the files' clean pages from the page cache (no root needed; dirty pages were synced)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_into_cache(paths: list[Path]) -> None:
    """Read the files once so they sit in the page cache."""
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass


def ensure_sd15(folder: Path, n: int) -> list[Path]:
    """folder/sd15_1..n.safetensors, written by bench/make_sd15.py (seed i) where missing."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"sd15_{i}.safetensors" for i in range(1, n + 1)]
    for seed, p in enumerate(paths, start=1):
        if not p.exists():
            print(f"writing {p} (bench/make_sd15.py --seed {seed}) ...", flush=True)
            subprocess.run(
                [sys.executable, str(ROOT / "bench" / "make_sd15.py"), str(p), "--seed", str(seed)],
                check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
            )  # fmt: skip
    return paths
