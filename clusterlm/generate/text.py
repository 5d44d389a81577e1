"""Text around the token-id engine: prompts, chat formats, streamed detokenization, stop strings.

Shared by `clusterlm generate|chat` (generate/cli.py) and the server (serve/), so that no library
module needs a command-line module.

    ids = prompt_ids(tokenizer, render_chat([{"role": "user", "content": "Hi"}]), context, 64)
    stream, stops = TextStream(tokenizer), StopStrings((CHAT_STOP,))
    for token in tokens:                       # ids as the engine samples them
        text, stopped = stops.push(stream.push(token))
        ...
    text = stops.flush(stream.flush())         # the end: what was held back

A model with a chat template (generate/template.py, carried by its checkpoint) is prompted with it
and stops at its end-of-turn token; one without keeps the plain `render_chat` template and its
CHAT_STOP string (`chat_format` chooses, and says so once in the log):

    fmt = chat_format(tokenizer, loaded.chat_template)
    ids = prompt_ids(tokenizer, fmt.render(messages), context, 64)   # stop: fmt.stop_ids, fmt.stop_strings

TextStream costs O(1) per token for the byte, char and BPE tokenizers (a 4,096-token reply:
benchmarks/detokenize_stream.py), and the concatenation of its pieces equals
`tokenizer.decode(ids)`: an incomplete UTF-8 sequence is held back until its last byte arrives.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from clusterlm.errors import ConfigError
from clusterlm.generate.template import ChatTemplate
from clusterlm.tokenizer.base import REPLACEMENT, Tokenizer

log = logging.getLogger(__name__)

USER, ASSISTANT = "User", "Assistant"
CHAT_STOP = f"\n{USER}:"  # the next user turn of render_chat's template: where a reply ends
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' (utils/chat_template_utils.py)


def render_chat(messages: list[dict[str, str]]) -> str:
    """The documented fallback chat template: one 'Role: content' paragraph per message, then
    'Assistant:' for the reply. Roles: system, user, assistant."""
    names = {"system": "System", "user": USER, "assistant": ASSISTANT}
    parts = []
    for m in messages:
        if m.get("role") not in names:
            raise ValueError(f"chat message role {m.get('role')!r}; valid roles: {', '.join(names)}")
        parts.append(f"{names[m['role']]}: {m['content'].strip()}\n\n")
    return "".join(parts) + f"{ASSISTANT}:"


@dataclass(frozen=True)
class ChatFormat:
    """How a model is prompted for chat: its own template, or the plain `render_chat` one."""

    template: ChatTemplate | None  # None: render_chat
    stop_ids: tuple[int, ...] = ()  # token ids that end a reply (besides EOS): the template's stop tokens
    stop_strings: tuple[str, ...] = ()  # text that ends a reply: CHAT_STOP for the plain template

    def render(self, messages: list[dict[str, str]], continue_final: bool = False) -> str:
        """The prompt text of `messages`, ending where the assistant's reply starts. `continue_final`:
        the last message is a reply begun (lm-eval's gen_prefix, "Answer:"), and the text ends right
        after it for the model to continue: transformers' continue_final_message (a tag appended to
        that message, the conversation rendered, the text cut at the tag; its trailing white space
        kept where the template keeps it)."""
        if not continue_final:
            return render_chat(messages) if self.template is None else self.template.render(
                messages, add_generation_prompt=True)
        if not messages:
            raise ValueError("continue_final needs a last message (the reply to continue); got no messages")
        tagged = messages[:-1] + [{**messages[-1], "content": messages[-1]["content"] + _CONTINUE_TAG}]
        text = render_chat(tagged) if self.template is None else self.template.render(tagged)
        at = text.rfind(_CONTINUE_TAG.strip())
        if at < 0:
            where = "the plain template" if self.template is None else f"chat template {self.template.name}"
            raise ValueError(f"{where} does not write the last message's content as given, so the reply cannot "
                             "be continued after it")
        return text[:at] if text.startswith(_CONTINUE_TAG, at) else text[:at].rstrip()


def refuse_pack_for_encdec(pack: str, arch: str, path: object) -> None:
    """--pack (anything but its default "auto") packs a decoder-only model's CPU weights; an encoder-decoder
    decodes with its weights as loaded, so it would be ignored: refused, by `generate`, `chat` and `serve`."""
    if arch == "encdec" and pack != "auto":
        raise ValueError(f"--pack {pack} packs a decoder-only model's CPU weights; {path} is an encoder-decoder "
                         "(arch 'encdec'), which decodes with its weights as loaded: leave --pack out")


def chat_format(tokenizer: Tokenizer, template: ChatTemplate | None) -> ChatFormat:
    """The chat format of a model with this tokenizer and template (None: the plain template, with a
    log note). ConfigError when the tokenizer lacks a special token the template emits (it would be
    encoded as plain text, which the model never saw in fine-tuning)."""
    if template is None:
        log.info("this model has no chat template (no chat_template.jinja in its checkpoint): chat uses the "
                 "plain 'User: ... / Assistant:' template, which a base model was not trained on")
        return ChatFormat(None, stop_strings=(CHAT_STOP,))
    token_id = getattr(tokenizer, "token_id", None)
    ids = {t: token_id(t) if token_id is not None else None for t in template.special_tokens}
    missing = [t for t, i in ids.items() if i is None]
    if missing:
        raise ConfigError(f"chat template {template.name} emits {', '.join(missing)}, which the model's tokenizer "
                          f"does not have as special tokens; fine-tune with this template, or use a template "
                          f"made of the tokenizer's tokens")
    return ChatFormat(template, stop_ids=tuple(ids[t] for t in template.stop_tokens))


def prompt_ids(tokenizer: Tokenizer, text: str, context: int | None, max_new_tokens: int) -> list[int]:
    """EOS (the document separator seen in training) + the ids of `text`. With a `context`
    (engine.context_length), a prompt that leaves no room for a new token keeps its last
    context - min(max_new_tokens, context // 2) tokens (at least 1), with a warning."""
    ids = [tokenizer.eos_id] + tokenizer.encode(text)
    if context is not None and len(ids) + 1 > context:
        keep = max(1, context - min(max_new_tokens, context // 2))
        log.warning("prompt is %d tokens; the model's context is %d: keeping the last %d", len(ids), context, keep)
        ids = ids[-keep:]
    return ids


class TextStream:
    """Token ids in, newly completed text out, in O(1) per token: `push(id)` returns the text that
    id completes ("" while a UTF-8 sequence is incomplete), `flush()` what is left at the end. The
    pieces concatenate to `tokenizer.decode(ids)`. Byte and char tokenizers map ids directly (the
    byte one through an incremental UTF-8 decoder); BPE uses the `tokenizers` library's stream
    decoder; any other tokenizer decodes a short window of recent ids (the same prefix/read-offset
    scheme).

    `prefix`: the ids the new ones follow (the prompt). The pieces are then the text those ids add to
    it, `decode(prefix + ids)[len(decode(prefix)):]`: a tokenizer whose decoder strips the leading
    space of the first token (sentencepiece-style Metaspace or Strip decoders, Llama 2's) decodes the
    first new token in context, as " world" after "hello", not "world". Only the prompt's last
    PREFIX_TAIL ids are read: a decoder's context is the first token's strip and a character's bytes,
    and a long prompt walked through the stream for every admitted sequence held up the server's
    decode loop."""

    PREFIX_TAIL = 16

    def __init__(self, tokenizer: Tokenizer, prefix: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix_ids = list(prefix[-self.PREFIX_TAIL:])  # decoded before self.ids in flush (bpe)
        self.emitted = 0  # characters returned so far
        self._kind = kind = getattr(tokenizer, "kind", None)
        if kind == "byte":
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
            self._push = self._push_byte
        elif kind == "char":
            self._chars, self._unk = tokenizer.chars, tokenizer.unk_id  # type: ignore[attr-defined]
            self._push = self._push_char
        elif kind == "bpe":
            from tokenizers.decoders import DecodeStream

            self._hf = tokenizer.hf_tokenizer  # type: ignore[attr-defined]
            self._skip = getattr(tokenizer, "added_ids", frozenset())  # added special tokens: no text
            self._stream = DecodeStream(skip_special_tokens=True)
            shown = ""
            for token in self._prefix_ids:  # the stream's state after the prompt; its text is not returned
                if token not in self._skip:
                    shown += self._stream.step(self._hf, token) or ""
            # a prompt ending in U+FFFD leaves its last ids held: the next piece starts with their text again
            self._pending = max(0, len(tokenizer.decode(self._prefix_ids)) - len(shown)) if self._prefix_ids else 0
            self._push = self._push_bpe
        else:
            self._prefix, self._read = 0, 0  # window ids[prefix:] is decoded; ids[:read] are emitted
            self._push = self._push_window
        self._held = False  # ids pushed since the last piece (an incomplete sequence)

    def _check(self, token: int) -> None:
        if not 0 <= token < self.tokenizer.vocab_size:
            raise ValueError(f"token id {token} is outside the vocabulary [0, {self.tokenizer.vocab_size})")

    def _push_byte(self, token: int) -> str:
        self._check(token)
        # ids 0..255 are bytes; the specials above them decode to nothing (tokenizer/byte.py)
        return self._utf8.decode(bytes((token,))) if token < 256 else ""

    def _push_char(self, token: int) -> str:
        self._check(token)
        # ids below len(chars) are characters; <|unk|> is U+FFFD, the other specials nothing (tokenizer/char.py)
        return self._chars[token] if token < len(self._chars) else (REPLACEMENT if token == self._unk else "")

    def _push_bpe(self, token: int) -> str:
        self._check(token)
        if token in self._skip:  # dropped by decode too (tokenizer/bpe.py), so the stream skips it
            return ""
        piece = self._stream.step(self._hf, token)
        self._held = piece is None
        if piece and self._pending:  # the prompt's held text, already shown with the prompt
            drop = min(self._pending, len(piece))
            piece, self._pending = piece[drop:], self._pending - drop
        return piece or ""

    def _push_window(self, token: int) -> str:
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read])
        text = decode(self.ids[self._prefix:])
        if len(text) <= len(before) or text.endswith(REPLACEMENT):
            self._held = True
            return ""
        self._prefix, self._read, self._held = self._read, len(self.ids), False
        return text[len(before):]

    def push(self, token: int) -> str:
        self.ids.append(token)
        piece = self._push(token)
        self.emitted += len(piece)
        return piece

    def flush(self) -> str:
        """What is still held back (an incomplete UTF-8 sequence decodes to U+FFFD), once, at the end."""
        if self._kind == "byte":
            rest = self._utf8.decode(b"", final=True)
        elif self._held:  # one decode of the whole reply, only when something is held back
            decode, before = self.tokenizer.decode, self._prefix_ids
            rest = (decode(before + self.ids)[len(decode(before)):] if before else decode(self.ids))[self.emitted:]
        else:
            rest = ""
        self.emitted += len(rest)
        self._held = False
        return rest


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class StopStrings:
    """Cuts streamed text at the first of `stops`: `push(piece)` returns (text safe to show now,
    stopped). Text that may be the start of a stop string is held back until it is not; the stop
    string and everything after it are never returned. `flush(rest)` at the end returns what was
    held back (it was not a stop string after all) plus `rest`."""

    TAIL = 64  # characters of shown text searched again (a stop string may straddle pieces)

    def __init__(self, stops: tuple[str, ...] | list[str] = ()) -> None:
        self.stops = tuple(stops)
        self.buf = ""  # produced, not yet shown
        self.shown = ""  # the last TAIL characters shown

    def push(self, piece: str) -> tuple[str, bool]:
        if not piece:
            return "", False
        if not self.stops:
            return piece, False
        self.buf += piece
        window = self.shown + self.buf
        cuts = [c for c in (window.find(x) for x in self.stops) if c >= 0]
        if cuts:
            cut = min(cuts) - len(self.shown)  # index into buf (>= 0: the shown text had none)
            out, self.buf = self.buf[:max(cut, 0)], ""
            return out, True
        hold = _holdback(self.buf, self.stops)
        out, self.buf = self.buf[:len(self.buf) - hold], self.buf[len(self.buf) - hold:]
        self.shown = (self.shown + out)[-self.TAIL:]
        return out, False

    def flush(self, rest: str = "") -> str:
        out, self.buf = self.buf + rest, ""
        return out


def stream_text(loaded, prompt: str, *, max_new_tokens: int, temperature: float, top_k: int | None,  # noqa: ANN001
                top_p: float | None, seed: int | None, stop: str | tuple[str, ...] | None = None,
                compile: bool = False, stop_ids: tuple[int, ...] = (), pack: str | None = "auto") -> Iterator[str]:
    """Yield text pieces of one sample of `loaded` (a checkpoint.model_io LoadedModel) as they are
    generated; stops at EOS, a token of `stop_ids`, the limit or `stop` (one string or several; not
    returned, see StopStrings). Past the model's context the window slides (engine.generate's
    sliding_window). `compile`: run the decode step through torch.compile. `pack`: the CPU weights
    (engine.generate's pack: "auto", "fp32", "bf16" or None)."""
    from clusterlm.generate.engine import context_length, generate

    tok, model = loaded.tokenizer, loaded.model
    ids = prompt_ids(tok, prompt, context_length(model), max_new_tokens)
    gen = generate(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, eos_id=tok.eos_id, sliding_window=True, compile=compile, pack=pack)
    yield from stream_pieces(gen, tok, stop, stop_ids, prefix=ids)


def stream_pieces(steps: Iterator[list[int | None]], tok, stop: str | tuple[str, ...] | None,  # noqa: ANN001
                  stop_ids: tuple[int, ...], prefix: Sequence[int] = ()) -> Iterator[str]:
    """Text pieces of the first sequence of a generation (one token per step, None once finished):
    detokenized as they come, after the ids `prefix` (the prompt: TextStream), ended by a token of
    `stop_ids` (the end of a turn, like EOS: not shown) or a stop string (not returned). stream_text
    and generate.seq2seq.stream_seq2seq."""
    ts, stops = TextStream(tok, prefix), StopStrings((stop,) if isinstance(stop, str) else tuple(stop or ()))
    for step in steps:
        if step[0] is None:
            continue
        if step[0] in stop_ids:
            break
        piece, stopped = stops.push(ts.push(step[0]))
        if piece:
            yield piece
        if stopped:
            return
    rest = stops.flush(ts.flush())
    if rest:
        yield rest


def sample_texts(ckpt: str, *, prompt: str = "", num_samples: int = 1, max_new_tokens: int = 200,
                 temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, device: str = "cpu") -> list[str]:
    """Generate `num_samples` continuations of `prompt` in one batch; returns prompt + continuation (the
    text the new ids add to the prompt's: TextStream's `prefix`)."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.generate.engine import complete, context_length

    loaded = load_for_inference(ckpt, device=device)
    tok = loaded.tokenizer
    ids = prompt_ids(tok, prompt, context_length(loaded.model), max_new_tokens)
    new, _ = complete(loaded.model, [ids] * num_samples, max_new_tokens=max_new_tokens, temperature=temperature,
                      top_k=top_k, top_p=top_p, seed=seed, eos_id=tok.eos_id, sliding_window=True)
    before = tok.decode(ids)
    return [prompt + tok.decode(ids + t)[len(before):] for t in new]
