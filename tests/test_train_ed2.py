"""EveryDream2 configs import: seed 003's full train.json and seed 000's D-Adaptation settings, every
key accounted for; and `wb train --ed2` on a folder dataset."""

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from workbench.errors import WorkbenchError
from workbench.train.ed2 import import_ed2
from workbench.train.recipe import load_recipe, parse_recipe

runner = CliRunner()

# seed 003 ("Configs Used for The First Run"), verbatim, with the braces the blog left out.
SEED_003_TRAIN = r"""{
  "config": "train.json",
  "amp": true,
  "batch_size": 4,
  "ckpt_every_n_minutes": null,
  "clip_grad_norm": null,
  "clip_skip": 0,
  "cond_dropout": 0.04,
  "data_root": "D:\\ED2\\EveryDream2trainer\\input\\...",
  "disable_textenc_training": false,
  "disable_xformers": false,
  "flip_p": 0.0,
  "gpuid": 0,
  "gradient_checkpointing": true,
  "grad_accum": 1,
  "logdir": "logs",
  "log_step": 25,
  "lowvram": false,
  "lr": 3e-06,
  "lr_decay_steps": 0,
  "lr_scheduler": "linear",
  "lr_warmup_steps": 400,
  "max_epochs": 100,
  "notebook": false,
  "optimizer_config": "optimizer.json",
  "project_name": "lr_discovery_2",
  "resolution": 512,
  "resume_ckpt": "sd_v1-5_vae",
  "run_name": null,
  "sample_prompts": "sample_prompts.txt",
  "sample_steps": 300,
  "save_ckpt_dir": null,
  "save_ckpts_from_n_epochs": 0,
  "save_every_n_epochs": 20,
  "save_optimizer": false,
  "scale_lr": false,
  "seed": 555,
  "shuffle_tags": false,
  "validation_config": "validation_default.json",
  "wandb": false,
  "write_schedule": false,
  "rated_dataset": false,
  "rated_dataset_target_dropout_percent": 50,
  "zero_frequency_noise_ratio": 0.02,
  "save_full_precision": false,
  "disable_unet_training": false,
  "rated_dataset_target_dropout_rate": 50,
  "disable_amp": false,
  "useadam8bit": false
}"""
SEED_003_VALIDATION = {
    "validate_training": True,
    "val_split_mode": "automatic",
    "val_data_root": None,
    "val_split_proportion": 0.2,
    "stabilize_training_loss": True,
    "stabilize_split_proportion": 0.2,
    "every_n_epochs": 1,
    "seed": 555,
}
# EveryDream2's default optimizer.json (sections and keys as in FORMATS.md and seed 001).
ED2_OPTIMIZER = {
    "doc": {"base": "base optimizer configuration for unet and text encoder"},
    "base": {"optimizer": "adamw8bit", "lr": 1e-6, "lr_scheduler": "constant", "lr_decay_steps": None,
             "lr_warmup_steps": None, "betas": [0.9, 0.999], "epsilon": 1e-8, "weight_decay": 0.010},
    "text_encoder_overrides": {"optimizer": None, "lr": None, "lr_scheduler": None, "lr_decay_steps": None,
                               "lr_warmup_steps": None, "betas": None, "epsilon": None, "weight_decay": None},
    "text_encoder_freezing": {"unfreeze_last_n_layers": None},
    "apply_grad_scaler_step_tweaks": True,
    "log_grad_norm": True,
}  # fmt: skip
# seed 000's optimizer_dadapt.json: D-Adaptation Adam on both, "we freeze just 3 layers".
SEED_000_DADAPT = {
    "base": {"optimizer": "dadapt_adam", "lr": 1e-1, "lr_scheduler": "constant", "lr_decay_steps": None,
             "lr_warmup_steps": None, "betas": [0.9, 0.999], "epsilon": 1e-8, "weight_decay": 0.80,
             "d0": 1e-6, "decouple": True},
    "text_encoder_overrides": {"optimizer": None, "lr": None, "betas": None, "epsilon": None,
                               "weight_decay": None},
    "text_encoder_freezing": {"unfreeze_last_n_layers": 9},
}  # fmt: skip


def write_seed_003(folder: Path, optimizer=ED2_OPTIMIZER) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.json").write_text(SEED_003_TRAIN)
    (folder / "optimizer.json").write_text(json.dumps(optimizer))
    (folder / "validation_default.json").write_text(json.dumps(SEED_003_VALIDATION))
    return folder / "train.json"


def keys_of(path: Path, prefix: str = "") -> list[str]:
    data = json.loads(path.read_text())
    out = []
    for k, v in data.items():
        if isinstance(v, dict) and k in ("base", "text_encoder_overrides", "text_encoder_freezing"):
            out += [f"{prefix}{k}.{kk}" for kk in v]
        else:
            out.append(prefix + k)
    return out


def accounted(result, key: str) -> int:
    """How many of mapped / unsupported / ignored name this file:key (must be exactly one)."""
    return sum(
        1
        for item in result.mapped + result.unsupported + result.ignored
        if item.startswith(key + " ->") or item.startswith(key + "=")
    )


def test_seed_003_full_config_imports(tmp_path):
    train_json = write_seed_003(tmp_path / "ed2")
    result = import_ed2(train_json)
    r = parse_recipe(result.recipe, "imported")
    assert r.model.base == "sd_v1-5_vae" and r.data.root == "D:\\ED2\\EveryDream2trainer\\input\\..."
    assert (r.data.resolution, r.data.cond_dropout, r.data.flip_p) == (512, 0.04, 0.0)
    unet = r.optimizer.settings("unet")
    assert unet.name == "adamw8bit" and unet.lr == 3e-6  # train.json's lr wins over optimizer.json's
    assert unet.options == {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    assert r.optimizer.settings("text_encoder") == unet  # null overrides inherit
    assert (r.schedule.name, r.schedule.warmup_steps, r.schedule.decay_steps) == ("linear", 400, None)
    t = r.training
    assert (t.max_epochs, t.batch_size, t.grad_accum, t.seed, t.gradient_checkpointing) == (
        100,
        4,
        1,
        555,
        True,
    )
    assert t.zero_frequency_noise_ratio == 0.02 and t.mixed_precision == "auto"
    v = r.validation
    assert (v.enabled, v.split, v.stabilize_train, v.stabilize_split, v.every_n_epochs, v.seed) == (
        True,
        0.2,
        True,
        0.2,
        1,
        555,
    )
    assert (r.saving.name, r.saving.every_n_epochs, r.logging.every_n_steps) == ("lr_discovery_2", 20, 25)
    # every key of every file is accounted for exactly once
    folder = tmp_path / "ed2"
    for name in ("train.json", "optimizer.json", "validation_default.json"):
        for key in keys_of(folder / name, f"{name}:"):
            assert accounted(result, key) == 1, key
    assert (
        'train.json:sample_prompts="sample_prompts.txt" (file not found beside train.json)'
        in result.unsupported
    )
    assert any("linear_ramp" in note for note in result.notes)
    assert any("EveryDream2 model name" in note for note in result.notes)


def test_seed_000_dadapt_settings_import(tmp_path):
    train_json = write_seed_003(tmp_path / "ed2", optimizer=SEED_000_DADAPT)
    r = parse_recipe(import_ed2(train_json).recipe, "imported")
    for component in ("unet", "text_encoder"):
        s = r.optimizer.settings(component)
        assert (s.name, s.lr) == ("dadapt_adam", 3e-6)  # train.json's lr still wins, as in ED2
        assert s.options["weight_decay"] == 0.8 and s.options["d0"] == 1e-6 and s.options["decouple"] is True
    assert r.text_encoder.unfreeze_last_n_layers == 9 and r.text_encoder.freeze_embeddings is True
    # without train.json's lr, the optimizer file's multiplier is used
    raw = json.loads(SEED_003_TRAIN)
    raw["lr"] = None
    train_json.write_text(json.dumps(raw))
    assert parse_recipe(import_ed2(train_json).recipe, "imported").optimizer.settings("unet").lr == 0.1


def test_ed2_traps_are_not_copied(tmp_path):
    opt = json.loads(json.dumps(ED2_OPTIMIZER))
    opt["text_encoder_overrides"]["lr"] = 0
    result = import_ed2(write_seed_003(tmp_path / "zero", optimizer=opt))
    r = parse_recipe(result.recipe, "imported")
    assert r.optimizer.settings("text_encoder").lr == 0 and not r.trains("text_encoder")
    assert any("silently used the base lr" in note for note in result.notes)
    opt["base"]["optimizer"] = "adamw_8bit"  # ED2 would quietly fall back to adamw8bit
    with pytest.raises(
        WorkbenchError, match="optimizer.name: unknown optimizer 'adamw_8bit'; valid: adamw, "
    ):
        import_ed2(write_seed_003(tmp_path / "typo", optimizer=opt))


def test_missing_companion_file_is_named(tmp_path):
    train_json = write_seed_003(tmp_path / "ed2")
    (tmp_path / "ed2" / "validation_default.json").unlink()
    with pytest.raises(
        WorkbenchError, match="validation_config 'validation_default.json' not found beside it"
    ):
        import_ed2(train_json)


def test_cli_from_ed2_writes_a_recipe_and_warns(tmp_path):
    from workbench.train.cli import recipe_app

    app = typer.Typer()
    app.add_typer(recipe_app, name="recipe")
    train_json = write_seed_003(tmp_path / "ed2")
    result = runner.invoke(
        app,
        ["recipe", "from-ed2", str(train_json), "-o", str(tmp_path / "recipe.yaml")],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 0, result.output
    assert "warning: not imported (wb has no equivalent yet): train.json:sample_prompts" in result.output
    assert "ignored, no effect in wb (listed with their values at the top of" in result.output
    text = (tmp_path / "recipe.yaml").read_text()
    assert "# NOT imported" in text and "sample_prompts" in text
    assert load_recipe(tmp_path / "recipe.yaml").optimizer.lr == 3e-6
    bad = runner.invoke(
        app, ["recipe", "from-ed2", str(tmp_path / "nope.json"), "-o", str(tmp_path / "x.yaml")]
    )
    assert bad.exit_code == 2 and bad.output.strip().startswith("error:") and "no such" in bad.output


def test_wb_train_ed2_on_a_folder_of_images(tmp_path, monkeypatch):
    """`wb train --ed2 train.json`: an ED2-style folder (images + .txt captions) and a toy base."""
    from workbench.cli import friendly
    from workbench.toy.model import toy_init
    from workbench.toy.shapes import write_dataset
    from workbench.train.cli import train

    write_dataset(tmp_path / "images", 6, seed=3, size=32)
    toy_init(tmp_path / "base.safetensors", seed=1)
    (tmp_path / "train.json").write_text(
        json.dumps(
            {
                "data_root": str(tmp_path / "images"),
                "resume_ckpt": str(tmp_path / "base.safetensors"),
                "resolution": 32,
                "batch_size": 2,
                "max_epochs": 1,
                "lr": 1e-4,
                "gpuid": 0,
                "clip_skip": 2,
                "save_every_n_epochs": 1,
                "optimizer_config": None,
                "validation_config": None,
            }
        )
    )
    app = typer.Typer()
    app.command("train")(friendly(train))
    app.command("noop")(lambda: None)
    monkeypatch.chdir(tmp_path)
    args = ["train", "--ed2", "train.json", "--set", "optimizer.name=adamw", "-o", "run"]
    result = runner.invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "not imported (wb has no equivalent yet): train.json:clip_skip=2" in result.output
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["source"]["ed2"] == "train.json" and record["data"]["examples"] == 6
    assert record["recipe"]["validation"]["enabled"] is False
    assert list((tmp_path / "run" / "checkpoints").glob("*-ep01-gs00003.safetensors"))


def test_ema_settings_import(tmp_path):
    train_json = write_seed_003(tmp_path / "ed2")
    cfg = json.loads(train_json.read_text())
    cfg.update(ema_strength_target=0.1, ema_update_interval=50, ema_device="cpu", ema_sample_ema_model=True)
    train_json.write_text(json.dumps(cfg))
    result = import_ed2(train_json)
    r = parse_recipe(result.recipe, "imported")
    tr = r.training
    assert (tr.ema_strength_target, tr.ema_every_n_steps, tr.ema_device) == (0.1, 50, "cpu")
    assert tr.ema_decay is None
    assert any(i.startswith("train.json:ema_sample_ema_model=true") for i in result.ignored)
    assert not any("ema" in u for u in result.unsupported)
    assert r.data.aspect_buckets  # ED2 always trains in aspect-ratio buckets
