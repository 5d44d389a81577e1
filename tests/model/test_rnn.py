"""LSTM and GRU language models: shapes, parameter counts, causality, state caching, init, tying.

Run: .venv/bin/python -m pytest -q tests/model/test_rnn.py
"""

from __future__ import annotations

import pytest
import torch

from clusterlm.models.build import build_model
from clusterlm.models.config import ModelConfig
from clusterlm.models.rnn import RNNLM
from tests.helpers import overfit_loss

_TINY = dict(vocab_size=37, vocab_multiple=8, n_layers=2, dim=32, pos="none")

FAMILIES: dict[str, ModelConfig] = {
    "lstm-tied": ModelConfig(arch="lstm", **_TINY, tie_embeddings=True, bias=True),
    "lstm-untied": ModelConfig(arch="lstm", **_TINY, tie_embeddings=False, bias=False),
    "gru-tied": ModelConfig(arch="gru", **_TINY, tie_embeddings=True, bias=False),
    "gru-untied": ModelConfig(arch="gru", **_TINY, tie_embeddings=False, bias=True),
}


def make(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    model = build_model(cfg)
    model.init_weights(seed)
    return model.eval()


@pytest.mark.parametrize("name", FAMILIES)
def test_output_shape_and_param_count(name: str) -> None:
    """forward((2, 10) ids) -> (2, 10, padded V = 40) float32; the unique parameter count of the
    module equals ModelConfig.num_params() (which counts PyTorch's W_ih, W_hh, b_ih, b_hh layout)."""
    cfg = FAMILIES[name]
    model = make(cfg)
    logits = model(torch.randint(0, 37, (2, 10)))
    assert logits.shape == (2, 10, 40) and logits.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    assert isinstance(model.rnn, torch.nn.LSTM if cfg.arch == "lstm" else torch.nn.GRU)


@pytest.mark.parametrize("name", FAMILIES)
def test_causal(name: str) -> None:
    """Changing token t never changes logits before t (reference: the unchanged run), and does change
    them from t on."""
    model = make(FAMILIES[name])
    x = torch.randint(0, 37, (2, 16))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 37
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().max() > 1e-4


@pytest.mark.parametrize("name", FAMILIES)
def test_state_cache_equals_full_forward(name: str) -> None:
    """Prefill 5 tokens then decode one at a time, and separately two chunks (7 + 13), with the
    recurrent state as the cache: logits equal the full forward to 1e-5; pos counts tokens; reset()
    starts over."""
    model = make(FAMILIES[name])
    x = torch.randint(0, 37, (3, 20))
    full = model(x)
    cache = model.make_cache(3, 20, device="cpu", dtype=torch.float32)
    pieces = [model(x[:, :5], cache)] + [model(x[:, t:t + 1], cache) for t in range(5, 20)]
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=0, atol=1e-5)
    cache.reset()
    assert cache.pos == 0
    out = torch.cat([model(x[:, :7], cache), model(x[:, 7:], cache)], dim=1)
    torch.testing.assert_close(out, full, rtol=0, atol=1e-5)


def test_lstm_tiny_batch_overfits() -> None:
    """A tiny LSTM memorises 4 random sequences of 16 tokens: loss < 0.05 within 300 Adam steps."""
    torch.manual_seed(0)
    model = make(FAMILIES["lstm-untied"]).train()
    assert overfit_loss(model) < 0.05


@pytest.mark.parametrize("name", ["lstm-tied", "gru-untied"])
def test_init_deterministic_meta_and_tied(name: str) -> None:
    """Meta build + to_empty + init_weights(5) equals a direct build + init_weights(5), tensor for
    tensor; tied output.weight is tok_embeddings.weight after to_empty; recurrent weights lie in
    PyTorch's +-1/sqrt(D) range, embeddings have std ~0.02, output bias is 0."""
    cfg = FAMILIES[name]
    a = make(cfg, seed=5)
    with torch.device("meta"):
        b = build_model(cfg)
    b.to_empty(device="cpu")
    b.init_weights(5)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    x = torch.randint(0, 37, (2, 9))
    assert torch.equal(a(x), b.eval()(x))
    assert (b.output.weight is b.tok_embeddings.weight) == cfg.tie_embeddings
    assert sum(p.numel() for p in b.parameters()) == cfg.num_params()
    assert b.rnn.weight_hh_l1.abs().max() <= 32**-0.5
    assert abs(b.tok_embeddings.weight.std().item() - 0.02) < 0.002
    if cfg.bias:
        assert torch.equal(b.output.bias, torch.zeros(40))


def test_dropout_only_in_training() -> None:
    """With dropout 0.5, training-mode passes differ from each other; eval-mode passes are equal."""
    model = make(ModelConfig(arch="lstm", **{**_TINY, "dropout": 0.5}))
    x = torch.randint(0, 37, (2, 8))
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_embed_dropout_masks_word_types_in_training_only() -> None:
    """model.embed_dropout drops word types: in training every occurrence of a dropped word reads
    zeros and the kept ones are scaled by 1/(1-p), so the expected embedding is unchanged; eval is
    the plain lookup. Refused for a transformer and outside [0, 1)."""
    from clusterlm.errors import ConfigError

    model = make(ModelConfig(arch="lstm", **{**_TINY, "embed_dropout": 0.5}))
    idx = torch.tensor([[3, 5, 3, 7, 5, 3, 9, 11]] * 4)
    assert torch.equal(model._embed(idx), model.tok_embeddings(idx))
    model.train()
    torch.manual_seed(0)
    for _ in range(20):
        x, e = model._embed(idx), model.tok_embeddings(idx)
        dropped = x.abs().sum(-1) == 0  # (B, T)
        for tok in (3, 5):  # the same word is dropped everywhere in the batch or nowhere
            assert dropped[idx == tok].all() or not dropped[idx == tok].any()
        torch.testing.assert_close(x[~dropped], 2.0 * e[~dropped])
    sums = torch.stack([model._embed(idx)[0, 0] for _ in range(4000)]).mean(0)
    torch.testing.assert_close(sums, model.tok_embeddings(idx)[0, 0], atol=0.003, rtol=0.0)
    with pytest.raises(ConfigError, match="embed_dropout"):
        ModelConfig(vocab_size=10, embed_dropout=0.1)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        ModelConfig(arch="lstm", **{**_TINY, "embed_dropout": 1.0})


def test_wrong_arch_raises() -> None:
    """RNNLM refuses a transformer config with a message naming the arch."""
    with pytest.raises(ValueError, match="transformer"):
        RNNLM(ModelConfig(vocab_size=10))
