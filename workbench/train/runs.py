"""The run folder's record: run.json (what ran, written before the first step) and metrics.jsonl.

Seed 004 lost a controlled experiment because nothing recorded what had changed between two runs
(the trainer, PyTorch and bitsandbytes had all been updated underneath it). run.json keeps the
resolved recipe, the optimizers as built, package versions, the device, wb's version and git
revision, and a fingerprint of the data and its split; `wb runs diff A B` lists every difference.

metrics.jsonl holds one JSON object per line: `{"step": N, "epoch": E, "loss/train": ...}` for
scalars and `{"step": N, "event": "..."}` for events (checkpoint, stopped, finished). TensorBoard
gets the same scalars under the same names.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench import __version__
from workbench.errors import WorkbenchError

RUN_FORMAT = "wb-train-run/1"
PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "bitsandbytes",
    "dadaptation",
    "prodigyopt",
    "lion-pytorch",
    "safetensors",
    "numpy",
    "pillow",
)


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> dict | None:
    """wb's own git revision (and whether its tracked files were modified), if it runs from a clone.

    Read-only: `--no-optional-locks` keeps `git status` from refreshing the index.
    """
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        return None
    try:
        rev = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if rev.returncode != 0:
        return None
    return {"revision": rev.stdout.strip(), "modified": bool(dirty.stdout.strip())}


def device_info(device) -> dict:
    import torch

    info: dict[str, Any] = {
        "type": str(getattr(device, "type", device)),
        "torch_build": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if info["type"] == "cuda":
        index = getattr(device, "index", None) or 0
        info["name"] = torch.cuda.get_device_name(index)
        info["count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
        info["memory_gib"] = round(torch.cuda.get_device_properties(index).total_memory / 2**30, 1)
    else:
        info["name"] = platform.processor() or platform.machine()
        info["cpus"] = os.cpu_count()
    return info


def write_run_record(run_dir: Path, record: dict) -> Path:
    """run.json: the caller's record plus format, time, wb version, git revision, platform."""
    full = {
        "format": RUN_FORMAT,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wb": {"version": __version__, "git": git_revision()},
        "command": sys.argv,
        "platform": platform.platform(),
        **record,
    }
    path = run_dir / "run.json"
    tmp = path.with_suffix(".json.partial")
    tmp.write_text(json.dumps(full, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_run(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir)
    if path.is_dir():
        path = path / "run.json"
    if not path.is_file():
        raise WorkbenchError(f"{run_dir}: no run.json (not a wb train run folder)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise WorkbenchError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- diff ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    key: str  # dotted path, e.g. recipe.optimizer.lr
    a: Any
    b: Any


_MISSING = "<absent>"


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {dotted.key: leaf}; lists are leaves (compared whole)."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def diff_runs(run_a: str | os.PathLike, run_b: str | os.PathLike) -> list[Difference]:
    """Every key of run.json whose value differs between two runs (recipe, versions, data, ...),
    recipe keys first, then environment, data and the rest, each group sorted."""
    a, b = flatten(read_run(run_a)), flatten(read_run(run_b))
    keys = sorted(set(a) | set(b), key=lambda k: (_group(k), k))
    return [
        Difference(k, a.get(k, _MISSING), b.get(k, _MISSING))
        for k in keys
        if a.get(k, _MISSING) != b.get(k, _MISSING)
    ]


def _group(key: str) -> int:
    for rank, prefix in enumerate(("recipe.", "optimizers.", "versions.", "device.", "wb.", "data.")):
        if key.startswith(prefix):
            return rank
    return 99


# --- metrics ------------------------------------------------------------------------------------


class MetricsLog:
    """Appends to metrics.jsonl (flushed per line, so a crash loses nothing) and to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, after_step: int | None = None):
        """`after_step`: a resumed run continues from that step, so what an interrupted process
        logged after it (up to a crash) is dropped: from metrics.jsonl here, from TensorBoard by
        its purge_step."""
        self.path = run_dir / "metrics.jsonl"
        if after_step is not None and self.path.is_file():
            kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= after_step]
            tmp = self.path.with_suffix(".jsonl.partial")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = after_step + 1 if after_step is not None else None
            self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def scalars(self, step: int, epoch: int, values: dict[str, float | None]) -> None:
        values = {k: v for k, v in values.items() if v is not None}
        if not values:
            return
        self._write({"step": step, "epoch": epoch, **values, "time": round(time.time(), 3)})
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, step)

    def event(self, step: int, event: str, **data: Any) -> None:
        self._write({"step": step, "event": event, **data, "time": round(time.time(), 3)})

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def write_loss_plot(run_dir: str | os.PathLike) -> Path | None:
    """loss.png: training loss (raw and smoothed), validation, stable-train and EMA validation loss
    against the step; None (and no file) when no loss was logged.

    Written at the end of every run from metrics.jsonl, so it always shows what was logged."""
    from workbench.plot import save_png

    figure = loss_figure(run_dir)
    return None if figure is None else save_png(figure, Path(run_dir) / "loss.png")


def loss_figure(run_dir: str | os.PathLike):
    """The matplotlib Figure of loss.png (see write_loss_plot), or None without any loss."""
    from workbench.plot import Series, line_chart

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    curves = {}
    for name in ("loss/train", "loss/val", "loss/train_stable", "loss/val_ema"):
        points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
        if points:
            curves[name] = points
    if not curves:
        return None
    series = []
    if "loss/train" in curves:
        steps, losses = zip(*curves["loss/train"], strict=True)
        series.append(Series(steps, losses, "loss/train", color=(200, 200, 215), width=1.0))
        smooth, ema = [], None
        for value in losses:  # an EMA started at the first value: the trend through the noise
            ema = value if ema is None else 0.9 * ema + 0.1 * value
            smooth.append(ema)
        series.append(Series(steps, smooth, "loss/train (EMA 0.9)"))
    for name in ("loss/val", "loss/train_stable", "loss/val_ema"):
        if name in curves:
            steps, losses = zip(*curves[name], strict=True)
            series.append(Series(steps, losses, name, points=True, dashed=name != "loss/val"))
    return line_chart(series, title=f"{run_dir.name}: loss", x_label="step", y_label="loss")
