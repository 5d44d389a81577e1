"""Byte-level BPE (GPT-2 style) trained and run by Hugging Face `tokenizers` (Rust).

    from clusterlm.tokenizer.bpe import BPETokenizer
    tok = BPETokenizer.train(texts, vocab_size=8192)
    tok.save("tokenizer.json")                   # a plain Hugging Face tokenizer.json
    tok.decode(tok.encode(text)) == text         # for any valid Unicode str

Pipeline: no normalizer (so decoding gives back the exact text), ByteLevel pre-tokenizer with the
GPT-2 split regex and no added prefix space, then a Split that cuts any piece longer than
MAX_PIECE_BYTES bytes into pieces of at most that many, BPE model, ByteLevel decoder. Training
starts from all 256 byte symbols, so any text encodes without unknown tokens.

Why the cap: the GPT-2 regex keeps a run of letters as one piece, and the trainer's time grows
about quadratically with a piece's length, so space-free text (base64, minified code, DNA) took
minutes per megabyte. Capped, training time is linear in the input. Ordinary words are far below
the cap, so on normal text the cap changes nothing. The cap is part of the saved pre-tokenizer,
so encoding splits exactly as training did.

A long document is handed to `tokenizers` in slices of about SLICE_CHARS characters, cut where the
pre-tokenizer puts a piece boundary (`slices`), so the pieces, hence the training counts and the
ids, are those of the whole document, while the memory `tokenizers` needs (about 100 bytes per
byte of one text to train, and per token of one batch to encode) stays bounded.

Training runs in a child process (`python -c _TRAIN_CHILD`, which needs only `tokenizers`): Rust
training does not return to Python, so no signal handler runs, until it ends, and a Python thread
left inside Rust makes the interpreter abort at exit. This process streams the texts to the
child's stdin and waits in WAIT_STEP_S steps, so Ctrl-C and SIGTERM handlers run at once; on any
exception the child is killed. Encoding runs in this process, at most ENCODE_GROUP_CHARS
characters per call into Rust (~0.5 s), so a signal waits at most that long.

Ids: 0 = <|bos|>, 1 = <|eos|>, 2 = <|pad|>, 3..258 = the 256 bytes, then one id per learned merge.

Special tokens are only ever produced by the caller (e.g. appending `eos_id`): text that happens
to contain "<|eos|>" encodes as ordinary characters (`encode_special_tokens = True`, which
`tokenizers` does not save in the file, so it is set again on every load). The GPT-2 split regex
also cuts "<|eos|>" into "<|", "eos", "|>", so no merge can rebuild a special token's string.

Special tokens added with `with_special_tokens` (e.g. the chat roles) are Hugging Face added tokens
with special=false, so `tokenizers` matches them in text even with `encode_special_tokens` (which
only keeps special=true tokens, <|bos|> <|eos|> <|pad|>, as text). `added_tokens` are the
special=false added tokens shaped <...> (base.check_special_tokens), which `decode` and the stream
detokenizer drop like the other specials.

Any Hugging Face tokenizer.json loads too (`from_str`); its BOS/EOS/PAD ids are looked up by the
names in `BOS_NAMES`, `EOS_NAMES`, `PAD_NAMES` (PAD falls back to EOS). Only files trained here
are guaranteed to round-trip exactly.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from clusterlm.errors import ClusterlmError, DataError
from clusterlm.fsutil import atomic_write_text
from clusterlm.tokenizer.base import (
    SPECIAL_SHAPE,
    BOS,
    EOS,
    PAD,
    added_pattern,
    check_ids,
    new_tokens,
    replace_surrogates,
    split_added,
)

log = logging.getLogger(__name__)

DEFAULT_VOCAB_SIZE = 8192
MIN_VOCAB_SIZE = 256 + 3 + 1  # 256 byte symbols + 3 specials + at least one merge
# 2**24: far above any language model's vocabulary (the largest are ~256k), and below what `tokenizers`'
# BpeTrainer can allocate: it reserves tables sized to the vocabulary up front (1e9 asked for 70 GB and
# the training process aborted). Token ids are stored as uint32 at most (data/shards.py).
MAX_VOCAB_SIZE = 2**24
# Longest pre-tokenization piece, in UTF-8 bytes; longer runs are cut (see the module docstring).
# Above any word or whitespace run of ordinary text; numbers in docs/tokenizers.md.
MAX_PIECE_BYTES = 256
WAIT_STEP_S = 0.05  # how often this process wakes up, while the child trains, to run signal handlers
SLICE_CHARS = 1 << 16  # characters of one text handed to `tokenizers` at most (about; see slices)
ENCODE_GROUP_CHARS = 1 << 20  # characters encoded per `encode_batch_fast` call by `encode_arrays`
# a whitespace character after a non-whitespace one always starts a GPT-2 piece (checked for
# every code point, tests/unit/test_tokenizers.py); Python's \s holds every character the Rust regex's does
_WS_BOUNDARY = re.compile(r"\S[ \n]")

# Looked up in order in a tokenizer.json that did not come from clusterlm.
BOS_NAMES = (BOS, "<s>", "<|begin_of_text|>", "<|endoftext|>", "[CLS]")
EOS_NAMES = (EOS, "</s>", "<|end_of_text|>", "<|endoftext|>", "[SEP]")
PAD_NAMES = (PAD, "<pad>", "[PAD]", "<|padding|>")


_END = 2**64 - 1  # length field that ends the texts sent to the training child
_LENGTH = struct.Struct("<Q")
# The training child. It ignores SIGINT/SIGTERM (sent to the whole process group by Ctrl-C and
# Slurm): the parent handles them and kills it. It exits if the parent dies (stdin ends, or its
# parent id changes while it trains). argv: untrained tokenizer JSON, BpeTrainer kwargs, output.
_TRAIN_CHILD = r"""
import json, os, signal, struct, sys, threading, time
import tokenizers
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
parent = os.getppid()
def orphaned():
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)
threading.Thread(target=orphaned, daemon=True).start()
hf = tokenizers.Tokenizer.from_str(sys.argv[1])
trainer = tokenizers.trainers.BpeTrainer(**json.loads(sys.argv[2]), show_progress=False,
                                         initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
stdin, length = sys.stdin.buffer, struct.Struct("<Q")
def texts():
    while True:
        head = stdin.read(length.size)
        if len(head) < length.size:
            sys.exit("bpe trainer: the parent process stopped sending texts")
        (n,) = length.unpack(head)
        if n == 2**64 - 1:
            return
        yield stdin.read(n).decode("utf-8")
hf.train_from_iterator(texts(), trainer=trainer)
hf.save(sys.argv[3])
"""


def slices(text: str, pre: pre_tokenizers.PreTokenizer, max_chars: int | None = None) -> Iterator[str]:
    """Consecutive parts of `text` (all of it, in order), each cut where the byte-level
    pre-tokenizer `pre` starts a piece, so pre-tokenizing the parts one by one gives the pieces of
    the whole text. Parts have at most `max_chars` (None: SLICE_CHARS) characters where the text
    allows. A cut is at a whitespace character after a non-whitespace one in the second half of the
    window; failing that (space-free text), at a piece start that `pre` finds in the window, short
    of its last piece (the last GPT-2 piece may be cut short by the window's end; the pieces before
    it are as in the whole text, since the regex looks neither behind nor more than one character
    ahead). A piece that starts inside a character (the byte cap cuts multi-byte characters) is not
    a cut. A window with no cut is doubled until it has one (a file trained before MAX_PIECE_BYTES,
    with one piece over the whole window, ends up as one part)."""
    max_chars = SLICE_CHARS if max_chars is None else max_chars
    start, n = 0, len(text)
    while n - start > max_chars:
        m = _WS_BOUNDARY.search(text, start + max_chars // 2, start + max_chars)
        cut = m.start() + 1 if m is not None else None
        window = max_chars
        while cut is None and start + window < n:
            pieces = pre.pre_tokenize_str(text[start:start + window])
            cut = next((start + pieces[k][1][0] for k in range(len(pieces) - 2, 0, -1)
                        if pieces[k][1][0] == pieces[k - 1][1][1] > 0), None)
            window *= 2
        if cut is None:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _sanitized(texts: Iterable[str], counter: list[int], pre: pre_tokenizers.PreTokenizer) -> Iterator[str]:
    """Yield `texts` with lone surrogates replaced, long ones in `slices`; counter[0] accumulates
    their characters."""
    for t in texts:
        counter[0] += len(t)
        yield from slices(replace_surrogates(t), pre)


def _train_in_child(hf: tokenizers.Tokenizer, trainer_kwargs: dict, texts: Iterable[str]) -> tokenizers.Tokenizer:
    """`hf` trained on `texts` by a child process; see the module docstring for why."""
    with tempfile.TemporaryDirectory(prefix="clusterlm-bpe-") as tmp:
        out, err_path = Path(tmp) / "tokenizer.json", Path(tmp) / "stderr.txt"
        with open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-c", _TRAIN_CHILD, hf.to_str(), json.dumps(trainer_kwargs),
                                     str(out)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
        try:
            try:
                for text in texts:
                    data = text.encode("utf-8")
                    proc.stdin.write(_LENGTH.pack(len(data)))  # type: ignore[union-attr]
                    proc.stdin.write(data)  # type: ignore[union-attr]
                proc.stdin.write(_LENGTH.pack(_END))  # type: ignore[union-attr]
                proc.stdin.close()  # type: ignore[union-attr]
            except BrokenPipeError:  # the child died: its exit status and stderr say why, below
                pass
            while True:
                try:
                    code = proc.wait(WAIT_STEP_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            with contextlib.suppress(OSError):  # data still buffered for a dead child
                proc.stdin.close()  # type: ignore[union-attr]
        if code != 0:
            lines = err_path.read_text(errors="replace").strip().splitlines()
            # the cause, where the Rust runtime said it (a backtrace follows it), else the last lines
            why = [ln for ln in lines if "memory allocation" in ln][:1] or lines[-3:]
            status = f"exit code {code}" if code > 0 else f"killed by signal {-code}"
            if code == -9:
                status += ", out of memory?"
            raise ClusterlmError(f"the bpe training process failed ({status})"
                                 + (f": {' / '.join(why)}" if why else ""))
        return tokenizers.Tokenizer.from_file(str(out))


def pre_tokenizer(max_piece_bytes: int = MAX_PIECE_BYTES) -> pre_tokenizers.PreTokenizer:
    """GPT-2 byte-level split, then pieces longer than `max_piece_bytes` bytes cut into pieces of
    at most that many (after ByteLevel every byte is one symbol, none of them a newline, so `.`
    counts bytes)."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        pre_tokenizers.Split(Regex(f".{{1,{int(max_piece_bytes)}}}"), behavior="isolated"),
    ])


@functools.cache
def _sliceable_pre_tokenizers() -> tuple[dict, ...]:
    """The saved form of the pre-tokenizers `slices` is exact for: ours, and the one before the cap."""
    return tuple(json.loads(p.__getstate__()) for p in
                 (pre_tokenizer(), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)))


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
        self._specials = {BOS: self._bos_id, EOS: self._eos_id, PAD: self._pad_id}
        decoder = hf.get_added_tokens_decoder()  # id -> AddedToken, in id order
        self._added_ids = {t.content: i for i, t in sorted(decoder.items())
                           if not t.special and SPECIAL_SHAPE.fullmatch(t.content)
                           and i not in (self._bos_id, self._eos_id, self._pad_id)}
        self._added = tuple(self._added_ids)
        self._added_id_array = np.array(sorted(self._added_ids.values()), dtype=np.int64)
        self._pattern = added_pattern(self._added)
        self._other_added = {t.content: i for i, t in decoder.items()}  # token_id of foreign specials
        model_type = type(hf.model).__name__
        # slicing long texts keeps the ids only for the byte-level pipelines clusterlm trains
        pre = json.loads(hf.pre_tokenizer.__getstate__()) if hf.pre_tokenizer is not None else None
        self._sliceable = (model_type == "BPE" and hf.normalizer is None
                           and pre in _sliceable_pre_tokenizers())
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
        hf.pre_tokenizer = pre_tokenizer()
        hf.decoder = decoders.ByteLevel()
        n_chars = [0]
        hf = _train_in_child(hf, {"vocab_size": int(vocab_size), "special_tokens": [BOS, EOS, PAD]},
                             _sanitized(texts, n_chars, hf.pre_tokenizer))
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
    def added_tokens(self) -> tuple[str, ...]:
        return self._added

    @property
    def added_ids(self) -> frozenset[int]:
        """Ids of `added_tokens` (what decode and the stream detokenizer drop)."""
        return frozenset(self._added_ids.values())

    def token_id(self, token: str) -> int | None:
        found = self._specials.get(token)
        return found if found is not None else self._other_added.get(token)

    def with_special_tokens(self, tokens: Sequence[str]) -> BPETokenizer:
        """A BPE tokenizer with `tokens` appended as added tokens after this one's ids (present ones,
        including any added token of a foreign file, keep theirs)."""
        hf = tokenizers.Tokenizer.from_str(self._hf.to_str())
        new = new_tokens(tokens, self.token_id)
        if new:
            first = self._vocab_size
            hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in new])
            got = [hf.token_to_id(t) for t in new]
            # the ids follow the vocabulary (a foreign file whose ids have holes might place them elsewhere)
            if got != list(range(first, first + len(new))):
                raise DataError(f"adding {list(new)} gave ids {got}, not {first}..{first + len(new) - 1}; "
                                f"this tokenizer.json's ids are not contiguous")
        return BPETokenizer(hf)

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
        if self._sliceable and isinstance(text, str) and len(text) > SLICE_CHARS:
            return self.encode_arrays([text])[0].tolist()  # bounded memory, see encode_arrays
        try:
            return self._hf.encode(text, add_special_tokens=False).ids
        except TypeError:  # pyo3 refuses str with lone surrogates
            if not isinstance(text, str):
                raise TypeError(f"bpe encode takes a str, got {type(text).__name__}") from None
            return self._hf.encode(replace_surrogates(text), add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` of each text, run in parallel by the Rust side."""
        return [a.tolist() for a in self.encode_arrays(list(texts))]

    def encode_arrays(self, texts: Sequence[str], dtype: np.dtype | str = np.int64) -> list[np.ndarray]:
        """`encode_batch(texts)` as one array of `dtype` per text. Long texts go in `slices` (when
        that keeps the ids: tokenizers trained by clusterlm) and at most ENCODE_GROUP_CHARS
        characters are encoded per call, so memory is the ids plus a bounded batch."""
        out: list[list[np.ndarray]] = [[] for _ in texts]
        group: list[str] = []
        owners: list[int] = []
        size = 0

        def flush() -> None:
            nonlocal group, owners, size
            if not group:
                return
            try:
                encs = self._hf.encode_batch_fast(group, add_special_tokens=False)
            except TypeError:  # pyo3 refuses str with lone surrogates
                bad = next((type(t).__name__ for t in group if not isinstance(t, str)), None)
                if bad is not None:
                    raise TypeError(f"bpe encode_batch takes a list of str, got a {bad}") from None
                encs = self._hf.encode_batch_fast([replace_surrogates(t) for t in group], add_special_tokens=False)
            for i, e in zip(owners, encs):
                out[i].append(np.asarray(e.ids, dtype=dtype))
            group, owners, size = [], [], 0

        pre = self._hf.pre_tokenizer

        def parts(text: str) -> Iterator[str]:
            # added tokens are matched before pre-tokenization, so cutting the text at them first
            # keeps the ids, and no slice can cut one in two
            for part, is_token in split_added(text, self._pattern):
                yield from (part,) if is_token else slices(part, pre)

        for i, text in enumerate(texts):
            long = self._sliceable and isinstance(text, str) and len(text) > SLICE_CHARS
            for part in parts(text) if long else (text,):
                group.append(part)
                owners.append(i)
                size += len(part) if isinstance(part, str) else 0
                if size >= ENCODE_GROUP_CHARS:
                    flush()
        flush()
        return [p[0] if len(p) == 1 else np.concatenate(p) for p in out]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`; special tokens are dropped, invalid UTF-8 becomes U+FFFD."""
        arr = check_ids(ids, self.vocab_size, self.kind)
        if len(self._added_id_array):
            arr = arr[~np.isin(arr, self._added_id_array)]
        return self._hf.decode(arr.tolist(), skip_special_tokens=True)

    def to_json_str(self) -> str:
        return self._hf.to_str(pretty=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write the Hugging Face tokenizer.json to `path` atomically."""
        atomic_write_text(path, self.to_json_str())

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"
