"""Ctrl-C and `wb train --resume`: an interrupted (or crashed) toy run, resumed, ends exactly where
an uninterrupted run of the same recipe ends: same weights, same logged losses."""

import json
import os
import signal

import pytest
import torch
import typer
from typer.testing import CliRunner

from workbench.checkpoint.reader import open_checkpoint
from workbench.cli import app
from workbench.errors import WorkbenchError
from workbench.train import loop
from workbench.train.cli import _print_result
from workbench.train.recipe import parse_recipe
from workbench.train.resume import load_state
from workbench.train.runs import read_metrics

runner = CliRunner()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from workbench.toy.model import toy_init

    return toy_init(tmp_path_factory.mktemp("toy") / "base.safetensors", seed=7)


def make_recipe(base, **training):
    """9 training images in batches of 2 with grad_accum 2: 3 optimizer steps per epoch, so step 4 is
    mid-epoch (2 of epoch 2's 5 micro-batches seen). Augmentation, caption dropout, a cosine
    schedule with warmup and D-Adaptation (whose d lives in the optimizer state) all take part."""
    raw = {
        "model": {"base": str(base)},
        "data": {"root": "toy:shapes", "resolution": 32, "toy": {"n": 12, "seed": 3},
                 "flip_p": 0.5, "cond_dropout": 0.3},  # fmt: skip
        "validation": {"split": 0.25, "every_n_steps": 3, "stabilize_split": 0.2},
        "optimizer": {"name": "dadapt_adam", "lr": 1.0, "text_encoder": {"name": "adamw", "lr": 1e-4}},
        "schedule": {"name": "cosine", "warmup_steps": 2},
        "training": {"max_steps": 7, "batch_size": 2, "grad_accum": 2, **training},
        "saving": {"every_n_epochs": None, "every_n_steps": 2, "dtype": "fp32"},
        "logging": {"tensorboard": False},
    }
    return parse_recipe(raw, "test")


def weights(path):
    with open_checkpoint(path) as ckpt:
        return {k: ckpt[k].clone() for k in ckpt}


def losses(run_dir):
    """Every logged scalar, without wall-clock times."""
    return [
        {k: v for k, v in m.items() if k != "time"} for m in read_metrics(run_dir) if "event" not in m
    ]


@pytest.fixture(scope="module")
def straight(base, tmp_path_factory):
    return loop.train(make_recipe(base), tmp_path_factory.mktemp("straight") / "run")


def ctrl_c_at(step):
    def progress(p):
        if p.step == step and p.loss is not None:
            os.kill(os.getpid(), signal.SIGINT)

    return progress


def test_ctrl_c_then_resume_ends_where_an_uninterrupted_run_ends(base, straight, tmp_path):
    run = tmp_path / "run"
    first = loop.train(make_recipe(base), run, progress=ctrl_c_at(4))
    assert first.stopped == "interrupted" and first.steps == 4
    assert first.message == f"interrupted at step 4 of 7; continue with: wb train --resume {run}"
    assert first.state == run / "state" and (run / "state" / "progress.json").is_file()
    assert (run / "checkpoints" / "run-ep02-gs00004.safetensors").is_file()  # the weights at Ctrl-C
    saved = load_state(run, processes=1).progress
    assert (saved.step, saved.epoch, saved.batches_seen, saved.reason) == (4, 1, 2, "interrupt")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back

    resumed = loop.resume_training(run)
    assert resumed.stopped is None and resumed.steps == 7 and resumed.resumed_from == 4
    a, b = weights(straight.checkpoints[-1]), weights(resumed.checkpoints[-1])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert losses(run) == losses(straight.run_dir)  # loss/train, loss/val, lr, d*lr: every step
    assert resumed.val_losses == straight.val_losses
    assert not (run / "state").exists()  # a finished run keeps no state
    record = json.loads((run / "run.json").read_text())
    assert [r["from_step"] for r in record["resumes"]] == [4]
    events = [m["event"] for m in read_metrics(run) if "event" in m]
    assert events.count("resumed") == 1 and events[-1] == "finished"


def test_a_crash_resumes_from_the_last_checkpoints_state_and_drops_what_came_after(base, straight, tmp_path):
    class Crash(Exception):
        pass

    def crash(p):
        if p.step == 5 and p.loss is not None:
            raise Crash

    run = tmp_path / "run"
    with pytest.raises(Crash):
        loop.train(make_recipe(base), run, progress=crash)
    assert max(m["step"] for m in read_metrics(run)) == 5  # logged before the crash
    assert load_state(run, processes=1).progress.step == 4  # saved with the step-4 checkpoint

    resumed = loop.resume_training(run)
    assert resumed.steps == 7 and resumed.resumed_from == 4
    a, b = weights(straight.checkpoints[-1]), weights(resumed.checkpoints[-1])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(run) == losses(straight.run_dir)  # step 5's first logging was replaced, not doubled


def test_resume_refuses_what_it_cannot_continue(base, straight, tmp_path):
    with pytest.raises(WorkbenchError, match=r"no resumable state \(state/progress.json\)"):
        loop.resume_training(straight.run_dir)  # finished: its state was removed
    with pytest.raises(WorkbenchError, match="no run.json"):
        loop.resume_training(tmp_path)
    # a run with saving.state: never says it cannot be resumed
    r = make_recipe(base).to_dict()
    r["saving"]["state"] = "never"
    run = tmp_path / "no-state"
    result = loop.train(parse_recipe(r, "test"), run, progress=ctrl_c_at(2))
    assert result.message == "interrupted at step 2 of 7 (saving.state: never: not resumable)"
    assert not (run / "state").exists() and result.state is None


def test_resume_refuses_a_changed_base(base, tmp_path):
    import shutil

    from workbench.checkpoint.safetensors_io import save_tensors

    copy = tmp_path / "base.safetensors"
    shutil.copyfile(base, copy)
    run = tmp_path / "run"
    loop.train(make_recipe(copy, max_steps=3), run, progress=ctrl_c_at(2))
    changed = weights(copy)
    with open_checkpoint(copy) as ckpt:
        metadata = dict(ckpt.metadata)
    key = next(k for k in changed if k.startswith("model.diffusion_model."))
    changed[key] = changed[key] + 1
    copy.unlink()
    save_tensors(copy, changed, metadata)
    with pytest.raises(WorkbenchError, match=f"{copy}: the base checkpoint changed since the run started"):
        loop.resume_training(run)


def test_cli_resume_takes_no_recipe_and_interrupted_exits_130(tmp_path):
    result = runner.invoke(app, ["train", "recipes/toy.yaml", "--resume", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: --resume: continues the run with the recipe its run.json records; "
        "give no recipe, --ed2, --set or -o with it"
    )
    result = runner.invoke(app, ["train", "--resume", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no run.json" in result.output

    interrupted = loop.TrainResult(
        tmp_path, 2, 7, 1, [], [], 0.1, "interrupted", "interrupted at step 2", seconds=1, train_seconds=1
    )
    with pytest.raises(typer.Exit) as e:
        _print_result(interrupted)
    assert e.value.exit_code == 130


def test_a_second_ctrl_c_stops_at_once():
    class FakeAccelerator:
        num_processes = 1

    ctrl_c = loop._CtrlC(FakeAccelerator())
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert ctrl_c.requested()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        ctrl_c.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resume_refuses_changed_data(base, tmp_path):
    run = tmp_path / "run"
    loop.train(make_recipe(base, max_steps=3), run, progress=ctrl_c_at(2))
    record = json.loads((run / "run.json").read_text())
    record["data"]["sha256"] = "0" * 64  # as if an image had been edited since
    (run / "run.json").write_text(json.dumps(record))
    with pytest.raises(WorkbenchError, match="toy:shapes: the training data changed since the run started"):
        loop.resume_training(run)


def test_resume_continues_the_ema(base, tmp_path):
    ema = {"ema_decay": 0.8, "ema_every_n_steps": 2}
    straight = loop.train(make_recipe(base, **ema), tmp_path / "straight")
    run = tmp_path / "run"
    loop.train(make_recipe(base, **ema), run, progress=ctrl_c_at(3))
    assert load_state(run, processes=1).progress.ema_updates == 1  # after step 2; step 3 made none
    resumed = loop.resume_training(run)
    a, b = weights(straight.ema_checkpoints[-1]), weights(resumed.ema_checkpoints[-1])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in resumed.ema_checkpoints][-1] == "run-ep03-gs00007-ema.safetensors"
    assert losses(run) == losses(straight.run_dir)  # loss/val_ema included


def test_the_run_page_shows_how_the_run_ended(base, straight, tmp_path):
    page = (straight.run_dir / "index.html").read_text()
    assert "finished 7 steps" in page and 'src="loss.png"' in page
    best = min(straight.val_losses, key=lambda p: p[1])
    assert f"{best[1]:.5f} at step {best[0]}" in page
    assert f'href="checkpoints/{straight.checkpoints[-1].name}"' in page
    run = tmp_path / "run"
    loop.train(make_recipe(base), run, progress=ctrl_c_at(2))
    page = (run / "index.html").read_text()
    assert f"interrupted at step 2 of 7; continue with: wb train --resume {run}" in page
    loop.resume_training(run)
    page = (run / "index.html").read_text()
    assert "finished 7 steps" in page and "at step 2 (" in page  # the resume is listed
