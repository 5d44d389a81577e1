"""The encoder and encoder-decoder families (models/encdec.py): shapes, exact parameter counts,
the cross-attention cache against full forwards, padding and bidirectionality."""

from __future__ import annotations

import itertools

import pytest
import torch

from clusterlm.errors import ConfigError
from clusterlm.models.build import build_model
from clusterlm.models.config import ModelConfig

OPTIONS = [dict(), dict(norm="rmsnorm", mlp="swiglu", bias=False, n_kv_heads=2),
           dict(bias=True, tie_embeddings=False)]


def _cfg(arch: str, pos: str = "learned", **kw) -> ModelConfig:
    extra = {"n_enc_layers": 3} if arch == "encdec" else {}
    return ModelConfig(arch=arch, vocab_size=50, n_layers=2, dim=32, n_heads=4, max_seq_len=16, pos=pos,
                       **extra, **kw)


def _model(cfg: ModelConfig) -> torch.nn.Module:
    model = build_model(cfg)
    model.init_weights(seed=0)
    return model.eval()


@pytest.mark.parametrize("arch,pos,opts", list(itertools.product(("encoder", "encdec"), ("learned", "sinusoidal", "rope"),
                                                                  range(len(OPTIONS)))))
def test_parameter_count_is_exact(arch, pos, opts):
    cfg = _cfg(arch, pos, **OPTIONS[opts])
    model = build_model(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()


@pytest.mark.parametrize("pos,opts", list(itertools.product(("learned", "sinusoidal", "rope"), range(len(OPTIONS)))))
def test_cached_decoding_equals_full_forward(pos, opts):
    model = _model(_cfg("encdec", pos, **OPTIONS[opts]))
    g = torch.Generator().manual_seed(1)
    src, tgt = torch.randint(0, 50, (3, 9), generator=g), torch.randint(0, 50, (3, 7), generator=g)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.no_grad():
        full = model(src, tgt, mask)
        cache = model.make_cache(3, 16, device="cpu", dtype=torch.float32)
        steps = [model(src, tgt[:, :3], mask, cache=cache)]  # primes the cache: the encoder runs once
        steps += [model(None, tgt[:, t:t + 1], cache=cache) for t in range(3, 7)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert cache.pos == 7


def test_source_padding_is_invisible_and_encoder_is_bidirectional():
    model = _model(_cfg("encdec"))
    src, tgt = torch.randint(0, 50, (2, 9)), torch.randint(0, 50, (2, 4))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    other = src.clone()
    other[1, 5:] = 7  # what sits under the padding does not matter
    with torch.no_grad():
        torch.testing.assert_close(model(other, tgt, mask), model(src, tgt, mask), atol=0, rtol=0)
        # the encoder is bidirectional: changing the last source token changes the first memory row
        changed = src.clone()
        changed[0, -1] = (changed[0, -1] + 1) % 50
        assert not torch.equal(model.encode(changed)[0, 0], model.encode(src)[0, 0])
        # the decoder is causal: the last target token does not change earlier logits
        t2 = tgt.clone()
        t2[:, -1] = (t2[:, -1] + 1) % 50
        torch.testing.assert_close(model(src, t2)[:, :-1], model(src, tgt)[:, :-1], atol=0, rtol=0)


def test_cache_reorder_follows_rows():
    model = _model(_cfg("encdec"))
    src, tgt = torch.randint(0, 50, (3, 6)), torch.randint(0, 50, (3, 4))
    with torch.no_grad():
        cache = model.make_cache(3, 8, device="cpu", dtype=torch.float32)
        model(src, tgt[:, :3], cache=cache)
        cache.reorder(torch.tensor([2, 2, 0]))
        step = model(None, tgt[[2, 2, 0], 3:4], cache=cache)
        full = model(src[[2, 2, 0]], tgt[[2, 2, 0]])
    torch.testing.assert_close(step[:, 0], full[:, -1], atol=1e-5, rtol=0)


def test_encoder_classifier_ignores_padding_and_freezes_the_mlm_head():
    cfg = _cfg("encoder", labels=("neg", "pos"), pad_id=0)
    model = _model(cfg)
    with torch.no_grad():
        padded = model(torch.tensor([[3, 4, 5, 0, 0], [3, 4, 5, 6, 7]]))
        alone = model(torch.tensor([[3, 4, 5]]))
    torch.testing.assert_close(padded[:1], alone, atol=1e-6, rtol=0)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"backbone.mlm_head.dense.weight", "backbone.mlm_head.norm.weight"}
    assert cfg.pooling == "mean"


def test_encoder_mlm_logits_see_both_sides():
    model = _model(_cfg("encoder"))
    idx = torch.randint(1, 50, (1, 8))
    with torch.no_grad():
        base = model(idx)
        later = idx.clone()
        later[0, -1] = (later[0, -1] + 1) % 50
        assert base.shape == (1, 8, 50)
        assert not torch.allclose(model(later)[0, 0], base[0, 0])


def test_sinusoidal_decoder_only_model_caches_like_full_forward():
    model = _model(ModelConfig(vocab_size=50, n_layers=2, dim=32, n_heads=4, max_seq_len=16, pos="sinusoidal"))
    idx = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        full = model(idx)
        cache = model.make_cache(2, 16, device="cpu", dtype=torch.float32)
        steps = [model(idx[:, :4], cache)] + [model(idx[:, t:t + 1], cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert "pos_table" not in model.state_dict()  # fixed, recomputed: never checkpointed


@pytest.mark.parametrize("kw,needle", [
    (dict(arch="encdec", labels=("a", "b")), "encdec model generates"),
    (dict(arch="transformer", n_enc_layers=2), "n_enc_layers"),
    (dict(arch="encoder", pos="sinusoidal", dim=33, n_heads=3), "even model.dim"),
    (dict(arch="lstm", pos="rope"), "lstm/gru take 'none'"),
])
def test_bad_configs_name_the_field(kw, needle):
    base = dict(vocab_size=50, n_layers=2, dim=32, n_heads=4, max_seq_len=16)
    with pytest.raises(ConfigError, match=needle):
        ModelConfig(**{**base, **kw})


def test_too_long_source_is_refused_with_the_limit():
    model = _model(_cfg("encdec"))
    with pytest.raises(ValueError, match="a source of 17 tokens does not fit in model.max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))


def test_sinusoidal_positions_scale_the_token_vectors():
    """Vaswani et al. sec. 3.4: the embedding is multiplied by sqrt(D) before the fixed table is added,
    in every family (else a 0.02-std embedding is swamped by a table of +-1 entries)."""
    from clusterlm.models.transformer import sinusoidal_table

    for arch in ("transformer", "encoder", "encdec"):
        model = _model(ModelConfig(arch=arch, vocab_size=50, n_layers=1, dim=32, n_heads=4, max_seq_len=16,
                                   pos="sinusoidal"))
        tok = model.tok_embeddings(torch.tensor([[3, 4, 5]]))
        want = tok * 32 ** 0.5 + sinusoidal_table(16, 32)[:3]
        if arch == "transformer":
            torch.testing.assert_close(model._positions(tok, slice(0, 3)), want)
        else:  # the encoder stacks norm the sum (emb_norm), then dropout (identity here)
            stack = model.encoder if arch == "encdec" else model
            torch.testing.assert_close(stack._embed(tok, 0, "x")[0], stack.emb_norm(want))


def test_mlm_logits_only_at_the_predicted_positions_give_the_same_loss():
    """Encoder.forward(predict=...) computes the head at the labelled positions only; lm_loss scores
    them against those targets: the same loss and gradients as the full logits."""
    from clusterlm.eval.metrics import IGNORE_INDEX, lm_loss

    model = _model(_cfg("encoder")).train()
    idx = torch.randint(0, 50, (3, 10))
    y = torch.full((3, 10), IGNORE_INDEX)
    y[0, 2], y[1, 7], y[2, 0], y[2, 9] = 5, 6, 7, 8
    full = lm_loss(model(idx), y, reduction="sum")
    g_full = torch.autograd.grad(full, model.layers["0"].attention.wq.weight)[0]
    part = lm_loss(model(idx, None, y != IGNORE_INDEX), y, reduction="sum")
    g_part = torch.autograd.grad(part, model.layers["0"].attention.wq.weight)[0]
    assert model(idx, None, y != IGNORE_INDEX).shape == (1, 4, 50)
    torch.testing.assert_close(part, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_part, g_full, atol=1e-6, rtol=1e-4)
