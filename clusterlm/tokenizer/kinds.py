"""Make, train and load tokenizers of every kind by name: "byte", "char", "bpe".

    from clusterlm.tokenizer.kinds import load_tokenizer, make_tokenizer, train_tokenizer
    tok = train_tokenizer("bpe", texts, vocab_size=2048)   # or "char", or "byte" (no training)
    tok.save("data/tokenizer.json")
    tok = load_tokenizer("data/tokenizer.json")   # also clusterlm.tokenizer.load_tokenizer

A saved file is JSON. A "clusterlm_tokenizer" field names a byte or char tokenizer; a "model"
field marks a Hugging Face tokenizer.json (ours for "bpe", or one made elsewhere). The formats
are described in docs/tokenizers.md.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from clusterlm.errors import ConfigError, DataError
from clusterlm.tokenizer.base import KINDS, Tokenizer
from clusterlm.tokenizer.bpe import BPETokenizer
from clusterlm.tokenizer.byte import ByteTokenizer
from clusterlm.tokenizer.char import CharTokenizer

_SAVED_KINDS = {"byte": ByteTokenizer, "char": CharTokenizer}  # kinds with our own JSON format


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind).lower(), KINDS, n=1)  # "BPE" -> "bpe" too, as prepare does
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown tokenizer kind {kind!r}{hint}; valid kinds: {', '.join(KINDS)}")


def make_tokenizer(kind: str) -> Tokenizer:
    """A tokenizer that needs no training: only "byte"."""
    _check_kind(kind)
    if kind != "byte":
        raise ConfigError(f"a {kind} tokenizer is learned from text: use "
                          f"train_tokenizer({kind!r}, texts); only 'byte' needs no training")
    return ByteTokenizer()


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int | None = None) -> Tokenizer:
    """A tokenizer of `kind` learned from `texts` (read once, as a stream).

    `vocab_size` is for "bpe" (total tokens incl. the 3 specials; None = 8192). "char" takes its
    size from the text and "byte" is always 259, so for them it must be None (or 259 for byte).
    "byte" does not read `texts`.
    """
    _check_kind(kind)
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size)
    if kind == "byte":
        if vocab_size not in (None, ByteTokenizer().vocab_size):
            raise ConfigError(f"vocab_size={vocab_size} for a byte tokenizer, whose vocabulary is "
                              f"always 259 (256 bytes + 3 specials); leave vocab_size unset")
        return ByteTokenizer()
    if vocab_size is not None:
        raise ConfigError(f"vocab_size={vocab_size} for a char tokenizer, whose vocabulary is the "
                          f"distinct characters of the text (+4 specials); leave vocab_size unset "
                          f"or use the bpe tokenizer")
    return CharTokenizer.train(texts)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer file written by any kind's `save`, or any Hugging Face tokenizer.json."""
    path = Path(path)
    if path.is_dir():  # FileNotFoundError still: callers treat it as "no tokenizer file there"
        raise FileNotFoundError(f"{path} is a directory, not a tokenizer file; give the tokenizer's .json file "
                                "(a checkpoint holds it as tokenizer.json)")
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        obj = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not a tokenizer file (not UTF-8 JSON: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a tokenizer file: JSON {type(obj).__name__}, not an object")
    if "clusterlm_tokenizer" in obj:
        kind = obj["clusterlm_tokenizer"]
        cls = _SAVED_KINDS.get(kind) if isinstance(kind, str) else None
        if cls is None:
            raise DataError(f"{path}: unknown clusterlm_tokenizer kind {kind!r}; files with this "
                            f"field hold one of {', '.join(_SAVED_KINDS)} (bpe is saved as a "
                            f"Hugging Face tokenizer.json)")
        return cls.from_dict(obj, source=str(path))
    if "model" in obj:
        return BPETokenizer.from_str(text, source=str(path))
    raise DataError(f"{path} is JSON but not a tokenizer file: expected a 'clusterlm_tokenizer' "
                    f"field (kinds {', '.join(_SAVED_KINDS)}) or a Hugging Face 'model' field "
                    f"(kind bpe)")
