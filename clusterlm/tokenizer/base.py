"""The tokenizer protocol every kind implements, and the helpers the kinds share.

A tokenizer is saved as one JSON file. BPE tokenizers are Hugging Face `tokenizers` files
(loadable by `tokenizers.Tokenizer.from_file` and by `transformers`); byte and char tokenizers
are small JSON files with a "clusterlm_tokenizer" field naming the kind.

Imports run downhill: byte.py, char.py and bpe.py import only this file; kinds.py dispatches to
them by name and holds `load_tokenizer` (re-exported as `clusterlm.tokenizer.load_tokenizer`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from clusterlm.errors import DataError

KINDS = ("byte", "char", "bpe")
BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
FORMAT_VERSION = 1  # of the byte and char JSON files
REPLACEMENT = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")


@runtime_checkable
class Tokenizer(Protocol):
    kind: str  # one of KINDS

    @property
    def vocab_size(self) -> int: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; special tokens are dropped."""
        ...

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer as one JSON file (atomically)."""
        ...



def replace_surrogates(text: str) -> str:
    """`text` with every lone surrogate code point replaced by U+FFFD (valid text is unchanged)."""
    return _SURROGATE.sub(REPLACEMENT, text)


def check_ids(ids: Sequence[int] | np.ndarray, vocab_size: int, kind: str) -> np.ndarray:
    """`ids` as a 1-D int64 array, after checking each is in [0, vocab_size)."""
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"{kind} tokenizer: decode takes a flat sequence of integer ids, "
                         f"got an array of shape {arr.shape} and dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"{kind} tokenizer: id {int(arr[i])} at position {i} is outside the "
                         f"vocabulary [0, {vocab_size})")
    return arr


def check_version(obj: dict[str, Any], source: str) -> None:
    """Raise DataError unless a byte/char tokenizer file has a version this code reads."""
    version = obj.get("version")
    if version != FORMAT_VERSION:
        raise DataError(f"{source}: {obj.get('clusterlm_tokenizer')} tokenizer file has "
                        f"version={version!r}; this clusterlm reads version {FORMAT_VERSION}")
