"""ParallelDims: degrees, mesh order, and validation messages that show the arithmetic."""

import dataclasses

import pytest

from clusterlm.errors import ConfigError
from clusterlm.models.config import get_preset
from clusterlm.parallel.dims import MESH_DIM_NAMES, ParallelDims, validate_layout

LLAMA8B = get_preset("llama-8b")  # 32 heads, 8 kv heads, 32 layers


def test_sizes_and_mesh_order():
    """world = 2*4*2*3 = 48, dp = 8; mesh dims outer->inner (pp, dp_replicate, dp_shard, tp)."""
    d = ParallelDims(dp_replicate=2, dp_shard=4, tp=2, pp=3)
    assert d.world_size == 48 and d.dp == 8 and d.model_parallel == 6
    assert MESH_DIM_NAMES == ("pp", "dp_replicate", "dp_shard", "tp")
    assert d.mesh_dims() == (("pp", 3), ("dp_replicate", 2), ("dp_shard", 4), ("tp", 2))
    assert ParallelDims(dp_shard=8).mesh_dims() == (("dp_shard", 8),)
    assert len(ParallelDims().mesh_dims(include_trivial=True)) == 4


def test_world_size_mismatch_message():
    """The message multiplies out the degrees: 1*2*3*1 = 6 != world size 4."""
    with pytest.raises(ConfigError, match=r"dp_replicate\*dp_shard\*tp\*pp = 1\*2\*3\*1 = 6 != world size 4"):
        ParallelDims(dp_shard=2, tp=3).validate(4, LLAMA8B, 0, 1, 128)


def test_tp_must_divide_heads():
    """tp=3 does not divide 32 heads (32 % 3 = 2); tp=16 divides 32 heads but not 8 kv heads (8 % 16 = 8)."""
    with pytest.raises(ConfigError, match=r"tp=3 must divide model.n_heads=32 \(32 % 3 = 2\)"):
        ParallelDims(tp=3).validate(3, LLAMA8B, 0, 1, 128)
    with pytest.raises(ConfigError, match=r"tp=16 must divide model.kv_heads=8 \(8 % 16 = 8\)"):
        ParallelDims(tp=16).validate(16, LLAMA8B, 0, 1, 128)


def test_pp_at_most_layers():
    """pp=64 > 32 layers."""
    with pytest.raises(ConfigError, match=r"pp=64 > model.n_layers=32"):
        ParallelDims(pp=64).validate(64, LLAMA8B, 0, 1, 128)


def test_global_batch_divisibility():
    """100000 tokens is not divisible by 4*1024*8 = 32768 (remainder 1696); 131072 = 4 accumulation steps."""
    d = ParallelDims(dp_shard=8)
    with pytest.raises(ConfigError, match=r"micro_batch\*seq_len\*dp = 4\*1024\*8 = 32768 \(remainder 1696\)"):
        d.validate(8, LLAMA8B, 100000, 4, 1024)
    d.validate(8, LLAMA8B, 131072, 4, 1024)
    assert d.grad_accum_steps(131072, 4, 1024) == 4
    assert d.grad_accum_steps(0, 4, 1024) == 1


def test_bad_degrees_and_rnn_tp():
    """Degrees must be integers >= 1; tp > 1 needs a transformer."""
    with pytest.raises(ConfigError, match="parallel.tp=0"):
        ParallelDims(tp=0)
    with pytest.raises(ConfigError, match="needs a transformer"):
        ParallelDims(tp=2).validate(2, get_preset("lstm-small", vocab_size=65), 0, 1, 64)


def test_1f1b_needs_a_pipeline_micro_batch_per_stage():
    """torch's Schedule1F1B refuses fewer pipeline micro-batches than stages, which each rank found only
    after the process group started: micro_batch 1 gives 1 for pp=2, and 9 gives 3 for pp=4 (its largest
    divisor <= 8); a multiple of pp, or GPipe, passes."""
    m = dataclasses.replace(LLAMA8B, tie_embeddings=False)
    with pytest.raises(ConfigError, match=r"pp=2 with pp_schedule='1f1b' needs at least 2 pipeline micro-batches "
                                          r".*train.micro_batch_size=1 splits into 1 .*e.g. train.micro_batch_size=2, "
                                          r"or parallel.pp_schedule='gpipe'"):
        validate_layout(ParallelDims(pp=2), m, 2, 0, 1, 128)
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=9 splits into 3 \(its largest divisor <= 2\*pp = 8\)"
                                          r"; use a multiple of 4, e.g. train.micro_batch_size=12"):
        validate_layout(ParallelDims(pp=4), m, 4, 0, 9, 128)
    for dims, mb in ((ParallelDims(pp=4), 5), (ParallelDims(pp=4), 12), (ParallelDims(pp=2, pp_schedule="gpipe"), 1)):
        validate_layout(dims, m, dims.world_size, 0, mb, 128)


def test_sequence_parallel_needs_seq_len_a_multiple_of_tp():
    """Sequence parallel splits (B, T, D) into tp equal sequence parts: seq_len 63 on tp=2 made gloo abort
    the ranks (mismatched all-gather sizes) -> refused with the remainder; plain TP, or TP under a
    pipeline (sequence parallel off there), takes it."""
    with pytest.raises(ConfigError, match=r"tp=2 with parallel.sequence_parallel=true .*train.seq_len=63 is not a "
                                          r"multiple of 2 \(63 % 2 = 1\); use e.g. train.seq_len=62, or "
                                          r"parallel.sequence_parallel=false"):
        ParallelDims(tp=2).validate(2, LLAMA8B, 0, 1, 63)
    ParallelDims(tp=2, sequence_parallel=False).validate(2, LLAMA8B, 0, 1, 63)
    ParallelDims(tp=2, pp=2).validate(4, LLAMA8B, 0, 2, 63)
    ParallelDims(tp=2).validate(2, LLAMA8B, 0, 1, 64)


def test_tp_must_divide_the_mlp_hidden_size():
    """w1/w3 are split by columns and w2 by rows: an MLP hidden size tp does not divide (a pruned model's,
    or a ffn_dim set by hand) failed in DTensor's matmul on every rank ('a and b must have same reduction
    dim, but got [128, 352] X [351, 128]') -> refused with the remainder."""
    m = dataclasses.replace(LLAMA8B, ffn_dim=14335)
    with pytest.raises(ConfigError, match=r"tp=2 must divide the MLP hidden size 14335 \(model.ffn_dim, .*"
                                          r"\(14335 % 2 = 1\)"):
        ParallelDims(tp=2).validate(2, m, 0, 1, 128)
    ParallelDims(tp=2).validate(2, LLAMA8B, 0, 1, 128)  # 14336
    ParallelDims(dp_shard=2).validate(2, m, 0, 1, 128)
