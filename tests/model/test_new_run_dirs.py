"""Commands that write a new folder (export, quantize, prune, convert) on a failed or refused write:
an I/O error from safetensors (a full disk) is one OSError naming the file the user asked for, with
nothing left behind, and what an earlier failure left (an empty folder) does not block the retry.

Run: .venv/bin/python -m pytest -q tests/model/test_new_run_dirs.py
"""

from __future__ import annotations

import errno

import pytest
from safetensors import SafetensorError

from tests.helpers import random_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return random_checkpoint(tmp_path_factory.mktemp("ck"), "char", "hello world, the quick brown fox\n" * 4,
                             bpe_vocab=0, n_layers=1, context=32)


def test_a_full_disk_during_export_leaves_nothing_and_names_the_file(run, tmp_path, monkeypatch):
    import safetensors.torch

    from clusterlm.interop.hf_io import export_to_hf

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as e:
        export_to_hf(run, tmp_path / "hf")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "hf" / "model.safetensors")
    assert list(tmp_path.iterdir()) == []  # no folder, no hidden staging folder
    monkeypatch.undo()
    (tmp_path / "hf").mkdir()  # an empty folder (the user's, or a crash's) is filled
    assert (export_to_hf(run, tmp_path / "hf") / "model.safetensors").is_file()
    with pytest.raises(FileExistsError, match=r"hf is a folder that is not empty; give a folder to create \(or an "
                                              r"empty folder\)"):
        export_to_hf(run, tmp_path / "hf")


def test_an_empty_checkpoints_folder_does_not_block_a_rerun(run, tmp_path):
    from clusterlm.checkpoint.store import check_new_run_dir
    from clusterlm.optimize.quantize import quantize_checkpoint

    (tmp_path / "q" / "checkpoints" / ".step-00000001.partial-x").mkdir(parents=True)  # what a failure leaves
    check_new_run_dir(tmp_path / "q")
    path = quantize_checkpoint(run, tmp_path / "q", "int8")
    assert path.parent == tmp_path / "q" / "checkpoints"
    with pytest.raises(FileExistsError, match="already exists"):
        check_new_run_dir(tmp_path / "q")
    with pytest.raises(FileExistsError, match="--out is empty"):
        check_new_run_dir("")


def test_an_out_that_is_a_file_is_refused_in_one_line(tmp_path):
    """--out naming an existing file: one line saying so (it was '[Errno 20] Not a directory:
    OUT/checkpoints', raised after the source checkpoint was loaded), the file untouched."""
    from clusterlm.checkpoint.store import check_new_run_dir

    (tmp_path / "f").write_text("mine")
    with pytest.raises(FileExistsError, match=r"--out .*f is a file, not a folder; give a new run directory"):
        check_new_run_dir(tmp_path / "f")
    assert (tmp_path / "f").read_text() == "mine"


def test_export_to_a_file_says_it_is_a_file(run, tmp_path, capsys):
    """`clusterlm export RUN --out FILE` with FILE an existing file said only '--out FILE exists and is
    not an empty folder'; it now says FILE is a file and what --out wants (exit 2), the file untouched."""
    from clusterlm.cli import main as cli

    (tmp_path / "f").write_text("mine")
    assert cli(["export", str(run), "--out", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'f'} is a file, not a folder; give a folder to create (or an empty folder)" in err, err
    assert (tmp_path / "f").read_text() == "mine"
