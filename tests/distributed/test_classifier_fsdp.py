"""A SequenceClassifier under FSDP2 x2 and DDP x2 (gloo, one spawn of 2 ranks) against one process.

build_parallel_model lays the classifier out as the trainer does: FSDP shards the backbone's blocks
(found under `backbone.layers`, with selective activation checkpointing) and the root (embeddings,
norm, the unused LM output, the score head); init_sharded fills the shards with the single-process
values. DDP replicates an LSTM classifier whose untied LM output is frozen (unused: DDP would
otherwise wait for its gradients). Five AdamW steps on half the global batch per rank must give the
single-process losses over the whole batch to 1e-5.

    .venv/bin/python -m pytest -q tests/distributed/test_classifier_fsdp.py
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from clusterlm.models.config import get_preset
from clusterlm.parallel.dims import ParallelDims
from tests.distributed.helpers import run_ranks

B, T, V, PAD, STEPS, TOL = 8, 12, 48, 0, 5, 1e-5
LABELS = ("a", "b", "c")


def configs() -> dict:
    common = dict(vocab_size=V, max_seq_len=16, labels=LABELS, pad_id=PAD)
    return {"fsdp": (get_preset("llama-nano", tie_embeddings=False, **common),
                     ParallelDims(dp_shard=2, activation_checkpointing="selective")),
            "ddp": (get_preset("lstm-small", dim=32, n_layers=1, dropout=0.0, tie_embeddings=False, **common),
                    ParallelDims(dp_replicate=2))}


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B right-padded rows of 2..T real ids and their labels (the first id mod 3: learnable)."""
    g = torch.Generator().manual_seed(step)
    x = torch.randint(1, V, (B, T), generator=g)
    lengths = torch.randint(2, T + 1, (B,), generator=g)
    x[torch.arange(T)[None, :] >= lengths[:, None]] = PAD
    return x, x[:, 0] % len(LABELS)


def train(mcfg, pc: ParallelDims, mesh) -> list[float]:
    """STEPS AdamW steps on this rank's rows of each global batch; the global mean loss of each step."""
    from clusterlm.parallel.parallelize import build_parallel_model

    pm = build_parallel_model(mcfg, pc, mesh, torch.device("cpu"), seed=0, micro_batch=B // pc.dp,
                              loss_fn=F.cross_entropy)
    opt = torch.optim.AdamW([p for p in pm.module.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    per, r = B // pc.dp, pm.coords.dp_rank
    losses = []
    for step in range(STEPS):
        x, y = batch(step % 2)  # two batches, repeated: a loss that can fall
        loss = pm.forward_backward(x[r * per:(r + 1) * per], y[r * per:(r + 1) * per])
        pm.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(pm.mean_over_dp(loss)))
    return losses, pm


def _rank(rank: int, world: int) -> dict:
    from torch.distributed.fsdp import FSDPModule

    from clusterlm.parallel.mesh import build_mesh

    out = {}
    for name, (mcfg, pc) in configs().items():
        losses, pm = train(mcfg, pc, build_mesh(pc, "cpu"))
        blocks = list(getattr(pm.module.backbone, "layers", {}).values())
        out[name] = {"losses": losses, "kind": pm.kind,
                     "sharded_blocks": sum(isinstance(b, FSDPModule) for b in blocks)}
    return out


def test_classifier_fsdp_and_ddp_match_one_process():
    """FSDP x2 (Llama classifier, selective AC, each backbone block its own FSDP unit) and DDP x2
    (LSTM classifier, frozen untied output) losses == one process's over the same global batches
    (1e-5) for 5 AdamW steps."""
    torch.set_num_threads(1)
    refs = {name: train(mcfg, ParallelDims(), None)[0] for name, (mcfg, _) in configs().items()}
    results = run_ranks(2, _rank)
    for name, ref in refs.items():
        assert abs(ref[4] - ref[2]) > 1e-3 and abs(ref[2] - ref[0]) > 1e-3, ref  # the steps move the weights
        for r in results:
            assert r[name]["kind"] == name
            assert r[name]["sharded_blocks"] == (configs()[name][0].n_layers if name == "fsdp" else 0)
            diffs = [abs(a - b) for a, b in zip(r[name]["losses"], ref)]
            assert max(diffs) < TOL, (name, diffs)
