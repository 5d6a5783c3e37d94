"""Training in 2 CPU processes (gloo, through accelerate) trains like 1 process with the same global
batch: same weights to float rounding, same validation loss, only the main process writes, Ctrl-C
and --resume with 2 processes, a NaN on one process stops both.

The 2-process runs are few and tiny (12 toy images, 5 steps); each launch has a timeout, so a hang
fails the test instead of the CI job. On CPU the processes are forked from this one (accelerate's
debug launcher's way), which starts them in a second.
"""

import contextlib
import json
import os
import signal
import time

import pytest
import torch
import yaml
from typer.testing import CliRunner

from workbench.checkpoint.reader import open_checkpoint
from workbench.cli import app
from workbench.train import loop
from workbench.train.buckets import BucketBatchSampler
from workbench.train.distributed import Draws, ShardedBatches, launch, reduce_loss
from workbench.train.recipe import load_recipe
from workbench.train.runs import read_metrics, read_run

runner = CliRunner()
TIMEOUT = 240  # seconds for one 2-process launch (a few on an idle CI runner; a hang fails)


# --- what each process sees (no processes needed) -----------------------------------------------


def test_bucket_batches_shard_without_dropping_or_repeating():
    """7 images in two buckets (5 + 2), batch 2 per process, 2 processes: the global batches are a
    1-process run's batches of 4 (4 + 1 of bucket A, 2 of B); each is cut in two contiguous halves,
    and the single-image batch gives process 1 a stand-in of weight 0."""
    sizes = [(64, 32)] * 5 + [(32, 64)] * 2
    for epoch in range(3):
        one = BucketBatchSampler(sizes, 4, seed=9)
        one.set_epoch(epoch)
        shards = []
        for rank in (0, 1):
            sampler = ShardedBatches(BucketBatchSampler(sizes, 4, seed=9), rank, 2)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        assert len(shards[0]) == len(shards[1]) == len(one) == 3  # every process steps together
        seen = []
        for global_batch, rows0, rows1 in zip(one, *shards, strict=True):
            real = [r.index for r in rows0 + rows1 if r.weight == 1.0]
            assert real == global_batch  # the halves, in order: nothing dropped, nothing added
            assert {r.global_size for r in rows0 + rows1} == {len(global_batch)}
            assert len({sizes[i] for i in real}) == 1  # one bucket per step
            stand_ins = [r for r in rows0 + rows1 if r.weight == 0.0]
            assert len(stand_ins) == (1 if len(global_batch) == 1 else 0)
            seen += real
        assert sorted(seen) == list(range(7))  # each image exactly once per epoch
        assert sorted(len(b) for b in one) == [1, 2, 4]


def test_repeated_examples_shard_like_any_others():
    """With repeats (with_repeats copies an example: kohya's 10_name, ED2's multiply.txt) the
    training list is longer; 2 processes with batch 2 take the shuffled order of a 1-process run
    with batch 4, so each copy is trained once per epoch, on one process."""
    from workbench.train.data import EpochSampler, Example, with_repeats

    distinct = [Example("a", "a", repeats=3), Example("b", "b"), Example("c", "c", repeats=2)]
    examples = with_repeats(distinct, seed=0)
    assert [e.key for e in examples] == ["a", "a", "a", "b", "c", "c"]
    for epoch in range(2):
        order = EpochSampler(len(examples), seed=5)
        order.set_epoch(epoch)
        one = list(torch.utils.data.BatchSampler(order, 4, drop_last=False))
        rows = []
        for rank in (0, 1):
            inner = EpochSampler(len(examples), seed=5)
            sampler = ShardedBatches(torch.utils.data.BatchSampler(inner, 4, drop_last=False), rank, 2, 4)
            sampler.set_epoch(epoch)
            rows.append(list(sampler))
        for global_batch, rows0, rows1 in zip(one, *rows, strict=True):
            assert [r.index for r in rows0 + rows1 if r.weight == 1.0] == global_batch
        seen = sorted(examples[r.index].key for shard in rows for batch in shard for r in batch if r.weight)
        assert seen == ["a", "a", "a", "b", "c", "c"]


def test_each_process_draws_its_rows_of_the_global_batch():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    full = torch.randn((5, 4, 2, 2), generator=g1)
    steps = torch.randint(0, 1000, (5,), generator=g1)
    draws = Draws(g2, (3, 5))  # this process holds rows 3 and 4 of a global batch of 5
    assert torch.equal(draws.randn((2, 4, 2, 2)), full[3:5])
    assert torch.equal(draws.randint(0, 1000, (2,)), steps[3:5])


def test_the_loss_of_a_shard_averages_to_the_global_mean():
    """Shards of 3 and 1 (global batch 4): DDP averages the two processes' gradients, so each
    backpropagates sum x 2 / 4; the average is the mean of all 4. A stand-in row counts 0."""
    losses = torch.tensor([1.0, 2.0, 3.0, 10.0])
    a = reduce_loss(losses[:3], {"shard": (0, 4), "weights": torch.ones(3)}, 2)
    b = reduce_loss(losses[3:], {"shard": (3, 4), "weights": torch.ones(1)}, 2)
    assert (a + b).item() / 2 == pytest.approx(16 / 4)
    assert reduce_loss(torch.tensor([5.0]), {"shard": (0, 1), "weights": torch.zeros(1)}, 2) == 0


# --- 2 processes on the toy ---------------------------------------------------------------------


def write_recipe(folder, base, batch_size):
    """12 toy images, 3 held out: 9 train in global batches of 4, so every epoch ends with a batch
    of 1 (process 1 gets a stand-in). Flips and caption dropout take part. AdamW's eps is 1e-4, not
    1e-8: see test_two_processes_train_like_one."""
    raw = {
        "model": {"base": str(base)},
        "data": {"root": "toy:shapes", "resolution": 32, "toy": {"n": 12, "seed": 3},
                 "flip_p": 0.5, "cond_dropout": 0.3},  # fmt: skip
        "validation": {"split": 0.25, "every_n_steps": 4, "every_n_epochs": None, "stabilize_train": False},
        "optimizer": {"name": "adamw", "lr": 1e-3, "eps": 1e-4},
        "training": {"max_steps": 5, "batch_size": batch_size, "seed": 5},
        "saving": {"every_n_epochs": None, "every_n_steps": None, "dtype": "fp32"},
        "logging": {"tensorboard": False},
    }
    path = folder / f"toy-b{batch_size}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def weights(path):
    with open_checkpoint(path) as ckpt:
        return {k: ckpt[k].clone() for k in ckpt}


def final_checkpoint(run):
    return sorted((run / "checkpoints").glob("*.safetensors"))[-1]


def logged(run):
    return [{k: v for k, v in m.items() if k != "time"} for m in read_metrics(run) if "event" not in m]


@contextlib.contextmanager
def deadline(seconds):
    """Raise TimeoutError in this (main) thread after `seconds`; launch then ends its processes."""

    def expire(signum, frame):
        raise TimeoutError(f"not done in {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`wb train RECIPE -o run1` with batch 4 and `wb train RECIPE --processes 2 -o run2` with
    batch 2, as a user types them."""
    from workbench.toy.model import toy_init

    folder = tmp_path_factory.mktemp("dist")
    base = toy_init(folder / "base.safetensors", seed=7)
    one, two = folder / "run1", folder / "run2"
    r1 = runner.invoke(app, ["train", str(write_recipe(folder, base, 4)), "-o", str(one)])
    assert r1.exit_code == 0, r1.output
    with deadline(TIMEOUT):  # the CLI has no timeout of its own; a hang fails here
        recipe = write_recipe(folder, base, 2)
        r2 = runner.invoke(app, ["train", str(recipe), "--processes", "2", "-o", str(two)])
    assert r2.exit_code == 0, r2.output
    return {"base": base, "one": one, "two": two, "folder": folder}


def test_two_processes_train_like_one(runs):
    """Same weights as 1 process with the same global batch, to float rounding.

    The two runs add the same per-example gradients in another order (each process sums its
    shard, then DDP averages the two; conv kernels see batches of 2 instead of 4), so a gradient
    differs by a few float32 ulps (~1e-7 relative). AdamW turns that into an update difference of
    ~lr x 1e-6 where eps (1e-4) dominates the tiny gradients; after 5 steps the weights (|w| <= ~2)
    differ by a few ulps of their own size, far inside atol 1e-6, while training moved them by
    ~1e-3. (With eps 1e-8, Adam divides rounding noise by itself for parameters whose true
    gradient is 0, the conv biases ahead of a GroupNorm, and steps them by up to lr in random
    directions: both runs are right, and differ there by ~lr per step; see docs/train.md.)"""
    one, two = weights(final_checkpoint(runs["one"])), weights(final_checkpoint(runs["two"]))
    base = weights(runs["base"])
    assert one.keys() == two.keys()
    moved = max((one[k].float() - base[k].float()).abs().max().item() for k in one if k in base)
    assert moved > 5e-4  # the runs did train
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-6, rtol=1e-6, msg=k)
    m1, m2 = logged(runs["one"]), logged(runs["two"])
    assert [m["step"] for m in m1] == [m["step"] for m in m2]
    for a, b in zip(m1, m2, strict=True):  # the logged loss is the global batch's on both
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)


def test_validation_loss_equals_the_one_process_value(runs):
    v1 = [m for m in logged(runs["one"]) if "loss/val" in m]
    v2 = [m for m in logged(runs["two"]) if "loss/val" in m]
    assert [m["step"] for m in v1] == [m["step"] for m in v2] == [0, 4, 5]
    for a, b in zip(v1, v2, strict=True):
        assert b["loss/val"] == pytest.approx(a["loss/val"], rel=1e-6, abs=0)


def test_only_the_main_process_writes(runs):
    """The 2-process folder holds what a 1-process run writes, once: each step logged once, one
    checkpoint, one run.json; nothing per process but the (removed) state."""
    one, two = runs["one"], runs["two"]
    def files(run):  # (checkpoints are named after the run folder)
        return sorted(p.relative_to(run).as_posix().replace(run.name, "RUN") for p in run.rglob("*"))

    assert files(two) == files(one)
    records = read_metrics(two)
    steps = [m["step"] for m in records if "loss/train" in m]
    assert steps == [1, 2, 3, 4, 5]
    assert [m["event"] for m in records if "event" in m].count("finished") == 1
    assert len(list((two / "checkpoints").iterdir())) == 1


def test_run_json_records_the_processes_and_runs_diff_shows_them(runs):
    device = read_run(runs["two"])["device"]
    assert (device["processes"], device["world_size"], device["backend"]) == (2, 2, "gloo")
    assert read_run(runs["one"])["device"]["processes"] == 1
    result = runner.invoke(app, ["runs", "diff", str(runs["one"]), str(runs["two"]), "--json"])
    assert result.exit_code == 0, result.output
    diffs = {d["key"]: (d["a"], d["b"]) for d in json.loads(result.output)}
    assert diffs["device.processes"] == (1, 2)
    assert diffs["device.world_size"] == (1, 2)
    assert diffs["recipe.training.batch_size"] == (4, 2)


def _interrupted_at_step_2(recipe, run_dir, progress=None):
    """Process 0 asks the launcher (this test's process) for a Ctrl-C at step 2, as a terminal's
    would arrive, and waits for it; the launcher passes it on to both processes."""

    def at(p):
        if p.step == 2 and p.loss is not None and os.environ["RANK"] == "0":
            os.kill(os.getppid(), signal.SIGINT)
            time.sleep(3)

    return loop.train(recipe, run_dir, progress=at)


def test_ctrl_c_with_two_processes_resumes_bit_identically(runs):
    run = runs["folder"] / "interrupted"
    recipe = load_recipe(runs["folder"] / "toy-b2.yaml", [])
    first = launch(_interrupted_at_step_2, (recipe, run), 2, timeout=TIMEOUT, start_method="fork")
    assert first.stopped == "interrupted" and first.steps == 2
    progress = json.loads((run / "state" / "progress.json").read_text())
    assert (progress["processes"], progress["step"]) == (2, 2)
    assert sorted(p.name for p in (run / "state").glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]
    second = launch(loop.resume_training, (run,), 2, timeout=TIMEOUT, start_method="fork")
    assert second.stopped is None and second.steps == 5 and second.resumed_from == 2
    straight = weights(final_checkpoint(runs["two"]))
    resumed = weights(final_checkpoint(run))
    assert resumed.keys() == straight.keys()
    for k in straight:
        assert torch.equal(resumed[k], straight[k]), k
    assert logged(run) == logged(runs["two"])


def _nan_on_process_1(recipe, run_dir, progress=None):
    """Process 1's third micro-batch has a NaN loss; process 0's are all finite."""
    if os.environ["RANK"] == "1":
        original, calls = loop._batch_loss, [0]

        def poisoned(*args, **kwargs):
            calls[0] += 1
            loss = original(*args, **kwargs)
            return loss * float("nan") if calls[0] == 3 else loss

        loop._batch_loss = poisoned
    return loop.train(recipe, run_dir, progress=progress)


def test_a_nan_on_one_process_stops_both_at_the_same_step(runs):
    run = runs["folder"] / "nan"
    recipe = load_recipe(runs["folder"] / "toy-b2.yaml", [])
    result = launch(_nan_on_process_1, (recipe, run), 2, timeout=TIMEOUT, start_method="fork")
    # Process 0 (whose own loss was finite) stopped at step 3 too: a process still training
    # would wait for the other in DDP's all-reduce until the timeout.
    assert result.stopped == "nan" and result.steps == 2
    assert result.message.startswith("loss is nan at step 3 (epoch 1)")
    assert not list((run / "checkpoints").iterdir())
    assert [m["step"] for m in read_metrics(run) if "loss/train" in m] == [1, 2]
