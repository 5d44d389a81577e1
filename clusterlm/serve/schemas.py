"""Request and response bodies of the OpenAI-compatible subset that `clusterlm serve` speaks.

Requests are validated here (pydantic): every numeric field has bounds, and a value out of range
is answered 422 with a message naming the field and the allowed range (`validation_message`).
Non-finite numbers (1e400 parses as inf) are rejected. Limits that depend on the server (max_tokens
above --max-new-tokens-limit, n above min(16, --max-batch), the prompt against the model's context)
are checked by the app and answered 400 naming the server's range, however large the value.

Unknown-field policy: a field this server does not know is REJECTED (422 naming it), so a client
never believes an option took effect when it did not. Fields OpenAI defines that have no effect
here are accepted only at their neutral value: `user` (any string, ignored), a message's `name`
(ignored: the chat templates here have no participant names), `presence_penalty`/`frequency_penalty`
(0 only). `stream_options` (`include_usage`) needs `stream: true`, as OpenAI answers.

Newer OpenAI forms (docs/serving.md, "OpenAI compatibility"): chat's `max_completion_tokens` (the
newer name of `max_tokens`; both given must agree), message `content` as a list of text parts
(other part types are answered 400 by the app, naming the type), the `developer` role (rendered as
`system`), `logprobs`/`top_logprobs` on chat and `logprobs` (an int) on completions.

    from clusterlm.serve.schemas import CompletionRequest
    req = CompletionRequest.model_validate({"model": "m", "prompt": "Hi", "max_tokens": 8})
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

MAX_STOP = 4  # OpenAI allows up to 4 stop sequences
MAX_STOP_CHARS = 64
MAX_N = 16  # upper bound on n before the server's own --max-batch check
MAX_SEED = 2**63 - 1
MAX_MESSAGES = 256
MAX_CLASSIFY_INPUTS = 1024  # texts in one /classify request
MAX_LOGPROBS = 5  # completions' `logprobs` (OpenAI's maximum)
MAX_TOP_LOGPROBS = 20  # chat's `top_logprobs` (OpenAI's maximum)
MAX_CONTENT_PARTS = 256


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# fields OpenAI's API reference types "... or null": null means the default (as OpenAI and vLLM read
# it), for clients that send every field and an unset one as null
NULL_IS_DEFAULT = ("temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty", "echo")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    # optional here so that the app can answer by what it serves: 422 (required) with one model,
    # 400 naming the models with several (app.py)
    model: str | None = Field(default=None, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)  # the upper bound is the server's: app.py, 400
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)  # upper bound min(MAX_N, --max-batch): app.py, 400
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: object) -> object:
        if isinstance(data, dict):
            nullable = set(NULL_IS_DEFAULT) & set(cls.model_fields)
            return {k: v for k, v in data.items() if not (v is None and k in nullable)}
        return data

    @field_validator("stream_options")  # a field's validator (after `stream`), so that the error's param names it
    @classmethod
    def _stream_options(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):  # as OpenAI answers: it would do nothing
            raise ValueError("stream_options is only allowed with stream: true")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        for s in stops:
            if not 1 <= len(s) <= MAX_STOP_CHARS:
                raise ValueError(f"each stop sequence must have 1..{MAX_STOP_CHARS} characters, got {len(s)}")
        return stops

    @property
    def stops(self) -> list[str]:
        return list(self.stop or [])  # type: ignore[arg-type]


class CompletionRequest(_Sampling):
    prompt: str = Field(max_length=1_000_000)
    echo: Literal[False] = False  # true (the prompt returned before the completion) is not implemented
    # the sampled token's logprob and the `logprobs` most likely ones per token; false/null: none
    logprobs: int | Literal[False] | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @field_validator("echo", mode="before")
    @classmethod
    def _echo(cls, v: object) -> object:
        if v is True:  # say what is missing, not pydantic's "Input should be False"
            raise ValueError("echo: true (the prompt returned before the completion, with its logprobs) is not "
                             "supported by this server; omit echo or send false")
        return v

    @property
    def top_logprobs(self) -> int | None:
        """Alternatives per token (0: the sampled token only), or None for no logprobs."""
        return None if self.logprobs is None or self.logprobs is False else self.logprobs


class ContentPart(BaseModel):
    """One part of a message's `content` list. Only `{"type": "text", "text": ...}` is read; any other
    type is let through here so that the app can answer 400 naming it (`unsupported_part`)."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)
    type: str = Field(max_length=64)
    text: str | None = Field(default=None, max_length=1_000_000)

    @model_validator(mode="after")
    def _text_part(self) -> ContentPart:
        if self.type == "text":
            if self.text is None:
                raise ValueError("a text part needs a 'text' string")
            extra = sorted(self.model_extra or {})
            if extra:
                raise ValueError(f"unknown field {extra[0]!r} in a text part (this server rejects fields it "
                                 "does not implement; see docs/serving.md)")
        return self


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] = Field(max_length=1_000_000)
    name: str | None = Field(default=None, max_length=64)

    @field_validator("content")
    @classmethod
    def _parts(cls, v: str | list[ContentPart]) -> str | list[ContentPart]:
        if isinstance(v, list) and not 1 <= len(v) <= MAX_CONTENT_PARTS:
            raise ValueError(f"a content list needs 1..{MAX_CONTENT_PARTS} parts, got {len(v)}")
        return v

    @property
    def template_role(self) -> str:
        """The role the chat template sees: OpenAI's `developer` (its newer name for system
        instructions) is rendered as `system`."""
        return "system" if self.role == "developer" else self.role

    @property
    def text(self) -> str:
        """The content as one string: text parts joined with newlines (as vLLM does)."""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text or "" for p in self.content)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # max_tokens' newer name; bound: app.py
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("top_logprobs")  # after `logprobs`: the error's param is top_logprobs
    @classmethod
    def _logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return v


def unsupported_part(messages: list[ChatMessage]) -> tuple[str, str] | None:
    """(where, type) of the first content part that is not text, e.g. ("messages[0].content[1]",
    "image_url"); None when every part is text."""
    for i, m in enumerate(messages):
        if isinstance(m.content, list):
            for j, p in enumerate(m.content):
                if p.type != "text":
                    return f"messages[{i}].content[{j}]", p.type
    return None


class TokenizeRequest(_Strict):
    """POST /tokenize, vLLM's route: a `prompt` (as /v1/completions reads it) or chat `messages` (as
    /v1/chat/completions renders them with the model's template), exactly one of the two. The answer
    counts the tokens the model would be given, the leading EOS included, so that a client (the chat
    page) fits a conversation into the context exactly instead of guessing from characters."""

    model: str | None = Field(default=None, max_length=256)
    prompt: str | None = Field(default=None, max_length=1_000_000)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=MAX_MESSAGES)

    @model_validator(mode="after")
    def _one(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class ClassifyRequest(_Strict):
    """POST /classify, vLLM's classification API: one text or a list of them. truncate_prompt_tokens:
    keep the last k tokens of each input (-1 or absent: the model's context)."""

    model: str | None = Field(default=None, max_length=256)
    input: str | list[str] = Field(max_length=1_000_000)
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    user: str | None = Field(default=None, max_length=256)

    @field_validator("input")
    @classmethod
    def _input(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not 1 <= len(v) <= MAX_CLASSIFY_INPUTS:
            raise ValueError(f"a list of 1..{MAX_CLASSIFY_INPUTS} texts, got {len(v)}")
        return v

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


# ---- responses (plain dicts: cheap to build per streamed token) ---------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _range_of(model: type[BaseModel], field: str) -> str | None:
    """'[lo, hi]' / '(lo, hi]' for a bounded numeric field of `model`, else None."""
    info = model.model_fields.get(field)
    if info is None:
        return None
    lo = hi = None
    lo_open = hi_open = False
    for m in info.metadata:
        for attr, is_lo, is_open in (("ge", True, False), ("gt", True, True),
                                     ("le", False, False), ("lt", False, True)):
            val = getattr(m, attr, None)
            if val is not None:
                if is_lo:
                    lo, lo_open = val, is_open
                else:
                    hi, hi_open = val, is_open
    if lo is None and hi is None:
        return None
    lo_s = "-inf" if lo is None else lo
    hi_s = "inf" if hi is None else hi
    return f"{'(' if lo_open else '['}{lo_s}, {hi_s}{')' if hi_open else ']'}"


def _union_member(x: object) -> bool:
    """Whether an error's loc element is pydantic's name for a member of a union field (`str`, `int`,
    `list[str]`, `literal[False]`, ...) rather than a field name or list index."""
    return isinstance(x, str) and (x in ("str", "int", "float", "bool") or "[" in x)


def _without_union_noise(errors: list[dict]) -> list[dict]:
    """pydantic reports every member of a union that refused a value (`content` null: not a string,
    not a list). Where one member accepted the value's type and failed inside it (a text part without
    its text), the others' "wrong type" errors only mislead: they are dropped. The members' names
    are dropped from every loc, so that it is the field as the client wrote it (OpenAI's `param`)."""
    inside = {e["loc"][:i] for e in errors
              for i, x in enumerate(e["loc"]) if _union_member(x) and i + 1 < len(e["loc"])}
    kept = [e for e in errors if not (e["loc"] and _union_member(e["loc"][-1]) and e["loc"][:-1] in inside)]
    return [{**e, "loc": tuple(x for x in e["loc"] if not _union_member(x))} for e in kept]


def validation_message(model: type[BaseModel], err: ValidationError,
                       ranges: dict[str, str] | None = None) -> tuple[str, str | None]:
    """One readable line for a pydantic error: 'field: problem (allowed range [lo, hi])', and the
    first offending field's name (OpenAI's `param`). `ranges` overrides the range shown for fields
    whose bounds are the server's (max_tokens, n). A union field's members that refused the value
    are one entry: 'stop: Input should be a valid string or Input should be a valid array; got 5'."""
    by_loc: dict[tuple, list[dict]] = {}
    for e in _without_union_noise(err.errors()):
        by_loc.setdefault(e["loc"], []).append(e)
    parts, first = [], None
    for loc_t, errs in list(by_loc.items())[:5]:
        loc = ".".join(str(x) for x in loc_t) or "body"
        first = first or loc
        msg = " or ".join(dict.fromkeys(e["msg"] for e in errs))
        extra = errs[0]["type"] == "extra_forbidden"
        if extra:
            msg = "unknown field (this server rejects fields it does not implement; see docs/serving.md)"
        top = str(loc_t[0]) if loc_t else ""
        rng = (ranges or {}).get(top) or (_range_of(model, top) if top else None)
        if rng is not None and not extra:  # no range for a field that is not there
            msg += f" (allowed range {rng})"
        got = errs[0].get("input")
        got_s = repr(got)[:60] if not isinstance(got, (dict, list)) else type(got).__name__
        parts.append(f"{loc}: {msg}; got {got_s}")
    return "; ".join(parts), first
