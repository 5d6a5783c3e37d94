"""Tiny SD2- and SDXL-shaped checkpoints (random weights) for tests: the real key layouts with
diffusers' test-size widths, written in the single-file (LDM) layout like the toy SD1 model.

SD2: linear transformer projections, an OpenCLIP-layout text encoder (fused q/k/v `in_proj`).
SDXL: transformer_layers_per_block (1, 2), text_time add embedding, CLIP-L + OpenCLIP-bigG layouts
(shared/docs/LORA.md 5.4).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from workbench.toy.model import TOY_TEXT_ENCODER, TOY_UNET, TOY_VAE, toy_configs

SD2_UNET = {**TOY_UNET, "use_linear_projection": True, "attention_head_dim": [2, 4]}
SDXL_UNET = {
    **TOY_UNET,
    "use_linear_projection": True,
    "attention_head_dim": [2, 4],
    "transformer_layers_per_block": [1, 2],
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,
    "cross_attention_dim": 64,
}
SD2_TE = {**TOY_TEXT_ENCODER, "hidden_act": "gelu"}
SDXL_TE2 = {**TOY_TEXT_ENCODER, "_class_name": "CLIPTextModelWithProjection", "hidden_act": "gelu"}


def tiny_configs(family: str) -> dict[str, dict]:
    """Component configs of the tiny model of `family` (sd1 is the toy)."""
    if family == "sd1":
        return {k: v for k, v in toy_configs().items() if k != "scheduler"}
    if family == "sd2":
        return copy.deepcopy({"unet": SD2_UNET, "vae": TOY_VAE, "text_encoder": SD2_TE})
    if family == "sdxl":
        return copy.deepcopy(
            {"unet": SDXL_UNET, "vae": TOY_VAE, "text_encoder": TOY_TEXT_ENCODER, "text_encoder_2": SDXL_TE2}
        )
    raise ValueError(family)


def tiny_components(family: str, seed: int = 0) -> dict:
    from workbench.checkpoint.convert import build_model

    cfg = tiny_configs(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return {name: build_model(name, c) for name, c in cfg.items()}


def tiny_state_dict(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny model's LDM state dict (float32)."""
    from workbench.checkpoint.convert import diffusers_to_ldm

    modules = tiny_components(family, seed)
    return diffusers_to_ldm({n: m.state_dict() for n, m in modules.items()}, family, tiny_configs(family))


def tiny_checkpoint(path: str | os.PathLike, family: str, seed: int = 0) -> Path:
    """Write the tiny model; its metadata carries its configs, so `build_pipeline` can build it."""
    from workbench.checkpoint.safetensors_io import save_tensors
    from workbench.toy.model import TOY_SCHEDULER, toy_metadata

    configs = {**tiny_configs(family), "scheduler": dict(TOY_SCHEDULER)}
    meta = toy_metadata(configs, f"workbench.toy.tiny {family} seed {seed}")
    meta["modelspec.architecture"] = f"wb-toy/{family}-layout"
    return save_tensors(path, tiny_state_dict(family, seed), meta)
