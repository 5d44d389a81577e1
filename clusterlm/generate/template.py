"""Chat templates: Jinja2 sources in the format transformers uses (`tokenizer.chat_template`).

    from clusterlm.generate.template import load_template, read_template
    t = load_template("clusterlm")                 # a builtin name, or the path of a .jinja file
    t.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    # '<|user|>\\nHi<|end|>\\n<|assistant|>\\n'
    t.special_tokens    # ('<|user|>', '<|end|>', '<|assistant|>', ...): the tokenizer must have them
    t.stop_tokens       # ('<|end|>',): a reply ends there
    read_template(checkpoint_folder)               # chat_template.jinja beside tokenizer.json, or None

A template is rendered as transformers renders it (transformers/utils/chat_template_utils.py): an
ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and the loopcontrols extension, the
variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, and the helpers
`raise_exception(msg)`, `strftime_now(fmt)` and a `tojson` filter that keeps non-ASCII text. So a
template carried by a checkpoint gives the same text in clusterlm and in `apply_chat_template`.

A checkpoint, a data directory or an exported Hugging Face folder keeps its template as
TEMPLATE_FILE beside tokenizer.json (docs/chat_templates.md). clusterlm prompts start with the EOS
document separator as ids (generate/text.py prompt_ids), so the templates here emit no bos/eos.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from clusterlm.errors import ConfigError

CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
END_OF_TURN = "<|end|>"
TEMPLATE_FILE = "chat_template.jinja"
# Each message as "<|role|>\n{content}<|end|>\n"; with add_generation_prompt, "<|assistant|>\n" last.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat roles are system, user and assistant, not ' ~ message['role']) }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] ~ '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"clusterlm": DEFAULT_TEMPLATE}
# the token strings a template emits (for the tokenizer to have): <|...|> without whitespace
_TOKEN = re.compile(r"<\|[^\s|<>]+\|>")
_SPACED_TOKEN = re.compile(r"<\|[^|<>]*\s[^|<>]*\|>")  # "<|user turn|>": a token would be encoded as text
_SAMPLE = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "\x00reply\x00"}, {"role": "user", "content": "Bye"}]
_BUILTIN_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")  # clusterlm's own; tokenizers always have them


class _TemplateError(Exception):
    """What `raise_exception` raises inside a template (a jinja2.TemplateError in transformers)."""


@functools.cache
def _environment() -> Any:
    """The sandboxed environment transformers renders chat templates with (built once, on first use)."""
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise _TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class ChatTemplate:
    """One Jinja2 chat template: `render` messages to the prompt text."""

    def __init__(self, source: str, name: str = "<string>", bos_token: str = "<|bos|>",
                 eos_token: str = "<|eos|>") -> None:
        """`name` (a builtin's name or the file) is used in error messages; `bos_token` and
        `eos_token` are the strings the template sees as variables of those names."""
        import jinja2

        if not isinstance(source, str) or not source.strip():
            raise ConfigError(f"chat template {name} is empty")
        self.source, self.name = source, name
        self.bos_token, self.eos_token = bos_token, eos_token
        try:
            self._compiled = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise ConfigError(f"chat template {name} is not valid Jinja2: {_one_line(e)}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The prompt text of `messages` ({"role", "content"} dicts); with `add_generation_prompt`,
        ending where the assistant's reply starts. ValueError (naming the template) when the
        template refuses the messages or fails."""
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except Exception as e:  # a template can fail in any way (sandbox, filters, raise_exception)
            raise ValueError(f"chat template {self.name}: {_one_line(e)}") from None

    @functools.cached_property
    def _sample(self) -> str:
        """A sample conversation rendered, for `special_tokens` and `stop_tokens` ("" if it fails)."""
        for messages in (_SAMPLE, _SAMPLE[1:]):  # templates without a system role refuse the first
            try:
                return self.render(messages, add_generation_prompt=True)
            except ValueError:
                pass
        return ""

    @functools.cached_property
    def special_tokens(self) -> tuple[str, ...]:
        """The <|...|> strings the template emits (written in its source or in a rendered sample),
        in order of first appearance; clusterlm's <|bos|>/<|eos|>/<|pad|> are left out (every
        tokenizer has them). The tokenizer needs each of them as a special token."""
        found = _TOKEN.findall(self.source) + _TOKEN.findall(self._sample)
        skip = {*_BUILTIN_SPECIALS, self.bos_token, self.eos_token}
        return tuple(t for t in dict.fromkeys(found) if t not in skip)

    @functools.cached_property
    def stop_tokens(self) -> tuple[str, ...]:
        """The tokens that end a reply: END_OF_TURN for templates that use it, else the <|...|> token
        the template writes right after an assistant message's content (ChatML's <|im_end|>,
        Llama 3's <|eot_id|>), else none (the model's EOS alone ends a reply)."""
        if END_OF_TURN in self.special_tokens:
            return (END_OF_TURN,)
        _, sep, after = self._sample.partition(_SAMPLE[2]["content"])
        m = _TOKEN.match(after) if sep else None
        return (m.group(),) if m and m.group() in self.special_tokens else ()

    def check(self) -> ChatTemplate:
        """Self, after rendering a sample conversation (system, user, assistant; or user, assistant
        for templates without a system role); ConfigError naming the template otherwise."""
        try:
            self.render(_SAMPLE, add_generation_prompt=True)
        except ValueError as first:
            try:
                self.render(_SAMPLE[1:], add_generation_prompt=True)
            except ValueError:
                raise ConfigError(f"{first} (while rendering a sample system/user/assistant "
                                  f"conversation)") from None
        spaced = _SPACED_TOKEN.search(self._sample)  # the source may build tokens: "<|" + role + "|>"
        if spaced:
            fixed = "<|" + "_".join(spaced.group()[2:-2].split()) + "|>"
            raise ConfigError(f"chat template {self.name} writes {spaced.group()!r}: a special token has no "
                              f"whitespace inside (it would be encoded as plain text, character by character); "
                              f"write it as {fixed!r}")
        return self

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name})"


def load_template(spec: str) -> ChatTemplate:
    """A builtin template by name (BUILTIN_TEMPLATES) or a .jinja file by path, checked to render a
    sample conversation; ConfigError (one line naming the file) otherwise."""
    if spec in BUILTIN_TEMPLATES:
        return ChatTemplate(BUILTIN_TEMPLATES[spec], name=spec).check()
    path = Path(spec)
    if not path.is_file():
        what = "a directory" if path.is_dir() else "no such file"
        raise ConfigError(f"chat template {spec!r} is neither a builtin ({', '.join(BUILTIN_TEMPLATES)}) nor a "
                          f"Jinja2 file ({what})")
    return ChatTemplate(_read(path), name=str(path)).check()


def read_template(folder: str | Path) -> ChatTemplate | None:
    """The template kept as TEMPLATE_FILE in `folder` (a checkpoint, data directory or Hugging Face
    folder), or None when there is none."""
    path = Path(folder) / TEMPLATE_FILE
    if not path.is_file():
        return None
    return ChatTemplate(_read(path), name=str(path))


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"chat template {path} is not UTF-8 text: {e}") from None
