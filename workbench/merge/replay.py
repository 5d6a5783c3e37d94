"""Re-run the recipe recorded in a merged file: find its inputs by path, else by sha256.

An input is taken from its recorded path when that file's sha256 still matches; otherwise every
checkpoint file under the `--search` folders whose size matches the recorded one is hashed (hashes
are cached) until one matches. The output is bit-identical to the original: same inputs, same
recipe, same float32 arithmetic, per-key and thread-independent.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from workbench.checkpoint.hashing import sha256_file
from workbench.checkpoint.reader import open_checkpoint
from workbench.errors import WorkbenchError
from workbench.merge.recipe import Input, Recipe, from_json

CHECKPOINT_SUFFIXES = {".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin"}
RECIPE_KEY = "wb.merge_recipe"


def recorded_recipe_of(path: str | os.PathLike) -> Recipe:
    with open_checkpoint(path) as ckpt:
        metadata = dict(ckpt.metadata)
    text = metadata.get(RECIPE_KEY)
    if not text:
        has_a1111 = "sd_merge_recipe" in metadata
        why = (
            "only A1111's sd_merge_recipe, which is not enough to re-run it"
            if has_a1111
            else "no merge recipe"
        )
        raise WorkbenchError(f"{path}: {why} (metadata {RECIPE_KEY} is missing)")
    return from_json(text, f"{path}: {RECIPE_KEY}")


def _candidates(folders: Iterable[str | os.PathLike]) -> list[Path]:
    found = []
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            raise WorkbenchError(f"--search {root}: not a folder")
        found.extend(
            sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in CHECKPOINT_SUFFIXES)
        )
    return found


def locate_input(inp: Input, search: Iterable[str | os.PathLike] = ()) -> Path:
    recorded = Path(inp.path)
    if inp.sha256 is None:  # a recipe made without hashes can only be found where it was
        if recorded.is_file():
            return recorded
        raise WorkbenchError(
            f"input {inp.name!r}: {recorded} is gone and no sha256 was recorded to find it by"
        )
    if recorded.is_file() and (inp.size is None or recorded.stat().st_size == inp.size):
        if sha256_file(recorded) == inp.sha256:
            return recorded
    for cand in _candidates(search):
        if inp.size is not None and cand.stat().st_size != inp.size:
            continue
        if sha256_file(cand) == inp.sha256:
            return cand
    where = f" or under {', '.join(map(str, search))}" if search else " (give --search DIR to look elsewhere)"
    raise WorkbenchError(f"input {inp.name!r}: no file with sha256 {inp.sha256[:10]}... at {recorded}{where}")


def replay_recipe(merged: str | os.PathLike, search: Iterable[str | os.PathLike] = ()) -> Recipe:
    """The recorded recipe with each input's path pointing at the file found for it."""
    recipe = recorded_recipe_of(merged)
    search = list(search)
    inputs = [replace(i, path=str(locate_input(i, search))) for i in recipe.inputs]
    return replace(recipe, inputs=inputs)
