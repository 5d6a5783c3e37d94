"""LoRA module names: the kohya names wb derives from a checkpoint header equal the set kohya's own
selection rule gives (module classes of the diffusers model, LORA.md 1.1), at real depth and on tiny
models of each family."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from workbench.checkpoint.convert import build_model, diffusers_to_ldm_plan, planned_shape_dtype
from workbench.checkpoint.safetensors_io import TensorInfo, dtype_names, info_of
from workbench.configs import ARCHITECTURES, load_config
from workbench.lora.names import kohya_names_for_diffusers, lora_targets, name_index
from workbench.toy.tiny import tiny_configs, tiny_state_dict

FAMILY = {"sd15": "sd1", "sd21": "sd2", "sdxl": "sdxl"}
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _meta_models(configs):
    with torch.device("meta"):
        return {c: build_model(c, configs[c]) for c in COMPONENTS if c in configs}


def _ldm_header(models, family, configs):
    sds = {c: {k: (tuple(v.shape), v.dtype) for k, v in m.state_dict().items()} for c, m in models.items()}
    plan = diffusers_to_ldm_plan({c: sd.keys() for c, sd in sds.items()}, family, configs)
    infos = {}
    for key, src in plan.items():
        shape, dt = planned_shape_dtype(src, lambda c, k: sds[c][k])
        infos[key] = TensorInfo(dtype_names()[dt], shape)
    return infos, plan


def _kohya_rule(models, family, plan, conv: bool) -> set[str]:
    """kohya's create_modules, restated: Linear/Conv2d children of Transformer2DModel (and with
    conv_dim of ResnetBlock2D/Downsample2D/Upsample2D), CLIPAttention/CLIPMLP children of the text
    encoders; SD1/SD2 UNet names from diffusers paths, SDXL from LDM paths, TE with text_model_."""
    ldm_of = {src.keys[0]: key for key, src in plan.items() if src.component == "unet" and src.op == "copy"}
    targets = {"Transformer2DModel"} | ({"ResnetBlock2D", "Downsample2D", "Upsample2D"} if conv else set())
    names = set()
    unet = models["unet"]
    for parent_name, parent in unet.named_modules():
        if type(parent).__name__ not in targets:
            continue
        for child_name, child in parent.named_modules():
            if not isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)) or not child_name:
                continue
            path = f"{parent_name}.{child_name}"
            if family == "sdxl":
                path = ldm_of[path + ".weight"].removeprefix("model.diffusion_model.").removesuffix(".weight")
            names.add(("lora_unet." + path).replace(".", "_"))
    prefixes = {"text_encoder": "lora_te1" if family == "sdxl" else "lora_te", "text_encoder_2": "lora_te2"}
    for comp, prefix in prefixes.items():
        if comp not in models:
            continue
        for parent_name, parent in models[comp].named_modules():
            if type(parent).__name__ not in ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"):
                continue
            for child_name, child in parent.named_children():
                if isinstance(child, torch.nn.Linear):
                    path = f"{parent_name}.{child_name}".removeprefix("text_model.")
                    if family == "sd2" and path.startswith("encoder.layers.23."):
                        continue
                    names.add(f"{prefix}.text_model.{path}".replace(".", "_"))
    return names


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_real_depth_counts_and_kohya_rule(arch):
    family = FAMILY[arch]
    configs = {c: load_config(arch, c) for c in ARCHITECTURES[arch] if c in COMPONENTS}
    models = _meta_models(configs)
    infos, plan = _ldm_header(models, family, configs)
    targets = lora_targets(infos)
    counts = Counter((t.component, t.group) for t in targets.values())
    expected = {
        "sd1": {("unet", "attn"): 192, ("unet", "conv"): 86, ("text_encoder", "te"): 72},
        "sd2": {("unet", "attn"): 192, ("unet", "conv"): 86, ("text_encoder", "te"): 138},
        "sdxl": {("unet", "attn"): 722, ("unet", "conv"): 66, ("text_encoder", "te"): 72,
                 ("text_encoder_2", "te"): 192},
    }[family]  # fmt: skip
    for k, n in expected.items():
        assert counts[k] == n, k
    three = sum(1 for t in targets.values() if t.group == "conv" and t.kind == "conv")
    assert three == {"sd1": 50, "sd2": 50, "sdxl": 38}[family]
    written = {n for n, t in targets.items() if t.group in ("attn", "conv", "te")}
    assert written == _kohya_rule(models, family, plan, conv=True)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_tiny_models_follow_kohya_rule(family):
    configs = tiny_configs(family)
    models = _meta_models(configs)
    _, plan = _ldm_header(models, family, configs)
    infos = {k: info_of(v) for k, v in tiny_state_dict(family).items()}
    targets = lora_targets(infos)
    attn_te = {n for n, t in targets.items() if t.group in ("attn", "te")}
    assert attn_te == _kohya_rule(models, family, plan, conv=False)
    # Every target's LDM key exists in the checkpoint with a shape that holds the module weight.
    for t in targets.values():
        shape = infos[t.key].shape
        if t.part is not None:
            assert shape[0] == 3 * t.shape[0] and shape[1:] == t.shape[1:]
        elif t.transpose:
            assert shape == t.shape[::-1]
        else:
            assert shape == t.shape


def test_spellings_and_diffusers_names():
    infos = {k: info_of(v) for k, v in tiny_state_dict("sdxl").items()}
    targets = lora_targets(infos)
    index = name_index(targets, "sdxl")
    t = targets["lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k"]
    assert t.module == "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"
    assert index["lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k"] is t
    q = targets["lora_te2_text_model_encoder_layers_3_self_attn_k_proj"]
    assert q.key == "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight"
    assert q.part == 1 and q.rows == (32, 64)
    assert index["lora_te2_encoder_layers_3_self_attn_k_proj"] is q  # transformers-5 spelling read too
    up = targets["lora_unet_output_blocks_2_2_conv"]
    assert up.module == "up_blocks.0.upsamplers.0.conv" and up.group == "conv"
    # diffusers module paths -> kohya names, as a PEFT-trained UNet/TE would be named
    unet = _meta_models(tiny_configs("sdxl"))["unet"]
    names = kohya_names_for_diffusers("unet", unet.state_dict().keys(), "sdxl")
    assert names["up_blocks.0.upsamplers.0.conv"] == "lora_unet_output_blocks_2_2_conv"
    assert names["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"] == t.name
    lowrank = {n for n, x in targets.items() if x.component == "unet" and x.group != "norm"}
    assert set(names.values()) == lowrank
    te = kohya_names_for_diffusers("text_encoder", ["encoder.layers.0.self_attn.q_proj.weight"], "sd1")
    assert te == {"encoder.layers.0.self_attn.q_proj": "lora_te_text_model_encoder_layers_0_self_attn_q_proj"}
