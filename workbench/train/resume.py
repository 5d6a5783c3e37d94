"""The resumable state of a run: what `wb train --resume RUNDIR` needs to continue it exactly.

A checkpoint holds fp16 weights for A1111 and the grid; continuing a run needs more: the fp32
weights that train, the optimizers' moments (and D-Adaptation's/Prodigy's d), the schedulers' step,
every random generator, and where in the epoch's shuffled order the run was. All of it lives in
`RUNDIR/state/`, one folder, replaced as a whole:

    weights.safetensors        the trained components in fp32 (diffusers key names, "unet." ...),
                               and their EMA ("ema.unet." ...) when the recipe keeps one
    optimizer-COMPONENT.pt     optimizer.state_dict(), loaded back with torch.load(weights_only=True)
    scheduler-COMPONENT.pt     scheduler.state_dict(), same
    rng-N.pt                   process N's training generator and torch's global CPU/CUDA generators
    progress.json              step, epoch, batches of the epoch already seen, the run's bookkeeping

The folder is written as `state.partial/` and renamed into place, so a crash while saving leaves
the previous state whole. Frozen parts (the VAE, frozen text-encoder layers) are not stored: they
come from the base checkpoint, whose sha256 run.json records and `--resume` checks.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from workbench.checkpoint.safetensors_io import fsync_file
from workbench.errors import WorkbenchError

STATE_DIR = "state"
STATE_FORMAT = "wb-train-state/1"


@dataclass
class RunProgress:
    """Where a run stands between two optimizer steps, and what its bookkeeping remembers."""

    step: int
    epoch: int  # 0-based epoch the next batch belongs to
    batches_seen: int  # micro-batches of that epoch this process has consumed
    train_seconds: float
    last_loss: float | None = None
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    last_eval_step: int | None = None
    last_saved_step: int | None = None
    last_sample_step: int | None = None
    ema_checkpoints: list[str] = field(default_factory=list)
    ema_updates: int = 0
    reason: str = "checkpoint"  # why it was saved: "checkpoint" or "interrupt"


def state_dir(run_dir: Path) -> Path:
    return Path(run_dir) / STATE_DIR


def save_state(
    run_dir: Path,
    progress: RunProgress,
    weights: dict[str, torch.Tensor],
    optimizers: dict,
    schedulers: dict,
    generator: torch.Generator,
    accelerator,
) -> Path:
    """Write the state of every process into RUNDIR/state/ (replacing the previous one).

    Every process must call this: each writes its own generators; the main process writes the rest
    and renames the folder into place once all have written."""
    from safetensors.torch import save_file

    final = state_dir(run_dir)
    partial = final.with_name(STATE_DIR + ".partial")
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _write_rng(partial / f"rng-{accelerator.process_index}.pt", generator)
    if main:
        fp32 = {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu())
                for k, v in weights.items()}  # fmt: skip
        save_file({k: v.contiguous() for k, v in fp32.items()}, str(partial / "weights.safetensors"))
        if accelerator.scaler is not None:  # fp16 training's loss scale
            torch.save(accelerator.scaler.state_dict(), partial / "scaler.pt")
        for component, optimizer in optimizers.items():
            torch.save(optimizer.state_dict(), partial / f"optimizer-{component}.pt")
        for component, scheduler in schedulers.items():
            torch.save(scheduler.state_dict(), partial / f"scheduler-{component}.pt")
        record = {"format": STATE_FORMAT, "processes": accelerator.num_processes, **asdict(progress)}
        (partial / "progress.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        for path in partial.iterdir():
            fsync_file(path)
    accelerator.wait_for_everyone()
    if main:
        old = final.with_name(STATE_DIR + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


@dataclass
class LoadedState:
    folder: Path
    progress: RunProgress
    processes: int

    def weights(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.folder / "weights.safetensors"))

    def load_optimizer(self, component: str, optimizer) -> None:
        optimizer.load_state_dict(self._torch_load(f"optimizer-{component}.pt"))

    def load_scheduler(self, component: str, scheduler) -> None:
        scheduler.load_state_dict(self._torch_load(f"scheduler-{component}.pt"))

    def restore_rng(self, process_index: int, generator: torch.Generator) -> None:
        saved = self._torch_load(f"rng-{process_index}.pt")
        generator.set_state(saved["generator"])
        torch.set_rng_state(saved["torch"])
        if saved.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda"])
        random.setstate((saved["python"][0], tuple(saved["python"][1]), saved["python"][2]))

    def restore_scaler(self, accelerator) -> None:
        if accelerator.scaler is not None and (self.folder / "scaler.pt").is_file():
            accelerator.scaler.load_state_dict(self._torch_load("scaler.pt"))

    def _torch_load(self, name: str):
        path = self.folder / name
        if not path.is_file():
            raise WorkbenchError(f"{path}: missing from the saved state (was it saved by wb train?)")
        # Never unpickle code: state dicts are tensors, numbers, strings, lists and dicts.
        return torch.load(path, map_location="cpu", weights_only=True)


def load_state(run_dir: Path, processes: int) -> LoadedState:
    """The run's saved state; a clear error when there is none or it came from another setup."""
    folder = state_dir(run_dir)
    if not (folder / "progress.json").is_file():
        old = folder.with_name(STATE_DIR + ".old")
        if (old / "progress.json").is_file():  # a crash between the two renames of save_state
            folder = old
        else:
            raise WorkbenchError(
                f"{run_dir}: no resumable state (state/progress.json); a run saves one with every "
                "checkpoint (saving.state: checkpoints) and when Ctrl-C stops it"
            )
    record = json.loads((folder / "progress.json").read_text(encoding="utf-8"))
    if record.get("format") != STATE_FORMAT:
        found = record.get("format")
        raise WorkbenchError(f"{folder / 'progress.json'}: format {found!r}, not {STATE_FORMAT}")
    saved_processes = record.pop("processes")
    record.pop("format")
    if saved_processes != processes:
        raise WorkbenchError(
            f"{run_dir}: the state was saved by {saved_processes} process(es), this is {processes}; "
            "resume with the same number of GPUs (the data order depends on it)"
        )
    record["val_losses"] = [tuple(v) for v in record["val_losses"]]
    return LoadedState(folder, RunProgress(**record), saved_processes)


def _write_rng(path: Path, generator: torch.Generator) -> None:
    version, internal, gauss = random.getstate()
    state = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss],
    }
    torch.save(state, path)
    fsync_file(path)

