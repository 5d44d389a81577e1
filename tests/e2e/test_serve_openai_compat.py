"""OpenAI-compatibility fields of `clusterlm serve`, through the official `openai` client against a live
uvicorn server (tests/e2e/test_serve.py's Server) over a seeded random-weights byte-level Llama with a
64-token context (tests/helpers.py random_checkpoint): max_completion_tokens, content given as text
parts, the developer role, logprobs/top_logprobs on chat and logprobs on completions (streaming too),
checked against the model's own log-softmax, null as a field's default, and the unknown-field policy
for what stays unsupported.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.e2e.test_serve import KEY, Server
from tests.helpers import random_checkpoint

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")

TEXT = "the quick brown fox jumps over the lazy dog. " * 20
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("compat"), "byte", TEXT, bpe_vocab=0, n_layers=2, context=64)


@pytest.fixture(scope="module")
def server(run):
    srv = Server(run, max_batch=8, max_queue=16, max_new_tokens_limit=32)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


def _reference_logprobs(run, prompt_ids: list[int], new_ids: list[int]):  # noqa: ANN202
    """log_softmax of the model's logits at each generated position (one full forward, no cache)."""
    import torch

    from clusterlm.checkpoint.model_io import load_for_inference

    loaded = load_for_inference(run)
    ids = torch.tensor([prompt_ids + new_ids])
    with torch.inference_mode():
        logits = loaded.model(ids)[0, :, : loaded.model.config.vocab_size].float()  # (T, V)
    lp = torch.log_softmax(logits, dim=-1)
    P = len(prompt_ids)
    return lp[P - 1: P - 1 + len(new_ids)]  # (N, V): row k predicts new_ids[k]


def _chat_prompt_ids(run, messages: list[dict]) -> list[int]:
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.generate.text import chat_format, prompt_ids

    tok = load_for_inference(run).tokenizer
    return prompt_ids(tok, chat_format(tok, None).render(messages), None, 0)


def test_models_reports_the_context(server, client, run):
    """/v1/models gives the context as vLLM does (max_model_len), for clients that trim history; the
    client's models.retrieve reads one model's card (GET /v1/models/{id}: it was 404 for every id)."""
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert r.json()["data"][0]["max_model_len"] == 64
    # created (OpenAI: when the model was made) was always 0; now the checkpoint folder's time
    from clusterlm.checkpoint.store import resolve_checkpoint

    step = resolve_checkpoint(str(run))
    assert r.json()["data"][0]["created"] == int(step.stat().st_mtime) > 1_700_000_000
    card = client.models.retrieve("tiny")
    assert card.id == "tiny" and card.model_dump()["max_model_len"] == 64
    with pytest.raises(openai.NotFoundError, match="model 'nope' is not served here; this server serves 'tiny'"):
        client.models.retrieve("nope")


def test_max_completion_tokens(client, server):
    """max_completion_tokens caps the reply as max_tokens does (same greedy text and usage); both
    given must agree (400 naming both otherwise); the server's limit and the schema's lower bound
    apply to it; the legacy completions API has no such field (422, the unknown-field policy)."""
    a = client.chat.completions.create(model="tiny", messages=HI, max_completion_tokens=5, temperature=0)
    b = client.chat.completions.create(model="tiny", messages=HI, max_tokens=5, temperature=0)
    c = client.chat.completions.create(model="tiny", messages=HI, max_tokens=5, max_completion_tokens=5,
                                       temperature=0)
    assert a.usage.completion_tokens <= 5
    assert a.choices[0].message.content == b.choices[0].message.content == c.choices[0].message.content
    assert a.usage == b.usage == c.usage
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=4, max_completion_tokens=6)
    assert "max_tokens=4" in str(e.value) and "max_completion_tokens=6" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=HI, max_completion_tokens=33)
    assert "max_completion_tokens=33" in str(e.value) and "[1, 32]" in str(e.value)
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="tiny", messages=HI, max_completion_tokens=0)
    assert "max_completion_tokens" in str(e.value) and "[1, 32]" in str(e.value)
    r = _post(server, "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_completion_tokens": 4})
    assert r.status_code == 422 and "max_completion_tokens" in r.text and "unknown field" in r.text


def test_content_parts_and_developer_role(client, server, run):
    """Text parts are joined with newlines (as vLLM does): the same prompt and greedy reply as the
    joined string. A non-text part is refused with 400 naming its place and type; a text part with
    an unknown field is 422. `developer` is rendered as `system`: same prompt and reply."""
    parts = [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]
    a = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}],
                                       max_tokens=6, temperature=0)
    b = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hel\nlo"}],
                                       max_tokens=6, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage == b.usage
    for part in ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                 {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", max_tokens=4, messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}])
        assert f"messages[1].content[1] is a content part of type '{part['type']}'" in str(e.value)
    r = _post(server, "/v1/chat/completions", {"model": "tiny", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "x", "cache_control": {}}]}]})
    assert r.status_code == 422 and "cache_control" in r.text
    r = _post(server, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": []}]})
    assert r.status_code == 422 and "1..256 parts" in r.text

    sys_msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    dev_msgs = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    s = client.chat.completions.create(model="tiny", messages=sys_msgs, max_tokens=6, temperature=0)
    d = client.chat.completions.create(model="tiny", messages=dev_msgs, max_tokens=6, temperature=0)
    assert d.choices[0].message.content == s.choices[0].message.content and d.usage == s.usage
    assert d.usage.prompt_tokens == len(_chat_prompt_ids(run, sys_msgs))


def test_chat_logprobs_match_the_model(client, server, run):
    """Chat logprobs (OpenAI's ChatCompletionTokenLogprob): one entry per completion token; the
    sampled token's logprob and the top 3 equal log_softmax of the model's raw logits (a full
    forward, no cache) to 1e-4, also when sampling at temperature 1.5 (the raw distribution, not the
    tempered one); the bytes concatenate to the reply; greedy picks the top entry."""
    for temperature in (0.0, 1.5):
        r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=8, temperature=temperature,
                                           seed=3, logprobs=True, top_logprobs=3)
        ch = r.choices[0]
        content = ch.logprobs.content
        assert len(content) == r.usage.completion_tokens > 0
        assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == ch.message.content
        new_ids = [e.bytes[0] for e in content]  # byte tokenizer: a token's id is its byte
        ref = _reference_logprobs(run, _chat_prompt_ids(run, HI), new_ids)
        for k, e in enumerate(content):
            assert e.logprob == pytest.approx(ref[k, new_ids[k]].item(), abs=1e-4)
            assert len(e.top_logprobs) == 3
            vals, ids = ref[k].topk(3)
            assert [t.logprob for t in e.top_logprobs] == pytest.approx(vals.tolist(), abs=1e-4)
            assert [t.bytes for t in e.top_logprobs if t.bytes] == [[i] for i in ids.tolist() if i < 256]
            if temperature == 0:
                assert e.token == e.top_logprobs[0].token and e.logprob == pytest.approx(e.top_logprobs[0].logprob)
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=4, logprobs=True)
    assert all(e.top_logprobs == [] for e in r.choices[0].logprobs.content)  # top_logprobs absent: 0
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=4)
    assert r.choices[0].logprobs is None
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=4, top_logprobs=2)
    assert "top_logprobs needs logprobs: true" in str(e.value)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=4, logprobs=True, top_logprobs=21)


def test_chat_logprobs_streaming_equal_non_streaming(client):
    """Streamed chat chunks carry the logprobs of their tokens; concatenated over the stream (n=2,
    each choice on its own) they equal the non-streaming reply's, seeded sampling; a stop string's
    last token is reported too (one entry per counted token)."""
    kw = dict(model="tiny", messages=HI, max_tokens=12, temperature=1.0, seed=11, n=2, logprobs=True,
              top_logprobs=2)
    whole = client.chat.completions.create(**kw)
    got: dict[int, list] = {0: [], 1: []}
    text: dict[int, str] = {0: "", 1: ""}
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            text[c.index] += c.delta.content or ""
            if c.logprobs is not None:
                got[c.index] += c.logprobs.content
    for ch in whole.choices:
        assert text[ch.index] == ch.message.content
        assert [(e.token, e.bytes) for e in got[ch.index]] == [(e.token, e.bytes) for e in ch.logprobs.content]
        assert [e.logprob for e in got[ch.index]] == pytest.approx([e.logprob for e in ch.logprobs.content],
                                                                  abs=1e-5)
    # a stop string: the text stops before it, the entries cover every counted token
    first = whole.choices[0].message.content
    stop = next((ch for ch in first[2:] if ch.isprintable() and ch != "\ufffd"), None)
    if stop is not None:
        r = client.chat.completions.create(**{**kw, "n": 1}, stop=[stop])
        assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens


def test_completion_logprobs(client, run):
    """Completions' legacy logprobs (an int <= 5): tokens, token_logprobs (the model's to 1e-4),
    top_logprobs dicts of the k best plus the sampled token, text_offset into the completion text;
    streamed chunks concatenate to the non-streaming object; 0 gives the sampled token alone."""
    from clusterlm.checkpoint.model_io import load_for_inference

    tok = load_for_inference(run).tokenizer
    r = client.completions.create(model="tiny", prompt="the quick", max_tokens=10, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    assert all(len(d) <= 3 and lp.tokens[k] in d for k, d in enumerate(lp.top_logprobs))
    ids = [tok.eos_id] + tok.encode("the quick")
    new_ids = tok.encode(r.choices[0].text)
    if len(new_ids) == n:  # every token a whole character (else the text has U+FFFD in it)
        ref = _reference_logprobs(run, ids, new_ids)
        assert lp.token_logprobs == pytest.approx([ref[k, t].item() for k, t in enumerate(new_ids)], abs=1e-4)
    streamed = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in client.completions.create(model="tiny", prompt="the quick", max_tokens=10, temperature=0,
                                           logprobs=2, stream=True):
        for c in chunk.choices:
            if c.logprobs is not None:
                for k in streamed:
                    streamed[k] += getattr(c.logprobs, k)
    assert streamed["tokens"] == lp.tokens and streamed["text_offset"] == lp.text_offset
    assert streamed["token_logprobs"] == pytest.approx(lp.token_logprobs, abs=1e-5)
    r0 = client.completions.create(model="tiny", prompt="the quick", max_tokens=4, temperature=0, logprobs=0)
    assert all(list(d) == [t] for d, t in zip(r0.choices[0].logprobs.top_logprobs, r0.choices[0].logprobs.tokens))
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].logprobs is None
    with pytest.raises(openai.UnprocessableEntityError) as e:
        client.completions.create(model="tiny", prompt="x", max_tokens=2, logprobs=6)
    assert "[0, 5]" in str(e.value)


def test_completion_logprobs_of_partial_characters(run):
    """Byte tokens that are parts of characters: in the legacy shape each is named "bytes:\\xNN" (as
    OpenAI does), so that k alternatives are k distinct keys and the sampled token's value is its own
    (every such token was "\ufffd" before: the dict kept one entry, with another token's logprob); and
    a token after an incomplete character it breaks starts after that character's U+FFFD."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.serve.logprobs import CompletionLogprobs, TokenNames

    acc = CompletionLogprobs(TokenNames(load_for_inference(run).tokenizer))
    out = acc.chunk([(0xE2, -5.7, [(ord("i"), -5.0), (0xF0, -5.2), (0x9F, -5.3)]),  # sampled: not in the top 3
                     (ord("H"), -5.1, [(0x80, -5.29), (ord("H"), -5.1)]),
                     (0xC3, -1.0, []), (0xA9, -0.5, [])])  # "é" in two tokens: both at its offset
    assert out["tokens"] == ["bytes:\\xe2", "H", "bytes:\\xc3", "bytes:\\xa9"]
    assert out["top_logprobs"][0] == {"i": -5.0, "bytes:\\xf0": -5.2, "bytes:\\x9f": -5.3, "bytes:\\xe2": -5.7}
    assert out["top_logprobs"][1] == {"bytes:\\x80": -5.29, "H": -5.1}
    assert out["text_offset"] == [0, 1, 2, 2]  # the text is "\ufffdHé"


def test_unsupported_fields_still_rejected(server):
    """The documented unknown-field policy holds for what is still not implemented: 422 naming it."""
    for path, extra in (("/v1/chat/completions", {"tools": []}), ("/v1/chat/completions", {"logit_bias": {"1": 2}}),
                        ("/v1/chat/completions", {"response_format": {"type": "json_object"}}),
                        ("/v1/completions", {"suffix": "x"}), ("/v1/completions", {"best_of": 2})):
        body = {"model": "tiny", "max_tokens": 2, **extra,
                **({"messages": HI} if "chat" in path else {"prompt": "x"})}
        r = _post(server, path, body)
        assert r.status_code == 422, (path, extra, r.text)
        assert next(iter(extra)) in r.json()["error"]["message"] and "unknown field" in r.text
    r = _post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "echo": True})
    assert r.status_code == 422 and "echo: true (the prompt returned before the completion" in r.text, r.text
    assert "not supported" in r.text and json.loads(r.text)["error"]["param"] == "echo"
    r = _post(server, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "tool", "content": "x"}]})
    assert r.status_code == 422 and "developer" in r.text  # the allowed roles are listed
    assert json.loads(r.text)["error"]["param"].startswith("messages")


def test_null_means_the_default(server):
    """OpenAI's API reference types the sampling fields "... or null" (temperature, top_p, n, stream,
    penalties, echo): a client that sends them as null gets the defaults, the same seeded text as
    without them, not a 422."""
    nulls = {k: None for k in ("temperature", "top_p", "n", "stream", "presence_penalty", "frequency_penalty")}
    for path, body in (("/v1/chat/completions", {"messages": HI}), ("/v1/completions", {"prompt": "Hi"})):
        base = {"model": "tiny", "max_tokens": 6, "seed": 7, **body}
        plain = _post(server, path, base)
        r = _post(server, path, {**base, **nulls, **({"echo": None} if "prompt" in body else {})})
        assert plain.status_code == r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 1 and r.json()["choices"] == plain.json()["choices"]
    r = _post(server, "/v1/chat/completions", {"model": "tiny", "messages": HI, "echo": None})
    assert r.status_code == 422 and "echo" in r.text  # not a chat field: still unknown


def test_union_field_errors_name_the_field(server):
    """A value refused by a field that takes several types (content: a string or parts; completions
    logprobs: an int or false; stop) was reported per pydantic union member: param
    'messages.0.content.str', and a text part without its text led with 'Input should be a valid
    string; got list'. Now param is the field as sent, and only the member the value's type fits speaks."""
    cases = (("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
              "messages.0.content.0", "a text part needs a 'text' string"),
             ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": None}]},
              "messages.0.content", "valid string or Input should be a valid array; got None"),
             ("/v1/completions", {"prompt": "x", "logprobs": True}, "logprobs", "valid integer"),
             ("/v1/completions", {"prompt": "x", "stop": ["a", 5]}, "stop.1", "valid string; got 5"),
             # rules across two fields are reported on the one that needs the other (param was "body")
             ("/v1/chat/completions", {"messages": HI, "stream_options": {"include_usage": True}}, "stream_options",
              "only allowed with stream: true"),
             ("/v1/chat/completions", {"messages": HI, "top_logprobs": 2}, "top_logprobs", "needs logprobs: true"))
    for path, body, param, says in cases:
        r = _post(server, path, {"model": "tiny", "max_tokens": 2, **body})
        err = r.json()["error"]
        assert r.status_code == 422 and err["param"] == param and says in err["message"], r.text
        assert "[" not in err["param"] and "valid string; got list" not in err["message"], r.text


def test_a_failed_stream_ends_with_its_error_event_and_done(server):
    """A stream whose model fails after its first token ends with the error event and `data: [DONE]`,
    as docs/serving.md says, with include_usage too: a usage chunk came between them, after the
    error, counting only the choices that had finished (completion_tokens 0 for a stream that had
    sent its first token)."""
    sched = server.app.app.state.state["sched"]

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("boom")

    sched.engine.decode = broken  # prefill samples the first token, the next step fails
    try:
        for path, body in (("/v1/chat/completions", {"messages": HI}), ("/v1/completions", {"prompt": "Hi"})):
            with httpx.stream("POST", server.url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                              json={"model": "tiny", "max_tokens": 8, "temperature": 0, "stream": True,
                                    "stream_options": {"include_usage": True}, **body}) as r:
                events = [line for line in r.iter_lines() if line]
            assert r.status_code == 200
            error = next(i for i, e in enumerate(events) if '"error"' in e)
            assert json.loads(events[error][len("data: "):])["error"]["type"] == "server_error"
            assert events[error + 1:] == ["data: [DONE]"], events[error:]
    finally:
        del sched.engine.decode
    deadline = time.time() + 10  # the failed step frees its slots just after it sends the error
    while sched.cache.num_free != sched.max_batch and time.time() < deadline:
        time.sleep(0.01)
    assert sched.cache.num_free == sched.max_batch


def test_logprob_bytes_of_a_sentencepiece_style_tokenizer():
    """docs/serving.md: a token's `bytes` are the UTF-8 bytes it adds, and concatenated over a reply
    they give its text. With a Llama 2 style tokenizer.json (Metaspace words, byte fallback, a decoder
    that strips the first token's leading space; any tokenizer.json loads) each token was decoded
    alone: every word lost its space ('helloworld') and a byte-fallback token <0xC3> was U+FFFD's
    three bytes (now the byte 0xC3). The reply's text is what the server streams (TextStream after the prompt's ids)."""
    from clusterlm.generate.text import TextStream
    from clusterlm.serve.logprobs import CompletionLogprobs, TokenNames, chat_logprobs, legacy_name
    from tests.unit.test_text import _sentencepiece_bpe

    tok = _sentencepiece_bpe("hello world, the world is big 😀 hello there " * 4)
    names = TokenNames(tok)
    prompt, reply = tok.encode("hello there"), tok.encode("hello big world 😀 there")
    ts = TextStream(tok, prompt)
    text = "".join(ts.push(i) for i in reply) + ts.flush()
    assert text == " hello big world 😀 there"
    entries = chat_logprobs(names, [(i, -1.0, []) for i in reply])["content"]
    assert b"".join(bytes(e["bytes"]) for e in entries).decode("utf-8") == text
    legacy = CompletionLogprobs(names).chunk([(i, -1.0, []) for i in reply])
    assert legacy["tokens"][:3] == [" hello", " big", " world"]
    c3 = tok.hf_tokenizer.token_to_id("<0xC3>")  # the first byte of "é"
    assert names(c3) == ("\ufffd", b"\xc3") and legacy_name(*names(c3)) == "bytes:\\xc3"
