"""The safetensors file format: read the header without touching data, map tensors lazily, and
stream a new file out tensor by tensor.

Format (from the safetensors spec): 8 bytes little-endian header length N, N bytes of JSON
(`{"__metadata__": {str: str}, key: {"dtype", "shape", "data_offsets": [begin, end]}}`, offsets
relative to the end of the header), then the tensor bytes back to back with no holes.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.checkpoint.files import (
    check_free_space,
    clean_stale_temps,
    current_umask,
    fsync_dir,
    fsync_file,  # noqa: F401  (re-exported: workbench/train/resume.py imports it from here)
    is_write_error,
    note_completed,
    refuse_overwrite,
    start_writeback,
    temp_path_for,
    write_error,
)
from workbench.checkpoint.safetensors_header import (
    BITSIZE,
    MAX_HEADER_BYTES,  # noqa: F401  (re-exported)
    check_coverage,
    parse_header,
)
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    import torch

# Bytes per element of each safetensors dtype. Reading a header needs no torch: `wb inspect`
# stays light (importing the CUDA build of torch alone costs ~700 MB of resident memory).
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


@cache
def torch_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype name -> torch dtype."""
    import torch

    return {
        "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
        "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
        "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    }  # fmt: skip


@cache
def dtype_names() -> dict[torch.dtype, str]:
    return {v: k for k, v in torch_dtypes().items()}


FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class TensorInfo:
    """What the header says about one tensor: known before any tensor data is read."""

    dtype: str  # safetensors name: "F16", "F32", "I64", ...
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * BITSIZE[self.dtype] // 8

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def torch_dtype(self) -> torch.dtype:
        found = torch_dtypes().get(self.dtype)
        if found is None:
            raise WorkbenchError(
                f"dtype {self.dtype} is valid safetensors but wb cannot compute with it "
                f"(it reads {', '.join(sorted(ITEMSIZE))})"
            )
        return found


def info_of(tensor: torch.Tensor) -> TensorInfo:
    name = dtype_names().get(tensor.dtype)
    if name is None:
        raise WorkbenchError(f"dtype {tensor.dtype} cannot be stored in safetensors")
    return TensorInfo(name, tuple(tensor.shape))


@dataclass(frozen=True)
class Header:
    infos: dict[str, TensorInfo]
    offsets: dict[str, tuple[int, int]]  # absolute file offsets [begin, end)
    metadata: dict[str, str]
    data_start: int


def read_header(path: Path) -> Header:
    """Parse and validate a safetensors header (see safetensors_header for the rules, the reference
    library's). Reads only the header bytes; refuses anything that is not a regular file."""
    from workbench.checkpoint.files import open_regular

    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise WorkbenchError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES:
                raise WorkbenchError(
                    f"{path}: not a safetensors file (header length {n} is over the format's limit "
                    f"of {MAX_HEADER_BYTES} bytes)"
                )
            if 8 + n > size:
                raise WorkbenchError(f"{path}: not a safetensors file, or truncated (header length {n})")
            raw = f.read(n)
    except OSError as e:
        raise WorkbenchError(f"{path}: cannot read: {e.strerror}") from e
    metadata, tensors = parse_header(raw, str(path))
    data_start = 8 + n
    check_coverage(tensors, data_start, size, str(path))
    infos: dict[str, TensorInfo] = {}
    offsets: dict[str, tuple[int, int]] = {}
    for key, (dtype, shape, begin, end) in tensors.items():
        infos[key] = TensorInfo(dtype, shape)
        offsets[key] = (data_start + begin, data_start + end)
    return Header(infos, offsets, metadata, data_start)


class SafetensorsFile:
    """A safetensors file whose tensors are memory-mapped one by one; `tensor(key)` costs no copy
    until the pages are touched.

    Each tensor gets its own private mapping of just its bytes: a private writable mapping is
    charged against the machine's memory commit, so mapping a whole 4 TB (sparse) file at once
    fails with ENOMEM even when only a few MB of it are ever read."""

    def __init__(self, path: Path):
        self.path = path
        self.header = read_header(path)
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            from workbench.checkpoint.files import open_regular

            with open_regular(self.path) as f:
                self._fd = os.dup(f.fileno())
        return self._fd

    def tensor(self, key: str) -> torch.Tensor:
        import torch

        info = self.header.infos[key]
        begin, end = self.header.offsets[key]
        dtype = info.torch_dtype
        if info.numel == 0:
            return torch.empty(info.shape, dtype=dtype)
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        try:
            # ACCESS_COPY: private pages, so the tensor is writable (torch wants that) while the
            # file on disk can never be changed through it.
            mapped = mmap.mmap(self._open(), end - start, offset=start, access=mmap.ACCESS_COPY)
        except (OSError, OverflowError, ValueError) as e:
            why = getattr(e, "strerror", None) or str(e)
            raise WorkbenchError(
                f"{self.path}: cannot map tensor {key!r} ({end - begin} bytes): {why}"
            ) from None
        flat = torch.frombuffer(mapped, dtype=dtype, count=info.numel, offset=begin - start)
        if (begin - start) % flat.element_size():
            flat = flat.clone()  # a valid file may place a tensor off its alignment; compute on a copy
        return flat.view(info.shape)

    def close(self) -> None:
        # Tensors handed out keep their own mapping alive through torch's reference.
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    import torch

    t = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


class SafetensorsWriter:
    """Stream a safetensors file out one tensor at a time.

    The header is computed up front from the planned dtypes and shapes, so each tensor is written
    at its final offset the moment it exists (`os.pwrite`: any order, any thread) and never kept.
    Everything goes to a hidden temporary file beside the target; only a complete file is fsynced
    and renamed into place. On any exception (Ctrl-C included) the temporary file is removed.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        plan: Mapping[str, TensorInfo],
        metadata: Mapping[str, str] | None = None,
        inputs: Iterable[str | os.PathLike] = (),
    ):
        self.path = Path(path)
        self.plan = dict(plan)
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
        refuse_overwrite(self.path, (("an input", src) for src in inputs))
        header: dict[str, object] = {}
        if self.metadata:
            header["__metadata__"] = self.metadata
        pos = 0
        self._offsets: dict[str, int] = {}
        for key, info in self.plan.items():
            header[key] = {
                "dtype": info.dtype,
                "shape": list(info.shape),
                "data_offsets": [pos, pos + info.nbytes],
            }
            self._offsets[key] = pos
            pos += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
        self._prefix = struct.pack("<Q", len(raw)) + raw
        self.total_bytes = len(self._prefix) + pos
        self._written: set[str] = set()
        self._filled: dict[str, int] = {}  # bytes written so far of keys written in parts
        self._lock = threading.Lock()
        self._copy_range = hasattr(os, "copy_file_range")
        self._fd: int | None = None
        self._tmp: Path | None = None

    def __enter__(self) -> SafetensorsWriter:
        folder = self.path.parent
        if not folder.is_dir():
            raise WorkbenchError(f"{self.path}: folder {folder} does not exist")
        clean_stale_temps(folder)  # what writers killed by SIGKILL left here
        check_free_space(self.path, self.total_bytes)  # a 4 TB plan on a 100 GB disk: refused now
        tmp = temp_path_for(self.path)
        try:
            fd = os.open(tmp, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise write_error(self.path, "the checkpoint", e) from None
        self._fd, self._tmp = fd, tmp
        try:
            # mkstemp makes the file private (0600); a checkpoint gets what any new file gets, so a
            # UI running as another user or group can read it.
            os.fchmod(fd, 0o666 & ~current_umask())
            os.ftruncate(fd, self.total_bytes)
            self._pwrite(memoryview(self._prefix), 0)
        except OSError as e:
            self._discard()
            raise self._failed(e) from None
        except BaseException:
            self._discard()
            raise
        return self

    def _failed(self, e: OSError) -> Exception:
        if is_write_error(e):
            return write_error(self.path, f"the checkpoint ({self.total_bytes:,} bytes)", e)
        return e

    def _pwrite(self, data: memoryview, offset: int) -> None:
        assert self._fd is not None, "use the writer as a context manager"
        while len(data):
            n = os.pwrite(self._fd, data, offset)
            data, offset = data[n:], offset + n

    def write(self, key: str, tensor: torch.Tensor) -> None:
        want = self.plan.get(key)
        if want is None:
            raise KeyError(f"{key!r} is not in this file's plan")
        got = info_of(tensor)
        if got != want:
            raise ValueError(
                f"{key!r}: planned {want.dtype}{list(want.shape)}, got {got.dtype}{list(got.shape)}"
            )
        self._pwrite(_tensor_bytes(tensor), len(self._prefix) + self._offsets[key])
        self._written.add(key)

    def write_part(self, key: str, start: int, part: torch.Tensor) -> None:
        """Write `part` (the planned dtype, any shape) as elements [start, start + numel) of `key`.

        Any thread may write any part at any time; the key counts as written once all its bytes
        have been. A merge streams each cache-sized chunk out the moment it is computed, while it
        is still in the CPU cache, instead of assembling whole tensors first."""
        want = self.plan.get(key)
        if want is None:
            raise KeyError(f"{key!r} is not in this file's plan")
        got = info_of(part)
        if got.dtype != want.dtype or start < 0 or start + got.numel > want.numel:
            raise ValueError(
                f"{key!r}: planned {want.dtype}{list(want.shape)}, got {got.numel} {got.dtype} at {start}"
            )
        size = ITEMSIZE[want.dtype]
        self._pwrite(_tensor_bytes(part), len(self._prefix) + self._offsets[key] + start * size)
        self._count(key, got.numel * size)

    def copy_from(self, key: str, fd: int, offset: int, info: TensorInfo) -> None:
        """Write `key` from the bytes of an open file (`info` says what they hold) at `offset`.

        The kernel copies page cache to page cache (copy_file_range): no user-space buffer, no
        page fault, half the copying of a read and a write; plain pread/pwrite where the two
        files' filesystems do not allow it."""
        want = self.plan.get(key)
        if want is None:
            raise KeyError(f"{key!r} is not in this file's plan")
        if info != want:
            raise ValueError(
                f"{key!r}: planned {want.dtype}{list(want.shape)}, got {info.dtype}{list(info.shape)}"
            )
        assert self._fd is not None, "use the writer as a context manager"
        dst, left = len(self._prefix) + self._offsets[key], want.nbytes
        while left and self._copy_range:
            try:
                n = os.copy_file_range(fd, self._fd, left, offset, dst)
            except OSError:
                self._copy_range = False  # e.g. EXDEV across filesystems: plain copies from now on
                break
            if n <= 0:
                raise WorkbenchError(f"{self.path}: input file shrank while copying {key!r}")
            offset, dst, left = offset + n, dst + n, left - n
        while left:
            chunk = os.pread(fd, min(left, 8 << 20), offset)
            if not chunk:
                raise WorkbenchError(f"{self.path}: input file shrank while copying {key!r}")
            self._pwrite(memoryview(chunk), dst)
            offset, dst, left = offset + len(chunk), dst + len(chunk), left - len(chunk)
        self._count(key, want.nbytes)

    def start_writeback(self) -> None:
        """Have the kernel start writing what is written so far (see files.start_writeback); the
        merge engine's coordinating thread calls it every WRITEBACK bytes, so the final fsync is short."""
        if self._fd is not None:
            start_writeback(self._fd)

    def _count(self, key: str, nbytes: int) -> None:
        with self._lock:
            done = self._filled.get(key, 0) + nbytes
            self._filled[key] = done
            if done >= self.plan[key].nbytes:
                self._written.add(key)

    def _discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._discard()
            if isinstance(exc, OSError) and is_write_error(exc):
                raise self._failed(exc) from None
            return
        missing = [k for k in self.plan if k not in self._written]
        if missing:
            self._discard()
            raise WorkbenchError(
                f"{self.path}: internal error: {len(missing)} tensors never written ({missing[0]})"
            )
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            os.replace(self._tmp, self.path)
            self._tmp = None
            note_completed(self.path)
        except OSError as e:
            self._discard()
            raise self._failed(e) from None
        except BaseException:
            self._discard()
            raise
        fsync_dir(self.path.parent)


def save_tensors(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    inputs: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write a small in-memory dict through the streaming writer (same guarantees)."""
    plan = {k: info_of(t) for k, t in tensors.items()}
    with SafetensorsWriter(path, plan, metadata, inputs) as w:
        for k, t in tensors.items():
            w.write(k, t)
    return Path(path)


def __getattr__(name: str):
    # DTYPES / TORCH_TO_NAME as lazy module attributes: torch is imported only when they are used.
    if name == "DTYPES":
        return torch_dtypes()
    if name == "TORCH_TO_NAME":
        return dtype_names()
    raise AttributeError(name)
