"""Latent caching (`data.cache_latents: memory | disk | off`, kohya's cache_latents and
cache_latents_to_disk): encode each training image with the VAE once, not at every visit.

What is cached: the VAE's latent distribution of the image, its MEAN and STD (float32), not a
sample. Every step still draws its own sample mean + std x eps, with eps from the training
generator exactly as the uncached loop draws it; so a cached run is the same run as an uncached one
(the same random numbers, the same latents up to the VAE's float rounding), and the sampling noise
the VAE adds as a regulariser stays per step. (kohya caches one sample, frozen for the whole run;
storing the std as well costs twice the memory: 2 x 4 x H/8 x W/8 floats per entry, 128 KiB at
512 x 512.)

One entry per (image, bucket size, flip): an image that flip_p (its folder's, else the recipe's)
can mirror is encoded both ways (the VAE is not mirror-symmetric, so a mirrored latent is not the
latent of the mirrored image); the copies of a repeated image share its entries.
Each entry's key is a sha256 of the image's CONTENT (the file's bytes; the toy's shape spec), the
VAE's weights (sha256 over every tensor), the size, the flip, the VAE's dtype and this format:
a changed image, a changed VAE, another bucket or resolution never meets a stale latent, whatever
the file dates say.

- memory: built at the start of every run (and resume), held in RAM.
- disk: `$WB_CACHE_DIR/latents/KK/KEY.safetensors` (default ~/.cache/wb), one file per entry,
  written atomically and reused by later runs; read from disk at every visit, so RAM stays low.
  With several processes each encodes its share of the missing entries (memory: each encodes all).

Refused where caching would change the training (a recipe check): random crops, which draw a new
crop of the image at every visit.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

CACHE_FORMAT = "wb-latents/1"


def latent_sample(models, batch: dict, draws, device) -> torch.Tensor:
    """Scaled latents of a micro-batch: mean + std x eps, eps from `draws` (distributed.Draws);
    the mean and std from the cache when the batch carries them, else from the VAE."""
    if "latent_mean" in batch:
        mean = batch["latent_mean"].to(device, torch.float32)
        std = batch["latent_std"].to(device, torch.float32)
    else:
        vae, fp32 = models.vae, _fp32_vae(models)
        dtype = torch.float32 if fp32 else next(vae.parameters()).dtype
        with torch.autocast(torch.device(device).type, enabled=False) if fp32 else contextlib.nullcontext():
            dist = vae.encode(batch["pixels"].to(device, dtype)).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
    eps = draws.randn(mean.shape)
    return (mean + std * eps.to(mean.device, torch.float32)) * models.scaling_factor


def _fp32_vae(models) -> bool:
    """SDXL's VAE overflows in fp16: it encodes in float32, outside any autocast."""
    return getattr(models, "text_encoder_2", None) is not None


def cache_root() -> Path:
    from workbench.checkpoint.hashing import cache_dir

    return cache_dir() / "latents"


def vae_hash(vae: torch.nn.Module) -> str:
    """sha256 over the VAE's tensors (names, dtypes, shapes, values): a changed VAE is another VAE."""
    h = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def content_hash(example) -> str:
    """sha256 of what the image is: the file's bytes, or the toy image's spec."""
    h = hashlib.sha256()
    if example.path is not None:
        with open(example.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        h.update(repr(example.spec).encode())
    return h.hexdigest()


def entry_key(image: str, vae: str, size: tuple[int, int], flip: bool, dtype: str) -> str:
    text = f"{CACHE_FORMAT}|image {image}|vae {vae} {dtype}|size {size[0]}x{size[1]}|flip {int(flip)}"
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class LatentCache:
    """index -> {flip: key}; `lookup` gives the dataset's item fields for one visit. Copies of an
    image (repeats) share their entries. `substitutes`: index -> the index whose image is trained in
    its place (an image that could not be read when the cache was built, see CaptionedImages)."""

    mode: str
    keys: dict[int, dict[bool, str]]
    memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    root: Path | None = None
    substitutes: dict[int, int] = field(default_factory=dict)
    encoded: int = 0
    reused: int = 0
    seconds: float = 0.0

    def path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return key in self.memory if self.mode == "memory" else self.path(key).is_file()

    def lookup(self, index: int, flip: bool) -> dict:
        key = self.keys[index][flip]
        if self.mode == "memory":
            mean, std = self.memory[key]
        else:
            from safetensors.torch import load_file

            tensors = load_file(str(self.path(key)))
            mean, std = tensors["mean"], tensors["std"]
        return {"latent_mean": mean, "latent_std": std}

    def summary(self) -> dict:
        entries = len({k for by_flip in self.keys.values() for k in by_flip.values()})
        return {"mode": self.mode, "entries": entries, "encoded": self.encoded, "reused": self.reused,
                "seconds": round(self.seconds, 2)}  # fmt: skip


def build_latent_cache(dataset, models, mode: str, accelerator, batch_size: int = 8) -> LatentCache:
    """Encode what `dataset` (a CaptionedImages with augmentation) can show: each image at its size,
    unflipped and/or flipped as its flip_p (its folder's, else the recipe's) allows; an image
    repeated (kohya's N_ folders, ED2's multiply.txt) is encoded once. Disk mode encodes only what
    is not on disk. An image that cannot be read gets its substitute's entries (with a warning),
    as the uncached dataset trains on its substitute."""
    started = time.perf_counter()
    vae = models.vae
    fp32 = _fp32_vae(models)
    dtype = torch.float32 if fp32 else next(vae.parameters()).dtype
    vae_id = vae_hash(vae)
    hashes: dict[str, str] = {}  # example key -> content hash (copies are hashed once)

    def keys_of(i: int) -> dict[bool, str]:
        example = dataset.examples[i]
        if example.key not in hashes:
            hashes[example.key] = content_hash(example)
        p = dataset.flip_chance(example)
        flips = [f for f in (False, True) if (p < 1 if not f else p > 0)]
        return {f: entry_key(hashes[example.key], vae_id, dataset.sizes[i], f, str(dtype)) for f in flips}

    keys = {i: keys_of(i) for i in range(len(dataset.examples))}
    cache = LatentCache(mode, keys, root=cache_root() if mode == "disk" else None)
    todo = list({key: (i, f) for i in keys for f, key in keys[i].items()}.values())  # one per entry
    if mode == "disk":
        missing = [(i, f) for i, f in todo if not cache.has(keys[i][f])]
        cache.reused = len(todo) - len(missing)
        todo = missing[accelerator.process_index :: accelerator.num_processes]
    for group in _groups(todo, dataset.sizes, batch_size):
        _encode(cache, dataset, vae, dtype, accelerator, fp32, group)
    if mode == "disk":
        accelerator.wait_for_everyone()  # every process's share is on disk
    # Entries still missing belong to images that could not be read (every process sees the same):
    # point them at a substitute's entries, encoded here when no process has them.
    for i in keys:
        if all(cache.has(key) for key in keys[i].values()):
            continue
        error = _read_error(dataset, i)
        if error is None:  # (read now: encode it after all)
            _encode(cache, dataset, vae, dtype, accelerator, fp32, [(i, f) for f in keys[i]])
            continue
        other = dataset.substitute(i, error)
        cache.substitutes[i] = other
        keys[i] = keys[other]
        absent = [(other, f) for f, key in keys[other].items() if not cache.has(key)]
        if absent:
            _encode(cache, dataset, vae, dtype, accelerator, fp32, absent)
    cache.seconds = time.perf_counter() - started
    return cache


def _read_error(dataset, index: int):
    from workbench.errors import WorkbenchError

    try:
        dataset.pixels(index)
    except WorkbenchError as e:
        return e
    return None


def _encode(
    cache: LatentCache, dataset, vae, dtype, accelerator, fp32: bool, group: list[tuple[int, bool]]
) -> None:
    """Encode the entries of `group` (one size) whose images can be read; skip the others."""
    from workbench.errors import WorkbenchError

    rows, images = [], []
    for i, f in group:
        try:
            images.append(dataset.pixels(i))
            rows.append((i, f))
        except WorkbenchError:  # (handled after all groups: its substitute's entries)
            continue
    if not rows:
        return
    pixels = torch.stack(images)
    flipped = torch.tensor([f for _, f in rows])
    pixels = torch.where(flipped[:, None, None, None], pixels.flip(-1), pixels)
    no_autocast = torch.autocast(accelerator.device.type, enabled=False)
    with torch.no_grad(), no_autocast if fp32 else accelerator.autocast():
        dist = vae.encode(pixels.to(accelerator.device, dtype)).latent_dist
        mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
    for row, (i, f) in enumerate(rows):
        key = cache.keys[i][f]
        if cache.mode == "memory":
            cache.memory[key] = (mean[row].clone(), std[row].clone())
        else:
            _write_entry(cache.path(key), mean[row], std[row], key)
    cache.encoded += len(rows)


def _groups(todo: list[tuple[int, bool]], sizes, batch_size: int) -> list[list[tuple[int, bool]]]:
    """Batches of entries of one size (one tensor shape), in a fixed order."""
    by_size: dict[tuple[int, int], list[tuple[int, bool]]] = {}
    for i, f in todo:
        by_size.setdefault(sizes[i], []).append((i, f))
    return [rows[j : j + batch_size] for rows in by_size.values() for j in range(0, len(rows), batch_size)]


def _write_entry(path: Path, mean: torch.Tensor, std: torch.Tensor, key: str) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(tmp),
              metadata={"format": CACHE_FORMAT, "key": key})  # fmt: skip
    os.replace(tmp, path)  # a reader sees the whole entry or none
