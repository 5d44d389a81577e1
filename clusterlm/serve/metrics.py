"""Prometheus metrics of one server, in their own registry (several apps can live in one process).

The table with units and the vLLM metric each one corresponds to is docs/monitoring.md; the
names (`NAMES`) are what deploy/prometheus/alerts.yml and deploy/grafana/clusterlm.json may use
(tests/unit/test_serve_metrics.py checks both against this list). Per-request figures carry a
`model` label (the served model name), so dashboards compare models and replicas as they would
vLLM's `model_name`. Exposed at /metrics (API key required), or key-free on `--metrics-port`.

    m = Metrics(model="shakespeare", instance_id="node1:8000", max_batch=16, max_queue=64)
    m.ttft.observe(0.012)                 # the `model` label is bound here
    generate_latest(m.registry)
"""

from __future__ import annotations

import sys

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector,
                               ProcessCollector)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# whole requests: queueing plus hundreds of decode steps (vLLM's e2e buckets stop at 7680 s too)
_REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)

# every series name the server exports (histograms as their base name); process_* come from
# prometheus_client's process collector (Linux only)
NAMES = (
    "clusterlm_http_requests_total", "clusterlm_sequences_finished_total", "clusterlm_queue_depth",
    "clusterlm_queue_limit", "clusterlm_running_sequences", "clusterlm_prompt_tokens_total",
    "clusterlm_generated_tokens_total", "clusterlm_time_to_first_token_seconds",
    "clusterlm_inter_token_latency_seconds", "clusterlm_request_latency_seconds",
    "clusterlm_request_queue_seconds", "clusterlm_request_prompt_tokens", "clusterlm_request_generation_tokens",
    "clusterlm_requests_aborted_total", "clusterlm_kv_slots_used", "clusterlm_kv_slots_total",
    "clusterlm_classified_inputs_total", "clusterlm_classify_seconds", "clusterlm_instance_info",
    "clusterlm_ready", "clusterlm_draining", "process_cpu_seconds_total", "process_resident_memory_bytes",
    "process_open_fds", "process_start_time_seconds",
)


class Metrics:
    def __init__(self, model: str = "default", instance_id: str = "", max_batch: int = 0, max_queue: int = 0,
                 version: str | None = None) -> None:
        if version is None:
            from clusterlm import __version__ as version
        r = self.registry = CollectorRegistry()
        self.model = model
        # ---- server-wide (names and labels kept as before: tests and dashboards key on them) ----
        self.requests = Counter("clusterlm_http_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.finished = Counter("clusterlm_sequences_finished", "Generated sequences by finish reason",
                                ["reason"], registry=r)
        self.queue_depth = Gauge("clusterlm_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.queue_limit = Gauge("clusterlm_queue_limit", "--max-queue: waiting requests beyond the free slots "
                                 "before 429", registry=r)
        self.queue_limit.set(max_queue)
        self.running = Gauge("clusterlm_running_sequences", "Sequences in the running batch", registry=r)
        self.prompt_tokens = Counter("clusterlm_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("clusterlm_generated_tokens", "Tokens generated (EOS not counted)",
                                        registry=r)
        self.classified = Counter("clusterlm_classified_inputs", "Texts answered by /classify", registry=r)
        self.classify_time = Histogram("clusterlm_classify_seconds", "A /classify request's forward passes",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.ready = Gauge("clusterlm_ready", "1 when /ready answers 200 (loaded, warmed up, not draining)",
                           registry=r)
        self.draining = Gauge("clusterlm_draining", "1 from SIGTERM until exit (/ready 503, new requests 503)",
                              registry=r)
        self.aborted = Counter("clusterlm_requests_aborted", "Requests ended with an error event when the drain "
                               "deadline passed", registry=r)
        info = Info("clusterlm_instance", "This replica: --instance-id, clusterlm version, served model",
                    registry=r)
        info.info({"instance_id": instance_id, "version": version, "model": model})
        # ---- per request, with the model label bound (vLLM: time_to_first_token_seconds, ...) ----
        m = [model]
        self.ttft = Histogram("clusterlm_time_to_first_token_seconds", "Submit to first sampled token", ["model"],
                              buckets=_LATENCY_BUCKETS, registry=r).labels(*m)
        self.itl = Histogram("clusterlm_inter_token_latency_seconds", "Time between a sequence's tokens", ["model"],
                             buckets=_LATENCY_BUCKETS, registry=r).labels(*m)
        self.latency = Histogram("clusterlm_request_latency_seconds", "Submit to the last choice finished "
                                 "(end to end in the server: queue, prefill, decode)", ["model"],
                                 buckets=_REQUEST_BUCKETS, registry=r).labels(*m)
        self.queue_time = Histogram("clusterlm_request_queue_seconds", "Submit to admission into the batch",
                                    ["model"], buckets=_LATENCY_BUCKETS + (60.0, 120.0), registry=r).labels(*m)
        self.prompt_len = Histogram("clusterlm_request_prompt_tokens", "Prompt tokens of a request (with the "
                                    "leading EOS)", ["model"], buckets=_TOKEN_BUCKETS, registry=r).labels(*m)
        self.generation_len = Histogram("clusterlm_request_generation_tokens", "Tokens generated for a finished "
                                        "request, summed over its n choices", ["model"], buckets=_TOKEN_BUCKETS,
                                        registry=r).labels(*m)
        self.kv_used = Gauge("clusterlm_kv_slots_used", "KV-cache (or RNN state) slots held by running sequences",
                             ["model"], registry=r).labels(*m)
        self.kv_total = Gauge("clusterlm_kv_slots_total", "KV-cache slots (--max-batch)", ["model"],
                              registry=r).labels(*m)
        self.kv_total.set(max_batch)
        # ---- the process: CPU seconds, resident memory, open files, start time; Python version ----
        if sys.platform.startswith("linux"):
            ProcessCollector(registry=r)
        PlatformCollector(registry=r)
