import hashlib

import pytest
import torch

from workbench.checkpoint.describe import describe
from workbench.checkpoint.hashing import sha256_file
from workbench.checkpoint.safetensors_io import save_tensors
from workbench.errors import WorkbenchError


def z(*shape, dtype=torch.float16):
    return torch.zeros(shape, dtype=dtype)


UNET_SD = {"model.diffusion_model.input_blocks.0.0.weight": z(320, 4, 3, 3)}
VAE = {"first_stage_model.decoder.conv_in.weight": z(512, 4, 3, 3)}
SD1_TE = {
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": z(768),
    "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
}
SD2_TE = {"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": z(3072, 1024)}
SDXL = {
    "model.diffusion_model.label_emb.0.0.weight": z(1280, 2816),
    "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": z(768),
    "conditioner.embedders.1.model.ln_final.weight": z(1280),
}


@pytest.mark.parametrize(
    "name, tensors, arch, variants",
    [
        ("sd1", {**UNET_SD, **VAE, **SD1_TE}, "sd1", []),
        ("sd2", {**UNET_SD, **VAE, **SD2_TE}, "sd2", []),
        ("sd2v", {**UNET_SD, **VAE, **SD2_TE, "v_pred": torch.tensor(0.0)}, "sd2", ["v-prediction"]),
        ("sdxl", {**UNET_SD, **VAE, **SDXL}, "sdxl", []),
        (
            "refiner",
            {
                "model.diffusion_model.input_blocks.0.0.weight": z(384, 4, 3, 3),
                "conditioner.embedders.0.model.ln_final.weight": z(1280),
            },
            "sdxl-refiner",
            [],
        ),
        (
            "inpaint",
            {"model.diffusion_model.input_blocks.0.0.weight": z(320, 9, 3, 3), **SD1_TE},
            "sd1",
            ["inpaint"],
        ),
        (
            "ip2p",
            {"model.diffusion_model.input_blocks.0.0.weight": z(320, 8, 3, 3), **SD1_TE},
            "sd1",
            ["instruct-pix2pix"],
        ),
        ("toy", {"model.diffusion_model.input_blocks.0.0.weight": z(32, 4, 3, 3), **SD1_TE}, "toy", []),
    ],
)
def test_architecture_detection(tmp_path, name, tensors, arch, variants):
    path = save_tensors(tmp_path / f"{name}.safetensors", tensors)
    d = describe(path, with_hash=False)
    assert (d.architecture, d.variants) == (arch, variants)


def test_components_params_and_dtypes(tmp_path):
    tensors = {**UNET_SD, **VAE, **SD1_TE, "model_ema.decay": torch.tensor(0.999), "alphas_cumprod": z(1000)}
    d = describe(save_tensors(tmp_path / "m.safetensors", tensors, {"title": "x"}), with_hash=False)
    assert d.layout == "sd1" and d.metadata == {"title": "x"}
    assert d.components["unet"].params == 320 * 4 * 9 and d.components["unet"].keys == 1
    assert d.components["text_encoder"].dtypes == {"F16": 768, "I64": 77}
    assert d.components["vae"].bytes == 512 * 4 * 9 * 2
    assert d.components["ema"].keys == 1 and d.components["other"].keys == 1
    assert "text_encoder_2" not in d.components


def test_sdxl_components(tmp_path):
    d = describe(save_tensors(tmp_path / "x.safetensors", {**UNET_SD, **SDXL}), with_hash=False)
    assert d.components["text_encoder"].params == 768
    assert d.components["text_encoder_2"].params == 1280


def test_unknown_architecture_names_the_file(tmp_path):
    path = save_tensors(tmp_path / "lora.safetensors", {"lora_unet_down.alpha": torch.tensor(1.0)})
    with pytest.raises(WorkbenchError, match=r"lora.safetensors: unknown architecture"):
        describe(path)


def test_sha256_matches_hashlib_and_is_cached(tmp_path, monkeypatch):
    path = save_tensors(tmp_path / "h.safetensors", {**UNET_SD, **SD1_TE})
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    d = describe(path)
    assert d.sha256 == expected and d.autov2 == expected[:10]
    # Second call comes from the cache: prove it by making hashing impossible.
    monkeypatch.setattr(hashlib, "sha256", lambda: (_ for _ in ()).throw(AssertionError("re-hashed")))
    assert sha256_file(path) == expected
    # Rewriting the file invalidates the cache entry (size or mtime change).
    save_tensors(path, {**UNET_SD, **SD1_TE, "extra": z(3)})
    monkeypatch.undo()
    assert sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest() != expected
