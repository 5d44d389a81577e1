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


@pytest.mark.parametrize("flag, target, fragment", [
    ("--out", "data/meta.json", "is a file of the --data directory"),
    ("--out", f"run/{STEP}/config.toml", "is inside the checkpoint"),
    ("--out", f"run/{STEP}/scores.json", "is inside the checkpoint"),
    ("--out", "run/checkpoints/scores.json", "is inside the checkpoints folder"),
    ("--samples", f"run/{STEP}/model.safetensors", "is inside the checkpoint"),
    ("--samples", "run/checkpoints/latest", "is inside the checkpoints folder"),
])
def test_eval_out_over_data_or_checkpoint_files_is_refused(run, capsys, flag, target, fragment):
    """`eval --data DATA --out DATA/meta.json` replaced the data directory's meta.json with the scores (and
    --out/--samples RUN/checkpoints/step-X/config.toml likewise a checkpoint's file): refused in one line,
    exit 2, every file as it was."""
    root = run.parent
    if not (root / "data").exists():
        (root / "corpus.txt").write_text("".join(f"the quick brown fox {i}\n" for i in range(60)))
        assert cli(["prepare", str(root / "corpus.txt"), "--out", str(root / "data"), "--tokenizer", "byte",
                    "--val-fraction", "0.5"]) == 0
    files = lambda: {p: p.read_bytes() for p in [*(root / "data").rglob("*"), *(run / "checkpoints").rglob("*")]
                     if p.is_file()}
    before = files()
    capsys.readouterr()
    argv = (["eval", str(run), "--data", str(root / "data"), "--seq-len", "16", "--max-batches", "1"] if flag == "--out"
            else ["eval", str(run), "--task", "shakespeare_next_line", "--limit", "1", "--truncate"])
    out = root / target
    assert cli([*argv, flag, str(out)]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"clusterlm eval: error: {flag} {out} {fragment}"), line
    assert files() == before and captured.out == ""


def test_unrelated_folders_with_a_latest_or_manifest_file_are_not_checkpoints(run, tmp_path):
    """Only a real checkpoints folder (step folders and `latest`) or checkpoint (manifest.json and
    config.toml) counts: a downloads folder holding a file called `latest`, or a web bundle's manifest.json,
    does not block an export into it."""
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / "latest").write_text("v2\n")
    (tmp_path / "downloads" / "site").mkdir()
    (tmp_path / "downloads" / "site" / "manifest.json").write_text("{}")
    assert cli(["export", str(run), "--out", str(tmp_path / "downloads" / "site" / "hf")]) == 0
    assert (tmp_path / "downloads" / "site" / "hf" / "config.json").is_file()
