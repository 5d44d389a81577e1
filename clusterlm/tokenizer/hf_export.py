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

Added special tokens (the chat roles, tokenizer/base.py) are added tokens with special=false, which
`tokenizers` matches in text even under split_special_tokens (as clusterlm does), listed as
additional_special_tokens; the decoder drops them (a Replace with "" per token, since transformers'
skip_special_tokens only skips special=true tokens), so decoding matches clusterlm's.

With a chat template (generate/template.py) tokenizer_config.json gets `chat_template` (and the folder
chat_template.jinja): the template with EXPORT_PREFIX, "{{ eos_token }}", in front, because
clusterlm starts every prompt with the EOS document separator (generate/text.py prompt_ids) and
`apply_chat_template` tokenizes the rendered text with add_special_tokens=False. For that text to
give the EOS id, such an export sets split_special_tokens = false (transformers 5 makes the named
bos/eos/pad tokens special again on load, so special=false on <|eos|> alone does not survive): the one
difference from clusterlm is that <|bos|>, <|eos|> and <|pad|> typed in a message encode as those
special ids in transformers and as text in clusterlm (docs/chat_templates.md). Import
(interop/hf_io.py) removes EXPORT_PREFIX again (`template_from_hf`).

Before returning, `hf_tokenizer_files` encodes a probe text (the chat tokens, a rendered sample
conversation, accents, CJK, emoji, newlines) with the built tokenizer and with clusterlm's; any
difference refuses the export (ConfigError) rather than writing a tokenizer that disagrees.

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

from clusterlm.errors import ConfigError
from clusterlm.generate.template import CHAT_TOKENS, ChatTemplate
from clusterlm.tokenizer.base import BOS, EOS, PAD, Tokenizer
from clusterlm.tokenizer.bpe import BPETokenizer
from clusterlm.tokenizer.byte import ByteTokenizer
from clusterlm.tokenizer.char import UNK, CharTokenizer

# every code point, newlines included, as its own piece (Oniguruma, the regex engine of `tokenizers`)
_ONE_CODE_POINT = r"[\s\S]"
EXPORT_PREFIX = "{{ eos_token }}"  # put in front of an exported chat template (see the module docstring)
_PROBE = ("The quick brown fox.\n  Two  spaces,\ttabs\r\n héllo e\u0301 中文 😀👍🏽 <|bos|> <|pad|> "
          "<|user|><|end|><|assistant|>x<|system|>\n")


def template_for_hf(source: str) -> str:
    """The chat template as exported: EXPORT_PREFIX + `source`."""
    return EXPORT_PREFIX + source


def template_from_hf(source: str) -> str:
    """An imported chat template without the EXPORT_PREFIX a clusterlm export put in front."""
    return source[len(EXPORT_PREFIX):] if source.startswith(EXPORT_PREFIX) else source


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
    _add(hf, tok)
    return hf


def _add(hf: tokenizers.Tokenizer, tok: Tokenizer) -> None:
    """Add `tok`'s added special tokens (special=false: matched in text, see the module docstring)."""
    added = getattr(tok, "added_tokens", ())
    hf.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    got = [hf.token_to_id(t) for t in added]
    want = [tok.token_id(t) for t in added]  # type: ignore[attr-defined]
    if got != want:  # cannot happen for files clusterlm wrote (the ids are contiguous); a guard
        raise ConfigError(f"exporting {tok!r}: its added tokens {list(added)} would get ids {got}, not {want}")


def _drop_in_decoder(hf: tokenizers.Tokenizer, tokens: list[str]) -> tokenizers.Tokenizer:
    """`hf` with a decoder that turns each of `tokens` into "" (before its own decoder), from JSON
    so that the original is untouched."""
    obj = json.loads(hf.to_str())
    drops = [{"type": "Replace", "pattern": {"String": t}, "content": ""} for t in tokens]
    old = obj.get("decoder")
    rest = [] if old is None else old["decoders"] if old.get("type") == "Sequence" else [old]
    obj["decoder"] = {"type": "Sequence", "decoders": drops + rest}
    return tokenizers.Tokenizer.from_str(json.dumps(obj))


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
    _add(hf, tok)
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


def hf_tokenizer_files(tok: Tokenizer, model_max_length: int,
                       chat_template: ChatTemplate | None = None) -> dict[str, str]:
    """File name -> text: tokenizer.json, tokenizer_config.json, special_tokens_map.json, and with
    a `chat_template` chat_template.jinja. ConfigError when the files would not encode a probe
    text to `tok`'s ids."""
    hf = to_hf_tokenizer(tok)
    names = {key: hf.id_to_token(i) for key, i in
             (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id))}
    assert all(names.values()), names  # every kind's special ids are in its vocabulary
    # no unk_token for char: transformers would make <|unk|> special, and decoding would drop it
    # instead of giving U+FFFD as clusterlm does (see _char)
    added = list(getattr(tok, "added_tokens", ()))
    if added:
        hf = _drop_in_decoder(hf, added)
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **names,
        "model_max_length": int(model_max_length),
        "clean_up_tokenization_spaces": False,
        # "<|eos|>" in text is text, except with a chat template, which emits it (see the module docstring)
        "split_special_tokens": chat_template is None,
    }
    special_map: dict[str, Any] = dict(names)
    if added:
        config["additional_special_tokens"] = special_map["additional_special_tokens"] = added
    files = {}
    if chat_template is not None:
        config["chat_template"] = files["chat_template.jinja"] = template_for_hf(chat_template.source)
    _check_same_ids(hf, tok, chat_template)
    return {"tokenizer.json": hf.to_str(pretty=True),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            "special_tokens_map.json": json.dumps(special_map, indent=2, ensure_ascii=False) + "\n", **files}


def _check_same_ids(hf: tokenizers.Tokenizer, tok: Tokenizer, chat_template: ChatTemplate | None) -> None:
    """ConfigError unless `hf` (as transformers runs it) encodes a probe text to `tok`'s ids."""
    split = chat_template is None  # split_special_tokens in tokenizer_config.json
    probe = _PROBE if split else _PROBE.replace(BOS, "").replace(PAD, "")  # the documented difference
    if chat_template is not None:
        try:
            probe += chat_template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
        except ValueError:
            pass
    probe += "".join(CHAT_TOKENS)  # present or not in `tok`: the same ids either way
    hf.encode_special_tokens = split
    got = hf.encode(probe, add_special_tokens=False).ids
    want = tok.encode(probe)
    if got != want:
        i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise ConfigError(f"cannot export {tok!r} for transformers: the Hugging Face tokenizer built from it encodes "
                          f"differently (first difference at token {i}: {got[i:i + 3]} vs clusterlm's "
                          f"{want[i:i + 3]}); the checkpoint's tokenizer.json is not one clusterlm can export")
    hf.encode_special_tokens = False
