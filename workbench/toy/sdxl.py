"""A tiny SDXL-shaped model: SDXL's structure (two text encoders, pooled embeddings, `text_time`
added conditioning, linear transformer projections) at the sizes of diffusers' SDXL unit tests, so
SDXL training, LoRA naming and the SDXL single-file layout can be exercised on a CPU in seconds.

UNet: block_out_channels (32, 64), transformer_layers_per_block (1, 2), cross-attention 64 wide
(TE1 32 + TE2 32, concatenated), addition_time_embed_dim 8, so the added embedding takes
32 (pooled TE2) + 6 x 8 (time ids). Both text encoders keep the real 49,408-token CLIP vocabulary,
so prompts tokenize as they do for SDXL. A 64 px image is a 32x32x4 latent.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from workbench import __version__
from workbench.toy.model import TOY_VAE

TOY_SDXL_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2],
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "cross_attention_dim": 64,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,
    "norm_num_groups": 32,
}


def _clip(cls: str, act: str) -> dict:
    return {
        "_class_name": cls,
        "vocab_size": 49408,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": 32,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 49407,
    }


TOY_SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}


def toy_sdxl_configs() -> dict[str, dict]:
    vae = {**TOY_VAE, "scaling_factor": 0.13025, "force_upcast": True}
    return copy.deepcopy(
        {
            "unet": TOY_SDXL_UNET,
            "vae": vae,
            "text_encoder": _clip("CLIPTextModel", "quick_gelu"),
            "text_encoder_2": _clip("CLIPTextModelWithProjection", "gelu"),
            "scheduler": TOY_SDXL_SCHEDULER,
        }
    )


def toy_sdxl_init(out_path: str | os.PathLike, seed: int = 0) -> Path:
    """Write a randomly initialised tiny SDXL checkpoint in the SDXL single-file (SGM) layout."""
    from workbench.checkpoint.convert import build_model, diffusers_to_ldm
    from workbench.checkpoint.safetensors_io import save_tensors

    configs = toy_sdxl_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = {n: build_model(n, configs[n]) for n in ("unet", "vae", "text_encoder", "text_encoder_2")}
    ldm = diffusers_to_ldm({n: m.state_dict() for n, m in modules.items()}, "sdxl", configs)
    metadata = {
        "format": "pt",
        "wb.diffusers_configs": json.dumps(configs, sort_keys=True),
        "wb.made_by": f"wb toy sdxl init --seed {seed}",
        "wb.version": __version__,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base",
        "modelspec.title": "wb tiny SDXL-shaped model",
    }
    return save_tensors(out_path, ldm, metadata)
