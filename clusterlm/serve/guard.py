"""Connection-level defences of `clusterlm serve`: slow clients, too many connections, log floods.

uvicorn's h11 protocol has no deadline for a request's headers (its keep-alive timer stops at the
first byte), so a client that sends one header line every few seconds holds a connection and a
file descriptor forever; a thousand of them exhaust the open-file limit and every accept() then
fails (with an error logged each time). `protocol_class` closes that hole:

- headers must be complete within `header_timeout` seconds of the connection opening (or of the
  previous response on a keep-alive connection), the body within `body_timeout` seconds of the
  headers; otherwise the connection is closed without an answer;
- at most `max_connections` are open: a new one beyond the cap evicts the oldest connection that
  has not sent complete headers yet (a slow client, or an idle keep-alive one), so real requests
  still get in during a slow-client attack; when none is evictable it is answered 503 and closed.

`raise_open_file_limit` lifts the soft RLIMIT_NOFILE to the hard limit, `RateLimitFilter` keeps
repeated errors to one line per kind per period, and `bind` takes the port before the model loads.

`Drain` is the replica's way out (docs/serving.md, "Replicas and drain"): on SIGTERM /ready answers
503 and new generation requests 503 + Retry-After (an answer a load balancer retries elsewhere),
running requests finish, then the server exits; past the deadline the remaining streams end with
an error event. `check_instance_id` and `tag_logs` put the replica's id in every log line;
`json_logs` writes every line as one JSON object instead (--log-format json), and `log_access` is
the access line, written when a response ends so that it can carry the request's duration.

    limits = ConnectionLimits(max_connections=1000, header_timeout=10.0, body_timeout=30.0)
    config = uvicorn.Config(app, http=protocol_class(limits), ...)
"""

from __future__ import annotations

import asyncio
import copy
import errno
import json
import logging
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from clusterlm.errors import ClusterlmError, ResourceBusyError

log = logging.getLogger(__name__)

_BUSY_BODY = b'{"error": {"message": "too many open connections", "type": "unavailable", "param": null, "code": null}}'
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
         b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY))


@dataclass
class ConnectionLimits:
    max_connections: int = 1000
    header_timeout: float = 10.0  # seconds from connect (or the last response) to complete headers
    body_timeout: float = 30.0  # seconds from complete headers to the end of the body
    # connections still waiting for complete headers, oldest first: the ones a new connection evicts
    waiting: OrderedDict = field(default_factory=OrderedDict, repr=False)
    evicted: int = 0
    refused: int = 0

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_connections={self.max_connections} must be >= 1")
        for name in ("header_timeout", "body_timeout"):
            v = getattr(self, name)
            if not 0 < v <= 3600:
                raise ValueError(f"{name}={v} must be in (0, 3600] seconds")


class HeadWithBody:
    """A transport that sends a response's head together with its first body bytes, in one write.

    uvicorn writes the head (`HTTP/1.1 200 OK ...`) and the body with two `transport.write` calls.
    A replica killed between them leaves a load balancer holding a response that has started, which
    it cannot retry elsewhere: the client's request fails (docs/serving.md, "A non-streaming request
    can still be cut"). With one write per head and first body, a SIGKILL lands before it (no byte
    sent: HAProxy retries the request on another replica) or after it. Interim 1xx heads (100
    Continue) go out at once; a head still held when the connection closes is sent first.
    Everything else is the wrapped transport's."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head = b""

    def write(self, data: bytes) -> None:
        if not self._head and data.startswith(b"HTTP/") and not data.startswith((b"HTTP/1.1 1", b"HTTP/1.0 1")):
            self._head = bytes(data)
            return
        if self._head:
            data, self._head = self._head + data, b""
        self._transport.write(data)

    def close(self) -> None:
        if self._head:
            self._transport.write(self._head)
            self._head = b""
        self._transport.close()

    def __getattr__(self, name: str):  # noqa: ANN204 (is_closing, get_extra_info, pause_reading, ...)
        return getattr(self._transport, name)


def protocol_class(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's H11Protocol with the read deadlines and the connection cap of `limits`; pass it as
    uvicorn.Config(http=...). uvicorn's own access line is off: serve's app writes it when the
    response ends (`log_access`)."""

    class GuardedH11Protocol(H11Protocol):
        _limits = limits

        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            super().__init__(*args, **kwargs)
            self.access_log = False  # uvicorn writes it when the response starts: a stream's would lack its duration

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._deadline: asyncio.TimerHandle | None = None
            self._phase = "headers"
            super().connection_made(HeadWithBody(transport))  # type: ignore[arg-type]
            lim = self._limits
            if len(self.connections) > lim.max_connections:
                if lim.waiting:
                    oldest, _ = lim.waiting.popitem(last=False)
                    lim.evicted += 1
                    log.warning("connection cap of %d reached: closed the oldest connection without complete "
                                "request headers (%d so far)", lim.max_connections, lim.evicted)
                    oldest._close()
                else:
                    lim.refused += 1
                    log.warning("connection cap of %d reached, every connection busy: answered 503 (%d so far)",
                                lim.max_connections, lim.refused)
                    self.connections.discard(self)
                    transport.write(_BUSY)
                    transport.close()
                    return
            self._arm("headers")

        def _arm(self, phase: str) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._phase = phase
            if phase == "headers":
                self._limits.waiting[self] = None
                self._deadline = self.loop.call_later(self._limits.header_timeout, self._expire)
            else:
                self._limits.waiting.pop(self, None)
                self._deadline = (self.loop.call_later(self._limits.body_timeout, self._expire)
                                  if phase == "body" else None)

        def _expire(self) -> None:
            # the deadline passed while still reading this phase: the client is too slow, drop it
            self._deadline = None
            if self._phase in ("headers", "body"):
                self._close()

        def _close(self) -> None:
            self._limits.waiting.pop(self, None)
            if not self.transport.is_closing():
                self.transport.close()  # connection_lost follows: the app sees a disconnect

        def handle_events(self) -> None:
            super().handle_events()
            # their_state moves IDLE -> SEND_BODY (headers parsed) -> DONE (body read)
            state = self.conn.their_state
            if self._phase == "headers" and state is not h11.IDLE:
                self._arm("body" if state is h11.SEND_BODY else "idle")
            if self._phase == "body" and state is not h11.SEND_BODY:
                self._arm("idle")

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # keep-alive: the next request's headers get their own deadline (a pipelined request may
            # already have been parsed by the call above)
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm("headers")

        def connection_lost(self, exc: Exception | None) -> None:
            self._arm("closed")
            super().connection_lost(exc)

    return GuardedH11Protocol


def raise_open_file_limit() -> tuple[int, int]:
    """Lift the soft RLIMIT_NOFILE to the hard limit (each connection holds one descriptor; the
    usual soft default of 1024 is far below what the kernel allows). Returns (soft, hard) after."""
    try:
        import resource
    except ImportError:  # not POSIX
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:  # e.g. above fs.nr_open: keep the old soft limit
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, e)
    return soft, hard


class RateLimitFilter(logging.Filter):
    """At most one record per kind (logger, level, first line of the message template) every
    `period` seconds; the next one that passes says how many were suppressed. Added to a logger, it
    sees the records logged on that logger (not its children)."""

    def __init__(self, period: float = 5.0) -> None:
        super().__init__()
        self.period = period
        self._last: dict[tuple, tuple[float, int]] = {}  # kind -> (time of the last emitted, suppressed since)

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, str(record.msg).split("\n", 1)[0][:100])
        now = time.monotonic()
        last, suppressed = self._last.get(kind, (-float("inf"), 0))
        if now - last < self.period:
            self._last[kind] = (last, suppressed + 1)
            return False
        if len(self._last) > 1000:  # many distinct kinds: forget the old ones rather than grow
            self._last.clear()
        self._last[kind] = (now, 0)
        if suppressed:
            record.msg = f"{record.msg} ({suppressed} more like this in the last {now - last:.0f} s, not logged)"
        return True


def bind(host: str, port: int, backlog: int, flag: str = "--port") -> socket.socket:
    """A listening socket on host:port, taken before the model loads, so a port in use is reported
    at once (ResourceBusyError) rather than after a load that may take minutes."""
    try:
        family, type_, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        hint = (f"; give an IPv6 address without brackets: --host {host[1:-1]}"
                if host.startswith("[") and host.endswith("]") else "")
        raise ClusterlmError(f"--host {host!r} is not an address of this machine: {e.strerror}{hint}") from None
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sock = socket.socket(family, type_, proto)
    try:
        # a restart may rebind while the last run's connections sit in TIME_WAIT; Linux still
        # refuses a port another socket listens on
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ResourceBusyError(f"{shown} is already in use by another process; stop it or choose "
                                    f"another {flag}") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise ClusterlmError(f"{shown}: permission denied (ports below 1024 need privileges); "
                                 f"choose {flag} 1024 or above") from None
        raise ClusterlmError(f"cannot listen on {shown}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


# ---- replicas: drain on SIGTERM, instance id ---------------------------------------------------

DRAIN_ROUTES = frozenset({"/v1/completions", "/v1/chat/completions", "/classify"})  # refused while draining
DRAIN_MESSAGE = "this replica is shutting down (draining); retry the request, another replica will answer it"
ABORT_MESSAGE = "the server shut down before this request finished (drain deadline passed); retry it"
_INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}")


class Drain:
    """Graceful drain. `request()` (from the SIGTERM handler: only flags are set there) starts it;
    `watch()`, a task of the app's lifespan, then waits until no request on DRAIN_ROUTES is in
    flight (counted by the app's guard middleware) or `timeout` seconds pass, calls `abort` with
    ABORT_MESSAGE for what is left (streams end with an error event), and finally `on_done()`
    (main() makes uvicorn exit there). A second `request()` skips the wait."""

    def __init__(self, timeout: float = 30.0) -> None:
        if not 0 <= timeout <= 3600:
            raise ValueError(f"--drain-timeout={timeout} must be in [0, 3600] seconds")
        self.timeout = timeout
        self.requested = False
        self.forced = False
        self.inflight = 0  # requests on DRAIN_ROUTES inside the app; event-loop thread only
        self.aborted = 0  # requests still running at the deadline
        self.seconds: float | None = None  # how long the drain took
        self.on_done: Callable[[], None] = lambda: None

    def request(self) -> None:
        if self.requested:
            self.forced = True
        self.requested = True

    async def watch(self, abort: Callable[[str], None]) -> None:
        while not self.requested:
            await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        log.info("draining: /ready answers 503 and new requests 503; %d request(s) in flight, waiting up to "
                 "%g s (--drain-timeout)", self.inflight, self.timeout)
        while self.inflight and not self.forced and loop.time() - t0 < self.timeout:
            await asyncio.sleep(0.05)
        if self.inflight:
            self.aborted = self.inflight
            log.warning("drain %s after %.1f s: ending %d request(s) with an error event",
                        "forced by a second signal" if self.forced else "deadline passed", loop.time() - t0,
                        self.aborted)
            abort(ABORT_MESSAGE)
            t1 = loop.time()
            while self.inflight and loop.time() - t1 < 2.0:  # let the handlers write their error events
                await asyncio.sleep(0.05)
        self.seconds = loop.time() - t0
        log.info("drained in %.1f s (%d request(s) ended early); exiting", self.seconds, self.aborted)
        self.on_done()


def check_instance_id(value: str) -> str:
    """A replica's id as it appears in log lines, the info metric's label and a response header."""
    if not _INSTANCE_ID.fullmatch(value):
        raise ValueError(f"--instance-id {value!r} must be 1-64 characters of letters, digits and ._:@- "
                         "(starting with a letter or digit)")
    return value


def default_instance_id(port: int) -> str:
    """hostname:port (a pod's hostname is its name), else a short random id."""
    import secrets

    host = socket.gethostname().split(".")[0]
    cand = f"{host}:{port}"
    return cand if _INSTANCE_ID.fullmatch(cand) else f"replica-{secrets.token_hex(3)}"


class _TaggedFormatter(logging.Formatter):
    def __init__(self, inner: logging.Formatter, tag: str) -> None:
        super().__init__()
        self.inner, self.tag = inner, tag

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.tag} {self.inner.format(record)}"


def tag_logs(instance_id: str, uvicorn_config: dict, timestamps: bool = False) -> dict:
    """Prefix every line of the root logger's handlers with `[instance_id]`; returns a copy of
    uvicorn's logging config (`uvicorn.config.LOGGING_CONFIG`) whose formats carry it too, and with
    `timestamps` the time as clusterlm's own lines show it (uvicorn's default has none)."""
    tag = f"[{instance_id}]"
    for h in logging.getLogger().handlers:
        if not isinstance(h.formatter, _TaggedFormatter):
            h.setFormatter(_TaggedFormatter(h.formatter or logging.Formatter(), tag))
    cfg = copy.deepcopy(uvicorn_config)
    for f in cfg.get("formatters", {}).values():
        if "fmt" in f:
            f["fmt"] = f"{tag} " + ("%(asctime)s " if timestamps else "") + f["fmt"]
            if timestamps:
                f["datefmt"] = "%H:%M:%S"
    return cfg


def log_access(scope: dict, status: int, seconds: float) -> None:
    """uvicorn's access line for a request whose response has ended: the same logger, arguments and
    text (so uvicorn's formatter and ProbeFilter apply), plus `duration_ms` (request start to the
    response's last byte, a stream's whole length included) for JsonFormatter."""
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', get_client_addr(scope), scope["method"], get_path_with_query_string(scope),
        scope["http_version"], status, extra={"duration_ms": round(seconds * 1000, 1)})


class JsonFormatter(logging.Formatter):
    """--log-format json: one JSON object per line for log aggregators (Loki, Elasticsearch, Cloud
    Logging): time (ISO 8601, UTC), level, instance_id, logger, message; access lines add method,
    path, status, duration_ms and client; a traceback is one more string field, so that a record
    stays one line. ASCII only (json escapes the rest), so no character can split a line."""

    def __init__(self, instance_id: str) -> None:
        super().__init__()
        self.instance_id = instance_id

    def format(self, record: logging.LogRecord) -> str:
        t = datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
        out = {"time": t.replace("+00:00", "Z"), "level": record.levelname, "instance_id": self.instance_id,
               "logger": record.name, "message": record.getMessage()}
        if record.name == "uvicorn.access" and isinstance(record.args, tuple) and len(record.args) == 5:
            client, method, path, _, status = record.args  # log_access's (and uvicorn's) arguments
            out.update(method=method, path=path, status=status, duration_ms=getattr(record, "duration_ms", None),
                       client=client)
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out)


def json_logs(instance_id: str, uvicorn_config: dict) -> dict:
    """`tag_logs` for --log-format json: the root logger's handlers write JsonFormatter lines; returns a
    copy of uvicorn's logging config (`uvicorn.config.LOGGING_CONFIG`) whose formatters do too."""
    for h in logging.getLogger().handlers:
        h.setFormatter(JsonFormatter(instance_id))
    cfg = copy.deepcopy(uvicorn_config)
    cfg["formatters"] = {name: {"()": JsonFormatter, "instance_id": instance_id} for name in cfg.get("formatters", {})}
    return cfg


PROBE_PATHS = ("/health", "/ready", "/metrics")


class ProbeFilter(logging.Filter):
    """Drops uvicorn's access lines for successful health checks and scrapes (GET or HEAD of
    PROBE_PATHS with a status below 400): HAProxy checks every 0.5 s and Prometheus scrapes every
    15 s, which were most of a replica's log. Failed probes and every other request stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not (isinstance(args, tuple) and len(args) == 5):  # uvicorn: (client, method, path, http, status)
            return True
        _, method, path, _, status = args
        path = str(path).split("?", 1)[0]
        return not (method in ("GET", "HEAD") and path in PROBE_PATHS and isinstance(status, int) and status < 400)
