"""The planner's accounting for the encoder and encoder-decoder families (cluster/flops.py,
memory.py, steptime.py): parameter tensors, FLOPs per token consistent with the per-op GEMM list,
the full-square attention cores, and which layouts the search offers."""

from __future__ import annotations

import itertools

import pytest
import torch

from clusterlm.cluster import flops, memory, planner, steptime
from clusterlm.models.build import build_model
from clusterlm.models.config import ModelConfig
from clusterlm.parallel.dims import ParallelDims
from tests.unit.test_planner import FLAT, cpu_spec


def _cfg(arch: str, **kw) -> ModelConfig:
    base = dict(vocab_size=512, n_layers=2, dim=64, n_heads=4, max_seq_len=32)
    if arch == "encdec":
        base["n_enc_layers"] = 3
    return ModelConfig(arch=arch, **{**base, **kw})


@pytest.mark.parametrize("arch,pos,bias,norm,mlp,tie", list(itertools.product(
    ("transformer", "encoder", "encdec"), ("learned", "rope", "sinusoidal"), (True, False),
    ("layernorm", "rmsnorm"), ("gelu", "swiglu"), (True, False))))
def test_param_tensors_match_the_built_model(arch, pos, bias, norm, mlp, tie):
    cfg = _cfg(arch, pos=pos, bias=bias, norm=norm, mlp=mlp, tie_embeddings=tie)
    with torch.device("meta"):
        model = build_model(cfg)
    assert steptime.param_tensors(cfg) == len(list(model.parameters()))


@pytest.mark.parametrize("arch", ["transformer", "encoder", "encdec"])
def test_gemm_list_agrees_with_6n_per_token(arch):
    """The per-op model's linear GEMMs of one micro-batch are 6*N FLOPs per token (N from flops_per_token,
    which also counts the norms' weights: under 0.5% here)."""
    cfg = _cfg(arch)
    B, T = 4, 32
    f = flops.training_flops_per_token(cfg, T)
    work = flops.step_work(cfg, B, T)
    assert sum(g.flops for g in work.gemms) == pytest.approx(f.dense * B * T, rel=5e-3)


def test_attention_terms_count_every_core():
    """encoder: one full-square core per layer; encdec: encoder self (full), decoder self (causal), cross (full)."""
    T, B = 32, 4
    enc, ed, dec = _cfg("encoder"), _cfg("encdec"), _cfg("transformer")
    Hd, H = 16, 4
    per_core = 7 * 2 * T * T * Hd * B * H  # fwd + bwd GEMM-equivalents over the full square
    assert sum(a.flops for a in flops.step_work(dec, B, T).attentions) == pytest.approx(2 * per_core * (T + 1) / (2 * T))
    assert sum(a.flops for a in flops.step_work(enc, B, T).attentions) == pytest.approx(2 * per_core)
    cores = {a.name: (a.layers, a.causal) for a in flops.step_work(ed, B, T).attentions}
    assert cores == {"self-attention": (2, True), "cross-attention": (2, False), "encoder self-attention": (3, False)}
    # the analytic MFU convention: 12*(L_enc + 2*L_dec)*D*T per token
    assert flops.training_flops_per_token(ed, T).attention == 12 * (3 + 2 * 2) * 64 * T
    assert "source of the same length" in flops.training_flops_per_token(ed, T).convention


def test_memory_counts_the_encoder_and_cross_attention():
    dims = ParallelDims()
    kw = dict(micro_batch=8, seq_len=32, dtype="fp32")
    ed = memory.estimate_memory(_cfg("encdec"), dims, **kw)
    names = {it.name: it.bytes for it in ed.items}
    per_layer, _ = memory.layer_activation_bytes(_cfg("encdec"), 32, 8, dtype="fp32")
    assert names["encoder_activations"] == pytest.approx(3 * per_layer + 32 * 8 * 64 * 4)
    assert names["cross_attention_activations"] > 0
    dec = memory.estimate_memory(_cfg("transformer"), dims, **kw)
    assert ed.peak_bytes > dec.peak_bytes


def test_search_offers_fsdp_and_tp_but_no_pipeline_for_the_new_families():
    pruned: list = []
    layouts = planner._dims_options(4, 4, _cfg("encdec"), pruned)
    assert any(d.tp == 2 for d in layouts) and any(d.dp_shard == 4 for d in layouts)
    assert all(d.pp == 1 for d in layouts)
    assert any("pipeline parallel splits decoder-only stacks" in p.reason for p in pruned)
    assert not any(d.tp > 1 or d.dp_shard > 1 for d in planner._dims_options(4, 4, ModelConfig(
        arch="lstm", vocab_size=64, pos="none"), []))


def test_plan_runs_for_an_encoder_decoder_with_the_op_model():
    spec = cpu_spec(**FLAT)
    c = planner.plan(_cfg("encdec"), spec, seq_len=32, global_batch_tokens=256, dtype="fp32", micro_batches=(8,),
                     recompute_modes=("none",))[0]
    assert {"gemm", "attention", "memory_ops", "loss"} <= set(c.time_parts)
    text = planner.explain(c)
    assert "cross-attention" in text and "encoder self-attention" in text
