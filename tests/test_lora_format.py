"""LoRA files: kohya writer (keys, shapes, metadata, hashes) and the readers (kohya, diffusers/PEFT,
LyCORIS), with refusals naming the key or module."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench.checkpoint.lora_format import (
    KohyaModule,
    data_sha256,
    kohya_metadata,
    lora_family,
    open_lora,
    write_kohya,
)
from workbench.errors import WorkbenchError

NAMES = ["lora_unet_down_blocks_1_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1"]


def _modules(rank=4):
    g = torch.Generator().manual_seed(0)
    return {
        NAMES[0]: KohyaModule(
            torch.randn(64, rank, 1, 1, generator=g), torch.randn(rank, 64, 1, 1, generator=g), 2.0
        ),
        NAMES[1]: KohyaModule(torch.randn(37, rank, generator=g), torch.randn(rank, 32, generator=g), 4.0),
    }


def test_write_kohya_keys_metadata_and_hash(tmp_path):
    path = tmp_path / "l.safetensors"
    res = write_kohya(path, _modules(), kohya_metadata("sd1", 4, 2.0, title="t"), dtype="F16")
    sd = load_file(path)
    assert set(sd) == {f"{n}.{s}" for n in NAMES for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert sd[f"{NAMES[0]}.lora_down.weight"].shape == (4, 64, 1, 1)
    assert sd[f"{NAMES[1]}.lora_up.weight"].dtype == torch.float16
    assert sd[f"{NAMES[0]}.alpha"].shape == () and float(sd[f"{NAMES[0]}.alpha"]) == 2.0
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    meta = json.loads(raw[8 : 8 + n])["__metadata__"]
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + n :]).hexdigest() == res.sshs_model_hash
    assert data_sha256(path) == res.sshs_model_hash
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    lora = open_lora(path)
    assert lora.format == "kohya" and lora.kind == "lora"
    assert lora.modules[NAMES[0]].rank == 4 and lora.alpha(lora.modules[NAMES[1]]) == 4.0
    assert lora_family(lora) == ("sd1", "keys")  # 4-D proj_in


def test_write_refuses_non_finite_and_leaves_nothing(tmp_path):
    mods = _modules()
    mods[NAMES[1]].up[0, 0] = float("nan")
    with pytest.raises(
        WorkbenchError, match="lora_te_text_model_encoder_layers_0_mlp_fc1: lora_up.weight is not finite"
    ):
        write_kohya(tmp_path / "l.safetensors", mods, {})
    assert list(tmp_path.iterdir()) == []


def test_read_any_alpha_dtype_and_missing_alpha(tmp_path):
    g = torch.Generator().manual_seed(1)
    n = "lora_unet_mid_block_attentions_0_proj_out"
    sd = {
        f"{n}.lora_down.weight": torch.randn(2, 8, generator=g),
        f"{n}.lora_up.weight": torch.randn(8, 2, generator=g),
        f"{n}.alpha": torch.tensor([1], dtype=torch.int64),
    }
    save_file(sd, tmp_path / "a.safetensors")
    lora = open_lora(tmp_path / "a.safetensors")
    m = lora.modules[n]
    assert lora.alpha(m) == 1.0
    torch.testing.assert_close(lora.delta(m), sd[f"{n}.lora_up.weight"] @ sd[f"{n}.lora_down.weight"] * 0.5)
    del sd[f"{n}.alpha"]
    save_file(sd, tmp_path / "b.safetensors")
    lora = open_lora(tmp_path / "b.safetensors")
    assert lora.alpha(lora.modules[n]) is None
    torch.testing.assert_close(
        lora.delta(lora.modules[n]), sd[f"{n}.lora_up.weight"] @ sd[f"{n}.lora_down.weight"]
    )


def test_read_peft_formats(tmp_path):
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g)
    blk = "unet.down_blocks.1.attentions.0.transformer_blocks.0"
    sd = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": a,
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": b,
        f"{blk}.attn2.processor.to_out_lora.down.weight": a.clone(),
        f"{blk}.attn2.processor.to_out_lora.up.weight": b.clone(),
        "text_encoder.text_model.encoder.layers.1.self_attn.k_proj.lora.down.weight": a.clone(),
        "text_encoder.text_model.encoder.layers.1.self_attn.k_proj.lora.up.weight": b.clone(),
    }
    meta = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps(
            {"unet.r": 4, "unet.lora_alpha": 2, "text_encoder.lora_alpha": 8}
        ),
    }
    save_file(sd, tmp_path / "p.safetensors", meta)
    lora = open_lora(tmp_path / "p.safetensors")
    assert lora.format == "diffusers"
    assert set(lora.modules) == {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0",
        "lora_te_text_model_encoder_layers_1_self_attn_k_proj",
    }
    q = lora.modules["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert lora.alpha(q) == 2.0
    torch.testing.assert_close(lora.delta(q), b @ a * 0.5)
    assert lora.alpha(lora.modules["lora_te_text_model_encoder_layers_1_self_attn_k_proj"]) == 8.0


def test_read_lycoris(tmp_path):
    g = torch.Generator().manual_seed(3)
    n = "lora_unet_down_blocks_1_attentions_0_proj_out"
    sd = {
        f"{n}.hada_w1_a": torch.randn(64, 2, generator=g),
        f"{n}.hada_w1_b": torch.randn(2, 64, generator=g),
        f"{n}.hada_w2_a": torch.randn(64, 2, generator=g),
        f"{n}.hada_w2_b": torch.randn(2, 64, generator=g),
        f"{n}.alpha": torch.tensor(1.0),
    }
    m2 = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    sd |= {f"{m2}.lokr_w1": torch.randn(4, 4, generator=g), f"{m2}.lokr_w2": torch.randn(8, 8, generator=g)}
    save_file(sd, tmp_path / "h.safetensors")
    lora = open_lora(tmp_path / "h.safetensors")
    assert lora.kind == "mixed" and lora.modules[n].kind == "loha" and lora.modules[m2].kind == "lokr"
    d = lora.delta(lora.modules[n], (64, 64))
    want = (sd[f"{n}.hada_w1_a"] @ sd[f"{n}.hada_w1_b"]) * (sd[f"{n}.hada_w2_a"] @ sd[f"{n}.hada_w2_b"]) * 0.5
    torch.testing.assert_close(d, want)
    torch.testing.assert_close(
        lora.delta(lora.modules[m2], (32, 32)), torch.kron(sd[f"{m2}.lokr_w1"], sd[f"{m2}.lokr_w2"])
    )


def test_refusals_name_the_key(tmp_path):
    n = "lora_unet_mid_block_attentions_0_proj_out"
    save_file(
        {f"{n}.lora_down.weight": torch.zeros(2, 8), "model.diffusion_model.out.2.weight": torch.zeros(1)},
        tmp_path / "x.safetensors",
    )
    with pytest.raises(
        WorkbenchError, match=r"key 'model.diffusion_model.out.2.weight' is not part of a kohya"
    ):
        open_lora(tmp_path / "x.safetensors")
    save_file({f"{n}.lora_down.weight": torch.zeros(2, 8)}, tmp_path / "y.safetensors")
    with pytest.raises(WorkbenchError, match=f"module {n} has no up tensor"):
        open_lora(tmp_path / "y.safetensors")
    save_file({"first_stage_model.decoder.conv_in.weight": torch.zeros(2)}, tmp_path / "z.safetensors")
    with pytest.raises(
        WorkbenchError, match="first_stage_model.decoder.conv_in.weight' is not part of a LoRA module"
    ):
        open_lora(tmp_path / "z.safetensors")
