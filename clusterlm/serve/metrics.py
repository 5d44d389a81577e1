"""Prometheus metrics of one server, in their own registry (several apps can live in one process).

The table with units and the vLLM metric each one corresponds to is docs/monitoring.md; the
names (`NAMES`) are what deploy/prometheus/alerts.yml and deploy/grafana/clusterlm.json may use
(tests/unit/test_serve_metrics.py checks both against this list). One set of metric families
serves every model of the server: what a model's scheduler or /classify does carries its `model`
label (the served model name), so dashboards compare models and replicas as they would vLLM's
`model_name`. Exposed at /metrics (API key required), or key-free on `--metrics-port`.

    m = Metrics(instance_id="node1:8000")
    a = m.model("shakespeare", max_batch=16, max_queue=64)   # the families with model="shakespeare" bound
    a.ttft.observe(0.012)
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
# queue waits reach HAProxy's `timeout server` (120 s); time to first token includes the wait
_QUEUE_BUCKETS = _LATENCY_BUCKETS + (60.0, 120.0)

# every series name the server exports (histograms as their base name); process_* come from
# prometheus_client's process collector (Linux only)
NAMES = (
    "clusterlm_http_requests_total", "clusterlm_sequences_finished_total", "clusterlm_queue_depth",
    "clusterlm_queue_limit", "clusterlm_running_sequences", "clusterlm_prompt_tokens_total",
    "clusterlm_generated_tokens_total", "clusterlm_time_to_first_token_seconds",
    "clusterlm_inter_token_latency_seconds", "clusterlm_request_latency_seconds",
    "clusterlm_request_queue_seconds", "clusterlm_request_prompt_tokens", "clusterlm_request_generation_tokens",
    "clusterlm_requests_aborted_total", "clusterlm_kv_slots_used", "clusterlm_kv_slots_total",
    "clusterlm_classified_inputs_total", "clusterlm_classify_seconds", "clusterlm_model_memory_bytes",
    "clusterlm_instance_info", "clusterlm_ready", "clusterlm_draining", "process_cpu_seconds_total",
    "process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds",
)


class Metrics:
    """The server's registry: server-wide series (HTTP requests, ready, draining) and the labelled
    families every model shares; `model(name, ...)` binds one model's label."""

    def __init__(self, instance_id: str = "", version: str | None = None) -> None:
        if version is None:
            from clusterlm import __version__ as version
        r = self.registry = CollectorRegistry()
        self.instance_id, self.version = instance_id, version
        # ---- server-wide (names and labels kept as before: tests and dashboards key on them) ----
        self.requests = Counter("clusterlm_http_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.ready = Gauge("clusterlm_ready", "1 when /ready answers 200 (loaded, warmed up, not draining)",
                           registry=r)
        self.draining = Gauge("clusterlm_draining", "1 from SIGTERM until exit (/ready 503, new requests 503)",
                              registry=r)
        self.info = Info("clusterlm_instance", "This replica: --instance-id, clusterlm version; one series per "
                         "served model", ["model"], registry=r)
        # ---- per model (vLLM: time_to_first_token_seconds, ... with model_name) ----
        m = ["model"]
        self.finished = Counter("clusterlm_sequences_finished", "Generated sequences by finish reason",
                                ["model", "reason"], registry=r)
        self.queue_depth = Gauge("clusterlm_queue_depth", "Requests waiting for a batch slot", m, registry=r)
        self.queue_limit = Gauge("clusterlm_queue_limit", "--max-queue: waiting requests beyond the free slots "
                                 "before 429", m, registry=r)
        self.running = Gauge("clusterlm_running_sequences", "Sequences in the running batch", m, registry=r)
        self.prompt_tokens = Counter("clusterlm_prompt_tokens", "Prompt tokens prefilled", m, registry=r)
        self.generated_tokens = Counter("clusterlm_generated_tokens", "Tokens generated (EOS not counted)", m,
                                        registry=r)
        self.classified = Counter("clusterlm_classified_inputs", "Texts answered by /classify", m, registry=r)
        self.classify_time = Histogram("clusterlm_classify_seconds", "A /classify request's forward passes", m,
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.aborted = Counter("clusterlm_requests_aborted", "Requests ended with an error event when the drain "
                               "deadline passed", m, registry=r)
        self.ttft = Histogram("clusterlm_time_to_first_token_seconds", "Submit to first sampled token", m,
                              buckets=_QUEUE_BUCKETS, registry=r)
        self.itl = Histogram("clusterlm_inter_token_latency_seconds", "Time between a sequence's tokens", m,
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("clusterlm_request_latency_seconds", "Submit to the last choice finished "
                                 "(end to end in the server: queue, prefill, decode)", m,
                                 buckets=_REQUEST_BUCKETS, registry=r)
        self.queue_time = Histogram("clusterlm_request_queue_seconds", "Submit to admission into the batch",
                                    m, buckets=_QUEUE_BUCKETS, registry=r)
        self.prompt_len = Histogram("clusterlm_request_prompt_tokens", "Prompt tokens of a request (with the "
                                    "leading EOS)", m, buckets=_TOKEN_BUCKETS, registry=r)
        self.generation_len = Histogram("clusterlm_request_generation_tokens", "Tokens generated for a finished "
                                        "request, summed over its n choices", m, buckets=_TOKEN_BUCKETS, registry=r)
        self.kv_used = Gauge("clusterlm_kv_slots_used", "KV-cache (or RNN state) slots held by running sequences",
                             m, registry=r)
        self.kv_total = Gauge("clusterlm_kv_slots_total", "KV-cache slots (--max-batch)", m, registry=r)
        self.memory = Gauge("clusterlm_model_memory_bytes", "Bytes a model holds on its device: kind=parameters "
                            "(weights and buffers) or kv_cache (the slot cache, or RNN state slots)",
                            ["model", "kind"], registry=r)
        # ---- the process: CPU seconds, resident memory, open files, start time; Python version ----
        if sys.platform.startswith("linux"):
            ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    def model(self, name: str, max_batch: int = 0, max_queue: int = 0) -> ModelMetrics:
        """The families with `model=name` bound (what one model's scheduler and /classify record into);
        its info series, queue limit and slot total are set here."""
        self.info.labels(name).info({"instance_id": self.instance_id, "version": self.version})
        return ModelMetrics(self, name, max_batch, max_queue)


class _Labelled:
    """A family with the model label bound and further labels still open: `.labels(reason)`."""

    def __init__(self, family: Counter, model: str) -> None:
        self.family, self.model = family, model

    def labels(self, *values: str) -> Counter:
        return self.family.labels(self.model, *values)


class ModelMetrics:
    """One model's children of the shared families, under the attribute names the scheduler uses."""

    def __init__(self, m: Metrics, name: str, max_batch: int, max_queue: int) -> None:
        self.name, self.registry = name, m.registry
        for attr in ("queue_depth", "queue_limit", "running", "prompt_tokens", "generated_tokens", "classified",
                     "classify_time", "aborted", "ttft", "itl", "latency", "queue_time", "prompt_len",
                     "generation_len", "kv_used", "kv_total"):
            setattr(self, attr, getattr(m, attr).labels(name))
        self.finished = _Labelled(m.finished, name)
        self._memory = m.memory
        self.queue_limit.set(max_queue)
        self.kv_total.set(max_batch)

    def set_memory(self, parameters: int, kv_cache: int) -> None:
        self._memory.labels(self.name, "parameters").set(parameters)
        self._memory.labels(self.name, "kv_cache").set(kv_cache)
