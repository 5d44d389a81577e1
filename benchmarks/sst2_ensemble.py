"""SST-2: the LSTM recipe at several seeds, and what averaging their probabilities scores.

Trains `sst2_lstm_cpu` from scratch once per seed (its 2,200 steps, 1 thread each, `--parallel`
runs at a time), scores each on the dev set with `clusterlm eval --task dev.tsv --samples` (one
record per sentence with its class probabilities), then scores every subset of the models with
their probabilities averaged: the mean, worst and best subset of each size. Single models spread by
about a point from seed to seed (docs/finetune.md); this measures how much of that averaging removes.

    .venv/bin/python benchmarks/sst2_ensemble.py                       # seeds 1337 2 3 4 5 6, 2 at a time
    .venv/bin/python benchmarks/sst2_ensemble.py --seeds 1337 2 3 --data ../shared/data/sst2

Writes benchmarks/results/sst2_lstm_ensemble.json (with the CPU model and each run's wall time).
The data (research use) is read from --data, never bundled.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CLI = [sys.executable, "-m", "clusterlm"]


def train(seed: int, data: Path, work: Path, steps: int, extra: tuple[str, ...] = (), name: str = "seed") -> dict:
    """One `sst2_lstm_cpu` run (seed, steps, `extra` overrides) in WORK/runs/NAME{seed}, scored on
    the dev set: {"seed", "run", "train_s", "rows" (eval --samples records), "scores" (eval's metrics)}."""
    tag = f"{name}{seed}"
    run = work / "runs" / tag
    log = work / f"{tag}.log"
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run([*CLI, "finetune", "sst2_lstm_cpu", f"--train.seed={seed}", "--train.threads=1",
                            f"--train.max_steps={steps}", f"--data.dir={json.dumps(str(work / 'data'))}",
                            f"--data.source={json.dumps(str(data / 'train.tsv.gz'))}",
                            f"--finetune.val_source={json.dumps(str(data / 'dev.tsv'))}",
                            f"--train.out_dir={json.dumps(str(run))}", "--train.tensorboard=false", *extra],
                           cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"{tag}: clusterlm finetune exited {r.returncode}; see {log}")
    train_s = time.time() - t0
    samples = work / f"{tag}.jsonl"
    ev = subprocess.run([*CLI, "eval", str(run), "--task", str(data / "dev.tsv"), "--samples", str(samples)],
                        cwd=ROOT, check=True, capture_output=True, text=True)
    rows = [json.loads(x) for x in samples.read_text().splitlines() if x.strip()]
    return {"seed": seed, "run": run, "train_s": round(train_s, 1), "rows": rows, "scores": _scores(ev.stdout)}


def _scores(stdout: str) -> dict:
    """The task's metrics from `clusterlm eval --task`'s JSON report (empty if it printed none)."""
    try:
        report = json.loads(stdout)
    except json.JSONDecodeError:
        return {}
    tasks = report.get("tasks") or {}
    return next(iter(tasks.values()), {}) if isinstance(tasks, dict) else {}


def accuracy(members: list[list[dict]]) -> float:
    """Dev accuracy (%) of the class whose probability, averaged over `members`, is highest."""
    ok = 0
    for recs in zip(*members):
        labels = recs[0]["probs"].keys()
        avg = {c: sum(r["probs"][c] for r in recs) / len(recs) for c in labels}
        ok += max(avg, key=avg.get) == recs[0]["label"]
    return round(100 * ok / len(members[0]), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 2, 3, 4, 5, 6])
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (1 thread each)")
    p.add_argument("--steps", type=int, default=2200, help="training steps per model (the recipe's)")
    p.add_argument("--data", type=Path, default=SHARED / "sst2", help="folder with train.tsv.gz and dev.tsv")
    p.add_argument("--work", type=Path, default=None, help="runs and samples (default: a temporary folder)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "sst2_lstm_ensemble.json")
    args = p.parse_args()
    missing = [str(f) for f in (args.data / "train.tsv.gz", args.data / "dev.tsv") if not f.is_file()]
    if missing:
        sys.exit(f"SST-2 not found: {', '.join(missing)}; pass --data DIR (research-use data, not bundled)")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import machine

    work = args.work or Path(tempfile.mkdtemp(prefix="sst2-ensemble-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # the first run prepares the shared data folder alone; the others then start `--parallel` at a time
    first = train(args.seeds[0], args.data, work, args.steps)
    with ThreadPoolExecutor(args.parallel) as pool:
        rest = list(pool.map(lambda s: train(s, args.data, work, args.steps), args.seeds[1:]))
    models = [first, *rest]
    singles = {str(m["seed"]): accuracy([m["rows"]]) for m in models}
    table = []
    for k in range(2, len(models) + 1):
        accs = [accuracy([m["rows"] for m in c]) for c in itertools.combinations(models, k)]
        table.append({"models": k, "subsets": len(accs), "mean": round(sum(accs) / len(accs), 2),
                      "worst": min(accs), "best": max(accs)})
    out = {"benchmark": "sst2_lstm_ensemble", "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
           "recipe": "sst2_lstm_cpu", "steps": args.steps, "parallel": args.parallel, "threads_per_run": 1,
           "dev_sentences": len(models[0]["rows"]), "single_accuracy": singles,
           "single_mean": round(sum(singles.values()) / len(singles), 2),
           "train_s": {str(m["seed"]): m["train_s"] for m in models}, "wall_s": round(time.time() - t0, 1),
           "ensembles": table}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
