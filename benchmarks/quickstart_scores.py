"""The quickstart's task scores, measured: run `clusterlm quickstart` into a fresh folder and record
what it reports (steps, val loss, the two bundled choice tasks) with the machine it ran on.

    .venv/bin/python benchmarks/quickstart_scores.py                  # -> benchmarks/results/quickstart_task_scores.json
    .venv/bin/python benchmarks/quickstart_scores.py --minutes 3 --out /tmp/qs

docs/tasks.md quotes these figures. The recipe's 2000 steps are deterministic, so the scores should
not depend on the machine once all 2000 steps ran, except that a CPU with AMX or AVX512-BF16 trains
the recipe in bf16 (train.dtype = "bf16-native"; results/quickstart_task_scores_xeon_amx.json, and the
default JSON, from an AMD EPYC with AVX512-BF16); `--minutes` caps the training time (a slow or
busy machine may stop earlier, and the JSON then says how many steps ran).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from clusterlm.eval.evaluate import evaluate_checkpoint
from common import machine, positive_float  # benchmarks/common.py

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=positive_float, default=5.0, help="quickstart --minutes (default 5, as the README runs it)")
    p.add_argument("--out", default=None, help="run folder (default: a temporary one, removed after)")
    p.add_argument("--results", default=str(RESULTS), help="folder for the JSON")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or Path(tmp) / "qs")
        cmd = [sys.executable, "-m", "clusterlm", "quickstart", "--out", str(out), "--minutes", str(args.minutes)]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        wall = time.perf_counter() - t0
        scores = json.loads((out / "task_scores.json").read_text())
        val = evaluate_checkpoint(str(out), device="cpu")  # what the quickstart prints: the full val split
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = max((r["step"] for r in records if r.get("kind") == "train"), default=0)
    evals = [r for r in records if r.get("kind") == "eval" and "val_loss" in r]
    result = {
        "checkpoint": scores.get("checkpoint"),
        "tasks": scores["tasks"],
        "run": {"command": "clusterlm quickstart --out OUT --minutes " + f"{args.minutes:g}",
                "steps": steps, "val_loss": round(val["loss"], 4),
                "val_loss_in_training_last_eval": evals[-1]["val_loss"] if evals else None,
                "wall_s": round(wall, 1), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")},
        "machine": machine(),
    }
    dest = Path(args.results) / "quickstart_task_scores.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_dest = dest.with_name(dest.name + ".tmp")
    tmp_dest.write_text(json.dumps(result, indent=2) + "\n")
    tmp_dest.replace(dest)
    for name, t in result["tasks"].items():
        print(f"{name:<24} acc {t['acc']:.4f}  n {t['n']}")
    print(f"{steps} steps, {wall / 60:.1f} min; wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
