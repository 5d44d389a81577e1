"""benchmarks/*.py as a user meets them before any timed run: what a result file records about the machine,
refusals of missing data and bad arguments (one line, exit 2, nothing left behind), result files written whole."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _bench(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))  # their `from common import ...`
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_machine_records_the_torch_version():
    """common.machine() (every result file's machine) names torch's version beside the CPU and load."""
    m = _bench("common").machine()
    assert m["torch"] == torch.__version__
    assert {"cpu", "cpus", "load_avg_1m"} <= m.keys()


def _run(script: str, *args: str, tmp: Path) -> subprocess.CompletedProcess:
    env = {**__import__("os").environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_missing_data_is_bad_input_exit_2_and_leaves_no_work_folder(tmp_path):
    """Each benchmark that reads data refuses missing data at once as bad input (exit 2, the missing file
    named); applications.py's default temporary work folder is not left behind empty."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    for script, *args in (("applications.py", "translate", "--data", "/nonexistent/m30k"),
                          ("applications.py", "sentiment", "--data", "/nonexistent/m30k"),
                          ("sst2_ensemble.py", "--data", "/nonexistent/m30k"),
                          ("lora_rank_ceiling.py", "--base", "b", "--full", "f", "--data", "/nonexistent/m30k"),
                          ("instructions.py", "--data", "/nonexistent/m30k")):
        r = _run(script, *args, tmp=tmp)
        assert r.returncode == 2, (script, r.returncode, r.stderr)
        assert "/nonexistent/m30k" in r.stderr.splitlines()[-1] and "Traceback" not in r.stderr, r.stderr
    assert list(tmp.iterdir()) == []


def test_counts_and_durations_are_checked_before_anything_runs(tmp_path):
    """--repeats 0 gave a traceback (a median of nothing) after seconds of set-up, --threads 0 torch's own
    error, --seconds nan a run of no length: each is argparse's one-line usage error, exit 2, nothing written."""
    common = _bench("common")
    assert common.positive_int("3") == 3 and common.positive_float("0.5") == 0.5
    for script, *args in (("mlm_step.py", "--threads", "0"), ("detokenize_stream.py", "--repeats", "0"),
                          ("eval_throughput.py", "--repeats", "0"), ("quickstart_scores.py", "--minutes", "nan")):
        r = _run(script, *args, "--out", str(tmp_path / "r.json"), tmp=tmp_path)
        flag, value = args[0], args[-1]
        assert r.returncode == 2, (script, r.returncode, r.stderr)
        assert f"error: argument {flag}: {value} is not" in r.stderr.splitlines()[-1], r.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_result_file_that_fails_to_write_keeps_the_last_good_one(tmp_path):
    """Results are written through common.write_result (a temporary name, then a rename): a write that fails
    (here a row whose text cannot be encoded, as a full disk or Ctrl-C would) leaves the previous file
    whole. Path.write_text truncated it to nothing first. save_figure does the same for a PNG."""
    import json

    import pytest

    rows = json.loads((ROOT / "benchmarks" / "results" / "applications_translation.json").read_text())["rows"]
    results = tmp_path / "results"
    results.mkdir()
    (results / "applications_x.json").write_text(json.dumps({"rows": [{**rows[0], "notes": "bad \ud800"}]}))
    out = results / "applications.md"
    out.write_text("the last good report\n")
    report = _bench("applications_report")
    with pytest.raises(UnicodeEncodeError):
        report.main(["--results", str(results), "--out", str(out)])
    assert out.read_text() == "the last good report\n"
    assert sorted(p.name for p in results.iterdir()) == ["applications.md", "applications_x.json"]


def test_planner_accuracy_defaults_are_the_repos_results_not_the_working_directorys(tmp_path, monkeypatch):
    """planner_accuracy.py's --out defaulted to the relative benchmarks/results/...: run from any other
    folder, --plot-only found no JSON and a measurement ended unable to write. Now beside the script."""
    bench = _bench("planner_accuracy")
    drawn = []
    monkeypatch.setattr(bench, "plot", lambda result, path: drawn.append((sorted(result), path)))
    monkeypatch.chdir(tmp_path)
    assert bench.main(["--plot-only"]) == 0
    assert drawn and drawn[0][1] == ROOT / "benchmarks" / "results" / "planner_accuracy.png"
    assert list(tmp_path.iterdir()) == []


def test_peers_decode_checks_its_val_arguments_before_decoding(tmp_path):
    """peers_decode.py measures the val losses last: --val-ckpt without --val-data (or a data folder that is
    not prepared data) failed after the whole decode comparison, nothing written. Refused first, exit 2."""
    data = tmp_path / "data"
    data.mkdir()
    for args, says in ((["--val-ckpt", str(tmp_path)], "--val-ckpt and --val-data go together"),
                       (["--val-ckpt", str(tmp_path / "none"), "--val-data", str(data)], f"--val-ckpt {tmp_path}"),):
        r = _run("peers_decode.py", *args, "--out", str(tmp_path / "p.json"), tmp=tmp_path)
        assert r.returncode == 2 and says in r.stderr.splitlines()[-1], r.stderr
    assert not (tmp_path / "p.json").exists()


def test_a_checkpoint_argument_that_names_none_is_refused_first(tmp_path):
    """--checkpoint/--ckpt/--base/--run naming no checkpoint was a CheckpointError traceback (instructions.py's
    after writing its instruction set into a new temp folder): one line naming the flag, exit 2, nothing made."""
    m30k, tmp = tmp_path / "m30k", tmp_path / "tmp"
    m30k.mkdir(), tmp.mkdir()
    for lang in ("en", "fr"):  # lora_rank_ceiling.py checks its --data first (no ../shared on a fresh machine)
        (m30k / f"test_2016_flickr.{lang}.gz").write_bytes(b"")
    for script, *args in (("eval_throughput.py", "--checkpoint"),
                          ("lora_rank_ceiling.py", "--data", str(m30k), "--full", "x", "--base"),
                          ("instructions.py", "--train-records", "10", "--run")):
        r = _run(script, *args, str(tmp_path / "none"), tmp=tmp)
        assert r.returncode == 2, (script, r.stderr)
        assert r.stderr.splitlines()[-1].startswith(f"{args[-1]} {tmp_path / 'none'}: "), r.stderr
    assert list(tmp.iterdir()) == []


def test_the_long_runs_check_their_budgets_and_counts_too(tmp_path):
    """The training benchmarks: --parallel 0 was a ThreadPoolExecutor traceback, --minutes 0 a training run
    of no length (after a calibration run), --train-records 0 a set of nothing; each a usage error, exit 2."""
    for script, *args in (("sst2_ensemble.py", "--parallel", "0"), ("applications.py", "translate", "--minutes", "0"),
                          ("instructions.py", "--train-records", "0")):  # --data: never a real run, fix or not
        r = _run(script, *args, "--data", str(tmp_path / "none"), tmp=tmp_path)
        assert r.returncode == 2, (script, r.stderr)
        assert f"error: argument {args[-2]}: 0 is not" in r.stderr.splitlines()[-1], r.stderr
    assert list(tmp_path.iterdir()) == []


def test_sentiment_pretrain_share_is_a_fraction(tmp_path):
    """applications.py sentiment --pretrain-share 1.5 pre-trained the LM for 1.5x --minutes and gave the
    fine-tuning the 0.5-minute floor (the arms' equal budget silently broken); now refused before any work."""
    r = _run("applications.py", "sentiment", "--pretrain-share", "1.5", "--data", str(tmp_path / "none"), tmp=tmp_path)
    assert r.returncode == 2 and "--pretrain-share 1.5: give a fraction" in r.stderr.splitlines()[-1], r.stderr
    assert list(tmp_path.iterdir()) == []
