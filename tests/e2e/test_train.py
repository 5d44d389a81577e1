"""Training end to end on a tiny corpus: resume bit-exactness, NaN handling, signals, corrupt checkpoints."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clusterlm.cli import EXIT_DIVERGED, EXIT_PREEMPTED
from clusterlm.config import load_run_config
from tests.helpers import train_losses

TEXT = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 8,
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n" * 8,
    "And by opposing end them. To die: to sleep;\nNo more; and by a sleep to say we end\n" * 8,
    "The heart-ache and the thousand natural shocks\nThat flesh is heir to, 'tis a consummation\n" * 8,
    "Devoutly to be wish'd. To die, to sleep;\nTo sleep: perchance to dream: ay, there's the rub;\n" * 8,
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from clusterlm.data.prepare import prepare

    root = tmp_path_factory.mktemp("corpus")
    for i, t in enumerate(TEXT * 4):
        (root / f"doc{i:02d}.txt").write_text(t + f"[{i}]\n")
    out = root / "data"
    prepare([str(root)], out, tokenizer="char", val_fraction=0.2)
    return out


def tiny_cfg(data_dir: Path, out: Path, *extra: str):
    return load_run_config(None, _cli_args(data_dir, out) + list(extra))




def test_a_data_dir_without_its_tokenizer_is_refused_before_training(data_dir, tmp_path):
    """Every checkpoint carries the data's tokenizer: a data dir that lost it is refused at once (it
    used to train every step and fail at the first save), and the run folder is not created."""
    import shutil

    from clusterlm.errors import DataError
    from clusterlm.train.loop import train

    broken = shutil.copytree(data_dir, tmp_path / "data")
    (broken / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="tokenizer.json is missing"):
        train(tiny_cfg(broken, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("refusal, needle, config_only", [
    (["--checkpoint.keep_best=true", "--data.val_fraction=0", "--checkpoint.interval=40"],
     "checkpoint.keep_best needs a validation loss, but data.val_fraction=0 would prepare", True),
    (["--train.seq_len=64"], "train.seq_len=64 exceeds model.max_seq_len=32", True),
    (["--train.global_batch_tokens=200"], "global_batch_tokens=200 is not divisible by micro_batch*seq_len*dp", True),
    (["--train.resume=none"], "already has checkpoints; resume with --train.resume=auto", True),
    (["--model.vocab_size=5"], "model.vocab_size=5 is smaller than the tokenizer's", False),
])
def test_a_refused_run_prepares_nothing_and_leaves_no_data_dir(tmp_path, monkeypatch, capsys, refusal, needle,
                                                                config_only):
    """Reference: the file system before the run. `clusterlm train` with data.source and a new data.dir:
    a refusal the config (or the run folder's checkpoints) can tell alone is exit 2 before anything is
    prepared (keep_best with data.val_fraction=0 used to tokenize and write NEW first); one that needs the
    prepared data (a model vocabulary smaller than the tokenizer's) removes the data.dir it made, with the
    parent made for it."""
    import clusterlm.data.prepare as prep
    from clusterlm.cli import main as cli
    from clusterlm.errors import EXIT_USAGE

    (tmp_path / "c.txt").write_text("".join(TEXT))
    out = tmp_path / "run"
    if "--train.resume=none" in refusal:  # an earlier run's step folder: refused without --train.resume
        (out / "checkpoints" / "step-00000002").mkdir(parents=True)
    calls = []
    real = prep.prepare
    monkeypatch.setattr(prep, "prepare", lambda *a, **k: calls.append(a) or real(*a, **k))
    args = ["train", f"--data.source={json.dumps(str(tmp_path / 'c.txt'))}",
            f"--data.dir={json.dumps(str(tmp_path / 'new' / 'data'))}", *_cli_args(tmp_path / "new" / "data", out)[1:],
            *refusal]
    assert cli(args) == EXIT_USAGE
    assert needle in capsys.readouterr().err.strip().splitlines()[-1]
    assert (calls == []) == config_only and not (tmp_path / "new").exists()
    assert out.exists() == ("--train.resume=none" in refusal)


def test_a_seq_len_over_the_context_says_what_would_fit(data_dir, tmp_path):
    """train.seq_len above model.max_seq_len: one line naming both and the values that would work
    (it named the two numbers only)."""
    from clusterlm.errors import ConfigError
    from clusterlm.train.loop import train

    with pytest.raises(ConfigError, match=r"train.seq_len=64 exceeds model.max_seq_len=32; set "
                                          r"--train.seq_len=32 or less, or a larger --model.max_seq_len"):
        train(tiny_cfg(data_dir, tmp_path / "run", "--train.seq_len=64"))


def test_resume_is_bit_exact(data_dir, tmp_path):
    """100 steps straight equal (as floats) 50 steps + resume to 100: model, optimizer, schedule, loader, RNG.
    (decay_steps is pinned so the cosine schedule does not depend on max_steps.)"""
    from clusterlm.train.loop import train

    straight = train(tiny_cfg(data_dir, tmp_path / "a", "--optim.decay_steps=90"))
    assert straight.exit_code == 0 and straight.step == 100
    first = train(tiny_cfg(data_dir, tmp_path / "b", "--optim.decay_steps=90", "--train.max_steps=50"))
    assert first.step == 50
    resumed = train(tiny_cfg(data_dir, tmp_path / "b", "--optim.decay_steps=90", "--train.resume=auto"))
    assert resumed.step == 100
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == list(range(1, 101))
    assert [a[s] for s in range(51, 101)] == [b[s] for s in range(51, 101)]
    assert a[100] < a[1]  # it learned something
    assert straight.final_val_loss == resumed.final_val_loss


def test_ema_checkpoints_hold_the_average_and_resume_bit_exact(data_dir, tmp_path):
    """optim.ema_decay: 100 steps straight equal 50 + resume to 100 (the step-50 checkpoint holds the
    average as its model and the trained weights in the optimizer state, swapped back on resume); the
    final model is the average (its val loss is the run's), not the trained weights."""
    from clusterlm.checkpoint.store import load_checkpoint
    from clusterlm.train.loop import train

    ema = ["--optim.decay_steps=90", "--optim.ema_decay=0.9"]
    straight = train(tiny_cfg(data_dir, tmp_path / "a", *ema))
    assert train(tiny_cfg(data_dir, tmp_path / "b", *ema, "--train.max_steps=50")).step == 50
    resumed = train(tiny_cfg(data_dir, tmp_path / "b", *ema, "--train.resume=auto"))
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert [a[s] for s in range(51, 101)] == [b[s] for s in range(51, 101)]
    assert straight.final_val_loss == resumed.final_val_loss

    ckpt = load_checkpoint(straight.checkpoint)
    states = ckpt.optimizer_state["state"].values()
    assert states and all("train_weights" in st and "ema" not in st for st in states)
    model = list(ckpt.model_state.values())
    for st in states:  # each trained tensor differs from the model's tensors of its shape (the averages)
        same_shape = [t for t in model if t.shape == st["train_weights"].shape]
        assert same_shape and not any(torch.equal(t, st["train_weights"]) for t in same_shape)


def test_layer_lr_decay_scales_each_group_and_a_regrouped_resume_is_refused(data_dir, tmp_path):
    """optim.layer_lr_decay=0.5 on the 2-layer model: the checkpoint's groups have lr = schedule x
    0.5 ** (3 - depth); resuming it with another decay that keeps the groups uses the new scales, one
    that regroups the parameters (1.0: two groups) is one CheckpointError naming the settings."""
    from clusterlm.checkpoint.store import load_checkpoint
    from clusterlm.config import load_run_config
    from clusterlm.errors import CheckpointError
    from clusterlm.train.loop import train
    from clusterlm.train.optim import lr_at

    run = tmp_path / "r"
    res = train(tiny_cfg(data_dir, run, "--optim.layer_lr_decay=0.5", "--train.max_steps=20"))
    groups = load_checkpoint(res.checkpoint).optimizer_state["param_groups"]
    last = lr_at(19, load_run_config(None, _cli_args(data_dir, run)).optim, 20)
    assert sorted(g["lr_scale"] for g in groups) == [0.125, 0.25, 0.25, 0.5, 0.5, 1.0]
    for g in groups:
        assert g["lr"] == pytest.approx(last * g["lr_scale"], rel=1e-12)
    res = train(tiny_cfg(data_dir, run, "--optim.layer_lr_decay=0.8", "--train.max_steps=21", "--train.resume=auto",
                         "--optim.weight_decay=0.03", "--optim.beta2=0.9", "--optim.eps=1e-6"))
    groups = load_checkpoint(res.checkpoint).optimizer_state["param_groups"]
    assert sorted(g["lr_scale"] for g in groups) == pytest.approx([0.512, 0.64, 0.64, 0.8, 0.8, 1.0])
    # the other settings the resume changed are the ones it trained with, as its config.toml says
    assert {g["weight_decay"] for g in groups} == {0.0, 0.03}
    assert all(tuple(g["betas"]) == (0.9, 0.9) and g["eps"] == 1e-6 for g in groups)
    with pytest.raises(CheckpointError, match=r"parameter groups of \[.*optim.layer_lr_decay \(1 or not\)"):
        train(tiny_cfg(data_dir, run, "--train.max_steps=22", "--train.resume=auto"))


def test_gradual_unfreezing_resumes_bit_exact_across_an_unfreeze(data_dir, tmp_path):
    """optim.unfreeze_every=30: 100 steps straight equal 50 + resume to 100 with groups unfrozen at 0,
    30, 60 and 90 (two of them after the resume); the checkpoint's groups carry their start steps,
    and the embeddings' group still has lr 0 in the step-50 checkpoint."""
    from clusterlm.checkpoint.store import load_checkpoint
    from clusterlm.train.loop import train

    unfreeze = ["--optim.decay_steps=90", "--optim.unfreeze_every=30"]
    straight = train(tiny_cfg(data_dir, tmp_path / "a", *unfreeze))
    half = train(tiny_cfg(data_dir, tmp_path / "b", *unfreeze, "--train.max_steps=50"))
    groups = load_checkpoint(half.checkpoint).optimizer_state["param_groups"]
    assert sorted({g["unfreeze_at"] for g in groups}) == [0, 30, 60, 90]
    assert all((g["lr"] == 0.0) == (g["unfreeze_at"] > 49) for g in groups)
    resumed = train(tiny_cfg(data_dir, tmp_path / "b", *unfreeze, "--train.resume=auto"))
    a, b = train_losses(tmp_path / "a"), train_losses(tmp_path / "b")
    assert [a[s] for s in range(51, 101)] == [b[s] for s in range(51, 101)]
    assert straight.final_val_loss == resumed.final_val_loss and a[100] < a[1]


def test_keep_best_keeps_the_lowest_val_loss_checkpoint_through_a_resume(data_dir, tmp_path):
    """checkpoint.keep_best with keep_last=1 and a save at every evaluation: the run keeps its final
    checkpoint and the one at its lowest val loss (metrics.jsonl's), named in checkpoints/best; a run
    stopped at step 30 and resumed to 60 ends with the same folders and pointer (the best loss so far
    is part of the resumed state). An interval that is not a multiple of eval_interval is refused."""
    from clusterlm.config import ConfigError
    from clusterlm.train.loop import train

    extra = ("--train.eval_interval=10", "--checkpoint.interval=10", "--checkpoint.keep_last=1",
             "--checkpoint.keep_best=true", "--optim.lr=2e-2", "--optim.decay_steps=60", "--train.max_steps=60")
    train(tiny_cfg(data_dir, tmp_path / "a", *extra))
    train(tiny_cfg(data_dir, tmp_path / "b", *extra, "--train.max_steps=30"))
    train(tiny_cfg(data_dir, tmp_path / "b", *extra, "--train.resume=auto"))
    evals = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["val_loss"], r["step"]) for r in evals if r["kind"] == "eval"]
    best = min(evals)[1]
    for run in ("a", "b"):
        ckpts = tmp_path / run / "checkpoints"
        assert sorted(p.name for p in ckpts.glob("step-*")) == sorted({f"step-{best:08d}", "step-00000060"})
        assert (ckpts / "best").read_text() == f"step-{best:08d}\n"
    with pytest.raises(ConfigError, match="checkpoint.interval=50 must be a multiple of train.eval_interval=40"):
        tiny_cfg(data_dir, tmp_path / "c", "--checkpoint.keep_best=true")


def _ckpt_reason(folder: Path) -> str:
    return json.loads((folder / "train_state.json").read_text())["reason"]


def test_a_signal_in_the_last_step_gets_its_final_evaluation_on_resume(data_dir, tmp_path, monkeypatch):
    """A stop signal that arrives during the last step saves "preempted" at step max_steps (exit 75) and
    skips the final evaluation; the requeued run used to find "nothing to train" and end without it for
    ever. Resumed, it now evaluates and saves "final" (exit 0), once: a further resume has nothing to do."""
    from clusterlm.train.loop import Trainer, train

    run, extra = tmp_path / "r", ("--train.max_steps=10", "--checkpoint.interval=50", "--train.eval_interval=40")
    real = Trainer.agree_stop
    monkeypatch.setattr(Trainer, "agree_stop", lambda self, stop: ("SIGTERM", False) if self.state.step == 10
                        else real(self, stop))
    stopped = train(tiny_cfg(data_dir, run, *extra))
    assert stopped.exit_code == EXIT_PREEMPTED and stopped.final_val_loss is None
    assert _ckpt_reason(run / "checkpoints" / "step-00000010") == "preempted"
    monkeypatch.setattr(Trainer, "agree_stop", real)
    done = train(tiny_cfg(data_dir, run, *extra, "--train.resume=auto"))
    assert done.exit_code == 0 and done.final_val_loss is not None and done.reason == "finished"
    assert _ckpt_reason(run / "checkpoints" / "step-00000010") == "final"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [10]
    again = train(tiny_cfg(data_dir, run, *extra, "--train.resume=auto"))
    assert again.reason.startswith("nothing to train")


def test_a_signal_as_the_time_runs_out_gets_its_final_evaluation_on_resume_without_a_step(data_dir, tmp_path,
                                                                                         monkeypatch):
    """The same with train.max_minutes spent instead of train.max_steps reached: the resumed run said "no step
    to train" but trained one more step past its time budget before it evaluated and saved; it now evaluates
    and saves "final" at the step the signal's checkpoint holds."""
    from clusterlm.train.loop import Trainer, train

    run, extra = tmp_path / "r", ("--train.max_steps=10", "--checkpoint.interval=50", "--train.eval_interval=40")
    real = Trainer.agree_stop
    monkeypatch.setattr(Trainer, "agree_stop", lambda self, stop: ("SIGTERM", False) if self.state.step == 4
                        else real(self, stop))
    assert train(tiny_cfg(data_dir, run, *extra)).exit_code == EXIT_PREEMPTED
    monkeypatch.setattr(Trainer, "agree_stop", real)
    spent = json.loads((run / "checkpoints" / "step-00000004" / "train_state.json").read_text())["run"]["train_seconds"]
    done = train(tiny_cfg(data_dir, run, *extra, "--train.resume=auto", f"--train.max_minutes={spent / 60 / 2}"))
    assert (done.exit_code, done.step) == (0, 4) and done.final_val_loss is not None
    assert done.reason.startswith("time limit")
    assert _ckpt_reason(run / "checkpoints" / "step-00000004") == "final"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if r["kind"] == "train") == 4
    assert [r["step"] for r in records if r["kind"] == "eval"] == [4]


def test_keep_best_pointer_follows_the_resume(data_dir, tmp_path):
    """checkpoints/best across resumes. Turned off on resume, the old pointer is removed (it used to stay
    in force, its folder kept past keep_last for ever). A branch resume from a checkpoint before the best
    (the later folders and the pointer are dropped) names the best folder up to its step again: with
    lr 1 the branch's evaluation is worse, and the run used to end with no best at all."""
    from clusterlm.checkpoint.layout import read_latest
    from clusterlm.train.loop import train

    best_on = ("--train.eval_interval=10", "--checkpoint.interval=10", "--checkpoint.keep_best=true",
               "--optim.lr=2e-2", "--optim.decay_steps=40")
    a = tmp_path / "a"
    train(tiny_cfg(data_dir, a, *best_on, "--checkpoint.keep_last=1", "--train.max_steps=20"))
    assert read_latest(a / "checkpoints", "best") is not None
    train(tiny_cfg(data_dir, a, "--train.eval_interval=10", "--checkpoint.interval=10", "--checkpoint.keep_last=1",
                   "--optim.lr=2e-2", "--optim.decay_steps=40", "--train.max_steps=30", "--train.resume=auto"))
    assert not (a / "checkpoints" / "best").exists()
    assert sorted(p.name for p in (a / "checkpoints").glob("step-*")) == ["step-00000030"]

    b = tmp_path / "b"
    train(tiny_cfg(data_dir, b, *best_on, "--checkpoint.keep_last=10", "--train.max_steps=40"))
    evals = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    up_to_20 = min((r["val_loss"], r["step"]) for r in evals if r["kind"] == "eval" and r["step"] <= 20)[1]
    assert read_latest(b / "checkpoints", "best") == "step-00000040"  # lr decays: the last is the best here
    train(tiny_cfg(data_dir, b, *best_on, "--checkpoint.keep_last=10", "--train.max_steps=30", "--optim.lr=1",
                   "--train.resume=" + json.dumps(str(b / "checkpoints" / "step-00000020"))))
    branch = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in branch if r["kind"] == "eval" and r["step"] == 30][0] > min(
        r["val_loss"] for r in evals if r["kind"] == "eval" and r["step"] <= 20)
    assert read_latest(b / "checkpoints", "best") == f"step-{up_to_20:08d}"
    assert (b / "checkpoints" / f"step-{up_to_20:08d}").is_dir() and not (b / "checkpoints" / "step-00000040").exists()


def test_an_out_dir_that_is_a_file_is_refused_at_once(data_dir, tmp_path):
    """train.out_dir naming a file, or a folder under one: one line naming it, before the data, the
    model or the checkpointer are set up (it was "[Errno 17] File exists" after all of that); the
    file is untouched. A prepared data directory is refused too (a run there was accepted)."""
    from clusterlm.errors import ConfigError
    from clusterlm.train.loop import train

    (tmp_path / "f").write_text("mine")
    for out in (tmp_path / "f", tmp_path / "f" / "run"):
        with pytest.raises(ConfigError, match=f"train.out_dir='{out}': {tmp_path / 'f'} is a file; give the run"):
            train(tiny_cfg(tmp_path / "no_data_here", out))
    assert (tmp_path / "f").read_text() == "mine"
    # nor the data directory itself: re-preparing it with --overwrite would delete the checkpoints
    before = sorted(p.name for p in data_dir.iterdir())
    with pytest.raises(ConfigError, match=f"train.out_dir='{data_dir}' is a prepared data directory"):
        train(tiny_cfg(data_dir, data_dir))
    assert sorted(p.name for p in data_dir.iterdir()) == before


def test_an_out_dir_inside_a_checkpoint_or_checkpoints_folder_is_refused(data_dir, tmp_path):
    """Reference: the rule docs/checkpoints.md gives export, convert, quantize, prune and ensemble's --out.
    A run whose train.out_dir is a step folder (or inside one) overwrote that checkpoint's config.toml, so
    the checkpoint failed verification, and the run exited 0; one whose out_dir is a checkpoints folder
    nested its own checkpoints/ there (which `eval RUN/checkpoints` then took instead of the run's). Now
    ConfigError naming the folder before anything is written; the checkpoints stay as they were."""
    from clusterlm.checkpoint.store import verify_checkpoint
    from clusterlm.errors import ConfigError
    from clusterlm.train.loop import train

    run = tmp_path / "run"
    assert train(tiny_cfg(data_dir, run, "--train.max_steps=2", "--checkpoint.interval=1")).exit_code == 0
    ckpts = run / "checkpoints"
    before = {p: sorted(q.name for q in p.iterdir()) for p in (ckpts, ckpts / "step-00000002")}
    for out, where in [(ckpts / "step-00000002", "the checkpoint"), (ckpts / "step-00000002" / "sub", "the checkpoint"),
                       (ckpts, "the checkpoints folder"), (ckpts / "other", "the checkpoints folder")]:
        with pytest.raises(ConfigError, match=f"--train.out_dir {out} is inside {where} .*; choose a run folder "
                                              f"outside {ckpts}$"):
            train(tiny_cfg(data_dir, out, "--train.max_steps=2", "--train.resume=auto"))
    assert {p: sorted(q.name for q in p.iterdir()) for p in before} == before
    assert verify_checkpoint(ckpts / "step-00000002") == []


def test_existing_run_without_resume_is_refused(data_dir, tmp_path):
    """A second run into the same out_dir must say how to resume instead of overwriting checkpoints."""
    from clusterlm.errors import ConfigError
    from clusterlm.train.loop import train

    train(tiny_cfg(data_dir, tmp_path / "r", "--train.max_steps=5"))
    with pytest.raises(ConfigError, match="resume=auto"):
        train(tiny_cfg(data_dir, tmp_path / "r", "--train.max_steps=5"))


def test_fresh_start_over_an_earlier_log_keeps_it_aside(data_dir, tmp_path, caplog):
    """A run folder whose checkpoints are gone (deleted, or a run killed before its first save) but whose
    metrics.jsonl is not: a fresh start there keeps that log whole as metrics.jsonl.old-STAMP (it used to drop its
    steps > 0 saying "(resuming)") and writes its own steps 1..5 once to metrics.jsonl."""
    from clusterlm.train.loop import train

    run = tmp_path / "f"
    import shutil

    train(tiny_cfg(data_dir, run, "--train.max_steps=5"))
    shutil.rmtree(run / "checkpoints")
    earlier = (run / "metrics.jsonl").read_text()
    with caplog.at_level("INFO"):
        train(tiny_cfg(data_dir, run, "--train.max_steps=5"))
    [aside] = run.glob("metrics.jsonl.old-*")
    assert aside.read_text() == earlier
    assert "starting fresh" in caplog.text and "resuming" not in caplog.text
    assert sorted(train_losses(run)) == [1, 2, 3, 4, 5]
    steps = [json.loads(x).get("step") for x in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(x).get("kind") == "train"]
    assert steps == [1, 2, 3, 4, 5]


def test_nan_skips_step_and_stops_after_limit(data_dir, tmp_path, monkeypatch):
    """An injected NaN loss skips the optimizer step (weights unchanged) and is counted; N in a row stop
    the run with EXIT_DIVERGED after saving the last good state."""
    import torch

    import clusterlm.eval.metrics as m
    from clusterlm.checkpoint.store import load_checkpoint, resolve_checkpoint
    from clusterlm.train.loop import train

    real = m.lm_loss
    calls = {"n": 0}
    bad = {7, 8} | set(range(39, 100))  # micro-batch calls, 2 per step: step 4 is bad, then steps 20+

    def flaky(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] in bad else loss

    monkeypatch.setattr(m, "lm_loss", flaky)
    res = train(tiny_cfg(data_dir, tmp_path / "n", "--train.max_bad_steps=3"))
    assert res.exit_code == EXIT_DIVERGED
    assert res.step == 22  # steps 20, 21, 22 bad in a row -> stop
    recs = [json.loads(x) for x in (tmp_path / "n" / "metrics.jsonl").read_text().splitlines()]
    skipped = [r["step"] for r in recs if r.get("kind") == "train" and r["skipped"]]
    assert skipped == [4, 20, 21, 22]
    ck = load_checkpoint(resolve_checkpoint(str(tmp_path / "n")))
    assert ck.step == 22 and ck.train_state["run"]["bad_steps_total"] == 4
    assert all(torch.isfinite(t).all() for t in ck.model_state.values())


def test_corrupt_newest_checkpoint_falls_back(data_dir, tmp_path, caplog):
    """resume=auto skips a checkpoint whose hashes fail and resumes from the previous one."""
    from clusterlm.train.loop import train

    run = tmp_path / "c"
    train(tiny_cfg(data_dir, run, "--train.max_steps=100"))
    newest = run / "checkpoints" / "step-00000100" / "model.safetensors"
    raw = bytearray(newest.read_bytes())
    raw[-5] ^= 0xFF
    newest.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        res = train(tiny_cfg(data_dir, run, "--train.resume=auto", "--train.max_steps=100"))
    assert "step-00000100" in caplog.text
    assert res.step == 100
    assert (run / "checkpoints" / "step-00000050").exists()


def test_sigterm_saves_and_resume_continues_identically(data_dir, tmp_path):
    """SIGTERM mid-run (CLI in a subprocess): the step finishes, a checkpoint is saved, exit code 75;
    resuming gives the same per-step losses as an uninterrupted run (constant lr after warmup, so the
    schedule does not depend on max_steps)."""
    from clusterlm.train.loop import train

    common = ["--optim.schedule=constant", "--model.n_layers=4", "--model.dim=64"]
    run = tmp_path / "sig"
    cfg_args = [a for a in _cli_args(data_dir, run)] + common + ["--train.max_steps=5000"]
    proc = subprocess.Popen([sys.executable, "-m", "clusterlm", "train", *cfg_args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 15:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    stopped_at = max(train_losses(run))
    assert 15 <= stopped_at < 5000
    assert (run / "checkpoints" / f"step-{stopped_at:08d}").is_dir()
    end = stopped_at + 10
    res = train(tiny_cfg(data_dir, run, *common, f"--train.max_steps={end}", "--train.resume=auto"))
    assert res.step == end
    ref = tmp_path / "ref"
    train(tiny_cfg(data_dir, ref, *common, f"--train.max_steps={end}"))
    a, b = train_losses(ref), train_losses(run)
    assert [a[s] for s in range(1, end + 1)] == [b[s] for s in range(1, end + 1)]


def _cli_args(data_dir: Path, run: Path) -> list[str]:
    return ["--data.dir=" + json.dumps(str(data_dir)), "--train.out_dir=" + json.dumps(str(run)),
            "--model.n_layers=2", "--model.dim=32", "--model.n_heads=2", "--model.max_seq_len=32",
            "--model.dropout=0.1", "--train.seq_len=32", "--train.micro_batch_size=4",
            "--train.global_batch_tokens=256", "--train.max_steps=100", "--train.device=cpu",
            "--train.eval_interval=40", "--train.eval_batches=2", "--train.log_interval=25",
            "--train.tensorboard=false", "--checkpoint.interval=50", "--checkpoint.keep_last=5",
            "--optim.warmup_steps=10", "--optim.lr=3e-3",
            # one intra-op thread: in-process and subprocess runs use the same kernels whatever
            # thread count earlier tests left behind, so float results compare bit for bit
            "--train.threads=1"]


def test_mfu_uses_the_probed_peak(data_dir, tmp_path, caplog):
    """With train.probe_spec, MFU = tokens/s * FLOPs/token / the spec's measured fp32 matmul rate
    (a CPU has no cited peak), and the start-up line shows that rate (a 2-core CPU's 0.0346 TFLOP/s
    was printed as "peak 0.0 TFLOP/s"); without it, MFU on CPU is unknown (null), never an assumed A100."""
    import logging

    from clusterlm.train.loop import train
    from clusterlm.train.metrics import flops_per_token

    spec = tmp_path / "node.toml"
    spec.write_text('name = "n"\n[[node_types]]\nname = "n"\ncount = 1\n[node_types.device]\nname = "cpu"\n'
                    'kind = "cpu"\ncount = 1\n[node_types.device.measured_tflops]\nfp32 = 0.0346\n')
    cfg = tiny_cfg(data_dir, tmp_path / "m", "--train.max_steps=5", f"--train.probe_spec={json.dumps(str(spec))}")
    with caplog.at_level(logging.INFO, logger="clusterlm"):
        train(cfg)
    assert "peak 0.0346 TFLOP/s" in caplog.text
    recs = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    fpt = flops_per_token(cfg.model.with_vocab(json.loads((data_dir / "meta.json").read_text())["tokenizer"]
                                               ["vocab_size"]), cfg.train.seq_len)["total"]
    for r in (r for r in recs if r["kind"] == "train"):
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / 0.0346e12)
    train(tiny_cfg(data_dir, tmp_path / "u", "--train.max_steps=2"))
    recs = [json.loads(x) for x in (tmp_path / "u" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mfu"] is None for r in recs if r["kind"] == "train")


def test_mfu_of_fp16_autocast_is_against_the_fp16_peak(data_dir, tmp_path, monkeypatch):
    """train.dtype=fp16 (a V100: 125 fp16 TFLOP/s, 15.7 fp32) is measured against the fp16 peak, as the
    planner predicts it; it was measured against the fp32/TF32 peak (8x the MFU on a V100). fp16 autocast
    needs CUDA, so this CPU run gets it from a patched autocast_dtype, and the peaks from a probe spec."""
    import clusterlm.train.loop as loop
    from clusterlm.train.metrics import flops_per_token

    monkeypatch.setattr(loop, "autocast_dtype", lambda dtype, device, what="train.dtype": torch.float16)
    spec = tmp_path / "node.toml"
    spec.write_text('name = "n"\n[[node_types]]\nname = "n"\ncount = 1\n[node_types.device]\nname = "cpu"\n'
                    'kind = "cpu"\ncount = 1\n[node_types.device.measured_tflops]\nfp32 = 0.0157\nfp16 = 0.125\n')
    cfg = tiny_cfg(data_dir, tmp_path / "m", "--train.max_steps=2", f"--train.probe_spec={json.dumps(str(spec))}")
    loop.train(cfg)
    recs = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    fpt = flops_per_token(cfg.model.with_vocab(json.loads((data_dir / "meta.json").read_text())["tokenizer"]
                                               ["vocab_size"]), cfg.train.seq_len)["total"]
    steps = [r for r in recs if r["kind"] == "train"]
    assert steps and all(r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / 0.125e12) for r in steps)


def test_fp16_scales_the_loss_backs_off_on_overflow_and_resumes_with_its_scale(data_dir, tmp_path, monkeypatch):
    """train.dtype=fp16 trains with dynamic loss scaling (train/amp.py; fp16 autocast on CPU from a
    patched autocast_dtype, as above). Started at 2^28 the scaled gradients overflow fp16: each such
    step is skipped and halves the scale, and none counts as a bad step (there are more of them in a
    row than max_bad_steps=5 allows); then the run trains. The scale is in the checkpoint: 6 steps
    straight equal 3 + a resume to 6, scales included. Before, fp16 trained unscaled (no GradScaler)."""
    import clusterlm.train.amp as amp
    import clusterlm.train.loop as loop

    monkeypatch.setattr(loop, "autocast_dtype", lambda dtype, device, what="train.dtype": torch.float16)
    monkeypatch.setattr(amp, "INIT_SCALE", 2.0**28)

    def run(out: Path, *extra: str):
        return loop.train(tiny_cfg(data_dir, out, "--optim.decay_steps=20", "--train.max_steps=14", *extra))

    def steps(out: Path) -> list[dict]:
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [r for r in recs if r["kind"] == "train"]

    straight = run(tmp_path / "a")
    assert straight.exit_code == 0 and straight.step == 14
    recs = steps(tmp_path / "a")
    skipped = [r["step"] for r in recs if r["skipped"]]
    assert skipped[:6] == [1, 2, 3, 4, 5, 6] and len(recs) - len(skipped) >= 3  # overflows first, then it trains
    scale = 2.0**28
    for r in recs:  # each overflow halves the scale (logged after the step); a finite step keeps it
        scale = scale / 2 if r["skipped"] else scale
        assert r["loss_scale"] == scale and (r["skipped"] or math.isfinite(r["grad_norm"]))
    state = json.loads(next((tmp_path / "a" / "checkpoints").glob("step-*/train_state.json")).read_text())["run"]
    assert state["overflow_steps"] == len(skipped) and state["bad_steps_total"] == 0

    first = run(tmp_path / "b", "--train.max_steps=10")
    assert first.step == 10
    resumed = run(tmp_path / "b", "--train.resume=auto")
    assert resumed.step == 14
    a, b = steps(tmp_path / "a"), steps(tmp_path / "b")
    assert [(r["loss"], r["loss_scale"]) for r in a] == [(r["loss"], r["loss_scale"]) for r in b]


def test_fp16_a_bad_step_restarts_the_loss_scales_finite_streak(data_dir, tmp_path, monkeypatch):
    """The scale doubles after GROWTH_INTERVAL finite steps in a row (GradScaler's rule, docs/training.md); a
    bad step (an injected NaN loss) between them did not restart the count, so the scale doubled one step
    early. With GROWTH_INTERVAL=3 and step 2 bad, the scale doubles after step 5 (steps 3-5), not step 4."""
    import clusterlm.eval.metrics as m
    import clusterlm.train.amp as amp
    import clusterlm.train.loop as loop

    monkeypatch.setattr(loop, "autocast_dtype", lambda dtype, device, what="train.dtype": torch.float16)
    monkeypatch.setattr(amp, "INIT_SCALE", 4.0)
    monkeypatch.setattr(amp, "GROWTH_INTERVAL", 3)
    real, calls = m.lm_loss, {"n": 0}

    def flaky(logits, targets, **kw):  # 2 micro-batches a step: step 2 is bad
        calls["n"] += 1
        loss = real(logits, targets, **kw)
        return loss * float("nan") if calls["n"] in (3, 4) else loss

    monkeypatch.setattr(m, "lm_loss", flaky)
    out = tmp_path / "s"
    assert loop.train(tiny_cfg(data_dir, out, "--train.max_steps=6")).exit_code == 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    assert [r["step"] for r in train if r["skipped"]] == [2]
    assert [r["loss_scale"] for r in train] == [4.0, 4.0, 4.0, 4.0, 8.0, 8.0]


def test_report_pairs_the_plans_predictions_with_the_measured_figures(data_dir, tmp_path):
    """A run with a [plan] section (clusterlm plan --out) logs the planned step time and memory under the names
    of the fields they predict, so the report's predicted-vs-measured table has a measured column: the median
    step_time_s and the peak cpu_peak_rss_bytes of the same log. They were logged as predicted_step_s and
    predicted_memory_bytes, which no field matched: both rows said measured '?'."""
    from clusterlm.train.loop import train
    from clusterlm.train.report import summarize

    run = tmp_path / "p"
    train(tiny_cfg(data_dir, run, "--train.max_steps=4", "--train.log_interval=2", "--plan.predicted_step_s=0.05",
                   "--plan.predicted_memory_bytes=400000000", "--plan.predicted_tokens_per_s=20000"))
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = sorted(r["step_time_s"] for r in recs if r["kind"] == "train")
    peak = max(r["cpu_peak_rss_bytes"] for r in recs if "cpu_peak_rss_bytes" in r)
    rows = {r["field"]: r for r in summarize(recs)["predicted_vs_measured"]}
    assert set(rows) == {"step_time_s", "cpu_peak_rss_bytes", "tokens_per_s"}  # tokens_per_s was never logged
    tps = sorted(r["tokens_per_s"] for r in recs if r["kind"] == "train")
    assert rows["tokens_per_s"]["predicted"] == 20000
    assert rows["tokens_per_s"]["measured"] == pytest.approx((tps[1] + tps[2]) / 2)
    assert rows["step_time_s"]["predicted"] == 0.05
    assert rows["step_time_s"]["measured"] == pytest.approx((steps[1] + steps[2]) / 2)  # median of 4
    assert rows["step_time_s"]["ratio"] == pytest.approx(rows["step_time_s"]["measured"] / 0.05)
    assert rows["cpu_peak_rss_bytes"]["predicted"] == 4e8 and rows["cpu_peak_rss_bytes"]["measured"] == peak
