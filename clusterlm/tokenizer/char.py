"""Character tokenizer: one id per distinct character of the training text (nanoGPT's char model).

    from clusterlm.tokenizer.char import CharTokenizer
    tok = CharTokenizer.train(open("input.txt").read().splitlines(keepends=True))
    tok.decode(tok.encode("to be")) == "to be"    # for text made of training characters

Ids, for the n distinct characters of the training texts: 0..n-1 = the characters in code-point
order, n = <|bos|>, n+1 = <|eos|>, n+2 = <|pad|>, n+3 = <|unk|>; vocab_size = n + 4.
A character not seen in training encodes to <|unk|>, which decodes to U+FFFD; the other specials
decode to nothing. Lone surrogates in training text are counted as U+FFFD.

Encoding goes through numpy (code points from UTF-32, then a binary search in the sorted
vocabulary), so megabytes of text encode in a fraction of a second.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from clusterlm.errors import DataError
from clusterlm.fsutil import atomic_write_text
from clusterlm.tokenizer.base import BOS, EOS, PAD
from clusterlm.tokenizer.byte import FORMAT_VERSION, REPLACEMENT, check_ids, check_version

UNK = "<|unk|>"


def _code_points(text: str) -> np.ndarray:
    """(len(text),) uint32 code points; surrogatepass keeps one entry per str element."""
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")


class CharTokenizer:
    """A fixed, sorted character vocabulary plus <|bos|> <|eos|> <|pad|> <|unk|>."""

    kind = "char"

    def __init__(self, chars: str):
        """`chars`: the vocabulary, distinct characters in increasing code-point order."""
        if not chars:
            raise DataError("char tokenizer needs at least one character in its vocabulary")
        cps = _code_points(chars)
        if np.any(np.diff(cps.astype(np.int64)) <= 0):
            raise DataError("char tokenizer vocabulary must be distinct characters in increasing "
                            "code-point order")
        if np.any((cps >= 0xD800) & (cps <= 0xDFFF)):
            raise DataError("char tokenizer vocabulary holds a lone surrogate (U+D800..U+DFFF), "
                            "which is not valid Unicode text")
        self.chars = chars
        self._cps = cps  # sorted, so id of a character = its index here
        # id -> code point for decode; -1 = emit nothing (bos, eos, pad)
        self._decode_table = np.concatenate([cps.astype(np.int64), [-1, -1, -1, ord(REPLACEMENT)]])

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        """The vocabulary of every distinct character in `texts`."""
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        surrogates = {c for c in seen if "\ud800" <= c <= "\udfff"}
        if surrogates:
            seen -= surrogates
            seen.add(REPLACEMENT)
        if not seen:
            raise DataError("cannot train a char tokenizer: the training texts hold no characters")
        return cls("".join(sorted(seen)))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 4

    @property
    def bos_id(self) -> int:
        return len(self.chars)

    @property
    def eos_id(self) -> int:
        return len(self.chars) + 1

    @property
    def pad_id(self) -> int:
        return len(self.chars) + 2

    @property
    def unk_id(self) -> int:
        return len(self.chars) + 3

    def _encode_array(self, text: str) -> np.ndarray:
        x = _code_points(text)
        idx = np.searchsorted(self._cps, x)
        idx_c = np.minimum(idx, len(self._cps) - 1)
        return np.where(self._cps[idx_c] == x, idx_c, self.unk_id)

    def encode(self, text: str) -> list[int]:
        """One id per character of `text` (<|unk|> for characters outside the vocabulary)."""
        return self._encode_array(text).tolist()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # one numpy pass over the concatenation, then cut at the texts' lengths
        ids = self._encode_array("".join(texts))
        ends = np.cumsum([len(t) for t in texts])
        return [part.tolist() for part in np.split(ids, ends[:-1])] if texts else []

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`: <|unk|> becomes U+FFFD, the other specials are dropped."""
        cps = self._decode_table[check_ids(ids, self.vocab_size, self.kind)]
        return cps[cps >= 0].astype("<u4").tobytes().decode("utf-32-le")

    def to_dict(self) -> dict[str, Any]:
        n = len(self.chars)
        return {"clusterlm_tokenizer": self.kind, "version": FORMAT_VERSION,
                "vocab_size": self.vocab_size,
                "special_tokens": {BOS: n, EOS: n + 1, PAD: n + 2, UNK: n + 3},
                "chars": self.chars}

    def to_json_str(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer JSON to `path` atomically."""
        atomic_write_text(path, self.to_json_str())

    @classmethod
    def from_dict(cls, obj: dict[str, Any], source: str = "<dict>") -> CharTokenizer:
        """Inverse of `to_dict`; `source` names the file in error messages."""
        check_version(obj, source)
        chars = obj.get("chars")
        if not isinstance(chars, str):
            raise DataError(f"{source}: char tokenizer file needs a string field 'chars', "
                            f"got {type(chars).__name__}")
        try:
            tok = cls(chars)
        except DataError as e:
            raise DataError(f"{source}: {e}") from None
        if obj.get("vocab_size", tok.vocab_size) != tok.vocab_size:
            raise DataError(f"{source}: vocab_size={obj['vocab_size']} but {len(chars)} characters "
                            f"+ 4 specials = {tok.vocab_size}")
        return tok

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
