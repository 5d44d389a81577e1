"""The trainer itself on 2 ranks (spawned; the rank's environment is set as torchrun would), and
resuming its DCP checkpoint under another layout and on one process."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.distributed.helpers import run_ranks
from tests.helpers import train_losses

pytestmark = pytest.mark.slow  # ~30 s on 2 cores




def _args(data: Path, out: Path, micro: int, *extra: str) -> list[str]:
    return [f"--data.dir={data}", f"--train.out_dir={out}", "--model.preset=llama-nano", "--model.max_seq_len=32",
            "--train.seq_len=32", f"--train.micro_batch_size={micro}", "--train.global_batch_tokens=512",
            "--train.max_steps=8", "--train.device=cpu", "--train.threads=1", "--train.eval_interval=0",
            "--train.log_interval=1", "--checkpoint.interval=4", "--checkpoint.keep_last=2",
            "--train.tensorboard=false", *extra]


def _train_rank(rank: int, world: int, args: list[str]) -> dict:
    """clusterlm train on this rank, with the environment torchrun would give it"""
    from clusterlm.config import load_run_config
    from clusterlm.train.loop import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    r = train(load_run_config(None, args))
    return {"exit": r.exit_code, "step": r.step}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from clusterlm.data.prepare import prepare

    root = tmp_path_factory.mktemp("d")
    for i in range(20):  # 20 documents: 2 of them the validation split
        (root / f"t{i:02d}.txt").write_text(f"Whether 'tis nobler in the mind to suffer {i}\n" * 20)
    prepare([str(root)], root / "data", tokenizer="char", val_fraction=0.1)
    return root / "data"


def test_fsdp_run_resumes_on_tp_and_on_one_process(data, tmp_path, monkeypatch):
    """8 steps under FSDP x2 (2 micro-batches of 4 per rank) have one process's losses (8 x 2 rows per
    step, 1e-5); its step-4 DCP checkpoint resumed under TP x2 (1 micro-batch of 16) and on one
    process continues with the same losses for steps 5-8: model, optimizer and loader position reshard.
    Every run keeps a weight average (optim.ema_decay): the checkpoint's model is the average and the
    trained weights ride in the optimizer state ("train_weights", loaded though a fresh optimizer has
    no such key), so a resume that lost them would continue from the average and its losses differ.
    And every run unfreezes gradually (optim.unfreeze_every=1 on 4 layers: the head from step 0, the embeddings from
    step 5), so the frozen groups' lr 0 holds under FSDP and TP and across the resume."""
    from clusterlm.config import load_run_config
    from clusterlm.train.loop import train

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    ema = ["--optim.ema_decay=0.5", "--optim.unfreeze_every=1"]
    assert train(load_run_config(None, _args(data, tmp_path / "one", 8, *ema))).exit_code == 0
    ref = train_losses(tmp_path / "one")

    fsdp = tmp_path / "fsdp"
    res = run_ranks(2, _train_rank, _args(data, fsdp, 4, "--parallel.dp_shard=2", *ema))
    assert res == [{"exit": 0, "step": 8}] * 2
    got = train_losses(fsdp)
    assert sorted(got) == list(range(1, 9))
    for s in ref:
        assert got[s] == pytest.approx(ref[s], abs=1e-5), s
    ckpt = fsdp / "checkpoints" / "step-00000004"
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "manifest.json").is_file()

    for name, world, micro, extra in (("tp", 2, 16, ["--parallel.tp=2"]), ("single", 1, 16, [])):
        run = tmp_path / name
        (run / "checkpoints").mkdir(parents=True)
        shutil.copytree(ckpt, run / "checkpoints" / ckpt.name)
        args = _args(data, run, micro, "--train.resume=auto", *ema, *extra)
        if world == 2:
            assert run_ranks(2, _train_rank, args) == [{"exit": 0, "step": 8}] * 2
        else:
            assert train(load_run_config(None, args)).exit_code == 0
        resumed = train_losses(run)
        assert sorted(resumed) == [5, 6, 7, 8], name
        for s in resumed:
            assert resumed[s] == pytest.approx(ref[s], abs=1e-5), (name, s)


def test_ddp_resume_with_dropout_is_bit_exact(data, tmp_path):
    """Dropout draws random numbers every step: a DDP x2 run resumed from its step-4 DCP checkpoint gives
    exactly the losses of steps 5-8 of the uninterrupted run only because each rank's RNG state was saved
    (rng/rank-NNNNN.*, covered by the manifest) and restored. The runs keep their best checkpoint
    (checkpoint.keep_best, asynchronous saves): `best` names the better-scored of steps 4 and 8. keep_last=2
    keeps step 4 to resume from whichever scored best (with keep_last=1 a best step 8, the usual case,
    pruned it and cost a third run); pruning that spares `best` is tests/unit/test_checkpoint.py's and
    tests/e2e/test_train.py's."""
    import json

    straight = tmp_path / "straight"
    # checkpoint.keep_best with asynchronous DCP saves (best moves when the step-4 save commits, at step 8)
    args = ["--parallel.dp_replicate=2", "--model.dropout=0.2", "--train.eval_interval=2", "--train.eval_batches=2",
            "--checkpoint.keep_best=true", "--checkpoint.async_save=true", "--checkpoint.keep_last=2"]
    assert run_ranks(2, _train_rank, _args(data, straight, 4, *args)) == [{"exit": 0, "step": 8}] * 2
    ref = train_losses(straight)
    evals = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    saved = {r["step"]: r["val_loss"] for r in evals if r["kind"] == "eval" and r["step"] in (4, 8)}
    best = 8 if saved[8] < saved[4] else 4
    assert sorted(p.name for p in (straight / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000008"]
    assert (straight / "checkpoints" / "best").read_text() == f"step-{best:08d}\n"
    ckpt = straight / "checkpoints" / "step-00000004"
    files = json.loads((ckpt / "manifest.json").read_text())["files"]
    for r in (0, 1):
        assert f"rng/rank-{r:05d}.json" in files and f"rng/rank-{r:05d}.safetensors" in files

    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, run / "checkpoints" / ckpt.name)
    assert run_ranks(2, _train_rank, _args(data, run, 4, "--train.resume=auto", *args)) == [{"exit": 0, "step": 8}] * 2
    resumed = train_losses(run)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert {s: resumed[s] for s in resumed} == {s: ref[s] for s in resumed}


def test_pipeline_run_writes_full_model_weights(data, tmp_path, monkeypatch):
    """With pp=2 each rank holds half the layers; the checkpoint's model.safetensors still has the whole
    model (the stages' weights gathered to rank 0), equal to the DCP shards loaded on one process."""
    import torch

    from clusterlm.checkpoint.distributed import load_distributed
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.models.build import build_model

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    run = tmp_path / "pp"
    args = _args(data, run, 4, "--parallel.pp=2", "--model.tie_embeddings=false", "--train.max_steps=4")
    assert run_ranks(2, _train_rank, args) == [{"exit": 0, "step": 4}] * 2
    ckpt = run / "checkpoints" / "step-00000004"
    assert (ckpt / "model.safetensors").is_file()

    loaded = load_for_inference(ckpt)  # fails on a missing or partial model.safetensors
    fresh = build_model(loaded.config.model)
    load_distributed(ckpt, fresh, None)
    want, got = fresh.state_dict(), loaded.model.state_dict()
    assert sorted(got) == sorted(want) and any(k.startswith("layers.1.") for k in got)
    for k in want:
        assert torch.equal(got[k], want[k]), k
