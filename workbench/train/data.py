"""Training data: captioned images from a folder or the procedural toy set, split reproducibly.

Captions follow EveryDream2 / kohya: a `.txt` sidecar beside the image, else `.caption`, else the
file name up to the first `_` ("red circle_003.png" -> "red circle"). Images are turned upright
by their EXIF orientation, resized so the shorter side is `resolution`, then center-cropped square;
with `aspect_buckets` each is resized to cover its bucket instead (see buckets.py).

The validation split is a pure function of (the sorted example keys, proportion, seed), so the same
data and seed give the same split on any machine; it is written to `split.json` in the run folder.
The stabilize-train subset (for `loss/train_stable`) is a fixed sample of the TRAIN examples, so its
loss shows how well the model fits data it trains on, measured as stably as validation loss.

Augmentation (flip, caption dropout, tag shuffling) draws from a generator seeded by
(seed, epoch, index): an example looks the same whenever it is visited at the same point of a run,
which is what a future exact resume needs, and is independent of batch size and worker count.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from workbench.errors import WorkbenchError
from workbench.train.recipe import TOY_DATA, DataSection

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIXES = (".txt", ".caption")


@dataclass(frozen=True)
class Example:
    """One image and its caption. `key` identifies it in split.json (a relative path or toy:NNNN)."""

    key: str
    caption: str
    path: Path | None = None
    spec: object | None = None  # a workbench.toy.shapes.ShapeSpec for toy:shapes


def caption_for(image: Path) -> str:
    for suffix in CAPTION_SUFFIXES:
        sidecar = image.with_suffix(suffix)
        if sidecar.is_file():
            return sidecar.read_text(encoding="utf-8").strip()
    return image.stem.split("_", 1)[0].strip()


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
    root = Path(data.root)
    if not root.is_dir():
        raise WorkbenchError(f"data.root: {root} is not a folder")
    images = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not _hidden(p, root)
    )
    if not images:
        raise WorkbenchError(f"data.root: no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return [Example(p.relative_to(root).as_posix(), caption_for(p), path=p) for p in images]


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def split_examples(
    examples: list[Example], proportion: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """(train, validation): disjoint, a fixed share `proportion` held out, chosen by `seed`."""
    n = len(examples)
    n_val = max(1, round(n * proportion))
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
    record = {
        "train": [e.key for e in train],
        "validation": [e.key for e in validation],
        "stabilize_train": [e.key for e in stable],
    }
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def fingerprint(examples: list[Example]) -> dict:
    """What identifies the data: count, and a sha256 over every key, caption and image content.

    Two runs with the same fingerprint saw the same images with the same captions (content, not
    file dates). Hashing reads every image once at the start of a run.
    """
    h = hashlib.sha256()
    for e in examples:
        h.update(e.key.encode() + b"\0" + e.caption.encode() + b"\0")
        if e.path is not None:
            with open(e.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        else:
            h.update(repr(e.spec).encode())
        h.update(b"\n")
    return {"examples": len(examples), "sha256": h.hexdigest()}


def load_image(path: Path, size: int | tuple[int, int]) -> Image.Image:
    """The image upright, resized to cover `size` (width, height; an int is a square) and
    center-cropped to it."""
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
    dropout, no shuffling.
    """

    def __init__(self, examples: list[Example], data: DataSection, seed: int = 0, augment: bool = True):
        self.examples = examples
        self.resolution = data.resolution
        # (width, height) each example is trained at: its bucket, or the square
        self.sizes = [(data.resolution, data.resolution)] * len(examples)
        if data.aspect_buckets:
            from workbench.train.buckets import bucket_sizes, nearest_bucket

            buckets = bucket_sizes(data.resolution, data.bucket_step, data.max_aspect)
            self.sizes = [
                nearest_bucket(*upright_size(e.path), buckets) if e.path is not None else self.sizes[i]
                for i, e in enumerate(examples)
            ]
        self.flip_p = data.flip_p if augment else 0.0
        self.cond_dropout = data.cond_dropout if augment else 0.0
        self.shuffle_tags = data.shuffle_tags and augment
        self.seed = seed
        self.epoch = 0

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
        return np.array(load_image(example.path, self.sizes[index]))  # a writable copy for torch

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        array = np.ascontiguousarray(self.image(index))
        pixels = torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1
        caption = example.caption
        if self.flip_p or self.cond_dropout or self.shuffle_tags:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            if rng.random() < self.flip_p:
                pixels = pixels.flip(-1)
            if self.shuffle_tags:
                caption = _shuffle_tags(caption, rng)
            if rng.random() < self.cond_dropout:
                caption = ""
        return {"pixels": pixels, "caption": caption, "time_ids": self.time_ids(index)}

    def time_ids(self, index: int) -> torch.Tensor:
        """SDXL's size conditions of an example: its original size, the crop and its target size."""
        from workbench.train.sdxl import cover_crop, time_ids

        example, target = self.examples[index], self.sizes[index]
        original = upright_size(example.path) if example.path is not None else target
        return time_ids(original, cover_crop(original, target), target)


def _shuffle_tags(caption: str, rng: np.random.Generator) -> str:
    # The first tag (usually the subject or a trigger word) stays first, as in EveryDream2.
    tags = [t.strip() for t in caption.split(",")]
    if len(tags) <= 2:
        return caption
    rest = tags[1:]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    return ", ".join([tags[0], *rest])


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
    batch = {"pixels": torch.stack([i["pixels"] for i in items]), "caption": [i["caption"] for i in items]}
    if all("time_ids" in i for i in items):
        batch["time_ids"] = torch.stack([i["time_ids"] for i in items])
    return batch
