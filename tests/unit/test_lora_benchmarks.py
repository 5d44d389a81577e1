"""benchmarks/lora_rank_ceiling.py and lora_step.py: the SVD truncation, target matching, and the
textbook LoRA forward the step benchmark times against clusterlm's (same function)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch

from clusterlm.finetune.lora import apply_lora, lora_modules
from clusterlm.models.build import build_model
from clusterlm.models.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]


def _bench(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))  # their `from common import machine`
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_truncate_keeps_the_top_singular_directions_and_reports_their_energy():
    rc = _bench("lora_rank_ceiling")
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(12, 12, generator=g))
    v, _ = torch.linalg.qr(torch.randn(9, 9, generator=g))
    s = torch.tensor([4.0, 3.0, 2.0, 1.0] + [0.0] * 5)
    d = (u[:, :9] * s) @ v.T
    cut, kept = rc.truncate(d, 2)
    assert torch.allclose(cut, (u[:, :2] * s[:2]) @ v[:, :2].T, atol=1e-5)
    assert abs(kept - (16 + 9) / 30) < 1e-6
    full, kept_all = rc.truncate(d, 4)  # the matrix's whole rank: itself, all of its energy
    assert torch.allclose(full, d, atol=1e-5) and abs(kept_all - 1.0) < 1e-9
    assert rc.truncate(torch.zeros(3, 4), 2)[1] == 1.0  # an unchanged matrix: nothing lost


def test_targets_match_the_module_name_before_weight():
    rc = _bench("lora_rank_ceiling")
    targets = ["wq", "w1", "tok_embeddings"]
    assert rc.is_target("layers.0.attention.wq.weight", targets)
    assert rc.is_target("tok_embeddings.weight", targets)
    assert rc.is_target("layers.3.feed_forward.w1.weight", targets)
    assert not rc.is_target("layers.0.attention.wk.weight", targets)
    assert not rc.is_target("layers.0.attention_norm.weight", targets)


def test_textbook_forward_computes_what_add_low_rank_computes():
    """lora_step.py's baseline arm is the same function as the shipped forward (adapter, embedding and
    tied output), so the speed comparison compares like with like."""
    ls = _bench("lora_step")
    cfg = ModelConfig(arch="transformer", n_layers=2, n_heads=2, dim=32, max_seq_len=16, pos="learned",
                      norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True, vocab_size=50)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights(0)
    apply_lora(model, ["wq", "wv", "w1", "w2", "tok_embeddings"], rank=4, alpha=8.0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_a.normal_(0, 0.5)
            m.lora_b.normal_(0, 0.5)
    x = torch.randint(0, 50, (3, 16))
    shipped = model(x)
    for m in model.modules():
        if type(m) in ls.TEXTBOOK:
            m.forward = types.MethodType(ls.TEXTBOOK[type(m)], m)
    assert torch.allclose(model(x), shipped, atol=1e-5)
