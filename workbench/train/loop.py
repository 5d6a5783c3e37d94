"""`train(recipe, run_dir)`: the one training loop, on accelerate.

Read it top to bottom: set up (run folder, model, data, what trains, optimizers, schedules,
run.json), then the loop, which per optimizer step does

    loss = epsilon loss of a batch         (grad_accum micro-batches; a NaN/inf loss stops the run)
    backward, clip, optimizer step         (one optimizer per trained component)
    scheduler step                         (once per OPTIMIZER step)
    log / validate / save / sample         (when the recipe says so)

CPU runs in fp32; on a GPU `mixed_precision: auto` means bf16 autocast (fp16 without bf16
support). Multi-GPU: `accelerate launch -m workbench.cli train RECIPE.yaml` (each process
draws different noise and sees a different shard of every batch; step counts are optimizer steps).

Checkpoints are single files in the LDM layout (what A1111, ComfyUI and `wb inspect` read), named
`checkpoints/NAME-epNN-gsNNNNN.safetensors`, NN the (1-based) epoch a step belongs to. The library
prints nothing: progress goes to the `progress` callback, results come back as a TrainResult.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench import __version__
from workbench.errors import WorkbenchError
from workbench.train.buckets import BucketBatchSampler, bucket_counts
from workbench.train.data import (
    CaptionedImages,
    EpochSampler,
    collate,
    fingerprint,
    load_examples,
    split_examples,
    stable_subset,
    write_split,
)
from workbench.train.diffusion import Models, denoising_loss, encode_latents, noise_scheduler_for, tokenize
from workbench.train.ema import EMA, ema_load, ema_start, ema_state, ema_update, ema_weights
from workbench.train.optimizers import adapted_lr, build_optimizer, freeze_text_encoder, trainable
from workbench.train.recipe import TOY_MODEL, Recipe
from workbench.train.report import write_run_report
from workbench.train.resume import RunProgress, load_state, save_state, state_dir
from workbench.train.runs import MetricsLog, device_info, package_versions, write_loss_plot, write_run_record
from workbench.train.schedules import build_scheduler, current_lr
from workbench.train.validation import validation_loss

COMPONENTS = ("unet", "text_encoder")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Metadata of the base checkpoint that a fine-tune keeps: what makes a toy model rebuildable
# (its configs) and what says which architecture it is.
KEPT_METADATA = (
    "wb.architecture",
    "wb.diffusers_configs",
    "modelspec.sai_model_spec",
    "modelspec.architecture",
)


@dataclass
class Progress:
    """What the progress callback gets after every optimizer step and evaluation."""

    step: int
    total_steps: int
    epoch: int
    loss: float | None = None
    val_loss: float | None = None
    note: str | None = None


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    total_steps: int
    epochs: int  # epochs started
    checkpoints: list[Path]
    val_losses: list[tuple[int, float]]
    last_loss: float | None
    stopped: str | None  # None when the run finished; "nan", "early_stop", "stop_when", "interrupted"
    message: str
    seconds: float
    train_seconds: float  # time inside optimizer steps only (no evaluation, saving, sampling)
    resumed_from: int | None = None  # the step a `--resume` continued from
    ema_checkpoints: list[Path] = field(default_factory=list)  # with training.ema_decay
    state: Path | None = None  # RUNDIR/state/ when the run stopped resumable (Ctrl-C)
    steps_per_second: float = field(init=False)

    def __post_init__(self) -> None:
        self.steps_per_second = self.steps / self.train_seconds if self.train_seconds > 0 else 0.0


def train(
    recipe: Recipe,
    run_dir: str | os.PathLike,
    progress: Callable[[Progress], None] | None = None,
    source: dict | None = None,
    *,
    checkpoints: bool = True,
    lr_factor: Callable[[int], float] | None = None,
    stop_when: Callable[[Progress], str | None] | None = None,
    resume: bool = False,
) -> TrainResult:
    """Run `recipe` into the new folder `run_dir`. `source` (recipe path, overrides) goes to run.json.

    `resume=True` continues the run in `run_dir` from its saved state (RUNDIR/state/, see resume.py)
    with the recipe run.json recorded (`resume_training` reads it): the same weights, optimizer and
    scheduler state, random generators and position in the data, so the run ends as it would have.

    Ctrl-C (SIGINT) during a run that saves checkpoints finishes the current optimizer step, saves a
    checkpoint and the resumable state, and returns with `stopped="interrupted"`; a second Ctrl-C
    stops at once.

    Hooks for runs that are not fine-tunes (`wb lr-find` uses all three): `checkpoints=False` saves
    none (and makes no checkpoints/ folder); `lr_factor(i)` replaces the recipe's schedule (optimizer
    step i uses lr * lr_factor(i); say so in `source`, run.json's recipe shows the schedule it
    replaced); `stop_when` sees every Progress and stops the run, like early stopping, when it returns
    a message (TrainResult.stopped is then "stop_when")."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    started = time.time()
    tr = recipe.training
    run_dir = Path(run_dir) if resume else _new_run_dir(Path(run_dir), checkpoints)
    accelerator = _accelerator(Accelerator, recipe)
    device, main = accelerator.device, accelerator.is_main_process
    set_seed(tr.seed)
    saved = load_state(run_dir, accelerator.num_processes) if resume else None
    if resume:
        _check_base_unchanged(run_dir)

    # --- the model ------------------------------------------------------------------------------
    base_path, models, spec, base_metadata = _load_model(recipe, run_dir, device, resume)
    _check_resolution(recipe.data, spec.configs)

    # --- the data: a fixed validation split, written beside the run -----------------------------
    examples = load_examples(recipe.data)
    val = recipe.validation
    if val.enabled:
        train_examples, val_examples = split_examples(examples, val.split, val.seed)
        stable_examples = (
            stable_subset(train_examples, val.stabilize_split, val.seed) if val.stabilize_train else []
        )
    else:
        train_examples, val_examples, stable_examples = examples, [], []
    if main:
        write_split(run_dir / "split.json", train_examples, val_examples, stable_examples)
    train_set = CaptionedImages(train_examples, recipe.data, seed=tr.seed, augment=True)
    val_set = CaptionedImages(val_examples, recipe.data, augment=False)
    stable_set = CaptionedImages(stable_examples, recipe.data, augment=False)
    if recipe.data.aspect_buckets:  # batches of one bucket each; `skip` below counts batches
        sampler = BucketBatchSampler(train_set.sizes, tr.batch_size, tr.seed)
        loader = torch.utils.data.DataLoader(
            train_set, batch_sampler=sampler, collate_fn=collate, num_workers=recipe.data.workers
        )
        per_batch = 1
    else:  # `skip` counts examples
        sampler = EpochSampler(len(train_set), tr.seed)
        loader = torch.utils.data.DataLoader(
            train_set,
            batch_size=tr.batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=recipe.data.workers,
        )
        per_batch = tr.batch_size

    # --- what trains: frozen parts get requires_grad False and no optimizer ---------------------
    params = _set_trainable(models, recipe)
    settings = {c: recipe.optimizer.settings(c) for c in params}
    optimizers = {c: build_optimizer(settings[c], params[c]) for c in params}
    state_weights = saved.weights() if saved is not None else {}  # the interrupted run's fp32 weights
    if saved is not None:
        _load_weights(models, state_weights, params)
    if tr.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        if "text_encoder" in params:
            models.text_encoder.gradient_checkpointing_enable()

    # accelerate wraps what trains (DDP, autocast) and shards the data; `models` keeps the plain
    # modules, which validation, sampling and saving use.
    trained = {c: accelerator.prepare(getattr(models, c)) for c in params}
    optimizers = {c: accelerator.prepare(o) for c, o in optimizers.items()}
    loader = accelerator.prepare(loader)
    steps_per_epoch = max(1, math.ceil(len(loader) / tr.grad_accum))
    total_steps = min(tr.max_steps or math.inf, (tr.max_epochs or math.inf) * steps_per_epoch)
    total_steps = int(total_steps)
    schedulers = {
        c: build_scheduler(o, recipe.schedule, total_steps)
        if lr_factor is None
        else torch.optim.lr_scheduler.LambdaLR(o, lr_factor)
        for c, o in optimizers.items()
    }
    step_model = dataclasses.replace(models, **trained)  # what the step calls: wrapped where trained
    ema = None
    if tr.ema_decay is not None or tr.ema_strength_target is not None:
        # EveryDream2's strength target: what is left of the starting weights' share at the end
        decay = tr.ema_decay or tr.ema_strength_target ** (tr.ema_every_n_steps / max(1, total_steps))
        ema = ema_start(params, decay, tr.ema_every_n_steps, "cpu" if tr.ema_device == "cpu" else None)
        if saved is not None:
            ema_load(ema, _param_names(models, params), state_weights, saved.progress.ema_updates)
    del state_weights

    if main and saved is None:
        record = _record(recipe, source, base_path, spec, settings, optimizers, params, models, accelerator)
        record["data"] = {"root": recipe.data.root, **fingerprint(examples), "train": len(train_examples),
                          "validation": len(val_examples), "stabilize_train": len(stable_examples),
                          "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}  # fmt: skip
        if recipe.data.aspect_buckets:
            record["data"]["buckets"] = bucket_counts(train_set.sizes)
        write_run_record(run_dir, record)
    elif main:
        _record_resume(run_dir, saved.progress.step, fingerprint(examples), accelerator)
    resumed_at = saved.progress.step if saved is not None else None
    log = MetricsLog(run_dir, recipe.logging.tensorboard, after_step=resumed_at) if main else None
    state = _RunState(recipe, run_dir, models, spec, base_metadata, accelerator, log, progress, total_steps)
    state.val_set, state.stable_set = val_set, stable_set  # what `evaluate` measures
    state.checkpointing, state.stop_when = checkpoints, stop_when
    state.optimizers, state.schedulers, state.trained_components = optimizers, schedulers, tuple(params)
    state.ema, state.param_names = ema, _param_names(models, params)

    # --- the loop ---------------------------------------------------------------------------------
    # Training noise, timesteps and latent samples come from this generator alone (validation has
    # its own), offset per process so that GPUs do not draw identical noise.
    generator = torch.Generator().manual_seed(tr.seed + 1_000_003 * accelerator.process_index)
    state.generator = generator
    n_epochs = tr.max_epochs or math.ceil(total_steps / steps_per_epoch)
    step, first_epoch, skip, micro_losses, train_time = 0, 0, 0, [], 0.0
    if saved is not None:
        # Optimizers after their schedulers: a LambdaLR sets the groups' lr to its step-0 value when
        # built; the saved param groups hold the lr the next step uses (and D-Adaptation's d).
        for c, optimizer in optimizers.items():
            saved.load_optimizer(c, optimizer)
        for c, scheduler in schedulers.items():
            saved.load_scheduler(c, scheduler)
        saved.restore_rng(accelerator.process_index, generator)
        saved.restore_scaler(accelerator)
        state.restore(saved.progress)
        step, first_epoch, skip = saved.progress.step, saved.progress.epoch, saved.progress.batches_seen
        train_time = saved.progress.train_seconds
        if log is not None:
            log.event(step, "resumed", message=f"resumed at step {step} ({saved.progress.reason} state)")
    epoch = first_epoch
    interrupt = _CtrlC(accelerator) if checkpoints else None
    try:
        if val.enabled and val.at_start and saved is None:
            state.evaluate(step, epoch)
        for epoch in range(first_epoch, n_epochs):
            train_set.set_epoch(epoch)
            loader.set_epoch(epoch)
            sampler.set_epoch(epoch)  # (accelerate's loader does not reach a batch sampler's)
            if epoch == first_epoch and skip:
                # Resuming mid-epoch: the sampler drops what this epoch's order already gave, on
                # every process (each took batches_seen batches).
                sampler.resume_at(epoch, skip * per_batch * accelerator.num_processes)
            state.position = (epoch, skip if epoch == first_epoch else 0)
            for batch in loader:
                state.position = (epoch, state.position[1] + 1)
                t0 = time.perf_counter()
                with accelerator.accumulate(*trained.values()):
                    with accelerator.autocast():  # bf16/fp16 on GPUs (a no-op in fp32); not the backward
                        loss = _batch_loss(step_model, batch, generator, recipe, device).mean()
                    if not _finite_everywhere(accelerator, loss):
                        state.stop_on_bad_loss(loss.item(), step + 1, epoch)
                        break
                    micro_losses.append(loss.item())
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and tr.clip_grad_norm:
                        accelerator.clip_grad_norm_(
                            [p for ps in params.values() for p in ps], tr.clip_grad_norm
                        )
                    for optimizer in optimizers.values():
                        optimizer.step()  # accelerate skips the step until the last micro-batch
                        optimizer.zero_grad(set_to_none=True)
                train_time += time.perf_counter() - t0
                if not accelerator.sync_gradients:
                    continue  # still accumulating micro-batches
                used_lr = {c: current_lr(s) for c, s in schedulers.items()}  # the lr this step used
                for scheduler in schedulers.values():
                    scheduler.step()
                step += 1
                if ema is not None:
                    ema_update(ema, step)
                state.train_seconds = train_time
                state.after_step(step, epoch, sum(micro_losses) / len(micro_losses), used_lr, optimizers)
                micro_losses = []
                if interrupt is not None and interrupt.requested() and step < total_steps:
                    state.interrupt(step, epoch)
                if state.stopped or step >= total_steps:
                    break
            if state.stopped:
                break
            state.position = (epoch + 1, 0)  # every batch of this epoch is seen
            state.after_epoch(step, epoch, finished=step >= total_steps)
            if state.stopped or step >= total_steps:
                break
    except KeyboardInterrupt:  # a second Ctrl-C, or one where no state is saved: stop at once
        if log is not None:
            log.event(step, "interrupted", message=f"interrupted at step {step}")
            log.close()
        raise
    finally:
        if interrupt is not None:
            interrupt.close()

    # --- the end: a final checkpoint unless the run diverged or was interrupted --------------------
    if state.stopped not in ("nan", "interrupted"):
        if val.enabled and state.last_eval_step != step:
            state.evaluate(step, epoch)
        state.save(step, epoch, final=True)
        state.sample(step, epoch, final=True)
        if main:  # a finished run has nothing to resume; the state is the size of the model x 3
            shutil.rmtree(state_dir(run_dir), ignore_errors=True)
    seconds = time.time() - started
    message = state.message or f"finished {step} steps in {seconds:.0f} s"
    if log is not None:
        log.event(
            step,
            "stopped" if state.stopped else "finished",
            reason=state.stopped,
            message=message,
            seconds=round(seconds, 2),
            train_seconds=round(train_time, 3),
        )
        log.close()
        write_loss_plot(run_dir)
        if checkpoints:  # a fine-tune's page (lr-find writes its own report)
            write_run_report(run_dir)
    accelerator.end_training()
    return TrainResult(
        run_dir=run_dir,
        steps=step,
        total_steps=total_steps,
        epochs=epoch + 1,
        checkpoints=list(state.checkpoints),
        ema_checkpoints=list(state.ema_checkpoints),
        val_losses=list(state.val_losses),
        last_loss=state.last_loss,
        stopped=state.stopped,
        message=message,
        seconds=seconds,
        train_seconds=train_time,
        resumed_from=saved.progress.step if saved is not None else None,
        state=state.state_path if state.stopped == "interrupted" else None,
    )


class _CtrlC:
    """The first Ctrl-C asks the loop to stop after the current optimizer step (and save what a
    resume needs); a second one raises KeyboardInterrupt at once. Only the main thread can catch
    signals; elsewhere (a notebook's worker thread) Ctrl-C keeps its usual meaning."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.flag = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.flag:
            raise KeyboardInterrupt
        self.flag = True

    def requested(self) -> bool:
        """Whether any process got Ctrl-C (all must stop at the same step)."""
        if self.accelerator.num_processes == 1:
            return self.flag
        flag = torch.tensor([float(self.flag)], device=self.accelerator.device)
        return self.accelerator.reduce(flag, "sum").item() > 0

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def resume_training(
    run_dir: str | os.PathLike, progress: Callable[[Progress], None] | None = None
) -> TrainResult:
    """Continue the run in `run_dir` from its saved state, with the recipe its run.json records."""
    from workbench.train.recipe import parse_recipe
    from workbench.train.runs import read_run

    run_dir = Path(run_dir)
    record = read_run(run_dir)
    if "recipe" not in record:
        raise WorkbenchError(f"{run_dir / 'run.json'}: no recipe recorded (not a wb train run)")
    recipe = parse_recipe(record["recipe"], str(run_dir / "run.json"))
    return train(recipe, run_dir, progress, resume=True)


def _batch_loss(
    models: Models, batch: dict, generator: torch.Generator, recipe: Recipe, device
) -> torch.Tensor:
    """Per-example epsilon loss of one micro-batch, every random number drawn from `generator`."""
    tr = recipe.training
    with torch.no_grad():  # the VAE is never trained
        latents = encode_latents(models.vae, batch["pixels"].to(device), models.scaling_factor, generator)
    b = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator)
    if tr.zero_frequency_noise_ratio:
        # "offset noise": a per-channel constant lets the model learn overall brightness
        noise = noise + tr.zero_frequency_noise_ratio * torch.randn(
            (b, latents.shape[1], 1, 1), generator=generator
        )
    timesteps = torch.randint(tr.timestep_min, tr.timestep_max + 1, (b,), generator=generator)
    ids = tokenize(models.tokenizer, batch["caption"], device)
    return denoising_loss(
        models, latents, ids, noise.to(device, latents.dtype), timesteps.to(device), tr.min_snr_gamma
    )


# --- setup helpers ------------------------------------------------------------------------------


def _finite_everywhere(accelerator, loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (all must stop together, or DDP would hang)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")
    return bad.item() == 0


def _record(recipe, source, base_path, spec, settings, optimizers, params, models, accelerator) -> dict:
    """What run.json says about the run (write_run_record adds format, time, wb version, git revision)."""
    return {
        "recipe": recipe.to_dict(),
        "source": source or {},
        "base": {
            "path": str(base_path),
            "sha256": _sha256_file(base_path),
            "architecture": spec.architecture,
            "layout": spec.layout,
        },
        "optimizers": {
            c: {
                **settings[c].to_json(),
                "class": _class_name(optimizers[c]),
                "trained_params": sum(p.numel() for p in params[c]),
            }
            for c in params
        },
        "frozen": _frozen_summary(models),
        "versions": package_versions(),
        "device": {
            **device_info(accelerator.device),
            "processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
        },
    }


def _new_run_dir(run_dir: Path, checkpoints: bool = True) -> Path:
    if (run_dir / "run.json").exists():
        raise WorkbenchError(f"{run_dir}: already holds a run (run.json); choose another -o folder")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise WorkbenchError(f"{run_dir}: exists and is not an empty folder; choose another -o folder")
    (run_dir / "checkpoints" if checkpoints else run_dir).mkdir(parents=True, exist_ok=True)
    return run_dir


def _accelerator(accelerator_cls, recipe: Recipe):
    from accelerate.state import AcceleratorState, GradientState

    tr = recipe.training
    cpu = tr.device == "cpu" or not torch.cuda.is_available()
    precision = tr.mixed_precision
    if precision == "auto":
        precision = "no" if cpu else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    # accelerate keeps one process-wide state and refuses a second Accelerator with another precision
    # or accumulation; each wb run starts its own. (The distributed setup, PartialState, is kept.)
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    try:
        return accelerator_cls(cpu=cpu, mixed_precision=precision, gradient_accumulation_steps=tr.grad_accum)
    except (ValueError, RuntimeError) as e:
        raise WorkbenchError(f"training.mixed_precision: {precision}: {e}") from None


def _load_model(recipe: Recipe, run_dir: Path, device, resume: bool = False):
    from workbench.checkpoint.reader import open_checkpoint
    from workbench.pipeline import load_modules, model_spec
    from workbench.tokenizer import clip_tokenizer

    if recipe.model.base == TOY_MODEL and resume:
        base_path = run_dir / "base.safetensors"
    elif recipe.model.base == TOY_MODEL:
        # A fresh random toy model, written into the run, so the run is complete.
        from workbench.toy.model import toy_init

        base_path = toy_init(run_dir / "base.safetensors", seed=recipe.model.init_seed)
    else:
        base_path = Path(recipe.model.base)
        if not base_path.exists():
            raise WorkbenchError(f"model.base: {base_path}: no such file or folder")
    with open_checkpoint(base_path) as ckpt:
        spec = model_spec(ckpt)
        unsupported = [v for v in spec.variants if v != "v-prediction"]
        if spec.layout not in ("sd1", "sd2") or unsupported:
            what = spec.layout + (f" ({', '.join(unsupported)})" if unsupported else "")
            raise WorkbenchError(
                f"model.base: {base_path}: training {what} models is not supported yet (sd1, sd2)"
            )
        modules = load_modules(ckpt, device=device, spec=spec)
        metadata = dict(ckpt.metadata)
    models = Models(
        unet=modules["unet"],
        text_encoder=modules["text_encoder"],
        vae=modules["vae"],
        tokenizer=clip_tokenizer("!" if spec.layout == "sd2" else "<|endoftext|>"),
        noise_scheduler=noise_scheduler_for(spec.configs["scheduler"]),
        scaling_factor=float(spec.configs["vae"].get("scaling_factor", 0.18215)),
    )
    return base_path, models, spec, metadata


def _load_weights(models: Models, weights: dict[str, torch.Tensor], params: dict) -> None:
    """Put a saved state's fp32 weights into the trained components (all of each, strictly)."""
    for component in params:
        prefix = component + "."
        sub = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        module = getattr(models, component)
        missing, unexpected = module.load_state_dict(sub, strict=False)
        if missing or unexpected:
            raise WorkbenchError(
                f"state/weights.safetensors: does not fit the {component} "
                f"({len(missing)} missing, {len(unexpected)} unexpected keys)"
            )


def _check_base_unchanged(run_dir: Path) -> None:
    from workbench.train.runs import read_run

    base = read_run(run_dir).get("base", {})
    path = Path(base.get("path", ""))
    if base.get("sha256") and path.is_file() and _sha256_file(path) != base["sha256"]:
        raise WorkbenchError(f"{path}: the base checkpoint changed since the run started (sha256 differs)")


def _record_resume(run_dir: Path, step: int, data: dict, accelerator) -> None:
    """Check that the data is what the run started with; note the resume in run.json."""
    from workbench.train.runs import read_run

    record = read_run(run_dir)
    started_with = record.get("data", {}).get("sha256")
    if started_with and data.get("sha256") != started_with:
        raise WorkbenchError(
            f"{record['data'].get('root')}: the training data changed since the run started "
            "(its fingerprint differs); a resumed run would not be the same run"
        )
    versions = package_versions()
    changed = {k: [record.get("versions", {}).get(k), v] for k, v in versions.items()
               if record.get("versions", {}).get(k) != v}  # fmt: skip
    record.setdefault("resumes", []).append(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "from_step": step,
            "versions_changed": changed,
            "device": device_info(accelerator.device),
        }
    )
    tmp = run_dir / "run.json.partial"
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / "run.json")


def _param_names(models: Models, params: dict) -> dict[str, list[str]]:
    """The names of each component's trained parameters, in the order of `params`."""
    return {
        c: [n for n, p in getattr(models, c).named_parameters() if p.requires_grad] for c in params
    }


def _check_resolution(data, configs: dict) -> None:
    vae = 2 ** (len(configs["vae"].get("block_out_channels", [0] * 4)) - 1)
    unet = 2 ** (len(configs["unet"].get("block_out_channels", [0] * 4)) - 1)
    field = "bucket_step" if data.aspect_buckets else "resolution"
    value = getattr(data, field)
    if value % (vae * unet):
        raise WorkbenchError(
            f"data.{field}: {value} is not a multiple of {vae * unet} "
            f"(VAE downsampling {vae} x UNet downsampling {unet} for this model)"
        )


def _set_trainable(models: Models, recipe: Recipe) -> dict[str, list[torch.nn.Parameter]]:
    """requires_grad per the recipe; returns the trainable parameters of each trained component."""
    models.vae.requires_grad_(False).eval()
    te = recipe.text_encoder
    for component in COMPONENTS:
        module = getattr(models, component)
        module.requires_grad_(recipe.trains(component))
        module.train(recipe.trains(component))
    if recipe.trains("text_encoder"):
        freeze_text_encoder(
            models.text_encoder, te.unfreeze_last_n_layers, te.freeze_embeddings, te.freeze_final_layer_norm
        )
    params = {c: trainable(getattr(models, c)) for c in COMPONENTS if recipe.trains(c)}
    if "text_encoder" in params and not params["text_encoder"]:
        raise WorkbenchError(
            "text_encoder: every text encoder parameter is frozen by the freezing options; "
            "set text_encoder.train: false instead"
        )
    return params


def _frozen_summary(models: Models) -> dict:
    out = {}
    for component in COMPONENTS:
        module = getattr(models, component)
        total = sum(p.numel() for p in module.parameters())
        out[component] = {
            "params": total,
            "trained": sum(p.numel() for p in module.parameters() if p.requires_grad),
        }
    return out


def _sha256_file(path: Path) -> str | None:
    """The base checkpoint's sha256 (cached by path, size and mtime, as wb inspect does)."""
    if not path.is_file():
        return None  # a diffusers folder: no single file to hash
    from workbench.checkpoint.hashing import sha256_file

    return sha256_file(path)


def _class_name(optimizer) -> str:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    return f"{type(inner).__module__}.{type(inner).__name__}"


# --- what happens between steps: logging, validation, saving, sampling --------------------------


class _RunState:
    """Bookkeeping around the loop, kept out of it so the loop stays readable."""

    def __init__(self, recipe, run_dir, models, spec, base_metadata, accelerator, log, progress, total_steps):
        self.recipe, self.run_dir, self.models, self.spec = recipe, run_dir, models, spec
        self.base_metadata, self.accelerator, self.log = base_metadata, accelerator, log
        self.progress, self.total_steps = progress, total_steps
        self.name = recipe.saving.name or run_dir.resolve().name
        self.checkpoints: list[Path] = []
        self.ema_checkpoints: list[Path] = []
        self.ema: EMA | None = None
        self.param_names: dict[str, list[str]] = {}
        self.val_losses: list[tuple[int, float]] = []
        self.last_loss: float | None = None
        self.last_eval_step: int | None = None
        self.last_saved_step: int | None = None
        self.last_save_time = time.time()
        self.last_sample_step: int | None = None
        self.stopped: str | None = None
        self.message: str | None = None
        self.val_set = self.stable_set = None
        self.checkpointing = True
        self.stop_when: Callable[[Progress], str | None] | None = None
        # what a resumable state holds, set by the loop
        self.optimizers: dict = {}
        self.schedulers: dict = {}
        self.trained_components: tuple[str, ...] = ()
        self.generator: torch.Generator | None = None
        self.position = (0, 0)  # (epoch, micro-batches of it seen)
        self.train_seconds = 0.0
        self.state_path: Path | None = None

    def restore(self, saved: RunProgress) -> None:
        self.last_loss, self.val_losses = saved.last_loss, list(saved.val_losses)
        self.checkpoints = [Path(p) for p in saved.checkpoints]
        self.ema_checkpoints = [Path(p) for p in saved.ema_checkpoints]
        self.last_eval_step, self.last_saved_step = saved.last_eval_step, saved.last_saved_step
        self.last_sample_step = saved.last_sample_step

    def _report(self, step: int, epoch: int, **kw) -> None:
        p = Progress(step=step, total_steps=self.total_steps, epoch=epoch + 1, **kw)
        if self.progress is not None:
            self.progress(p)
        if self.stop_when is not None and not self.stopped:
            message = self.stop_when(p)
            if message:
                self.stopped, self.message = "stop_when", message

    def after_step(self, step: int, epoch: int, loss: float, used_lr: dict, optimizers: dict) -> None:
        self.last_loss = loss
        if self.log is not None and (step % self.recipe.logging.every_n_steps == 0 or step == 1):
            values: dict[str, float | None] = {"loss/train": loss}
            for c, lr in used_lr.items():
                values[f"lr/{c}"] = lr
                values[f"lr/d*lr/{c}"] = adapted_lr(optimizers[c], lr)
            self.log.scalars(step, epoch + 1, values)
        self._report(step, epoch, loss=loss)
        r = self.recipe
        if r.validation.enabled and r.validation.every_n_steps and step % r.validation.every_n_steps == 0:
            self.evaluate(step, epoch)
        s = r.saving
        minutes = s.every_n_minutes and time.time() - self.last_save_time >= 60 * s.every_n_minutes
        if (s.every_n_steps and step % s.every_n_steps == 0) or minutes:
            self.save(step, epoch)
        if r.sampling.prompts and r.sampling.every_n_steps and step % r.sampling.every_n_steps == 0:
            self.sample(step, epoch)

    def after_epoch(self, step: int, epoch: int, finished: bool) -> None:
        """End of epoch `epoch` (0-based). The end of the run saves and evaluates anyway."""
        r = self.recipe
        if finished:
            return
        if (
            r.validation.enabled
            and r.validation.every_n_epochs
            and (epoch + 1) % r.validation.every_n_epochs == 0
            and self.last_eval_step != step  # already measured at this step (every_n_steps)
        ):
            self.evaluate(step, epoch)
        if r.saving.every_n_epochs and (epoch + 1) % r.saving.every_n_epochs == 0:
            self.save(step, epoch)
        if r.sampling.prompts and r.sampling.every_n_epochs and (epoch + 1) % r.sampling.every_n_epochs == 0:
            self.sample(step, epoch)

    def evaluate(self, step: int, epoch: int) -> None:
        v = self.recipe.validation
        batch = v.batch_size or self.recipe.training.batch_size
        device, autocast = self.accelerator.device, self.accelerator.autocast

        def measure(dataset) -> float:
            return validation_loss(self.models, dataset, v.timesteps, v.seed, batch, device, autocast)

        val = measure(self.val_set)
        stable = measure(self.stable_set) if len(self.stable_set) else None
        ema_val = None
        if self.ema is not None:  # is the average better than the weights it averages?
            with ema_weights(self.ema):
                ema_val = measure(self.val_set)
        self.val_losses.append((step, val))
        self.last_eval_step = step
        if self.log is not None:
            values = {"loss/val": val, "loss/train_stable": stable, "loss/val_ema": ema_val}
            self.log.scalars(step, epoch + 1, values)
        self._report(step, epoch, val_loss=val)
        k = v.early_stop_after
        recent = [loss for _, loss in self.val_losses[-(k + 1) :]] if k else []
        if k and len(recent) == k + 1 and all(b > a for a, b in zip(recent, recent[1:], strict=False)):
            self.stopped = "early_stop"
            self.message = f"validation loss rose {k} evaluations in a row; stopped early at step {step}"

    def stop_on_bad_loss(self, value: float, step: int, epoch: int) -> None:
        self.stopped = "nan"
        kept = self.checkpoints or self.ema_checkpoints
        good = kept[-1] if kept else None
        kept = f"the last good checkpoint is {good}" if good else "no checkpoint had been saved yet"
        self.message = (
            f"loss is {value} at step {step} (epoch {epoch + 1}): the run stopped without applying "
            f"that step; {kept}"
        )

    def save(self, step: int, epoch: int, final: bool = False) -> Path | None:
        """A checkpoint (and, with saving.state "checkpoints", the resumable state) at `step`."""
        if not self.checkpointing or self.last_saved_step == step:
            return None
        self.last_saved_step, self.last_save_time = step, time.time()
        self.accelerator.wait_for_everyone()
        path = None
        if self.accelerator.is_main_process:
            stem = f"{self.name}-ep{epoch + 1:02d}-gs{step:05d}"
            which = self.recipe.saving.ema if self.ema is not None else "model"
            if which in ("both", "model"):
                path = self._write_checkpoint(stem, self.checkpoints, step, epoch)
            if self.ema is not None and which in ("both", "ema"):
                with ema_weights(self.ema):
                    ema_path = self._write_checkpoint(stem + "-ema", self.ema_checkpoints, step, epoch, True)
                path = path or ema_path
        if not final and self.recipe.saving.state == "checkpoints":
            self.save_state(step, "checkpoint")
        return path

    def _write_checkpoint(self, stem: str, kept: list[Path], step: int, epoch: int, ema=False) -> Path:
        """The weights the models hold now, in each of saving.format (STEM.safetensors, STEM/);
        returns the first. keep_last applies per kind (model, EMA)."""
        from workbench.checkpoint.diffusers_save import save_diffusers_folder

        s = self.recipe.saving
        metadata = self._metadata(step, epoch, ema)
        paths = []
        for fmt in s.format:
            if fmt == "single_file":
                path = save_checkpoint(self.run_dir / "checkpoints" / f"{stem}.safetensors",
                                       self.models, self.spec, metadata, s.dtype)  # fmt: skip
            else:
                modules = {c: getattr(self.models, c) for c in ("unet", "vae", "text_encoder")}
                path = save_diffusers_folder(
                    self.run_dir / "checkpoints" / stem, modules, self.models.tokenizer,
                    self.spec.configs["scheduler"], self.spec.layout, DTYPES[s.dtype], metadata,
                )  # fmt: skip
            paths.append(path)
            self.log.event(step, "checkpoint", path=str(path), **({"ema": True} if ema else {}))
        kept.append(paths[0])
        while s.keep_last and len(kept) > s.keep_last:
            old = kept.pop(0)
            for gone in (old.with_suffix(".safetensors"), old.with_suffix("")):
                if gone.is_dir():
                    shutil.rmtree(gone)
                elif gone.exists():
                    gone.unlink()
                else:
                    continue
                self.log.event(step, "checkpoint_removed", path=str(gone))
        self._report(step, epoch, note=f"saved {paths[0].name}")
        return paths[0]

    def save_state(self, step: int, reason: str) -> Path:
        epoch, seen = self.position
        saved = RunProgress(
            step=step,
            epoch=epoch,
            batches_seen=seen,
            train_seconds=round(self.train_seconds, 3),
            last_loss=self.last_loss,
            val_losses=list(self.val_losses),
            checkpoints=[str(p) for p in self.checkpoints],
            ema_checkpoints=[str(p) for p in self.ema_checkpoints],
            ema_updates=self.ema.updates if self.ema is not None else 0,
            last_eval_step=self.last_eval_step,
            last_saved_step=self.last_saved_step,
            last_sample_step=self.last_sample_step,
            reason=reason,
        )
        weights = {
            f"{c}.{k}": v
            for c in self.trained_components
            for k, v in getattr(self.models, c).state_dict().items()
        }
        if self.ema is not None:
            weights.update(ema_state(self.ema, self.param_names))
        assert self.generator is not None
        self.state_path = save_state(
            self.run_dir, saved, weights, self.optimizers, self.schedulers, self.generator, self.accelerator
        )
        if self.log is not None:
            self.log.event(step, "state", path=str(self.state_path), reason=reason)
        return self.state_path

    def interrupt(self, step: int, epoch: int) -> None:
        """Ctrl-C between two optimizer steps: a checkpoint, the resumable state, then stop."""
        self.stopped = "interrupted"
        self._report(step, epoch, note="Ctrl-C: saving a checkpoint and the resumable state")
        state = self.recipe.saving.state
        self.save(step, epoch, final=True)  # the weights as they are, for the grid
        if state != "never":
            self.save_state(step, "interrupt")
            self.message = (
                f"interrupted at step {step} of {self.total_steps}; continue with: "
                f"wb train --resume {self.run_dir}"
            )
        else:
            self.message = (
                f"interrupted at step {step} of {self.total_steps} (saving.state: never: not resumable)"
            )

    def _metadata(self, step: int, epoch: int, ema: bool = False) -> dict[str, str]:
        meta = {k: v for k, v in self.base_metadata.items() if k in KEPT_METADATA}
        record = {
            "run": str(self.run_dir),
            "epoch": epoch + 1,
            "global_step": step,
            "recipe_sha256": _sha256(json.dumps(self.recipe.to_dict(), sort_keys=True)),
        }
        if ema:
            assert self.ema is not None
            record["ema"] = {"decay": self.ema.decay, "updates": self.ema.updates}
        meta.update(
            {
                "format": "pt",
                "wb.made_by": f"wb train ({self.run_dir.name}, epoch {epoch + 1}, step {step})",
                "wb.version": __version__,
                "wb.train": json.dumps(record, sort_keys=True),
                "modelspec.title": f"{self.name} step {step}" + (" (EMA)" if ema else ""),
            }
        )
        if self.spec.configs["scheduler"].get("prediction_type") == "v_prediction":
            meta["modelspec.prediction_type"] = "v"  # what makes A1111, ComfyUI and wb sample it as v
        return meta

    def sample(self, step: int, epoch: int, final: bool = False) -> None:
        sp = self.recipe.sampling
        if not sp.prompts or (final and not sp.at_end) or self.last_sample_step == step:
            return
        self.last_sample_step = step
        if not self.accelerator.is_main_process:
            return
        paths = render_samples(
            self.models, self.spec, sp, sp.size or self.recipe.data.resolution, self.run_dir / "samples", step
        )
        self.log.event(step, "samples", paths=[str(p) for p in paths])


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def save_checkpoint(path: Path, models: Models, spec, metadata: dict[str, str], dtype: str = "fp16") -> Path:
    """The current weights as one single-file checkpoint in the LDM layout (A1111/ComfyUI/wb)."""
    from workbench.checkpoint.convert import diffusers_to_ldm
    from workbench.checkpoint.safetensors_io import save_tensors

    target = DTYPES[dtype]

    def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {
            k: (v.detach().to("cpu", target) if v.is_floating_point() else v.detach().cpu())
            for k, v in module.state_dict().items()
        }

    components = {
        "unet": state(models.unet),
        "vae": state(models.vae),
        "text_encoder": state(models.text_encoder),
    }
    family = spec.layout
    return save_tensors(path, diffusers_to_ldm(components, family, spec.configs), metadata)


def render_samples(models: Models, spec, sampling, size: int, folder: Path, step: int) -> list[Path]:
    """One image per (prompt, seed) with the current weights, with A1111-style PNG parameters."""
    from diffusers import StableDiffusionPipeline
    from diffusers import schedulers as schedulers_module
    from PIL.PngImagePlugin import PngInfo

    config = {k: v for k, v in spec.configs["scheduler"].items() if not k.startswith("_")}
    scheduler = getattr(schedulers_module, spec.configs["scheduler"].get("_class_name", "PNDMScheduler"))
    pipe = StableDiffusionPipeline(
        vae=models.vae,
        text_encoder=models.text_encoder,
        tokenizer=models.tokenizer,
        unet=models.unet,
        scheduler=scheduler.from_config(config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    modes = {m: m.training for m in (models.unet, models.text_encoder)}
    folder.mkdir(exist_ok=True)
    paths = []
    try:
        for m in modes:
            m.eval()
        for i, prompt in enumerate(sampling.prompts):
            for seed in sampling.seeds:
                g = torch.Generator().manual_seed(seed)
                image = pipe(
                    prompt,
                    num_inference_steps=sampling.steps,
                    guidance_scale=sampling.cfg,
                    height=size,
                    width=size,
                    generator=g,
                ).images[0]
                info = PngInfo()
                info.add_text(
                    "parameters",
                    (
                        f"{prompt}\nSteps: {sampling.steps}, Sampler: {scheduler.__name__}, "
                        f"CFG scale: {sampling.cfg}, Seed: {seed}, Size: {size}x{size}, Training step: {step}"
                    ),
                )
                path = folder / f"gs{step:05d}-p{i:02d}-s{seed}.png"
                image.save(path, pnginfo=info)
                paths.append(path)
    finally:
        for m, mode in modes.items():
            m.train(mode)
    return paths
