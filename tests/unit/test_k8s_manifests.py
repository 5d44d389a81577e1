"""deploy/k8s/: the Kubernetes manifests validate, and agree with each other and with the server.

The core manifests are checked with kubernetes-validate --strict (Kubernetes' OpenAPI schemas; an
unknown field or a wrong type fails) at the pinned K8S_VERSION; the ServiceMonitor, a Prometheus
Operator CRD that kubernetes-validate has no schema for, is checked field by field here. A few
seconds (5 runs of the kubernetes-validate command).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import kubernetes_validate  # the test extra, pinned in pyproject.toml
import pytest
import yaml  # PyYAML, a dependency of kubernetes-validate

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
K8S_VERSION = "1.33.0"  # pinned: a supported release (kubernetes-validate 1.37.0 carries 1.25 .. 1.37)
CORE = ["deployment.yaml", "secret.yaml", "pvc.yaml", "service.yaml", "hpa.yaml"]


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def container(dep: dict) -> dict:
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return c


def arg(c: dict, option: str) -> str:
    """The value given to `option` in the container's args (serve's command line)."""
    return c["args"][c["args"].index(option) + 1]


def test_kustomization_lists_every_manifest():
    """kustomization.yaml's resources are exactly the other YAML files of deploy/k8s."""
    kust = load("kustomization.yaml")
    assert kust["kind"] == "Kustomization"
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kust["resources"]) == sorted(files) == sorted(CORE + ["servicemonitor.yaml"])


def test_core_manifests_validate_strict_with_the_cli():
    """`kubernetes-validate --strict -k K8S_VERSION` (the command docs/deploy.md gives) passes every
    core manifest, against that version's schemas."""
    exe = Path(sys.executable).parent / "kubernetes-validate"
    r = subprocess.run([str(exe), "--strict", "-k", K8S_VERSION, *(str(K8S / f) for f in CORE)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("passed for resource") == len(CORE) and "against version 1.33" in r.stdout


@pytest.mark.parametrize("breakage", ["replicas_string", "unknown_field", "probe_port_list", "hpa_min_string"])
def test_a_broken_manifest_fails(breakage, tmp_path):
    """Deliberately broken copies fail the same check: a wrong type (replicas "two", an HPA minReplicas
    "2", a probe port given as a list) or an unknown field (a typo'd `livenesProbe`, which a
    non-strict check would ignore and so silently drop the probe); the CLI exits non-zero."""
    name = "hpa.yaml" if breakage.startswith("hpa") else "deployment.yaml"
    doc = copy.deepcopy(load(name))
    if breakage == "replicas_string":
        doc["spec"]["replicas"] = "two"
    elif breakage == "unknown_field":
        c = container(doc)
        c["livenesProbe"] = c.pop("livenessProbe")
        # the typo is only caught by --strict
        kubernetes_validate.validate(doc, K8S_VERSION, strict=False)
    elif breakage == "probe_port_list":
        container(doc)["readinessProbe"]["httpGet"]["port"] = ["http"]
    else:
        doc["spec"]["minReplicas"] = "2"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    broken = tmp_path / name
    broken.write_text(yaml.safe_dump(doc))
    exe = Path(sys.executable).parent / "kubernetes-validate"
    r = subprocess.run([str(exe), "--strict", "-k", K8S_VERSION, str(broken)], capture_output=True, text=True)
    assert r.returncode != 0, r.stdout


def test_deployment_matches_the_server_and_the_service():
    """The probes are GET routes the server has and answers without the API key (/ready for readiness,
    /health for liveness) on the port serve binds (--port); the Service's targetPorts name the
    container ports of --port and --metrics-port; selectors match the pod labels; the HPA targets
    this Deployment on CPU, which the container requests."""
    from clusterlm.serve.app import OPEN_PATHS, Settings, create_app

    app = create_app(lambda: None, Settings(api_key="k", model_name="m")).app  # routes only: load never runs
    routes = {r.path for r in app.routes if "GET" in getattr(r, "methods", ())}
    dep, svc, hpa = load("deployment.yaml"), load("service.yaml"), load("hpa.yaml")
    c = container(dep)
    ready, live = c["readinessProbe"]["httpGet"], c["livenessProbe"]["httpGet"]
    assert (ready["path"], live["path"]) == ("/ready", "/health")
    assert {ready["path"], live["path"]} <= routes & OPEN_PATHS
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports[ready["port"]] == ports[live["port"]] == int(arg(c, "--port")) == 8000
    assert ports["metrics"] == int(arg(c, "--metrics-port")) == 9100
    assert arg(c, "--host") == "0.0.0.0"  # inside the pod; the Service decides who reaches it
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    assert svc_ports.keys() == ports.keys() == {"http", "metrics"}
    for name, sp in svc_ports.items():
        target = sp["targetPort"]
        assert (ports[target] if isinstance(target, str) else target) == ports[name]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert "replicas" not in dep["spec"]  # the HPA owns it
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu" and "cpu" in c["resources"]["requests"]


def test_deployment_drain_security_and_volumes():
    """The grace period covers the preStop sleep plus serve's --drain-timeout; the pod runs as the
    image's non-root user with a read-only root (an emptyDir /tmp); the model PVC is mounted
    read-only; the key is the Secret's file, the path --api-key-file reads; requests and limits set."""
    dep, secret, pvc = load("deployment.yaml"), load("secret.yaml"), load("pvc.yaml")
    spec, c = dep["spec"]["template"]["spec"], container(dep)
    pre = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] > int(pre[1]) + float(arg(c, "--drain-timeout"))
    psc, csc = spec["securityContext"], c["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001 != 0
    assert csc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and volumes[mounts["/models"]["name"]]["persistentVolumeClaim"] == \
        {"claimName": pvc["metadata"]["name"], "readOnly": True}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    key_vol = volumes[mounts["/var/run/secrets/clusterlm"]["name"]]["secret"]
    assert key_vol["secretName"] == secret["metadata"]["name"] and key_vol["defaultMode"] == 0o440
    (item,) = key_vol["items"]
    assert item["key"] in secret["stringData"]
    assert arg(c, "--api-key-file") == f"/var/run/secrets/clusterlm/{item['path']}"
    assert c["args"][0] == "/models"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= c["resources"][kind].keys()
    assert "CHANGE-ME" in secret["stringData"][item["key"]]  # a placeholder, never a real key in git


def test_docs_give_the_pods_command():
    """docs/deploy.md's deployment.yaml row names every option the pods run serve with, and the model id
    clients must send: it left out `--model-name clusterlm`, so a reader who followed the image's
    section ("clients send "model": "models"") got 404 model_not_found from the pods."""
    c = container(load("deployment.yaml"))
    doc = (K8S.parents[1] / "docs" / "deploy.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `deployment.yaml`"))
    for option in (a for a in c["args"] if a.startswith("--") and a != "--api-key-file"):
        assert f"{option} {arg(c, option)}" in row, option
    assert f'"model": "{arg(c, "--model-name")}"' in row


def test_servicemonitor_structure():
    """The ServiceMonitor (monitoring.coreos.com/v1; no schema in kubernetes-validate): its selector
    matches the Service's labels, each endpoint names a Service port whose container port is serve's
    --metrics-port (/metrics without the key) and scrapes /metrics, a route the server has, and it
    uses only fields of the Prometheus Operator's ServiceMonitor spec."""
    from clusterlm.serve.app import Settings, create_app

    sm, svc, dep = load("servicemonitor.yaml"), load("service.yaml"), load("deployment.yaml")
    assert (sm["apiVersion"], sm["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    assert set(sm) == {"apiVersion", "kind", "metadata", "spec"} and set(sm["spec"]) <= {
        "selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels", "podTargetLabels", "sampleLimit"}
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    svc_ports = {p["name"]: p for p in svc["spec"]["ports"]}
    c = container(dep)
    container_ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    routes = {r.path for r in create_app(lambda: None, Settings(api_key="k", model_name="m")).app.routes}
    endpoint_fields = {"port", "path", "interval", "scrapeTimeout", "scheme", "authorization", "honorLabels",
                       "relabelings", "metricRelabelings", "tlsConfig", "params"}
    assert sm["spec"]["endpoints"]
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= endpoint_fields, set(ep) - endpoint_fields
        target = svc_ports[ep["port"]]["targetPort"]
        assert container_ports[target] == int(arg(c, "--metrics-port"))
        assert ep["path"] == "/metrics" and "/metrics" in routes
        assert "authorization" not in ep  # the metrics port needs no key: Prometheus never holds it
        for t in ("interval", "scrapeTimeout"):
            assert isinstance(ep[t], str) and ep[t][:-1].isdigit() and ep[t][-1] in "sm", ep[t]
