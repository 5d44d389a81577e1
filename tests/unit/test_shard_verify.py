"""Shard contents checked against meta.json: sha256, token ids < vocab_size, the header's reserved
bytes, and the verified-once cache.

Run: .venv/bin/python -m pytest -q tests/unit/test_shard_verify.py

Reference: a data directory written by `prepare` (byte tokenizer, vocab 259) and the sha256 it
recorded; corruption is written into the shard file in place, as a bad disk or an edit would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from clusterlm.data import shards
from clusterlm.data.loader import TokenLoader, iter_eval_batches
from clusterlm.data.prepare import prepare
from clusterlm.errors import DataError
from clusterlm.fsutil import sha256_file

HEADER = shards.HEADER_SIZE


@pytest.fixture
def data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    for i in range(4):
        (tmp_path / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 3000)))
    prepare([str(tmp_path / f"doc{i}.txt") for i in range(4)], tmp_path / "d", tokenizer="byte", workers=1,
            val_fraction=0.25, shard_tokens=20_000, progress=False)
    return tmp_path / "d"


def _loader(data: Path) -> TokenLoader:
    return TokenLoader(data, "train", batch_size=2, seq_len=16)


def _poke(path: Path, positions: np.ndarray, values: np.ndarray) -> None:
    """Write uint16 token ids at token positions of a shard, in place."""
    with open(path, "r+b") as f:
        for p, v in zip(positions, values):
            f.seek(HEADER + 2 * int(p))
            f.write(int(v).to_bytes(2, "little"))


def test_one_percent_changed_to_valid_ids_is_refused(data: Path) -> None:
    """1% of a shard's tokens changed to other valid ids (< 259): DataError naming the shard, the
    expected sha256 from meta.json and the actual one (sha256 of the file as it is now)."""
    meta = shards.read_meta(data)
    entry = meta["splits"]["train"]["shards"][1]
    path = data / entry["file"]
    tokens = np.array(shards.open_shard(path))
    pos = np.random.default_rng(1).choice(tokens.size, tokens.size // 100, replace=False)
    _poke(path, pos, (tokens[pos].astype(np.int64) + 1) % 259)
    with pytest.raises(DataError) as info:
        _loader(data)
    msg = str(info.value)
    assert str(path) in msg and entry["sha256"] in msg and sha256_file(path) in msg
    assert "splits.train.shards[1]" in msg
    with pytest.raises(DataError, match="does not match meta.json"):
        iter_eval_batches(data, "train", 2, 16)


def test_id_above_vocab_is_refused_with_position(data: Path) -> None:
    """One id >= vocab_size (259) at token position 12345: DataError with the id, the position and
    the byte offset, not an IndexError in the embedding later."""
    path = data / "train-00000.bin"
    _poke(path, np.array([12345]), np.array([300]))
    with pytest.raises(DataError, match=rf"token id 300 at position 12345 \(byte {HEADER + 2 * 12345}\) is "
                                        r">= vocab_size=259"):
        _loader(data)


def test_verified_once_then_remembered(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first loader reads every train shard once; later loaders (and other processes, via
    .verified.json) read none while size, mtime and ctime are unchanged; an edit that puts the
    mtime back (`touch -r`) still changes ctime and is caught."""
    calls: list[str] = []
    real = shards.hash_shard
    monkeypatch.setattr(shards, "hash_shard", lambda p, v=None: calls.append(Path(p).name) or real(p, v))
    _loader(data)
    n_train = len(shards.read_meta(data)["splits"]["train"]["shards"])
    assert sorted(calls) == [f"train-{i:05d}.bin" for i in range(n_train)]
    cache = json.loads((data / shards.VERIFY_CACHE).read_text())["files"]
    assert set(cache) == set(calls)
    calls.clear()
    shards._verified.clear()  # as in a new process: only the file remembers
    _loader(data)
    assert calls == []

    path = data / "train-00000.bin"
    st = path.stat()
    _poke(path, np.array([7]), np.array([(int(shards.open_shard(path)[7]) + 1) % 259]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime as verified
    with pytest.raises(DataError, match="does not match meta.json"):
        _loader(data)


def test_read_only_data_dir_remembers_in_memory(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """When .verified.json cannot be written (read-only data dir), verification still passes and
    is remembered for the rest of the process."""

    def refuse(path, obj):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(shards, "atomic_write_json", refuse)
    shards._verified.clear()
    _loader(data)
    assert not (data / shards.VERIFY_CACHE).exists()
    monkeypatch.setattr(shards, "hash_shard", lambda *a: pytest.fail("read again"))
    _loader(data)


def test_reserved_header_bytes_must_be_zero(data: Path) -> None:
    """Header bytes 24-31 are reserved, zero (docs/formats.md): anything else is a corrupt header."""
    path = data / "train-00000.bin"
    with open(path, "r+b") as f:
        f.seek(24)
        f.write(b"\x01")
    with pytest.raises(DataError, match="header bytes 24-31"):
        shards.read_header(path)
