"""Class 8: a `wb train` refused after its run folder was made leaves nothing behind: not the
folder, not checkpoints/, not the toy base or split.json it had written. Each refusal goes through
the CLI (`wb train RECIPE -o RUN --set ...`): exit 2, one `error:` line naming the field or file,
and the output's parent folder exactly as before (an empty -o folder that existed stays, empty)."""

from __future__ import annotations

import sys

import pytest
import yaml
from hardening import refused_cleanly

RECIPE = {
    "model": {"base": "toy:init"},
    "data": {"root": "toy:shapes", "resolution": 32, "toy": {"n": 8, "seed": 1}},
    "validation": {"split": 0.25, "every_n_epochs": None},
    "optimizer": {"name": "adamw", "lr": 1e-4},
    "training": {"max_steps": 1, "batch_size": 2},
    "saving": {"every_n_epochs": None, "dtype": "fp32"},
    "sampling": {"prompts": []},
    "logging": {"tensorboard": False},
}


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory):
    from workbench.toy.model import toy_init

    return toy_init(tmp_path_factory.mktemp("toy") / "base.safetensors", seed=5)


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "inputs" / "r.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(RECIPE))
    return path


def refused(tmp_path, recipe, sets: list[str], *needles: str, existing_empty: bool = False) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    if existing_empty:
        (runs / "run").mkdir()
    args = ["train", recipe, "-o", runs / "run"]
    for s in sets:
        args += ["--set", s]
    refused_cleanly(runs, args, *needles)


def test_a_file_that_is_not_a_checkpoint(tmp_path, recipe):
    bad = tmp_path / "inputs" / "model.safetensors"
    bad.write_bytes(b"not a checkpoint at all, just some bytes")
    refused(tmp_path, recipe, [f"model.base={bad}"], "model.safetensors", "not a safetensors file")


def test_a_missing_validation_folder_is_named_as_validation_root(tmp_path, recipe):
    # read before the folder is made: the toy base is never written
    refused(tmp_path, recipe, [f"validation.root={tmp_path / 'nope'}"], "validation.root:", "is not a folder")


def test_a_resolution_the_model_cannot_take_after_the_toy_base_was_written(tmp_path, recipe):
    refused(tmp_path, recipe, ["data.resolution=34"], "data.resolution: 34 is not a multiple of 4")


@pytest.mark.parametrize("existing_empty", [False, True], ids=["new folder", "empty folder given"])
def test_a_network_setting_refused_after_split_json_was_written(tmp_path, recipe, existing_empty):
    sets = ["network.type=lora", "network.targets=[nomatch]"]
    refused(tmp_path, recipe, sets, "network.targets.0: 'nomatch' matches no", existing_empty=existing_empty)


def test_a_lora_run_refusing_diffusers_output_keeps_the_brackets(tmp_path, recipe, toy_base):
    sets = [f"model.base={toy_base}", "network.type=lora", "saving.format=[diffusers]"]
    refused(tmp_path, recipe, sets, "saving.format: a LoRA run writes kohya LoRA files; use [single_file]")


def test_an_optimizer_that_cannot_load_its_library(tmp_path, recipe, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError
    refused(
        tmp_path,
        recipe,
        ["optimizer.name=adamw8bit"],
        "optimizer adamw8bit: bitsandbytes could not be loaded",
    )


def test_a_run_that_started_keeps_its_folder(tmp_path, recipe, toy_base):
    """The other side of the rule: a run that ran is not removed (run.json, split.json, ...)."""
    from hardening import wb

    res = wb("train", recipe, "-o", tmp_path / "run", "--set", f"model.base={toy_base}")
    assert res.exit_code == 0, res.output
    assert {"run.json", "split.json", "checkpoints"} <= {p.name for p in (tmp_path / "run").iterdir()}
