"""Open any checkpoint a user has as one lazy, read-only mapping of LDM key -> tensor.

Three formats come in: a single `.safetensors` file (memory-mapped), a pickled `.ckpt`/`.pt`
(only through `torch.load(weights_only=True)`: a pickle that references anything but tensors and
plain containers is refused, never run), and a diffusers folder (renamed key by key into the
single-file layout, so every verb sees one layout). Dtypes and shapes are known on opening;
tensor data is read when a key is looked up.
"""

from __future__ import annotations

import _compat_pickle
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.checkpoint.files import check_regular
from workbench.checkpoint.safetensors_io import SafetensorsFile, TensorInfo, info_of, read_header
from workbench.errors import WorkbenchError

if TYPE_CHECKING:
    import torch

SAFETENSORS_SUFFIXES = {".safetensors", ".sft"}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


class Checkpoint(Mapping):
    """A read-only key -> tensor mapping (Mapping[str, torch.Tensor]) whose header is known up front."""

    def __init__(
        self,
        path: Path,
        format: str,
        infos: dict[str, TensorInfo],
        load: Callable[[str], torch.Tensor],
        metadata: dict[str, str] | None = None,
        close: Callable[[], None] | None = None,
        stored_keys: dict[str, str] | None = None,
    ):
        self.path = path
        self.format = format  # "safetensors" | "ckpt" | "diffusers"
        self.infos = infos
        self.metadata = dict(metadata or {})
        self._load = load
        self._close = close
        # key -> the name it has in the file, where they differ (see with_current_key_names)
        self.stored_keys = stored_keys or {}

    def stored_name(self, key: str) -> str:
        return self.stored_keys.get(key, key)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.infos:
            raise KeyError(key)
        return self._load(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.infos)

    def __len__(self) -> int:
        return len(self.infos)

    def __contains__(self, key: object) -> bool:
        return key in self.infos

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def close(self) -> None:
        if self._close is not None:
            self._close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, format={self.format!r}, keys={len(self)})"


def with_current_key_names(ckpt: Checkpoint) -> Checkpoint:
    """The same checkpoint seen with today's LDM key names: very old SD1 files keep the CLIP text
    model directly under `cond_stage_model.transformer.` (no `text_model.`). Merging such a file
    with a current one would otherwise find none of its text-encoder keys. Returns `ckpt` itself
    when every name is current."""
    from workbench.checkpoint.convert import normalize_ldm_keys

    try:
        names = normalize_ldm_keys(ckpt.infos)
    except WorkbenchError as e:
        raise WorkbenchError(f"{ckpt.path}: {e}") from None
    renamed = {new: old for new, old in names.items() if new != old}
    if not renamed:
        return ckpt
    infos = {new: ckpt.infos[old] for new, old in names.items()}
    return Checkpoint(
        ckpt.path, ckpt.format, infos, lambda key: ckpt[names[key]], ckpt.metadata, ckpt.close, renamed
    )


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint file or diffusers folder. Bad input raises WorkbenchError naming the file."""
    p = Path(path)
    if not p.exists():
        raise WorkbenchError(f"{p}: no such file or folder")
    if p.is_dir():
        if (p / "model_index.json").exists() or (p / "unet").is_dir():
            from workbench.checkpoint.diffusers_folder import open_diffusers_folder

            return open_diffusers_folder(p)
        raise WorkbenchError(f"{p}: a folder, but not a diffusers model (no model_index.json)")
    check_regular(p)  # a named pipe, /dev/zero or a socket: refused before anything opens it
    suffix = p.suffix.lower()
    if suffix in PICKLE_SUFFIXES or (suffix not in SAFETENSORS_SUFFIXES and zipfile.is_zipfile(p)):
        return _open_pickle(p)
    return _open_safetensors(p)


def _open_safetensors(path: Path) -> Checkpoint:
    f = SafetensorsFile(path)
    return Checkpoint(path, "safetensors", dict(f.header.infos), f.tensor, f.header.metadata, f.close)


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)|global[: ]+(?!GLOBAL)([\w.]+)")
# What a plain state dict's pickle references; anything else is what the refusal names.
_SAFE_GLOBALS = {"collections.OrderedDict", "_codecs.encode", "builtins.set", "builtins.frozenset"}


def _global_in_message(message: str) -> str | None:
    found = _GLOBAL_RE.search(message)
    if not found:
        return None
    return found.group(1) or found.group(2)


def _pickle_bytes(path: Path, limit: int = 64 * 1024 * 1024) -> bytes:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
            if name is None or z.getinfo(name).file_size > limit:
                return b""
            return z.read(name)
    with open(path, "rb") as f:
        return f.read(limit)


def _refused_global(path: Path) -> str | None:
    """The first function or class the pickle references that a state dict never does: read from
    the pickle's opcodes (never run), so the refusal can name it whatever torch's message says."""
    try:
        data = _pickle_bytes(path)
    except (OSError, zipfile.BadZipFile, ValueError):
        return None
    found: list[str] = []
    start = 0
    for _ in range(8):  # legacy .ckpt files are several pickles back to back
        end = _scan_pickle(data, start, found)
        if end is None or end >= len(data):
            break
        start = end
    return next((name for name in found if not _state_dict_global(name)), None)


_PY2_MODULES = _compat_pickle.IMPORT_MAPPING  # protocol 0-2 pickles name `commands`, `__builtin__`


def _scan_pickle(data: bytes, start: int, found: list[str]) -> int | None:
    """Append the globals one pickle starting at `start` references; return where it ends."""
    import pickletools

    strings: list[str] = []
    memo: dict[int, object] = {}
    try:
        for op, arg, pos in pickletools.genops(data[start:]):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8", "SHORT_BINSTRING",
                           "BINSTRING", "STRING"):  # fmt: skip
                strings.append(str(arg))
            elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                memo[arg] = strings[-1]
            elif op.name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif op.name in ("BINGET", "LONG_BINGET", "GET") and isinstance(memo.get(arg), str):
                strings.append(memo[arg])
            elif op.name in ("GLOBAL", "INST"):
                module, _, attr = str(arg).partition(" ")
                found.append(f"{_PY2_MODULES.get(module, module)}.{attr}")  # as Python 3 reads it
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif op.name == "STOP":
                return start + pos + 1
    except Exception:  # a malformed pickle: what was found before the damage is reported
        return None
    return None


def _state_dict_global(name: str) -> bool:
    """Whether a plain state dict's pickle references `name`: tensor rebuilders, storages, dtypes,
    OrderedDict, numpy's array reconstruction. Anything else (os.system, builtins.eval, ...) is not."""
    if name in _SAFE_GLOBALS or name.startswith(("torch._utils._rebuild", "numpy.core.multiarray.",
                                                  "numpy._core.multiarray.", "numpy.dtype", "numpy.ndarray")):
        return True  # fmt: skip
    if not name.startswith("torch."):
        return False
    import torch

    obj: object = torch
    for part in name.split(".")[1:]:
        obj = getattr(obj, part, None)
    return isinstance(obj, (torch.dtype, type))


def load_pickle_weights_only(path: Path) -> object:
    """torch.load with weights_only=True; a refused pickle becomes one clear WorkbenchError."""
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols before refusing them; the refusal is what we report.
            warnings.simplefilter("ignore")
            return _torch_load(path)
    except pickle.UnpicklingError as e:
        name = _refused_global(path) or _global_in_message(str(e))
        what = f"references {name}" if name else "holds more than tensors and plain containers"
        raise WorkbenchError(
            f"{path}: refused: the pickle {what}; wb loads .ckpt files only with weights_only=True "
            "and never runs code from a checkpoint (convert it to .safetensors with a tool you trust)"
        ) from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WorkbenchError(f"{path}: not a readable checkpoint ({first})") from None


def _torch_load(path: Path) -> object:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # mmap needs the zip format; old-style pickles load without it
            raise
        return torch.load(path, map_location="cpu", weights_only=True)


def _open_pickle(path: Path) -> Checkpoint:
    import torch

    obj = load_pickle_weights_only(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WorkbenchError(
            f"{path}: not a checkpoint (the pickle holds a {type(obj).__name__}, not a dict)"
        )
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise WorkbenchError(f"{path}: not a checkpoint (no tensors in it)")
    infos = {k: info_of(t) for k, t in tensors.items()}
    return Checkpoint(path, "ckpt", infos, tensors.__getitem__)


def is_safetensors(path: str | os.PathLike) -> bool:
    try:
        read_header(Path(path))
        return True
    except WorkbenchError:
        return False
