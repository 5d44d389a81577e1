"""Issue 12, training side: a memory check before allocating (3), one-line errors for a full disk and
for resuming into another model or tokenizer (8), all checkpoints corrupt under resume=auto (9).

Run: .venv/bin/python -m pytest -q tests/e2e/test_train_hardening.py
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusterlm.config import load_run_config
from clusterlm.errors import EXIT_IO, EXIT_USAGE, CheckpointError, ConfigError

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 12


def _prepare(root: Path, text: str, name: str) -> Path:
    from clusterlm.data.prepare import prepare

    src = root / f"{name}-src"
    src.mkdir()
    for i in range(10):
        (src / f"doc{i}.txt").write_text(text + f"[{i}] 0123456789\n")  # every digit in every split
    prepare([str(src)], root / name, tokenizer="char", val_fraction=0.2)
    return root / name


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """Three char data dirs: the base text, a text with more distinct characters (larger vocabulary),
    and its rot13 image (the same vocabulary size, other characters: other token meanings)."""
    root = tmp_path_factory.mktemp("corpora")
    return {"base": _prepare(root, TEXT, "base"),
            "wider": _prepare(root, TEXT + "QXZJ 0123456789\n", "wider"),
            "rot13": _prepare(root, codecs.encode(TEXT, "rot13"), "rot13")}


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data.dir=" + json.dumps(str(data)), "--train.out_dir=" + json.dumps(str(out)),
            "--model.n_layers=1", "--model.dim=32", "--model.n_heads=2", "--model.max_seq_len=32",
            "--train.seq_len=32", "--train.micro_batch_size=2", "--train.max_steps=4", "--train.device=cpu",
            "--train.eval_batches=1", "--train.tensorboard=false", "--checkpoint.interval=2",
            "--checkpoint.keep_last=5", "--train.threads=1", *extra]


def _cfg(data: Path, out: Path, *extra: str):
    return load_run_config(None, _args(data, out, *extra))


def _visible_and_latest(ckpt_root: Path) -> tuple[list[str], str]:
    return sorted(p.name for p in ckpt_root.iterdir()), (ckpt_root / "latest").read_text().strip()


# ---- 3: memory check ------------------------------------------------------------------------------
def test_memory_check_refuses_with_both_numbers():
    """check_memory compares the planner's bytes with the available bytes and names both, in GiB."""
    from clusterlm.cluster.memory import GIB
    from clusterlm.models.config import ModelConfig
    from clusterlm.parallel.dims import ParallelDims
    from clusterlm.train.memcheck import check_memory, predicted_peak_bytes

    import torch

    cpu = torch.device("cpu")
    with pytest.raises(ConfigError) as e:
        check_memory(5 * GIB, cpu, available=1 * GIB, source="a test")
    msg = str(e.value)
    assert "needs about 5.00 GiB" in msg and "only 1.00 GiB is available (a test)" in msg
    assert "--train.skip_memory_check=true" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"2 processes x 3\.00 GiB"):  # CPU ranks of one node share its RAM
        check_memory(3 * GIB, cpu, processes_per_pool=2, available=5 * GIB)
    check_memory(3 * GIB, cpu, available=3 * GIB)  # fits exactly: no refusal

    tiny = ModelConfig(n_layers=1, dim=32, n_heads=2, max_seq_len=32, vocab_size=40)
    need = predicted_peak_bytes(tiny, ParallelDims(), micro_batch=2, seq_len=32, dtype="fp32")
    assert 16 * tiny.num_params() < need < 4 * 1024**2  # model state (16 B/param) plus activations
    with pytest.raises(ConfigError, match=r"only 0\.00 GiB is available"):
        check_memory(need, cpu, available=1000)


def test_train_refuses_before_building_when_memory_is_short(corpora, tmp_path, monkeypatch):
    """A small model with a tiny (injected) available figure is refused with both numbers before any
    model is built or the run directory is written."""
    import clusterlm.parallel.parallelize as par
    import clusterlm.train.memcheck as mc
    from clusterlm.train.loop import train

    monkeypatch.setattr(mc, "available_memory", lambda device: (1000, "injected"))
    monkeypatch.setattr(par, "build_parallel_model", _must_not_build)
    with pytest.raises(ConfigError, match=r"needs about 0\.\d\d GiB .* only 0\.00 GiB is available \(injected\)"):
        train(_cfg(corpora["base"], tmp_path / "r"))
    assert not (tmp_path / "r").exists()


class _Built(Exception):
    pass


def _must_not_build(*args, **kwargs):
    raise _Built("the model was about to be built")


def test_llama70b_refused_fast_by_the_cli(corpora, tmp_path):
    """`--model.preset=llama-70b` (about 1 TiB of training state on one process) exits 2 within seconds
    with one line holding the predicted and the available memory, instead of exit 137 after 20 s."""
    out = tmp_path / "big"
    args = ["--data.dir=" + json.dumps(str(corpora["base"])), "--train.out_dir=" + json.dumps(str(out)),
            "--model.preset=llama-70b", "--train.seq_len=32", "--train.micro_batch_size=1", "--train.device=cpu"]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "clusterlm", "train", *args], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == EXIT_USAGE, proc.stderr[-2000:]
    assert time.time() - t0 < 60
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("clusterlm train: error: the run needs about")
    assert last.count("GiB") >= 2 and "is available" in last, last
    assert not out.exists()


def test_skip_memory_check_lets_a_run_past_the_check(corpora, tmp_path, monkeypatch):
    """With --train.skip_memory_check=true the same llama-70b run gets past the check to the model
    build (stopped there by a stub: nothing is allocated); without it, the check refuses first."""
    import clusterlm.parallel.parallelize as par
    from clusterlm.train.loop import train

    monkeypatch.setattr(par, "build_parallel_model", _must_not_build)
    big = ["--model.preset=llama-70b", "--model.n_layers=80", "--model.n_heads=64", "--model.dim=8192"]
    with pytest.raises(ConfigError, match="is available"):
        train(_cfg(corpora["base"], tmp_path / "a", *big))
    with pytest.raises(_Built):
        train(_cfg(corpora["base"], tmp_path / "b", *big, "--train.skip_memory_check=true"))


# ---- 8: resume into another model or tokenizer ----------------------------------------------------
def test_resume_with_another_dim_names_both_values(corpora, tmp_path, monkeypatch):
    """Resuming with model.dim=64 a run saved at 32 was a load_state_dict size-mismatch traceback;
    now one line with both values and what to do, before the model is built; the checkpoints are
    untouched."""
    import clusterlm.parallel.parallelize as par
    from clusterlm.train.loop import train

    run = tmp_path / "r"
    train(_cfg(corpora["base"], run))
    before = _visible_and_latest(run / "checkpoints")
    monkeypatch.setattr(par, "build_parallel_model", _must_not_build)
    with pytest.raises(CheckpointError) as e:
        train(_cfg(corpora["base"], run, "--model.dim=64", "--train.resume=auto", "--train.max_steps=8"))
    msg = str(e.value)
    assert "step-00000004 has model.dim=32 but the run asks for model.dim=64" in msg
    assert "--model.dim=32" in msg and "--train.out_dir" in msg and "\n" not in msg
    assert _visible_and_latest(run / "checkpoints") == before


def test_resume_with_another_vocabulary_or_tokenizer(corpora, tmp_path):
    """A data dir with a larger vocabulary names both sizes and both data dirs; one with the same size
    but other characters (rot13) would have trained silently on ids that mean other text: refused."""
    from clusterlm.train.loop import train

    run = tmp_path / "r"
    train(_cfg(corpora["base"], run))
    with pytest.raises(CheckpointError) as e:
        train(_cfg(corpora["wider"], run, "--train.resume=auto", "--train.max_steps=8"))
    msg = str(e.value)
    assert "model.vocab_size=" in msg and str(corpora["wider"]) in msg and str(corpora["base"]) in msg
    with pytest.raises(CheckpointError, match=r"another tokenizer \(char, vocab \d+\) than the one of .*rot13"):
        train(_cfg(corpora["rot13"], run, "--train.resume=auto", "--train.max_steps=8"))
    res = train(_cfg(corpora["base"], run, "--train.resume=auto", "--train.max_steps=6"))  # the right data
    assert res.step == 6


def test_inference_on_a_checkpoint_whose_files_disagree(corpora, tmp_path):
    """eval/generate/serve load through load_for_inference: a config.toml that does not describe
    model.safetensors (edited, or copied from another run) is one line with the tensor and both shapes."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.checkpoint.store import MANIFEST, write_manifest
    from clusterlm.train.loop import train

    run = tmp_path / "r"
    train(_cfg(corpora["base"], run, "--train.max_steps=2"))
    step = run / "checkpoints" / "step-00000002"
    cfg = step / "config.toml"
    cfg.write_text(cfg.read_text().replace("dim = 32", "dim = 48"))
    (step / MANIFEST).unlink()
    write_manifest(step, 2)  # the files verify; they just disagree
    with pytest.raises(CheckpointError, match=r"tensor \S+ has shape \[\d+, 32\] but the model built from its "
                                              r"config.toml needs \[\d+, 48\]"):
        load_for_inference(run)


# ---- 8: a full disk -------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A real tmpfs (8 MiB until `shrink` is called); needs root. Unmounted in the end."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {proc.stderr.strip()}")

    def shrink(free_bytes: int) -> None:
        st = os.statvfs(mnt)
        used = (st.f_blocks - st.f_bfree) * st.f_frsize
        size_k = (used + free_bytes) // 1024 + 4
        subprocess.run(["mount", "-o", f"remount,size={size_k}k", str(mnt)], check=True)

    try:
        yield mnt, shrink
    finally:
        with contextlib.suppress(Exception):
            subprocess.run(["umount", str(mnt)], check=False)


def test_checkpoint_save_on_a_full_disk_is_exit_74_and_keeps_the_last_one(corpora, tmp_path, small_disk, capsys):
    """A save that runs out of space (a real small tmpfs) was a SafetensorError traceback, exit 1. Now:
    exit 74 (EXIT_IO), one line with the OS's words and the path, no step folder without its manifest,
    no hidden partial folder, `latest` unchanged and the previous checkpoint still verifies."""
    from clusterlm.checkpoint.store import verify_checkpoint
    from clusterlm.cli import main

    mnt, shrink = small_disk
    first = tmp_path / "first"
    from clusterlm.train.loop import train

    train(_cfg(corpora["base"], first, "--checkpoint.interval=0"))
    shutil.copytree(first, mnt / "run")
    shrink(48 * 1024)  # room for logs, not for another checkpoint (about 200 KB)
    code = main(["train", *_args(corpora["base"], mnt / "run", "--checkpoint.interval=0", "--train.resume=auto",
                                 "--train.max_steps=6")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_IO, err[-20:]
    assert err[-1].startswith("clusterlm train: error: No space left on device: ") and str(mnt) in err[-1]
    assert not any("Traceback" in line for line in err)
    names, latest = _visible_and_latest(mnt / "run" / "checkpoints")
    assert names == ["latest", "step-00000004"] and latest == "step-00000004"
    assert verify_checkpoint(mnt / "run" / "checkpoints" / "step-00000004") == []


def test_save_checkpoint_on_a_full_disk_names_the_file(small_disk):
    """save_checkpoint itself: an OSError with errno 28 naming the file being written (not safetensors'
    unnamed "I/O error"), nothing left in the checkpoints folder."""
    import errno

    import torch

    from clusterlm.checkpoint.store import save_checkpoint

    mnt, shrink = small_disk
    root = mnt / "checkpoints"
    root.mkdir()
    shrink(16 * 1024)
    with pytest.raises(OSError) as e:
        save_checkpoint(root, 1, model_state={"w": torch.zeros(100_000)}, optimizer_state=None, train_state={},
                        config_toml="")
    assert e.value.errno == errno.ENOSPC and e.value.filename and "model.safetensors" in e.value.filename
    assert list(root.iterdir()) == []


# ---- 9: every checkpoint corrupt ---------------------------------------------------------------------
def test_all_checkpoints_corrupt_under_resume_auto(corpora, tmp_path):
    """resume=auto with every checkpoint failing verification said "resume with --train.resume=auto",
    which was already given. Now: how many failed, one line why for each, how to start fresh."""
    from clusterlm.train.loop import train

    run = tmp_path / "r"
    train(_cfg(corpora["base"], run))
    ckpts = run / "checkpoints"
    (ckpts / "step-00000002" / "manifest.json").unlink()
    raw = bytearray((ckpts / "step-00000004" / "model.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (ckpts / "step-00000004" / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as e:
        train(_cfg(corpora["base"], run, "--train.resume=auto", "--train.max_steps=6"))
    msg = str(e.value)
    lines = msg.splitlines()
    assert "all 2 checkpoints" in lines[0] and "failed verification" in lines[0]
    assert any(line.strip().startswith("step-00000004: model.safetensors sha256") for line in lines)
    assert any(line.strip().startswith("step-00000002: manifest.json is missing") for line in lines)
    assert "another --train.out_dir" in lines[-1]
    assert "resume with --train.resume=auto" not in msg


# ---- the same class elsewhere -------------------------------------------------------------------------
def test_resume_from_weights_only_checkpoint_is_one_line(corpora, tmp_path):
    """A checkpoint with weights only (as convert, quantize and prune write) resumed with
    --train.resume=PATH was a KeyError traceback ('loader'); now one line saying why and what to do."""
    from clusterlm.checkpoint.store import load_checkpoint, resolve_checkpoint, save_checkpoint
    from clusterlm.train.loop import train

    run = tmp_path / "r"
    train(_cfg(corpora["base"], run, "--train.max_steps=2"))
    ck = load_checkpoint(resolve_checkpoint(run))
    save_checkpoint(tmp_path / "w" / "checkpoints", 0, model_state=ck.model_state, optimizer_state=None,
                    train_state={"step": 0, "converted_from": "x"}, config_toml=ck.config_toml,
                    tokenizer_path=ck.tokenizer_path)
    with pytest.raises(CheckpointError, match=r"holds weights without the training state a resume needs"):
        train(_cfg(corpora["base"], tmp_path / "new", f"--train.resume={json.dumps(str(tmp_path / 'w'))}"))


def test_resume_from_a_pruned_checkpoint_says_weights_only_not_the_shape(corpora, tmp_path):
    """`prune --method structured` writes weights only with fewer heads: resuming it named
    model.n_heads and suggested --model.n_heads=1, after which the run failed on being weights-only;
    the weights-only line comes first, so the advice given is one that can work."""
    from clusterlm.checkpoint.store import load_checkpoint, resolve_checkpoint, save_checkpoint
    from clusterlm.train.loop import train

    run = tmp_path / "r"
    train(_cfg(corpora["base"], run, "--train.max_steps=2"))
    ck = load_checkpoint(resolve_checkpoint(run))
    narrower = ck.config_toml.replace("n_heads = 2", "n_heads = 1")
    assert narrower != ck.config_toml
    save_checkpoint(tmp_path / "p" / "checkpoints", 2, model_state=ck.model_state, optimizer_state=None,
                    train_state={"step": 2, "pruning": {}}, config_toml=narrower, tokenizer_path=ck.tokenizer_path)
    with pytest.raises(CheckpointError, match=r"holds weights without the training state") as e:
        train(_cfg(corpora["base"], tmp_path / "new", f"--train.resume={json.dumps(str(tmp_path / 'p'))}"))
    assert "n_heads" not in str(e.value)


def test_resume_with_another_seq_len_names_the_checkpoint_and_the_value(corpora, tmp_path):
    """--train.resume=auto with another --train.seq_len was refused as "loader state seq_len: saved 32,
    current 16" without the checkpoint or the option that would resume; both are named now."""
    from clusterlm.train.loop import train

    run = tmp_path / "r"
    train(_cfg(corpora["base"], run, "--train.max_steps=2"))
    with pytest.raises(CheckpointError) as e:
        train(_cfg(corpora["base"], run, "--train.resume=auto", "--train.seq_len=16"))
    msg = str(e.value)
    assert "step-00000002" in msg and "saved 32, current 16" in msg
    assert "--train.seq_len=32" in msg and "--train.out_dir" in msg


def test_resume_past_max_steps_warns_that_nothing_is_trained(corpora, tmp_path, caplog):
    """Resuming a step-4 checkpoint with --train.max_steps=2 "finished at step 4" with no word that the
    requested steps were already passed; a warning now names both numbers. Nothing is written, at
    max_steps or past it: no evaluation or checkpoint line appended to metrics.jsonl, no re-save of
    step-00000004 (its files and mtimes were rewritten), no new TensorBoard file, config.toml as it was;
    likewise with train.max_minutes already spent by the earlier segments."""
    import logging

    from clusterlm.train.loop import train

    run = tmp_path / "r"
    train(_cfg(corpora["base"], run))

    def files() -> dict[str, tuple[bytes, int]]:
        return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*"))
                if p.is_file()}

    before = files()
    for steps in ("2", "4"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            result = train(_cfg(corpora["base"], run, "--train.resume=auto", f"--train.max_steps={steps}",
                                "--train.log_interval=3"))
        assert any(f"resumed at step 4, not below train.max_steps={steps}" in r.getMessage() and
                   "no evaluation, no checkpoint" in r.getMessage() for r in caplog.records)
        assert (result.exit_code, result.step, result.checkpoint.name) == (0, 4, "step-00000004")
        assert result.reason.startswith("nothing to train")
        assert files() == before
    # the same with the run's time budget spent (train.max_minutes counts every segment): it trained one
    # more step, evaluated and saved at each resume
    spent = json.loads((run / "checkpoints" / "step-00000004" / "train_state.json").read_text())["run"]["train_seconds"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = train(_cfg(corpora["base"], run, "--train.resume=auto", "--train.max_steps=10",
                            f"--train.max_minutes={spent / 60 / 2}"))
    assert (result.exit_code, result.step) == (0, 4) and files() == before
    assert any("not below train.max_minutes=" in r.getMessage() and "--train.max_minutes (or 0: no limit)" in
               r.getMessage() for r in caplog.records)


def test_time_limit_at_an_eval_step_evaluates_once(corpora, tmp_path):
    """train.max_minutes reached at a step that train.eval_interval evaluates: the loop evaluated there,
    then the end-of-run evaluation scored the same weights again, writing two "eval" records of one step
    to metrics.jsonl (and two of each [eval] task); the end of the run now reuses the one it has."""
    from clusterlm.train.loop import train

    run = tmp_path / "r"
    result = train(_cfg(corpora["base"], run, "--train.max_steps=50", "--train.eval_interval=1",
                        "--train.max_minutes=1e-9"))
    assert (result.exit_code, result.step) == (0, 1) and result.reason.startswith("time limit")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [1] and result.final_val_loss == evals[0]["val_loss"]
    assert [r["reason"] for r in records if r["kind"] == "event"] == ["final"]


def test_resume_that_changes_the_lr_schedule_warns(corpora, tmp_path, caplog):
    """A cosine run resumed with a larger train.max_steps (or another optim.lr, warmup, ...) jumped from
    the lr its checkpoint's schedule was at to the new schedule's without a word; a warning now names
    both rates and what changed. A resume whose lr stays the same says nothing."""
    import logging

    from clusterlm.train.loop import train
    from clusterlm.train.optim import lr_at

    run, sched = tmp_path / "r", ("--optim.warmup_steps=1", "--optim.lr=1e-3", "--optim.min_lr=1e-4")
    train(_cfg(corpora["base"], run, *sched))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train(_cfg(corpora["base"], run, *sched, "--train.resume=auto", "--train.max_steps=4",
                   "--train.log_interval=3"))  # nothing to train: no comparison needed, and none made
        train(_cfg(corpora["base"], run, *sched, "--train.resume=auto", "--train.max_steps=8"))
    jumps = [r.getMessage() for r in caplog.records if "the learning rate jumps" in r.getMessage()]
    assert len(jumps) == 1, jumps
    now = lr_at(4, _cfg(corpora["base"], run, *sched).optim, 8)
    assert f"resumed at step 4 with lr {now:.3g}, where the checkpoint's schedule was at 0.0001" in jumps[0]
    assert "(train.max_steps 4 -> 8)" in jumps[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the same settings: the same lr, nothing said
        train(_cfg(corpora["base"], run, *sched, "--train.max_steps=8",
                   "--train.resume=" + json.dumps(str(run / "checkpoints" / "step-00000006"))))
    assert not any("the learning rate jumps" in r.getMessage() for r in caplog.records)


def test_a_second_run_in_the_same_out_dir_is_refused_while_the_first_holds_it(corpora, tmp_path):
    """Two `clusterlm train` in one train.out_dir at once (a command started twice, a resume while the run
    still goes on) both wrote checkpoints there, pruning each other's step folders; the second is now
    refused at start-up (exit 69, naming the folder) whether the folder existed (resume) or the first
    run made it, and runs once the first has ended. The refused run writes nothing."""
    from clusterlm.errors import ResourceBusyError, exit_code_of
    from clusterlm.train.loop import Trainer, train

    run = tmp_path / "r"
    first = Trainer(_cfg(corpora["base"], run, "--train.max_steps=2"))  # made the folder; holds it
    with pytest.raises(ResourceBusyError, match=rf"train.out_dir='{run}' is in use by another clusterlm run") as e:
        train(_cfg(corpora["base"], run, "--train.max_steps=2"))
    assert exit_code_of(e.value) == 69
    assert first.run().exit_code == 0
    listing = sorted(p.name for p in run.iterdir())
    resumed = Trainer(_cfg(corpora["base"], run, "--train.resume=auto", "--train.max_steps=4"))
    with pytest.raises(ResourceBusyError):
        train(_cfg(corpora["base"], run, "--train.resume=auto", "--train.max_steps=4"))
    assert sorted(p.name for p in run.iterdir()) == listing
    assert resumed.run().step == 4
    assert train(_cfg(corpora["base"], run, "--train.resume=auto", "--train.max_steps=6")).step == 6


def test_inference_refuses_a_tokenizer_larger_than_the_model(corpora, tmp_path):
    """A tokenizer.json with more tokens than the model's vocabulary (files from two runs) would index
    past the embedding at the first rare token; refused at load with both sizes."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.checkpoint.store import MANIFEST, write_manifest
    from clusterlm.train.loop import train

    run = tmp_path / "r"
    train(_cfg(corpora["base"], run, "--train.max_steps=2"))
    step = run / "checkpoints" / "step-00000002"
    shutil.copyfile(corpora["wider"] / json.loads((corpora["wider"] / "meta.json").read_text())["tokenizer"]["file"],
                    step / "tokenizer.json")
    (step / MANIFEST).unlink()
    write_manifest(step, 2)
    with pytest.raises(CheckpointError, match=r"tokenizer.json has \d+ tokens but the model in .* has vocab_size=\d+"):
        load_for_inference(run)
