"""Decisions every rank must take together (one all-reduce each), so no rank is left waiting in a
collective that the others skipped: stop flags, and work rank 0 does first. (The checkpoint a run
resumes from is agreed by the checkpointer: clusterlm.checkpoint.manager.agree_on_checkpoint.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from clusterlm.errors import ConfigError

T = TypeVar("T")


def agree_any(distributed: bool, *flags: bool, device: torch.device) -> tuple[bool, ...]:
    """Each flag true on any rank -> true on every rank (one all-reduce MAX), so no rank is left
    waiting in a collective that the others skipped."""
    if not distributed:
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def rank0_first(distributed: bool, rank: int, fn: Callable[[], T], *, what: str, device: torch.device) -> T:
    """Run `fn` on rank 0 first (e.g. preparing data on shared storage), then on the other ranks,
    which then find its result on disk. A failure on rank 0 is raised on every rank (no rank is
    left in a collective) with a message pointing at rank 0's log."""
    if not distributed:
        return fn()
    error: BaseException | None = None
    result = None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # re-raised below, after the other ranks have heard of it
            error = e
    (failed,) = agree_any(True, error is not None, device=device)
    if error is not None:
        raise error
    if failed:
        raise ConfigError(f"rank 0 failed while {what}; see rank 0's error above")
    return result if rank == 0 else fn()
