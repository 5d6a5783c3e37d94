"""The recipe schema: every field validated, a bad one named in one line, overrides YAML-typed."""

import json
from pathlib import Path

import pytest
import yaml

from workbench.errors import WorkbenchError
from workbench.train.optimizers import OPTIMIZERS
from workbench.train.recipe import load_recipe, parse_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
OWN_RECIPES = ["toy", "vodka_v4", "dadapt_adam", "lion", "prodigy", "lr_range"]
MINIMAL = {"model": {"base": "toy:init"}, "data": {"root": "toy:shapes"}, "training": {"max_steps": 5}}


def write(tmp_path, data, name="x.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def error(tmp_path, data, overrides=()):
    with pytest.raises(WorkbenchError) as info:
        load_recipe(write(tmp_path, data), list(overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("name", OWN_RECIPES)
def test_shipped_recipes_validate(name):
    r = load_recipe(RECIPES / f"{name}.yaml")
    json.loads(r.to_json())  # the resolved recipe is plain JSON (run.json records it)
    assert r.trains("unet") or r.trains("text_encoder")


def test_shipped_recipes_say_what_the_field_reports_used():
    v4 = load_recipe(RECIPES / "vodka_v4.yaml")
    assert v4.optimizer.settings("unet").name == "adamw"
    assert v4.optimizer.settings("unet").lr == 5e-8 and v4.optimizer.settings("text_encoder").lr == 1.5e-7
    dadapt = load_recipe(RECIPES / "dadapt_adam.yaml").optimizer.settings("text_encoder")
    assert (dadapt.name, dadapt.lr, dadapt.options["weight_decay"], dadapt.options["decouple"]) == (
        "dadapt_adam",
        0.1,
        0.8,
        True,
    )
    ramp = load_recipe(RECIPES / "lr_range.yaml")
    assert ramp.schedule.name == "linear_ramp" and ramp.optimizer.lr == 3e-6 and ramp.validation.split == 0.2


def test_unknown_field_is_named_with_a_suggestion(tmp_path):
    msg = error(tmp_path, {**MINIMAL, "optimizer": {"lrr": 1e-6}})
    assert msg == f"{tmp_path / 'x.yaml'}: optimizer.lrr: unknown field (did you mean lr?)"
    msg = error(tmp_path, {**MINIMAL, "optimizer": {"text_encoder": {"wieght_decay": 0.1}}})
    assert "optimizer.text_encoder.wieght_decay: unknown field (did you mean weight_decay?)" in msg
    assert "trainning: unknown field (did you mean training?)" in error(
        tmp_path, {**MINIMAL, "trainning": {}}
    )


def test_bad_values_name_their_field(tmp_path):
    assert "training.batch_size: input should be greater than or equal to 1 (got 0)" in error(
        tmp_path, {**MINIMAL, "training": {"max_steps": 5, "batch_size": 0}}
    )
    assert "model: required field missing" in error(
        tmp_path, {k: v for k, v in MINIMAL.items() if k != "model"}
    )
    assert "training.max_steps: set training.max_epochs or training.max_steps" in error(
        tmp_path, {**MINIMAL, "training": {}}
    )
    msg = error(tmp_path, {**MINIMAL, "optimizer": {"name": "adam"}})
    assert "optimizer.name: unknown optimizer 'adam'; valid: " + ", ".join(OPTIMIZERS) in msg


def test_options_that_do_nothing_are_refused(tmp_path):
    assert "optimizer.eps: lion has no eps option" in error(
        tmp_path, {**MINIMAL, "optimizer": {"name": "lion", "eps": 1e-8}}
    )
    assert "optimizer.d0: adamw has no d0 option" in error(tmp_path, {**MINIMAL, "optimizer": {"d0": 1e-6}})
    msg = error(tmp_path, {**MINIMAL, "optimizer": {"text_encoder": {"name": "lion", "eps": 1e-8}}})
    assert "optimizer.text_encoder.eps: lion has no eps option" in msg
    assert "schedule.power: only used by polynomial" in error(
        tmp_path, {**MINIMAL, "schedule": {"name": "cosine", "power": 2}}
    )
    assert "schedule.half_cycle_steps: required by the triangular schedule" in error(
        tmp_path, {**MINIMAL, "schedule": {"name": "triangular"}}
    )
    assert "data.toy: only used with root toy:shapes" in error(
        tmp_path, {**MINIMAL, "data": {"root": "pics", "toy": {"n": 4}}}
    )


def test_text_encoder_overrides_inherit_and_zero_means_zero():
    optimizer = {
        "name": "adamw",
        "lr": 1e-6,
        "weight_decay": 0.05,
        "text_encoder": {"lr": 0.0, "weight_decay": 0},
    }
    r = parse_recipe({**MINIMAL, "optimizer": optimizer}, "r")
    te, unet = r.optimizer.settings("text_encoder"), r.optimizer.settings("unet")
    assert te.lr == 0.0 and te.options["weight_decay"] == 0 and te.options["betas"] == unet.options["betas"]
    assert unet.lr == 1e-6 and unet.options["weight_decay"] == 0.05
    assert not r.trains("text_encoder") and r.trains("unet")
    # an inherited option the text encoder's own optimizer lacks is simply not passed to it
    r = parse_recipe(
        {**MINIMAL, "optimizer": {"eps": 1e-7, "text_encoder": {"name": "lion", "lr": 1e-8}}}, "r"
    )
    assert "eps" not in r.optimizer.settings("text_encoder").options
    assert r.optimizer.settings("unet").options["eps"] == 1e-7


def test_nothing_to_train_is_an_error(tmp_path):
    msg = error(tmp_path, {**MINIMAL, "unet": {"train": False}, "optimizer": {"text_encoder": {"lr": 0}}})
    assert "unet.train: nothing would train" in msg


def test_set_overrides_are_yaml_typed(tmp_path):
    path = write(tmp_path, MINIMAL)
    r = load_recipe(
        path,
        [
            "training.max_steps=40",
            "optimizer.lr=1e-6",
            "optimizer.betas=[0.8, 0.9]",
            "validation.every_n_steps=null",
            "sampling.prompts=[a cat]",
        ],
    )
    assert r.training.max_steps == 40 and r.optimizer.lr == 1e-6 and r.optimizer.betas == (0.8, 0.9)
    assert r.validation.every_n_steps is None and r.sampling.prompts == ["a cat"]
    assert load_recipe(path, ["optimizer.text_encoder.lr=0"]).optimizer.settings("text_encoder").lr == 0
    msg = error(tmp_path, MINIMAL, ["training.max_stepz=4"])
    assert (
        "training.max_stepz: unknown field (did you mean max_steps?) (from --set training.max_stepz)" in msg
    )
    assert "(from --set training.max_steps)" in error(tmp_path, MINIMAL, ["training.max_steps=forty"])
    with pytest.raises(WorkbenchError, match="--set training: expected section.field=value"):
        load_recipe(path, ["training"])


def test_yaml_problems_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {base: toy:init\n")
    with pytest.raises(WorkbenchError, match=r"bad.yaml: not valid YAML \(line"):
        load_recipe(bad)
    with pytest.raises(WorkbenchError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(WorkbenchError, match="a recipe is a YAML mapping"):
        load_recipe(listed)


def test_resolved_recipe_round_trips():
    r = load_recipe(RECIPES / "toy.yaml", ["training.max_steps=7"])
    again = parse_recipe(json.loads(r.to_json()), "again")
    assert again == r and again.training.max_steps == 7
    assert parse_recipe(yaml.safe_load(r.to_yaml()), "yaml") == r


def test_recipe_show_prints_the_resolved_recipe(tmp_path):
    import typer
    from typer.testing import CliRunner

    from workbench.train.cli import recipe_app

    app = typer.Typer()
    app.add_typer(recipe_app, name="recipe")
    runner = CliRunner()
    shown = runner.invoke(
        app, ["recipe", "show", str(RECIPES / "toy.yaml"), "--set", "training.max_steps=3", "--json"]
    )
    assert shown.exit_code == 0, shown.output
    resolved = json.loads(shown.stdout)
    assert resolved["training"]["max_steps"] == 3 and resolved["schedule"]["warmup_steps"] == 0
    bad = runner.invoke(app, ["recipe", "show", str(write(tmp_path, {**MINIMAL, "unet": {"trian": True}}))])
    assert bad.exit_code == 2
    assert (
        bad.output.strip() == f"error: {tmp_path / 'x.yaml'}: unet.trian: unknown field (did you mean train?)"
    )
