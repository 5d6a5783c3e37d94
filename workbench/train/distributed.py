"""Training on several processes (GPUs, or CPU processes with the gloo backend), through accelerate.

The distributed engine is accelerate's (torch.distributed underneath: DDP averages the gradients,
`accelerator.reduce` the losses); this module only decides what each process sees, so that N
processes with batch B train exactly like one process with batch N x B:

- **the data**: every step takes one GLOBAL batch of N x B examples (from the same sampler a
  1-process run with batch N x B uses: the square case's shuffled order, or one aspect bucket's
  batch), and process p takes its contiguous shard of it. A short last batch is split as evenly as
  it goes; a process whose shard is empty trains on a stand-in example with weight 0 (DDP needs
  every process in every backward). Nothing is dropped or repeated.
- **the loss**: each process sums its examples' losses and scales by N / (global batch size), so
  DDP's average over processes is the mean over the global batch, whatever the shard sizes.
- **the random numbers**: every process has the same generator and draws the noise, timesteps and
  latent samples of the WHOLE global batch, keeping its own rows: example i gets the same numbers
  on whichever process it lands, and as in the 1-process run.

`launch(fn, args, processes)` starts the processes (torch.multiprocessing with accelerate's
`PrepareForLaunch`, the machinery of accelerate's notebook and debug launchers): `wb train
--processes N` forks CPU processes and spawns GPU ones (fresh interpreters, as CUDA needs).
`accelerate launch --multi_gpu --num_processes N -m workbench.cli train ...` and `torchrun` work
as well (see docs/train.md).
"""

from __future__ import annotations

import math
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from workbench.errors import WorkbenchError

# --- what each process sees ---------------------------------------------------------------------


def shard_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of process `rank`'s contiguous shard of a global batch of `size` examples:
    ceil(size / world) each, the last ones shorter (or empty) when the batch is short."""
    per = math.ceil(size / world)
    start = min(size, rank * per)
    return start, min(size, start + per)


@dataclass(frozen=True)
class Row:
    """What the sharded loader hands the dataset: an example, where it sits in the global batch,
    and its weight in the loss (0 for the stand-in of an empty shard)."""

    index: int
    offset: int  # the first row of this process's shard within the global batch
    global_size: int
    weight: float


class ShardedBatches(torch.utils.data.Sampler):
    """Process `rank`'s shards of the global batches `batches` yields (lists of dataset indices).

    `batches` is the sampler a 1-process run with batch N x B would use; its set_epoch/resume_at go
    through. `resume_at(epoch, n)` skips the first n global batches (each process consumed one
    shard of each)."""

    def __init__(self, batches, rank: int, world: int, skip_unit: int = 1):
        self.batches, self.rank, self.world = batches, rank, world
        self.skip_unit = skip_unit  # what the inner sampler's resume_at counts per global batch

    def set_epoch(self, epoch: int) -> None:
        inner = getattr(self.batches, "sampler", self.batches)  # a BatchSampler's sampler
        inner.set_epoch(epoch)

    def resume_at(self, epoch: int, global_batches: int) -> None:
        inner = getattr(self.batches, "sampler", self.batches)
        inner.resume_at(epoch, global_batches * self.skip_unit)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            start, stop = shard_bounds(len(batch), self.rank, self.world)
            if start < stop:
                yield [Row(i, start, len(batch), 1.0) for i in batch[start:stop]]
            else:  # an empty shard: one stand-in row that counts for nothing
                yield [Row(batch[0], 0, len(batch), 0.0)]


class ShardView(torch.utils.data.Dataset):
    """The training set read through Rows: each item also carries its shard's place and weight."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: Row) -> dict:
        return {**self.dataset[row.index], "row": row}


def shard_collate(collate: Callable[[list[dict]], dict]) -> Callable[[list[dict]], dict]:
    def collate_rows(items: list[dict]) -> dict:
        rows = [item.pop("row") for item in items]
        batch = collate(items)
        batch["shard"] = (rows[0].offset, rows[0].global_size)
        batch["weights"] = torch.tensor([r.weight for r in rows])
        return batch

    return collate_rows


def sharded_loader(train_set, recipe, accelerator, collate):
    """(loader, sampler) for process accelerator.process_index of num_processes: its shards of the
    global batches (see the module docstring), wrapped by accelerate (without further sharding) so
    that gradient accumulation still sees the end of every epoch."""
    from accelerate.data_loader import prepare_data_loader

    from workbench.train.buckets import BucketBatchSampler
    from workbench.train.data import EpochSampler

    world, batch = accelerator.num_processes, recipe.training.batch_size
    if recipe.data.aspect_buckets:
        batches, unit = BucketBatchSampler(train_set.sizes, batch * world, recipe.training.seed), 1
    else:
        order = EpochSampler(len(train_set), recipe.training.seed)
        batches, unit = torch.utils.data.BatchSampler(order, batch * world, drop_last=False), batch * world
    sampler = ShardedBatches(batches, accelerator.process_index, world, unit)
    loader = torch.utils.data.DataLoader(
        ShardView(train_set),
        batch_sampler=sampler,
        collate_fn=shard_collate(collate),
        num_workers=recipe.data.workers,
    )
    return prepare_data_loader(loader, accelerator.device, num_processes=1, process_index=0), sampler


class Draws:
    """Random numbers for one micro-batch: drawn for the whole global batch, this shard's rows kept
    (without sharding, exactly torch.randn / torch.randint on the generator)."""

    def __init__(self, generator: torch.Generator, shard: tuple[int, int] | None):
        self.generator, self.shard = generator, shard

    def _rows(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], slice]:
        if self.shard is None:
            return tuple(shape), slice(None)
        offset, size = self.shard
        return (size, *shape[1:]), slice(offset, offset + shape[0])

    def randn(self, shape) -> torch.Tensor:
        full, rows = self._rows(tuple(shape))
        return torch.randn(full, generator=self.generator)[rows]

    def randint(self, low: int, high: int, shape) -> torch.Tensor:
        full, rows = self._rows(tuple(shape))
        return torch.randint(low, high, full, generator=self.generator)[rows]


def reduce_loss(per_example: torch.Tensor, batch: dict, world: int) -> torch.Tensor:
    """The loss this process backpropagates: the mean without sharding; with it, this shard's
    weighted sum x world / global batch size (DDP's average over processes is then the global mean)."""
    if "weights" not in batch:
        return per_example.mean()
    weights = batch["weights"].to(per_example.device, per_example.dtype)
    return (per_example * weights).sum() * (world / batch["shard"][1])


def global_loss(accelerator, loss: torch.Tensor) -> float:
    """The global batch's loss, the same number on every process (NaN or inf if any process's is:
    then all stop together, or DDP would hang)."""
    if accelerator.num_processes == 1:
        return loss.item()
    return accelerator.reduce(loss.detach().float().reshape(1), "mean").item()


def world_record(accelerator) -> dict:
    """What run.json's device section says about the processes."""
    state = accelerator.state
    return {
        "processes": accelerator.num_processes,
        "world_size": int(os.environ.get("WORLD_SIZE", accelerator.num_processes)),
        "distributed_type": str(state.distributed_type).split(".")[-1],
        "backend": getattr(state, "backend", None),
    }


# --- starting the processes ---------------------------------------------------------------------


def is_worker() -> bool:
    """Whether this process is a non-main process of a distributed launch (it prints nothing)."""
    return int(os.environ.get("RANK", "0")) != 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, args, queue, report_progress):
    # A terminal's Ctrl-C goes to the launcher only, which passes it on once: otherwise every
    # process would get it twice (from the terminal and from the launcher), a "second" Ctrl-C.
    os.setpgrp()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a forked copy of a 1-process state
    rank = int(os.environ["RANK"])
    progress = (lambda p: queue.put(("progress", p))) if rank == 0 and report_progress else None
    try:
        result = fn(*args, progress=progress)
    except WorkbenchError as e:
        queue.put(("error", str(e)))
        raise SystemExit(2) from None
    except KeyboardInterrupt:  # a second Ctrl-C
        queue.put(("interrupted", None))
        raise SystemExit(130) from None
    if rank == 0:
        queue.put(("result", result))


def launch(
    fn: Callable,
    args: tuple,
    processes: int,
    *,
    cpu: bool = True,
    progress: Callable | None = None,
    timeout: float | None = None,
    start_method: str = "spawn",
):
    """Run fn(*args, progress=...) in `processes` fresh processes (a distributed group: gloo on CPU,
    NCCL on GPUs) and return what process 0's call returned. `progress` (here, in the launcher)
    gets what process 0 reports. Ctrl-C is passed on to every process (the first asks the run to
    save and stop, the second stops it at once). A WorkbenchError in a process is raised here; a
    process that dies ends the others; past `timeout` seconds all are ended and WorkbenchError
    raised. `start_method` "spawn" starts fresh interpreters (safe with CUDA, slower to start);
    "fork" (accelerate's debug launcher's way, CPU only) copies this process."""
    import multiprocessing as mp
    import threading

    from accelerate.utils import PrepareForLaunch, patch_environment
    from torch.multiprocessing import start_processes

    if processes < 2:
        raise WorkbenchError(f"--processes: {processes}: launch needs 2 or more (1 runs in this process)")
    queue = mp.get_context(start_method).SimpleQueue()
    distributed = "MULTI_CPU" if cpu else "MULTI_GPU"
    env = {"world_size": processes, "master_addr": "127.0.0.1", "master_port": str(_free_port()),
           "nproc": processes, "accelerate_use_cpu": "yes" if cpu else "no"}  # fmt: skip
    if cpu:
        env["gloo_socket_ifname"] = "lo"  # loopback: the hostname's interface may not route
    result, error, interrupted = None, None, False

    def drain() -> None:
        nonlocal result, error, interrupted
        while not queue.empty():
            kind, value = queue.get()
            if kind == "progress" and progress is not None:
                progress(value)
            elif kind == "result":
                result = value
            elif kind == "error":
                error = error or value
            elif kind == "interrupted":
                interrupted = True

    main_thread = threading.current_thread() is threading.main_thread()
    with patch_environment(**env):
        context = start_processes(
            PrepareForLaunch(_worker, distributed_type=distributed),
            args=(fn, args, queue, progress is not None),
            nprocs=processes,
            start_method=start_method,
            join=False,
        )
    pids = context.pids()

    def pass_on(signum, frame) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    previous = signal.signal(signal.SIGINT, pass_on) if main_thread else None
    started = time.monotonic()
    try:
        while True:
            try:
                finished = context.join(timeout=0.2)
            except Exception as e:  # a process failed: join ended the others
                drain()
                if interrupted:
                    raise KeyboardInterrupt from None
                if error:
                    raise WorkbenchError(error) from None
                raise WorkbenchError(f"a training process failed: {_first_line(e)}") from None
            drain()
            if finished:
                break
            if timeout is not None and time.monotonic() - started > timeout:
                raise WorkbenchError(f"the {processes} training processes did not finish in {timeout:.0f} s")
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        for process in context.processes:  # (any way out of here but their end: none is left behind)
            if process.is_alive():
                process.kill()
    drain()
    return result


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__
