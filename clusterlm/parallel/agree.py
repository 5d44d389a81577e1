"""Decisions every rank must take together (one all-reduce each), so no rank is left waiting in a
collective that the others skipped: stop flags, and the checkpoint a run resumes from.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from clusterlm.errors import ConfigError


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
