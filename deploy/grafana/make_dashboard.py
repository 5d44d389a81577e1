"""Writes deploy/grafana/clusterlm.json: the Grafana dashboard of `clusterlm serve` replicas.

    python deploy/grafana/make_dashboard.py            # rewrite clusterlm.json
    python deploy/grafana/make_dashboard.py --check    # exit 1 if clusterlm.json is out of date

Plain JSON (Grafana's dashboard schema, version 39; no grafanalib dependency). Import it in
Grafana (Dashboards > New > Import) and pick the Prometheus data source for ${DS_PROMETHEUS}.
Every query uses only series the server exports (clusterlm/serve/metrics.py NAMES) plus `up`;
tests/e2e/test_prometheus.py runs each one against a real Prometheus scraping a live server.
Variables: $model and $instance (multi-select, "All" = .*); panels use `[$__rate_interval]`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("clusterlm.json")
SEL = 'model=~"$model", instance=~"$instance"'  # per-request series (they carry `model`)
INST = 'instance=~"$instance"'
RI = "[$__rate_interval]"


def q(p: float, metric: str, by: str = "model") -> str:
    return f"histogram_quantile({p}, sum by ({by}, le) (rate({metric}_bucket{{{SEL}}}{RI})))"


# (title, unit, [(expr, legend)], width)
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]], int]]]] = [
    ("Traffic", [
        ("Requests/s by route and status", "reqps",
         [(f'sum by (route, status) (rate(clusterlm_http_requests_total{{{INST}, route=~"/v1/.*|/classify|/tokenize"}}{RI}))',
           "{{route}} {{status}}")], 8),
        ("5xx share of API requests", "percentunit",
         [(f'(sum(rate(clusterlm_http_requests_total{{{INST}, route=~"/v1/.*|/classify|/tokenize", status=~"5.."}}{RI})) '
           f'or vector(0)) / sum(rate(clusterlm_http_requests_total{{{INST}, route=~"/v1/.*|/classify|/tokenize"}}{RI}))',
           "5xx share")], 8),
        ("Replicas: scraped, ready, draining", "short",
         [('sum(up{job="clusterlm"})', "up"), (f"sum(clusterlm_ready{{{INST}}})", "ready"),
          (f"sum(clusterlm_draining{{{INST}}})", "draining")], 8),
    ]),
    ("Latency", [
        ("End-to-end request latency", "s",
         [(q(0.5, "clusterlm_request_latency_seconds"), "p50 {{model}}"),
          (q(0.95, "clusterlm_request_latency_seconds"), "p95 {{model}}"),
          (q(0.99, "clusterlm_request_latency_seconds"), "p99 {{model}}")], 8),
        ("Time to first token", "s",
         [(q(0.5, "clusterlm_time_to_first_token_seconds"), "p50 {{model}}"),
          (q(0.95, "clusterlm_time_to_first_token_seconds"), "p95 {{model}}")], 8),
        ("Queue time and inter-token latency", "s",
         [(q(0.95, "clusterlm_request_queue_seconds"), "queue p95 {{model}}"),
          (q(0.5, "clusterlm_inter_token_latency_seconds"), "ITL p50 {{model}}"),
          (q(0.95, "clusterlm_inter_token_latency_seconds"), "ITL p95 {{model}}")], 8),
    ]),
    ("Tokens", [
        ("Tokens/s", "short",
         [(f"sum by (instance) (rate(clusterlm_generated_tokens_total{{{INST}}}{RI}))", "generated {{instance}}"),
          (f"sum by (instance) (rate(clusterlm_prompt_tokens_total{{{INST}}}{RI}))", "prompt {{instance}}")], 8),
        ("Prompt and generation length (tokens)", "short",
         [(q(0.5, "clusterlm_request_prompt_tokens"), "prompt p50 {{model}}"),
          (q(0.95, "clusterlm_request_prompt_tokens"), "prompt p95 {{model}}"),
          (q(0.5, "clusterlm_request_generation_tokens"), "generation p50 {{model}}"),
          (q(0.95, "clusterlm_request_generation_tokens"), "generation p95 {{model}}")], 8),
        ("Finished sequences/s by reason", "short",
         [(f"sum by (reason) (rate(clusterlm_sequences_finished_total{{{INST}}}{RI}))", "{{reason}}"),
          (f"sum(rate(clusterlm_requests_aborted_total{{{INST}}}{RI}))", "aborted at drain deadline")], 8),
    ]),
    ("Capacity", [
        ("Queue: waiting vs --max-queue", "short",
         [(f"sum by (instance) (clusterlm_queue_depth{{{INST}}})", "waiting {{instance}}"),
          (f"sum by (instance) (clusterlm_queue_limit{{{INST}}})", "limit {{instance}}")], 8),
        ("KV slots used (share of --max-batch)", "percentunit",
         [(f"sum by (instance, model) (clusterlm_kv_slots_used{{{SEL}}}) / "
           f"sum by (instance, model) (clusterlm_kv_slots_total{{{SEL}}})", "{{instance}} {{model}}"),
          (f"sum by (instance) (clusterlm_running_sequences{{{INST}}}) / "
           f"sum by (instance) (clusterlm_kv_slots_total{{{INST}}})", "running {{instance}}")], 8),
        ("Process: CPU cores used, resident memory; each model's parameters and KV cache", "short",
         [(f'sum by (instance) (rate(process_cpu_seconds_total{{job="clusterlm", {INST}}}{RI}))', "CPU {{instance}}"),
          (f'sum by (instance) (process_resident_memory_bytes{{job="clusterlm", {INST}}}) / 2^30',
           "RSS GiB {{instance}}"),
          (f"sum by (instance, model, kind) (clusterlm_model_memory_bytes{{{SEL}}}) / 2^30",
           "{{model}} {{kind}} GiB {{instance}}")], 8),
    ]),
]
INFO_TABLE = ("Replicas: instance id, version, model",
              f"max by (instance, instance_id, version, model) (clusterlm_instance_info{{{INST}}})")


def panels() -> list[dict]:
    out, pid, y = [], 1, 0
    for row_title, items in ROWS:
        out.append({"type": "row", "title": row_title, "id": pid, "collapsed": False,
                    "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}, "panels": []})
        pid, y, x = pid + 1, y + 1, 0
        for title, unit, targets, w in items:
            out.append({
                "type": "timeseries", "title": title, "id": pid, "datasource": {"type": "prometheus",
                                                                               "uid": "${DS_PROMETHEUS}"},
                "gridPos": {"x": x, "y": y, "w": w, "h": 8},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
                "targets": [{"expr": e, "legendFormat": lg, "refId": chr(65 + i),
                             "datasource": {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}}
                            for i, (e, lg) in enumerate(targets)],
            })
            pid, x = pid + 1, x + w
        y += 8
    title, expr = INFO_TABLE
    out.append({"type": "table", "title": title, "id": pid, "gridPos": {"x": 0, "y": y, "w": 24, "h": 6},
                "datasource": {"type": "prometheus", "uid": "${DS_PROMETHEUS}"},
                "targets": [{"expr": expr, "format": "table", "instant": True, "refId": "A",
                             "datasource": {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}}],
                "transformations": [{"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}]})
    return out


def variable(name: str, query: str) -> dict:
    return {"name": name, "label": name, "type": "query", "datasource": {"type": "prometheus",
                                                                       "uid": "${DS_PROMETHEUS}"},
            "query": {"query": query, "refId": f"var-{name}"}, "definition": query, "refresh": 2,
            "includeAll": True, "allValue": ".*", "multi": True, "current": {"text": "All", "value": "$__all"},
            "sort": 1}


def dashboard() -> dict:
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource", "pluginId": "prometheus",
                      "pluginName": "Prometheus"}],
        "title": "clusterlm serve", "uid": "clusterlm-serve", "tags": ["clusterlm", "llm"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [variable("model", "label_values(clusterlm_instance_info, model)"),
                                variable("instance", "label_values(clusterlm_instance_info, instance)")]},
        "annotations": {"list": []},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv[1:]:
        if not OUT.exists() or OUT.read_text() != text:
            sys.exit(f"{OUT} is out of date: run python {Path(__file__).name}")
    else:
        OUT.write_text(text)
