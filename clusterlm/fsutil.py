"""Crash-safe file writing: write to a temporary name, fsync, rename, fsync the folder.

A reader never sees a half-written file under its final name: either the old content or the new.
An OSError raised here (disk full, read-only file system) always names the path it was about.

Replacing a whole folder (`staging_dir(..., overwrite=True)`) swaps the new folder in with one
atomic renameat2(RENAME_EXCHANGE) where the kernel and file system offer it (Linux >= 3.15; ext4,
xfs, btrfs, tmpfs, ...). Elsewhere it renames the old folder aside to `.NAME.old-HOST-PID`, the new one
in, then deletes the aside; a kill between those two renames leaves NAME missing, and the next
`staging_dir` on NAME (the next `prepare`) restores the aside before anything else. See docs/data.md.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

HASH_CHUNK = 1 << 20  # 1 MiB
RENAME_EXCHANGE = 2  # renameat2 flag, <linux/fs.h>
_AT_FDCWD = -100

log = logging.getLogger(__name__)


def _with_path(e: OSError, path: str | os.PathLike) -> OSError:
    """`e` with `path` as its filename when the OS gave none (a write() on a full disk names no file)
    or named the hidden temporary file beside `path` (".NAME.xxxx.tmp"): the user asked for `path`."""
    name = e.filename if isinstance(e.filename, str) else None
    if e.filename is not None and not (name and os.path.basename(name).startswith(f".{Path(path).name}.")):
        return e
    return OSError(e.errno, e.strerror or str(e), os.fspath(path))  # same errno -> same subclass


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or file creation inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write_chunks(path, [data])


def umask() -> int:
    """The process's file-creation mask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(path: str | os.PathLike) -> None:
    """Give `path` the mode a plain open() would have given it (0666 less the umask). For files made by
    a library that creates them owner-only (safetensors' save_file: 0600), so that a checkpoint read
    by another user (a container running as uid 10001, a shared project folder) stays readable."""
    os.chmod(path, 0o666 & ~umask())


def atomic_write_chunks(path: str | os.PathLike, chunks: Iterable[bytes | memoryview]) -> None:
    """Write the concatenation of `chunks` to `path` atomically, without joining them in memory.
    The file gets the mode a plain open() would give it (0666 less the umask), not mkstemp's 0600,
    so a checkpoint or data directory on shared storage (or mounted into a container running as
    another user) stays readable. A `path` that exists and is not a regular file (/dev/null,
    /dev/stdout, a named pipe) is written in place: renaming over it would replace the device."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, f"{path} is a directory; give a file name", str(path))
    if st is not None and not stat.S_ISREG(st.st_mode):
        try:
            with open(path, "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
        except OSError as e:
            raise _with_path(e, path) from None
        return
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _with_path(e, path) from None
    try:
        os.fchmod(fd, 0o666 & ~umask())
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _with_path(e, path) from None
        raise
    fsync_dir(path.parent)


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """Before a long computation whose result goes to `path`: refuse (ValueError naming `flag`) a path
    that is a directory or whose folder is missing or not writable, so that the work is not done for
    nothing and its result lost at the end. A device or pipe (/dev/null, /dev/stdout) is fine."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name")
    if p.exists() and not p.is_file():
        return
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: the folder {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder {parent} is not writable by this user")


def check_output_path(path: str | os.PathLike, flag: str) -> None:
    """As check_output_file, for a writer that creates missing folders (probe, plan and cluster merge
    --out): refuse (ValueError naming `flag`) a directory, a file where a folder should be, or a folder
    this user cannot write to, before the work rather than after it."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder {parent} is not writable by this user")


def check_output_dir(path: str | os.PathLike, flag: str) -> None:
    """For a writer that creates folder `path` and any missing folders above it (export, convert, quantize,
    prune, ensemble --out): refuse (ValueError naming `flag`) a file where one of those folders should be,
    or a nearest existing folder this user cannot write to, before the work (the OS said only "Not a
    directory: OUT/checkpoints" or "File exists" after it)."""
    if Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder; choose another {flag}")
    parent = Path(path)
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent != Path(path) and not parent.is_dir():
        raise ValueError(f"{flag} {path}: {parent} is a file, not a folder; choose another {flag}")
    if parent != Path(path) and not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder {parent} is not writable by this user")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of a JSON-lines file in order. A line that is not a JSON object (a write torn by a
    crash, an append still in flight) is skipped with a warning, so readers never fail on a live file."""
    import logging

    path = Path(path)
    records = []
    for i, raw in enumerate(path.read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            logging.getLogger(__name__).warning("%s:%d is not valid UTF-8 JSON (a torn write?): skipped", path, i)
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@functools.cache
def _renameat2():  # the libc function, or None (not Linux, or glibc < 2.28)
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Atomically swap the two existing paths `a` and `b`; False (nothing done) where the platform or
    file system cannot (then use two renames)."""
    fn = _renameat2()
    if fn is None:
        return False
    import ctypes

    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # kernel or file system lacks it
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _owner() -> str:
    """Host and process that name an aside or staging folder: only the same host can tell whether
    the process is gone (a data dir on shared storage is seen by many hosts)."""
    import socket

    return f"{socket.gethostname()}-{os.getpid()}"


def _dead_asides(final: Path) -> list[Path]:
    """`.NAME.old-HOST-PID` folders beside `final` made on this host by a process that no longer runs."""
    prefix = f".{final.name}.old-{_owner().rpartition('-')[0]}-"
    return [p for p in final.parent.glob(f"{prefix}*")
            if p.name[len(prefix):].isdigit() and not _pid_alive(int(p.name[len(prefix):]))]


def recover_swap(final: str | os.PathLike) -> Path | None:
    """Repair what a killed process left beside `final`: when `final` is missing and an aside of a
    dead process exists (fallback path of `_swap_in`), rename it back (it was the complete old
    folder); delete other such asides. Staging folders (`.NAME.*.partial`) are left alone: prepare
    warns about them. Returns the folder restored, if any."""
    final = Path(final)
    if not final.parent.is_dir():
        return None
    asides = _dead_asides(final)
    restored = None
    if asides and not os.path.lexists(final):
        restored = max(asides, key=lambda p: p.stat().st_mtime_ns)  # the most recent swap
        os.replace(restored, final)
        fsync_dir(final.parent)
        asides.remove(restored)
        log.warning("restored %s from %s, left by a run killed while replacing it", final, restored.name)
    for p in asides:
        shutil.rmtree(p, ignore_errors=True)
    return restored


def _swap_in(new: Path, final: Path) -> None:
    """Replace the existing folder `final` by `new`, so that `final` exists at every instant (or, on
    the fallback path, can be restored by `recover_swap`)."""
    if exchange(new, final):
        fsync_dir(final.parent)
        shutil.rmtree(new, ignore_errors=True)  # `new` now holds the old content
        return
    aside = final.with_name(f".{final.name}.old-{_owner()}")
    os.replace(final, aside)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(aside, final)
        raise
    fsync_dir(final.parent)
    shutil.rmtree(aside, ignore_errors=True)


def replace_dir(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move the complete folder `new` to `final` durably, replacing an existing `final` (an atomic
    exchange where the file system has one, else the aside-and-restore swap of `_swap_in`)."""
    new, final = Path(new), Path(final)
    fsync_dir(new)
    if final.exists():
        _swap_in(new, final)
    else:
        os.replace(new, final)
        fsync_dir(final.parent)


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike, overwrite: bool = False,
                overwrite_hint: str = "pass --overwrite to replace it") -> Iterator[Path]:
    """Yield a fresh temporary folder beside `final`; on success it replaces `final`.

    On any exception (including KeyboardInterrupt) the temporary folder is removed and `final`
    is untouched. The temporary name starts with '.' and ends with '.partial', so nothing that
    looks for `final` can mistake it for a complete result. An existing `final` (overwrite=True)
    is swapped out atomically where possible (see the module docstring); a swap left half-done by
    a killed run is repaired first (`recover_swap`). `overwrite_hint` ends the message that refuses
    an existing `final`: what the caller's user can do (a CLI flag, or a library function's argument).
    """
    final = Path(final)
    recover_swap(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; {overwrite_hint}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp's 0700 would outlive the rename
    except OSError as e:  # name what the user asked for, not the hidden staging name
        raise OSError(e.errno, e.strerror or str(e), os.fspath(final)) from None
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        name = e.filename if isinstance(e, OSError) and isinstance(e.filename, str) else ""
        if name == str(tmp) or name.startswith(str(tmp) + os.sep):
            # a write into the (now removed) staging folder failed: name the file as it would have
            # been called under `final`, which is what the user asked for
            raise OSError(e.errno, e.strerror or str(e), str(final) + name[len(str(tmp)):]) from None
        raise
