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

The other families (models/encdec.py) take the same plan per block, in both stacks of an
encoder-decoder. Bidirectional self-attention and its key mask need nothing more: under sequence
parallel the attention input is gathered to the full sequence before wq/wk/wv, as for the causal
decoder, and the (B, 1, 1, S) mask stays a plain tensor of the full length. Cross-attention splits
like self-attention (wq, wk, wv by columns, wo by rows; heads per rank). Its keys and values read
the encoder's output ("memory"), which under sequence parallel leaves the encoder's final norm as a
sequence split; it is all-gathered once there (a Replicate DTensor, whose gradient the backward
reduce-scatters once) and every decoder layer's wk/wv read it. Both stacks embed (tokens + learned or
sinusoidal positions, or rotary tables sized by the token count) and norm (`emb_norm`) the full
sequence, so their embedding is all-reduced and each stack's first block takes its slice. An encoder's
masked-LM head (dense -> GELU -> norm, each position on its own): the dense layer split by columns
(the sequence gathered in, the output split by sequence again), the norm on the sequence split; the
tied output layer after it is split by vocabulary as above.
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
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from clusterlm.models.transformer import Block
from clusterlm.parallel.ac import block_stacks


def _attentions(block: nn.Module) -> list[nn.Module]:
    """The attention modules of a block whose head counts TP divides: self-attention, and a decoder
    block's cross-attention."""
    return [m for m in (block.attention, getattr(block, "cross_attention", None)) if m is not None]


def _block_plan(block: nn.Module, sequence_parallel: bool) -> dict[str, object]:
    # inner-module inputs under SP arrive split over the sequence and are gathered to the full one
    out = Shard(1) if sequence_parallel else Replicate()
    plan: dict[str, object] = {
        "attention.wq": ColwiseParallel(), "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(), "attention.wo": RowwiseParallel(output_layouts=out),
        "feed_forward.w1": ColwiseParallel(), "feed_forward.w2": RowwiseParallel(output_layouts=out)}
    if hasattr(block.feed_forward, "w3"):
        plan["feed_forward.w3"] = ColwiseParallel()
    cross = hasattr(block, "cross_attention")
    if cross:  # wk/wv read the memory: full on every rank (a Replicate DTensor under SP, see _apply_ends)
        plan.update({"cross_attention.wq": ColwiseParallel(), "cross_attention.wk": ColwiseParallel(),
                     "cross_attention.wv": ColwiseParallel(),
                     "cross_attention.wo": RowwiseParallel(output_layouts=out)})
    if sequence_parallel:
        plan["attention_norm"] = SequenceParallel()
        plan["ffn_norm"] = SequenceParallel()
        # attention(x, rope, kv | mask): only x is laid out
        plan["attention"] = PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                               desired_input_layouts=(Replicate(), None, None))
        # feed_forward(x, cached) in the decoders (Block, DecoderBlock); feed_forward(x) in EncoderBlock
        rest = (None,) if isinstance(block, Block) else ()
        plan["feed_forward"] = PrepareModuleInput(input_layouts=(Shard(1), *rest),
                                                  desired_input_layouts=(Replicate(), *rest))
        if cross:  # cross_attention(x, (k, v), mask)
            plan["cross_norm"] = SequenceParallel()
            plan["cross_attention"] = PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                                         desired_input_layouts=(Replicate(), None, None))
    return plan


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool = True,
             loss_parallel: bool = False) -> None:
    """Lay `model` (a Transformer or one pipeline stage of it, an Encoder or an EncoderDecoder) out
    over `tp_mesh`, in place."""
    tp = tp_mesh.size()
    if loss_parallel and not sequence_parallel:
        raise ValueError("loss_parallel needs sequence_parallel (the output layer's input is the sequence split)")
    blocks = [block for _, layers in block_stacks(model) for block in layers.values()]
    for block in blocks:
        for attn in _attentions(block):
            if attn.n_heads % tp or attn.kv_heads % tp:
                raise ValueError(f"tp={tp} must divide n_heads={attn.n_heads} and kv_heads={attn.kv_heads}")
    if sequence_parallel:
        _apply_ends(model, tp_mesh, loss_parallel)
    for block in blocks:
        parallelize_module(block, tp_mesh, _block_plan(block, sequence_parallel))
        for attn in _attentions(block):
            attn.n_heads //= tp  # heads per rank: the .view(B, T, H, Hd) in forward sees local shapes
            attn.kv_heads //= tp


def _first_block_input(stack: nn.ModuleDict, n_inputs: int) -> PrepareModuleInput:
    """The first block of a stack takes its slice of the full (replicated) embedded sequence."""
    rest = (None,) * (n_inputs - 1)
    return PrepareModuleInput(input_layouts=(Replicate(), *rest), desired_input_layouts=(Shard(1), *rest),
                              use_local_output=True)  # the residual stream is plain


def _apply_ends(model: nn.Module, tp_mesh: DeviceMesh, loss_par: bool) -> None:
    """Embedding (vocab rows), final norm (sequence split) and output (vocab columns) of a stage that
    has them; an encoder-decoder's encoder ends and an encoder's masked-LM head (module docstring)."""
    plan: dict[str, object] = {}
    arch = model.config.arch
    if model.tok_embeddings is not None:
        if arch == "transformer" and getattr(model, "pos_embeddings", None) is None \
                and getattr(model, "pos_table", None) is None:
            # token ids replicated in; partial sums reduce-scattered into the sequence split
            plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
        else:
            # positions are added to (and the encdec families norm) the full sequence in forward: all-reduce
            # the embedding, then the first block of each stack takes its slice of the sequence (no communication)
            plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
            for prefix, layers in block_stacks(model):
                # Block / EncoderBlock: (x, rope, kv | mask); DecoderBlock: (x, rope, kv, memory, mask)
                n_inputs = 5 if hasattr(next(iter(layers.values())), "cross_attention") else 3
                plan[f"{prefix}{min(layers.keys(), key=int)}"] = _first_block_input(layers, n_inputs)
    if model.norm is not None:
        plan["norm"] = SequenceParallel()
    if arch == "encdec":
        plan["encoder.norm"] = SequenceParallel()
    if getattr(model, "mlm_head", None) is not None:
        # not replicated weights on the sequence split, as for a norm: torch 2.11's DTensor cannot run a
        # Linear that way ("Attempted to flatten multiple dimensions, with dimension 1 being sharded")
        plan["mlm_head.dense"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(1), use_local_output=False)
        plan["mlm_head.norm"] = SequenceParallel()
    if model.output is not None:
        plan["output"] = ColwiseParallel(input_layouts=Shard(1),
                                         output_layouts=Shard(-1) if loss_par else Replicate(),
                                         use_local_output=not loss_par)
    parallelize_module(model, tp_mesh, plan)
    if arch == "encdec":
        # the memory, gathered once for every decoder layer's cross-attention wk/wv
        parallelize_module(model, tp_mesh, {"encoder.norm": PrepareModuleOutput(
            output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=False)})
    tie = getattr(model, "_tie", None)
    if tie is not None:
        tie()  # tied embeddings: both modules now hold a Shard(0) DTensor of the table; make it one again


def loss_context(enabled: bool):
    """torch's loss_parallel() when the logits are vocabulary-split DTensors, else nothing."""
    return loss_parallel() if enabled else contextlib.nullcontext()


def full_logits(logits: torch.Tensor) -> torch.Tensor:
    """A plain (B, T, V) tensor from vocabulary-split DTensor logits (unchanged if already plain)."""
    return logits.full_tensor() if isinstance(logits, DTensor) else logits
