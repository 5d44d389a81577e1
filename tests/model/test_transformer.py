"""Transformer: shapes, parameter counts, causal masking, KV-cache decoding, init, rotary, GQA.

Run: .venv/bin/python -m pytest -q tests/model/test_transformer.py
"""

from __future__ import annotations

import math

import pytest
import torch

from clusterlm.models.build import build_model
from clusterlm.models.config import PRESETS, ModelConfig, get_preset
from clusterlm.models.transformer import Transformer, apply_rotary, rotary_tables
from tests.helpers import overfit_loss

_TINY = dict(vocab_size=37, vocab_multiple=8, n_layers=2, dim=32, n_heads=4, max_seq_len=24, ffn_multiple=16)

# every Transformer family: GPT-2 style with and without biases, Llama style (GQA, untied)
FAMILIES: dict[str, ModelConfig] = {
    "gpt-bias": ModelConfig(**_TINY, pos="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=True),
    "gpt-nobias": ModelConfig(**_TINY, pos="learned", norm="layernorm", mlp="gelu", bias=False, tie_embeddings=True),
    "llama-gqa-untied": ModelConfig(**_TINY, pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, bias=False,
                                    tie_embeddings=False),
    "gpt-untied-rope": ModelConfig(**_TINY, pos="rope", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=False),
}


def make(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    model = build_model(cfg)
    model.init_weights(seed)
    return model.eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_output_shape_and_dtype(name: str) -> None:
    """forward((B, T) ids) has shape (B, T, padded V) = (2, 10, 40) in float32, for every family."""
    cfg = FAMILIES[name]
    logits = make(cfg)(torch.randint(0, 37, (2, 10)))
    assert logits.shape == (2, 10, 40)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_param_count_matches_config(preset: str) -> None:
    """Sum of unique parameters of the module built on the meta device equals ModelConfig.num_params()
    (the published 124,439,808 for gpt2-124m)."""
    cfg = get_preset(preset)
    if cfg.vocab_size is None:
        cfg = cfg.with_vocab(84)
    with torch.device("meta"):
        model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    if preset == "gpt2-124m":
        assert cfg.num_params() == 124_439_808


def test_parameter_names_follow_style() -> None:
    """Parameter names are exactly the STYLE.md (Llama/torchtitan) names, listed by hand here."""
    names = set(make(FAMILIES["llama-gqa-untied"]).state_dict())
    layer = {"attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
             "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
             "attention_norm.weight", "ffn_norm.weight"}
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"} | {
        f"layers.{i}.{n}" for i in range(2) for n in layer}
    assert names == expected
    gpt = set(make(FAMILIES["gpt-bias"]).state_dict())
    assert "pos_embeddings.weight" in gpt and "layers.1.attention.wq.bias" in gpt and "norm.bias" in gpt
    assert not any("w3" in n for n in gpt)


@pytest.mark.parametrize("name", FAMILIES)
def test_causal_masking(name: str) -> None:
    """Changing token t never changes logits at positions < t (reference: the unchanged run);
    it does change logits at t and later."""
    model = make(FAMILIES[name])
    x = torch.randint(0, 37, (2, 16))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 37
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-3


@pytest.mark.parametrize("name", FAMILIES)
def test_kv_cache_decode_equals_full_forward(name: str) -> None:
    """Prefill 5 tokens then decode one at a time: logits equal the full forward to 1e-5 (fp32);
    cache.pos counts the tokens consumed."""
    model = make(FAMILIES[name])
    x = torch.randint(0, 37, (3, 20))
    full = model(x)
    cache = model.make_cache(3, 24, device="cpu", dtype=torch.float32)
    pieces = [model(x[:, :5], cache)]
    for t in range(5, 20):
        pieces.append(model(x[:, t:t + 1], cache))
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_kv_cache_chunked_prefill_and_reset(name: str) -> None:
    """Prefill in two chunks (7 + 9 tokens, the second with an offset causal mask) equals the full
    forward to 1e-5; after reset() the same cache reproduces it again."""
    model = make(FAMILIES[name])
    x = torch.randint(0, 37, (2, 16))
    full = model(x)
    cache = model.make_cache(2, 16, device="cpu", dtype=torch.float32)
    for _ in range(2):
        out = torch.cat([model(x[:, :7], cache), model(x[:, 7:], cache)], dim=1)
        torch.testing.assert_close(out, full, rtol=0, atol=1e-5)
        assert cache.pos == 16
        cache.reset()
        assert cache.pos == 0


def test_context_overflow_raises() -> None:
    """More tokens than max_seq_len (24), or than the cache holds, is a ValueError naming the limit."""
    model = make(FAMILIES["gpt-nobias"])
    with pytest.raises(ValueError, match="max_seq_len=24"):
        model(torch.zeros(1, 25, dtype=torch.long))
    cache = model.make_cache(1, 8, device="cpu", dtype=torch.float32)
    model(torch.zeros(1, 6, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="max_len=8"):
        model(torch.zeros(1, 3, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="max_seq_len=24"):
        model.make_cache(1, 25, device="cpu", dtype=torch.float32)


def test_tiny_batch_overfits() -> None:
    """A tiny Transformer memorises 4 random sequences of 16 tokens: loss < 0.05 within 300 Adam
    steps (reference: a model that can fit its data drives cross-entropy towards 0)."""
    torch.manual_seed(0)
    cfg = FAMILIES["llama-gqa-untied"]
    model = make(cfg).train()
    assert overfit_loss(model) < 0.05


@pytest.mark.parametrize("name", ["gpt-bias", "llama-gqa-untied"])
def test_init_deterministic_and_meta_equals_direct(name: str) -> None:
    """Same seed -> identical weights; a meta build + to_empty + init_weights equals a direct build
    + init_weights (and their logits); another seed gives different weights."""
    cfg = FAMILIES[name]
    a = make(cfg, seed=3)
    with torch.device("meta"):
        b = build_model(cfg)
    b.to_empty(device="cpu")
    b.init_weights(3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    x = torch.randint(0, 37, (2, 12))
    assert torch.equal(a(x), b.eval()(x))  # rotary tables were recomputed after to_empty
    c = make(cfg, seed=4)
    assert not torch.equal(a.layers["0"].attention.wq.weight, c.layers["0"].attention.wq.weight)


def test_tied_weights_share_storage_after_to_empty() -> None:
    """With tie_embeddings, output.weight is tok_embeddings.weight (same storage) after a meta build
    + to_empty, and the state dict's two entries stay equal after a training step."""
    cfg = FAMILIES["gpt-nobias"]
    with torch.device("meta"):
        model = build_model(cfg)
    model.to_empty(device="cpu")
    model.init_weights(0)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    loss = model(torch.randint(0, 37, (2, 8))).sum()
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    sd = model.state_dict()
    assert torch.equal(sd["output.weight"], sd["tok_embeddings.weight"])


def test_init_statistics() -> None:
    """Linear/embedding weights ~ N(0, 0.02); residual projections (wo, w2) ~ N(0, 0.02/sqrt(2L))
    (GPT-2 paper sec. 2.3); biases 0; norm weights 1. Sample std checked to 5% on >= 65k draws."""
    cfg = ModelConfig(vocab_size=64, n_layers=8, dim=256, n_heads=4, max_seq_len=16, bias=True)
    model = make(cfg)
    layer = model.layers["3"]
    assert abs(layer.attention.wq.weight.std().item() - 0.02) < 0.001
    assert abs(layer.feed_forward.w1.weight.std().item() - 0.02) < 0.001
    resid = 0.02 / math.sqrt(16)
    assert abs(layer.attention.wo.weight.std().item() - resid) < 0.05 * resid
    assert abs(layer.feed_forward.w2.weight.std().item() - resid) < 0.05 * resid
    assert torch.equal(layer.attention.wq.bias, torch.zeros(256))
    assert torch.equal(layer.ffn_norm.weight, torch.ones(256)) and torch.equal(model.norm.bias, torch.zeros(256))


def test_init_independent_of_other_layers() -> None:
    """A model holding only some layers (as a pipeline stage does) gets the same values for them as
    the full model with the same seed."""
    cfg = FAMILIES["gpt-bias"]
    full = make(cfg, seed=7)
    stage = build_model(cfg)
    del stage.layers["0"]
    stage.init_weights(7)
    assert torch.equal(stage.layers["1"].feed_forward.w1.weight, full.layers["1"].feed_forward.w1.weight)


def test_rotary_matches_pairwise_rotation() -> None:
    """apply_rotary equals rotating each pair (x_i, x_{i+Hd/2}) by angle pos * theta^(-2i/Hd), the
    Hugging Face Llama rotate_half convention, written out element by element."""
    Hd, T, theta = 8, 5, 10000.0
    x = torch.randn(1, T, 2, Hd, dtype=torch.float64)
    cos, sin = rotary_tables(Hd, T, theta)
    got = apply_rotary(x, cos.double(), sin.double())
    want = torch.empty_like(x)
    for t in range(T):
        for i in range(Hd // 2):
            a = t * theta ** (-2 * i / Hd)
            x1, x2 = x[0, t, :, i], x[0, t, :, i + Hd // 2]
            want[0, t, :, i] = x1 * math.cos(a) - x2 * math.sin(a)
            want[0, t, :, i + Hd // 2] = x2 * math.cos(a) + x1 * math.sin(a)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # tables are float32


def test_gqa_equals_mha_with_repeated_kv_heads() -> None:
    """Grouped-query attention with K=2 kv heads equals multi-head attention whose wk/wv repeat each
    kv head for its n_heads/K query heads (Hugging Face's repeat_kv grouping: kv head j serves
    query heads 2j, 2j+1)."""
    gqa_cfg = FAMILIES["llama-gqa-untied"]
    mha_cfg = ModelConfig(**{**gqa_cfg.__dict__, "n_kv_heads": None})
    gqa, mha = make(gqa_cfg), make(mha_cfg)
    sd = gqa.state_dict()
    Hd = gqa_cfg.head_dim
    for i in range(gqa_cfg.n_layers):
        for w in ("wk", "wv"):
            k = sd[f"layers.{i}.attention.{w}.weight"].view(2, Hd, 32)  # (K, Hd, D)
            sd[f"layers.{i}.attention.{w}.weight"] = k.repeat_interleave(2, dim=0).reshape(4 * Hd, 32)
    mha.load_state_dict(sd)
    x = torch.randint(0, 37, (2, 12))
    torch.testing.assert_close(gqa(x), mha(x), rtol=0, atol=1e-5)


def test_gelu_is_tanh_approximation() -> None:
    """The GELU MLP equals w2(0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))), h = w1 x (GPT-2's
    gelu_new), computed by hand."""
    ff = make(FAMILIES["gpt-nobias"]).layers["0"].feed_forward
    x = torch.randn(3, 32)
    h = x @ ff.w1.weight.T
    want = (0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))) @ ff.w2.weight.T
    torch.testing.assert_close(ff(x), want, rtol=0, atol=1e-6)


def test_dropout_only_in_training() -> None:
    """With dropout 0.5, two training-mode passes differ; eval-mode passes are identical."""
    cfg = ModelConfig(**{**FAMILIES["gpt-bias"].__dict__, "dropout": 0.5})
    model = make(cfg)
    x = torch.randint(0, 37, (2, 8))
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_wrong_arch_raises() -> None:
    """Transformer refuses an lstm config with a message naming the arch."""
    with pytest.raises(ValueError, match="lstm"):
        Transformer(ModelConfig(arch="lstm", vocab_size=10, pos="none"))


def test_attention_runs_in_fp32_under_cpu_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast on CPU, sdpa runs F.scaled_dot_product_attention on fp32 copies of its
    inputs (torch's bf16 CPU flash-attention backward is ~8x slower than fp32's); outside autocast
    it passes the inputs through untouched. A model step under autocast trains, attention in fp32."""
    from clusterlm.models import transformer

    seen: list[torch.dtype] = []
    real = transformer.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):  # noqa: ANN001, ANN003
        seen.append(q.dtype)
        assert not torch.is_autocast_enabled("cpu")
        return real(q, k, v, **kw)

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 8, 16, generator=g, dtype=torch.bfloat16) for _ in range(3))
    monkeypatch.setattr(transformer.F, "scaled_dot_product_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = transformer.sdpa(q, k, v, is_causal=True)
    assert seen == [torch.float32] and y.dtype == torch.float32
    assert torch.equal(y, real(q.float(), k.float(), v.float(), is_causal=True))
    assert transformer.sdpa(q, k, v, is_causal=True).dtype == torch.bfloat16  # no autocast: as given

    seen.clear()
    model = make(FAMILIES["gpt-nobias"]).train()
    x = torch.randint(0, 37, (2, 10), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    logits.float().logsumexp(-1).mean().backward()
    assert seen == [torch.float32] * 2 and all(p.grad is not None for p in model.parameters())


def test_bf16_native_dtype_follows_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """train.dtype = "bf16-native": bf16 autocast on a CPU with AMX-BF16 or AVX512-BF16, fp32 (None)
    on one with neither or whose flags cannot be read; "auto" stays fp32 on every CPU; an unknown
    name lists the valid ones."""
    from clusterlm import device as dev
    from clusterlm.errors import ConfigError

    cpu = torch.device("cpu")
    for flags, want in (({"amx_bf16", "avx512_bf16"}, torch.bfloat16), ({"avx512_bf16", "avx512f"}, torch.bfloat16),
                        ({"avx512f", "avx2"}, None), (None, None)):
        monkeypatch.setattr(dev, "cpu_flags", lambda flags=flags: None if flags is None else frozenset(flags))
        assert dev.autocast_dtype("bf16-native", cpu) == want, flags
        assert dev.autocast_dtype("auto", cpu) is None
    with pytest.raises(ConfigError, match="bf16-native"):
        dev.autocast_dtype("bf16_native", cpu)
