"""`clusterlm export` tokenizers against transformers: for byte, char and BPE checkpoints the exported
folder loads with `transformers.AutoTokenizer.from_pretrained` (local folder, no downloads) and
encodes, decodes and names special ids exactly as the clusterlm tokenizer does.

Run: .venv/bin/python -m pytest -q tests/model/test_tokenizer_export.py
"""

from __future__ import annotations

import json
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from clusterlm.checkpoint.model_io import load_for_inference  # noqa: E402
from clusterlm.interop.cli import export_main, main  # noqa: E402
from clusterlm.tokenizer.bpe import SLICE_CHARS  # noqa: E402
from tests.helpers import random_checkpoint  # noqa: E402

CTX = 32
CORPUS = ("The quick brown fox jumps over the lazy dog.\n  Two  spaces,\ttabs\r\n and   more.\n"
          "Accents: héllo àçcénts Ærø naïve e\u0301. CJK: 中文字符，日本語のテキスト。한국어\n"
          "Emoji: 😀👍🏽🇫🇷 and <|eos|> <|bos|> written as text.\n") * 20
STRINGS = [
    "the lazy fox", "The quick brown fox jumps over the lazy dog.", "héllo àçcénts", "e\u0301",
    "中文字符", "日本語のテキスト。", "한국어", "line one\nline two\n\n", "\r\n", "  two  spaces",
    "    four", "\ttabs\t", " ", "", "😀👍🏽🇫🇷", "written as text: <|eos|><|bos|><|pad|>",
    "unseen: Ωλ 🚀 ẞ", "Ærø naïve.",
]


def _export(tmp_path, kind: str):
    """A tiny random checkpoint with a `kind` tokenizer trained on CORPUS, exported with `clusterlm
    export`; returns (clusterlm tokenizer, export folder)."""
    random_checkpoint(tmp_path, kind, CORPUS, bpe_vocab=400, n_layers=1, context=CTX)
    assert export_main([str(tmp_path / "run"), "--out", str(tmp_path / "exp")]) == 0
    return load_for_inference(tmp_path / "run").tokenizer, tmp_path / "exp"


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_auto_tokenizer_encodes_and_decodes_like_clusterlm(tmp_path, kind):
    """Reference: the clusterlm tokenizer of the checkpoint. AutoTokenizer on the export gives the same
    ids (add_special_tokens=False) for ASCII, accents, CJK, emoji, newlines, runs of spaces and
    special-token strings written as text; the same decoded text (skip_special_tokens=True), which is
    the input wherever the kind covers it; the same BOS/EOS/PAD ids and vocabulary size."""
    tok, exp = _export(tmp_path, kind)
    names = {p.name for p in exp.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    at = transformers.AutoTokenizer.from_pretrained(exp)
    assert (at.bos_token_id, at.eos_token_id, at.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert (at.bos_token, at.eos_token, at.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert len(at) == tok.vocab_size
    assert at.model_max_length == CTX
    for s in STRINGS:
        ids = tok.encode(s)
        assert at.encode(s, add_special_tokens=False) == ids, s
        assert at(s, add_special_tokens=False)["input_ids"] == ids, s
        assert at.decode(ids, skip_special_tokens=True) == tok.decode(ids), s
        if kind != "char" or not s.startswith("unseen"):
            assert tok.decode(ids) == s
    literal = tok.encode("<|eos|>")
    assert len(literal) > 1 and tok.eos_id not in literal  # text, not the special token
    wrapped = [tok.bos_id, *tok.encode("héllo"), tok.eos_id, tok.pad_id]
    assert at.decode(wrapped, skip_special_tokens=True) == tok.decode(wrapped) == "héllo"
    # a batch padded by transformers pads with clusterlm's pad id
    batch = at(["the", "the lazy fox"], add_special_tokens=False, padding=True)["input_ids"]
    assert batch[0][len(tok.encode("the")):] == [tok.pad_id] * (len(batch[1]) - len(tok.encode("the")))


def test_char_export_is_not_an_empty_tokenizer(tmp_path):
    """Regression (issue 15, item 3): a char model's export held only clusterlm_tokenizer.json, and
    AutoTokenizer loaded the folder as an empty tokenizer that encoded text to nothing. Now it holds the
    whole vocabulary and encodes to the char ids; characters outside the vocabulary give <|unk|> (which
    decodes to U+FFFD in both) in both."""
    tok, exp = _export(tmp_path, "char")
    at = transformers.AutoTokenizer.from_pretrained(exp)
    assert len(at.get_vocab()) == tok.vocab_size
    ids = at.encode("to be", add_special_tokens=False)
    assert ids and ids == tok.encode("to be") and len(ids) == 5
    assert at.encode("🚀", add_special_tokens=False) == [tok.unk_id]
    assert at.decode([tok.unk_id], skip_special_tokens=True) == tok.decode([tok.unk_id]) == "\ufffd"
    assert at.unk_token is None  # not a special token: skip_special_tokens keeps it, as clusterlm's decode does


@pytest.mark.parametrize("kind", ["byte", "char"])
def test_every_code_point(tmp_path, kind):
    """Reference: clusterlm's encode of one string holding every Unicode scalar value (U+0000..U+10FFFF
    without surrogates), and its decode of those ids: AutoTokenizer gives the same ids and text."""
    tok, exp = _export(tmp_path, kind)
    at = transformers.AutoTokenizer.from_pretrained(exp, model_max_length=10**8)
    text = "".join(map(chr, [*range(0xD800), *range(0xE000, 0x110000)]))
    ids = tok.encode(text)
    assert at.encode(text, add_special_tokens=False) == ids
    assert at.decode(ids, skip_special_tokens=True) == tok.decode(ids)


def test_byte_decode_of_invalid_utf8(tmp_path):
    """Reference: the byte tokenizer's decode (Python's errors="replace", one U+FFFD per maximal invalid
    subpart). 5000 random byte strings biased to lead/continuation bytes decode to the same text."""
    tok, exp = _export(tmp_path, "byte")
    at = transformers.AutoTokenizer.from_pretrained(exp)
    rng = random.Random(0)
    pool = [*range(0x80, 0x100), 0xC3, 0xE2, 0xED, 0xF0, 0xF4, 0xF5, 0x41, 0x0A]
    for _ in range(5000):
        ids = [rng.choice(pool) for _ in range(rng.randrange(1, 9))]
        assert at.decode(ids) == tok.decode(ids), ids


def test_bpe_long_text_and_lone_surrogates(tmp_path):
    """A BPE text longer than SLICE_CHARS (clusterlm encodes it in slices) gives transformers' ids for the
    whole text. A str with a lone surrogate (not valid Unicode) is refused by transformers with a
    TypeError, where clusterlm encodes it as U+FFFD: a documented difference, not a silent one."""
    tok, exp = _export(tmp_path, "bpe")
    at = transformers.AutoTokenizer.from_pretrained(exp, model_max_length=10**8)
    text = (CORPUS * (SLICE_CHARS // len(CORPUS) + 2))[: SLICE_CHARS + 5000]
    assert len(text) > SLICE_CHARS
    assert at.encode(text, add_special_tokens=False) == tok.encode(text)
    assert tok.encode("a\ud800b") == tok.encode("a\ufffdb")
    with pytest.raises(TypeError):
        at.encode("a\ud800b", add_special_tokens=False)


@pytest.mark.parametrize("kind", ["byte", "char"])
def test_convert_reads_back_the_clusterlm_kind(tmp_path, kind):
    """`convert` of an export prefers clusterlm_tokenizer.json, so the converted checkpoint has the same
    kind (not a WordLevel/BPE tokenizer.json loaded as kind 'bpe') and the same ids."""
    tok, exp = _export(tmp_path, kind)
    cfg = json.loads((exp / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and cfg["split_special_tokens"] is True
    assert main(["--from-hf", str(exp), "--out", str(tmp_path / "back")]) == 0
    back = load_for_inference(tmp_path / "back").tokenizer
    assert back.kind == kind
    assert all(back.encode(s) == tok.encode(s) for s in STRINGS)


@pytest.mark.parametrize("kind, name, fragment", [
    ("byte", "clusterlm_tokenizer.json", "put the file `clusterlm export` writes there, or remove it to read tokenizer.json"),
    ("bpe", "tokenizer.json", "put the file tokenizer.save_pretrained writes there"),
])
def test_convert_refuses_a_tokenizer_name_that_is_a_folder(tmp_path, capsys, kind, name, fragment):
    """clusterlm_tokenizer.json a folder: `convert` fell back to tokenizer.json and read a byte tokenizer
    as 'bpe' (exit 0, no word); tokenizer.json a folder was called missing. Both are refused (exit 2)
    naming the path, and no run directory is written."""
    _, exp = _export(tmp_path, kind)
    (exp / name).unlink()
    (exp / name).mkdir()
    from clusterlm.cli import main as cli

    assert cli(["convert", "--from-hf", str(exp), "--out", str(tmp_path / "back")]) == 2
    assert f"{exp / name} is a folder, not the tokenizer file `convert` reads: {fragment}" in capsys.readouterr().err
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_exported_tokenizer_and_model_give_clusterlm_logits(tmp_path, kind):
    """Reference: the clusterlm checkpoint's logits on clusterlm's ids. transformers' AutoTokenizer +
    AutoModelForCausalLM on the export, from text alone, give the same logits (1e-4, float32)."""
    tok, exp = _export(tmp_path, kind)
    loaded = load_for_inference(tmp_path / "run")
    text = "héllo 中文\n  the lazy fox"
    at = transformers.AutoTokenizer.from_pretrained(exp)
    hf = transformers.AutoModelForCausalLM.from_pretrained(exp).eval()
    batch = at(text, add_special_tokens=False, return_tensors="pt")
    ids = torch.tensor([tok.encode(text)[:CTX]])
    with torch.no_grad():
        want = loaded.model(ids)
        got = hf(batch["input_ids"][:, :CTX]).logits
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4
