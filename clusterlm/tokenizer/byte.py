"""Byte tokenizer: ids 0..255 are the bytes of the text's UTF-8 encoding, then three specials.

    from clusterlm.tokenizer.byte import ByteTokenizer
    tok = ByteTokenizer()
    tok.encode("hé")              # [104, 195, 169]
    tok.decode(tok.encode(text)) == text      # for any valid Unicode str

Ids: 0..255 = byte values, 256 = <|bos|>, 257 = <|eos|>, 258 = <|pad|>; vocab_size = 259, plus
any special tokens added with `with_special_tokens` (259, 260, ...; saved as an "added_tokens" list,
file version 2). No training and no vocabulary: the saved file only names the kind. A Python str holding a lone
surrogate (U+D800..U+DFFF, not valid Unicode and not encodable as UTF-8) is encoded as if each
surrogate were U+FFFD. Decoding drops special ids and turns byte sequences that are not valid
UTF-8 (e.g. a sequence cut mid-character) into U+FFFD.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from clusterlm.errors import DataError
from clusterlm.fsutil import atomic_write_json
from clusterlm.tokenizer.base import (
    ADDED_TOKENS_VERSION,
    BOS,
    EOS,
    FORMAT_VERSION,
    PAD,
    added_pattern,
    check_ids,
    check_listed_specials,
    check_version,
    new_tokens,
    replace_surrogates,
    split_added,
)


class ByteTokenizer:
    """UTF-8 bytes as tokens; see the module docstring for the id layout."""

    kind = "byte"
    _SPECIALS = {BOS: 256, EOS: 257, PAD: 258}

    def __init__(self, added_tokens: Sequence[str] = ()) -> None:
        """`added_tokens`: special tokens at ids 259, 260, ... (see with_special_tokens)."""
        self._added = new_tokens(added_tokens, self._SPECIALS.get)
        self._added_ids = {t: 259 + i for i, t in enumerate(self._added)}
        self._pattern = added_pattern(self._added)

    @property
    def vocab_size(self) -> int:
        return 259 + len(self._added)

    @property
    def added_tokens(self) -> tuple[str, ...]:
        return self._added

    def token_id(self, token: str) -> int | None:
        return self._SPECIALS.get(token, self._added_ids.get(token))

    def with_special_tokens(self, tokens: Sequence[str]) -> ByteTokenizer:
        """A byte tokenizer with `tokens` appended after this one's ids (present ones keep theirs)."""
        return ByteTokenizer(self._added + new_tokens(tokens, self.token_id))

    @property
    def bos_id(self) -> int:
        return 256

    @property
    def eos_id(self) -> int:
        return 257

    @property
    def pad_id(self) -> int:
        return 258

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of `text` (lone surrogates as U+FFFD), without BOS/EOS; an added token's
        string is its id."""
        if self._pattern is not None:
            ids: list[int] = []
            for part, is_token in split_added(text, self._pattern):
                if is_token:
                    ids.append(self._added_ids[part])
                else:
                    ids += self._bytes(part)
            return ids
        return self._bytes(text)

    @staticmethod
    def _bytes(text: str) -> list[int]:
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError:
            return list(replace_surrogates(text).encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of the byte ids; specials are dropped, invalid UTF-8 becomes U+FFFD."""
        arr = check_ids(ids, self.vocab_size, self.kind)
        return arr[arr < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_dict(self) -> dict[str, Any]:
        obj = {"clusterlm_tokenizer": self.kind, "version": ADDED_TOKENS_VERSION if self._added else FORMAT_VERSION,
               "vocab_size": self.vocab_size, "special_tokens": dict(self._SPECIALS)}
        if self._added:  # a plain tokenizer's file stays as it was (version 1)
            obj["added_tokens"] = list(self._added)
        return obj

    def to_json_str(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer JSON to `path` atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, obj: dict[str, Any], source: str = "<dict>") -> ByteTokenizer:
        """Inverse of `to_dict`; `source` names the file in error messages."""
        added = check_version(obj, source)
        if any(t in cls._SPECIALS for t in added):
            raise DataError(f"{source}: added_tokens repeat a built-in special token ({', '.join(cls._SPECIALS)})")
        tok = cls(added)
        if obj.get("vocab_size", tok.vocab_size) != tok.vocab_size:
            raise DataError(f"{source}: byte tokenizer with vocab_size={obj['vocab_size']}; "
                            f"a byte tokenizer with {len(added)} added tokens has {tok.vocab_size}")
        check_listed_specials(obj, dict(cls._SPECIALS), source)
        return tok

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"

