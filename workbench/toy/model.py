"""The toy model: a Stable-Diffusion-1-shaped model small enough to train and sample on a CPU.

Sizes follow diffusers' own fast unit tests (UNet 32/64 channels, VAE 32/64, a 5-layer 32-wide
CLIP text encoder) except the text encoder's vocabulary, which is the real 49,408-token CLIP one,
so real prompts tokenize exactly as they do for SD1.5. A 64 px image is a 32x32x4 latent.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from workbench import __version__

TOY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "norm_num_groups": 32,
}

TOY_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}

TOY_TEXT_ENCODER = {
    "_class_name": "CLIPTextModel",
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 5,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 32,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

# SD1.5's noise schedule: the toy model trains and samples exactly as the real one does.
TOY_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "prediction_type": "epsilon",
}


def toy_configs() -> dict[str, dict]:
    """Fresh copies of the toy component configs, keyed by diffusers component name."""
    return copy.deepcopy(
        {"unet": TOY_UNET, "vae": TOY_VAE, "text_encoder": TOY_TEXT_ENCODER, "scheduler": TOY_SCHEDULER}
    )


def toy_components(seed: int = 0) -> dict:
    """Randomly initialised diffusers/transformers modules of the toy model, seeded."""
    from workbench.checkpoint.convert import build_model

    cfg = toy_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {name: build_model(name, cfg[name]) for name in ("unet", "vae", "text_encoder")}


def toy_metadata(configs: dict, made_by: str) -> dict[str, str]:
    """Metadata that makes a toy file self-describing: wb rebuilds its modules from these configs."""
    return {
        "format": "pt",
        "wb.architecture": "toy",
        "wb.diffusers_configs": json.dumps(configs, sort_keys=True),
        "wb.made_by": made_by,
        "wb.version": __version__,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "wb-toy/sd1-layout",
        "modelspec.title": "wb toy model",
    }


def toy_init(out_path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a randomly initialised toy checkpoint in the SD1 single-file (LDM) layout."""
    from workbench.checkpoint.convert import diffusers_to_ldm
    from workbench.checkpoint.safetensors_io import save_tensors

    modules = toy_components(seed)
    configs = toy_configs()
    ldm = diffusers_to_ldm({name: m.state_dict() for name, m in modules.items()}, "sd1", configs)
    return save_tensors(out_path, ldm, toy_metadata(configs, f"wb toy init --seed {seed}"))
