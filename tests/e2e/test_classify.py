"""A classifier checkpoint (model.labels) evaluated with `clusterlm eval --task` and served on POST /classify.

References: the model called directly on [EOS] + the text's ids (predictions = argmax of its logits,
probabilities = their softmax), the metrics recomputed from the per-example samples, run_task on one
worker for run_task_split over two. Serving: vLLM's classification response shape, and the same
numbers as the direct call. The checkpoints hold seeded random weights (a tiny Llama-style decoder
and an LSTM) with a byte tokenizer, written with checkpoint.store.save_checkpoint.

    .venv/bin/python -m pytest -q tests/e2e/test_classify.py
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from clusterlm.cli import main as cli

LABELS = ("negative", "neutral", "positive")
CONTEXT = 24
KEY = "test-key-classify"
TEXTS = ["a gripping film", "dull", "I laughed, I cried", "ok", "meh.", "so-so at best"]


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
    """{"llama": a padded decoder classifier, "lstm": an LSTM one, "nopad": pad_id -1, "lm": a plain LM}."""
    from clusterlm.models.config import get_preset
    from clusterlm.tokenizer.kinds import train_tokenizer

    root = tmp_path_factory.mktemp("classify")
    tok = train_tokenizer("byte", ["x"])
    tok.save(root / "tok.json")
    common = dict(vocab_size=tok.vocab_size, labels=LABELS, pad_id=tok.pad_id)
    llama = get_preset("llama-nano", n_layers=2, dim=32, n_heads=4, n_kv_heads=2, max_seq_len=CONTEXT,
                       tie_embeddings=False, **common)
    return {"llama": _save(root, llama, "llama"),
            "lstm": _save(root, get_preset("lstm-small", n_layers=1, dim=32, dropout=0.0, **common), "lstm"),
            "nopad": _save(root, get_preset("llama-nano", n_layers=1, dim=32, n_heads=4, max_seq_len=CONTEXT,
                                            vocab_size=tok.vocab_size, labels=LABELS), "nopad"),
            "lm": _save(root, get_preset("llama-nano", n_layers=1, dim=32, n_heads=4, max_seq_len=CONTEXT,
                                         vocab_size=tok.vocab_size), "lm")}


def direct(run: Path, texts: list[str], keep: int | None = None) -> torch.Tensor:
    """Softmax of the model's logits for each text alone: [EOS] + its ids, the last `keep` of them."""
    from clusterlm.checkpoint.model_io import load_for_inference

    loaded = load_for_inference(run)
    tok = loaded.tokenizer
    rows = []
    with torch.no_grad():
        for t in texts:
            ids = ([tok.eos_id] + tok.encode(t))[-keep:] if keep else [tok.eos_id] + tok.encode(t)
            rows.append(torch.softmax(loaded.model(torch.tensor([ids])), dim=-1)[0])
    return torch.stack(rows)


def _task(path: Path, labels=LABELS, texts=TEXTS) -> Path:
    recs = [{"kind": "classify", "labels": list(labels)}]
    recs += [{"text": t, "label": labels[i % len(labels)]} for i, t in enumerate(texts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _eval(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert cli(["eval", *args]) == 0
    return json.loads(capsys.readouterr().out)


def _refused(capsys, *args: str) -> str:
    capsys.readouterr()
    assert cli(["eval", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ---- eval ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "lstm", "nopad"])
def test_eval_classify_task_through_the_head(runs, tmp_path, capsys, name):
    """`clusterlm eval RUN --task FILE` on a classifier: predictions are the argmax of the model's own
    logits for each text alone, the samples' probabilities their softmax, accuracy the samples' mean."""
    task = _task(tmp_path / "sent.jsonl")
    samples = tmp_path / "samples.jsonl"
    res = _eval(capsys, str(runs[name]), "--task", str(task), "--batch-size", "4", "--samples", str(samples))
    m = res["tasks"]["sent"]
    assert m["scored_by"] == "classifier head" and m["n"] == len(TEXTS)
    recs = [json.loads(x) for x in samples.read_text().splitlines()]
    want = direct(runs[name], TEXTS)
    assert [r["prediction"] for r in recs] == [LABELS[int(i)] for i in want.argmax(dim=-1)]
    got = torch.tensor([[r["probs"][lab] for lab in LABELS] for r in recs])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert m["accuracy"] == pytest.approx(sum(r["correct"] for r in recs) / len(recs))
    assert {"macro_f1", "per_class", "confusion_matrix"} <= set(m)


def test_eval_task_labels_must_be_the_models(runs, tmp_path, capsys):
    """A task label the classifier lacks: exit 2, one line naming both label sets; a subset is scored."""
    bad = _task(tmp_path / "bad.jsonl", labels=("negative", "positive", "angry"))
    line = _refused(capsys, str(runs["llama"]), "--task", str(bad))
    assert "['angry']" in line and "'neutral'" in line and "'angry'" in line
    subset = _task(tmp_path / "binary.jsonl", labels=("negative", "positive"))
    assert _eval(capsys, str(runs["llama"]), "--task", str(subset))["tasks"]["binary"]["n"] == len(TEXTS)


def test_eval_lm_only_kinds_and_loss_are_refused(runs, tmp_path, capsys):
    """A generate or choice task, and the loss on a data split, on a classifier: exit 2 in one line."""
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"kind": "generate", "prompt": "hi", "references": ["there"]}) + "\n")
    choice = tmp_path / "choice.jsonl"
    choice.write_text(json.dumps({"kind": "choice", "context": "a", "choices": ["b", "c"], "gold": 0}) + "\n")
    for path, kind in ((gen, "generate"), (choice, "choice")):
        line = _refused(capsys, str(runs["llama"]), "--task", str(path))
        assert f"is a {kind} task" in line and "classify tasks only" in line
    line = _refused(capsys, str(runs["llama"]), "--data", str(tmp_path))
    assert "is a classifier" in line and "--task" in line


def test_eval_long_texts_refused_or_left_truncated(runs, tmp_path, capsys):
    """A text longer than the context: exit 2 naming how many, unless --truncate, which keeps the last
    CONTEXT ids (the prediction equals the model's on them)."""
    long = "the plot drags on and on " * 4
    task = _task(tmp_path / "long.jsonl", texts=[long, "fine"])
    line = _refused(capsys, str(runs["llama"]), "--task", str(task))
    assert "1 of 2 texts" in line and "--truncate" in line
    samples = tmp_path / "s.jsonl"
    _eval(capsys, str(runs["llama"]), "--task", str(task), "--truncate", "--samples", str(samples))
    rec = json.loads(samples.read_text().splitlines()[0])
    want = direct(runs["llama"], [long], keep=CONTEXT)[0]
    assert rec["tokens"] == CONTEXT and rec["prediction"] == LABELS[int(want.argmax())]


@pytest.mark.parametrize("name, pad", [("llama", False), ("llama", True), ("nopad", True)])
def test_run_task_split_equals_run_task(runs, name, pad):
    """run_task_split over 2 workers (answers gathered by calling each block here) gives run_task's
    metrics and predictions; with pad every worker makes the same number of forward calls (FSDP
    gathers parameters in each), also for a classifier without a pad id (one input per call)."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.eval.harness import model_outputs, resolve_task, run_task, run_task_split, share, task_requests

    loaded = load_for_inference(runs[name])
    model, tok = loaded.model, loaded.tokenizer
    task = resolve_task(str(_task(Path(runs[name]) / "t.jsonl", texts=TEXTS[:5])))  # 5: blocks of 3 and 2
    ref_metrics, ref_samples = run_task(model, tok, task, batch_size=2, progress=False)
    req = task_requests(task, labels=LABELS)
    world, calls = 2, []
    for rank in range(world):
        def gather(mine: list, rank: int = rank) -> list[list]:
            return [mine if r == rank else model_outputs(model, tok, req, [req.items[i] for i in share(
                len(req.items), r, world)], batch_size=2, progress=False) for r in range(world)]

        counter = [0]

        def count(module, args, out, counter=counter) -> None:  # counts only this worker's own calls
            counter[0] += 1

        def gather_uncounted(mine: list, gather=gather) -> list[list]:
            h.remove()
            return gather(mine)

        h = model.register_forward_hook(count)
        metrics, samples = run_task_split(model, tok, task, rank=rank, world=world, gather=gather_uncounted,
                                          pad=pad, batch_size=2, progress=False)
        calls.append(counter[0])
        assert metrics == ref_metrics
        assert [s["prediction"] for s in samples] == [s["prediction"] for s in ref_samples]
        for s, t in zip(samples, ref_samples):
            assert s["probs"] == pytest.approx(t["probs"], abs=1e-5)
    if pad:
        assert calls[0] == calls[1], calls


# ---- serve ---------------------------------------------------------------------------------------

class Client:
    """create_app under starlette's TestClient (lifespan on), ready once /ready says so."""

    def __init__(self, run: Path, **settings) -> None:
        from starlette.testclient import TestClient

        from clusterlm.checkpoint.model_io import load_for_inference
        from clusterlm.serve.app import Settings, create_app

        self.app = create_app(lambda: load_for_inference(run), Settings(api_key=KEY, model_name="clf", **settings))
        self.tc = TestClient(self.app)

    def __enter__(self) -> Client:
        self.tc.__enter__()
        deadline = time.time() + 60
        while self.tc.get("/ready").status_code != 200:
            assert time.time() < deadline, self.tc.get("/ready").text
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.tc.__exit__(*exc)

    def post(self, path: str, body, key: str = KEY, **kw):
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return self.tc.post(path, content=data, headers={"Authorization": f"Bearer {key}"}, **kw)

    def get(self, path: str):
        return self.tc.get(path, headers={"Authorization": f"Bearer {KEY}"})


@pytest.fixture(scope="module")
def llama_client(runs):
    with Client(runs["llama"], max_batch=4, max_queue=8) as c:
        yield c


def test_serve_classify_response_shape_and_numbers(runs, llama_client):
    """POST /classify with a list: vLLM's response shape (id classify-<hex>, object list, data with
    index/label/probs/num_classes, usage with prompt_tokens = total_tokens); probs equal the model's
    softmax for each text alone (1e-5), label its argmax; /v1/models lists the labels."""
    texts = TEXTS + [""]  # the empty text is [EOS] alone
    r = llama_client.post("/classify", {"model": "clf", "input": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("classify-") and len(body["id"]) > len("classify-")
    assert body["object"] == "list" and body["model"] == "clf" and isinstance(body["created"], int)
    want = direct(runs["llama"], texts)
    assert [d["index"] for d in body["data"]] == list(range(len(texts)))
    for d, w in zip(body["data"], want):
        assert d["num_classes"] == 3 and d["label"] == LABELS[int(w.argmax())]
        assert d["probs"] == pytest.approx(w.tolist(), abs=1e-5)
    n = sum(1 + len(t.encode()) for t in texts)  # byte tokenizer: [EOS] + one id per byte
    assert body["usage"] == {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0,
                             "prompt_tokens_details": None}
    one = llama_client.post("/classify", {"input": TEXTS[0]}).json()  # no model field, a single string
    assert one["data"][0]["probs"] == pytest.approx(body["data"][0]["probs"], abs=1e-5)
    assert llama_client.get("/v1/models").json()["data"][0]["labels"] == list(LABELS)


def test_serve_classify_truncation(runs, llama_client):
    """A text longer than the context is left-truncated to it; truncate_prompt_tokens=k keeps the last
    k ids; k above the context: 400 naming it."""
    long = "the plot drags on and on " * 4
    for k, keep in ((None, CONTEXT), (-1, CONTEXT), (5, 5)):
        body = {"input": [long]} | ({} if k is None else {"truncate_prompt_tokens": k})
        got = llama_client.post("/classify", body).json()
        assert got["usage"]["prompt_tokens"] == keep
        assert got["data"][0]["probs"] == pytest.approx(direct(runs["llama"], [long], keep)[0].tolist(), abs=1e-5)
    r = llama_client.post("/classify", {"input": "x", "truncate_prompt_tokens": CONTEXT + 1})
    assert r.status_code == 400 and "truncate_prompt_tokens" in r.json()["error"]["message"]


@pytest.mark.parametrize("body, status, fragment", [
    ({"input": []}, 422, "1..1024"),
    ({"input": 3}, 422, "input"),
    ({"input": "x", "temperature": 1}, 422, "unknown field"),
    ({"input": "x", "truncate_prompt_tokens": -2}, 422, "truncate_prompt_tokens"),
    ({"input": "x", "model": "other"}, 404, "'other' is not served"),
    (b'{"input": "x"', 400, "not valid JSON"),
    ({"input": ["ok", "\ud800"]}, 400, "unpaired surrogate"),
])
def test_serve_classify_bad_requests(llama_client, body, status, fragment):
    """Bad bodies get the other routes' error shape: {"error": {"message", "type", "param", "code"}}."""
    data = json.dumps(body, ensure_ascii=True) if isinstance(body, dict) else body
    r = llama_client.post("/classify", data)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]


def test_serve_classify_auth_limits_and_metrics(llama_client):
    """No key: 401; a body over --max-body-bytes: 413; the Prometheus counters count /classify."""
    assert llama_client.post("/classify", {"input": "x"}, key="wrong").status_code == 401
    r = llama_client.post("/classify", {"input": "x" * (2 << 20)})
    assert r.status_code == 413
    before = llama_client.get("/metrics").text
    assert llama_client.post("/classify", {"input": ["a", "b"]}).status_code == 200
    after = llama_client.get("/metrics").text

    def value(text: str, name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
                   or line.startswith(name + "{"))

    assert value(after, "clusterlm_classified_inputs_total") - value(before, "clusterlm_classified_inputs_total") == 2
    assert value(after, "clusterlm_prompt_tokens_total") - value(before, "clusterlm_prompt_tokens_total") == 4
    assert 'clusterlm_http_requests_total{route="/classify",status="200"}' in after


def test_serve_classifier_refuses_generation_and_lm_refuses_classify(runs, llama_client):
    """A classifier loaded: /v1/completions and /v1/chat/completions answer 400 'use /classify'; an LM
    loaded: /classify answers 400 naming the model kind (and its completions still work)."""
    for path, body in (("/v1/completions", {"model": "clf", "prompt": "hi", "max_tokens": 2}),
                       ("/v1/chat/completions", {"model": "clf", "messages": [{"role": "user", "content": "hi"}]})):
        r = llama_client.post(path, body)
        assert r.status_code == 400 and r.json()["error"]["message"] == "this model is a classifier; use /classify"
    with Client(runs["lm"], max_batch=2) as lm:
        r = lm.post("/classify", {"input": "x"})
        assert r.status_code == 400 and "language model (model.arch='transformer')" in r.json()["error"]["message"]
        assert lm.post("/v1/completions", {"model": "clf", "prompt": "hi", "max_tokens": 2}).status_code == 200
        assert "labels" not in lm.get("/v1/models").json()["data"][0]


def test_serve_lstm_classifier(runs):
    """An LSTM classifier (no context limit, mean pooling) answers /classify with its own numbers."""
    with Client(runs["lstm"], max_batch=2) as c:
        body = c.post("/classify", {"input": TEXTS}).json()
    want = direct(runs["lstm"], TEXTS)
    for d, w in zip(body["data"], want):
        assert d["probs"] == pytest.approx(w.tolist(), abs=1e-5)


def test_eval_labels_rename_a_tasks_labels_to_the_models(runs, tmp_path, capsys):
    """The refusal of a task with other labels says to rename them with `--labels RAW=NAME,...`; that
    renames them (load_task's labels mapping), and the scores equal those of the task written with the
    model's labels. Before, --labels took only a label set, so `--labels negative,...` on a 0/1/2 file
    was refused again ("unknown label '0'")."""
    raw = _task(tmp_path / "raw.jsonl", labels=("0", "1", "2"))
    line = _refused(capsys, str(runs["llama"]), "--task", str(raw))
    assert "clusterlm eval --labels RAW=NAME,..." in line
    want = _eval(capsys, str(runs["llama"]), "--task", str(_task(tmp_path / "named.jsonl")))
    got = _eval(capsys, str(runs["llama"]), "--task", str(raw), "--labels", "0=negative,1=neutral,2=positive")
    assert got["tasks"]["raw"]["accuracy"] == want["tasks"]["named"]["accuracy"]
    assert got["tasks"]["raw"]["confusion_matrix"] == want["tasks"]["named"]["confusion_matrix"]
    assert "'1=neutral=x' is not RAW=NAME" in _refused(capsys, str(runs["llama"]), "--task", str(raw),
                                                        "--labels", "0=negative,1=neutral=x")
    gen = tmp_path / "gen.jsonl"  # --labels on a task without labels was ignored without a word
    gen.write_text('{"prompt": "a b", "references": ["c"]}\n')
    line = _refused(capsys, str(runs["llama"]), "--task", str(gen), "--labels", "a,b")
    assert "--labels applies to classify tasks; 'gen' (generate) is not one" in line, line
