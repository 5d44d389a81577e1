"""Fine-tuning's model side (clusterlm/finetune/setup.py): freezing embeddings and the first k
layers of Transformers and LSTMs, the LoRA transform applied on meta and initialised like the
eager path, and the balanced class weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from clusterlm.config import FinetuneConfig
from clusterlm.errors import ConfigError
from clusterlm.finetune.setup import balanced_weights, freeze, model_transform
from clusterlm.models.build import build_model
from clusterlm.models.config import ModelConfig, get_preset


def _model(cfg):
    m = build_model(cfg)
    m.init_weights(0)
    return m


def test_freeze_embeddings_and_first_layers_of_a_transformer():
    m = _model(get_preset("gpt-nano", vocab_size=40))
    freeze(m, embeddings=True, layers=2)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert {"tok_embeddings.weight", "pos_embeddings.weight"} <= frozen
    assert any(n.startswith("layers.1.") for n in frozen) and not any(n.startswith("layers.2.") for n in frozen)
    with pytest.raises(ConfigError, match="freeze_layers=9 but the model has"):
        freeze(_model(get_preset("gpt-nano", vocab_size=40)), embeddings=False, layers=9)


def test_freeze_first_layer_of_an_lstm_classifier():
    cfg = ModelConfig(arch="lstm", pos="none", n_layers=2, dim=16, vocab_size=30, labels=("a", "b"), pad_id=29)
    m = _model(cfg)
    freeze(m, embeddings=False, layers=1)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert {"backbone.rnn.weight_ih_l0", "backbone.rnn.bias_hh_l0"} <= frozen
    assert "backbone.rnn.weight_ih_l1" not in frozen and "score.weight" not in frozen


def test_lora_transform_on_meta_then_init_equals_the_eager_model():
    """build_parallel_model's order (build on meta, transform, to_empty, init_weights, init_extra)
    gives the same tensors as LoRA applied to an initialised model: B = 0, A from (seed, name)."""
    cfg = dataclasses.replace(get_preset("llama-nano", vocab_size=40), labels=("x", "y", "z"), pad_id=39)
    ft = FinetuneConfig(task="classify", lora_rank=4)
    transform, init_extra = model_transform(ft, seed=7)
    with torch.device("meta"):
        meta = transform(build_model(cfg))
    meta.to_empty(device="cpu")
    meta.init_weights(7)
    init_extra(meta, 7)
    eager = transform(_model_seed(cfg, 7))
    a, b = meta.state_dict(), eager.state_dict()
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lora_b = [v for k, v in a.items() if k.endswith("lora_b")]
    assert lora_b and all(torch.count_nonzero(v) == 0 for v in lora_b)
    train = {n for n, p in meta.named_parameters() if p.requires_grad}
    assert "score.weight" in train and all(n.endswith(("lora_a", "lora_b")) or n == "score.weight" for n in train)


def _model_seed(cfg, seed):
    m = build_model(cfg)
    m.init_weights(seed)
    return m


def test_balanced_class_weights_follow_sklearn():
    w = balanced_weights([0, 0, 0, 1], 3)
    assert torch.allclose(w, torch.tensor([4 / 9, 4 / 3, 0.0]))


def test_bidirectional_classifier_starts_both_readers_from_the_base_and_freezes_both(monkeypatch):
    """base_state gives a bidirectional LSTM classifier the base LM's weights under `backbone.` and
    again under `reverse.` (every key the classifier has but the head); freeze acts on both readers."""
    from types import SimpleNamespace

    from clusterlm.checkpoint import store
    from clusterlm.finetune.setup import base_state

    lm_cfg = ModelConfig(arch="lstm", pos="none", n_layers=2, dim=16, vocab_size=30)
    lm = _model(lm_cfg)
    monkeypatch.setattr(store, "load_model_weights", lambda path: dict(lm.state_dict()))
    cfg = dataclasses.replace(lm_cfg, labels=("a", "b"), pad_id=29, bidirectional=True)
    base = SimpleNamespace(path="unused", config=SimpleNamespace(model=lm_cfg))
    state = base_state(base, cfg)
    m = build_model(cfg)
    missing, unexpected = m.load_state_dict(state, strict=False)
    assert missing == ["score.weight"] and unexpected == []
    for k, v in lm.state_dict().items():
        assert torch.equal(m.state_dict()[f"backbone.{k}"], v) and torch.equal(m.state_dict()[f"reverse.{k}"], v), k
    freeze(m, embeddings=True, layers=1)
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    for r in ("backbone", "reverse"):
        assert {f"{r}.tok_embeddings.weight", f"{r}.rnn.weight_ih_l0"} <= frozen
        assert f"{r}.rnn.weight_ih_l1" not in frozen


def test_finetune_model_config_keeps_the_base_shape_and_takes_the_recipes_dropouts():
    """The fine-tuned config is the base's shape with the data's vocabulary and a head; the recipe's
    dropout and embedding dropout apply where set, else the base's (all of the recipe's with
    inherit_dropout=False); a recipe asking another shape is
    refused naming both (embedding dropout on a transformer: tests/model/test_rnn.py)."""
    from clusterlm.finetune.setup import finetune_model_config

    base = ModelConfig(arch="lstm", vocab_size=40, n_layers=2, dim=32, pos="none", dropout=0.1, embed_dropout=0.05)
    cfg = finetune_model_config(base, ModelConfig(), vocab_size=42, labels=("neg", "pos"), pad_id=41)
    assert (cfg.dim, cfg.n_layers, cfg.vocab_size, cfg.labels) == (32, 2, 42, ("neg", "pos"))
    assert (cfg.dropout, cfg.embed_dropout) == (0.1, 0.05)
    cfg = finetune_model_config(base, ModelConfig(arch="lstm", pos="none", dropout=0.4, embed_dropout=0.2), vocab_size=40)
    assert (cfg.dropout, cfg.embed_dropout) == (0.4, 0.2)
    # finetune.inherit_dropout = false: the recipe's values as given, 0 included (no dropout)
    cfg = finetune_model_config(base, ModelConfig(), vocab_size=42, inherit_dropout=False)
    assert (cfg.dropout, cfg.embed_dropout) == (0.0, 0.0)
    with pytest.raises(ConfigError, match="dim=32.*dim=64"):
        finetune_model_config(base, ModelConfig(dim=64), vocab_size=40)
