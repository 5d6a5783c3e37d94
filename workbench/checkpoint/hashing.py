"""Checkpoint hashes as A1111 users know them, cached so a 7 GB file is hashed once.

sha256 is of the whole file; AutoV2 is its first 10 hex characters (what A1111 and civitai show).
The cache is keyed by absolute path, size and mtime: any rewrite of the file invalidates it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from workbench.errors import WorkbenchError

CHUNK = 4 * 1024 * 1024


def cache_dir() -> Path:
    return Path(os.environ.get("WB_CACHE_DIR") or Path.home() / ".cache" / "wb")


def _cache_file() -> Path:
    return cache_dir() / "hashes.json"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _store_cache(cache: dict) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs time


def sha256_file(path: str | os.PathLike, use_cache: bool = True) -> str:
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:
        raise WorkbenchError(f"{p}: cannot read: {e.strerror}") from e
    key = str(p.resolve())
    stamp = [st.st_size, st.st_mtime_ns]
    cache = _load_cache() if use_cache else {}
    hit = cache.get(key)
    if hit and hit.get("stamp") == stamp:
        return hit["sha256"]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    if use_cache:
        cache = _load_cache()  # re-read: another process may have added entries meanwhile
        cache[key] = {"stamp": stamp, "sha256": digest}
        _store_cache(cache)
    return digest


def autov2(sha256: str) -> str:
    return sha256[:10]
