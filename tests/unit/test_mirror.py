"""Checkpoint mirroring (clusterlm.checkpoint.mirror): every committed checkpoint copied, verified and
pruned in the mirror; --train.resume=auto falls back to the mirror's newest valid copy."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from clusterlm.checkpoint.layout import read_latest, step_folders
from clusterlm.checkpoint.manager import Checkpointer
from clusterlm.checkpoint.store import verify_checkpoint
from clusterlm.config import CheckpointConfig


class Loader:
    def __init__(self) -> None:
        self.pos = 0

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def _run(root: Path, mirror: Path, steps: int, *, keep_last: int = 2, resume: str = "none") -> tuple:
    """A Checkpointer run saving after each of `steps` steps; returns (model, checkpointer)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = Checkpointer(root, CheckpointConfig(keep_last=keep_last, mirror=str(mirror)), config_toml="", resume=resume)
    loader = Loader()
    state = ckpt.load_into(model, opt, loader)
    for _ in range(steps):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        state.step += 1
        loader.pos += 2
        ckpt.save(state, model, opt, loader, reason="final" if state.step == steps else "periodic")
    return model, ckpt, state


def test_each_checkpoint_is_mirrored_and_pruned(tmp_path):
    """3 saves with keep_last=2: the mirror holds the same 2 newest step folders as the primary, each
    verifying against its manifest, byte-identical, and its `latest` names step 3."""
    root, mirror = tmp_path / "run" / "checkpoints", tmp_path / "mirror"
    _run(root, mirror, 3)
    assert [p.name for p in step_folders(mirror)] == [p.name for p in step_folders(root)] == \
        ["step-00000002", "step-00000003"]
    for p in step_folders(mirror):
        assert verify_checkpoint(p) == []
        assert (p / "model.safetensors").read_bytes() == (root / p.name / "model.safetensors").read_bytes()
    assert read_latest(mirror) == "step-00000003"
    assert not [p for p in mirror.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_resume_from_the_mirror_when_the_primary_is_deleted(tmp_path, caplog):
    """Primary checkpoints folder deleted: resume=auto loads the mirror's step 3 (weights, optimizer
    step, loader position) and says so in a warning."""
    root, mirror = tmp_path / "run" / "checkpoints", tmp_path / "mirror"
    model, _, _ = _run(root, mirror, 3)
    shutil.rmtree(root)
    with caplog.at_level(logging.WARNING):
        resumed, ckpt, state = _run(root, mirror, 0, resume="auto")
    assert state.step == 3 and ckpt.resolve() == mirror / "step-00000003"
    assert torch.equal(resumed.weight, model.weight)
    assert "taking the mirror's copy" in caplog.text and "has no valid checkpoint" in caplog.text


def test_corrupt_mirror_copy_is_skipped(tmp_path, caplog):
    """Primary deleted and the mirror's newest copy corrupted (one byte of its weights flipped): resume
    takes the mirror's previous copy, step 2, and names the corrupt one."""
    root, mirror = tmp_path / "run" / "checkpoints", tmp_path / "mirror"
    _run(root, mirror, 3)
    shutil.rmtree(root)
    f = mirror / "step-00000003" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        _, ckpt, state = _run(root, mirror, 0, resume="auto")
    assert state.step == 2 and ckpt.resolve() == mirror / "step-00000002"
    assert "skipping corrupt checkpoint" in caplog.text and "step-00000003" in caplog.text


def test_newer_mirror_copy_wins_over_an_older_primary(tmp_path):
    """Primary's newest checkpoint corrupt, mirror's intact: the mirror's step 3 beats the primary's step 2."""
    root, mirror = tmp_path / "run" / "checkpoints", tmp_path / "mirror"
    _run(root, mirror, 3)
    (root / "step-00000003" / "train_state.json").write_text("{}")
    _, ckpt, state = _run(root, mirror, 0, resume="auto")
    assert state.step == 3 and ckpt.resolve() == mirror / "step-00000003"


def test_failed_copy_does_not_stop_training(tmp_path, monkeypatch, caplog):
    """A copy that fails (the mirror's disk full) is a warning: the save returns, the primary is valid."""
    import clusterlm.checkpoint.mirror as m

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(m.shutil, "copytree", full)
    root, mirror = tmp_path / "run" / "checkpoints", tmp_path / "mirror"
    with caplog.at_level(logging.WARNING):
        _run(root, mirror, 2)
    assert [p.name for p in step_folders(root)] == ["step-00000001", "step-00000002"]
    assert step_folders(mirror) == [] and "No space left on device" in caplog.text
    assert not [p for p in mirror.iterdir() if p.name.startswith(".")]


def test_a_mirror_serves_one_run(tmp_path):
    """A mirror names the checkpoints folder it mirrors (`source`). A second run given the same mirror is
    refused at start-up, naming the first run's folder (a fresh run there with resume=auto took run A's
    newest copy as its own, and its copies pruned A's); run A itself resumes through it as before, and a
    mirror whose run is gone for good is taken over once its `source` is deleted."""
    import pytest

    from clusterlm.errors import ConfigError

    a, b, mirror = tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints", tmp_path / "mirror"
    _run(a, mirror, 3)
    assert (mirror / "source").read_text() == f"{a.resolve()}\n"
    before = sorted(p.name for p in mirror.iterdir())
    with pytest.raises(ConfigError, match=rf"checkpoint.mirror={mirror} mirrors the run whose checkpoints are in "
                                          rf"{a.resolve()} .* not {b.resolve()}: give each run its own mirror"):
        _run(b, mirror, 0, resume="auto")
    assert sorted(p.name for p in mirror.iterdir()) == before and not b.exists()
    shutil.rmtree(a)  # run A's primary lost: it resumes from the mirror, the same folder path as before
    _, ckpt, state = _run(a, mirror, 0, resume="auto")
    assert state.step == 3 and ckpt.resolve() == mirror / "step-00000003"
    (mirror / "source").unlink()
    _, _, state = _run(b, mirror, 0, resume="auto")
    assert state.step == 3
