"""LoRA extras: the changes no low-rank module holds (biases, norms, conv_in/conv_out, the time and
add embeddings), written by `wb lora extract` in the keys ComfyUI and A1111 read (`diff_b`,
`w_norm`/`b_norm`, `diff`), read, counted by `wb inspect` and baked by `wb lora bake`.

Key names are hand-written from ComfyUI's mapping (comfy/utils.py unet_to_diffusers: conv_in <->
input_blocks.0.0, time_embedding.linear_1 <-> time_embed.0, norm1 <-> in_layers.0, conv_norm_out <->
out.0; model_lora_keys_unet also maps every `lora_unet_<LDM path>`), as docs/lora.md lists them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_lora_cli import ok, one_error_line

from workbench.checkpoint.reader import open_checkpoint
from workbench.lora.ops import LoraSpec, bake
from workbench.toy.model import toy_init
from workbench.toy.tiny import tiny_checkpoint

U = "model.diffusion_model."
TE = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn."


def _planted(base, path, changes: dict[str, torch.Tensor]):
    """base + the given changes (fp32), with the base's metadata."""
    sd = {k: v.to(torch.float32) if v.is_floating_point() else v for k, v in load_file(base).items()}
    for k, delta in changes.items():
        sd[k] = sd[k] + delta
    with open_checkpoint(base) as c:
        save_file(sd, path, metadata=dict(c.metadata))
    return path


def _extras_of(path) -> dict[str, torch.Tensor]:
    return {
        k: v
        for k, v in load_file(path).items()
        if k.rsplit(".", 1)[-1] in ("diff", "diff_b", "w_norm", "b_norm")
    }


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    d = tmp_path_factory.mktemp("extras")
    base = toy_init(d / "base.safetensors")
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return 0.01 * torch.randn(*shape, generator=g)

    to_out = U + "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0."
    changes = {
        to_out + "weight": r(64, 2) @ r(2, 64) * 100,  # rank 2: a LoRA module holds it exactly
        to_out + "bias": r(64),  # -> diff_b of that module
        U + "input_blocks.1.0.in_layers.0.weight": r(32),  # a ResNet norm1: w_norm + b_norm
        U + "input_blocks.1.0.in_layers.0.bias": r(32),
        U + "out.0.weight": r(32),  # conv_norm_out: w_norm (+ b_norm of zeros, as A1111 needs both)
        U + "input_blocks.0.0.weight": r(32, 4, 3, 3),  # conv_in: diff + diff_b
        U + "input_blocks.0.0.bias": r(32),
        U + "time_embed.0.weight": r(128, 32),  # time_embedding.linear_1: diff only (bias unchanged)
        TE + "q_proj.bias": r(32),  # a TE module whose weight is unchanged: diff (zeros) + diff_b
    }
    tuned = _planted(base, d / "tuned.safetensors", changes)
    return d, base, tuned, changes


def test_extract_writes_comfyui_names_and_bake_round_trips_exactly(sd1):
    d, base, tuned, changes = sd1
    out = d / "ex.safetensors"
    res = ok(["lora", "extract", tuned, base, "--rank", 4, "--dtype", "fp32", "-o", out])
    text = " ".join(res.output.split())
    assert "+ extras, exact: 1 bias changes (diff_b), 2 norm modules (w_norm, b_norm), 3 full modules" in text
    assert "diffusers' load_lora_weights refuses such a file" in text
    got = _extras_of(out)
    n_out = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0"
    n_norm, n_q = (
        "lora_unet_down_blocks_0_resnets_0_norm1",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    )
    assert set(got) == {
        f"{n_out}.diff_b",
        f"{n_norm}.w_norm", f"{n_norm}.b_norm",
        "lora_unet_out_0.w_norm", "lora_unet_out_0.b_norm",  # conv_norm_out, in its LDM spelling
        "lora_unet_conv_in.diff", "lora_unet_conv_in.diff_b",
        "lora_unet_time_embedding_linear_1.diff",
        f"{n_q}.diff", f"{n_q}.diff_b",
    }  # fmt: skip
    to_out = U + "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0."
    torch.testing.assert_close(got[f"{n_out}.diff_b"], changes[to_out + "bias"], rtol=0, atol=1e-7)
    torch.testing.assert_close(
        got["lora_unet_conv_in.diff"], changes[U + "input_blocks.0.0.weight"], rtol=0, atol=1e-7
    )
    assert not got["lora_unet_out_0.b_norm"].any() and not got[f"{n_q}.diff"].any()
    assert f"{n_out}.lora_up.weight" in load_file(out)  # the weight still as a LoRA module
    # bake it back: every tensor of the fine-tune again
    ok(["lora", "bake", base, out, "--dtype", "fp32", "-o", d / "back.safetensors"])
    back, t, b = load_file(d / "back.safetensors"), load_file(tuned), load_file(base)
    for k in t:
        if t[k].is_floating_point():
            assert float((back[k].double() - t[k].double()).abs().max()) < 1e-6, k
    assert not torch.equal(back[TE + "q_proj.bias"], b[TE + "q_proj.bias"])
    # --lora-only: the same LoRA modules, no extra key
    ok(["lora", "extract", tuned, base, "--rank", 4, "--lora-only", "-o", d / "pure.safetensors"])
    assert not _extras_of(d / "pure.safetensors")


def test_inspect_counts_extras(sd1):
    d, base, tuned, _ = sd1
    out = d / "ex_i.safetensors"
    ok(["lora", "extract", tuned, base, "--rank", 4, "-o", out])
    meta = json.loads(ok(["inspect", "--json", "--no-hash", out]).output)
    assert meta["extras"] == {"diff_b": 1, "norm": 2, "full": 3}
    assert meta["kind"] == "lora" and meta["modules"] == 1 + 2 + 3  # to_out (lora) + norms + full
    assert meta["groups"]["UNet norm"]["ranks"] == {"norm": 2}
    assert meta["extra_params"] == 64 + 2 * 32 + 2 * 32 + (32 * 36 + 32) + 128 * 32 + (32 * 32 + 32)
    assert "extras (whole changes, no rank)" in " ".join(ok(["inspect", "--no-hash", out]).output.split())


def test_bake_extras_by_hand(tmp_path):
    """W + m * diff, b + m * diff_b, norms + m * w_norm / b_norm; a LoRA module's diff_b next to
    its up/down: W + m * up @ down, b + m * diff_b."""
    base = toy_init(tmp_path / "base.safetensors")
    g = torch.Generator().manual_seed(1)
    n_ff = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"
    lora = {
        "lora_unet_conv_out.diff": torch.randn(4, 32, 3, 3, generator=g),
        "lora_unet_conv_out.diff_b": torch.randn(4, generator=g),
        "lora_unet_up_blocks_1_resnets_0_norm2.w_norm": torch.randn(32, generator=g),
        "lora_unet_up_blocks_1_resnets_0_norm2.b_norm": torch.randn(32, generator=g),
        f"{n_ff}.lora_up.weight": torch.randn(64, 2, generator=g),
        f"{n_ff}.lora_down.weight": torch.randn(2, 256, generator=g),
        f"{n_ff}.alpha": torch.tensor(1.0),
        f"{n_ff}.diff_b": torch.randn(64, generator=g),
    }
    save_file(lora, tmp_path / "x.safetensors")
    m = 0.7
    res = bake(base, [LoraSpec(str(tmp_path / "x.safetensors"), m)], tmp_path / "o.safetensors", dtype="fp32")
    assert res.modules == {"x": 3}
    w, o = load_file(base), load_file(res.path)
    norm2 = U + "output_blocks.3.0.out_layers.0."  # up_blocks.1.resnets.0.norm2 (3 per level)
    ff = U + "input_blocks.4.1.transformer_blocks.0.ff.net.2."
    nm, up, down = (
        "lora_unet_up_blocks_1_resnets_0_norm2",
        lora[f"{n_ff}.lora_up.weight"],
        lora[f"{n_ff}.lora_down.weight"],
    )
    want = {
        U + "out.2.weight": w[U + "out.2.weight"].float() + m * lora["lora_unet_conv_out.diff"],
        U + "out.2.bias": w[U + "out.2.bias"].float() + m * lora["lora_unet_conv_out.diff_b"],
        norm2 + "weight": w[norm2 + "weight"].float() + m * lora[f"{nm}.w_norm"],
        norm2 + "bias": w[norm2 + "bias"].float() + m * lora[f"{nm}.b_norm"],
        ff + "weight": w[ff + "weight"].float() + m * 0.5 * up @ down,  # alpha 1 / rank 2
        ff + "bias": w[ff + "bias"].float() + m * lora[f"{n_ff}.diff_b"],
    }
    for k, v in want.items():
        torch.testing.assert_close(o[k], v, rtol=1e-6, atol=1e-6)
    changed = {k for k in w if w[k].is_floating_point() and not torch.equal(o[k].to(w[k].dtype), w[k])}
    assert changed == set(want)


def test_bias_shape_mismatch_refused_from_headers(tmp_path):
    base = toy_init(tmp_path / "base.safetensors")
    bad = {"lora_unet_conv_in.diff": torch.zeros(32, 4, 3, 3), "lora_unet_conv_in.diff_b": torch.zeros(31)}
    save_file(bad, tmp_path / "bad.safetensors")
    out = tmp_path / "o.safetensors"
    line = one_error_line(["lora", "bake", base, tmp_path / "bad.safetensors", "-o", out])
    assert "lora_unet_conv_in.diff_b is [31]" in line and "[32, 4, 3, 3]" in line
    # consistent in itself, but not the base's shape: a 7-channel norm on a 32-channel one
    norm = {
        "lora_unet_conv_norm_out.w_norm": torch.zeros(7),
        "lora_unet_conv_norm_out.b_norm": torch.zeros(7),
    }
    save_file(norm, tmp_path / "n.safetensors")
    line = one_error_line(["lora", "bake", base, tmp_path / "n.safetensors", "-o", out])
    assert "lora_unet_conv_norm_out" in line and "[7]" in line and U + "out.0.weight is [32]" in line
    # a diff_b on a LoRA module with another width than its lora_up
    lora = {
        "lora_unet_conv_out.lora_up.weight": torch.zeros(4, 1, 1, 1),
        "lora_unet_conv_out.lora_down.weight": torch.zeros(1, 32, 3, 3),
        "lora_unet_conv_out.diff_b": torch.zeros(5),
    }
    save_file(lora, tmp_path / "l.safetensors")
    line = one_error_line(["lora", "bake", base, tmp_path / "l.safetensors", "-o", out])
    assert "lora_unet_conv_out.diff_b is [5], the module has 4 outputs" in line
    assert not out.exists()


def test_sdxl_names(tmp_path):
    """SDXL: LDM spellings, the fused OpenCLIP q/k/v bias rows as the q/k/v modules' diff_b."""
    base = tiny_checkpoint(tmp_path / "xl.safetensors", "sdxl")
    g = torch.Generator().manual_seed(2)
    in_proj = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_bias"
    k_rows = torch.zeros(96)
    k_rows[32:64] = torch.randn(32, generator=g)
    changes = {
        U + "input_blocks.0.0.bias": torch.randn(32, generator=g),  # conv_in: diff (zeros) + diff_b
        U + "label_emb.0.0.weight": torch.randn(128, 80, generator=g),  # add_embedding.linear_1
        U + "input_blocks.1.0.in_layers.0.weight": torch.randn(32, generator=g),
        in_proj: k_rows,  # only k's rows changed
    }
    tuned = _planted(base, tmp_path / "t.safetensors", changes)
    out = tmp_path / "x.safetensors"
    ok(["lora", "extract", tuned, base, "--rank", 2, "--dtype", "fp32", "-o", out])
    n_k = "lora_te2_text_model_encoder_layers_1_self_attn_k_proj"
    assert set(_extras_of(out)) == {
        "lora_unet_input_blocks_0_0.diff", "lora_unet_input_blocks_0_0.diff_b",
        "lora_unet_label_emb_0_0.diff",
        "lora_unet_input_blocks_1_0_in_layers_0.w_norm", "lora_unet_input_blocks_1_0_in_layers_0.b_norm",
        f"{n_k}.diff", f"{n_k}.diff_b",
    }  # fmt: skip
    ok(["lora", "bake", base, out, "--dtype", "fp32", "-o", tmp_path / "b.safetensors"])
    back, t = load_file(tmp_path / "b.safetensors"), load_file(tuned)
    for k in changes:
        assert float((back[k].double() - t[k].double()).abs().max()) < 1e-6, k


def test_diffusers_refuses_extras_and_loads_lora_only(sd1):
    """Evidence for the docs: diffusers' kohya converter raises on keys it does not rename
    (diff_b, w_norm, diff); the --lora-only file of the same fine-tune loads."""
    pytest.importorskip("peft")
    from workbench.pipeline import build_pipeline

    d, base, tuned, _ = sd1
    ok(["lora", "extract", tuned, base, "--rank", 4, "-o", d / "with.safetensors"])
    ok(["lora", "extract", tuned, base, "--rank", 4, "--lora-only", "-o", d / "only.safetensors"])
    pipe = build_pipeline(base)
    with pytest.raises(ValueError, match="have not been correctly renamed"):
        pipe.load_lora_weights(str(d / "with.safetensors"), adapter_name="w")
    pipe.load_lora_weights(str(d / "only.safetensors"), adapter_name="o")
    assert sum(hasattr(m, "lora_A") for m in pipe.unet.modules()) == 1


def test_resize_and_merge_carry_extras(sd1):
    """resize keeps the whole changes as they are; merge sums them with the strengths."""
    d, base, tuned, _ = sd1
    src = d / "ex_rm.safetensors"
    ok(["lora", "extract", tuned, base, "--rank", 4, "--dtype", "fp32", "-o", src])
    ok(["lora", "resize", src, "--rank", 1, "--dtype", "fp32", "-o", d / "r1.safetensors"])
    ok(["lora", "merge", f"{src}:0.7", f"{src}:0.2", "--dtype", "fp32", "-o", d / "m.safetensors"])
    before, resized, merged = (
        _extras_of(src),
        _extras_of(d / "r1.safetensors"),
        _extras_of(d / "m.safetensors"),
    )
    assert resized.keys() == before.keys() == merged.keys()
    for k, v in before.items():
        assert torch.equal(resized[k], v), k
        torch.testing.assert_close(merged[k], 0.9 * v, rtol=1e-6, atol=1e-9)


def test_grid_applies_extras_in_place_and_restores(tmp_path):
    """wb grid's in-place LoRAs: diff_b on the bias, w_norm/b_norm on the norm, diff on conv_in."""
    from workbench.grids.lora_apply import LoraState
    from workbench.pipeline import build_pipeline

    base = toy_init(tmp_path / "base.safetensors")
    g = torch.Generator().manual_seed(3)
    n_ff = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"
    lora = {
        "lora_unet_conv_in.diff": torch.randn(32, 4, 3, 3, generator=g),
        "lora_unet_conv_in.diff_b": torch.randn(32, generator=g),
        "lora_unet_out_0.w_norm": torch.randn(32, generator=g),
        "lora_unet_out_0.b_norm": torch.randn(32, generator=g),
        f"{n_ff}.lora_up.weight": torch.randn(64, 2, generator=g),
        f"{n_ff}.lora_down.weight": torch.randn(2, 256, generator=g),
        f"{n_ff}.diff_b": torch.randn(64, generator=g),
    }
    save_file(lora, tmp_path / "x.safetensors")
    pipe = build_pipeline(base)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    state = LoraState(pipe, base)
    m = 0.5
    state.apply(((str(tmp_path / "x.safetensors"), 1.0, m),))
    now = pipe.unet.state_dict()
    ff = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"
    want = {
        "conv_in.weight": before["conv_in.weight"] + m * lora["lora_unet_conv_in.diff"],
        "conv_in.bias": before["conv_in.bias"] + m * lora["lora_unet_conv_in.diff_b"],
        "conv_norm_out.weight": before["conv_norm_out.weight"] + m * lora["lora_unet_out_0.w_norm"],
        "conv_norm_out.bias": before["conv_norm_out.bias"] + m * lora["lora_unet_out_0.b_norm"],
        f"{ff}.weight": before[f"{ff}.weight"]
        + m * lora[f"{n_ff}.lora_up.weight"] @ lora[f"{n_ff}.lora_down.weight"],
        f"{ff}.bias": before[f"{ff}.bias"] + m * lora[f"{n_ff}.diff_b"],
    }
    for k, v in want.items():
        torch.testing.assert_close(now[k], v.to(now[k].dtype), rtol=1e-5, atol=1e-5)
    assert {k for k in before if not torch.equal(now[k], before[k])} == set(want)
    state.apply(())
    assert all(torch.equal(pipe.unet.state_dict()[k], v) for k, v in before.items())
