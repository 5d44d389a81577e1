"""Decisions every rank must take together (one all-reduce each), so no rank is left waiting in a
collective that the others skipped: stop flags, and the checkpoint a run resumes from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
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


def agree_on_checkpoint(path: Path | None, device: torch.device) -> Path | None:
    """Check that every rank chose the same checkpoint step (each scans the shared file system)."""
    from clusterlm.checkpoint.store import STEP_RE

    m = STEP_RE.match(path.name) if path is not None else None
    step = int(m[1]) if m else -1
    t = torch.tensor([step, -step], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise ConfigError(f"ranks disagree on the checkpoint to resume from (steps {-int(t[1])} to {int(t[0])}): "
                          "is the checkpoint folder on a file system shared by all nodes?")
    return path


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
