"""The new families outside training: an encoder-decoder through `clusterlm generate --src`, `eval
--task` (generation greedy and beam; a choice task by log-likelihood) and `serve` (completions and
chat, streamed and not, with the official openai client), and an encoder classifier on POST /classify.

References: the server's and the CLI's greedy text == generate/seq2seq.py's greedy decoding of the
same source in-process (itself checked against uncached full forwards in tests/model/test_beam.py);
/classify's label and probabilities == eval.lm.classify's through the head.
Run: .venv/bin/python -m pytest -q tests/e2e/test_encdec_serve.py
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from pathlib import Path

import pytest

from clusterlm.cli import main as cli

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package ships with

KEY = "test-key-encdec"
PROMPTS = ["a dog runs", "the red cat sits on a mat", "hello"]


def _save(root: Path, cfg, name: str) -> Path:
    from clusterlm.checkpoint.store import save_checkpoint
    from clusterlm.config import RunConfig, to_toml
    from clusterlm.models.build import build_model

    model = build_model(cfg)
    model.init_weights(0)
    save_checkpoint(root / name / "checkpoints", 0, model_state=model.state_dict(), optimizer_state=None,
                    train_state={}, config_toml=to_toml(RunConfig(model=cfg)), tokenizer_path=root / "tok.json")
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from clusterlm.models.config import ModelConfig
    from clusterlm.tokenizer.kinds import make_tokenizer

    root = tmp_path_factory.mktemp("encdec_serve")
    tok = make_tokenizer("byte")
    tok.save(root / "tok.json")
    encdec = ModelConfig(arch="encdec", vocab_size=tok.vocab_size, n_layers=2, n_enc_layers=1, dim=32, n_heads=4,
                         max_seq_len=48, pos="sinusoidal", init_std=0.2)
    clf = ModelConfig(arch="encoder", vocab_size=tok.vocab_size, n_layers=1, dim=32, n_heads=4, max_seq_len=48,
                      labels=("neg", "pos"), pad_id=tok.pad_id)
    return {"encdec": _save(root, encdec, "encdec"), "clf": _save(root, clf, "clf"), "root": root}


def _greedy(run: Path, prompts: list[str], max_new: int = 20, **kw) -> list[str]:
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.eval.lm import generate_batch

    loaded = load_for_inference(run)
    return generate_batch(loaded.model, loaded.tokenizer, prompts, max_new_tokens=max_new, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a thread serving one checkpoint with create_app."""

    def __init__(self, run: Path) -> None:
        import uvicorn

        from clusterlm.checkpoint.model_io import load_for_inference
        from clusterlm.serve.app import Settings, create_app

        app = create_app(lambda: load_for_inference(run), Settings(api_key=KEY, model_name="m", max_batch=4))
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=int(self.url.rsplit(":", 1)[1]),
                                                    log_level="warning", lifespan="on"))
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

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def encdec_server(runs):
    s = Server(runs["encdec"])
    yield s
    s.stop()


def test_serve_encdec_completions_and_chat_match_in_process_greedy(runs, encdec_server):
    client = openai.OpenAI(base_url=encdec_server.url + "/v1", api_key=KEY, max_retries=0)
    want = _greedy(runs["encdec"], PROMPTS)
    assert any(want)  # random weights still emit some bytes before EOS or the limit
    for prompt, ref in zip(PROMPTS, want):
        r = client.completions.create(model="m", prompt=prompt, max_tokens=20, temperature=0.0)
        assert r.choices[0].text == ref
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.prompt_tokens == len(prompt.encode()) + 1  # the source: bytes + EOS
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="m", prompt=prompt, max_tokens=20, temperature=0.0, stream=True) if c.choices)
        assert streamed == ref
    # logprobs: one entry per generated token, the sampled token's log-probability among the top ones
    r = client.completions.create(model="m", prompt=PROMPTS[0], max_tokens=8, temperature=0.0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == r.usage.completion_tokens
    # greedy: the token is the most likely (the dicts are keyed by text: undecodable bytes collide)
    assert all(len(t) <= 3 and x >= max(t.values()) - 1e-5 for t, x in zip(lp.top_logprobs, lp.token_logprobs))
    # chat: the rendered conversation is the source; n=2 samples with a seed are reproducible
    msgs = [{"role": "user", "content": "a dog runs"}]
    a = client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=1.0, seed=3, n=2)
    b = client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=1.0, seed=3, n=2)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert all(c.finish_reason in ("stop", "length") for c in a.choices)


def test_serve_encdec_refuses_a_source_longer_than_the_encoder(encdec_server):
    r = httpx.post(encdec_server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "m", "prompt": "x" * 60, "max_tokens": 4})
    assert r.status_code == 400 and "context is 48 tokens" in r.json()["error"]["message"]


def test_generate_src_and_eval_task_for_encdec(runs, tmp_path, capsys):
    want = _greedy(runs["encdec"], ["a dog runs"], max_new=16)[0]
    assert cli(["generate", str(runs["encdec"]), "--src", "a dog runs", "--temperature", "0",
                "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out == want + "\n"
    assert cli(["generate", str(runs["encdec"]), "--src", "a dog runs", "--num-beams", "3",
                "--max-new-tokens", "16"]) == 0
    capsys.readouterr()
    (tmp_path / "t.en").write_text("a dog runs\nthe cat\n")
    (tmp_path / "t.fr").write_text("un chien court\nle chat\n")
    task = f"{tmp_path / 't.en'},{tmp_path / 't.fr'}"
    for extra in ([], ["--num-beams", "3"]):
        assert cli(["eval", str(runs["encdec"]), "--task", task, "--max-new-tokens", "16", *extra]) == 0
        (m,) = json.loads(capsys.readouterr().out)["tasks"].values()
        assert m["n"] == 2 and 0.0 <= m["bleu"] <= 100.0
    # a choice task: each option scored as the target given the context as the source
    assert cli(["eval", str(runs["encdec"]), "--task", "shakespeare_word_order", "--limit", "8"]) == 0
    (m,) = json.loads(capsys.readouterr().out)["tasks"].values()
    assert m["n"] == 8 and 0.0 <= m["acc"] <= 1.0
    # a classifier does not generate: one line, exit 2
    assert cli(["generate", str(runs["clf"]), "--prompt", "x"]) == 2


@pytest.mark.parametrize("command, extra, fragment", [
    ("generate", ["--src", "a dog runs", "--prompt", "the cat"], "--src and --prompt both give"),
    ("generate", ["--src", "a dog runs", "--compile"], "--compile compiles a decoder-only model's decode step"),
    ("chat", ["--compile"], "--compile compiles a decoder-only model's decode step"),
    ("generate", ["--src", "a dog runs", "--pack", "none"], "--pack none packs a decoder-only model's CPU weights"),
    ("chat", ["--pack", "fp32"], "--pack fp32 packs a decoder-only model's CPU weights"),
    ("generate", ["--src", "a dog runs", "--num-beams", "100000"],
     "--num-beams=100000 is wider than the model's vocabulary (259 tokens)"),
])
def test_generate_options_an_encdec_would_ignore_are_refused(runs, capsys, monkeypatch, command, extra, fragment):
    """An encoder-decoder ignored --prompt when --src was given too, --compile (its decode runs
    eagerly) and --pack (its weights are used as loaded), answering exit 0 as if they had applied; each
    is refused in one line (exit 2)."""
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert cli([command, str(runs["encdec"]), "--max-new-tokens", "4", *extra]) == 2
    captured = capsys.readouterr()
    assert fragment in captured.err and captured.out == ""


@pytest.mark.parametrize("pack", ["none", "fp32"])
def test_serve_refuses_pack_for_an_encdec(runs, capsys, monkeypatch, pack):
    """`serve` ignored --pack for an encoder-decoder (its Seq2SeqScheduler decodes with the weights as loaded);
    it is refused as `generate` refuses it, in one line (exit 2), before the port is bound or weights load."""
    def not_reached(*a, **k):
        raise AssertionError("serve went on past the --pack check")

    monkeypatch.setattr("clusterlm.serve.guard.bind", not_reached)
    monkeypatch.setattr("clusterlm.serve.models.load_model", not_reached)
    assert cli(["serve", str(runs["encdec"]), "--pack", pack]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (f"clusterlm serve: error: --pack {pack} packs a decoder-only model's CPU weights; "
                                    f"{runs['encdec'] / 'checkpoints' / 'step-00000000'} is an encoder-decoder (arch "
                                    "'encdec'), which decodes with its weights as loaded: leave --pack out")
    assert captured.out == ""


def test_serve_encoder_classifier_on_classify_route(runs):
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.eval.lm import classify

    loaded = load_for_inference(runs["clf"])
    texts = ["a gripping film", "dull"]
    want = classify(loaded.model, loaded.tokenizer, texts)
    s = Server(runs["clf"])
    try:
        r = httpx.post(s.url + "/classify", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "m", "input": texts})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        for d, w in zip(data, want):
            assert d["label"] == w.label
            assert d["probs"] == pytest.approx(w.probs, abs=1e-6)
    finally:
        s.stop()


def test_generate_says_when_an_encdec_cuts_the_source_or_the_output(runs, capsys, caplog):
    """A source past the encoder's 48 positions was cut to its first 47 tokens + EOS, and
    --max-new-tokens past the decoder's 48 stopped the output at 48, both without a word; each is now
    a warning naming the numbers. A source and a length that fit get none."""
    import logging

    long_src = "a dog runs " * 20  # 220 bytes: 221 tokens with EOS
    with caplog.at_level(logging.WARNING, logger="clusterlm.generate.cli"):
        assert cli(["generate", str(runs["encdec"]), "--src", long_src, "--max-new-tokens", "60",
                    "--temperature", "0"]) == 0
    text = " | ".join(r.getMessage() for r in caplog.records)
    assert "the source is 221 tokens with EOS but the encoder's context is 48 (model.max_seq_len): only its first " \
           "47 tokens and EOS are read" in text
    assert "--max-new-tokens=60 is more than the decoder's 48 positions (model.max_seq_len): the output stops at " \
           "48 tokens" in text
    assert len(capsys.readouterr().out.encode()) <= 48 * 4 + 1  # at most 48 tokens (bytes, some replaced) + newline
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="clusterlm.generate.cli"):
        assert cli(["generate", str(runs["encdec"]), "--src", "a dog runs", "--max-new-tokens", "48",
                    "--temperature", "0"]) == 0
    assert not [r for r in caplog.records if "model.max_seq_len" in r.getMessage()]


def test_generate_without_max_new_tokens_caps_an_encdec_quietly(runs, capsys, caplog):
    """`clusterlm generate ENCDEC --src ...` without --max-new-tokens warned "--max-new-tokens=200 is more
    than the decoder's 48 positions" on every call (the default, which the user never gave, is above
    the recipes' max_seq_len of 128). The default is now capped at the decoder's positions without a
    warning; a value given above them still warns (test above)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="clusterlm.generate.cli"):
        assert cli(["generate", str(runs["encdec"]), "--src", "a dog runs", "--temperature", "0"]) == 0
    assert not [r for r in caplog.records if "max-new-tokens" in r.getMessage()]
    assert len(capsys.readouterr().out.encode()) <= 48 * 4 + 1  # at most 48 tokens + newline


def test_encoder_classifier_longer_than_its_context(runs):
    """An encoder classifier (48 positions) given a text of 221 tokens: POST /classify answered 500
    ("classifying the inputs failed", a traceback in the log) and `eval --task ... --truncate` was
    refused all the same, because engine.context_length said an encoder has no limit. Now, as for a
    decoder-only classifier: /classify keeps the last 48 tokens (the answer equals classifying those
    ids), and classify_ids without truncate refuses in one DataError naming --truncate."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.errors import DataError
    from clusterlm.eval.lm import classifier_ids, classify_ids

    loaded = load_for_inference(runs["clf"])
    text = "a gripping film " * 14  # 224 bytes: 225 ids with the EOS separator
    ids = classifier_ids(loaded.tokenizer, text)
    assert len(ids) > 48
    want = classify_ids(loaded.model, [ids[-48:]])[0]
    assert classify_ids(loaded.model, [ids], truncate=True)[0].probs == pytest.approx(want.probs, abs=1e-6)
    with pytest.raises(DataError, match="do not fit the model's context of 48 tokens .*--truncate"):
        classify_ids(loaded.model, [ids])
    s = Server(runs["clf"])
    try:
        r = httpx.post(s.url + "/classify", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "m", "input": [text, "dull"]})
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["probs"] == pytest.approx(want.probs, abs=1e-6)
    finally:
        s.stop()


def test_encdec_requests_cancelled_while_queued_give_their_queue_place_back(runs):
    """An encoder-decoder answers one request at a time, so its queue fills fastest: clients that
    left while queued (their requests cancelled) no longer hold the queue against a live client's
    request (429 before), and their choices count as cancelled. The worker is not started."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.serve.metrics import Metrics
    from clusterlm.serve.scheduler import QueueFull, SamplingParams
    from clusterlm.serve.seq2seq import Seq2SeqScheduler

    loaded = load_for_inference(runs["encdec"])
    m = Metrics()
    sched = Seq2SeqScheduler(loaded.model, loaded.tokenizer, max_batch=2, max_queue=1, metrics=m.model("m", 2, 1))
    loop = asyncio.new_event_loop()
    try:
        params = SamplingParams(max_tokens=4)
        gone = [sched.submit([0, 5], 2, params, loop) for _ in range(2)]  # the queue bound + the idle worker
        with pytest.raises(QueueFull):
            sched.submit([0, 5], 1, params, loop)
        for r in gone:
            r.cancel()
        sched.submit([0, 5], 1, params, loop)
    finally:
        loop.close()
    assert m.registry.get_sample_value("clusterlm_queue_depth", {"model": "m"}) == 1
    assert m.registry.get_sample_value("clusterlm_sequences_finished_total", {"model": "m", "reason": "cancelled"}) == 4


def test_encdec_request_histograms_count_what_the_request_did(runs):
    """An encoder-decoder's requests are in the request histograms as a decoder's are
    (docs/monitoring.md): one latency and one generation-length observation per answered request,
    the length summed over its n choices (= the Finished tokens, = clusterlm_generated_tokens_total),
    and one time-to-first-token observation per choice. Before, latency and generation length were
    never observed and time to first token once per request."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.serve.metrics import Metrics
    from clusterlm.serve.scheduler import Failed, Finished, SamplingParams
    from clusterlm.serve.seq2seq import Seq2SeqScheduler
    from tests.helpers import collect_events

    loaded = load_for_inference(runs["encdec"])
    m = Metrics()
    sched = Seq2SeqScheduler(loaded.model, loaded.tokenizer, max_batch=2, max_queue=1, metrics=m.model("m", 2, 1))
    sched.start()
    try:
        events = collect_events(sched, [0, 97, 98], 2, SamplingParams(max_tokens=6, temperature=1.0, seed=3))
    finally:
        sched.stop()
    assert not any(isinstance(ev, Failed) for ev in events), events
    tokens = sum(ev.tokens for ev in events if isinstance(ev, Finished))
    value = lambda name: m.registry.get_sample_value(name, {"model": "m"})  # noqa: E731
    assert value("clusterlm_request_latency_seconds_count") == 1
    assert value("clusterlm_request_generation_tokens_count") == 1
    assert value("clusterlm_request_generation_tokens_sum") == tokens == value("clusterlm_generated_tokens_total")
    assert value("clusterlm_time_to_first_token_seconds_count") == 2
