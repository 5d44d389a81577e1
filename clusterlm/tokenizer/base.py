"""The tokenizer protocol every kind implements, and `load_tokenizer` for any saved one.

A tokenizer is saved as one JSON file. BPE tokenizers are Hugging Face `tokenizers` files
(loadable by `tokenizers.Tokenizer.from_file` and by `transformers`); byte and char tokenizers
are small JSON files with a "clusterlm_tokenizer" field naming the kind.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"


@runtime_checkable
class Tokenizer(Protocol):
    kind: str  # "byte" | "char" | "bpe"

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


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load any tokenizer file written by `Tokenizer.save` (or a Hugging Face tokenizer.json)."""
    from clusterlm.tokenizer.kinds import load_any

    return load_any(path)
