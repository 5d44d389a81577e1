"""Added special tokens (the chat roles) in every tokenizer kind: ids appended after the vocabulary,
matched in text, dropped by decode and the stream detokenizer, saved and loaded; a plain tokenizer's
file and ids unchanged.

Run: .venv/bin/python -m pytest -q tests/unit/test_tokenizer_special.py
"""

from __future__ import annotations

import json

import pytest

from clusterlm.errors import DataError
from clusterlm.generate.template import CHAT_TOKENS
from clusterlm.generate.text import TextStream
from clusterlm.tokenizer import load_tokenizer
from clusterlm.tokenizer.bpe import SLICE_CHARS, BPETokenizer
from clusterlm.tokenizer.byte import ByteTokenizer
from clusterlm.tokenizer.char import CharTokenizer

CORPUS = "Be terse. The quick brown fox jumps over the lazy dog. héllo 中文 <|eos|> <|user|>\n" * 30
TEXT = "<|system|>\nBe terse.<|end|>\n<|user|>\nhéllo fox<|end|>\n<|assistant|>\n<|eos|> literal<|end|>"


@pytest.fixture(scope="module")
def kinds() -> dict:
    return {"byte": ByteTokenizer(), "char": CharTokenizer.train([CORPUS]),
            "bpe": BPETokenizer.train([CORPUS], vocab_size=320)}


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_added_tokens_get_the_next_ids_and_encode_as_one_id(kinds, kind):
    """Reference: the plain tokenizer. The chat tokens take ids vocab_size..vocab_size+3 in order; each
    occurrence in text is that one id, the text between them encodes exactly as before (so does
    literal <|eos|>, still text), and decode / TextStream drop them."""
    plain = kinds[kind]
    tok = plain.with_special_tokens(CHAT_TOKENS)
    assert plain.added_tokens == () and tok.added_tokens == CHAT_TOKENS
    assert tok.vocab_size == plain.vocab_size + 4
    assert [tok.token_id(t) for t in CHAT_TOKENS] == list(range(plain.vocab_size, plain.vocab_size + 4))
    assert (tok.token_id("<|bos|>"), tok.token_id("<|eos|>"), tok.token_id("<|pad|>")) == \
        (plain.bos_id, plain.eos_id, plain.pad_id)
    assert tok.token_id("<|nope|>") is None and plain.token_id("<|user|>") is None
    sid = {t: tok.token_id(t) for t in CHAT_TOKENS}
    expected = (
        [sid["<|system|>"]] + plain.encode("\nBe terse.") + [sid["<|end|>"]] + plain.encode("\n")
        + [sid["<|user|>"]] + plain.encode("\nhéllo fox") + [sid["<|end|>"]] + plain.encode("\n")
        + [sid["<|assistant|>"]] + plain.encode("\n<|eos|> literal") + [sid["<|end|>"]]
    )
    ids = tok.encode(TEXT)
    assert ids == expected
    assert tok.eos_id not in ids
    assert tok.encode_batch([TEXT, "fox", ""]) == [expected, plain.encode("fox"), []]
    assert tok.encode(CORPUS) != plain.encode(CORPUS)  # the corpus has <|user|> in it
    assert tok.encode("no chat tokens here <|eos|>") == plain.encode("no chat tokens here <|eos|>")
    want = "\nBe terse.\n\nhéllo fox\n\n<|eos|> literal"
    assert tok.decode(ids) == want
    ts = TextStream(tok)
    pieces = [ts.push(i) for i in ids]
    assert [pieces[i] for i, t in enumerate(ids) if t in sid.values()] == [""] * 6
    assert "".join(pieces) + ts.flush() == want


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_save_and_load_round_trip_and_plain_files_unchanged(kinds, kind, tmp_path):
    """Reference: the in-memory tokenizer. A tokenizer with added tokens loads back with the same
    added tokens and ids; adding more keeps the old ids; a plain tokenizer's file is byte-identical
    to what it was before added tokens existed (version 1, no added_tokens field)."""
    plain = kinds[kind]
    plain.save(tmp_path / "plain.json")
    text = (tmp_path / "plain.json").read_text(encoding="utf-8")
    assert "added_tokens" not in text or kind == "bpe"
    if kind != "bpe":
        assert json.loads(text)["version"] == 1
        assert text == plain.to_json_str()
    tok = plain.with_special_tokens(CHAT_TOKENS)
    tok.save(tmp_path / "chat.json")
    back = load_tokenizer(tmp_path / "chat.json")
    assert type(back) is type(tok) and back.added_tokens == CHAT_TOKENS
    assert back.encode(TEXT) == tok.encode(TEXT) and back.vocab_size == tok.vocab_size
    if kind != "bpe":
        obj = json.loads((tmp_path / "chat.json").read_text(encoding="utf-8"))
        assert obj["version"] == 2 and obj["added_tokens"] == list(CHAT_TOKENS)
    more = back.with_special_tokens(["<|end|>", "<|tool|>", "<|eos|>"])
    assert more.added_tokens == (*CHAT_TOKENS, "<|tool|>")
    assert [more.token_id(t) for t in CHAT_TOKENS] == [tok.token_id(t) for t in CHAT_TOKENS]
    assert more.token_id("<|tool|>") == tok.vocab_size and more.token_id("<|eos|>") == plain.eos_id
    assert load_tokenizer(tmp_path / "plain.json").encode(TEXT) == plain.encode(TEXT)


def test_bad_special_tokens_are_refused(kinds):
    """A token must look like <...> without whitespace; a string is not a list of tokens."""
    for bad in (["user"], ["<|a b|>"], ["<|user|>", "<|user|>"], "<|user|>"):
        for tok in kinds.values():
            with pytest.raises(ValueError):
                tok.with_special_tokens(bad)


def test_char_encode_array_with_added_tokens(kinds):
    """Reference: encode. The numpy path gives the same ids (fewer than characters) and checks `out`."""
    import numpy as np

    tok = kinds["char"].with_special_tokens(CHAT_TOKENS)
    arr = tok.encode_array(TEXT, dtype=np.int32)
    assert arr.tolist() == tok.encode(TEXT) and arr.dtype == np.int32 and len(arr) < len(TEXT)
    with pytest.raises(ValueError, match="out has shape"):
        tok.encode_array(TEXT, out=np.empty(len(TEXT), dtype=np.int64))


def test_bpe_long_text_with_added_tokens(kinds):
    """Reference: the tokens between the added ones encoded on their own. A text longer than
    SLICE_CHARS (encoded in slices) keeps every added token whole, wherever the slices fall."""
    tok = kinds["bpe"].with_special_tokens(CHAT_TOKENS)
    run = "x" * (SLICE_CHARS - 3)  # space-free: the slice cut falls where the pre-tokenizer allows
    text = run + "<|user|>" + run + "<|end|>ab"
    want = tok.encode(run) + [tok.token_id("<|user|>")] + tok.encode(run) + [tok.token_id("<|end|>")] + tok.encode("ab")
    assert tok.encode(text) == want
    assert tok.encode_batch([text])[0] == want


def test_version_2_file_errors(tmp_path):
    """A version 2 file whose added tokens repeat a built-in special is refused naming the file."""
    p = tmp_path / "dup.json"
    p.write_text(json.dumps({"clusterlm_tokenizer": "byte", "version": 2, "added_tokens": ["<|eos|>"]}))
    with pytest.raises(DataError, match="dup.json.*built-in special"):
        load_tokenizer(p)
