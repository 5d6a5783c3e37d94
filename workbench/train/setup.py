"""Setting up a training run, kept out of loop.py so the loop reads top to bottom: the run folder,
the accelerator, the model and what of it trains, run.json, and the checks a resume makes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from workbench.checkpoint.files import remove_empty_dirs
from workbench.errors import WorkbenchError
from workbench.train.diffusion import Models, noise_scheduler_for
from workbench.train.distributed import world_record
from workbench.train.optimizers import freeze_text_encoder, trainable
from workbench.train.recipe import TOY_MODEL, Recipe
from workbench.train.runs import device_info, package_versions

COMPONENTS = ("unet", "text_encoder")


def run_record(recipe, source, base_path, spec, settings, optimizers, params, models, accelerator) -> dict:
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
            **world_record(accelerator),  # processes, world_size, distributed_type, backend
            "mixed_precision": accelerator.mixed_precision,
        },
    }


def new_run_dir(run_dir: Path, checkpoints: bool = True, made: list | None = None) -> Path:
    """Make the run's folder (new, or an empty one); `made` gets (run_dir, whether it was made here)
    for undo_new_run_dir."""
    if (run_dir / "run.json").exists():
        raise WorkbenchError(f"{run_dir}: already holds a run (run.json); choose another -o folder")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise WorkbenchError(f"{run_dir}: exists and is not an empty folder; choose another -o folder")
    created = not run_dir.exists()
    (run_dir / "checkpoints" if checkpoints else run_dir).mkdir(parents=True, exist_ok=True)
    if made is not None:
        made.append((run_dir, created))
    return run_dir


def undo_new_run_dir(run_dir: Path, created: bool) -> None:
    """After a run failed: a run that never started (no run.json yet: refused while setting up, or
    stopped by Ctrl-C) leaves nothing behind. Everything in its folder is its own (new_run_dir took
    only a new or empty folder): a toy base, split.json, checkpoints/; all of it is removed, and the
    folder when new_run_dir made it. A run that started keeps its folder, less an empty checkpoints/."""
    if (run_dir / "run.json").exists():
        remove_empty_dirs(run_dir / "checkpoints")
        return
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for child in list(run_dir.iterdir()):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def make_accelerator(accelerator_cls, recipe: Recipe):
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


def load_model(recipe: Recipe, run_dir: Path, device, resume: bool = False):
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
        if spec.layout not in ("sd1", "sd2", "sdxl") or unsupported:
            what = spec.layout + (f" ({', '.join(unsupported)})" if unsupported else "")
            raise WorkbenchError(
                f"model.base: {base_path}: training {what} models is not supported yet (sd1, sd2, sdxl)"
            )
        if spec.layout != "sdxl" and recipe.sets_text_encoder_2():
            raise WorkbenchError(
                f"text_encoder_2: {base_path} is an {spec.layout} model, with one text encoder "
                "(text_encoder_2, optimizer.text_encoder_2 and schedule.text_encoder_2 are for SDXL)"
            )
        if spec.layout == "sdxl" and recipe.training.clip_skip > 1:
            raise WorkbenchError(
                f"training.clip_skip: {base_path} is an sdxl model, whose conditioning is fixed "
                "(TE1's and TE2's penultimate layers); clip skip applies to sd1/sd2 models"
            )
        if spec.layout == "sdxl" and "diffusers" in recipe.saving.format:
            raise WorkbenchError(
                "saving.format: diffusers folders are written for sd1/sd2 models; use single_file for SDXL"
            )
        modules = load_modules(ckpt, device=device, spec=spec)
        metadata = dict(ckpt.metadata)
    sdxl = spec.layout == "sdxl"
    models = Models(
        unet=modules["unet"],
        text_encoder=modules["text_encoder"],
        vae=modules["vae"],
        tokenizer=clip_tokenizer("!" if spec.layout == "sd2" else "<|endoftext|>"),
        noise_scheduler=noise_scheduler_for(spec.configs["scheduler"]),
        scaling_factor=float(spec.configs["vae"].get("scaling_factor", 0.18215)),
        text_encoder_2=modules.get("text_encoder_2") if sdxl else None,
        tokenizer_2=clip_tokenizer("!") if sdxl else None,  # OpenCLIP pads with "!" (as diffusers' SDXL)
        clip_skip=recipe.training.clip_skip,
    )
    return base_path, models, spec, metadata


def load_trained_weights(
    models: Models, weights: dict[str, torch.Tensor], params: dict, network=None
) -> None:
    """Put a saved state's fp32 weights into the trained components (all of each, strictly), or
    into the LoRA network ("network." keys) of a LoRA run."""
    if network is not None:
        mine = {k.removeprefix("network."): v for k, v in weights.items() if k.startswith("network.")}
        network.load_kohya_state(mine, "state/weights.safetensors")
        return
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


def check_base_unchanged(run_dir: Path) -> None:
    from workbench.train.runs import read_run

    base = read_run(run_dir).get("base", {})
    path = Path(base.get("path", ""))
    if base.get("sha256") and path.is_file() and _sha256_file(path) != base["sha256"]:
        raise WorkbenchError(f"{path}: the base checkpoint changed since the run started (sha256 differs)")


def record_resume(run_dir: Path, step: int, data: dict, accelerator) -> None:
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


def param_names(models: Models, params: dict, network=None) -> dict[str, list[str]]:
    """The names of each component's trained parameters, in the order of `params`."""
    if network is not None:
        return network.param_names()
    return {c: [n for n, p in getattr(models, c).named_parameters() if p.requires_grad] for c in params}


def check_resolution(data, configs: dict) -> None:
    vae = 2 ** (len(configs["vae"].get("block_out_channels", [0] * 4)) - 1)
    unet = 2 ** (len(configs["unet"].get("block_out_channels", [0] * 4)) - 1)
    field = "bucket_step" if data.aspect_buckets else "resolution"
    value = getattr(data, field)
    if value % (vae * unet):
        raise WorkbenchError(
            f"data.{field}: {value} is not a multiple of {vae * unet} "
            f"(VAE downsampling {vae} x UNet downsampling {unet} for this model)"
        )


def allow_unused_parameters(accelerator, models: Models, recipe: Recipe) -> None:
    """Tell DDP (several processes) that some trained parameters get no gradient: the text encoder
    layers past the conditioning's (SDXL's TE1 stops at its penultimate layer, clip skip n at its
    n-th last). Unused everywhere, they keep no gradient and stay put, as in one process."""
    if accelerator.num_processes > 1 and (models.text_encoder_2 is not None or recipe.training.clip_skip > 1):
        from accelerate.utils import DistributedDataParallelKwargs

        accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)


def components_of(models: Models) -> tuple[str, ...]:
    """The trainable components the model has: SDXL adds text_encoder_2."""
    return COMPONENTS + (("text_encoder_2",) if models.text_encoder_2 is not None else ())


def set_trainable(models: Models, recipe: Recipe) -> dict[str, list[torch.nn.Parameter]]:
    """requires_grad per the recipe; returns the trainable parameters of each trained component."""
    models.vae.requires_grad_(False).eval()
    for component in components_of(models):
        module = getattr(models, component)
        module.requires_grad_(recipe.trains(component))
        module.train(recipe.trains(component))
    for component in components_of(models)[1:]:
        te = recipe.text_encoder_section(component)
        if recipe.trains(component):
            freeze_text_encoder(
                getattr(models, component), te.unfreeze_last_n_layers, te.freeze_embeddings,
                te.freeze_final_layer_norm, te.freeze_first_n_layers,
            )  # fmt: skip
    params = {c: trainable(getattr(models, c)) for c in components_of(models) if recipe.trains(c)}
    for te in ("text_encoder", "text_encoder_2"):
        if te in params and not params[te]:
            raise WorkbenchError(
                f"{te}: every text encoder parameter is frozen by the freezing options; "
                f"set {te}.train: false instead"
            )
    return params


def _frozen_summary(models: Models) -> dict:
    out = {}
    for component in components_of(models):
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
