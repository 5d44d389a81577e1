"""Cached inference runs wq|wk|wv (and SwiGLU's w1|w3) as one matmul over a fused copy of the weights
made by an explicit step (clusterlm.models.transformer.fuse_for_inference): same logits as the
separate matmuls, the state dict untouched, and the copy rebuilt by the engine whenever the weights
change. Also the prefill shortcut: forward(..., last_only=True) computes logits for the last
position only.

The engine fuses on accelerators only by default (engine.fuse_by_default); these tests pass
fuse=True to run the fused path on the CPU.

Run: .venv/bin/python -m pytest -q tests/model/test_fused_decode.py
"""

from __future__ import annotations

import pytest
import torch

from clusterlm.generate.engine import complete as _complete
from clusterlm.models.transformer import fuse_for_inference
from clusterlm.models.build import build_model
from clusterlm.models.config import ModelConfig

_T = dict(vocab_size=37, vocab_multiple=8, n_layers=2, dim=32, n_heads=4, max_seq_len=24, ffn_multiple=16)
MODELS: dict[str, ModelConfig] = {
    "gpt": ModelConfig(**_T, pos="learned", norm="layernorm", mlp="gelu", bias=True),
    "llama": ModelConfig(**_T, pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, tie_embeddings=False),
}


def complete(model: torch.nn.Module, prompt: list[int], **kw) -> tuple:
    """engine.complete with fused projections on the CPU too."""
    return _complete(model, prompt, fuse=True, **kw)


def fused_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if getattr(m, "fused", None) is not None]


def make(name: str, seed: int = 0) -> torch.nn.Module:
    model = build_model(MODELS[name])
    model.init_weights(seed)
    return model.eval()


def cached_logits(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Logits of every position of idx (B, S): a 5-token prefill, then one token at a time."""
    cache = model.make_cache(idx.shape[0], idx.shape[1], device="cpu", dtype=torch.float32)
    outs = [model(idx[:, :5], cache)] + [model(idx[:, t:t + 1], cache) for t in range(5, idx.shape[1])]
    return torch.cat(outs, dim=1)  # (B, S, V)


def greedy_ref(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    """Full forward over the whole sequence for each new token (no cache: the unfused matmuls)."""
    idx = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            idx = torch.cat([idx, model(idx)[:, -1:, :37].argmax(-1)], dim=1)
    return idx[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", MODELS)
def test_fused_cached_logits_equal_full_forward(name: str) -> None:
    """Prefill + one-token steps through the cache (fused matmuls) give the full forward's logits
    (separate matmuls) to 1e-5, and the fused path really ran (one entry per fused module)."""
    model = make(name)
    n_swiglu = len(model.layers) if MODELS[name].mlp == "swiglu" else 0
    assert fuse_for_inference(model) == len(model.layers) + n_swiglu
    idx = torch.randint(0, 37, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(idx)
        got = cached_logits(model, idx)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(fused_modules(model)) == len(model.layers) + n_swiglu
    assert fuse_for_inference(model, enable=False) == 0 and fused_modules(model) == []


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_unchanged_by_fused_decode(name: str) -> None:
    """After a generation the state dict has the same keys, and the same values, as before; the fused
    copies are held outside the module tree (no new parameters or buffers)."""
    model = make(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    n_params = len(list(model.parameters()))
    complete(model, [1, 2, 3], max_new_tokens=5, temperature=0.0)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert len(list(model.parameters())) == n_params


@pytest.mark.parametrize("name", MODELS)
def test_fused_copy_follows_weight_changes(name: str) -> None:
    """The fused copy is rebuilt when the weights change: after load_state_dict (in place), an
    in-place edit under no_grad, and a replaced Parameter, greedy decoding equals the uncached
    reference of the model's current weights each time."""
    model = make(name)
    prompt = [3, 1, 4, 1]
    assert complete(model, prompt, max_new_tokens=8, temperature=0.0)[0][0] == greedy_ref(model, prompt, 8)
    model.load_state_dict(make(name, seed=1).state_dict())  # copy_ into the same tensors
    assert complete(model, prompt, max_new_tokens=8, temperature=0.0)[0][0] == greedy_ref(model, prompt, 8)
    attn = model.layers["0"].attention
    with torch.no_grad():
        attn.wk.weight.mul_(-3.0)  # in place: the version counter moves
    assert complete(model, prompt, max_new_tokens=8, temperature=0.0)[0][0] == greedy_ref(model, prompt, 8)
    attn.wv.weight = torch.nn.Parameter(torch.randn_like(attn.wv.weight))  # a new tensor object
    if MODELS[name].mlp == "swiglu":
        ff = model.layers["1"].feed_forward
        ff.w3.weight = torch.nn.Parameter(torch.randn_like(ff.w3.weight))
    assert complete(model, prompt, max_new_tokens=8, temperature=0.0)[0][0] == greedy_ref(model, prompt, 8)


def test_no_fusion_with_grad_or_without_cache() -> None:
    """Training-shaped calls never use the fused copies: with them made, a forward with gradients
    enabled (even with a cache) still gives every projection its gradient, equal to the unfused
    model's, and a no-grad forward without a cache equals the unfused one exactly."""
    model, ref = make("llama"), make("llama")
    fuse_for_inference(model)
    idx = torch.randint(0, 37, (1, 6), generator=torch.Generator().manual_seed(0))
    for m in (model, ref):
        cache = m.make_cache(1, 6, device="cpu", dtype=torch.float32)
        m(idx, cache).sum().backward()
    for n in ("wq", "wk", "wv"):
        got, want = (getattr(m.layers["0"].attention, n).weight.grad for m in (model, ref))
        assert got is not None and torch.equal(got, want)
    with torch.no_grad():
        assert torch.equal(model(idx), ref(idx))


def test_quantized_modules_are_not_fused() -> None:
    """With int8 Linears (clusterlm.optimize.quantize) the attention runs its modules one by one (no
    fused copy of the float weights), and greedy decoding equals the uncached reference."""
    from clusterlm.optimize.quantize import quantize_model

    model = make("llama")
    fuse_for_inference(model)  # fused before quantizing: the next generation drops the stale float copies
    quantize_model(model, "int8")
    prompt = [5, 6, 7]
    assert complete(model, prompt, max_new_tokens=6, temperature=0.0)[0][0] == greedy_ref(model, prompt, 6)
    assert fused_modules(model) == []


def test_cpu_does_not_fuse_by_default() -> None:
    """engine.fuse_by_default: a CPU generation without `fuse` makes no fused copies (and drops any
    made before); an accelerator device would fuse."""
    from clusterlm.generate.engine import fuse_by_default

    model = make("llama")
    fuse_for_inference(model)
    _complete(model, [1, 2, 3], max_new_tokens=4, temperature=0.0)
    assert fused_modules(model) == []
    assert not fuse_by_default(torch.device("cpu")) and fuse_by_default(torch.device("cuda"))


@pytest.mark.parametrize("name", MODELS)
def test_last_only_prefill_equals_last_position(name: str) -> None:
    """forward(..., last_only=True) returns (B, 1, V): the full forward's last-position logits, with a
    KV cache (whose position still advances by all T tokens), without one, and over a slot cache."""
    model = make(name)
    idx = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = model(idx)[:, -1:]
        assert model(idx, last_only=True).shape == (2, 1, 40)
        torch.testing.assert_close(model(idx, last_only=True), want, atol=1e-5, rtol=1e-5)
        cache = model.make_cache(2, 12, device="cpu", dtype=torch.float32)
        torch.testing.assert_close(model(idx, cache, last_only=True), want, atol=1e-5, rtol=1e-5)
        assert cache.pos == 9
        slots = model.make_slot_cache(2, 12, device="cpu", dtype=torch.float32)
        rows = slots.rows([slots.alloc(), slots.alloc()])
        torch.testing.assert_close(model(idx, rows, last_only=True), want, atol=1e-5, rtol=1e-5)
