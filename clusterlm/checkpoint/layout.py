"""Folder layout of a checkpoints directory: step folder names, the `latest` pointer, listing,
committing a finished folder, pruning to the last K, and removing what crashed saves left.

    RUN_DIR/checkpoints/latest                  text: name of the newest committed folder
    RUN_DIR/checkpoints/best                    text: the folder saved at the lowest val loss
                                                (checkpoint.keep_best only; pruning keeps it)
    RUN_DIR/checkpoints/step-00000100/          one committed save (contents: checkpoint/store.py)
    RUN_DIR/checkpoints/.step-00000100.partial-XXXX   a save in progress (hidden; removed if stale)

Shared by the single-process store and distributed (DCP) saves. One writer per checkpoints folder.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from pathlib import Path

from clusterlm.fsutil import atomic_write_text, replace_dir

log = logging.getLogger(__name__)

LATEST = "latest"
BEST = "best"
STEP_RE = re.compile(r"^step-(\d+)$")
STALE_RE = re.compile(r"^\.(step-\d+\.(partial|old|deleting)-.+|(latest|best)\..*\.tmp)$")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(folder: Path | str) -> int | None:
    """The step a `step-NNNNNNNN` folder name says, or None for any other name."""
    m = STEP_RE.match(Path(folder).name)
    return int(m[1]) if m else None


def read_latest(ckpt_root: Path, pointer: str = LATEST) -> str | None:
    """The folder name in `ckpt_root/latest` (or another pointer file, e.g. BEST), or None."""
    try:
        return (Path(ckpt_root) / pointer).read_text(encoding="utf-8").strip() or None
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None


def move_latest(ckpt_root: Path, name: str, pointer: str = LATEST) -> None:
    """Point `ckpt_root/latest` (or `pointer`) at folder `name` (atomic replace of a one-line text file)."""
    atomic_write_text(Path(ckpt_root) / pointer, name + "\n")


def step_folders(ckpt_root: Path) -> list[Path]:
    """Visible step-N folders, oldest first by step number (hidden partial folders are ignored)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_RE.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: (step_of(p), p.name))


def make_hidden_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder `parent/PREFIX<random hex>`."""
    while True:  # os.mkdir honours the umask (tempfile.mkdtemp would make it private, 0700)
        p = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            p.mkdir()
            return p
        except FileExistsError:
            continue


def commit_folder(tmp: Path, final: Path) -> None:
    """Rename a complete `tmp` folder to `final` durably; an existing `final` is replaced
    (fsutil.replace_dir: an atomic exchange where possible; on the fallback path a crash between its
    two renames leaves a hidden `.step-N.old-*` folder, which readers ignore and remove_stale deletes,
    and never a half-written `final`)."""
    replace_dir(tmp, final)


def remove_stale(ckpt_root: Path) -> None:
    """Delete leftovers of interrupted saves (hidden .partial/.old/.deleting folders, pointer temp files)."""
    for p in Path(ckpt_root).iterdir():
        if STALE_RE.match(p.name):
            log.info("removing %s left by an interrupted save", p)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _delete_folder(p: Path) -> None:
    # hide it first, so a crash in the middle of rmtree leaves nothing that looks like a checkpoint
    hidden = p.with_name(f".{p.name}.deleting-{secrets.token_hex(4)}")
    os.rename(p, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def prune(ckpt_root: Path, keep_last: int, just_saved: Path) -> None:
    """Keep the `keep_last` newest step folders (by step); drop folders newer than the one just saved.

    A folder with a higher step than `just_saved` belongs to the run before it was resumed from an
    earlier checkpoint; left in place it would be picked as the newest checkpoint instead of the new one.
    """
    saved = step_of(just_saved)
    best = read_latest(ckpt_root, BEST)  # checkpoint.keep_best: kept whatever its age
    kept = []
    for p in step_folders(ckpt_root):
        if step_of(p) > saved:
            log.warning("removing %s: it is later than the step just saved (%d), left by a run that was "
                        "resumed from an earlier checkpoint", p, saved)
            _delete_folder(p)
        else:
            kept.append(p)
    for p in kept[: max(len(kept) - keep_last, 0)]:
        if p.name == best:
            continue
        log.info("removing old checkpoint %s (keep_last=%d)", p, keep_last)
        _delete_folder(p)
    if best is not None and not (Path(ckpt_root) / best).is_dir():  # it was later than the step just saved
        (Path(ckpt_root) / BEST).unlink(missing_ok=True)
