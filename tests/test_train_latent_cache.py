"""Latent caching: a changed image or VAE never meets a stale latent, and a cached run trains like
an uncached one. References are computed here with the VAE directly, not through the cache."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from workbench.checkpoint.reader import open_checkpoint
from workbench.cli import app
from workbench.errors import WorkbenchError
from workbench.train import loop
from workbench.train.data import CaptionedImages, load_examples
from workbench.train.latent_cache import build_latent_cache
from workbench.train.recipe import DataSection, parse_recipe
from workbench.train.runs import read_run

runner = CliRunner()


class OneProcess:
    """What build_latent_cache needs of an accelerator, for a single CPU process."""

    device, process_index, num_processes = torch.device("cpu"), 0, 1

    def autocast(self):
        return torch.autocast("cpu", enabled=False)

    def wait_for_everyone(self):
        pass


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from workbench.toy.model import toy_init

    return toy_init(tmp_path_factory.mktemp("toy") / "base.safetensors", seed=7)


@pytest.fixture
def vae(base):
    from workbench.pipeline import load_modules

    return load_modules(str(base))["vae"].eval()


class Models:
    def __init__(self, vae):
        self.vae = vae


def paint(path, color, size=(48, 32)):
    """A two-coloured picture (left half `color`), so a mirror image is another image."""
    a = np.zeros((size[1], size[0], 3), np.uint8)
    a[:, : size[0] // 2] = color
    a[:, size[0] // 2 :] = (20, 200, 90)
    Image.fromarray(a).save(path)


def vae_mean(vae, path, flip=False):
    """The reference: the image read by hand (48x32 already covers 32x32: center crop), VAE mean."""
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"))[:, 8:40]
    x = torch.from_numpy(a.copy()).permute(2, 0, 1).float()[None] / 127.5 - 1
    if flip:
        x = x.flip(-1)
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean[0]


def dataset(root, flip_p=0.5):
    data = DataSection(root=str(root), resolution=32, flip_p=flip_p)
    return CaptionedImages(load_examples(data), data, seed=1, augment=True)


def test_a_changed_image_or_vae_never_uses_a_stale_latent(tmp_path, vae):
    root = tmp_path / "pics"
    root.mkdir()
    paint(root / "a.png", (250, 0, 0))
    paint(root / "b.png", (0, 0, 250))
    first = build_latent_cache(dataset(root), Models(vae), "disk", OneProcess())
    assert (first.encoded, first.reused) == (4, 0)  # 2 images x (as is, mirrored)
    for flip in (False, True):
        got = first.lookup(0, flip)["latent_mean"]
        assert torch.allclose(got, vae_mean(vae, root / "a.png", flip), atol=1e-5)
    assert not torch.allclose(first.lookup(0, True)["latent_mean"], first.lookup(0, False)["latent_mean"])

    # The same file name, size and modification time, other pixels: a new latent.
    stamp = os.stat(root / "a.png")
    paint(root / "a.png", (0, 250, 0))
    os.utime(root / "a.png", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    second = build_latent_cache(dataset(root), Models(vae), "disk", OneProcess())
    assert (second.encoded, second.reused) == (2, 2)  # b.png's two entries come from disk
    new = second.lookup(0, False)["latent_mean"]
    assert torch.allclose(new, vae_mean(vae, root / "a.png"), atol=1e-5)
    assert not torch.allclose(new, first.lookup(0, False)["latent_mean"], atol=1e-3)

    # Another VAE (one weight changed): nothing is reused.
    with torch.no_grad():
        vae.encoder.conv_in.weight[0, 0, 0, 0] += 0.5
    third = build_latent_cache(dataset(root), Models(vae), "disk", OneProcess())
    assert (third.encoded, third.reused) == (4, 0)
    for i, name in enumerate(("a.png", "b.png")):
        assert torch.allclose(third.lookup(i, False)["latent_mean"], vae_mean(vae, root / name), atol=1e-5)


def test_entries_only_for_the_flips_the_recipe_can_draw(tmp_path, vae):
    root = tmp_path / "pics"
    root.mkdir()
    paint(root / "a.png", (250, 0, 0))
    never = build_latent_cache(dataset(root, flip_p=0.0), Models(vae), "memory", OneProcess())
    always = build_latent_cache(dataset(root, flip_p=1.0), Models(vae), "memory", OneProcess())
    assert list(never.keys[0]) == [False] and list(always.keys[0]) == [True]
    assert never.keys[0][False] != always.keys[0][True]
    item = dataset(root, flip_p=1.0)
    item.latents = always
    got = item[0]
    assert "pixels" not in got
    assert torch.allclose(got["latent_mean"], vae_mean(vae, root / "a.png", flip=True), atol=1e-5)



def test_per_folder_flip_p_and_repeats_share_their_entries(tmp_path, vae):
    """ED2 folders: `never/` (flip_p.txt 0) and `always/` (flip_p.txt 1, multiply.txt 3) under a
    recipe flip_p of 0.5. Each image gets only the flips its folder allows; b.png's three copies
    share one entry, encoded once."""
    from workbench.train.data import read_data, with_repeats

    for name, text in (("never", {"flip_p.txt": "0"}), ("always", {"flip_p.txt": "1", "multiply.txt": "3"})):
        (tmp_path / "pics" / name).mkdir(parents=True)
        for file, value in text.items():
            (tmp_path / "pics" / name / file).write_text(value)
    paint(tmp_path / "pics" / "never" / "a.png", (250, 0, 0))
    paint(tmp_path / "pics" / "always" / "b.png", (0, 0, 250))
    data = DataSection(root=str(tmp_path / "pics"), resolution=32, flip_p=0.5)
    examples = with_repeats(read_data(data).examples, seed=0)
    assert [e.key for e in examples] == ["always/b.png"] * 3 + ["never/a.png"]
    ds = CaptionedImages(examples, data, seed=1, augment=True)
    cache = build_latent_cache(ds, Models(vae), "memory", OneProcess())
    assert [list(cache.keys[i]) for i in range(4)] == [[True]] * 3 + [[False]]
    assert cache.keys[0] == cache.keys[1] == cache.keys[2]
    assert cache.encoded == 2 and cache.summary()["entries"] == 2
    ds.latents = cache
    for i, (name, flip) in enumerate([("always/b.png", True)] * 3 + [("never/a.png", False)]):
        want = vae_mean(vae, tmp_path / "pics" / name, flip=flip)
        assert torch.allclose(ds[i]["latent_mean"], want, atol=1e-5)


def test_an_image_unreadable_when_caching_gets_its_substitutes_latent(tmp_path, vae, monkeypatch):
    """As without a cache (data.py), an image broken after the scan trains as the next image of its
    size, caption included; the warning names both."""
    monkeypatch.setenv("WB_CACHE_DIR", str(tmp_path / "cache"))  # session-wide may hold b.png
    root = tmp_path / "pics"
    root.mkdir()
    paint(root / "a.png", (250, 0, 0))
    paint(root / "b.png", (0, 0, 250))
    (root / "a.txt").write_text("first")
    (root / "b.txt").write_text("second")
    ds = dataset(root, flip_p=0.0)
    (root / "a.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="a.png: cannot read the image.*training on b.png in its place"):
        cache = build_latent_cache(ds, Models(vae), "disk", OneProcess())
    assert cache.substitutes == {0: 1} and cache.keys[0] == cache.keys[1]
    assert cache.encoded == 1
    ds.latents = cache
    item = ds[0]
    assert item["caption"] == "second"
    assert torch.allclose(item["latent_mean"], vae_mean(vae, root / "b.png"), atol=1e-5)


def recipe(base, cache, **data):
    raw = {
        "model": {"base": str(base)},
        "data": {"root": "toy:shapes", "resolution": 32, "toy": {"n": 10, "seed": 3}, "flip_p": 0.5,
                 "cache_latents": cache, **data},  # fmt: skip
        "validation": {"enabled": False},
        "optimizer": {"name": "adamw", "lr": 1e-3, "eps": 1e-4},
        "training": {"max_steps": 6, "batch_size": 3, "seed": 5},
        "saving": {"every_n_epochs": None, "dtype": "fp32"},
        "logging": {"tensorboard": False},
    }
    return parse_recipe(raw, "test")


def final_weights(result):
    with open_checkpoint(result.checkpoints[-1]) as ckpt:
        return {k: ckpt[k].clone() for k in ckpt}


def test_cached_training_equals_uncached_training(base, tmp_path):
    """The cache holds the VAE's mean and std; each step still draws its latent sample from the
    training generator, so the runs draw the same numbers. They differ only where the VAE encodes
    a batch of 3 (uncached) or the cache's batches: float32 rounding, ~1e-7 relative in a latent,
    which 6 AdamW steps (eps 1e-4: update differences ~lr x 1e-6) leave at a few ulps of a weight."""
    off = loop.train(recipe(base, "off"), tmp_path / "off")
    memory = loop.train(recipe(base, "memory"), tmp_path / "memory")
    disk = loop.train(recipe(base, "disk"), tmp_path / "disk")  # (reuse: the test above)
    reference = final_weights(off)
    for run in (memory, disk):
        weights = final_weights(run)
        for k in reference:
            torch.testing.assert_close(weights[k], reference[k], atol=1e-6, rtol=1e-6, msg=k)
        assert run.last_loss == pytest.approx(off.last_loss, rel=1e-5)
    cache = read_run(tmp_path / "memory")["data"]["latent_cache"]
    assert (cache["mode"], cache["entries"], cache["encoded"]) == ("memory", 20, 20)  # 10 images x 2 flips
    assert read_run(tmp_path / "disk")["data"]["latent_cache"]["mode"] == "disk"
    assert "latent_cache" not in read_run(tmp_path / "off")["data"]


def test_random_crops_refuse_the_cache(tmp_path):
    with pytest.raises(WorkbenchError) as e:
        parse_recipe(
            {"model": {"base": "x"}, "training": {"max_steps": 1},
             "data": {"root": "pics", "random_crop": True, "cache_latents": "disk"}},  # fmt: skip
            "r.yaml",
        )
    assert str(e.value) == (
        "r.yaml: data.cache_latents: disk caches one crop of each image, but random_crop takes a new "
        "one at every visit; set data.cache_latents: off or data.random_crop: false"
    )
    path = tmp_path / "r.yaml"
    path.write_text(
        "model: {base: x}\ntraining: {max_steps: 1}\n"
        "data: {root: pics, random_crop: true, cache_latents: memory}\n"
    )
    result = runner.invoke(app, ["train", str(path), "-o", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "data.cache_latents: memory caches one crop" in result.output
    assert not (tmp_path / "run").exists()


def test_random_crop_moves_the_crop_each_epoch(tmp_path):
    root = tmp_path / "pics"
    root.mkdir()
    a = np.arange(64 * 32 * 3, dtype=np.uint32).reshape(32, 64, 3) % 251  # every column differs
    Image.fromarray(a.astype(np.uint8)).save(root / "wide.png")
    data = DataSection(root=str(root), resolution=32, random_crop=True)
    ds = CaptionedImages(load_examples(data), data, seed=4, augment=True)
    crops = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        crops.append(ds[0]["pixels"])
    full = torch.from_numpy(a.astype(np.uint8)).permute(2, 0, 1).float() / 127.5 - 1
    lefts = [next(x for x in range(33) if torch.equal(full[:, :, x : x + 32], c)) for c in crops]
    assert len(set(lefts)) > 2  # not the center (16) every time
    ds.set_epoch(2)
    assert torch.equal(ds[0]["pixels"], crops[2])  # the same visit, the same crop
    plain = CaptionedImages(load_examples(data), data, seed=4, augment=False)  # validation: center
    assert torch.equal(plain[0]["pixels"], full[:, :, 16:48])
