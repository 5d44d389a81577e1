"""Every tokenizer kind as Hugging Face files that `transformers.AutoTokenizer` loads with the same ids.

    from clusterlm.tokenizer.hf_export import hf_tokenizer_files
    for name, text in hf_tokenizer_files(tok, model_max_length=1024).items():
        (out / name).write_text(text, encoding="utf-8")
    # transformers.AutoTokenizer.from_pretrained(out).encode(s, add_special_tokens=False) == tok.encode(s)

Files: tokenizer.json (a `tokenizers.Tokenizer`, built with the library, not written by hand),
tokenizer_config.json (PreTrainedTokenizerFast, bos/eos/pad, model_max_length) and
special_tokens_map.json. Per kind:

- byte: BPE model with no merges over the 256 byte symbols of GPT-2's byte-level alphabet (id = the
  byte's value), ByteLevel pre-tokenizer without the split regex (each byte is one symbol), ByteLevel
  decoder (bytes -> UTF-8, invalid sequences -> U+FFFD, as Python's errors="replace"), then the three
  specials at 256, 257, 258.
- char: WordLevel model over the characters (id = index in code-point order), a Split pre-tokenizer
  that isolates every code point, the specials at n..n+3; <|unk|> is the model's unknown token (every
  character outside the vocabulary) and the decoder maps it to U+FFFD, then joins the characters
  (Fuse) with no spaces in between.
- bpe: the tokenizer.json itself (clusterlm's BPE files already are Hugging Face files).

`split_special_tokens = true` in tokenizer_config.json: text that contains "<|eos|>" encodes as
ordinary characters, as clusterlm does (`encode_special_tokens`, which `tokenizers` does not save).
`clean_up_tokenization_spaces = false`: decoding gives back the exact text. No add_bos_token /
add_eos_token: transformers would then replace the post-processor of a tokenizer.json imported from
elsewhere; clusterlm's own tokenizers have none, so `add_special_tokens=True` adds nothing to them.
What still differs (lone surrogates, decoding without skip_special_tokens) is in docs/interop.md.
"""

from __future__ import annotations

import json
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from clusterlm.tokenizer.base import BOS, EOS, PAD, Tokenizer
from clusterlm.tokenizer.bpe import BPETokenizer
from clusterlm.tokenizer.byte import ByteTokenizer
from clusterlm.tokenizer.char import UNK, CharTokenizer

# every code point, newlines included, as its own piece (Oniguruma, the regex engine of `tokenizers`)
_ONE_CODE_POINT = r"[\s\S]"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer and decoder use
    (openai/gpt-2 src/encoder.py): printable Latin-1 bytes map to themselves, the other 68 to
    U+0100 onwards in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _specials(ids: dict[str, int]) -> list[AddedToken]:
    return [AddedToken(t, special=True, normalized=False) for t in sorted(ids, key=ids.__getitem__)]


def _byte(tok: ByteTokenizer) -> tokenizers.Tokenizer:
    table = _bytes_to_unicode()
    assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    hf = tokenizers.Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(_specials({BOS: tok.bos_id, EOS: tok.eos_id, PAD: tok.pad_id}))
    return hf


def _char(tok: CharTokenizer) -> tokenizers.Tokenizer:
    vocab = {c: i for i, c in enumerate(tok.chars)}
    vocab.update({BOS: tok.bos_id, EOS: tok.eos_id, PAD: tok.pad_id, UNK: tok.unk_id})
    hf = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(_ONE_CODE_POINT), behavior="isolated")
    # <|unk|> is a plain vocabulary entry, not a special token: clusterlm decodes it to U+FFFD (the
    # Replace works per token, and no character token can contain "<|unk|>"), and
    # skip_special_tokens must not drop it
    hf.decoder = decoders.Sequence([decoders.Replace(UNK, "\ufffd"), decoders.Fuse()])
    hf.add_special_tokens(_specials({BOS: tok.bos_id, EOS: tok.eos_id, PAD: tok.pad_id}))
    return hf


def to_hf_tokenizer(tok: Tokenizer) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` that encodes every valid str to `tok`'s ids and decodes them
    (skipping specials) to `tok`'s text."""
    if isinstance(tok, BPETokenizer):
        return tokenizers.Tokenizer.from_str(tok.hf_tokenizer.to_str())
    if isinstance(tok, ByteTokenizer):
        return _byte(tok)
    if isinstance(tok, CharTokenizer):
        return _char(tok)
    raise TypeError(f"no Hugging Face form for tokenizer {tok!r} (kind {getattr(tok, 'kind', '?')!r})")


def hf_tokenizer_files(tok: Tokenizer, model_max_length: int) -> dict[str, str]:
    """File name -> text: tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    hf = to_hf_tokenizer(tok)
    names = {key: hf.id_to_token(i) for key, i in
             (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id))}
    assert all(names.values()), names  # every kind's special ids are in its vocabulary
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "model_max_length": int(model_max_length),
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,  # "<|eos|>" in text is text (see the module docstring)
    }
    return {"tokenizer.json": hf.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            "special_tokens_map.json": json.dumps(names, indent=2, ensure_ascii=False) + "\n"}
