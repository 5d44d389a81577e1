"""Task files for `clusterlm eval --task`: the three kinds of example and the readers that make a
`Task` from a task JSONL file, a TSV file with a header, or a pair of parallel text files.

    from clusterlm.eval.tasks import load_task
    task = load_task("qa.jsonl")                                    # kind from the header record
    task = load_task("SST-2/dev.tsv", labels={"0": "negative", "1": "positive"}, limit=100)
    task = load_task(("newstest.en.gz", "newstest.fr.gz"))         # a `generate` task
    task = load_task("newstest.en.gz,newstest.fr.gz", template="{source} =")
    task.name, task.kind, task.labels, task.examples[0]

The formats, the kind and label-set rules and the prompt template are documented in docs/tasks.md.
Every reader goes through the same per-kind record checks, so a TSV row and a JSONL record fail the
same way. Bad input raises DataError with one line naming the file, the record's line number and
the field. Torch-free: nothing here needs a model.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import string
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import IO, Union

from clusterlm.errors import DataError

log = logging.getLogger(__name__)

KINDS = ("generate", "classify", "choice")
ROLES = ("system", "user", "assistant")
HEADER_KEYS = ("kind", "name", "labels", "version")  # the keys a header record may have
EXAMPLE_FIELDS = ("prompt", "messages", "references", "text", "label", "context", "choices", "gold")
FORMAT_VERSION = 1
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
TSV_SUFFIXES = (".tsv", ".tsv.gz")
# A parallel pair becomes a `generate` task whose prompt is this template; placeholders: {source}
# (the source line), {src_lang} and {tgt_lang} (language codes from the file names, train.en.gz -> en).
PARALLEL_TEMPLATE = "{src_lang}: {source}\n{tgt_lang}:"
TEMPLATE_FIELDS = ("source", "src_lang", "tgt_lang")
TSV_TEXT_COLUMNS = ("text", "sentence", "content")  # a TSV's text column, by header name (GLUE SST-2: `sentence`)
INVALID = "<invalid>"  # the scorers' confusion-matrix column of predictions outside the label set: no label's name

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class Message:
    role: str  # one of ROLES
    content: str


@dataclass(frozen=True)
class GenerateExample:
    """A prompt (plain text, or chat messages) and the references a generation is scored against."""

    references: tuple[str, ...]  # at least one, each non-empty
    prompt: str | None = None  # exactly one of prompt and messages is set
    messages: tuple[Message, ...] | None = None
    line: int = 0  # the record's line in its file (1-based), for error analysis


@dataclass(frozen=True)
class ClassifyExample:
    text: str
    label: str  # one of the task's labels
    line: int = 0


@dataclass(frozen=True)
class ChoiceExample:
    """A context and its candidate continuations; scored by each choice's log-likelihood given the
    context (the caller joins them, lm-evaluation-harness puts one space between)."""

    context: str
    choices: tuple[str, ...]  # at least two, each non-empty
    gold: int  # index into choices
    line: int = 0


Example = Union[GenerateExample, ClassifyExample, ChoiceExample]


@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # one of KINDS
    examples: tuple[Example, ...]
    labels: tuple[str, ...] | None = None  # the fixed label set of a classify task, in order
    source: str = ""  # the file(s) it was read from

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind!r} is not one of {KINDS}")
        if (self.kind == "classify") != (self.labels is not None):
            raise ValueError(f"a {self.kind} task {'needs' if self.kind == 'classify' else 'has no'} labels")

    def __len__(self) -> int:
        return len(self.examples)


# ----------------------------------------------------------------------------------------------
# Reading lines: plain or gzip, UTF-8, errors turned into one line naming the file.


def _open_text(path: Path) -> IO[str]:
    """UTF-8, a leading byte order mark dropped (utf-8-sig: Windows editors and Excel write one, and it
    would otherwise be part of the first JSON record or the first TSV column's name)."""
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _bad_utf8_line(path: Path) -> int:
    """The 1-based line (split as _open_text splits: at \\n, \\r\\n or \\r) of the first bytes that are not
    UTF-8; 0 if none is found."""
    n = 0
    with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
        for raw in f:  # \n and \r never occur inside a UTF-8 sequence, so a line decodes on its own
            for part in raw.splitlines() or [b""]:
                n += 1
                try:
                    part.decode("utf-8")
                except UnicodeDecodeError:
                    return n
    return 0


def text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its line end) of a UTF-8 text file, plain or .gz; a byte that
    is not UTF-8 or a damaged gzip stream is a DataError naming the file and line (fine-tuning's JSONL
    reader, data/sft.py, reads with it too)."""
    n = 0
    try:
        with _open_text(path) as f:
            for n, line in enumerate(f, start=1):
                yield n, line.rstrip("\r\n")
    except UnicodeDecodeError as e:  # decoded a block at a time: n is not the bad line, find it in the bytes
        bad = _bad_utf8_line(path)
        where = f"{path}:{bad}" if bad else f"{path}"
        raise DataError(f"{where}: not valid UTF-8 ({e.reason}); task files are UTF-8") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated gzip file after line {n} ({e})") from None


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict]]:
    for n, line in text_lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n}: a record must be a JSON object, got {type(rec).__name__}")
        if "\\u" in line:  # JSON reads an unpaired surrogate escape ("\ud800"), which no UTF-8 text holds:
            _check_surrogates(rec, f"{path}:{n}")  # the --samples file failed to write, after the whole run
        yield n, rec


def _check_surrogates(rec: dict, where: str) -> None:
    for key, value in rec.items():
        try:
            json.dumps({key: value}, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(f"{where}: field {key!r} has an unpaired surrogate escape ({e.object[e.start]!r}); "
                            "\\uD800-\\uDFFF escapes must come in pairs (task files are Unicode text)") from None


def _tsv_records(path: Path) -> tuple[list[str], Iterator[tuple[int, dict]]]:
    """The header's column names and the rows as {column: cell}. Cells are split on tabs only (no
    quoting, as GLUE's TSV files are written)."""
    lines = text_lines(path)
    header = next((cells for _, cells in lines), None)
    if header is None or not header.strip():
        raise DataError(f"{path}: empty TSV file (the first line must be a header such as 'sentence<TAB>label')")
    columns = [c.strip() for c in header.split("\t")]

    def rows() -> Iterator[tuple[int, dict]]:
        for n, line in lines:
            if not line.strip():
                continue
            cells = line.split("\t")
            if len(cells) != len(columns):
                raise DataError(f"{path}:{n}: {len(cells)} tab-separated cells, but the header has "
                                f"{len(columns)} columns ({', '.join(columns)})")
            yield n, dict(zip(columns, cells))

    return columns, rows()


# ----------------------------------------------------------------------------------------------
# One record -> one example. `fields` maps our field names to the file's (e.g. text -> sentence).


class _Record:
    def __init__(self, rec: dict, where: str, kind: str, fields: Mapping[str, str]):
        self.rec, self.where, self.kind, self.fields = rec, where, kind, fields

    def get(self, field: str, what: str) -> object:
        name = self.fields.get(field, field)
        if name not in self.rec:
            shown = f"'{name}'" + (f" (our '{field}')" if name != field else "")
            present = ", ".join(self.rec) or "none"
            raise DataError(f"{self.where}: the {self.kind} record has no field {shown}; it needs {what} "
                            f"(fields present: {present})")
        return self.rec[name]

    def fail(self, field: str, message: str) -> DataError:
        return DataError(f"{self.where}: field '{self.fields.get(field, field)}' {message}")

    def string(self, field: str, what: str, allow_empty: bool = False) -> str:
        value = self.get(field, what)
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            raise self.fail(field, f"must be a {'' if allow_empty else 'non-empty '}string, got {value!r:.80}")
        return value


def _generate_example(r: _Record, line: int) -> GenerateExample:
    has_prompt, has_messages = r.fields.get("prompt", "prompt") in r.rec, r.fields.get("messages", "messages") in r.rec
    if has_prompt and has_messages:
        raise DataError(f"{r.where}: the generate record has both 'prompt' and 'messages'; give one")
    if not has_prompt and not has_messages:
        r.get("prompt", "'prompt' (a string) or 'messages' (a list of {role, content}), and 'references'")
    refs = r.get("references", "'references': a string or a list of strings")
    refs = [refs] if isinstance(refs, str) else refs
    if not isinstance(refs, list) or not refs or not all(isinstance(x, str) and x.strip() for x in refs):
        raise r.fail("references", f"must be a non-empty string or a non-empty list of non-empty strings, "
                                   f"got {refs!r:.80}")
    if has_prompt:
        return GenerateExample(references=tuple(refs), prompt=r.string("prompt", "a prompt"), line=line)
    raw = r.rec[r.fields.get("messages", "messages")]
    if not isinstance(raw, list) or not raw:
        raise r.fail("messages", f"must be a non-empty list of {{role, content}} objects, got {raw!r:.80}")
    messages = []
    for i, m in enumerate(raw):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise r.fail("messages", f"item {i} must be an object with string 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise r.fail("messages", f"item {i} has role {m['role']!r}; valid roles: {', '.join(ROLES)}")
        messages.append(Message(m["role"], m["content"]))
    return GenerateExample(references=tuple(refs), messages=tuple(messages), line=line)


def _classify_example(r: _Record, line: int, rename: Mapping[str, str] | None) -> ClassifyExample:
    text = r.string("text", "'text' (a string) and 'label'")
    label = r.get("label", "'label' (a string or an integer from the label set)")
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise r.fail("label", f"must be a string or an integer, got {label!r:.80}")
    if not str(label).strip():  # else the label set gets a nameless class, refused later without a line
        raise r.fail("label", f"is empty (got {label!r}); a label is a non-empty string or an integer")
    label = str(label).strip()
    if rename is not None:
        if label not in rename:
            raise r.fail("label", f"has unknown label {label!r}; the label set is {', '.join(rename)}")
        label = rename[label]
    return ClassifyExample(text=text, label=label, line=line)


def _choice_example(r: _Record, line: int) -> ChoiceExample:
    context = r.string("context", "'context' (a string), 'choices' and 'gold'", allow_empty=True)
    choices = r.get("choices", "'choices': a list of at least two strings")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise r.fail("choices", f"must be a list of at least two non-empty strings, got {choices!r:.80}")
    gold = r.get("gold", f"'gold': the index of the right choice, 0 to {len(choices) - 1}")
    # datasets that store the index as text ("2"); isdecimal, not isdigit: "²" is a digit that int() refuses
    if isinstance(gold, str) and gold.strip().isdecimal():
        gold = int(gold)
    if isinstance(gold, bool) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise r.fail("gold", f"is {gold!r}, out of range: it must be an integer index into 'choices', "
                             f"0 to {len(choices) - 1}")
    return ChoiceExample(context=context, choices=tuple(choices), gold=gold, line=line)


def _infer_kind(rec: dict, fields: Mapping[str, str], where: str) -> str:
    has = lambda f: fields.get(f, f) in rec  # noqa: E731
    if has("prompt") or has("messages") or has("references"):
        return "generate"
    if has("choices") or has("context"):
        return "choice"
    if has("label") or has("text"):
        return "classify"
    raise DataError(f"{where}: cannot tell the task's kind from fields {', '.join(rec)}: give a header record "
                    f"{{\"kind\": ...}} or kind= one of {', '.join(KINDS)} (docs/tasks.md)")


def _kind_of(rec: dict, fields: Mapping[str, str]) -> str | None:
    """The kind a record's fields suggest (_infer_kind), None when they suggest none."""
    try:
        return _infer_kind(rec, fields, "")
    except DataError:
        return None


def _label_set(labels: Sequence[str] | Mapping[str, str] | None, where: str) -> dict[str, str] | None:
    """raw label -> label name, in label-set order; None when the set is to be taken from the data."""
    if labels is None:
        return None
    # Stripped as record labels are (a record's " negative" reads "negative"), and as the scorer strips a
    # prediction: a name kept as " negative" would make every right answer of that class an invalid one.
    if isinstance(labels, Mapping):
        pairs = [(str(k).strip(), str(v).strip()) for k, v in labels.items()]
    elif isinstance(labels, (list, tuple)) and all(type(x) in (str, int) for x in labels):  # bool is no label
        pairs = [(str(x).strip(), str(x).strip()) for x in labels]
    else:
        raise DataError(f"{where}: labels must be a list of strings (or a mapping raw -> name), got {labels!r:.80}")
    names = [v for _, v in pairs]
    if not pairs or len(set(names)) != len(names) or len({k for k, _ in pairs}) != len(pairs):
        raise DataError(f"{where}: the label set must be non-empty and without repeats, got {names}")
    if "" in names or any(not k for k, _ in pairs) or INVALID in names:
        raise DataError(f"{where}: the label set has an empty label or {INVALID!r} (which marks predictions "
                        f"outside the set), got {[k if k == v else f'{k}={v}' for k, v in pairs]}")
    return dict(pairs)


def _is_int(label: str) -> bool:
    try:
        int(label)
        return True
    except ValueError:
        return False


def _warn_mixed_labels(path: Path, examples: list, labels: tuple[str, ...]) -> None:
    """A label set taken from the data that mixes integers and words ("pos", "neg", 1) is almost always a
    data error: each spelling became its own class. Say so once, with a line of the rarer kind."""
    numbers = [x for x in labels if _is_int(x)]
    words = [x for x in labels if not _is_int(x)]
    if not numbers or not words:
        return
    counts = {x: 0 for x in labels}
    for e in examples:
        counts[e.label] += 1
    rare = numbers if sum(counts[x] for x in numbers) <= sum(counts[x] for x in words) else words
    first = next(e for e in examples if e.label in rare)
    log.warning("%s: the labels mix integers (%s) and words (%s), so they make %d classes; line %d has label %r. "
                "Give every record the same kind of label, or pass the label set (finetune.labels, a task "
                "header's labels)", path, ", ".join(numbers), ", ".join(words), len(labels), first.line, first.label)


def _sorted_labels(found: set[str]) -> tuple[str, ...]:
    """Labels taken from the data: numeric order when all are integers ("2" before "10"), else text order."""
    try:
        return tuple(sorted(found, key=int))
    except ValueError:
        return tuple(sorted(found))


def _build(path: Path, records: Iterator[tuple[int, dict]], kind: str | None, name: str,
           labels: Sequence[str] | Mapping[str, str] | None, fields: Mapping[str, str],
           limit: int | None, header_ok: bool) -> Task:
    examples: list[Example] = []
    first, rename, inferred_at = True, None, None  # inferred_at: the line whose fields gave the kind
    example_fields = set(EXAMPLE_FIELDS) | set(fields.values())
    for n, rec in records:
        where = f"{path}:{n}"
        if first and header_ok and "kind" in rec and not example_fields & set(rec):  # the header record
            unknown = sorted(set(rec) - set(HEADER_KEYS))
            if unknown:
                raise DataError(f"{where}: header record has unknown keys {unknown}; valid: {', '.join(HEADER_KEYS)}")
            version = rec.get("version", FORMAT_VERSION)
            if isinstance(version, bool) or version != FORMAT_VERSION:  # true == 1 in Python
                raise DataError(f"{where}: header version={rec['version']!r}; "
                                f"this clusterlm reads version {FORMAT_VERSION}")
            if rec["kind"] not in KINDS:
                raise DataError(f"{where}: header kind={rec['kind']!r}; valid: {', '.join(KINDS)}")
            if kind is not None and kind != rec["kind"]:
                raise DataError(f"{where}: the header says kind={rec['kind']!r} but kind={kind!r} was asked for")
            kind = rec["kind"]
            if not isinstance(rec.get("name", name), str) or not rec.get("name", name).strip():
                raise DataError(f"{where}: header name must be a non-empty string (it keys the task's scores), "
                                f"got {rec['name']!r:.80}")
            name = rec.get("name", name)
            if "labels" in rec:
                if kind != "classify":
                    raise DataError(f"{where}: header 'labels' is only for classify tasks, this one is {kind}")
                if labels is None:  # the loader's argument takes precedence over the header
                    labels = rec["labels"]
            first = False
            continue
        first = False
        if header_ok and "kind" in rec:  # a record may also name its kind: one kind per task
            if rec["kind"] not in KINDS:
                raise DataError(f"{where}: kind={rec['kind']!r}; valid: {', '.join(KINDS)}")
            if kind is not None and rec["kind"] != kind:
                raise DataError(f"{where}: kind={rec['kind']!r} but the task is {kind!r} (one kind per task file)")
            kind = rec["kind"]
        if kind is None:
            kind, inferred_at = _infer_kind(rec, fields, where), n
        if kind == "classify" and rename is None and labels is not None:  # the header is read by now
            rename = _label_set(labels, str(path))
        r = _Record(rec, where, kind, fields)
        try:
            if kind == "generate":
                examples.append(_generate_example(r, n))
            elif kind == "classify":
                examples.append(_classify_example(r, n, rename))
            else:
                examples.append(_choice_example(r, n))
        except DataError as e:
            # a record of another kind in a task whose kind came from an earlier record's fields: said so,
            # not as a field this record lacks ("the generate record has no field 'prompt'")
            other = _kind_of(rec, fields) if inferred_at not in (None, n) else None
            if other is None or other == kind:
                raise
            raise DataError(f"{where}: a {other} record (fields {', '.join(rec)}) in a {kind} task (the kind read "
                            f"from line {inferred_at}'s fields); one kind per task file") from e
    if not examples:
        raise DataError(f"{path}: empty task file: no examples (docs/tasks.md shows the format)")
    task_labels = None
    if kind == "classify":
        task_labels = tuple(rename.values()) if rename is not None else _sorted_labels({e.label for e in examples})
        if INVALID in task_labels:
            bad = next(e for e in examples if e.label == INVALID)
            raise DataError(f"{path}:{bad.line}: field 'label' is {INVALID!r}, which marks predictions outside the "
                            "label set; name the class otherwise")
        if rename is None:
            log.info("%s: label set taken from the data: %s (pass labels= to fix it)", path, ", ".join(task_labels))
            _warn_mixed_labels(path, examples, task_labels)
    return Task(name=name, kind=kind, examples=tuple(examples[:limit]), labels=task_labels, source=str(path))


# ----------------------------------------------------------------------------------------------
# Public readers.


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit={limit!r} must be an integer >= 1 (or None for every example)")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".tsv", ".txt"):
        name = name.removesuffix(suffix)
    return name


def load_jsonl(path: PathLike, *, kind: str | None = None, name: str | None = None,
               labels: Sequence[str] | Mapping[str, str] | None = None,
               fields: Mapping[str, str] | None = None, limit: int | None = None) -> Task:
    """A task JSONL file (.jsonl or .jsonl.gz): an optional header record, then one example per line.
    The kind comes from the header, else `kind`, else the first record's fields."""
    _check_limit(limit)
    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    path = Path(path)
    return _build(path, _jsonl_records(path), kind, name or _stem(path), labels, dict(fields or {}), limit,
                  header_ok=True)


def load_tsv(path: PathLike, *, kind: str = "classify", name: str | None = None,
             labels: Sequence[str] | Mapping[str, str] | None = None,
             fields: Mapping[str, str] | None = None, limit: int | None = None) -> Task:
    """A TSV file with a header line; columns are found by name in any order. For a classify task the
    text column is `text` or `sentence` (SST-2) and the label column `label`; for a generate task
    `prompt` and `references` (or `completion`); `fields` renames."""
    _check_limit(limit)
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    path = Path(path)
    columns, rows = _tsv_records(path)
    given = dict(fields or {})
    fields = {"text": next((c for c in TSV_TEXT_COLUMNS if c in columns), "text"), **given}
    if kind == "generate" and "references" not in columns and "completion" in columns:
        fields.setdefault("references", "completion")  # fine-tuning's prompt/completion pairs, as in its JSONL
    if kind == "generate" and fields.get("references", "references") not in columns:
        want = fields["references"] if "references" in given else "references' or 'completion"
        raise DataError(f"{path}:1: the header has no column '{want}' (the response of a generate task or an "
                        f"SFT pair; fields= renames); columns: {', '.join(columns)}")
    read = {"generate": ("prompt", "messages", "references"), "classify": ("text", "label"),
            "choice": ("context", "choices", "gold")}[kind]
    repeated = sorted({fields.get(f, f) for f in read if columns.count(fields.get(f, f)) > 1})
    if repeated:  # dict(zip(columns, cells)) kept the last column of a name and read it without a word
        raise DataError(f"{path}:1: the header names column {repeated[0]!r} {columns.count(repeated[0])} times; the "
                        f"columns read must have one name each (fields= picks others); columns: {', '.join(columns)}")
    if kind == "classify":
        for ours in ("text", "label"):
            if fields.get(ours, ours) not in columns:
                want = " or ".join(TSV_TEXT_COLUMNS) if ours not in given and ours == "text" else fields.get(ours, ours)
                raise DataError(f"{path}:1: the header has no column '{want}' (the {ours} of a classify task; "
                                f"fields= renames); columns: {', '.join(columns)}")
    return _build(path, rows, kind, name or _stem(path), labels, fields, limit, header_ok=False)


def _lang(path: Path) -> str:
    """Language code from a parallel file name: train.en.gz -> en, dev.fr -> fr."""
    parts = path.name.removesuffix(".gz").split(".")
    return parts[-1] if len(parts) > 1 else parts[0]


def check_template(template: str) -> None:
    """A prompt template must use {source} and no placeholder other than TEMPLATE_FIELDS."""
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"template {template!r} is not a valid format string ({e})") from None
    unknown = used - set(TEMPLATE_FIELDS)
    if unknown or "source" not in used:
        raise ValueError(f"template {template!r} must contain {{source}} and may use only "
                         f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)}"
                         + (f"; unknown: {', '.join(sorted(unknown))}" if unknown else ""))


def load_parallel(source: PathLike, target: PathLike, *, template: str = PARALLEL_TEMPLATE,
                  name: str | None = None, limit: int | None = None) -> Task:
    """Two text files, one sentence a line (plain or .gz), line i of `target` the translation of line
    i of `source`: a `generate` task whose prompt is `template` filled with the source line and whose
    one reference is the target line. Pairs with an empty side are skipped (logged); the files must
    have the same number of lines."""
    _check_limit(limit)
    check_template(template)
    src, tgt = Path(source), Path(target)
    for side in (src, tgt):  # "a.jsonl,b.jsonl" read as a pair scored each JSON line as a sentence to translate
        if side.name.endswith(JSONL_SUFFIXES + TSV_SUFFIXES):
            raise DataError(f"{src},{tgt}: {side} is a task file, not a parallel text file (one sentence a line, "
                            f"e.g. test.en,test.fr); give each task file as a task of its own (--task FILE)")
    src_lang, tgt_lang = _lang(src), _lang(tgt)
    if src_lang == tgt_lang and ("{src_lang}" in template or "{tgt_lang}" in template):
        log.warning("%s / %s: both files give the language tag %r (the last part of the file name), so the prompt "
                    "cannot tell source from target by it; name the files by language (train.en, train.fr) or give "
                    "a template without {src_lang}/{tgt_lang}", src, tgt, src_lang)
    examples, skipped, n_src, n_tgt = [], [], 0, 0
    for a, b in zip_longest(text_lines(src), text_lines(tgt)):
        n_src += a is not None
        n_tgt += b is not None
        if a is None or b is None or (limit is not None and len(examples) >= limit):
            continue
        n, s, t = a[0], a[1].strip(), b[1].strip()
        if not s or not t:
            skipped.append(n)
            continue
        prompt = template.format(source=s, src_lang=src_lang, tgt_lang=tgt_lang)
        examples.append(GenerateExample(references=(t,), prompt=prompt, line=n))
    if n_src != n_tgt:
        raise DataError(f"parallel files differ in length: {src} has {n_src} lines, {tgt} has {n_tgt}")
    if not examples:
        raise DataError(f"{src} and {tgt}: no examples (empty files, or every pair has an empty side)")
    if skipped:
        log.warning("%s / %s: skipped %d pairs with an empty side (first at line %d)",
                    src, tgt, len(skipped), skipped[0])
    stem = _stem(src).removesuffix(f".{src_lang}")
    return Task(name=name or f"{stem}.{src_lang}-{tgt_lang}", kind="generate", examples=tuple(examples),
                source=f"{src},{tgt}")


def load_task(spec: PathLike | tuple[PathLike, PathLike], *, kind: str | None = None, name: str | None = None,
              labels: Sequence[str] | Mapping[str, str] | None = None, fields: Mapping[str, str] | None = None,
              template: str = PARALLEL_TEMPLATE, limit: int | None = None) -> Task:
    """A task from a path, by its extension: .jsonl(.gz) -> load_jsonl, .tsv(.gz) -> load_tsv; a pair
    of paths, or "SRC,TGT", -> load_parallel. `limit` keeps the first N examples (the whole file is
    still checked)."""
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise ValueError(f"a parallel task is two files (source, target), got {len(spec)}")
        return load_parallel(spec[0], spec[1], template=template, name=name, limit=limit)
    text = os.fspath(spec)
    if "," in text and not os.path.exists(text):
        src, _, tgt = text.partition(",")
        return load_parallel(src, tgt, template=template, name=name, limit=limit)
    if text.endswith(JSONL_SUFFIXES):
        return load_jsonl(text, kind=kind, name=name, labels=labels, fields=fields, limit=limit)
    if text.endswith(TSV_SUFFIXES):
        return load_tsv(text, kind=kind or "classify", name=name, labels=labels, fields=fields, limit=limit)
    raise DataError(f"task {text!r}: unsupported file; valid: {', '.join(JSONL_SUFFIXES + TSV_SUFFIXES)}, "
                    f"or two parallel text files as 'SRC,TGT' (e.g. test.en.gz,test.fr.gz)")
