"""rank0_first: rank 0 runs first and the others see its result; a rank-0 failure reaches every rank."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.distributed.helpers import run_ranks


def _job(rank: int, world: int, folder: str, fail: bool) -> dict:
    import torch

    from clusterlm.parallel.agree import rank0_first

    marker = Path(folder) / "ready"

    def fn() -> str:
        if rank == 0:
            time.sleep(0.3)  # the other rank must wait, not race ahead
            if fail:
                raise ValueError("bad input on rank 0")
            marker.write_text("x")
            return "made"
        return "seen" if marker.exists() else "missing"

    try:
        return {"result": rank0_first(True, rank, fn, what="making the marker", device=torch.device("cpu"))}
    except Exception as e:  # noqa: BLE001 - the test inspects what each rank raised
        return {"error": f"{type(e).__name__}: {e}"}


def test_rank0_first_orders_and_propagates_failure(tmp_path):
    """Two gloo ranks: rank 1 runs fn only after rank 0 finished (it sees the marker); when rank 0
    raises, rank 0 re-raises its own error and rank 1 gets a ConfigError naming rank 0."""
    os.makedirs(tmp_path / "a")
    ok = run_ranks(2, _job, str(tmp_path / "a"), False)
    assert ok == [{"result": "made"}, {"result": "seen"}]
    os.makedirs(tmp_path / "b")
    bad = run_ranks(2, _job, str(tmp_path / "b"), True)
    assert bad[0] == {"error": "ValueError: bad input on rank 0"}
    assert bad[1]["error"].startswith("ConfigError: rank 0 failed while making the marker")
