"""`clusterlm prepare` on one document without spaces: wall time, peak memory and signal latency.

    .venv/bin/python benchmarks/prepare_bpe_spacefree.py                 # 1 and 20 MB bpe, 200 MB char
    .venv/bin/python benchmarks/prepare_bpe_spacefree.py --bpe-mb 1 --char-mb 0 --uncapped-mb 0

Issue 12, failure 2: one document of random letters 'a'-'j' (base64, minified code and DNA look
like this to the GPT-2 split regex: one piece as long as the document) took 452 s to prepare at
1 MB with `--tokenizer bpe --vocab-size 300 --workers 1`, and ignored SIGTERM until training
returned. Issue 12, failure 13: the char tokenizer needed ~30x a 200 MB document in memory.

Each run is `python -m clusterlm prepare FILE --out DIR --workers 1 ...` in a fresh process; wall
time is measured around it and peak memory is the ru_maxrss that os.wait4 reports for it. Inputs
are generated from a fixed seed. Runs:
  bpe       --bpe-mb sizes (default 1 and 20), vocab 300 as in the issue; seconds per MB should
            stay about constant (near-linear time);
  uncapped  the same at --uncapped-mb sizes (default 0.1, 0.2) with the piece cap removed (the
            pipeline before the fix, by patching bpe.pre_tokenizer), to show the growth it had;
  signal    prepare of the largest bpe size, SIGTERM 1 s after the "training the bpe tokenizer"
            log line: seconds from the signal to exit, the exit code, and what is left on disk;
  char      --char-mb (default 200) with --tokenizer char: time and peak memory / input size.
Writes benchmarks/results/prepare_bpe_spacefree.json (with the CPU model and load average).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import cpu_model, write_result  # benchmarks/common.py

RESULTS = Path(__file__).parent / "results"
MB = 1_000_000
VOCAB = 300

# prepare with the piece cap removed: what `clusterlm prepare` ran before the fix
UNCAPPED = """
import sys, tokenizers
import clusterlm.tokenizer.bpe as bpe
bpe.pre_tokenizer = lambda *a: tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
from clusterlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


def write_document(path: Path, n_bytes: int, alphabet: bytes, seed: int = 0) -> None:
    """`n_bytes` random characters from `alphabet` (seeded), one document, written 1 MiB at a time."""
    rng = np.random.default_rng(seed)
    table = np.frombuffer(alphabet, dtype=np.uint8)
    with open(path, "wb") as f:
        for start in range(0, n_bytes, 1 << 20):
            f.write(table[rng.integers(0, table.size, min(1 << 20, n_bytes - start), dtype=np.uint8)].tobytes())


def run_prepare(args: list[str], cwd: Path, code: str | None = None) -> dict:
    """One prepare in a fresh process: wall seconds, peak RSS (MB) and exit code."""
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "clusterlm", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read().decode(errors="replace")  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {err[-2000:]}")
    return {"wall_s": round(wall, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def measure_signal(inp: Path, cwd: Path) -> dict:
    """Seconds from SIGTERM (1 s into BPE training) to the exit of prepare, and what it left."""
    cmd = [sys.executable, "-m", "clusterlm", "prepare", str(inp), "--out", "sig", "--tokenizer", "bpe",
           "--vocab-size", str(VOCAB), "--workers", "1"]
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # type: ignore[union-attr]
        if "training the bpe tokenizer" in line:
            break
    time.sleep(1.0)
    still_training = proc.poll() is None
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=600)
    return {"signal": "SIGTERM", "sent_after_training_started_s": 1.0, "still_running_when_sent": still_training,
            "exit_s": round(time.perf_counter() - t0, 3), "exit_code": proc.returncode,
            "left_on_disk": sorted(p.name for p in cwd.iterdir() if p.name.startswith((".sig", "sig")))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bpe-mb", type=float, nargs="*", default=[1, 20])
    ap.add_argument("--uncapped-mb", type=float, nargs="*", default=[0.1, 0.2])
    ap.add_argument("--char-mb", type=float, nargs="*", default=[200])
    ap.add_argument("--out", default=str(RESULTS / "prepare_bpe_spacefree.json"))
    a = ap.parse_args()

    import tokenizers

    from clusterlm.tokenizer.bpe import MAX_PIECE_BYTES

    result: dict = {
        "benchmark": "prepare_bpe_spacefree",
        "what": "prepare of one document of random letters a-j (no spaces): bpe vocab 300 and char, --workers 1",
        "command": "python -m clusterlm prepare FILE --out DIR --tokenizer bpe --vocab-size 300 --workers 1",
        "max_piece_bytes": MAX_PIECE_BYTES,
        "machine": {"cpu": cpu_model(), "usable_cpus": len(os.sched_getaffinity(0)),
                    "python": platform.python_version(),
                    "tokenizers": tokenizers.__version__, "loadavg_before": list(os.getloadavg())},
        "bpe": [], "uncapped_bpe": [], "char": [],
        "before_fix_reported_in_issue_12": {"bpe_0.5mb_s": 45, "bpe_1mb_s": 452, "bpe_20mb": "not done after 6 min",
                                            "sigterm_at_200s_honoured_at_s": 452, "char_200mb_peak_gb": 5.9},
    }
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        for kind, sizes, code in (("uncapped_bpe", a.uncapped_mb, UNCAPPED), ("bpe", a.bpe_mb, None),
                                  ("char", a.char_mb, None)):
            for mb in sizes:
                inp = tmp / f"doc_{mb:g}mb.txt"
                write_document(inp, int(mb * MB), b"abcdefghij")
                args = ["prepare", str(inp), "--out", f"out_{kind}_{mb:g}", "--workers", "1"]
                args += (["--tokenizer", "char"] if kind == "char"
                         else ["--tokenizer", "bpe", "--vocab-size", str(VOCAB)])
                r = {"mb": mb, **run_prepare(args, tmp, code)}
                r["s_per_mb"] = round(r["wall_s"] / mb, 3)
                r["peak_rss_per_input_byte"] = round(r["peak_rss_mb"] * 2**20 / (mb * MB), 2)
                result[kind].append(r)
                print(kind, json.dumps(r), flush=True)
                inp.unlink()
        if a.bpe_mb:
            inp = tmp / "doc_signal.txt"
            write_document(inp, int(max(a.bpe_mb) * MB), b"abcdefghij")
            result["signal"] = {"mb": max(a.bpe_mb), **measure_signal(inp, tmp)}
            print("signal", json.dumps(result["signal"]), flush=True)
    if len(result["bpe"]) >= 2:
        small, big = result["bpe"][0], result["bpe"][-1]
        result["bpe_time_ratio"] = {"sizes_mb": [small["mb"], big["mb"]], "size_ratio": big["mb"] / small["mb"],
                                    "time_ratio": round(big["wall_s"] / small["wall_s"], 2)}
    result["machine"]["loadavg_after"] = list(os.getloadavg())
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    write_result(a.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
