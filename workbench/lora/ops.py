"""`wb lora bake`: a merge recipe with one `lora` step per LoRA, run by the merge engine.

So a bake is a merge: planned from the headers (refusals before any data is read), streamed key by
key at constant memory through the same writer, float32 math, the output dtype chosen as in `wb merge`,
and the recipe (with each LoRA's sha256 and strength) recorded in the file for `wb merge replay`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from workbench.errors import WorkbenchError
from workbench.merge.recipe import Input, Recipe, Step, validate


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to bake: its file and strengths (te/unet None: the strength)."""

    path: str
    strength: float = 1.0
    te: float | None = None
    unet: float | None = None


def parse_lora_spec(text: str) -> LoraSpec:
    """`PATH`, `PATH:S` or `PATH:TE:UNET` (A1111's <lora:name:te:unet> order). A path holding a colon
    is taken whole when no number follows it."""
    parts = text.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 2:
        try:
            numbers.insert(0, float(parts[-1]))
        except ValueError:
            break
        parts.pop()
    path = ":".join(parts)
    if not path:
        raise WorkbenchError(f"{text!r}: expected LORA[:STRENGTH] or LORA:TE:UNET")
    if len(numbers) == 2:
        return LoraSpec(path, numbers[0], numbers[0], numbers[1])
    return LoraSpec(path, numbers[0] if numbers else 1.0)


def _input_name(path: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path).stem) or "lora"
    if not re.match(r"[A-Za-z0-9_]", stem):
        stem = "l" + stem
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    return name


def bake_recipe(
    base: str | os.PathLike,
    loras: Sequence[LoraSpec],
    te_scale: float = 1.0,
    unet_scale: float = 1.0,
    dtype: str = "fp16",
) -> Recipe:
    """base -> bake LoRA 1 -> bake LoRA 2 -> ...: one `lora` step per LoRA, chained. A LoRA's TE and
    UNet strengths are its own (PATH:TE:UNET) or its strength, times `te_scale` / `unet_scale`."""
    if not loras:
        raise WorkbenchError("no LoRA to bake: give at least one LORA[:STRENGTH]")
    inputs = [Input("base", str(base))]
    taken = {"base"}
    steps: list[Step] = []
    prev = "base"
    for i, spec in enumerate(loras, 1):
        name = _input_name(spec.path, taken)
        taken.add(name)
        inputs.append(Input(name, str(spec.path)))
        te = (spec.te if spec.te is not None else spec.strength) * te_scale
        unet = (spec.unet if spec.unet is not None else spec.strength) * unet_scale
        components = {}
        if te != spec.strength:
            components["text_encoder"] = te
        if unet != spec.strength:
            components["unet"] = unet
        step_name = f"bake{i}"
        taken.add(step_name)
        steps.append(Step(step_name, "lora", [prev, name], {"strength": spec.strength}, components))
        prev = step_name
    return validate(Recipe(inputs, steps, prev, dtype), "wb lora bake")


@dataclass
class BakeResult:
    path: Path
    seconds: float
    bytes: int
    keys_changed: int
    modules: dict[str, int]  # LoRA input name -> modules baked
    lost: dict[str, tuple[int, int]]  # LoRA input name -> (entries lost to the cast, entries changed)


def bake(
    base: str | os.PathLike,
    loras: Sequence[LoraSpec],
    out_path: str | os.PathLike,
    te_scale: float = 1.0,
    unet_scale: float = 1.0,
    dtype: str = "fp16",
    threads: int = 3,
    progress: Callable[[int, int], None] | None = None,
    command: str | None = None,
) -> BakeResult:
    """Bake LoRAs into a checkpoint through the merge engine (see the module docstring)."""
    from workbench.merge.plan import plan_merge

    recipe = bake_recipe(base, loras, te_scale, unet_scale, dtype)
    plan = plan_merge(recipe, out_path)  # from the headers: a LoRA that does not fit is refused here
    try:
        from workbench.merge.engine import execute

        result = execute(plan, out_path, threads, progress, command)
    finally:
        plan.close()
    modules, lost = {}, {}
    for src in plan.sources.values():
        if src.lora is not None:
            modules[src.name] = src.lora.modules
            lost[src.name] = (src.lora.lost, src.lora.touched)
    return BakeResult(result.path, result.seconds, result.bytes, plan.count("merge"), modules, lost)
