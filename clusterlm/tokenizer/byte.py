"""Byte tokenizer: ids 0..255 are the bytes of the text's UTF-8 encoding, then three specials.

    from clusterlm.tokenizer.byte import ByteTokenizer
    tok = ByteTokenizer()
    tok.encode("hé")              # [104, 195, 169]
    tok.decode(tok.encode(text)) == text      # for any valid Unicode str

Ids: 0..255 = byte values, 256 = <|bos|>, 257 = <|eos|>, 258 = <|pad|>; vocab_size = 259. No
training and no vocabulary: the saved file only names the kind. A Python str holding a lone
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
from clusterlm.tokenizer.base import BOS, EOS, FORMAT_VERSION, PAD, check_ids, check_version, replace_surrogates


class ByteTokenizer:
    """UTF-8 bytes as tokens; see the module docstring for the id layout."""

    kind = "byte"
    _SPECIALS = {BOS: 256, EOS: 257, PAD: 258}

    @property
    def vocab_size(self) -> int:
        return 259

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
        """The UTF-8 bytes of `text` (lone surrogates as U+FFFD), without BOS/EOS."""
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
        return {"clusterlm_tokenizer": self.kind, "version": FORMAT_VERSION,
                "vocab_size": self.vocab_size, "special_tokens": dict(self._SPECIALS)}

    def to_json_str(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer JSON to `path` atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, obj: dict[str, Any], source: str = "<dict>") -> ByteTokenizer:
        """Inverse of `to_dict`; `source` names the file in error messages."""
        check_version(obj, source)
        tok = cls()
        if obj.get("vocab_size", tok.vocab_size) != tok.vocab_size:
            raise DataError(f"{source}: byte tokenizer with vocab_size={obj['vocab_size']}; "
                            f"a byte tokenizer always has {tok.vocab_size}")
        return tok

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"

