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

from clusterlm.generate.text import StopStrings, TextStream, prompt_ids, render_chat, sample_texts
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


def _sentencepiece_bpe(text: str) -> BPETokenizer:
    """A Llama 2 style tokenizer.json (not one clusterlm trains): Metaspace words with byte fallback and
    the decoder Replace("▁", " "), ByteFallback, Fuse, Strip(one leading space), which drops the leading
    space of the first token it decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    hf.train_from_iterator([text], trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    return BPETokenizer(hf)


def test_prefix_decodes_the_first_new_token_in_context() -> None:
    """With `prefix` (the prompt's ids) the pieces are the text the new ids add to the prompt,
    decode(prefix + ids)[len(decode(prefix)):], also for a decoder that strips the first token's
    leading space (without the prefix "hello" + "world"), a reply cut inside a byte-fallback
    character (flush), and random ids; clusterlm's own tokenizers give what they gave without it."""
    text = "hello world, the world is big 😀 hello there"
    tok = _sentencepiece_bpe(text * 4)
    ids = tok.encode(text * 3)  # longer than TextStream.PREFIX_TAIL: the prompt's tail decides alone
    assert tok.decode(ids) == text * 3 and len(ids) > TextStream.PREFIX_TAIL + 4
    for k in range(1, len(ids)):
        for end in (len(ids), k + 1):  # the whole rest, and one token (a cut inside 😀's four byte tokens)
            ts = TextStream(tok, ids[:k])
            got = "".join([ts.push(i) for i in ids[k:end]] + [ts.flush()])
            assert got == tok.decode(ids[:end])[len(tok.decode(ids[:k])):], (k, end)
    rnd = random.Random(0)
    for _ in range(50):
        r = [rnd.randrange(tok.vocab_size) for _ in range(rnd.randrange(2, 20))]
        ts = TextStream(tok, r[:1])
        assert "".join([ts.push(i) for i in r[1:]] + [ts.flush()]) == tok.decode(r)[len(tok.decode(r[:1])):], r
    for own in (ByteTokenizer(), BPETokenizer.train([TEXT] * 4, vocab_size=300)):
        ids = own.encode(TEXT)
        for prompt in (own.encode("héllo wörld,"), own.encode("a \ufffd\ufffd")):  # U+FFFD last: held, not repeated
            ts = TextStream(own, prompt)
            assert "".join([ts.push(i) for i in ids] + [ts.flush()]) == "".join(stream(own, ids))


def _space_first_model():
    """A Llama 2 style tokenizer and a random model whose every word-start ("▁...") token is likelier
    than the rest: its first new token after "hello" has a leading space that a decoder drops alone."""
    import torch

    from clusterlm.models.build import build_model
    from clusterlm.models.config import ModelConfig

    tok = _sentencepiece_bpe("hello world, the world is big hello there " * 4)
    model = build_model(ModelConfig(n_layers=1, dim=32, n_heads=4, max_seq_len=32, vocab_size=tok.vocab_size))
    model.init_weights(0)
    space_word = torch.tensor([tok._hf.id_to_token(i).startswith("▁") for i in range(tok.vocab_size)])
    with torch.no_grad():
        model.output.weight[space_word] += 0.5 * model.output.weight[space_word].sign().mean(0)
        model.norm.weight.fill_(1.0)
    return tok, model


def test_eval_and_serve_replies_keep_the_leading_space_of_their_first_token() -> None:
    """eval's generate_completions (greedy, sampled, beam search) and the server's scheduler return the
    text the reply adds to its prompt: with a sentencepiece-style decoder the first new token decoded
    alone lost its leading space ("hello" + "world": 'world ...' where 'hello world ...' was meant)."""

    from clusterlm.eval.lm import generate_completions
    from clusterlm.serve.metrics import Metrics
    from clusterlm.serve.scheduler import Delta, Failed, SamplingParams, Scheduler
    from tests.helpers import collect_events

    tok, model = _space_first_model()
    for kw in ({}, {"temperature": 0.7, "seed": 1}, {"num_beams": 2}):
        (c,) = generate_completions(model, tok, ["hello"], max_new_tokens=5, **kw)
        assert c.text.startswith(" ") and not c.text.startswith("  "), (kw, c.text)
    sched = Scheduler(model, tok, max_batch=2, max_queue=2, metrics=Metrics().model("m", 2, 2))

    sched.start()
    try:
        events = collect_events(sched, tok.encode("hello"), 1, SamplingParams(max_tokens=5, temperature=0))
    finally:
        sched.stop()
    assert not any(isinstance(ev, Failed) for ev in events), events
    text = "".join(ev.text for ev in events if isinstance(ev, Delta))
    assert text.startswith(" ") and not text.startswith("  "), text


def test_generate_prints_the_continuation_with_its_leading_space(tmp_path) -> None:
    """`clusterlm generate --prompt hello` prints the prompt and then the text the sampled ids add to it:
    decode(prompt ids + sampled ids), here with a first token "▁..." whose space a sentencepiece-style
    decoder drops when it decodes the new ids alone (the command printed "helloworld")."""
    import io

    import torch

    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.checkpoint.store import save_checkpoint
    from clusterlm.config import RunConfig, to_toml
    from clusterlm.generate.cli import generate_main
    from clusterlm.generate.engine import complete, context_length
    from clusterlm.models.build import build_model
    from clusterlm.models.config import ModelConfig

    tok, model = _space_first_model()
    cfg = model.config
    tok.save(tmp_path / "tok.json")
    save_checkpoint(tmp_path / "run" / "checkpoints", 0, model_state=model.state_dict(), optimizer_state=None,
                    train_state={}, config_toml=to_toml(RunConfig(model=cfg)), tokenizer_path=tmp_path / "tok.json")
    loaded = load_for_inference(tmp_path / "run")
    ids = prompt_ids(loaded.tokenizer, "hello", context_length(loaded.model), 6)
    (new,), _ = complete(loaded.model, ids, max_new_tokens=6, temperature=0.0, eos_id=loaded.tokenizer.eos_id)
    assert new and loaded.tokenizer._hf.id_to_token(new[0]).startswith("▁")
    out = io.StringIO()
    assert generate_main([str(tmp_path / "run"), "--prompt", "hello", "--max-new-tokens", "6", "--temperature", "0",
                          "--device", "cpu"], out=out) == 0
    assert out.getvalue() == loaded.tokenizer.decode(ids + new) + "\n"
    assert out.getvalue().startswith("hello ")
    assert sample_texts(str(tmp_path / "run"), prompt="hello", max_new_tokens=6, temperature=0.0) == [out.getvalue()[:-1]]
