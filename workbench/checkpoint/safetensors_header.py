"""Validate a safetensors header as strictly as the reference `safetensors` library does.

Every file wb reads goes through `parse_header` before anything else looks at it, so the rest of
wb can trust what a header says. The rules are the reference implementation's (Rust crate
`safetensors`, `Metadata::validate` and its serde types), checked here in one place:

- the 8-byte length N is at most 100,000,000 and the file holds at least 8 + N bytes;
- the N header bytes are UTF-8 JSON whose top level is an object (JSON nested past the parser's
  recursion limit is refused like any other invalid JSON);
- `__metadata__`, when present and not null, maps strings to strings;
- every other key names a tensor: an object with `dtype` (one of the reference's dtype names),
  `shape` (a list of non-negative integers, each and their product fitting 64 bits) and
  `data_offsets` (exactly two non-negative integers, begin <= end);
- end - begin is exactly the tensor's size (elements x bits per element / 8, whole bytes);
- sorted by offset, the tensors tile the data section: the first begins at 0, each begins where
  the previous ended (no overlap, no hole), and the last ends where the file ends (no trailing
  bytes);
- wb is stricter in one respect: a key given twice in the JSON is refused (the reference keeps
  one of them silently).

Offsets that are not a multiple of the element size are valid (the reference accepts them); the
reader copies such tensors instead of mapping them.
"""

from __future__ import annotations

import json

from workbench.errors import WorkbenchError

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit, in bytes
U64_MAX = 2**64 - 1

# Bits per element of every dtype the reference library knows (safetensors 0.6+).
BITSIZE = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


def _is_u64(v: object) -> bool:
    return type(v) is int and 0 <= v <= U64_MAX  # bool is not an int here, as in serde


Entry = tuple[str, tuple[int, ...], int, int]  # dtype, shape, begin, end (relative to the data)


def parse_header(raw: bytes, where: str) -> tuple[dict[str, str], dict[str, Entry]]:
    """Parse and validate the JSON header bytes. Returns (metadata, {key: (dtype, shape, begin,
    end)}) with offsets relative to the data section, in file order. The data section's length
    is checked by `check_coverage`. Errors name `where` (the file) and the key and field."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise WorkbenchError(
            f"{where}: not a safetensors file (header is not UTF-8 at byte {e.start})"
        ) from None
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise WorkbenchError(f"{where}: invalid safetensors header: key {str(e)!r} appears twice") from None
    except RecursionError:
        raise WorkbenchError(f"{where}: not a safetensors file (header JSON nested too deep)") from None
    except ValueError as e:  # JSONDecodeError, an integer past Python's digit limit
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WorkbenchError(f"{where}: not a safetensors file (header is not JSON: {first})") from None
    if not isinstance(doc, dict):
        raise WorkbenchError(f"{where}: not a safetensors file (header is not a JSON object)")

    metadata = doc.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise WorkbenchError(
            f"{where}: invalid safetensors header: __metadata__ is a {_kind(metadata)}, "
            "not a mapping of strings"
        )
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise WorkbenchError(
                f"{where}: invalid safetensors header: __metadata__[{k!r}] is a {_kind(v)}, not a string"
            )

    tensors: dict[str, Entry] = {}
    for key, entry in doc.items():
        tensors[key] = _tensor_entry(key, entry, where)
    _check_tiling(tensors, where)
    return metadata, tensors


def _kind(v: object) -> str:
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number"
    )


def _tensor_entry(key: str, entry: object, where: str) -> Entry:
    bad = f"{where}: invalid safetensors header: tensor {key!r}"
    if not isinstance(entry, dict):
        raise WorkbenchError(f"{bad} is a {_kind(entry)}, not an object with dtype, shape, data_offsets")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in entry:
            raise WorkbenchError(f"{bad} has no {field}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in BITSIZE:
        raise WorkbenchError(f"{bad}: dtype {dtype!r} is not a safetensors dtype")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise WorkbenchError(f"{bad}: shape {_short(shape)} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise WorkbenchError(f"{bad}: data_offsets {_short(offsets)} is not two non-negative integers")
    begin, end = offsets
    if end < begin:
        raise WorkbenchError(f"{bad}: data_offsets [{begin}, {end}] end before they begin")
    numel = 1
    for d in shape:
        numel *= d
    bits = numel * BITSIZE[dtype]
    if numel > U64_MAX or bits > U64_MAX:
        raise WorkbenchError(f"{bad}: shape {shape} has more elements than fit in 64 bits")
    if bits % 8:
        raise WorkbenchError(f"{bad}: {dtype}{shape} is not a whole number of bytes")
    if end - begin != bits // 8:
        raise WorkbenchError(
            f"{bad}: data_offsets [{begin}, {end}] hold {end - begin} bytes, {dtype}{shape} needs {bits // 8}"
        )
    return dtype, tuple(shape), begin, end


def _short(v: object) -> str:
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_tiling(tensors: dict[str, Entry], where: str) -> None:
    pos = 0
    for key, (_, _, begin, end) in sorted(tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin != pos:
            what = "overlaps the previous tensor" if begin < pos else f"leaves a hole of {begin - pos} bytes"
            raise WorkbenchError(
                f"{where}: invalid safetensors header: tensor {key!r} at data_offsets [{begin}, {end}] {what}"
            )
        pos = end


def data_length(tensors: dict[str, Entry]) -> int:
    return max((end for *_, end in tensors.values()), default=0)


def check_coverage(tensors: dict, data_start: int, file_size: int, where: str) -> None:
    """The tensors must cover the data section exactly: no missing bytes, no trailing bytes."""
    need = data_length(tensors)
    have = file_size - data_start
    if have < need:
        raise WorkbenchError(
            f"{where}: truncated: the header promises {need} bytes of tensor data, the file holds {have}"
        )
    if have > need:
        raise WorkbenchError(
            f"{where}: invalid safetensors file: {have - need} bytes after the last tensor's data"
        )
