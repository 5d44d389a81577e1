"""What `clusterlm stream-guard` costs a stream: the same streams straight through HAProxy and through
the guard, side by side, interleaved, in one run.

2 replicas of a random-weights byte-level Transformer (tests/helpers.py random_checkpoint) behind
HAProxy (deploy/haproxy/haproxy.cfg, ports rewritten) with one guard. Streams sent to HAProxy's
main frontend take the guard's path (client -> HAProxy -> guard -> HAProxy's inner frontend ->
replica); the same requests sent to the inner frontend take the direct one (client -> HAProxy ->
replica). --clients streaming clients send completions back to back; the path alternates every
--segment seconds (direct, guard, direct, ...), --segments of each. Reported per path: generated
tokens/s (from each stream's usage), time to the first event and the whole stream's time (median
and p90), and per segment, so that drift shows; the guard's own CPU time.

    .venv/bin/python benchmarks/stream_guard_overhead.py          # 2 x 6 segments of 8 s
Writes benchmarks/results/stream_guard_overhead.json (with the CPU model and load average).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import serve_failover as sf  # noqa: E402  (Replica, Guard, start_haproxy, free_port)


async def client(i: int, url: str, stop_at: float, max_tokens: int, log: list[dict]) -> None:
    body = {"model": sf.MODEL, "prompt": f"client {i}:", "max_tokens": max_tokens, "temperature": 1.0,
            "stream": True, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, connect=5)) as h:
        while time.perf_counter() < stop_at:
            t0, first, tokens, done = time.perf_counter(), None, 0, False
            async with h.stream("POST", url + "/v1/completions", json=body,
                                headers={"Authorization": f"Bearer {sf.KEY}"}) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    first = first or time.perf_counter()
                    if line == "data: [DONE]":
                        done = True
                        break
                    ev = json.loads(line[6:])
                    if ev.get("usage"):
                        tokens = ev["usage"]["completion_tokens"]
            log.append({"t0": t0, "t1": time.perf_counter(), "ttft": (first or t0) - t0, "tokens": tokens,
                        "ok": done and r.status_code == 200})


async def segment(url: str, seconds: float, clients: int, max_tokens: int) -> dict:
    log: list[dict] = []
    t0 = time.perf_counter()
    await asyncio.gather(*(client(i, url, t0 + seconds, max_tokens, log) for i in range(clients)))
    wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 2), "streams": len(log), "failed": sum(not r["ok"] for r in log),
            "tokens": sum(r["tokens"] for r in log), "tokens_per_s": round(sum(r["tokens"] for r in log) / wall, 1),
            "ttft": [r["ttft"] for r in log], "e2e": [r["t1"] - r["t0"] for r in log]}


def summary(segs: list[dict]) -> dict:
    ttft = sorted(x for s in segs for x in s["ttft"])
    e2e = sorted(x for s in segs for x in s["e2e"])
    q = lambda xs, p: round(1000 * xs[min(len(xs) - 1, int(p * len(xs)))], 1)  # noqa: E731
    return {"streams": sum(s["streams"] for s in segs), "failed": sum(s["failed"] for s in segs),
            "tokens_per_s": round(sum(s["tokens"] for s in segs) / sum(s["wall_s"] for s in segs), 1),
            "per_segment_tokens_per_s": [s["tokens_per_s"] for s in segs],
            "ttft_ms_p50": round(1000 * statistics.median(ttft), 1), "ttft_ms_p90": q(ttft, 0.9),
            "stream_ms_p50": round(1000 * statistics.median(e2e), 1), "stream_ms_p90": q(e2e, 0.9)}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def main() -> None:
    from common import positive_float, positive_int  # benchmarks/common.py (this script's folder)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--segment", type=positive_float, default=8.0, help="seconds per segment")
    p.add_argument("--segments", type=positive_int, default=6, help="segments per path")
    p.add_argument("--clients", type=positive_int, default=8)
    p.add_argument("--max-tokens", type=positive_int, default=48)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stream_guard_overhead.json")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from common import cpu_model, write_result

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        run = sf.bench_checkpoint(tmp)
        replicas = {n: sf.Replica(run, n, tmp) for n in ("r1", "r2")}
        guard = sf.Guard(sf.free_port(), tmp)
        lb = None
        try:
            for r in replicas.values():
                r.wait_ready()
            lb, lb_port, _ = sf.start_haproxy(tmp, {n: r.port for n, r in replicas.items()}, guard)
            paths = {"direct": f"http://127.0.0.1:{guard.inner_port}", "guard": f"http://127.0.0.1:{lb_port}"}
            asyncio.run(segment(paths["guard"], 2.0, args.clients, args.max_tokens))  # warm-up, both paths
            asyncio.run(segment(paths["direct"], 2.0, args.clients, args.max_tokens))
            segs: dict[str, list[dict]] = {"direct": [], "guard": []}
            guard_cpu = 0.0
            loads = [os.getloadavg()[0]]
            for _ in range(args.segments):
                for name in ("direct", "guard"):
                    c0 = cpu_seconds(guard.proc.pid)
                    segs[name].append(asyncio.run(segment(paths[name], args.segment, args.clients, args.max_tokens)))
                    if name == "guard":
                        guard_cpu += cpu_seconds(guard.proc.pid) - c0
                    loads.append(os.getloadavg()[0])
            replica_cpu = sum(cpu_seconds(r.proc.pid) for r in replicas.values())
        finally:
            for p_ in [r.proc for r in replicas.values()] + [guard.proc] + ([lb] if lb is not None else []):
                if p_.poll() is None:
                    p_.terminate()
                    p_.wait()
    res = {name: summary(s) for name, s in segs.items()}
    guard_wall = sum(s["wall_s"] for s in segs["guard"])
    out = {"benchmark": "stream_guard_overhead", "cpu": cpu_model(), "cores": os.cpu_count(),
           "load_average_1m": [round(min(loads), 2), round(max(loads), 2)], "clients": args.clients,
           "max_tokens": args.max_tokens, "segment_s": args.segment, "segments_per_path": args.segments,
           "replicas": 2, "haproxy": subprocess.run(["haproxy", "-v"], capture_output=True,
                                                     text=True).stdout.splitlines()[0],
           **res,
           "guard_over_direct_tokens_per_s": round(res["guard"]["tokens_per_s"] / res["direct"]["tokens_per_s"], 3),
           "guard_cpu_share_of_a_core_while_relaying": round(guard_cpu / guard_wall, 3),
           "replicas_cpu_s_whole_run": round(replica_cpu, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
