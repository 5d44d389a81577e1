"""run_ranks: run fn(rank, world_size, *args) on n gloo processes (torch.multiprocessing spawn,
file:// rendezvous in a temporary folder); returns each rank's JSON-serialisable result."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch.multiprocessing as mp


def _entry(rank: int, n: int, init_file: str, out_dir: str, fn, args) -> None:
    import faulthandler

    import torch
    import torch.distributed as dist

    faulthandler.enable()  # a native crash (SIGSEGV) prints each thread's Python stack to the captured stderr
    torch.set_num_threads(1)
    os.environ.pop("RANK", None)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=n)
    try:
        result = fn(rank, n, *args)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(n: int, fn, *args) -> list:
    """fn must be importable (module level); results in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.start_processes(_entry, args=(n, init_file, tmp, fn, args), nprocs=n, join=True, start_method="spawn")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(n)]
