"""fsutil.staging_dir's folder swap under a kill, and the paths named by its OSErrors.

Run: .venv/bin/python -m pytest -q tests/unit/test_fsutil.py

Reference: the contract in the fsutil docstring: at every instant either the old or the new
folder is complete under its name, or (fallback path only) the next staging_dir restores it.
A kill is a real SIGKILL of a child process at the named point, not an exception.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clusterlm import fsutil
from clusterlm.fsutil import atomic_write_bytes, staging_dir

ROOT = Path(__file__).resolve().parents[2]

# Child: replace `final` (holding old.txt) by a folder holding new.txt, and SIGKILL itself at the
# point named by KILL_AT: "second_rename" (fallback path: after the old folder was renamed aside)
# or "after_swap" (the new folder is in; cleanup of the old one not done).
CHILD = textwrap.dedent("""
    import os, shutil, signal, sys
    from pathlib import Path
    from clusterlm import fsutil
    final, kill_at, fallback = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    if fallback:
        fsutil._renameat2 = lambda: None  # as on a platform without renameat2
        fsutil.exchange = lambda a, b: False
    real_replace, real_rmtree, calls = os.replace, shutil.rmtree, []
    def replace(src, dst):
        calls.append(dst)
        if kill_at == "second_rename" and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
    def rmtree(path, *a, **k):
        if kill_at == "after_swap":
            os.kill(os.getpid(), signal.SIGKILL)
        real_rmtree(path, *a, **k)
    os.replace, shutil.rmtree = replace, rmtree
    with fsutil.staging_dir(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
""")


def _old_folder(tmp_path: Path) -> Path:
    final = tmp_path / "data"
    final.mkdir()
    (final / "old.txt").write_text("old")
    return final


def _kill_child(final: Path, kill_at: str, fallback: bool) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", CHILD, str(final), kill_at, "1" if fallback else "0"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr


def test_kill_between_renames_is_recovered_by_next_run(tmp_path: Path) -> None:
    """Fallback swap killed between its two renames: the next staging_dir (an aborted prepare
    --overwrite here) restores the old folder before anything else, so no data is lost."""
    final = _old_folder(tmp_path)
    _kill_child(final, "second_rename", fallback=True)
    assert not final.exists()  # the state the kill leaves on the fallback path
    with pytest.raises(RuntimeError), staging_dir(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("the next run fails too")
    assert (final / "old.txt").read_text() == "old"
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left[-1] == "data" and all(p.endswith(".partial") for p in left[:-1])  # no aside; the
    # killed run's staging folder stays for prepare to warn about, as after any kill


def test_recovered_then_replaced(tmp_path: Path) -> None:
    """After the same kill, a successful next run replaces the restored folder and leaves nothing beside it."""
    final = _old_folder(tmp_path)
    _kill_child(final, "second_rename", fallback=True)
    with staging_dir(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert not list(tmp_path.glob(".data.old-*"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")
def test_exchange_swaps_atomically(tmp_path: Path) -> None:
    """renameat2(RENAME_EXCHANGE) swaps two folders' contents (the ext4/tmpfs path that leaves no gap)."""
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "1").write_text("a"), (b / "2").write_text("b")
    if not fsutil.exchange(a, b):
        pytest.skip("this file system has no RENAME_EXCHANGE")
    assert [p.name for p in a.iterdir()] == ["2"] and [p.name for p in b.iterdir()] == ["1"]


@pytest.mark.parametrize("fallback", [False, True])
def test_kill_after_swap_leaves_new_folder(tmp_path: Path, fallback: bool) -> None:
    """A kill after the swap, before the old folder is deleted: the new folder is in place, and the
    leftover is cleaned by the next run."""
    final = _old_folder(tmp_path)
    _kill_child(final, "after_swap", fallback=fallback)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    fsutil.recover_swap(final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".data.old-")] == []


def test_live_process_aside_is_left_alone(tmp_path: Path) -> None:
    """An aside whose process is alive belongs to a swap in progress: neither restored nor deleted."""
    final = tmp_path / "data"
    aside = tmp_path / f".data.old-{fsutil._owner()}"
    aside.mkdir()
    assert fsutil.recover_swap(final) is None
    assert aside.is_dir() and not final.exists()


def test_failed_second_rename_restores_old_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fallback path, the second rename raising (not a kill): the old folder is put back at once."""
    final = _old_folder(tmp_path)
    monkeypatch.setattr(fsutil, "exchange", lambda a, b: False)
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error", str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError), staging_dir(final, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    monkeypatch.setattr(os, "replace", real)
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_write_error_names_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write() failing with ENOSPC carries no file name; atomic_write_bytes adds the target's,
    keeps the errno, and leaves no temporary file."""

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "shard.bin"
    with pytest.raises(OSError) as info:
        atomic_write_bytes(target, b"x" * 100)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert list(tmp_path.iterdir()) == []


def test_staging_error_names_the_final_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A staging folder that cannot be created (read-only file system) is reported under the name
    the user gave, not the hidden staging name."""
    import tempfile

    def ro(**kw):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".out.x.partial"))

    monkeypatch.setattr(tempfile, "mkdtemp", ro)
    with pytest.raises(OSError) as info, staging_dir(tmp_path / "out"):
        pass
    assert info.value.errno == errno.EROFS and info.value.filename == str(tmp_path / "out")


def test_atomic_writes_and_staged_folders_get_the_umask_modes(tmp_path):
    """mkstemp/mkdtemp make 0600 files and 0700 folders; a checkpoint or data directory mounted into a
    container running as another user (deploy/docker) must be readable like any file open() makes."""
    import os
    import stat

    from clusterlm.fsutil import atomic_write_text, staging_dir

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        with staging_dir(tmp_path / "folder") as tmp:
            atomic_write_text(tmp / "b.txt", "y")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "folder" / "b.txt").stat().st_mode) == 0o644


def test_a_saved_checkpoint_is_readable_by_other_users(tmp_path):
    """safetensors' save_file creates files 0600: a fresh checkpoint served by the container (uid
    10001) or a pod failed with PermissionError on model.safetensors. Every file of a step folder has
    the umask's mode, as the docs say (deploy.md)."""
    import os
    import stat

    from tests.helpers import random_checkpoint

    old = os.umask(0o022)
    try:
        run = random_checkpoint(tmp_path, "byte", "some text " * 30, bpe_vocab=0, n_layers=1, context=16)
    finally:
        os.umask(old)
    files = [p for p in Path(run).rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files if stat.S_IMODE(p.stat().st_mode) != 0o644} == {}


def test_atomic_write_onto_a_device_or_pipe_writes_in_place(tmp_path):
    """`eval --out /dev/null` (or /dev/stdout, a named pipe) must write to the device, not rename a
    temporary file over it: run as root, that replaced /dev/null with a regular file for every
    process on the machine. A directory is refused naming it."""
    import os
    import stat
    import threading

    from clusterlm.fsutil import atomic_write_text

    atomic_write_text("/dev/null", "scores")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    atomic_write_text(fifo, "through the pipe")
    reader.join(timeout=10)
    assert got == ["through the pipe"] and stat.S_ISFIFO(os.stat(fifo).st_mode)
    with pytest.raises(IsADirectoryError, match="is a directory; give a file name"):
        atomic_write_text(tmp_path, "x")


def test_read_jsonl_skips_torn_and_non_utf8_lines(tmp_path, caplog):
    from clusterlm.fsutil import read_jsonl

    f = tmp_path / "metrics.jsonl"
    f.write_bytes(b'{"a": 1}\n{"b": \xe3\x81}\n{"tor\n\n{"c": "\xe2\x80\xa8 ok"}\n')
    assert read_jsonl(f) == [{"a": 1}, {"c": "\u2028 ok"}]
    assert [r.getMessage().split(" is ")[0] for r in caplog.records] == [f"{f}:2", f"{f}:3"]


def test_a_failed_atomic_write_names_the_file_asked_for_not_the_temporary(tmp_path):
    from clusterlm.fsutil import atomic_write_text

    with pytest.raises(FileNotFoundError) as e:
        atomic_write_text(tmp_path / "missing" / "x.json", "{}")
    assert e.value.filename == str(tmp_path / "missing" / "x.json")
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError) as e:
        atomic_write_text(tmp_path / "d", "{}")
    assert e.value.filename == str(tmp_path / "d") and sorted(p.name for p in tmp_path.iterdir()) == ["d"]
