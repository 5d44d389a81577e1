"""benchmarks/sst2_ensemble.py and sst2_distill.py: the probability averaging, and their refusal without data."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("sst2_ensemble", ROOT / "benchmarks" / "sst2_ensemble.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rows(probs_pos: list[float], labels: list[str]) -> list[dict]:
    return [{"probs": {"0": 1 - p, "1": p}, "label": y} for p, y in zip(probs_pos, labels)]


def test_accuracy_averages_probabilities_not_votes():
    """Two models each right on one of two sentences: alone 50%; averaged, the confident one wins
    each sentence (100%), which a majority vote could not decide."""
    bench = _bench()
    labels = ["1", "0"]
    a = _rows([0.9, 0.6], labels)  # right, wrong (barely)
    b = _rows([0.45, 0.1], labels)  # wrong (barely), right
    assert bench.accuracy([a]) == 50.0 and bench.accuracy([b]) == 50.0
    assert bench.accuracy([a, b]) == 100.0


def test_missing_data_is_named():
    """Without SST-2 at --data the script exits at once naming the missing files and the option."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sst2_ensemble.py"), "--data", "/nonexistent/sst2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "/nonexistent/sst2/train.tsv.gz" in r.stderr and "--data" in r.stderr


def test_distill_benchmark_names_missing_data():
    """benchmarks/sst2_distill.py (teachers, then students distilled from them) refuses the same way."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sst2_distill.py"), "--data", "/nonexistent/sst2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "/nonexistent/sst2/train.tsv.gz" in r.stderr and "--data" in r.stderr


def test_distill_rows_fit_the_applications_report(tmp_path):
    """The rows sst2_distill.py adds to the applications table: one per student, and the paired gain."""
    spec = importlib.util.spec_from_file_location("sst2_distill", ROOT / "benchmarks" / "sst2_distill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    student = {"seed": 11, "accuracy": 83.03, "positive": {"precision": 0.8, "recall": 0.9, "f1": 0.85}}
    out = {"teachers": [{}] * 4, "teacher_ensemble": 83.6, "teacher_mean": 82.43, "augment": 1,
           "distill_weight": 1.0, "one_student_path_s": 1080.0, "teachers_wall_s": 660.0, "machine": {"cpu": "x"},
           "students": [student, {**student, "seed": 12, "accuracy": 82.8}], "student_mean": 82.92,
           "scratch": [{"accuracy": 80.28}, {"accuracy": 82.0}], "scratch_mean": 81.14}
    rows = mod._rows(out)
    assert [r["value"] for r in rows] == [83.03, 82.8, 1.78]
    assert rows[0]["train_minutes"] == 18.0 and "P 80.0 / R 90.0" in rows[0]["notes"]
    (tmp_path / "applications_x.json").write_text(json.dumps({"rows": rows}))
    report = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "applications_report.py")
    rep = importlib.util.module_from_spec(report)
    report.loader.exec_module(rep)
    assert rep.read_rows(tmp_path / "applications_x.json") == rows


def _samples(path: Path, probs_pos: list[float], labels: list[str]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows(probs_pos, labels)))


def test_mix_scores_draws_from_groups_of_earlier_runs(tmp_path):
    """--mix trains nothing: it reads `eval --samples` files by group and scores draws of K members
    from each; a draw of every run of a group is that group's full ensemble."""
    labels = ["1", "0"]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    _samples(tmp_path / "a" / "seed1.jsonl", [0.9, 0.6], labels)  # 50%
    _samples(tmp_path / "a" / "seed2.jsonl", [0.8, 0.7], labels)  # 50%
    _samples(tmp_path / "b" / "seed1.jsonl", [0.45, 0.1], labels)  # 50%
    out = tmp_path / "res" / "x.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sst2_ensemble.py"), "--out", str(out), "--tag", "t",
                        "--mix", f"lstm={tmp_path}/a/*.jsonl", f"gru={tmp_path}/b/*.jsonl",
                        "--draw", "lstm:2", "lstm:1;gru:1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "res" / "sst2_ensemble_mix_t.json").read_text())
    assert res["groups"] == {"lstm": [50.0, 50.0], "gru": [50.0]}
    lstm2, mixed = res["draws"]
    assert (lstm2["draw"], lstm2["mean"], lstm2["worst"], lstm2["best"]) == ("lstm:2", 50.0, 50.0, 50.0)
    assert mixed["draw"] == "lstm:1;gru:1" and mixed["best"] == 100.0 and mixed["worst"] == 100.0


def test_mix_refuses_a_draw_it_cannot_make(tmp_path):
    _samples(tmp_path / "seed1.jsonl", [0.9], ["1"])
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sst2_ensemble.py"), "--out", str(tmp_path / "x.json"),
                        "--mix", f"lstm={tmp_path}/*.jsonl", "--draw", "lstm:3"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "lstm:3" in r.stderr and "'lstm': 1" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sst2_ensemble.py"), "--mix", f"x={tmp_path}/none*"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "GROUP=GLOB" in r.stderr


def test_lm_corpus_adds_extra_text_lowercased_once(tmp_path):
    """applications.py sentiment --lm-extra: SST-2's sentences first, then each extra file's lines
    lowercased (SST-2 is), every text once."""
    import gzip

    spec = importlib.util.spec_from_file_location("applications", ROOT / "benchmarks" / "applications.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tsv = tmp_path / "train.tsv.gz"
    with gzip.open(tsv, "wt") as f:
        f.write("sentence\tlabel\na fine film\t1\na dull film\t0\na fine film\t1\n")
    extra = tmp_path / "train.en.gz"
    with gzip.open(extra, "wt") as f:
        f.write("Two dogs run .\nA DULL FILM\n\n")
    out = tmp_path / "lm.jsonl"
    assert mod.sentences_jsonl(tsv, out, [extra]) == 3
    assert [json.loads(x)["text"] for x in out.read_text().splitlines()] == ["a fine film", "a dull film", "two dogs run ."]
