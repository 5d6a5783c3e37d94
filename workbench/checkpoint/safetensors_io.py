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
import tempfile
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

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
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit


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
        return self.numel * ITEMSIZE[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtypes()[self.dtype]


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
    """Parse and validate a safetensors header. Reads only the header bytes."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise WorkbenchError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise WorkbenchError(f"{path}: not a safetensors file, or truncated (header length {n})")
            raw = f.read(n)
    except OSError as e:
        raise WorkbenchError(f"{path}: cannot read: {e.strerror}") from e
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WorkbenchError(f"{path}: not a safetensors file (header is not JSON)") from e
    if not isinstance(doc, dict):
        raise WorkbenchError(f"{path}: not a safetensors file (header is not a JSON object)")

    metadata = doc.pop("__metadata__", None) or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise WorkbenchError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + n
    infos: dict[str, TensorInfo] = {}
    offsets: dict[str, tuple[int, int]] = {}
    for key, entry in doc.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise WorkbenchError(f"{path}: malformed header entry for key {key!r}") from e
        if dtype not in ITEMSIZE:
            raise WorkbenchError(f"{path}: key {key!r} has unsupported dtype {dtype}")
        info = TensorInfo(dtype, shape)
        if end - begin != info.nbytes or begin < 0:
            raise WorkbenchError(f"{path}: key {key!r}: data_offsets do not match dtype and shape")
        infos[key] = info
        offsets[key] = (data_start + begin, data_start + end)
    data_end = max((e for _, e in offsets.values()), default=data_start)
    if data_end > size:
        raise WorkbenchError(
            f"{path}: truncated: the header promises {data_end - data_start} bytes of tensor data, "
            f"the file holds {size - data_start}"
        )
    return Header(infos, offsets, metadata, data_start)


class SafetensorsFile:
    """A memory-mapped safetensors file; `tensor(key)` costs no copy until the pages are touched."""

    def __init__(self, path: Path):
        self.path = path
        self.header = read_header(path)
        self._mmap: mmap.mmap | None = None

    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: private pages, so the tensor is writable (torch wants that) while the
                # file on disk can never be changed through it.
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mmap

    def tensor(self, key: str) -> torch.Tensor:
        import torch

        info = self.header.infos[key]
        begin, _ = self.header.offsets[key]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.torch_dtype)
        flat = torch.frombuffer(self._map(), dtype=info.torch_dtype, count=info.numel, offset=begin)
        return flat.view(info.shape)

    def close(self) -> None:
        # Tensors handed out keep the buffer alive through torch's reference; closing is best effort.
        self._mmap = None


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    import torch

    t = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


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
        for src in inputs:
            if _same_file(self.path, Path(src)):
                raise WorkbenchError(f"{self.path}: refusing to overwrite an input of this command")
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
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".wb-tmp", dir=folder)
        self._fd, self._tmp = fd, Path(tmp)
        try:
            # mkstemp makes the file private (0600); a checkpoint gets what any new file gets, so a
            # UI running as another user or group can read it.
            os.fchmod(fd, 0o666 & ~_umask())
            os.ftruncate(fd, self.total_bytes)
            self._pwrite(memoryview(self._prefix), 0)
        except BaseException:
            self._discard()
            raise
        return self

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
            _fsync_dir(self.path.parent)
        except BaseException:
            self._discard()
            raise


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def fsync_file(path: Path) -> None:
    """Flush a file already written and closed (by torch.save, PIL, ...) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
