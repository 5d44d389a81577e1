"""SIGKILL of one rank of a `clusterlm launch` job (2 gloo ranks under torchrun, --max-restarts 1,
--train.resume=auto): the group is torn down and restarted, resumes from the newest committed
checkpoint, and ends bit-identical to an uninterrupted run. Reference: torchtitan/Megatron's resume
test (losses compared for equality after a resume at the same world size; FIELD_NOTES "Reliability").
benchmarks/faults.py runs the same trial 20 times at seeded random ranks, steps and times."""

from __future__ import annotations

import pytest

from benchmarks.faults import KILL_CKPT_INTERVAL, kill_trial, reference_run


@pytest.mark.slow
def test_sigkilled_rank_resumes_bit_exact(tmp_path):
    """Rank 1 SIGKILLed half a step after step 5 is logged (the step-4 checkpoint committed, step 6's
    not yet written): the restarted group resumes from the newest committed checkpoint, every logged
    loss equals the uninterrupted run's, and the final model and AdamW state are bit-identical."""
    reference = reference_run(tmp_path)
    r = kill_trial(tmp_path, reference, rank=1, step=5, frac=0.5)
    assert r["detected"] and r["detect_s"] < 30, r
    assert r["rc"] == 0, r
    assert r["committed"] >= 5 - 5 % KILL_CKPT_INTERVAL and r["resumed_from"] == r["committed"], r
    assert r["losses_equal"] and r["final_equal"], r
