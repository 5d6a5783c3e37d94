"""EveryDream2 configs import: ED2's own shipped config files (tests/fixtures/ed2, see its
LICENSE.md) and seed 003's train.json train what ED2 would train. Every expected number below is
worked out by hand from ED2's code (optimizer/optimizers.py, train.py), not by calling wb."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from workbench.errors import WorkbenchError
from workbench.train.ed2 import import_ed2
from workbench.train.recipe import load_recipe, parse_recipe
from workbench.train.schedules import build_scheduler

runner = CliRunner()
FIXTURES = Path(__file__).parent / "fixtures" / "ed2"

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


def ed2_folder(
    tmp_path: Path, train: str | dict = SEED_003_TRAIN, optimizer="optimizer.json", **extra
) -> Path:
    """A folder as a user has it: train.json beside ED2's shipped optimizer/validation files."""
    folder = tmp_path / "ed2"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("optimizer.json", "validation_default.json"):
        shutil.copy(FIXTURES / name, folder / name)
    if optimizer != "optimizer.json":
        shutil.copy(FIXTURES / optimizer, folder / "optimizer.json")
    for name, content in extra.items():
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    (folder / "train.json").write_text(train if isinstance(train, str) else json.dumps(train))
    return folder / "train.json"


def seed_003(**changes) -> dict:
    cfg = json.loads(SEED_003_TRAIN)
    cfg.update(changes)
    return cfg


def lrs(recipe, component: str, total_steps: int) -> list[float]:
    """The lr each optimizer step of a run of `total_steps` uses, from wb's scheduler."""
    s = recipe.optimizer.settings(component)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=s.lr)
    sched = build_scheduler(opt, recipe.schedule.for_component(component), total_steps)
    out = []
    for _ in range(total_steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def ed2_cosine(lr: float, k: int, warmup: int, decay: int) -> float:
    """diffusers' cosine with warmup, as ED2's get_scheduler builds it (num_cycles 0.5)."""
    if k < warmup:
        return lr * k / warmup
    progress = (k - warmup) / max(1, decay - warmup)
    return lr * max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))


# --- the acceptance case: seed 003's train.json beside ED2's shipped optimizer.json -----------------


def test_seed_003_with_shipped_optimizer_json_trains_as_ed2(tmp_path):
    result = import_ed2(ed2_folder(tmp_path))
    r = parse_recipe(result.recipe, "imported")
    # optimizer.json's base says constant (non-null): it wins over train.json's linear/400.
    # train.json's lr 3e-6 replaces both components' lr (optimizer.json: 1e-6 and 5e-7).
    n = 400  # seed 003: 16 images x 100 epochs / batch 4
    assert lrs(r, "unet", n) == [3e-6] * n
    # The text encoder runs optimizer.json's text_encoder_overrides schedule: cosine. Its null
    # warmup/decay take the base's, which took train.json's: warmup 400 (train.json fills base's
    # null), decay int(400 x 1.5) = 600 (train.json's 0 means ED2's default).
    expected = [ed2_cosine(3e-6, k, 400, 600) for k in range(n)]
    assert lrs(r, "text_encoder", n) == pytest.approx(expected, rel=1e-12, abs=1e-18)
    for c in ("unet", "text_encoder"):
        s = r.optimizer.settings(c)
        assert (s.name, s.lr) == ("adamw8bit", 3e-6)
        assert s.options == {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    assert any("overruled by optimizer.json:base" in n and "linear" in n for n in result.notes)
    assert result.schedules["unet"] == "adamw8bit lr 3e-06, constant"
    assert result.schedules["text_encoder"].startswith("adamw8bit lr 3e-06, cosine")
    # validation_default.json as ED2 reads it: auto_split_proportion 0.15 (ceil), no stabilizing
    v = r.validation
    assert (v.enabled, v.split, v.split_round_up, v.stabilize_train, v.every_n_epochs) == (
        True,
        0.15,
        True,
        False,
        1,
    )
    assert r.training.loss == "mse_huber"  # seed 003 leaves loss_type out: ED2's default
    assert r.data.bucket_set == "ed2" and r.saving.every_n_epochs == 20 and r.saving.every_n_minutes is None


def test_cli_from_ed2_then_recipe_show(tmp_path):
    from workbench.train.cli import recipe_app

    app = typer.Typer()
    app.add_typer(recipe_app, name="recipe")
    train_json = ed2_folder(tmp_path)
    out = tmp_path / "r.yaml"
    result = runner.invoke(
        app, ["recipe", "from-ed2", str(train_json), "-o", str(out)], env={"COLUMNS": "300"}
    )
    assert result.exit_code == 0, result.output
    assert "unet: adamw8bit lr 3e-06, constant" in result.output
    assert "text_encoder: adamw8bit lr 3e-06, cosine (warmup 400, decay 1.5x the run steps)" in result.output
    assert "warning" not in result.output  # nothing trains differently from ED2 here
    shown = runner.invoke(app, ["recipe", "show", str(out)], env={"COLUMNS": "300"})
    assert shown.exit_code == 0, shown.output
    assert "text_encoder:\n    name: cosine" in shown.output and "decay_run_multiple: 1.5" in shown.output
    assert load_recipe(out).schedule.text_encoder.warmup_steps == 400


# --- ED2's shipped configs, each against what ED2's code does with it -----------------------------------


SHIPPED = {
    # file: (unet (name, lr, schedule), text encoder (name, lr, schedule), loss, extra checks)
    "train.json": (("adamw8bit", 1e-6, "constant"), ("adamw8bit", 5e-7, "cosine"), "mse"),
    "trainSD21.json": (("adamw8bit", 2e-6, "constant"), ("adamw8bit", 2e-6, "constant"), "mse_huber"),
    "chain0.json": (("adamw8bit", 2.5e-6, "constant"), ("adamw8bit", 2.5e-6, "cosine"), "mse_huber"),
    "chain1.json": (("adamw8bit", 1e-6, "constant"), ("adamw8bit", 1e-6, "cosine"), "mse_huber"),
    "chain2.json": (("adamw8bit", 1.5e-6, "constant"), None, "mse_huber"),
    "cfgs/train_coco.json": (("adamw8bit", 1e-6, "constant"), ("adamw8bit", 1e-6, "cosine"), "mse_huber"),
}


@pytest.mark.parametrize("name", list(SHIPPED))
def test_every_shipped_config(name, monkeypatch):
    monkeypatch.chdir(FIXTURES)  # ED2's working folder: cfgs/... paths are relative to it
    result = import_ed2(name)
    r = parse_recipe(result.recipe, "imported")
    unet, te, loss = SHIPPED[name]
    for component, want in (("unet", unet), ("text_encoder", te)):
        if want is None:
            assert not r.trains(component)
            continue
        s = r.optimizer.settings(component)
        assert (s.name, s.lr, r.schedule.for_component(component).name) == want
        assert s.options == {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    assert r.training.loss == loss
    assert r.training.timestep_max == 999 and r.training.clip_skip == 1
    if want is not None and want[2] == "cosine":
        te_schedule = r.schedule.for_component("text_encoder")
        assert (te_schedule.decay_run_multiple, te_schedule.warmup_decay_divisor) == (1.5, 50)
    # nothing the shipped files say trains differently, except ED2's random seed (-1)
    assert all("seed=-1" in u or "pyramid_noise" in u for u in result.unsupported), result.unsupported


def test_shipped_details(monkeypatch):
    monkeypatch.chdir(FIXTURES)
    sd21 = parse_recipe(import_ed2("trainSD21.json").recipe, "sd21")
    assert (sd21.text_encoder.unfreeze_last_n_layers, sd21.text_encoder.freeze_embeddings) == (2, "auto")
    assert (sd21.data.resolution, sd21.training.batch_size, sd21.training.max_epochs) == (768, 6, 30)
    coco = parse_recipe(import_ed2("cfgs/train_coco.json").recipe, "coco")
    # manual validation on its own folder: the training data is not split
    assert coco.validation.root == "Q:/mldata/coco2017/val2017" and coco.validation.enabled
    assert (coco.data.cond_dropout, coco.training.zero_frequency_noise_ratio) == (1.0, 0.04)
    assert coco.validation.stabilize_train and coco.validation.stabilize_split == 0.15
    chain2 = import_ed2("chain2.json")
    r = parse_recipe(chain2.recipe, "chain2")
    assert r.training.grad_accum == 5 and r.logging.every_n_steps == 5  # log_step 25 micro-batches
    assert not any("ed1_mode" in u for u in chain2.unsupported)
    assert r.data.resolution == 640 and r.saving.every_n_epochs == 5
    base = parse_recipe(import_ed2("train.json").recipe, "train")
    assert base.training.min_snr_gamma == 5.0 and base.training.batch_size == 8


# --- ED2's rules one by one ---------------------------------------------------------------------------


def test_missing_keys_take_ed2_defaults(tmp_path):
    result = import_ed2(ed2_folder(tmp_path, {"data_root": "in", "resume_ckpt": "m.safetensors"}))
    r = parse_recipe(result.recipe, "imported")
    t = r.training
    assert (t.max_epochs, t.batch_size, t.zero_frequency_noise_ratio, t.loss) == (300, 2, 0.02, "mse_huber")
    assert (r.data.cond_dropout, r.training.seed, r.logging.every_n_steps) == (0.04, 555, 25)
    # neither save setting: every 20 minutes; no validation json: no validation
    assert (r.saving.every_n_minutes, r.saving.every_n_epochs, r.validation.enabled) == (20, None, False)
    # lr from optimizer.json (train.json has none): 1e-6 and the TE override's 5e-7
    assert (r.optimizer.settings("unet").lr, r.optimizer.settings("text_encoder").lr) == (1e-6, 5e-7)


def test_optimizer_json_defaults_to_the_working_folder(tmp_path, monkeypatch):
    folder = tmp_path / "alone"
    folder.mkdir()
    (folder / "train.json").write_text(json.dumps({"lr": 2e-6}))
    monkeypatch.chdir(tmp_path)  # no optimizer.json anywhere: ED2's own (shipped) one runs
    result = import_ed2(folder / "train.json")
    r = parse_recipe(result.recipe, "imported")
    assert r.schedule.for_component("text_encoder").name == "cosine" and r.schedule.name == "constant"
    assert any("ED2's shipped optimizer.json" in n for n in result.notes)


def test_decay_and_warmup_defaults_per_step(tmp_path):
    # train.json: linear, no decay (0) and no warmup (null); base leaves them null: ED2 decays over
    # int(1.5 x run) and warms up over int(decay / 50). Run of 200 steps: decay 300, warmup 6.
    opt = json.loads((FIXTURES / "optimizer.json").read_text())
    opt["base"]["lr_scheduler"] = None
    opt["text_encoder_overrides"]["lr_scheduler"] = None
    cfg = seed_003(lr_scheduler="linear", lr_warmup_steps=None, lr_decay_steps=0)
    r = parse_recipe(import_ed2(ed2_folder(tmp_path, cfg, **{"optimizer.json": opt})).recipe, "x")
    got = lrs(r, "unet", 200)
    want = [3e-6 * (k / 6 if k < 6 else max(0.0, (300 - k) / (300 - 6))) for k in range(200)]
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)
    assert lrs(r, "text_encoder", 200) == pytest.approx(want, rel=1e-12, abs=1e-18)
    # an explicit decay in train.json: warmup int(1000 / 50) = 20
    cfg = seed_003(lr_scheduler="linear", lr_warmup_steps=None, lr_decay_steps=1000)
    r = parse_recipe(import_ed2(ed2_folder(tmp_path, cfg, **{"optimizer.json": opt})).recipe, "x")
    assert (r.schedule.warmup_steps, r.schedule.decay_steps) == (20, 1000)


def test_grad_accum_converts_micro_batches_to_optimizer_steps(tmp_path):
    opt = json.loads((FIXTURES / "optimizer.json").read_text())
    opt["base"]["lr_scheduler"] = None
    cfg = seed_003(grad_accum=4, lr_decay_steps=2000, sample_steps=300)
    result = import_ed2(ed2_folder(tmp_path, cfg, **{"optimizer.json": opt}))
    r = parse_recipe(result.recipe, "x")
    assert (r.schedule.name, r.schedule.warmup_steps, r.schedule.decay_steps) == ("linear", 100, 500)
    assert any("micro-batches" in n and "warmup 400 -> 100" in n for n in result.notes)
    assert r.logging.every_n_steps == 6  # log_step 25 micro-batches: round(25 / 4)


def test_overrides_merge_with_or(tmp_path):
    opt = {
        "doc": {},
        "base": {"optimizer": "dadapt_adam", "lr": 0.5, "betas": [0.9, 0.99], "epsilon": 1e-7,
                 "weight_decay": 0.3, "d0": 5e-6, "decouple": False, "growth_rate": 1.02},
        "text_encoder_overrides": {"optimizer": "", "lr": 0, "weight_decay": 0, "betas": None},
    }  # fmt: skip
    r = parse_recipe(
        import_ed2(ed2_folder(tmp_path, seed_003(lr=None), **{"optimizer.json": opt})).recipe, "x"
    )
    u, t = r.optimizer.settings("unet"), r.optimizer.settings("text_encoder")
    assert (u.name, u.lr) == ("dadapt_adam", 0.5)
    assert u.options == {"betas": (0.9, 0.99), "eps": 1e-7, "weight_decay": 0.3, "d0": 5e-6,
                         "decouple": False, "growth_rate": 1.02, "use_bias_correction": False}  # fmt: skip
    # "" / 0 / null inherit the base (ED2's `or`); d0, decouple, growth_rate do NOT: ED2's defaults
    assert (t.name, t.lr) == ("dadapt_adam", 0.5)
    assert t.options == {"betas": (0.9, 0.99), "eps": 1e-7, "weight_decay": 0.3, "d0": 1e-6,
                         "decouple": True, "growth_rate": math.inf, "use_bias_correction": False}  # fmt: skip


def test_prodigy_has_bias_correction_and_safeguard_warmup(tmp_path):
    opt = {"doc": {}, "base": {"optimizer": "prodigy", "lr": 1.0, "weight_decay": 0.05, "betas": [0.8, 0.9]},
           "text_encoder_overrides": {"safeguard_warmup": False}}  # fmt: skip
    result = import_ed2(ed2_folder(tmp_path, seed_003(lr=None), **{"optimizer.json": opt}))
    r = parse_recipe(result.recipe, "x")
    u, t = r.optimizer.settings("unet").options, r.optimizer.settings("text_encoder").options
    assert u["use_bias_correction"] is True and u["safeguard_warmup"] is True and u["d0"] == 1e-6
    assert u["betas"] == (0.9, 0.999) and u["eps"] == 1e-8 and u["weight_decay"] == 0.05  # betas not passed
    assert t["use_bias_correction"] is True and t["safeguard_warmup"] is False
    assert any("does not pass them to Prodigy" in n for n in result.notes)


def test_flat_optimizer_json_of_2023_03(tmp_path):
    result = import_ed2(ed2_folder(tmp_path, seed_003(lr=2e-6), optimizer="optimizer_flat_2023-03.json"))
    r = parse_recipe(result.recipe, "x")
    assert (r.optimizer.settings("unet").lr, r.optimizer.settings("text_encoder").lr) == (2e-6, 1e-6)
    assert r.optimizer.settings("unet").name == "adamw8bit" and r.training.loss == "mse"
    # train.json's schedule for both: linear, warmup 400, decay 1.5x the run
    assert (r.schedule.name, r.schedule.warmup_steps, r.schedule.decay_run_multiple) == ("linear", 400, 1.5)
    assert r.schedule.text_encoder is None
    assert not result.unsupported


def test_text_encoder_freezing(tmp_path):
    # 2023-06 optimizer_dadapt.json: freeze_front_n_layers -6, freeze_embeddings true
    r = parse_recipe(import_ed2(ed2_folder(tmp_path, optimizer="optimizer_dadapt_2023-06.json")).recipe, "x")
    te = r.text_encoder
    assert (te.unfreeze_last_n_layers, te.freeze_embeddings, te.freeze_final_layer_norm) == (6, True, False)
    opt = json.loads((FIXTURES / "optimizer.json").read_text())
    opt["text_encoder_freezing"] = {"unfreeze_final_n_layers": 2}  # ED2's docs' key: its code ignores it
    result = import_ed2(ed2_folder(tmp_path, **{"optimizer.json": opt}))
    r = parse_recipe(result.recipe, "x")
    assert r.text_encoder.unfreeze_last_n_layers is None and r.text_encoder.freeze_embeddings is False
    assert any("unfreeze_final_n_layers" in n and "ignores" in n for n in result.notes)
    opt["text_encoder_freezing"] = {"freeze_front_n_layers": 3}
    r = parse_recipe(import_ed2(ed2_folder(tmp_path, **{"optimizer.json": opt})).recipe, "x")
    assert (r.text_encoder.freeze_first_n_layers, r.text_encoder.freeze_embeddings) == (3, "auto")


@pytest.fixture
def tiny_text_encoder():
    from workbench.toy.model import toy_components

    return toy_components(0)["text_encoder"]


def test_ed2_freezing_rule_on_a_clip_text_model(tiny_text_encoder):
    from workbench.train.optimizers import freeze_text_encoder

    tm = getattr(tiny_text_encoder, "text_model", tiny_text_encoder)  # transformers 4 / 5
    n = len(tm.encoder.layers)
    freeze_text_encoder(tiny_text_encoder, n, "auto", False)  # >= the layer count: embeddings train
    assert all(p.requires_grad for p in tiny_text_encoder.parameters())
    freeze_text_encoder(tiny_text_encoder, n - 1, "auto", False)
    assert not any(p.requires_grad for p in tm.embeddings.parameters())
    assert not any(p.requires_grad for p in tm.encoder.layers[0].parameters())
    assert all(p.requires_grad for p in tm.encoder.layers[-1].parameters())


def test_validation_keys(tmp_path):
    val = {"documentation": {"x": "y"}, "validate_training": True, "val_split_mode": "manual",
           "val_data_root": "/data/val", "extra_manual_datasets": {}, "every_n_epochs": 0.5}  # fmt: skip
    cfg = seed_003(loss_type="mse", ed1_mode=True)
    result = import_ed2(ed2_folder(tmp_path, cfg, **{"validation_default.json": val}))
    r = parse_recipe(result.recipe, "x")
    assert (r.validation.root, r.validation.every_n_epochs, r.training.loss) == ("/data/val", 0.5, "mse")
    assert not result.unsupported  # no warning for documentation, {}, mse, ed1_mode
    val = {"val_split_proportion": 0.2, "stabilize_training_loss": True}  # the old key name
    r = parse_recipe(import_ed2(ed2_folder(tmp_path, **{"validation_default.json": val})).recipe, "x")
    assert (r.validation.root, r.validation.split, r.validation.stabilize_split) == (None, 0.2, 0.15)


def test_validation_split_takes_ceil_and_fractional_epochs():
    from workbench.train.bookkeeping import step_in_epoch_due
    from workbench.train.data import Example, split_examples

    examples = [Example(key=f"k{i}", caption=str(i)) for i in range(20)]
    train, val = split_examples(examples, 0.11, 555, round_up=True)
    assert (len(train), len(val)) == (17, 3)  # ceil(2.2) = 3, where round gives 2
    # 0.5: twice per epoch of 7 steps: after steps 4 and 7 (ceil(3.5), ceil(7)) of each epoch
    assert [s for s in range(1, 15) if step_in_epoch_due(0.5, s, 7)] == [4, 7, 11, 14]
    assert [s for s in range(1, 8) if step_in_epoch_due(1, s, 7)] == []


def test_ema_import(tmp_path):
    cfg = seed_003(ema_strength_target=0.1, ema_update_interval=50, ema_device="cpu", grad_accum=2)
    result = import_ed2(ed2_folder(tmp_path, cfg))
    tr = parse_recipe(result.recipe, "x").training
    # ED2 updates every interval x grad_accum micro-batches: every 50 optimizer steps; no warm-up
    assert (tr.ema_strength_target, tr.ema_every_n_steps, tr.ema_device, tr.ema_warmup) == (
        0.1,
        50,
        "cpu",
        False,
    )
    assert not any("ema" in u for u in result.unsupported)


def test_clip_grad_norm_and_clip_skip(tmp_path):
    result = import_ed2(ed2_folder(tmp_path, seed_003(clip_grad_norm=1.5, clip_skip=2)))
    r = parse_recipe(result.recipe, "x")
    assert (r.unet.clip_grad_norm, r.text_encoder.clip_grad_norm, r.training.clip_grad_norm) == (
        1.5,
        None,
        None,
    )
    assert r.training.clip_skip == 2 and not result.unsupported


def test_wrongly_typed_field_is_refused_with_one_line(tmp_path):
    from workbench.cli import app

    train_json = ed2_folder(tmp_path, seed_003(timestep_end="abc"))
    with pytest.raises(WorkbenchError, match=r"train.json: timestep_end: expected an integer, got \"abc\""):
        import_ed2(train_json)
    result = runner.invoke(app, ["recipe", "from-ed2", str(train_json), "-o", str(tmp_path / "r.yaml")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "train.json: timestep_end" in lines[0]
    assert not (tmp_path / "r.yaml").exists()
    opt = json.loads((FIXTURES / "optimizer.json").read_text())
    opt["base"]["weight_decay"] = "0.01"
    with pytest.raises(WorkbenchError, match="optimizer.json: base.weight_decay: expected a number"):
        import_ed2(ed2_folder(tmp_path, **{"optimizer.json": opt}))


def test_unknown_optimizer_name_trains_adamw8bit_with_a_warning(tmp_path):
    opt = json.loads((FIXTURES / "optimizer.json").read_text())
    opt["base"]["optimizer"] = "adamw_8bit"
    result = import_ed2(ed2_folder(tmp_path, **{"optimizer.json": opt}))
    assert parse_recipe(result.recipe, "x").optimizer.settings("unet").name == "adamw8bit"
    assert any("adamw_8bit" in u and "adamw8bit" in u for u in result.unsupported)
    opt["base"]["optimizer"] = "dadapt_adan"
    with pytest.raises(WorkbenchError, match="wb has no dadapt_adan"):
        import_ed2(ed2_folder(tmp_path, **{"optimizer.json": opt}))


def test_wb_train_ed2_logs_each_components_schedule(tmp_path, monkeypatch):
    """`wb train --ed2`: the lr of each component at every optimizer step, as ED2 would run it."""
    from workbench.cli import friendly
    from workbench.toy.model import toy_init
    from workbench.toy.shapes import write_dataset
    from workbench.train.cli import train

    write_dataset(tmp_path / "images", 6, seed=3, size=64)
    toy_init(tmp_path / "base.safetensors", seed=1)
    opt = json.loads((FIXTURES / "optimizer.json").read_text())
    opt["base"]["optimizer"] = "adamw"  # bitsandbytes needs a GPU
    (tmp_path / "optimizer.json").write_text(json.dumps(opt))
    cfg = {"data_root": str(tmp_path / "images"), "resume_ckpt": str(tmp_path / "base.safetensors"),
           "resolution": 64, "batch_size": 2, "max_epochs": 2, "lr": 1e-4, "log_step": 1,
           "save_every_n_epochs": 5, "clip_skip": 2, "loss_type": "mse_huber"}  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(cfg))
    app = typer.Typer()
    app.command("train")(friendly(train))
    app.command("noop")(lambda: None)
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "--ed2", "train.json", "-o", "run"], env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "resolution=64" in result.output  # ED2 refuses 64 px: said, and wb's buckets used
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    by_step = {row["step"]: row for row in rows if "lr/unet" in row}
    assert sorted(by_step) == [1, 2, 3, 4, 5, 6]  # 6 images / batch 2 = 3 steps x 2 epochs
    # UNet: constant 1e-4. Text encoder: cosine, decay int(6 x 1.5) = 9, warmup int(9 / 50) = 0
    for step, row in by_step.items():
        assert row["lr/unet"] == pytest.approx(1e-4, rel=1e-12)
        assert row["lr/text_encoder"] == pytest.approx(1e-4 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 9)))
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (
        record["recipe"]["training"]["clip_skip"] == 2 and record["recipe"]["training"]["loss"] == "mse_huber"
    )
