"""The operator's files (deploy/, Dockerfile, docs/serving.md, docs/deploy.md, docs/monitoring.md) name
the tests that check them; each named test file, and each named `FILE::test`, exists (a comment
pointing at a renamed test sends a reader nowhere)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "Dockerfile", ROOT / "docs" / "serving.md", ROOT / "docs" / "deploy.md",
           ROOT / "docs" / "monitoring.md", *sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file())]


def test_named_test_files_and_functions_exist():
    missing = []
    for src in SOURCES:
        text = src.read_text(encoding="utf-8", errors="replace")
        for path in re.findall(r"\btests/[\w/]+\.py\b", text):
            if not (ROOT / path).is_file():
                missing.append(f"{src.relative_to(ROOT)}: {path}")
        for name, func in re.findall(r"\b(test_\w+\.py)::(test_\w+)", text):
            if not any(f"def {func}(" in p.read_text() for p in (ROOT / "tests").rglob(name)):
                missing.append(f"{src.relative_to(ROOT)}: {name}::{func}")
    assert not missing, missing


def test_deploy_doc_lists_what_the_image_installs():
    """docs/deploy.md's list of deploy/docker/requirements-serve.txt names every package in it: httpx2
    (stream-guard's client, which the image runs) was missing from the list."""
    reqs = [re.split(r"[<>=!~ ;\[]", line, maxsplit=1)[0]
            for line in (ROOT / "deploy" / "docker" / "requirements-serve.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    doc = " ".join((ROOT / "docs" / "deploy.md").read_text().split())
    listed = doc[doc.index("`deploy/docker/requirements-serve.txt` ("):].split(")", 1)[0]
    assert reqs and all(re.search(rf"\b{re.escape(r)}\b", listed) for r in reqs), (reqs, listed)


def test_replica_commands_open_the_ports_prometheus_scrapes():
    """The replica command at the top of haproxy.cfg (and of prometheus.yml, and monitoring.md) gives
    each replica the --metrics-port that deploy/prometheus/prometheus.yml scrapes (job clusterlm):
    haproxy.cfg's left it out, so replicas started from it were `up == 0` (ClusterlmReplicaDown)."""
    import yaml

    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    (job,) = [j for j in prom["scrape_configs"] if j["job_name"] == "clusterlm"]
    scraped = {int(t.rsplit(":", 1)[1]) for sc in job["static_configs"] for t in sc["targets"]}
    for src in ("deploy/haproxy/haproxy.cfg", "deploy/prometheus/prometheus.yml", "docs/monitoring.md"):
        cmds = [line for line in (ROOT / src).read_text().splitlines() if "clusterlm serve RUN --port" in line]
        assert cmds, src
        for cmd in cmds:
            m = re.search(r"--metrics-port (\d+)", cmd)
            assert m and int(m.group(1)) in scraped, (src, cmd, sorted(scraped))


def test_k8s_comments_say_what_the_server_and_checkpoints_do():
    """deploy/k8s/secret.yaml said the ServiceMonitor sends the API key (it scrapes the key-free
    --metrics-port, with no authorization), and pvc.yaml that clusterlm writes some checkpoint files
    owner-only (only runs from before 2026-12-07: it writes the umask's modes, as docs/deploy.md says)."""
    import yaml

    k8s = ROOT / "deploy" / "k8s"
    (endpoint,) = yaml.safe_load((k8s / "servicemonitor.yaml").read_text())["spec"]["endpoints"]
    assert not {"authorization", "bearerTokenSecret", "basicAuth"} & set(endpoint), endpoint
    secret = " ".join((k8s / "secret.yaml").read_text().split())
    assert "ServiceMonitor sends" not in secret and "ServiceMonitor does not need it" in secret
    pvc = " ".join((k8s / "pvc.yaml").read_text().split())
    assert "writes some checkpoint files owner-only" not in pvc and "0644 by default" in pvc
