"""`clusterlm serve`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the batching scheduler.

    clusterlm serve runs/shakespeare_char --api-key-file key.txt --port 8000
    curl -H "Authorization: Bearer $(cat key.txt)" localhost:8000/v1/completions \\
         -d '{"model": "shakespeare_char", "prompt": "ROMEO:", "max_tokens": 32, "stream": true}'

Several models behind one endpoint: `clusterlm serve A name=B --models models.toml`, the request's
`model` choosing one (serve/models.py; docs/serving.md, "Several models").

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (SSE with `stream: true`,
ending in `data: [DONE]`), POST /classify (a classifier: serve/classify.py), POST /tokenize (a prompt's
or chat's token count and the context, vLLM's route), GET /health (alive), GET /ready (503 until loaded
and warmed up; both answer HEAD too, as some load balancers check with HEAD),
GET /metrics (Prometheus), GET / (chat page). Every route needs `Authorization: Bearer KEY`
except the allow-list: /health, /ready, and the static chat page (/ and /static/*, which hold no
data). Limits and error codes: docs/serving.md. /v1/chat/completions and the chat page render the
messages with the checkpoint's own chat template and stop at its end-of-turn token (the plain
"User:/Assistant:" template for a model without one; docs/chat_templates.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from clusterlm.serve.classify import NOT_GENERATIVE, register_classify, start_classifier
from clusterlm.serve.guard import DRAIN_MESSAGE, DRAIN_ROUTES, Drain, log_access
from clusterlm.serve.metrics import Metrics
from clusterlm.serve.models import ModelSpec, Served
from clusterlm.serve.schemas import (MAX_N, ChatRequest, CompletionRequest, TokenizeRequest, error_body, new_id, now,
                                     unsupported_part, usage, validation_message)

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
OPEN_PATHS = {"/health", "/ready", "/", "/favicon.ico"}  # no API key; /static/* too
MAX_HEADER_BYTES = 16 * 1024
BACKLOG = 128  # listen() queue, and the most connections asyncio accepts in one event-loop tick


PACK_CHOICES = ("auto", "fp32", "bf16", "none")


class Settings:
    def __init__(self, *, api_key: str, model_name: str, max_batch: int = 16, max_queue: int = 64,
                 max_new_tokens_limit: int = 512, max_body_bytes: int = 1 << 20, device: str = "cpu",
                 pack: str = "auto") -> None:
        for name, val, lo in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0),
                              ("max_new_tokens_limit", max_new_tokens_limit, 1),
                              ("max_body_bytes", max_body_bytes, 1024)):
            if val < lo:
                raise ValueError(f"{name}={val} must be >= {lo}")
        if not api_key:
            raise ValueError("api_key is empty; give a non-empty key")
        self.api_key, self.model_name = api_key, model_name
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_new_tokens_limit, self.max_body_bytes, self.device = max_new_tokens_limit, max_body_bytes, device
        if pack not in PACK_CHOICES:
            raise ValueError(f"pack={pack!r}; expected one of {', '.join(PACK_CHOICES)}")
        self.pack = pack  # the decode engine's packed CPU weights (generate.engine.Engine, optimize/packed.py)

    def for_model(self, spec: ModelSpec) -> Settings:
        """These settings with `spec`'s name and its own limits where it gives them."""
        pick = lambda own, default: default if own is None else own  # noqa: E731
        return Settings(api_key=self.api_key, model_name=spec.name, max_batch=pick(spec.max_batch, self.max_batch),
                        max_queue=pick(spec.max_queue, self.max_queue),
                        max_new_tokens_limit=pick(spec.max_new_tokens_limit, self.max_new_tokens_limit),
                        max_body_bytes=self.max_body_bytes, device=self.device, pack=self.pack)


def _err(status: int, message: str, *, param: str | None = None, type_: str = "invalid_request_error",
         headers: dict[str, str] | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


class _Reject(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


class _Guard:
    """ASGI middleware: header-size cap (431), API key (401), declared body size (413), and the
    requests-by-status counter. Runs before routing, so unknown paths need a key too. Replicas: 503
    on DRAIN_ROUTES while draining, the in-flight count the drain waits for, an X-Clusterlm-Instance
    header, and on `metrics_port` (main() sets it) /metrics alone, without a key. With `access_log`
    (main() sets it) uvicorn's access line for each request, written when its response ends."""

    def __init__(self, app, settings: Settings, metrics: Metrics, drain: Drain | None = None,  # noqa: ANN001
                 instance_id: str = "") -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.drain, self.instance = drain or Drain(), instance_id.encode()
        self.metrics_port: int | None = None
        self.access_log = False
        self.key = settings.api_key.encode()

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http" or not self.access_log:
            return await self._guard(scope, receive, send)
        t0, status = time.perf_counter(), []

        async def send_seen(msg) -> None:  # noqa: ANN001
            if msg["type"] == "http.response.start":
                status.append(msg["status"])
            await send(msg)

        try:
            await self._guard(scope, receive, send_seen)
        finally:  # no response started: the app raised or sent nothing, and uvicorn answers 500
            log_access(scope, status[0] if status else 500, time.perf_counter() - t0)

    async def _guard(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ("/v1/models", "/v1/completions", "/v1/chat/completions", "/classify", "/tokenize",
                                 "/metrics", "/health", "/ready", "/") else "other"
        if path.startswith("/v1/models/"):  # one model's card: a label per route, not per model id
            route = "/v1/models/{id}"
        status_seen: list[int] = []

        async def send_counted(msg) -> None:  # noqa: ANN001
            if msg["type"] == "http.response.start":
                status_seen.append(msg["status"])
                self.metrics.requests.labels(route, str(msg["status"])).inc()
                if self.instance:
                    msg = {**msg, "headers": [*msg.get("headers", []), (b"x-clusterlm-instance", self.instance)]}
            await send(msg)

        headers = scope["headers"]
        resp: Response | None = None
        on_metrics_port = self.metrics_port is not None and (scope.get("server") or (None, None))[1] == self.metrics_port
        if on_metrics_port:  # the key-free listener of --metrics-port serves /metrics and nothing else
            if path != "/metrics":  # not counted: it would show as the main port's route with a 404
                return await _err(404, f"{path} is not served on the metrics port; only /metrics is")(
                    scope, receive, send)
            return await self.app(scope, receive, send_counted)
        if sum(len(k) + len(v) + 4 for k, v in headers) > MAX_HEADER_BYTES:
            resp = _err(431, f"request headers exceed {MAX_HEADER_BYTES} bytes")
        elif self.drain.requested and path in DRAIN_ROUTES:
            # an error a load balancer retries on another replica (HAProxy: retry-on 503)
            resp = _err(503, DRAIN_MESSAGE, type_="unavailable", headers={"Retry-After": "1", "Connection": "close"})
        elif not (path in OPEN_PATHS or path.startswith("/static/")):
            given = b""
            for k, v in headers:
                if k == b"authorization":
                    given = v
            scheme, _, token = given.partition(b" ")
            # constant-time comparison; the key is never logged or echoed
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                resp = _err(401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                            type_="authentication_error", headers={"WWW-Authenticate": "Bearer"})
        if resp is None:
            for k, v in headers:
                if k == b"content-length":
                    try:
                        n = int(v)
                    except ValueError:
                        resp = _err(400, "Content-Length is not an integer")
                        break
                    if n > self.settings.max_body_bytes:
                        resp = _err(413, f"request body of {n} bytes exceeds the limit of "
                                         f"{self.settings.max_body_bytes} bytes")
        if resp is not None:
            return await resp(scope, receive, send_counted)
        if path not in DRAIN_ROUTES:
            return await self.app(scope, receive, send_counted)
        self.drain.inflight += 1  # a drain waits until this is 0
        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.drain.inflight -= 1


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON number")


async def _read_json(request: Request, model: type[BaseModel], limit: int,
                     ranges: Callable[[object], dict[str, str]] | None = None) -> BaseModel:
    """Body -> validated model. 413 over `limit` bytes (counted as it arrives: chunked bodies too),
    400 for invalid UTF-8 or JSON (NaN/Infinity, an integer too long to convert, a lone surrogate
    escape such as "\\ud800"), 422 for a schema violation naming the field and range (`ranges(name)`:
    the own ranges for max_tokens and n of the model the body names)."""
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _Reject(_err(413, f"request body exceeds the limit of {limit} bytes"))
            chunks.append(chunk)
    except ClientDisconnect:  # gone, or closed by the body deadline (guard.py): nobody reads an answer
        raise _Reject(Response(status_code=499)) from None
    body = b"".join(chunks)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Reject(_err(400, f"request body is not valid UTF-8 (byte {e.start})")) from None
    try:
        # ValueError: also an integer of over 4300 digits (CPython's int-conversion limit)
        raw = json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError) as e:
        raise _Reject(_err(400, f"request body is not valid JSON: {str(e)[:120]}")) from None
    try:
        return model.model_validate_json(text)
    except ValidationError as e:
        bad_json = [x for x in e.errors() if x["type"] == "json_invalid"]
        if bad_json:  # JSON that Python reads but pydantic's strict parser does not: lone surrogates, huge numbers
            raise _Reject(_err(400, f"request body is not valid JSON text: {bad_json[0]['msg'][:120]} "
                                    "(unpaired surrogate escapes are not Unicode text; numbers must fit a "
                                    "64-bit float)")) from None
        name = raw.get("model") if isinstance(raw, dict) else None
        msg, param = validation_message(model, e, ranges(name) if ranges is not None else None)
        raise _Reject(_err(422, msg, param=param)) from None


def create_app(load: Callable[..., object], settings: Settings,
               on_load_error: Callable[[Exception], None] | None = None, *, drain: Drain | None = None,
               instance_id: str = "", models: list[ModelSpec] | None = None) -> _Guard:
    """The ASGI app to hand to uvicorn: FastAPI (as `.app`) inside the guard middleware.

    One model (`models` None): `load()` returns a clusterlm LoadedModel, served as
    `settings.model_name`. Several: `load(spec)` for each ModelSpec, one after another; each model
    gets its own limits (Settings.for_model), scheduler (queue, KV slots, decode thread) and
    `model` label in the metrics. Loading runs in a thread at start-up, so /health answers at once;
    a model answers once it is loaded and warmed up, and /ready turns 200 when every model that
    loaded is ready. A model that fails is logged by name and listed as failed (/health,
    /v1/models); the others serve. If every model fails, /ready answers 503 with the reason and
    `on_load_error(exc)` is called from that thread (`main` stops the server with it and exits
    naming the file)."""
    from clusterlm.errors import CheckpointError, ClusterlmError
    from clusterlm.generate.text import chat_format, prompt_ids
    from clusterlm.serve.scheduler import Delta, Failed, QueueFull, SamplingParams, Scheduler

    if models is None:
        models, load_one = [ModelSpec(settings.model_name)], lambda spec: load()
    else:
        load_one = load
    if not models:
        raise ValueError("create_app needs at least one model")
    single = len(models) == 1
    # drain: SIGTERM handling (main() calls drain.request(); tests may too); instance_id: --instance-id
    drain = drain or Drain()
    metrics = Metrics(instance_id=instance_id)
    served: dict[str, Served] = {}
    for spec in models:
        own = settings.for_model(spec)
        served[spec.name] = Served(spec, own, metrics.model(spec.name, own.max_batch, own.max_queue))

    def names() -> str:  # the models that answer (a model that failed to load is not among them)
        return ", ".join(repr(n) for n, sv in served.items() if sv.error is None)

    def ranges(name: object) -> dict[str, str]:
        """The ranges shown in 422 messages for values below them (400 above them): the named model's
        own limits (a models file may set them), else the first model's."""
        sv = served.get(name) if isinstance(name, str) else None
        return (sv or next(iter(served.values()))).ranges()

    status: dict[str, str] = {}  # "error": why /ready is 503 after every model failed
    ready = threading.Event()  # every model that loaded is ready (and at least one did)

    def _start(sv: Served) -> None:
        loaded = load_one(sv.spec)
        if closing.is_set():  # a SIGTERM while this loaded: nothing to start
            return
        sv.state["loaded"] = loaded
        if start_classifier(loaded, sv.state, sv.settings):  # a classifier answers /classify: no decode scheduler
            sv.measure()
            sv.ready.set()
            return
        sched_cls = Scheduler
        arch = loaded.model.config.arch
        if arch == "encoder":
            from clusterlm.errors import ConfigError

            raise ConfigError(f"{sv.spec.path} is a masked-LM encoder: it does not generate; serve a classifier "
                              "fine-tuned from it (POST /classify)")
        if arch == "encdec":  # the prompt to the encoder, one request at a time (serve/seq2seq.py)
            from clusterlm.serve.seq2seq import Seq2SeqScheduler as sched_cls
        pack = {} if arch == "encdec" else {"pack": None if sv.settings.pack == "none" else sv.settings.pack}
        try:
            sched = sched_cls(loaded.model, loaded.tokenizer, max_batch=sv.settings.max_batch,
                              max_queue=sv.settings.max_queue, metrics=sv.metrics, device=sv.settings.device, **pack)
        except RuntimeError as e:  # the slot cache (max_batch x context) is allocated here: name the option
            if "allocate" not in str(e) and "out of memory" not in str(e):
                raise
            import re

            from clusterlm.errors import ConfigError

            asked = re.search(r"allocate (\d+) bytes", str(e))
            need = f" ({int(asked.group(1)) / 2**30:.1f} GiB asked)" if asked else ""
            raise ConfigError(f"model {sv.name}: the KV cache for max_batch={sv.settings.max_batch} slots does not fit "
                              f"in {sv.settings.device} memory{need}; lower --max-batch (or the model's max_batch "
                              "in --models)") from None
        sched.start()
        try:
            sched.warmup()
        except Exception:
            sched.stop()
            raise
        sv.state.update(sched=sched, tokenizer=loaded.tokenizer, context=sched.context,
                        chat=chat_format(loaded.tokenizer, getattr(loaded, "chat_template", None)))
        sv.measure()
        sv.ready.set()
        log.info("serving %s: max_batch=%d max_queue=%d, %.1f MB of parameters, %.1f MB of KV cache", sv.name,
                 sv.settings.max_batch, sv.settings.max_queue, sv.memory["parameter_bytes"] / 1e6,
                 sv.memory["kv_cache_bytes"] / 1e6)

    closing = threading.Event()  # shutdown began: the loader starts no further model or scheduler

    def _startup() -> None:
        errors: list[Exception] = []
        for sv in served.values():
            if closing.is_set():
                return
            try:
                _start(sv)
            except Exception as e:
                errors.append(e)
                sv.state.pop("loaded", None)
                sv.error = f"{type(e).__name__}: {e}" if not isinstance(e, ClusterlmError) else str(e)
                if not single:  # the others still serve: one line naming the model, the traceback at debug
                    log.error("model %s (%s) failed to load: %s", sv.name, sv.spec.path, sv.error)
                    log.debug("model %s failed to load", sv.name, exc_info=True)
                elif on_load_error is None:
                    log.exception("loading the model failed")
                else:
                    log.debug("loading the model failed", exc_info=True)
        if len(errors) < len(served):
            ready.set()
            return
        status["error"] = ("loading the model failed; see the server log" if single
                           else "every model failed to load; see the server log")
        if on_load_error is not None:
            on_load_error(errors[0] if single else CheckpointError(
                "every model failed to load: " + "; ".join(f"{sv.name}: {sv.error}" for sv in served.values())))

    def _scheds() -> list:
        return [sv.state["sched"] for sv in served.values() if "sched" in sv.state]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        t = threading.Thread(target=_startup, name="clusterlm-load", daemon=True)
        t.start()
        # the abort reaches every scheduler (a classifier's requests just get 2 s more)
        watcher = asyncio.create_task(drain.watch(lambda msg: [s.abort(msg) for s in _scheds()]))
        yield
        watcher.cancel()
        # a SIGTERM while a model loads: the loader finishes that checkpoint (torch cannot be stopped
        # inside a read) and starts nothing more; leaving it running as the interpreter exits aborts
        # the process ("terminate called without an active exception", exit 134)
        closing.set()
        if t.is_alive():
            log.info("waiting for the model being loaded before exiting")
            await asyncio.to_thread(t.join)
        for sched in _scheds():
            sched.stop()

    app = FastAPI(title="clusterlm", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics = metrics
    app.state.ready = ready
    app.state.served = served
    app.state.state = next(iter(served.values())).state  # the first model's (tests of one model read it)
    app.state.drain = drain

    def _pick(name: str | None, optional: bool = False) -> Served:
        """The model a request names: 404 for a name not served (or one that failed to load), 400 for
        none with several models; with one model, `optional` (/classify) lets it be left out."""
        if name is None:
            if len(served) == 1 and optional:
                return next(iter(served.values()))
            if len(served) == 1:  # as when `model` was a required field of the schema
                raise _Reject(_err(422, "model: Field required", param="model"))
            raise _Reject(_err(400, f"model is required: this server serves {names()}", param="model"))
        sv = served.get(name)
        if sv is None:
            raise _Reject(_err(404, f"model {name!r} is not served here; this server serves {names()}",
                               param="model", code="model_not_found"))
        if sv.error is not None:
            raise _Reject(_err(404, f"model {name!r} failed to load at start-up ({sv.error}); the others serve",
                               param="model", code="model_not_found"))
        return sv

    @app.exception_handler(_Reject)
    async def _reject(request: Request, exc: _Reject) -> Response:
        return exc.response

    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # routing's own errors (405 method not allowed, 404 no such route) in OpenAI's error shape
        # too, keeping their headers (405's Allow)
        return _err(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                    headers=dict(exc.headers) if exc.headers else None,
                    type_="invalid_request_error" if exc.status_code < 500 else "server_error")

    def get_and_head(path: str):  # noqa: ANN202 - a decorator
        """GET and HEAD on one handler; HEAD stays out of the OpenAPI schema, where both methods would
        share one operation ID (FastAPI warns "Duplicate Operation ID" and schema clients collide)."""
        def register(fn):  # noqa: ANN001, ANN202
            app.add_api_route(path, fn, methods=["GET"])
            app.add_api_route(path, fn, methods=["HEAD"], include_in_schema=False)
            return fn
        return register

    @get_and_head("/health")
    async def health() -> dict:
        failed = [sv.name for sv in served.values() if sv.error is not None]  # names only: this route has no key
        return {"status": "ok", **({"failed": failed} if failed else {})}

    @get_and_head("/ready")
    async def ready_route() -> Response:
        if drain.requested:  # out of the load balancer's rotation at the next health check
            return _err(503, "draining: this replica is shutting down", type_="unavailable",
                        headers={"Retry-After": "1"})
        if ready.is_set():
            up = [sv.name for sv in served.values() if sv.error is None]
            failed = [sv.name for sv in served.values() if sv.error is not None]
            return JSONResponse({"status": "ready", **({"model": up[0]} if single else {"models": up}),
                                 **({"failed": failed} if failed else {})})
        loading = [sv.name for sv in served.values() if not sv.ready.is_set() and sv.error is None]
        msg = status.get("error") or ("loading" if single else f"loading {', '.join(loading)}")
        return _err(503, msg, type_="unavailable", headers={"Retry-After": "1"})

    @get_and_head("/metrics")
    async def metrics_route() -> Response:
        metrics.ready.set(ready.is_set() and not drain.requested)
        metrics.draining.set(drain.requested)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @get_and_head("/")
    async def index() -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        f = STATIC / name
        if "/" in name or name.startswith(".") or not f.is_file():
            return _err(404, f"no static file {name!r}")
        return FileResponse(f)

    @app.get("/v1/models")
    async def list_models() -> dict:
        failed = [{"id": sv.name, "path": sv.spec.path, "error": sv.error} for sv in served.values()
                  if sv.error is not None]
        return {"object": "list", "data": [sv.card() for sv in served.values() if sv.error is None],
                **({"failed": failed} if failed else {})}

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict:
        """One model's card (the openai client's models.retrieve); 404 as a request naming it gets."""
        return _pick(model_id).card()

    def _generative(sv: Served) -> None:
        """503 while `sv` loads, 400 for a classifier (it answers /classify only)."""
        if not sv.ready.is_set():
            raise _Reject(_err(503, "the model is still loading", type_="unavailable", headers={"Retry-After": "1"}))
        if "labels" in sv.state:
            raise _Reject(_err(400, NOT_GENERATIVE, param="model"))

    def _chat_prompt(sv: Served, messages: list) -> str:
        """The prompt text of chat `messages` in the model's own template (or the plain one), as loaded;
        text parts joined, developer = system. 400 for a non-text part or messages the template refuses."""
        _generative(sv)
        bad = unsupported_part(messages)
        if bad is not None:
            raise _Reject(_err(400, f"{bad[0]} is a content part of type {bad[1]!r}; this server reads text parts "
                                    "only ({\"type\": \"text\", \"text\": ...})", param="messages"))
        try:
            return sv.state["chat"].render([{"role": m.template_role, "content": m.text} for m in messages])
        except ValueError as e:  # the template refuses these messages (raise_exception, a role it lacks)
            raise _Reject(_err(400, str(e), param="messages")) from None

    def _check(sv: Served, req: CompletionRequest | ChatRequest, prompt: str) -> tuple[list[int], SamplingParams]:
        state, settings_ = sv.state, sv.settings
        _generative(sv)
        limit, n_limit = settings_.max_new_tokens_limit, min(MAX_N, settings_.max_batch)
        max_tokens, which = _max_tokens(req)
        if max_tokens is not None and max_tokens > limit:
            raise _Reject(_err(400, f"{which}={max_tokens} is out of range; allowed [1, {limit}] "
                                    f"({sv.source('max_new_tokens_limit')})", param=which))
        if req.n > n_limit:
            raise _Reject(_err(400, f"n={req.n} is out of range; allowed [1, {n_limit}] "
                                    f"(min({MAX_N}, {sv.source('max_batch')}))", param="n"))
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise _Reject(_err(400, "prompt contains unpaired surrogates; send valid Unicode text")) from None
        # EOS first: the document separator seen in training. A prompt longer than the model's
        # context (engine.context_length) is refused here, where `generate` would trim it
        ids = prompt_ids(state["tokenizer"], prompt, None, 0)
        context = state["context"]
        if context is not None and len(ids) > context:
            raise _Reject(_err(400, f"the prompt is {len(ids)} tokens (with the leading EOS); the model's "
                                    f"context is {context} tokens", param="prompt"))
        params = SamplingParams(max_tokens=max_tokens or limit, temperature=req.temperature,
                                top_p=req.top_p, seed=req.seed, stops=tuple(req.stops), logprobs=_top_logprobs(req))
        return ids, params

    async def _run(sv: Served, request: Request, ids: list[int], params: SamplingParams, n: int, chat: bool,
                   stream: bool, include_usage: bool) -> Response:
        state = sv.state
        try:
            handle = state["sched"].submit(ids, n, params, asyncio.get_running_loop())  # type: ignore[attr-defined]
        except QueueFull as e:
            return _err(429, str(e), type_="rate_limit_error", headers={"Retry-After": str(e.retry_after)})
        rid, created = new_id("chatcmpl" if chat else "cmpl"), now()
        obj = "chat.completion" if chat else "text_completion"
        base = {"id": rid, "created": created, "model": sv.name}
        lpf = _LogprobFormat(state, chat, n) if params.logprobs is not None else None

        if stream:
            async def events() -> AsyncIterator[bytes]:
                done, total = 0, 0
                try:
                    if chat:
                        for i in range(n):
                            yield _sse({**base, "object": "chat.completion.chunk", "choices": [
                                {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
                    failed = False
                    while done < n and not failed:
                        evs = [await handle.events.get()]
                        while not handle.events.empty():  # what arrived meanwhile goes out in one write
                            evs.append(handle.events.get_nowait())
                        out = []
                        for ev in evs:
                            if isinstance(ev, Failed):
                                out.append(_sse(error_body(ev.message, "server_error")))
                                failed = True
                                break
                            lp = lpf.chunk(ev.index, ev.logprobs) if lpf is not None else None
                            if isinstance(ev, Delta):
                                choice = ({"index": ev.index, "delta": {"content": ev.text}, "logprobs": lp,
                                           "finish_reason": None}
                                          if chat else {"index": ev.index, "text": ev.text, "logprobs": lp,
                                                        "finish_reason": None})
                            else:
                                done += 1
                                total += ev.tokens
                                choice = ({"index": ev.index, "delta": {}, "logprobs": lp, "finish_reason": ev.reason}
                                          if chat else {"index": ev.index, "text": "", "logprobs": lp,
                                                        "finish_reason": ev.reason})
                            out.append(_sse({**base, "object": "chat.completion.chunk" if chat else obj,
                                             "choices": [choice]}))
                        yield b"".join(out)
                    if include_usage and not failed:  # a failed stream ends with its error event and [DONE]
                        yield _sse({**base, "object": "chat.completion.chunk" if chat else obj, "choices": [],
                                    "usage": usage(len(ids), total)})
                    yield b"data: [DONE]\n\n"
                finally:
                    handle.cancel()  # no-op when finished; frees the slots when the client went away

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        texts, reasons, total = [""] * n, [None] * n, 0
        loop = asyncio.get_running_loop()
        try:
            done, checked = 0, loop.time()
            while done < n:
                # events keep coming while it runs, so poll for a disconnect by the clock, not on idle
                if loop.time() - checked > 0.1:
                    checked = loop.time()
                    if await request.is_disconnected():
                        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
                try:
                    ev = await asyncio.wait_for(handle.events.get(), timeout=0.1)
                except asyncio.TimeoutError:
                    continue
                if isinstance(ev, Failed):
                    return _err(500, ev.message, type_="server_error")
                if lpf is not None:
                    lpf.add(ev.index, ev.logprobs)
                if isinstance(ev, Delta):
                    texts[ev.index] += ev.text
                else:
                    reasons[ev.index] = ev.reason
                    total += ev.tokens
                    done += 1
        finally:
            handle.cancel()
        lps = [lpf.whole(i) if lpf is not None else None for i in range(n)]
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": lps[i],
                        "finish_reason": reasons[i]} for i in range(n)]
        else:
            choices = [{"index": i, "text": texts[i], "logprobs": lps[i], "finish_reason": reasons[i]} for i in range(n)]
        return JSONResponse({**base, "object": obj, "choices": choices, "usage": usage(len(ids), total)})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await _read_json(request, CompletionRequest, settings.max_body_bytes, ranges)
        sv = _pick(req.model)
        ids, params = _check(sv, req, req.prompt)
        inc = bool(req.stream_options and req.stream_options.include_usage)
        return await _run(sv, request, ids, params, req.n, False, req.stream, inc)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await _read_json(request, ChatRequest, settings.max_body_bytes, ranges)
        sv = _pick(req.model)
        prompt = _chat_prompt(sv, req.messages)
        fmt = sv.state["chat"]
        ids, params = _check(sv, req, prompt)
        # the template's turn marker: a stop string (plain template) or its end-of-turn token id
        stops = tuple(req.stops) + tuple(fmt.stop_strings[:max(0, 4 - len(req.stops))])
        params = SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                                seed=params.seed, stops=stops, stop_ids=fmt.stop_ids, logprobs=params.logprobs)
        inc = bool(req.stream_options and req.stream_options.include_usage)
        return await _run(sv, request, ids, params, req.n, True, req.stream, inc)

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        """vLLM's /tokenize: the ids the model would be given for a prompt or chat messages (the
        leading EOS included, as `usage.prompt_tokens` counts them) and its context (max_model_len)."""
        req = await _read_json(request, TokenizeRequest, settings.max_body_bytes)
        sv = _pick(req.model)
        if req.messages is not None:
            text = _chat_prompt(sv, req.messages)  # checks the model can chat (loaded, not a classifier)
        else:
            _generative(sv)
            text = req.prompt
        ids = prompt_ids(sv.state["tokenizer"], text, None, 0)
        return {"count": len(ids), "max_model_len": sv.state["context"], "tokens": ids}

    # POST /classify: serve/classify.py
    register_classify(app, lambda name: _pick(name, optional=True), settings.max_body_bytes, _read_json, _err)
    return _Guard(app, settings, metrics, drain, instance_id)


def _max_tokens(req: CompletionRequest | ChatRequest) -> tuple[int | None, str]:
    """The request's token budget and the field that gave it. Chat's max_completion_tokens is
    OpenAI's newer name for max_tokens; both given, they must agree (400), so that neither is
    silently ignored."""
    newer = getattr(req, "max_completion_tokens", None)
    if newer is None:
        return req.max_tokens, "max_tokens"
    if req.max_tokens is not None and req.max_tokens != newer:
        raise _Reject(_err(400, f"max_tokens={req.max_tokens} and max_completion_tokens={newer} disagree; "
                                "give one of them (max_completion_tokens is the newer name)",
                           param="max_completion_tokens"))
    return newer, "max_completion_tokens"


def _top_logprobs(req: CompletionRequest | ChatRequest) -> int | None:
    """Alternatives per token the scheduler reports, or None for no logprobs: completions' `logprobs`
    (an int), chat's `top_logprobs` when `logprobs` is true (0 when not given)."""
    if isinstance(req, ChatRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return req.top_logprobs


class _LogprobFormat:
    """A request's logprobs in OpenAI's shapes (serve/logprobs.py), per choice: `chunk` formats one
    streamed event's tokens (None when it has none), `add` + `whole` collect a non-streaming reply."""

    def __init__(self, state: dict, chat: bool, n: int) -> None:
        from clusterlm.serve.logprobs import CompletionLogprobs, TokenNames

        if "token_names" not in state:
            state["token_names"] = TokenNames(state["tokenizer"])
        self.names, self.is_chat = state["token_names"], chat
        self.acc = [CompletionLogprobs(self.names) for _ in range(n)]
        self.parts: list[list] = [[] for _ in range(n)]

    def chunk(self, i: int, triples: list | None) -> dict | None:
        from clusterlm.serve.logprobs import chat_logprobs

        if not triples:
            return None
        return chat_logprobs(self.names, triples) if self.is_chat else self.acc[i].chunk(triples)

    def add(self, i: int, triples: list | None) -> None:
        if triples:
            self.parts[i].append(self.chunk(i, triples))

    def whole(self, i: int) -> dict:
        from clusterlm.serve.logprobs import CompletionLogprobs

        if self.is_chat:
            return {"content": [e for p in self.parts[i] for e in p["content"]], "refusal": None}
        return CompletionLogprobs.merge(self.parts[i])


# characters Python's str.splitlines (and so httpx's `aiter_lines`) and some JavaScript parsers take
# for line ends, which JSON leaves unescaped: escaped so a generated one cannot split an event
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS).encode() + b"\n\n"


PLACEHOLDER_KEY_PREFIX = "CHANGE-ME"  # deploy/k8s/secret.yaml's value, published with the repository


def _check_key(key: str, source: str) -> str:
    """A key that is the shipped placeholder is refused: anyone who has read the repository has it."""
    if key.upper().startswith(PLACEHOLDER_KEY_PREFIX):
        raise ValueError(f"{source}: the API key is the placeholder shipped in deploy/k8s/secret.yaml, which anyone "
                         "can read; make a real one, e.g. `openssl rand -base64 32`")
    return key


def _read_key(path: str) -> str:
    """The key on the first line of `path`; a warning when the file is readable by others."""
    import os
    import stat

    try:
        st = os.stat(path)
    except OSError as e:
        raise ValueError(f"--api-key-file {path}: {e.strerror}; give a file holding the key on its first line "
                         "(or --api-key-env NAME)") from None
    if stat.S_ISDIR(st.st_mode):  # Docker makes a directory where a bind-mounted file is missing
        raise ValueError(f"--api-key-file {path} is a directory, not a file; give a file holding the key on its "
                         "first line (a missing bind-mount source becomes an empty directory in a container)")
    if not stat.S_ISREG(st.st_mode):  # /dev/null, or a pipe such as <(cmd): not a key file
        what = "a FIFO (pipe)" if stat.S_ISFIFO(st.st_mode) else "a device or special file"
        raise ValueError(f"--api-key-file {path} is {what}, not a regular file; give a file holding the key on "
                         "its first line, or pass the key in an environment variable with --api-key-env NAME")
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM (Notepad) is not part of the key
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--api-key-file {path} cannot be read: {getattr(e, 'strerror', None) or e}") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise ValueError(f"--api-key-file {path} is empty; put the key on its first line")
    _check_key(key, f"--api-key-file {path}")
    mode = stat.S_IMODE(st.st_mode)  # warned only for a key that is used: a refused file gets its one error line
    if mode & 0o077:
        who = "everyone" if mode & 0o007 else "its group"
        log.warning("API key file %s has mode %04o: readable by %s; run `chmod 600 %s`", path, mode, who, path)
    return key


def _refuse_pack(pack: str, specs: list[ModelSpec]) -> None:
    """--pack given when every model is an encoder-decoder, which would ignore it: refused as `generate` refuses
    it, from each checkpoint's config.toml (before the port is bound and any weights load). With decoder-only
    models beside them --pack is theirs. A path that does not resolve is left to the loader to report."""
    if pack == "auto":
        return
    from clusterlm.checkpoint.model_io import read_checkpoint_config
    from clusterlm.checkpoint.store import resolve_checkpoint
    from clusterlm.errors import ClusterlmError
    from clusterlm.generate.text import refuse_pack_for_encdec

    found = []
    for spec in specs:
        try:
            if (Path(spec.path) / "adapter.json").is_file():
                return  # a LoRA fine-tune of a decoder-only base
            path = resolve_checkpoint(str(spec.path))
            found.append((read_checkpoint_config(path).model.arch, path))
        except (ClusterlmError, OSError, ValueError):
            return
    if all(arch == "encdec" for arch, _ in found):
        refuse_pack_for_encdec(pack, *found[0])


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clusterlm serve",
                                description="Serve a checkpoint over an OpenAI-compatible HTTP API.")
    p.add_argument("checkpoint", nargs="*", metavar="[NAME=]PATH",
                   help="run directory, checkpoints folder, step folder, or LoRA adapter folder (RUN/adapter); "
                        "several serve several models, each named NAME or after its run folder")
    p.add_argument("--models", default=None, metavar="FILE",
                   help="a TOML file with one [[model]] table per model: name, path, and optionally max_batch, "
                        "max_queue, max_new_tokens_limit (docs/serving.md, 'Several models')")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", default=None,
                   help="file holding the API key (first line); without it a random key is generated "
                        "and printed once to stdout")
    p.add_argument("--api-key-env", default=None, metavar="NAME",
                   help="environment variable holding the API key (a container's secret); not with --api-key-file")
    p.add_argument("--instance-id", default=None,
                   help="this replica's id in every log line, the clusterlm_instance_info metric and the "
                        "X-Clusterlm-Instance header (default: hostname:port)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds a SIGTERM drain waits for running requests; then they end with an error event "
                        "and the server exits (75)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="also serve /metrics without the API key on this port (same --host), and nothing else")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together (cache slots)")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    p.add_argument("--max-new-tokens-limit", type=int, default=512, help="upper bound on max_tokens")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20)
    p.add_argument("--max-connections", type=int, default=1000,
                   help="open connections at most; beyond it the oldest one without complete request headers "
                        "is closed, or the new one is answered 503 when every connection is busy")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection has to send complete request headers (slow clients are closed)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds from complete headers to the end of the request body")
    p.add_argument("--model-name", default=None,
                   help="the id in /v1/models of a single model (default: the run folder's name; several: NAME=PATH)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--pack", default="auto", choices=PACK_CHOICES,
                   help="CPU weights for the decode steps: auto = fp32 packed for oneDNN (same precision), bf16 = "
                        "bf16 packed (AMX; ~1e-2 relative logits error, docs/compression.md), none = as loaded")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="the server's and uvicorn's log level")
    p.add_argument("--access-log", default="requests", choices=("requests", "all", "none"),
                   help="uvicorn's line per request: requests = all but successful health checks and scrapes "
                        "(GET/HEAD /health, /ready, /metrics below 400: a load balancer's checks every 0.5 s "
                        "would be most of the log), all, or none")
    p.add_argument("--log-format", default="text", choices=("text", "json"),
                   help="text: lines that start '[instance-id] HH:MM:SS'; json: one JSON object per line "
                        "(time in ISO 8601 UTC, level, instance_id, logger, message; access lines add method, "
                        "path, status, duration_ms and client) for log aggregators such as Loki, Elasticsearch "
                        "or Cloud Logging, uvicorn's lines included")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads on CPU (0 = torch's default). 1 is fastest for small models: "
                        "the decode step's matmuls are too small to split, and idle OpenMP workers spin "
                        "against the event loop and scheduler threads")
    args = p.parse_args(argv)
    import uvicorn

    from clusterlm.errors import CheckpointError, ClusterlmError
    from clusterlm.errors import EXIT_PREEMPTED
    from clusterlm.serve.guard import (ConnectionLimits, ProbeFilter, RateLimitFilter, bind, check_instance_id,
                                       default_instance_id, json_logs, protocol_class, raise_open_file_limit,
                                       tag_logs)
    from clusterlm.serve.models import load_model, model_specs

    if args.threads < 0:
        raise ValueError(f"--threads={args.threads} must be >= 0 (0 = torch's default)")
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port={args.port} must be in [1, 65535]")
    if args.metrics_port is not None and not (1 <= args.metrics_port <= 65535 and args.metrics_port != args.port):
        raise ValueError(f"--metrics-port={args.metrics_port} must be in [1, 65535] and differ from --port")
    for flag, val, lo in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                          ("--max-new-tokens-limit", args.max_new_tokens_limit, 1),
                          ("--max-body-bytes", args.max_body_bytes, 1024),
                          ("--max-connections", args.max_connections, 1)):  # Settings' bounds, by option
        if val < lo:
            raise ValueError(f"{flag}={val} must be >= {lo}")
    for flag, val in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout)):
        if not 0 < val <= 3600:  # ConnectionLimits' bounds, by option
            raise ValueError(f"{flag}={val} must be in (0, 3600] seconds")
    for flag, val, what in (("--api-key-file", args.api_key_file, "a file holding the key"),
                            ("--api-key-env", args.api_key_env, "the name of a variable holding the key")):
        if val is not None and not val.strip():  # e.g. an unset shell variable: not the generated key's case
            raise ValueError(f"{flag} {val!r} is empty; give {what}, or leave {flag} out for a generated key")
    if args.api_key_file and args.api_key_env:
        raise ValueError("--api-key-file and --api-key-env both given; choose one")
    if args.device == "cuda":  # refused here, not by the model's load once the server runs
        from clusterlm.device import resolve_device

        resolve_device(args.device, "--device", instead="'cpu'")  # serve has no --device auto
    specs = model_specs(args.checkpoint, args.models, args.model_name)
    instance_id = (check_instance_id(args.instance_id) if args.instance_id is not None  # "" is refused too
                   else default_instance_id(args.port))
    # "[id] HH:MM:SS ..." (or a JSON object with the id) on every line from here on, uvicorn's too
    if args.log_format == "json":
        log_config = json_logs(instance_id, uvicorn.config.LOGGING_CONFIG)
        logging.captureWarnings(True)  # Python's warnings (torch's included) as JSON lines too
    else:
        log_config = tag_logs(instance_id, uvicorn.config.LOGGING_CONFIG, timestamps=True)
    logging.getLogger().setLevel(args.log_level.upper())
    if args.access_log == "requests":
        logging.getLogger("uvicorn.access").addFilter(ProbeFilter())
    drain = Drain(args.drain_timeout)
    limits = ConnectionLimits(max_connections=args.max_connections, header_timeout=args.header_timeout,
                              body_timeout=args.body_timeout)
    if args.api_key_env:
        import os

        key = os.environ.get(args.api_key_env, "").strip()
        if not key:
            raise ValueError(f"--api-key-env {args.api_key_env}: the environment variable is "
                             f"{'empty' if args.api_key_env in os.environ else 'not set'}; set it to the key")
        _check_key(key, f"--api-key-env {args.api_key_env}")
    elif args.api_key_file:
        key = _read_key(args.api_key_file)
    else:
        key = secrets.token_urlsafe(24)  # printed once the port is bound: a server that does not start has none
    ckpt = Path(specs[0].path)
    if len(specs) == 1 and not ckpt.exists():  # one model: nothing to serve; several: the others serve
        raise FileNotFoundError(f"checkpoint {ckpt} does not exist")
    if len(specs) == 1 and (ckpt / "adapter.json").is_file():  # refused before the port is bound
        from clusterlm.serve.models import refuse_classifier_adapter

        refuse_classifier_adapter(ckpt)
    if len(specs) == 1 and (ckpt / "adapter.json").is_file():  # an adapter folder whose base has moved
        from clusterlm.finetune.lora import adapter_source

        adapter_source(ckpt, "base")
    _refuse_pack(args.pack, specs)
    settings = Settings(api_key=key, model_name=specs[0].name, max_batch=args.max_batch, max_queue=args.max_queue,
                        max_new_tokens_limit=args.max_new_tokens_limit, max_body_bytes=args.max_body_bytes,
                        device=args.device, pack=args.pack)
    if args.pack == "bf16" and args.device == "cpu":
        from clusterlm.optimize.packed import bf16_unavailable

        if bf16_unavailable():
            raise ValueError(f"--pack bf16: {bf16_unavailable()}; use --pack auto (fp32 packed) or none")
    for spec in specs:  # each model's own limits are checked before anything binds or loads
        settings.for_model(spec)
    if len(specs) == 1:
        settings = settings.for_model(specs[0])
    soft, _ = raise_open_file_limit()
    # asyncio accepts up to `backlog` connections per event-loop tick before any protocol sees them
    # (and may do so again before the evicted ones are closed), so the cap leaves 2 x BACKLOG
    # descriptors spare, plus 64 for the model files, logs and the listener
    if 0 < soft < limits.max_connections + 2 * BACKLOG + 64:
        cap = max(1, soft - 2 * BACKLOG - 64)
        log.warning("--max-connections=%d lowered to %d: the open-file limit is %d (raise `ulimit -Hn` for more)",
                    limits.max_connections, cap, soft)
        limits.max_connections = cap
    # one line per kind of repeated message every 5 s: a flood of bad or refused connections (or
    # accept() failing with "Too many open files") must not flood the log as well
    flood = RateLimitFilter(period=5.0)
    for name_ in ("asyncio", "uvicorn.error", "clusterlm.serve.guard"):
        logging.getLogger(name_).addFilter(flood)
    sock = bind(args.host, args.port, backlog=BACKLOG)  # the port first: a busy one fails before the model loads
    sockets = [sock]
    if args.metrics_port is not None:
        try:
            sockets.append(bind(args.host, args.metrics_port, backlog=BACKLOG, flag="--metrics-port"))
        except Exception:
            sock.close()
            raise
    if not (args.api_key_env or args.api_key_file):
        print(f"API key (generated; pass --api-key-file to choose one): {key}", flush=True)
    if args.threads and args.device == "cpu":
        import torch

        torch.set_num_threads(args.threads)

    bases: dict = {}  # a checkpoint is loaded once: adapters on it (and the base) share its weights

    def load(spec: ModelSpec) -> object:
        return load_model(spec.path, args.device, bases)

    failed: list[Exception] = []

    def on_load_error(e: Exception) -> None:
        failed.append(e)
        server.should_exit = True  # uvicorn's main loop checks it every 0.1 s

    app = create_app(load, settings, on_load_error, drain=drain, instance_id=instance_id, models=specs)
    app.metrics_port = args.metrics_port
    app.access_log = args.access_log != "none"
    config = uvicorn.Config(app, http=protocol_class(limits), ws="none", lifespan="on", backlog=BACKLOG,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES, log_level=args.log_level,
                            access_log=args.access_log != "none",
                            timeout_graceful_shutdown=5, log_config=log_config)

    class ReplicaServer(uvicorn.Server):
        """uvicorn's server with SIGTERM/SIGINT as a drain: the first signal starts it (flags only:
        this runs in a signal handler), the second ends the remaining streams at once, a third
        exits without waiting. uvicorn's re-raise of the signal after exit is skipped (it would
        replace our exit code with 143)."""

        def handle_exit(self, sig: int, frame: object) -> None:
            if drain.forced:
                self.should_exit = self.force_exit = True
            drain.request()

    server = ReplicaServer(config)
    drain.on_done = lambda: setattr(server, "should_exit", True)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    log.info("listening on http://%s:%d (at most %d connections, header timeout %g s); loading %s", shown,
             args.port, limits.max_connections, limits.header_timeout,
             ", ".join(f"{s.name}={s.path}" if len(specs) > 1 else s.path for s in specs))
    try:
        server.run(sockets=sockets)
    finally:
        for s in sockets:
            s.close()
    if failed:
        e = failed[0]
        if isinstance(e, ClusterlmError):
            raise e
        raise CheckpointError(f"checkpoint {ckpt} cannot be served: {type(e).__name__}: {e}") from e
    if drain.aborted:  # the drain deadline (or a second signal) ended requests with an error
        return EXIT_PREEMPTED
    return 0
