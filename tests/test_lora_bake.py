"""`wb lora bake` (library level): hand computations for a linear, a conv and a fused-qkv module;
diffusers' own load_lora_weights + fuse_lora as the oracle on the toy pipeline; refusals from
headers; the fp16 lost-change count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from workbench.errors import WorkbenchError
from workbench.lora.ops import LoraSpec, bake, parse_lora_spec
from workbench.lora.synthetic import synthetic_lora
from workbench.toy.model import toy_init
from workbench.toy.tiny import tiny_checkpoint

M = 0.8
U = "model.diffusion_model."


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("bake")
    base = toy_init(d / "base.safetensors")
    lora = synthetic_lora(d / "l.safetensors", base, rank=4, alpha=2.0)
    return d, base, lora


def test_parse_spec():
    assert parse_lora_spec("a.safetensors") == LoraSpec("a.safetensors", 1.0)
    assert parse_lora_spec("a.safetensors:0.6") == LoraSpec("a.safetensors", 0.6)
    assert parse_lora_spec("C:/x/a.safetensors:0.5:1") == LoraSpec("C:/x/a.safetensors", 0.5, 0.5, 1.0)


def test_bake_by_hand_linear_and_conv(toy):
    d, base, lora = toy
    out = bake(base, [LoraSpec(str(lora), M)], d / "out32.safetensors", dtype="fp32")
    assert out.modules == {"l": 147} and out.keys_changed == 147
    w, lf, b = load_file(base), load_file(lora), load_file(out.path)
    n = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    up, down, alpha = lf[f"{n}.lora_up.weight"], lf[f"{n}.lora_down.weight"], float(lf[f"{n}.alpha"])
    key = U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    torch.testing.assert_close(b[key], w[key] + M * alpha / 4 * (up @ down), rtol=1e-6, atol=1e-7)
    n = "lora_unet_down_blocks_0_resnets_0_conv1"  # 3x3 conv, kohya's conv2d form of the product
    up, down = lf[f"{n}.lora_up.weight"], lf[f"{n}.lora_down.weight"]
    key = U + "input_blocks.1.0.in_layers.2.weight"
    product = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    torch.testing.assert_close(b[key], w[key] + M * 0.5 * product, rtol=1e-6, atol=1e-6)
    n = "lora_unet_down_blocks_1_attentions_0_proj_in"  # SD1: 1x1 conv
    up, down = lf[f"{n}.lora_up.weight"], lf[f"{n}.lora_down.weight"]
    key = U + "input_blocks.4.1.proj_in.weight"
    want = w[key] + M * 0.5 * (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None]
    torch.testing.assert_close(b[key], want, rtol=1e-6, atol=1e-7)
    # untouched keys byte-identical: VAE, norms, position_ids
    for key in ("first_stage_model.decoder.conv_in.weight", U + "out.0.weight",
                "cond_stage_model.transformer.text_model.embeddings.position_ids"):  # fmt: skip
        assert torch.equal(b[key], w[key]) and b[key].dtype == w[key].dtype
    # strength 0 gives the input bytes back
    zero = bake(base, [LoraSpec(str(lora), 0.0)], d / "zero.safetensors", dtype="fp32")
    z = load_file(zero.path)
    assert all(torch.equal(z[k], w[k]) for k in w)


def test_bake_fused_qkv_sd2(tmp_path):
    base = tiny_checkpoint(tmp_path / "sd2.safetensors", "sd2")
    lora = synthetic_lora(tmp_path / "l2.safetensors", base, rank=2, alpha=1.0, groups=("attn", "te"))
    out = bake(base, [LoraSpec(str(lora), M)], tmp_path / "o.safetensors", dtype="fp32")
    w, lf, b = load_file(base), load_file(lora), load_file(out.path)
    key = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"
    parts = []
    for i, p in enumerate("qkv"):
        n = f"lora_te_text_model_encoder_layers_1_self_attn_{p}_proj"
        up, down = lf[f"{n}.lora_up.weight"], lf[f"{n}.lora_down.weight"]
        parts.append(w[key][32 * i : 32 * (i + 1)] + M * 0.5 * (up @ down))
    torch.testing.assert_close(b[key], torch.cat(parts), rtol=1e-6, atol=1e-7)
    n = "lora_te_text_model_encoder_layers_1_mlp_fc2"
    key = "cond_stage_model.model.transformer.resblocks.1.mlp.c_proj.weight"
    want = w[key] + M * 0.5 * (lf[f"{n}.lora_up.weight"] @ lf[f"{n}.lora_down.weight"])
    torch.testing.assert_close(b[key], want, rtol=1e-6, atol=1e-7)


def test_diffusers_is_the_oracle(toy):
    """A LoRA written by wb loads in diffusers; its fused weights equal wb's bake (fp32)."""
    pytest.importorskip("peft")
    from workbench.pipeline import build_pipeline

    d, base, lora = toy
    baked = bake(base, [LoraSpec(str(lora), M)], d / "oracle.safetensors", dtype="fp32")
    pipe = build_pipeline(base)
    pipe.load_lora_weights(str(lora), adapter_name="t")
    wrapped = sum(hasattr(m, "lora_A") for c in (pipe.unet, pipe.text_encoder) for m in c.modules())
    assert wrapped == 147
    pipe.fuse_lora(lora_scale=M)
    pipe.unload_lora_weights()
    ours = build_pipeline(baked.path)
    for comp in ("unet", "text_encoder"):
        theirs_sd, ours_sd = getattr(pipe, comp).state_dict(), getattr(ours, comp).state_dict()
        assert theirs_sd.keys() == ours_sd.keys()
        worst = max(float((theirs_sd[k] - ours_sd[k]).abs().max()) for k in ours_sd)
        assert worst < 1e-6, comp
    moved = build_pipeline(base).unet.state_dict()["down_blocks.1.attentions.0.proj_in.weight"]
    assert (
        float((moved - ours.unet.state_dict()["down_blocks.1.attentions.0.proj_in.weight"]).abs().max())
        > 1e-3
    )


def test_refusals_from_headers(toy, tmp_path):
    d, base, lora = toy
    sdxl = tiny_checkpoint(tmp_path / "xl.safetensors", "sdxl")
    xl_lora = synthetic_lora(tmp_path / "xl_lora.safetensors", sdxl, rank=2, groups=("attn",))
    with pytest.raises(
        WorkbenchError, match=r"is a LoRA for sdxl \(from its keys\), .* is sd1: refused before"
    ):
        bake(base, [LoraSpec(str(xl_lora))], tmp_path / "o.safetensors")
    # a module whose shape does not fit, in a LoRA with no family cue
    sd = load_file(lora)
    n = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    bad = {k: v for k, v in sd.items() if k.startswith(n)}
    bad[f"{n}.lora_down.weight"] = torch.zeros(4, 48)
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(
        WorkbenchError, match=rf"module {n} changes a \[64, 48\] weight, .*attn2.to_k.weight is \[64, 32\]"
    ):
        bake(base, [LoraSpec(str(tmp_path / "bad.safetensors"))], tmp_path / "o.safetensors")
    # modules matching nothing: how many and which
    sd2 = {
        k.replace("down_blocks_1_", "down_blocks_7_"): v
        for k, v in sd.items()
        if "down_blocks_1_attentions_0_proj" in k
    }
    save_file(sd2, tmp_path / "none.safetensors")
    with pytest.raises(
        WorkbenchError, match=r"2 of 2 modules match nothing in .*base.safetensors \(lora_unet_down_blocks_7"
    ):
        bake(base, [LoraSpec(str(tmp_path / "none.safetensors"))], tmp_path / "o.safetensors")
    # a NaN in a factor: refused naming the module, nothing written
    nan = {k: v.clone() for k, v in sd.items() if "down_blocks_1_attentions_0_proj" in k}
    nan["lora_unet_down_blocks_1_attentions_0_proj_out.lora_up.weight"][0, 0] = float("nan")
    save_file(nan, tmp_path / "nan.safetensors")
    with pytest.raises(
        WorkbenchError,
        match=r"module lora_unet_down_blocks_1_attentions_0_proj_out: .*lora_up.weight is not finite",
    ):
        bake(base, [LoraSpec(str(tmp_path / "nan.safetensors"))], tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.safetensors")]


def test_fp16_lost_changes_counted(toy):
    d, base, lora = toy
    res = bake(base, [LoraSpec(str(lora), 1e-5)], d / "tiny16.safetensors", dtype="fp16")
    lost, touched = res.lost["l"]
    w, lf, b = load_file(base), load_file(lora), load_file(res.path)
    # independent count on one key: changes that fp16 cannot hold
    n = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
    key = U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"
    delta = 1e-5 * 0.5 * (lf[f"{n}.lora_up.weight"] @ lf[f"{n}.lora_down.weight"])
    assert torch.equal(b[key], (w[key] + delta).half())
    assert 0 < lost <= touched
    full = bake(base, [LoraSpec(str(lora), 1.0)], d / "full16.safetensors", dtype="fp16")
    assert full.lost["l"][0] < lost


def _fused(pipe, lora, scale, components):
    pipe.load_lora_weights(str(lora), adapter_name="t")
    wrapped = sum(hasattr(m, "lora_A") for c in components for m in getattr(pipe, c).modules())
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return wrapped


def test_sdxl_names_and_bake_match_diffusers(tmp_path):
    """LORA.md 5.4: an SDXL LoRA written with kohya's names (LDM UNet paths, te1/te2) loads in diffusers'
    SDXL loader and fuses onto exactly the modules wb's bake changes (3x3 convs, op, upsamplers)."""
    pytest.importorskip("peft")
    from workbench.pipeline import build_pipeline

    base = tiny_checkpoint(tmp_path / "xl.safetensors", "sdxl")
    lora = synthetic_lora(tmp_path / "xl_lora.safetensors", base, rank=2, alpha=1.0)
    n_modules = len([k for k in load_file(lora) if k.endswith(".alpha")])
    baked = bake(base, [LoraSpec(str(lora), M)], tmp_path / "baked.safetensors", dtype="fp32")
    comps = ("unet", "text_encoder", "text_encoder_2")
    pipe = build_pipeline(base)
    assert _fused(pipe, lora, M, comps) == n_modules == 132 + 45 + 30 + 30
    ours = build_pipeline(baked.path)
    for comp in comps:
        theirs_sd, ours_sd = getattr(pipe, comp).state_dict(), getattr(ours, comp).state_dict()
        worst = max(float((theirs_sd[k] - ours_sd[k]).abs().max()) for k in ours_sd)
        assert worst < 1e-6, comp


def test_diffusers_peft_file_bakes_like_kohya(toy, tmp_path):
    """The same adapter saved by diffusers in its PEFT format (lora_A/lora_B, alpha in the adapter
    metadata) bakes to the same weights as the kohya file."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    from workbench.pipeline import build_pipeline

    d, base, lora = toy
    pipe = build_pipeline(base)
    pipe.load_lora_weights(str(lora), adapter_name="t")
    unet_cfg = pipe.unet.peft_config["t"].to_dict()
    te_cfg = pipe.text_encoder.peft_config["t"].to_dict()
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="t"),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name="t"),
        unet_lora_adapter_metadata=unet_cfg, text_encoder_lora_adapter_metadata=te_cfg,
    )  # fmt: skip
    peft_file = tmp_path / "pytorch_lora_weights.safetensors"
    assert any(".lora_A." in k for k in load_file(peft_file))
    a = bake(base, [LoraSpec(str(lora), M)], tmp_path / "a.safetensors", dtype="fp32")
    b = bake(base, [LoraSpec(str(peft_file), M)], tmp_path / "b.safetensors", dtype="fp32")
    assert a.keys_changed == b.keys_changed == 147
    wa, wb_ = load_file(a.path), load_file(b.path)
    assert max(float((wa[k] - wb_[k]).abs().max()) for k in wa if wa[k].is_floating_point()) < 1e-6


def test_loha_and_lokr_bake_by_hand(toy, tmp_path):
    d, base, _ = toy
    g = torch.Generator().manual_seed(9)

    def rnd(*shape):
        return torch.randn(*shape, generator=g)

    n1 = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"  # Linear [64, 256]
    n2 = "lora_te_text_model_encoder_layers_3_self_attn_out_proj"  # Linear [32, 32]
    sd = {
        f"{n1}.hada_w1_a": rnd(64, 2), f"{n1}.hada_w1_b": rnd(2, 256),
        f"{n1}.hada_w2_a": rnd(64, 2), f"{n1}.hada_w2_b": rnd(2, 256),
        f"{n1}.alpha": torch.tensor(1.0),
        f"{n2}.lokr_w1": rnd(4, 4), f"{n2}.lokr_w2_a": rnd(8, 1),
        f"{n2}.lokr_w2_b": rnd(1, 8), f"{n2}.alpha": torch.tensor(0.5),
    }  # fmt: skip
    save_file(sd, tmp_path / "lyco.safetensors")
    out = bake(
        base, [LoraSpec(str(tmp_path / "lyco.safetensors"), 0.5)], tmp_path / "o.safetensors", dtype="fp32"
    )
    w, b = load_file(base), load_file(out.path)
    key = U + "input_blocks.4.1.transformer_blocks.0.ff.net.2.weight"
    loha = (sd[f"{n1}.hada_w1_a"] @ sd[f"{n1}.hada_w1_b"]) * (sd[f"{n1}.hada_w2_a"] @ sd[f"{n1}.hada_w2_b"])
    torch.testing.assert_close(b[key], w[key] + 0.5 * 0.5 * loha, rtol=1e-6, atol=1e-6)
    key = "cond_stage_model.transformer.text_model.encoder.layers.3.self_attn.out_proj.weight"
    lokr = torch.kron(sd[f"{n2}.lokr_w1"], sd[f"{n2}.lokr_w2_a"] @ sd[f"{n2}.lokr_w2_b"]) * (0.5 / 1)
    torch.testing.assert_close(b[key], w[key] + 0.5 * lokr, rtol=1e-6, atol=1e-6)


def test_row_blocks_cross_the_qkv_slices(tmp_path, monkeypatch):
    """The engine bakes plain LoRAs a block of whole rows at a time. With blocks of 5 rows, blocks
    straddle the q/k/v slices of a fused SD2 in_proj (rows 32 and 64): the result is still the hand
    computation, and the fp16 lost-change count agrees with one made independently from the fp32
    bake."""
    import workbench.merge.plan as merge_plan

    monkeypatch.setattr(merge_plan, "CHUNK", 5 * 32)
    base = tiny_checkpoint(tmp_path / "sd2.safetensors", "sd2")
    lora = synthetic_lora(tmp_path / "l2.safetensors", base, rank=2, alpha=1.0, groups=("attn", "te"))
    s = 2e-4
    o32 = bake(base, [LoraSpec(str(lora), s)], tmp_path / "o32.safetensors", dtype="fp32")
    o16 = bake(base, [LoraSpec(str(lora), s)], tmp_path / "o16.safetensors", dtype="fp16")
    w, lf, b32, b16 = (load_file(p) for p in (base, lora, o32.path, o16.path))
    key = "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"
    parts = []
    for p in "qkv":
        n = f"lora_te_text_model_encoder_layers_1_self_attn_{p}_proj"
        parts.append(s * 0.5 * (lf[f"{n}.lora_up.weight"] @ lf[f"{n}.lora_down.weight"]))
    want = w[key] + torch.cat(parts)
    torch.testing.assert_close(b32[key], want, rtol=1e-6, atol=1e-9)
    assert torch.equal(b16[key], want.half())
    # independent count: entries the fp32 bake moved that the fp16 cast puts back where they were
    moved = lost = 0
    for k, before in w.items():
        if not before.is_floating_point() or torch.equal(b32[k], before):
            continue
        changed = b32[k] != before
        moved += int(changed.sum())
        lost += int((changed & (b32[k].half() == before.half())).sum())
    assert 0 < lost < moved
    # wb counts every entry of a nonzero product; the few whose change vanishes even in fp32 are
    # invisible above, and are both touched and lost
    wb_lost, wb_touched = o16.lost["l2"]
    absorbed = wb_touched - moved
    assert wb_lost - lost == absorbed and 0 <= absorbed < moved // 100
