"""The training loop end to end on the toy model (CPU): determinism, freezing, NaN stop, checkpoints,
run records, and the issue's acceptance command through the CLI."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from workbench.checkpoint.reader import open_checkpoint
from workbench.cli import app as wb_app
from workbench.cli import friendly
from workbench.train import bookkeeping, loop
from workbench.train.cli import recipe_app, runs_diff
from workbench.train.cli import train as train_command
from workbench.train.recipe import parse_recipe
from workbench.train.runs import PACKAGES, diff_runs, read_metrics
from workbench.train.validation import validation_loss

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
runner = CliRunner()


def cli() -> typer.Typer:
    """wb's app with the train commands registered exactly as workbench/cli.py registers them."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    mine = {"train", "recipe", "runs"}  # already registered there once the lead wires them in
    app.registered_commands.extend(c for c in wb_app.registered_commands if c.name not in mine)
    app.registered_groups.extend(g for g in wb_app.registered_groups if g.name not in mine)
    app.command("train")(friendly(train_command))
    app.add_typer(recipe_app, name="recipe")
    runs_app = typer.Typer(help="Training runs: compare what ran.", no_args_is_help=True)
    app.add_typer(runs_app, name="runs")
    runs_app.command("diff")(friendly(runs_diff))
    return app


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from workbench.toy.model import toy_init

    return toy_init(tmp_path_factory.mktemp("toy") / "base.safetensors", seed=5)


def recipe(base, **sections):
    raw = {
        "model": {"base": str(base)},
        "data": {"root": "toy:shapes", "resolution": 32, "toy": {"n": 12, "seed": 1}},
        "validation": {"split": 0.25, "every_n_epochs": None, "stabilize_split": 0.2},
        "optimizer": {"name": "adamw", "lr": 1e-4},
        "training": {"max_steps": 3, "batch_size": 2},
        "saving": {"every_n_epochs": None, "dtype": "fp32"},
        "logging": {"tensorboard": False},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return parse_recipe(raw, "test")


def scalars(run, key):
    return [(m["step"], m[key]) for m in read_metrics(run) if key in m]


def tensors(path, prefix=""):
    with open_checkpoint(path) as ckpt:
        return {k: ckpt[k].clone() for k in ckpt if k.startswith(prefix)}


TE = "cond_stage_model.transformer.text_model."


@pytest.fixture(scope="module")
def twin_runs(base, tmp_path_factory):
    """Two runs of one recipe and seed, and a third with a different lr and the TE at lr 0."""
    root = tmp_path_factory.mktemp("runs")
    r = recipe(base)
    a = loop.train(r, root / "a")
    b = loop.train(r, root / "b")
    c = loop.train(recipe(base, optimizer={"lr": 2e-4, "text_encoder": {"lr": 0}}), root / "c")
    return a, b, c


def test_one_seed_gives_one_run(twin_runs):
    a, b, _ = twin_runs
    assert a.stopped is None and a.steps == 3 and len(a.val_losses) == 2  # at the start and the end
    for key in ("loss/train", "loss/val", "loss/train_stable", "lr/unet", "lr/text_encoder"):
        assert scalars(a.run_dir, key) == scalars(b.run_dir, key), key
    ta, tb = tensors(a.checkpoints[-1]), tensors(b.checkpoints[-1])
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert (a.run_dir / "split.json").read_text() == (b.run_dir / "split.json").read_text()


def test_validation_loss_is_the_same_number_for_the_same_weights(twin_runs):
    from workbench.pipeline import load_modules, model_spec
    from workbench.tokenizer import clip_tokenizer
    from workbench.train.data import CaptionedImages, load_examples
    from workbench.train.diffusion import Models, noise_scheduler_for

    a = twin_runs[0]
    path = a.checkpoints[-1]
    with open_checkpoint(path) as ckpt:
        spec = model_spec(ckpt)
        m = load_modules(ckpt, spec=spec)
    models = Models(
        m["unet"],
        m["text_encoder"],
        m["vae"],
        clip_tokenizer(),
        noise_scheduler_for(spec.configs["scheduler"]),
        0.18215,
    )
    split = json.loads((a.run_dir / "split.json").read_text())
    r = recipe(Path("x"))
    examples = {e.key: e for e in load_examples(r.data)}
    val = CaptionedImages([examples[k] for k in split["validation"]], r.data, augment=False)
    first = validation_loss(models, val, r.validation.timesteps, r.validation.seed, 2)
    torch.manual_seed(1234)  # global RNG state must not matter
    torch.randn(100)
    second = validation_loss(models, val, r.validation.timesteps, r.validation.seed, 2)
    assert first == second
    # ... and it is the number the run logged for these weights (saved in fp32) at its last step
    assert scalars(a.run_dir, "loss/val")[-1] == (3, pytest.approx(first, rel=1e-6))
    # a different batch size groups the same items differently, still the same loss
    assert validation_loss(models, val, r.validation.timesteps, r.validation.seed, 1) == pytest.approx(first)


def test_text_encoder_at_lr_zero_is_left_untouched(twin_runs, base):
    c = twin_runs[2]
    trained, original = tensors(c.checkpoints[-1]), tensors(base)
    te = [k for k in original if k.startswith(TE)]
    assert te and all(torch.equal(trained[k], original[k]) for k in te)
    unet = [k for k in original if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(trained[k], original[k]) for k in unet)
    assert scalars(c.run_dir, "lr/text_encoder") == []  # no optimizer for it
    record = json.loads((c.run_dir / "run.json").read_text())
    assert set(record["optimizers"]) == {"unet"} and record["frozen"]["text_encoder"]["trained"] == 0


def test_run_record_and_runs_diff(twin_runs):
    a, b, c = twin_runs
    record = json.loads((a.run_dir / "run.json").read_text())
    assert set(PACKAGES) <= set(record["versions"]) and record["device"]["torch_build"] == torch.__version__
    assert record["recipe"]["optimizer"]["lr"] == 1e-4 and record["device"]["type"] == "cpu"
    assert record["data"]["examples"] == 12 and record["data"]["validation"] == 3
    assert len(record["data"]["sha256"]) == 64 and len(record["base"]["sha256"]) == 64
    assert record["optimizers"]["unet"]["class"] == "torch.optim.adamw.AdamW"
    same = {d.key for d in diff_runs(a.run_dir, b.run_dir)}
    assert not any(k.startswith(("recipe.", "versions.", "data.", "optimizers.")) for k in same), same
    diffs = {d.key: (d.a, d.b) for d in diff_runs(a.run_dir, c.run_dir)}
    assert diffs["recipe.optimizer.lr"] == (1e-4, 2e-4)
    assert diffs["recipe.optimizer.text_encoder.lr"] == (None, 0.0)
    assert "optimizers.text_encoder.lr" in diffs
    result = runner.invoke(cli(), ["runs", "diff", str(a.run_dir), str(c.run_dir), "--json"])
    assert result.exit_code == 0, result.output
    listed = {d["key"] for d in json.loads(result.stdout)}
    assert {"recipe.optimizer.lr", "recipe.optimizer.text_encoder.lr"} <= listed


def test_frozen_layers_stay_bit_identical_and_schedule_steps_per_optimizer_step(base, tmp_path):
    r = recipe(
        base,
        text_encoder={
            "unfreeze_last_n_layers": 2,
            "freeze_embeddings": True,
            "freeze_final_layer_norm": True,
        },
        training={"max_steps": 4, "batch_size": 1, "grad_accum": 2},
        schedule={"name": "linear_ramp"},
        optimizer={"lr": 4e-4, "text_encoder": {"lr": 2e-4}},
        validation={"enabled": False},
    )
    result = loop.train(r, tmp_path / "run")
    assert result.steps == 4 and result.val_losses == []
    # 4 optimizer steps of 2 micro-batches each: the ramp moved once per optimizer step
    assert scalars(result.run_dir, "lr/unet") == [(i, pytest.approx(i * 1e-4)) for i in (1, 2, 3, 4)]
    assert scalars(result.run_dir, "lr/text_encoder") == [
        (i, pytest.approx(i * 0.5e-4)) for i in (1, 2, 3, 4)
    ]
    trained, original = tensors(result.checkpoints[-1], TE), tensors(base, TE)
    moved = {k for k in original if not torch.equal(trained[k], original[k])}
    assert moved and all(k.startswith((TE + "encoder.layers.3.", TE + "encoder.layers.4.")) for k in moved)
    assert all(k.startswith(TE + "encoder.layers.") for k in moved)


def test_adaptive_optimizers_log_d_times_lr_quietly(base, tmp_path, capfd):
    optimizer = {"name": "prodigy", "lr": 1.0, "text_encoder": {"lr": 0.5}}
    r = recipe(base, optimizer=optimizer, training={"max_steps": 2}, validation={"enabled": False})
    result = loop.train(r, tmp_path / "run")
    unet, te = scalars(result.run_dir, "lr/d*lr/unet"), scalars(result.run_dir, "lr/d*lr/text_encoder")
    assert [s for s, _ in unet] == [1, 2] and all(v > 0 for _, v in unet + te)
    assert scalars(result.run_dir, "lr/text_encoder") == [(1, 0.5), (2, 0.5)]  # the multiplier itself
    out, _ = capfd.readouterr()
    assert out == ""  # Prodigy's and D-Adaptation's console prints are off


def test_bf16_autocast_run_after_an_fp32_run_in_one_process(base, tmp_path, twin_runs):
    # accelerate's process-wide state would refuse a second precision; each wb run resets it
    r = recipe(base, training={"max_steps": 2, "mixed_precision": "bf16"}, validation={"enabled": False})
    result = loop.train(r, tmp_path / "run")
    assert result.stopped is None and result.last_loss is not None and math.isfinite(result.last_loss)
    assert json.loads((result.run_dir / "run.json").read_text())["device"]["mixed_precision"] == "bf16"
    # weights stay float32 (autocast computes in bf16); the file is fp32 as the recipe asks
    assert {t.dtype for t in tensors(result.checkpoints[-1]).values() if t.is_floating_point()} == {
        torch.float32
    }


def test_early_stop_after_rising_validation_loss(base, tmp_path, monkeypatch):
    values = iter([1.0, 0.9, 1.0, 1.1, 0.5, 0.4])  # loss/val at steps 0, 1, 2, 3, ...
    monkeypatch.setattr(bookkeeping, "validation_loss", lambda *a, **k: next(values))
    r = recipe(base, validation={"every_n_steps": 1, "early_stop_after": 2, "stabilize_train": False},
               training={"max_steps": 8})  # fmt: skip
    result = loop.train(r, tmp_path / "run")
    assert result.stopped == "early_stop" and result.steps == 3
    assert "rose 2 evaluations in a row" in result.message
    assert [p.name for p in result.checkpoints] == ["run-ep01-gs00003.safetensors"]  # kept at the stop


def test_min_snr_weighting(base):
    from workbench.pipeline import load_modules
    from workbench.tokenizer import clip_tokenizer
    from workbench.toy.model import TOY_SCHEDULER
    from workbench.train.diffusion import Models, denoising_loss, noise_scheduler_for

    m = load_modules(base)
    models = Models(
        m["unet"], m["text_encoder"], m["vae"], clip_tokenizer(), noise_scheduler_for(TOY_SCHEDULER), 1.0
    )
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    ids, t = torch.zeros(3, 77, dtype=torch.long), torch.tensor([10, 500, 990])
    with torch.no_grad():
        plain = denoising_loss(models, latents, ids, noise, t)
        weighted = denoising_loss(models, latents, ids, noise, t, min_snr_gamma=5.0)
    a = models.noise_scheduler.alphas_cumprod[t]
    snr = a / (1 - a)
    assert torch.allclose(weighted, plain * torch.clamp(snr, max=5.0) / snr)
    assert weighted[0] < plain[0] and torch.isclose(weighted[2], plain[2])  # low noise: SNR > 5, damped


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(base, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = loop.denoising_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(loop, "denoising_loss", poisoned)
    run = tmp_path / "run"
    r = tmp_path / "r.yaml"
    r.write_text(json.dumps(recipe(base, training={"max_steps": 6}, saving={"every_n_steps": 2}).to_dict()))
    result = runner.invoke(cli(), ["train", str(r), "-o", str(run)], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    last = [line for line in result.output.splitlines() if line.strip()][-1]
    good = run / "checkpoints" / f"{run.name}-ep01-gs00002.safetensors"
    assert (
        last == f"error: loss is nan at step 4 (epoch 1): the run stopped without applying that step; "
        f"the last good checkpoint is {good}"
    )
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [good.name]
    assert all(torch.isfinite(t).all() for t in tensors(good).values() if t.is_floating_point())
    stop = read_metrics(run)[-1]
    assert stop["event"] == "stopped" and stop["reason"] == "nan" and stop["step"] == 3


def test_a_checkpoint_renders_through_the_grid_pipeline(twin_runs):
    from workbench.pipeline import build_pipeline

    pipe = build_pipeline(twin_runs[0].checkpoints[-1])
    out = pipe(
        "a red circle on a blue background",
        num_inference_steps=2,
        height=32,
        width=32,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    img = out.images[0]
    assert img.shape == (32, 32, 3) and np.isfinite(img).all() and img.std() > 0


def test_bad_recipe_is_one_red_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((RECIPES / "toy.yaml").read_text().replace("  lr: 2.0e-4", "  lrr: 2.0e-4"))
    result = runner.invoke(cli(), ["train", str(bad), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {bad}: optimizer.lrr: unknown field (did you mean lr?)"
    assert not (tmp_path / "run").exists()


def test_acceptance_wb_train_toy_recipe(tmp_path, monkeypatch):
    """The issue's acceptance, as a new user types it: wb train recipes/toy.yaml --set
    training.max_steps=40 -o run; then wb inspect reads the checkpoint."""
    monkeypatch.chdir(tmp_path)
    app = cli()
    result = runner.invoke(
        app, ["train", str(RECIPES / "toy.yaml"), "--set", "training.max_steps=40", "-o", "run"]
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    record = json.loads((run / "run.json").read_text())
    assert all(
        record["versions"][p]
        for p in (
            "python",
            "torch",
            "diffusers",
            "transformers",
            "accelerate",
            "bitsandbytes",
            "dadaptation",
            "prodigyopt",
        )
    )
    assert record["recipe"]["training"]["max_steps"] == 40
    assert record["source"]["overrides"] == ["training.max_steps=40"]
    assert len(scalars(run, "loss/val")) >= 2
    checkpoints = sorted((run / "checkpoints").glob("toy-ep*-gs*.safetensors"))
    assert checkpoints and checkpoints[-1].name == "toy-ep01-gs00040.safetensors"
    shown = runner.invoke(app, ["inspect", str(checkpoints[-1]), "--json"])
    assert shown.exit_code == 0, shown.output
    described = json.loads(shown.stdout)
    assert described["architecture"] == "toy" and described["components"]["unet"]["params"] > 0
    assert json.loads(described["metadata"]["wb.train"])["global_step"] == 40
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        "gs00040-p00-s555.png",
        "gs00040-p01-s555.png",
    ]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"loss/train", "loss/val", "loss/train_stable", "lr/unet", "lr/text_encoder"} <= set(
        events.Tags()["scalars"]
    )
