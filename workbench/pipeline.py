"""Build a diffusers pipeline from any supported checkpoint, with no network.

Model configs come from the package (SD1.5, SD2.1, SDXL base) or, for wb's own toy models, from
the file's metadata; the tokenizer is built from open-clip's BPE vocabulary; weights go through
the checkpoint core's LDM -> diffusers conversion. Modules are created without allocating their
random initial weights (accelerate's empty-weights context), then the checkpoint's tensors are
assigned in place, so building an SD1.5 pipeline costs little more than reading the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from workbench.checkpoint.describe import detect_architecture
from workbench.checkpoint.reader import Checkpoint, open_checkpoint
from workbench.errors import WorkbenchError

CONFIG_SET = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


@dataclass
class ModelSpec:
    """What a checkpoint needs to become a pipeline: its layout and component configs."""

    architecture: str
    layout: str
    variants: list[str]
    configs: dict[str, dict]


def model_spec(ckpt: Checkpoint) -> ModelSpec:
    architecture, layout, variants = detect_architecture(ckpt.infos, ckpt.metadata)
    if "wb.diffusers_configs" in ckpt.metadata:
        configs = json.loads(ckpt.metadata["wb.diffusers_configs"])
    elif layout in CONFIG_SET and architecture != "toy":
        from workbench.configs import load_config

        names = ["unet", "vae", "text_encoder", "scheduler"] + (
            ["text_encoder_2"] if layout == "sdxl" else []
        )
        configs = {n: load_config(CONFIG_SET[layout], n) for n in names}
    else:
        raise WorkbenchError(
            f"{ckpt.path}: cannot build a pipeline for architecture {architecture} ({layout} layout): "
            "no model config is known for it"
        )
    configs = {k: dict(v) for k, v in configs.items()}
    unet = configs["unet"]
    conv_in = ckpt.infos.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None:
        unet["in_channels"] = conv_in.shape[1]  # inpainting (9) and instruct-pix2pix (8) variants
    if "v-prediction" in variants:
        configs["scheduler"]["prediction_type"] = "v_prediction"
    return ModelSpec(architecture, layout, variants, configs)


def _kwargs(config: Mapping) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _empty_module(component: str, config: Mapping) -> torch.nn.Module:
    """A module with its parameters on the meta device (no random init), buffers real."""
    from accelerate import init_empty_weights

    from workbench.checkpoint.convert import build_model

    with init_empty_weights(include_buffers=False):
        return build_model(component, config)


def load_modules(
    source: str | os.PathLike | Checkpoint,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    spec: ModelSpec | None = None,
) -> dict[str, torch.nn.Module]:
    """The checkpoint's UNet, VAE and text encoder(s) as diffusers/transformers modules."""
    from workbench.checkpoint.convert import ldm_to_diffusers

    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    spec = spec or model_spec(ckpt)
    states = ldm_to_diffusers(ckpt, spec.layout if spec.layout != "sdxl-refiner" else "sdxl", spec.configs)
    modules = {}
    for name, state in states.items():
        module = _empty_module(name, spec.configs[name])
        state = {
            k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
            for k, v in state.items()
        }
        try:
            module.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            first = str(e).splitlines()[0]
            raise WorkbenchError(f"{ckpt.path}: the {name} does not fit its config: {first}") from None
        modules[name] = module.to(device).eval().requires_grad_(False)
    missing = [c for c in ("unet", "vae", "text_encoder") if c not in modules]
    if missing:
        raise WorkbenchError(
            f"{ckpt.path}: no {', '.join(missing)} in this checkpoint; cannot build a pipeline"
        )
    return modules


def build_pipeline(
    source: str | os.PathLike | Checkpoint,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """A diffusers StableDiffusionPipeline (or SDXL pipeline) for a checkpoint, built offline."""
    from diffusers import SchedulerMixin, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers import schedulers as schedulers_module

    from workbench.tokenizer import clip_tokenizer

    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    spec = model_spec(ckpt)
    if spec.layout == "sdxl-refiner":
        raise WorkbenchError(f"{ckpt.path}: SDXL refiner checkpoints cannot be sampled on their own")
    modules = load_modules(ckpt, dtype, device, spec)
    sched_cfg = spec.configs["scheduler"]
    sched_cls: type[SchedulerMixin] = getattr(
        schedulers_module, sched_cfg.get("_class_name", "PNDMScheduler")
    )
    scheduler = sched_cls.from_config(_kwargs(sched_cfg))
    if spec.layout == "sdxl":
        return StableDiffusionXLPipeline(
            vae=modules["vae"],
            text_encoder=modules["text_encoder"],
            text_encoder_2=modules["text_encoder_2"],
            tokenizer=clip_tokenizer("<|endoftext|>"),
            tokenizer_2=clip_tokenizer("!"),
            unet=modules["unet"],
            scheduler=scheduler,
        )
    pad = "!" if spec.layout == "sd2" else "<|endoftext|>"
    pipe = StableDiffusionPipeline(
        vae=modules["vae"],
        text_encoder=modules["text_encoder"],
        tokenizer=clip_tokenizer(pad),
        unet=modules["unet"],
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_weights_into(
    pipe, source: str | os.PathLike | Checkpoint, components: tuple[str, ...] | None = None
) -> list[str]:
    """Load another checkpoint's weights into an existing pipeline's modules, in place.

    The grid's fast path: no module is rebuilt, and a component whose tensors equal the ones
    already loaded is skipped (comparing is far cheaper than copying and re-casting). Returns
    the names of the components that changed. `components` limits the load (e.g. the UNet only).
    """
    from workbench.checkpoint.convert import ldm_to_diffusers

    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    spec = model_spec(ckpt)
    states = ldm_to_diffusers(ckpt, "sdxl" if spec.layout.startswith("sdxl") else spec.layout, spec.configs)
    changed = []
    for name, state in states.items():
        if components is not None and name not in components:
            continue
        module = getattr(pipe, name, None)
        if module is None:
            raise WorkbenchError(f"{ckpt.path}: the pipeline has no {name} to load into")
        current = module.state_dict()
        if current.keys() != state.keys() or any(current[k].shape != v.shape for k, v in state.items()):
            raise WorkbenchError(f"{ckpt.path}: its {name} does not have the pipeline's architecture")
        if all(torch.equal(current[k], v.to(current[k].dtype)) for k, v in state.items()):
            continue
        with torch.no_grad():
            for k, v in state.items():
                current[k].copy_(v)
        changed.append(name)
    return changed


VAE_FILE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def vae_state(
    source: str | os.PathLike | Checkpoint, layout: str, vae_config: Mapping
) -> dict[str, torch.Tensor]:
    """The diffusers state dict of a VAE file (A1111's `*.vae.safetensors`: LDM keys without a
    prefix) or of a checkpoint's VAE (`first_stage_model.*`)."""
    from workbench.checkpoint.convert import VAE_PREFIX, ldm_to_diffusers

    ckpt = source if isinstance(source, Checkpoint) else open_checkpoint(source)
    if any(k.startswith(VAE_PREFIX) for k in ckpt.keys()):
        part = {k: ckpt[k] for k in ckpt.keys() if k.startswith(VAE_PREFIX)}
    else:
        part = {VAE_PREFIX + k: ckpt[k] for k in ckpt.keys() if k.startswith(VAE_FILE_PREFIXES)}
    if not part:
        raise WorkbenchError(f"{ckpt.path}: no VAE tensors (first_stage_model.*, encoder.*, decoder.*)")
    family = "sdxl" if layout.startswith("sdxl") else layout if layout in ("sd1", "sd2") else "sd1"
    return ldm_to_diffusers(part, family, {"vae": vae_config})["vae"]


def load_vae_into(pipe, source: str | os.PathLike | Checkpoint, layout: str) -> bool:
    """Load a VAE file's (or another checkpoint's) VAE into the pipeline's VAE, in place.
    Returns False when its tensors equal the loaded ones (nothing copied)."""
    state = vae_state(source, layout, dict(pipe.vae.config))
    current = pipe.vae.state_dict()
    if current.keys() != state.keys() or any(current[k].shape != v.shape for k, v in state.items()):
        raise WorkbenchError(f"--vae {source}: this VAE does not fit the checkpoint's VAE (other shapes)")
    if all(torch.equal(current[k], v.to(current[k].dtype)) for k, v in state.items()):
        return False
    with torch.no_grad():
        for k, v in state.items():
            current[k].copy_(v)
    return True
