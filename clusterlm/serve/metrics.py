"""Prometheus metrics of one server, in their own registry (several apps can live in one process).

Names: clusterlm_http_requests_total{route,status}, clusterlm_sequences_finished_total{reason}
(stop | length | cancelled), clusterlm_queue_depth, clusterlm_running_sequences,
clusterlm_prompt_tokens_total, clusterlm_generated_tokens_total, clusterlm_time_to_first_token_seconds,
clusterlm_inter_token_latency_seconds; for a classifier clusterlm_classified_inputs_total and
clusterlm_classify_seconds (prompt tokens count in clusterlm_prompt_tokens_total). Exposed at /metrics (API key required).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("clusterlm_http_requests", "HTTP requests by route and status code",
                                ["route", "status"], registry=r)
        self.finished = Counter("clusterlm_sequences_finished", "Generated sequences by finish reason",
                                ["reason"], registry=r)
        self.queue_depth = Gauge("clusterlm_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.running = Gauge("clusterlm_running_sequences", "Sequences in the running batch", registry=r)
        self.prompt_tokens = Counter("clusterlm_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("clusterlm_generated_tokens", "Tokens generated (EOS not counted)",
                                        registry=r)
        self.ttft = Histogram("clusterlm_time_to_first_token_seconds", "Submit to first sampled token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.classified = Counter("clusterlm_classified_inputs", "Texts answered by /classify", registry=r)
        self.classify_time = Histogram("clusterlm_classify_seconds", "A /classify request's forward passes",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("clusterlm_inter_token_latency_seconds", "Time between a sequence's tokens",
                             buckets=_LATENCY_BUCKETS, registry=r)
