"""The serving image's dependency list (deploy/docker/requirements-serve.txt): the Dockerfile installs
clusterlm with --no-deps and then only these, so `clusterlm serve` must run with the rest of
clusterlm's dependencies absent. Here a real `serve` process (python -S) sees only the distributions
`pip install -r requirements-serve.txt` would install, through a folder of links to them, and the
routes a deployment uses answer: a model and a LoRA adapter on it, completions (plain, streamed, with
logprobs), chat, /tokenize, /metrics; and `clusterlm stream-guard` relays a stream to it.
The container test (tests/e2e/test_container.py) builds the image itself where dockerd runs.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import socket
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from tests.helpers import console_script, random_checkpoint, wait_for_ready

httpx = pytest.importorskip("httpx2")  # the HTTP client the openai package ships with

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "deploy" / "docker" / "requirements-serve.txt"
KEY = "serve-requirements-key"
TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 8


def _name(req: str) -> str:
    """A requirement's distribution name, normalised (PEP 503)."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", req).group(0)).lower()


def _serve_requirements() -> list[str]:
    return [line.split("#")[0].strip() for line in REQUIREMENTS.read_text().splitlines()
            if line.split("#")[0].strip()]


def _pyproject_requirements() -> list[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["serve"]]


def test_serve_requirements_are_pyprojects_own():
    """Every line is one of pyproject.toml's requirements (dependencies or the serve extra), word for
    word: a raised lower bound there must be raised here too."""
    ours = _pyproject_requirements()
    for req in _serve_requirements():
        assert req in ours, f"{REQUIREMENTS.name}: {req!r} is not in pyproject.toml's dependencies {ours}"
    assert {"torch", "fastapi", "uvicorn", "prometheus-client"} <= {_name(r) for r in _serve_requirements()}


def _serving_site(folder: Path) -> Path:
    """A site-packages made of links to the installed distributions the image would hold: those of
    requirements-serve.txt and everything they require (markers evaluated here, no extras), as
    `pip install -r` would resolve them. Python started with -S and this folder on its path finds
    nothing else, as in the image."""
    from packaging.requirements import Requirement

    todo, seen = [_name(r) for r in _serve_requirements()], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for r in importlib.metadata.distribution(name).requires or []:
            req = Requirement(r)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(_name(req.name))
    folder.mkdir()
    for name in seen:
        dist = importlib.metadata.distribution(name)
        for top in {Path(f).parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (folder / top).exists():
                (folder / top).symlink_to(src)
    assert not {"matplotlib", "sklearn", "scipy", "tensorboard", "sacrebleu"} & {p.name for p in folder.iterdir()}
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_runs_with_only_the_serving_requirements(tmp_path):
    import torch

    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.finetune.lora import apply_lora, save_adapters

    (tmp_path / "m").mkdir()
    run = random_checkpoint(tmp_path / "m", "char", TEXT, bpe_vocab=0, n_layers=1, context=64)
    model = load_for_inference(run).model
    apply_lora(model, rank=4, alpha=8.0, seed=1)
    torch.manual_seed(1)
    adapter = save_adapters(tmp_path / "adapter", model, meta={"base": str(run)})

    port = _free_port()
    log_path, guard_log, guard = tmp_path / "serve.log", tmp_path / "guard.log", None
    site = _serving_site(tmp_path / "site")
    entry = console_script()  # [python, -c, the console script's code]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [entry[0], "-S", *entry[1:], "serve", f"base={run}", f"tuned={adapter}", "--port", str(port),
             "--api-key-env", "CLUSTERLM_TEST_KEY", "--max-batch", "2"],
            stdout=log, stderr=log, cwd=tmp_path,
            env={**os.environ, "CLUSTERLM_TEST_KEY": KEY, "PYTHONPATH": f"{REPO}{os.pathsep}{site}"})
    url = f"http://127.0.0.1:{port}"
    auth = {"Authorization": f"Bearer {KEY}"}
    try:
        wait_for_ready(proc, url, log_path)
        models = httpx.get(f"{url}/v1/models", headers=auth, timeout=10).json()
        assert sorted(m["id"] for m in models["data"]) == ["base", "tuned"]
        for name in ("base", "tuned"):
            r = httpx.post(f"{url}/v1/completions", headers=auth, timeout=30, json={
                "model": name, "prompt": "To be", "max_tokens": 8, "temperature": 0, "logprobs": 2})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 8
            assert len(r.json()["choices"][0]["logprobs"]["top_logprobs"]) == 8
        with httpx.stream("POST", f"{url}/v1/chat/completions", headers=auth, timeout=30, json={
                "model": "base", "messages": [{"role": "user", "content": "to be"}], "max_tokens": 6,
                "stream": True}) as r:
            assert r.status_code == 200
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) > 2
        json.loads(events[0].removeprefix("data: "))
        r = httpx.post(f"{url}/tokenize", headers=auth, timeout=10, json={"model": "base", "prompt": "To be"})
        assert r.status_code == 200 and r.json()["count"] >= 5, r.text
        metrics = httpx.get(f"{url}/metrics", headers=auth, timeout=10).text
        assert 'clusterlm_generated_tokens_total{model="tuned"} 8.0' in metrics, metrics[-2000:]
        # the stream guard (in the image too) with the same restricted site, relaying to the server
        guard_port = _free_port()
        with open(guard_log, "w") as log:
            guard = subprocess.Popen([entry[0], "-S", *entry[1:], "stream-guard", "--upstream", url,
                                      "--port", str(guard_port)], stdout=log, stderr=log, cwd=tmp_path,
                                     env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{site}"})
        for _ in range(300):
            assert guard.poll() is None, guard_log.read_text()
            try:
                httpx.get(f"http://127.0.0.1:{guard_port}/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        r = httpx.post(f"http://127.0.0.1:{guard_port}/v1/completions", headers=auth, timeout=30, json={
            "model": "base", "prompt": "To be", "max_tokens": 4, "stream": True})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text, r.text
    finally:
        for p in (proc, guard):
            if p is not None:
                p.terminate()
                p.wait(timeout=30)
    for path in (log_path, guard_log):
        text = path.read_text()
        assert "Traceback" not in text and "Error" not in text, text[-3000:]
