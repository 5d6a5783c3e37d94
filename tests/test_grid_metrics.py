"""Grid scores: the burn score rises along an artificial burn; the CLIP scorer on a tiny random model."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from workbench.errors import WorkbenchError
from workbench.grids.metrics import burn_parts, burn_score, load_clip_scorer
from workbench.toy.shapes import ShapeSpec, render_array

LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def push(image: np.ndarray, k: float = 1.2) -> np.ndarray:
    """One burn step: saturation pushed about each pixel's luma, contrast about mid-grey, 8-bit clip."""
    x = image.astype(np.float32) / 255
    luma = (x @ LUMA)[..., None]
    x = luma + k * (x - luma)
    x = 0.5 + k * (x - 0.5)
    return (np.clip(x, 0, 1) * 255).round().astype(np.uint8)


def lit_shape(shape, fg, bg, size=64):
    """A toy shape under a soft light: a gradient across it, so no value starts clipped."""
    base = render_array(ShapeSpec(shape, fg, bg), size).astype(np.float32)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    light = ((0.6 + 0.4 * xx) * (0.8 + 0.2 * yy))[..., None]
    return np.clip(base * light * 0.85 + 20, 0, 255).astype(np.uint8)


def smooth(channels, size=64):
    """A noise-free gradient image; each channel is (offset, x slope, y slope) in [0, 1] units."""
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1)
    planes = [offset + sx * xx + sy * yy for offset, sx, sy in channels]
    return (np.clip(np.stack(planes, -1), 0, 1) * 255).round().astype(np.uint8)


IMAGES = {
    "red circle on blue": lit_shape("circle", "red", "blue"),
    "yellow ring on purple": lit_shape("ring", "yellow", "purple"),
    "green square on white": lit_shape("square", "green", "white"),
    "grey gradient": smooth([(0.3, 0.4, 0.0), (0.3, 0.0, 0.4), (0.5, 0.0, 0.0)]),
    "bright pastel": smooth([(0.7, 0.25, 0.0), (0.65, 0.0, 0.3), (0.8, 0.0, 0.0)]),
    "dark gradient": smooth([(0.05, 0.25, 0.0), (0.1, 0.0, 0.2), (0.15, 0.0, 0.0)]),
}


@pytest.mark.parametrize("name", list(IMAGES))
def test_burn_score_rises_monotonically_along_a_burn(name):
    image, scores = IMAGES[name], []
    for _ in range(7):
        scores.append(burn_score(image))
        image = push(image)
    assert all(b > a for a, b in zip(scores[:-1], scores[1:], strict=True)), np.round(scores, 2)
    assert scores[-1] - scores[0] > 15  # a burn is not a rounding error


def test_burn_terms_and_range():
    flat_grey = np.full((32, 32, 3), 128, np.uint8)
    parts = burn_parts(flat_grey)
    assert parts.chroma == parts.clipped == parts.high_freq == parts.score == 0
    burnt = np.zeros((32, 32, 3), np.uint8)
    burnt[::2, :, 0] = 255  # saturated, fully clipped, striped: as burnt as it gets
    parts = burn_parts(burnt)
    assert parts.clipped == 1 and 60 < parts.score <= 100
    assert burn_score(Image.fromarray(burnt)) == pytest.approx(parts.score)
    assert burn_score(burnt.astype(np.float32) / 255) == pytest.approx(parts.score)


# --- CLIP -----------------------------------------------------------------------------------------

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A registered tiny open-clip config and random weights for it saved as a local file."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    (folder / "wb-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / "wb-tiny-clip.json")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("wb-tiny-clip")
    torch.save(model.state_dict(), folder / "weights.pt")
    return "wb-tiny-clip", folder / "weights.pt", model


def test_clip_scorer_loads_local_weights_and_scores(tiny_clip):
    name, weights, reference = tiny_clip
    scorer = load_clip_scorer(name, weights)
    for key, value in reference.state_dict().items():  # the file's weights, not a fresh random init
        assert torch.equal(scorer.model.state_dict()[key], value), key
    images = [Image.fromarray(IMAGES[n]) for n in IMAGES]
    prompts = ["a red circle", "a yellow ring", "a green square", "grey", "pastel", "dark"]
    scores = scorer.score(images, prompts, batch=4)
    assert len(scores) == 6 and all(0 <= s <= 100 for s in scores)
    # Batching does not change a score; the same pair scores the same.
    assert scorer.score(images[4:5], prompts[4:5]) == pytest.approx(scores[4:5], abs=1e-4)
    # Matches the definition: 100 * max(0, cos(image, text)).
    with torch.no_grad():
        img = reference.encode_image(scorer.preprocess(images[0]).unsqueeze(0))
        txt = reference.encode_text(scorer.tokenizer(prompts[:1]))
        cos = torch.nn.functional.cosine_similarity(img, txt).item()
    assert scores[0] == pytest.approx(100 * max(0.0, cos), abs=1e-3)


def test_clip_loading_errors_name_the_flag(tiny_clip, tmp_path):
    name, weights, _ = tiny_clip
    with pytest.raises(WorkbenchError, match=r"^--clip-weights .*missing.pt: no such file"):
        load_clip_scorer(name, tmp_path / "missing.pt")
    with pytest.raises(WorkbenchError, match=r"^--clip-model 'no-such-model'"):
        load_clip_scorer("no-such-model", weights)
    with pytest.raises(WorkbenchError, match=r"^--clip-weights .*weights.pt: does not load into ViT-B-32"):
        load_clip_scorer("ViT-B-32", weights)
