"""Training data: captioned images from a folder or the procedural toy set, split reproducibly.

A folder is read as kohya or EveryDream2 lay theirs out (folders.py): captions from a `.txt` or
`.caption` sidecar, else the file name up to the first `_` ("red circle_003.png" -> "red circle")
or a kohya folder's class tokens; repeats from kohya's `N_name` folders or ED2's multiply.txt;
unusable files skipped and listed. Repeats apply to the training split only (`with_repeats`): the
validation split is drawn from the distinct images. Images are turned upright
by their EXIF orientation, resized so the shorter side is `resolution`, then center-cropped square;
with `aspect_buckets` each is resized to cover its bucket instead (see buckets.py).

The validation split is a pure function of (the sorted example keys, proportion, seed), so the same
data and seed give the same split on any machine; it is written to `split.json` in the run folder.
The stabilize-train subset (for `loss/train_stable`) is a fixed sample of the TRAIN examples, so its
loss shows how well the model fits data it trains on, measured as stably as validation loss.

Augmentation (flip, tag shuffling and dropout, caption dropout) draws from a generator seeded by
(seed, epoch, index): an example looks the same whenever it is visited at the same point of a run,
which is what a future exact resume needs, and is independent of batch size and worker count.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from workbench.errors import WorkbenchError
from workbench.train.folders import Skipped, scan
from workbench.train.recipe import TOY_DATA, DataSection


@dataclass(frozen=True)
class Example:
    """One image and its caption. `key` identifies it in split.json (a relative path or toy:NNNN).

    `repeats`: how many times it is trained per epoch (kohya's N_ folders, ED2's multiply.txt; may
    be fractional, see with_repeats). `flip_p`, `cond_dropout`: its folder's values, None for the
    recipe's; `shuffle`: its folder asks for tag shuffling (ED2's shuffle_tags)."""

    key: str
    caption: str
    path: Path | None = None
    spec: object | None = None  # a workbench.toy.shapes.ShapeSpec for toy:shapes
    repeats: float = 1.0
    flip_p: float | None = None
    cond_dropout: float | None = None
    shuffle: bool = False


@dataclass
class Data:
    """What the recipe's data holds: the examples (distinct images), the layout it was read as
    (toy, folders, kohya), the files skipped and why, and notes about settings ignored."""

    examples: list[Example]
    layout: str
    skipped: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def warnings(self) -> list[str]:
        return [f"{s.file}: {s.reason}, skipped" for s in self.skipped] + list(self.notes)

    def record(self) -> dict:
        """For run.json: layout, skipped files (with reasons) and notes."""
        return {
            "layout": self.layout,
            "skipped": len(self.skipped),
            "skipped_files": [{"file": s.file, "reason": s.reason} for s in self.skipped],
            **({"notes": list(self.notes)} if self.notes else {}),
        }


def read_data(data: DataSection, field: str = "data.root") -> Data:
    """The recipe's data: every usable example in a fixed order (sorted keys), and what was left out.
    Errors name `field` (validation.root for a validation folder read with the data's settings)."""
    if data.root == TOY_DATA:
        return Data(load_examples(data), "toy")
    found = scan(Path(data.root), data.layout, data.caption_extension, field)
    return Data(found.examples, found.layout, found.skipped, found.notes)


def load_examples(data: DataSection) -> list[Example]:
    """Every example of the recipe's data, in a fixed order (sorted keys)."""
    if data.root == TOY_DATA:
        from workbench.toy.shapes import sample_specs

        toy = data.toy
        try:
            specs = sample_specs(toy.n, toy.seed, shapes=toy.shapes, fg=toy.fg, bg=toy.bg)
        except ValueError as e:
            raise WorkbenchError(f"data.toy: {e}") from None
        digits = len(str(toy.n - 1))
        return [Example(f"toy:{i:0{digits}d}", s.caption, spec=s) for i, s in enumerate(specs)]
    return read_data(data).examples


def with_repeats(examples: list[Example], seed: int) -> list[Example]:
    """The training examples of one epoch: each `floor(repeats)` times, plus one more for as many
    examples with a fractional part as fill the epoch to floor(sum of repeats), picked as
    EveryDream2 does (in order, each with its fractional part as the chance, until filled) by a
    generator seeded by `seed`. wb picks once per run, so every epoch holds the same examples
    (ED2 picks again each epoch). Copies stay next to each other; the samplers shuffle."""
    if all(e.repeats == 1 for e in examples):
        return list(examples)
    counts = [math.floor(e.repeats) for e in examples]
    left = math.floor(sum(e.repeats for e in examples) + 1e-9) - sum(counts)
    fractions = [e.repeats - c for e, c in zip(examples, counts, strict=True)]
    rng = random.Random(f"wb-multiply:{seed}")
    while left > 0 and any(f > 1e-9 for f in fractions):
        for i, f in enumerate(fractions):
            if f > 1e-9 and rng.random() < f:
                counts[i] += 1
                fractions[i] = 0.0
                left -= 1
                if left == 0:
                    break
    return [e for e, c in zip(examples, counts, strict=True) for _ in range(c)]


def split_examples(
    examples: list[Example], proportion: float, seed: int, round_up: bool = False
) -> tuple[list[Example], list[Example]]:
    """(train, validation): disjoint, a fixed share `proportion` held out, chosen by `seed`
    (round(n x proportion) of them; ceil with `round_up`, as EveryDream2 does)."""
    n = len(examples)
    n_val = max(1, math.ceil(n * proportion) if round_up else round(n * proportion))
    if n_val >= n:
        raise WorkbenchError(
            f"validation.split: {proportion} of {n} examples leaves nothing to train on; "
            "use more data or a smaller split"
        )
    order = list(range(n))
    random.Random(f"wb-validation-split:{seed}").shuffle(order)
    held = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [
        e for i, e in enumerate(examples) if i in held
    ]


def stable_subset(train: list[Example], proportion: float, seed: int) -> list[Example]:
    """A fixed sample of the training examples for loss/train_stable (at least one)."""
    k = max(1, round(len(train) * proportion))
    chosen = set(random.Random(f"wb-stabilize:{seed}").sample(range(len(train)), k))
    return [e for i, e in enumerate(train) if i in chosen]


def write_split(path: Path, train: list[Example], validation: list[Example], stable: list[Example]) -> None:
    """split.json: the keys of each split (distinct images); `repeats` lists the training examples
    that repeat (key: times per epoch) when any does."""
    record = {
        "train": list(dict.fromkeys(e.key for e in train)),
        "validation": [e.key for e in validation],
        "stabilize_train": [e.key for e in stable],
    }
    counts: dict[str, int] = {}
    for e in train:
        counts[e.key] = counts.get(e.key, 0) + 1
    if any(n != 1 for n in counts.values()):
        record["repeats"] = counts
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def fingerprint(examples: list[Example]) -> dict:
    """What identifies the data: count, and a sha256 over every key, caption and image content.

    Two runs with the same fingerprint saw the same images with the same captions and repeats
    (content, not file dates). Hashing reads every image once at the start of a run.
    """
    h = hashlib.sha256()
    for e in examples:
        h.update(e.key.encode() + b"\0" + e.caption.encode() + b"\0")
        options = {k: getattr(e, k) for k in ("repeats", "flip_p", "cond_dropout", "shuffle")}
        if options != {"repeats": 1.0, "flip_p": None, "cond_dropout": None, "shuffle": False}:
            h.update(repr(sorted(options.items())).encode() + b"\0")
        if e.path is not None:
            with open(e.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(repr(e.spec).encode())
        h.update(b"\n")
    return {"examples": len(examples), "sha256": h.hexdigest()}


def load_image(
    path: Path, size: int | tuple[int, int], crop: tuple[float, float] | None = None
) -> Image.Image:
    """The image upright, resized to cover `size` (width, height; an int is a square) and
    center-cropped to it; `crop` (x, y in [0, 1)) places the crop instead (data.random_crop)."""
    width, height = (size, size) if isinstance(size, int) else size
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
    except Exception as e:  # PIL raises many types for broken files
        raise WorkbenchError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None
    w, h = im.size
    scale = max(width / w, height / h)
    if scale != 1:
        im = im.resize((max(width, round(w * scale)), max(height, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - width) // 2, (h - height) // 2
    if crop is not None:
        left, top = int((w - width + 1) * crop[0]), int((h - height + 1) * crop[1])
    return im.crop((left, top, left + width, top + height))


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) as the image is seen, after its EXIF rotation; reads only the header."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except Exception as e:
        raise WorkbenchError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # 90 or 270 degrees


class CaptionedImages(torch.utils.data.Dataset):
    """Map-style dataset: index -> {"pixels": float tensor (3, R, R) in [-1, 1], "caption": str}.

    With `augment` False (validation, stabilize-train) items are exactly the data: no flip, no
    dropout, no shuffling. With `latents` set (a latent_cache.LatentCache) items carry the image's
    cached "latent_mean" and "latent_std" in place of "pixels".
    """

    def __init__(self, examples: list[Example], data: DataSection, seed: int = 0, augment: bool = True):
        self.examples = examples
        self.resolution = data.resolution
        # (width, height) each example is trained at: its bucket, or the square
        self.sizes = [(data.resolution, data.resolution)] * len(examples)
        if data.aspect_buckets:
            from workbench.train.buckets import bucket_sizes, nearest_bucket

            buckets = bucket_sizes(data.resolution, data.bucket_step, data.max_aspect)
            if data.bucket_set == "ed2":
                from workbench.train.ed2_buckets import ed2_buckets, nearest_ed2_bucket

                buckets, nearest_bucket = ed2_buckets(data.resolution), nearest_ed2_bucket  # noqa: F811
            self.sizes = [
                nearest_bucket(*upright_size(e.path), buckets) if e.path is not None else self.sizes[i]
                for i, e in enumerate(examples)
            ]
        self.augment = augment
        self.flip_p, self.cond_dropout = data.flip_p, data.cond_dropout
        self.shuffle_tags, self.shuffle_caption = data.shuffle_tags, data.shuffle_caption
        self.keep_tokens, self.tag_dropout = data.keep_tokens, data.caption_tag_dropout_rate
        self.random_crop = data.random_crop and augment
        self.seed = seed
        self.epoch = 0
        self.latents = None  # a latent_cache.LatentCache: items carry cached latents, not pixels

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def image(self, index: int) -> np.ndarray:
        example = self.examples[index]
        if example.spec is not None:
            from workbench.toy.shapes import render_array

            return render_array(example.spec, self.resolution)
        assert example.path is not None
        return np.array(load_image(example.path, self.sizes[index], self.crop_of(index)))  # writable

    def crop_of(self, index: int) -> tuple[float, float] | None:
        """Where data.random_crop places this visit's crop (x, y in [0, 1)); None: the center crop."""
        if not self.random_crop or self.examples[index].path is None:
            return None
        # its own generator: the flip and caption draws stay as they were
        return tuple(np.random.default_rng([self.seed, self.epoch, index, 1]).random(2))

    def pixels(self, index: int) -> torch.Tensor:
        """The example's image as a float tensor (3, H, W) in [-1, 1], unaugmented (WorkbenchError
        when it cannot be read)."""
        array = np.ascontiguousarray(self.image(index))
        return torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1

    def flip_chance(self, example: Example) -> float:
        """The chance `example` is mirrored at a visit: its folder's flip_p, else the recipe's
        (0 without augmentation)."""
        if not self.augment:
            return 0.0
        return self.flip_p if example.flip_p is None else example.flip_p

    def substitute(self, index: int, error: WorkbenchError) -> int:
        """The example trained in place of `index`, whose image cannot be read (`error`; checked
        readable at the start, broken now, or its decoding fails past the header): the next one of
        the same size, with a warning."""
        other = self._substitute(index)
        warnings.warn(f"{error}; training on {self.examples[other].key} in its place", stacklevel=3)
        return other

    def __getitem__(self, index: int) -> dict:
        pixels = None
        if self.latents is not None:  # encoded at the start (an unreadable image: its substitute's)
            used = self.latents.substitutes.get(index, index)
        else:
            try:
                used, pixels = index, self.pixels(index)
            except WorkbenchError as e:  # train on the next example of the same size, not stop the run
                used = self.substitute(index, e)
                pixels = self.pixels(used)
        example = self.examples[used]
        caption, flip = example.caption, False
        if self.augment:
            flip_p = self.flip_chance(example)
            cond_dropout = self.cond_dropout if example.cond_dropout is None else example.cond_dropout
            shuffle = self.shuffle_caption or self.shuffle_tags or example.shuffle
            # ED2's shuffle_tags keeps the first tag in place; kohya's shuffle_caption keeps keep_tokens
            keep = self.keep_tokens if self.shuffle_caption else max(1, self.keep_tokens)
            if flip_p or cond_dropout or shuffle or self.tag_dropout:
                rng = np.random.default_rng([self.seed, self.epoch, index])
                flip = rng.random() < flip_p
                caption = process_tags(caption, rng, keep=keep, shuffle=shuffle, tag_dropout=self.tag_dropout)
                if rng.random() < cond_dropout:
                    caption = ""
        sizes = {"time_ids": self.time_ids(used, self.crop_of(used))}  # SDXL's: the crop trained
        if pixels is None:  # the VAE's mean and std of this image (flipped or not)
            return {**self.latents.lookup(index, bool(flip)), "caption": caption, **sizes}
        return {"pixels": pixels.flip(-1) if flip else pixels, "caption": caption, **sizes}

    def time_ids(self, index: int, crop: tuple[float, float] | None = None) -> torch.Tensor:
        """SDXL's size conditions of an example: its original size, the crop (the center crop, or
        `crop` placed as data.random_crop places it) and its target size."""
        from workbench.train.sdxl import cover_crop, time_ids

        example, target = self.examples[index], self.sizes[index]
        original = upright_size(example.path) if example.path is not None else target
        return time_ids(original, cover_crop(original, target, crop), target)

    def _substitute(self, index: int) -> int:
        size = self.sizes[index]
        for step in range(1, len(self.examples)):
            other = (index + step) % len(self.examples)
            if self.sizes[other] == size and self.examples[other].path != self.examples[index].path:
                try:
                    self.image(other)
                    return other
                except WorkbenchError:
                    continue
        raise WorkbenchError(
            f"{self.examples[index].path}: cannot read the image, and no other image of its size can"
        )


def process_tags(
    caption: str, rng: np.random.Generator, *, keep: int, shuffle: bool, tag_dropout: float
) -> str:
    """The caption's comma-separated tags after the first `keep` shuffled (`shuffle`) and each
    dropped with chance `tag_dropout`, as kohya's shuffle_caption / keep_tokens /
    caption_tag_dropout_rate do; the kept ones stay first, in place. Joined with ", ". A caption with
    nothing to shuffle or drop comes back as it is."""
    tags = [t.strip() for t in caption.split(",")]
    fixed, flex = tags[:keep], tags[keep:]
    if not tag_dropout and (not shuffle or len(flex) < 2):
        return caption
    if shuffle and len(flex) > 1:
        flex = [flex[i] for i in rng.permutation(len(flex))]
    if tag_dropout:
        flex = [t for t in flex if rng.random() >= tag_dropout]
    return ", ".join(t for t in fixed + flex if t)


class EpochSampler(torch.utils.data.Sampler):
    """A fresh permutation each epoch, a pure function of (seed, epoch).

    `resume_at(epoch, n)` drops the first n indices of that epoch's order, so a resumed run
    continues where the interrupted one was. (accelerate's loader calls set_epoch again at every
    iter(), so the skip is tied to its epoch rather than reset there.)"""

    def __init__(self, n: int, seed: int):
        self.n = n
        self.seed = seed
        self.epoch = 0
        self._skip = (-1, 0)  # (epoch, indices to drop)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, skip: int) -> None:
        self._skip = (epoch, skip)

    def _skipped(self) -> int:
        epoch, skip = self._skip
        return min(skip, self.n) if epoch == self.epoch else 0

    def __len__(self) -> int:
        return self.n - self._skipped()

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist()[self._skipped() :])


def collate(items: list[dict]) -> dict:
    """Stack the tensors (pixels, or cached latent_mean and latent_std; SDXL's time_ids), list the
    captions."""
    tensors = {k: torch.stack([i[k] for i in items]) for k in items[0] if k != "caption"}
    return {**tensors, "caption": [i["caption"] for i in items]}
