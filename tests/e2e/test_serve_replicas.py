"""`clusterlm serve` as a replica: SIGTERM drain, --api-key-env, --instance-id, --metrics-port, and
Debian's HAProxy in front of two replicas (deploy/haproxy/haproxy.cfg) with one killed.

Servers run as child processes on a random-weights byte-level Transformer (tests/helpers.py), so
greedy decoding never meets EOS and a stream's length is set by max_tokens. The HAProxy tests
skip without `haproxy` (apt-get install -y haproxy), except in CI (CI=true), where they fail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clusterlm.errors import EXIT_PREEMPTED, EXIT_USAGE
from tests.helpers import console_script, random_checkpoint, require_binary, signal_on_import, wait_for_ready

httpx = pytest.importorskip("httpx2")

ROOT = Path(__file__).resolve().parents[2]
KEY = "replica-key-0123"
TEXT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(100))


def _bench():
    """benchmarks/serve_failover.py: the HAProxy config renderer, stats reader and replica runner."""
    spec = importlib.util.spec_from_file_location("serve_failover", ROOT / "benchmarks" / "serve_failover.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _require(binary: str) -> str:
    return require_binary(binary)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("replica"), "byte", TEXT, bpe_vocab=0, n_layers=2, context=2048)


class _Proc:
    """`clusterlm serve` in a child process with the key in CLUSTERLM_TEST_KEY (--api-key-env)."""

    def __init__(self, run: Path, tmp: Path, *extra: str) -> None:
        bench = _bench()
        self.port, self.metrics_port = bench.free_port(), bench.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"serve-{self.port}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "clusterlm", "serve", str(run), "--port", str(self.port),
                 "--api-key-env", "CLUSTERLM_TEST_KEY", "--model-name", "m", "--metrics-port", str(self.metrics_port),
                 "--max-new-tokens-limit", "2000", *extra],
                stdout=log, stderr=log, env={**os.environ, "CLUSTERLM_TEST_KEY": KEY})
        wait_for_ready(self.proc, self.url, self.log_path, timeout=90)

    def log(self) -> str:
        return self.log_path.read_text()

    def stream(self, max_tokens: int, out: dict) -> None:
        """One greedy streaming completion; `out` gets its events, whether [DONE] came, and when."""
        out.update(events=[], done=False)
        body = {"model": "m", "prompt": "hi", "max_tokens": max_tokens, "temperature": 0, "stream": True}
        with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    out["done"] = True
                elif line.startswith("data: "):
                    out["events"].append(json.loads(line[6:]))
        out["t_end"] = time.time()


def _start_stream(srv: _Proc, max_tokens: int) -> tuple[threading.Thread, dict]:
    out: dict = {}
    t = threading.Thread(target=srv.stream, args=(max_tokens, out), daemon=True)
    t.start()
    deadline = time.time() + 20
    while len(out.get("events", [])) < 5:  # the stream is running
        assert time.time() < deadline, out
        time.sleep(0.02)
    return t, out


def test_sigterm_drains_a_running_stream_then_exits_0(run, tmp_path):
    """SIGTERM mid-stream (Kubernetes' and HAProxy-fronted replicas' way to stop a pod): /ready is 503
    within 0.5 s, a new completion is 503 with Retry-After (what HAProxy's retry-on 503 resends
    elsewhere), /health stays 200, the running stream still ends with finish_reason "length" after
    exactly max_tokens tokens and [DONE] with no error event, and the process exits 0. Also: the key
    came from --api-key-env, every log line carries --instance-id, and --metrics-port serves
    /metrics without the key (clusterlm_instance_info names the id) while the main port wants it."""
    srv = _Proc(run, tmp_path, "--instance-id", "test-r1")
    hdr = {"Authorization": f"Bearer {KEY}"}
    # metrics port: key-free, /metrics only; main port: key required
    m = httpx.get(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5)
    assert m.status_code == 200 and 'clusterlm_instance_info{instance_id="test-r1",model="m"' in m.text
    assert httpx.get(f"http://127.0.0.1:{srv.metrics_port}/v1/models", timeout=5).status_code == 404
    assert httpx.head(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=5).status_code == 200
    assert httpx.get(srv.url + "/metrics", timeout=5).status_code == 401
    assert httpx.get(srv.url + "/v1/models", headers=hdr, timeout=5).headers["x-clusterlm-instance"] == "test-r1"

    t, out = _start_stream(srv, max_tokens=1200)
    t_term = time.time()
    srv.proc.send_signal(signal.SIGTERM)
    ready = None
    while time.time() - t_term < 0.5:
        ready = httpx.get(srv.url + "/ready", timeout=2)
        if ready.status_code == 503:
            break
    assert ready is not None and ready.status_code == 503 and "draining" in ready.text
    new = httpx.post(srv.url + "/v1/completions", headers=hdr, timeout=5,
                     json={"model": "m", "prompt": "x", "max_tokens": 2})
    assert new.status_code == 503 and new.headers["retry-after"] == "1", new.text
    assert new.json()["error"]["type"] == "unavailable"
    assert httpx.get(srv.url + "/health", timeout=2).status_code == 200
    assert not out["done"], "the stream ended before the drain could be observed; raise max_tokens"

    t.join(timeout=60)
    assert out["done"] and out["status"] == 200
    assert not [e for e in out["events"] if "error" in e]
    finals = [c["finish_reason"] for e in out["events"] for c in e["choices"] if c["finish_reason"]]
    assert finals == ["length"]
    assert srv.proc.wait(timeout=20) == 0
    log = srv.log()
    lines = [ln for ln in log.splitlines() if ln.strip() and not ln.startswith((" ", "Traceback"))]
    assert all(ln.startswith("[test-r1] ") for ln in lines), [ln for ln in lines if not ln.startswith("[test-r1]")]
    assert "draining" in log and "drained in" in log
    # uvicorn's lines carry the time too; successful probes (/ready was polled ~every 0.1 s) are not
    # logged, the refused ones and the requests are; the metrics port's 404 is not counted as /v1/models'
    access = [ln for ln in lines if '"GET ' in ln or '"POST ' in ln or '"HEAD ' in ln]
    assert all(re.match(r"\[test-r1\] \d\d:\d\d:\d\d ", ln) for ln in access), access[:3]
    assert not [ln for ln in access if "/ready" in ln and '" 200' in ln], access
    assert [ln for ln in access if "/ready" in ln and '" 503' in ln] and [ln for ln in access if "POST /v1/completions" in ln]
    assert '"GET /metrics HTTP/1.1" 401' in log
    assert 'route="/v1/models",status="404"' not in m.text


def test_sigterm_while_the_model_loads_exits_0(run, tmp_path):
    """SIGTERM while the checkpoint is loading (a rollout catching a pod early): the loader finishes
    that checkpoint and the process exits 0 after its drain, as documented; it used to exit while
    the loader thread was inside torch, and the runtime aborted (exit 134, "terminate called without
    an active exception"). The load is made slow with real torch work in the loader thread."""
    port = _bench().free_port()
    code = ("import sys, time, torch, clusterlm.serve.models as m\n"
            "real = m.load_model\n"
            "def slow(*a, **k):\n"
            "    end = time.time() + 4\n"
            "    x = torch.randn(400, 400)\n"
            "    while time.time() < end:\n"
            "        x = torch.tanh(x @ x)\n"
            "    return real(*a, **k)\n"
            "m.load_model = slow\n"
            "from clusterlm.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-c", code, "serve", str(run), "--port", str(port),
                                 "--api-key-env", "CLUSTERLM_TEST_KEY"], stdout=log, stderr=log,
                                env={**os.environ, "CLUSTERLM_TEST_KEY": KEY})
    wait_for_ready(proc, f"http://127.0.0.1:{port}", log_path, status=503, timeout=30)  # listening, still loading
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log_path.read_text()[-2000:]
    text = log_path.read_text()
    assert "waiting for the model being loaded" in text and "terminate called" not in text


# after `bind` returns: the port is taken, the imports are done, uvicorn has not taken over the signals yet
_SIGTERM_AFTER_BIND = """
import signal, clusterlm.serve.guard as g
real = g.bind
def bind(*a, **k):
    sock = real(*a, **k)
    signal.raise_signal(signal.SIGTERM)
    return sock
g.bind = bind
"""


@pytest.mark.parametrize("phase", ["importing the cli", "importing torch", "port bound"])
def test_sigterm_before_the_server_runs_exits_0(run, phase):
    """SIGTERM in serve's first seconds, before uvicorn installs its handlers (a rollout or scale-down
    catching a pod that is still importing torch): exit 0 with one line saying so, and no traceback; it
    used to die by the signal (143). The signal lands at a set point of the start-up (not on a timer):
    as the CLI starts importing, as torch starts importing, and just after the port is bound."""
    code = {"importing the cli": signal_on_import("SIGTERM", "clusterlm.cli"),
            "importing torch": signal_on_import("SIGTERM", "torch"), "port bound": _SIGTERM_AFTER_BIND}[phase]
    port = _bench().free_port()
    r = subprocess.run([*console_script(code), "serve", str(run), "--port", str(port),
                        "--api-key-env", "CLUSTERLM_TEST_KEY"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CLUSTERLM_TEST_KEY": KEY})
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if "SIGTERM" in ln]
    assert len(lines) == 1 and "stopped by SIGTERM before the server was ready" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    if phase == "port bound":  # the log is set up by then, and tagged with the instance id
        assert re.match(r"\[[^]]+\] \d\d:\d\d:\d\d INFO clusterlm.serve: ", lines[0]), lines


def test_drain_deadline_ends_streams_with_an_error_event(run, tmp_path):
    """--drain-timeout 0.5 with a stream of 2000 greedy tokens running: after about 0.5 s the stream gets
    an explicit error event and then [DONE] (no hang), the process exits 75 (docs/cli.md). (The stream
    takes about 2 s on a 2-core EPYC; with a 1 s deadline a faster machine finished it first.)"""
    srv = _Proc(run, tmp_path, "--drain-timeout", "0.5", "--instance-id", "test-r2")
    t, out = _start_stream(srv, max_tokens=2000)
    t_term = time.time()
    srv.proc.send_signal(signal.SIGTERM)
    t.join(timeout=30)
    assert out["done"], out
    errors = [e["error"] for e in out["events"] if "error" in e]
    assert len(errors) == 1 and "drain deadline" in errors[0]["message"], out["events"][-3:]
    assert 0.4 < out["t_end"] - t_term < 10
    assert srv.proc.wait(timeout=20) == EXIT_PREEMPTED


def test_log_format_json_is_one_object_per_line(run, tmp_path):
    """--log-format json (for Loki, Elasticsearch, Cloud Logging): every line of the log, clusterlm's,
    uvicorn's start-up lines and its access lines, is one JSON object with an ISO 8601 UTC time, the
    level, --instance-id, the logger and the message; access lines also carry method, path, status,
    client and duration_ms, which for a stream spans the whole stream as the client saw it (uvicorn
    itself writes the line when the response starts). Successful probes stay out (--access-log
    requests). A traceback is a field of its record, which stays one line."""
    import logging

    from clusterlm.serve.guard import JsonFormatter

    srv = _Proc(run, tmp_path, "--log-format", "json", "--instance-id", "test-json")
    hdr = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(srv.url + "/v1/models", headers=hdr, timeout=5).status_code == 200
    assert httpx.get(srv.url + "/v1/nowhere", timeout=5).status_code == 401
    out: dict = {}
    t_start = time.time()
    srv.stream(60, out)
    assert out["done"] and len(out["events"]) >= 60
    client_ms = (out["t_end"] - t_start) * 1000  # the client's view: request sent to the last event read
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=30) == 0

    lines = srv.log().splitlines()
    recs = [json.loads(ln) for ln in lines]  # every line, or this fails naming it
    for r in recs:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"]), r
        assert r["level"] in ("DEBUG", "INFO", "WARNING", "ERROR") and r["instance_id"] == "test-json", r
        assert isinstance(r["logger"], str) and isinstance(r["message"], str), r
    loggers = {r["logger"] for r in recs}
    assert {"clusterlm.serve.app", "clusterlm.serve.guard", "uvicorn.error", "uvicorn.access"} <= loggers, loggers
    access = [r for r in recs if r["logger"] == "uvicorn.access"]
    for r in access:
        assert set(r) >= {"method", "path", "status", "duration_ms", "client"}, r
        assert r["client"].startswith("127.0.0.1:") and r["duration_ms"] >= 0, r
    assert [(r["method"], r["path"], r["status"]) for r in access if r["path"] != "/ready"] == [
        ("GET", "/v1/models", 200), ("GET", "/v1/nowhere", 401), ("POST", "/v1/completions", 200)]
    assert not [r for r in access if r["path"] == "/ready" and r["status"] == 200]
    assert access[-1]["duration_ms"] >= 0.5 * client_ms > 0, (access[-1], client_ms)
    assert any("drained in" in r["message"] for r in recs)

    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed: %s", ("it",), sys.exc_info())
    line = JsonFormatter("r1").format(rec)
    assert "\n" not in line and json.loads(line)["message"] == "failed: it"
    assert "RuntimeError: boom" in json.loads(line)["traceback"]


def test_api_key_options_refused_with_a_clear_message(run, tmp_path, capsys, monkeypatch):
    """--api-key-file with --api-key-env, an unset or empty variable, a bad --instance-id: exit 2
    and one line naming the option, before anything is bound or loaded (in-process CLI)."""
    import logging

    from clusterlm.cli import main as cli

    key = tmp_path / "key"
    key.write_text(KEY)
    key.chmod(0o600)
    monkeypatch.setenv("CLUSTERLM_TEST_EMPTY", "")
    monkeypatch.setenv("CLUSTERLM_TEST_PLACEHOLDER", "CHANGE-ME-placeholder-not-a-secret")  # deploy/k8s/secret.yaml
    monkeypatch.setenv("CLUSTERLM_TEST_KEY", KEY)
    monkeypatch.delenv("CLUSTERLM_NO_SUCH_VARIABLE", raising=False)
    formatters = [(h, h.formatter) for h in logging.getLogger().handlers]  # serve tags them with the id
    cases = [(["--api-key-file", str(key), "--api-key-env", "CLUSTERLM_TEST_KEY"], "choose one"),
             (["--api-key-env", "CLUSTERLM_NO_SUCH_VARIABLE"], "not set"),
             (["--api-key-env", "CLUSTERLM_TEST_EMPTY"], "empty"),
             (["--api-key-env", "CLUSTERLM_TEST_PLACEHOLDER"], "the placeholder shipped in deploy/k8s/secret.yaml"),
             (["--instance-id", "bad id!"], "--instance-id"), (["--instance-id", ""], "--instance-id '' must be")]
    try:
        for extra, fragment in cases:
            assert cli(["serve", str(run), "--port", "1", *extra]) == EXIT_USAGE
            err = capsys.readouterr().err
            assert fragment in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    finally:
        for h, f in formatters:
            h.setFormatter(f)


def test_haproxy_config_is_valid(tmp_path):
    """The documented deploy/haproxy/haproxy.cfg, and the copy the failover benchmark renders from it,
    pass `haproxy -c` (Debian's haproxy 2.6)."""
    haproxy = _require("haproxy")
    cfg = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
    bench = _bench()
    for path, guard_port in ((cfg, None), (tmp_path / "guard.cfg", 18020), (tmp_path / "no-guard.cfg", None)):
        if path != cfg:
            path.write_text(bench.render_haproxy(cfg.read_text(), 18000, 18404, tmp_path / "s.sock",
                                                 {"r1": 18001, "r2": 18002}, 18010, guard_port))
            text = path.read_text()
            assert "server r1 127.0.0.1:18001" in text and "server r3" not in text
            assert ("server g1 127.0.0.1:18020" in text) == (guard_port is not None)
        r = subprocess.run([haproxy, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "Configuration file is valid" in r.stdout + r.stderr, r.stdout + r.stderr


def test_haproxy_failover_two_replicas_one_killed(run, tmp_path):
    """Two replicas behind HAProxy, non-streaming completions back to back from 4 threads; one
    replica is SIGKILLed: every request still gets 200 (HAProxy's retry-on conn-failure /
    empty-response resends those that had not started), both replicas answered before the kill,
    only the survivor after, and the stats socket shows the killed one DOWN within 2 s."""
    _require("haproxy")
    bench = _bench()
    replicas = {n: bench.Replica(run, n, tmp_path, "--max-new-tokens-limit", "64") for n in ("r1", "r2")}
    lb = None
    try:
        for r in replicas.values():
            r.wait_ready()
        lb, lb_port, sock = bench.start_haproxy(tmp_path, {n: r.port for n, r in replicas.items()})
        url = f"http://127.0.0.1:{lb_port}/v1/completions"
        results: list[tuple[float, int, str]] = []
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(timeout=30) as h:
                while not stop.is_set():
                    try:
                        r = h.post(url, headers={"Authorization": f"Bearer {bench.KEY}"},
                                   json={"model": bench.MODEL, "prompt": "hi", "max_tokens": 16})
                    except httpx.HTTPError as e:  # a cut response counts as a failure (it ended the thread)
                        results.append((time.time(), 0, f"{type(e).__name__}: {e}"))
                        continue
                    results.append((time.time(), r.status_code, r.headers.get("x-clusterlm-instance", "")))

        threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        t_kill = time.time()
        replicas["r1"].proc.send_signal(signal.SIGKILL)
        t_down = None
        while time.time() - t_kill < 5 and t_down is None:
            if bench.haproxy_status(sock).get("r1", "").startswith("DOWN"):
                t_down = time.time()
            time.sleep(0.05)
        time.sleep(max(0.0, t_kill + 3 - time.time()))
        stop.set()
        for t in threads:
            t.join(timeout=30)
    finally:
        for r in replicas.values():
            if r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()
        if lb is not None:
            lb.terminate()
            lb.wait()
    assert len(results) > 20
    assert [(s, i) for _, s, i in results if s != 200] == []
    assert {i for t, _, i in results if t < t_kill} == {"r1", "r2"}
    assert {i for t, _, i in results if t > t_kill + 0.5} == {"r2"}
    assert t_down is not None and t_down - t_kill <= 2.0, t_down and t_down - t_kill


def _metric(url: str, name: str, headers: dict | None = None) -> float:
    """The sum of a Prometheus series `name` (every label set) at url/metrics."""
    text = httpx.get(url + "/metrics", headers=headers or {}, timeout=5).text
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines()
               if ln.startswith(name) and (ln[len(name)] in " {"))


def test_stream_guard_ends_a_killed_replicas_streams_with_an_error_event(run, tmp_path):
    """Two replicas behind HAProxy with `clusterlm stream-guard` (deploy/haproxy/haproxy.cfg's
    stream routing): whole streams and non-streaming requests pass; a client that leaves mid-stream
    makes the replica stop generating; a stream whose replica is SIGKILLed mid-reply ends with the
    guard's error event (code replica_lost) and [DONE], every event before it whole JSON; and the
    `openai` client then raises APIError with the guard's message (not APIConnectionError, as for a
    cut connection). The guard's /metrics counts each outcome."""
    _require("haproxy")
    openai = pytest.importorskip("openai")
    bench = _bench()
    replicas = {n: bench.Replica(run, n, tmp_path, "--max-new-tokens-limit", "2000") for n in ("r1", "r2")}
    guard = bench.Guard(bench.free_port(), tmp_path)
    guard_url = f"http://127.0.0.1:{guard.port}"
    lb = None
    hdr = {"Authorization": f"Bearer {bench.KEY}"}
    # greedy: a random-weights model never meets EOS, so the stream runs for max_tokens
    body = {"model": bench.MODEL, "prompt": "hi", "max_tokens": 2000, "temperature": 0, "stream": True}

    def outcomes() -> dict[str, float]:
        text = httpx.get(guard_url + "/metrics", timeout=5).text
        return {m[1]: float(m[2]) for m in re.finditer(r'clusterlm_guard_streams_total\{outcome="(\w+)"\} (\S+)',
                                                       text)}

    try:
        for r in replicas.values():
            r.wait_ready()
        lb, lb_port, sock = bench.start_haproxy(tmp_path, {n: r.port for n, r in replicas.items()}, guard)
        url = f"http://127.0.0.1:{lb_port}"

        # 1. a whole stream through the guard; a non-streaming request goes past it
        r = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 8}, headers=hdr, timeout=30)
        assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text, r.text[-300:]
        r = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 8, "stream": False}, headers=hdr,
                       timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        assert outcomes() == {"completed": 1, "replica_lost": 0, "upstream_timeout": 0, "client_gone": 0}

        # 2. a client that leaves mid-stream: the guard closes its upstream, the replica stops
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=hdr, timeout=30) as resp:
            serving = replicas[resp.headers["x-clusterlm-instance"]]
            n = 0
            for line in resp.iter_lines():
                n += line.startswith("data: ")
                if n == 3:
                    break
        deadline = time.time() + 5
        while time.time() < deadline and _metric(serving.url, "clusterlm_running_sequences", hdr) > 0:
            time.sleep(0.1)
        assert _metric(serving.url, "clusterlm_running_sequences", hdr) == 0
        assert outcomes()["client_gone"] == 1

        # 3. raw SSE: a few events, SIGKILL the replica that serves it, read to the end
        events = []
        with httpx.stream("POST", url + "/v1/completions", json=body, headers=hdr, timeout=30) as resp:
            assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
            victim = replicas[resp.headers["x-clusterlm-instance"]]
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 5:
                        victim.proc.send_signal(signal.SIGKILL)
        assert events[-1] == "[DONE]", events[-3:]
        err = json.loads(events[-2])["error"]
        assert err["code"] == "replica_lost" and err["type"] == "server_error", err
        assert "retry the request" in err["message"]
        assert all("choices" in json.loads(e) for e in events[:-2])  # whole events only, none cut in half
        assert 5 <= len(events) - 2 < 2000
        assert outcomes()["replica_lost"] == 1

        # 4. the openai client on a stream whose replica (the last one) dies: APIError, the guard's words
        client = openai.OpenAI(base_url=url + "/v1", api_key=bench.KEY, max_retries=0, timeout=30)
        raw = client.completions.with_raw_response.create(model=bench.MODEL, prompt="hi", max_tokens=2000,
                                                           temperature=0, stream=True)
        victim = replicas[raw.headers["x-clusterlm-instance"]]
        assert victim.proc.poll() is None
        chunks = 0
        with pytest.raises(openai.APIError) as e:
            for _ in raw.parse():
                chunks += 1
                if chunks == 5:
                    victim.proc.send_signal(signal.SIGKILL)
        assert not isinstance(e.value, openai.APIConnectionError)
        assert "replica serving this stream was lost" in str(e.value), e.value
        assert outcomes() == {"completed": 1, "replica_lost": 2, "upstream_timeout": 0, "client_gone": 1}
    finally:
        for p in [r.proc for r in replicas.values()] + [guard.proc] + ([lb] if lb is not None else []):
            if p.poll() is None:
                p.kill()
                p.wait()
    assert "ended with an error event" in guard.log.read_text()


def test_stream_guard_refuses_bad_options(capsys):
    from clusterlm.cli import main

    for argv, words in ((["--upstream", "127.0.0.1:8010"], "not a base URL"),
                        (["--upstream", "http://127.0.0.1:8010/v1"], "not a base URL"),
                        (["--upstream", "http://127.0.0.1:99999"], "port"),
                        # port 0 was taken, and every relayed request then failed with a 502 (a bad --port
                        # too, checked after --upstream: a guard that started would not return)
                        (["--upstream", "http://127.0.0.1:0", "--port", "0"],
                         "--upstream 'http://127.0.0.1:0': the port is not a number in 1-65535"),
                        (["--upstream", "http://h:1", "--read-timeout", "0"], "--read-timeout=0.0 must be in")):
        assert main(["stream-guard", *argv]) == EXIT_USAGE
        assert words in capsys.readouterr().err
