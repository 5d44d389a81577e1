"""generate/text.py: streamed detokenization and stop strings.

Reference: `tokenizer.decode(ids)` of the whole reply. TextStream's pieces, pushed one id at a time,
concatenate to it for the byte, char and BPE tokenizers, including multi-byte characters split
across tokens, replies cut in the middle of a character (flush gives the decoder's U+FFFD), and
random ids; and no piece ends in a partial character. StopStrings cuts at the first stop string
whatever way the text is split into pieces. (Speed: benchmarks/detokenize_stream.py, not a timed test.)

Run: .venv/bin/python -m pytest -q tests/unit/test_text.py
"""

from __future__ import annotations

import random

import pytest

from clusterlm.generate.text import StopStrings, TextStream, prompt_ids, render_chat
from clusterlm.tokenizer.bpe import BPETokenizer
from clusterlm.tokenizer.byte import ByteTokenizer
from clusterlm.tokenizer.char import CharTokenizer

TEXT = "héllo wörld, 日本語のテキスト 😀🎉 naïve café — “quotes”\nUser: ok\n" * 8


@pytest.fixture(scope="module")
def tokenizers() -> dict:
    return {"byte": ByteTokenizer(), "char": CharTokenizer.train([TEXT]),
            "bpe": BPETokenizer.train([TEXT] * 4, vocab_size=300)}


def stream(tok, ids: list[int]) -> list[str]:  # noqa: ANN001
    ts = TextStream(tok)
    return [ts.push(i) for i in ids] + [ts.flush()]


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_streamed_text_equals_full_decode(tokenizers, kind: str) -> None:
    """Whole reply, every prefix (cuts inside multi-byte characters), and random ids: the pieces
    concatenate to decode(ids); before flush no piece holds U+FFFD for valid text."""
    tok = tokenizers[kind]
    ids = tok.encode(TEXT)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == TEXT
    assert not any("\ufffd" in p for p in pieces)
    if kind != "char":  # some character takes several tokens: the stream really holds text back
        assert pieces.count("") > 1
    for cut in range(1, 60):
        assert "".join(stream(tok, ids[:cut])) == tok.decode(ids[:cut]), cut
    rnd = random.Random(0)
    for _ in range(100):
        r = [rnd.randrange(tok.vocab_size) for _ in range(rnd.randrange(1, 30))]
        assert "".join(stream(tok, r)) == tok.decode(r), r


def test_other_tokenizers_use_the_window_decoder() -> None:
    """A tokenizer of another kind goes through the generic prefix/read-offset window over its decode."""

    class Bytes(ByteTokenizer):
        kind = "custom"

    tok = Bytes()
    ids = tok.encode(TEXT)
    assert "".join(stream(tok, ids)) == TEXT
    assert "".join(stream(tok, ids[:2])) == tok.decode(ids[:2])  # "h\xc3": a U+FFFD at the end


def test_bad_id_is_refused(tokenizers) -> None:
    for tok in tokenizers.values():
        with pytest.raises(ValueError, match="outside the vocabulary"):
            TextStream(tok).push(tok.vocab_size)


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_stop_strings_cut_whatever_the_pieces(size: int) -> None:
    """The text before the first stop string, however it is split; the stop string is never shown,
    and a held-back prefix that turns out not to be one is shown by flush."""
    text = "say Use it\nUsed\nUser: next"
    stops = StopStrings(("\nUser:", "zz"))
    shown, stopped = "", False
    for i in range(0, len(text), size):
        out, stopped = stops.push(text[i:i + size])
        shown += out
        if stopped:
            break
    assert stopped and shown == "say Use it\nUsed"
    tail = StopStrings(("\nUser:",))
    assert tail.push("abc\nUs") == ("abc", False)  # "\nUs" may begin the stop string
    assert tail.flush("!") == "\nUs!"
    assert StopStrings().push("x") == ("x", False)


def test_prompt_ids_and_chat_template() -> None:
    """EOS first; a prompt leaving no room in the context keeps its last context - min(max_new, context // 2)."""
    tok = ByteTokenizer()
    assert prompt_ids(tok, "ab", None, 5) == [tok.eos_id, 97, 98]
    assert prompt_ids(tok, "abcdefgh", 8, 3) == list(b"cdefgh")[-5:]
    assert render_chat([{"role": "user", "content": " hi "}]) == "User: hi\n\nAssistant:"
    with pytest.raises(ValueError, match="valid roles"):
        render_chat([{"role": "bot", "content": "x"}])
