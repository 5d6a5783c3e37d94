"""Folder and toy datasets, captions, the fixed validation split and the data fingerprint."""

import numpy as np
import pytest
import torch
from PIL import Image

from workbench.errors import WorkbenchError
from workbench.train.data import (
    CaptionedImages,
    EpochSampler,
    fingerprint,
    load_examples,
    split_examples,
    stable_subset,
)
from workbench.train.recipe import DataSection


def image(path, size=(40, 24), color=(200, 10, 10)):
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "pics"
    (root / "sub").mkdir(parents=True)
    image(root / "a.png")
    (root / "a.txt").write_text("  a red thing\n")
    image(root / "b.jpg")
    (root / "b.caption").write_text("from caption file")
    image(root / "sub" / "blue square_0003.png", color=(0, 0, 200))
    image(root / ".hidden.png")
    (root / "notes.md").write_text("not an image")
    return root


def test_captions_from_sidecars_or_file_names(folder):
    examples = load_examples(DataSection(root=str(folder), resolution=16))
    assert [(e.key, e.caption) for e in examples] == [
        ("a.png", "a red thing"),
        ("b.jpg", "from caption file"),
        ("sub/blue square_0003.png", "blue square"),
    ]


def test_images_are_resized_and_center_cropped(folder):
    data = DataSection(root=str(folder), resolution=16)
    item = CaptionedImages(load_examples(data), data, augment=False)[0]
    assert item["pixels"].shape == (3, 16, 16) and item["pixels"].dtype == torch.float32
    assert item["pixels"].min() >= -1 and item["pixels"].max() <= 1
    assert item["pixels"][0].mean() == pytest.approx(200 / 127.5 - 1, abs=0.02)


def test_missing_or_empty_root(tmp_path):
    with pytest.raises(WorkbenchError, match="data.root: .* is not a folder"):
        load_examples(DataSection(root=str(tmp_path / "nope")))
    with pytest.raises(WorkbenchError, match="data.root: no images"):
        load_examples(DataSection(root=str(tmp_path)))


def test_toy_shapes_examples_match_the_shapes_module():
    from workbench.toy.shapes import render_array, sample_specs

    data = DataSection(root="toy:shapes", resolution=32, toy={"n": 5, "seed": 4, "fg": ["red", "blue"]})
    examples = load_examples(data)
    specs = sample_specs(5, 4, fg=["red", "blue"])
    assert [e.caption for e in examples] == [s.caption for s in specs]
    item = CaptionedImages(examples, data, augment=False)[2]
    expected = torch.from_numpy(render_array(specs[2], 32)).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(item["pixels"], expected)


def test_validation_split_is_fixed_disjoint_and_seeded():
    examples = load_examples(DataSection(root="toy:shapes", toy={"n": 40}))
    train, val = split_examples(examples, 0.2, seed=555)
    assert len(val) == 8 and len(train) == 32
    assert {e.key for e in train}.isdisjoint({e.key for e in val})
    assert {e.key for e in train} | {e.key for e in val} == {e.key for e in examples}
    again = split_examples(examples, 0.2, seed=555)
    assert [e.key for e in again[1]] == [e.key for e in val]
    assert [e.key for e in split_examples(examples, 0.2, seed=1)[1]] != [e.key for e in val]
    stable = stable_subset(train, 0.25, seed=555)
    assert len(stable) == 8 and {e.key for e in stable} <= {e.key for e in train}
    assert stable == stable_subset(train, 0.25, seed=555)
    with pytest.raises(WorkbenchError, match="leaves nothing to train on"):
        split_examples(examples[:1], 0.5, 0)


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    data = DataSection(root="toy:shapes", resolution=16, toy={"n": 8}, flip_p=0.5, cond_dropout=0.5)
    ds = CaptionedImages(load_examples(data), data, seed=7)
    first = [ds[i] for i in range(8)]
    again = [ds[i] for i in range(8)]
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["pixels"], b["pixels"]) and a["caption"] == b["caption"]
    assert any(a["caption"] == "" for a in first) and any(a["caption"] for a in first)
    plain = CaptionedImages(load_examples(data), data, augment=False)
    assert all(plain[i]["caption"] for i in range(8))  # validation data is never augmented
    ds.set_epoch(1)
    assert [ds[i]["caption"] for i in range(8)] != [a["caption"] for a in first]


def test_epoch_order_depends_on_seed_and_epoch_only():
    s = EpochSampler(10, seed=3)
    e0 = list(s)
    assert sorted(e0) == list(range(10)) and list(s) == e0
    s.set_epoch(1)
    assert list(s) != e0


def test_fingerprint_follows_content_not_dates(folder):
    data = DataSection(root=str(folder))
    a = fingerprint(load_examples(data))
    image(folder / "b.jpg")  # same bytes rewritten: same fingerprint
    assert fingerprint(load_examples(data)) == a and a["examples"] == 3
    (folder / "a.txt").write_text("a different caption")
    assert fingerprint(load_examples(data))["sha256"] != a["sha256"]
    arr = np.asarray(Image.open(folder / "b.jpg"))
    Image.fromarray(255 - arr).save(folder / "b.jpg")
    assert fingerprint(load_examples(data))["sha256"] != a["sha256"]
