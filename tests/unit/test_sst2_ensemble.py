"""benchmarks/sst2_ensemble.py: the probability averaging it scores, and its refusal without data."""

from __future__ import annotations

import importlib.util
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
