"""Character tokenizer: one id per distinct character of the training text (nanoGPT's char model).

    from clusterlm.tokenizer.char import CharTokenizer
    tok = CharTokenizer.train(open("input.txt").read().splitlines(keepends=True))
    tok.decode(tok.encode("to be")) == "to be"    # for text made of training characters

Ids, for the n distinct characters of the training texts: 0..n-1 = the characters in code-point
order, n = <|bos|>, n+1 = <|eos|>, n+2 = <|pad|>, n+3 = <|unk|>; vocab_size = n + 4.
Special tokens added with `with_special_tokens` follow at n+4, n+5, ... (saved as an "added_tokens"
list, file version 2); their strings in text encode to their ids.
A character not seen in training encodes to <|unk|>, which decodes to U+FFFD; the other specials
decode to nothing. Lone surrogates in training text are counted as U+FFFD.

Encoding goes through numpy (code points from UTF-32, then a lookup table indexed by code point,
at most 0x110000 int32 entries = 4.4 MB), so megabytes of text encode in a fraction of a second.
It works through the text in blocks of BLOCK_CHARS characters written into one output array
(`encode_array`), so its memory is the output plus a few times the block, whatever the text's
length; training reads each text without copying it (`set.update` iterates the str).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from clusterlm.errors import DataError
from clusterlm.fsutil import atomic_write_text
from clusterlm.tokenizer.base import (
    ADDED_TOKENS_VERSION,
    BOS,
    EOS,
    FORMAT_VERSION,
    PAD,
    REPLACEMENT,
    added_pattern,
    check_ids,
    check_listed_specials,
    check_version,
    new_tokens,
    split_added,
)

UNK = "<|unk|>"
BLOCK_CHARS = 1 << 20  # characters encoded at once: ~16 bytes of temporaries per character


def _code_points(text: str) -> np.ndarray:
    """(len(text),) uint32 code points; surrogatepass keeps one entry per str element."""
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype="<u4")


class CharTokenizer:
    """A fixed, sorted character vocabulary plus <|bos|> <|eos|> <|pad|> <|unk|>."""

    kind = "char"

    def __init__(self, chars: str, added_tokens: Sequence[str] = ()):
        """`chars`: the vocabulary, distinct characters in increasing code-point order;
        `added_tokens`: special tokens at ids len(chars) + 4, ... (see with_special_tokens)."""
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
        # code point -> id for encode, <|unk|> for every code point above the last one too
        self._encode_table = np.full(int(cps[-1]) + 2, self.unk_id, dtype=np.int32)
        self._encode_table[cps] = np.arange(len(cps), dtype=np.int32)
        # id -> code point for decode; -1 = emit nothing (bos, eos, pad)
        self._added = new_tokens(added_tokens, self._builtin_id)
        self._added_ids = {t: len(chars) + 4 + i for i, t in enumerate(self._added)}
        self._pattern = added_pattern(self._added)
        self._decode_table = np.concatenate([cps.astype(np.int64), [-1, -1, -1, ord(REPLACEMENT)],
                                             np.full(len(self._added), -1)])

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
        return len(self.chars) + 4 + len(self._added)

    @property
    def added_tokens(self) -> tuple[str, ...]:
        return self._added

    def _builtin_id(self, token: str) -> int | None:
        n = len(self.chars)
        return {BOS: n, EOS: n + 1, PAD: n + 2, UNK: n + 3}.get(token)

    def token_id(self, token: str) -> int | None:
        found = self._builtin_id(token)
        return found if found is not None else self._added_ids.get(token)

    def with_special_tokens(self, tokens: Sequence[str]) -> CharTokenizer:
        """A char tokenizer with `tokens` appended after this one's ids (present ones keep theirs)."""
        return CharTokenizer(self.chars, self._added + new_tokens(tokens, self.token_id))

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

    def encode_array(self, text: str, dtype: np.dtype | str = np.int64,
                     out: np.ndarray | None = None) -> np.ndarray:
        """`encode(text)` as a (len(text),) array of `dtype`, or written into `out` (1-D, of
        length len(text)) and returned. Memory: the result plus O(BLOCK_CHARS). With added tokens
        in the text the array is shorter than the text (one id per added token)."""
        if self._pattern is not None and self._pattern.search(text) is not None:
            parts = [np.array([self._added_ids[p]]) if tok else self.encode_array(p)
                     for p, tok in split_added(text, self._pattern)]
            ids = np.concatenate(parts).astype(dtype if out is None else out.dtype)
            if out is not None and out.shape != ids.shape:
                raise ValueError(f"char encode_array: out has shape {out.shape}, the text needs {ids.shape}")
            if out is None:
                return ids
            out[:] = ids
            return out
        if out is None:
            out = np.empty(len(text), dtype=dtype)
        elif out.shape != (len(text),):
            raise ValueError(f"char encode_array: out has shape {out.shape}, the text needs "
                             f"({len(text)},)")
        above = len(self._encode_table) - 1  # the table's last entry: <|unk|>
        for start in range(0, len(text), BLOCK_CHARS):
            x = _code_points(text[start:start + BLOCK_CHARS])
            out[start:start + len(x)] = self._encode_table[np.minimum(x, above)]
        return out

    def encode(self, text: str) -> list[int]:
        """One id per character of `text` (<|unk|> for characters outside the vocabulary)."""
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # short texts are joined into groups of about BLOCK_CHARS, one numpy pass per group (one
        # pass per text would cost ~10 us each); long ones are encoded alone, not copied
        if self._pattern is not None:  # a text's length is not its number of ids
            return [self.encode(t) for t in texts]
        out: list[list[int]] = []
        group: list[str] = []
        size = 0

        def flush() -> None:
            nonlocal group, size
            if group:
                ids = self.encode_array("".join(group))
                out.extend(part.tolist() for part in np.split(ids, np.cumsum([len(t) for t in group])[:-1]))
            group, size = [], 0

        for t in texts:
            if len(t) >= BLOCK_CHARS:
                flush()
                out.append(self.encode(t))
            else:
                group.append(t)
                size += len(t)
                if size >= BLOCK_CHARS:
                    flush()
        flush()
        return out

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`: <|unk|> becomes U+FFFD, the other specials are dropped."""
        cps = self._decode_table[check_ids(ids, self.vocab_size, self.kind)]
        return cps[cps >= 0].astype("<u4").tobytes().decode("utf-32-le")

    def to_dict(self) -> dict[str, Any]:
        n = len(self.chars)
        obj = {"clusterlm_tokenizer": self.kind, "version": ADDED_TOKENS_VERSION if self._added else FORMAT_VERSION,
               "vocab_size": self.vocab_size,
               "special_tokens": {BOS: n, EOS: n + 1, PAD: n + 2, UNK: n + 3},
               "chars": self.chars}
        if self._added:  # a plain tokenizer's file stays as it was (version 1)
            obj["added_tokens"] = list(self._added)
        return obj

    def to_json_str(self) -> str:
        return json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer JSON to `path` atomically."""
        atomic_write_text(path, self.to_json_str())

    @classmethod
    def from_dict(cls, obj: dict[str, Any], source: str = "<dict>") -> CharTokenizer:
        """Inverse of `to_dict`; `source` names the file in error messages."""
        added = check_version(obj, source)
        chars = obj.get("chars")
        if not isinstance(chars, str):
            raise DataError(f"{source}: char tokenizer file needs a string field 'chars', "
                            f"got {type(chars).__name__}")
        try:
            tok = cls(chars, added)
        except DataError as e:
            raise DataError(f"{source}: {e}") from None
        if len(tok.added_tokens) != len(added):
            raise DataError(f"{source}: added_tokens repeat a built-in special token ({BOS}, {EOS}, {PAD}, {UNK})")
        if obj.get("vocab_size", tok.vocab_size) != tok.vocab_size:
            raise DataError(f"{source}: vocab_size={obj['vocab_size']} but {len(chars)} characters "
                            f"+ 4 specials + {len(added)} added tokens = {tok.vocab_size}")
        n = len(tok.chars)
        check_listed_specials(obj, {BOS: n, EOS: n + 1, PAD: n + 2, UNK: n + 3}, source)
        return tok

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
