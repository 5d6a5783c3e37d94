"""LDM <-> diffusers conversion: exact round trips for SD1/SD2/SDXL-shaped tiny models, real LDM key
names where diffusers' forward converter is lenient, and forward passes that check meaning."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from workbench.checkpoint.convert import (
    FAMILIES,
    LdmSource,
    diffusers_to_ldm,
    diffusers_to_ldm_plan,
    ldm_prefixes,
    ldm_to_diffusers,
    normalize_ldm_key,
    normalize_ldm_keys,
    planned_shape_dtype,
)
from workbench.errors import WorkbenchError
from workbench.toy.model import toy_configs

VOCAB = 1000


def clip_config(hidden=32, layers=2, act="quick_gelu", cls="CLIPTextModel", projection=16) -> dict:
    return {
        "_class_name": cls,
        "vocab_size": VOCAB,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": projection,
        "bos_token_id": VOCAB - 2,
        "eos_token_id": VOCAB - 1,
        "pad_token_id": VOCAB - 1,
    }


def tiny_vae() -> dict:
    # SD's 4-level VAE, [128, 256, 512, 512] scaled down.
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [8, 16, 32, 32],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 32,
    }


def sd15_configs() -> dict:
    """SD1.5's block structure at tiny width ([320, 640, 1280, 1280] -> [16, 32, 64, 64])."""
    unet = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "block_out_channels": [16, 32, 64, 64],
        "layers_per_block": 2,
        "attention_head_dim": 8,
        "cross_attention_dim": 32,
        "norm_num_groups": 8,
    }
    return {"unet": unet, "vae": tiny_vae(), "text_encoder": clip_config()}


def sd2_configs() -> dict:
    configs = sd15_configs()
    configs["unet"].update(use_linear_projection=True, attention_head_dim=[2, 4, 8, 8])
    configs["text_encoder"] = clip_config(act="gelu")  # OpenCLIP ViT-H as a transformers CLIPTextModel
    return configs


def sdxl_configs() -> dict:
    unet = {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [16, 32, 64],
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2, 3],
        "attention_head_dim": [2, 4, 8],
        "use_linear_projection": True,
        "cross_attention_dim": 32 + 48,  # both encoders' hidden states, concatenated
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 16 + 6 * 8,  # pooled TE2 output + 6 time ids
        "norm_num_groups": 8,
    }
    return {
        "unet": unet,
        "vae": tiny_vae(),
        "text_encoder": clip_config(),
        "text_encoder_2": clip_config(hidden=48, act="gelu", cls="CLIPTextModelWithProjection"),
    }


def build_model(name: str, config: dict, seed: int = 0):
    torch.manual_seed(seed)
    if name == "unet":
        return UNet2DConditionModel.from_config(config).eval()
    if name == "vae":
        return AutoencoderKL.from_config(config).eval()
    cls = CLIPTextModelWithProjection if config["_class_name"].endswith("Projection") else CLIPTextModel
    return cls(CLIPTextConfig.from_dict(config)).eval()


def build_state_dicts(configs: dict, seed: int = 0, dtype: torch.dtype | None = None) -> dict:
    out = {}
    for i, (name, config) in enumerate(configs.items()):
        if name == "scheduler":
            continue
        sd = build_model(name, config, seed + i).state_dict()
        out[name] = {
            k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in sd.items()
        }
    return out


def assert_identical(a: dict, b: dict) -> None:
    assert set(a) == set(b), (sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5])
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def check_round_trips(family: str, configs: dict, dtype: torch.dtype | None = None) -> dict:
    """diffusers -> LDM -> diffusers and LDM -> diffusers -> LDM, both bit-exact. Returns the LDM dict."""
    original = build_state_dicts(configs, dtype=dtype)
    ldm = diffusers_to_ldm(original, family, configs)

    prefixes = tuple(ldm_prefixes(family).values())
    assert all(key.startswith(prefixes) for key in ldm)
    for key, value in ldm.items():
        if key.endswith("position_ids"):
            assert value.dtype == torch.int64 and torch.equal(value, torch.arange(77)[None])
        elif dtype is not None:
            assert value.dtype == dtype, key

    back = ldm_to_diffusers(ldm, family, configs)
    assert set(back) == set(original)
    for name in original:
        assert_identical(back[name], original[name])
        model = build_model(name, configs[name], seed=99)
        model.load_state_dict(back[name], strict=True)

    assert_identical(diffusers_to_ldm(back, family, configs), ldm)
    return ldm


def test_toy_round_trips():
    configs = toy_configs()
    ldm = check_round_trips("sd1", configs)
    assert ldm["cond_stage_model.transformer.text_model.embeddings.position_ids"].shape == (1, 77)
    # the toy's only up level with attention is level 0, so its upsampler sits after the attention
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in ldm


@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["fp32", "fp16"])
def test_sd15_shaped_round_trips(dtype):
    check_round_trips("sd1", sd15_configs(), dtype=dtype)


def test_sd15_shaped_keys_are_the_real_ones():
    """Where diffusers' forward converter accepts either form (upsampler slot 1 or 2, Linear or 1x1
    conv attention), a round trip cannot tell us which LDM spelling is right: check real SD1.5 names."""
    configs = sd15_configs()
    ldm = diffusers_to_ldm(build_state_dicts(configs), "sd1", configs)
    unet = {k.removeprefix("model.diffusion_model."): v for k, v in ldm.items() if k.startswith("model.")}
    vae = {
        k.removeprefix("first_stage_model."): v for k, v in ldm.items() if k.startswith("first_stage_model.")
    }
    # The tensor counts of the real v1-5 file's UNet and VAE.
    assert (len(unet), len(vae)) == (686, 248)
    for key in [
        "time_embed.0.weight",
        "time_embed.2.bias",
        "input_blocks.0.0.weight",
        "input_blocks.1.0.in_layers.0.weight",
        "input_blocks.1.0.emb_layers.1.weight",
        "input_blocks.1.1.proj_in.weight",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        "input_blocks.3.0.op.weight",
        "input_blocks.4.0.skip_connection.weight",
        "input_blocks.9.0.op.bias",
        "input_blocks.11.0.out_layers.3.weight",
        "middle_block.0.in_layers.2.weight",
        "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
        "middle_block.2.out_layers.0.bias",
        "output_blocks.2.1.conv.weight",  # UpBlock2D: upsampler right after the resnet
        "output_blocks.5.2.conv.weight",  # CrossAttnUpBlock2D: after the attention
        "output_blocks.8.2.conv.bias",
        "output_blocks.11.1.proj_out.weight",
        "output_blocks.0.0.skip_connection.weight",
        "out.0.weight",
        "out.2.bias",
    ]:
        assert key in unet, key
    assert not any(k.startswith(("output_blocks.11.2", "input_blocks.12")) for k in unet)
    assert unet["input_blocks.1.1.proj_in.weight"].ndim == 4  # SD1 uses 1x1 convs there
    for key in [
        "encoder.down.0.block.1.conv2.weight",
        "encoder.down.0.downsample.conv.weight",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.mid.block_2.norm1.bias",
        "encoder.norm_out.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",  # the highest-resolution level, last to run
        "decoder.up.0.block.2.conv1.weight",
        "decoder.up.3.upsample.conv.weight",
        "decoder.mid.attn_1.proj_out.bias",
        "quant_conv.weight",
        "post_quant_conv.bias",
    ]:
        assert key in vae, key
    assert not any(k.startswith(("decoder.up.0.upsample", "encoder.down.3.downsample")) for k in vae)
    for side in ("encoder", "decoder"):
        for name in ("q", "k", "v", "proj_out"):
            assert vae[f"{side}.mid.attn_1.{name}.weight"].shape == (32, 32, 1, 1)
    te = [k for k in ldm if k.startswith("cond_stage_model.")]
    assert len(te) == 2 * 16 + 5  # 16 tensors per layer, embeddings, final norm, position_ids


def sd2_extras(ldm: dict, hidden: int, layers: int, projection: int) -> dict:
    """What a real SD2 file holds that diffusers drops: one more resblock, the projection, logit_scale."""
    torch.manual_seed(7)
    prefix = "cond_stage_model.model."
    extras = {}
    for key, value in ldm.items():
        if key.startswith(f"{prefix}transformer.resblocks.0."):
            new = key.replace("resblocks.0.", f"resblocks.{layers}.")
            extras[new] = torch.randn_like(value)
    extras[prefix + "text_projection"] = torch.randn(hidden, projection)
    extras[prefix + "logit_scale"] = torch.tensor(4.6052)
    return extras


def test_sd2_shaped_round_trips():
    configs = sd2_configs()
    original = build_state_dicts(configs)
    ldm = diffusers_to_ldm(original, "sd2", configs)
    te_keys = [k for k in ldm if k.startswith("cond_stage_model.model.")]
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in te_keys
    assert ldm["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert not any("position_ids" in k for k in ldm)  # OpenCLIP stores no position_ids
    assert len(te_keys) == 2 * 12 + 4  # token and positional embeddings, ln_final

    full = {**ldm, **sd2_extras(ldm, hidden=32, layers=2, projection=16)}
    back = ldm_to_diffusers(full, "sd2", configs)
    for name in original:
        assert_identical(back[name], original[name])
        build_model(name, configs[name], seed=99).load_state_dict(back[name], strict=True)
    again = diffusers_to_ldm(back, "sd2", configs)
    assert_identical(again, {k: full[k] for k in again})
    assert set(full) - set(again) == set(sd2_extras(ldm, 32, 2, 16))


def test_sdxl_shaped_round_trips():
    configs = sdxl_configs()
    ldm = check_round_trips("sdxl", configs)
    assert "model.diffusion_model.label_emb.0.0.weight" in ldm
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in ldm  # level 0 has no attention
    assert "model.diffusion_model.input_blocks.7.1.transformer_blocks.2.attn1.to_q.weight" in ldm
    assert "model.diffusion_model.middle_block.1.transformer_blocks.2.norm3.weight" in ldm
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in ldm
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in ldm
    assert "conditioner.embedders.0.transformer.text_model.embeddings.position_ids" in ldm
    assert ldm["conditioner.embedders.1.model.text_projection"].shape == (48, 16)  # x @ P
    # a real SDXL file also carries OpenCLIP's logit_scale: ignored on the way in
    with_scale = {**ldm, "conditioner.embedders.1.model.logit_scale": torch.tensor(4.6)}
    assert_identical(diffusers_to_ldm(ldm_to_diffusers(with_scale, "sdxl", configs), "sdxl", configs), ldm)


def test_unet_forward_is_preserved():
    """Weights in the right places mean the same function: LDM made from model A, converted back into
    a fresh, differently initialised model B, gives A's output."""
    for family, configs in (("sd1", sd15_configs()), ("sdxl", sdxl_configs())):
        config = configs["unet"]
        a = build_model("unet", config, seed=1)
        ldm = diffusers_to_ldm({"unet": a.state_dict()}, family, {"unet": config})
        assert all(k.startswith("model.diffusion_model.") for k in ldm)
        b = build_model("unet", config, seed=2)
        b.load_state_dict(ldm_to_diffusers(ldm, family, {"unet": config})["unet"], strict=True)

        torch.manual_seed(3)
        sample = torch.randn(2, 4, 16, 16)
        context = torch.randn(2, 7, config["cross_attention_dim"])
        extra = {}
        if config.get("addition_embed_type") == "text_time":
            extra["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 16), "time_ids": torch.randn(2, 6)}
        with torch.no_grad():
            want = a(sample, torch.tensor([10, 500]), context, **extra).sample
            got = b(sample, torch.tensor([10, 500]), context, **extra).sample
            fresh = build_model("unet", config, seed=2)(
                sample, torch.tensor([10, 500]), context, **extra
            ).sample
        assert torch.equal(got, want)
        assert not torch.allclose(fresh, want)  # the check would notice wrong weights


def test_open_clip_text_encoder_means_the_same():
    """SDXL's second encoder written as LDM runs in OpenCLIP's own TextTransformer and gives the
    transformers model's projected output: q/k/v order and the projection's orientation are right."""
    from open_clip.transformer import TextTransformer

    configs = sdxl_configs()
    config = configs["text_encoder_2"]
    hf = build_model("text_encoder_2", config, seed=5)
    prefix = "conditioner.embedders.1.model."
    ldm = diffusers_to_ldm({"text_encoder_2": hf.state_dict()}, "sdxl", configs)
    oc = TextTransformer(context_length=77, vocab_size=VOCAB, width=48, heads=4, layers=2, output_dim=16)
    oc.load_state_dict({k.removeprefix(prefix): v for k, v in ldm.items()}, strict=True)

    torch.manual_seed(6)
    tokens = torch.randint(0, VOCAB - 2, (2, 77))
    tokens[0, 5] = tokens[1, 12] = VOCAB - 1  # the end token both pool at
    with torch.no_grad():
        want = hf(input_ids=tokens).text_embeds
        got = oc.eval()(tokens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_plan_needs_keys_only_and_predicts_shapes():
    configs = sdxl_configs()
    sds = build_state_dicts(configs, dtype=torch.float16)
    plan = diffusers_to_ldm_plan({name: list(sd) for name, sd in sds.items()}, "sdxl", configs)
    assert all(isinstance(src, LdmSource) for src in plan.values())
    qkv = plan["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_bias"]
    assert qkv.op == "cat" and [k.split(".")[-2] for k in qkv.keys] == ["q_proj", "k_proj", "v_proj"]
    assert plan["first_stage_model.decoder.mid.attn_1.v.weight"].op == "to_conv1x1"
    ldm = diffusers_to_ldm(sds, "sdxl", configs)
    assert list(ldm) == list(plan)

    def info(component, key):
        return tuple(sds[component][key].shape), sds[component][key].dtype

    for key, src in plan.items():
        assert planned_shape_dtype(src, info) == (tuple(ldm[key].shape), ldm[key].dtype), key


def test_plan_accepts_both_clip_key_spellings():
    """transformers 5's CLIPTextModel has no `text_model.` level; older saves (and
    CLIPTextModelWithProjection) have it. Both, and a stored position_ids, give the same LDM keys."""
    configs = toy_configs()
    flat = list(build_state_dicts({"text_encoder": configs["text_encoder"]})["text_encoder"])
    assert not any(k.startswith("text_model.") for k in flat)
    nested = ["text_model." + k for k in flat] + ["text_model.embeddings.position_ids"]
    plan_flat = diffusers_to_ldm_plan({"text_encoder": flat}, "sd1", configs)
    plan_nested = diffusers_to_ldm_plan({"text_encoder": nested}, "sd1", configs)
    assert set(plan_flat) == set(plan_nested)
    ids = plan_nested["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert ids == LdmSource("text_encoder", (), "arange77")


def test_old_sd1_text_encoder_keys_are_normalised():
    configs = toy_configs()
    ldm = diffusers_to_ldm(build_state_dicts(configs), "sd1", configs)
    new_prefix = "cond_stage_model.transformer.text_model."
    old = {k.replace(new_prefix, "cond_stage_model.transformer."): v for k, v in ldm.items()}
    assert "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight" in old
    assert normalize_ldm_key("cond_stage_model.transformer.final_layer_norm.bias") == new_prefix + (
        "final_layer_norm.bias"
    )
    assert normalize_ldm_key("model.diffusion_model.out.0.weight") == "model.diffusion_model.out.0.weight"
    assert set(normalize_ldm_keys(old)) == set(ldm)
    from_old = ldm_to_diffusers(old, "sd1", configs)
    from_new = ldm_to_diffusers(ldm, "sd1", configs)
    for name in from_new:
        assert_identical(from_old[name], from_new[name])
    with pytest.raises(WorkbenchError, match="both"):
        normalize_ldm_keys(
            [new_prefix + "final_layer_norm.bias", "cond_stage_model.transformer.final_layer_norm.bias"]
        )


@pytest.mark.parametrize(
    "component, bad_key",
    [
        ("unet", "down_blocks.0.resnets.0.mystery.weight"),
        ("unet", "down_blocks.0.resnets.5.norm1.weight"),  # beyond layers_per_block
        ("vae", "decoder.up_blocks.0.attentions.0.to_q.weight"),
        ("text_encoder", "text_model.encoder.layers.0.self_attn.extra_proj.weight"),
        ("safety_checker", "vision_model.post_layernorm.weight"),
    ],
)
def test_unplaceable_key_is_named(component, bad_key):
    configs = toy_configs()
    keys = {"unet": ["conv_in.weight"], "vae": ["quant_conv.weight"], "text_encoder": []}
    keys.setdefault(component, []).append(bad_key)
    with pytest.raises(WorkbenchError, match=bad_key.replace(".", r"\.")):
        diffusers_to_ldm_plan(keys, "sd1", configs)


def test_open_clip_missing_projection_part_is_named():
    keys = [
        "text_model.encoder.layers.0.self_attn.q_proj.weight",
        "text_model.encoder.layers.0.self_attn.k_proj.weight",
    ]
    with pytest.raises(WorkbenchError, match=r"q_proj\.weight.*v projection missing"):
        diffusers_to_ldm_plan({"text_encoder": keys}, "sd2", {})


def test_ldm_to_diffusers_reports_a_mismatched_config_and_skips_absent_components():
    configs = toy_configs()
    ldm = diffusers_to_ldm(build_state_dicts(configs), "sd1", configs)
    unet_only = {k: v for k, v in ldm.items() if k.startswith("model.diffusion_model.")}
    assert set(ldm_to_diffusers(unet_only, "sd1", {"unet": configs["unet"]})) == {"unet"}

    deeper = dict(configs, text_encoder=dict(configs["text_encoder"], num_hidden_layers=6))
    with pytest.raises(WorkbenchError, match="encoder.layers.5"):
        ldm_to_diffusers(ldm, "sd1", deeper)
    wider = dict(configs, vae=dict(configs["vae"], latent_channels=8))
    with pytest.raises(WorkbenchError, match="vae: .* the config expects"):
        ldm_to_diffusers(ldm, "sd1", wider)
    with pytest.raises(WorkbenchError, match="family"):
        ldm_to_diffusers(ldm, "sd3", configs)
    assert FAMILIES == ("sd1", "sd2", "sdxl")
