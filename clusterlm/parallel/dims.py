"""Parallel degrees of a run: data-parallel (replicate x shard), tensor, pipeline. Torch-free.

    >>> from clusterlm.parallel.dims import ParallelDims
    >>> dims = ParallelDims(dp_replicate=2, dp_shard=4)
    >>> dims.world_size, dims.dp
    (8, 8)
    >>> dims.mesh_dims()          # (name, size) outer -> inner, size-1 dims left out
    (('dp_replicate', 2), ('dp_shard', 4))

It is also the run config's `[parallel]` section (`RunConfig.parallel`): the degrees, the
activation recompute mode, the pipeline schedule and sequence parallel, with the batch
arithmetic (`grad_accum_steps`) and the layout checks (`validate`) in one place.

dp_replicate replicates the model (DDP; across nodes in HSDP), dp_shard shards parameters,
gradients and optimizer state (FSDP/ZeRO-3); dp = dp_replicate * dp_shard ranks see different
data. tp splits each layer's matrices (Megatron column/row with sequence parallel), pp splits the
layers into stages.

The device mesh is laid out outer -> inner as MESH_DIM_NAMES = (pp, dp_replicate, dp_shard, tp),
torchtitan's order: the innermost dimension gets consecutive ranks, so tp (a collective in every
layer) stays inside a node, then FSDP's all-gathers, while replicas and pipeline stages (one
collective per step, or point-to-point sends) may cross nodes. The mesh itself is built with
torch in clusterlm.parallel, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from clusterlm.errors import ConfigError
from clusterlm.models.config import TRANSFORMER_ARCHS, ModelConfig

MESH_DIM_NAMES: tuple[str, ...] = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int = 1
    """model replicas (DDP; HSDP's replicate dimension)"""
    dp_shard: int = 1
    """ranks that shard parameters, gradients and optimizer state (FSDP)"""
    tp: int = 1
    """tensor-parallel degree (splits heads and MLP columns; sequence parallel for norms)"""
    pp: int = 1
    """pipeline stages"""
    activation_checkpointing: Literal["none", "selective", "full"] = "none"
    """none, selective (keep matmul/attention outputs, recompute the rest) or full (recompute each block)"""
    pp_schedule: Literal["1f1b", "gpipe"] = "1f1b"
    """pipeline schedule when pp > 1: 1f1b (activation memory of pp micro-batches) or gpipe"""
    sequence_parallel: bool = True
    """with tp > 1: split norms/residuals over the sequence and the loss over the vocabulary (docs/distributed.md)"""

    def __post_init__(self) -> None:
        for name in MESH_DIM_NAMES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"parallel.{name}={value!r} must be an integer >= 1")
        for name, allowed in (("activation_checkpointing", ("none", "selective", "full")),
                              ("pp_schedule", ("1f1b", "gpipe"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"parallel.{name}={getattr(self, name)!r}; expected one of {', '.join(allowed)}")

    # ---- derived ------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.dp_replicate * self.dp_shard * self.tp * self.pp

    @property
    def dp(self) -> int:
        """ranks that see different data: dp_replicate * dp_shard"""
        return self.dp_replicate * self.dp_shard

    @property
    def model_parallel(self) -> int:
        """ranks that together hold one copy of the model: tp * pp"""
        return self.tp * self.pp

    @property
    def dp_wrapper(self) -> str:
        """The data-parallel wrapper the trainer puts on the model (parallel/parallelize.py; the planner's
        memory estimate follows it): "ddp" for pure replication, "fsdp" (FSDP2 on a replicate x shard mesh)
        wherever data parallel meets sharding, tp or pp, even with dp_shard = 1; "none" without data parallel."""
        if self.dp == 1:
            return "none"
        return "ddp" if self.dp_shard == 1 and self.model_parallel == 1 else "fsdp"

    def mesh_dims(self, include_trivial: bool = False) -> tuple[tuple[str, int], ...]:
        """(name, size) in mesh order, outer -> inner; size-1 dimensions dropped unless asked for."""
        return tuple((n, getattr(self, n)) for n in MESH_DIM_NAMES if include_trivial or getattr(self, n) > 1)

    def describe(self) -> str:
        return "*".join(f"{n}={getattr(self, n)}" for n in ("dp_replicate", "dp_shard", "tp", "pp"))

    # ---- batch arithmetic ---------------------------------------------------------------------
    def tokens_per_micro_step(self, micro_batch: int, seq_len: int) -> int:
        """tokens that one forward/backward over all data-parallel ranks processes"""
        return micro_batch * seq_len * self.dp

    def grad_accum_steps(self, global_batch_tokens: int, micro_batch: int, seq_len: int) -> int:
        """micro-batches per rank per optimizer step (0 tokens = one micro-batch, TrainConfig's rule)"""
        per = self.tokens_per_micro_step(micro_batch, seq_len)
        if global_batch_tokens == 0:
            return 1
        if global_batch_tokens % per:
            raise ConfigError(self._batch_message(global_batch_tokens, micro_batch, seq_len))
        return global_batch_tokens // per

    def _batch_message(self, global_batch_tokens: int, micro_batch: int, seq_len: int) -> str:
        per = self.tokens_per_micro_step(micro_batch, seq_len)
        return (f"global_batch_tokens={global_batch_tokens} is not divisible by micro_batch*seq_len*dp = "
                f"{micro_batch}*{seq_len}*{self.dp} = {per} (remainder {global_batch_tokens % per}); "
                f"use a multiple of {per}, e.g. {max(per, global_batch_tokens // per * per)}")

    # ---- validation ---------------------------------------------------------------------------
    def validate(self, world_size: int, model: ModelConfig, global_batch_tokens: int,
                 micro_batch: int, seq_len: int) -> None:
        """Raise ConfigError, with the arithmetic, if this layout cannot run `model` on `world_size` ranks."""
        found = self.problems(world_size, model, global_batch_tokens, micro_batch, seq_len)
        if found:
            raise ConfigError(found[0])

    def problems(self, world_size: int, model: ModelConfig, global_batch_tokens: int,
                 micro_batch: int | None, seq_len: int) -> list[str]:
        """Every reason, with the arithmetic, this layout cannot run `model` on `world_size` ranks (the
        first is what `validate` raises; the planner counts them all). micro_batch=None: the layout
        alone, no batch arithmetic."""
        out = []
        if self.world_size != world_size:
            out.append(f"dp_replicate*dp_shard*tp*pp = {self.dp_replicate}*{self.dp_shard}*{self.tp}*{self.pp} = "
                       f"{self.world_size} != world size {world_size}")
        batch_ok = micro_batch is not None and micro_batch >= 1 and seq_len >= 1 and global_batch_tokens >= 0
        if micro_batch is not None and not batch_ok:
            out.append(f"micro_batch={micro_batch} and seq_len={seq_len} must be >= 1, "
                       f"global_batch_tokens={global_batch_tokens} >= 0")
        if self.tp > 1:
            if model.arch not in TRANSFORMER_ARCHS:
                out.append(f"tp={self.tp} needs a transformer (arch transformer, encoder or encdec); "
                           f"model.arch={model.arch!r} has no heads to split")
            else:
                for name, heads in (("n_heads", model.n_heads), ("kv_heads", model.kv_heads)):
                    if heads % self.tp:
                        out.append(f"tp={self.tp} must divide model.{name}={heads} "
                                   f"({heads} % {self.tp} = {heads % self.tp})")
                        break
                hidden = model.hidden_dim  # w1/w3 split by columns, w2 by rows: equal shares of the MLP units
                if hidden % self.tp:
                    out.append(f"tp={self.tp} must divide the MLP hidden size {hidden} (model.ffn_dim, else from "
                               f"model.dim and ffn_multiple) ({hidden} % {self.tp} = {hidden % self.tp})")
            # sequence parallel splits the residual stream (B, T/tp, D) into equal parts (switched off under pp > 1):
            # an uneven split mismatches the ranks' all-gathers (gloo aborts the process, NCCL would hang)
            if self.sequence_parallel and self.pp == 1 and seq_len % self.tp:
                out.append(f"tp={self.tp} with parallel.sequence_parallel=true splits the sequence into {self.tp} equal "
                           f"parts: train.seq_len={seq_len} is not a multiple of {self.tp} ({seq_len} % {self.tp} = "
                           f"{seq_len % self.tp}); use e.g. train.seq_len={seq_len - seq_len % self.tp or self.tp}, "
                           f"or parallel.sequence_parallel=false")
        if self.pp > model.n_layers:
            out.append(f"pp={self.pp} > model.n_layers={model.n_layers}: each stage needs at least one layer")
        if seq_len > model.max_seq_len:
            out.append(f"seq_len={seq_len} > model.max_seq_len={model.max_seq_len}")
        if batch_ok and self.pp > 1 and self.pp_schedule == "1f1b":
            n_mb = pipeline_microbatches(micro_batch, self.pp)
            if n_mb < self.pp:  # torch's Schedule1F1B refuses fewer micro-batches than stages, on every rank
                out.append(f"pp={self.pp} with pp_schedule='1f1b' needs at least {self.pp} pipeline micro-batches (one "
                           f"per stage) in each micro-batch: train.micro_batch_size={micro_batch} splits into {n_mb} "
                           f"(its largest divisor <= 2*pp = {2 * self.pp}); use a multiple of {self.pp}, e.g. "
                           f"train.micro_batch_size={-(-micro_batch // self.pp) * self.pp}, or parallel.pp_schedule='gpipe'")
        if batch_ok and global_batch_tokens % self.tokens_per_micro_step(micro_batch, seq_len):
            out.append(self._batch_message(global_batch_tokens, micro_batch, seq_len))
        return out


def validate_layout(dims: ParallelDims, mcfg: ModelConfig, world_size: int, global_batch_tokens: int,
                    micro_batch: int, seq_len: int) -> ParallelDims:
    """ParallelDims.validate plus what this implementation supports; raises before any model is built
    (torch-free, so `launch --slurm` checks a layout on a login node without torch)."""
    found = layout_problems(dims, mcfg, world_size, global_batch_tokens, micro_batch, seq_len)
    if found:
        raise ConfigError(found[0])
    return dims


def layout_problems(dims: ParallelDims, mcfg: ModelConfig, world_size: int, global_batch_tokens: int,
                    micro_batch: int | None, seq_len: int) -> list[str]:
    """Every reason validate_layout would refuse this layout, in its order (it raises the first);
    micro_batch=None leaves the batch arithmetic out."""
    out = dims.problems(world_size, mcfg, global_batch_tokens, micro_batch, seq_len)
    if mcfg.labels and (dims.tp > 1 or dims.pp > 1):
        out.append(f"a classifier (model.labels) trains with data parallel only (DDP or FSDP): set "
                   f"parallel.tp=1 and parallel.pp=1 (got {dims.describe()})")
    attention = mcfg.arch in TRANSFORMER_ARCHS
    if not attention and (dims.dp_shard > 1 or dims.tp > 1 or dims.pp > 1):
        out.append(f"model.arch={mcfg.arch!r} trains with data parallel replication only (DDP): "
                   f"set parallel.dp_replicate={world_size} and dp_shard=tp=pp=1 (got {dims.describe()})")
    if not attention and dims.activation_checkpointing != "none":
        out.append(f"activation checkpointing works on transformer blocks; model.arch={mcfg.arch!r}")
    if mcfg.arch in ("encoder", "encdec") and dims.pp > 1:
        # the stages would have to pass the encoder's output (and the source mask) to every decoder stage
        out.append(f"parallel.pp={dims.pp}: pipeline parallel splits the decoder-only transformer only; "
                   f"model.arch={mcfg.arch!r} trains with parallel.pp=1 (DDP, FSDP and TP work)")
    if dims.pp > 1 and mcfg.tie_embeddings:
        out.append(f"pp={dims.pp} with model.tie_embeddings=true: the tied embedding/output weight would "
                   "live on the first and last stages; set model.tie_embeddings=false")
    return out


def pipeline_microbatches(micro_batch: int, pp: int) -> int:
    """Pipeline micro-batches one schedule call splits a rank's micro-batch into: the largest divisor of
    micro_batch <= 2*pp (parallel/pp.py builds the schedule with it; each gradient-accumulation
    micro-batch is its own schedule call, so the planner's pipeline memory and bubble count these)."""
    return max(d for d in range(1, min(micro_batch, 2 * pp) + 1) if micro_batch % d == 0)
