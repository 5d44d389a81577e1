"""`clusterlm prepare`: text and JSONL files -> tokenizer.json + token shards + meta.json.

    clusterlm prepare corpus/ more/*.jsonl.zst --out data/mine --tokenizer bpe --vocab-size 8192
    clusterlm prepare --builtin shakespeare --out data/shakespeare_char --tokenizer char
    from clusterlm.data.prepare import prepare
    meta = prepare(["builtin:shakespeare"], "data/shakespeare_char", tokenizer="char")

Three passes over the inputs (re-read rather than held in memory, so a corpus larger than RAM
works; the bundled corpus is cached in memory):
  1. scan: read and clean every document (sources.py policy, then --redact-pii), hash it, drop
     exact duplicates (--dedup), choose its split (`is_val`), count everything;
  2. train the char or BPE tokenizer on the train split's documents, streamed (skipped for
     byte or a tokenizer file);
  3. tokenize: --workers N processes encode chunks of documents with `encode_batch`, one core
     each: this one and N-1 helpers (spawn context, started at the beginning so they boot
     during pass 1). Results are used in input order, each document followed by EOS, and fill
     the shards of its split in order, so the output is byte-identical for any --workers. With
     --workers 1, or when everything fits in one chunk, no helper is started.
Everything is written in a hidden staging folder beside DATA_DIR, meta.json last, and the folder
is renamed to DATA_DIR at the end (fsutil.staging_dir). The format is in docs/data.md.

This file holds the passes and the job; the helper processes and signals are in workers.py, the
chunk encoder they run in encode.py, and the shard files (ShardWriter) in shards.py.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import logging
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clusterlm.data import shards
from clusterlm.data.encode import encode_chunk, encode_chunk_from_file
from clusterlm.data.sources import DocumentReader, Source, discover
from clusterlm.data.workers import one_core, terminate_as_interrupt, worker_pool
from clusterlm.errors import ClusterlmError, ConfigError, DataError
from clusterlm.fsutil import atomic_write_json, sha256_file, staging_dir
from clusterlm.tokenizer.base import KINDS

log = logging.getLogger(__name__)

DEFAULT_SHARD_TOKENS = 2**26
MAX_DEFAULT_WORKERS = 8
MIN_CHUNK_CHARS, MAX_CHUNK_CHARS = 1 << 16, 1 << 22  # characters of text sent to a worker at once
# A chunk above this (one huge document) is encoded in this process: sending it to a helper would
# hold its pickled text and pickled tokens in memory on both sides.
MAX_SHIPPED_CHARS = 1 << 26
DROP, TRAIN, VAL = 0, 1, 2  # per-document decision of the scan pass
SPLIT_RULE = ("a document goes to val iff int(sha256(utf8(text)).hexdigest()[:16], 16) / 2**64 "
              "< val_fraction, text being the document after cleaning and PII redaction; if val "
              "would be empty (val_fraction > 0, 2+ distinct documents), the documents with the "
              "smallest hash go to val; if train would be empty, those with the largest hash go to "
              "train")


@dataclass(frozen=True)
class PrepareOptions:
    tokenizer: str = "bpe"
    """byte, char, bpe, or the path of a tokenizer.json"""
    vocab_size: int | None = None
    """BPE vocabulary size incl. specials (None = 8192); not for byte, char or a file"""
    val_fraction: float = 0.1
    """expected fraction of documents in the val split, in [0, 1)"""
    workers: int | None = None
    """processes that tokenize, this one included (None = usable CPUs, at most 8)"""
    text_field: str = "text"
    """field of a JSONL record that holds the document"""
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    """tokens per shard file (the last shard of a split holds the rest)"""
    dedup: bool = False
    """drop exact duplicate documents (same sha256 of the cleaned text)"""
    redact_pii: bool = False
    """replace e-mail addresses, phone numbers, IPs and card numbers (data/pii.py)"""
    overwrite: bool = False
    """replace an existing data directory"""
    follow_symlinks: bool = False
    """read symlinks found in input folders/globs that lead outside them (dangling ones and loops are
    always skipped); see docs/data.md"""
    progress: bool | None = None
    """tqdm progress bars (None = when stderr is a terminal)"""

    def __post_init__(self) -> None:
        if not isinstance(self.val_fraction, (int, float)) or not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction!r} must be in [0, 1)")
        if isinstance(self.shard_tokens, bool) or not isinstance(self.shard_tokens, int) or self.shard_tokens < 1:
            raise ConfigError(f"shard_tokens={self.shard_tokens!r} must be an integer >= 1")
        if self.workers is not None and (isinstance(self.workers, bool) or not isinstance(self.workers, int)
                                         or self.workers < 1):
            raise ConfigError(f"workers={self.workers!r} must be an integer >= 1 (or None for all usable CPUs)")
        if self.vocab_size is not None and (isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int)):
            raise ConfigError(f"vocab_size={self.vocab_size!r} must be an integer")


def is_val(digest: bytes, val_fraction: float) -> bool:
    """The split rule: True when a document with this sha256 digest belongs to val."""
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT_WORKERS))


# -- tokenizer choice ---------------------------------------------------------------------------------


def _check_tokenizer_arg(tokenizer: str, vocab_size: int | None) -> Path | None:
    """Validate --tokenizer/--vocab-size before any reading; the tokenizer file's path, if one."""
    if tokenizer in KINDS:
        if tokenizer == "byte" and vocab_size not in (None, 259):
            raise ConfigError(f"vocab_size={vocab_size} for the byte tokenizer, whose vocabulary is always "
                              "259 (256 bytes + 3 specials); leave it unset")
        if tokenizer == "char" and vocab_size is not None:
            raise ConfigError(f"vocab_size={vocab_size} for the char tokenizer, whose vocabulary is the "
                              "distinct characters of the train split (+4 specials); leave it unset")
        if tokenizer == "bpe" and vocab_size is not None:
            from clusterlm.tokenizer.bpe import MAX_VOCAB_SIZE, MIN_VOCAB_SIZE

            if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
                raise ConfigError(f"bpe vocab_size={vocab_size} is outside [{MIN_VOCAB_SIZE}, {MAX_VOCAB_SIZE}]: "
                                  "256 byte tokens + 3 specials + at least one merge")
        return None
    path = Path(tokenizer)
    if path.is_file():
        if vocab_size is not None:
            raise ConfigError(f"vocab_size={vocab_size} with the tokenizer file {path}, whose vocabulary is "
                              "fixed; leave it unset")
        return path
    if path.is_dir():
        raise ConfigError(f"tokenizer {tokenizer!r} is a directory; give byte, char, bpe or a tokenizer.json file")
    if os.sep in tokenizer or "/" in tokenizer or tokenizer.endswith(".json"):
        raise FileNotFoundError(f"tokenizer file {tokenizer!r} does not exist; --tokenizer takes byte, char, "
                                "bpe or the path of a tokenizer.json")
    close = difflib.get_close_matches(tokenizer.lower(), KINDS, n=1)  # "BPE" -> "bpe" too
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"unknown tokenizer {tokenizer!r}{hint}; valid: {', '.join(KINDS)} or the path of a "
                      "tokenizer.json")


# -- reading ----------------------------------------------------------------------------------------------


class _Pass:
    """One read over the sources: cleaned (and redacted) documents with their ordinal."""

    def __init__(self, sources: list[Source], opts: PrepareOptions, progress: bool, desc: str) -> None:
        self.reader = DocumentReader(opts.text_field)
        self.sources, self.progress, self.desc = sources, progress, desc
        self.redactor = None
        if opts.redact_pii:
            from clusterlm.data.pii import PIIRedactor

            self.redactor = PIIRedactor()
        self.count = 0

    def __iter__(self) -> Iterator[tuple[int, str, int, dict[str, int] | None]]:
        """(ordinal, text, source index, pii counts of this document or None)."""
        from tqdm import tqdm

        with tqdm(total=len(self.sources), desc=self.desc, unit="file", disable=not self.progress,
                  leave=False) as bar:
            current = 0
            for doc in self.reader.read(self.sources):
                if doc.source != current:
                    bar.update(doc.source - current)
                    current = doc.source
                text, found = doc.text, None
                if self.redactor is not None:
                    text, found = self.redactor.redact(text)
                yield self.count, text, doc.source, found
                self.count += 1


def _check_same(expected: int, got: int) -> None:
    if expected != got:
        raise DataError(f"the inputs changed while prepare was running: the first pass read {expected} "
                        f"documents, a later pass {got}; run prepare again on inputs nobody is writing")


def _stamps(sources: list[Source]) -> list[tuple[int, int] | None]:
    """(size, mtime_ns) of each input file read from disk (None: bundled, skipped or gone)."""
    out: list[tuple[int, int] | None] = []
    for src in sources:
        try:
            st = os.stat(src.name) if src.builtin is None and not src.skip else None
        except OSError:
            st = None
        out.append((st.st_size, st.st_mtime_ns) if st is not None else None)
    return out


def _check_unchanged(sources: list[Source], before: list[tuple[int, int] | None]) -> None:
    """DataError when an input file was written to while prepare read it two or three times: a
    change that keeps the document count would otherwise pair the scan's split, dedup and byte
    counts with other text, without a word."""
    changed = [src.name for src, a, b in zip(sources, before, _stamps(sources)) if a != b]
    if changed:
        raise DataError(f"the inputs changed while prepare was running ({len(changed)} file(s): "
                        f"{', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''} changed size or "
                        "modification time); run prepare again on inputs nobody is writing")


@dataclass
class _Scan:
    decisions: bytearray  # per document ordinal: DROP, TRAIN or VAL
    counts: dict[str, Any]
    problems: list[str]
    problems_not_listed: int
    sources: list[dict[str, Any]]
    split_docs: dict[int, int]
    split_bytes: dict[int, int]
    total_chars: int  # characters of kept documents (for chunking and progress)


def _scan(sources: list[Source], opts: PrepareOptions, progress: bool) -> _Scan:
    decisions = bytearray()
    seen: set[bytes] = set()
    deduplicated = 0
    src_docs = [0] * len(sources)
    src_bytes = [0] * len(sources)
    split_docs = {TRAIN: 0, VAL: 0}
    split_bytes = {TRAIN: 0, VAL: 0}
    total_chars = 0
    pii = {}
    # extreme hashes, for the fallbacks: (key, [(ordinal, bytes), ...]) of all docs with that hash
    min_train: tuple[int, list[tuple[int, int]]] | None = None
    max_val: tuple[int, list[tuple[int, int]]] | None = None
    scan = _Pass(sources, opts, progress, "scan")
    for ordinal, text, src, found in scan:
        data = text.encode("utf-8")
        digest = hashlib.sha256(data).digest()
        if opts.dedup:
            if digest in seen:
                decisions.append(DROP)
                deduplicated += 1
                continue
            seen.add(digest)
        split = VAL if is_val(digest, opts.val_fraction) else TRAIN
        decisions.append(split)
        n = len(data)
        src_docs[src] += 1
        src_bytes[src] += n
        split_docs[split] += 1
        split_bytes[split] += n
        total_chars += len(text)
        for k, v in (found or {}).items():
            pii[k] = pii.get(k, 0) + v
        key = int.from_bytes(digest[:8], "big")
        if split == TRAIN:
            if min_train is None or key < min_train[0]:
                min_train = (key, [])
            if key == min_train[0]:
                min_train[1].append((ordinal, n))
        else:
            if max_val is None or key > max_val[0]:
                max_val = (key, [])
            if key == max_val[0]:
                max_val[1].append((ordinal, n))

    st = scan.reader.stats
    kept = split_docs[TRAIN] + split_docs[VAL]
    if kept == 0:
        raise DataError(f"no documents left to prepare: {st.documents_read} read, {st.skipped_empty} empty, "
                        f"{st.skipped_bad_record} bad JSONL records, {deduplicated} duplicates"
                        + (f" ({'is --text-field ' + repr(opts.text_field) + ' right? ' if st.skipped_bad_record else ''}"
                           f"first problem: {st.problems[0]})" if st.problems else ""))

    def move(group: list[tuple[int, int]], src_split: int, dst_split: int) -> None:
        for ordinal, n in group:
            decisions[ordinal] = dst_split
            split_docs[src_split] -= 1
            split_docs[dst_split] += 1
            split_bytes[src_split] -= n
            split_bytes[dst_split] += n

    if split_docs[TRAIN] == 0:
        assert max_val is not None
        move(max_val[1], VAL, TRAIN)
        log.info("no document landed in train; moved the %d with the largest hash there", len(max_val[1]))
        if split_docs[VAL] == 0:
            min_train = max_val
    if opts.val_fraction > 0 and split_docs[VAL] == 0:
        assert min_train is not None
        if len(min_train[1]) < split_docs[TRAIN]:
            move(min_train[1], TRAIN, VAL)
            log.info("no document landed in val (val_fraction=%g, %d documents); moved the %d with the "
                     "smallest hash there", opts.val_fraction, kept, len(min_train[1]))
        else:
            log.warning("val split is empty: there is only one distinct document (%d copies), kept for train",
                        split_docs[TRAIN])

    counts: dict[str, Any] = {"documents_read": st.documents_read, "kept": kept, "deduplicated": deduplicated}
    counts.update({k: v for k, v in st.as_dict().items() if k != "documents_read"})
    if opts.redact_pii:
        from clusterlm.data.pii import KINDS as PII_KINDS

        counts["pii"] = {k: pii.get(k, 0) for k in PII_KINDS}
    src_meta = [{"path": s.name, "documents": d, "bytes": b} for s, d, b in zip(sources, src_docs, src_bytes)]
    return _Scan(decisions, counts, list(st.problems), st.problems_not_listed, src_meta, split_docs,
                 split_bytes, total_chars)


def _train_texts(sources: list[Source], opts: PrepareOptions, scan: _Scan) -> Iterator[str]:
    """The train split's documents, read again (pass 2)."""
    p = _Pass(sources, opts, False, "train tokenizer")
    for ordinal, text, _, _ in p:
        if ordinal < len(scan.decisions) and scan.decisions[ordinal] == TRAIN:
            yield text
    _check_same(len(scan.decisions), p.count)


# -- tokenizing -------------------------------------------------------------------------------------------


def _chunk_target(remaining: int, workers: int) -> int:
    """Characters per chunk: a quarter of each worker's share of what is left, so chunks shrink
    towards the end and every process finishes at about the same time."""
    return int(np.clip(remaining // (workers * 4), MIN_CHUNK_CHARS, MAX_CHUNK_CHARS))


def _chunks(sources: list[Source], opts: PrepareOptions, scan: _Scan, workers: int,
            bar: Any) -> Iterator[tuple[list[str], bytes]]:
    """Kept documents of pass 3 in input order, grouped into chunks (whole documents)."""
    p = _Pass(sources, opts, False, "tokenize")
    texts: list[str] = []
    mask = bytearray()
    size = done = 0
    target = _chunk_target(scan.total_chars, workers)
    for ordinal, text, _, _ in p:
        decision = scan.decisions[ordinal] if ordinal < len(scan.decisions) else None
        if decision is None:
            _check_same(len(scan.decisions), ordinal + 1)
        if decision == DROP:
            continue
        texts.append(text)
        mask.append(decision == VAL)
        size += len(text)
        if size >= target:
            yield texts, bytes(mask)
            bar.update(size)
            done += size
            target = _chunk_target(scan.total_chars - done, workers)
            texts, mask, size = [], bytearray(), 0
    _check_same(len(scan.decisions), p.count)
    if texts:
        yield texts, bytes(mask)
        bar.update(size)


def _tokenize(sources: list[Source], opts: PrepareOptions, scan: _Scan, tok: Any, tok_path: Path,
              writers: dict[int, shards.ShardWriter], workers: int, pool: Any, progress: bool) -> dict[int, int]:
    """Pass 3: every kept document's tokens + EOS into its split's shards, in input order. Returns the
    <|unk|> tokens per split (a char tokenizer's characters it never saw; {} for byte and BPE).

    This process tokenizes too: each chunk goes to the pool of `workers - 1` spawned processes
    while fewer than two chunks per helper are outstanding, else it is encoded here, so all
    `workers` cores stay busy and no core waits for the helpers to boot."""
    from tqdm import tqdm

    dtype = writers[TRAIN].dtype.name
    if scan.total_chars <= _chunk_target(scan.total_chars, workers):
        pool = None  # one chunk: nothing to share
    helpers = workers - 1
    pending: deque = deque()  # futures and finished (train, val) results, in input order
    unk = getattr(tok, "unk_id", None)
    unknown = {TRAIN: 0, VAL: 0}

    def write_ready(block_beyond: int) -> None:
        while pending:
            head = pending[0]
            if not isinstance(head, tuple):
                if len(pending) <= block_beyond and not head.done():
                    return
                head = head.result()
            pending.popleft()
            writers[TRAIN].add(head[0])
            writers[VAL].add(head[1])
            if unk is not None:
                unknown[TRAIN] += int(np.count_nonzero(head[0] == unk))
                unknown[VAL] += int(np.count_nonzero(head[1] == unk))

    from concurrent.futures.process import BrokenProcessPool

    with tqdm(total=scan.total_chars, desc="tokenize", unit="char", unit_scale=True, disable=not progress,
              leave=False) as bar, one_core():
        try:
            for texts, mask in _chunks(sources, opts, scan, workers, bar):
                busy = sum(1 for f in pending if not isinstance(f, tuple) and not f.done())
                if pool is not None and busy < 2 * helpers and sum(map(len, texts)) <= MAX_SHIPPED_CHARS:
                    pending.append(pool.submit(encode_chunk_from_file, str(tok_path), texts, mask, dtype))
                else:
                    pending.append(encode_chunk(tok, texts, mask, dtype))
                write_ready(block_beyond=4 * workers)  # bounded memory
            write_ready(block_beyond=0)
        except BrokenProcessPool as e:
            raise ClusterlmError(
                f"a tokenizer helper process died ({e}): killed, out of memory, or started from a script "
                "without `if __name__ == '__main__':` (helpers are started with the 'spawn' method, "
                "which imports the main script again); retry with --workers 1 to tokenize in this "
                "process") from None
    return unknown if unk is not None else {}


def _estimated_chars(sources: list[Source]) -> int:
    """Bytes of the inputs as stored (compressed files count as stored): enough to tell a tiny
    input, for which spawning workers costs more than it saves."""
    from clusterlm.data import builtin

    total = 0
    for s in sources:
        if s.builtin is not None:
            total += len(dict(builtin.builtin_files(s.builtin[0]))[s.builtin[1]])
        else:
            with contextlib.suppress(OSError):
                total += os.path.getsize(s.name) * (4 if s.compression else 1)
    return total


# -- the whole job ------------------------------------------------------------------------------------------


def _share_like_umask(folder: Path) -> None:
    """Give the staging folder (0700 from mkdtemp) and its files (0600 from mkstemp) the modes a
    plain mkdir/open would have, so teammates can read a data directory on shared storage."""
    mask = os.umask(0)
    os.umask(mask)
    for p in folder.iterdir():
        os.chmod(p, 0o666 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


def check_unprepared_data_dir(data_dir: Path, source: str) -> bool:
    """Before `train`/`finetune` prepares data.dir (no meta.json) from data.source: ConfigError naming
    data.dir when it is a file or a folder of other files (never replaced); True when it is an empty
    folder, which may be filled (prepare's overwrite=True)."""
    parent = data_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"data.dir={str(data_dir)!r}: {parent} is a file, not a folder; give another data.dir")
    empty = data_dir.is_dir() and not any(data_dir.iterdir())
    if data_dir.exists() and not empty:
        raise ConfigError(f"data.dir={str(data_dir)!r} exists and is not a prepared data directory (no meta.json): "
                          f"not prepared there from data.source={source!r}; give another data.dir or delete it")
    return empty


def _refuse_unrelated_out(out: Path) -> None:
    if out.exists():  # checked with or without --overwrite, which would not help here
        if not out.is_dir():
            raise DataError(f"--out {out} exists and is not a directory; refusing to replace it even with "
                            "--overwrite: choose another --out or delete it")
        if any(out.iterdir()) and not (out / "meta.json").is_file():
            raise DataError(f"--out {out} exists and is not a prepared data directory (no meta.json); "
                            "refusing to replace it even with --overwrite: choose another --out or delete it")


def _refuse_inputs_inside_out(out: Path, sources: list[Source]) -> None:
    """An input under an existing --out would be deleted with it when the new folder replaces it."""
    real_out = os.path.realpath(out)
    for src in sources:
        if src.builtin is None and os.path.commonpath([os.path.realpath(src.name), real_out]) == real_out:
            raise DataError(f"input {src.name} is inside --out {out}, which prepare replaces: it would be "
                            f"deleted with it; move the input out of {out} or choose another --out")


def _check_out_again(out: Path, overwrite: bool) -> None:
    """Just before the staging folder replaces --out: what appeared there during the run (another
    prepare into the same --out, a user's folder) gets the refusals of the start, not a swap."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} was created while prepare was running (another prepare into it?); "
                              "left as it is, nothing written: pass --overwrite to replace it, or choose "
                              "another --out")
    _refuse_unrelated_out(out)


def _check_out(out: Path, overwrite: bool) -> None:
    _refuse_unrelated_out(out)
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():  # it said "File exists: FILE/out"
        raise DataError(f"--out {out}: {parent} is a file, not a folder; choose another --out")
    stale = sorted(out.parent.glob(f".{out.name}.*.partial")) if out.parent.is_dir() else []
    if stale:
        log.warning("ignoring %d staging folder(s) left by interrupted runs (safe to delete once no prepare "
                    "is running): %s", len(stale), ", ".join(str(s) for s in stale[:3]))


def prepare(inputs: Sequence[str], out: str | os.PathLike, *, tokenizer: str = "bpe",
            vocab_size: int | None = None, val_fraction: float = 0.1, workers: int | None = None,
            text_field: str = "text", shard_tokens: int = DEFAULT_SHARD_TOKENS, dedup: bool = False,
            redact_pii: bool = False, overwrite: bool = False, progress: bool | None = None,
            follow_symlinks: bool = False) -> dict[str, Any]:
    """Prepare `inputs` (files, directories, globs, "builtin:shakespeare") into the data directory
    `out`; returns the meta.json written there. Options: see `PrepareOptions`."""
    from clusterlm import __version__
    from clusterlm.tokenizer.bpe import DEFAULT_VOCAB_SIZE
    from clusterlm.tokenizer.kinds import load_tokenizer, train_tokenizer

    opts = PrepareOptions(tokenizer=tokenizer, vocab_size=vocab_size, val_fraction=val_fraction,
                          workers=workers, text_field=text_field, shard_tokens=shard_tokens, dedup=dedup,
                          redact_pii=redact_pii, overwrite=overwrite, progress=progress,
                          follow_symlinks=follow_symlinks)
    tok_file = _check_tokenizer_arg(opts.tokenizer, opts.vocab_size)
    # a tokenizer file is loaded (so checked) before the inputs are read, not after a scan that can take hours
    tok = load_tokenizer(tok_file) if tok_file is not None else None
    sources = discover([inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs),
                       follow_symlinks=opts.follow_symlinks)
    out = Path(out)
    if out.is_symlink():  # fill or replace the folder it points to and keep the link; swapping the link itself
        out = Path(os.path.realpath(out))  # left the old data there and the link as a hidden .partial
    _check_out(out, opts.overwrite)
    _refuse_inputs_inside_out(out, sources)
    show = sys.stderr.isatty() if opts.progress is None else opts.progress
    n_workers = opts.workers or default_workers()
    t0 = time.perf_counter()

    start_pool = n_workers > 1 and _estimated_chars(sources) > 2 * MIN_CHUNK_CHARS
    pool_args = (n_workers - 1, start_pool, ("clusterlm.data.encode", "clusterlm.tokenizer.kinds"))
    with staging_dir(out, overwrite=opts.overwrite) as tmp, worker_pool(*pool_args) as pool:
        stamps = _stamps(sources)
        scan = _scan(sources, opts, show)
        log.info("read %d documents from %d files: %d kept (%d train, %d val), %d empty, %d bad records, "
                 "%d duplicates, %d symlinks skipped (%d outside the inputs, %d dangling or loops)",
                 scan.counts["documents_read"], len(sources), scan.counts["kept"],
                 scan.split_docs[TRAIN], scan.split_docs[VAL], scan.counts["skipped_empty"],
                 scan.counts["skipped_bad_record"], scan.counts["deduplicated"],
                 scan.counts["skipped_symlinks_outside"] + scan.counts["skipped_symlinks_broken"],
                 scan.counts["skipped_symlinks_outside"], scan.counts["skipped_symlinks_broken"])
        tok_path = tmp / "tokenizer.json"
        if tok is not None:
            shutil.copyfile(tok_file, tok_path)  # the user's file byte for byte
        else:
            if opts.tokenizer != "byte":
                log.info("training the %s tokenizer on %d train documents", opts.tokenizer, scan.split_docs[TRAIN])
            tok = train_tokenizer(opts.tokenizer, _train_texts(sources, opts, scan), opts.vocab_size)
            tok.save(tok_path)
        dtype = shards.dtype_for_vocab(tok.vocab_size)
        writers = {s: shards.ShardWriter(tmp, name, dtype, opts.shard_tokens) for s, name in ((TRAIN, "train"), (VAL, "val"))}
        unknown = _tokenize(sources, opts, scan, tok, tok_path, writers, n_workers, pool, show)
        _check_unchanged(sources, stamps)
        if unknown:  # a char tokenizer: what it could not encode, per split
            scan.counts["unknown_tokens"] = {"train": unknown[TRAIN], "val": unknown[VAL]}

        splits = {}
        for s, name in ((TRAIN, "train"), (VAL, "val")):
            files = writers[s].close()
            splits[name] = {"shards": files, "tokens": sum(f["tokens"] for f in files),
                            "documents": scan.split_docs[s], "bytes": scan.split_bytes[s]}
        meta: dict[str, Any] = {
            "format_version": shards.META_VERSION,
            "created_by": f"clusterlm {__version__}",
            "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                          "eos_id": tok.eos_id, "pad_id": tok.pad_id, "file": "tokenizer.json",
                          "sha256": sha256_file(tok_path)},
            "dtype": dtype.name,
            "eos_after_each_document": True,
            "splits": splits,
            "val_fraction": opts.val_fraction,
            "split_rule": SPLIT_RULE,
            "shard_tokens": opts.shard_tokens,
            "options": {"text_field": opts.text_field, "dedup": opts.dedup, "redact_pii": opts.redact_pii,
                        "follow_symlinks": opts.follow_symlinks,
                        # the BPE size asked for (a small corpus may give fewer: tokenizer.vocab_size)
                        "vocab_size": (opts.vocab_size or DEFAULT_VOCAB_SIZE) if opts.tokenizer == "bpe" else None},
            "sources": scan.sources,
            "counts": scan.counts,
            "problems": scan.problems,
            "problems_not_listed": scan.problems_not_listed,
        }
        atomic_write_json(tmp / "meta.json", meta)  # last: its presence marks a complete directory
        _share_like_umask(tmp)
        _check_out_again(out, opts.overwrite)

    for p in scan.problems[:10]:
        log.warning("%s", p)
    _report_unknown(scan.counts.get("unknown_tokens"), splits, tok_file)
    more = len(scan.problems) - 10 + scan.problems_not_listed
    if more > 0:
        log.warning("... and %d more problems (listed in %s)", more, out / "meta.json")
    dt = time.perf_counter() - t0
    total = splits["train"]["tokens"] + splits["val"]["tokens"]
    log.info("wrote %s: %s train + %s val tokens (%s, vocab %d), %d+%d shards in %.1f s (%s tokens/s, %d worker%s)",
             out, f"{splits['train']['tokens']:,}", f"{splits['val']['tokens']:,}", dtype.name, tok.vocab_size,
             len(splits["train"]["shards"]), len(splits["val"]["shards"]), dt, f"{total / max(dt, 1e-9):,.0f}",
             n_workers, "" if n_workers == 1 else "s")
    return meta


def _report_unknown(unknown: dict[str, int] | None, splits: dict[str, Any], tok_file: Path | None) -> None:
    """Say how much text became <|unk|>: a warning with a tokenizer file (learned from other text, the
    model would learn <|unk|> in place of those characters), a line otherwise (a char vocabulary
    learned here from train lacks only characters seen in val documents alone)."""
    if not unknown or not (unknown["train"] or unknown["val"]):
        return
    line = ", ".join(f"{unknown[k]:,} of {splits[k]['tokens']:,} {k} tokens ({unknown[k] / max(splits[k]['tokens'], 1):.2%})"
                     for k in ("train", "val"))
    if tok_file is not None:
        log.warning("%s are <|unk|>: characters outside the char vocabulary of %s, which was learned from other "
                    "text; train one on these inputs (clusterlm tokenizer train --kind char ...) or use "
                    "--tokenizer char", line, tok_file)
    else:
        log.info("%s are <|unk|>: characters seen only in val documents", line)


# -- command line -------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clusterlm prepare", description=__doc__.split("\n")[0],
        epilog="Inputs: files, directories (recursive), globs of .txt/.md/.jsonl (optionally .gz/.zst), or "
               "builtin:shakespeare. Format of the result: docs/data.md.")
    d = PrepareOptions()
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="files, directories, globs or builtin:NAME")
    p.add_argument("--out", required=True, metavar="DATA_DIR", help="data directory to create")
    p.add_argument("--tokenizer", default=d.tokenizer, help="byte, char, bpe or a tokenizer.json path (default: bpe)")
    p.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size incl. specials (default: 8192)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help=f"expected fraction of documents held out for validation (default: {d.val_fraction})")
    p.add_argument("--workers", type=int, default=None,
                   help=f"processes that tokenize, this one included (default: usable CPUs, at most "
                        f"{MAX_DEFAULT_WORKERS})")
    p.add_argument("--text-field", default=d.text_field, help="JSONL field holding the text (default: text)")
    p.add_argument("--shard-tokens", type=int, default=d.shard_tokens,
                   help=f"tokens per shard file (default: 2**26 = {d.shard_tokens:,})")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate documents")
    p.add_argument("--redact-pii", action="store_true",
                   help="replace e-mail addresses, phone numbers, IP addresses and card numbers by placeholders")
    p.add_argument("--overwrite", action="store_true", help="replace DATA_DIR if it exists")
    p.add_argument("--follow-symlinks", action="store_true",
                   help="read symlinked files and folders that lead outside the input folders (default: skip "
                        "and count them; dangling links and loops are always skipped and counted)")
    p.add_argument("--builtin", action="append", default=[], metavar="NAME",
                   help="add a bundled corpus (shakespeare)")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    inputs = list(args.inputs) + [f"builtin:{name}" for name in args.builtin]
    try:
        with terminate_as_interrupt():
            meta = prepare(inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                           val_fraction=args.val_fraction, workers=args.workers, text_field=args.text_field,
                           shard_tokens=args.shard_tokens, dedup=args.dedup, redact_pii=args.redact_pii,
                           overwrite=args.overwrite, follow_symlinks=args.follow_symlinks)
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: prepare has removed its staging folder and killed its helper processes by
        # now. concurrent.futures joins the pool's manager thread at interpreter exit, and once the
        # helpers were killed mid-call that join can hang (seen in CI: still alive 60 s after the
        # "interrupted" line), so end here, as the CLI would, without the interpreter's teardown.
        from clusterlm.errors import EXIT_INTERRUPTED

        print("clusterlm prepare: interrupted", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)
    sp = meta["splits"]
    print(f"{args.out}: {meta['tokenizer']['kind']} tokenizer (vocab {meta['tokenizer']['vocab_size']}), "
          f"train {sp['train']['tokens']:,} tokens / {sp['train']['documents']} docs, "
          f"val {sp['val']['tokens']:,} tokens / {sp['val']['documents']} docs"
          + (f"; {unk['train']:,} train tokens are <|unk|> (see the warning above)"
             if (unk := meta["counts"].get("unknown_tokens")) and unk["train"] else ""))
    return 0
