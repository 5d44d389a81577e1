"""`clusterlm serve` against a live uvicorn server on 127.0.0.1: the official `openai` client
(completions, chat, streaming, n > 1, stop, usage), a malformed-request suite, disconnects, 429.

The chat page at / is driven in headless Chromium (skipped without chromium).
A tiny byte-level Llama is trained once per module (clusterlm.train via the CLI, as in
test_cli_flow.py); an LSTM checkpoint is served too.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clusterlm.cli import main as cli

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package ships with

TEXT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog; hey diddle diddle." for i in range(300))
KEY = "test-key-0123456789"


def _train(root: Path, preset: str, extra: list[str]) -> Path:
    corpus = root / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "a.txt").write_text(TEXT)
    data = root / "data"
    if not data.exists():
        assert cli(["prepare", str(corpus), "--out", str(data), "--tokenizer", "byte", "--val-fraction", "0.2"]) == 0
    run = root / f"run-{preset}"
    rc = cli(["train", "--data.dir=" + json.dumps(str(data)), "--train.out_dir=" + json.dumps(str(run)),
              f"--model.preset={preset}", "--train.seq_len=32", *extra,
              "--train.micro_batch_size=8", "--train.max_steps=30", "--train.eval_interval=30",
              "--train.eval_batches=2", "--train.device=cpu", "--optim.lr=3e-3", "--optim.warmup_steps=5"])
    assert rc == 0
    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread, serving `run` with create_app; stop() shuts it down."""

    def __init__(self, run: Path, **settings) -> None:
        import uvicorn

        from clusterlm.checkpoint.model_io import load_for_inference
        from clusterlm.serve.app import MAX_HEADER_BYTES, Settings, create_app

        self.settings = Settings(api_key=KEY, model_name="tiny", **settings)
        self.app = create_app(lambda: load_for_inference(run), self.settings)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, http="h11", log_level="warning",
                             h11_max_incomplete_event_size=MAX_HEADER_BYTES, lifespan="on")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                r = httpx.get(self.url + "/ready", timeout=1)
                if r.status_code == 200:
                    return
                if "failed" in r.text:
                    raise RuntimeError(r.text)
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("server did not become ready")

    def metrics(self) -> dict[str, float]:
        """Series -> value, the one model's `model` label left out of the key (a per-model series
        reads `clusterlm_running_sequences`, `clusterlm_sequences_finished_total{reason="stop"}`)."""
        text = httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, val = line.rsplit(" ", 1)
                name = re.sub(r'model="[^"]*",?', "", name).replace(",}", "}").replace("{}", "")
                out[name] = float(val)
        return out

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def llama_run(root) -> Path:
    return _train(root, "llama-nano", ["--model.max_seq_len=64"])


@pytest.fixture(scope="module")
def server(llama_run):
    srv = Server(llama_run, max_batch=8, max_queue=16, max_new_tokens_limit=64)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def lstm_server(root):
    """An LSTM (no context limit) allowing 4000-token completions: streams that cannot end on their
    own within the tests, so every disconnect must be noticed by the server."""
    run = _train(root, "lstm-small", ["--model.dim=64", "--model.n_layers=1"])
    srv = Server(run, max_batch=20, max_queue=4, max_new_tokens_limit=4000)
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def test_models_and_completion(client, server):
    """/v1/models lists the served name; a greedy completion returns max_tokens bytes (byte tokenizer,
    ASCII corpus) with usage = prompt bytes + 1 (leading EOS) and completion tokens = max_tokens,
    unless it stopped at EOS; the same seed gives the same text."""
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="Line 4", max_tokens=12, temperature=0)
    assert r.usage.prompt_tokens == len("Line 4") + 1
    c = r.choices[0]
    assert c.finish_reason in ("length", "stop")
    if c.finish_reason == "length":
        assert r.usage.completion_tokens == 12 and len(c.text.encode()) == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    a = client.completions.create(model="tiny", prompt="Line", max_tokens=16, temperature=1.0, seed=7)
    b = client.completions.create(model="tiny", prompt="Line", max_tokens=16, temperature=1.0, seed=7)
    assert a.choices[0].text == b.choices[0].text


def test_streaming_equals_non_streaming(client):
    """A greedy streamed completion concatenates to the non-streamed text; the finish reason arrives
    in the last chunk; with include_usage the final chunk carries the same usage."""
    ref = client.completions.create(model="tiny", prompt="Line 7", max_tokens=20, temperature=0)
    chunks = list(client.completions.create(model="tiny", prompt="Line 7", max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.choices[0].text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [ref.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == ref.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == ref.usage.prompt_tokens


@pytest.mark.parametrize("which", ["server", "lstm_server"])
def test_serve_equals_generate_greedy(which, request):
    """Serving and `generate` run one engine (generate.engine.Engine, sampling.sample_rows): on the
    served model (a Llama and an LSTM), the server's greedy completion equals engine.complete's tokens
    for the same prompt ids (byte tokenizer: the text is the token sequence; same count and finish
    reason), whatever the seed; and a greedy chat reply equals the CLI's chat path (text.stream_text
    with CHAT_STOP), the same text helpers cutting at the same stop string."""
    from clusterlm.generate.engine import complete
    from clusterlm.generate.text import CHAT_STOP, prompt_ids, render_chat, stream_text

    srv = request.getfixturevalue(which)
    loaded = srv.app.app.state.state["loaded"]
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    tok = loaded.tokenizer
    for prompt, seed in (("Line 3", 5), ("Line 1", 6), ("the quick", None)):  # 24 new tokens fit the context
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, seed=seed)
        new, reasons = complete(loaded.model, prompt_ids(tok, prompt, None, 0), max_new_tokens=24,
                                temperature=0.0, seed=seed, eos_id=tok.eos_id)
        assert r.choices[0].text.encode() == bytes(new[0]), prompt
        assert r.usage.completion_tokens == len(new[0]) and r.choices[0].finish_reason == reasons[0]
    # within the context (64): past it the server stops with "length" where the CLI slides its window
    msgs = [{"role": "user", "content": "Line 2: the quick"}]
    served = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0)
    assert served.usage.prompt_tokens + 20 <= loaded.model.config.max_seq_len
    local = "".join(stream_text(loaded, render_chat(msgs), max_new_tokens=20, temperature=0.0, top_k=None,
                                top_p=None, seed=None, stop=CHAT_STOP))
    assert served.choices[0].message.content == local


def test_n_and_stop(client):
    """n=3 returns 3 choices with indices 0..2 and usage summing their tokens; a stop string never
    appears in the text and the choice finishes with 'stop'."""
    r = client.completions.create(model="tiny", prompt="Line", max_tokens=24, temperature=1.0, n=3, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.text for c in r.choices}) >= 2  # different seeds per choice
    ref = client.completions.create(model="tiny", prompt="Line 1", max_tokens=40, temperature=0)
    text = ref.choices[0].text
    stop = text[5:7] if len(text) >= 7 else None
    if stop:
        r = client.completions.create(model="tiny", prompt="Line 1", max_tokens=40, temperature=0, stop=[stop])
        assert r.choices[0].text == text[: text.find(stop)]
        assert r.choices[0].finish_reason == "stop"
        s = list(client.completions.create(model="tiny", prompt="Line 1", max_tokens=40, temperature=0,
                                           stop=stop, stream=True))
        assert "".join(c.choices[0].text for c in s if c.choices) == text[: text.find(stop)]


def test_chat_streaming_and_not(client):
    """Chat: the streamed deltas concatenate to the non-streamed message (greedy); role is assistant;
    n=2 streams two choices; usage counts the rendered template's tokens."""
    from clusterlm.generate.text import render_chat

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Line 3?"}]
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(render_chat(msgs).encode()) + 1
    s = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=16, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == r.choices[0].message.content
    s2 = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, temperature=1, n=2,
                                             stream=True, seed=3))
    finished = {c.choices[0].index for c in s2 if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def _malformed_cases(server) -> list[tuple[str, str, dict, bytes]]:
    """(method, path, headers, body) for requests that must all get a 4xx."""
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    good = {"model": "tiny", "prompt": "Hi", "max_tokens": 4}
    cases = []
    c = "/v1/completions"
    chat = "/v1/chat/completions"
    for body in [b"{", b"not json", b'{"model": "tiny", "prompt": "Hi"', b"", b"[]", b"null", b"123",
                 b'{"model": "tiny", "prompt": "Hi", "max_tokens": 4}}', b"\xff\xfe\x00garbage",
                 b'{"model": "tiny", "prompt": "\xc3\x28"}', b'{"model": "tiny", "prompt": "\\ud800"}',
                 b"[" * 100_000]:
        cases.append(("POST", c, auth, body))
    wrong_types = [("prompt", 5), ("prompt", None), ("prompt", ["a", "b"]), ("max_tokens", "4"), ("max_tokens", 4.5),
                   ("temperature", "hot"), ("temperature", True), ("n", [1]), ("stream", "yes"), ("stop", 3),
                   ("seed", 1.5), ("model", 3), ("top_p", {}), ("stop", ["a"] * 5), ("stop", [""]),
                   ("logprobs", 6), ("presence_penalty", 0.5), ("model", "other-model")]
    numeric = {"max_tokens": [-1, 0, 65, 10**30, 1e308], "temperature": [-0.1, 2.01, 1e308, -1e308],
               "top_p": [-1, 0, 1.01, 1e308], "n": [-1, 0, 9, 17, 10**12], "seed": [-1, 2**63, 10**40],
               "presence_penalty": [-3, 3], "frequency_penalty": [-3, 3]}
    for k, vals in numeric.items():
        wrong_types += [(k, v) for v in vals]
    for k, v in wrong_types:
        for path in (c, chat):
            body = dict(good) if path == c else {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                                                 "max_tokens": 4}
            if k == "prompt" and path == chat:
                continue
            body[k] = v
            cases.append(("POST", path, auth, json.dumps(body).encode()))
    for extra in ({"foo": 1}, {"best_of": 2}, {"messages": []}):
        cases.append(("POST", c, auth, json.dumps({**good, **extra}).encode()))
    for msgs in ([], [{"role": "robot", "content": "x"}], [{"role": "user"}], [{"role": "user", "content": 5}],
                 "hello", [{"role": "user", "content": "x", "extra": 1}]):
        cases.append(("POST", chat, auth, json.dumps({"model": "tiny", "messages": msgs}).encode()))
    cases.append(("POST", c, auth, json.dumps({**good, "prompt": "x" * 200}).encode()))  # > 64-token context
    cases.append(("POST", c, auth, json.dumps({**good, "prompt": "x" * (10 << 20)}).encode()))  # 10 MB body
    for h in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {KEY.upper()}"},
              {"Authorization": f"bearer{KEY}"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"},
              {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Bearer {KEY[:-1]}"}):
        for path in (c, chat, "/v1/models", "/metrics", "/nope"):
            cases.append(("POST" if path.endswith("completions") else "GET", path,
                          {**h, "Content-Type": "application/json"}, json.dumps(good).encode()))
    cases.append(("GET", c, auth, b""))  # wrong method
    cases.append(("POST", "/v1/nope", auth, b"{}"))
    cases.append(("GET", "/v1/models", {**auth, "X-Big": "y" * 20_000}, b""))  # header cap
    return cases


def test_malformed_requests_all_get_4xx(server):
    """Every malformed request gets a 4xx (none a 5xx), with an OpenAI-style error naming the
    field and range where one is at fault; /health stays 200; a valid request afterwards succeeds."""
    cases = _malformed_cases(server)
    statuses = []
    with httpx.Client(base_url=server.url, timeout=30) as h:
        for method, path, headers, body in cases:
            try:
                r = h.request(method, path, headers=headers, content=body)
                statuses.append((r.status_code, path, body[:80], r.text[:200]))
            except httpx.HTTPError as e:  # the server may close the socket on an oversized header
                statuses.append((400 if "X-Big" in headers else 599, path, body[:80], repr(e)))
            assert h.get("/health").status_code == 200
        bad = [s for s in statuses if not 400 <= s[0] < 500]
        assert not bad, bad[:5]
        assert len(statuses) == len(cases) > 140
        r = h.post("/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tiny", "prompt": "x", "temperature": 5})
        assert r.status_code == 422 and "temperature" in r.text and "[0.0, 2.0]" in r.text
        r = h.post("/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tiny", "prompt": "x" * 200})
        assert r.status_code == 400 and "201 tokens" in r.text and "64 tokens" in r.text
        r = h.post("/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tiny", "prompt": "x", "max_tokens": 65})
        assert r.status_code == 400 and "[1, 64]" in r.text
        r = h.post("/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tiny", "prompt": "Line", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4
        assert h.get("/health").status_code == 200
    m = server.metrics()
    assert m.get('clusterlm_http_requests_total{route="/v1/completions",status="500"}', 0) == 0


def test_disconnects_free_slots(lstm_server):
    """20 concurrent streams of up to 4000 tokens closed after 5 tokens each: the running-sequences
    gauge is 0 within 1 s, exactly 20 sequences are counted as cancelled (none finished on its
    own), the 20 requests are counted as 200s, and the generated-token counter covers what the
    clients saw (tokens sampled after a client left but before the server noticed count too).
    Then one non-streaming client that times out: its sequence is cancelled within 1 s as well."""
    server = lstm_server
    before = server.metrics()
    seen = 0
    body = {"model": "tiny", "prompt": "Line", "max_tokens": 4000, "temperature": 0.8, "seed": 5, "stream": True}

    def one() -> int:
        got = 0
        with httpx.Client(timeout=30) as h:
            with h.stream("POST", server.url + "/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        # characters, not UTF-8 bytes: each came from at least one token (a stray
                        # byte >= 0x80 arrives as one U+FFFD, three bytes in UTF-8)
                        got += len(json.loads(line[6:])["choices"][0]["text"])
                        if got >= 5:
                            break  # leaving the block closes the connection
        return got

    results: list[int | BaseException] = []

    def run_one() -> None:
        try:
            results.append(one())
        except BaseException as e:  # reported by the asserts below, not lost in a thread
            results.append(e)

    threads = [threading.Thread(target=run_one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20 and all(isinstance(r, int) and r >= 5 for r in results), results
    seen = sum(results)
    t_closed = time.time()
    while time.time() - t_closed < 1.0 and server.metrics()["clusterlm_running_sequences"] != 0:
        time.sleep(0.02)
    after = server.metrics()
    assert after["clusterlm_running_sequences"] == 0
    assert after["clusterlm_queue_depth"] == 0
    key = 'clusterlm_sequences_finished_total{reason="cancelled"}'
    assert after.get(key, 0) - before.get(key, 0) == 20
    for reason in ("stop", "length"):
        k = f'clusterlm_sequences_finished_total{{reason="{reason}"}}'
        assert after.get(k, 0) == before.get(k, 0)
    ok = 'clusterlm_http_requests_total{route="/v1/completions",status="200"}'
    assert after[ok] - before.get(ok, 0) == 20
    gen = after["clusterlm_generated_tokens_total"] - before["clusterlm_generated_tokens_total"]
    assert seen <= gen < 20 * 4000

    # a non-streaming client that gives up (read timeout) is noticed by polling: its slot is freed too
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/completions", json={**body, "stream": False},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
    t_closed = time.time()
    while time.time() - t_closed < 1.0 and server.metrics()["clusterlm_running_sequences"] != 0:
        time.sleep(0.02)
    final = server.metrics()
    assert final["clusterlm_running_sequences"] == 0
    assert final[key] - after[key] == 1


def test_queue_full_answers_429(llama_run):
    """With max_batch=1 and max_queue=1, 16 simultaneous requests: those beyond the running one and
    the queued one get 429 with Retry-After >= 1 and a rate_limit_error; the rest complete with
    64 tokens or EOS; the 429 counter equals the 429s the clients saw."""
    srv = Server(llama_run, max_batch=1, max_queue=1, max_new_tokens_limit=64)
    try:
        body = {"model": "tiny", "prompt": "Line", "max_tokens": 64, "temperature": 1.0}
        hdr = {"Authorization": f"Bearer {KEY}"}
        out: list = []
        go = threading.Event()

        def one() -> None:
            with httpx.Client(timeout=60) as h:
                go.wait()
                out.append(h.post(srv.url + "/v1/completions", json=body, headers=hdr))

        threads = [threading.Thread(target=one) for _ in range(16)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        go.set()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in out)
        assert set(codes) == {200, 429} and codes.count(200) >= 2, codes
        for r in out:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1
                assert r.json()["error"]["type"] == "rate_limit_error"
            else:
                assert r.json()["usage"]["completion_tokens"] >= 1
        m = srv.metrics()
        assert m['clusterlm_http_requests_total{route="/v1/completions",status="429"}'] == codes.count(429)
    finally:
        srv.stop()


def test_lstm_checkpoint_serves(lstm_server):
    """An LSTM checkpoint serves through the same scheduler: n=2 greedy choices are equal and match
    a single greedy completion of the same prompt."""
    c = openai.OpenAI(base_url=lstm_server.url + "/v1", api_key=KEY, max_retries=0, timeout=30)
    r = c.completions.create(model="tiny", prompt="Line 2", max_tokens=20, temperature=0, n=2)
    one = c.completions.create(model="tiny", prompt="Line 2", max_tokens=20, temperature=0)
    assert r.choices[0].text == r.choices[1].text == one.choices[0].text
    assert r.usage.completion_tokens == 2 * one.usage.completion_tokens


def test_model_error_fails_requests_and_frees_slots(server, client):
    """If the model raises inside the decode loop, the request gets a 500 server_error (not a hang),
    the slots are freed (running gauge 0) and the next request succeeds."""
    sched = server.app.app.state.state["sched"]

    def broken(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("boom")

    sched.engine.prefill = sched.engine.decode = broken  # the engine's forward passes (instance attributes)
    try:
        r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "tiny", "prompt": "Line", "max_tokens": 8}, timeout=30)
    finally:
        del sched.engine.prefill, sched.engine.decode
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    assert "boom" not in r.text  # internals stay in the server log
    assert server.metrics()["clusterlm_running_sequences"] == 0
    assert sched.cache.num_free == sched.max_batch
    ok = client.completions.create(model="tiny", prompt="Line", max_tokens=4, temperature=0)
    assert ok.usage.completion_tokens >= 1


def test_ready_waits_for_load_and_cli_binds_loopback(llama_run, tmp_path):
    """/health is 200 and /ready 503 (with Retry-After) while the model loads, /ready 200 after; and
    `clusterlm serve` run as a command binds 127.0.0.1 by default, reads the key file, and answers
    a completion (the key never appears in its output)."""
    import uvicorn

    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.serve.app import Settings, create_app

    gate = threading.Event()

    def slow_load():  # noqa: ANN202
        gate.wait(30)
        return load_for_inference(llama_run)

    port = _free_port()
    app = create_app(slow_load, Settings(api_key=KEY, model_name="tiny"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, http="h11", log_level="warning"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 20
        while True:
            try:
                h = httpx.get(url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                assert time.time() < deadline
                time.sleep(0.05)
        r = httpx.get(url + "/ready")
        assert (h.status_code, r.status_code, r.headers["Retry-After"]) == (200, 503, "1")
        c = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x"},
                       headers={"Authorization": f"Bearer {KEY}"})
        assert c.status_code == 503
        gate.set()
        deadline = time.time() + 30
        while httpx.get(url + "/ready").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.05)
    finally:
        gate.set()
        server.should_exit = True
        t.join(timeout=10)

    key_file = tmp_path / "key"
    key_file.write_text("cli-key-abcdef\n")
    port = _free_port()
    log_file = tmp_path / "serve.log"
    with open(log_file, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "clusterlm", "serve", str(llama_run), "--port", str(port),
                                 "--api-key-file", str(key_file), "--model-name", "m"], stdout=log, stderr=log)
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.time() < deadline, log_file.read_text()[-2000:]
            time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", headers={"Authorization": "Bearer cli-key-abcdef"},
                       json={"model": "m", "prompt": "Line", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
        bad = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    out = log_file.read_text()
    assert f"http://127.0.0.1:{port}" in out
    assert "cli-key-abcdef" not in out


# ---- the chat page in headless Chromium --------------------------------------------------------------
# Driven over the DevTools protocol on a pipe (--remote-debugging-pipe: NUL-separated JSON on fds 3/4),
# so no extra packages; skipped when Debian's chromium is not installed.
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """Chromium with the DevTools protocol on a pipe; `call` sends one command and waits for its reply."""

    def __init__(self, profile: str) -> None:
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def fds() -> None:  # child: the protocol pipe must be fds 3 (read) and 4 (write)
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            preexec_fn=fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.session: str | None = None

    def call(self, method: str, params: dict | None = None, *, session: bool = True, timeout: float = 30) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while time.time() < deadline:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply["result"]
            self._buf += os.read(self._r, 1 << 16)
        raise TimeoutError(method)

    def eval(self, expr: str):  # noqa: ANN201
        r = self.call("Runtime.evaluate", {"expression": expr, "awaitPromise": True, "returnByValue": True})
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")

    def close(self) -> None:
        """Browser.close, so that Chromium removes its /tmp/org.chromium.Chromium.* singleton folder
        (a SIGKILL leaves one behind per run); killed if it has not exited within 10 s."""
        try:
            os.write(self._w, json.dumps({"id": self._id + 1, "method": "Browser.close"}).encode() + b"\0")
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self._w)
        os.close(self._r)



@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_chat_page_streams_a_reply(server, tmp_path):
    """The page loads without a key (static), lists the model once the key is typed, and a sent
    message produces an assistant reply whose text the DOM shows growing over several updates,
    ending with the [DONE] marker; the server counts one more 200 chat request."""
    assert httpx.get(server.url + "/").status_code == 200
    chat_ok = 'clusterlm_http_requests_total{route="/v1/chat/completions",status="200"}'
    before = server.metrics().get(chat_ok, 0)
    dt = DevTools(str(tmp_path / "profile"))
    try:
        target = dt.call("Target.createTarget", {"url": server.url + "/"}, session=False)["targetId"]
        dt.session = dt.call("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
        dt.call("Runtime.enable")
        deadline = time.time() + 20
        while dt.eval("document.readyState") != "complete" or not dt.eval("!!document.getElementById('send')"):
            assert time.time() < deadline, "page did not load"
            time.sleep(0.1)
        models = dt.eval(f"(async () => {{ document.getElementById('key').value = {json.dumps(KEY)}; "
                         "await loadModels(); "
                         "return [...document.getElementById('model').options].map(o => o.value); })()")
        assert models == ["tiny"]
        dt.eval("""window.__seen = [];
            new MutationObserver(() => { const r = document.getElementById('reply-1');
              if (r) window.__seen.push(r.textContent); }).observe(document.getElementById('log'),
              {subtree: true, childList: true, characterData: true});
            document.getElementById('max').value = '48'; document.getElementById('temp').value = '0';
            document.getElementById('msg').value = 'Line 5?';
            document.getElementById('send').click(); true""")
        deadline = time.time() + 30
        while dt.eval("(document.getElementById('reply-1') || {dataset: {}}).dataset.done") != "1":
            assert time.time() < deadline, dt.eval("document.getElementById('log').textContent")
            time.sleep(0.1)
        seen = dt.eval("window.__seen")
        final = dt.eval("document.getElementById('reply-1').textContent")
        cls = dt.eval("document.getElementById('reply-1').className")
    finally:
        dt.close()
    assert cls == "assistant" and final.startswith("Assistant: ")
    assert len(final) > len("Assistant: ")
    grew = sorted({len(s) for s in seen if s.startswith("Assistant: ")})
    assert len(grew) >= 3, seen  # several streamed updates, not one final write
    assert server.metrics()[chat_ok] == before + 1


# ---- scheduler pieces (pure) -------------------------------------------------------------------------
def test_sample_rows_seeded_and_distributed():
    """The engine's sampler as the server drives it (sampling.sample_rows, one generator per row): a
    seeded row draws the same tokens whatever rows share its batch; greedy rows take the argmax;
    over 4000 draws the frequencies match softmax(logits / T) within 0.03; top_p keeps only the
    nucleus (the smallest set with mass >= p)."""
    import torch

    from clusterlm.generate.sampling import sample_rows
    from clusterlm.serve.scheduler import SamplingParams

    def _sample_rows(x, params, gens):  # noqa: ANN001, ANN202
        return sample_rows(x, [q.row for q in params], gens).tolist()

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = SamplingParams(max_tokens=1, temperature=0.7)

    def draws(batch_rows: int, seed: int) -> list[int]:
        g = [torch.Generator().manual_seed(seed)]
        g += [torch.Generator().manual_seed(99 + i) for i in range(batch_rows - 1)]
        out = []
        for _ in range(50):
            x = torch.cat([logits, torch.randn(batch_rows - 1, 4)])
            out.append(_sample_rows(x, [p] * batch_rows, g)[0])
        return out

    assert draws(1, 3) == draws(5, 3)
    assert _sample_rows(torch.tensor([[0.0, 3.0, 1.0]]), [SamplingParams(max_tokens=1, temperature=0)], [None]) == [1]
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([_sample_rows(logits, [p], [g])[0] for _ in range(4000)]), minlength=4)
    torch.testing.assert_close(counts / 4000, torch.softmax(logits[0] / 0.7, -1), atol=0.03, rtol=0)
    nucleus = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.7)  # probs .64 .24 .09 .03 -> {0, 1}
    seen = {_sample_rows(logits, [nucleus], [g])[0] for _ in range(300)}
    assert seen == {0, 1}


def test_holdback_of_stop_prefixes():
    """_holdback returns the longest suffix of the text that is a proper prefix of a stop string."""
    from clusterlm.generate.text import _holdback

    assert _holdback("hello wor", ("world",)) == 3
    assert _holdback("hello", ("world",)) == 0
    assert _holdback("abc\nUs", ("\nUser:", "cx")) == 3
    assert _holdback("x", ("x",)) == 0  # a whole stop string is found by the search, not held back


def test_sse_events_survive_line_splitting_clients():
    """Generated text may hold U+0085, U+2028 or U+2029, which JSON leaves raw but str.splitlines
    (httpx's aiter_lines) and some JavaScript parsers take for line ends: _sse escapes them, so each
    event stays one line and decodes to the same text (one cut stream in benchmarks/serve_failover.py
    was such a split line, not a cut)."""
    from clusterlm.serve.app import _sse

    text = "a\x85b\u2028c\u2029d \u00e9\t\n\x1c"
    lines = _sse({"text": text}).decode().splitlines()
    assert lines[1:] == [""] and lines[0].startswith("data: ")
    assert json.loads(lines[0][6:]) == {"text": text}
