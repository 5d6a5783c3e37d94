"""Class 4: no command writes over one of the files it reads. Every spelling of "the output is an
input" (the same path, a symlink, a hard link, a relative path) is refused by the one identity
check in workbench/checkpoint/files.py, with one line, before anything is written."""

from __future__ import annotations

import json
import os

import pytest
from hardening import refused_cleanly, wb

from workbench.checkpoint.files import refuse_overwrite, same_file
from workbench.errors import WorkbenchError


def test_same_file_sees_through_links(tmp_path):
    a = tmp_path / "a.bin"
    a.write_bytes(b"x")
    os.link(a, tmp_path / "hard.bin")
    (tmp_path / "soft.bin").symlink_to(a)
    (tmp_path / "sub").mkdir()
    for spelling in (a, tmp_path / "hard.bin", tmp_path / "soft.bin", tmp_path / "sub" / ".." / "a.bin"):
        assert same_file(spelling, a), spelling
    assert not same_file(tmp_path / "other.bin", a)
    b = tmp_path / "b.bin"
    b.write_bytes(b"x")  # same bytes, another file
    assert not same_file(a, b)
    with pytest.raises(WorkbenchError, match="refusing to overwrite the recipe"):
        refuse_overwrite(tmp_path / "soft.bin", [("the recipe", a)])


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    folder = tmp_path_factory.mktemp("m")
    for name, seed in (("a", 1), ("b", 2)):
        assert wb("toy", "init", folder / f"{name}.safetensors", "--seed", seed).exit_code == 0
    res = wb("merge", "weighted", folder / "a.safetensors", folder / "b.safetensors", "--alpha", "0.3",
             "-o", folder / "m.safetensors")  # fmt: skip
    assert res.exit_code == 0, res.output
    return folder


def test_merge_replay_onto_the_replayed_file(merged):
    m = merged / "m.safetensors"
    os.link(m, merged / "m-hard.safetensors") if not (merged / "m-hard.safetensors").exists() else None
    for out in (m, merged / "m-hard.safetensors", merged / "." / "m.safetensors"):
        refused_cleanly(merged, ["merge", "replay", m, "-o", out], "refusing to overwrite the merged file")


def test_merge_run_onto_its_recipe(merged, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"inputs: {{A: {merged / 'a.safetensors'}, B: {merged / 'b.safetensors'}}}\n"
        "steps: [{name: m, method: weighted, inputs: [A, B], alpha: 0.5}]\n"
    )
    refused_cleanly(tmp_path, ["merge", "run", recipe, "-o", recipe], "refusing to overwrite the recipe")
    (tmp_path / "link.yaml").symlink_to(recipe)
    refused_cleanly(tmp_path, ["merge", "run", recipe, "-o", tmp_path / "link.yaml"], "the recipe")


def ed2_files(folder):
    (folder / "train.json").write_text(json.dumps({
        "resolution": 512, "lr": 1e-6, "max_epochs": 10, "batch_size": 2, "data_root": "images",
        "resume_ckpt": "base.safetensors",
        "validation_config": "validation_default.json",
    }))  # fmt: skip
    (folder / "validation_default.json").write_text(json.dumps({"validate_training": True}))
    return folder / "train.json"


@pytest.mark.parametrize("target", ["train.json", "validation_default.json"])
def test_from_ed2_onto_a_file_it_reads(tmp_path, target):
    train_json = ed2_files(tmp_path)
    line = refused_cleanly(tmp_path, ["recipe", "from-ed2", train_json, "-o", tmp_path / target], target)
    assert "refusing to overwrite" in line


def test_from_ed2_still_writes_elsewhere(tmp_path):
    train_json = ed2_files(tmp_path)
    res = wb("recipe", "from-ed2", train_json, "-o", tmp_path / "r.yaml")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml", "train.json", "validation_default.json"]


def test_lr_find_write_recipe_onto_its_recipe_is_refused_before_the_test_runs(tmp_path):
    recipe = tmp_path / "R.yaml"
    recipe.write_text("model: {base: toy}\ndata: {root: toy}\n")
    (tmp_path / "R-link.yaml").symlink_to(recipe)
    for target in (recipe, tmp_path / "R-link.yaml"):
        refused_cleanly(
            tmp_path, ["lr-find", recipe, "--write-recipe", target, "-o", tmp_path / "out"],
            "refusing to overwrite the recipe",
        )  # fmt: skip
