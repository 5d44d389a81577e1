"""lr schedules at their key steps, their monotonic shape, and which parameters decay in AdamW."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from clusterlm.config import OptimConfig
from clusterlm.train.optim import build_optimizer, lr_at, param_groups, split_params

LR, MIN = 1e-3, 1e-4


def cfg(**kw) -> OptimConfig:
    return OptimConfig(**{"lr": LR, "min_lr": MIN, "warmup_steps": 100, **kw})


# ---- schedules -------------------------------------------------------------------------------------
def test_warmup_values():
    """Warmup is lr*(step+1)/W (nanoGPT): lr/W at step 0, lr at step W-1, lr at step W."""
    c = cfg(schedule="cosine")
    assert lr_at(0, c, 1100) == LR / 100
    assert lr_at(49, c, 1100) == pytest.approx(LR * 50 / 100, rel=1e-15)
    assert lr_at(99, c, 1100) == LR
    assert lr_at(100, c, 1100) == LR


def test_cosine_key_steps():
    """Cosine from lr at step W to min_lr at step W+decay: the midpoint equals (lr+min_lr)/2 to one
    ulp (cos(pi/2) is 6e-17, not 0), the end and beyond equal min_lr exactly."""
    c = cfg(schedule="cosine")  # decay_steps=0: decays over max_steps - W = 1000 steps
    assert lr_at(600, c, 1100) == pytest.approx((LR + MIN) / 2, rel=2e-16, abs=0)
    assert lr_at(1100, c, 1100) == MIN
    assert lr_at(5000, c, 1100) == MIN
    # a quarter of the way: min + (lr-min)*(1+cos(pi/4))/2
    assert lr_at(350, c, 1100) == pytest.approx(MIN + (LR - MIN) * (1 + math.sqrt(0.5)) / 2, rel=1e-14)


def test_cosine_explicit_decay_steps():
    """decay_steps=200 ends the cosine at step W+200 = 300 and holds min_lr after it."""
    c = cfg(schedule="cosine", decay_steps=200)
    assert lr_at(200, c, 10_000) == pytest.approx((LR + MIN) / 2, rel=2e-16, abs=0)
    assert lr_at(300, c, 10_000) == MIN
    assert lr_at(9_999, c, 10_000) == MIN


def test_linear_key_steps():
    """Linear: lr at W, (lr+min_lr)/2 at the midpoint, min_lr at the end and after."""
    c = cfg(schedule="linear")
    assert lr_at(100, c, 1100) == LR
    assert lr_at(600, c, 1100) == pytest.approx((LR + MIN) / 2, rel=2e-16, abs=0)
    assert lr_at(1100, c, 1100) == MIN
    assert lr_at(2000, c, 1100) == MIN


def test_wsd_plateau_and_decay():
    """WSD, 1000 steps, 20% decay: warmup to step 99, lr until step 799, linear to min_lr at 1000."""
    c = cfg(schedule="wsd", wsd_decay_fraction=0.2)
    assert lr_at(0, c, 1000) == LR / 100
    assert lr_at(100, c, 1000) == LR
    assert lr_at(799, c, 1000) == LR
    assert lr_at(800, c, 1000) == LR
    assert lr_at(900, c, 1000) == pytest.approx((LR + MIN) / 2, rel=2e-16, abs=0)
    assert lr_at(999, c, 1000) == pytest.approx(LR + (MIN - LR) * 199 / 200, rel=1e-14)
    assert lr_at(1000, c, 1000) == MIN


def test_wsd_decay_overlapping_warmup_still_ends_at_max_steps():
    """wsd_decay_fraction 1.0 with W=10 of 100 steps: warmup wins the overlap, so the decay runs from
    step 10 to min_lr at max_steps = 100 (docs/training.md), not over 100 steps to step 110."""
    c = cfg(schedule="wsd", wsd_decay_fraction=1.0, warmup_steps=10)
    assert lr_at(10, c, 100) == LR
    assert lr_at(55, c, 100) == pytest.approx((LR + MIN) / 2, rel=1e-14)
    assert lr_at(99, c, 100) == pytest.approx(LR + (MIN - LR) * 89 / 90, rel=1e-14)
    assert lr_at(100, c, 100) == MIN


def test_constant_and_no_warmup():
    """constant: lr after warmup at every step; warmup_steps=0 starts at lr at step 0."""
    c = cfg(schedule="constant")
    assert [lr_at(s, c, 500) for s in (100, 300, 499, 10_000)] == [LR] * 4
    assert lr_at(0, cfg(schedule="cosine", warmup_steps=0), 100) == LR


def test_warmup_as_long_as_the_run_is_warned():
    """warmup_steps >= max_steps: the lr never reaches optim.lr; the trainer logs a line naming both
    settings and the last step's lr (docs/training.md); a warmup shorter than the run gives none."""
    from clusterlm.train.optim import schedule_warning

    assert schedule_warning(cfg(warmup_steps=100), 101) is None
    line = schedule_warning(cfg(warmup_steps=100), 50)
    assert "optim.warmup_steps=100 >= train.max_steps=50" in line
    assert "optim.lr=0.001" in line and "last step's is 0.0005" in line


def test_bad_step_rejected():
    """A negative step or max_steps < 1 is a ValueError naming the value."""
    with pytest.raises(ValueError, match="step=-1"):
        lr_at(-1, cfg(), 100)
    with pytest.raises(ValueError, match="max_steps=0"):
        lr_at(0, cfg(), 0)


@settings(max_examples=60, deadline=None)
@given(schedule=st.sampled_from(["cosine", "linear", "wsd", "constant"]),
       warmup=st.integers(0, 50), max_steps=st.integers(1, 400), decay=st.integers(0, 300),
       frac=st.floats(0.05, 1.0), lr=st.floats(1e-5, 1.0), ratio=st.floats(0.0, 1.0))
def test_schedule_shape(schedule, warmup, max_steps, decay, frac, lr, ratio):
    """For any config: the lr never decreases during warmup, never increases after it, and stays
    within (0, lr] (>= min_lr after warmup) - checked step by step over the whole run and beyond."""
    c = OptimConfig(lr=lr, min_lr=lr * ratio, schedule=schedule, warmup_steps=warmup, decay_steps=decay,
                    wsd_decay_fraction=frac)
    values = [lr_at(s, c, max_steps) for s in range(max_steps + 20)]
    tol = 1e-12 * lr
    for s in range(1, len(values)):
        if s < warmup:
            assert values[s] >= values[s - 1] - tol
        elif s > warmup:
            assert values[s] <= values[s - 1] + tol
    assert all(0 < v <= lr + tol for v in values[:warmup])
    assert all(c.min_lr - tol <= v <= lr + tol for v in values[warmup:])


# ---- parameter groups ---------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(d)
        self.attention = nn.ModuleDict({k: nn.Linear(d, d, bias=True) for k in ("wq", "wk", "wv", "wo")})
        self.ffn_norm = nn.LayerNorm(d)
        self.feed_forward = nn.ModuleDict({"w1": nn.Linear(d, 4 * d), "w2": nn.Linear(4 * d, d)})


class TinyLM(nn.Module):
    """STYLE.md names: tok_embeddings, pos_embeddings, layers.{i}..., norm, output."""

    def __init__(self, tied: bool, v: int = 11, d: int = 8, t: int = 5, raw_pos: bool = False) -> None:
        super().__init__()
        if raw_pos:
            self.output = nn.Linear(d, v, bias=False)  # registered before the table it is tied to
        self.tok_embeddings = nn.Embedding(v, d)
        self.pos_embeddings = nn.Parameter(torch.zeros(t, d)) if raw_pos else nn.Embedding(t, d)
        self.layers = nn.ModuleDict({str(i): Block(d) for i in range(2)})
        self.norm = nn.LayerNorm(d)
        if not raw_pos:
            self.output = nn.Linear(d, v, bias=False)
        if tied:
            self.output.weight = self.tok_embeddings.weight


def _names(model: nn.Module) -> tuple[set[str], set[str]]:
    decay, no_decay = split_params(model)
    return {n for n, _ in decay}, {n for n, _ in no_decay}


def test_groups_untied():
    """Untied model: the 2 x 6 Linear matrices and the output decay; biases, norms and both
    embedding tables do not; every parameter is in exactly one group."""
    m = TinyLM(tied=False)
    decay, no_decay = _names(m)
    expected_decay = {f"layers.{i}.{blk}.weight" for i in range(2) for blk in
                      ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                       "feed_forward.w2")} | {"output.weight"}
    assert decay == expected_decay
    assert {"tok_embeddings.weight", "pos_embeddings.weight", "norm.weight", "norm.bias",
            "layers.0.attention_norm.weight", "layers.1.ffn_norm.bias", "layers.0.attention.wq.bias"} <= no_decay
    assert decay.isdisjoint(no_decay)
    assert len(decay) + len(no_decay) == len(list(m.parameters()))
    groups = param_groups(m, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("raw_pos", [False, True])
def test_groups_tied(raw_pos):
    """Tied model: the shared output/embedding Parameter appears once, in no-decay, even when
    `output` is registered first (so named_parameters reports it as output.weight); a bare
    nn.Parameter named pos_embeddings does not decay."""
    m = TinyLM(tied=True, raw_pos=raw_pos)
    decay_named, no_decay_named = split_params(m)
    all_ids = [id(p) for _, p in decay_named + no_decay_named]
    assert len(all_ids) == len(set(all_ids)) == len(list(m.parameters()))
    assert id(m.tok_embeddings.weight) in {id(p) for _, p in no_decay_named}
    assert id(m.tok_embeddings.weight) not in {id(p) for _, p in decay_named}
    assert id(m.pos_embeddings if raw_pos else m.pos_embeddings.weight) in {id(p) for _, p in no_decay_named}
    assert len(decay_named) == 12  # the layer matrices only


def test_lstm_weights_decay():
    """LSTM matrices weight_ih/weight_hh (2-D) decay; their biases do not."""
    m = nn.Module()
    m.tok_embeddings = nn.Embedding(7, 4)
    m.rnn = nn.LSTM(4, 4, num_layers=2)
    decay, no_decay = _names(m)
    assert decay == {f"rnn.weight_{k}_l{i}" for k in ("ih", "hh") for i in range(2)}
    assert no_decay == {"tok_embeddings.weight"} | {f"rnn.bias_{k}_l{i}" for k in ("ih", "hh") for i in range(2)}


def test_build_optimizer_decoupled_decay():
    """AdamW step with zero gradients: a decayed matrix shrinks by exactly (1 - lr*wd) (decoupled
    decay, Loshchilov & Hutter), a no-decay tensor does not move."""
    m = TinyLM(tied=True)
    opt = build_optimizer(m, OptimConfig(lr=0.1, min_lr=0.0, weight_decay=0.5))
    assert isinstance(opt, torch.optim.AdamW)
    assert (opt.defaults["betas"], opt.defaults["eps"]) == ((0.9, 0.95), 1e-8)
    w = m.layers["0"].attention["wq"].weight
    e = m.tok_embeddings.weight
    w0, e0 = w.detach().clone(), e.detach().clone()
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(w.detach(), w0 * (1 - 0.1 * 0.5), rtol=0, atol=1e-7)
    assert torch.equal(e.detach(), e0)


def test_fused_on_cpu_matches_reference_adamw():
    """On CPU build_optimizer picks the fused kernel; 5 steps with fixed gradients match torch's
    single-tensor AdamW with the same groups to 1e-6 (fused differs only in the last bits)."""
    torch.manual_seed(0)
    a, b = TinyLM(tied=True), TinyLM(tied=True)
    b.load_state_dict(a.state_dict())
    c = OptimConfig(lr=1e-2, min_lr=0.0, weight_decay=0.1)
    opt_a = build_optimizer(a, c)
    assert opt_a.defaults["fused"] is True
    opt_b = torch.optim.AdamW(param_groups(b, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.grad = torch.randn(pa.shape, generator=g)
            pb.grad = pa.grad.clone()
        opt_a.step()
        opt_b.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)
    assert build_optimizer(a, c, fused=False).defaults["fused"] is False  # an explicit False reaches torch


def test_layer_lr_decay_groups():
    """optim.layer_lr_decay: the head and final norm keep the lr, each layer below gets decay x the one
    above, embeddings the least; LSTM layers by their _lN suffix (a bidirectional reader's reverse
    stack by its own); each (weight decay, scale) pair is one group; 1.0 gives today's two groups."""
    from clusterlm.config import OptimConfig
    from clusterlm.errors import ConfigError
    from clusterlm.train.optim import layer_depth, layer_lr_scales

    assert [layer_depth(n) for n in ("backbone.tok_embeddings.weight", "layers.0.attention.wq.lora_a",
                                     "_orig_mod.layers.11.ffn_norm.weight", "decoder.layers.2.cross.wq.weight",
                                     "rnn.weight_hh_l1", "reverse.rnn.bias_ih_l0_reverse", "norm.weight",
                                     "score.weight")] == [0, 1, 12, 3, 2, 1, None, None]
    # an encoder's (or encdec's) norm over the embeddings sits with the tables, not with the head
    assert [layer_depth(n) for n in ("emb_norm.weight", "encoder.emb_norm.bias", "mlm_head.norm.weight")] == \
        [0, 0, None]
    names = ["tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.1.attention.wq.weight", "norm.weight"]
    assert layer_lr_scales(names, 0.5) == {names[0]: 0.125, names[1]: 0.25, names[2]: 0.5, names[3]: 1.0}

    m = TinyLM(tied=False)
    groups = param_groups(m, 0.1, layer_lr_decay=0.5)
    by_scale = {(g["weight_decay"], g["lr_scale"]): g["params"] for g in groups}
    assert sorted(by_scale) == [(0.0, 0.125), (0.0, 0.25), (0.0, 0.5), (0.0, 1.0), (0.1, 0.25), (0.1, 0.5),
                                (0.1, 1.0)]
    assert by_scale[(0.1, 1.0)] == [m.output.weight]
    assert {id(p) for p in by_scale[(0.0, 0.125)]} == {id(m.tok_embeddings.weight), id(m.pos_embeddings.weight)}
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))
    assert [g["weight_decay"] for g in param_groups(m, 0.1)] == [0.1, 0.0]
    with pytest.raises(ConfigError, match=r"optim.layer_lr_decay=0 must be in \(0, 1\]"):
        OptimConfig(layer_lr_decay=0)


def test_gradual_unfreezing_trains_each_layer_from_its_step():
    """optim.unfreeze_every=10 on the 2-layer model: the head and final norm train from step 0, block 1
    from step 10, block 0 from 20, the embeddings from 30 (each group's lr 0 before, so AdamW leaves
    it bit for bit, weight decay included); with layer_lr_decay the two combine per group."""
    from clusterlm.errors import ConfigError
    from clusterlm.train.optim import set_lr

    torch.manual_seed(0)
    m = TinyLM(tied=False)
    opt = build_optimizer(m, OptimConfig(lr=1e-2, min_lr=0.0, weight_decay=0.1, unfreeze_every=10))
    starts = {id(p): g["unfreeze_at"] for g in opt.param_groups for p in g["params"]}
    assert sorted({g["unfreeze_at"] for g in opt.param_groups}) == [0, 10, 20, 30]
    watched = {"output.weight": 0, "norm.weight": 0, "layers.1.attention.wq.weight": 10,
               "layers.0.feed_forward.w2.weight": 20, "tok_embeddings.weight": 30, "pos_embeddings.weight": 30}
    params = dict(m.named_parameters())
    assert {n: starts[id(params[n])] for n in watched} == watched
    g = torch.Generator().manual_seed(1)
    for step in range(35):
        before = {n: params[n].detach().clone() for n in watched}
        set_lr(opt, 1e-2, step)
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        for n, at in watched.items():
            assert torch.equal(params[n], before[n]) == (step < at), (n, step)

    # nothing above the last block trains (LoRA, a frozen head): block 1 starts at step 0, not at step 10
    # with every group at lr 0 until then
    frozen_top = TinyLM(tied=False)
    frozen_top.norm.requires_grad_(False)
    frozen_top.output.requires_grad_(False)
    top_groups = param_groups(frozen_top, 0.1, unfreeze_every=10)
    top_starts = {id(p): g["unfreeze_at"] for g in top_groups for p in g["params"]}
    assert sorted({g["unfreeze_at"] for g in top_groups}) == [0, 10, 20]
    assert top_starts[id(frozen_top.layers["1"].attention["wq"].weight)] == 0
    assert top_starts[id(frozen_top.tok_embeddings.weight)] == 20

    groups = param_groups(m, 0.1, layer_lr_decay=0.5, unfreeze_every=7)
    keys = {(g["weight_decay"], g["lr_scale"], g["unfreeze_at"]) for g in groups}
    assert keys == {(0.1, 1.0, 0), (0.1, 0.5, 7), (0.1, 0.25, 14), (0.0, 1.0, 0), (0.0, 0.5, 7), (0.0, 0.25, 14),
                    (0.0, 0.125, 21)}
    assert "unfreeze_at" not in param_groups(m, 0.1, layer_lr_decay=0.5)[0]
    with pytest.raises(ConfigError, match=r"optim.unfreeze_every=-1 must be >= 0"):
        OptimConfig(unfreeze_every=-1)
