"""Input discovery and document reading for `clusterlm prepare` and `clusterlm tokenizer train`.

    from clusterlm.data.sources import DocumentReader, discover
    sources = discover(["corpus/", "extra/*.jsonl.gz", "builtin:shakespeare"])
    reader = DocumentReader(text_field="text")
    for doc in reader.read(sources):          # doc.text, doc.source (index), doc.line
        ...
    reader.stats.as_dict()                    # counts of everything repaired or skipped

Inputs are files, directories (searched recursively; hidden files and folders are skipped),
glob patterns (`**` allowed) or "builtin:NAME" (see builtin.py). Supported files are .txt, .md
and .jsonl, each optionally compressed as .gz or .zst (e.g. "a.jsonl.zst"). A directory or glob
keeps only supported files (sorted by path); an explicit file with another extension, a path that
does not exist, or a directory/glob with no supported file is an error. A file named twice is
read once.

Symlink policy, for what a directory or glob finds ("the input tree" is the directory, or a
glob's leading part without wildcards); an input named explicitly is always followed:
  - a dangling symlink or a symlink loop is skipped -> `skipped_symlinks_broken`;
  - a symlink (to a file or folder) whose target is outside the input tree is skipped
    -> `skipped_symlinks_outside`, unless `follow_symlinks` (prepare --follow-symlinks);
  - a symlinked folder inside the tree is not walked (its files are found under their real
    path); with `follow_symlinks` every symlinked folder is walked, each real folder once, and a
    link to a folder above it is a loop (skipped, counted). Each skip is listed in `problems`.

Documents: a .txt or .md file is one document; each line of a .jsonl file is one record, whose
string field `text_field` (default "text") is one document.

Hostile-text policy (each applied in this order, and counted in `ReadStats`):
  1. invalid UTF-8 byte sequences become U+FFFD (Python's "replace" error handler); lone
     surrogates from JSON escapes ("\\ud800") become U+FFFD too -> `repaired_utf8` (documents);
  2. a byte-order mark (U+FEFF) at the start of a file or of a document's text is dropped
     -> `removed_bom` (BOMs removed);
  3. NUL characters (U+0000) are removed -> `removed_nul` (documents that had any);
  4. CRLF line ends become LF (a lone CR is kept) -> `crlf_normalized` (documents);
  5. a document that is then empty or only whitespace is skipped -> `skipped_empty`.
JSONL records that cannot give a document are skipped, counted in `skipped_bad_record`, and
reported as "file:line: reason": invalid JSON (a last line without its final newline is
reported as truncated), a record that is not an object, a missing field, a field that is not a
string. Blank lines are ignored silently. A compressed file that is corrupt or truncated (a .gz
without its end-of-stream marker; an empty .gz or .zst; a .zst whose last frame lacks its last block, even when cut at
a block boundary) is reported and its remaining content skipped (`unreadable_files`); so is a FIFO,
socket or device with a supported name (not read at all: it could block forever). Repair counts cover every document read,
including ones later skipped as empty or as duplicates.

`documents_read` = documents yielded + `skipped_empty` (records skipped as bad are not documents).
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import gzip
import io
import json
import logging
import lzma
import os
import re
import stat
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import BinaryIO, NamedTuple

from clusterlm.data import builtin
from clusterlm.errors import DataError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
COMPRESSIONS = {".gz": "gz", ".zst": "zst"}
VALID_EXTENSIONS = ".txt, .md, .jsonl, each optionally compressed as .gz or .zst (e.g. .jsonl.zst)"
MAX_PROBLEMS = 1000  # problems listed one by one; the rest are only counted
# extensions of text data clusterlm does not read: skipping them in a folder is said as a warning
DATA_LIKE = (".json", ".ndjson", ".csv", ".tsv", ".text", ".xml", ".html", ".htm", ".parquet", ".arrow", ".bz2",
             ".xz", ".lz4", ".zip", ".tar")
BOM = "\ufeff"
SKIP_OUTSIDE, SKIP_BROKEN = "outside", "broken"  # symlink policy, see the module docstring
_SURROGATE = re.compile("[\ud800-\udfff]")
_REPLACEMENT = "\ufffd"


@dataclass(frozen=True)
class Source:
    """One input file (or bundled file) that holds one or more documents."""

    name: str
    """how meta.json and messages name it: the path as found, or builtin:NAME/FILE"""
    fmt: str  # "text" (one document) | "jsonl" (one document per record)
    compression: str = ""  # "" | "gz" | "zst"
    builtin: tuple[str, str] | None = None  # (corpus, file name) for bundled files
    skip: str = ""  # "" | SKIP_OUTSIDE | SKIP_BROKEN: found but not read (symlink policy), only counted

    def __post_init__(self) -> None:
        if self.skip not in ("", SKIP_OUTSIDE, SKIP_BROKEN):
            raise ValueError(f"Source {self.name!r}: skip={self.skip!r} must be '', {SKIP_OUTSIDE!r} or {SKIP_BROKEN!r}")
        if self.fmt not in ("text", "jsonl") or self.compression not in ("", "gz", "zst"):
            raise ValueError(f"Source {self.name!r}: fmt={self.fmt!r} must be 'text' or 'jsonl' and "
                             f"compression={self.compression!r} one of '', 'gz', 'zst'")


def classify(name: str) -> tuple[str, str] | None:
    """(fmt, compression) of a file name by its extension, or None when it is not supported."""
    lower = name.lower()
    compression = ""
    for suffix, kind in COMPRESSIONS.items():
        if lower.endswith(suffix):
            lower, compression = lower[: -len(suffix)], kind
            break
    if lower.endswith(TEXT_SUFFIXES):
        return "text", compression
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl", compression
    return None


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([path, root]) == root


def _walk(root: str, follow_symlinks: bool) -> list[str]:
    """Paths under `root`, sorted, skipping hidden files and folders. Symlinked folders are walked
    only with `follow_symlinks` (each real folder once, so a loop ends); without it, one that
    leaves `root` is returned like a file, for `_file_source` to count."""
    out = []
    walked: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
        walked.add(os.path.realpath(dirpath))
        keep, links = [], []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            full = os.path.join(dirpath, d)
            if not os.path.islink(full):
                keep.append(d)
            elif follow_symlinks:
                real = os.path.realpath(full)
                if _inside(os.path.realpath(dirpath), real):
                    links.append(full)  # a link to this folder or one above it: a loop, counted as broken
                elif real not in walked:  # else its files were found already
                    keep.append(d)
            elif not _inside(os.path.realpath(full), os.path.realpath(root)):
                links.append(full)
        dirnames[:] = keep
        out += sorted(links + [os.path.join(dirpath, f) for f in filenames if not f.startswith(".")])
    return out


def _file_source(path: str, root: str, follow_symlinks: bool) -> Source | None:
    """The Source of a path found by walking or globbing the input tree `root` (None: not a
    supported file): a dangling or looping symlink, or one that leaves the tree without
    `follow_symlinks`, becomes a skipped Source, counted when read."""
    if os.path.islink(path):
        real = os.path.realpath(path)
        if not os.path.exists(path) or (os.path.isdir(path) and follow_symlinks):
            return Source(path, "text", skip=SKIP_BROKEN)  # dangling, or a loop
        if os.path.isdir(path):
            return Source(path, "text", skip=SKIP_OUTSIDE)  # only symlinked folders leaving root get here
    else:
        real = None
    kind = classify(path)
    if kind is None:
        return None
    if not follow_symlinks and not _inside(real or os.path.realpath(path), os.path.realpath(root)):
        return Source(path, *kind, skip=SKIP_OUTSIDE)  # a file link, or a file under a folder link (globs)
    return Source(path, *kind)


def _match(pat: list[str], parts: list[str], partial: bool = False) -> bool:
    """Whether path components `parts` match glob components `pat` ("**" = any number of
    components); with `partial`, whether they can be the start of a match."""
    if not pat:
        return not parts
    if not parts:
        return partial or all(p == "**" for p in pat)
    if pat[0] == "**":
        return _match(pat[1:], parts, partial) or _match(pat, parts[1:], partial)
    return fnmatch.fnmatchcase(parts[0], pat[0]) and _match(pat[1:], parts[1:], partial)


def _glob_recursive(spec: str, root: str, follow_symlinks: bool) -> list[str]:
    """Matches of a pattern with "**", found by `_walk` rather than glob.glob, which follows every
    symlinked folder, loops included (40 levels deep). A matching folder stands for its files."""
    pat = os.path.normpath(spec).split(os.sep)[len(os.path.normpath(root).split(os.sep)) if root != "." else 0:]
    out = []
    for path in _walk(root, follow_symlinks):
        rel = os.path.relpath(path, root).split(os.sep)
        linked_dir = os.path.islink(path) and os.path.isdir(path)
        if any(_match(pat, rel[:k]) for k in range(1, len(rel) + 1)) or (linked_dir and _match(pat, rel, True)):
            out.append(path[2:] if root == "." and path.startswith("./") and not spec.startswith("./") else path)
    return out


def _glob_root(spec: str) -> str:
    """The folder a glob searches: its longest leading part without wildcards ("." for none)."""
    parts = []
    for part in spec.split(os.sep):
        if glob.has_magic(part):
            break
        parts.append(part)
    return os.sep.join(parts) or (os.sep if spec.startswith(os.sep) else ".")


def _builtin_sources(spec: str) -> list[Source]:
    name, _, file = spec[len(builtin.PREFIX):].partition("/")
    names = [n for n, _ in builtin.builtin_files(builtin.check_name(name))]
    if file:
        if file not in names:
            raise DataError(f"input {spec!r}: the bundled corpus {name!r} has no file {file!r}; "
                            f"use {builtin.PREFIX}{name} for all {len(names)} files")
        names = [file]
    return [Source(f"{builtin.PREFIX}{name}/{n}", "text", builtin=(name, n)) for n in names]


def discover(inputs: Sequence[str], follow_symlinks: bool = False) -> list[Source]:
    """The sources named by `inputs` (files, directories, globs, builtin:NAME), in order.

    Symlinks found inside a directory or glob follow the policy in the module docstring; the
    skipped ones are returned with `Source.skip` set and counted by `DocumentReader.read`."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise DataError(f"no inputs given: name files, directories or globs of {VALID_EXTENSIONS}, "
                        f"or a bundled corpus ({', '.join(builtin.PREFIX + n for n in builtin.CORPORA)})")
    sources: list[Source] = []
    seen: set[str] = set()

    def add(src: Source | None) -> bool:
        """Keep `src` unless already kept; True when it is a file to read."""
        if src is None:
            return False
        key = src.name if src.skip else os.path.realpath(src.name)  # a file named twice is read once
        if key not in seen:
            seen.add(key)
            sources.append(src)
        return not src.skip

    def add_tree(paths: list[str], root: str) -> bool:
        found = [(f, _file_source(f, root, follow_symlinks)) for f in paths]
        _say_unsupported(root, [f for f, src in found if src is None])
        return any([add(src) for _, src in found])

    for raw in inputs:
        spec = os.fspath(raw)
        if spec.startswith(builtin.PREFIX):
            for s in _builtin_sources(spec):
                if s.name not in seen:
                    seen.add(s.name)
                    sources.append(s)
        elif os.path.isfile(spec):  # named explicitly: read even when it is a symlink leaving the tree
            kind = classify(spec)
            if kind is None:
                raise DataError(f"input {spec!r} has an unsupported extension; valid: {VALID_EXTENSIONS}")
            add(Source(spec, *kind))
        elif os.path.isdir(spec):
            found = _walk(spec, follow_symlinks)
            if not add_tree(found, spec):
                raise DataError(f"directory {spec!r} holds no supported file ({len(found)} other "
                                f"files or symlinks); valid: {VALID_EXTENSIONS}")
        elif glob.has_magic(spec):
            root = _glob_root(spec)
            if "**" in spec:
                files = _glob_recursive(spec, root, follow_symlinks)
            else:  # no recursion: glob.glob is fine (a match through a folder link is checked by realpath)
                matches = sorted(glob.glob(spec))
                files = [f for m in matches for f in (_walk(m, follow_symlinks) if os.path.isdir(m) else [m])]
            if not add_tree(files, root):
                what = (f"matches only unsupported files or skipped symlinks ({', '.join(files[:3])}"
                        f"{', ...' if len(files) > 3 else ''})" if files else "matches nothing")
                raise DataError(f"input pattern {spec!r} {what}; valid: {VALID_EXTENSIONS}")
        elif os.path.exists(spec):  # neither file nor folder: a pipe (<(zcat x) is /dev/fd/N), socket or device
            what = "a pipe" if stat.S_ISFIFO(os.stat(spec).st_mode) else "not a regular file or folder"
            raise DataError(f"input {spec!r} is {what}; prepare reads its inputs more than once (a scan, then "
                            f"encoding): save it to a file first (.gz and .zst are read as they are)")
        elif os.path.islink(spec):
            raise FileNotFoundError(f"input {spec!r} is a symlink to {os.readlink(spec)!r}, which does not "
                                    "exist (or is a symlink loop)")
        else:
            raise FileNotFoundError(f"input {spec!r} does not exist (inputs are files, directories, "
                                    f"globs or builtin:NAME)")
    return sources


def _say_unsupported(root: str, files: list[str]) -> None:
    """Files of other types found in a folder or glob are skipped; one line says how many (a warning
    when some look like text data clusterlm does not read, such as .json or .ndjson, whose documents
    would otherwise be lost without a word)."""
    if not files:
        return
    data = [f for f in files if f.lower().endswith(DATA_LIKE)]
    shown = data or files
    names = ", ".join(os.path.relpath(f, root) if root else f for f in shown[:3]) + (", ..." if len(shown) > 3 else "")
    if data:
        log.warning("%s: %d file(s) that look like text data are skipped (%s; %d file(s) of other types in all): "
                    "only %s are read", root or ".", len(data), names, len(files), VALID_EXTENSIONS)
    else:
        log.info("%s: %d file(s) of other types skipped (%s)", root or ".", len(files), names)


@contextlib.contextmanager
def open_source(src: Source) -> Iterator[BinaryIO]:
    """The decompressed bytes of `src` as a binary file object (line-iterable)."""
    if src.builtin is not None:
        corpus, file = src.builtin
        yield io.BytesIO(dict(builtin.builtin_files(corpus))[file])
        return
    with contextlib.ExitStack() as stack:
        f: BinaryIO = stack.enter_context(open(src.name, "rb"))
        if src.compression and os.fstat(f.fileno()).st_size == 0:
            # gzip and zstandard both read 0 bytes as an empty stream, so a failed download passed as
            # a valid file without a word; `gzip -t` and `zstd -t` call it "unexpected end of file"
            raise EOFError(f"empty file: a .{'gz' if src.compression == 'gz' else 'zst'} file holds at least "
                           "a header (cut short, e.g. a failed download)")
        if src.compression == "gz":
            f = stack.enter_context(gzip.GzipFile(fileobj=f, mode="rb"))
        elif src.compression == "zst":
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
            f = stack.enter_context(io.BufferedReader(_ZstdChecked(reader, src.name), buffer_size=1 << 20))
        yield f


_ZSTD_MAGIC = 0xFD2FB528
_ZSTD_SKIPPABLE = 0x184D2A50  # ... 0x184D2A5F: skippable frames (RFC 8878 sec. 3.1.2)


def check_zstd_frames(path: str | os.PathLike) -> None:
    """Raise EOFError unless the file at `path` is whole zstd frames, the last one complete.

    zstandard's stream reader stops without error when the input ends between two blocks of a
    frame, so a file cut at a block boundary would read as a shorter valid one. This walks the
    frame and block headers (RFC 8878 sec. 3.1.1), seeking over block contents: about 3 bytes read
    per block of up to 128 KiB, so the cost is tiny next to decompressing."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            head = f.read(4)
            if len(head) < 4:
                raise EOFError(f"zstd frame truncated at byte {size} (a frame starts at {pos})")
            magic = int.from_bytes(head, "little")
            if magic & 0xFFFFFFF0 == _ZSTD_SKIPPABLE:
                n = int.from_bytes(f.read(4), "little")
                pos += 8 + n
                if pos > size:
                    raise EOFError(f"zstd skippable frame truncated: it ends at byte {pos}, the file at {size}")
                f.seek(pos)
                continue
            if magic != _ZSTD_MAGIC:
                raise EOFError(f"no zstd frame at byte {pos} (magic {head.hex()}): corrupt or not zstd")
            fhd = f.read(1)[0] if pos + 4 < size else 0
            fcs, single, checksum, did = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
            header = 1 + (not single) + (0, 1, 2, 4)[did] + ((1 if single else 0), 2, 4, 8)[fcs]
            pos += 4 + header
            f.seek(pos)
            while True:
                block = f.read(3)
                if len(block) < 3:
                    raise EOFError(f"zstd frame truncated at byte {size}: its last block is missing "
                                   "(file cut short)")
                h = int.from_bytes(block, "little")
                last, kind, n = h & 1, (h >> 1) & 3, h >> 3
                if kind == 3:
                    raise EOFError(f"zstd block at byte {pos} has the reserved type 3: corrupt")
                pos += 3 + (1 if kind == 1 else n)
                f.seek(pos)
                if last:
                    break
            pos += 4 * checksum
            if pos > size:
                raise EOFError(f"zstd frame truncated: it ends at byte {pos}, the file at {size}")
            f.seek(pos)


class _ZstdChecked(io.RawIOBase):
    """A zstd stream reader that raises EOFError at its end when the file's last frame is incomplete."""

    def __init__(self, reader: BinaryIO, path: str) -> None:
        self._reader, self._path = reader, path

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
        n = self._reader.readinto(buf)
        if n == 0 and len(buf):
            check_zstd_frames(self._path)
        return n

    def close(self) -> None:
        self._reader.close()
        super().close()


class Document(NamedTuple):
    text: str
    source: int  # index into the sources list given to `DocumentReader.read`
    line: int  # 1-based line of a JSONL record; 0 for a whole-file document


@dataclass
class ReadStats:
    """What reading found; see the module docstring for each count's unit."""

    documents_read: int = 0
    skipped_empty: int = 0
    skipped_bad_record: int = 0
    repaired_utf8: int = 0
    removed_bom: int = 0
    removed_nul: int = 0
    crlf_normalized: int = 0
    unreadable_files: int = 0
    skipped_symlinks_outside: int = 0
    skipped_symlinks_broken: int = 0
    problems: list[str] = field(default_factory=list)
    problems_not_listed: int = 0

    def problem(self, message: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)
        else:
            self.problems_not_listed += 1

    def as_dict(self) -> dict[str, int]:
        """The counts (without the problem list)."""
        d = asdict(self)
        del d["problems"], d["problems_not_listed"]
        return d


def _describe(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null", int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _not_regular(path: str) -> str:
    """What `path` is when it is a FIFO, socket or device ("" for a regular file, or one that cannot
    be stat'ed: opening it says why). A FIFO named a.txt in an input folder made prepare wait forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):  # a folder: open() raises IsADirectoryError, as before
        return ""
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device or special file"


class DocumentReader:
    """Yields the cleaned documents of sources and counts what it repaired or skipped."""

    def __init__(self, text_field: str = "text") -> None:
        if not isinstance(text_field, str) or not text_field:
            raise ValueError(f"text_field={text_field!r} must be a non-empty string (a JSONL field name)")
        self.text_field = text_field
        self.stats = ReadStats()

    def _clean(self, text: str, repaired: bool, from_json: bool = False) -> str | None:
        """Steps 1-5 of the policy on a decoded document; None when it is empty. Only JSON
        escapes can produce lone surrogates (decoded UTF-8 never holds one)."""
        st = self.stats
        if from_json and _SURROGATE.search(text):
            text, repaired = _SURROGATE.sub(_REPLACEMENT, text), True
        st.repaired_utf8 += repaired
        if text.startswith(BOM):
            text = text[1:]
            st.removed_bom += 1
        if "\0" in text:
            text = text.replace("\0", "")
            st.removed_nul += 1
        if "\r\n" in text:
            text = text.replace("\r\n", "\n")
            st.crlf_normalized += 1
        st.documents_read += 1
        if not text or text.isspace():
            st.skipped_empty += 1
            return None
        return text

    def read(self, sources: Sequence[Source]) -> Iterator[Document]:
        """The documents of `sources`, in order (see the module docstring for the policy)."""
        for i, src in enumerate(sources):
            if src.skip:
                self._skipped_link(src)
                continue
            if src.builtin is None and (what := _not_regular(src.name)):
                self.stats.unreadable_files += 1
                self.stats.problem(f"{src.name}: cannot read: {what}, not a regular file (reading it could "
                                   "block forever); skipped")
                continue
            try:
                with open_source(src) as f:
                    if src.fmt == "text":
                        yield from self._read_text(f, i)
                    else:
                        yield from self._read_jsonl(f, i, src.name)
            except (EOFError, OSError, lzma.LZMAError, zlib.error) as e:  # zlib.error: corrupt deflate data in a .gz
                self._unreadable(src, e)
            except Exception as e:  # zstandard.ZstdError does not derive from OSError
                if type(e).__name__ != "ZstdError":
                    raise
                self._unreadable(src, e)

    def _skipped_link(self, src: Source) -> None:
        target = os.readlink(src.name) if os.path.islink(src.name) else "?"
        if src.skip == SKIP_OUTSIDE:
            self.stats.skipped_symlinks_outside += 1
            self.stats.problem(f"{src.name}: skipped: a symlink to {os.path.realpath(src.name)}, outside the input "
                               "tree (pass --follow-symlinks to read it, or name it as an input)")
        else:
            self.stats.skipped_symlinks_broken += 1
            try:
                os.stat(src.name)
                what = "a symlink loop"  # it resolves: a link to a folder above it
            except OSError as e:
                what = "a symlink loop" if e.errno == errno.ELOOP else "a dangling symlink"
            self.stats.problem(f"{src.name}: skipped: {what} (to {target!r})")

    def _unreadable(self, src: Source, e: BaseException) -> None:
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise e
        self.stats.unreadable_files += 1
        self.stats.problem(f"{src.name}: cannot read ({type(e).__name__}: {e}); the rest of the file is skipped")

    def _read_text(self, f: BinaryIO, index: int) -> Iterator[Document]:
        raw = f.read()
        try:
            text, repaired = raw.decode("utf-8"), False
        except UnicodeDecodeError:
            text, repaired = raw.decode("utf-8", errors="replace"), True
        del raw
        text = self._clean(text, repaired)
        if text is not None:
            yield Document(text, index, 0)

    def _read_jsonl(self, f: BinaryIO, index: int, name: str) -> Iterator[Document]:
        st, key = self.stats, self.text_field
        for lineno, raw in enumerate(f, 1):
            complete = raw.endswith(b"\n")
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                line, repaired = raw.decode("utf-8"), False
            except UnicodeDecodeError:
                line, repaired = raw.decode("utf-8", errors="replace"), True
            if lineno == 1 and line.startswith(BOM):
                line = line[1:]
                st.removed_bom += 1
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as e:
                st.skipped_bad_record += 1
                if not complete:
                    st.problem(f"{name}:{lineno}: truncated last line (no final newline, not valid JSON)")
                else:
                    st.problem(f"{name}:{lineno}: invalid JSON ({str(e)[:80]})")
                continue
            if not isinstance(record, dict):
                st.skipped_bad_record += 1
                st.problem(f"{name}:{lineno}: record is {_describe(record)}, expected an object "
                           f"with a string field {key!r}")
                continue
            if key not in record:
                st.skipped_bad_record += 1
                keys = ", ".join(map(repr, list(record)[:5])) or "none"
                st.problem(f"{name}:{lineno}: no field {key!r} (fields: {keys}); choose the field "
                           f"with --text-field")
                continue
            text = record[key]
            if not isinstance(text, str):
                st.skipped_bad_record += 1
                st.problem(f"{name}:{lineno}: field {key!r} is {_describe(text)}, expected a string")
                continue
            del record, line
            text = self._clean(text, repaired, from_json=True)
            if text is not None:
                yield Document(text, index, lineno)
