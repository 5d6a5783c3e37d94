import numpy as np
import pytest
import torch

from workbench.checkpoint.reader import open_checkpoint
from workbench.errors import WorkbenchError
from workbench.pipeline import build_pipeline, load_weights_into
from workbench.toy.model import toy_init


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("toys")
    return toy_init(folder / "a.safetensors", seed=1), toy_init(folder / "b.safetensors", seed=2)


def render(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = pipe("a red circle on a blue background", num_inference_steps=2, height=64, width=64,
               guidance_scale=5.0, generator=g, output_type="np")  # fmt: skip
    return out.images[0]


def test_pipeline_from_toy_single_file_generates_64px(toys):
    pipe = build_pipeline(toys[0])
    assert len(pipe.tokenizer) == 49408
    img = render(pipe)
    assert img.shape == (64, 64, 3) and np.isfinite(img).all() and img.std() > 0
    assert np.array_equal(img, render(pipe))  # same seed, same picture


def test_weights_swapped_in_place_match_a_fresh_pipeline(toys):
    pipe = build_pipeline(toys[0])
    unet_before = pipe.unet
    changed = load_weights_into(pipe, toys[1])
    assert set(changed) == {"unet", "vae", "text_encoder"} and pipe.unet is unet_before
    assert np.array_equal(render(pipe), render(build_pipeline(toys[1])))
    assert load_weights_into(pipe, toys[1]) == []  # nothing differs: nothing reloaded


def test_diffusers_folder_reads_as_the_same_single_file(toys, tmp_path):
    pipe = build_pipeline(toys[0])
    pipe.save_pretrained(tmp_path / "diffusers")
    folder = open_checkpoint(tmp_path / "diffusers")
    original = open_checkpoint(toys[0])
    assert folder.format == "diffusers"
    assert set(folder) == set(original)
    for key in original:
        assert folder.infos[key] == original.infos[key], key
        assert torch.equal(folder[key], original[key]), key


def test_unknown_layout_cannot_build(tmp_path):
    from workbench.checkpoint.safetensors_io import save_tensors

    path = save_tensors(
        tmp_path / "odd.safetensors",
        {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3)},
    )
    with pytest.raises(WorkbenchError, match="odd.safetensors: cannot build a pipeline"):
        build_pipeline(path)
