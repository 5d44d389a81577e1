"""Tokens/s of `clusterlm prepare` (BPE) on the Shakespeare corpus vs `tokenizers`' own encode_batch.

    .venv/bin/python benchmarks/prepare_throughput.py            # 1 and 2 cores, best of 7 rounds
    .venv/bin/python benchmarks/prepare_throughput.py --rounds 3 --cores 1 2 4

The 42 bundled texts are written as .txt files to a temporary folder, and a BPE tokenizer
(vocab 8192) is trained once on them. Then, for each core count c, in fresh processes:
  raw      `tokenizers.Tokenizer.encode_batch(texts)` and, stricter, `encode_batch_fast(texts)`
           (no offsets; what clusterlm's BPE tokenizer calls), on the texts already in memory,
           with RAYON_NUM_THREADS=c (the Rust thread pool `tokenizers` parallelises over);
  prepare  `prepare([folder], out, tokenizer=tokenizer.json, workers=c)` end to end: discover and
           read the files, clean and hash every document, tokenize in c processes (the calling
           one and c-1 spawned helpers, booted within the timed call), write shards and meta.json.
Rounds alternate the three so load from other programs hits them alike. Reported: the best
(fastest) time of each with the CPU seconds it used (all threads and processes; CPU ~ wall at
2 cores means another program held a core), the ratio of the best times, and the median over
rounds of the per-round ratio (raw and prepare ran back to back), which is steadier on a shared
machine. Throughput counts text tokens (prepare's EOS
tokens are left out).
Goal (issue 2): prepare keeps >= 80% of raw throughput at equal cores.
Writes benchmarks/results/prepare_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_model, positive_int, write_result  # benchmarks/common.py

RESULTS = Path(__file__).parent / "results"
GOAL = 0.8
RAW = ("encode_batch_fast", "encode_batch")
KINDS = ("encode_batch_fast", "prepare", "encode_batch")  # the order within a round
VOCAB = 8192


def _cpu() -> float:
    """CPU seconds (user + system) of this process and its reaped children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def child_raw(folder: Path, tokenizer: Path, call: str) -> dict:
    """The reference: texts already in memory, one `call` ("encode_batch" or "encode_batch_fast",
    which skips offsets), ids left in Rust. Each call is timed in a fresh process: after an
    `encode_batch`, a later `encode_batch_fast` in the same process runs much slower."""
    import tokenizers

    texts = [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))]
    tok = tokenizers.Tokenizer.from_file(str(tokenizer))
    fn = getattr(tok, call)
    fn(texts[:1], add_special_tokens=False)  # warm-up (thread pool start)
    t0, c0 = time.perf_counter(), _cpu()
    encs = fn(texts, add_special_tokens=False)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": _cpu() - c0, "tokens": sum(len(e.ids) for e in encs)}


def child_prepare(folder: Path, tokenizer: Path, workers: int) -> dict:
    from clusterlm.data.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        t0, c0 = time.perf_counter(), _cpu()
        meta = prepare([str(folder)], Path(tmp) / "data", tokenizer=str(tokenizer), workers=workers, progress=False)
        seconds, cpu = time.perf_counter() - t0, _cpu() - c0
    docs = meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"]
    tokens = meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] - docs  # minus one EOS per doc
    return {"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens}


def spawn(kind: str, folder: Path, tokenizer: Path, cores: int) -> dict:
    env = dict(os.environ, RAYON_NUM_THREADS=str(cores))
    env.pop("TOKENIZERS_PARALLELISM", None)
    cmd = [sys.executable, __file__, "--child", kind, "--folder", str(folder), "--tokenizer", str(tokenizer),
           "--cores", str(cores)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=positive_int, default=7)
    ap.add_argument("--cores", type=positive_int, nargs="+", default=[1, 2])
    ap.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child in RAW:
        print(json.dumps(child_raw(args.folder, args.tokenizer, args.child)))
        return
    if args.child == "prepare":
        print(json.dumps(child_prepare(args.folder, args.tokenizer, args.cores[0])))
        return

    from clusterlm.data.builtin import builtin_files
    from clusterlm.tokenizer.kinds import train_tokenizer

    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shakespeare"
        folder.mkdir()
        corpus = builtin_files("shakespeare")
        for name, data in corpus:
            (folder / name).write_bytes(data)
        tokenizer = Path(tmp) / "tokenizer.json"
        train_tokenizer("bpe", (d.decode() for _, d in corpus), VOCAB).save(tokenizer)

        samples: dict[int, dict[str, list[dict]]] = {c: {k: [] for k in KINDS} for c in args.cores}
        for r in range(args.rounds):
            for c in args.cores:
                for kind in KINDS:
                    res = spawn(kind, folder, tokenizer, c)
                    samples[c][kind].append(res)
                    print(f"round {r + 1}/{args.rounds} cores={c} {kind:17s} {res['seconds']:.3f} s "
                          f"(cpu {res['cpu_seconds']:.3f} s) {res['tokens'] / res['seconds']:,.0f} tokens/s",
                          file=sys.stderr)

    results = {}
    for c in args.cores:
        tokens = samples[c]["prepare"][0]["tokens"]
        assert all(x["tokens"] == tokens for k in KINDS for x in samples[c][k]), "all must tokenize the same text"
        row: dict[str, float | str] = {}
        best = {k: min(samples[c][k], key=lambda x: x["seconds"]) for k in KINDS}
        for k in KINDS:
            row[f"{k}_tokens_per_s"] = round(tokens / best[k]["seconds"])
        for k in RAW:
            row[f"ratio_vs_{k}"] = round(best[k]["seconds"] / best["prepare"]["seconds"], 3)
            # paired: each round's raw and prepare ran back to back, under about the same load
            row[f"ratio_vs_{k}_median_of_rounds"] = round(statistics.median(
                a["seconds"] / b["seconds"] for a, b in zip(samples[c][k], samples[c]["prepare"])), 3)
        for k in KINDS:
            row[f"{k}_seconds_best"] = round(best[k]["seconds"], 4)
            row[f"{k}_cpu_seconds_of_best"] = round(best[k]["cpu_seconds"], 4)
            row[f"{k}_seconds_median"] = round(statistics.median(x["seconds"] for x in samples[c][k]), 4)
        results[str(c)] = row
    report = {
        "benchmark": "prepare_throughput",
        "what": "BPE (vocab 8192) tokens/s: clusterlm prepare end to end vs tokenizers encode_batch, equal cores",
        "corpus": {"name": "builtin:shakespeare as 42 .txt files", "documents": len(corpus),
                   "bytes": sum(len(d) for _, d in corpus), "text_tokens": tokens},
        "machine": {"cpu": cpu_model(), "usable_cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "rounds": args.rounds,
        "statistic": "best of the rounds (each round runs the three in turn, each in a fresh process)",
        "goal": f"prepare >= {GOAL} x raw tokens/s at equal cores",
        "goal_met": {f"vs_{k}_{stat}": all(v[f"ratio_vs_{k}{suffix}"] >= GOAL for v in results.values())
                     for k in RAW for stat, suffix in (("best_times", ""), ("median_of_rounds", "_median_of_rounds"))},
        "by_cores": results,
    }
    RESULTS.mkdir(exist_ok=True)
    write_result(RESULTS / "prepare_throughput.json", json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
