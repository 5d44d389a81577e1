"""Debian's real `prometheus` scraping a live `clusterlm serve` through --metrics-port.

A temporary config (scrape interval 1 s, the repo's deploy/prometheus/alerts.yml loaded as rules),
its own storage directory and free port. After a few completions every series in
clusterlm/serve/metrics.py NAMES (the table of docs/monitoring.md) is read back through the HTTP
API, and every query of deploy/grafana/clusterlm.json returns data. Skipped without `prometheus`
(apt-get install -y prometheus), except in CI (CI=true), where it fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusterlm.serve.metrics import NAMES
from tests.helpers import random_checkpoint, require_binary

httpx = pytest.importorskip("httpx2")

ROOT = Path(__file__).resolve().parents[2]
KEY = "prom-key-0123"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _require(binary: str) -> str:
    return require_binary(binary)


def dashboard_queries(model: str = ".*", instance: str = ".*", window: str = "30s") -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of the dashboard, its variables filled in."""
    dash = json.loads((ROOT / "deploy" / "grafana" / "clusterlm.json").read_text())
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            e = t["expr"].replace("$model", model).replace("$instance", instance).replace("$__rate_interval", window)
            out.append((p["title"], e))
    return out


def _query(url: str, expr: str) -> list:
    r = httpx.get(url + "/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def test_prometheus_scrapes_every_series_and_every_dashboard_query_has_data(tmp_path):
    """Reference: the documented metric list (metrics.NAMES) and the dashboard JSON; each must be
    non-empty in a real Prometheus 2.42 after 3 completions (2 streamed) and one 401."""
    prometheus = _require("prometheus")
    run = random_checkpoint(tmp_path, "byte", "hello world " * 40, bpe_vocab=0, n_layers=1, context=128)
    port, mport, pport = _free_port(), _free_port(), _free_port()
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115
    srv = subprocess.Popen([sys.executable, "-m", "clusterlm", "serve", str(run), "--port", str(port),
                            "--metrics-port", str(mport), "--api-key-env", "CLUSTERLM_TEST_KEY", "--model-name", "m",
                            "--instance-id", "prom-r1"], stdout=log, stderr=log,
                           env={**os.environ, "CLUSTERLM_TEST_KEY": KEY})
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{ROOT / 'deploy' / 'prometheus' / 'alerts.yml'}"]
scrape_configs:
  - job_name: clusterlm
    static_configs: [{{targets: ["127.0.0.1:{mport}"]}}]
""")
    plog = open(tmp_path / "prometheus.log", "w")  # noqa: SIM115
    prom = subprocess.Popen([prometheus, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{pport}", "--log.level=warn"], stdout=plog, stderr=plog)
    purl, url = f"http://127.0.0.1:{pport}", f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:  # the server ready and Prometheus scraping it
            assert srv.poll() is None and prom.poll() is None and time.time() < deadline, \
                (tmp_path / "serve.log").read_text()[-2000:] + (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                if (httpx.get(url + "/ready", timeout=1).status_code == 200
                        and [r for r in _query(purl, 'up{job="clusterlm"}') if r["value"][1] == "1"]):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        hdr = {"Authorization": f"Bearer {KEY}"}
        for stream in (False, True, True):
            r = httpx.post(url + "/v1/completions", headers=hdr, timeout=30,
                           json={"model": "m", "prompt": "hello", "max_tokens": 8, "stream": stream})
            assert r.status_code == 200
        assert httpx.get(url + "/v1/models", timeout=5).status_code == 401
        time.sleep(3)  # three more scrapes: rates over the requests exist

        present = {r["metric"]["__name__"] for r in
                   _query(purl, 'group by (__name__) ({__name__=~"clusterlm_.*|process_.*", job="clusterlm"})')}
        missing = [n for n in NAMES if not ({n, n + "_bucket", n + "_count"} & present)]
        assert missing == [], missing
        info = _query(purl, "clusterlm_instance_info")
        assert info[0]["metric"]["instance_id"] == "prom-r1" and info[0]["metric"]["model"] == "m"
        assert float(_query(purl, 'clusterlm_request_generation_tokens_count{model="m"}')[0]["value"][1]) == 3

        empty = [(title, e) for title, e in dashboard_queries() if not _query(purl, e)]
        assert empty == [], empty
    finally:
        for p in (srv, prom):
            p.terminate()
            p.wait(timeout=20)
