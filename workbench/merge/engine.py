"""The merge engine: plan a recipe from the headers, then stream the output key by key.

Planning reads headers only: architectures, key sets, dtypes and shapes of every input are checked
before a single tensor byte is read (an SD1 + SDXL merge is refused in milliseconds, naming the
first bad key, instead of trying to allocate hundreds of gigabytes). Execution walks the output's
keys once; for each key it pulls the inputs' tensors lazily (memory-mapped), evaluates the recipe's
graph for that key in float32, casts to the output dtype and hands the tensor to the streaming
writer, which puts it at its final offset in a temporary file that becomes the output only when
complete.

Memory stays bounded and independent of the model's size and of the number of inputs: elementwise
methods run on cache-sized chunks through float32 buffers that each worker thread allocates once
and reuses (fresh allocations cost page faults on every tensor); only one output tensor per worker
is ever held. Keys are spread over a small thread pool; each key is computed by one thread with
torch's own threading off, so the result never depends on scheduling: replays are bit-identical.
"""

from __future__ import annotations

import gc
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from workbench.checkpoint.describe import CONV_IN, FAMILY_OF, component_of, detect_architecture
from workbench.checkpoint.files import check_free_space, refuse_overwrite
from workbench.checkpoint.hashing import sha256_file
from workbench.checkpoint.reader import Checkpoint, open_checkpoint, with_current_key_names
from workbench.checkpoint.safetensors_io import SafetensorsWriter, TensorInfo, read_header
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
# Input bytes the kernel is asked to read ahead of the keys being merged (see _Prefetch).
PREFETCH = 64 << 20
# Output bytes between two requests to the kernel to start writing them to the disk (the writer's
# start_writeback): the disk writes while the CPU computes, and the final fsync waits for little.
WRITEBACK = 64 << 20
POSITION_IDS = "embeddings.position_ids"

Progress = Callable[[int, int], None]


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


# ---------------------------------------------------------------------------------------------------
# execution


class _Cancelled(Exception):
    pass


@dataclass
class _Scratch:
    """One worker's reusable buffers: float32 slots for the values of the graph (cache-sized in
    chunked mode), a staging buffer for raw input bytes and one for output bytes. Allocated once
    and reused: a fresh allocation costs a page fault per 4 KiB on every tensor."""

    slots: list[torch.Tensor] = field(default_factory=list)
    free: list[int] = field(default_factory=list)  # indices of the slots no live value holds
    slot_of: dict[int, int] = field(default_factory=dict)  # a slot's data pointer -> its index
    staging: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))
    outgoing: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))
    spare: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.uint8))
    per_key: dict = field(default_factory=dict)  # what a key's chunks share (LoRA factors), per node

    def stage(self, nbytes: int) -> torch.Tensor:
        if self.staging.numel() < nbytes:
            self.staging = torch.empty(nbytes, dtype=torch.uint8)
        return self.staging[:nbytes]

    def out(self, info: TensorInfo, n: int) -> torch.Tensor:
        """A reused flat buffer of `n` elements of the output dtype `info.dtype`."""
        nbytes = n * info.torch_dtype.itemsize
        if self.outgoing.numel() < nbytes:
            self.outgoing = torch.empty(nbytes, dtype=torch.uint8)
        return self.outgoing[:nbytes].view(info.torch_dtype)

    def spare_of(self, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A reused flat buffer of `n` elements of `dtype` (the LoRA bake's before-cast copy)."""
        nbytes = n * dtype.itemsize
        if self.spare.numel() < nbytes:
            self.spare = torch.empty(nbytes, dtype=torch.uint8)
        return self.spare[:nbytes].view(dtype)

    def take(self, n: int) -> torch.Tensor:
        """A float32 buffer of `n` elements from a free slot (grown if none is large enough)."""
        fits = [i for i in self.free if self.slots[i].numel() >= n]
        if fits:
            i = fits[0]
            self.free.remove(i)
        elif self.free:
            i = self.free.pop()
            del self.slot_of[self.slots[i].data_ptr()]
            self.slots[i] = torch.empty(n, dtype=torch.float32)
            self.slot_of[self.slots[i].data_ptr()] = i
        else:
            i = len(self.slots)
            self.slots.append(torch.empty(max(n, 1), dtype=torch.float32))
            self.slot_of[self.slots[i].data_ptr()] = i
        return self.slots[i][:n]

    def release(self, t: torch.Tensor) -> None:
        """Give back the slot of a buffer `take` returned (anything else is ignored)."""
        i = self.slot_of.get(t.data_ptr())
        if i is not None and i not in self.free:
            self.free.append(i)

    def reset(self) -> None:
        """Every slot free again: the values of the last chunk are no longer needed."""
        self.free = list(range(len(self.slots)))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)


class _ChunkReader:
    """Reads element ranges of one input's tensors into float32 buffers.

    A safetensors input is read with preadv through a small reused staging buffer: the same bytes
    the memory map would give, without a page fault per few pages of mapping (on a VM those cost
    more than the copy), and in cache-sized pieces, so the float32 conversion reads bytes the
    kernel has just put in the CPU cache. Other formats go through the checkpoint's lazy mapping."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.fd: int | None = None
        self.offsets: dict[str, tuple[int, int]] = {}
        if ckpt.format == "safetensors" and ckpt.path.is_file():
            stored = read_header(ckpt.path).offsets
            self.offsets = {key: stored[ckpt.stored_name(key)] for key in ckpt.infos}
            self.fd = os.open(ckpt.path, os.O_RDONLY)

    def read(self, key: str, lo: int, hi: int, out: torch.Tensor, scratch: _Scratch) -> None:
        """Elements [lo, hi) of `key`, converted into `out` (float32, hi - lo elements)."""
        info = self.ckpt.infos[key]
        if self.fd is None:
            out.copy_(_flat(self.ckpt[key])[lo:hi])
            return
        if info.dtype == "F32":  # straight into the float32 buffer
            self._pread(_flat(out).view(torch.uint8), self.offsets[key][0] + lo * 4)
            return
        out.copy_(self.raw(key, lo, hi, scratch))

    def read_all(self, key: str, out: torch.Tensor, scratch: _Scratch) -> None:
        """The whole tensor into `out` (float32, its shape), one cache-sized piece at a time."""
        flat = _flat(out)
        n = flat.numel()
        for lo in range(0, n, CHUNK):
            hi = min(n, lo + CHUNK)
            self.read(key, lo, hi, flat[lo:hi], scratch)

    def raw(self, key: str, lo: int, hi: int, scratch: _Scratch) -> torch.Tensor:
        """Elements [lo, hi) of `key` in its stored dtype, in the worker's staging buffer."""
        info = self.ckpt.infos[key]
        size = info.torch_dtype.itemsize
        raw = scratch.stage((hi - lo) * size)
        self._pread(raw, self.offsets[key][0] + lo * size)
        return raw.view(info.torch_dtype)

    def _pread(self, dst: torch.Tensor, offset: int) -> None:
        view = memoryview(dst.numpy()).cast("B")
        while len(view):
            n = os.preadv(self.fd, [view], offset)
            if n <= 0:
                raise WorkbenchError(f"{self.ckpt.path}: file shrank while merging (read at {offset})")
            view, offset = view[n:], offset + n

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _KeyEvaluator:
    """Evaluates the recipe graph for one key over one range of its elements."""

    def __init__(self, plan: MergePlan, step_index: dict[str, int]):
        self.plan = plan
        self.recipe = plan.recipe
        self.step_index = step_index
        self.srcs = {name: s.ckpt for name, s in plan.sources.items()}
        self.readers = {name: _ChunkReader(s.ckpt) for name, s in plan.sources.items()}
        self.schedules: dict[int, tuple[tuple, _Schedule]] = {}

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()

    def schedule(self, calls: tuple[StepCall | None, ...]) -> _Schedule:
        """What evaluating a key with these step calls takes (keys of one signature share their
        calls tuple, so this runs a handful of times per merge)."""
        found = self.schedules.get(id(calls))
        if found is not None and found[0] is calls:
            return found[1]
        steps, index = self.recipe.steps, self.step_index

        def resolve(node: str) -> str:  # through the steps that pass their first input on
            while node in index and calls[index[node]] is None:
                node = steps[index[node]].inputs[0]
            return node

        output = resolve(self.recipe.output)
        needed, order = {output}, []
        for i in range(len(steps) - 1, -1, -1):  # steps come in dependency order: walk back once
            if steps[i].name in needed and calls[i] is not None:
                refs = [resolve(ref) for ref in steps[i].inputs]
                needed.update(refs)
                order.append((i, refs))
        order.reverse()
        uses = {output: 1}
        for _, refs in order:
            for ref in refs:
                uses[ref] = uses.get(ref, 0) + 1
        sched = _Schedule(output, order, uses)
        self.schedules[id(calls)] = (calls, sched)
        return sched

    def evaluate(self, kp: KeyPlan, scratch: _Scratch, lo: int, hi: int | None) -> torch.Tensor:
        """Chunk [lo, hi) of the output's value, flat (hi given), or the whole tensor shaped (hi
        None). Steps run in order, without recursion (a 1,500-step chain is 1,500 steps, not 1,500
        nested calls); a step's value lives until its last use and its buffer then goes back to
        the pool, so memory follows the recipe's width, not its length. Methods change their
        inputs in place: an input file is read afresh for each use, and a step's value is handed
        over at its last use and copied for the others."""
        sched = self.schedule(kp.calls)
        values: dict[str, torch.Tensor] = {}
        left = dict(sched.uses)

        def fetch(node: str) -> torch.Tensor:
            if node not in self.step_index:
                return self.read(node, kp, scratch, lo, hi)
            t = values[node]
            left[node] -= 1
            if left[node] == 0:
                del values[node]
                return t
            copy = scratch.take(t.numel()).view(t.shape)
            return copy.copy_(t)

        for i, refs in sched.order:
            step, call = self.recipe.steps[i], kp.calls[i]
            if step.spec.name == "lora":
                values[step.name] = self.bake(step, call, refs[0], fetch, kp, scratch, lo, hi)
                continue
            args = [fetch(ref) for ref in refs]
            if call.partial is None:
                result = step.spec.call(args, call.params, kp.key)
            else:  # an inpainting A: only its first `partial` input channels are merged
                c, full = call.partial, args[0]
                head = scratch.take(full[:, :c].numel()).view(full[:, :c].shape)
                head.copy_(full[:, :c])
                full[:, :c] = step.spec.call([head, *args[1:]], call.params, kp.key)
                scratch.release(head)
                result = full
            for t in args:
                if t.data_ptr() != result.data_ptr():
                    scratch.release(t)
            values[step.name] = result
        return fetch(sched.output)

    def read(self, node: str, kp: KeyPlan, scratch: _Scratch, lo: int, hi: int | None) -> torch.Tensor:
        """An input's chunk [lo, hi) (flat) or whole tensor (shaped, hi None), in a fresh buffer."""
        if hi is None:
            info = self.srcs[node].infos[kp.key]
            buf = scratch.take(info.numel).view(info.shape)
            self.readers[node].read_all(kp.key, buf, scratch)
            return buf
        buf = scratch.take(hi - lo)
        self.readers[node].read(kp.key, lo, hi, buf, scratch)
        return buf

    def bake(self, step: Step, call: StepCall, ref: str, fetch, kp: KeyPlan, scratch, lo, hi) -> torch.Tensor:
        """A `lora` step: its first input changed in place; whole rows of plain LoRAs in a chunk,
        anything else on the whole tensor."""
        a = fetch(ref)
        binding = self.plan.sources[step.inputs[1]].lora
        if hi is None:
            binding.apply(kp.key, a, call.params["strength"], OUT_DTYPES[self.recipe.dtype])
            return a
        factors = scratch.per_key.get(step.name)
        if factors is None:
            factors = scratch.per_key[step.name] = binding.row_factors(kp.key)
        # counting the changes a cast to fp16/bf16 loses needs the values before, cast alike
        low = kp.out.torch_dtype if kp.out.dtype in ("F16", "BF16") else None
        before = scratch.spare_of(a.numel(), low) if low is not None else None
        binding.apply_rows(a, lo, factors, call.params["strength"], before)
        return a


@dataclass(frozen=True)
class _Schedule:
    """The steps a key's value needs, in order, with their inputs (pass-through steps skipped)."""

    output: str  # the node holding the output's value
    order: list[tuple[int, list[str]]]  # (step index, the nodes its inputs resolve to)
    uses: dict[str, int]  # node -> how many times it is used (the output counts once)


class _Prefetch:
    """Asks the kernel to read the input bytes of the next keys (posix_fadvise WILLNEED) about
    PREFETCH bytes ahead of the workers. Two workers reading alternate keys of one file look like
    random reads to the kernel's readahead, which then reads small pieces: with a cold page cache
    that made a merge twice as slow as reading the files straight through. With a warm cache the
    advice finds every page present and costs microseconds."""

    def __init__(self, plan: MergePlan, ev: _KeyEvaluator):
        self.ranges: list[list[tuple[int, int, int]]] = []
        self.ends: list[int] = []  # input bytes of keys [0, i]
        total = 0
        for kp in plan.keys:
            names = [kp.source] if kp.how != "merge" else list(ev.readers)
            rows = []
            for name in names:
                reader = ev.readers[name]
                span = reader.offsets.get(kp.key) if reader.fd is not None else None
                if span is not None and plan.sources[name].lora is None:
                    rows.append((reader.fd, span[0], span[1] - span[0]))
                    total += span[1] - span[0]
            self.ranges.append(rows)
            self.ends.append(total)
        self.issued = 0  # keys [0, issued) have been advised
        self.lock = threading.Lock()

    def advance(self, taken: int) -> None:
        """Key `taken` is being read now: advise the keys up to PREFETCH bytes past its end."""
        with self.lock:
            start = self.issued
            stop = start
            limit = self.ends[taken] + PREFETCH
            while stop < len(self.ranges) and (stop <= taken or self.ends[stop] <= limit):
                stop += 1
            self.issued = stop
        for rows in self.ranges[start:stop]:
            for fd, offset, nbytes in rows:
                try:
                    os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
                except OSError:
                    return  # advice only; the reads themselves still work


def _emit(
    kp: KeyPlan,
    ev: _KeyEvaluator,
    scratch: _Scratch,
    writer: SafetensorsWriter,
    cancel: threading.Event,
    reset: list[str],
) -> None:
    """Compute one output key and write it: each cache-sized chunk is cast to the output dtype and
    written the moment it exists, while it is still in the CPU cache; no tensor is assembled."""
    n = kp.out.numel
    if n == 0:
        writer.write(kp.key, torch.empty(kp.out.shape, dtype=kp.out.torch_dtype))
        return
    if kp.how == "merge":
        if kp.chunked:
            scratch.per_key.clear()
            for lo in range(0, n, kp.chunk):
                if cancel.is_set():
                    raise _Cancelled
                hi = min(n, lo + kp.chunk)
                scratch.reset()
                value = ev.evaluate(kp, scratch, lo, hi)
                _write_cast(writer, kp, lo, value, scratch)
        else:
            scratch.reset()
            value = _flat(ev.evaluate(kp, scratch, 0, None))
            for lo in range(0, n, CHUNK):
                _write_cast(writer, kp, lo, value[lo : min(n, lo + CHUNK)], scratch)
        return
    reader = ev.readers[kp.source]
    if kp.how == "position_ids":
        if reader.fd is not None:
            src = reader.raw(kp.key, 0, n, scratch)
        else:
            src = _flat(ev.srcs[kp.source][kp.key])
        want = torch.arange(n, dtype=torch.int64)
        if src.dtype != torch.int64 or not torch.equal(src, want):
            reset.append(kp.key)  # a float or shuffled position_ids breaks the text encoder
            src = want
        writer.write(kp.key, src.view(kp.out.shape))
        return
    info = ev.srcs[kp.source].infos[kp.key]
    if reader.fd is None:  # a pickle or a diffusers folder: through the mapping
        src = ev.srcs[kp.source][kp.key]
        if src.dtype == kp.out.torch_dtype:
            writer.write(kp.key, src)
            return
        flat = _flat(src)
        for lo in range(0, n, CHUNK):
            _write_cast(writer, kp, lo, flat[lo : min(n, lo + CHUNK)], scratch)
        return
    if info.dtype == kp.out.dtype:  # copied unchanged: file to file in the kernel
        writer.copy_from(kp.key, reader.fd, reader.offsets[kp.key][0], info)
        return
    for lo in range(0, n, CHUNK):  # copied with a cast: the stored dtype straight to the output's
        if cancel.is_set():
            raise _Cancelled
        hi = min(n, lo + CHUNK)
        _write_cast(writer, kp, lo, reader.raw(kp.key, lo, hi, scratch), scratch)


def _write_cast(
    writer: SafetensorsWriter, kp: KeyPlan, lo: int, value: torch.Tensor, scratch: _Scratch
) -> None:
    """Cast a flat chunk to the output dtype (in a reused buffer, unless it has it) and write it."""
    if value.dtype == kp.out.torch_dtype:
        writer.write_part(kp.key, lo, value)
        return
    out = scratch.out(kp.out, value.numel())
    out.copy_(value)
    writer.write_part(kp.key, lo, out)


def execute(
    plan: MergePlan,
    out_path: str | os.PathLike,
    threads: int = 2,
    progress: Progress | None = None,
    command: str | None = None,
) -> MergeResult:
    """Write the planned merge to `out_path` (atomically: nothing is left behind on any error).

    With `threads` >= 2, that many workers each take the next key, read it, compute it and write
    it chunk by chunk (reading, computing and writing overlap across workers, and every core does
    all three); the calling thread reports progress. With 1, everything happens on the calling
    thread. The output is the same byte for byte."""
    from workbench.merge.provenance import merge_metadata

    if threads < 1:
        raise WorkbenchError(f"--threads must be at least 1, got {threads}")
    out = Path(out_path)
    _check_output_path(out, plan.sources, plan.reads)
    metadata = merge_metadata(plan, out, command)
    started = time.perf_counter()
    ev = _KeyEvaluator(plan, {s.name: i for i, s in enumerate(plan.recipe.steps)})
    reset: list[str] = []
    for name, ckpt in ev.srcs.items():  # map every lazily read input once, before workers share them
        first = next(iter(ckpt.infos), None)
        if first is not None and ev.readers[name].fd is None:
            ckpt[first]
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # parallelism comes from the workers; nested pools only contend
    gc_was_on = gc.isenabled()
    gc.disable()  # nothing here makes cycles; full collections only rescan torch's object graph
    try:
        with SafetensorsWriter(
            out, {k.key: k.out for k in plan.keys}, metadata, inputs=[s.path for s in plan.sources.values()]
        ) as writer:
            if threads == 1:
                _sequential(plan, ev, writer, progress, reset)
            else:
                _pipeline(plan, ev, writer, threads, progress, reset)
    finally:
        if gc_was_on:
            gc.enable()
        torch.set_num_threads(torch_threads)
        ev.close()
    return MergeResult(out, plan, time.perf_counter() - started, out.stat().st_size, reset, metadata)


_DONE = object()


def _sequential(
    plan: MergePlan, ev: _KeyEvaluator, writer: SafetensorsWriter, progress: Progress | None, reset: list[str]
) -> None:
    scratch, never, prefetch = _Scratch(), threading.Event(), _Prefetch(plan, ev)
    done = flushed = 0
    for i, kp in enumerate(plan.keys):
        prefetch.advance(i)
        _emit(kp, ev, scratch, writer, never, reset)
        done += kp.out.nbytes
        if done - flushed >= WRITEBACK:
            writer.start_writeback()
            flushed = done
        if progress is not None:
            progress(done, plan.out_bytes)


def _pipeline(
    plan: MergePlan,
    ev: _KeyEvaluator,
    writer: SafetensorsWriter,
    workers: int,
    progress: Progress | None,
    reset: list[str],
) -> None:
    """Workers take keys in order, and compute and write each one (pwrite at its planned offset:
    any order, any thread); this thread reports progress. On any error, Ctrl-C included, every
    worker is stopped before returning, so the writer never closes its file under a thread using it."""
    cancel = threading.Event()
    finished: queue.Queue = queue.Queue()
    keys = iter(enumerate(plan.keys))
    keys_lock = threading.Lock()
    prefetch = _Prefetch(plan, ev)

    def next_key() -> KeyPlan | None:
        with keys_lock:
            i, kp = next(keys, (-1, None))
        if kp is not None:
            prefetch.advance(i)
        return kp

    def work() -> None:
        scratch = _Scratch()
        try:
            while not cancel.is_set() and (kp := next_key()) is not None:
                _emit(kp, ev, scratch, writer, cancel, reset)
                finished.put(kp)
        except _Cancelled:
            pass
        except BaseException as e:  # handed to the calling thread, which raises it
            finished.put(e)
        finally:
            finished.put(_DONE)

    pool = [threading.Thread(target=work, name=f"wb-merge-{i}", daemon=True) for i in range(workers)]
    total, done, flushed, running = plan.out_bytes, 0, 0, workers
    try:
        for t in pool:
            t.start()
        while running:
            item = finished.get()
            if item is _DONE:
                running -= 1
                continue
            if isinstance(item, BaseException):
                raise item
            done += item.out.nbytes
            if done - flushed >= WRITEBACK:
                writer.start_writeback()  # this thread only waits for workers: it may wait on the disk
                flushed = done
            if progress is not None:
                progress(done, total)
    finally:
        cancel.set()
        for t in pool:
            t.join()


def merge(
    recipe: Recipe,
    out_path: str | os.PathLike,
    threads: int = 2,
    progress: Progress | None = None,
    command: str | None = None,
) -> MergeResult:
    """Plan and execute a recipe: the library entry point behind every `wb merge` command."""
    plan = plan_merge(recipe, out_path)
    try:
        return execute(plan, out_path, threads, progress, command)
    finally:
        plan.close()
