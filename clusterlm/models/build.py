"""Build a model from a ModelConfig: Transformer for arch 'transformer', RNNLM for 'lstm'/'gru',
Encoder for 'encoder' and EncoderDecoder for 'encdec' (models/encdec.py);
with model.labels, a SequenceClassifier holding that language model as its backbone (and, with
model.bidirectional, a second one that reads right to left).

Construction allocates on torch's current default device, so a model can be built without memory
and materialised later:

    >>> import torch
    >>> from clusterlm.models.config import get_preset
    >>> with torch.device("meta"):
    ...     model = build_model(get_preset("gpt-nano", vocab_size=65))
    >>> model = model.to_empty(device="cpu"); model.init_weights(seed=0)
"""

from __future__ import annotations

from torch import nn

from clusterlm.errors import ConfigError
from clusterlm.models.config import ModelConfig


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model for `cfg` (weights uninitialised in meaning: call init_weights(seed) next)."""
    if cfg.vocab_size is None:
        raise ConfigError("model.vocab_size is unset; set it or take it from the data's tokenizer "
                          "(ModelConfig.with_vocab)")
    if cfg.labels:
        from clusterlm.models.classifier import SequenceClassifier

        return SequenceClassifier(cfg, _language_model(cfg), _language_model(cfg) if cfg.bidirectional else None)
    return _language_model(cfg)


def _language_model(cfg: ModelConfig) -> nn.Module:
    if cfg.arch == "transformer":
        from clusterlm.models.transformer import Transformer

        return Transformer(cfg)
    if cfg.arch in ("lstm", "gru"):
        from clusterlm.models.rnn import RNNLM

        return RNNLM(cfg)
    if cfg.arch == "encoder":
        from clusterlm.models.encdec import Encoder

        return Encoder(cfg)
    if cfg.arch == "encdec":
        from clusterlm.models.encdec import EncoderDecoder

        return EncoderDecoder(cfg)
    raise ConfigError(f"model.arch={cfg.arch!r}; expected one of transformer, lstm, gru, encoder, encdec")
