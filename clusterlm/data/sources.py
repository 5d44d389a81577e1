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
string. Blank lines are ignored silently. A compressed file that is corrupt is reported and its
remaining content skipped (`unreadable_files`). Repair counts cover every document read,
including ones later skipped as empty or as duplicates.

`documents_read` = documents yielded + `skipped_empty` (records skipped as bad are not documents).
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import lzma
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import BinaryIO, NamedTuple

from clusterlm.data import builtin
from clusterlm.errors import DataError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
COMPRESSIONS = {".gz": "gz", ".zst": "zst"}
VALID_EXTENSIONS = ".txt, .md, .jsonl, each optionally compressed as .gz or .zst (e.g. .jsonl.zst)"
MAX_PROBLEMS = 1000  # problems listed one by one; the rest are only counted
BOM = "\ufeff"
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

    def __post_init__(self) -> None:
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


def _walk(root: str) -> list[str]:
    """Files under `root`, sorted, skipping hidden files and folders; symlinked folders not followed."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
    return out


def _builtin_sources(spec: str) -> list[Source]:
    name, _, file = spec[len(builtin.PREFIX):].partition("/")
    names = [n for n, _ in builtin.builtin_files(builtin.check_name(name))]
    if file:
        if file not in names:
            raise DataError(f"input {spec!r}: the bundled corpus {name!r} has no file {file!r}; "
                            f"use {builtin.PREFIX}{name} for all {len(names)} files")
        names = [file]
    return [Source(f"{builtin.PREFIX}{name}/{n}", "text", builtin=(name, n)) for n in names]


def discover(inputs: Sequence[str]) -> list[Source]:
    """The sources named by `inputs` (files, directories, globs, builtin:NAME), in order."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if not inputs:
        raise DataError(f"no inputs given: name files, directories or globs of {VALID_EXTENSIONS}, "
                        f"or a bundled corpus ({', '.join(builtin.PREFIX + n for n in builtin.CORPORA)})")
    sources: list[Source] = []
    seen: set[str] = set()

    def add(path: str) -> bool:
        kind = classify(path)
        if kind is None:
            return False
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            sources.append(Source(path, *kind))
        return True

    for raw in inputs:
        spec = os.fspath(raw)
        if spec.startswith(builtin.PREFIX):
            for s in _builtin_sources(spec):
                if s.name not in seen:
                    seen.add(s.name)
                    sources.append(s)
        elif os.path.isfile(spec):
            if not add(spec):
                raise DataError(f"input {spec!r} has an unsupported extension; valid: {VALID_EXTENSIONS}")
        elif os.path.isdir(spec):
            found = _walk(spec)
            if not [f for f in found if add(f)]:
                raise DataError(f"directory {spec!r} holds no supported file ({len(found)} other "
                                f"files); valid: {VALID_EXTENSIONS}")
        elif glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            files = [f for m in matches for f in (_walk(m) if os.path.isdir(m) else [m])]
            if not [f for f in files if add(f)]:
                what = (f"matches only unsupported files ({', '.join(files[:3])}"
                        f"{', ...' if len(files) > 3 else ''})" if files else "matches nothing")
                raise DataError(f"input pattern {spec!r} {what}; valid: {VALID_EXTENSIONS}")
        else:
            raise FileNotFoundError(f"input {spec!r} does not exist (inputs are files, directories, "
                                    f"globs or builtin:NAME)")
    return sources


@contextlib.contextmanager
def open_source(src: Source) -> Iterator[BinaryIO]:
    """The decompressed bytes of `src` as a binary file object (line-iterable)."""
    if src.builtin is not None:
        corpus, file = src.builtin
        yield io.BytesIO(dict(builtin.builtin_files(corpus))[file])
        return
    with contextlib.ExitStack() as stack:
        f: BinaryIO = stack.enter_context(open(src.name, "rb"))
        if src.compression == "gz":
            f = stack.enter_context(gzip.GzipFile(fileobj=f, mode="rb"))
        elif src.compression == "zst":
            import zstandard

            reader = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
            f = stack.enter_context(io.BufferedReader(reader, buffer_size=1 << 20))
        yield f


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
            try:
                with open_source(src) as f:
                    if src.fmt == "text":
                        yield from self._read_text(f, i)
                    else:
                        yield from self._read_jsonl(f, i, src.name)
            except (EOFError, OSError, lzma.LZMAError) as e:
                self._unreadable(src, e)
            except Exception as e:  # zstandard.ZstdError does not derive from OSError
                if type(e).__name__ != "ZstdError":
                    raise
                self._unreadable(src, e)

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
