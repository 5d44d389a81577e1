"""`clusterlm stream-guard`: a stream whose replica dies ends with an error event, not a cut.

A replica killed with SIGKILL (or by the kernel's OOM killer, or a lost node) cannot tell its
clients anything: HAProxy, like every load balancer, then closes their connections in the middle
of the response, and a client sees the body end without `data: [DONE]` (the `openai` client raises
APIConnectionError). The guard sits between the load balancer and the replicas, for streams only,
and outlives them:

    client -> HAProxy :8000 --(stream: true)--> stream-guard :8020 -> HAProxy :8010 -> replicas
                       \\--(everything else)-----------------------------------------> replicas

It relays the request unchanged (the client's API key included: replicas check it) to the inner
HAProxy frontend, so balancing, health checks and retries of streams that have not started stay
HAProxy's. It forwards the response event by event (only whole events: a half-written one would
be a broken JSON line), and when the upstream body ends before `data: [DONE]` (a dead replica, an
idle timeout) it appends one OpenAI-shaped error event and `[DONE]`:

    data: {"error": {"message": "the replica serving this stream was lost ...", "type": "server_error",
           "param": null, "code": "replica_lost"}}

A client that goes away closes the guard's upstream connection at once, so the replica stops
generating for it. Responses that are not event streams (an error status, a JSON body) pass
through as they come. deploy/haproxy/haproxy.cfg routes `"stream": true` requests here and sends
them straight to the replicas while no guard is up; docs/serving.md has the whole setup.

HAProxy itself cannot do this (docs/serving.md, "Why the guard is not part of HAProxy"): its
Lua filters may not write after a server abort, and a Lua relay crashed HAProxy 2.6.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
from collections.abc import AsyncIterator

log = logging.getLogger("clusterlm.serve.relay")

# hop-by-hop headers (RFC 9110 7.6.1) and the ones the relay recomputes
_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
                  "trailer", "transfer-encoding", "upgrade", "host", "content-length"})
# an SSE event ends at a blank line; the spec allows CRLF, LF and CR line ends
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_DONE = re.compile(rb"(?:^|[\r\n])data: ?\[DONE\][\r\n]")


def split_events(buf: bytes) -> tuple[bytes, bytes]:
    """(the whole events at the front of `buf`, each with its blank line; the incomplete rest)."""
    end = 0
    for m in _EVENT_END.finditer(buf):
        end = m.end()
    return buf[:end], buf[end:]


def lost_event(message: str, code: str) -> bytes:
    """The error event and `[DONE]` that end a stream the upstream did not finish."""
    import json

    from clusterlm.serve.schemas import error_body

    return b"data: " + json.dumps(error_body(message, "server_error", code=code)).encode() + b"\n\ndata: [DONE]\n\n"


def create_app(upstream: str, connect_timeout: float = 2.0, read_timeout: float = 150.0,
               max_body_bytes: int = 16 << 20):
    """The guard's ASGI app: POST anything -> relayed to `upstream`; GET /health; GET /metrics."""
    import httpx2 as httpx
    from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_LATEST
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from clusterlm.serve.schemas import error_body

    registry = CollectorRegistry()
    streams = Counter("clusterlm_guard_streams", "Event streams relayed, by how they ended: completed "
                      "([DONE] from the replica), replica_lost / upstream_timeout (ended here with an error "
                      "event), client_gone (the client left first)", ["outcome"], registry=registry)
    for outcome in ("completed", "replica_lost", "upstream_timeout", "client_gone"):
        streams.labels(outcome)
    active = Gauge("clusterlm_guard_active_streams", "Event streams being relayed now", registry=registry)
    failed = Counter("clusterlm_guard_upstream_errors", "Requests the upstream did not answer (502 here)",
                     registry=registry)
    # no pool cap: HAProxy's maxconn limits what reaches the guard; no proxy from the environment
    client = httpx.AsyncClient(base_url=upstream, trust_env=False,
                               timeout=httpx.Timeout(read_timeout, connect=connect_timeout),
                               limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    async def relay_events(resp: httpx.Response, result: dict[str, str]) -> AsyncIterator[bytes]:
        buf, done = b"", False
        try:
            async for chunk in resp.aiter_bytes():
                whole, buf = split_events(buf + chunk)
                if whole:
                    done = done or _DONE.search(whole) is not None
                    yield whole
            outcome = "completed" if done else "replica_lost"
            why = "its response ended before [DONE]"
        except httpx.ReadTimeout:
            outcome, why = "upstream_timeout", f"no byte from it for {read_timeout:g} s"
        except httpx.TransportError as e:  # "incomplete chunked read": the replica's connection died
            outcome, why = "replica_lost", f"{type(e).__name__}: {e}"
        if not done:
            log.warning("stream %s: %s; ended with an error event", outcome, why)
            yield lost_event("the replica serving this stream was lost before it finished (" + why + "); the "
                             "text so far is incomplete: retry the request", outcome)
        result["outcome"] = outcome  # set once the last byte was handed over

    class Relayed(StreamingResponse):
        """A relayed response that closes its upstream however it ends: finished, or the client
        gone (a failed send, or a disconnect before the first byte), so the replica stops too."""

        def __init__(self, content: AsyncIterator[bytes], upstream: httpx.Response, on_close=None, **kw) -> None:
            super().__init__(content, **kw)
            self.upstream, self.on_close = upstream, on_close

        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                await self.body_iterator.aclose()
                await self.upstream.aclose()
                if self.on_close is not None:
                    self.on_close()

    async def relay(request: Request) -> Response:
        # read whole, to send on; capped (a replica's own default limit is 1 MiB, --max-body-bytes)
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > max_body_bytes:
                return JSONResponse(error_body(f"request body over the stream guard's {max_body_bytes} bytes",
                                               code="request_too_large"), status_code=413)
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in _HOP]
        url = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            resp = await client.send(client.build_request(request.method, url, content=bytes(body), headers=headers),
                                     stream=True)
        except httpx.TransportError as e:
            failed.inc()
            log.warning("upstream %s did not answer %s %s: %s: %s", upstream, request.method, url,
                        type(e).__name__, e)
            return JSONResponse(error_body(f"the stream guard's upstream did not answer ({type(e).__name__}); "
                                           "retry the request", "server_error", code="upstream_unavailable"),
                                status_code=502)
        out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP}
        if resp.status_code == 200 and resp.headers.get("content-type", "").startswith("text/event-stream"):
            out.pop("content-encoding", None)  # aiter_bytes decodes
            result: dict[str, str] = {}
            active.inc()

            def counted() -> None:
                active.dec()
                streams.labels(result.get("outcome", "client_gone")).inc()

            return Relayed(relay_events(resp, result), resp, counted, status_code=200, headers=out)
        return Relayed(resp.aiter_raw(), resp, status_code=resp.status_code, headers=out)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "upstream": upstream})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    return Starlette(routes=[Route("/health", health, methods=["GET"]),
                             Route("/metrics", metrics, methods=["GET"]),
                             Route("/{path:path}", relay, methods=["POST"])],
                     lifespan=lifespan)


def _upstream(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"--upstream {url!r} is not a base URL; give one like http://127.0.0.1:8010 (the inner "
                         "HAProxy frontend in front of the replicas)")
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:  # urlsplit takes :0 (and `http://h:` is None: the scheme's default port)
        raise ValueError(f"--upstream {url!r}: the port is not a number in 1-65535") from None
    return url.rstrip("/")


def _refuse_self(upstream: str, host: str, port: int) -> None:
    """--upstream naming the guard's own listener would relay each request to itself, again and again,
    until the client gives up: refused. Loopback names count as one address (and a wildcard --host
    listens on them too)."""
    from urllib.parse import urlsplit

    parts = urlsplit(upstream)
    up_host, up_port = (parts.hostname or "").lower(), parts.port or (443 if parts.scheme == "https" else 80)
    loop4, loop6 = {"localhost", "127.0.0.1"}, {"localhost", "::1"}
    same = (up_host == host.strip("[]").lower() or {up_host, host} <= loop4 or {up_host, host} <= loop6
            or (host in ("0.0.0.0", "::", "") and up_host in loop4 | loop6))
    if up_port == port and same:
        raise ValueError(f"--upstream {upstream} is this guard's own address (--host {host} --port {port}); give "
                         "the inner HAProxy frontend in front of the replicas, e.g. http://127.0.0.1:8010")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clusterlm stream-guard", description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", required=True, metavar="URL",
                   help="where streams go: the inner HAProxy frontend in front of the replicas (http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8020)
    p.add_argument("--connect-timeout", type=float, default=2.0, help="seconds to connect to the upstream")
    p.add_argument("--read-timeout", type=float, default=150.0,
                   help="longest silence from the upstream before the stream ends with an error event "
                        "(longer than HAProxy's `timeout server`, which ends it first)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running streams get to finish")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    upstream = _upstream(args.upstream)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port={args.port} must be in 1-65535")
    for flag, val in (("--connect-timeout", args.connect_timeout), ("--read-timeout", args.read_timeout),
                      ("--drain-timeout", args.drain_timeout)):
        if not 0 < val <= 3600:
            raise ValueError(f"{flag}={val} must be in (0, 3600] seconds")
    _refuse_self(upstream, args.host, args.port)
    import uvicorn

    from clusterlm.serve.guard import bind

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("httpx2", "httpcore2"):  # a line per relayed request otherwise
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    sock = bind(args.host, args.port, backlog=2048)
    app = create_app(upstream, args.connect_timeout, args.read_timeout)
    config = uvicorn.Config(app, ws="none", lifespan="on", log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=args.drain_timeout)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    log.info("stream guard on http://%s:%d, relaying to %s", shown, args.port, upstream)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
