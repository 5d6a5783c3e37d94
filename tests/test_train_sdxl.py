"""wb train on a tiny SDXL-shaped model (CPU): two text encoders with their own optimizers, the
pooled embedding and time ids, loss falling, Ctrl-C + resume bit-identical, and checkpoints in the
SDXL single-file layout that describe as sdxl and load into diffusers' StableDiffusionXLPipeline."""

import os
import signal

import pytest
import torch

from workbench.checkpoint.describe import describe
from workbench.checkpoint.reader import open_checkpoint
from workbench.errors import WorkbenchError
from workbench.train import loop
from workbench.train.data import CaptionedImages, collate
from workbench.train.recipe import parse_recipe
from workbench.train.runs import read_metrics
from workbench.train.sdxl import cover_crop, time_ids

TE1 = "conditioner.embedders.0.transformer.text_model."
TE2 = "conditioner.embedders.1.model."
UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from workbench.toy.sdxl import toy_sdxl_init

    return toy_sdxl_init(tmp_path_factory.mktemp("xl") / "base.safetensors", seed=3)


def recipe(base, **sections):
    raw = {
        "model": {"base": str(base)},
        "data": {"root": "toy:shapes", "resolution": 64, "toy": {"n": 10, "seed": 1}, "flip_p": 0.5},
        "validation": {"split": 0.2, "every_n_epochs": None, "stabilize_train": False},
        "optimizer": {"name": "adamw", "lr": 1e-3, "text_encoder_2": {"lr": 2e-4}},
        "training": {
            "max_steps": 4,
            "batch_size": 2,
            "min_snr_gamma": 5.0,
            "zero_frequency_noise_ratio": 0.05,
        },
        "saving": {"every_n_epochs": None, "dtype": "fp32"},
        "logging": {"tensorboard": False},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return parse_recipe(raw, "test")


def tensors(path, prefix=""):
    with open_checkpoint(path) as ckpt:
        return {k: ckpt[k].clone() for k in ckpt if k.startswith(prefix)}


def test_time_ids_follow_the_resize_and_center_crop():
    # 100x50 covering 64x64: scaled x1.28 to 128x64, the crop starts 32 px from the left
    assert cover_crop((100, 50), (64, 64)) == (32, 0)
    assert time_ids((100, 50), (32, 0), (64, 64)).tolist() == [50, 100, 0, 32, 64, 64]
    # 60x200 covering a 64x128 bucket: x2.133 (the width rules) -> 64x427, 149 px from the top
    assert cover_crop((60, 200), (64, 128)) == (0, (round(200 * 64 / 60) - 128) // 2)


def test_batches_carry_time_ids_per_example(tmp_path):
    from PIL import Image

    from workbench.train.data import load_examples
    from workbench.train.recipe import DataSection

    Image.new("RGB", (96, 64)).save(tmp_path / "wide.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "square.png")
    data = DataSection(root=str(tmp_path), resolution=64)
    ds = CaptionedImages(load_examples(data), data, augment=False)
    batch = collate([ds[0], ds[1]])
    by_name = {e.path.name: row.tolist() for e, row in zip(ds.examples, batch["time_ids"], strict=True)}
    assert by_name == {"wide.png": [64, 96, 0, 16, 64, 64], "square.png": [64, 64, 0, 0, 64, 64]}


@pytest.fixture(scope="module")
def straight(base, tmp_path_factory):
    return loop.train(recipe(base), tmp_path_factory.mktemp("xl-run") / "run")


def test_sdxl_fine_tune_learns_and_writes_an_sdxl_single_file(base, straight):
    assert straight.stopped is None and straight.steps == 4
    (start, first), (_, last) = straight.val_losses[0], straight.val_losses[-1]
    assert start == 0 and last < 0.8 * first  # the toy data is easy: the loss falls fast
    path = straight.checkpoints[-1]
    d = describe(path)
    assert d.layout == "sdxl" and d.components["text_encoder_2"].keys > 0
    before, after = tensors(base), tensors(path)
    assert before.keys() == after.keys()  # the base's own key set: an SDXL single file
    changed = {p: any(not torch.equal(before[k], after[k]) for k in before if k.startswith(p))
               for p in (UNET, TE1, TE2, "first_stage_model.")}  # fmt: skip
    assert changed == {UNET: True, TE1: True, TE2: True, "first_stage_model.": False}
    # each encoder had its own optimizer and lr
    lrs = {m["step"]: m for m in read_metrics(straight.run_dir) if "lr/text_encoder_2" in m}
    assert lrs[1]["lr/text_encoder_2"] == pytest.approx(2e-4)
    assert lrs[1]["lr/text_encoder"] == pytest.approx(1e-3)


def test_the_checkpoint_loads_into_diffusers_sdxl_pipeline(straight):
    from diffusers import StableDiffusionXLPipeline

    from workbench.checkpoint.convert import diffusers_to_ldm
    from workbench.pipeline import build_pipeline, model_spec

    path = straight.checkpoints[-1]
    pipe = build_pipeline(path)
    assert isinstance(pipe, StableDiffusionXLPipeline)
    with open_checkpoint(path) as ckpt:
        spec = model_spec(ckpt)
        ldm = {k: ckpt[k].clone() for k in ckpt}
    # the round trip through wb's converter gives the file back, byte for byte
    states = {n: getattr(pipe, n).state_dict() for n in ("unet", "vae", "text_encoder", "text_encoder_2")}
    again = diffusers_to_ldm(states, "sdxl", spec.configs)
    assert again.keys() == ldm.keys() and all(torch.equal(again[k], ldm[k]) for k in ldm)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and (image == image).all()


def test_frozen_text_encoder_2_is_bit_identical(base, tmp_path):
    run = loop.train(recipe(base, text_encoder_2={"train": False}, training={"max_steps": 2}), tmp_path / "r")
    before, after = tensors(base, TE2), tensors(run.checkpoints[-1], TE2)
    assert all(torch.equal(before[k], after[k]) for k in before)
    te1_before, te1_after = tensors(base, TE1), tensors(run.checkpoints[-1], TE1)
    assert not all(torch.equal(te1_before[k], te1_after[k]) for k in te1_before)


def test_ctrl_c_then_resume_is_bit_identical(base, straight, tmp_path):
    run = tmp_path / "run"

    def progress(p):
        if p.step == 2 and p.loss is not None:
            os.kill(os.getpid(), signal.SIGINT)

    first = loop.train(recipe(base), run, progress=progress)
    assert first.stopped == "interrupted" and first.steps == 2
    resumed = loop.resume_training(run)
    assert resumed.steps == 4 and resumed.stopped is None
    a, b = tensors(straight.checkpoints[-1]), tensors(resumed.checkpoints[-1])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_text_encoder_2_settings_on_an_sd1_model_are_refused(tmp_path):
    from workbench.toy.model import toy_init

    sd1 = toy_init(tmp_path / "sd1.safetensors")
    r = recipe(sd1, data={"resolution": 32})
    with pytest.raises(WorkbenchError, match=r"^text_encoder_2: .*sd1 model, with one text encoder"):
        loop.train(r, tmp_path / "run")


def test_sdxl_lora_has_kohya_sdxl_names_and_loads_into_diffusers(base, tmp_path):
    pytest.importorskip("peft")
    from safetensors import safe_open

    from workbench.pipeline import build_pipeline

    r = recipe(base, network={"dim": 2}, training={"max_steps": 2}, validation={"enabled": False})
    run = loop.train(r, tmp_path / "run")
    with safe_open(str(run.checkpoints[-1]), "pt") as f:
        names = {k.split(".")[0] for k in f.keys()}
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    # the UNet by its SGM (LDM) path, the encoders as lora_te1_/lora_te2_ text_model_ ...
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_proj_in" in names
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_2_mlp_fc2" in names
    unet = {n for n in names if n.startswith("lora_unet_")}
    # attentions: 2 down (level 1), 3 up (level 0), 1 mid; each of 2 transformer blocks (the last
    # level's transformer_layers_per_block) of 10 modules, plus proj_in and proj_out
    attentions = 2 + 3 + 1
    assert len(unet) == attentions * (2 * 10 + 2)
    assert len(names) - len(unet) == 2 * 3 * 6  # two encoders x 3 layers x 6
    pipe = build_pipeline(base)
    pipe.load_lora_weights(str(run.checkpoints[-1]))
    nets = (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    assert sum(hasattr(m, "lora_A") for net in nets for m in net.modules()) == len(names)
