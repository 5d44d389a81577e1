"""Several models behind one `clusterlm serve`: two random-weights checkpoints (a byte-level and a
BPE tokenizer, tests/helpers.py), a LoRA adapter folder on the first, and a path that does not
exist, served by one child process (positional NAME=PATH arguments plus a --models TOML file with
its own max_batch). Each model answers by name through the official `openai` client, the bad one is
named in the log, /health and /v1/models while the others serve, memory is reported per model in
/v1/models and /metrics, an unknown model is a 404 listing the served names and an omitted one a
400 naming them. Every model failing exits 2, as a single bad model does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clusterlm.errors import EXIT_USAGE
from tests.helpers import random_checkpoint, wait_for_ready

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package ships with

KEY = "multi-key-0123"
TEXT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(50))
CONTEXT = 128
BAD = "/nonexistent/clusterlm-run"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapter(run: Path, out: Path) -> Path:
    """LoRA adapters (rank 4, B random so that they change the outputs) on `run`'s model, saved as a
    fine-tune writes them: out/adapter.safetensors + adapter.json with meta.base = run."""
    import torch

    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.finetune.lora import apply_lora, lora_modules, save_adapters

    model = load_for_inference(run).model
    apply_lora(model, rank=4, alpha=8.0, seed=1)
    torch.manual_seed(1)
    for m in lora_modules(model).values():
        m.lora_b.data.normal_(0, 0.2)
    return save_adapters(out, model, meta={"base": str(run)})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    byte = random_checkpoint(tmp_path_factory.mktemp("byte"), "byte", TEXT, bpe_vocab=0, n_layers=1, context=CONTEXT)
    bpe = random_checkpoint(tmp_path_factory.mktemp("bpe"), "bpe", TEXT, bpe_vocab=300, n_layers=1, context=CONTEXT)
    tuned = _adapter(byte, tmp_path_factory.mktemp("tuned") / "adapter")
    return {"byte": byte, "bpe": bpe, "tuned": tuned}


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "models.toml").write_text(f'[[model]]\nname = "bpe"\npath = "{runs["bpe"]}"\nmax_batch = 2\n'
                                    'max_new_tokens_limit = 16\n')
    port = _free_port()
    log_path = tmp / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "clusterlm", "serve", f"byte={runs['byte']}", f"bad={BAD}",
             f"tuned={runs['tuned']}", "--models", str(tmp / "models.toml"), "--port", str(port),
             "--api-key-env", "CLUSTERLM_TEST_KEY", "--max-batch", "4", "--max-new-tokens-limit", "64"],
            stdout=log, stderr=log, env={**os.environ, "CLUSTERLM_TEST_KEY": KEY})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_ready(proc, url, log_path)
        yield url, log_path
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _get(url: str, path: str) -> httpx.Response:
    return httpx.get(url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)


def _client(url: str):  # noqa: ANN202
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def test_each_model_answers_by_name_at_once(server):
    """Three models (two checkpoints, one adapter) answer concurrently, each reply naming its model:
    a streamed chat on `byte`, completions on `bpe` and `tuned`; `tuned` (base + adapters merged)
    and `byte` (the base) answer the same greedy prompt differently."""
    url, _ = server
    client = _client(url)
    assert sorted(m.id for m in client.models.list().data) == ["bpe", "byte", "tuned"]
    out: dict[str, object] = {}

    def chat() -> None:
        chunks = list(client.chat.completions.create(model="byte", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=20, temperature=0, stream=True))
        out["byte"] = chunks

    def complete(name: str) -> None:
        out[name] = client.completions.create(model=name, prompt="Line 1:", max_tokens=12, temperature=0)

    threads = [threading.Thread(target=chat), *(threading.Thread(target=complete, args=(n,)) for n in ("bpe", "tuned"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert {c.model for c in out["byte"]} == {"byte"}
    assert out["byte"][-1].choices[0].finish_reason in ("length", "stop")
    for name in ("bpe", "tuned"):
        assert out[name].model == name and out[name].usage.completion_tokens >= 1, out[name]
    base = client.completions.create(model="byte", prompt="Line 1:", max_tokens=12, temperature=0)
    assert base.choices[0].text != out["tuned"].choices[0].text


def test_bad_model_is_reported_and_the_others_serve(server):
    """The path that does not exist: one log line naming the model, /health's `failed` (names only:
    no key there), /v1/models' `failed` with the reason, a 404 when asked for; /ready is 200."""
    url, log_path = server
    assert "model bad (/nonexistent/clusterlm-run) failed to load" in log_path.read_text()
    assert httpx.get(url + "/health", timeout=5).json() == {"status": "ok", "failed": ["bad"]}
    ready = httpx.get(url + "/ready", timeout=5).json()
    assert ready == {"status": "ready", "models": ["byte", "tuned", "bpe"], "failed": ["bad"]}
    body = _get(url, "/v1/models").json()
    assert [f["id"] for f in body["failed"]] == ["bad"] and "does not exist" in body["failed"][0]["error"]
    with pytest.raises(openai.NotFoundError) as e:
        _client(url).completions.create(model="bad", prompt="x", max_tokens=2)
    assert "failed to load" in e.value.body["message"]


def test_unknown_model_404_and_omitted_model_400(server):
    """An unknown name: 404 in OpenAI's shape (code model_not_found) listing the served names; no
    `model` with several models: 400 naming them, for completions and /classify alike."""
    url, _ = server
    with pytest.raises(openai.NotFoundError) as e:
        _client(url).chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    err = e.value.body
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "'gpt-4' is not served here" in err["message"] and "serves 'byte', 'tuned', 'bpe'" in err["message"]
    h = {"Authorization": f"Bearer {KEY}"}
    for path, body in (("/v1/completions", {"prompt": "x", "max_tokens": 2}), ("/classify", {"input": "x"})):
        r = httpx.post(url + path, json=body, headers=h, timeout=10)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == "model is required: this server serves 'byte', 'tuned', 'bpe'"
    r = httpx.post(url + "/classify", json={"model": "bpe", "input": "x"}, headers=h, timeout=10)
    assert r.status_code == 400 and "not a classifier" in r.json()["error"]["message"]


def test_each_model_s_limits_in_messages_and_tokenize(server):
    """422 and 400 messages give the named model's own ranges and say where the limit comes from (bpe's
    max_new_tokens_limit 16 and max_batch 2 from the models file, byte's from the flags); an unknown
    field has no range; /tokenize counts a chat's tokens (leading EOS included) as the completion's
    usage does and gives the context; HEAD /health and /ready answer 200 (load balancers check so)."""
    url, _ = server
    h = {"Authorization": f"Bearer {KEY}"}

    def err(path: str, body: dict) -> tuple[int, str]:
        r = httpx.post(url + path, json=body, headers=h, timeout=10)
        return r.status_code, r.json()["error"]["message"]

    assert err("/v1/completions", {"model": "bpe", "prompt": "x", "max_tokens": 0}) == (
        422, "max_tokens: Input should be greater than or equal to 1 (allowed range [1, 16]); got 0")
    assert err("/v1/completions", {"model": "byte", "prompt": "x", "max_tokens": 0})[1].endswith("[1, 64]); got 0")
    assert err("/v1/completions", {"model": "bpe", "prompt": "x", "n": 0})[1].endswith("(allowed range [1, 2]); got 0")
    assert err("/v1/completions", {"model": "bpe", "prompt": "x", "max_tokens": 17}) == (
        400, "max_tokens=17 is out of range; allowed [1, 16] (model 'bpe''s max_new_tokens_limit in the models file)")
    assert err("/v1/completions", {"model": "byte", "prompt": "x", "max_tokens": 65})[1].endswith(
        "(the server's --max-new-tokens-limit)")
    status, msg = err("/v1/completions", {"model": "bpe", "prompt": "x", "max_completion_tokens": 3})
    assert status == 422 and "unknown field" in msg and "range" not in msg
    status, msg = err("/v1/completions", {"model": "bpe", "prompt": "x", "stream_options": {"include_usage": True}})
    assert status == 422 and "stream_options is only allowed with stream: true" in msg

    msgs = [{"role": "user", "content": "Line 1"}]
    r = httpx.post(url + "/tokenize", json={"model": "tuned", "messages": msgs}, headers=h, timeout=10)
    assert r.status_code == 200, r.text
    tok = r.json()
    done = _client(url).chat.completions.create(model="tuned", messages=msgs, max_tokens=1)
    assert tok["count"] == len(tok["tokens"]) == done.usage.prompt_tokens and tok["max_model_len"] == CONTEXT
    r = httpx.post(url + "/tokenize", json={"model": "byte", "prompt": "ab"}, headers=h, timeout=10)
    assert r.json()["count"] == 3  # EOS + two bytes
    assert err("/tokenize", {"model": "byte"}) == (422, "body: Value error, give exactly one of prompt or messages; "
                                                        "got dict")
    for path in ("/health", "/ready"):
        assert httpx.head(url + path, timeout=10).status_code == 200


def test_memory_is_reported_per_model(server, runs):
    """/v1/models: parameter bytes at least the checkpoint's float32 tensors (plus the rotary tables),
    KV-cache bytes = 2 (k, v) x layers x slots x kv heads x context x head dim x 4 bytes (plus the
    slots' position counters); the same numbers in clusterlm_model_memory_bytes{model, kind}; each
    model's own max_batch as its slot total (bpe's 2 from the TOML file, byte's 4 from --max-batch)."""
    from safetensors.torch import load_file

    from clusterlm.checkpoint.store import resolve_checkpoint

    from prometheus_client.parser import text_string_to_metric_families

    url, _ = server
    cards = {m["id"]: m for m in _get(url, "/v1/models").json()["data"]}
    metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(_get(url, "/metrics").text) for s in f.samples}
    for name, slots in (("byte", 4), ("bpe", 2)):
        file_bytes = sum(t.nbytes for t in load_file(resolve_checkpoint(runs[name]) / "model.safetensors").values())
        mem = cards[name]["memory"]
        assert file_bytes <= mem["parameter_bytes"] <= file_bytes + 64 * 1024, (name, mem, file_bytes)
        kv = 2 * 1 * slots * 4 * CONTEXT * 8 * 4  # 1 layer, 4 kv heads, head dim 32 / 4
        assert kv <= mem["kv_cache_bytes"] <= kv + 64 * slots, (name, mem, kv)
        assert cards[name]["max_model_len"] == CONTEXT and cards[name]["max_batch"] == slots
        for kind, value in (("parameters", mem["parameter_bytes"]), ("kv_cache", mem["kv_cache_bytes"])):
            assert metrics[("clusterlm_model_memory_bytes", (("kind", kind), ("model", name)))] == value
        assert metrics[("clusterlm_kv_slots_total", (("model", name),))] == slots
    memory_models = {dict(k[1])["model"] for k in metrics if k[0] == "clusterlm_model_memory_bytes"}
    assert memory_models == {"byte", "bpe", "tuned"}


def test_every_model_failing_exits_2(tmp_path):
    """Two paths that do not exist: the server exits 2 (as for one bad checkpoint), naming both."""
    r = subprocess.run([sys.executable, "-m", "clusterlm", "serve", f"a={BAD}", f"b={BAD}2",
                        "--port", str(_free_port()), "--api-key-env", "CLUSTERLM_TEST_KEY"],
                       capture_output=True, text=True, timeout=60, env={**os.environ, "CLUSTERLM_TEST_KEY": KEY})
    assert r.returncode == EXIT_USAGE, r.stderr[-2000:]
    assert "every model failed to load: a:" in r.stderr and "; b:" in r.stderr


def test_model_specs_from_arguments_and_file(tmp_path):
    """NAME=PATH and bare PATH (named after the run folder; RUN/adapter after the run), a TOML file
    (paths relative to it), duplicate names refused, unknown keys refused with a close match. A step
    folder, checkpoints/ or checkpoints/best is named after its run too: serving
    runs/x/checkpoints/best listed the model as 'best', and a step folder as 'step-00000030'. NAME=PATH
    with --model-name is refused (the NAME was dropped)."""
    from clusterlm.serve.models import model_specs, read_models_file

    for tail in ("", "/checkpoints", "/checkpoints/step-00000030", "/checkpoints/best", "/checkpoints/step-00000030/"):
        assert [s.name for s in model_specs([f"/r/sc{tail}"], None, None)] == ["sc"], tail
    assert [s.name for s in model_specs(["/step-00000001"], None, None)] == ["step-00000001"]  # no run above it

    (tmp_path / "m.toml").write_text('[[model]]\nname = "x"\npath = "runs/x"\nmax_queue = 3\n')
    specs = model_specs(["a=/r/one", "/r/two"], str(tmp_path / "m.toml"), None)
    assert [(s.name, s.path) for s in specs] == [("a", "/r/one"), ("two", "/r/two"), ("x", str(tmp_path / "runs/x"))]
    assert specs[2].max_queue == 3 and specs[2].max_batch is None
    with pytest.raises(ValueError, match="'two' is given twice"):
        model_specs(["/r/two", "/s/two"], None, None)
    with pytest.raises(ValueError, match="--model-name names a single model"):
        model_specs(["/r/a", "/r/b"], None, "m")
    assert [s.name for s in model_specs(["/r/a"], None, "m")] == ["m"]
    with pytest.raises(ValueError, match="--model-name 'm' and the name 'x' given with /r/a both name the model"):
        model_specs(["x=/r/a"], None, "m")  # was served as 'm', 'x' silently dropped
    (tmp_path / "bad.toml").write_text('[[model]]\npath = "p"\nmax_bach = 2\n')
    with pytest.raises(ValueError, match="unknown key 'max_bach' \\(did you mean 'max_batch'\\?\\)"):
        read_models_file(tmp_path / "bad.toml")
    # `name = 5` and `model = [1, 2]` ended in a TypeError traceback (exit 1); `name = ""` was served under the
    # run folder's name: each is now one ValueError naming the file and the table (exit 2)
    for text, said in (('[[model]]\nname = 5\npath = "p"\n', "#1 has name = 5; give a string"),
                       ('[[model]]\nname = ""\npath = "p"\n', "#1 has name = ''; give a string"),
                       ('model = [1, 2]\n', "model #1 is 1, not a table")):
        (tmp_path / "bad.toml").write_text(text)
        with pytest.raises(ValueError, match=f"--models {tmp_path / 'bad.toml'}: .*{said}"):
            read_models_file(tmp_path / "bad.toml")


def test_classifier_and_lm_side_by_side(runs, tmp_path):
    """A classifier and a language model in one app (in-process, starlette's TestClient): /classify by
    the classifier's name gives its labels and probabilities (summing to 1) and counts under its
    `model` label; the LM answers completions by name; each refuses the other's route (400); the
    classifier's /v1/models entry has its labels and no KV cache."""
    from starlette.testclient import TestClient

    from clusterlm.serve.app import Settings, create_app
    from clusterlm.serve.models import ModelSpec, load_model
    from tests.helpers import random_classifier

    random_classifier(tmp_path / "clf", "byte", "x", "llama-nano", ("negative", "positive"), n_heads=4, context=32)
    app = create_app(lambda spec: load_model(spec.path, "cpu"), Settings(api_key=KEY, model_name="unused"),
                     models=[ModelSpec("sst2", str(tmp_path / "clf")), ModelSpec("lm", str(runs["byte"]))])
    h = {"Authorization": f"Bearer {KEY}"}
    with TestClient(app) as tc:
        deadline = time.time() + 60
        while tc.get("/ready").status_code != 200:
            assert time.time() < deadline, tc.get("/ready").text
            time.sleep(0.05)
        r = tc.post("/classify", json={"model": "sst2", "input": ["a gripping film", "dull"]}, headers=h)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "sst2" and [d["label"] in ("negative", "positive") for d in body["data"]] == [True] * 2
        assert all(abs(sum(d["probs"]) - 1) < 1e-5 for d in body["data"])
        r = tc.post("/v1/completions", json={"model": "lm", "prompt": "Line", "max_tokens": 3}, headers=h)
        assert r.status_code == 200 and r.json()["model"] == "lm", r.text
        assert tc.post("/v1/completions", json={"model": "sst2", "prompt": "x"}, headers=h).status_code == 400
        assert tc.post("/classify", json={"model": "lm", "input": "x"}, headers=h).status_code == 400
        cards = {m["id"]: m for m in tc.get("/v1/models", headers=h).json()["data"]}
        assert cards["sst2"]["labels"] == ["negative", "positive"] and cards["sst2"]["memory"]["kv_cache_bytes"] == 0
        metrics = tc.get("/metrics", headers=h).text
        assert 'clusterlm_classified_inputs_total{model="sst2"} 2.0' in metrics
