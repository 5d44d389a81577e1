"""The tokenizer protocol every kind implements, and the helpers the kinds share.

A tokenizer is saved as one JSON file. BPE tokenizers are Hugging Face `tokenizers` files
(loadable by `tokenizers.Tokenizer.from_file` and by `transformers`); byte and char tokenizers
are small JSON files with a "clusterlm_tokenizer" field naming the kind.

Special tokens can be added to every kind (`with_special_tokens`, e.g. the chat roles of
clusterlm.generate.template): they take the ids after the existing ones, and `encode` maps each
occurrence of an added token's string in the text to its id. <|bos|>, <|eos|> and <|pad|> written
in text stay text, so data without added tokens encodes exactly as before; `decode` drops added
tokens like the other specials.

Imports run downhill: byte.py, char.py and bpe.py import only this file; kinds.py dispatches to
them by name and holds `load_tokenizer` (re-exported as `clusterlm.tokenizer.load_tokenizer`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from clusterlm.errors import DataError

KINDS = ("byte", "char", "bpe")
BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
FORMAT_VERSION = 1  # of the byte and char JSON files
ADDED_TOKENS_VERSION = 2  # the same, with an "added_tokens" list (written only when tokens were added)
# an added token's string: <...> without whitespace inside, like the chat tokens "<|user|>"; the shape
# lets a BPE tokenizer.json tell them from other added tokens (bpe.py) and keeps them out of words
SPECIAL_SHAPE = re.compile(r"<[^\s<>]+>")
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

    @property
    def added_tokens(self) -> tuple[str, ...]:
        """The special tokens added with `with_special_tokens`, in id order (() for none)."""
        ...

    def token_id(self, token: str) -> int | None:
        """Id of a special token string (<|bos|>, <|eos|>, <|pad|>, an added one), None if absent."""
        ...

    def with_special_tokens(self, tokens: Sequence[str]) -> Tokenizer:
        """A new tokenizer of the same kind: this vocabulary plus `tokens` appended in order (tokens
        already present keep their ids; no existing id changes)."""
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
    if arr.ndim == 1 and (arr.dtype == object or arr.dtype == np.uint64) and all(
            isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in arr):
        # integers past int64 (numpy gives an object array) or a uint64 array: name the id, not the dtype
        for i, x in enumerate(arr):
            if not 0 <= int(x) < vocab_size:
                raise ValueError(f"{kind} tokenizer: id {int(x)} at position {i} is outside the "
                                 f"vocabulary [0, {vocab_size})")
        arr = arr.astype(np.int64)
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


def check_version(obj: dict[str, Any], source: str) -> tuple[str, ...]:
    """The added tokens of a byte/char tokenizer file (() for version 1); DataError unless it has a
    version this code reads and, for version 2, a list of distinct token strings."""
    version = obj.get("version")
    if version not in (FORMAT_VERSION, ADDED_TOKENS_VERSION):
        raise DataError(f"{source}: {obj.get('clusterlm_tokenizer')} tokenizer file has "
                        f"version={version!r}; this clusterlm reads versions {FORMAT_VERSION} and "
                        f"{ADDED_TOKENS_VERSION}")
    if version == FORMAT_VERSION:
        return ()
    added = obj.get("added_tokens")
    if not isinstance(added, list) or not all(isinstance(t, str) for t in added):
        raise DataError(f"{source}: version {ADDED_TOKENS_VERSION} tokenizer file needs an 'added_tokens' "
                        f"list of strings, got {added!r:.80}")
    try:
        return tuple(check_special_tokens(added))
    except ValueError as e:
        raise DataError(f"{source}: {e}") from None


def check_listed_specials(obj: dict[str, Any], expected: dict[str, int], source: str) -> None:
    """DataError when a byte/char file's 'special_tokens' (written for people; the ids follow from
    the layout) disagree with the ids the file gives, e.g. after a hand edit that would otherwise
    be ignored without a word. A file without the field is accepted."""
    listed = obj.get("special_tokens", expected)
    if listed != expected:
        raise DataError(f"{source}: special_tokens={listed!r:.120} but this {obj.get('clusterlm_tokenizer')} "
                        f"vocabulary puts them at {expected}; the ids follow from the layout "
                        f"(docs/tokenizers.md), so correct the field or remove it")


def check_special_tokens(tokens: Sequence[str]) -> list[str]:
    """`tokens` as a list after checking each is a distinct <...> string without whitespace."""
    if isinstance(tokens, str):
        raise ValueError(f"special tokens must be a sequence of strings, got the string {tokens!r}")
    out = list(tokens)
    for t in out:
        if not isinstance(t, str) or not SPECIAL_SHAPE.fullmatch(t):
            raise ValueError(f"special token {t!r} must look like <...> with no whitespace or <> inside "
                             f"(e.g. '<|user|>')")
    dup = sorted({t for t in out if out.count(t) > 1})
    if dup:
        raise ValueError(f"special tokens {dup} are given more than once")
    return out


def new_tokens(tokens: Sequence[str], present: Callable[[str], int | None]) -> tuple[str, ...]:
    """The checked `tokens` that `present` (a tokenizer's token_id) does not know yet, in order."""
    return tuple(t for t in check_special_tokens(tokens) if present(t) is None)


def added_pattern(tokens: Sequence[str]) -> re.Pattern | None:
    """A regex matching any of `tokens` (longest first, so the leftmost-longest match wins, as the
    added-token matcher of Hugging Face `tokenizers` does), or None for no tokens."""
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def split_added(text: str, pattern: re.Pattern | None) -> list[tuple[str, bool]]:
    """`text` as consecutive (part, is_added_token) pairs; empty parts are left out."""
    if pattern is None:
        return [(text, False)] if text else []
    parts: list[tuple[str, bool]] = []
    start = 0
    for m in pattern.finditer(text):
        if m.start() > start:
            parts.append((text[start:m.start()], False))
        parts.append((m.group(), True))
        start = m.end()
    if start < len(text):
        parts.append((text[start:], False))
    return parts


def unknown_chars(tok: Any, text: str) -> tuple[list[str], str | None]:
    """The characters of `text` that `tok` has no token for, one entry per occurrence in text order, and what
    they encode to: the unknown token (a char tokenizer's "<|unk|>", a foreign tokenizer's unk_token), or None
    when they are dropped (a foreign tokenizer without one). Byte tokenizers and the byte-level BPE clusterlm
    trains encode any text: ([], ...). Added tokens (chat roles) in the text are their own ids, not characters.
    One encode per distinct character, so meant for a prompt or a command-line text, not a corpus."""
    if tok.kind == "byte":
        return [], None
    unk_id, unk = getattr(tok, "unk_id", None), "<|unk|>"
    hf = getattr(tok, "hf_tokenizer", None)
    if unk_id is None and hf is not None:
        unk = getattr(hf.model, "unk_token", None)
        unk_id = hf.token_to_id(unk) if unk else None
    for special in getattr(tok, "added_tokens", ()):
        text = text.replace(special, "")
    # a whitespace character that encodes to nothing is a pre-tokenizer's split (WordPiece), not a loss
    bad = {c for c in set(text)
           if (ids := tok.encode(c)) == [unk_id] or (not ids and not c.isspace())}
    return [c for c in text if c in bad], (unk if unk_id is not None else None)
