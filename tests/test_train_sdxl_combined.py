"""SDXL and LoRA training combined with main's training features: TE2's own schedule and gradient
clipping (inheriting TE1's), clip skip refused on SDXL, the latent cache for SDXL and LoRA runs,
and SDXL's crop time ids under data.random_crop. References are computed by hand here."""

import numpy as np
import pytest
import torch
from PIL import Image

from workbench.checkpoint.reader import open_checkpoint
from workbench.errors import WorkbenchError
from workbench.train import loop
from workbench.train.data import CaptionedImages, load_examples
from workbench.train.recipe import DataSection, parse_recipe
from workbench.train.runs import read_metrics
from workbench.train.sdxl import cover_crop

TE1 = "conditioner.embedders.0.transformer.text_model."
TE2 = "conditioner.embedders.1.model."


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from workbench.toy.sdxl import toy_sdxl_init

    return toy_sdxl_init(tmp_path_factory.mktemp("xl") / "base.safetensors", seed=3)


def recipe(base, **sections):
    raw = {
        "model": {"base": str(base)},
        "data": {"root": "toy:shapes", "resolution": 64, "toy": {"n": 6, "seed": 1}, "flip_p": 0.5},
        "validation": {"enabled": False},
        "optimizer": {"name": "adamw", "lr": 1e-3, "text_encoder_2": {"lr": 2e-4}},
        "training": {"max_steps": 4, "batch_size": 2},
        "saving": {"every_n_epochs": None, "dtype": "fp32"},
        "logging": {"tensorboard": False},
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return parse_recipe(raw, "test")


def tensors(path, prefix=""):
    with open_checkpoint(path) as ckpt:
        return {k: ckpt[k].clone() for k in ckpt if k.startswith(prefix)}


def test_text_encoder_2_inherits_schedule_clipping_and_freezing_from_text_encoder():
    raw = {"model": {"base": "x"}, "data": {"root": "pics"}, "training": {"max_steps": 1},
           "schedule": {"name": "constant", "text_encoder": {"name": "cosine"}},
           "text_encoder": {"clip_grad_norm": 0.5, "freeze_first_n_layers": 2},
           "text_encoder_2": {"unfreeze_last_n_layers": 1}}  # fmt: skip
    r = parse_recipe(raw, "r.yaml")
    assert r.schedule.for_component("unet").name == "constant"
    assert r.schedule.for_component("text_encoder_2").name == "cosine"  # TE1's
    assert (r.clip_grad_norm_of("unet"), r.clip_grad_norm_of("text_encoder_2")) == (None, 0.5)
    te2 = r.text_encoder_section("text_encoder_2")  # TE2's layer choice replaces TE1's
    assert (te2.unfreeze_last_n_layers, te2.freeze_first_n_layers) == (1, None)
    raw["schedule"]["text_encoder_2"] = {"name": "linear"}
    raw["text_encoder_2"] = {"clip_grad_norm": 2.0}
    r = parse_recipe(raw, "r.yaml")
    assert r.schedule.for_component("text_encoder_2").name == "linear"
    assert r.schedule.for_component("text_encoder").name == "cosine"
    assert r.clip_grad_norm_of("text_encoder_2") == 2.0
    assert r.text_encoder_section("text_encoder_2").freeze_first_n_layers == 2  # inherited


def test_text_encoder_2_trains_on_its_own_schedule(base, tmp_path):
    r = recipe(base, schedule={"name": "constant", "text_encoder_2": {"name": "linear"}})
    run = loop.train(r, tmp_path / "run")
    lrs = {m["step"]: m for m in read_metrics(run.run_dir) if "lr/text_encoder_2" in m}
    # linear over the run's 4 steps, no warmup: step s uses lr x (4 - (s - 1)) / 4
    assert [lrs[s]["lr/text_encoder_2"] for s in (1, 2, 3, 4)] == pytest.approx([2e-4, 1.5e-4, 1e-4, 5e-5])
    assert [lrs[s]["lr/text_encoder"] for s in (1, 2, 3, 4)] == pytest.approx([1e-3] * 4)
    assert [lrs[s]["lr/unet"] for s in (1, 2, 3, 4)] == pytest.approx([1e-3] * 4)


def test_text_encoder_2_clips_its_own_gradient(base, tmp_path):
    """Adam with eps 1 (no weight decay) makes the first step ~ lr x gradient: clipped to norm 1e-9,
    TE2 cannot move by more than 2e-4 x 1e-9, while TE1 (unclipped) moves exactly as without it."""
    opt = {"text_encoder_2": {"lr": 2e-4, "eps": 1.0, "weight_decay": 0.0}}
    free = loop.train(recipe(base, optimizer=opt, training={"max_steps": 1}), tmp_path / "free")
    clipped = loop.train(
        recipe(base, optimizer=opt, training={"max_steps": 1}, text_encoder_2={"clip_grad_norm": 1e-9}),
        tmp_path / "clipped",
    )
    before = tensors(base, TE2)
    moved = {name: tensors(run.checkpoints[-1], TE2) for name, run in (("free", free), ("clip", clipped))}
    most = {name: max(float((w[k] - before[k]).abs().max()) for k in before) for name, w in moved.items()}
    assert most["free"] > 1e-8 and most["clip"] < 1e-11
    a, b = tensors(free.checkpoints[-1], TE1), tensors(clipped.checkpoints[-1], TE1)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_clip_skip_on_sdxl_is_refused_naming_the_field(base, tmp_path):
    with pytest.raises(WorkbenchError, match=r"^training\.clip_skip: .* is an sdxl model"):
        loop.train(recipe(base, training={"clip_skip": 2}), tmp_path / "run")


def test_schedule_text_encoder_2_on_an_sd1_model_is_refused(tmp_path):
    from workbench.toy.model import toy_init

    sd1 = toy_init(tmp_path / "sd1.safetensors")
    r = recipe(sd1, data={"resolution": 32}, optimizer={"text_encoder_2": {}},
               schedule={"text_encoder_2": {"name": "linear"}})  # fmt: skip
    with pytest.raises(WorkbenchError, match=r"^text_encoder_2: .*schedule\.text_encoder_2 are for SDXL"):
        loop.train(r, tmp_path / "run")


def test_sdxl_cached_latents_train_like_uncached(base, tmp_path):
    """The cache encodes SDXL's VAE in fp32 as the uncached step does; the time ids come from the
    data either way. Tolerance as in test_train_latent_cache (float rounding of batched encodes)."""
    runs = {}
    for cache in ("off", "memory"):  # (eps 1e-4: Adam does not blow float rounding up to lr-sized steps)
        r = recipe(base, data={"cache_latents": cache}, training={"max_steps": 2},
                   optimizer={"eps": 1e-4, "text_encoder_2": {"lr": 2e-4}})  # fmt: skip
        runs[cache] = loop.train(r, tmp_path / cache)
    a, b = tensors(runs["off"].checkpoints[-1]), tensors(runs["memory"].checkpoints[-1])
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6, msg=k)
    assert runs["memory"].last_loss == pytest.approx(runs["off"].last_loss, rel=1e-5)


def test_lora_run_with_the_latent_cache_trains_like_uncached(tmp_path):
    pytest.importorskip("peft")
    from workbench.toy.model import toy_init

    sd1 = toy_init(tmp_path / "sd1.safetensors", seed=2)
    runs = {}
    for cache in ("off", "memory"):
        r = recipe(sd1, data={"resolution": 32, "cache_latents": cache},
                   optimizer={"eps": 1e-4, "text_encoder_2": {}}, network={"dim": 4},
                   training={"max_steps": 3, "loss": "huber"})  # fmt: skip
        runs[cache] = loop.train(r, tmp_path / cache)
    a, b = tensors(runs["off"].checkpoints[-1]), tensors(runs["memory"].checkpoints[-1])
    assert a and a.keys() == b.keys() and all(k.startswith("lora_") for k in a)
    for k in a:
        torch.testing.assert_close(b[k].float(), a[k].float(), atol=1e-6, rtol=1e-6, msg=k)


def test_random_crop_time_ids_name_the_crop_taken(tmp_path):
    # 100x50 covering 64x64 becomes 128x64; the crop's left is int((128 - 64 + 1) x x)
    assert cover_crop((100, 50), (64, 64), (0.5, 0.9)) == (32, 0)
    assert cover_crop((100, 50), (64, 64), (0.999, 0.0)) == (64, 0)
    a = np.arange(128 * 64 * 3, dtype=np.uint32).reshape(64, 128, 3) % 251  # every column differs
    Image.fromarray(a.astype(np.uint8)).save(tmp_path / "wide.png")
    data = DataSection(root=str(tmp_path), resolution=64, random_crop=True)
    ds = CaptionedImages(load_examples(data), data, seed=4, augment=True)
    full = torch.from_numpy(a.astype(np.uint8)).permute(2, 0, 1).float() / 127.5 - 1
    lefts = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        item = ds[0]
        left = next(x for x in range(65) if torch.equal(full[:, :, x : x + 64], item["pixels"]))
        # time ids: original (h, w), crop (top, left), target (h, w)
        assert item["time_ids"].tolist() == [64, 128, 0, left, 64, 64]
        lefts.add(left)
    assert len(lefts) > 2


def test_sdxl_in_two_processes_trains_like_one(base, tmp_path):
    """SDXL draws its noise through the global batch as SD1 does (distributed.Draws), and each
    process's time ids travel with its shard: 2 processes x batch 2 end where 1 x batch 4 does, to
    float rounding (tolerance: see test_train_distributed.test_two_processes_train_like_one)."""
    from workbench.train.distributed import launch

    def xl(batch_size):
        return recipe(base, training={"max_steps": 3, "batch_size": batch_size, "seed": 5},
                      optimizer={"eps": 1e-4, "text_encoder_2": {"lr": 2e-4}})  # fmt: skip

    one = loop.train(xl(4), tmp_path / "one")
    two = launch(loop.train, (xl(2), tmp_path / "two"), 2, timeout=240, start_method="fork")
    assert two.steps == 3 and two.stopped is None
    a, b = tensors(one.checkpoints[-1]), tensors(two.checkpoints[-1])
    moved = max(float((a[k] - v).abs().max()) for k, v in tensors(base).items())
    assert moved > 5e-4 and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6, msg=k)
    assert two.last_loss == pytest.approx(one.last_loss, rel=1e-5)


def test_clip_skip_in_two_processes_trains_like_one(tmp_path):
    """Clip skip 2 leaves the text encoder's last layer without a gradient: DDP is told so, and
    that layer stays put in 2 processes as in 1."""
    from workbench.toy.model import toy_init
    from workbench.train.distributed import launch

    sd1 = toy_init(tmp_path / "sd1.safetensors", seed=2)

    def run(batch_size):
        training = {"max_steps": 3, "batch_size": batch_size, "seed": 5, "clip_skip": 2}
        optimizer = {"eps": 1e-4, "text_encoder_2": {}}
        return recipe(sd1, data={"resolution": 32}, optimizer=optimizer, training=training)

    one = loop.train(run(4), tmp_path / "one")
    two = launch(loop.train, (run(2), tmp_path / "two"), 2, timeout=240, start_method="fork")
    a, b, start = tensors(one.checkpoints[-1]), tensors(two.checkpoints[-1]), tensors(sd1)
    last = "cond_stage_model.transformer.text_model.encoder.layers.4."  # the toy's last of 5
    assert any(k.startswith(last) for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-6, msg=k)
        if k.startswith(last):
            assert torch.equal(a[k], start[k]), k  # no gradient reaches it
