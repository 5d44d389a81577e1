"""Serving metrics and the monitoring files that use them: the scheduler's per-request histograms
counted against what the requests did, the drain abort, and deploy/prometheus + deploy/grafana
checked against the exported names (promtool where installed; CI=true requires it)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from clusterlm.serve.metrics import NAMES, Metrics
from tests.helpers import collect_events, random_checkpoint, require_binary

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
DASH = ROOT / "deploy" / "grafana"


def _require(binary: str) -> str:
    return require_binary(binary, 'prometheus')


def _value(m: Metrics, name: str) -> float:
    return m.registry.get_sample_value(name, {"model": "m"})


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    from clusterlm.checkpoint.model_io import load_for_inference

    run = random_checkpoint(tmp_path_factory.mktemp("m"), "byte", "hello world " * 20, bpe_vocab=0, n_layers=1,
                            context=512)
    return load_for_inference(run)


def _collect(sched, ids: list[int], n: int, max_tokens: int, abort_after: int | None = None) -> list:
    from clusterlm.serve.scheduler import SamplingParams

    return collect_events(sched, ids, n, SamplingParams(max_tokens=max_tokens, temperature=0), abort_after=abort_after)


def test_request_histograms_count_what_the_requests_did(loaded):
    """Two requests (n=2 x 6 tokens, n=1 x 3 tokens, greedy on random weights: no EOS): latency,
    queue-time and length histograms have 2 observations each; the prompt-length sum is the prompt
    ids, the generation-length sum is 15 tokens = clusterlm_generated_tokens_total; KV slots back to
    0 of 4; the info metric names the instance."""
    from clusterlm.serve.scheduler import Finished, Scheduler

    m = Metrics(instance_id="r9")
    sched = Scheduler(loaded.model, loaded.tokenizer, max_batch=4, max_queue=8, metrics=m.model("m", 4, 8))
    sched.start()
    try:
        a = _collect(sched, [0, 5, 6, 7], n=2, max_tokens=6)
        b = _collect(sched, [0, 9], n=1, max_tokens=3)
    finally:
        sched.stop()
    assert sum(ev.tokens for ev in a + b if isinstance(ev, Finished)) == 15
    for name in ("clusterlm_request_latency_seconds", "clusterlm_request_queue_seconds",
                 "clusterlm_request_prompt_tokens", "clusterlm_request_generation_tokens"):
        assert _value(m, name + "_count") == 2, name
    assert _value(m, "clusterlm_request_prompt_tokens_sum") == 6
    assert _value(m, "clusterlm_request_generation_tokens_sum") == 15
    assert _value(m, "clusterlm_generated_tokens_total") == 15
    assert _value(m, "clusterlm_time_to_first_token_seconds_count") == 3  # one per choice
    assert _value(m, "clusterlm_kv_slots_used") == 0 and _value(m, "clusterlm_kv_slots_total") == 4
    assert _value(m, "clusterlm_queue_limit") == 8
    text = generate_latest(m.registry).decode()
    assert re.search(r'clusterlm_instance_info\{(?=[^}]*instance_id="r9")(?=[^}]*model="m")[^}]*version="', text)
    assert "process_cpu_seconds_total" in text or not sys.platform.startswith("linux")


def test_abort_fails_running_requests_and_frees_slots(loaded):
    """Scheduler.abort (the drain deadline): a running request gets Failed(message), its slots are
    freed (kv used 0, running 0) and clusterlm_requests_aborted_total counts it."""
    from clusterlm.serve.scheduler import Failed, Scheduler

    m = Metrics()
    sched = Scheduler(loaded.model, loaded.tokenizer, max_batch=2, max_queue=2, metrics=m.model("m", 2, 2))
    sched.start()
    try:
        events = _collect(sched, [0, 5], n=1, max_tokens=500, abort_after=3)
    finally:
        sched.stop()
    assert isinstance(events[-1], Failed) and events[-1].message == "stop"
    assert _value(m, "clusterlm_requests_aborted_total") == 1
    assert _value(m, "clusterlm_kv_slots_used") == 0 and _value(m, "clusterlm_running_sequences") == 0


def _names_in(expr: str) -> set[str]:
    names = set(re.findall(r"\b((?:clusterlm|process)_[a-z_]+)", expr))
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}


def test_dashboard_is_generated_and_uses_only_exported_series():
    """deploy/grafana/clusterlm.json equals make_dashboard.py's output; every query names only series in
    metrics.NAMES (or Prometheus' `up`); ids are unique and panels do not overlap in a row."""
    r = subprocess.run([sys.executable, str(DASH / "make_dashboard.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    dash = json.loads((DASH / "clusterlm.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 20
    unknown = {n for e in exprs for n in _names_in(e)} - set(NAMES)
    assert unknown == set()
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for y in {p["gridPos"]["y"] for p in dash["panels"]}:
        assert sum(p["gridPos"]["w"] for p in dash["panels"] if p["gridPos"]["y"] == y) <= 24


def test_dashboard_queries_parse_with_promtool(tmp_path):
    """Each dashboard query (variables filled in) as a recording rule: `promtool check rules` parses it."""
    promtool = _require("promtool")
    dash = json.loads((DASH / "clusterlm.json").read_text())
    rules = [{"record": f"dashboard:q{i}", "expr": t["expr"].replace("$model", ".*").replace("$instance", ".*")
              .replace("$__rate_interval", "1m")}
             for i, t in enumerate(t for p in dash["panels"] for t in p.get("targets", []))]
    f = tmp_path / "dash_rules.yml"
    f.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    r = subprocess.run([promtool, "check", "rules", str(f)], capture_output=True, text=True)
    assert r.returncode == 0 and f"{len(rules)} rules found" in r.stdout, r.stdout + r.stderr


def test_alert_rules_check_and_unit_tests_pass():
    """`promtool check rules alerts.yml` and `promtool test rules alerts_test.yml` (each alert fires
    on its synthetic series, and not before its `for`); the rules name only exported series."""
    promtool = _require("promtool")
    r = subprocess.run([promtool, "check", "rules", str(PROM / "alerts.yml")], capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS: 5 rules found" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([promtool, "test", "rules", str(PROM / "alerts_test.yml")], capture_output=True, text=True)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    assert _names_in((PROM / "alerts.yml").read_text()) - set(NAMES) == set()
    r = subprocess.run([promtool, "check", "config", str(PROM / "prometheus.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_exported_name_is_documented():
    """docs/monitoring.md's table lists every name in metrics.NAMES."""
    doc = (ROOT / "docs" / "monitoring.md").read_text()
    assert [n for n in NAMES if f"`{n}`" not in doc] == []


def test_time_to_first_token_buckets_reach_as_far_as_queue_time():
    """TTFT is queue time plus prefill, so its buckets must reach at least as far as queue time's
    (120 s, HAProxy's `timeout server`): they stopped at 30 s, so a TTFT of 40-120 s fell in +Inf and
    the dashboard's p95 (histogram_quantile) showed 30 s while queue time showed the real wait."""
    m = Metrics()
    sm = m.model("m", 4, 8)
    sm.queue_time.observe(45.0)
    sm.ttft.observe(45.5)

    def top(name: str) -> float:
        return max(float(s.labels["le"]) for f in m.registry.collect() for s in f.samples
                   if s.name == name + "_bucket" and s.labels["le"] != "+Inf")

    assert top("clusterlm_time_to_first_token_seconds") >= top("clusterlm_request_queue_seconds") == 120
    le60 = {"model": "m", "le": "60.0"}
    assert m.registry.get_sample_value("clusterlm_time_to_first_token_seconds_bucket", le60) == 1


def test_requests_cancelled_while_queued_give_their_queue_place_back(loaded):
    """Clients that leave while their requests wait (timeouts under load) free the queue at once: a
    live client is not answered 429 for a queue full of requests nobody reads, the depth gauge drops,
    and the dropped choices are counted as cancelled. The scheduler is not started, so nothing is
    admitted meanwhile."""
    from clusterlm.serve.scheduler import QueueFull, SamplingParams, Scheduler

    m = Metrics()
    sched = Scheduler(loaded.model, loaded.tokenizer, max_batch=1, max_queue=1, metrics=m.model("m", 1, 1))
    loop = asyncio.new_event_loop()
    try:
        params = SamplingParams(max_tokens=4)
        gone = [sched.submit([0, 5], 1, params, loop) for _ in range(2)]  # queue bound + the free slot
        with pytest.raises(QueueFull):
            sched.submit([0, 5], 1, params, loop)
        for r in gone:
            r.cancel()
        sched.submit([0, 5], 1, params, loop)
    finally:
        loop.close()
    assert _value(m, "clusterlm_queue_depth") == 1
    assert m.registry.get_sample_value("clusterlm_sequences_finished_total", {"model": "m", "reason": "cancelled"}) == 2


def test_queue_bound_counts_requests_beyond_the_free_slots_by_their_n(loaded):
    """--max-queue is the number of requests that may wait beyond the free slots, and a request of
    n choices takes n slots: with 4 free slots and max_queue=0, one n=4 request fits and a second
    one is answered QueueFull (429). Before, free slots were counted as requests, so four n=4
    requests were taken, three of them waiting beyond the slots. n=1 requests are bounded as before."""
    from clusterlm.serve.scheduler import QueueFull, SamplingParams, Scheduler

    m = Metrics()
    loop = asyncio.new_event_loop()
    try:
        params = SamplingParams(max_tokens=4)
        sched = Scheduler(loaded.model, loaded.tokenizer, max_batch=4, max_queue=0, metrics=m.model("m", 4, 0))
        sched.submit([0, 5], 4, params, loop)
        with pytest.raises(QueueFull):
            sched.submit([0, 5], 4, params, loop)
        with pytest.raises(QueueFull):
            sched.submit([0, 5], 1, params, loop)
        sched = Scheduler(loaded.model, loaded.tokenizer, max_batch=4, max_queue=1, metrics=m.model("m2", 4, 1))
        for n in (2, 2, 3):  # two fit the 4 slots, the third waits beyond them: max_queue=1 allows it
            sched.submit([0, 5], n, params, loop)
        with pytest.raises(QueueFull):
            sched.submit([0, 5], 1, params, loop)
        sched = Scheduler(loaded.model, loaded.tokenizer, max_batch=2, max_queue=1, metrics=m.model("m3", 2, 1))
        for _ in range(3):  # n=1: the 2 free slots + 1 queued, as before
            sched.submit([0, 5], 1, params, loop)
        with pytest.raises(QueueFull):
            sched.submit([0, 5], 1, params, loop)
    finally:
        loop.close()
