"""SST-2: the LSTM recipe at several seeds, and what averaging their probabilities scores.

Trains `sst2_lstm_cpu` from scratch once per seed (its 2,200 steps, 1 thread each, `--parallel`
runs at a time; the others start once the first has prepared the shared data), scores each on the
dev set with `clusterlm eval --task dev.tsv --samples` (one record per sentence with its class
probabilities), then scores every subset of the models with their probabilities averaged: the
mean, worst and best subset of each size. Single models spread by about a point from seed to seed
(docs/finetune.md); this measures how much of that averaging removes.

Then the product path: `clusterlm ensemble` writes all of the runs as one checkpoint
(clusterlm/finetune/ensemble.py) and `clusterlm eval ENSEMBLE --task dev.tsv` scores it, which
must give the accuracy computed from the members' samples; its wall time from the first run's start
to the written ensemble is what counts for "83% within 20 minutes".

    .venv/bin/python benchmarks/sst2_ensemble.py                       # seeds 1337 2 3 4 5 6, 2 at a time
    .venv/bin/python benchmarks/sst2_ensemble.py --seeds 21 22 23 24 25 26 --tag s21
    .venv/bin/python benchmarks/sst2_ensemble.py --seeds 1337 2 3 --data ../shared/data/sst2

Writes benchmarks/results/sst2_lstm_ensemble[_TAG].json (with the CPU model and each run's wall
time) and applications_sentiment_ensemble[_TAG].json (rows for applications_report.py). The data
(research use) is read from --data, never bundled.
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
    rows = read_samples(samples)
    return {"seed": seed, "run": run, "train_s": round(train_s, 1), "rows": rows, "scores": _scores(ev.stdout)}


def _scores(stdout: str) -> dict:
    """The task's metrics from `clusterlm eval --task`'s JSON report (empty if it printed none)."""
    try:
        report = json.loads(stdout)
    except json.JSONDecodeError:
        return {}
    tasks = report.get("tasks") or {}
    return next(iter(tasks.values()), {}) if isinstance(tasks, dict) else {}


def train_all(seeds: list[int], data: Path, work: Path, steps: int, parallel: int, extra: tuple[str, ...] = (),
              name: str = "seed", data_dir: Path | None = None) -> list[dict]:
    """train() at every seed, `parallel` at a time: the first prepares the shared data folder
    (`data_dir`, default WORK/data), the others start once its meta.json is there."""
    data_dir = data_dir or work / "data"
    with ThreadPoolExecutor(parallel) as pool:
        first = pool.submit(train, seeds[0], data, work, steps, extra, name)
        while not (data_dir / "meta.json").is_file() and not first.done():
            time.sleep(1)
        rest = [pool.submit(train, s, data, work, steps, extra, name) for s in seeds[1:]]
        return [f.result() for f in (first, *rest)]


def read_samples(path: Path) -> list[dict]:
    """The records of a `clusterlm eval --task ... --samples` file (one JSON object a line)."""
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def summary(m: dict) -> dict:
    """Dev accuracy (%), macro F1 and the positive class's precision / recall / F1, train time."""
    s = m["scores"]
    pos = (s.get("per_class") or {}).get("1", {})
    return {"seed": m["seed"], "accuracy": accuracy([m["rows"]]), "macro_f1": s.get("macro_f1"),
            "positive": {k: pos.get(k) for k in ("precision", "recall", "f1")}, "train_s": m["train_s"]}


def mean_accuracy(models: list[dict]) -> float:
    return round(sum(accuracy([m["rows"]]) for m in models) / len(models), 2)


def accuracy(members: list[list[dict]]) -> float:
    """Dev accuracy (%) of the class whose probability, averaged over `members`, is highest."""
    ok = 0
    for recs in zip(*members):
        labels = recs[0]["probs"].keys()
        avg = {c: sum(r["probs"][c] for r in recs) / len(recs) for c in labels}
        ok += max(avg, key=avg.get) == recs[0]["label"]
    return round(100 * ok / len(members[0]), 2)


def main() -> None:
    from common import positive_int  # benchmarks/common.py (this script's folder)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 2, 3, 4, 5, 6])
    p.add_argument("--parallel", type=positive_int, default=2, help="runs at a time (1 thread each)")
    p.add_argument("--steps", type=positive_int, default=2200, help="training steps per model (the recipe's)")
    p.add_argument("--data", type=Path, default=SHARED / "sst2", help="folder with train.tsv.gz and dev.tsv")
    p.add_argument("--work", type=Path, default=None, help="runs and samples (default: a temporary folder)")
    p.add_argument("--override", action="append", default=[], help="extra --section.key=value for every run, "
                   "e.g. --override=--model.arch=gru (name it with --tag)")
    p.add_argument("--mix", nargs="+", metavar="GROUP=GLOB", default=None,
                   help="train nothing: score random draws from `eval --samples` files of earlier runs, e.g. "
                        "lstm='W/seed*.jsonl' gru='W2/seed*.jsonl' (see --draw)")
    p.add_argument("--draw", nargs="+", metavar="GROUP:K", default=None,
                   help="with --mix, the draws to score, each GROUP:K parts joined by ';' (K members from each "
                        "GROUP), e.g. lstm:6 'lstm:3;gru:3'; default: every run of every group")
    p.add_argument("--tag", default="", help="suffix of the result files (sst2_lstm_ensemble_TAG.json, ...)")
    p.add_argument("--out", type=Path, default=None, help="the JSON (default: benchmarks/results/sst2_lstm_ensemble"
                   "[_TAG].json); the applications report's rows go beside it")
    args = p.parse_args()
    suffix = f"_{args.tag}" if args.tag else ""
    args.out = args.out or ROOT / "benchmarks" / "results" / f"sst2_lstm_ensemble{suffix}.json"
    if args.mix:
        return mix(args, suffix)
    if len(args.seeds) < 2 or len(set(args.seeds)) != len(args.seeds):
        sys.exit(f"--seeds {args.seeds}: give at least 2 different seeds")
    missing = [str(f) for f in (args.data / "train.tsv.gz", args.data / "dev.tsv") if not f.is_file()]
    if missing:
        from common import refuse  # benchmarks/ is on sys.path: this script's folder

        refuse(f"SST-2 not found: {', '.join(missing)}; pass --data DIR (research-use data, not bundled)")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import machine, write_result

    work = args.work or Path(tempfile.mkdtemp(prefix="sst2-ensemble-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    models = train_all(args.seeds, args.data, work, args.steps, args.parallel, tuple(args.override))
    train_wall = time.time() - t0
    served = combine(models, args.data, work)
    wall = time.time() - t0
    computed = accuracy([m["rows"] for m in models])
    if served["accuracy"] != computed:
        sys.exit(f"the ensemble checkpoint scored {served['accuracy']}% but its members' averaged samples give "
                 f"{computed}%; see {work}")
    singles = {str(m["seed"]): accuracy([m["rows"]]) for m in models}
    table = []
    for k in range(2, len(models) + 1):
        accs = [accuracy([m["rows"] for m in c]) for c in itertools.combinations(models, k)]
        table.append({"models": k, "subsets": len(accs), "mean": round(sum(accs) / len(accs), 2),
                      "worst": min(accs), "best": max(accs)})
    out = {"benchmark": "sst2_lstm_ensemble", "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
           "recipe": "sst2_lstm_cpu", "overrides": args.override, "steps": args.steps, "parallel": args.parallel,
           "threads_per_run": 1,
           "dev_sentences": len(models[0]["rows"]), "single_accuracy": singles,
           "single_mean": round(sum(singles.values()) / len(singles), 2),
           "members": [summary(m) for m in models],
           "train_s": {str(m["seed"]): m["train_s"] for m in models}, "train_wall_s": round(train_wall, 1),
           "wall_s": round(wall, 1), "ensembles": table, "checkpoint": served}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, json.dumps(out, indent=2) + "\n")
    write_result(args.out.parent / f"applications_sentiment_ensemble{suffix}.json",
                 json.dumps({"rows": _rows(out)}, indent=2) + "\n")
    print(json.dumps(out, indent=2))


def mix(args: argparse.Namespace, suffix: str) -> None:
    """--mix: accuracy of random draws (200 per --draw, seed 0) of members from groups of earlier runs'
    samples files, e.g. six LSTMs against three LSTMs and three GRUs; writes sst2_ensemble_mix[_TAG].json."""
    import glob
    import random

    from common import write_result  # benchmarks/ is on sys.path: this script's folder

    groups: dict[str, list[list[dict]]] = {}
    for spec in args.mix:
        name, _, pattern = spec.partition("=")
        files = sorted(glob.glob(pattern))
        if not name or not files:
            sys.exit(f"--mix {spec!r}: give GROUP=GLOB matching `clusterlm eval --samples` files")
        groups[name] = [read_samples(f) for f in files]
    sizes = {g: len(runs) for g, runs in groups.items()}
    out = {"benchmark": "sst2_ensemble_mix", "mix": args.mix,
           "groups": {g: [accuracy([r]) for r in runs] for g, runs in groups.items()}, "draws": []}
    rng = random.Random(0)
    for spec in args.draw or [";".join(f"{g}:{n}" for g, n in sizes.items())]:
        want = {g: k for g, _, k in (part.partition(":") for part in spec.split(";"))}
        if any(g not in groups or not k.isdigit() or not 0 < int(k) <= sizes[g] for g, k in want.items()):
            sys.exit(f"--draw {spec!r}: give GROUP:K parts joined by ';', K at most the group's runs {sizes}")
        accs = [accuracy([r for g, k in want.items() for r in rng.sample(groups[g], int(k))]) for _ in range(200)]
        out["draws"].append({"draw": spec, "mean": round(sum(accs) / len(accs), 2), "worst": min(accs),
                             "best": max(accs)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    path = args.out.with_name(f"sst2_ensemble_mix{suffix}.json")
    write_result(path, json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


def combine(models: list[dict], data: Path, work: Path) -> dict:
    """`clusterlm ensemble` of the runs into WORK/ensemble, scored with `clusterlm eval --task`:
    {"accuracy", "macro_f1", "positive": P/R/F1, "combine_s", "eval_s", "bytes"}."""
    ens = work / "ensemble"
    t0 = time.time()
    subprocess.run([*CLI, "ensemble", *(str(m["run"]) for m in models), "--out", str(ens)], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    t1 = time.time()
    samples = work / "ensemble.jsonl"
    ev = subprocess.run([*CLI, "eval", str(ens), "--task", str(data / "dev.tsv"), "--samples", str(samples)],
                        cwd=ROOT, check=True, capture_output=True, text=True)
    rows = read_samples(samples)
    s = summary({"seed": None, "rows": rows, "scores": _scores(ev.stdout), "train_s": None})
    weights = next((ens / "checkpoints").glob("step-*/model.safetensors"))
    return {"accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "positive": s["positive"],
            "combine_s": round(t1 - t0, 1), "eval_s": round(time.time() - t1, 1), "bytes": weights.stat().st_size}


def _rows(out: dict) -> list[dict]:
    """benchmarks/applications_report.py's row: the ensemble checkpoint's dev accuracy and its wall time."""
    c, n = out["checkpoint"], len(out["members"])
    f = {k: round(100 * v, 2) if isinstance(v, float) else v for k, v in c["positive"].items()}
    seeds = ", ".join(str(m["seed"]) for m in out["members"])
    singles = [m["accuracy"] for m in out["members"]]
    return [{"application": f"sentiment SST-2 (lstm, ensemble of {n})", "metric": f"dev accuracy %, seeds {seeds}",
             "value": c["accuracy"], "goal": ">= 83 in 20 min", "train_minutes": round(out["wall_s"] / 60, 2),
             "notes": f"P {f['precision']} / R {f['recall']} / F1 {f['f1']} (positive class), macro F1 "
                      f"{round(100 * c['macro_f1'], 2) if isinstance(c['macro_f1'], float) else c['macro_f1']}; one "
                      f"checkpoint (clusterlm ensemble) of {n} sst2_lstm_cpu runs, {out['parallel']} at a time, "
                      f"members {singles} (mean {out['single_mean']}); {out['machine'].get('cpu', '')}"}]


if __name__ == "__main__":
    main()
