"""Training the new families under data parallelism (gloo, one spawn of 2 ranks per test) against one
process over the same global batch, ten steps, losses to 1e-5 (issue 16):
- seq2seq of an encoder-decoder under FSDP2 x2: each rank reads its half of every batch of pairs
  (padded to its own longest source and target); the loss is the mean over every target token;
- masked-LM pre-training of an encoder under DDP x2: each rank's rows are masked from their global
  stream positions, so the two ranks together draw the one process's masks.

    .venv/bin/python -m pytest -q tests/distributed/test_encdec_train_distributed.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.distributed.helpers import run_ranks
from tests.helpers import train_losses

pytestmark = pytest.mark.slow  # ~20 s on 2 cores


def _args(root: Path, out: Path, micro: int, *extra: str) -> list[str]:
    src = f"{root / 'train.en'},{root / 'train.fr'}"
    return ["--finetune.task=seq2seq", f"--data.source={json.dumps(src)}", f"--data.dir={json.dumps(str(root / 'data'))}",
            "--data.tokenizer=char", "--data.val_fraction=0", "--model.arch=encdec", "--model.n_layers=2",
            "--model.n_enc_layers=1", "--model.dim=32", "--model.n_heads=4", "--model.max_seq_len=64",
            f"--train.out_dir={json.dumps(str(out))}", "--train.seq_len=48", f"--train.micro_batch_size={micro}",
            "--train.global_batch_tokens=384", "--train.max_steps=10", "--train.device=cpu", "--train.threads=1",
            "--train.eval_interval=0", "--train.log_interval=1", "--train.tensorboard=false", "--optim.lr=3e-3",
            "--optim.warmup_steps=0", *extra]


def _rank(rank: int, world: int, args: list[str]) -> dict:
    from clusterlm.config import load_run_config
    from clusterlm.train.loop import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    r = train(load_run_config(None, args))
    return {"exit": r.exit_code, "step": r.step}


def test_seq2seq_under_fsdp_matches_one_process(tmp_path, monkeypatch):
    from clusterlm.config import load_run_config
    from clusterlm.train.loop import train

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    words = ["a", "dog", "cat", "runs", "sits", "red", "big"]
    fr = {"a": "un", "dog": "chien", "cat": "chat", "runs": "court", "sits": "assis", "red": "rouge", "big": "grand"}
    src = [" ".join(words[(i * k) % 7] for k in range(1, 2 + i % 5)) for i in range(96)]
    (tmp_path / "train.en").write_text("".join(s + "\n" for s in src))
    (tmp_path / "train.fr").write_text("".join(" ".join(fr[w] for w in s.split()) + "\n" for s in src))
    one = tmp_path / "one"
    assert train(load_run_config(None, _args(tmp_path, one, 8))).exit_code == 0
    ref = train_losses(one)
    res = run_ranks(2, _rank, _args(tmp_path, tmp_path / "fsdp", 4, "--parallel.dp_shard=2"))
    assert res == [{"exit": 0, "step": 10}] * 2
    got = train_losses(tmp_path / "fsdp")
    assert len(ref) == 10 and ref[10] < ref[1]
    assert got == pytest.approx(ref, abs=1e-5)


def _mlm_args(root: Path, out: Path, micro: int, *extra: str) -> list[str]:
    return ["--finetune.task=mlm", f"--data.dir={json.dumps(str(root / 'shards'))}", "--model.arch=encoder",
            "--model.n_layers=2", "--model.dim=32", "--model.n_heads=4", "--model.max_seq_len=32",
            f"--train.out_dir={json.dumps(str(out))}", "--train.seq_len=32", f"--train.micro_batch_size={micro}",
            "--train.global_batch_tokens=256", "--train.max_steps=10", "--train.device=cpu", "--train.threads=1",
            "--train.eval_interval=0", "--train.log_interval=1", "--train.tensorboard=false", "--optim.lr=3e-3",
            "--optim.warmup_steps=0", *extra]


def test_mlm_under_ddp_matches_one_process(tmp_path, monkeypatch):
    from clusterlm.cli import main as cli
    from clusterlm.config import load_run_config
    from clusterlm.train.loop import train

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"line {i}: the {'big ' * (i % 4)}dog runs."})
                                                 + "\n" for i in range(400)))
    assert cli(["prepare", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "shards"), "--tokenizer", "char",
                "--val-fraction", "0"]) == 0
    one = tmp_path / "one"
    assert train(load_run_config(None, _mlm_args(tmp_path, one, 8))).exit_code == 0
    ref = train_losses(one)
    res = run_ranks(2, _rank, _mlm_args(tmp_path, tmp_path / "ddp", 4, "--parallel.dp_replicate=2"))
    assert res == [{"exit": 0, "step": 10}] * 2
    got = train_losses(tmp_path / "ddp")
    assert len(ref) == 10 and ref[10] < ref[1]
    assert got == pytest.approx(ref, abs=1e-5)
