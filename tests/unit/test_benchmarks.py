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
