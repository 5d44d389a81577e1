"""Every parallel layout against one process, on CPU with gloo (run_ranks spawns the ranks).

One spawn of 2 ranks checks DDP, FSDP, TP, PP (GPipe and 1F1B), 20 DDP steps against gradient
accumulation, and a checkpoint saved under FSDP x2 and loaded under TP x2; one spawn of 4 ranks
checks FSDP x2 + TP x2 and HSDP 2x2. The single-process references run in the test process.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clusterlm.config import OptimConfig
from clusterlm.parallel.dims import ParallelDims
from clusterlm.models.config import get_preset
from tests.distributed.helpers import run_ranks

pytestmark = pytest.mark.slow  # ~65 s on 2 cores: two spawns (2 and 4 ranks)

B, T, V = 8, 16, 64  # global batch, sequence length, vocabulary
TOL = 1e-5


def model_cfg():
    # untied embeddings so the same model also runs pipeline-parallel (see validate_layout)
    return dataclasses.replace(get_preset("llama-nano", vocab_size=V), tie_embeddings=False, max_seq_len=32)


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def gpt_cfg():
    # GPT-2 family: learned positions, LayerNorm, GELU, tied embeddings (TP splits the tied table once)
    return dataclasses.replace(get_preset("gpt-nano", vocab_size=V), max_seq_len=32)


def lstm_cfg():
    return dataclasses.replace(get_preset("lstm-small", vocab_size=V), dim=64, dropout=0.0)


def build(pc: ParallelDims, seed: int = 0, micro_batch: int = B, schedule: str = "1f1b", mcfg=None):
    from clusterlm.parallel.mesh import build_mesh
    from clusterlm.eval.metrics import lm_loss
    from clusterlm.parallel.parallelize import build_parallel_model

    mesh = build_mesh(pc, "cpu") if pc.world_size > 1 else None
    return build_parallel_model(mcfg or model_cfg(), pc, mesh, torch.device("cpu"), seed=seed,
                                micro_batch=micro_batch, loss_fn=lm_loss, pp_schedule=schedule)


def rows(pm, x: torch.Tensor) -> torch.Tensor:
    """this rank's data-parallel slice of a global batch"""
    b = x.shape[0] // pm.coords.dims.dp
    return x[pm.coords.dp_rank * b:(pm.coords.dp_rank + 1) * b]


def one_step(pc: ParallelDims, schedule: str = "1f1b", lstm: bool = False, gpt: bool = False) -> list[float]:
    """(loss, grad norm) of one forward/backward on the global batch"""
    x, y = batch()
    pm = build(pc, micro_batch=B // (pc.dp_replicate * pc.dp_shard), schedule=schedule,
               mcfg=lstm_cfg() if lstm else gpt_cfg() if gpt else None)
    loss = float(pm.mean_over_dp(pm.forward_backward(rows(pm, x), rows(pm, y))))
    return [loss, pm.clip_grad_norm_(1.0)]


def sequence_parallel_layout(pc: ParallelDims) -> dict:
    """What a rank holds under TP: the norm's output rows (sequence split or not) and the logits' type"""
    from torch.distributed.tensor import DTensor

    pm = build(pc)
    seen = {}

    def hook(module, inputs, out) -> None:
        seen.setdefault("norm_rows", (out.to_local() if isinstance(out, DTensor) else out).shape[1])

    pm.module.layers["0"].attention_norm.register_forward_hook(hook)
    x, _ = batch()
    with torch.no_grad():
        logits = pm.wrapped(x)
    seen["logits_split"] = isinstance(logits, DTensor) and logits.to_local().shape[-1] == logits.shape[-1] // 2
    seen["full_logits"] = list(pm.inference_module(x).shape)
    return seen


def train_steps(pc: ParallelDims, steps: int, accum: int) -> list[list[float]]:
    """(loss, grad norm) of `steps` AdamW steps cycling over batches 0..3 (so the loss falls), each
    split into `accum` micro-batches"""
    from clusterlm.train.optim import build_optimizer

    pm = build(pc, micro_batch=B // (pc.dp_replicate * pc.dp_shard) // accum)
    opt = build_optimizer(pm.module, OptimConfig(lr=3e-3, weight_decay=0.1), fused=pm.fused_optimizer_ok and None)
    out = []
    for s in range(steps):
        x, y = batch(s % 4)
        x, y = rows(pm, x), rows(pm, y)
        m = x.shape[0] // accum
        loss = torch.zeros(())
        for i in range(accum):
            loss += pm.forward_backward(x[i * m:(i + 1) * m], y[i * m:(i + 1) * m], accum=accum,
                                        sync=i == accum - 1)
        loss = float(pm.mean_over_dp(loss))
        out.append([loss, pm.clip_grad_norm_(1.0)])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return out


def logits_of(pm) -> list:
    x, _ = batch(99)
    with torch.no_grad():
        return pm.inference_module(x[:2]).tolist()  # (2, T, V), every rank the full batch


def step_then_save(pm, opt, root) -> None:
    """one AdamW step on batch 0 (so the checkpoint holds trained weights and optimizer moments)"""
    x, y = batch(0)
    pm.forward_backward(rows(pm, x), rows(pm, y))
    pm.clip_grad_norm_(1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def next_loss(pm, opt) -> float:
    """loss on batch 2 after one more AdamW step on batch 1: exercises the restored optimizer state"""
    for s in (1, 2):
        x, y = batch(s)
        loss = float(pm.mean_over_dp(pm.forward_backward(rows(pm, x), rows(pm, y))))
        pm.clip_grad_norm_(1.0)
        if s == 1:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return loss


def _two_ranks(rank: int, world: int, ckpt_root: str) -> dict:
    from pathlib import Path

    from clusterlm.checkpoint.distributed import load_distributed, save_distributed
    from clusterlm.train.optim import build_optimizer

    out = {name: one_step(ParallelDims(**kw), **extra) for name, kw, extra in [
        ("ddp", dict(dp_replicate=2), {}), ("fsdp", dict(dp_shard=2), {}), ("tp", dict(tp=2), {}),
        ("pp_1f1b", dict(pp=2), {"schedule": "1f1b"}), ("pp_gpipe", dict(pp=2), {"schedule": "gpipe"}),
        ("fsdp_selective_ac", dict(dp_shard=2, activation_checkpointing="selective"), {}),
        ("ddp_selective_ac", dict(dp_replicate=2, activation_checkpointing="selective"), {}),
        ("tp_full_ac", dict(tp=2, activation_checkpointing="full"), {}),
        ("tp_no_sp", dict(tp=2, sequence_parallel=False), {}), ("gpt_tp", dict(tp=2), {"gpt": True}),
        ("lstm_ddp", dict(dp_replicate=2), {"lstm": True})]}
    out["pp_eval"] = build(ParallelDims(pp=2)).pipeline_eval_loss([batch()], torch.device("cpu"))
    out["ddp_20"] = train_steps(ParallelDims(dp_replicate=2), steps=20, accum=1)
    out["tp_3"] = train_steps(ParallelDims(tp=2), steps=3, accum=1)
    out["sp_layout"] = sequence_parallel_layout(ParallelDims(tp=2))
    out["no_sp_layout"] = sequence_parallel_layout(ParallelDims(tp=2, sequence_parallel=False))

    # checkpoint: saved under FSDP x2 after one step, loaded under TP x2 (and on one process by the test)
    oc = OptimConfig(lr=1e-2, weight_decay=0.1)
    pm = build(ParallelDims(dp_shard=2))
    opt = build_optimizer(pm.module, oc, fused=pm.fused_optimizer_ok and None)
    step_then_save(pm, opt, ckpt_root)
    path = save_distributed(Path(ckpt_root), 1, pm.module, opt, train_state={"step": 1}, config_toml="")
    out["fsdp_logits"] = logits_of(pm)
    out["fsdp_next_loss"] = next_loss(pm, opt)
    pm = build(ParallelDims(tp=2), seed=123)  # different init: everything must come from the checkpoint
    opt = build_optimizer(pm.module, oc, fused=pm.fused_optimizer_ok and None)
    out["tp_state"] = load_distributed(path, pm.module, opt)
    out["tp_logits"] = logits_of(pm)
    # an asynchronous save of the loaded TP model, committed after more work on the default group
    from clusterlm.checkpoint.distributed import finish_save

    pending = save_distributed(Path(ckpt_root) / "async", 1, pm.module, opt, train_state={"step": 1},
                               config_toml="", async_save=True)
    out["tp_next_loss"] = next_loss(pm, opt)
    finish_save(pending)
    return out


def _four_ranks(rank: int, world: int) -> dict:
    from pathlib import Path

    from clusterlm.checkpoint.manager import agree_on_checkpoint
    from clusterlm.errors import ConfigError
    from clusterlm.parallel.agree import agree_any

    out = {"fsdp_tp": one_step(ParallelDims(dp_shard=2, tp=2)),
           "hsdp": one_step(ParallelDims(dp_replicate=2, dp_shard=2)),
           "fsdp_pp": one_step(ParallelDims(dp_shard=2, pp=2)),
           "tp_pp": one_step(ParallelDims(tp=2, pp=2))}
    # a flag raised on rank 3 only (a signal, a time limit) is seen by every rank
    out["agree"] = list(agree_any(True, rank == 3, False, device=torch.device("cpu")))
    same = agree_on_checkpoint(Path("/x/step-00000004"), torch.device("cpu"))
    try:  # rank 2 sees another newest checkpoint: every rank refuses, none waits
        agree_on_checkpoint(Path(f"/x/step-0000000{5 if rank == 2 else 4}"), torch.device("cpu"))
        out["disagree"] = "no error"
    except ConfigError as e:
        out["disagree"] = str(e)
    out["same"] = same.name
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return root, run_ranks(2, _two_ranks, str(root))


def test_one_step_matches_single_process(two):
    """One step's loss and gradient norm under DDP x2, FSDP x2, TP x2, PP x2 (1F1B and GPipe), with
    selective/full activation checkpointing (and one process with it), and an LSTM under DDP x2, equal one
    process on the whole batch (fp32, 1e-5); the forward-only pipeline evaluation gives the same loss on
    both ranks."""
    ref = one_step(ParallelDims())
    _, results = two
    lstm_ref = one_step(ParallelDims(), lstm=True)
    gpt_ref = one_step(ParallelDims(), gpt=True)
    for r in results:
        for name in ("ddp", "fsdp", "tp", "pp_1f1b", "pp_gpipe", "fsdp_selective_ac", "ddp_selective_ac", "tp_full_ac",
                     "tp_no_sp"):
            assert r[name] == pytest.approx(ref, rel=TOL, abs=TOL), name
        assert r["gpt_tp"] == pytest.approx(gpt_ref, rel=TOL, abs=TOL)
        # sequence parallel (the default): the norm sees T/2 rows, logits stay split over the vocabulary
        assert r["sp_layout"] == {"norm_rows": T // 2, "logits_split": True, "full_logits": [B, T, V]}
        assert r["no_sp_layout"] == {"norm_rows": T, "logits_split": False, "full_logits": [B, T, V]}
        assert r["lstm_ddp"] == pytest.approx(lstm_ref, rel=TOL, abs=TOL)
        assert r["pp_eval"] == pytest.approx(ref[0], rel=TOL, abs=TOL)  # forward-only pipeline, every rank
    assert ref[0] == pytest.approx(4.1, abs=0.3)  # ~ln(64) = 4.16 at init: the model is really untrained
    # activation checkpointing changes no weight: one process and DDP initialised the AC-wrapped model, whose
    # parameter names (the init's per-parameter seeds) carry the wrapper's prefix, so AC gave other weights
    assert one_step(ParallelDims(activation_checkpointing="full")) == pytest.approx(ref, rel=TOL, abs=TOL)


def test_four_rank_layouts_match_single_process():
    """FSDP x2 + TP x2, HSDP (2 replicas x 2 shards) and FSDP x2 + PP x2 on 4 ranks give one process's
    loss and gradient norm for one step (fp32, 1e-5). Agreement: a flag set on one rank is set on all;
    ranks that found different checkpoints all refuse with both step numbers."""
    ref = one_step(ParallelDims())
    for r in run_ranks(4, _four_ranks):
        for name in ("fsdp_tp", "hsdp", "fsdp_pp", "tp_pp"):
            assert r[name] == pytest.approx(ref, rel=TOL, abs=TOL), name
        assert r["agree"] == [True, False]
        assert r["same"] == "step-00000004"
        assert "ranks disagree on the checkpoint to resume from (steps 4 to 5)" in r["disagree"]


def test_ddp_20_steps_match_grad_accumulation(two):
    """20 AdamW steps under DDP x2 equal one process with gradient accumulation 2 over the same
    global batches, step by step (loss and grad norm, 1e-5)."""
    ref = train_steps(ParallelDims(), steps=20, accum=2)
    _, results = two
    for r in results:
        for s, (got, want) in enumerate(zip(r["ddp_20"], ref)):
            assert got == pytest.approx(want, rel=TOL, abs=TOL), f"step {s + 1}"
    assert ref[-1][0] < ref[0][0] - 0.3, ref  # it learned: the steps are not trivially equal


def test_tp_sequence_parallel_steps_match_single_process(two):
    """3 AdamW steps under TP x2 with sequence and loss parallel (the default) equal one process, step by
    step: the split norms, embedding and output are updated as the whole ones are."""
    ref = train_steps(ParallelDims(), steps=3, accum=1)
    _, results = two
    for r in results:
        for s, (got, want) in enumerate(zip(r["tp_3"], ref)):
            assert got == pytest.approx(want, rel=TOL, abs=TOL), f"step {s + 1}"


def test_fsdp_checkpoint_loads_on_tp_and_one_process(two):
    """A DCP checkpoint saved under FSDP x2 gives identical logits loaded under TP x2 and on one process
    (no process group), and the resharded optimizer state gives the same next step as FSDP's own; an
    asynchronous save under TP x2, committed after further steps, holds the weights of its step."""
    from clusterlm.checkpoint.distributed import load_distributed
    from clusterlm.train.optim import build_optimizer

    root, results = two
    r0 = results[0]
    assert r0["tp_state"] == {"step": 1}
    torch.testing.assert_close(torch.tensor(r0["tp_logits"]), torch.tensor(r0["fsdp_logits"]), rtol=0, atol=1e-5)
    assert r0["tp_next_loss"] == pytest.approx(r0["fsdp_next_loss"], abs=TOL)

    pm = build(ParallelDims(), seed=7)
    opt = build_optimizer(pm.module, OptimConfig(lr=1e-2, weight_decay=0.1), fused=pm.fused_optimizer_ok and None)
    load_distributed(root / "step-00000001", pm.module, opt)
    torch.testing.assert_close(torch.tensor(logits_of(pm)), torch.tensor(r0["fsdp_logits"]), rtol=0, atol=1e-5)
    # the full weights written beside the shards serve single-process tools (eval/generate)
    from safetensors.torch import load_file

    full = load_file(str(root / "step-00000001" / "model.safetensors"))
    assert full.keys() == pm.module.state_dict().keys()
    for k, v in pm.module.state_dict().items():
        torch.testing.assert_close(full[k], v, rtol=0, atol=0)
    assert next_loss(pm, opt) == pytest.approx(r0["fsdp_next_loss"], abs=TOL)

    # the async save (TP x2, taken before next_loss's updates) verifies and holds the same model
    from clusterlm.checkpoint.store import find_latest_valid

    path = find_latest_valid(root / "async")
    assert path is not None and path.name == "step-00000001"
    pm = build(ParallelDims(), seed=8)
    load_distributed(path, pm.module, None)
    torch.testing.assert_close(torch.tensor(logits_of(pm)), torch.tensor(r0["fsdp_logits"]), rtol=0, atol=1e-5)
