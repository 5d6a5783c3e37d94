"""What happens between two optimizer steps: logging, validation, checkpoints, the resumable state
and samples. `RunState` keeps that bookkeeping (and what a resume restores) out of the loop.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from workbench import __version__
from workbench.train.diffusion import Models
from workbench.train.ema import EMA, ema_state, ema_weights
from workbench.train.optimizers import adapted_lr
from workbench.train.resume import RunProgress, save_state
from workbench.train.validation import validation_loss

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


class RunState:
    """Bookkeeping around the loop, kept out of it so the loop stays readable."""

    def __init__(self, recipe, run_dir, models, spec, base_metadata, accelerator, log, progress, total_steps):
        self.recipe, self.run_dir, self.models, self.spec = recipe, run_dir, models, spec
        self.base_metadata, self.accelerator, self.log = base_metadata, accelerator, log
        self.progress, self.total_steps = progress, total_steps
        self.name = recipe.saving.name or run_dir.resolve().name
        self.checkpoints: list[Path] = []
        self.steps_per_epoch: int | None = None  # set by the loop (fractional every_n_epochs)
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
        self.network = None  # a LoRA run's adapters (train/network.py)
        self.network_run: dict | None = None  # what its files' ss_* metadata says about the run

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
        elif r.validation.enabled and step_in_epoch_due(
            r.validation.every_n_epochs, step, self.steps_per_epoch
        ):
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
            if self.network is not None:  # a LoRA run writes kohya LoRA files (saving.format: single_file)
                from workbench.train.network import save_network

                path = self.run_dir / "checkpoints" / f"{stem}.safetensors"
                save_network(path, self.network, self.network_metadata(step, epoch, ema), s.dtype)
            elif fmt == "single_file":
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
            stem = old.name.removesuffix(".safetensors")  # (names may hold dots: "v1.5-ep01-...")
            for gone in (old.parent / f"{stem}.safetensors", old.parent / stem):
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
        if self.network is not None:  # a LoRA run: the adapters are all that trains
            weights = {f"network.{k}": v for k, v in self.network.kohya_state().items()}
        else:
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

    def network_metadata(self, step: int, epoch: int, ema: bool = False) -> dict[str, str]:
        """A LoRA checkpoint's metadata: kohya's ss_* and modelspec keys, and wb's own record."""
        from workbench.train.network import network_metadata

        wb = self._metadata(step, epoch, ema)
        run = self.network_run or {}
        run = {**run, "name": self.name, "step": step, "epoch": epoch + 1, "total_steps": self.total_steps,
               "title": wb["modelspec.title"]}  # fmt: skip
        v = self.spec.configs["scheduler"].get("prediction_type") == "v_prediction"
        meta = network_metadata(self.recipe, self.network.family, run, v_prediction=v)
        meta.update({k: wb[k] for k in ("wb.made_by", "wb.version", "wb.train")})
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


def step_in_epoch_due(every_n_epochs: float | None, step: int, steps_per_epoch: int | None) -> bool:
    """every_n_epochs under 1 (0.5: twice an epoch): EveryDream2 evaluates after batches
    ceil((i + 1) x L / d) of each epoch of L, i = 0..d-1, d = round(1 / every_n_epochs)."""
    if not every_n_epochs or every_n_epochs >= 1 or not steps_per_epoch:
        return False
    d = max(1, min(steps_per_epoch, round(1 / every_n_epochs)))
    at = {math.ceil((i + 1) * steps_per_epoch / d) for i in range(d)}
    return (step - 1) % steps_per_epoch + 1 in at


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
    if models.text_encoder_2 is not None:  # SDXL
        components["text_encoder_2"] = state(models.text_encoder_2)
    family = spec.layout
    return save_tensors(path, diffusers_to_ldm(components, family, spec.configs), metadata)


def render_samples(models: Models, spec, sampling, size: int, folder: Path, step: int) -> list[Path]:
    """One image per (prompt, seed) with the current weights, with A1111-style PNG parameters."""
    from diffusers import StableDiffusionPipeline
    from diffusers import schedulers as schedulers_module
    from PIL.PngImagePlugin import PngInfo

    config = {k: v for k, v in spec.configs["scheduler"].items() if not k.startswith("_")}
    scheduler = getattr(schedulers_module, spec.configs["scheduler"].get("_class_name", "PNDMScheduler"))
    if models.text_encoder_2 is not None:
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(
            vae=models.vae,
            text_encoder=models.text_encoder,
            text_encoder_2=models.text_encoder_2,
            tokenizer=models.tokenizer,
            tokenizer_2=models.tokenizer_2,
            unet=models.unet,
            scheduler=scheduler.from_config(config),
        )
    else:
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
    nets = (models.unet, models.text_encoder, models.text_encoder_2)
    modes = {m: m.training for m in nets if m is not None}
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
