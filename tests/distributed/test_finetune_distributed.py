"""`clusterlm finetune` under data parallelism against one process (gloo, one spawn of 2 ranks each):
LoRA under FSDP2 x2, where the base is loaded into the sharded model (vocabulary grown for the chat
tokens), only the adapters train, and ten steps give one process's losses to 1e-5 (issue 15, "LoRA
under FSDP x2"); and a classifier distilled from a teacher under DDP x2, the same.

    .venv/bin/python -m pytest -q tests/distributed/test_finetune_distributed.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clusterlm.train.metrics import read_metrics
from tests.distributed.helpers import run_ranks
from tests.helpers import random_checkpoint, train_losses

pytestmark = pytest.mark.slow  # ~20 s on 2 cores


def _args(base: Path, source: Path, data: Path, out: Path, micro: int, *extra: str) -> list[str]:
    return [f"--finetune.init_from={json.dumps(str(base))}", "--finetune.task=sft", "--finetune.lora_rank=4",
            f"--data.source={json.dumps(str(source))}", f"--data.dir={json.dumps(str(data))}",
            f"--train.out_dir={json.dumps(str(out))}", "--train.seq_len=32", f"--train.micro_batch_size={micro}",
            "--train.global_batch_tokens=256", "--train.max_steps=10", "--train.device=cpu", "--train.threads=1",
            "--train.eval_interval=0", "--train.log_interval=1", "--train.tensorboard=false", "--optim.lr=1e-2",
            "--optim.warmup_steps=0", "--optim.weight_decay=0", *extra]


def _finetune_rank(rank: int, world: int, args: list[str]) -> dict:
    from clusterlm.config import load_run_config
    from clusterlm.train.loop import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    r = train(load_run_config(None, args))
    return {"exit": r.exit_code, "step": r.step}


def test_lora_finetune_under_fsdp_matches_one_process(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from clusterlm.config import load_run_config
    from clusterlm.train.loop import train

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    text = "".join(f"{a} plus {b} is {a + b}\n" for a in range(10) for b in range(10))
    base = random_checkpoint(tmp_path, "char", text, bpe_vocab=0, n_layers=2, context=64)
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{a} plus {b}"},
                                                       {"role": "assistant", "content": str(a + b)}]}) + "\n"
                              for a in range(10) for b in range(10)))
    one = tmp_path / "one"
    assert train(load_run_config(None, _args(base, source, tmp_path / "data", one, 8))).exit_code == 0
    ref = train_losses(one)
    fsdp = tmp_path / "fsdp"
    res = run_ranks(2, _finetune_rank, _args(base, source, tmp_path / "data", fsdp, 4, "--parallel.dp_shard=2"))
    assert res == [{"exit": 0, "step": 10}] * 2
    got = train_losses(fsdp)
    assert sorted(got) == list(range(1, 11))
    assert ref[10] < ref[1] - 0.1  # the adapters learn
    for s in ref:
        assert got[s] == pytest.approx(ref[s], abs=1e-5), s
    a, b = (load_file(str(run / "adapter" / "adapter.safetensors")) for run in (one, fsdp))
    # 2 layers x (wq wk wv wo w1 w2) x (A, B), and the token embedding's (the chat tokens grew the vocabulary)
    assert sorted(a) == sorted(b) and len(a) == 2 * 6 * 2 + 2 and "tok_embeddings.lora_a" in a
    for k in a:  # AdamW's 1/sqrt(v) amplifies summation-order differences: 2e-4 (tests/distributed/test_lora_fsdp.py)
        assert (a[k] - b[k]).abs().max() < 2e-4, k


def _cls_args(root: Path, out: Path, micro: int, *extra: str) -> list[str]:
    return ["--finetune.task=classify", f"--data.source={json.dumps(str(root / 'cls.tsv'))}",
            f"--data.dir={json.dumps(str(root / 'data'))}", "--data.tokenizer=char", "--model.arch=lstm",
            "--model.n_layers=1", "--model.dim=32", "--model.pos=none", "--model.dropout=0",
            f"--train.out_dir={json.dumps(str(out))}", "--train.seq_len=24", f"--train.micro_batch_size={micro}",
            "--train.global_batch_tokens=192", "--train.device=cpu", "--train.threads=1", "--train.eval_interval=0",
            "--train.log_interval=1", "--train.tensorboard=false", "--optim.lr=1e-2", "--optim.warmup_steps=0",
            *extra]


def test_distilled_classifier_under_ddp_matches_one_process(tmp_path, monkeypatch):
    """finetune.distill_from under DDP x2: rank 0 scores the training texts with the teacher once
    (one file in the run folder, read by rank 1), and ten steps give one process's losses (1e-5)."""
    import numpy as np

    from clusterlm.config import load_run_config
    from clusterlm.train.loop import train

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "cls.tsv").write_text("sentence\tlabel\n" + "".join(
        f"the film was {w} {i}\t{'pos' if w in ('good', 'fine') else 'neg'}\n"
        for i in range(30) for w in ("good", "bad", "fine", "dull")))
    teacher = tmp_path / "teacher"
    assert train(load_run_config(None, _cls_args(tmp_path, teacher, 8, "--train.max_steps=20"))).exit_code == 0
    extra = (f"--finetune.distill_from={json.dumps([str(teacher)])}", "--finetune.distill_weight=0.7",
             "--train.max_steps=10")
    one = tmp_path / "one"
    assert train(load_run_config(None, _cls_args(tmp_path, one, 8, *extra))).exit_code == 0
    ddp = tmp_path / "ddp"
    res = run_ranks(2, _finetune_rank, _cls_args(tmp_path, ddp, 4, "--parallel.dp_replicate=2", *extra))
    assert res == [{"exit": 0, "step": 10}] * 2
    [a], [b] = (list((run / "distill").glob("teachers-*.npy")) for run in (one, ddp))
    assert np.array_equal(np.load(a), np.load(b))
    ref, got = train_losses(one), train_losses(ddp)
    assert sorted(got) == list(range(1, 11)) and ref[10] < ref[1]
    for s in ref:
        assert got[s] == pytest.approx(ref[s], abs=1e-5), s
    # tokens count the positions computed on both ranks (each pads its 4 rows to their own longest), not
    # 8 rows x seq_len 24 = 192: one process's 8 rows are as wide as the step's longest text, so DDP's
    # two half-batches compute no more positions than it does
    def added(run: Path) -> list[int]:
        seen = [r["tokens"] for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "train"]
        return [b - a for a, b in zip([0, *seen], seen)]

    one_steps, ddp_steps = added(one), added(ddp)
    assert all(0 < d <= o < 192 for d, o in zip(ddp_steps, one_steps)), (ddp_steps, one_steps)
    assert all(o % 8 == 0 for o in one_steps) and all(d % 4 == 0 for d in ddp_steps)
