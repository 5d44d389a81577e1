"""`clusterlm tokenizer encode` says when characters of the text are not in the vocabulary.

Run: .venv/bin/python -m pytest -q tests/unit/test_tokenizer_encode_unknown.py

Reference: the char tokenizer's file (its characters are those of the training text), a foreign
tokenizer.json built with `tokenizers` from a 7-token vocabulary, with and without an unk_token.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from clusterlm.tokenizer.byte import ByteTokenizer
from clusterlm.tokenizer.char import CharTokenizer
from clusterlm.tokenizer.cli import main


def _encode(capsys, caplog, path: Path, text: str) -> tuple[list[int], list[str]]:
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["encode", str(path), text]) == 0
    return json.loads(capsys.readouterr().out), [r.getMessage() for r in caplog.records]


def test_char_unknown_characters_warn(tmp_path: Path, capsys, caplog) -> None:
    """3 characters outside "helo " (é twice, €) encode to <|unk|>: the ids are printed as before and one
    warning counts 3 and names é and € once each; a known text warns nothing."""
    tok = CharTokenizer.train(["hello"])
    tok.save(tmp_path / "c.json")
    ids, warnings = _encode(capsys, caplog, tmp_path / "c.json", "héé€llo")
    assert ids == tok.encode("héé€llo") and ids.count(tok.unk_id) == 3
    assert warnings == ["3 character(s) not in the tokenizer's vocabulary became <|unk|>: 'é', '€'"]
    assert _encode(capsys, caplog, tmp_path / "c.json", "hello")[1] == []


def test_byte_never_warns(tmp_path: Path, capsys, caplog) -> None:
    """The byte tokenizer has a token for every UTF-8 byte: no warning for any text."""
    ByteTokenizer().save(tmp_path / "b.json")
    ids, warnings = _encode(capsys, caplog, tmp_path / "b.json", "héé€ 日本")
    assert ids == ByteTokenizer().encode("héé€ 日本") and warnings == []


@pytest.mark.parametrize("unk", ["<unk>", None])
def test_foreign_tokenizer_unknown_or_dropped(tmp_path: Path, capsys, caplog, unk: str | None) -> None:
    """A foreign BPE with an unk_token turns é into it; one without drops é silently: either way one warning
    (the space, split off by the Whitespace pre-tokenizer, is not counted)."""
    vocab = {"<|bos|>": 0, "<|eos|>": 1, "<unk>": 2, "h": 3, "e": 4, "l": 5, "o": 6}
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.save(str(tmp_path / "f.json"))
    ids, warnings = _encode(capsys, caplog, tmp_path / "f.json", "hé lo")
    fate = "became <unk>" if unk else "were dropped (the tokenizer has no unknown token)"
    assert ids == ([3, 2, 5, 6] if unk else [3, 5, 6])
    assert warnings == [f"1 character(s) not in the tokenizer's vocabulary {fate}: 'é'"]
