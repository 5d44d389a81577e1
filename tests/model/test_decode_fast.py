"""Packed CPU weights for inference (clusterlm.optimize.packed): the fp32 path gives the plain
path's tokens, the bf16 path stays within a measured tolerance, the state dict and tied weights are
untouched, and the server's scheduler uses the same path as generate()."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clusterlm.generate.engine import Engine, complete, pack_by_default
from clusterlm.models.build import build_model
from clusterlm.models.config import ModelConfig
from clusterlm.optimize.packed import (MIN_ROWS, PackedLinear, bf16_unavailable, one_row_min_rows, pack_for_inference,
                                       packing_unavailable)

pytestmark = pytest.mark.skipif(packing_unavailable() is not None, reason=str(packing_unavailable()))

_T = dict(vocab_size=61, vocab_multiple=8, n_layers=2, dim=64, n_heads=4, max_seq_len=48, ffn_multiple=16)
MODELS: dict[str, ModelConfig] = {
    "gpt": ModelConfig(**_T, pos="learned", norm="layernorm", mlp="gelu", bias=True),
    "llama": ModelConfig(**_T, pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, tie_embeddings=False),
}


def make(name: str, seed: int = 0) -> nn.Module:
    model = build_model(MODELS[name])
    model.init_weights(seed)
    return model.eval()


def packed(model: nn.Module) -> list[PackedLinear]:
    return [m for m in model.modules() if type(m) is PackedLinear]


def cached_logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Logits of every position of idx (B, S): a 6-token prefill, then one token at a time."""
    cache = model.make_cache(idx.shape[0], idx.shape[1], device="cpu", dtype=torch.float32)
    with torch.inference_mode():
        outs = [model(idx[:, :6], cache)] + [model(idx[:, t:t + 1], cache) for t in range(6, idx.shape[1])]
    return torch.cat(outs, dim=1)  # (B, S, V)


@pytest.mark.parametrize("name", MODELS)
def test_fp32_packed_tokens_equal_plain(name: str) -> None:
    """Greedy tokens of generate() with fp32 packed weights equal the plain nn.Linear path's, for
    batch 1 (F.linear or packed, whichever this machine measured faster for one row) and batch 5
    (packed inner product), and the cached logits agree to float32 rounding (1e-5)."""
    model = make(name)
    prompts = torch.randint(0, 61, (5, 7), generator=torch.Generator().manual_seed(1))
    ref_logits = cached_logits(model, prompts)
    ref1, _ = complete(model, prompts[0].tolist(), max_new_tokens=30, temperature=0.0, pack=None)
    ref5, _ = complete(model, prompts.tolist(), max_new_tokens=30, temperature=0.0, pack=None)
    assert not packed(model)
    got1, _ = complete(model, prompts[0].tolist(), max_new_tokens=30, temperature=0.0, pack="fp32")
    assert len(packed(model)) == (7 if name == "llama" else 6) * 2 + 1  # every Linear, output included
    got5, _ = complete(model, prompts.tolist(), max_new_tokens=30, temperature=0.0, pack="fp32")
    assert got1 == ref1 and got5 == ref5
    torch.testing.assert_close(cached_logits(model, prompts), ref_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("min_rows", [1, MIN_ROWS])
def test_one_row_calls_take_the_chosen_path(min_rows: int) -> None:
    """Reference: F.linear for one row. With min_rows=1 a one-row call runs the packed inner product
    (within 1e-5 of F.linear, not bit-equal in general), with MIN_ROWS it is F.linear exactly; the
    measured default is one of the two and a repeat of the measurement gives the same answer (cached
    per thread count), and a second pack_for_inference with it is a no-op."""
    lin = nn.Linear(96, 80)
    x = torch.randn(1, 96)
    p = PackedLinear(lin, "fp32", min_rows)
    with torch.no_grad():
        ref = torch.nn.functional.linear(x, lin.weight, lin.bias)
        got = p(x)
    if min_rows == 1:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        assert p._packed is not None  # the packed copy was made and used
    else:
        assert torch.equal(got, ref) and p._packed is None
    chosen = one_row_min_rows(torch.get_num_threads())
    assert chosen in (1, MIN_ROWS) and one_row_min_rows(torch.get_num_threads()) == chosen
    model = make("gpt")
    pack_for_inference(model)
    assert {m.min_rows for m in packed(model)} == {chosen}
    first = packed(model)
    pack_for_inference(model)
    assert packed(model) == first  # the same modules: nothing repacked


def test_state_dict_and_tied_weights_unchanged() -> None:
    """Packing swaps modules but keeps the same Parameter objects: same state-dict keys and tensors,
    the output still IS the token embedding; pack_for_inference(None) gives nn.Linear back."""
    model = make("gpt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {id(p) for p in model.parameters()}
    assert pack_for_inference(model) == 13
    assert pack_for_inference(model) == 13  # a second call is a no-op
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert {id(p) for p in model.parameters()} == params
    assert model.output.weight is model.tok_embeddings.weight
    pack_for_inference(model, None)
    assert not packed(model) and all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert model.output.weight is model.tok_embeddings.weight


def test_packed_copy_follows_weight_changes_and_grad_path_is_plain() -> None:
    """An in-place change of a weight repacks on the next call (version counter); with gradients on
    the module computes exactly nn.Linear's F.linear and gradients reach the weight."""
    lin = nn.Linear(32, 48)
    p = PackedLinear(lin)
    x = torch.randn(6, 32)
    with torch.no_grad():
        torch.testing.assert_close(p(x), lin(x), atol=1e-5, rtol=1e-5)
        lin.weight.mul_(2.0)  # the same Parameter: PackedLinear sees it
        torch.testing.assert_close(p(x), lin(x), atol=1e-5, rtol=1e-5)
    y = p(x)
    assert torch.equal(y, torch.nn.functional.linear(x, lin.weight, lin.bias))
    y.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


@pytest.mark.skipif(bf16_unavailable() is not None, reason=str(bf16_unavailable()))
@pytest.mark.parametrize("name", MODELS)
def test_bf16_packed_logits_within_measured_tolerance(name: str) -> None:
    """bf16 packed weights: cached logits within 2% of the logits' range of the fp32 path (measured
    0.3-0.6% on these models, 0.9% on gpt2-124m: docs/compression.md), and the greedy tokens
    mostly agree (random weights have near ties, so not all)."""
    model = make(name)
    prompts = torch.randint(0, 61, (4, 20), generator=torch.Generator().manual_seed(2))
    ref = cached_logits(model, prompts)
    pack_for_inference(model, "bf16")
    got = cached_logits(model, prompts)
    scale = ref.abs().max()
    assert (got - ref).abs().max() <= 0.02 * scale
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


def test_server_scheduler_packs_like_generate() -> None:
    """The scheduler's engine packs an eval-mode model on the CPU (pack_by_default), and its batched
    slot-cache step (rows(slots)) gives the plain path's logits."""
    from clusterlm.serve.metrics import Metrics
    from clusterlm.serve.scheduler import Scheduler

    model = make("llama")
    idx = torch.randint(0, 61, (3, 9), generator=torch.Generator().manual_seed(3))

    def slot_logits() -> torch.Tensor:
        cache = model.make_slot_cache(4, 16, device="cpu", dtype=torch.float32)
        rows = cache.rows([0, 2, 3])
        with torch.inference_mode():
            return torch.cat([model(idx[:, :8], rows), model(idx[:, 8:], rows)], dim=1)

    ref = slot_logits()
    assert pack_by_default(model, torch.device("cpu")) == "fp32"
    sched = Scheduler(model, None, max_batch=4, max_queue=4, metrics=Metrics().model("m", 4, 4))
    assert sched.engine.pack == "fp32" and len(packed(model)) == 7 * 2 + 1
    torch.testing.assert_close(slot_logits(), ref, atol=1e-5, rtol=1e-5)
    model.train()
    assert pack_by_default(model, torch.device("cpu")) is None  # a model being trained is left alone


def test_engine_packs_only_when_asked() -> None:
    """Engine() without `pack` leaves the modules alone (eval.lm drives it during training)."""
    model = make("gpt")
    Engine(model)
    assert not packed(model)
    Engine(model, pack="bf16" if bf16_unavailable() is None else "fp32")
    assert len(packed(model)) == 13


def _drive(chooser, seconds_at: dict[int, float], steps: int) -> list[int]:
    """Run `steps` synthetic decode steps whose time depends only on the thread count."""
    used = []
    for _ in range(steps):
        n = chooser.threads()
        used.append(n)
        chooser.record(seconds_at[n])
    return used


def test_thread_chooser_moves_to_the_faster_count_and_backs_off() -> None:
    """ThreadChooser: with 1 thread 5x faster (a busy machine) it moves to 1 after its first trial;
    with 2 threads faster (a quiet one) it stays at 2, and its trials get rarer (the period doubles)."""
    from clusterlm.generate.engine import ThreadChooser

    busy = ThreadChooser(2)
    used = _drive(busy, {1: 0.01, 2: 0.05}, 40)
    assert busy.best == 1 and used[-10:].count(1) >= 9
    quiet = ThreadChooser(2)
    used = _drive(quiet, {1: 0.04, 2: 0.02}, 600)
    assert quiet.best == 2 and quiet.period == quiet.max_period
    assert used.count(1) <= 3 * 8  # a few trials of 3 steps each, not one every 16 steps
    many = ThreadChooser(16)
    _drive(many, {16: 0.05, 8: 0.03, 4: 0.01, 2: 0.02, 1: 0.04}, 400)
    assert many.best == 4  # halving walks down to the fastest count


def test_adaptive_threads_keep_tokens_and_restore_the_callers_count() -> None:
    """Greedy tokens with the thread count chosen per step equal those with it fixed, and the
    caller's torch thread count is what it was after every step."""
    model = make("gpt")
    before = torch.get_num_threads()
    ref, _ = complete(model, [1, 2, 3], max_new_tokens=40, temperature=0.0, adapt_threads=False)
    got, _ = complete(model, [1, 2, 3], max_new_tokens=40, temperature=0.0, adapt_threads=True)
    assert got == ref and torch.get_num_threads() == before


def test_packed_model_deepcopies_and_saves() -> None:
    """The packed copy is an opaque oneDNN tensor: copy.deepcopy and torch.save of a packed model
    give plain nn.Linear modules (what a LoRA adapter wraps: the server clones its base for one)
    with the same logits, the tied output still tied."""
    import copy
    import io

    model = make("gpt")
    pack_for_inference(model)
    idx = torch.randint(0, 61, (4, 8), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ref = model(idx)
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.inference_mode():
        torch.testing.assert_close(twin(idx), ref)
        torch.testing.assert_close(loaded(idx), ref)
    for m in (twin, loaded):
        assert not packed(m) and type(m.output) is nn.Linear and m.output.weight is m.tok_embeddings.weight
    assert packed(model)  # the original keeps its packed modules


def test_thread_choice_is_on_for_generate_and_the_server_not_for_a_bare_engine() -> None:
    """generate() and the scheduler adapt the thread count on a CPU with > 1 thread; a bare Engine
    (eval.lm's task scoring) keeps the caller's count, so its scores stay reproducible."""
    from clusterlm.generate.engine import generate
    from clusterlm.serve.metrics import Metrics
    from clusterlm.serve.scheduler import Scheduler

    model = make("gpt")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert Engine(model).threads is None
        assert generate(model, [1, 2], max_new_tokens=2).engine.threads is not None
        sched = Scheduler(model, None, max_batch=2, max_queue=2, metrics=Metrics().model("m", 2, 2))
        assert sched.engine.threads is not None
    finally:
        torch.set_num_threads(before)
