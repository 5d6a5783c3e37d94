"""Merge planning, from the headers only: what the engine (engine.py) will do to every key.

Architectures, key sets, dtypes and shapes of every input are checked before a single tensor byte
is read (an SD1 + SDXL merge is refused in milliseconds, naming the first bad key, instead of trying
to allocate hundreds of gigabytes). Nothing here imports torch: a refused merge is refused before
the 2 s torch takes to import.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.checkpoint.describe import CONV_IN, FAMILY_OF, component_of, detect_architecture
from workbench.checkpoint.files import check_free_space, refuse_overwrite
from workbench.checkpoint.hashing import sha256_file
from workbench.checkpoint.reader import Checkpoint, open_checkpoint, with_current_key_names
from workbench.checkpoint.safetensors_io import TensorInfo
from workbench.errors import WorkbenchError
from workbench.merge.blocks import INPUT_BLOCKS, block_names, block_of, count_input_blocks, parse_blocks
from workbench.merge.recipe import DTYPES as OUT_DTYPES
from workbench.merge.recipe import Recipe, Step, lora_inputs

if TYPE_CHECKING:
    from workbench.lora.bake import LoraBinding

# Elements per chunk of an elementwise merge: 1 MiB of float32 per buffer, so the raw bytes, the
# two to four float32 buffers and the cast output of each of two workers stay in the CPU cache
# (1 MiB of L2 per core, 8 MiB of shared L3 here) from the read to the write. 4x larger chunks
# cost 20-40% more CPU time on an SD1.5 add-difference; 4x smaller ones pay Python per chunk.
CHUNK = 1 << 18
POSITION_IDS = "embeddings.position_ids"


@dataclass
class Source:
    """One opened input: its header is known, no tensor data has been read."""

    name: str
    path: Path
    ckpt: Checkpoint
    architecture: str
    layout: str
    variants: list[str]
    size: int
    sha256: str | None = None
    lora: LoraBinding | None = None  # a LoRA file (the second input of a `lora` step), bound to its base


@dataclass(frozen=True)
class StepCall:
    params: dict[str, float]
    partial: int | None = None  # merge only input channels [:partial] (an inpainting A with a normal B)


@dataclass
class KeyPlan:
    key: str
    out: TensorInfo
    component: str
    how: str  # "merge" | "copy" | "int" | "position_ids"
    source: str  # the input copied for everything but "merge" (the base, through pass-throughs)
    calls: tuple[StepCall | None, ...] = ()  # per recipe step; None: the step passes A through
    chunked: bool = False
    chunk: int = CHUNK  # elements per chunk when chunked (whole rows when a LoRA is baked into the key)


@dataclass
class MergePlan:
    recipe: Recipe
    sources: dict[str, Source]
    base: str  # the input whose keys the output has (A, followed through the first inputs)
    architecture: str
    layout: str
    variants: list[str]
    blocks: list[str]
    keys: list[KeyPlan]
    missing: dict[str, list[str]] = field(default_factory=dict)  # key -> inputs lacking it (A kept)
    dropped: dict[str, list[str]] = field(default_factory=dict)  # key -> inputs having it; not written
    partial: list[str] = field(default_factory=list)
    discarded: list[str] = field(default_factory=list)  # keys matching the recipe's discard pattern
    # Files the command read besides the inputs (the recipe, the merged file replayed): never output.
    reads: list[tuple[str, str]] = field(default_factory=list)

    @property
    def out_bytes(self) -> int:
        return sum(k.out.nbytes for k in self.keys)

    def count(self, how: str) -> int:
        return sum(1 for k in self.keys if k.how == how)

    def close(self) -> None:
        for src in self.sources.values():
            src.ckpt.close()

    def by_component(self) -> dict[str, dict[str, int]]:
        table: dict[str, dict[str, int]] = {}
        for k in self.keys:
            row = table.setdefault(k.component, {"merge": 0, "copy": 0, "int": 0, "position_ids": 0})
            row[k.how] += 1
        return table


@dataclass
class MergeResult:
    path: Path
    plan: MergePlan
    seconds: float
    bytes: int
    position_ids_reset: list[str]
    metadata: dict[str, str]


# ---------------------------------------------------------------------------------------------------
# planning (headers only)


def open_sources(recipe: Recipe) -> dict[str, Source]:
    sources = {}
    loras = lora_inputs(recipe)
    for inp in recipe.inputs:
        if inp.name in loras:
            sources[inp.name] = _open_lora_source(inp.name, inp.path)
            continue
        ckpt = with_current_key_names(open_checkpoint(inp.path))
        try:
            arch, layout, variants = detect_architecture(ckpt.infos, ckpt.metadata)
        except WorkbenchError as e:
            raise WorkbenchError(f"{inp.path}: {e}") from None
        size = ckpt.path.stat().st_size if ckpt.path.is_file() else ckpt.nbytes
        sources[inp.name] = Source(inp.name, ckpt.path, ckpt, arch, layout, variants, size)
    return sources


def _open_lora_source(name: str, path: str) -> Source:
    from workbench.checkpoint.lora_format import open_lora

    lora = open_lora(path)
    return Source(name, lora.path, lora.ckpt, "lora", "lora", [], lora.path.stat().st_size)


def _bind_loras(recipe: Recipe, sources: dict[str, Source]) -> None:
    """Match each LoRA to the keys of the model its step bakes it into (headers only)."""
    if not any(step.spec.name == "lora" for step in recipe.steps):
        return
    from workbench.checkpoint.lora_format import open_lora
    from workbench.lora.bake import bind_lora

    for step in recipe.steps:
        if step.spec.name != "lora":
            continue
        src = sources[step.inputs[1]]
        base = sources[_root_input(recipe, step.inputs[0])]
        binding = bind_lora(open_lora(src.path), base.ckpt.infos, str(base.path), base.layout)
        if src.lora is not None and src.lora.by_key.keys() != binding.by_key.keys():
            raise WorkbenchError(f"{src.path}: baked into two models with different keys in one recipe")
        src.lora = src.lora or binding


def plan_merge(
    recipe: Recipe,
    out_path: str | os.PathLike | None = None,
    with_hash: bool = True,
    reads: Iterable[tuple[str, str | os.PathLike]] = (),
) -> MergePlan:
    """Check everything that can be checked from the headers and decide what happens to every key.

    Raises WorkbenchError (one line, naming the file and the first bad key) for mismatched
    architectures or shapes, before any tensor data is read. `with_hash` adds the inputs' sha256
    (read once per file, then cached), needed for the output's provenance."""
    reads = [(role, str(path)) for role, path in reads]
    if out_path is not None:  # before opening anything: -o onto the recipe itself is refused first
        refuse_overwrite(Path(out_path), reads)
    sources = open_sources(recipe)
    if out_path is not None:
        _check_output_path(Path(out_path), sources, reads)
    base = _root_input(recipe, recipe.output)
    base_src = sources[base]
    if base_src.architecture == "lora":
        raise WorkbenchError(f"{base_src.path}: a LoRA cannot be the model a recipe's output is built on")
    for src in sources.values():
        if src is not base_src and src.architecture != "lora":
            _check_same_architecture(base_src, src)
    _bind_loras(recipe, sources)

    n_in = INPUT_BLOCKS.get(base_src.layout, 12)
    own_n_in = count_input_blocks(base_src.ckpt.infos)
    for step in recipe.steps:
        if step.blocks is not None:
            counts = [n_in] + ([own_n_in] if own_n_in > 0 else [])
            parse_blocks(step.blocks, counts, f"step {step.name!r} blocks")
    if any(s.blocks is not None and len(s.blocks) == 2 * own_n_in + 2 for s in recipe.steps):
        n_in = own_n_in  # a small model in a real layout, weighted per its own blocks
    names = block_names(n_in)

    plan = MergePlan(
        recipe, sources, base, base_src.architecture, base_src.layout, base_src.variants, names, []
    )
    out_dtype = OUT_DTYPES[recipe.dtype]
    planner = _KeyPlanner(plan, names, n_in, out_dtype)
    for key, a_info in base_src.ckpt.infos.items():
        plan.keys.append(planner.plan_key(key, a_info))
    if recipe.discard:
        pattern = re.compile(recipe.discard)
        plan.discarded = [k.key for k in plan.keys if pattern.search(k.key)]
        plan.keys = [k for k in plan.keys if not pattern.search(k.key)]
    out_keys = base_src.ckpt.infos
    for src in sources.values():
        if src.lora is not None:
            continue
        for key in src.ckpt.infos:
            if key not in out_keys:
                plan.dropped.setdefault(key, []).append(src.name)
    if out_path is not None:  # before hashing inputs: a 4 TB merge on a small disk is refused now
        check_free_space(Path(out_path), plan.out_bytes)
    if with_hash:
        for src in sources.values():
            if src.path.is_file():
                src.sha256 = sha256_file(src.path)
                _check_recorded_hash(recipe, src)
    plan.reads = reads
    return plan


def _check_recorded_hash(recipe: Recipe, src: Source) -> None:
    inp = recipe.input(src.name)
    if inp is not None and inp.sha256 and inp.sha256 != src.sha256:
        raise WorkbenchError(
            f"{src.path}: sha256 {src.sha256[:10]}..., but the recipe's input {src.name!r} "
            f"is {inp.sha256[:10]}..."
        )


def _check_output_path(out: Path, sources: dict[str, Source], reads: Iterable[tuple[str, str]] = ()) -> None:
    """The one identity check (device + inode after links, else the resolved path) of files.py,
    over every input and every other file the command read."""
    refuse_overwrite(out, [*((f"input {s.name!r}", s.path) for s in sources.values()), *reads])
    if not out.parent.is_dir():
        raise WorkbenchError(f"{out}: folder {out.parent} does not exist")


def _root_input(recipe: Recipe, node: str) -> str:
    """The input a node's keys come from: a step's value is shaped like its first input's."""
    return recipe.root_input(node)


def _check_same_architecture(a: Source, b: Source) -> None:
    if FAMILY_OF.get(a.layout, a.layout) == FAMILY_OF.get(b.layout, b.layout):
        return
    first = _first_mismatch(a.ckpt.infos, b.ckpt.infos)
    raise WorkbenchError(
        f"{b.path} is {b.layout}, {a.path} is {a.layout}: different architectures cannot be merged "
        f"(refused before reading any tensor; first mismatch: {first})"
    )


def _first_mismatch(a: dict[str, TensorInfo], b: dict[str, TensorInfo]) -> str:
    for key, info in a.items():
        other = b.get(key)
        if other is not None and other.shape != info.shape:
            return f"{key} is {list(other.shape)} vs {list(info.shape)}"
    missing = next((k for k in a if k not in b), None)
    return f"{missing} is missing" if missing else "no key in common"


class _KeyPlanner:
    """Decides what happens to each key. What a recipe does to a key depends on a few of its
    traits only: its component and block, which inputs hold it, whether each is float, whether
    their shapes agree (the shapes themselves when they do not), whether a LoRA binds it and
    whether its name contains "model" (A1111's key set). Keys sharing those traits share their
    step calls, so the walk over the recipe's steps runs once per distinct signature (a handful
    per model), not once per key: a 1,500-step recipe plans in milliseconds."""

    def __init__(self, plan: MergePlan, names: list[str], n_in: int, out_dtype: str):
        recipe = plan.recipe
        self.plan, self.names, self.n_in, self.out_dtype = plan, names, n_in, out_dtype
        self.any_blocks = any(s.blocks is not None for s in recipe.steps)
        self.a1111 = recipe.vae_from == "merge"
        self.node_names = list(plan.sources)
        self.infos = [src.ckpt.infos for src in plan.sources.values()]
        position = {name: i for i, name in enumerate(self.node_names)}
        # Every node holds, for a key, its root input's header info: steps are shaped like A.
        self.steps = []
        for step in recipe.steps:
            spec = step.spec
            binding = plan.sources[step.inputs[1]].lora if spec.name == "lora" else None
            refs = [(ref, position[recipe.root_input(ref)]) for ref in step.inputs[1:]]
            self.steps.append((step, spec, position[recipe.root_input(step.inputs[0])], refs, binding))
        self.bindings = [src.lora.by_key for src in plan.sources.values() if src.lora is not None]
        self.step_index = {s.name: i for i, s in enumerate(recipe.steps)}
        self.by_signature: dict[tuple, tuple] = {}

    def plan_key(self, key: str, a_info: TensorInfo) -> KeyPlan:
        plan = self.plan
        component = component_of(key, plan.layout)
        block = 0  # BASE
        if component == "unet" and self.any_blocks:
            name = block_of(key, self.n_in)
            if name not in self.names:
                raise WorkbenchError(
                    f"{key}: block {name} is not one of this model's {len(self.names)} block names"
                )
            block = self.names.index(name)
        if key.endswith(POSITION_IDS) and component.startswith("text_encoder"):
            # Never merged, whatever the inputs hold: written as int64 0..N-1 (reset if A's is broken).
            return KeyPlan(key, TensorInfo("I64", a_info.shape), component, "position_ids", plan.base)
        infos = [held.get(key) for held in self.infos]
        present = [info for info in infos if info is not None]
        same_shapes = all(info.shape == present[0].shape for info in present)
        signature = (
            component,
            block,
            "model" in key,
            key == CONV_IN,
            tuple(None if info is None else info.is_float for info in infos),
            None if same_shapes else tuple(None if info is None else info.shape for info in infos),
            tuple(key in by_key for by_key in self.bindings),
        )
        found = self.by_signature.get(signature)
        if found is None:  # the first key of its kind: raises here if any key of its kind would
            uniform = same_shapes and all(info.is_float for info in present)
            found = self.by_signature[signature] = self._walk(key, component, block, infos, uniform)
        calls, missing, partial, merged, source, chunked = found
        if missing:
            plan.missing[key] = list(missing)
        if partial:
            plan.partial.append(key)
        if not a_info.is_float:
            return KeyPlan(key, a_info, component, "int", plan.base)
        out = TensorInfo(self.out_dtype, a_info.shape)
        if not merged:
            if self.a1111:  # A1111 casts only the merged tensors; copies keep their dtype
                out = TensorInfo(plan.sources[source].ckpt.infos[key].dtype, a_info.shape)
            return KeyPlan(key, out, component, "copy", source)
        chunked, bakes = chunked
        chunk = CHUNK
        if chunked and bakes:
            chunked = all(binding.rows_chunkable(key) for binding in bakes)
            width = a_info.numel // a_info.shape[0]  # a LoRA changes whole rows: chunks of whole rows
            chunk = max(1, CHUNK // width) * width
        return KeyPlan(key, out, component, "merge", source, calls, chunked, chunk)

    def _walk(
        self, key: str, component: str, block: int, infos: list[TensorInfo | None], uniform: bool
    ) -> tuple:
        """The step calls of `key` (and of every key with its signature): per step a StepCall, or
        None where the step passes its first input through. `uniform`: every input holding the key
        holds a float tensor of one shape (the usual case: no shape to check)."""
        plan, recipe = self.plan, self.plan.recipe
        calls: list[StepCall | None] = []
        missing: list[str] = []
        partial_any = False
        all_present = all(info is not None for info in infos)
        for step, _spec, first, refs, binding in self.steps:
            a = infos[first]
            if a is None:
                calls.append(None)
                continue
            weight = step.weight(component, block, key, self.a1111)
            if weight is None or not a.is_float:
                calls.append(None)
                continue
            if binding is not None:
                calls.append(
                    _step_call(step, weight, None) if key in binding.by_key and weight != 0 else None
                )
                continue
            lacking = () if all_present else [self.node_names[i] for _, i in refs if infos[i] is None]
            if lacking:
                missing.extend(n for n in lacking if n not in missing)
                calls.append(None)
                continue
            partial = None
            if not uniform:
                others = [(ref, infos[i]) for ref, i in refs]
                partial = _check_shapes(key, step, a, others, recipe, plan.sources)
            partial_any = partial_any or partial is not None
            calls.append(_step_call(step, weight, partial))

        # Follow the output back through pass-throughs: a file reached that way is copied, not merged.
        node, merged = recipe.output, False
        while node in self.step_index:
            if calls[self.step_index[node]] is not None:
                merged = True
                break
            node = recipe.steps[self.step_index[node]].inputs[0]
        source = node if not merged else plan.base
        # chunked: elementwise steps, and LoRA steps if the key's modules allow blocks of rows
        chunked = all(
            c is None or (spec.elementwise and c.partial is None) or binding is not None
            for c, (_, spec, _, _, binding) in zip(calls, self.steps, strict=True)
        )
        bakes = tuple(
            binding for c, (*_, binding) in zip(calls, self.steps, strict=True) if c is not None and binding
        )
        return tuple(calls), tuple(missing), partial_any, merged, source, (chunked, bakes)


def _step_call(step: Step, weight: float, partial: int | None) -> StepCall:
    """One shared StepCall per (step, weight, partial): a recipe of many steps asks for it for every
    key, and the call is immutable."""
    memo = step.__dict__.setdefault("_calls", {})
    found = memo.get((weight, partial))
    if found is None:
        found = memo[(weight, partial)] = StepCall(step.key_params(weight), partial)
    return found


def _check_shapes(key, step: Step, a: TensorInfo, others, recipe: Recipe, sources) -> int | None:
    """None when every input matches A's shape; the channel count to merge for an inpainting or
    instruct-pix2pix A (8 or 9 input channels) with a normal 4-channel model, as A1111 does."""
    if all(info.is_float and info.shape == a.shape for _, info in others):
        return None  # the usual case, asked for every key of every step: no lookups
    partial = None
    a_path = sources[_root_input(recipe, step.inputs[0])].path
    for ref, info in others:
        b_path = sources[_root_input(recipe, ref)].path
        if not info.is_float:
            raise WorkbenchError(
                f"{key}: {info.dtype} in {b_path} but {a.dtype} in {a_path}; integer tensors are never merged"
            )
        if info.shape == a.shape:
            continue
        same_but_channels = (
            key == CONV_IN
            and len(info.shape) == 4 == len(a.shape)
            and info.shape[0] == a.shape[0]
            and info.shape[2:] == a.shape[2:]
        )
        if same_but_channels and info.shape[1] < a.shape[1] and partial in (None, info.shape[1]):
            partial = info.shape[1]
            continue
        if same_but_channels and info.shape[1] > a.shape[1]:
            raise WorkbenchError(
                f"{key}: {b_path} has {info.shape[1]} input channels, {a_path} has {a.shape[1]}: "
                "the inpainting (or instruct-pix2pix) model must be A"
            )
        raise WorkbenchError(
            f"{key}: shape {list(info.shape)} in {b_path} does not match {list(a.shape)} in {a_path}"
        )
    return partial


