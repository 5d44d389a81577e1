"""Tensor parallel (Megatron column/row split) of the Transformer with DTensor's parallelize_module.

Per block: wq, wk, wv and w1, w3 are split by output columns (ColwiseParallel: each rank computes
its own heads / hidden units), wo and w2 by input rows (RowwiseParallel: partial sums all-reduced).
Each rank then holds n_heads/tp query heads and kv_heads/tp kv heads, so the attention module's
head counts are divided here. Embeddings, norms and the output layer stay replicated (no sequence
or loss parallel: simpler, and exact against one process; the cost is replicated norm compute).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    tp = tp_mesh.size()
    for block in model.layers.values():
        attn, ff = block.attention, block.feed_forward
        if attn.n_heads % tp or attn.kv_heads % tp:
            raise ValueError(f"tp={tp} must divide n_heads={attn.n_heads} and kv_heads={attn.kv_heads}")
        plan = {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(),
                "feed_forward.w1": ColwiseParallel(), "feed_forward.w2": RowwiseParallel()}
        if hasattr(ff, "w3"):
            plan["feed_forward.w3"] = ColwiseParallel()
        parallelize_module(block, tp_mesh, plan)
        attn.n_heads //= tp  # heads per rank: the .view(B, T, H, Hd) in forward sees local shapes
        attn.kv_heads //= tp
