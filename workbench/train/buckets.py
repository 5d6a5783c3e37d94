"""Aspect-ratio buckets: train on portrait and landscape images without cropping them square.

The buckets are every (width, height) with both sides multiples of `step`, an area of at most
resolution², and an aspect ratio within 1/max_aspect .. max_aspect: for each width, the tallest
height that fits the area. An image goes to the bucket whose aspect ratio is nearest to its own
(compared as log(w/h), so 2:1 and 1:2 are equally far from 1:1), is resized to cover it and
center-cropped: at most a sliver is lost, where a square crop would lose the sides of a 3:2 photo.

A batch holds images of one bucket (tensors of one size). Each epoch shuffles within every bucket,
cuts it into batches, and shuffles the order of all batches: a pure function of (seed, epoch), like
the square case, so a resumed run sees the same batches. The last batch of a bucket may be smaller.
"""

from __future__ import annotations

import math
from collections import Counter

import torch

Size = tuple[int, int]  # (width, height)


def bucket_sizes(resolution: int, step: int, max_aspect: float) -> list[Size]:
    """Every bucket, ordered by aspect ratio (tall to wide); the square one is among them when
    resolution is a multiple of step."""
    area = resolution * resolution
    sizes = set()
    for w in range(step, int(resolution * math.sqrt(max_aspect)) + 2 * step, step):
        h = area // w // step * step  # the tallest that fits the area
        if h >= step and 1 / max_aspect <= w / h <= max_aspect:
            sizes |= {(w, h), (h, w)}  # portrait and landscape alike
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(width: int, height: int, buckets: list[Size]) -> Size:
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def bucket_counts(sizes: list[Size]) -> dict[str, int]:
    """{"WxH": images} for run.json, widest first."""
    counts = Counter(sizes)
    return {f"{w}x{h}": counts[(w, h)] for w, h in sorted(counts, key=lambda s: s[0] / s[1], reverse=True)}


class BucketBatchSampler(torch.utils.data.Sampler):
    """Yields lists of dataset indices, each from one bucket; see the module docstring."""

    def __init__(self, sizes: list[Size], batch_size: int, seed: int):
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self._skip = (-1, 0)  # (epoch, batches to drop)
        by_bucket: dict[Size, list[int]] = {}
        for index, size in enumerate(sizes):
            by_bucket.setdefault(size, []).append(index)
        self.buckets = [by_bucket[s] for s in sorted(by_bucket)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches: int) -> None:
        self._skip = (epoch, batches)

    def _batches(self) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        batches = []
        for members in self.buckets:
            order = [members[i] for i in torch.randperm(len(members), generator=g).tolist()]
            batches += [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        epoch, skip = self._skip
        return batches[skip:] if epoch == self.epoch else batches

    def __len__(self) -> int:
        return len(self._batches())

    def __iter__(self):
        return iter(self._batches())
