"""Byte-level BPE (GPT-2 style) trained and run by Hugging Face `tokenizers` (Rust).

    from clusterlm.tokenizer.bpe import BPETokenizer
    tok = BPETokenizer.train(texts, vocab_size=8192)
    tok.save("tokenizer.json")                   # a plain Hugging Face tokenizer.json
    tok.decode(tok.encode(text)) == text         # for any valid Unicode str

Pipeline: no normalizer (so decoding gives back the exact text), ByteLevel pre-tokenizer with the
GPT-2 split regex and no added prefix space, BPE model, ByteLevel decoder. Training starts from
all 256 byte symbols, so any text encodes without unknown tokens. Ids: 0 = <|bos|>,
1 = <|eos|>, 2 = <|pad|>, 3..258 = the 256 bytes, then one id per learned merge.

Special tokens are only ever produced by the caller (e.g. appending `eos_id`): text that happens
to contain "<|eos|>" encodes as ordinary characters (`encode_special_tokens = True`, which
`tokenizers` does not save in the file, so it is set again on every load). The GPT-2 split regex
also cuts "<|eos|>" into "<|", "eos", "|>", so no merge can rebuild a special token's string.

Any Hugging Face tokenizer.json loads too (`from_str`); its BOS/EOS/PAD ids are looked up by the
names in `BOS_NAMES`, `EOS_NAMES`, `PAD_NAMES` (PAD falls back to EOS). Only files trained here
are guaranteed to round-trip exactly.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from clusterlm.errors import DataError
from clusterlm.fsutil import atomic_write_text
from clusterlm.tokenizer.base import BOS, EOS, PAD
from clusterlm.tokenizer.byte import check_ids, replace_surrogates

log = logging.getLogger(__name__)

DEFAULT_VOCAB_SIZE = 8192
MIN_VOCAB_SIZE = 256 + 3 + 1  # 256 byte symbols + 3 specials + at least one merge
MAX_VOCAB_SIZE = 2**32 - 1  # token ids are stored as uint32 at most (data/shards.py)

# Looked up in order in a tokenizer.json that did not come from clusterlm.
BOS_NAMES = (BOS, "<s>", "<|begin_of_text|>", "<|endoftext|>", "[CLS]")
EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "[SEP]")
PAD_NAMES = (PAD, "<pad>", "[PAD]", "<|padding|>")


def _sanitized(texts: Iterable[str], counter: list[int]) -> Iterator[str]:
    """Yield `texts` with lone surrogates replaced; counter[0] accumulates their characters."""
    for t in texts:
        counter[0] += len(t)
        yield replace_surrogates(t)


class BPETokenizer:
    """A `tokenizers.Tokenizer` behind the clusterlm protocol."""

    kind = "bpe"

    def __init__(self, hf: tokenizers.Tokenizer, source: str = "<memory>"):
        """Wrap `hf`; `source` names the file in error messages."""
        hf.encode_special_tokens = True  # literal "<|eos|>" in text is text (not saved in files)
        self._hf = hf
        vocab = hf.get_vocab(with_added_tokens=True)
        if not vocab:
            raise DataError(f"{source}: tokenizer has an empty vocabulary")
        self._vocab_size = max(vocab.values()) + 1  # ids may have holes in foreign files

        def find(names: tuple[str, ...]) -> int | None:
            return next((vocab[n] for n in names if n in vocab), None)

        bos, eos, pad = find(BOS_NAMES), find(EOS_NAMES), find(PAD_NAMES)
        missing = [f"{what} (one of {', '.join(names)})"
                   for what, names, got in (("BOS", BOS_NAMES, bos), ("EOS", EOS_NAMES, eos))
                   if got is None]
        if missing:
            raise DataError(f"{source}: tokenizer has no token for {' and '.join(missing)}; "
                            f"add them as special tokens or retrain with clusterlm")
        self._bos_id, self._eos_id = int(bos), int(eos)
        self._pad_id = int(pad) if pad is not None else self._eos_id
        model_type = type(hf.model).__name__
        if model_type != "BPE":
            log.warning("%s: a %s tokenizer, loaded as kind 'bpe'; exact round trips are only "
                        "guaranteed for tokenizers trained by clusterlm", source, model_type)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None) -> BPETokenizer:
        """Learn merges from `texts` up to `vocab_size` tokens in all (default 8192)."""
        if vocab_size is None:
            vocab_size = DEFAULT_VOCAB_SIZE
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)):
            raise ValueError(f"bpe vocab_size must be an integer, got {vocab_size!r}")
        if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
            raise ValueError(f"bpe vocab_size={vocab_size} must be in [{MIN_VOCAB_SIZE}, "
                             f"{MAX_VOCAB_SIZE}]: 256 byte tokens + 3 specials + at least one merge")
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=[BOS, EOS, PAD],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        n_chars = [0]
        hf.train_from_iterator(_sanitized(texts, n_chars), trainer=trainer)
        if n_chars[0] == 0:
            raise DataError("cannot train a bpe tokenizer: the training texts hold no characters")
        tok = cls(hf)
        if tok.vocab_size < vocab_size:
            log.info("bpe: the training text (%d characters) supports only %d of the %d tokens asked "
                     "for", n_chars[0], tok.vocab_size, vocab_size)
        return tok

    @classmethod
    def from_str(cls, text: str, source: str = "<str>") -> BPETokenizer:
        """Load a Hugging Face tokenizer.json given as a string."""
        try:
            hf = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises a bare Exception for malformed files
            raise DataError(f"{source}: not a valid Hugging Face tokenizer file: {e}") from None
        return cls(hf, source)

    @property
    def hf_tokenizer(self) -> tokenizers.Tokenizer:
        return self._hf

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (lone surrogates as U+FFFD), without BOS/EOS."""
        try:
            return self._hf.encode(text, add_special_tokens=False).ids
        except TypeError:  # pyo3 refuses str with lone surrogates
            if not isinstance(text, str):
                raise TypeError(f"bpe encode takes a str, got {type(text).__name__}") from None
            return self._hf.encode(replace_surrogates(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, run in parallel by the Rust side."""
        texts = list(texts)
        try:
            encs = self._hf.encode_batch_fast(texts, add_special_tokens=False)
        except TypeError:
            bad = next((type(t).__name__ for t in texts if not isinstance(t, str)), None)
            if bad is not None:
                raise TypeError(f"bpe encode_batch takes a list of str, got a {bad}") from None
            encs = self._hf.encode_batch_fast([replace_surrogates(t) for t in texts],
                                              add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`; special tokens are dropped, invalid UTF-8 becomes U+FFFD."""
        arr = check_ids(ids, self.vocab_size, self.kind)
        return self._hf.decode(arr.tolist(), skip_special_tokens=True)

    def to_json_str(self) -> str:
        return self._hf.to_str(pretty=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write the Hugging Face tokenizer.json to `path` atomically."""
        atomic_write_text(path, self.to_json_str())

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"
