import itertools
import random
import time

import numpy as np
import pytest
from PIL import Image

from workbench.toy import shapes
from workbench.toy.shapes import (
    COLORS,
    SHAPES,
    ShapesDataset,
    ShapeSpec,
    classify_image,
    parse_caption,
    render,
    sample_specs,
    score_image,
    write_dataset,
)


def _other(name: str, *exclude: str) -> list[str]:
    return [color for color in COLORS if color != name and color not in exclude]


# --- palette, captions, specs ---------------------------------------------------------------------


def test_palette_is_well_separated():
    # The wrong-colour bounds below rest on this: exp(-(100/60)^2) ~ 0.06.
    closest = min(
        float(np.linalg.norm(np.subtract(COLORS[a], COLORS[b]))) for a, b in itertools.combinations(COLORS, 2)
    )
    assert closest >= 100


def test_caption_text_and_articles():
    assert ShapeSpec("circle", "red", "blue").caption == "a red circle on a blue background"
    assert ShapeSpec("square", "orange", "white").caption == "an orange square on a white background"
    assert ShapeSpec("ring", "green", "orange").caption == "a green ring on an orange background"


@pytest.mark.parametrize("shape", SHAPES)
def test_parse_caption_round_trips_every_combination(shape):
    for fg, bg in itertools.permutations(COLORS, 2):
        assert parse_caption(ShapeSpec(shape, fg, bg).caption) == (shape, fg, bg)


def test_parse_caption_is_lenient_about_case_article_and_period():
    assert parse_caption("  A Red Circle on an Blue background. ") == ("circle", "red", "blue")


@pytest.mark.parametrize(
    "text",
    ["", "a red circle", "a pink circle on a blue background", "a red hexagon on a blue background", "red"],
)
def test_parse_caption_names_the_text_it_cannot_parse(text):
    with pytest.raises(ValueError, match="cannot parse caption") as info:
        parse_caption(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shape": "hexagon", "fg": "red", "bg": "blue"}, "unknown shape"),
        ({"shape": "circle", "fg": "pink", "bg": "blue"}, "unknown fg colour"),
        ({"shape": "circle", "fg": "red", "bg": "red"}, "invisible"),
        ({"shape": "circle", "fg": "red", "bg": "blue", "cx": 0.1, "size": 0.5}, "outside the image"),
        ({"shape": "circle", "fg": "red", "bg": "blue", "size": 0}, "size"),
    ],
)
def test_spec_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ShapeSpec(**kwargs)


# --- rendering and sampling -----------------------------------------------------------------------


def test_render_is_deterministic_with_pure_border_and_centre():
    spec = ShapeSpec("square", "yellow", "purple", cx=0.5, cy=0.5, size=0.5)
    img = render(spec, 64)
    assert img.mode == "RGB" and img.size == (64, 64)
    arr = np.asarray(img)
    assert np.array_equal(arr, np.asarray(render(spec, 64)))
    assert (arr[0] == COLORS["purple"]).all() and (arr[:, -1] == COLORS["purple"]).all()
    assert tuple(arr[32, 32]) == COLORS["yellow"]
    # Antialiasing: a square with fractional edges has pixels between the two colours.
    blended = render(ShapeSpec("square", "yellow", "purple", cx=0.505, cy=0.5, size=0.5), 64)
    assert len(np.unique(np.asarray(blended).reshape(-1, 3), axis=0)) > 2


def test_sample_specs_is_deterministic_and_seed_dependent():
    state = random.getstate()
    first = sample_specs(50, seed=3)
    assert random.getstate() == state  # the global RNG is never touched
    assert first == sample_specs(50, seed=3)
    assert first != sample_specs(50, seed=4)
    assert sample_specs(20, seed=3) == first[:20]
    assert all(spec.fg != spec.bg for spec in first)
    assert {spec.shape for spec in sample_specs(200, seed=0)} == set(SHAPES)


def test_sample_specs_keeps_shapes_off_the_border():
    for spec in sample_specs(200, seed=1):
        half = spec.size / 2
        assert min(spec.cx - half, spec.cy - half, 1 - spec.cx - half, 1 - spec.cy - half) >= 0.0625


def test_sample_specs_restrictions():
    specs = sample_specs(100, seed=5, shapes=["triangle"], fg=["purple", "orange"], bg=["white", "orange"])
    assert {s.shape for s in specs} == {"triangle"}
    assert {s.fg for s in specs} <= {"purple", "orange"}
    assert {s.bg for s in specs} <= {"white", "orange"}
    assert all(s.fg != s.bg for s in specs)
    assert {s.fg for s in sample_specs(10, seed=5, fg="red")} == {"red"}  # a bare name is one name


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shapes": ["hexagon"]}, "unknown shapes 'hexagon'"),
        ({"fg": ["pink"]}, "unknown fg colours 'pink'"),
        ({"fg": ["red"], "bg": ["red"]}, "no fg/bg pair"),
        ({"shapes": []}, "empty"),
        ({"size_range": (0.5, 0.95)}, "size_range"),
    ],
)
def test_sample_specs_rejects_bad_restrictions(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_specs(5, seed=0, **kwargs)


# --- writing and the dataset helper ---------------------------------------------------------------


def test_write_dataset_writes_caption_sidecars_matching_render(tmp_path):
    folder = tmp_path / "10_shapes"
    paths = write_dataset(folder, 12, seed=9, size=32, fg=["purple", "orange"])
    specs = sample_specs(12, seed=9, fg=["purple", "orange"])
    assert [p.name for p in paths] == [f"{i:04d}.png" for i in range(12)]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [f"{i:04d}.png" for i in range(12)] + [f"{i:04d}.txt" for i in range(12)]
    )
    for path, spec in zip(paths, specs, strict=True):
        assert path.with_suffix(".txt").read_text(encoding="utf-8") == spec.caption
        with Image.open(path) as img:
            assert img.mode == "RGB"
            assert np.array_equal(np.asarray(img), np.asarray(render(spec, 32)))
    assert [p.name for p in tmp_path.iterdir()] == ["10_shapes"]  # no staging folder left behind


def test_write_dataset_leaves_nothing_on_error(tmp_path, monkeypatch):
    calls = []

    def failing_render(spec, size=64):
        calls.append(spec)
        if len(calls) == 3:
            raise OSError("disk full")
        return render(spec, size)

    monkeypatch.setattr(shapes, "render", failing_render)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(tmp_path / "set", 5, seed=0)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a staging folder


def test_shapes_dataset_items():
    torch = pytest.importorskip("torch")
    data = ShapesDataset(6, seed=2, size=32, shapes=["circle", "ring"])
    assert len(data) == 6
    image, caption = data[4]
    spec = sample_specs(6, seed=2, shapes=["circle", "ring"])[4]
    assert caption == spec.caption
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert -1.0 <= float(image.min()) and float(image.max()) <= 1.0
    back = ((image + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(back, np.asarray(render(spec, 32)))
    assert len(list(data)) == 6  # iteration stops at IndexError


# --- the scorer -----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 32])
def test_rendered_spec_scores_high_against_its_own_caption(size):
    for spec in sample_specs(60, seed=size):
        img = render(spec, size)
        for score in (score_image(img, spec), score_image(img, spec.caption)):
            assert min(score.background, score.foreground, score.shape) >= 0.9, (spec, score)
            assert score.total == pytest.approx((score.background + score.foreground + score.shape) / 3)


def test_wrong_colours_score_low():
    for spec in sample_specs(30, seed=7):
        img = render(spec, 64)
        for bg in _other(spec.bg, spec.fg):
            assert score_image(img, ShapeSpec(spec.shape, spec.fg, bg)).background <= 0.3, (spec, bg)
        for fg in _other(spec.fg, spec.bg):
            assert score_image(img, ShapeSpec(spec.shape, fg, spec.bg)).foreground <= 0.3, (spec, fg)


def test_scores_are_independent_of_the_other_names():
    spec = ShapeSpec("triangle", "green", "black", size=0.5)
    img = render(spec, 64)
    right = score_image(img, spec)
    wrong_bg = score_image(img, "a green triangle on a white background")
    assert (wrong_bg.foreground, wrong_bg.shape) == (right.foreground, right.shape)


@pytest.mark.parametrize("size", [64, 32])
def test_right_shape_beats_each_wrong_shape(size):
    for spec in sample_specs(40, seed=11, size_range=(0.45, 0.7)):
        img = render(spec, size)
        right = score_image(img, spec).shape
        for other in SHAPES:
            if other != spec.shape:
                wrong = score_image(img, ShapeSpec(other, spec.fg, spec.bg)).shape
                assert right - wrong >= 0.15, (spec, other, right, wrong)


def test_circle_square_triangle_are_told_apart():
    for shape in ("circle", "square", "triangle"):
        img = render(ShapeSpec(shape, "white", "blue", size=0.6), 64)
        scores = {name: score_image(img, f"a white {name} on a blue background").shape for name in SHAPES}
        assert max(scores, key=scores.get) == shape
        assert all(scores[shape] - v >= 0.15 for name, v in scores.items() if name != shape), scores


def test_uniform_noise_scores_low():
    rng = np.random.default_rng(0)
    for spec in sample_specs(10, seed=1):
        noise = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
        score = score_image(noise, spec)
        assert max(score.background, score.foreground, score.shape) <= 0.2, score
        assert score.total <= 0.15


def test_blank_image_has_no_object():
    blank = Image.new("RGB", (64, 64), COLORS["blue"])
    assert classify_image(blank) == (None, None, "blue")
    score = score_image(blank, "a red circle on a blue background")
    assert (score.background, score.foreground, score.shape) == (1.0, 0.0, 0.0)


@pytest.mark.parametrize("size", [64, 32])
def test_classify_image_recovers_specs(size):
    specs = sample_specs(100, seed=100 + size)
    hits = sum(classify_image(render(spec, size)) == (spec.shape, spec.fg, spec.bg) for spec in specs)
    assert hits >= 95


def test_score_accepts_arrays_in_either_layout():
    spec = ShapeSpec("cross", "red", "yellow", size=0.6)
    arr = np.asarray(render(spec, 64))
    expected = score_image(arr, spec)
    assert score_image(Image.fromarray(arr), spec) == expected
    chw01 = arr.transpose(2, 0, 1).astype(np.float32) / 255
    assert score_image(chw01, spec).total == pytest.approx(expected.total, abs=1e-3)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        score_image(chw01 * 2 - 1, spec)
    with pytest.raises(ValueError, match="RGB image array"):
        score_image(arr[:, :, 0], spec)


def test_scoring_is_fast():
    img = render(ShapeSpec("ring", "orange", "black", size=0.6), 64)
    best = float("inf")
    for _ in range(3):  # best of three batches, so a busy machine does not fail the test
        start = time.perf_counter()
        for _ in range(20):
            score_image(img, "a orange ring on a black background")
        best = min(best, (time.perf_counter() - start) / 20)
    assert best < 0.02  # about 1 ms alone; generous for a loaded CI machine
