"""The chat page (clusterlm/serve/static/index.html) in headless Chromium, driven over the DevTools
protocol (tests/e2e/test_serve.py's DevTools: a pipe, no extra packages), against a live server over a
seeded random-weights byte-level Llama with a 64-token context (tests/helpers.py random_checkpoint)
whose forward pass the test can slow down or make fail.

Chromium missing: skipped with the reason locally, a failure in CI (CI=true), where
scripts/system-deps.sh installs it. A screenshot is saved as the test's artefact:
benchmarks/results/chat_page.png (and the pytest tmp dir), the path printed.
"""

from __future__ import annotations

import base64
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.e2e.test_serve import CHROMIUM, KEY, DevTools, Server
from tests.helpers import random_checkpoint

httpx = pytest.importorskip("httpx2")

SCREENSHOT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "chat_page.png"
TEXT = "the quick brown fox jumps over the lazy dog. " * 20
CHAT_200 = 'clusterlm_http_requests_total{route="/v1/chat/completions",status="200"}'
CHAT_400 = 'clusterlm_http_requests_total{route="/v1/chat/completions",status="400"}'
CANCELLED = 'clusterlm_sequences_finished_total{reason="cancelled"}'
LOG_TEXT = "document.getElementById('log').textContent"


class Knobs:
    """Set by the test, read by the model's forward: seconds of sleep per call, a countdown of calls
    after which it raises (a model error in the middle of a reply), and `endless`: EOS and newline
    (so the plain template's "\nUser:" stop string too) never sampled, so a reply runs to its limit."""

    delay = 0.0
    fail_in: int | None = None
    endless = False


def _instrumented_load(run: Path, load_for_inference):  # noqa: ANN001, ANN202
    loaded = load_for_inference(run)
    forward = loaded.model.forward

    def slow_or_failing(*args, **kwargs):  # noqa: ANN202
        if Knobs.fail_in is not None:
            Knobs.fail_in -= 1
            if Knobs.fail_in < 0:
                Knobs.fail_in = None
                raise RuntimeError("injected fault")
        if Knobs.delay:
            time.sleep(Knobs.delay)
        out = forward(*args, **kwargs)
        if Knobs.endless:
            out[..., [10, loaded.tokenizer.eos_id]] = float("-inf")  # byte tokenizer: 10 is "\n"
        return out

    loaded.model.forward = slow_or_failing
    return loaded


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import clusterlm.checkpoint.model_io as model_io

    run = random_checkpoint(tmp_path_factory.mktemp("chatpage"), "byte", TEXT, bpe_vocab=0, n_layers=2, context=64)
    real = model_io.load_for_inference
    model_io.load_for_inference = lambda path, **kw: _instrumented_load(path, real)  # Server's load() calls it
    try:
        srv = Server(run, max_batch=4, max_queue=8, max_new_tokens_limit=64)
    finally:
        model_io.load_for_inference = real
    yield srv
    srv.stop()


def _browser(tmp_path: Path) -> DevTools:
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":  # CI installs it (scripts/system-deps.sh): never skip there
            pytest.fail("chromium is not installed; scripts/system-deps.sh installs it in CI")
        pytest.skip("chromium is not installed (apt-get install -y chromium, or bash scripts/system-deps.sh)")
    return DevTools(str(tmp_path / "profile"))


def _wait(dt: DevTools, expr: str, what: str, timeout: float = 30) -> object:
    deadline = time.time() + timeout
    while True:
        got = dt.eval(expr)
        if got:
            return got
        assert time.time() < deadline, f"{what}; log: {dt.eval(LOG_TEXT)}"
        time.sleep(0.05)


def _open(dt: DevTools, url: str) -> None:
    target = dt.call("Target.createTarget", {"url": url}, session=False)["targetId"]
    dt.session = dt.call("Target.attachToTarget", {"targetId": target, "flatten": True}, session=False)["sessionId"]
    dt.call("Runtime.enable")
    dt.call("Emulation.setDeviceMetricsOverride", {"width": 1000, "height": 1100, "deviceScaleFactor": 1,
                                                   "mobile": False})
    _wait(dt, "document.readyState === 'complete' && !!document.getElementById('send')", "page did not load")


def _key(dt: DevTools, shift: bool = False) -> None:
    """Enter (or Shift+Enter) typed into the focused element, as a user's keyboard sends it."""
    ev = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "modifiers": 8 if shift else 0}
    dt.call("Input.dispatchKeyEvent", {"type": "keyDown", "text": "\r", **ev})
    dt.call("Input.dispatchKeyEvent", {"type": "keyUp", **ev})


def _send(dt: DevTools, text: str) -> dict:
    """Type `text` and press Enter; returns the buttons' state right after (the request is running)."""
    dt.eval("document.getElementById('msg').focus(); true")
    dt.call("Input.insertText", {"text": text})
    _key(dt)
    return dt.eval("({send: document.getElementById('send').disabled, stop: document.getElementById('stop').disabled})")


def _idle(dt: DevTools) -> None:
    _wait(dt, "!document.getElementById('send').disabled && document.getElementById('stop').disabled",
          "the page stayed busy")


def test_chat_page(server, tmp_path):
    """Several turns on a 64-token model: the key typed once and kept for the session (a reload finds
    it), the context learned from /v1/models, Enter sends and Shift+Enter is a newline, Send disabled
    and Stop enabled while streaming, a system prompt sent first; history trimmed oldest-first with a
    note (by the page's estimate, and by retrying after a 400 'too long' when the estimate is off),
    every trimmed request answered 200; Stop mid-reply frees the server's slot (cancelled counted,
    0 running); a model error mid-stream and a message too long for the context are shown as errors;
    HTML in a message stays text (no <script>/<img> element, nothing runs) while Markdown renders;
    New chat clears everything. A screenshot is saved."""
    dt = _browser(tmp_path)
    try:
        _open(dt, server.url + "/")
        # the key, kept in sessionStorage: a reload loads the models without typing it again
        dt.eval("document.getElementById('key').focus(); true")
        dt.call("Input.insertText", {"text": KEY})
        dt.eval("document.getElementById('key').dispatchEvent(new Event('change')); true")
        _wait(dt, "document.getElementById('model').value === 'tiny'", "models not listed")
        dt.eval("location.reload(); true")
        time.sleep(0.3)
        _wait(dt, "document.readyState === 'complete' && document.getElementById('model').value === 'tiny'",
              "the key was not kept across a reload")
        assert dt.eval("document.getElementById('key').value") == KEY
        assert dt.eval("context") == 64 and "64 tokens" in dt.eval("document.getElementById('ctx').textContent")

        # turn 1: Shift+Enter inserts a newline, Enter sends; a system prompt goes first
        Knobs.delay = 0.02
        dt.eval("""document.getElementById('max').value = '12'; document.getElementById('temp').value = '0';
                   document.getElementById('system').value = 'Be brief.'; true""")
        dt.eval("document.getElementById('msg').focus(); true")
        dt.call("Input.insertText", {"text": "Hi"})
        _key(dt, shift=True)
        state = _send(dt, "you")
        assert state == {"send": True, "stop": False}  # while streaming
        _wait(dt, "(document.getElementById('reply-1') || {dataset: {}}).dataset.done === '1'", "no reply 1")
        _idle(dt)
        sent = dt.eval("lastSent")
        assert sent["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\nyou"}]
        assert dt.eval("document.getElementById('msg').value") == ""
        assert dt.eval("document.getElementById('reply-1').textContent").startswith("Assistant: ")

        # turns 2 and 3: the conversation no longer fits; the oldest turns are left out, with a note
        before = server.metrics()
        for i, text in ((2, "And then?"), (3, "Why so?")):
            _send(dt, text)
            _wait(dt, f"(document.getElementById('reply-{i}') || {{dataset: {{}}}}).dataset.done === '1'",
                  f"no reply {i}")
            _idle(dt)
            sent = dt.eval("lastSent")
            assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
            assert sent["messages"][1]["role"] == "user" and sent["messages"][-1] == {"role": "user", "content": text}
            assert len(sent["messages"]) < 2 * i  # not the whole history (system + 2 (i - 1) + 1 messages)
        notes = dt.eval("[...document.querySelectorAll('#log .note')].map(n => n.textContent)")
        trims = [n for n in notes if "left out" in n]
        assert trims and all("left out to fit the model's 64-token context" in n for n in trims), notes
        assert dt.eval("document.querySelectorAll('#log .left-out').length") >= 2
        after = server.metrics()
        assert after[CHAT_200] - before.get(CHAT_200, 0) == 2

        # trimmed exactly (POST /tokenize): the prompt sent leaves the reserved 12 tokens for the reply
        count = httpx.post(server.url + "/tokenize", json={"model": "tiny", "messages": sent["messages"]},
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()["count"]
        assert count + 12 <= 64, (count, sent)

        # without /tokenize (a server or proxy that lacks it) and with the estimate made wrong on purpose:
        # the page sends too much, gets 400 'too long', trims, retries
        dt.eval("exactCounts = false; tokensPerChar = 0.01; true")
        _send(dt, "Ok.")
        _wait(dt, "(document.getElementById('reply-4') || {dataset: {}}).dataset.done === '1'", "no reply 4")
        _idle(dt)
        again = server.metrics()
        assert again.get(CHAT_400, 0) - after.get(CHAT_400, 0) >= 1
        assert again[CHAT_200] - after[CHAT_200] == 1
        dt.eval("exactCounts = true; true")

        # Stop mid-reply: the fetch is aborted, the server notices and frees the slot
        Knobs.delay, Knobs.endless = 0.15, True  # ~30 tokens to the context's end: >= 4.5 s, stopped first
        dt.eval("document.getElementById('max').value = '40'; true")
        base = server.metrics()
        _send(dt, "Go on")
        _wait(dt, "(document.getElementById('reply-5') || {textContent: ''}).textContent.length > 'Assistant: '.length",
              "reply 5 did not start")
        dt.eval("document.getElementById('stop').click(); true")
        t_stop = time.time()
        _idle(dt)
        assert dt.eval("document.getElementById('reply-5').dataset.stopped") == "1"
        assert dt.eval("document.getElementById('reply-5').dataset.done") is None
        # the running gauge is set once per step (a step here is >= 0.15 s), so wait for the counter
        deadline = time.time() + 5
        while time.time() < deadline:
            m = server.metrics()
            if m.get(CANCELLED, 0) > base.get(CANCELLED, 0) and m["clusterlm_running_sequences"] == 0:
                break
            time.sleep(0.05)
        assert m["clusterlm_running_sequences"] == 0
        assert m.get(CANCELLED, 0) - base.get(CANCELLED, 0) == 1  # the stopped reply's sequence, nothing else
        assert time.time() - t_stop < 2  # noticed within a few steps of the click
        Knobs.delay, Knobs.endless = 0.02, False
        dt.eval("document.getElementById('max').value = '12'; true")

        # a model error in the middle of the reply: the error event is shown
        Knobs.fail_in = 4
        _send(dt, "Fail?")
        _wait(dt, "[...document.querySelectorAll('#log .error')].some(e => e.textContent.includes('internal error'))",
              "mid-stream error not shown")
        _idle(dt)
        # one message too long for the 64-token context even alone: the server's 400 is shown
        _send(dt, "x" * 80)
        _wait(dt, "[...document.querySelectorAll('#log .error')].some(e => /the prompt is \\d+ tokens/.test(e.textContent))",
              "the 'too long' error not shown")
        _idle(dt)

        # HTML stays text; Markdown renders (no system prompt: the payload alone nearly fills the context)
        dt.eval("document.getElementById('system').value = ''; true")
        payload = "<img src=x onerror=__pwned=1> **b** `<i>`"
        _send(dt, payload)
        _wait(dt, "(document.getElementById('reply-7') || {dataset: {}}).dataset.done === '1'", "no reply 7")
        _idle(dt)
        users = dt.eval("[...document.querySelectorAll('#log .user')].map(u => u.textContent)")
        assert any("<img src=x onerror=__pwned=1>" in u for u in users), users
        assert dt.eval("document.querySelectorAll('#log img, #log script, #log [onerror]').length") == 0
        assert dt.eval("[...document.querySelectorAll('#log .user strong')].map(e => e.textContent)") == ["b"]
        assert dt.eval("[...document.querySelectorAll('#log .user code')].map(e => e.textContent)") == ["<i>"]
        rendered = dt.eval("renderMarkdown('<script>window.__pwned=2</script>\\n```\\n<b onclick=x>hi</b>\\n```\\n"
                           "- *one*\\n- two\\n\\n1. __x__')")
        assert rendered == ("<p>&lt;script&gt;window.__pwned=2&lt;/script&gt;</p>"
                            "<pre><code>&lt;b onclick=x&gt;hi&lt;/b&gt;</code></pre>"
                            "<ul><li><em>one</em></li><li>two</li></ul><ol><li><strong>x</strong></li></ol>")
        assert dt.eval("window.__pwned") is None

        shot = dt.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        png = base64.b64decode(shot["data"])
        (tmp_path / "chat_page.png").write_bytes(png)
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / "chat_page.png", SCREENSHOT)
        print(f"chat page screenshot: {SCREENSHOT} ({len(png)} bytes; also {tmp_path / 'chat_page.png'})")
        assert png[:8] == b"\x89PNG\r\n\x1a\n"

        # New chat: the log and the history are empty
        dt.eval("document.getElementById('new').click(); true")
        assert dt.eval("[document.getElementById('log').children.length, turns.length]") == [0, 0]
        _send(dt, "Hello again")
        _wait(dt, "(document.getElementById('reply-8') || {dataset: {}}).dataset.done === '1'", "no reply 8")
        assert dt.eval("lastSent")["messages"] == [{"role": "user", "content": "Hello again"}]  # no system prompt now
    finally:
        Knobs.delay, Knobs.fail_in, Knobs.endless = 0.0, None, False
        dt.close()
    assert not [k for k in server.metrics() if 'status="5' in k and "/ready" not in k]  # no 5xx answered


def test_chat_page_edges(server, tmp_path):
    """What a user found by hand: Stop before the first token leaves no unanswered message in the
    history (a template that needs alternating roles would refuse every later turn); a message
    refused with 400 after a good turn is greyed like the first; a key a browser cannot send (curly
    quotes from a paste) is named instead of failing silently; a page that listed the model while it
    was loading (no context yet) learns the context from /tokenize and never says "null-token"; a
    reply cut at max tokens says so."""
    dt = _browser(tmp_path)
    h = {"Authorization": f"Bearer {KEY}"}
    try:
        _open(dt, server.url + "/")
        dt.eval("document.getElementById('key').focus(); true")
        dt.call("Input.insertText", {"text": "\u201c" + KEY + "\u201d"})
        _send(dt, "Hi")
        _wait(dt, "[...document.querySelectorAll('#log .error')].some(e => e.textContent.includes('curly quotes'))",
              "an unsendable key was not named")
        _idle(dt)
        dt.eval(f"document.getElementById('key').value = {KEY!r}; sessionStorage.clear(); true")
        dt.eval("document.getElementById('log').innerHTML = ''; document.getElementById('msg').value = ''; true")
        dt.eval("document.getElementById('max').value = '8'; document.getElementById('temp').value = '0'; true")

        # as if listed while loading: no context known; the first send learns it
        _send(dt, "Hi")
        _wait(dt, "(document.getElementById('reply-1') || {dataset: {}}).dataset.done === '1'", "no reply 1")
        _idle(dt)
        dt.eval("context = null; document.getElementById('model').selectedOptions[0].dataset.context = ''; "
                "document.getElementById('ctx').textContent = ''; true")
        for i in (2, 3):
            _send(dt, "Tell me more about it")
            _wait(dt, f"(document.getElementById('reply-{i}') || {{dataset: {{}}}}).dataset.done === '1'", f"no reply {i}")
            _idle(dt)
        assert dt.eval("context") == 64 and "64 tokens" in dt.eval("document.getElementById('ctx').textContent")
        assert "null" not in dt.eval(LOG_TEXT)
        assert dt.eval("document.getElementById('reply-3').dataset.cut") == "1"  # 8 tokens, no EOS: cut
        assert "the reply was cut off: it reached max tokens (8)" in dt.eval(LOG_TEXT)

        # Stop before the first token: nothing of that exchange stays in the history
        n_turns = dt.eval("turns.length")
        Knobs.delay = 1.5
        _send(dt, "Slow?")
        _wait(dt, "!!document.getElementById('reply-4')", "the reply did not start")
        dt.eval("document.getElementById('stop').click(); true")
        _idle(dt)
        Knobs.delay = 0.0
        assert dt.eval("document.getElementById('reply-4').dataset.stopped") == "1"
        assert dt.eval("turns.length") == n_turns and "stopped before the reply started" in dt.eval(LOG_TEXT)
        assert dt.eval("[...document.querySelectorAll('#log .user')].pop().classList.contains('left-out')")
        _send(dt, "Again")
        _wait(dt, "(document.getElementById('reply-5') || {dataset: {}}).dataset.done === '1'", "no reply 5")
        _idle(dt)
        roles = [m["role"] for m in dt.eval("lastSent")["messages"]]
        assert all(a != b for a, b in zip(roles, roles[1:])), roles  # user and assistant alternate

        # a 400 after good turns: the refused message is greyed and not sent again
        dt.eval("document.getElementById('max').value = '100'; true")  # over the server's limit of 64
        _send(dt, "Too much")
        _wait(dt, "[...document.querySelectorAll('#log .error')].some(e => e.textContent.includes('max_tokens=100'))",
              "the 400 was not shown")
        _idle(dt)
        assert dt.eval("[...document.querySelectorAll('#log .user')].pop().classList.contains('left-out')")
        assert dt.eval("turns.every(t => t.content !== 'Too much')")
    finally:
        Knobs.delay, Knobs.fail_in, Knobs.endless = 0.0, None, False
        dt.close()
    assert httpx.get(server.url + "/v1/models", headers=h, timeout=10).status_code == 200
