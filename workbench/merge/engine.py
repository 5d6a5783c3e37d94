"""The merge engine: stream a planned merge (plan.py: from the headers) out key by key.

Execution walks the output's
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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workbench.checkpoint.reader import Checkpoint
from workbench.checkpoint.safetensors_io import SafetensorsWriter, TensorInfo, read_header
from workbench.errors import WorkbenchError
from workbench.merge.plan import (  # noqa: F401  (MergePlan, MergeResult, plan_merge: re-exported)
    CHUNK,
    OUT_DTYPES,
    KeyPlan,
    MergePlan,
    MergeResult,
    StepCall,
    _check_output_path,
    plan_merge,
)
from workbench.merge.recipe import Recipe, Step

# Input bytes the kernel is asked to read ahead of the keys being merged (see _Prefetch).
PREFETCH = 64 << 20
# Output bytes between two requests to the kernel to start writing them to the disk (the writer's
# start_writeback): the disk writes while the CPU computes, and the final fsync waits for little.
WRITEBACK = 64 << 20

Progress = Callable[[int, int], None]


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
