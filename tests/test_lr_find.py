"""wb lr-find: the range-test analysis on synthetic curves with known bounds, reading runs, the
range test's recipe and loop hooks, --write-recipe, errors that name the flag or file, and the
issue's acceptance end to end on the toy recipe."""

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from workbench.cli import app as wb_app
from workbench.cli import friendly
from workbench.errors import WorkbenchError
from workbench.train import lr_find as lf
from workbench.train.cli import lr_find as lr_find_command
from workbench.train.recipe import load_recipe, parse_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
runner = CliRunner()


def cli() -> typer.Typer:
    """wb's app with lr-find registered as workbench/cli.py registers it."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.registered_commands.extend(c for c in wb_app.registered_commands if c.name != "lr-find")
    app.registered_groups.extend(wb_app.registered_groups)
    app.command("lr-find")(friendly(lr_find_command))
    return app


@pytest.fixture
def one_thread():
    """Torch's intra-op threads spin-wait on each other when the CPU is shared with other jobs: on
    this 2-core machine under load the toy run took ~5x longer with 2 threads than with 1."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def within(value, target, tolerance):
    return value is not None and abs(value / target - 1) <= tolerance


# --- synthetic curves ---------------------------------------------------------------------------


def softplus(z, w):
    return w * np.logaddexp(0, z / w)


def seed_003_curve(noise=1e-4, seed=0, points=41, top=1.5e-6):
    """Seed 003's second run, as its report describes it: a linear ramp to 1.5e-6 over 400 steps
    (an evaluation every 10), the validation loss falling from about 1.9e-7 (step 50), flattening
    near 1.13e-6 (step 300) and creeping up after; rounded corners, seeded noise (1% of the fall)."""
    lr = np.linspace(0, top, points)
    a, b = 1.9e-7, 1.13e-6
    fall = 0.010 * (softplus(lr - a, 4e-8) - softplus(lr - b, 4e-8)) / (b - a)
    rise = 0.002 * softplus(lr - b, 4e-8) / (top - b)
    return lr, 0.125 - fall + rise + np.random.default_rng(seed).normal(0, noise, lr.size)


def log_u_curve(noise=0.0, seed=0):
    """A log ramp 1e-8 .. 1e-3: flat until 1e-6, falling evenly in log lr to 1e-5, a floor, then up
    from 3e-5 on."""
    lr = np.logspace(-8, -3, 51)
    x = np.log10(lr)
    y = np.where(x < -6, 1.0, np.where(x < -5, 1.0 - 0.5 * (x + 6), 0.5))
    y = y + np.where(x > -4.5, 0.6 * (x + 4.5) ** 2, 0.0)
    return lr, y + np.random.default_rng(seed).normal(0, noise, lr.size)


def test_a_curve_shaped_like_seed_003_gives_its_bounds_and_midpoint():
    lr, loss = seed_003_curve()
    f = lf.analyze(lr, loss)
    assert f.axis == "linear" and f.found
    assert within(f.lower, 1.9e-7, 0.15), f.lower
    assert within(f.upper, 1.13e-6, 0.15), f.upper
    assert within(f.midpoint, 6.6e-7, 0.15), f.midpoint
    assert f.midpoint == pytest.approx((f.lower + f.upper) / 2)
    assert 0 <= f.lower < f.midpoint < f.upper <= 1.5e-6
    assert f.upper_reason == "turns up"
    assert f.lower < f.valley < f.upper and f.lower < f.steep < f.upper
    assert f.suggestion() == f.midpoint and f.suggestion("valley") == f.valley


def test_u_shaped_curve_on_a_log_ramp():
    lr, loss = log_u_curve()
    f = lf.analyze(lr, loss)
    assert f.axis == "log"  # detected from the spacing of the lrs
    assert within(f.lower, 1e-6, 0.15) and within(f.upper, 1e-5, 0.15), (f.lower, f.upper)
    assert f.upper_reason == "turns up"
    assert within(f.valley, math.sqrt(1e-6 * 1e-5), 0.3)  # the middle of the fall, in log terms
    assert f.lower <= f.steep <= f.upper
    assert within(f.minimum, 2e-6, 0.5)  # the floor's lowest point (1e-5 .. 3e-5) / 10


def test_noisy_u_shaped_curve():
    lr, loss = log_u_curve(noise=0.02, seed=0)  # noise: 4% of the fall
    f = lf.analyze(lr, loss)
    assert within(f.lower, 1e-6, 0.25) and within(f.upper, 1e-5, 0.25), (f.lower, f.upper)
    assert 0.01 < f.noise < 0.04  # the noise is estimated (from second differences), roughly
    # one wild point does not move the bounds: the smoother discounts it
    wild = loss.copy()
    wild[25] += 0.4
    g = lf.analyze(lr, wild)
    assert within(g.lower, f.lower, 0.1) and within(g.upper, f.upper, 0.1)


def test_a_diverging_curve_is_cut_at_the_divergence():
    lr = np.linspace(0, 1e-2, 51)
    loss = np.clip(1 - 0.6 * (lr - 1e-3) / 3e-3, 0.4, 1.0)  # falls from 1e-3 to 4e-3
    loss = np.where(lr > 6e-3, 0.4 * np.exp((lr - 6e-3) / 4e-4), loss)
    f = lf.analyze(lr, loss)
    assert f.diverged_at == pytest.approx(lr[np.argmax(loss > 1.6)])  # first one over 4x the best (0.4)
    assert within(f.lower, 1e-3, 0.1) and within(f.upper, 4e-3, 0.1)
    assert f.upper_reason == "diverges" and f.upper < f.diverged_at
    cut = int(np.argmax(lr >= f.diverged_at))
    assert all(s is None for s in f.smoothed[cut:]) and all(s is not None for s in f.smoothed[:cut])
    # a NaN is a divergence too
    nan = loss.copy()
    nan[40] = np.nan
    g = lf.analyze(lr, nan)
    assert g.diverged_at == pytest.approx(lr[min(40, cut)]) and g.found
    assert json.dumps(g.to_json())  # NaN losses are written as null


def test_a_flat_curve_says_no_learning_signal():
    lr = np.linspace(0, 3e-6, 41)
    for seed in range(5):
        loss = 0.12 + np.random.default_rng(seed).normal(0, 0.001, lr.size)
        f = lf.analyze(lr, loss)
        assert not f.found and f.lower is None and f.midpoint is None and f.valley is None
        assert f.message.startswith("no learning signal between lr 0 and 3e-6")
    with pytest.raises(WorkbenchError, match="no midpoint suggestion: no learning signal"):
        f.suggestion()
    assert f.to_json()["found"] is False
    rising = lf.analyze(lr, 0.12 + lr * 1e4)
    assert not rising.found and "only rises" in rising.message


def test_a_fall_from_the_first_lr_still_gives_ordered_bounds():
    """The toy model from scratch learns at any lr: the fall starts at the first point."""
    lr = np.linspace(0, 1e-2, 31)
    loss = 0.1 + np.exp(-lr / 1e-3) + np.random.default_rng(2).normal(0, 0.005, lr.size)
    f = lf.analyze(lr, loss)
    assert f.lower == 0 and 0 < f.midpoint < f.upper <= 1e-2
    assert any("falls from the first lr tried" in n for n in f.notes)
    assert f.upper_reason == "flattens"


def test_bad_points_are_refused():
    with pytest.raises(WorkbenchError, match="at least 4"):
        lf.analyze([0, 1e-6, 2e-6], [1, 0.9, 0.8])
    with pytest.raises(WorkbenchError, match="differ in length"):
        lf.analyze([0, 1, 2, 3], [1, 2, 3])
    with pytest.raises(WorkbenchError, match="must be finite and rise"):
        lf.analyze([0, 2e-6, 1e-6, 3e-6], [1, 0.9, 0.8, 0.7])
    with pytest.raises(WorkbenchError, match="does not change"):
        lf.analyze([1e-6] * 5, [1, 0.9, 0.8, 0.7, 0.6])


# --- reading a run's metrics.jsonl --------------------------------------------------------------


def fake_run(folder: Path, lrs_by_step: dict, losses: dict, key="loss/val", record=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [{"step": s, "epoch": 1, "loss/train": 1.0, "lr/unet": v} for s, v in lrs_by_step.items()]
    lines += [{"step": s, "epoch": 1, key: v} for s, v in losses.items()]
    lines.append({"step": max(lrs_by_step), "event": "finished"})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if record is not None:
        (folder / "run.json").write_text(json.dumps(record))
    return folder


def test_analyze_run_puts_each_validation_loss_at_the_lr_of_its_step(tmp_path):
    n, top = 400, 1.5e-6
    lr_curve, loss_curve = seed_003_curve()
    lrs = {s: top * s / n for s in range(1, n + 1)}  # linear_ramp: step s uses lr * s / N
    losses = {int(s): float(v) for s, v in zip(range(0, n + 1, 10), loss_curve, strict=True)}
    f = lf.analyze_run(fake_run(tmp_path / "run", lrs, losses))
    assert f.steps == list(range(0, 401, 10)) and f.lrs[0] == 0.0  # the baseline: the ramp's start
    assert f.lrs == pytest.approx(lr_curve.tolist())
    assert f.metric == "loss/val" and f.component == "unet" and f.axis == "linear"
    assert within(f.lower, 1.9e-7, 0.15) and within(f.upper, 1.13e-6, 0.15)


def test_analyze_run_log_ramp_uses_the_training_loss_when_there_is_no_validation(tmp_path):
    steps = 50
    lrs = {s: 1e-8 * (1e5) ** ((s - 1) / (steps - 1)) for s in range(1, steps + 1)}
    _, curve = log_u_curve()
    losses = {s: float(curve[s]) for s in range(1, steps + 1)}
    f = lf.analyze_run(fake_run(tmp_path / "run", lrs, losses, key="loss/train"))
    assert f.axis == "log" and f.metric == "loss/train"
    assert any("no validation loss" in note for note in f.notes)
    assert within(f.lower, 1e-6, 0.25) and within(f.upper, 1e-5, 0.25)


def test_analyze_run_uses_only_the_rising_part_of_a_schedule(tmp_path):
    lrs = {s: 1e-6 * min(s, 40) / 40 for s in range(1, 81)}  # warmup to 1e-6, then constant
    losses = {s: 1.0 - 0.5 * min(s, 40) / 40 for s in range(0, 81, 4)}
    f = lf.analyze_run(fake_run(tmp_path / "run", lrs, losses))
    assert max(f.steps) == 40 and any("only the losses while the lr rises" in n for n in f.notes)


def test_analyze_run_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(WorkbenchError, match=f"--from {tmp_path / 'nope'}: no such run folder"):
        lf.analyze_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(WorkbenchError, match=f"{tmp_path / 'empty' / 'metrics.jsonl'}: no such file"):
        lf.analyze_run(tmp_path / "empty")
    constant = fake_run(
        tmp_path / "constant", {s: 1e-6 for s in range(1, 41)}, {s: 1.0 for s in range(0, 41, 5)}
    )
    with pytest.raises(WorkbenchError, match="stays at 1e-6 for the whole run: not a range test"):
        lf.analyze_run(constant)
    few = fake_run(tmp_path / "few", {s: s * 1e-7 for s in range(1, 41)}, {0: 1.0, 40: 0.5})
    with pytest.raises(WorkbenchError, match="2 loss/val values while the lr rises"):
        lf.analyze_run(few)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "lr/unet": 1e-6}\n{"step": 2, "lr\n')
    with pytest.raises(WorkbenchError, match="metrics.jsonl: not valid JSON lines"):
        lf.analyze_run(bad)


# --- the range test's recipe, the loop hooks, --write-recipe ----------------------------------------


def toy_recipe(base="toy:init", **sections):
    raw = {
        "model": {"base": str(base)},
        "data": {"root": "toy:shapes", "resolution": 32, "toy": {"n": 12, "seed": 1}},
        "validation": {"split": 0.25, "every_n_epochs": 2},
        "optimizer": {"name": "adamw", "lr": 1e-4, "text_encoder": {"lr": 5e-5}},
        "schedule": {"name": "cosine", "warmup_steps": 5},
        "training": {"max_epochs": 3, "batch_size": 2},
        "saving": {"every_n_steps": 1, "dtype": "fp32"},
        "sampling": {"prompts": ["a red circle"], "every_n_steps": 2},
        "logging": {"tensorboard": False, "every_n_steps": 5},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return parse_recipe(raw, "test")


def lrs_of(recipe, test, component="unet"):
    """The lr each optimizer step of the range test uses, from the real schedule code."""
    import torch

    from workbench.train.schedules import build_scheduler

    lr = recipe.optimizer.settings(component).lr
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    factor = test.factor()
    sched = (
        build_scheduler(opt, recipe.schedule, test.steps)
        if factor is None
        else torch.optim.lr_scheduler.LambdaLR(opt, factor)
    )
    out = []
    for _ in range(test.steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_range_test_recipe_ramps_the_lr_and_turns_off_saving_and_sampling():
    base = toy_recipe()
    test = lf.RangeTest(lr_min=0, lr_max=1e-3, steps=20, val_every=4, component="both")
    r = lf.range_test_recipe(base, test)
    assert r.schedule.name == "linear_ramp" and r.training.max_steps == 20 and r.training.max_epochs is None
    assert r.optimizer.settings("unet").lr == r.optimizer.settings("text_encoder").lr == 1e-3
    v = r.validation
    assert v.enabled and v.at_start and v.every_n_steps == 4 and v.every_n_epochs is None
    assert not v.stabilize_train and v.early_stop_after is None
    s = r.saving
    assert s.every_n_steps is None and s.every_n_epochs is None and s.every_n_minutes is None
    assert r.sampling.prompts == [] and r.logging.every_n_steps == 1
    assert lrs_of(r, test) == pytest.approx([1e-3 * (i + 1) / 20 for i in range(20)])

    linear = lf.RangeTest(lr_min=1e-4, lr_max=1e-3, steps=10, val_every=2, component="unet")
    r = lf.range_test_recipe(base, linear)
    assert r.trains("unet") and not r.trains("text_encoder") and r.schedule.name == "triangular"
    assert lrs_of(r, linear) == pytest.approx(np.linspace(1e-4, 1e-3, 10).tolist())

    geometric = lf.RangeTest(
        lr_min=1e-6, lr_max=1e-3, steps=10, val_every=2, log=True, component="text_encoder"
    )
    r = lf.range_test_recipe(base, geometric)
    assert r.trains("text_encoder") and not r.trains("unet") and r.schedule.name == "constant"
    assert r.optimizer.settings("text_encoder").lr == 1e-3
    assert lrs_of(r, geometric, "text_encoder") == pytest.approx(np.logspace(-6, -3, 10).tolist())
    assert lf.default_component(base) == "both"
    assert lf.default_component(toy_recipe(text_encoder={"train": False})) == "unet"


@pytest.mark.parametrize(
    "test, flag",
    [
        (lf.RangeTest(lr_min=1e-6, lr_max=1e-6), "--lr-max 1e-06: must be above --lr-min"),
        (lf.RangeTest(lr_min=0, lr_max=0), "--lr-max 0: must be above --lr-min"),
        (lf.RangeTest(lr_min=-1), "--lr-min -1: must be 0 or more"),
        (lf.RangeTest(log=True), "--lr-min 0: a log ramp"),
        (lf.RangeTest(steps=3), "--steps 3"),
        (lf.RangeTest(steps=40, val_every=20), "--val-every 20: gives 3 evaluations"),
        (lf.RangeTest(component="vae"), "--component vae: choose one of unet, text_encoder, both"),
    ],
)
def test_range_test_settings_are_checked(test, flag):
    with pytest.raises(WorkbenchError, match=flag):
        test.check()


def test_write_recipe_validates_and_has_the_constant_lr(tmp_path):
    base = toy_recipe().to_dict()
    expected = (("both", 6.61e-7, 6.61e-7), ("unet", 6.61e-7, 5e-5), ("text_encoder", 1e-4, 6.61e-7))
    for component, unet, te in expected:
        written = lf.recipe_at(base, 6.61234e-7, component)  # rounded to 3 significant digits
        path = lf.write_recipe(tmp_path / f"{component}.yaml", written, "a note\nover two lines")
        text = path.read_text()
        assert text.startswith("# a note\n# over two lines\n")
        r = load_recipe(path)  # the recipe schema accepts it
        assert r.schedule.name == "constant"
        assert r.optimizer.settings("unet").lr == unet and r.optimizer.settings("text_encoder").lr == te
        assert r.training == toy_recipe().training  # nothing else changes


def test_the_loop_runs_the_test_without_checkpoints_and_stops_when_it_diverges(
    tmp_path, monkeypatch, one_thread
):
    from workbench.toy.model import toy_init
    from workbench.train import bookkeeping

    base = toy_init(tmp_path / "base.safetensors", seed=5)
    values = iter([1.0, 0.8, 0.6, 0.3, 0.2, 0.7, 5.0, 0.1, 0.1, 0.1, 0.1])  # 5.0 > 4 x 0.2: diverged
    monkeypatch.setattr(bookkeeping, "validation_loss", lambda *a, **k: next(values))
    test = lf.RangeTest(lr_min=1e-5, lr_max=1e-3, steps=10, val_every=1, log=True, component="unet")
    result, finding = lf.run_range_test(toy_recipe(base), test, tmp_path / "lf", source={"recipe": "x"})
    assert result.stopped == "stop_when" and result.steps == 6
    assert "over 4x the best (0.2)" in result.message and result.checkpoints == []
    assert not (tmp_path / "lf" / "checkpoints").exists() and not (tmp_path / "lf" / "samples").exists()
    assert finding.diverged_at == pytest.approx(1e-5 * 100 ** (5 / 9))  # step 6 used the ramp's 6th lr
    assert finding.lrs[0] == pytest.approx(1e-5 / 100 ** (1 / 9))  # the baseline, one step down the ramp
    assert finding.axis == "log" and finding.component == "unet"
    record = json.loads((tmp_path / "lf" / "run.json").read_text())
    assert record["source"]["recipe"] == "x" and record["source"]["lr_find"]["lr_max"] == 1e-3
    assert record["source"]["lr_find"]["recipe"]["schedule"]["name"] == "cosine"  # the original
    assert lf.base_recipe_of(tmp_path / "lf")["saving"]["every_n_steps"] == 1


# --- the command -----------------------------------------------------------------------------------


def test_errors_name_the_flag_or_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    app = cli()

    def error(*args):
        result = runner.invoke(app, ["lr-find", *args])
        assert result.exit_code == 2, result.output
        return result.output.strip()

    assert error("nope.yaml", "-o", "lf") == "error: nope.yaml: no such recipe file"
    toy = str(RECIPES / "toy.yaml")
    assert error(toy, "--lr-min", "1e-3", "--lr-max", "1e-4") == (
        "error: --lr-max 0.0001: must be above --lr-min (0.001)"
    )
    assert error(toy, "--component", "vae").startswith("error: --component vae")
    assert error(toy, "--pick", "best").startswith("error: --pick best: choose one of midpoint")
    assert error().startswith("error: give RECIPE.yaml")
    (tmp_path / "run").mkdir()
    assert (
        error("--from", "run")
        == "error: run/metrics.jsonl: no such file (not a wb train run, or it logged nothing yet)"
    )
    assert error("--from", "run", "--lr-max", "1e-3").startswith("error: --lr-max: only with RECIPE.yaml")
    assert not (tmp_path / "lf").exists()  # nothing started


def test_write_recipe_on_a_flat_run_writes_nothing(tmp_path):
    lrs = {s: s * 1e-8 for s in range(1, 41)}
    losses = {s: 0.12 + 0.001 * float(np.random.default_rng(s).normal()) for s in range(0, 41, 2)}
    run = fake_run(tmp_path / "run", lrs, losses)
    result = runner.invoke(cli(), ["lr-find", "--from", str(run), "--write-recipe", str(tmp_path / "o.yaml")])
    assert result.exit_code == 2
    assert "no learning signal between lr 0 and 4e-7" in result.output
    assert (run / "lr_find.png").is_file() and not (tmp_path / "o.yaml").exists()


def test_acceptance_lr_find_on_the_toy_recipe(tmp_path, monkeypatch, one_thread):
    """`wb lr-find recipes/toy.yaml --lr-max ...`, shortened to keep the suite quick on a loaded CPU:
    fewer steps and images, an evaluation every 2 steps. The toy still learns faster at the top of
    this ramp: lr-find says the upper bound was not seen, proposes a larger --lr-max, draws no
    midpoint and writes no recipe (exit 2) unless --force."""
    monkeypatch.chdir(tmp_path)
    started = time.time()
    args = ["lr-find", str(RECIPES / "toy.yaml"), "--lr-max", "1e-2", "--steps", "24", "--val-every", "2",
            "--set", "data.toy.n=32", "--set", "logging.tensorboard=false", "-o", "lf",
            "--write-recipe", "toy_lr.yaml"]  # fmt: skip
    result = runner.invoke(cli(), args, env={"COLUMNS": "200"})
    seconds = time.time() - started
    assert result.exit_code == 2, result.output
    assert "no upper bound below lr-max 0.01: the loss is still falling there; rerun with --lr-max 0.03" in (
        result.output
    )
    assert "error: --write-recipe toy_lr.yaml: nothing written" in result.output
    assert not (tmp_path / "toy_lr.yaml").exists()
    found = json.loads((tmp_path / "lf" / "lr_find.json").read_text())
    assert not found["found"] and found["upper"] is None and found["midpoint"] is None
    assert found["lower"] == 0.0 and found["upper_reason"] == "not seen" and found["rerun"] == "--lr-max 0.03"
    assert len(found["points"]) == 13 and found["points"][0] == {**found["points"][0], "step": 0, "lr": 0.0}
    assert found["test"]["component"] == "both" and found["test"]["val_every"] == 2
    image = Image.open(tmp_path / "lf" / "lr_find.png")
    assert image.size == (900, 540) and len(image.convert("RGB").getcolors(1 << 20)) > 50
    page = (tmp_path / "lf" / "index.html").read_text()
    assert '<img src="lr_find.png"' in page and "http" not in page and "<script" not in page
    assert not (tmp_path / "lf" / "checkpoints").exists()
    # --force writes it anyway, lr-max standing in for the upper bound: (0 + 1e-2) / 2
    forced = runner.invoke(cli(), ["lr-find", "--from", "lf", "-o", "again", "--write-recipe", "toy_lr.yaml",
                                   "--force"], env={"COLUMNS": "200"})  # fmt: skip
    assert forced.exit_code == 0, forced.output
    assert "warning: --force: the upper bound not seen" in forced.output
    written = load_recipe(tmp_path / "toy_lr.yaml")
    assert written.schedule.name == "constant" and written.training.max_steps == 300  # the recipe's own
    assert written.optimizer.settings("unet").lr == 5e-3
    # --from read the same run again and found the same numbers
    second = json.loads((tmp_path / "again" / "lr_find.json").read_text())
    assert {k: second[k] for k in ("lower", "upper", "midpoint", "message")} == {
        k: found[k] for k in ("lower", "upper", "midpoint", "message")
    }
    assert second["test"]["lr_max"] == 1e-2
    print(f"lr-find end to end: {seconds:.1f} s; {found['message']}")


def test_any_curve_gives_ordered_bounds_inside_the_range_or_none():
    """Random falls, rises, bumps, noise, lengths and ramps: never an error, and whenever there are
    bounds, lr_min <= lower < midpoint < upper <= lr_max and every suggestion is inside the range."""
    rng = np.random.default_rng(7)
    found = 0
    for _ in range(120):
        n = int(rng.integers(5, 90))
        log = bool(rng.integers(2))
        lr = np.logspace(-9, -4, n) if log else np.linspace(0, rng.uniform(1e-7, 1e-2), n)
        t = np.linspace(0, 1, n)
        y = 1.0 + rng.normal(0, rng.choice([0, 1e-3, 0.05]), n)
        for _ in range(int(rng.integers(0, 3))):  # falls and rises of random size, place and width
            y += rng.uniform(-1, 0.5) / (1 + np.exp(-(t - rng.uniform(0, 1)) / rng.uniform(0.01, 0.3)))
        if rng.random() < 0.2:
            y[int(rng.integers(n // 2, n)) :] *= 10  # a divergence
        f = lf.analyze(lr, np.abs(y) + 0.01)
        if f.found:
            found += 1
            assert lr[0] <= f.lower < f.midpoint < f.upper <= lr[-1], (f.lower, f.midpoint, f.upper)
            for value in (f.valley, f.steep, f.minimum * 10):
                assert value is None or lr[0] <= value <= lr[-1]
        else:  # a bound not seen is None, and then there is no midpoint
            assert f.message and f.midpoint is None and (f.lower is None or f.upper is None)
            for value in (f.lower, f.upper):
                assert value is None or lr[0] <= value <= lr[-1]
    assert found >= 9, found  # 11 with this seed (the rest: no signal, or a bound not seen)
