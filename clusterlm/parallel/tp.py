"""Tensor parallel (Megatron column/row split) of the Transformer with DTensor's parallelize_module,
with sequence parallel and loss parallel (Korthikanti et al. 2022; torchtitan's plan).

Per block: wq, wk, wv and w1, w3 are split by output columns (ColwiseParallel: each rank computes
its own heads / hidden units), wo and w2 by input rows (RowwiseParallel). Each rank then holds
n_heads/tp query heads and kv_heads/tp kv heads, so the attention module's head counts are divided
here.

sequence_parallel=True (the default): between the matmuls the residual stream is split along the
sequence, (B, T/tp, D) per rank, so norms, residual adds and dropout store 1/tp of their
activations. wo and w2 end in a reduce-scatter instead of an all-reduce, and the attention / MLP
inputs are all-gathered back to the full sequence (the same bytes on the wire as TP's all-reduce).
The embedding is split by vocabulary rows and reduce-scattered into the sequence split; the final
norm runs on the split, and the output layer is split by vocabulary columns.

loss_parallel=True (with sequence_parallel, no pipeline): the logits stay split over the vocabulary
(a DTensor, Shard(-1)); the cross-entropy runs under `loss_context()` (torch's loss_parallel), so no
rank ever holds (B, T, V) logits. `full_logits` turns them into a plain tensor where one is needed.

sequence_parallel=False: embeddings, norms and the output stay replicated (each rank repeats their
compute on the full sequence); only the block matmuls are split.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool = True,
             loss_parallel: bool = False) -> None:
    """Lay `model` (a Transformer, or one pipeline stage of it) out over `tp_mesh`, in place."""
    tp = tp_mesh.size()
    if loss_parallel and not sequence_parallel:
        raise ValueError("loss_parallel needs sequence_parallel (the output layer's input is the sequence split)")
    for block in model.layers.values():
        attn, ff = block.attention, block.feed_forward
        if attn.n_heads % tp or attn.kv_heads % tp:
            raise ValueError(f"tp={tp} must divide n_heads={attn.n_heads} and kv_heads={attn.kv_heads}")
    if sequence_parallel:
        _apply_ends(model, tp_mesh, loss_parallel)
    for block in model.layers.values():
        attn, ff = block.attention, block.feed_forward
        # inner-module inputs under SP arrive split over the sequence and are gathered to the full one
        out = Shard(1) if sequence_parallel else Replicate()
        plan = {"attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(output_layouts=out),
                "feed_forward.w1": ColwiseParallel(), "feed_forward.w2": RowwiseParallel(output_layouts=out)}
        if hasattr(ff, "w3"):
            plan["feed_forward.w3"] = ColwiseParallel()
        if sequence_parallel:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
            # attention(x, rope, kv) and feed_forward(x, cached): only x is laid out
            plan["attention"] = PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                                   desired_input_layouts=(Replicate(), None, None))
            plan["feed_forward"] = PrepareModuleInput(input_layouts=(Shard(1), None),
                                                      desired_input_layouts=(Replicate(), None))
        parallelize_module(block, tp_mesh, plan)
        attn.n_heads //= tp  # heads per rank: the .view(B, T, H, Hd) in forward sees local shapes
        attn.kv_heads //= tp


def _apply_ends(model: nn.Module, tp_mesh: DeviceMesh, loss_par: bool) -> None:
    """Embedding (vocab rows), final norm (sequence split) and output (vocab columns) of a stage that has them."""
    plan: dict[str, object] = {}
    if model.tok_embeddings is not None:
        if getattr(model, "pos_embeddings", None) is None and getattr(model, "pos_table", None) is None:
            # token ids replicated in; partial sums reduce-scattered into the sequence split
            plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
        else:
            # learned or sinusoidal positions are added to the full sequence in forward: all-reduce the
            # embedding, then the first block takes its slice of the sequence (no communication)
            plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
            first = min(model.layers.keys(), key=int)
            plan[f"layers.{first}"] = PrepareModuleInput(input_layouts=(Replicate(), None, None),
                                                         desired_input_layouts=(Shard(1), None, None),
                                                         use_local_output=True)  # the residual stream is plain
    if model.norm is not None:
        plan["norm"] = SequenceParallel()
    if model.output is not None:
        plan["output"] = ColwiseParallel(input_layouts=Shard(1),
                                         output_layouts=Shard(-1) if loss_par else Replicate(),
                                         use_local_output=not loss_par)
    parallelize_module(model, tp_mesh, plan)
    tie = getattr(model, "_tie", None)
    if tie is not None:
        tie()  # tied embeddings: both modules now hold a Shard(0) DTensor of the table; make it one again


def loss_context(enabled: bool):
    """torch's loss_parallel() when the logits are vocabulary-split DTensors, else nothing."""
    return loss_parallel() if enabled else contextlib.nullcontext()


def full_logits(logits: torch.Tensor) -> torch.Tensor:
    """A plain (B, T, V) tensor from vocabulary-split DTensor logits (unchanged if already plain)."""
    return logits.full_tensor() if isinstance(logits, DTensor) else logits
