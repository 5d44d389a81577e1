"""Elastic resume, the growing direction, on gloo: a run that continued on fewer ranks after losing a node
grows back to the original size from its last committed DCP checkpoint when the node returns; the batch
arithmetic (accumulation steps for the same global batch) is re-derived and logged. Reference: the same
global batch on one process (the loader's global sample position makes the rows of a step independent
of the layout; FIELD_NOTES "Resume that really resumes": torchtitan PR #816 refuses a changed degree).
The shrinking direction: tests/e2e/test_multinode.py (4 -> 2 ranks across namespaced Slurm nodes, then
a new job back to 4, root) and tests/distributed/test_train_distributed.py (FSDP x2 -> TP x2 / 1 process).
Two segments, not three (4 -> 2 -> 4): each rank process costs a few seconds of start-up."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from tests.distributed.helpers import run_ranks
from tests.helpers import train_losses

HSDP = ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"]  # 2 "nodes" x 2 ranks
ONE_NODE = ["--parallel.dp_shard=2"]


def _args(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [f"--data.dir={data}", f"--train.out_dir={out}", "--model.preset=llama-nano", "--model.max_seq_len=32",
            "--train.seq_len=32", "--train.micro_batch_size=2", "--train.global_batch_tokens=256",
            f"--train.max_steps={steps}", "--train.device=cpu", "--train.threads=1", "--train.eval_interval=0",
            "--train.log_interval=1", "--checkpoint.interval=4", "--checkpoint.keep_last=5",
            "--train.tensorboard=false", "--train.heartbeat_timeout=0", "--train.resume=auto",
            "--train.skip_memory_check=true", *extra]


def _segment(rank: int, world: int, args: list[str]) -> dict:
    """`clusterlm train` on this rank; rank 0 returns its start-up lines and where it started"""
    from clusterlm.config import load_run_config
    from clusterlm.train.loop import Trainer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda rec: lines.append(rec.getMessage())
    logging.getLogger("clusterlm").addHandler(handler)
    logging.getLogger("clusterlm").setLevel(logging.INFO)
    trainer = Trainer(load_run_config(None, args))
    start = {"step": trainer.state.step, "tokens": trainer.state.tokens_seen}
    r = trainer.run()
    return {"exit": r.exit_code, "step": r.step, "start": start, "accum": trainer.accum,
            "tokens_per_step": trainer.tokens_per_step, "tokens": trainer.state.tokens_seen,
            "lines": [ln for ln in lines if ln.startswith(("batch:", "layout:", "resumed from"))] if rank == 0 else []}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from clusterlm.data.prepare import prepare

    root = tmp_path_factory.mktemp("d")
    (root / "t.txt").write_text("".join(f"Whether 'tis nobler in the mind to suffer {i}\n" * 20 for i in range(20)))
    prepare([str(root / "t.txt")], root / "data", tokenizer="char", val_fraction=0.1)
    return root / "data"


@pytest.mark.slow
def test_grow_back_to_the_original_size(data, tmp_path, monkeypatch):
    """The survivors' run, 2 ranks (FSDP x2, 2 accumulation steps of 2 x 2 rows for 256 tokens per step),
    trains steps 1-4; the node returns: the job resumes on 4 ranks (HSDP 2 x 2) from the step-4 DCP
    checkpoint written by 2, with 1 accumulation step for the same 256 tokens, and trains 5-8. The second
    segment starts where the first committed (step and tokens seen), each logs its re-derived batch
    line, and all 8 losses equal one process's (1e-5)."""
    from clusterlm.config import load_run_config
    from clusterlm.train.loop import train

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    assert train(load_run_config(None, _args(data, tmp_path / "one", 8))).exit_code == 0
    ref = train_losses(tmp_path / "one")

    run = tmp_path / "run"
    segments = [(2, ONE_NODE, 4, 2), (4, HSDP, 8, 1)]  # (world, layout, to step, accumulation steps)
    start = 0
    for world, layout, steps, accum in segments:
        r0, *rest = run_ranks(world, _segment, _args(data, run, steps, *layout))
        assert [r["exit"] for r in (r0, *rest)] == [0] * world and r0["step"] == steps
        assert r0["start"] == {"step": start, "tokens": start * 256}, (world, r0["start"])
        assert r0["accum"] == accum and r0["tokens_per_step"] == 256 and r0["tokens"] == steps * 256
        assert f"batch: 2 x 32 tokens per micro-batch, {accum} accumulation steps, 256 tokens per step" in r0["lines"]
        assert any(ln.startswith("layout:") and f"on {world} process(es)" in ln for ln in r0["lines"]), r0["lines"]
        if start:
            assert any(f"resumed from {run / 'checkpoints'}/step-{start:08d} at step {start}" in ln
                       for ln in r0["lines"]), r0["lines"]
        ckpt = run / "checkpoints" / f"step-{steps:08d}"
        assert (ckpt / "dcp" / ".metadata").is_file() and len(list((ckpt / "dcp").glob("*.distcp"))) == world
        start = steps
    got = train_losses(run)
    assert sorted(got) == list(range(1, 9))
    for s in ref:
        assert got[s] == pytest.approx(ref[s], abs=1e-5), s
    shutil.rmtree(run / "checkpoints")
