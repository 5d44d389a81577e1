"""Failover through HAProxy: replicas of `clusterlm serve`, one SIGKILLed and one drained mid-run.

Starts 3 replicas of a tiny random-weights checkpoint (tests/helpers.py random_checkpoint) on
loopback ports, and Debian's haproxy with deploy/haproxy/haproxy.cfg (its bind and server lines
rewritten to free ports) in front of them. 16 clients, half streaming and half not, send
completions back to back for --seconds. At 1/3 of the run replica r1 is SIGKILLed; at 1/2 replica
r2 gets SIGTERM (drain: /ready 503, new requests 503 which HAProxy retries elsewhere, running
streams finish, exit 0). Reported:

- non-streaming requests that failed (goal 0: HAProxy retries those that had not started);
- streams that completed ([DONE]), ended with an explicit error event, were cut (the killed
  replica's running streams: the connection ends without [DONE]) or hung (no byte for
  --client-timeout seconds; goal 0);
- seconds from the SIGKILL until HAProxy's stats socket shows r1 DOWN (goal <= 2 s), and from
  the SIGTERM until r2 is DOWN and until it exited (with its exit code);
- aggregate generated tokens/s before the kill, during (kill to the drained replica's exit) and
  after, from usage.completion_tokens of each finished request at its finish time.

    .venv/bin/python benchmarks/serve_failover.py                  # 60 s, 16 clients, 3 replicas
    .venv/bin/python benchmarks/serve_failover.py --seconds 20     # a busy machine: shorter
Writes benchmarks/results/serve_failover.json (with the CPU model).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx

ROOT = Path(__file__).resolve().parents[1]
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
KEY = "failover-key"
MODEL = "bench"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_haproxy(text: str, lb_port: int, stats_port: int, sock: Path, servers: dict[str, int],
                   inner_port: int = 8010, guard_port: int | None = None) -> str:
    """deploy/haproxy/haproxy.cfg with its frontends' and stats ports, stats socket and `server`
    lines replaced: the replicas' backend gets `servers`, the stream guard's backend one guard on
    `guard_port` (none without it: streams then go straight to the replicas). Everything else
    (checks, retries, timeouts, the stream routing) is the documented file's."""
    out, section, placed = [], "", set()
    for line in text.splitlines():
        s = line.strip()
        if line[:1].isalpha():
            section = s
        if s.startswith("server "):
            if section not in placed:
                placed.add(section)
                if section == "backend clusterlm_replicas":
                    out += [f"    server {name} 127.0.0.1:{port}" for name, port in servers.items()]
                elif section == "backend clusterlm_stream_guard" and guard_port is not None:
                    out.append(f"    server g1 127.0.0.1:{guard_port}")
            continue
        line = line.replace("bind 127.0.0.1:8000", f"bind 127.0.0.1:{lb_port}")
        line = line.replace("bind 127.0.0.1:8010", f"bind 127.0.0.1:{inner_port}")
        line = line.replace("bind 127.0.0.1:8404", f"bind 127.0.0.1:{stats_port}")
        line = re.sub(r"stats socket \S+", f"stats socket {sock}", line)
        out.append(line)
    assert placed == {"backend clusterlm_replicas", "backend clusterlm_stream_guard"}, placed
    return "\n".join(out) + "\n"


def haproxy_status(sock: Path, backend: str = "clusterlm_replicas") -> dict[str, str]:
    """Server name -> status ("UP", "DOWN", "UP 1/2", "DOWN 1/2", "MAINT", ...) from `show stat`."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    head = lines[0].lstrip("# ").split(",")
    out = {}
    for ln in lines[1:]:
        row = dict(zip(head, ln.split(",")))
        if row.get("pxname") == backend and row.get("svname") not in ("FRONTEND", "BACKEND"):
            out[row["svname"]] = row["status"]
    return out


def bench_checkpoint(tmp: Path) -> Path:
    """The replicas' model: a random-weights 2-layer byte-level Transformer, context 256 (greedy or
    sampled, it rarely meets EOS, so a stream runs for max_tokens)."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers import random_checkpoint

    text = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(200))
    return random_checkpoint(tmp, "byte", text, bpe_vocab=0, n_layers=2, context=256)


class Replica:
    def __init__(self, run: Path, name: str, log_dir: Path, *extra: str) -> None:
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{name}.log"
        env = {**os.environ, "CLUSTERLM_API_KEY": KEY}
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "clusterlm", "serve", str(run), "--port", str(self.port),
                                          "--instance-id", name, "--api-key-env", "CLUSTERLM_API_KEY",
                                          "--model-name", MODEL, "--threads", "1", *extra],
                                         stdout=f, stderr=f, env=env)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not ready: {self.log.read_text()[-2000:]}")


class Guard:
    """`clusterlm stream-guard` relaying to HAProxy's inner frontend on `inner_port`."""

    def __init__(self, inner_port: int, log_dir: Path) -> None:
        self.port, self.inner_port = free_port(), inner_port
        self.log = log_dir / "stream-guard.log"
        with open(self.log, "w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "clusterlm", "stream-guard", "--upstream",
                                          f"http://127.0.0.1:{inner_port}", "--port", str(self.port)],
                                         stdout=f, stderr=f)


def start_haproxy(tmp: Path, servers: dict[str, int], guard: Guard | None = None,
                  inner_port: int | None = None) -> tuple[subprocess.Popen, int, Path]:
    """HAProxy on free ports in front of `servers` (and `guard`), once every one of them is UP."""
    lb_port, stats_port, sock = free_port(), free_port(), tmp / "haproxy.sock"
    inner_port = guard.inner_port if guard is not None else (inner_port or free_port())
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(render_haproxy(HAPROXY_CFG.read_text(), lb_port, stats_port, sock, servers, inner_port,
                                  None if guard is None else guard.port))
    log = open(tmp / "haproxy.log", "w")  # noqa: SIM115 (lives as long as the process)
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=log, stderr=log)
    deadline = time.time() + 30
    while time.time() < deadline:
        assert proc.poll() is None, (tmp / "haproxy.log").read_text()
        if guard is not None:
            assert guard.proc.poll() is None, guard.log.read_text()
        try:
            states = list(haproxy_status(sock).values())
            if guard is not None:
                states += list(haproxy_status(sock, "clusterlm_stream_guard").values())
            if states and all(v == "UP" for v in states):
                return proc, lb_port, sock
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError("haproxy did not report every replica (and the stream guard) UP")


async def client(i: int, url: str, stop_at: float, max_tokens: int, timeout: float, log: list[dict]) -> None:
    """Back-to-back completions; even clients stream, odd ones do not."""
    stream = i % 2 == 0
    body = {"model": MODEL, "prompt": f"client {i}:", "max_tokens": max_tokens, "temperature": 1.0,
            "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
    hdr = {"Authorization": f"Bearer {KEY}"}
    # the read timeout is the hang detector: no byte for `timeout` seconds
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=5)) as h:
        while time.perf_counter() < stop_at:
            rec = {"client": i, "stream": stream, "t0": time.perf_counter(), "tokens": 0, "outcome": None}
            try:
                if stream:
                    async with h.stream("POST", url + "/v1/completions", json=body, headers=hdr) as r:
                        if r.status_code != 200:
                            await r.aread()
                            rec["outcome"] = f"http_{r.status_code}"
                        else:
                            rec["outcome"] = "cut"  # until [DONE] or an error event arrives
                            async for line in r.aiter_lines():
                                if not line.startswith("data: "):
                                    continue
                                if line == "data: [DONE]":
                                    rec["outcome"] = "completed" if rec["outcome"] == "cut" else rec["outcome"]
                                    break
                                try:
                                    ev = json.loads(line[6:])
                                except ValueError:  # a line cut off by the killed replica
                                    rec["error"] = f"partial SSE line: {line[:60]} ... {line[-60:]}"
                                    break
                                if "error" in ev:
                                    rec["outcome"] = "error_event"
                                elif ev.get("usage"):
                                    rec["tokens"] = ev["usage"]["completion_tokens"]
                else:
                    r = await h.post(url + "/v1/completions", json=body, headers=hdr)
                    rec["outcome"] = "ok" if r.status_code == 200 else f"http_{r.status_code}"
                    if r.status_code == 200:
                        rec["tokens"] = r.json()["usage"]["completion_tokens"]
                    else:
                        rec["body"] = r.text[:200]
            except httpx.ReadTimeout:
                rec["outcome"] = "hang"
            except httpx.HTTPError as e:  # the connection closed mid-response
                rec["outcome"] = "cut" if stream else "failed"
                rec["error"] = f"{type(e).__name__}: {e}"[:200]
            rec["t1"] = time.perf_counter()
            log.append(rec)


async def watch(sock: Path, stop_at: float, states: list[tuple[float, dict]]) -> None:
    while time.perf_counter() < stop_at:
        try:
            states.append((time.perf_counter(), haproxy_status(sock)))
        except OSError:
            pass
        await asyncio.sleep(0.05)


def first_down(states: list[tuple[float, dict]], name: str, after: float) -> float | None:
    """When HAProxy first reported `name` out of rotation (DOWN or MAINT, not 'UP 1/2') after `after`."""
    for t, st in states:
        if t >= after and st.get(name, "").split(" ")[0] in ("DOWN", "MAINT", "NOLB"):
            return t
    return None


async def drive(args: argparse.Namespace, url: str, sock: Path, replicas: dict[str, Replica]) -> dict:
    t_start = time.perf_counter()
    stop_at = t_start + args.seconds
    log: list[dict] = []
    states: list[tuple[float, dict]] = []
    tasks = [asyncio.create_task(client(i, url, stop_at, args.max_tokens, args.client_timeout, log))
             for i in range(args.clients)]
    tasks.append(asyncio.create_task(watch(sock, stop_at + args.client_timeout, states)))
    t_kill = t_start + args.seconds / 3
    t_term = t_start + args.seconds / 2
    await asyncio.sleep(t_kill - time.perf_counter())
    replicas["r1"].proc.send_signal(signal.SIGKILL)
    t_kill = time.perf_counter()
    await asyncio.sleep(max(0.0, t_term - time.perf_counter()))
    replicas["r2"].proc.send_signal(signal.SIGTERM)
    t_term = time.perf_counter()
    t_exit = None
    while t_exit is None and time.perf_counter() < stop_at + args.client_timeout:
        if replicas["r2"].proc.poll() is not None:
            t_exit = time.perf_counter()
        await asyncio.sleep(0.05)
    await asyncio.gather(*tasks[:-1])
    tasks[-1].cancel()
    t_end = max(r["t1"] for r in log)
    t_after = t_exit or t_end

    def rate(a: float, b: float) -> float | None:
        toks = sum(r["tokens"] for r in log if a <= r["t1"] < b)
        return round(toks / (b - a), 1) if b > a else None

    streams = [r for r in log if r["stream"]]
    plain = [r for r in log if not r["stream"]]
    count = lambda rs, o: sum(r["outcome"] == o for r in rs)  # noqa: E731
    down_kill = first_down(states, "r1", t_kill)
    down_term = first_down(states, "r2", t_term)
    return {
        "non_streaming": {"requests": len(plain), "ok": count(plain, "ok"),
                          "failed": len(plain) - count(plain, "ok"),
                          "failures": [r for r in plain if r["outcome"] != "ok"][:10]},
        "streams": {"requests": len(streams), "completed": count(streams, "completed"),
                    "error_event": count(streams, "error_event"), "cut": count(streams, "cut"),
                    "hung": count(streams, "hang"),
                    "other": [r for r in streams if r["outcome"] not in ("completed", "error_event", "cut", "hang")][:10],
                    "cut_details": [r.get("error", "") for r in streams if r["outcome"] == "cut"][:5]},
        "killed_replica_out_of_rotation_s": None if down_kill is None else round(down_kill - t_kill, 3),
        "drained_replica_out_of_rotation_s": None if down_term is None else round(down_term - t_term, 3),
        "drained_replica_exit_s": None if t_exit is None else round(t_exit - t_term, 3),
        "drained_replica_exit_code": replicas["r2"].proc.returncode,
        "tokens_per_s": {"before": rate(t_start, t_kill), "during": rate(t_kill, t_after),
                         "after": rate(t_after, t_end)},
        "phases_s": {"kill": round(t_kill - t_start, 2), "sigterm": round(t_term - t_start, 2),
                     "drained_exit": None if t_exit is None else round(t_exit - t_start, 2),
                     "end": round(t_end - t_start, 2)},
    }


def main() -> None:
    from common import positive_float, positive_int  # benchmarks/common.py (this script's folder)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=positive_float, default=60.0)
    p.add_argument("--clients", type=positive_int, default=16)
    p.add_argument("--max-tokens", type=positive_int, default=48)
    p.add_argument("--client-timeout", type=positive_float, default=30.0, help="no byte for this long = a hung request")
    p.add_argument("--drain-timeout", type=positive_float, default=30.0)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serve_failover.json")
    p.add_argument("--logs", type=Path, default=None, help="copy the replicas' and HAProxy's logs into this folder")
    p.add_argument("--no-guard", action="store_true",
                   help="streams straight to the replicas, without `clusterlm stream-guard` (a SIGKILLed "
                        "replica's streams are then cut instead of ending with an error event)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from common import cpu_model, write_result

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        run = bench_checkpoint(tmp)
        replicas = {n: Replica(run, n, tmp, "--drain-timeout", str(args.drain_timeout), "--max-new-tokens-limit", "256")
                    for n in ("r1", "r2", "r3")}
        lb = guard = None
        try:
            guard = None if args.no_guard else Guard(free_port(), tmp)
            for r in replicas.values():
                r.wait_ready()
            lb, lb_port, sock = start_haproxy(tmp, {n: r.port for n, r in replicas.items()}, guard)
            res = asyncio.run(drive(args, f"http://127.0.0.1:{lb_port}", sock, replicas))
            drain_log = [ln for ln in replicas["r2"].log.read_text().splitlines() if "drain" in ln]
        finally:
            for r in replicas.values():
                if r.proc.poll() is None:
                    r.proc.kill()
                    r.proc.wait()
            for p_ in (lb, guard and guard.proc):
                if p_ is not None:
                    p_.terminate()
                    p_.wait()
            if args.logs is not None:
                args.logs.mkdir(parents=True, exist_ok=True)
                for log in tmp.glob("*.log"):
                    shutil.copy(log, args.logs / log.name)
    out = {"benchmark": "serve_failover", "cpu": cpu_model(), "cores": os.cpu_count(),
           "load_average_1m": round(os.getloadavg()[0], 2), "seconds": args.seconds, "clients": args.clients,
           "replicas": 3, "stream_guard": not args.no_guard, "max_tokens": args.max_tokens, "client_timeout_s": args.client_timeout,
           "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0],
           **res, "drain_log": drain_log}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "drain_log"}, indent=2))


if __name__ == "__main__":
    main()
