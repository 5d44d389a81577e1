"""Data parallel by replication: torch's DistributedDataParallel over the dp_replicate group.
Used when the layout is pure replication (dp_replicate > 1, everything else 1); LSTM/GRU models
train this way too. Gradients are averaged in buckets during backward; `no_sync()` skips that on
all but the last micro-batch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, device: torch.device) -> DistributedDataParallel:
    return DistributedDataParallel(model, process_group=dp_mesh.get_group(),
                                   device_ids=[device] if device.type == "cuda" else None)
