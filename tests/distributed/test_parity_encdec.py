"""The encoder-decoder and the masked-LM encoder (models/encdec.py) under every data/tensor parallel
layout against one process, on CPU with gloo (run_ranks spawns the ranks).

One spawn of 2 ranks runs 3 AdamW steps of each family under DDP x2, FSDP x2, TP x2 (sequence and
loss parallel, the default), TP x2 without sequence parallel, and with activation checkpointing; a
second configuration of each family (rotary or sinusoidal positions, RMSNorm, SwiGLU, grouped-query
attention, untied output) under TP x2 and FSDP x2; sharded initialisation; the sequence-parallel
layout; DCP checkpoints saved under one layout and loaded under another (and on one process). The
single-process references run in the test process. The batches hold padded sources (a key mask) and ignored label positions (-100), arranged so
that both data-parallel halves score the same number of tokens (the mean of the per-rank mean losses
is then the global mean).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from clusterlm.config import OptimConfig
from clusterlm.eval.metrics import IGNORE_INDEX
from clusterlm.models.config import ModelConfig
from clusterlm.parallel.dims import ParallelDims
from tests.distributed.helpers import run_ranks

pytestmark = pytest.mark.slow  # one spawn of 2 ranks, ~30 s on 2 cores

B, S, T, V = 8, 12, 10, 64  # global batch, source length, target length, vocabulary
STEPS = 3
TOL = 1e-5

CONFIGS = {
    # BART-like: learned positions, LayerNorm, GELU, biases, tied embeddings
    "encdec": dict(arch="encdec", n_layers=2, n_enc_layers=3, pos="learned", bias=True),
    # T5/Llama-like parts: rotary, RMSNorm, SwiGLU, grouped-query attention, untied output
    "encdec_rope": dict(arch="encdec", n_layers=2, n_enc_layers=1, pos="rope", norm="rmsnorm", mlp="swiglu",
                        n_kv_heads=2, tie_embeddings=False, ffn_multiple=32),
    # BERT/RoBERTa-like: learned positions, LayerNorm, GELU, biases, tied output with a bias
    "encoder": dict(arch="encoder", n_layers=2, pos="learned", bias=True),
    "encoder_sin": dict(arch="encoder", n_layers=2, pos="sinusoidal", norm="rmsnorm", mlp="swiglu", n_kv_heads=2,
                        ffn_multiple=32),
}


def cfg_of(name: str) -> ModelConfig:
    return ModelConfig(vocab_size=V, dim=32, n_heads=4, max_seq_len=32, **CONFIGS[name])


def batch(arch: str, seed: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """(model inputs, labels) of a global batch. The padding / masking pattern of the first B/2 rows
    repeats in the last B/2, so each data-parallel half scores the same number of tokens."""
    g = torch.Generator().manual_seed(seed)
    half = B // 2
    if arch == "encdec":
        src = torch.randint(1, V, (B, S), generator=g)
        src_len = torch.randint(S // 2, S + 1, (half,), generator=g).repeat(2)  # (B,)
        src_mask = torch.arange(S)[None, :] < src_len[:, None]  # (B, S): right-padded sources
        src = src.masked_fill(~src_mask, 0)
        tgt = torch.randint(1, V, (B, T + 1), generator=g)
        tgt_len = torch.randint(T // 2, T + 1, (half,), generator=g).repeat(2)
        labels = tgt[:, 1:].masked_fill(torch.arange(T)[None, :] >= tgt_len[:, None], IGNORE_INDEX)
        return (src, tgt[:, :-1], src_mask), labels  # EncoderDecoder.forward(src, tgt, src_mask)
    ids = torch.randint(1, V, (B, S), generator=g)
    masked = (torch.rand((half, S), generator=g) < 0.3).repeat(2, 1)  # (B, S)
    masked[:, 0] = True  # every row scores at least one token
    labels = ids.masked_fill(~masked, IGNORE_INDEX)
    return (ids.masked_fill(masked, 1),), labels  # id 1 stands for [MASK]


def token_sum_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The fine-tuning objectives' form of the loss (finetune/setup.py TokenSumLoss): a sum over the
    scored tokens, scaled to the mean over the global batch's (both halves score the same number)"""
    from clusterlm.eval.metrics import lm_loss

    n = int((targets != IGNORE_INDEX).sum())
    return lm_loss(logits, targets, reduction="sum") / n


def build(pc: ParallelDims, mcfg: ModelConfig, micro_batch: int = B, seed: int = 0, loss_fn=None):
    from clusterlm.eval.metrics import lm_loss
    from clusterlm.parallel.mesh import build_mesh
    from clusterlm.parallel.dims import validate_layout
    from clusterlm.parallel.parallelize import build_parallel_model

    validate_layout(pc, mcfg, max(pc.world_size, 1), B * T, micro_batch, T)
    mesh = build_mesh(pc, "cpu") if pc.world_size > 1 else None
    return build_parallel_model(mcfg, pc, mesh, torch.device("cpu"), seed=seed, micro_batch=micro_batch,
                                loss_fn=loss_fn or lm_loss)


def rows(pm, t: torch.Tensor) -> torch.Tensor:
    """this rank's data-parallel slice of a global batch"""
    b = t.shape[0] // pm.coords.dims.dp
    return t[pm.coords.dp_rank * b:(pm.coords.dp_rank + 1) * b]


def train_steps(name: str, pc: ParallelDims, loss_fn=None) -> list[list[float]]:
    """(loss, grad norm) of STEPS AdamW steps, each on a new batch"""
    from clusterlm.train.optim import build_optimizer

    mcfg = cfg_of(name)
    pm = build(pc, mcfg, micro_batch=B // pc.dp, loss_fn=loss_fn)
    opt = build_optimizer(pm.module, OptimConfig(lr=3e-3, weight_decay=0.1), fused=pm.fused_optimizer_ok and None)
    out = []
    for s in range(STEPS):
        x, y = batch(mcfg.arch, s)
        loss = float(pm.mean_over_dp(pm.forward_backward(tuple(rows(pm, t) for t in x), rows(pm, y))))
        out.append([loss, pm.clip_grad_norm_(1.0)])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


LAYOUTS = [  # (result key, model config, layout)
    *[(f"{m}_{lay}", m, kw) for m in ("encdec", "encoder") for lay, kw in (
        ("ddp", dict(dp_replicate=2)), ("fsdp", dict(dp_shard=2)), ("tp", dict(tp=2)),
        ("tp_no_sp", dict(tp=2, sequence_parallel=False)))],
    ("encdec_fsdp_selective_ac", "encdec", dict(dp_shard=2, activation_checkpointing="selective")),
    ("encoder_tp_full_ac", "encoder", dict(tp=2, activation_checkpointing="full")),
    ("encdec_rope_tp", "encdec_rope", dict(tp=2)), ("encdec_rope_fsdp", "encdec_rope", dict(dp_shard=2)),
    ("encoder_sin_tp", "encoder_sin", dict(tp=2)), ("encoder_sin_fsdp", "encoder_sin", dict(dp_shard=2)),
]


def sharded_init(name: str, pc: ParallelDims) -> dict[str, list[float]]:
    """(sum, sum of squares) of every parameter's full value after init_sharded"""
    from torch.distributed.tensor import DTensor

    from clusterlm.parallel.ac import clean_name

    pm = build(pc, cfg_of(name), micro_batch=B // pc.dp)
    out = {}
    for n, p in pm.module.named_parameters():
        full = p.full_tensor() if isinstance(p, DTensor) else p.detach()
        out[clean_name(n)] = [float(full.double().sum()), float(full.double().square().sum())]
    return out


def sp_layout(name: str) -> dict:
    """What a rank holds under TP x2 with sequence parallel: rows of the residual stream at each
    stack's norms, what cross-attention's wk reads (placement, rows), whether the logits stay split"""
    from torch.distributed.tensor import DTensor

    mcfg = cfg_of(name)
    pm = build(ParallelDims(tp=2), mcfg)
    seen: dict = {}

    def rows_of(key: str):
        def hook(module, inputs, out) -> None:
            t = out if key.endswith("norm") else inputs[0]
            local = t.to_local() if isinstance(t, DTensor) else t
            seen.setdefault(key, [str(t.placements[0]) if isinstance(t, DTensor) else "plain", local.shape[1]])
        return hook

    m = pm.module
    m.layers["0"].attention_norm.register_forward_hook(rows_of("attention_norm"))
    if mcfg.arch == "encdec":
        m.encoder.layers["0"].attention_norm.register_forward_hook(rows_of("encoder_attention_norm"))
        m.encoder.norm.register_forward_hook(rows_of("encoder_norm"))  # the memory every wk/wv reads
    else:
        m.mlm_head.norm.register_forward_hook(rows_of("mlm_head_norm"))
    x, _ = batch(mcfg.arch, 0)
    with torch.no_grad():
        logits = pm.wrapped(*x)
    seen["logits_split"] = isinstance(logits, DTensor) and logits.to_local().shape[-1] == V // 2
    return seen


def logits_of(pm, arch: str) -> list:
    x, _ = batch(arch, 99)
    with torch.no_grad():
        return pm.inference_module(*(t[:2] for t in x)).tolist()  # (2, T, V), every rank the full batch


def dcp_roundtrip(name: str, save_pc: ParallelDims, load_pc: ParallelDims, root: str) -> dict:
    """A DCP checkpoint saved under one layout after one AdamW step, loaded under another into a model
    initialised from another seed: the logits before the save and after the load"""
    from pathlib import Path

    from clusterlm.checkpoint.distributed import load_distributed, save_distributed
    from clusterlm.train.optim import build_optimizer

    mcfg = cfg_of(name)
    oc = OptimConfig(lr=1e-2, weight_decay=0.1)
    pm = build(save_pc, mcfg, micro_batch=B // save_pc.dp)
    opt = build_optimizer(pm.module, oc, fused=pm.fused_optimizer_ok and None)
    x, y = batch(mcfg.arch, 0)
    pm.forward_backward(tuple(rows(pm, t) for t in x), rows(pm, y))
    opt.step()
    opt.zero_grad(set_to_none=True)
    path = save_distributed(Path(root) / name, 1, pm.module, opt, train_state={"step": 1}, config_toml="")
    out = {"saved": logits_of(pm, mcfg.arch)}
    pm = build(load_pc, mcfg, micro_batch=B // load_pc.dp, seed=123)
    opt = build_optimizer(pm.module, oc, fused=pm.fused_optimizer_ok and None)
    out["state"] = load_distributed(path, pm.module, opt)
    out["loaded"] = logits_of(pm, mcfg.arch)
    return out


def _two_ranks(rank: int, world: int, ckpt_root: str) -> dict:
    out = {key: train_steps(name, ParallelDims(**kw)) for key, name, kw in LAYOUTS}
    # a summed token loss (the fine-tuning objectives' form) under loss parallel
    out["encdec_tp_token_sum"] = train_steps("encdec", ParallelDims(tp=2), token_sum_loss)
    out["encoder_tp_token_sum"] = train_steps("encoder", ParallelDims(tp=2), token_sum_loss)
    out["sp_encdec"] = sp_layout("encdec")
    out["sp_encoder"] = sp_layout("encoder")
    out["dcp_encdec"] = dcp_roundtrip("encdec", ParallelDims(tp=2), ParallelDims(dp_shard=2), ckpt_root)
    out["dcp_encoder"] = dcp_roundtrip("encoder", ParallelDims(dp_shard=2), ParallelDims(tp=2), ckpt_root)
    out["init_encdec_tp"] = sharded_init("encdec", ParallelDims(tp=2))
    out["init_encoder_fsdp"] = sharded_init("encoder", ParallelDims(dp_shard=2))
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return root, run_ranks(2, _two_ranks, str(root))


def test_steps_match_single_process(two):
    """3 AdamW steps of an encoder-decoder and of a masked-LM encoder under DDP x2, FSDP x2, TP x2 (with
    and without sequence parallel) and with activation checkpointing give one process's loss and
    gradient norm at every step (fp32, 1e-5): the same forward, the same gradients, the same updates;
    so does a summed token loss (the fine-tuning objectives' form) under TP x2's loss parallel."""
    refs = {name: train_steps(name, ParallelDims()) for name in CONFIGS}
    for r in two[1]:
        for key, name, _ in LAYOUTS:
            for s, (got, want) in enumerate(zip(r[key], refs[name])):
                assert got == pytest.approx(want, rel=TOL, abs=TOL), f"{key} step {s + 1}"
        for name in ("encdec", "encoder"):  # a summed loss under TP x2's loss parallel: the same steps
            for s, (got, want) in enumerate(zip(r[f"{name}_tp_token_sum"], refs[name])):
                assert got == pytest.approx(want, rel=TOL, abs=TOL), f"{name} token sum step {s + 1}"
    for name, ref in refs.items():
        assert ref[0][0] == pytest.approx(4.16, abs=0.3), name  # ~ln(64) at init: really untrained
        assert ref[-1][0] != ref[0][0]


def test_sequence_parallel_layout(two):
    """Under TP x2 with sequence parallel each rank's residual stream holds half the sequence in both
    stacks (and in the masked-LM head), the memory that cross-attention's wk/wv read is gathered once
    after the encoder's final norm (a Replicate DTensor), and the logits stay split over the vocabulary."""
    for r in two[1]:
        assert r["sp_encdec"] == {"attention_norm": ["S(1)", T // 2], "encoder_attention_norm": ["S(1)", S // 2],
                                  "encoder_norm": ["R", S], "logits_split": True}
        assert r["sp_encoder"] == {"attention_norm": ["S(1)", S // 2], "mlm_head_norm": ["S(1)", S // 2],
                                   "logits_split": True}


def test_sharded_init_equals_single_process(two):
    """init_sharded fills TP- and FSDP-sharded encdec/encoder parameters with the values init_weights
    gives the whole model on one process (every parameter's sum and sum of squares, 1e-6)."""
    from clusterlm.models.build import build_model

    for name, key in (("encdec", "init_encdec_tp"), ("encoder", "init_encoder_fsdp")):
        model = build_model(cfg_of(name))
        model.init_weights(0)
        want = {n: [float(p.detach().double().sum()), float(p.detach().double().square().sum())]
                for n, p in model.named_parameters()}
        for r in two[1]:
            assert r[key].keys() == want.keys()
            for n, v in want.items():
                assert r[key][n] == pytest.approx(v, rel=1e-6, abs=1e-6), n


def test_dcp_checkpoint_across_layouts_and_one_process(two):
    """A DCP checkpoint of an encdec model saved under TP x2 loads under FSDP x2, and one of an encoder
    saved under FSDP x2 loads under TP x2, with the logits of the saved model (1e-5); both load on one
    process too, and their model.safetensors (for eval/generate/export) holds the loaded weights."""
    from safetensors.torch import load_file

    from clusterlm.checkpoint.distributed import load_distributed
    from clusterlm.models.build import build_model

    root, results = two
    for name, key in (("encdec", "dcp_encdec"), ("encoder", "dcp_encoder")):
        r = results[0][key]
        assert r["state"] == {"step": 1}
        want = torch.tensor(r["saved"])
        torch.testing.assert_close(torch.tensor(r["loaded"]), want, rtol=0, atol=TOL)
        model = build_model(cfg_of(name))
        model.init_weights(5)
        with warnings.catch_warnings():  # one process loading a sharded checkpoint: no torch warning
            warnings.simplefilter("error")
            load_distributed(root / name / "step-00000001", model, None)
        x, _ = batch(cfg_of(name).arch, 99)
        with torch.no_grad():
            torch.testing.assert_close(model(*(t[:2] for t in x)), want, rtol=0, atol=TOL)
        full = load_file(str(root / name / "step-00000001" / "model.safetensors"))
        assert full.keys() == model.state_dict().keys()
        for k, v in model.state_dict().items():
            assert torch.equal(full[k], v), k


def test_pipeline_parallel_is_refused():
    """pp > 1 for the encoder families is a ConfigError naming the option (no model is built)."""
    from clusterlm.errors import ConfigError
    from clusterlm.parallel.dims import validate_layout

    for name in ("encdec", "encoder"):
        with pytest.raises(ConfigError, match=r"parallel.pp=2: pipeline parallel .* model.arch="):
            validate_layout(ParallelDims(pp=2), cfg_of(name), 2, B * T, B, T)
