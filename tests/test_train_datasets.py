"""Datasets as kohya and EveryDream2 users lay them out: N_name folders (repeats, class tokens),
caption_extension, keep_tokens / shuffle_caption / caption_tag_dropout_rate, ED2's multiply.txt,
local.yaml and global.yaml, and bad data (skipped and counted, never a crash; no images: exit 2).

Images are tiny and made here; expected numbers are worked out by hand in the comments."""

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from workbench.cli import app
from workbench.errors import WorkbenchError
from workbench.train.data import CaptionedImages, process_tags, read_data, with_repeats
from workbench.train.recipe import DataSection, parse_recipe

runner = CliRunner()


def image(path, size=(12, 12), color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def captions(data):
    return {e.key: e.caption for e in data.examples}


@pytest.fixture
def kohya(tmp_path):
    root = tmp_path / "train"
    image(root / "10_sks dog" / "IMG_0001.png")
    image(root / "10_sks dog" / "IMG_0002.png")
    (root / "10_sks dog" / "IMG_0002.txt").write_text("sks dog, on grass\nsecond line is not read\n")
    image(root / "3_other_thing" / "b.png")
    (root / "3_other_thing" / "b.caption").write_text("from the caption file")
    return root


# --- kohya ----------------------------------------------------------------------------------------


def test_kohya_folders_give_repeats_and_class_tokens(kohya):
    data = read_data(DataSection(root=str(kohya)))
    assert data.layout == "kohya" and data.skipped == [] and data.notes == []
    assert captions(data) == {
        "10_sks dog/IMG_0001.png": "sks dog",  # no caption file: the folder's class tokens
        "10_sks dog/IMG_0002.png": "sks dog, on grass",  # the caption file's first line
        "3_other_thing/b.png": "from the caption file",
    }
    assert [e.repeats for e in data.examples] == [10, 10, 3]
    epoch = with_repeats(data.examples, seed=0)
    assert len(epoch) == 23  # 2 images x 10 + 1 x 3
    assert Counter(e.key for e in epoch) == {"10_sks dog/IMG_0001.png": 10, "10_sks dog/IMG_0002.png": 10,
                                             "3_other_thing/b.png": 3}  # fmt: skip


def test_kohya_caption_extension_picks_the_sidecar(kohya):
    by_caption = captions(read_data(DataSection(root=str(kohya), caption_extension=".caption")))
    assert by_caption["10_sks dog/IMG_0002.png"] == "sks dog"  # its .txt is not the caption file now
    assert by_caption["3_other_thing/b.png"] == "from the caption file"
    by_txt = captions(read_data(DataSection(root=str(kohya), caption_extension="txt")))  # dot added
    assert by_txt["10_sks dog/IMG_0002.png"] == "sks dog, on grass"
    assert by_txt["3_other_thing/b.png"] == "other_thing"  # class tokens: everything after the first _


def test_kohya_layout_ignores_what_kohya_ignores_with_a_note(kohya):
    image(kohya / "notes" / "c.png")
    image(kohya / "0_never" / "d.png")
    image(kohya / "loose.png")
    assert read_data(DataSection(root=str(kohya))).layout == "folders"  # auto: not every folder is N_name
    data = read_data(DataSection(root=str(kohya), layout="kohya"))
    assert sorted(captions(data)) == [
        "10_sks dog/IMG_0001.png",
        "10_sks dog/IMG_0002.png",
        "3_other_thing/b.png",
    ]
    assert data.notes == [
        "0_never/: 0 repeats, ignored",
        "loose.png: not in an N_name folder, ignored (kohya layout)",
        "notes/: not named N_name (repeats_class), ignored (kohya layout)",
    ]


# --- tags: keep_tokens, shuffle_caption, caption_tag_dropout_rate -----------------------------------


class ScriptedRng:
    """permutation reverses; random() returns the scripted values in turn."""

    def __init__(self, randoms=()):
        self.randoms = list(randoms)

    def permutation(self, n):
        return np.arange(n)[::-1]

    def random(self):
        return self.randoms.pop(0)


CAPTION = "sks dog, 1girl, red hair, smile, outdoors"


def test_keep_tokens_stay_in_place_and_the_rest_is_shuffled_and_dropped():
    shuffled = process_tags(CAPTION, ScriptedRng(), keep=2, shuffle=True, tag_dropout=0.0)
    assert shuffled == "sks dog, 1girl, outdoors, smile, red hair"  # the 3 after the first 2, reversed
    assert process_tags(CAPTION, ScriptedRng(), keep=0, shuffle=True, tag_dropout=0.0) == (
        "outdoors, smile, red hair, 1girl, sks dog"  # keep_tokens 0: the first tag moves too (kohya)
    )
    # dropout after shuffling, one draw per tag not kept: 0.5 keeps outdoors, 0.1 < 0.3 drops smile
    dropped = process_tags(CAPTION, ScriptedRng([0.5, 0.1, 0.9]), keep=2, shuffle=True, tag_dropout=0.3)
    assert dropped == "sks dog, 1girl, outdoors, red hair"
    only_drop = process_tags(CAPTION, ScriptedRng([0.2, 0.5, 0.5]), keep=2, shuffle=False, tag_dropout=0.3)
    assert only_drop == "sks dog, 1girl, smile, outdoors"
    assert process_tags("solo", ScriptedRng(), keep=1, shuffle=True, tag_dropout=0.0) == "solo"


def test_captions_in_training_keep_their_first_tokens_and_drop_at_the_rate(tmp_path):
    root = tmp_path / "d"
    image(root / "a.png")
    (root / "a.txt").write_text(CAPTION)
    data = DataSection(root=str(root), resolution=8, shuffle_caption=True, keep_tokens=2,
                       caption_tag_dropout_rate=0.25)  # fmt: skip
    ds = CaptionedImages(read_data(data).examples, data, seed=3)
    seen, kept_tags, orders = 0, 0, set()
    for epoch in range(200):
        ds.set_epoch(epoch)
        tags = ds[0]["caption"].split(", ")
        assert tags[:2] == ["sks dog", "1girl"] and set(tags[2:]) <= {"red hair", "smile", "outdoors"}
        assert len(set(tags)) == len(tags)
        seen, kept_tags = seen + 3, kept_tags + len(tags) - 2
        orders.add(tuple(tags[2:]))
    assert kept_tags / seen == pytest.approx(0.75, abs=0.05)  # 600 draws: sigma 0.018
    assert len([o for o in orders if len(o) == 3]) == 6  # every order of the 3 tags shows up
    plain = CaptionedImages(read_data(data).examples, data, augment=False)
    assert plain[0]["caption"] == CAPTION  # validation sees the caption as written


def test_tag_settings_are_checked():
    with pytest.raises(WorkbenchError, match="keep_tokens: only used with shuffle_caption"):
        parse_recipe({"model": {"base": "toy:init"}, "data": {"root": "x", "keep_tokens": 2}}, "r.yaml")
    with pytest.raises(WorkbenchError, match="shuffle_tags: ED2's name for shuffle_caption"):
        both = {"root": "x", "shuffle_tags": True, "shuffle_caption": True}
        parse_recipe({"model": {"base": "toy:init"}, "data": both}, "r.yaml")
    with pytest.raises(WorkbenchError, match="caption_tag_dropout_rate"):
        parse_recipe(
            {"model": {"base": "toy:init"}, "data": {"root": "x", "caption_tag_dropout_rate": 1}}, "r"
        )
    with pytest.raises(WorkbenchError, match="layout: only for a folder root"):
        parse_recipe({"model": {"base": "toy:init"}, "data": {"root": "toy:shapes", "layout": "kohya"}}, "r")


# --- EveryDream2: multiply.txt, local.yaml, global.yaml ---------------------------------------------


def test_ed2_multiply_local_and_global_settings(tmp_path):
    root = tmp_path / "ed2"
    (root).mkdir()
    (root / "global.yaml").write_text("tags: [masterpiece]\n")
    image(root / "top_1.png")
    ch = root / "characters"
    image(ch / "a.png")
    (ch / "a.txt").write_text("alice, blue dress")
    image(ch / "bob_02.png")
    (ch / "multiply.txt").write_text("2.5\n")
    (ch / "local.yaml").write_text("flip_p: 0.5\nshuffle_tags: true\nrating: 3\n")
    deep = ch / "deeper"
    image(deep / "c.png")
    (deep / "c.yaml").write_text("main_prompt: carol\ntags:\n  - tag: smiling\n    weight: 2\n")
    data = read_data(DataSection(root=str(root)))
    assert data.layout == "folders" and data.skipped == []
    # main prompt (caption file, else the file name up to "_"), then the image's tags, then the
    # folders' (global.yaml's reach every folder under it)
    assert captions(data) == {
        "characters/a.png": "alice, blue dress, masterpiece",
        "characters/bob_02.png": "bob, masterpiece",
        "characters/deeper/c.png": "carol, smiling, masterpiece",
        "top_1.png": "top, masterpiece",
    }
    by_key = {e.key: e for e in data.examples}
    a, deeper = by_key["characters/a.png"], by_key["characters/deeper/c.png"]
    assert (a.repeats, a.flip_p, a.shuffle) == (2.5, 0.5, True)
    assert (deeper.repeats, deeper.flip_p, deeper.shuffle) == (1.0, None, False)  # local: not inherited
    assert data.notes == [
        "characters/local.yaml: rating ignored (wb does not use them)",
        "characters/deeper/c.yaml: tag weights ignored (every tag counts once)",
    ]


def test_fractional_multiply_fills_the_epoch_to_the_floor_of_the_sum(tmp_path):
    root = tmp_path / "ed2"
    for name in "abc":
        image(root / "half" / f"{name}.png")
    (root / "half" / "multiply.txt").write_text("1.5")
    image(root / "one.png")
    examples = read_data(DataSection(root=str(root))).examples
    for seed in range(5):
        counts = Counter(e.key for e in with_repeats(examples, seed))
        # 3 x 1.5 + 1 = 5.5: 5 per epoch; each 1.5 once, and one of them once more
        assert sum(counts.values()) == 5 and counts["one.png"] == 1
        assert sorted(counts[f"half/{n}.png"] for n in "abc") == [1, 1, 2]
    assert with_repeats(examples, 1) == with_repeats(examples, 1)  # seeded


def test_per_folder_flip_p_replaces_the_recipes(tmp_path):
    root = tmp_path / "d"
    image(root / "never" / "a.png", size=(8, 8))
    (root / "never" / "flip_p.txt").write_text("0")
    data = DataSection(root=str(root), resolution=8, flip_p=1.0)
    left_half_red = np.zeros((8, 8, 3), np.uint8)
    left_half_red[:, :4] = (255, 0, 0)
    Image.fromarray(left_half_red).save(root / "never" / "a.png")
    ds = CaptionedImages(read_data(data).examples, data, seed=0)
    assert all(ds[0]["pixels"][0, 0, 0] > 0.9 for _ in range(3))  # not flipped: red stays left


# --- bad data ---------------------------------------------------------------------------------------


def test_bad_files_are_skipped_with_their_reason(tmp_path):
    root = tmp_path / "d"
    image(root / "good.png")
    (root / "empty.png").write_bytes(b"")
    (root / "junk.jpg").write_bytes(b"this is not a jpeg at all")
    image(root / "latin.png")
    (root / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (root / "multiply.txt").write_text("lots")
    data = read_data(DataSection(root=str(root)))
    assert [e.key for e in data.examples] == ["good.png"]
    reasons = {s.file: s.reason for s in data.skipped}
    assert list(reasons) == ["empty.png", "junk.jpg", "latin.txt"]
    assert reasons["empty.png"] == "empty file (0 bytes)"
    assert reasons["junk.jpg"].startswith("cannot read the image (UnidentifiedImageError")
    assert reasons["latin.txt"] == "not UTF-8 text (byte 3: b'\\xe9')"
    assert data.notes == ["multiply.txt: not a number, ignored"]
    assert data.record()["skipped"] == 3


def test_no_usable_images_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WorkbenchError, match=r"data.root: no images \(.*\) under .*empty$"):
        read_data(DataSection(root=str(tmp_path / "empty")))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"")
    with pytest.raises(WorkbenchError, match=r"no usable images .*\(1 skipped, e.g. x.png: empty file"):
        read_data(DataSection(root=str(tmp_path / "bad")))


def test_an_image_that_breaks_mid_run_is_replaced_not_fatal(tmp_path):
    root = tmp_path / "d"
    image(root / "a.png", color=(255, 0, 0))
    image(root / "b.png", color=(0, 0, 255))
    data = DataSection(root=str(root), resolution=8)
    ds = CaptionedImages(read_data(data).examples, data)
    (root / "a.png").write_bytes(b"broken after the start")
    with pytest.warns(UserWarning, match="a.png: cannot read the image.*training on b.png in its place"):
        item = ds[0]
    assert item["pixels"][2].mean() > 0.9 and item["caption"] == "b"  # b's blue and caption


# --- wb train on a kohya folder -------------------------------------------------------------------


def train_recipe(tmp_path, root):
    from workbench.toy.model import toy_init

    base = toy_init(tmp_path / "base.safetensors", seed=2)
    raw = {
        "model": {"base": str(base)},
        "data": {"root": str(root), "resolution": 16, "shuffle_caption": True, "keep_tokens": 1},
        "validation": {"enabled": False},
        "optimizer": {"name": "adamw", "lr": 1e-4},
        "training": {"max_steps": 2, "batch_size": 4},
        "saving": {"every_n_epochs": None, "dtype": "fp32"},
        "logging": {"tensorboard": False},
    }
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(raw))
    return path


def test_wb_train_reads_a_kohya_folder_and_records_what_it_skipped(tmp_path, monkeypatch, kohya):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (kohya / "3_other_thing" / "zero.png").write_bytes(b"")
    recipe = train_recipe(tmp_path, kohya)
    result = runner.invoke(app, ["train", str(recipe), "-o", str(tmp_path / "run")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "warning: data: 3_other_thing/zero.png: empty file (0 bytes), skipped" in result.output
    record = json.loads((tmp_path / "run" / "run.json").read_text())["data"]
    assert record["layout"] == "kohya" and record["train"] == 3 and record["train_per_epoch"] == 23
    assert record["skipped"] == 1 and record["skipped_files"] == [
        {"file": "3_other_thing/zero.png", "reason": "empty file (0 bytes)"}
    ]
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["repeats"] == {"10_sks dog/IMG_0001.png": 10, "10_sks dog/IMG_0002.png": 10,
                                "3_other_thing/b.png": 3}  # fmt: skip


def test_wb_train_on_a_folder_without_images_is_one_error_line(tmp_path):
    (tmp_path / "nothing").mkdir()
    recipe = train_recipe(tmp_path, tmp_path / "nothing")
    result = runner.invoke(app, ["train", str(recipe), "-o", str(tmp_path / "run")], env={"COLUMNS": "300"})
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if "error" in line]  # (after the bar's line)
    assert errors == [
        f"error: data.root: no images (.png, .jpg, .jpeg, .webp, .bmp) under {tmp_path / 'nothing'}"
    ]
    assert not (tmp_path / "run").exists()
