"""Paths as wb opens and writes them: the one place that decides what counts as an input, when an
output would overwrite one, and how a write fails.

- Inputs must be regular files (or folders where a folder is meant): a named pipe would block
  forever, /dev/zero would be read until memory runs out, a socket cannot be read at all.
- An output is refused when it is the same file as any input: same device and inode after
  resolving links (hard links and symlinks included), or the same resolved path.
- Writes go to a hidden temporary file beside the target whose name records the writer's pid
  (`.NAME.PID.RANDOM.wb-tmp`), and are renamed into place only when complete. A writer that
  was killed (SIGKILL cannot be caught) leaves its temporary file; the next writer into that folder
  removes the ones whose process is gone, never one of a live process.
- OS errors while writing (disk full, read-only file system, permission) become one line naming
  the path and what was being written.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from workbench.errors import WorkbenchError

TMP_SUFFIX = ".wb-tmp"
_COMPLETED: list[Path] = []  # files renamed into place by this process, in order
_CLEANED: set[str] = set()  # folders whose stale temporary files this process already removed


def note_completed(path: Path) -> None:
    """Record a file that is now complete in its final place (the CLI says so if Ctrl-C follows)."""
    _COMPLETED.append(Path(path))


def completed_files() -> list[Path]:
    return list(_COMPLETED)
_TMP_RE = re.compile(r"^\..+\.(\d+)\.[^.]+\.wb-tmp$")


def _kind_of(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def check_regular(path: str | os.PathLike, what: str = "") -> os.stat_result:
    """Stat `path` (following links) and refuse anything but a regular file, with one line."""
    p = Path(path)
    label = f"{what} {p}" if what else str(p)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise WorkbenchError(f"{label}: no such file") from None
    except OSError as e:
        raise WorkbenchError(f"{label}: cannot read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise WorkbenchError(f"{label}: {_kind_of(st.st_mode)}, not a regular file; wb reads only files")
    return st


@contextmanager
def open_regular(path: str | os.PathLike, what: str = "") -> Iterator[IO[bytes]]:
    """Open a regular file for reading in binary. The file is opened non-blocking and checked on
    the open descriptor, so a named pipe swapped in after a check cannot block the command."""
    p = Path(path)
    label = f"{what} {p}" if what else str(p)
    check_regular(p, what)
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise WorkbenchError(f"{label}: cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise WorkbenchError(f"{label}: {_kind_of(st.st_mode)}, not a regular file; wb reads only files")
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def read_text_file(path: str | os.PathLike, what: str, limit: int) -> str:
    """The whole of a small text input (recipe, prompts, config): a regular file of at most `limit`
    bytes, strict UTF-8 (a BOM is dropped). Each refusal is one line naming the file."""
    p = Path(path)
    st = check_regular(p, what)
    if st.st_size > limit:
        raise WorkbenchError(
            f"{what} {p}: {st.st_size:,} bytes, over the {limit:,}-byte limit (is this the right file?)"
        )
    with open_regular(p, what) as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise WorkbenchError(f"{what} {p}: over the {limit:,}-byte limit (is this the right file?)")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise WorkbenchError(f"{what} {p}: not UTF-8 text (byte {e.start}, line {line})") from None


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: same device and inode after following links, or (when one
    does not exist yet) the same path once resolved."""
    try:
        sa, sb = os.stat(a), os.stat(b)
        return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)
    except OSError:
        pass
    try:
        return Path(a).resolve() == Path(b).resolve()
    except (OSError, RuntimeError):
        return False


def refuse_overwrite(
    output: str | os.PathLike, inputs: Iterable[tuple[str, str | os.PathLike | None]]
) -> None:
    """Refuse an output that is any of the command's inputs. `inputs` are (role, path) pairs;
    the role names the input in the message ("the recipe", "input 'A'")."""
    out = Path(output)
    for role, path in inputs:
        if path is not None and same_file(out, path):
            raise WorkbenchError(f"{out}: refusing to overwrite {role} of this command ({path})")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OSError:
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files that writers killed mid-write left in `folder`: those whose name
    records a pid that no longer runs. A live writer's file is never touched."""
    removed: list[Path] = []
    key = os.path.realpath(folder)
    if key in _CLEANED:
        return removed
    _CLEANED.add(key)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TMP_RE.match(entry.name)
        if m is None or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                import shutil

                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            pass
    return removed


def check_free_space(path: Path, nbytes: int, what: str = "the checkpoint") -> None:
    """Refuse to start writing `nbytes` into `path`'s folder when the disk has less free."""
    try:
        vfs = os.statvfs(Path(path).parent)
    except OSError:
        return
    free = vfs.f_bavail * vfs.f_frsize
    if nbytes > free:
        raise WorkbenchError(
            f"{path}: cannot write {what}: it needs {nbytes:,} bytes, {Path(path).parent} has "
            f"{free:,} free; nothing was written"
        )


def remove_empty_dirs(*folders: Path) -> None:
    """Remove each folder that is empty (in the order given: children first); leave anything else."""
    for folder in folders:
        try:
            Path(folder).rmdir()
        except OSError:
            pass


def temp_path_for(target: Path, folder: bool = False) -> Path:
    """A new, empty temporary file (or folder) beside `target`, its name holding this pid."""
    prefix = f".{target.name}.{os.getpid()}."
    try:
        if folder:
            return Path(tempfile.mkdtemp(prefix=prefix, suffix=TMP_SUFFIX, dir=target.parent))
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=TMP_SUFFIX, dir=target.parent)
        os.close(fd)
        return Path(tmp)
    except OSError as e:
        raise write_error(target, "a temporary file", e) from None


_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


def write_error(path: Path, what: str, e: OSError) -> WorkbenchError:
    """One line for an OS error while writing: the path, what was being written, the reason."""
    reason = e.strerror or str(e)
    hint = {
        errno.ENOSPC: " (the disk is full)",
        errno.EDQUOT: " (disk quota exceeded)",
        errno.EROFS: " (read-only file system)",
    }.get(e.errno, "")
    return WorkbenchError(f"{path}: cannot write {what}: {reason}{hint}; nothing was left there")


def is_write_error(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in _WRITE_ERRNOS


def write_atomic(
    path: str | os.PathLike,
    write: Callable[[Path], object],
    what: str = "the file",
    inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
) -> Path:
    """Write `path` through `write(tmp)` on a temporary file beside it, then rename into place.
    Refuses to overwrite an input; on any failure (disk full, Ctrl-C, SIGTERM) the temporary file
    is removed and `path` is untouched."""
    target = Path(path)
    refuse_overwrite(target, inputs)
    if not target.parent.is_dir():
        raise WorkbenchError(f"{target}: folder {target.parent} does not exist")
    clean_stale_temps(target.parent)
    tmp = temp_path_for(target)
    try:
        write(tmp)
        fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, target)
        note_completed(target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if is_write_error(e):
            raise write_error(target, what, e) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def write_text_atomic(
    path: str | os.PathLike,
    text: str,
    what: str = "the file",
    inputs: Iterable[tuple[str, str | os.PathLike | None]] = (),
) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), what, inputs)


def fsync_file(path: Path) -> None:
    """Flush a file already written and closed (by torch.save, PIL, ...) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_file_range():
    """glibc's sync_file_range (Linux), or None where there is none."""
    try:
        import ctypes

        func = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    func.restype = ctypes.c_int
    return func


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing the file's dirty pages to the disk now, without waiting for
    them. A writer that does this every few tens of MiB finishes with a short fsync instead of one
    that writes the whole file after the work is done: the disk works while the CPU computes.
    Advice only: a no-op where Linux's sync_file_range is missing, errors ignored."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def fsync_dir(folder: Path) -> None:
    """Make a new file's directory entry durable too (POSIX; a no-op where directories cannot be opened)."""
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


def current_umask() -> int:
    """The process umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
