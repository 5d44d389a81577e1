"""Task evaluation during training on 2 ranks (gloo, spawned; the rank environment set as torchrun
would): DDP splits the model calls and gathers the answers, FSDP pads the blocks so both ranks make
the same forward calls; both score as one process does on the same weights."""

from __future__ import annotations

import json
import os

import pytest

from tests.distributed.helpers import run_ranks
from tests.e2e.test_train_tasks import prepare_corpus, run_args, task_records, write_tasks

pytestmark = pytest.mark.slow  # ~15 s on 2 cores


def _ranks(rank: int, world: int, ddp_args: list[str], fsdp_args: list[str]) -> dict:
    """DDP training with [eval]; then the FSDP layout trained the same way (its final evaluation only),
    in the same process group. (A resume at the last step no longer evaluates: it writes nothing.)"""
    from clusterlm.config import load_run_config
    from clusterlm.train.loop import train

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    ddp = train(load_run_config(None, ddp_args))
    fsdp = train(load_run_config(None, fsdp_args))
    return {"ddp": [ddp.exit_code, ddp.step], "fsdp": [fsdp.exit_code, fsdp.step]}


def test_ddp_and_fsdp_task_scores_equal_one_process(tmp_path):
    """2-rank DDP training with [eval] every 3 steps: its task records at steps 3 and 6 are written
    once (rank 0) and the step-6 scores equal run_task on one process over the final checkpoint
    (choice: acc/acc_norm exactly; generate: every metric exactly). The same training under FSDP
    (dp_shard=2, the choice task at the end only; padded blocks) scores as one process does over its
    final checkpoint."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.eval.harness import DecodeOptions, resolve_task, run_task

    data, tasks = prepare_corpus(tmp_path), write_tasks(tmp_path)
    ddp_run, fsdp_run = tmp_path / "ddp", tmp_path / "fsdp"
    both = json.dumps([str(tasks["choice"]), str(tasks["generate"])])
    common = ["--train.global_batch_tokens=256", "--train.tensorboard=false", "--eval.max_new_tokens=6",
              "--eval.batch_size=2"]
    ddp_args = run_args(data, ddp_run, *common, "--parallel.dp_replicate=2", f"--eval.tasks={both}",
                        "--eval.every=3")
    fsdp_args = run_args(data, fsdp_run, *common, "--parallel.dp_shard=2",
                         f"--eval.tasks={json.dumps([str(tasks['choice'])])}")
    res = run_ranks(2, _ranks, ddp_args, fsdp_args)
    assert res == [{"ddp": [0, 6], "fsdp": [0, 6]}] * 2

    ddp, fsdp = task_records(ddp_run), task_records(fsdp_run)
    assert {k: [r["step"] for r in v] for k, v in ddp.items()} == {"tiny_choice": [3, 6], "tiny_gen": [3, 6]}
    assert {k: [r["step"] for r in v] for k, v in fsdp.items()} == {"tiny_choice": [6]}

    loaded = load_for_inference(ddp_run / "checkpoints" / "step-00000006", device="cpu")
    decode = DecodeOptions(max_new_tokens=6, seed=0)
    for name, path in (("tiny_choice", tasks["choice"]), ("tiny_gen", tasks["generate"])):
        ref, _ = run_task(loaded.model, loaded.tokenizer, resolve_task(str(path)), decode=decode, progress=False)
        expected = {k: ref[k] for k in ddp[name][-1]["metrics"]}
        assert ddp[name][-1]["metrics"] == expected, name
        assert ddp[name][-1]["n"] == ref["n"]
    loaded = load_for_inference(fsdp_run / "checkpoints" / "step-00000006", device="cpu")
    ref, _ = run_task(loaded.model, loaded.tokenizer, resolve_task(str(tasks["choice"])), decode=decode,
                      progress=False)
    assert fsdp["tiny_choice"][-1]["metrics"] == {k: ref[k] for k in fsdp["tiny_choice"][-1]["metrics"]}
