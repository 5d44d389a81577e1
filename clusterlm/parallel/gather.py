"""Small Python results gathered from every rank: task evaluation during training splits a task's
model calls over the data-parallel ranks and scores the whole task from every rank's answers
(train/loop.py, eval/harness.run_task_split). The payload is a few numbers per request, so
`all_gather_object` (pickle) is fine; tensors have their own collectives.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def gather_objects(obj: Any, distributed: bool) -> list[Any]:
    """`obj` of every rank, in global rank order, on every rank; [obj] on one process."""
    if not distributed:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
