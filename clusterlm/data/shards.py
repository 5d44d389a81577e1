"""Token shard files and the data directory's meta.json.

A shard is a 32-byte little-endian header followed by the tokens:

    offset  size  field
    0       8     magic  b"CLMTOKS\\0"
    8       4     format version (uint32) = 1
    12      4     bytes per token (uint32): 2 = uint16, 4 = uint32
    16      8     token count (uint64)
    24      8     reserved, zero

uint16 is used when every id fits (vocab_size <= 65536), else uint32. Files are read through
`np.memmap`, so a loader touches only the pages it needs. See docs/formats.md.

`write_shard` writes one file; `ShardWriter` (used by prepare.py) cuts a stream of token arrays
into shards of a fixed size.

`verify_shards` checks each shard's whole file against the sha256 in meta.json and every id
against the vocabulary, in one read; a shard that passed is remembered by (size, mtime, ctime)
in DATA_DIR/.verified.json (and in memory when the folder is read-only), so only the first use
after prepare, or after a file changes, pays for reading the shards (docs/data.md has the rate).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clusterlm.errors import DataError
from clusterlm.fsutil import atomic_write_chunks, atomic_write_json

log = logging.getLogger(__name__)

MAGIC = b"CLMTOKS\0"
SHARD_VERSION = 1
META_VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")  # magic, version, bytes/token, count, reserved (zero)
HEADER_SIZE = HEADER.size  # 32
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


@dataclass(frozen=True)
class ShardHeader:
    version: int
    dtype: np.dtype
    count: int


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits in 16 bits, else uint32."""
    if vocab_size < 1:
        raise DataError(f"vocab_size={vocab_size} must be >= 1")
    if vocab_size > 2**32:
        raise DataError(f"vocab_size={vocab_size} does not fit in uint32 token ids")
    return _DTYPES[2] if vocab_size <= 2**16 else _DTYPES[4]


WRITE_CHUNK = 1 << 23  # bytes hashed then written at once: 8 MiB, still in cache for the write


def write_shard(path: str | os.PathLike, tokens: np.ndarray, dtype: np.dtype) -> str:
    """Write a shard atomically (temporary file, fsync, rename); returns the file's sha256 (hex).

    The header, then the tokens' own buffer in WRITE_CHUNK slices, each hashed and written: no
    `header + tokens.tobytes()` copy of the whole shard (the tokens are converted only when they
    are not already `dtype`). Ids must fit `dtype`."""
    dtype = np.dtype(dtype).newbyteorder("<")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise DataError(f"a shard holds a 1-D token array, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
        raise DataError(f"token ids in [{tokens.min()}, {tokens.max()}] do not fit {dtype.name}")
    data = memoryview(np.ascontiguousarray(tokens.astype(dtype, copy=False)).view(np.uint8))
    h = hashlib.sha256()

    def chunks():
        header = HEADER.pack(MAGIC, SHARD_VERSION, dtype.itemsize, tokens.size)
        h.update(header)
        yield header
        for at in range(0, len(data), WRITE_CHUNK):
            chunk = data[at:at + WRITE_CHUNK]
            h.update(chunk)
            yield chunk

    atomic_write_chunks(path, chunks())
    return h.hexdigest()


class ShardWriter:
    """Fills `{split}-NNNNN.bin` shards of exactly `shard_tokens` tokens (the last one: the rest)
    in `folder`; `close()` returns meta.json's list of them (file, tokens, sha256)."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.buf: list[np.ndarray] = []
        self.buffered = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, tokens: np.ndarray) -> None:
        if tokens.size == 0:
            return
        self.buf.append(tokens)
        self.buffered += tokens.size
        while self.buffered >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def close(self) -> list[dict[str, Any]]:
        if self.buffered:
            self._flush(self.buffered)
        return self.shards

    def _flush(self, n: int) -> None:
        # only the arrays that make up the first n tokens are copied (a huge array added last is
        # sliced, not concatenated with what was buffered before it)
        take, got = 0, 0
        while got < n:
            got += self.buf[take].size
            take += 1
        parts, tail = self.buf[:take], self.buf[take:]
        cut = parts[-1].size - (got - n)  # tokens of the last part that go into this shard
        if cut < parts[-1].size:
            tail.insert(0, parts[-1][cut:])
            parts[-1] = parts[-1][:cut]
        head = parts[0] if len(parts) == 1 else np.concatenate(parts)
        name = f"{self.split}-{len(self.shards):05d}.bin"
        digest = write_shard(self.folder / name, head, self.dtype)
        self.shards.append({"file": name, "tokens": int(n), "sha256": digest})
        self.buf = tail
        self.buffered -= n


def read_header(path: str | os.PathLike) -> ShardHeader:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
    except FileNotFoundError:
        raise DataError(f"shard {path} is missing") from None
    if len(raw) < HEADER_SIZE:
        raise DataError(f"shard {path} is {len(raw)} bytes, shorter than the {HEADER_SIZE}-byte header")
    magic, version, width, count = HEADER.unpack(raw)
    reserved = raw[24:HEADER_SIZE]
    if magic != MAGIC:
        raise DataError(f"{path} is not a clusterlm token shard (magic {magic!r}, expected {MAGIC!r})")
    if version != SHARD_VERSION:
        raise DataError(f"shard {path} has format version {version}; this clusterlm reads version {SHARD_VERSION}")
    if reserved != bytes(8):
        raise DataError(f"shard {path}: header bytes 24-31 are {reserved.hex()}, expected zero: corrupt header")
    if width not in _DTYPES:
        raise DataError(f"shard {path} declares {width} bytes per token; valid: 2 (uint16) or 4 (uint32)")
    expected = HEADER_SIZE + width * count
    size = path.stat().st_size
    if size != expected:
        raise DataError(f"shard {path} is {size} bytes but its header promises {count} tokens ({expected} bytes): "
                        "truncated or corrupt")
    return ShardHeader(version=version, dtype=_DTYPES[width], count=count)


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """Read-only memory map of a shard's tokens (shape (count,))."""
    header = read_header(path)
    if header.count == 0:
        return np.zeros(0, dtype=header.dtype)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_SIZE, shape=(header.count,))


VERIFY_CACHE = ".verified.json"
_VERIFY_CHUNK = 1 << 23  # 8 MiB per read: one sha256 update and one vectorized max
_verified: dict[str, dict[str, Any]] = {}  # realpath -> cache entry, for data dirs nobody can write


def _stamp(st: os.stat_result) -> dict[str, int]:
    # ctime as well as mtime: `touch -r` can put an mtime back after an edit, nothing but the clock
    # can set ctime; a copied data dir (new ctime) is verified once more
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def hash_shard(path: str | os.PathLike, vocab_size: int | None = None) -> tuple[str, int]:
    """(sha256 of the whole file, largest token id) in one read. With `vocab_size`, the first id
    >= vocab_size raises DataError with its position."""
    path = Path(path)
    header = read_header(path)
    width = header.dtype.itemsize
    h = hashlib.sha256()
    top, pos = -1, 0
    buf = memoryview(bytearray(_VERIFY_CHUNK))  # reused: no allocation per read
    with open(path, "rb", buffering=0) as f:
        h.update(f.read(HEADER_SIZE))
        while n := f.readinto(buf):
            chunk = buf[:n]
            h.update(chunk)
            ids = np.frombuffer(chunk, dtype=header.dtype, count=n // width)
            if ids.size:
                m = int(ids.max())
                if vocab_size is not None and m >= vocab_size:
                    k = int(np.argmax(ids >= vocab_size))
                    raise DataError(f"shard {path}: token id {int(ids[k])} at position {pos + k} (byte "
                                    f"{HEADER_SIZE + (pos + k) * width}) is >= vocab_size={vocab_size} of "
                                    "meta.json's tokenizer: the shard is corrupt or belongs to another "
                                    "tokenizer; prepare the data again")
                top = max(top, m)
                pos += ids.size
    return h.hexdigest(), top


def verify_shards(data_dir: str | os.PathLike, shards: list[tuple[str, str, str]], vocab_size: int | None) -> None:
    """Check every (file name, expected sha256, where meta.json lists it) of `data_dir` against its
    content and `vocab_size`, skipping files verified before with the same size, mtime and ctime.
    Raises DataError naming the first bad shard."""
    data_dir = Path(data_dir)
    cache_path = data_dir / VERIFY_CACHE
    try:
        cached = json.loads(cache_path.read_text(encoding="utf-8")).get("files", {})
        cached = cached if isinstance(cached, dict) else {}
    except (OSError, ValueError, AttributeError):
        cached = {}
    fresh: dict[str, dict[str, Any]] = {}
    todo = []
    for name, expected, where in shards:
        path = data_dir / name
        entry = {**_stamp(path.stat()), "sha256": expected}
        known = cached.get(name) or _verified.get(os.path.realpath(path))
        if isinstance(known, dict) and {k: known.get(k) for k in entry} == entry and isinstance(known.get("max_id"), int):
            if vocab_size is not None and known["max_id"] >= vocab_size:
                todo.append((name, expected, where, entry))  # read it again to name the position
            else:
                fresh[name] = known
        else:
            todo.append((name, expected, where, entry))
    if not todo:
        return
    total = sum(e["size"] for *_, e in todo)
    log.info("verifying %d shard(s) of %s (%.1f MB) against meta.json's sha256 (once; remembered in %s)",
             len(todo), data_dir, total / 1e6, VERIFY_CACHE)
    t0 = time.perf_counter()
    for name, expected, where, entry in todo:
        path = data_dir / name
        digest, top = hash_shard(path, vocab_size)
        if digest != expected:
            raise DataError(f"shard {path} does not match meta.json: its sha256 is {digest}, {where}.sha256 "
                            f"is {expected}: the file changed after prepare (corruption or an edit); restore it "
                            "or prepare the data again")
        if _stamp(path.stat()) != {k: entry[k] for k in ("size", "mtime_ns", "ctime_ns")}:
            raise DataError(f"shard {path} changed while it was being verified; is something writing to {data_dir}?")
        fresh[name] = _verified[os.path.realpath(path)] = {**entry, "max_id": top}
    dt = time.perf_counter() - t0
    log.debug("verified %.1f MB in %.2f s (%.0f MB/s)", total / 1e6, dt, total / 1e6 / max(dt, 1e-9))
    try:  # keep entries of other splits' shards; a read-only data dir keeps the in-memory record only
        atomic_write_json(cache_path, {"version": 1, "files": {**cached, **fresh}})
    except OSError as e:
        log.debug("cannot record verified shards in %s (%s); they are verified again next time", cache_path, e)


def read_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Load and check `DATA_DIR/meta.json` (written last by `clusterlm prepare`)."""
    data_dir = Path(data_dir)
    path = data_dir / "meta.json"
    if not path.is_file():
        hint = " (an interrupted prepare leaves no meta.json; run it again)" if data_dir.is_dir() else ""
        raise DataError(f"{data_dir} is not a prepared data directory: {path} is missing{hint}. "
                        "Create one with `clusterlm prepare`.")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e}): corrupt; prepare the data again") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: a JSON object is expected, got {type(meta).__name__}: corrupt; prepare the data again")
    version = meta.get("format_version")
    if version != META_VERSION:
        raise DataError(f"{path} has format_version={version!r}; this clusterlm reads {META_VERSION}")
    return meta


def same_tokenizer(a: Path, b: Path) -> bool:
    """Both tokenizer files hold the same tokenizer (as parsed JSON); True when either is missing or
    unreadable (a kind and size check is then all there is)."""
    try:
        return json.loads(a.read_text(encoding="utf-8")) == json.loads(b.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return True


def check_data_tokenizer(data_dir: Path, meta: dict[str, Any], ckpt: Path, tok: Any) -> None:
    """The data in `data_dir` (its `meta`) must have been tokenized with checkpoint folder `ckpt`'s
    tokenizer `tok`: the same kind and size, and the same tokens (another corpus's char set or
    merges of the same size would make the ids mean other text). A DataError naming both otherwise."""
    data_dir, ckpt = Path(data_dir), Path(ckpt)
    if meta["tokenizer"]["vocab_size"] != tok.vocab_size or meta["tokenizer"]["kind"] != tok.kind:
        raise DataError(f"{data_dir} was tokenized with {meta['tokenizer']['kind']} (vocab "
                        f"{meta['tokenizer']['vocab_size']}), the checkpoint uses {tok.kind} (vocab "
                        f"{tok.vocab_size}); prepare the data with the checkpoint's tokenizer.json")
    if not same_tokenizer(ckpt / "tokenizer.json", data_dir / "tokenizer.json"):
        raise DataError(f"{data_dir} was tokenized with another {tok.kind} tokenizer of the same size "
                        f"({tok.vocab_size}) than checkpoint {ckpt}; prepare the data with "
                        f"--tokenizer {ckpt / 'tokenizer.json'}")
