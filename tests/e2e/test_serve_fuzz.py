"""`clusterlm serve` fuzzed with schemathesis against its OpenAPI schema on 127.0.0.1: no response is a
server error (5xx), every documented response conforms to the schema, and every error is the OpenAI
error object. Reference: FIELD_NOTES "Reliability practice" (CVE classes in vLLM and llama.cpp came
from unbounded numeric fields; nobody surveyed fuzzes the API) and issue 18's fault catalogue.

The app's own schema (FastAPI's, `openapi_url=None` so not served) lists the routes but not the POST
bodies, which the app parses itself (size caps, strict types); the request models it parses them with
(serve/schemas.py) are added as the bodies, so that schemathesis generates completions, chats and
classifications both valid and invalid. Bounded: 25 generated cases per operation (9 operations; with
the explicit and unsupported-method cases ~620 requests, ~22 s on 2 cores), derandomised (one hypothesis
seed), max_tokens capped by the server at 16."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

from clusterlm.cli import main as cli  # noqa: E402
from tests.e2e.test_serve import KEY, Server  # noqa: E402

SEEN: collections.Counter = collections.Counter()  # (operation, status) -> responses, printed at the end
BODIES = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatRequest", "/classify": "ClassifyRequest"}
EXAMPLES = 25


def openapi(app) -> dict:  # noqa: ANN001 - a FastAPI app
    """The app's OpenAPI document with its POST routes' request models as JSON bodies."""
    from clusterlm.serve import schemas

    doc = app.openapi()
    components = doc.setdefault("components", {}).setdefault("schemas", {})
    for path, name in BODIES.items():
        js = getattr(schemas, name).model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(js.pop("$defs", {}))
        if path != "/classify":  # the one served name (any other: 404; none: 422), so that valid cases generate
            js["properties"]["model"] = {"type": "string", "enum": ["tiny"]}
            js["required"] = sorted({*js.get("required", []), "model"})
        components[name] = js
        doc["paths"][path]["post"]["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}
    return doc


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("\n".join(f"Line {i}: the quick brown fox." for i in range(200)))
    assert cli(["prepare", str(root / "corpus"), "--out", str(root / "data"), "--tokenizer", "byte",
                "--val-fraction", "0.1"]) == 0
    run = root / "run"
    assert cli(["train", f"--data.dir={json.dumps(str(root / 'data'))}", f"--train.out_dir={json.dumps(str(run))}",
                "--model.preset=llama-nano", "--model.max_seq_len=64", "--train.seq_len=32",
                "--train.micro_batch_size=4", "--train.max_steps=2", "--train.eval_interval=0",
                "--train.device=cpu"]) == 0
    srv = Server(Path(run), max_batch=8, max_queue=64, max_new_tokens_limit=16)
    yield srv
    srv.stop()
    print(f"\nfuzzed: {sum(SEEN.values())} requests:", dict(sorted(SEEN.items())))


def _schema():
    from clusterlm.serve.app import Settings, create_app

    guard = create_app(lambda: None, Settings(api_key=KEY, model_name="tiny"))  # the ASGI guard around the app
    return schemathesis.openapi.from_dict(openapi(guard.app))


schema = _schema()


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_get_no_server_error(case, fuzz_server):
    """Each generated request (valid and invalid bodies, query strings, paths) with the API key: no 5xx,
    documented responses conform, errors are {"error": {"message": str, "type": str, ...}}."""
    response = case.call(base_url=fuzz_server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    SEEN[(f"{case.method} {case.path}", response.status_code)] += 1
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
    # every error, routing's 405/404 included, is an OpenAI error object
    if response.status_code >= 400:
        assert "error" in response.json(), (response.status_code, response.text[:500], case.as_curl_command())
        err = response.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), err
    if response.status_code == 200 and case.method == "POST" and case.path.startswith("/v1/"):
        n = case.body.get("n") or 1  # null is the default, 1 (docs/serving.md)
        if case.body.get("stream"):  # server-sent events ending in [DONE]
            assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]
        else:
            body = response.json()
            assert body["object"] in ("text_completion", "chat.completion") and len(body["choices"]) == n, body
            assert body["usage"]["completion_tokens"] <= 16 * n, body["usage"]


def test_the_schema_has_one_operation_per_route_and_method():
    """GET and HEAD share a handler on /health, /ready, /metrics and /; only GET is in the schema, so
    every operation ID is unique (FastAPI warned "Duplicate Operation ID" for each of the four)."""
    import warnings

    from clusterlm.serve.app import Settings, create_app

    app = create_app(lambda: None, Settings(api_key=KEY, model_name="tiny")).app
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        doc = app.openapi()
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids)), ids
    for path in ("/health", "/ready", "/metrics", "/"):
        assert set(doc["paths"][path]) == {"get"}
