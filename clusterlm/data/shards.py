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
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clusterlm.errors import DataError
from clusterlm.fsutil import atomic_write_bytes

MAGIC = b"CLMTOKS\0"
SHARD_VERSION = 1
META_VERSION = 1
HEADER = struct.Struct("<8sIIQ8x")  # magic, version, bytes/token, count, reserved
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


def encode_shard(tokens: np.ndarray, dtype: np.dtype) -> bytes:
    """Header + tokens as bytes; ids must fit `dtype`."""
    dtype = np.dtype(dtype).newbyteorder("<")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise DataError(f"a shard holds a 1-D token array, got shape {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
        raise DataError(f"token ids in [{tokens.min()}, {tokens.max()}] do not fit {dtype.name}")
    header = HEADER.pack(MAGIC, SHARD_VERSION, dtype.itemsize, tokens.size)
    return header + tokens.astype(dtype, copy=False).tobytes()


def write_shard(path: str | os.PathLike, tokens: np.ndarray, dtype: np.dtype) -> None:
    """Write a shard atomically (temporary file, fsync, rename)."""
    atomic_write_bytes(path, encode_shard(tokens, dtype))


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
    if magic != MAGIC:
        raise DataError(f"{path} is not a clusterlm token shard (magic {magic!r}, expected {MAGIC!r})")
    if version != SHARD_VERSION:
        raise DataError(f"shard {path} has format version {version}; this clusterlm reads version {SHARD_VERSION}")
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
    version = meta.get("format_version")
    if version != META_VERSION:
        raise DataError(f"{path} has format_version={version!r}; this clusterlm reads {META_VERSION}")
    return meta
