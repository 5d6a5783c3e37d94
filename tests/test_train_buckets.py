"""Aspect-ratio buckets: the bucket set and assignment by hand, the batch sampler's invariants,
EXIF orientation, and a toy run on a folder of portrait, landscape and square images that resumes
exactly."""

import json
import os
import signal

import numpy as np
import pytest
import torch
from PIL import Image

from workbench.checkpoint.reader import open_checkpoint
from workbench.errors import WorkbenchError
from workbench.train import loop
from workbench.train.buckets import BucketBatchSampler, bucket_counts, bucket_sizes, nearest_bucket
from workbench.train.data import CaptionedImages, load_examples, load_image, upright_size
from workbench.train.recipe import parse_recipe
from workbench.train.runs import read_metrics


def test_sd15_buckets_by_hand():
    # w * h <= 512 * 512 with the tallest h for each w, aspect within 1/2.5 .. 2.5, mirrored
    assert bucket_sizes(512, 64, 2.5) == [
        (320, 768), (320, 704), (384, 640), (448, 576), (512, 512),
        (576, 448), (640, 384), (704, 320), (768, 320),
    ]  # fmt: skip
    assert bucket_sizes(512, 64, 1.0) == [(512, 512)]


def test_nearest_bucket_by_log_aspect():
    b = bucket_sizes(512, 64, 2.5)
    # 3:2 is log 0.405; 576x448 is log 0.251 (0.154 away), 640x384 log 0.511 (0.105 away)
    assert nearest_bucket(3000, 2000, b) == (640, 384)
    assert nearest_bucket(1080, 1920, b) == (384, 640)
    assert nearest_bucket(100, 100, b) == (512, 512)
    assert nearest_bucket(5000, 500, b) == (768, 320)  # beyond the widest: the widest
    assert bucket_counts([(64, 32), (32, 32), (64, 32)]) == {"64x32": 2, "32x32": 1}


def test_batches_hold_one_bucket_and_every_image_once_per_epoch():
    sizes = [(40, 24)] * 5 + [(32, 32)] * 4 + [(24, 40)] * 3
    sampler = BucketBatchSampler(sizes, batch_size=2, seed=3)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 3 + 2 + 2  # ceil(5/2) + ceil(4/2) + ceil(3/2)
        assert sorted(i for b in batches for i in b) == list(range(12))
        assert all(len({sizes[i] for i in b}) == 1 for b in batches)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first  # a new order each epoch
    sampler.set_epoch(0)
    assert list(sampler) == first  # a pure function of (seed, epoch)
    sampler.resume_at(0, 3)
    assert list(sampler) == first[3:]
    sampler.set_epoch(1)
    assert len(list(sampler)) == 7  # the skip belongs to epoch 0 only


def test_exif_orientation_is_applied(tmp_path):
    stored = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high: left half red, right half blue
    stored[:, :20] = (255, 0, 0)
    stored[:, 20:] = (0, 0, 255)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": the left side ends up on top
    path = tmp_path / "photo.png"
    image.save(path, exif=exif)
    assert upright_size(path) == (20, 40)
    upright = np.array(load_image(path, (20, 40)))
    assert upright.shape == (40, 20, 3)
    assert (upright[:15, :, 0] > 200).all() and (upright[25:, :, 2] > 200).all()


def write_folder(root, n_each=6):
    rng = np.random.default_rng(0)
    for shape, (w, h) in {"wide": (48, 24), "tall": (24, 48), "square": (32, 32)}.items():
        for i in range(n_each):
            colour = rng.integers(0, 256, 3)
            Image.fromarray(np.full((h, w, 3), colour, np.uint8)).save(root / f"a {shape} thing_{i}.png")
    return root


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from workbench.toy.model import toy_init

    root = tmp_path_factory.mktemp("data")
    return toy_init(root.parent / "base.safetensors", seed=4), write_folder(root)


def bucket_recipe(base, data_root, **training):
    raw = {
        "model": {"base": str(base)},
        "data": {"root": str(data_root), "resolution": 32, "aspect_buckets": True, "bucket_step": 8,
                 "flip_p": 0.5},  # fmt: skip
        "validation": {"split": 0.2, "every_n_steps": 3, "every_n_epochs": None, "stabilize_train": False},
        "optimizer": {"name": "adamw", "lr": 1e-4},
        "training": {"max_steps": 6, "batch_size": 2, **training},
        "saving": {"every_n_epochs": None, "every_n_steps": 2, "dtype": "fp32"},
        "logging": {"tensorboard": False},
    }
    return parse_recipe(raw, "test")


def test_items_come_at_their_bucket_size(setup):
    base, root = setup
    r = bucket_recipe(base, root)
    ds = CaptionedImages(load_examples(r.data), r.data, augment=False)
    assert bucket_counts(ds.sizes) == {"40x24": 6, "32x32": 6, "24x40": 6}
    wide = ds.sizes.index((40, 24))
    assert ds[wide]["pixels"].shape == (3, 24, 40) and ds[wide]["caption"] == "a wide thing"


def test_a_bucketed_run_trains_validates_and_resumes_exactly(setup, tmp_path):
    base, root = setup
    straight = loop.train(bucket_recipe(base, root), tmp_path / "straight")
    record = json.loads((straight.run_dir / "run.json").read_text())
    assert sum(record["data"]["buckets"].values()) == record["data"]["train"] == 14  # 18 less 4 held out
    assert len(straight.val_losses) == 3 and all(np.isfinite(v) for _, v in straight.val_losses)

    def ctrl_c(p):
        if p.step == 3 and p.loss is not None:
            os.kill(os.getpid(), signal.SIGINT)

    run = tmp_path / "run"
    assert loop.train(bucket_recipe(base, root), run, progress=ctrl_c).stopped == "interrupted"
    resumed = loop.resume_training(run)
    with open_checkpoint(straight.checkpoints[-1]) as a, open_checkpoint(resumed.checkpoints[-1]) as b:
        assert all(torch.equal(a[k], b[k]) for k in a)
    clean = [{k: v for k, v in m.items() if k != "time"} for m in read_metrics(run) if "event" not in m]
    assert clean == [{k: v for k, v in m.items() if k != "time"}
                     for m in read_metrics(straight.run_dir) if "event" not in m]  # fmt: skip


def test_bucket_errors_name_the_field(setup, tmp_path):
    base, root = setup
    with pytest.raises(WorkbenchError, match="data.bucket_step: 10 is not a multiple of 4"):
        r = bucket_recipe(base, root).to_dict()
        r["data"]["bucket_step"], r["data"]["resolution"] = 10, 40
        loop.train(parse_recipe(r, "test"), tmp_path / "run")
    with pytest.raises(WorkbenchError, match="data.aspect_buckets: toy:shapes images are all square"):
        parse_recipe({"model": {"base": "x"}, "data": {"root": "toy:shapes", "aspect_buckets": True},
                      "training": {"max_steps": 1}}, "test")  # fmt: skip
    with pytest.raises(WorkbenchError, match="data.bucket_step: resolution 32 is not a multiple of 24"):
        r = bucket_recipe(base, root).to_dict()
        r["data"]["bucket_step"] = 24
        parse_recipe(r, "test")
