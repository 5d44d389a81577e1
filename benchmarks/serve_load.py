"""Load test for `clusterlm serve`: N concurrent streaming clients for M seconds each.

Starts `clusterlm serve` in a child process (127.0.0.1, random port) on a checkpoint -- or on a
tiny one trained on the fly -- then runs 1 and N clients, each sending streaming
completions back to back. Per run: errors, streams ending in [DONE], TTFT p50/p99, inter-token
latency p50/p99, aggregate generated tokens/s. The batching speed-up is the median tokens/s at N
clients over the median at 1 client, from --repeats alternating pairs of runs (so load from other
jobs on a shared machine hits both alike). Writes benchmarks/results/serve_load.json.

    .venv/bin/python benchmarks/serve_load.py                       # tiny model trained on the fly
    .venv/bin/python benchmarks/serve_load.py --ckpt runs/x --clients 16 --seconds 20
    .venv/bin/python benchmarks/serve_load.py --random-preset gpt2-124m --threads 2   # gpt2-124m shape, random weights

Counting: tokens per stream are usage.completion_tokens from the final chunk (include_usage).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2 as httpx

from common import check_checkpoint, cpu_model, positive_float, positive_int, write_result  # benchmarks/common.py

KEY = "bench-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_checkpoint(root: Path, preset: str) -> Path:
    from clusterlm.cli import main as cli

    corpus = root / "corpus"
    corpus.mkdir()
    lines = (f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(2000))
    (corpus / "a.txt").write_text("\n".join(lines))
    data, run = root / "data", root / "run"
    assert cli(["prepare", str(corpus), "--out", str(data), "--tokenizer", "byte"]) == 0
    assert cli(["train", f"--data.dir={json.dumps(str(data))}", f"--train.out_dir={json.dumps(str(run))}",
                f"--model.preset={preset}", "--train.seq_len=64", "--train.micro_batch_size=8",
                "--train.max_steps=20", "--train.eval_interval=20", "--train.eval_batches=1",
                "--train.device=cpu"]) == 0
    return run


def _random_checkpoint(root: Path, preset: str) -> Path:
    """A checkpoint of `preset` with random weights (init_weights(0)) and the byte tokenizer. The
    vocabulary is the tokenizer's 259 ids padded to the preset's size (vocab_multiple), so the
    embedding and output projection keep the preset's shape (gpt2-124m: 50257 x 768) while the
    engine samples only ids the tokenizer can decode (it drops the padding rows)."""
    from clusterlm.checkpoint.store import save_checkpoint
    from clusterlm.config import RunConfig, to_toml
    from clusterlm.models.build import build_model
    from clusterlm.models.config import get_preset
    from clusterlm.tokenizer.kinds import make_tokenizer

    import dataclasses

    tok = make_tokenizer("byte")
    shape = get_preset(preset)
    cfg = dataclasses.replace(shape, vocab_size=tok.vocab_size, vocab_multiple=shape.padded_vocab_size)
    model = build_model(cfg)
    model.init_weights(0)
    tok.save(root / "tok.json")
    return save_checkpoint(root / "random" / "checkpoints", 0, model_state=model.state_dict(), optimizer_state=None,
                           train_state={"step": 0}, config_toml=to_toml(RunConfig(model=cfg)),
                           tokenizer_path=root / "tok.json")


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _client(url: str, seconds: float, max_tokens: int, out: dict) -> None:
    body = {"model": "bench", "prompt": "Line 1", "max_tokens": max_tokens, "temperature": 1.0, "stream": True,
            "stream_options": {"include_usage": True}}
    deadline = time.perf_counter() + seconds
    async with httpx.AsyncClient(timeout=120) as h:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            last, first, done, tokens = None, None, False, 0
            try:
                async with h.stream("POST", url + "/v1/completions", json=body,
                                    headers={"Authorization": f"Bearer {KEY}"}) as r:
                    if r.status_code != 200:
                        out["errors"] += 1
                        await r.aread()
                        continue
                    async for line in r.aiter_lines():
                        if not line.startswith("data: "):
                            continue
                        if line == "data: [DONE]":
                            done = True
                            break
                        # parse only the usage chunk: the client's CPU is the server's CPU on a small machine
                        if '"usage"' in line:
                            tokens = json.loads(line[6:])["usage"]["completion_tokens"]
                        elif '"text":""' not in line.replace(" ", ""):
                            now = time.perf_counter()
                            if first is None:
                                first = now
                                out["ttft"].append(now - t0)
                            else:
                                out["itl"].append(now - last)
                            last = now
            except httpx.HTTPError:
                out["errors"] += 1
                continue
            out["streams"] += 1
            out["done"] += int(done)
            out["tokens"] += tokens


async def _run(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    out = {"errors": 0, "streams": 0, "done": 0, "tokens": 0, "ttft": [], "itl": []}
    t0 = time.perf_counter()
    await asyncio.gather(*[_client(url, seconds, max_tokens, out) for _ in range(clients)])
    wall = time.perf_counter() - t0
    return {"clients": clients, "wall_s": round(wall, 3), "errors": out["errors"], "streams": out["streams"],
            "streams_with_done": out["done"], "generated_tokens": out["tokens"],
            "tokens_per_s": round(out["tokens"] / wall, 1),
            "ttft_p50_ms": _ms(_pct(out["ttft"], 0.5)), "ttft_p99_ms": _ms(_pct(out["ttft"], 0.99)),
            "itl_p50_ms": _ms(_pct(out["itl"], 0.5)), "itl_p99_ms": _ms(_pct(out["itl"], 0.99)),
            "itl_mean_ms": _ms(statistics.fmean(out["itl"]) if out["itl"] else None)}


def _ms(x: float | None) -> float | None:
    return None if x is None else round(1000 * x, 2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default=None, help="checkpoint to serve (default: train a tiny one)")
    p.add_argument("--preset", default="gpt-nano", help="preset of the tiny model when --ckpt is not given")
    p.add_argument("--random-preset", default=None,
                   help="serve a checkpoint of this preset with random weights instead (e.g. gpt2-124m)")
    p.add_argument("--clients", type=positive_int, default=16)
    p.add_argument("--seconds", type=positive_float, default=15.0)
    p.add_argument("--max-tokens", type=positive_int, default=48)
    p.add_argument("--repeats", type=positive_int, default=3, help="alternating 1-client / N-client runs; medians reported")
    p.add_argument("--threads", type=positive_int, default=1, help="the server's --threads")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    args = p.parse_args(argv)
    check_checkpoint("--ckpt", args.ckpt)

    import torch

    from clusterlm.checkpoint.model_io import load_for_inference

    tmp = tempfile.TemporaryDirectory()
    load_before = [round(x, 2) for x in os.getloadavg()]
    if args.ckpt:
        ckpt = Path(args.ckpt)
    elif args.random_preset:
        ckpt = _random_checkpoint(Path(tmp.name), args.random_preset)
    else:
        ckpt = _tiny_checkpoint(Path(tmp.name), args.preset)
    key_file = Path(tmp.name) / "key"
    key_file.write_text(KEY + "\n")
    port = _free_port()
    # the server runs as `clusterlm serve` in its own process, as deployed (no GIL shared with clients)
    server = subprocess.Popen([sys.executable, "-m", "clusterlm", "serve", str(ckpt), "--port", str(port),
                               "--api-key-file", str(key_file), "--model-name", "bench",
                               "--max-batch", str(max(16, args.clients)), "--max-queue", "256",
                               "--max-new-tokens-limit", str(max(64, args.max_tokens)),
                               "--threads", str(args.threads)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"clusterlm serve exited with {server.returncode}")
            time.sleep(0.1)
        # 1 and N clients alternate, so load from other jobs on a shared machine hits both alike
        runs = [asyncio.run(_run(url, n, args.seconds, args.max_tokens))
                for _ in range(args.repeats) for n in (1, args.clients)]
    finally:
        server.terminate()
        server.wait(timeout=30)
    loaded = load_for_inference(ckpt)
    result = {
        "model": {"arch": loaded.config.model.arch, "params": loaded.config.model.num_params(),
                  "max_seq_len": loaded.config.model.max_seq_len,
                  "source": args.ckpt or (f"{args.random_preset}, random weights" if args.random_preset
                                          else f"tiny {args.preset}")},
        "command": " ".join(["python", "benchmarks/serve_load.py", *(argv if argv is not None else sys.argv[1:])]),
        "load_average_before_1_5_15_min": load_before,
        "load_average_after_1_5_15_min": [round(x, 2) for x in os.getloadavg()],
        "max_tokens": args.max_tokens, "seconds_per_run": args.seconds, "server_threads": args.threads,
        "runs": runs,
        "tokens_per_s_1_client_median": (one := statistics.median(r["tokens_per_s"] for r in runs[0::2])),
        f"tokens_per_s_{args.clients}_clients_median":
            (many := statistics.median(r["tokens_per_s"] for r in runs[1::2])),
        "speedup_tokens_per_s": round(many / max(one, 1e-9), 2),
        "speedup_per_repeat": [round(b["tokens_per_s"] / max(a["tokens_per_s"], 1e-9), 2)
                               for a, b in zip(runs[0::2], runs[1::2])],
        "errors_total": sum(r["errors"] for r in runs),
        "streams_without_done": sum(r["streams"] - r["streams_with_done"] for r in runs),
        "goal_speedup": 4.0,
        "machine": {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "load_average_1m_at_end": round(os.getloadavg()[0], 2),
                    "platform": platform.platform(),
                    "torch": torch.__version__, "python": sys.version.split()[0]},
        "note": "clients (this process) and the server (a child process) share this machine's cores; "
                "the machine may be shared with other jobs",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
