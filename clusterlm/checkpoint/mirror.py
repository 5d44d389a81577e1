"""Checkpoint mirroring: each committed step folder copied, in the background, to a second folder.

    [checkpoint]
    mirror = "/lustre/me/run1/checkpoints"   # out_dir on node-local disk, the copy on the parallel file system

The HPC pattern: write fast to node-local storage, keep a copy where a lost node cannot take it along.
The checkpointer (clusterlm.checkpoint.manager) calls `submit(step_folder)` after each commit; a
thread copies it into a hidden `.step-N.partial-XXXX` folder of the mirror, fsyncs every file, checks
the copy against its manifest (size and SHA-256 of every file), renames it into place, moves the
mirror's `latest` and prunes the mirror to keep_last, exactly as a save does (layout.py). At most
one copy is in flight: the next save first waits for it (training is never blocked longer than
that), and the last save of a run waits for its own copy. A failed copy is logged as a warning and
never stops training: the primary is intact. Resume with --train.resume=auto takes the newest
checkpoint that verifies in either folder (the mirror's when the primary is missing or corrupt).
A mirror serves one run: its `source` file names the checkpoints folder it mirrors (resolved path),
and a run whose checkpoints folder is another is refused at start-up (check_mirror_source).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path

from clusterlm.checkpoint.files import fsync_file
from clusterlm.checkpoint.layout import commit_folder, make_hidden_dir, move_latest, prune, remove_stale
from clusterlm.checkpoint.store import verify_checkpoint
from clusterlm.errors import ConfigError
from clusterlm.fsutil import atomic_write_text, fsync_dir

log = logging.getLogger(__name__)


SOURCE = "source"  # the mirror's one-line file naming the checkpoints folder it mirrors


def check_mirror_source(mirror_root: Path | str, primary_root: Path | str) -> None:
    """ConfigError when `mirror_root` already mirrors another run's checkpoints folder (its `source`
    file names it): a fresh run given the same mirror took that run's newest copy for its own resume
    (--train.resume=auto) and its copies pruned the other run's. A mirror without the file (new, or
    written before it existed) is taken as this run's. Reads only; `claim` writes the file."""
    mine, theirs = str(Path(primary_root).resolve()), _read_source(Path(mirror_root))
    if theirs is not None and theirs != mine:
        raise ConfigError(f"checkpoint.mirror={mirror_root} mirrors the run whose checkpoints are in {theirs} "
                          f"({Path(mirror_root) / SOURCE}), not {mine}: give each run its own mirror folder; to "
                          f"continue that run here, copy its checkpoints into {mine} (or, when {theirs} is gone "
                          f"for good, delete {Path(mirror_root) / SOURCE} and this run takes the mirror over)")


def claim(mirror_root: Path | str, primary_root: Path | str) -> None:
    """Write the mirror's `source` file naming `primary_root` (atomically; once)."""
    root = Path(mirror_root)
    if _read_source(root) is None:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(root / SOURCE, str(Path(primary_root).resolve()) + "\n")


def _read_source(root: Path) -> str | None:
    try:
        return (root / SOURCE).read_text(encoding="utf-8").strip() or None
    except (FileNotFoundError, NotADirectoryError):
        return None


def copy_checkpoint(src: Path, mirror_root: Path, keep_last: int) -> Path:
    """Copy committed step folder `src` into `mirror_root` atomically (staged, verified, renamed); returns
    the mirror's step folder. CheckpointError-free: a copy that does not verify raises OSError."""
    src, root = Path(src), Path(mirror_root)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(root)  # an earlier copy that crashed half-way
    tmp = make_hidden_dir(root, f".{src.name}.partial-")
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync_file(p)
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            fsync_dir(d)
        problems = verify_checkpoint(tmp)
        if problems:
            raise OSError(f"the copy of {src} in {tmp} does not match its manifest: {'; '.join(problems)}")
        commit_folder(tmp, root / src.name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_latest(root, src.name)
    prune(root, keep_last, root / src.name)
    return root / src.name


class Mirror:
    """One background copy at a time from a run's checkpoints folder to `root`."""

    def __init__(self, root: Path | str, keep_last: int) -> None:
        self.root, self.keep_last = Path(root), keep_last
        self._thread: threading.Thread | None = None
        self.last: Path | None = None  # the newest copy that verified
        self.seconds: float | None = None  # how long it took

    def submit(self, step_folder: Path) -> None:
        """Start copying `step_folder` (after waiting for the previous copy)."""
        self.wait()
        self._thread = threading.Thread(target=self._copy, args=(Path(step_folder),), name="checkpoint-mirror",
                                        daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the copy in flight, if any, has finished (or failed: logged)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _copy(self, src: Path) -> None:
        t0 = time.perf_counter()
        try:
            claim(self.root, src.parent)
            dst = copy_checkpoint(src, self.root, self.keep_last)
        except Exception as e:  # noqa: BLE001 - a mirror failure never stops training; the primary is intact
            log.warning("checkpoint mirror: copying %s to %s failed (training goes on; the primary copy is intact): "
                        "%s", src, self.root, e)
            return
        self.last, self.seconds = dst, time.perf_counter() - t0
        log.info("checkpoint mirror: %s copied to %s and verified in %.1f s", src.name, dst, self.seconds)
