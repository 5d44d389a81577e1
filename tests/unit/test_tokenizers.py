"""Byte, char and BPE tokenizers: id layouts, exact round trips, save/load, determinism, errors.

Run: .venv/bin/python -m pytest -q tests/unit/test_tokenizers.py

References: Python's own UTF-8 codec (byte), a dict lookup over sorted characters (char), and the
input text itself for every round trip. The BPE tokenizer is trained once per module on a small
corpus: the start of a few plays from the bundled Shakespeare archive plus mixed-script lines.
"""

from __future__ import annotations

import json
import os
import random
import signal
import tarfile
import threading
import time
from importlib.resources import files

import numpy as np
import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import clusterlm.tokenizer.bpe as bpe_module
import clusterlm.tokenizer.char as char_module
from clusterlm.errors import ConfigError, DataError
from clusterlm.tokenizer import Tokenizer, load_tokenizer
from clusterlm.tokenizer.base import BOS, EOS, PAD
from clusterlm.tokenizer.bpe import BPETokenizer
from clusterlm.tokenizer.byte import ByteTokenizer
from clusterlm.tokenizer.char import CharTokenizer
from clusterlm.tokenizer.kinds import make_tokenizer, train_tokenizer

BPE_VOCAB = 600
MIXED = [
    "Ἐν ἀρχῇ ἦν ὁ λόγος, καὶ ὁ λόγος ἦν πρὸς τὸν θεόν.\r\n",
    "天地玄黄，宇宙洪荒。日月盈昃，辰宿列张。\n",
    "emoji 🙂🙃 and astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, e\u0301 (combining), tabs\t\tand   spaces\x00nul\n",
    "Привет, мир! שלום עולם مرحبا بالعالم\n",
]
# hypothesis: text pieces that have broken byte-level BPE round trips elsewhere
TRICKY = st.lists(st.sampled_from(["\r\n", "\n", "  ", "   ", "\t", "\x00", "\u0301", "𝔘", "🙂",
                                   "<|eos|>", "<|bos|>", "<|pad|>", "<|endoftext|>", " a", "'s",
                                   "\u00a0", "\u200b", "\ufeff", "\ufffd", "x"]),
                  max_size=30).map("".join)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def space_free(n: int, seed: int = 0) -> str:
    """`n` random letters from a-j: one pre-tokenization piece under the GPT-2 regex alone."""
    return "".join(random.Random(seed).choices("abcdefghij", k=n))


def uncapped_gpt2_split(*args: object) -> tokenizers.pre_tokenizers.PreTokenizer:
    """The pre-tokenizer before MAX_PIECE_BYTES: GPT-2 regex only, letter runs of any length."""
    return tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def shakespeare_sample(n_files: int = 4, n_chars: int = 20_000) -> list[str]:
    """The first `n_chars` characters of the first `n_files` plays in the bundled archive."""
    out = []
    with tarfile.open(str(files("clusterlm.assets") / "shakespeare.tar.xz")) as tf:
        for m in sorted((m for m in tf.getmembers() if m.name.endswith(".txt")), key=lambda m: m.name):
            out.append(tf.extractfile(m).read().decode("utf-8")[:n_chars])
            if len(out) == n_files:
                break
    return out


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return shakespeare_sample() + MIXED * 5


@pytest.fixture(scope="module")
def bpe(corpus: list[str]) -> BPETokenizer:
    return BPETokenizer.train(corpus, vocab_size=BPE_VOCAB)


@pytest.fixture(scope="module")
def all_kinds(corpus: list[str], bpe: BPETokenizer) -> dict[str, Tokenizer]:
    return {"byte": make_tokenizer("byte"), "char": train_tokenizer("char", corpus), "bpe": bpe}


# ---- byte --------------------------------------------------------------------------------------

def test_byte_layout():
    """Byte ids equal Python's UTF-8 bytes; specials are 256, 257, 258 of a 259-token vocabulary."""
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 256, 257, 258)
    assert tok.encode("hé🙂") == [104, 0xC3, 0xA9, 0xF0, 0x9F, 0x99, 0x82]
    assert tok.encode("") == []
    assert tok.encode_batch(["a", "", "é"]) == [[97], [], [0xC3, 0xA9]]


@FAST
@given(st.text() | TRICKY)
def test_byte_round_trip(text: str):
    """decode(encode(t)) == t and encode(t) == list(t.encode('utf-8')) for any valid str."""
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_decode_specials_invalid_utf8_and_surrogates():
    """Specials decode to nothing; a cut UTF-8 sequence gives U+FFFD; lone surrogates encode as U+FFFD."""
    tok = ByteTokenizer()
    assert tok.decode([256, 104, 257, 105, 258]) == "hi"
    assert tok.decode([0xC3]) == "\ufffd"
    assert tok.decode([104, 0xF0, 0x9F, 105]) == "h\ufffdi"
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb") == [97, 0xEF, 0xBF, 0xBD, 98]
    with pytest.raises(ValueError, match="id 259 at position 1"):
        tok.decode([1, 259])
    with pytest.raises(ValueError, match="id -1"):
        tok.decode([-1])
    # ids past int64 made numpy build an object array: the message said "not integer ids", a uint64
    # id past 2**63 was named as a negative one; both now name the id and its position
    with pytest.raises(ValueError, match=r"id 99999999999999999999 at position 1 is outside the vocabulary \[0, 259\)"):
        tok.decode([1, 99999999999999999999])
    with pytest.raises(ValueError, match=r"id 18446744073709551615 at position 0 is outside"):
        tok.decode(np.array([2**64 - 1, 1], dtype=np.uint64))
    assert tok.decode(np.array([104, 105], dtype=np.uint64)) == tok.decode(np.array([104, 105], dtype=object)) == "hi"
    with pytest.raises(ValueError, match="flat sequence of integer ids"):
        tok.decode(["a"])


# ---- char --------------------------------------------------------------------------------------

def test_char_layout_and_unk():
    """Chars in code-point order get 0..n-1, then bos, eos, pad, unk; unknown chars map to unk."""
    tok = CharTokenizer.train(iter(["ba", "ca\n", ""]))
    assert tok.chars == "\nabc"
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (8, 4, 5, 6, 7)
    assert tok.encode("abc\nz") == [1, 2, 3, 0, 7]
    assert tok.decode([1, 4, 7, 5, 6, 0]) == "a\ufffd\n"
    assert tok.encode_batch(["cab", "", "zz", "a"]) == [[3, 1, 2], [], [7, 7], [1]]
    assert tok.encode_batch([]) == []
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([8])


def test_char_matches_dict_reference(corpus: list[str]):
    """Char encode of the corpus equals a dict lookup over sorted(set(text)) ids, and decodes back."""
    tok = CharTokenizer.train(corpus)
    text = "".join(corpus)
    ref = {c: i for i, c in enumerate(sorted(set(text)))}
    assert tok.vocab_size == len(ref) + 4
    ids = tok.encode(text)
    assert ids == [ref[c] for c in text]
    assert tok.decode(ids) == text
    assert tok.encode_batch(corpus) == [[ref[c] for c in t] for t in corpus]


@FAST
@given(st.data())
def test_char_round_trip_in_vocabulary(corpus: list[str], data: st.DataObject):
    """decode(encode(t)) == t for any text over the training characters; batch equals one by one."""
    tok = CharTokenizer.train(corpus)
    texts = data.draw(st.lists(st.text(alphabet=tok.chars), max_size=4))
    for t in texts:
        assert tok.decode(tok.encode(t)) == t
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_char_surrogates_become_replacement():
    """A lone surrogate in training text joins the vocabulary as U+FFFD; at encode time it is unk."""
    tok = CharTokenizer.train(["a\udc80"])
    assert tok.chars == "a\ufffd"
    assert tok.encode("a\ufffd\udc80") == [0, 1, tok.unk_id]


def test_char_encode_in_blocks(monkeypatch: pytest.MonkeyPatch):
    """With 7-character blocks, encode_array (any dtype, or into `out`), encode and encode_batch of
    texts shorter than, equal to and longer than a block equal a dict lookup (unk for unseen)."""
    monkeypatch.setattr(char_module, "BLOCK_CHARS", 7)
    tok = CharTokenizer.train(["abc\né🙂"])
    ref = {c: i for i, c in enumerate(sorted(set("abc\né🙂")))}
    texts = ["", "a", "abcabca", "zé🙂abc\n" * 5, "q" * 15, "\udc80ab"]
    want = [[ref.get(c, tok.unk_id) for c in t] for t in texts]
    for t, w in zip(texts, want):
        assert tok.encode(t) == w
        assert tok.encode_array(t, dtype="uint16").tolist() == w
        out = np.full(len(t), 99, dtype=np.uint32)
        assert tok.encode_array(t, out=out) is out and out.tolist() == w
    assert tok.encode_batch(texts) == want
    with pytest.raises(ValueError, match=r"out has shape \(3,\), the text needs \(2,\)"):
        tok.encode_array("ab", out=np.zeros(3, dtype=np.int64))


# ---- bpe ---------------------------------------------------------------------------------------


def test_bpe_space_free_text_pieces_capped_and_fast():
    """Reference: MAX_PIECE_BYTES = 256. One 300 kB document with no spaces trains in well under
    5 s (without the cap the whole document is one piece: ~20 s, growing about quadratically);
    every pre-tokenization piece of the trained tokenizer, and of the one loaded back from its
    file, has at most 256 bytes, so encoding splits as training did; runs of multi-byte characters
    cut mid-character still round-trip exactly."""
    text = space_free(300_000)
    t0 = time.perf_counter()
    tok = BPETokenizer.train([text], vocab_size=300)
    assert time.perf_counter() - t0 < 5.0
    assert tok.vocab_size == 300
    loaded = BPETokenizer.from_str(tok.to_json_str())
    hostile = text[:5000] + "é" * 1000 + "日本" * 500 + "🙂" * 300 + " " * 2000 + "-" * 700 + "9" * 600
    for t in (tok, loaded):
        pieces = t.hf_tokenizer.pre_tokenizer.pre_tokenize_str(hostile)
        assert max(len(p) for p, _ in pieces) == bpe_module.MAX_PIECE_BYTES  # byte symbols
        assert "".join(p for p, _ in pieces) == "".join(
            p for p, _ in uncapped_gpt2_split().pre_tokenize_str(hostile))
        assert t.decode(t.encode(hostile)) == hostile
        assert t.encode_batch([hostile, text[:999]]) == [t.encode(hostile), t.encode(text[:999])]


def test_bpe_cap_changes_nothing_on_normal_text(corpus: list[str], monkeypatch: pytest.MonkeyPatch):
    """Reference: the same trainer with the GPT-2 pre-tokenizer alone (the pipeline before the
    cap). On the Shakespeare + mixed-script corpus the learned vocabulary and merges are identical,
    and so are the ids of every text."""
    capped = BPETokenizer.train(corpus, vocab_size=BPE_VOCAB)
    monkeypatch.setattr(bpe_module, "pre_tokenizer", uncapped_gpt2_split)
    plain = BPETokenizer.train(corpus, vocab_size=BPE_VOCAB)
    assert json.loads(capped.to_json_str())["model"] == json.loads(plain.to_json_str())["model"]
    assert capped.encode_batch(corpus) == plain.encode_batch(corpus)


def hostile_long_text(seed: int = 0) -> str:
    """About 30 K characters: prose, space-free runs (ASCII, 2-, 3- and 4-byte characters), long
    whitespace runs, punctuation and digit runs, contractions at every position."""
    rng = random.Random(seed)
    parts = ["the quick brown fox's tail ", space_free(2000, seed), "é" * 700, "日本語" * 400, "🙂" * 300,
             " " * 1500, "\n\n\t " * 100, "-" * 900, "9" * 700, "x'" * 400, "don't " * 50, "a1" * 600]
    return "".join(rng.choice(parts) for _ in range(20))


def test_slices_keep_the_pieces_of_the_whole_text():
    """Reference: the pre-tokenization of the whole text. Cut into slices of about 600 (and 3000)
    characters, the slices concatenate to the text, and their pieces (offsets shifted by
    each slice's start) are exactly the whole text's pieces, for the capped pre-tokenizer; and
    every non-whitespace character followed by a space or a newline is a piece boundary, which
    the fast cut relies on (checked for every code point, alternating the two: ~3 s)."""
    pre = bpe_module.pre_tokenizer()
    for seed in range(3):
        text = hostile_long_text(seed)
        want = pre.pre_tokenize_str(text)
        for max_chars in (600, 3000):
            parts = list(bpe_module.slices(text, pre, max_chars))
            assert "".join(parts) == text and max(map(len, parts)) <= 4 * max_chars and len(parts) > 5
            got, at = [], 0
            for part in parts:
                got += [(p, (a + at, b + at)) for p, (a, b) in pre.pre_tokenize_str(part)]
                at += len(part)
            assert got == want
    chars = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and not chr(c).isspace()]
    text = "".join(c + " \n"[i % 2] for i, c in enumerate(chars))  # each followed by a space or a newline
    starts = {a for _, (a, _) in pre.pre_tokenize_str(text)}
    assert all(i in starts for i in range(1, len(text), 2))


def test_bpe_long_texts_train_and_encode_as_a_whole(monkeypatch: pytest.MonkeyPatch):
    """Reference: training on and encoding each hostile text whole (SLICE_CHARS above every text).
    With SLICE_CHARS = 700 the tokenizer file is byte-identical and encode, encode_batch and
    encode_arrays (uint16, 50-character encode groups) give the same ids."""
    texts = [hostile_long_text(seed) for seed in range(2)] + ["short", ""]
    whole = BPETokenizer.train(texts, vocab_size=400)
    want = [whole.encode(t) for t in texts]
    monkeypatch.setattr(bpe_module, "SLICE_CHARS", 700)
    monkeypatch.setattr(bpe_module, "ENCODE_GROUP_CHARS", 50)
    sliced = BPETokenizer.train(texts, vocab_size=400)
    assert sliced.to_json_str() == whole.to_json_str()
    assert sliced.encode_batch(texts) == want
    assert [sliced.encode(t) for t in texts] == want
    arrays = sliced.encode_arrays(texts, dtype="uint16")
    assert [a.dtype.name for a in arrays] == ["uint16"] * 4 and [a.tolist() for a in arrays] == want


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="needs POSIX signals")
def test_bpe_training_honours_ctrl_c(monkeypatch: pytest.MonkeyPatch):
    """Reference: SIGINT sent to this process 0.3 s into a training that takes ~4 s (the uncapped
    GPT-2 split on 120 kB of space-free text, slow on purpose). KeyboardInterrupt reaches the
    caller within 1.5 s of the signal (the training child is killed), not when training ends."""
    monkeypatch.setattr(bpe_module, "pre_tokenizer", uncapped_gpt2_split, raising=False)
    text = space_free(120_000, seed=1)
    # as at a terminal: a shell that started pytest in the background set SIGINT to "ignore"
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    t0 = time.perf_counter()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            BPETokenizer.train([text], vocab_size=300)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert time.perf_counter() - t0 < 0.3 + 1.5


def test_bpe_training_child_failure_is_reported(monkeypatch: pytest.MonkeyPatch):
    """Reference: a training child that exits 1 after printing a reason, and one killed by SIGKILL
    before reading its input (as the kernel's out-of-memory killer does). train raises
    ClusterlmError naming the exit code and the reason, or the signal."""
    from clusterlm.errors import ClusterlmError

    child = "import sys; sys.stdin.buffer.read(); sys.exit('no memory left, say')"
    monkeypatch.setattr(bpe_module, "_TRAIN_CHILD", child)
    with pytest.raises(ClusterlmError, match=r"bpe training process failed \(exit code 1\): no memory left, say"):
        BPETokenizer.train(["some text"], vocab_size=300)
    # killed before it read anything: writing the texts meets a broken pipe
    monkeypatch.setattr(bpe_module, "_TRAIN_CHILD", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    with pytest.raises(ClusterlmError, match=r"failed \(killed by signal 9, out of memory\?\)$"):
        BPETokenizer.train([space_free(3_000_000)], vocab_size=300)


# ---- bpe ---------------------------------------------------------------------------------------

def test_bpe_layout_and_compression(bpe: BPETokenizer, corpus: list[str]):
    """Specials are ids 0, 1, 2; the vocabulary reaches the requested size; text compresses."""
    assert (bpe.kind, bpe.vocab_size, bpe.bos_id, bpe.eos_id, bpe.pad_id) == ("bpe", BPE_VOCAB, 0, 1, 2)
    hf = bpe.hf_tokenizer
    assert [hf.id_to_token(i) for i in range(3)] == [BOS, EOS, PAD]
    text = corpus[0]
    n_bytes, n_tokens = len(text.encode("utf-8")), len(bpe.encode(text))
    assert n_tokens < 0.6 * n_bytes, (n_tokens, n_bytes)


@FAST
@given(st.text() | TRICKY)
def test_bpe_round_trip(bpe: BPETokenizer, text: str):
    """decode(encode(t)) == t for any valid str (astral, combining, \\r\\n, NUL, space runs)."""
    ids = bpe.encode(text)
    assert not {bpe.bos_id, bpe.eos_id, bpe.pad_id} & set(ids)
    assert bpe.decode(ids) == text


@settings(max_examples=40, deadline=None)
@given(st.lists(st.text() | TRICKY, max_size=6))
def test_bpe_batch_equals_single(bpe: BPETokenizer, texts: list[str]):
    """encode_batch (parallel Rust) equals encode of each text."""
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]


def test_bpe_literal_special_text_is_plain_text(bpe: BPETokenizer):
    """Text containing "<|eos|>" yields no special ids (also batched) and round-trips;
    decode drops real special ids."""
    text = f"end{EOS} of {BOS}text{PAD}"
    for ids in (bpe.encode(text), bpe.encode_batch([text])[0]):
        assert not {0, 1, 2} & set(ids)
        assert bpe.decode(ids) == text
    ids = bpe.encode("to be")
    assert bpe.decode([bpe.bos_id, *ids, bpe.eos_id, bpe.pad_id]) == "to be"


def test_bpe_trained_on_literal_specials():
    """Even trained on text full of "<|eos|>", encoding it gives no special id (the split regex cuts it)."""
    tok = BPETokenizer.train([f"a{EOS}b {EOS}\n"] * 200, vocab_size=300)
    ids = tok.encode(f"x{EOS} {EOS}")
    assert tok.eos_id == 1 and 1 not in ids
    assert tok.decode(ids) == f"x{EOS} {EOS}"


def test_bpe_surrogates_become_replacement(bpe: BPETokenizer):
    """Lone surrogates encode as U+FFFD, single and batched."""
    assert bpe.encode("a\ud800b") == bpe.encode("a\ufffdb")
    assert bpe.encode_batch(["a\ud800b", "c"]) == [bpe.encode("a\ufffdb"), bpe.encode("c")]
    with pytest.raises(TypeError, match="takes a str"):
        bpe.encode(3)  # type: ignore[arg-type]


def test_bpe_deterministic(tmp_path, corpus: list[str]):
    """Training twice on the same input writes byte-identical tokenizer.json files."""
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    BPETokenizer.train(corpus, vocab_size=BPE_VOCAB).save(a)
    BPETokenizer.train(iter(corpus), vocab_size=BPE_VOCAB).save(b)
    assert a.read_bytes() == b.read_bytes()


def test_bpe_vocab_size_validation(corpus: list[str]):
    """vocab_size below 260 (256 bytes + 3 specials + 1 merge) or not an int is refused; None = 8192 cap."""
    for bad in (259, 0, -5, True, 2.5, "300"):
        with pytest.raises(ValueError, match="vocab_size"):
            BPETokenizer.train(corpus, vocab_size=bad)  # type: ignore[arg-type]
    small = BPETokenizer.train(["abab abab"], vocab_size=None)
    assert 259 < small.vocab_size < 8192  # tiny text: fewer merges than the default asks for
    with pytest.raises(DataError, match="no characters"):
        BPETokenizer.train(["", ""], vocab_size=300)


# ---- save / load -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_save_load_round_trip(tmp_path, all_kinds: dict[str, Tokenizer], corpus: list[str], kind: str):
    """A saved and reloaded tokenizer has the same kind, sizes, special ids and encodings."""
    tok = all_kinds[kind]
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    tok.save(path)  # overwriting is fine
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temporary left behind
    back = load_tokenizer(path)
    assert isinstance(back, Tokenizer) and type(back) is type(tok)
    assert (back.kind, back.vocab_size, back.bos_id, back.eos_id, back.pad_id) == \
        (kind, tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id)
    text = corpus[1][:3000] + MIXED[2] + f"lit {EOS}"
    assert back.encode(text) == tok.encode(text)
    assert back.encode_batch(corpus[:3]) == tok.encode_batch(corpus[:3])
    assert back.to_json_str() == tok.to_json_str() == path.read_text(encoding="utf-8")
    if kind == "bpe":  # the file is a plain Hugging Face tokenizer.json
        assert tokenizers.Tokenizer.from_file(str(path)).encode("to be").ids == tok.encode("to be")
    else:
        assert json.loads(path.read_text())["clusterlm_tokenizer"] == kind


def test_load_foreign_hf_files(tmp_path):
    """A tokenizer.json made without our specials loads with GPT-2 style <|endoftext|> as bos=eos=pad."""
    def hf_file(name: str, specials: list[str]):
        hf = tokenizers.Tokenizer(tokenizers.models.BPE())
        hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = tokenizers.decoders.ByteLevel()
        hf.train_from_iterator(["hello world"] * 10, trainer=tokenizers.trainers.BpeTrainer(
            vocab_size=300, special_tokens=specials, show_progress=False,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
        hf.save(str(tmp_path / name))
        return tmp_path / name, hf

    path, hf = hf_file("gpt2.json", ["<|endoftext|>"])
    tok = load_tokenizer(path)
    eot = hf.token_to_id("<|endoftext|>")
    assert (tok.kind, tok.bos_id, tok.eos_id, tok.pad_id) == ("bpe", eot, eot, eot)
    assert tok.vocab_size == hf.get_vocab_size()
    assert tok.decode(tok.encode("hello <|endoftext|> world")) == "hello <|endoftext|> world"

    path, _ = hf_file("llama.json", ["<s>", "</s>"])
    tok = load_tokenizer(path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)  # pad falls back to eos

    path, _ = hf_file("bare.json", [])
    with pytest.raises(DataError, match=r"bare\.json.*no token for BOS .* and EOS"):
        load_tokenizer(path)


def test_load_errors(tmp_path, all_kinds: dict[str, Tokenizer]):
    """Missing file, bad JSON, unknown kind, wrong version, corrupt char vocabularies and
    special_tokens that disagree with the layout name the file."""
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="is a directory, not a tokenizer file") as e:
        load_tokenizer(tmp_path)
    assert "does not exist" not in str(e.value)  # it said "does not exist (it is a directory)"
    cases = {
        "bad.json": ("{not json", "not UTF-8 JSON"),
        "latin1.json": (b"\xff\xfe{}", "not UTF-8 JSON"),
        "list.json": ("[1, 2]", "JSON list"),
        "other.json": ('{"name": "x"}', "'clusterlm_tokenizer' field"),
        "kind.json": ('{"clusterlm_tokenizer": "wordpiece", "version": 1}', "byte, char"),
        "version.json": ('{"clusterlm_tokenizer": "byte", "version": 3}', "version=3"),
        "noadded.json": ('{"clusterlm_tokenizer": "byte", "version": 2}', "'added_tokens' list"),
        "badadded.json": ('{"clusterlm_tokenizer": "char", "version": 2, "chars": "ab", '
                          '"added_tokens": ["user"]}', "must look like <...>"),
        "bytevocab.json": ('{"clusterlm_tokenizer": "byte", "version": 1, "vocab_size": 300}', "259"),
        "nochars.json": ('{"clusterlm_tokenizer": "char", "version": 1}', "'chars'"),
        "unsorted.json": ('{"clusterlm_tokenizer": "char", "version": 1, "chars": "ba"}', "increasing"),
        "charvocab.json": ('{"clusterlm_tokenizer": "char", "version": 1, "chars": "ab", '
                           '"vocab_size": 5}', "2 characters"),
        "surrogate.json": ('{"clusterlm_tokenizer": "char", "version": 1, "chars": "a\\ud800"}',
                           "surrogate"),
        "hf.json": ('{"model": {"type": "Nonsense"}}', "not a valid Hugging Face"),
        # special_tokens edited by hand (eos moved to 0) were ignored without a word: eos stayed 257 / n+1
        "bytespecials.json": ('{"clusterlm_tokenizer": "byte", "version": 1, "vocab_size": 259, "special_tokens": '
                              '{"<|bos|>": 256, "<|eos|>": 0, "<|pad|>": 258}}', r"special_tokens=.*'<\|eos\|>': 257"),
        "charspecials.json": ('{"clusterlm_tokenizer": "char", "version": 1, "chars": "ab", "vocab_size": 6, '
                              '"special_tokens": {"<|bos|>": 2, "<|eos|>": 0, "<|pad|>": 4, "<|unk|>": 5}}',
                              r"special_tokens=.*'<\|eos\|>': 3"),
    }
    for name, (content, msg) in cases.items():
        p = tmp_path / name
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(DataError, match=msg) as e:
            load_tokenizer(p)
        assert name in str(e.value)


# ---- kinds -------------------------------------------------------------------------------------

def test_kind_errors(corpus: list[str]):
    """Unknown kinds list the valid ones; vocab_size is refused where the kind fixes it."""
    with pytest.raises(ConfigError, match=r"'chr'.*did you mean 'char'.*byte, char, bpe"):
        train_tokenizer("chr", corpus)
    for name in ("BPE", "Char"):  # a case slip got no suggestion (prepare --tokenizer BPE gets one)
        with pytest.raises(ConfigError, match=f"did you mean '{name.lower()}'"):
            train_tokenizer(name, corpus)
    with pytest.raises(ConfigError, match="learned from text"):
        make_tokenizer("bpe")
    with pytest.raises(ConfigError, match="vocab_size=100 for a char"):
        train_tokenizer("char", corpus, vocab_size=100)
    with pytest.raises(ConfigError, match="always 259"):
        train_tokenizer("byte", corpus, vocab_size=512)
    assert train_tokenizer("byte", iter(()), vocab_size=259).vocab_size == 259
    with pytest.raises(DataError, match="no characters"):
        train_tokenizer("char", ["", ""])
    assert train_tokenizer("bpe", corpus, vocab_size=300).vocab_size == 300


def test_train_cli_out_a_folder_is_refused_without_suggesting_overwrite(tmp_path):
    """`tokenizer train --out FOLDER` says the folder is not a file whether or not --overwrite is
    given (it said 'already exists; pass --overwrite', which then failed with this message)."""
    from clusterlm.tokenizer.cli import main

    (tmp_path / "a.txt").write_text("hello world\n")
    for extra in ([], ["--overwrite"]):
        with pytest.raises(ConfigError, match=r"--out .* is a directory; give the path of a \.json file"):
            main(["train", str(tmp_path / "a.txt"), "--kind", "char", "--out", str(tmp_path), *extra])


def test_train_cli_byte_says_it_read_nothing(tmp_path, capsys):
    """`tokenizer train --kind byte` writes the fixed byte tokenizer without reading its inputs, and says
    so (it printed "trained on 0 documents", as if the files had been empty)."""
    from clusterlm.tokenizer.cli import main

    (tmp_path / "a.txt").write_text("hello world\n" * 5)
    assert main(["train", str(tmp_path / "a.txt"), "--kind", "byte", "--out", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert "vocab 259" in out and "needs no training" in out and "0 documents" not in out
    assert load_tokenizer(tmp_path / "t.json").kind == "byte"


def test_train_cli_byte_needs_no_inputs_and_a_bad_out_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """`tokenizer train --kind byte --out t.json` with no inputs writes the fixed byte tokenizer (it asked
    for inputs it then did not read); char and bpe still need some. --out under a file is refused before
    any training (it failed with "File exists: FILE" after training a BPE on the inputs)."""
    from clusterlm.tokenizer import kinds
    from clusterlm.tokenizer.cli import main

    assert main(["train", "--kind", "byte", "--out", str(tmp_path / "t.json")]) == 0
    assert "needs no training and no inputs" in capsys.readouterr().out
    assert load_tokenizer(tmp_path / "t.json").kind == "byte"
    with pytest.raises(Exception, match="no inputs given"):
        main(["train", "--kind", "char", "--out", str(tmp_path / "c.json")])
    (tmp_path / "a.txt").write_text("hello\n")
    monkeypatch.setattr(kinds, "train_tokenizer", lambda *a, **k: pytest.fail("trained before --out was checked"))
    with pytest.raises(ValueError, match=rf"--out {tmp_path / 'a.txt' / 'x.json'}: {tmp_path / 'a.txt'} is not a folder"):
        main(["train", str(tmp_path / "a.txt"), "--kind", "bpe", "--out", str(tmp_path / "a.txt" / "x.json")])
