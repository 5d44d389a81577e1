"""Token log-probabilities in OpenAI's response shapes, from the scheduler's (id, logprob, top) triples.

    names = TokenNames(tokenizer)
    chat_logprobs(names, triples)            # {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}
    acc = CompletionLogprobs(names)          # one per choice: text_offset runs across a stream's chunks
    acc.chunk(triples)                       # {"tokens", "token_logprobs", "top_logprobs", "text_offset"}

A token's `bytes` are the UTF-8 bytes it adds to the text (a byte tokenizer's id is one byte, possibly
part of a character), and `token` is those bytes decoded with U+FFFD for an incomplete character, so
concatenating `bytes` over a reply gives its text exactly. Special tokens (EOS, a chat template's
tokens) add no text: `token` is their name ("<|eos|>") and `bytes` is null. In the legacy completions
shape, which has no `bytes`, a token that is not whole characters is named "bytes:\\xNN..." (OpenAI's
form), so distinct tokens stay distinct keys of `top_logprobs`. Shapes:
openai.types.chat.ChatCompletionTokenLogprob and openai.types.completion_choice.Logprobs.
"""

from __future__ import annotations

import codecs
import functools
import re

from clusterlm.serve.scheduler import TokenLogprob

SPECIAL_NAMES = ("<|bos|>", "<|eos|>", "<|pad|>")
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a sentencepiece byte token, one UTF-8 byte


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a byte-level BPE vocabulary uses -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenNames:
    """id -> (token string, its UTF-8 bytes or None for a special token), cached per id."""

    def __init__(self, tokenizer) -> None:  # noqa: ANN001
        self.tokenizer = tokenizer
        self.kind = getattr(tokenizer, "kind", None)
        names = SPECIAL_NAMES + tuple(getattr(tokenizer, "added_tokens", ()))
        self.specials = {i: n for n in names if (i := tokenizer.token_id(n)) is not None}
        self._cache: dict[int, tuple[str, bytes | None]] = {}
        self._byte_level = False  # clusterlm's BPE (and GPT-2's): pieces spelled in the byte-level alphabet
        if self.kind == "bpe":
            from tokenizers import decoders

            self._byte_level = isinstance(tokenizer.hf_tokenizer.decoder, decoders.ByteLevel)

    def _bytes(self, i: int) -> bytes:
        tok = self.tokenizer
        if self.kind == "byte":
            return bytes((i,)) if i < 256 else b""
        if self.kind == "char":
            return tok.decode([i]).encode("utf-8")
        if self.kind == "bpe":
            piece = tok.hf_tokenizer.id_to_token(i)
            if self._byte_level:
                dec = _byte_decoder()
                if piece is not None and all(c in dec for c in piece):
                    return bytes(dec[c] for c in piece)
            elif piece is not None and (m := _BYTE_FALLBACK.fullmatch(piece)):  # sentencepiece's byte fallback
                return bytes((int(m[1], 16),))
            else:  # in context: a sentencepiece-style decoder (Llama 2's) strips a first token's leading space,
                # so "▁world" alone is "world"; after itself it is " world"
                return tok.decode([i, i])[len(tok.decode([i])):].encode("utf-8", errors="replace")
        return tok.decode([i]).encode("utf-8", errors="replace")  # any other tokenizer: its text alone

    def __call__(self, i: int) -> tuple[str, bytes | None]:
        got = self._cache.get(i)
        if got is None:
            if i in self.specials:
                got = (self.specials[i], None)
            else:
                b = self._bytes(i)
                got = (b.decode("utf-8", errors="replace"), b)
            self._cache[i] = got
        return got


def _entry(names: TokenNames, i: int, lp: float) -> dict:
    token, b = names(i)
    return {"token": token, "logprob": lp, "bytes": list(b) if b is not None else None}


def chat_logprobs(names: TokenNames, triples: list[TokenLogprob]) -> dict:
    """A chat choice's `logprobs`: {"content": [ChatCompletionTokenLogprob], "refusal": None}."""
    return {"content": [{**_entry(names, i, lp), "top_logprobs": [_entry(names, j, v) for j, v in top]}
                        for i, lp, top in triples], "refusal": None}


def legacy_name(token: str, b: bytes | None) -> str:
    """A token's name in the legacy completions shape, where names are the keys of `top_logprobs`:
    bytes that are not whole UTF-8 characters are written as OpenAI writes them, "bytes:\\xe2\\x80"
    (every such byte token would otherwise be "\ufffd", and the dict would keep one of them)."""
    if b is None:
        return token
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{x:02x}" for x in b)


class CompletionLogprobs:
    """A completion choice's `logprobs` in the legacy shape, chunk by chunk: text_offset is the
    character offset in the completion's text where each token's bytes start to count (a token that
    completes no character shares the offset of the next character; a token after an incomplete
    character that it breaks starts after that character's U+FFFD)."""

    def __init__(self, names: TokenNames) -> None:
        self.names = names
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.chars = 0

    def _name(self, i: int) -> str:
        return legacy_name(*self.names(i))

    def chunk(self, triples: list[TokenLogprob]) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, lp, top in triples:
            token, b = self._name(i), self.names(i)[1]
            out["tokens"].append(token)
            out["token_logprobs"].append(lp)
            # OpenAI: the `logprobs` most likely tokens and the sampled one (so up to logprobs + 1)
            alts = {self._name(j): v for j, v in top}
            alts[token] = lp
            out["top_logprobs"].append(alts)
            offset = self.chars
            if b:
                pending = self._utf8.getstate()[0]  # the bytes of an incomplete character held back
                if pending and not 0x80 <= b[0] <= 0xBF:  # not a continuation: that character becomes U+FFFD
                    offset += len(pending.decode("utf-8", errors="replace"))
                self.chars += len(self._utf8.decode(b))
            out["text_offset"].append(offset)
        return out

    @staticmethod
    def merge(chunks: list[dict]) -> dict:
        """One `logprobs` object from several chunks (a non-streaming reply)."""
        return {k: [x for c in chunks for x in c[k]] for k in ("tokens", "token_logprobs", "top_logprobs",
                                                                "text_offset")}
