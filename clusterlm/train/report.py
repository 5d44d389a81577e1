"""`clusterlm report RUN_DIR`: plots and a markdown summary of a training run from its metrics.jsonl.

    clusterlm report runs/shakespeare_char

writes RUN_DIR/plots/loss_vs_step.png, loss_vs_tokens.png, throughput.png, val_scores.png (a
classifier's validation accuracy and macro-F1), one task_<name>.png per task scored during training
([eval] in the recipe: score vs step and vs wall time) and RUN_DIR/summary.md (final and best
losses, a classifier's final and best validation accuracy and macro-F1, steps, tokens, wall time,
tokens/s, MFU when the peak was known, predicted-vs-measured figures when the run logged
`predicted_*` fields, the task scores of the last evaluation during training and those of
`clusterlm eval --out RUN/task_scores.json`).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from clusterlm.fsutil import atomic_write_text
from clusterlm.train.metrics import METRICS_FILE, TASK_HEADLINE, read_metrics

log = logging.getLogger(__name__)

PLOTS_DIR = "plots"
VAL_SCORES = {"val_accuracy": "val accuracy", "val_macro_f1": "val macro-F1"}  # a classifier's, higher is better
SMOOTH = 0.9  # EMA factor for the smoothed train-loss curve (TensorBoard's default smoothing is 0.6-0.9)


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _series(records: list[dict[str, Any]], kind: str, x: str, y: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in records:
        if r.get("kind") == kind and _num(r.get(x)) is not None and _num(r.get(y)) is not None:
            xs.append(float(r[x]))
            ys.append(float(r[y]))
    return xs, ys


def _ema(ys: list[float], beta: float = SMOOTH) -> list[float]:
    out: list[float] = []
    for y in ys:
        out.append(y if not out else beta * out[-1] + (1 - beta) * y)
    return out


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of summary.md, from metrics records (None where the log has nothing)."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval" and _num(r.get("val_loss")) is not None]
    finite_train = [r for r in train if _num(r.get("loss")) is not None]
    step_times = [t for r in train if (t := _num(r.get("step_time_s"))) is not None]
    steps = [s for r in records if (s := _num(r.get("step"))) is not None]
    tokens = [t for r in records if (t := _num(r.get("tokens"))) is not None]
    mfus = [m for r in train if (m := _num(r.get("mfu"))) is not None]
    times = [t for r in records if (t := _num(r.get("time"))) is not None]
    out: dict[str, Any] = {
        "steps": int(max(steps)) if steps else 0,
        "tokens": int(max(tokens)) if tokens else 0,
        "final_train_loss": _num(finite_train[-1]["loss"]) if finite_train else None,
        "final_val_loss": float(evals[-1]["val_loss"]) if evals else None,
        "best_val_loss": min(float(r["val_loss"]) for r in evals) if evals else None,
        "best_val_step": int(min(evals, key=lambda r: r["val_loss"]).get("step", 0)) if evals else None,
        "skipped_steps": sum(1 for r in train if r.get("skipped")),
        "train_seconds": sum(step_times) if step_times else None,
        "elapsed_seconds": (max(times) - min(times)) if len(times) > 1 else None,
        "median_step_time_s": statistics.median(step_times) if step_times else None,
        "mfu_mean": statistics.fmean(mfus) if mfus else None,
        "checkpoints": [r["path"] for r in records if r.get("kind") == "event" and r.get("event") == "checkpoint"
                        and "path" in r],
        "task_series": task_series(records),
    }
    # tokens/s over the run: tokens of the logged train steps / seconds spent in them
    out["mean_tokens_per_s"] = (_trained_tokens(train) / out["train_seconds"]) if out["train_seconds"] else None
    out["predicted_vs_measured"] = _predicted_vs_measured(records, train)
    out["val_scores"] = val_scores(evals)
    return out


def val_scores(evals: list[dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    """A classifier's validation scores (VAL_SCORES) that the eval records carry: {key: {"final",
    "best", "best_step"}}, best = the highest (the earliest step on ties); {} for a language model."""
    out: dict[str, dict[str, float | int]] = {}
    for key in VAL_SCORES:
        pts = [(v, int(r.get("step", 0))) for r in evals if (v := _num(r.get(key))) is not None]
        if pts:
            best, step = max(pts, key=lambda p: (p[0], -p[1]))
            out[key] = {"final": pts[-1][0], "best": best, "best_step": step}
    return out


def _trained_tokens(train: list[dict[str, Any]]) -> float:
    """Tokens processed by the logged train steps, from the cumulative "tokens" field: the sum of
    its increments, the first record counting tokens/step (every step before it had the same size)."""
    pts = [(s, t) for r in train if (s := _num(r.get("step"))) and (t := _num(r.get("tokens"))) is not None]
    if not pts:
        return 0.0
    (s0, t0), (_, t_last) = pts[0], pts[-1]
    return t_last - t0 + t0 / s0


def _predicted_vs_measured(records: list[dict[str, Any]], train: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each `predicted_X` field in the log (last value): the measured X, taken from a
    `measured_X` field if one was logged, else the median of X over train records (the maximum for
    memory fields: names with "mem" or "bytes")."""
    predicted: dict[str, float] = {}
    measured_direct: dict[str, float] = {}
    for r in records:
        for k, v in r.items():
            if (x := _num(v)) is None:
                continue
            if k.startswith("predicted_"):
                predicted[k[len("predicted_"):]] = x
            elif k.startswith("measured_"):
                measured_direct[k[len("measured_"):]] = x
    rows = []
    for name, pred in predicted.items():
        meas = measured_direct.get(name)
        if meas is None:
            vals = [x for r in train if (x := _num(r.get(name))) is not None]
            if vals:
                meas = max(vals) if ("mem" in name or "bytes" in name) else statistics.median(vals)
        rows.append({"field": name, "predicted": pred, "measured": meas,
                     "ratio": (meas / pred) if (meas is not None and pred) else None})
    return rows


# ---- plots --------------------------------------------------------------------------------------------
def _plot_loss(records: list[dict[str, Any]], x: str, xlabel: str, path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    tx, ty = _series(records, "train", x, "loss")
    if tx:
        ax.plot(tx, ty, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
        ax.plot(tx, _ema(ty), color="tab:blue", linewidth=1.6, label=f"train (EMA {SMOOTH})")
    vx, vy = _series(records, "eval", x, "val_loss")
    if vx:
        ax.plot(vx, vy, color="tab:orange", marker="o", markersize=3.5, linewidth=1.6, label="val")
    ax.set_xlabel(xlabel)
    if x == "tokens":
        ax.xaxis.set_major_formatter(EngFormatter())  # 200k, 1.5M, ... instead of 1500000
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"loss vs {xlabel.split(' ')[0]}")
    ax.grid(True, alpha=0.3)
    if tx or vx:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_val_scores(records: list[dict[str, Any]], path: Path) -> None:
    """A classifier's validation accuracy and macro-F1 against the step."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for key, label in VAL_SCORES.items():
        xs, ys = _series(records, "eval", "step", key)
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3.5, linewidth=1.6, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("score")
    ax.set_title("validation scores vs step")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_throughput(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    sx, sy = _series(records, "train", "step", "tokens_per_s")
    ax.plot(sx, sy, color="tab:green", linewidth=1.2, label="tokens/s")
    if sy:
        med = statistics.median(sy)
        ax.axhline(med, color="tab:green", linestyle="--", linewidth=0.9, label=f"median {med:,.0f} tokens/s")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s")
    ax.yaxis.set_major_formatter(EngFormatter())
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    mx, my = _series(records, "train", "step", "mfu")
    if mx:
        ax2 = ax.twinx()
        ax2.plot(mx, [100 * m for m in my], color="tab:red", linewidth=1.0, alpha=0.7, label="MFU")
        ax2.set_ylabel("MFU (%)")
        ax2.set_ylim(bottom=0)
        lines = ax.get_lines() + ax2.get_lines()
        ax.legend(lines, [ln.get_label() for ln in lines], loc="best")
    elif sy:
        ax.legend(loc="best")
    ax.set_title("throughput")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def task_series(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The "task" records (eval during training) by task name, in step order; a step evaluated twice
    (a resumed run) keeps its last record."""
    by_task: dict[str, dict[int, dict[str, Any]]] = {}
    for r in records:
        if r.get("kind") == "task" and isinstance(r.get("task"), str) and isinstance(r.get("metrics"), dict) \
                and _num(r.get("step")) is not None:
            by_task.setdefault(r["task"], {})[int(r["step"])] = r
    return {name: [steps[k] for k in sorted(steps)] for name, steps in by_task.items()}


def _headline(rec: dict[str, Any]) -> list[str]:
    """The record's headline metrics (TASK_HEADLINE of its kind; all its metrics for an unknown kind)."""
    m = rec["metrics"]
    return [k for k in TASK_HEADLINE.get(rec.get("task_kind"), tuple(m)) if _num(m.get(k)) is not None]


def _plot_task(name: str, recs: list[dict[str, Any]], path: Path) -> None:
    """Each headline score of one task vs step (left) and vs the run's wall time (right)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=120, sharey=True)
    keys = list(dict.fromkeys(k for r in recs for k in _headline(r)))
    for ax, x, xlabel in ((axes[0], "step", "step"), (axes[1], "wall_s", "wall time (minutes)")):
        for key in keys:
            pts = [(float(r[x]), float(r["metrics"][key])) for r in recs
                   if _num(r.get(x)) is not None and _num(r["metrics"].get(key)) is not None]
            if pts:
                scale = 60.0 if x == "wall_s" else 1.0
                ax.plot([p[0] / scale for p in pts], [p[1] for p in pts], marker="o", markersize=3.5,
                        linewidth=1.4, label=key)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
    kind = recs[-1].get("task_kind", "?")
    axes[0].set_ylabel("score (0-100)" if kind == "generate" else "score (fraction)")
    if keys:
        axes[0].legend(loc="best")
    fig.suptitle(f"task {name} ({kind}, {recs[-1].get('n', '?')} examples)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _task_plot_name(name: str) -> str:
    return "task_" + re.sub(r"[^A-Za-z0-9._-]+", "_", name)


# ---- summary --------------------------------------------------------------------------------------------
def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    m, s = divmod(round(seconds, 1), 60)  # rounded first: 119.97 s printed as "1m 60.0s"
    h, m = divmod(int(m), 60)
    return f"{h}h {m:02d}m {s:04.1f}s" if h else f"{m}m {s:04.1f}s"


def _val_score_rows(scores: dict[str, dict[str, float | int]]) -> list[str]:
    """summary.md rows of a classifier's final and best validation scores (`val_scores`)."""
    rows = []
    for key, v in scores.items():
        rows += [f"| final {VAL_SCORES[key]} | {v['final']:.4f} |",
                 f"| best {VAL_SCORES[key]} | {v['best']:.4f} (step {v['best_step']:,}) |"]
    return rows


def render_summary(run_dir: Path, s: dict[str, Any], plots: dict[str, Path]) -> str:
    mfu = "unknown (device peak not known)" if s["mfu_mean"] is None else f"{100 * s['mfu_mean']:.1f}%"
    lines = [
        f"# Run summary: {Path(os.path.abspath(run_dir)).name}",  # `report .` inside the run: its folder's name
        "",
        "| | |",
        "|---|---|",
        f"| steps | {s['steps']:,} |",
        f"| tokens | {s['tokens']:,} |",
        f"| final train loss | {_fmt(s['final_train_loss'])} |",
        f"| final val loss | {_fmt(s['final_val_loss'])} |",
        f"| best val loss | {_fmt(s['best_val_loss'])}"
        + (f" (step {s['best_val_step']:,})" if s["best_val_step"] is not None else "") + " |",
        *_val_score_rows(s.get("val_scores", {})),
        f"| wall time in training steps | {_duration(s['train_seconds'])} |",
        f"| elapsed (first to last record) | {_duration(s['elapsed_seconds'])} |",
        "| median step time | " + ("n/a" if s["median_step_time_s"] is None else
                                   f"{s['median_step_time_s'] * 1e3:.1f} ms") + " |",
        f"| mean tokens/s | {_fmt(s['mean_tokens_per_s'], ',.0f')} |",
        f"| mean MFU | {mfu} |",
        f"| skipped (non-finite) steps | {s['skipped_steps']} |",
    ]
    if s["predicted_vs_measured"]:
        lines += ["", "## Predicted vs measured", "", "| field | predicted | measured | measured / predicted |",
                  "|---|---|---|---|"]
        for r in s["predicted_vs_measured"]:
            lines.append(f"| {r['field']} | {r['predicted']:.4g} | {_fmt(r['measured'], '.4g')} | "
                         f"{_fmt(r['ratio'], '.3f')} |")
    during = s.get("task_series") or {}
    if during:
        lines += ["", "## Task scores during training", "",
                  "The last evaluation of each task in metrics.jsonl ([eval] in the recipe), and its best.", "",
                  "| task | kind | examples | step | metric | score | best (step) |", "|---|---|---|---|---|---|---|"]
        for name, recs in during.items():
            last = recs[-1]
            for key in _headline(last):
                scored = [(float(r["metrics"][key]), int(r["step"])) for r in recs if _num(r["metrics"].get(key)) is not None]
                best, best_step = max(scored, key=lambda p: (p[0], -p[1]))
                lines.append(f"| {name} | {last.get('task_kind')} | {last.get('n', '?')} | {int(last['step']):,} | "
                             f"{key} | {float(last['metrics'][key]):.4g} | {best:.4g} ({best_step:,}) |")
    tasks = _task_scores(run_dir)
    if tasks:
        lines += ["", "## Task scores", "", f"From `{TASK_SCORES_FILE}` (`clusterlm eval --task`, docs/tasks.md).", "",
                  "| task | kind | examples | metric | score |", "|---|---|---|---|---|"]
        for name, m in tasks.items():
            for key in TASK_HEADLINE.get(m.get("kind"), ()):
                if isinstance(m.get(key), (int, float)):
                    lines.append(f"| {name} | {m.get('kind')} | {m.get('n', '?')} | {key} | {m[key]:.4g} |")
    if s["checkpoints"]:
        lines += ["", f"Last checkpoint: `{s['checkpoints'][-1]}`"]
    lines += ["", "## Plots", ""]
    lines += [f"![{name}]({p.relative_to(run_dir).as_posix()})" for name, p in plots.items()]
    return "\n".join(lines) + "\n"


TASK_SCORES_FILE = "task_scores.json"  # `clusterlm eval --task ... --out RUN/task_scores.json`; quickstart writes it


def _task_scores(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The run's task scores ({task: metrics}) when it has a task_scores.json; {} otherwise. One that
    cannot be read or parsed, or is not `clusterlm eval --task` JSON, is named in a warning (the rest
    of the report is written without its section)."""
    import json

    path = run_dir / TASK_SCORES_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
        log.warning("%s is unreadable (%s); the report leaves out its task scores", path, e)
        return {}
    tasks = data.get("tasks", {}) if isinstance(data, dict) else None
    if not isinstance(tasks, dict) or not all(isinstance(m, dict) for m in tasks.values()):  # {task: {metric: x}}
        log.warning("%s is not the JSON `clusterlm eval --task ... --out` writes (an object with a \"tasks\" "
                    "object of one object per task); the report leaves out its task scores", path)
        return {}
    return tasks


def write_report(run_dir: str | Path) -> dict[str, Path]:
    """Write the plots and summary.md of `run_dir`; returns {"loss_vs_step", "loss_vs_tokens",
    "throughput", "val_scores" (a classifier's), "task_<name>" (one per task scored during training),
    "summary"} -> path."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / METRICS_FILE
    if run_dir.exists() and not run_dir.is_dir():
        raise NotADirectoryError(f"{run_dir} is a file: RUN_DIR must be the train.out_dir of a `clusterlm train` "
                                 "run (the folder that holds metrics.jsonl)")
    if metrics_path.is_dir():
        raise IsADirectoryError(f"{metrics_path} is a folder, not the JSON-lines file a `clusterlm train` run "
                                "writes: RUN_DIR must be the train.out_dir of a run (it holds metrics.jsonl)")
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} does not exist: RUN_DIR must be the train.out_dir of a "
                                "`clusterlm train` run (it holds metrics.jsonl)")
    records = read_metrics(metrics_path)
    if not records:
        raise ValueError(f"{metrics_path} has no records; nothing to report")
    if not any(r.get("kind") in ("train", "eval", "task") for r in records):  # empty plots and "steps 0" before
        kinds = sorted({str(r.get("kind")) for r in records})
        raise ValueError(f"{metrics_path} has {len(records)} record(s) ({', '.join(kinds)}) but no train, eval or task "
                         "record: the run logged no step; nothing to report")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; set here so importing this module changes nothing
    plots_dir = run_dir / PLOTS_DIR
    if plots_dir.exists() and not plots_dir.is_dir():
        raise FileExistsError(f"{plots_dir} is a file, and the report writes its plots into a folder of that "
                              "name: move or remove the file and rerun")
    plots_dir.mkdir(parents=True, exist_ok=True)
    plots = {"loss_vs_step": plots_dir / "loss_vs_step.png", "loss_vs_tokens": plots_dir / "loss_vs_tokens.png",
             "throughput": plots_dir / "throughput.png"}
    _plot_loss(records, "step", "step", plots["loss_vs_step"])
    _plot_loss(records, "tokens", "tokens seen", plots["loss_vs_tokens"])
    _plot_throughput(records, plots["throughput"])
    if any(_series(records, "eval", "step", key)[0] for key in VAL_SCORES):  # a classifier's run
        plots["val_scores"] = plots_dir / "val_scores.png"
        _plot_val_scores(records, plots["val_scores"])
    for name, recs in task_series(records).items():
        key = _task_plot_name(name)
        plots[key] = plots_dir / f"{key}.png"
        _plot_task(name, recs, plots[key])
    summary = run_dir / "summary.md"
    atomic_write_text(summary, render_summary(run_dir, summarize(records), plots))
    return {**plots, "summary": summary}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clusterlm report", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="a run directory (train.out_dir) holding metrics.jsonl")
    args = p.parse_args(argv)
    paths = write_report(args.run_dir)
    sys.stdout.write(paths["summary"].read_text(encoding="utf-8"))
    sys.stdout.write("\nwrote:\n" + "".join(f"  {p}\n" for p in paths.values()))
    return 0
