"""saving.format: diffusers: a training run writes diffusers folders that diffusers itself loads,
rendering the same image as the single-file checkpoint of the same step."""

import json

import numpy as np
import pytest
import torch

from workbench.checkpoint.reader import open_checkpoint
from workbench.train import loop
from workbench.train.recipe import parse_recipe


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from workbench.toy.model import toy_init

    root = tmp_path_factory.mktemp("diffusers-out")
    base = toy_init(root / "base.safetensors", seed=3)
    raw = {
        "model": {"base": str(base)},
        "data": {"root": "toy:shapes", "resolution": 32, "toy": {"n": 6, "seed": 1}},
        "validation": {"enabled": False},
        "optimizer": {"name": "adamw", "lr": 1e-3},
        "training": {"max_steps": 4, "batch_size": 2},
        "saving": {"every_n_epochs": None, "every_n_steps": 2, "keep_last": 1, "dtype": "fp32",
                   "format": ["diffusers", "single_file"], "name": "toy-v1.5"},  # fmt: skip
        "logging": {"tensorboard": False},
    }
    return loop.train(parse_recipe(raw, "test"), root / "run")


def render(pipe):
    out = pipe("a red circle on a blue background", num_inference_steps=2, height=32, width=32,
               guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type="np")  # fmt: skip
    return out.images[0]


def test_folders_sit_beside_the_files_and_keep_last_removes_both(run):
    folder = run.run_dir / "checkpoints"
    # keep_last 1 removed step 2's file and folder ("toy-v1.5": a name with a dot, no suffix)
    stem = "toy-v1.5-ep02-gs00004"
    assert sorted(p.name for p in folder.iterdir()) == [stem, f"{stem}.safetensors"]
    assert [p.name for p in run.checkpoints] == [stem]  # the first format listed
    index = json.loads((folder / "toy-v1.5-ep02-gs00004" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert json.loads(index["_wb_metadata"]["wb.train"])["global_step"] == 4


def test_diffusers_loads_the_folder_and_renders_what_the_single_file_renders(run):
    from diffusers import StableDiffusionPipeline

    from workbench.pipeline import build_pipeline

    folder = run.run_dir / "checkpoints" / "toy-v1.5-ep02-gs00004"
    from_folder = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    from_folder.set_progress_bar_config(disable=True)
    from_file = build_pipeline(folder.with_name(folder.name + ".safetensors"))
    a, b = render(from_folder), render(from_file)
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)


def test_wb_reads_the_folder_as_the_same_checkpoint(run):
    folder = run.run_dir / "checkpoints" / "toy-v1.5-ep02-gs00004"
    with open_checkpoint(folder) as a, open_checkpoint(folder.with_name(folder.name + ".safetensors")) as b:
        assert set(a) == set(b)
        assert all(torch.equal(a[k], b[k]) for k in b)
