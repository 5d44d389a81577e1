"""Commands that write a folder of their own refuse one inside a run's checkpoints folder.

Run: .venv/bin/python -m pytest -q tests/e2e/test_outputs_outside_checkpoints.py

Reference: the checkpoints folder's file listing before and after the refused command (unchanged):
an output there would be pruned with its step folder by checkpoint rotation (checkpoint.keep_last),
or read as part of a checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from clusterlm.cli import main as cli
from tests.helpers import random_checkpoint

STEP = "checkpoints/step-00000000"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("outs")
    run = random_checkpoint(root, "byte", "", bpe_vocab=0, n_layers=1, context=32)
    assert cli(["export", str(run), "--out", str(root / "hf")]) == 0  # a folder for `convert` to read
    return run


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("command, inside", [
    ("export", f"{STEP}/x"),
    ("export", "checkpoints/hf"),
    ("export", f"{STEP}/a/b"),
    ("convert", "checkpoints/c"),
    ("quantize", f"{STEP}/q"),
    ("prune", "checkpoints/p"),
    ("ensemble", "checkpoints/e"),
])
def test_out_inside_checkpoints_is_refused(run, capsys, command, inside):
    """export wrote its Hugging Face folder into RUN/checkpoints/step-X/x (and convert, quantize, prune,
    ensemble their new run) where rotation deletes it with the step; now one line naming the path and
    RUN/checkpoints, exit 2, nothing written."""
    out = run / inside
    argv = {"export": ["export", str(run)],
            "convert": ["convert", "--from-hf", str(run.parent / "hf")],
            "quantize": ["quantize", str(run), "--method", "int8"],
            "prune": ["prune", str(run), "--sparsity", "0.5", "--method", "magnitude"],
            "ensemble": ["ensemble", str(run), str(run)]}[command]
    before = _listing(run / "checkpoints")
    capsys.readouterr()
    assert cli([*argv, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"clusterlm {command}: error: --out {out} is inside the checkpoint")
    assert line.endswith(f"choose a folder outside {(run / 'checkpoints').resolve()}")
    assert _listing(run / "checkpoints") == before and captured.out == ""


def test_out_beside_checkpoints_is_allowed(run, tmp_path):
    """A folder in the run directory beside checkpoints/ (RUN/hf) is not refused."""
    assert cli(["export", str(run), "--out", str(run / "hf_export")]) == 0
    assert (run / "hf_export" / "config.json").is_file()


@pytest.mark.parametrize("command", ["export", "convert", "quantize", "prune", "ensemble"])
def test_out_under_a_file_is_refused_before_the_work(run, tmp_path, capsys, command):
    """--out FILE/sub (a file where a folder should be) failed with the OS's "Not a directory:
    FILE/sub/checkpoints" or "File exists: FILE/sub" (export) after loading; now one line naming the file."""
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "sub"
    argv = {"export": ["export", str(run)],
            "convert": ["convert", "--from-hf", str(run.parent / "hf")],
            "quantize": ["quantize", str(run), "--method", "int8"],
            "prune": ["prune", str(run), "--sparsity", "0.5", "--method", "magnitude"],
            "ensemble": ["ensemble", str(run), str(run)]}[command]
    assert cli([*argv, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == (f"clusterlm {command}: error: --out {out}: {tmp_path / 'afile'} is a file, not a "
                                    "folder; choose another --out")
    assert (tmp_path / "afile").read_text() == "x"
