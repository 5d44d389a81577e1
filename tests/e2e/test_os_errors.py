"""`clusterlm prepare` when the operating system refuses: a read-only file system and a full disk,
both real (tmpfs mounts), run as a user runs it (a subprocess).

Run (as root, which mount needs): .venv/bin/python -m pytest -q tests/e2e/test_os_errors.py

Reference: the contract in errors.py and docs/cli.md: exit 74 (EXIT_IO), one line naming the path
as the user gave it and the OS's reason, no traceback, nothing half-written (no DATA_DIR, no
.partial staging folder), and an existing DATA_DIR left byte for byte as it was.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from clusterlm.data.shards import read_meta
from clusterlm.errors import EXIT_IO

PY = sys.executable


def _mount(target: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    target.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {r.stderr.strip()}")


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator:
    mounted: list[Path] = []

    def make(name: str, options: str) -> Path:
        _mount(tmp_path / name, options)
        mounted.append(tmp_path / name)
        return tmp_path / name

    yield make
    for m in mounted:
        subprocess.run(["umount", str(m)], check=True)


def prepare(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "clusterlm", "prepare", *args, "--tokenizer", "byte", "--workers", "1"],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def _error_lines(r: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in r.stderr, r.stderr
    return [line for line in r.stderr.splitlines() if "error:" in line]


def _corpus(tmp_path: Path, mb: int) -> Path:
    path = tmp_path / f"in{mb}.txt"
    path.write_text(("the quick brown fox jumps over the lazy dog\n" * (mb * 1_000_000 // 44)))
    return path


def test_read_only_file_system(tmp_path: Path, tmpfs) -> None:
    """prepare --out on a read-only tmpfs: exit 74, one line 'Read-only file system: <DATA_DIR>'."""
    ro = tmpfs("ro", "ro,size=1m")
    r = prepare(str(_corpus(tmp_path, 1)), "--out", str(ro / "data"), cwd=tmp_path)
    assert r.returncode == EXIT_IO == 74, r.stderr
    [line] = _error_lines(r)
    assert line == (f"clusterlm prepare: error: Read-only file system: {ro / 'data'} (nothing half-written "
                    "was left; free space or fix permissions and rerun)")
    assert list(ro.iterdir()) == []


def test_full_disk_leaves_nothing_and_keeps_old_data(tmp_path: Path, tmpfs) -> None:
    """On a 2 MB tmpfs: a 3 MB corpus (3 MB of byte tokens) fails with exit 74 and one line naming
    the file it could not write under DATA_DIR; nothing is left. With --overwrite over a small
    prepared DATA_DIR, that directory stays complete and unchanged."""
    full = tmpfs("full", "size=2m")
    big = _corpus(tmp_path, 3)
    r = prepare(str(big), "--out", str(full / "data"), "--shard-tokens", "500000", cwd=tmp_path)
    assert r.returncode == 74, r.stderr
    [line] = _error_lines(r)
    assert line.startswith(f"clusterlm prepare: error: No space left on device: {full / 'data'}/"), line
    assert list(full.iterdir()) == []

    small = tmp_path / "small.txt"
    small.write_text("a small corpus that fits\n" * 100)
    assert prepare(str(small), "--out", str(full / "data"), cwd=tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in (full / "data").iterdir()}
    r = prepare(str(big), "--out", str(full / "data"), "--overwrite", cwd=tmp_path)
    assert r.returncode == 74, r.stderr
    assert len(_error_lines(r)) == 1 and "No space left on device" in r.stderr
    assert {p.name: p.read_bytes() for p in (full / "data").iterdir()} == before
    assert read_meta(full / "data")["counts"]["kept"] == 1
    assert sorted(p.name for p in full.iterdir()) == ["data"]
