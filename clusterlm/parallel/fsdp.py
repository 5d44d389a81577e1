"""Fully sharded data parallel, FSDP2 (`fully_shard`): each block is its own all-gather unit, then
the root (embeddings, final norm, output; a classifier's blocks are its backbone's and its head
joins the root; an encoder-decoder's encoder blocks are units too, and its encoder's position
table and norms join the root). With dp_replicate > 1 the mesh is 2-D (replicate,
shard): hybrid sharding (HSDP), shards inside a group, replicas across. Parameters stay fp32 master
copies; with a bf16 param dtype they are cast for compute and gradients reduced in fp32.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from clusterlm.parallel.ac import block_stacks


def apply_fsdp(model: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype | None = None,
               reshard_after_forward: bool = True) -> nn.Module:
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for _, layers in block_stacks(model):
        for block in layers.values():
            fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model
