"""`train(recipe, run_dir)`: the one training loop, on accelerate.

Read it top to bottom: set up (run folder, model, data, what trains, optimizers, schedules,
run.json), then the loop, which per optimizer step does

    loss = denoising loss of a batch       (grad_accum micro-batches; a NaN/inf loss stops the run)
    backward, clip, optimizer step         (one optimizer per trained component)
    scheduler step                         (once per OPTIMIZER step)
    log / validate / save / sample         (when the recipe says so)

CPU runs in fp32; on a GPU `mixed_precision: auto` means bf16 autocast (fp16 without bf16
support). Several processes (`wb train --processes N`, or `accelerate launch -m workbench.cli train`):
each takes its shard of every global batch of N x batch_size and the same run results as one process
with that batch (see distributed.py); step counts are optimizer steps.

Checkpoints are single files in the LDM layout (what A1111, ComfyUI and `wb inspect` read), named
`checkpoints/NAME-epNN-gsNNNNN.safetensors`, NN the (1-based) epoch a step belongs to. The library
prints nothing: progress goes to the `progress` callback, results come back as a TrainResult.
Setting up lives in setup.py; what happens between steps (logging, validation, checkpoints, the
resumable state, samples) in bookkeeping.py; the state a resume needs in resume.py.
"""

from __future__ import annotations

import dataclasses
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

from workbench.errors import WorkbenchError
from workbench.train.bookkeeping import Progress, RunState
from workbench.train.buckets import BucketBatchSampler, bucket_counts
from workbench.train.data import (
    CaptionedImages,
    EpochSampler,
    collate,
    fingerprint,
    read_data,
    split_examples,
    stable_subset,
    with_repeats,
    write_split,
)
from workbench.train.diffusion import Models, denoising_loss, tokenize_for
from workbench.train.distributed import Draws, global_loss, reduce_loss, sharded_loader
from workbench.train.ema import ema_load, ema_start, ema_update
from workbench.train.latent_cache import build_latent_cache, latent_sample
from workbench.train.network import check_network_unchanged, network_record, network_run_info, start_network
from workbench.train.optimizers import build_optimizer
from workbench.train.recipe import Recipe
from workbench.train.report import write_run_report
from workbench.train.resume import load_state, state_dir
from workbench.train.runs import MetricsLog, write_loss_plot, write_run_record
from workbench.train.schedules import build_scheduler, current_lr
from workbench.train.setup import (
    allow_unused_parameters,
    check_base_unchanged,
    check_resolution,
    load_model,
    load_trained_weights,
    make_accelerator,
    new_run_dir,
    param_names,
    record_resume,
    run_record,
    set_trainable,
    undo_new_run_dir,
)


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
    data_warnings: list[str] = field(default_factory=list)  # files skipped, data settings ignored
    ema_checkpoints: list[Path] = field(default_factory=list)  # with training.ema_decay
    state: Path | None = None  # RUNDIR/state/ when the run stopped resumable (Ctrl-C)
    steps_per_second: float = field(init=False)

    def __post_init__(self) -> None:
        self.steps_per_second = self.steps / self.train_seconds if self.train_seconds > 0 else 0.0


def train(*args, **kwargs) -> TrainResult:
    """See `_train`. A run refused before it started (before its run.json: a bad setting found
    while setting up, a model that is not a checkpoint, Ctrl-C) leaves nothing behind, not even the
    toy base or split.json it wrote; a run that started leaves no empty checkpoints/ folder."""
    made: list[tuple[Path, bool]] = []
    try:
        return _train(*args, **kwargs, made=made)
    except BaseException:
        for run_dir, created in made:
            undo_new_run_dir(run_dir, created)
        raise


def _train(
    recipe: Recipe,
    run_dir: str | os.PathLike,
    progress: Callable[[Progress], None] | None = None,
    source: dict | None = None,
    *,
    checkpoints: bool = True,
    lr_factor: Callable[[int], float] | None = None,
    stop_when: Callable[[Progress], str | None] | None = None,
    resume: bool = False,
    made: list | None = None,
) -> TrainResult:
    """Run `recipe` into the new folder `run_dir`. `source` (recipe path, overrides) goes to run.json;
    `made` gets the folder new_run_dir made (see `train`).

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
    data = read_data(recipe.data)  # first: no images is an error before any folder is made
    val = recipe.validation
    val_data = None
    if val.enabled and val.root:  # a folder of its own, read with the data's settings
        val_data = read_data(recipe.data.model_copy(update={"root": val.root}), "validation.root")
    accelerator = make_accelerator(Accelerator, recipe)
    device, main = accelerator.device, accelerator.is_main_process
    with accelerator.main_process_first():  # the main process makes the folder, the others use it
        run_dir = Path(run_dir) if resume or not main else new_run_dir(Path(run_dir), checkpoints, made)
    set_seed(tr.seed)
    saved = load_state(run_dir, accelerator.num_processes) if resume else None
    if resume:
        check_base_unchanged(run_dir)
        check_network_unchanged(run_dir, recipe)

    # --- the model ------------------------------------------------------------------------------
    with accelerator.main_process_first():  # (a toy base is written by the main process)
        base_path, models, spec, base_metadata = load_model(recipe, run_dir, device, resume or not main)
    check_resolution(recipe.data, spec.configs)

    # --- the data: a fixed validation split, written beside the run -----------------------------
    examples = data.examples
    if val_data is not None:  # a folder of its own: the training data stays whole
        train_examples = examples
        val_examples = val_data.examples
        stable_examples = (
            stable_subset(train_examples, val.stabilize_split, val.seed) if val.stabilize_train else []
        )
    elif val.enabled:
        train_examples, val_examples = split_examples(examples, val.split, val.seed, val.split_round_up)
        stable_examples = (
            stable_subset(train_examples, val.stabilize_split, val.seed) if val.stabilize_train else []
        )
    else:
        train_examples, val_examples, stable_examples = examples, [], []
    distinct_train, train_examples = train_examples, with_repeats(train_examples, tr.seed)
    if not train_examples:
        raise WorkbenchError("data: every training image repeats 0 times (multiply.txt); nothing to train on")
    if main:
        write_split(run_dir / "split.json", train_examples, val_examples, stable_examples)
    train_set = CaptionedImages(train_examples, recipe.data, seed=tr.seed, augment=True)
    val_set = CaptionedImages(val_examples, recipe.data, augment=False)
    stable_set = CaptionedImages(stable_examples, recipe.data, augment=False)
    if recipe.data.cache_latents != "off":  # the VAE's latents of every image, once (latent_cache.py)
        train_set.latents = build_latent_cache(
            train_set, models, recipe.data.cache_latents, accelerator, tr.batch_size
        )
    if accelerator.num_processes > 1:  # each process its shard of every global batch
        loader, sampler = sharded_loader(train_set, recipe, accelerator, collate)
        per_batch = 1  # `skip` counts global batches
    elif recipe.data.aspect_buckets:  # batches of one bucket each; `skip` below counts batches
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
    params = set_trainable(models, recipe)
    network = None
    if recipe.network is not None:  # a LoRA: the base freezes, only the adapters train (network.py)
        network, params = start_network(models, spec, recipe, accelerator)
    settings = {c: recipe.optimizer.settings(c) for c in params}
    optimizers = {c: build_optimizer(settings[c], params[c]) for c in params}
    state_weights = saved.weights() if saved is not None else {}  # the interrupted run's fp32 weights
    if saved is not None:
        load_trained_weights(models, state_weights, params, network)
    if tr.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        for te in ("text_encoder", "text_encoder_2"):
            if te in params:
                getattr(models, te).gradient_checkpointing_enable()

    # accelerate wraps what trains (DDP, autocast) and shards the data; `models` keeps the plain
    # modules, which validation, sampling and saving use.
    allow_unused_parameters(accelerator, models, recipe)
    trained = {c: accelerator.prepare(getattr(models, c)) for c in params}
    optimizers = {c: accelerator.prepare(o) for c, o in optimizers.items()}
    if accelerator.num_processes == 1:
        loader = accelerator.prepare(loader)
    steps_per_epoch = max(1, math.ceil(len(loader) / tr.grad_accum))
    total_steps = min(tr.max_steps or math.inf, (tr.max_epochs or math.inf) * steps_per_epoch)
    total_steps = int(total_steps)
    schedulers = {
        c: build_scheduler(o, recipe.schedule.for_component(c), total_steps)
        if lr_factor is None
        else torch.optim.lr_scheduler.LambdaLR(o, lr_factor)
        for c, o in optimizers.items()
    }
    step_model = dataclasses.replace(models, **trained)  # what the step calls: wrapped where trained
    ema = None
    if tr.ema_decay is not None or tr.ema_strength_target is not None:
        # EveryDream2's strength target: what is left of the starting weights' share at the end
        decay = tr.ema_decay or tr.ema_strength_target ** (tr.ema_every_n_steps / max(1, total_steps))
        ema = ema_start(
            params, decay, tr.ema_every_n_steps, "cpu" if tr.ema_device == "cpu" else None, tr.ema_warmup
        )
        if saved is not None:
            ema_load(ema, param_names(models, params, network), state_weights, saved.progress.ema_updates)
    del state_weights

    if main and saved is None:
        record = run_record(
            recipe, source, base_path, spec, settings, optimizers, params, models, accelerator
        )
        if network is not None:
            record["network"] = network_record(network, recipe)
        record["data"] = {"root": recipe.data.root, **fingerprint(examples), "train": len(distinct_train),
                          "train_per_epoch": len(train_examples), **data.record(),
                          "validation": len(val_examples), "stabilize_train": len(stable_examples),
                          "steps_per_epoch": steps_per_epoch, "total_steps": total_steps}  # fmt: skip
        if recipe.data.aspect_buckets:
            record["data"]["buckets"] = bucket_counts(train_set.sizes)
        if train_set.latents is not None:
            record["data"]["latent_cache"] = train_set.latents.summary()
        write_run_record(run_dir, record)
    elif main:
        record_resume(run_dir, saved.progress.step, fingerprint(examples), accelerator)
    resumed_at = saved.progress.step if saved is not None else None
    log = MetricsLog(run_dir, recipe.logging.tensorboard, after_step=resumed_at) if main else None
    state = RunState(recipe, run_dir, models, spec, base_metadata, accelerator, log, progress, total_steps)
    state.val_set, state.stable_set = val_set, stable_set  # what `evaluate` measures
    state.steps_per_epoch = steps_per_epoch
    state.checkpointing, state.stop_when = checkpoints, stop_when
    state.optimizers, state.schedulers, state.trained_components = optimizers, schedulers, tuple(params)
    state.ema, state.param_names = ema, param_names(models, params, network)
    state.network = network
    if network is not None:
        state.network_run = network_run_info(run_dir, len(train_examples))

    # --- the loop ---------------------------------------------------------------------------------
    # Training noise, timesteps and latent samples come from this generator alone (validation has
    # its own); the same on every process, which draws for the global batch and keeps its rows.
    generator = torch.Generator().manual_seed(tr.seed)
    state.generator = generator
    if network is not None:
        network.generator = generator  # LoRA dropout masks draw from it (network.py)
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
                sampler.resume_at(epoch, skip * per_batch)
            state.position = (epoch, skip if epoch == first_epoch else 0)
            for batch in loader:
                state.position = (epoch, state.position[1] + 1)
                t0 = time.perf_counter()
                with accelerator.accumulate(*trained.values()):
                    with accelerator.autocast():  # bf16/fp16 on GPUs (a no-op in fp32); not the backward
                        per_example = _batch_loss(step_model, batch, generator, recipe, device)
                        loss = reduce_loss(per_example, batch, accelerator.num_processes)
                    value = global_loss(accelerator, loss)  # NaN/inf if any process's is: all stop
                    if not math.isfinite(value):
                        state.stop_on_bad_loss(value, step + 1, epoch)
                        break
                    micro_losses.append(value)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and tr.clip_grad_norm:
                        accelerator.clip_grad_norm_(
                            [p for ps in params.values() for p in ps], tr.clip_grad_norm
                        )
                    if accelerator.sync_gradients:  # each component's own norm (EveryDream2's way)
                        for c, ps in params.items():
                            if recipe.clip_grad_norm_of(c):
                                accelerator.clip_grad_norm_(ps, recipe.clip_grad_norm_of(c))
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
        data_warnings=data.warnings(),
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
    draws = Draws(generator, batch.get("shard"))  # (several processes: this shard's rows)
    with torch.no_grad():  # the VAE is never trained
        latents = latent_sample(models, batch, draws, device)  # (SDXL: the VAE in fp32)
    b = latents.shape[0]
    noise = draws.randn(latents.shape)
    if tr.zero_frequency_noise_ratio:
        # "offset noise": a per-channel constant lets the model learn overall brightness
        noise = noise + tr.zero_frequency_noise_ratio * draws.randn((b, latents.shape[1], 1, 1))
    timesteps = draws.randint(tr.timestep_min, tr.timestep_max + 1, (b,))
    ids = tokenize_for(models, batch["caption"], device)
    return denoising_loss(
        models, latents, ids, noise.to(device, latents.dtype), timesteps.to(device), tr.min_snr_gamma,
        tr.loss, (tr.huber_c, tr.huber_schedule, tr.huber_scale), time_ids=batch.get("time_ids"),
    )  # fmt: skip
