"""SST-2: one LSTM distilled from an ensemble of the same recipe, against the ensemble and its members.

Trains `sst2_lstm_cpu` from scratch at each --teachers seed (2,200 steps, 1 thread each, `--parallel`
at a time, as benchmarks/sst2_ensemble.py), then a student per --students seed: the same recipe
with `finetune.distill_from` = the teachers (clusterlm/finetune/distill.py): their averaged
probabilities on every training sentence, mixed with the label at `--weight` (and with --augment K,
K augmented copies of each sentence that the teachers alone label: data/augment.py).
With --baseline (the default) the same seeds also train without teachers, so each student has a
paired from-scratch run. Every model is scored on the dev set with `clusterlm eval --task dev.tsv
--samples`. The student is one ordinary classifier checkpoint: `clusterlm serve` answers
/classify with it.

The wall time that counts for the goal ("83% within 20 minutes of CPU training") is one student's
whole path on this machine: the teachers (two at a time on the 2 cores) plus the student's own run
(preparing its data, the teachers scoring it, training), both recorded.

    .venv/bin/python benchmarks/sst2_distill.py                   # teachers 1337 2 3 4; students 11 12 13 14
    .venv/bin/python benchmarks/sst2_distill.py --augment 1 --weight 0.5 --data ../shared/data/sst2

Writes benchmarks/results/sst2_lstm_distill.json. The data (research use) is read from --data.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from sst2_ensemble import SHARED, accuracy, train_all  # noqa: E402
from sst2_ensemble import mean_accuracy as _mean  # noqa: E402
from sst2_ensemble import summary as _summary  # noqa: E402


def main() -> None:
    from common import positive_int  # benchmarks/common.py (this script's folder)

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teachers", type=int, nargs="+", default=[1337, 2, 3, 4], help="the teachers' seeds")
    p.add_argument("--students", type=int, nargs="+", default=[11, 12, 13, 14], help="the students' seeds")
    p.add_argument("--weight", type=float, default=1.0, help="finetune.distill_weight (the teachers' share)")
    p.add_argument("--augment", type=int, default=0, help="finetune.augment (copies of each training sentence)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also train each student seed without teachers (paired from-scratch runs)")
    p.add_argument("--parallel", type=positive_int, default=2, help="runs at a time (1 thread each)")
    p.add_argument("--steps", type=positive_int, default=2200, help="training steps per model (the recipe's)")
    p.add_argument("--data", type=Path, default=SHARED / "sst2", help="folder with train.tsv.gz and dev.tsv")
    p.add_argument("--work", type=Path, default=None, help="runs and samples (default: a temporary folder)")
    p.add_argument("--tag", default="", help="suffix of the result files (sst2_lstm_distill_TAG.json, ...)")
    p.add_argument("--out", type=Path, default=None, help="the JSON (default: benchmarks/results/sst2_lstm_distill"
                   "[_TAG].json); the applications report's rows go beside it")
    args = p.parse_args()
    suffix = f"_{args.tag}" if args.tag else ""
    args.out = args.out or ROOT / "benchmarks" / "results" / f"sst2_lstm_distill{suffix}.json"
    missing = [str(f) for f in (args.data / "train.tsv.gz", args.data / "dev.tsv") if not f.is_file()]
    if missing:
        from common import refuse  # benchmarks/ is on sys.path: this script's folder

        refuse(f"SST-2 not found: {', '.join(missing)}; pass --data DIR (research-use data, not bundled)")
    from common import machine, write_result

    work = args.work or Path(tempfile.mkdtemp(prefix="sst2-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    teachers = train_all(args.teachers, args.data, work, args.steps, args.parallel)
    teachers_wall = time.time() - t0
    extra: tuple[str, ...] = (f"--finetune.distill_from={json.dumps([str(t['run']) for t in teachers])}",
                              f"--finetune.distill_weight={args.weight}")
    student_data = work / "data"
    if args.augment:  # the students' own data: the sentences and their copies, with the teachers' tokenizer
        student_data = work / f"data_augment{args.augment}"
        extra += (f"--finetune.augment={args.augment}", f"--data.dir={json.dumps(str(student_data))}",
                  f"--data.tokenizer={json.dumps(str(work / 'data' / 'tokenizer.json'))}")
    t1 = time.time()
    students = train_all(args.students, args.data, work, args.steps, args.parallel, extra, "student", student_data)
    students_wall = time.time() - t1
    scratch = train_all(args.students, args.data, work, args.steps, args.parallel) if args.baseline else []
    out = {"benchmark": "sst2_lstm_distill", "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
           "recipe": "sst2_lstm_cpu", "steps": args.steps, "distill_weight": args.weight, "augment": args.augment,
           "parallel": args.parallel, "threads_per_run": 1, "dev_sentences": len(teachers[0]["rows"]),
           "teachers": [_summary(t) for t in teachers],
           "teacher_mean": _mean(teachers), "teacher_ensemble": accuracy([t["rows"] for t in teachers]),
           "students": [_summary(s) for s in students], "student_mean": _mean(students),
           "student_min": min(accuracy([s["rows"]]) for s in students),
           "scratch": [_summary(s) for s in scratch], "scratch_mean": _mean(scratch) if scratch else None,
           "teachers_wall_s": round(teachers_wall, 1), "students_wall_s": round(students_wall, 1),
           "one_student_path_s": round(teachers_wall + max(s["train_s"] for s in students), 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, json.dumps(out, indent=2) + "\n")
    write_result(args.out.parent / f"applications_sentiment_distill{suffix}.json",
                 json.dumps({"rows": _rows(out)}, indent=2) + "\n")
    print(json.dumps(out, indent=2))


def _rows(out: dict) -> list[dict]:
    """benchmarks/applications_report.py's rows: each student seed, and the students against scratch."""
    minutes = round(out["one_student_path_s"] / 60, 2)
    what = (f"one LSTM (sst2_lstm_cpu, 2,200 steps) distilled from {len(out['teachers'])} of the same recipe "
            f"(ensemble {out['teacher_ensemble']}%, members mean {out['teacher_mean']}%), augment "
            f"{out['augment']}, weight {out['distill_weight']}; {minutes} min = the teachers two at a time "
            f"({out['teachers_wall_s'] / 60:.1f} min) + the student; {out['machine'].get('cpu', '')}")
    rows = []
    for s in out["students"]:
        pos = s["positive"]
        f = {k: round(100 * v, 2) if isinstance(v, float) else v for k, v in pos.items()}
        rows.append({"application": "sentiment SST-2 (lstm, distilled)", "metric": f"dev accuracy %, student seed "
                     f"{s['seed']}", "value": s["accuracy"], "goal": ">= 83 in 20 min", "train_minutes": minutes,
                     "notes": f"P {f['precision']} / R {f['recall']} / F1 {f['f1']} (positive class); {what}"})
    if out["scratch"]:
        rows.append({"application": "sentiment SST-2 (lstm, distilled)", "metric": "students minus scratch at "
                     "the same seeds, mean points", "value": round(out["student_mean"] - out["scratch_mean"], 2),
                     "goal": "> 0", "train_minutes": minutes,
                     "notes": f"students {[s['accuracy'] for s in out['students']]} (mean {out['student_mean']}), "
                              f"scratch {[s['accuracy'] for s in out['scratch']]} (mean {out['scratch_mean']})"})
    return rows


if __name__ == "__main__":
    main()
