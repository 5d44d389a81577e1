"""`clusterlm report`: plots and summary.md from a synthetic metrics.jsonl with known numbers."""

from __future__ import annotations

import json
import math

import pytest

from clusterlm.train.report import main, summarize, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKENS_PER_STEP = 768


def _write_run(run_dir, steps: int = 100, with_mfu: bool = True) -> list[dict]:
    """100 steps of 768 tokens at 0.05 s each (15,360 tokens/s, MFU 0.3), one NaN step at 50,
    val every 25 steps (best at step 75), a checkpoint event and a predicted step time."""
    recs: list[dict] = [{"kind": "event", "step": 0, "event": "start", "predicted_step_time_s": 0.04,
                         "predicted_cpu_peak_rss_bytes": 1.0e9, "time": 1000.0}]
    for s in range(1, steps + 1):
        loss = None if s == 50 else 4.0 * math.exp(-s / 40) + 1.0
        recs.append({"kind": "train", "step": s, "tokens": s * TOKENS_PER_STEP, "loss": loss, "lr": 1e-3,
                     "skipped": s == 50, "step_time_s": 0.05, "tokens_per_s": 15_360.0,
                     "mfu": 0.3 if with_mfu else None, "cpu_peak_rss_bytes": 5e8 + s, "time": 1000.0 + 0.05 * s})
        if s % 25 == 0:
            val = {25: 3.0, 50: 2.5, 75: 2.0, 100: 2.1}[s]
            recs.append({"kind": "eval", "step": s, "tokens": s * TOKENS_PER_STEP, "val_loss": val,
                         "time": 1000.0 + 0.05 * s})
    recs.append({"kind": "event", "step": steps, "event": "checkpoint", "path": "ckpt/step-00000100",
                 "time": 1006.0})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def test_summary_numbers(tmp_path):
    """Final/best losses, steps, tokens, wall time, tokens/s, MFU and predicted-vs-measured equal the
    values the synthetic log was built from."""
    recs = _write_run(tmp_path)
    s = summarize(recs)
    assert s["steps"] == 100 and s["tokens"] == 76_800
    assert s["final_train_loss"] == pytest.approx(4.0 * math.exp(-100 / 40) + 1.0)
    assert s["final_val_loss"] == 2.1
    assert (s["best_val_loss"], s["best_val_step"]) == (2.0, 75)
    assert s["skipped_steps"] == 1
    assert s["train_seconds"] == pytest.approx(5.0)
    assert s["elapsed_seconds"] == pytest.approx(6.0)
    assert s["mean_tokens_per_s"] == pytest.approx(76_800 / 5.0)
    assert s["mfu_mean"] == pytest.approx(0.3)
    rows = {r["field"]: r for r in s["predicted_vs_measured"]}
    assert rows["step_time_s"]["measured"] == pytest.approx(0.05)
    assert rows["step_time_s"]["ratio"] == pytest.approx(1.25)
    assert rows["cpu_peak_rss_bytes"]["measured"] == 5e8 + 100  # memory: the maximum, not the median
    assert s["checkpoints"] == ["ckpt/step-00000100"]


def test_summary_of_resumed_log_counts_logged_steps_only(tmp_path):
    """A log starting at step 51 (earlier part truncated) counts 50 steps of tokens over 50 step times."""
    recs = [r for r in _write_run(tmp_path) if r.get("kind") == "train" and r["step"] > 50]
    s = summarize(recs)
    assert s["mean_tokens_per_s"] == pytest.approx(50 * TOKENS_PER_STEP / 2.5)


def test_write_report_files(tmp_path):
    """write_report makes three non-empty PNGs (valid signature) and a summary.md holding the final
    numbers, the MFU and links to the plots."""
    _write_run(tmp_path)
    paths = write_report(tmp_path)
    assert set(paths) == {"loss_vs_step", "loss_vs_tokens", "throughput", "summary"}
    for key in ("loss_vs_step", "loss_vs_tokens", "throughput"):
        data = paths[key].read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
        assert paths[key].parent == tmp_path / "plots"
    md = paths["summary"].read_text()
    assert "| steps | 100 |" in md and "| tokens | 76,800 |" in md
    assert f"| final train loss | {4.0 * math.exp(-2.5) + 1.0:.4f} |" in md
    assert "| final val loss | 2.1000 |" in md and "| best val loss | 2.0000 (step 75) |" in md
    assert "| mean tokens/s | 15,360 |" in md and "| mean MFU | 30.0% |" in md
    assert "| step_time_s | 0.04 | 0.05 | 1.250 |" in md
    assert "![loss_vs_step](plots/loss_vs_step.png)" in md


def test_a_run_named_as_dot_is_titled_with_its_folder(tmp_path, monkeypatch):
    """`clusterlm report .` inside the run folder (or `..` from its plots/) titles summary.md with the
    folder's name; it printed "# Run summary: " (and "# Run summary: ..")."""
    run = tmp_path / "my run"
    _write_run(run)
    monkeypatch.chdir(run)
    assert write_report(".")["summary"].read_text().startswith("# Run summary: my run\n")
    monkeypatch.chdir(run / "plots")
    md = write_report("..")["summary"].read_text()
    assert md.startswith("# Run summary: my run\n") and "![loss_vs_step](plots/loss_vs_step.png)" in md


def test_durations_round_into_the_next_minute():
    """Wall times in summary.md read as a clock does: 119.97 s is 2m 00.0s (it printed "1m 60.0s", and
    3599.96 s "59m 60.0s")."""
    from clusterlm.train.report import _duration

    assert [_duration(x) for x in (0.04, 59.94, 59.96, 119.97, 3599.96, 3659.99, 7384.5)] == [
        "0m 00.0s", "0m 59.9s", "1m 00.0s", "2m 00.0s", "1h 00m 00.0s", "1h 01m 00.0s", "2h 03m 04.5s"]


def test_unknown_mfu_and_cli(tmp_path, capsys):
    """Without a known peak the summary says MFU is unknown; `clusterlm report` prints the summary."""
    _write_run(tmp_path, with_mfu=False)
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| mean MFU | unknown (device peak not known) |" in out
    assert "summary.md" in out


def test_summary_of_a_log_without_train_records_says_n_a(tmp_path):
    """A metrics.jsonl with eval records only (the train lines lost) gave "| median step time | n/a ms |"."""
    recs = [r for r in _write_run(tmp_path) if r["kind"] != "train"]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    md = write_report(tmp_path)["summary"].read_text()
    assert "| median step time | n/a |" in md and "| final val loss | 2.1000 |" in md


def test_a_log_without_any_step_is_refused_and_nothing_written(tmp_path, capsys):
    """A metrics.jsonl with event records only (a run that logged no step) is exit 2 with one line naming
    the file and the kinds it holds; no plots or summary.md (it wrote three empty plots and "steps 0")."""
    from clusterlm.cli import main as cli

    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "event", "step": 0, "event": "start"}) + "\n")
    assert cli(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("metrics.jsonl has 1 record(s) (event) but no train, eval or task record: the run "
                            "logged no step; nothing to report")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_missing_metrics_is_clear(tmp_path):
    """A folder without metrics.jsonl: FileNotFoundError naming the file; no plots folder made."""
    with pytest.raises(FileNotFoundError, match="metrics.jsonl does not exist"):
        write_report(tmp_path)
    assert not (tmp_path / "plots").exists()


def test_metrics_folder_and_plots_file_are_named(tmp_path):
    """metrics.jsonl as a folder was reported as missing; a file named plots gave the raw
    "[Errno 17] File exists: 'plots'". Each now says what is wrong, before anything is written."""
    (tmp_path / "a" / "metrics.jsonl").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match="metrics.jsonl is a folder"):
        write_report(tmp_path / "a")
    _write_run(tmp_path / "b")
    (tmp_path / "b" / "plots").write_text("not a folder")
    with pytest.raises(FileExistsError, match="plots is a file") as e:
        write_report(tmp_path / "b")
    assert "Errno" not in str(e.value)
    assert not (tmp_path / "b" / "summary.md").exists()
    (tmp_path / "c").write_text("a file")  # was "c/metrics.jsonl does not exist"
    with pytest.raises(NotADirectoryError, match="c is a file: RUN_DIR must be"):
        write_report(tmp_path / "c")


def test_task_scores_during_training(tmp_path):
    """"task" records (eval during training, a resumed step logged twice keeps its last record) give
    one PNG per task (names made file-safe) and summary.md rows with the last evaluation's score and
    the best with its step, per headline metric."""
    from clusterlm.train.report import task_series

    recs = _write_run(tmp_path)
    for step, acc, wall in ((25, 0.30, 1.3), (50, 0.55, 2.6), (50, 0.50, 2.7), (100, 0.45, 5.2)):
        recs.append({"kind": "task", "step": step, "tokens": step * TOKENS_PER_STEP, "wall_s": wall, "eval_s": 0.1,
                     "task": "next line", "task_kind": "choice", "n": 400,
                     "metrics": {"acc": acc, "acc_norm": acc - 0.1}, "time": 1000.0 + 0.05 * step})
    recs.append({"kind": "task", "step": 100, "tokens": 76_800, "wall_s": 5.2, "eval_s": 2.0, "task": "qa",
                 "task_kind": "generate", "n": 5, "metrics": {"bleu": 12.5, "chrf": 30.0, "rougeL": 20.0,
                                                              "exact_match": 40.0, "f1": 55.0}})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    series = task_series(recs)
    assert [r["step"] for r in series["next line"]] == [25, 50, 100]
    assert series["next line"][1]["metrics"]["acc"] == 0.50
    paths = write_report(tmp_path)
    for key in ("task_next_line", "task_qa"):
        data = paths[key].read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000 and paths[key].name == f"{key}.png"
    md = paths["summary"].read_text()
    assert "| next line | choice | 400 | 100 | acc | 0.45 | 0.5 (50) |" in md
    assert "| next line | choice | 400 | 100 | acc_norm | 0.35 | 0.4 (50) |" in md
    assert "| qa | generate | 5 | 100 | bleu | 12.5 | 12.5 (100) |" in md
    assert "| qa | generate | 5 | 100 | f1 |" not in md  # headline metrics only (TASK_HEADLINE)
    assert "![task_next_line](plots/task_next_line.png)" in md


def test_classifier_val_accuracy_and_macro_f1_in_summary_and_plot(tmp_path):
    """A classifier's eval records carry val_accuracy and val_macro_f1: summary.md has the final and
    the best (highest, with its step) of each, and plots/val_scores.png is written; a language
    model's report has neither (they were left out of the classifier's summary)."""
    recs = _write_run(tmp_path / "cls")
    scores = {25: (0.60, 0.55), 50: (0.80, 0.78), 75: (0.75, 0.79), 100: (0.70, 0.65)}
    for r in recs:
        if r.get("kind") == "eval":
            r["val_accuracy"], r["val_macro_f1"] = scores[r["step"]]
    (tmp_path / "cls" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = summarize(recs)
    assert s["val_scores"] == {"val_accuracy": {"final": 0.70, "best": 0.80, "best_step": 50},
                               "val_macro_f1": {"final": 0.65, "best": 0.79, "best_step": 75}}
    paths = write_report(tmp_path / "cls")
    md = paths["summary"].read_text()
    for row in ("| final val accuracy | 0.7000 |", "| best val accuracy | 0.8000 (step 50) |",
                "| final val macro-F1 | 0.6500 |", "| best val macro-F1 | 0.7900 (step 75) |"):
        assert row in md
    assert paths["val_scores"].read_bytes()[:8] == PNG_MAGIC and "val_scores.png" in md
    _write_run(tmp_path / "lm")
    lm = write_report(tmp_path / "lm")
    assert "val_scores" not in lm and "val accuracy" not in lm["summary"].read_text()


@pytest.mark.parametrize("content, fragment", [
    ('{"tasks": {"t": {"kind": "generate", "bleu": 1', "is unreadable (Expecting"),
    (b"\xff\xfe not utf-8", "is unreadable ("),
    ('["not", "an", "object"]', "is not the JSON `clusterlm eval --task ... --out` writes"),
    ('{"tasks": [1, 2]}', "is not the JSON `clusterlm eval --task ... --out` writes"),
    ('{"tasks": {"t": 5}}', "is not the JSON `clusterlm eval --task ... --out` writes"),  # was AttributeError, exit 1
])
def test_a_corrupt_task_scores_file_is_named_and_the_report_goes_on(tmp_path, caplog, content, fragment):
    """A task_scores.json that does not parse (a truncated write), is not UTF-8 or is not eval's shape
    was skipped silently: the summary lacked its section with no word why. A warning names the file and
    the error; plots and summary.md are written as without the file. A valid one is still read."""
    import logging

    _write_run(tmp_path)
    path = tmp_path / "task_scores.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with caplog.at_level(logging.WARNING, logger="clusterlm.train.report"):
        out = write_report(tmp_path)
    assert [r.getMessage() for r in caplog.records if fragment in r.getMessage() and str(path) in r.getMessage()]
    summary = out["summary"].read_text()
    assert "## Task scores" not in summary and "| final val loss | 2.1" in summary
    path.write_text(json.dumps({"tasks": {"t": {"kind": "generate", "n": 3, "bleu": 12.5}}}))
    caplog.clear()
    assert "| t | generate | 3 | bleu | 12.5 |" in write_report(tmp_path)["summary"].read_text()
    assert not caplog.records
