"""Synthetic LoRAs with random factors for a given base checkpoint: test and benchmark material
(no training needed), written in kohya's format with kohya's names."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from workbench.checkpoint.lora_format import KohyaModule, kohya_metadata, write_kohya
from workbench.checkpoint.reader import open_checkpoint
from workbench.lora.names import default_targets, family_of_layout, lora_targets


def synthetic_modules(
    infos, rank: int = 4, alpha: float = 2.0, groups: Iterable[str] = ("attn", "conv", "te"),
    std: float = 0.1, seed: int = 0,
) -> dict[str, KohyaModule]:  # fmt: skip
    """Random up/down (normal, `std`) for every target of the given groups of a base header."""
    family = family_of_layout(infos)
    targets = default_targets(lora_targets(infos, family), groups)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in targets.items():
        r = min(rank, t.shape[0], *(t.shape[1:2]))
        if len(t.shape) == 4:
            down = torch.randn(r, *t.shape[1:], generator=g) * std
            up = torch.randn(t.shape[0], r, 1, 1, generator=g) * std
        else:
            down = torch.randn(r, t.shape[1], generator=g) * std
            up = torch.randn(t.shape[0], r, generator=g) * std
        out[name] = KohyaModule(up, down, alpha)
    return out


def synthetic_lora(
    out_path: str | os.PathLike, base: str | os.PathLike, rank: int = 4, alpha: float = 2.0,
    groups: Iterable[str] = ("attn", "conv", "te"), std: float = 0.1, seed: int = 0, dtype: str = "F32",
) -> Path:  # fmt: skip
    """Write a random kohya LoRA for `base` (see synthetic_modules)."""
    with open_checkpoint(base) as ckpt:
        infos = dict(ckpt.infos)
    family = family_of_layout(infos)
    modules = synthetic_modules(infos, rank, alpha, groups, std, seed)
    conv = "conv" in set(groups)
    meta = kohya_metadata(
        family, rank, alpha, conv_dim=rank if conv else None, conv_alpha=alpha if conv else None,
        title=Path(out_path).stem,
    )  # fmt: skip
    return write_kohya(out_path, modules, meta, dtype=dtype).path
