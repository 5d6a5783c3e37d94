"""save_diffusers_folder with weights=False: configs only, enough for diffusers' from_single_file to
build a pipeline offline (the grid benchmark's naive baseline), which then matches wb's pipeline."""

import numpy as np
import pytest
import torch

from workbench.checkpoint.diffusers_save import save_diffusers_folder
from workbench.errors import WorkbenchError


def test_configs_only_folder_lets_diffusers_build_the_same_pipeline(tmp_path):
    from diffusers import StableDiffusionPipeline

    from workbench.checkpoint.reader import open_checkpoint
    from workbench.pipeline import build_pipeline, load_modules, model_spec
    from workbench.tokenizer import clip_tokenizer
    from workbench.toy.model import toy_init

    path = toy_init(tmp_path / "toy.safetensors", seed=3)
    with open_checkpoint(path) as ckpt:
        spec = model_spec(ckpt)
        modules = load_modules(ckpt, spec=spec)
    folder = save_diffusers_folder(tmp_path / "configs", modules, clip_tokenizer(), spec.configs["scheduler"],
                                   weights=False)  # fmt: skip
    assert not list(folder.rglob("*.safetensors")) and (folder / "unet" / "config.json").is_file()
    theirs = StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, safety_checker=None
    )
    ours = build_pipeline(path)
    images = [
        p("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
          generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
        for p in (theirs, ours)
    ]
    assert np.array_equal(images[0], images[1])
    with pytest.raises(WorkbenchError, match="already exists; not overwriting it"):
        save_diffusers_folder(folder, modules, clip_tokenizer(), spec.configs["scheduler"])
