"""ModelConfig and named presets. Torch-free: the planner imports this on a login node.

GPT-2 and Llama are the same Transformer with different config values (positions, norm, MLP,
attention heads, tying, biases); LSTM and GRU language models share the same config type.

    >>> from clusterlm.models.config import get_preset
    >>> get_preset("gpt2-124m").num_params()
    124439808
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Literal

from clusterlm.errors import ConfigError

Arch = Literal["transformer", "lstm", "gru", "encoder", "encdec"]
TRANSFORMER_ARCHS = ("transformer", "encoder", "encdec")
"""the attention families: decoder-only, bidirectional encoder (masked LM), encoder-decoder"""


@dataclass(frozen=True)
class ModelConfig:
    arch: Arch = "transformer"
    """transformer (decoder-only), lstm, gru, encoder (bidirectional, masked-LM head: BERT's recipe) or
    encdec (encoder-decoder with cross-attention: the original Transformer, T5, BART); models/encdec.py"""
    vocab_size: int | None = None
    """tokens in the vocabulary; None = taken from the data's tokenizer at train time"""
    vocab_multiple: int = 1
    """pad the embedding/output rows up to a multiple of this (64 suits tensor cores); 1 = none"""
    n_layers: int = 4
    """blocks (for encdec: decoder blocks)"""
    n_enc_layers: int | None = None
    """encdec: encoder blocks; None = n_layers"""
    dim: int = 128
    """model width D (for LSTM/GRU: embedding and hidden size)"""
    n_heads: int = 4
    n_kv_heads: int | None = None
    """key/value heads for grouped-query attention; None = n_heads (multi-head attention)"""
    head_size: int | None = None
    """attention head size Hd; None = dim / n_heads (set when structured pruning removed heads)"""
    ffn_dim: int | None = None
    """MLP hidden size; None = 4*dim for GELU, Llama's rule (8/3*dim rounded to ffn_multiple) for SwiGLU"""
    ffn_multiple: int = 256
    max_seq_len: int = 256
    """longest context the model supports (learned position table size / rotary table size)"""
    pos: Literal["learned", "sinusoidal", "rope", "none"] = "learned"
    """learned absolute positions (GPT-2, BERT), fixed sinusoidal (Vaswani et al. 2017), rotary
    (Llama), or none (LSTM/GRU)"""
    rope_theta: float = 10000.0
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    mlp: Literal["gelu", "swiglu"] = "gelu"
    bias: bool = False
    """biases in linear layers (and LayerNorm)"""
    tie_embeddings: bool = True
    """share the token embedding with the output projection"""
    dropout: float = 0.0
    embed_dropout: float = 0.0
    """lstm/gru, training only: each step drops this fraction of the vocabulary's words, every
    occurrence of a dropped word reading a zero vector, the rest scaled by 1/(1-p) (AWD-LSTM's
    embedding dropout, Merity et al. 2018; the word dropout of Iyyer et al. 2015)"""
    init_std: float = 0.02
    """std of the Normal init of embeddings and linear weights (GPT-2's 0.02 for the attention families).
    An LSTM/GRU reads its embeddings directly, with no norm to rescale them: at 0.02 a language model
    with tied embeddings sits at the unigram loss for hundreds of steps, so the lstm/gru presets take
    0.1 (lstm_shakespeare_cpu, 2,000 steps: val loss 1.98 at 0.02, 1.63 at 0.1; docs/training.md)"""
    labels: tuple[str, ...] = ()
    """non-empty: a sequence classifier with these class names, in this order (a head of
    len(labels) x dim on the pooled final hidden state: models/classifier.py); empty = a language model"""
    pool: Literal["auto", "last", "mean", "max"] = "auto"
    """classifier: the pooled state; auto = the last real token for transformers, the mean over
    real tokens for lstm/gru"""
    pad_id: int = -1
    """classifier: the token id of right-padding in its inputs; -1 = no padding (every position is real)"""
    bidirectional: bool = False
    """classifier on lstm/gru: a second backbone of the same shape (`reverse`) reads each row's real
    tokens right to left, and the head reads both pooled states side by side (a BiLSTM/BiGRU)"""

    def __post_init__(self) -> None:
        # the TOML loader checks these Literals; ModelConfig(...) in Python must too: an unknown name
        # built a GELU MLP, a LayerNorm or (pos) no positions at all, silently
        for name, valid in (("pos", ("learned", "sinusoidal", "rope", "none")), ("norm", ("layernorm", "rmsnorm")),
                            ("mlp", ("gelu", "swiglu"))):
            if getattr(self, name) not in valid:
                raise ConfigError(f"model.{name}={getattr(self, name)!r}; expected one of {', '.join(valid)}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ConfigError(f"model.vocab_size={self.vocab_size} must be >= 1 (or unset to take it from the data)")
        for name in ("vocab_multiple", "n_layers", "dim", "n_heads", "max_seq_len", "ffn_multiple"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be >= 1")
        for name in ("rope_theta", "norm_eps", "dropout", "embed_dropout", "init_std"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"model.{name}={getattr(self, name)} must be a finite number")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if not 0.0 <= self.embed_dropout < 1.0:
            raise ConfigError(f"model.embed_dropout={self.embed_dropout} must be in [0, 1)")
        if self.embed_dropout and self.arch not in ("lstm", "gru"):
            raise ConfigError(f"model.embed_dropout={self.embed_dropout} is for arch 'lstm' or 'gru'; "
                              f"model.arch={self.arch!r} (use model.dropout)")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ConfigError(f"model.rope_theta={self.rope_theta} and model.norm_eps={self.norm_eps} must be > 0")
        if self.init_std < 0:
            raise ConfigError(f"model.init_std={self.init_std} must be >= 0")
        if self.n_enc_layers is not None and (self.arch != "encdec" or self.n_enc_layers < 1):
            raise ConfigError(f"model.n_enc_layers={self.n_enc_layers} is for arch 'encdec' (>= 1); "
                              f"model.arch={self.arch!r}")
        if self.arch in TRANSFORMER_ARCHS:
            # 0 would read as unset (kv_heads: `or`), a negative count failed in torch at build time
            if self.n_kv_heads is not None and not 1 <= self.n_kv_heads <= self.n_heads:
                raise ConfigError(f"model.n_kv_heads={self.n_kv_heads} must be a divisor of model.n_heads="
                                  f"{self.n_heads} ({', '.join(map(str, self._kv_choices()))}), or unset for n_heads")
            if self.ffn_dim is not None and self.ffn_dim < 1:
                raise ConfigError(f"model.ffn_dim={self.ffn_dim} must be >= 1 (or unset for the MLP's default width)")
            if self.head_size is not None and self.head_size < 1:
                raise ConfigError(f"model.head_size={self.head_size} must be >= 1 (or unset for dim/n_heads)")
            if self.head_size is None and self.dim % self.n_heads:
                fits = [h for h in range(1, min(self.dim, 64) + 1) if self.dim % h == 0]
                raise ConfigError(f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}; "
                                  f"n_heads may be {', '.join(map(str, fits))}{', ...' if self.dim > 64 else ''} "
                                  "(a divisor of dim)")
            if self.n_heads % self.kv_heads:
                raise ConfigError(
                    f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.kv_heads}; "
                    f"n_kv_heads may be {', '.join(map(str, self._kv_choices()))}"
                )
            if self.pos == "rope" and self.head_dim % 2:
                if self.head_size is not None:
                    raise ConfigError(f"model.pos='rope' needs an even head dim; model.head_size={self.head_size}")
                even = [str(h) for h in range(1, self.dim + 1) if self.dim % h == 0 and (self.dim // h) % 2 == 0]
                raise ConfigError(f"model.pos='rope' needs an even head dim; model.dim/model.n_heads = {self.dim}/"
                                  f"{self.n_heads} = {self.head_dim}; " + (
                                      f"n_heads may be {', '.join(even[:12] + ['...'] * (len(even) > 12))}" if even
                                      else "an odd model.dim has no even head dim"))
            if self.pos == "none":
                raise ConfigError("model.pos='none' is only for lstm/gru; use 'learned', 'sinusoidal' or 'rope'")
            if self.pos == "sinusoidal" and self.dim % 2:
                raise ConfigError(f"sinusoidal positions need an even model.dim, got {self.dim}")
            if self.arch == "encdec" and self.labels:
                raise ConfigError("model.labels (a classifier) needs arch 'transformer', 'encoder', 'lstm' or 'gru'; "
                                  "an encdec model generates its answer instead")
        elif self.arch not in ("lstm", "gru"):
            raise ConfigError(f"model.arch={self.arch!r}; expected one of transformer, lstm, gru, encoder, encdec")
        elif self.pos != "none" and self.pos != "learned":
            raise ConfigError(f"model.pos={self.pos!r} is for the attention families; lstm/gru take 'none'")
        self._check_classifier()

    def _kv_choices(self) -> list[int]:
        """The valid n_kv_heads: the divisors of n_heads."""
        return [k for k in range(1, self.n_heads + 1) if self.n_heads % k == 0]

    def _check_classifier(self) -> None:
        labels = self.labels
        if not isinstance(labels, tuple) or any(not isinstance(x, str) for x in labels):
            raise ConfigError(f"model.labels={labels!r} must be a tuple of strings (a list in TOML)")
        if self.pool not in ("auto", "last", "mean", "max"):
            raise ConfigError(f"model.pool={self.pool!r}; expected one of auto, last, mean, max")
        if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, int) or self.pad_id < -1:
            raise ConfigError(f"model.pad_id={self.pad_id!r} must be a token id >= 0, or -1 for no padding")
        if self.bidirectional and not (labels and self.arch in ("lstm", "gru")):
            raise ConfigError(f"model.bidirectional=true (finetune.bidirectional) is for classifiers (model.labels) "
                              f"on arch 'lstm' or 'gru'; "
                              f"this model is arch {self.arch!r}{'' if labels else ' without labels'}")
        if not labels:
            if self.pool != "auto" or self.pad_id != -1:
                raise ConfigError(f"model.pool={self.pool!r} and model.pad_id={self.pad_id} are for classifiers; "
                                  "set model.labels too (or leave them at 'auto' and -1)")
            return
        if len(labels) < 2:
            raise ConfigError(f"model.labels={list(labels)!r}: a classifier needs at least 2 labels")
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup or any(not x for x in labels):
            what = f"repeated {dup}" if dup else "an empty name"
            raise ConfigError(f"model.labels={list(labels)!r} has {what}; labels must be distinct non-empty names")
        if self.vocab_size is not None and self.pad_id >= self.padded_vocab_size:
            raise ConfigError(f"model.pad_id={self.pad_id} is not a token id of the vocabulary "
                              f"(padded vocab_size={self.padded_vocab_size})")

    # ---- derived values -------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.head_size if self.head_size is not None else self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """MLP hidden size F."""
        if self.ffn_dim is not None:
            return self.ffn_dim
        if self.mlp == "gelu":
            return 4 * self.dim
        f = int(2 * 4 * self.dim / 3)  # SwiGLU keeps 3 matrices at ~the cost of a 4x GELU MLP
        return self.ffn_multiple * ((f + self.ffn_multiple - 1) // self.ffn_multiple)

    @property
    def padded_vocab_size(self) -> int:
        if self.vocab_size is None:
            raise ConfigError("model.vocab_size is unset; set it or build the model from a data directory")
        m = self.vocab_multiple
        return m * ((self.vocab_size + m - 1) // m)

    @property
    def is_classifier(self) -> bool:
        return bool(self.labels)

    @property
    def pooling(self) -> str:
        """The pool actually used: 'last', 'mean' or 'max' (auto: the last real token for the causal
        decoder, the mean of the real tokens for lstm/gru and the bidirectional encoder)."""
        if self.pool != "auto":
            return self.pool
        return "last" if self.arch == "transformer" else "mean"

    @property
    def enc_layers(self) -> int:
        """encdec: the encoder's blocks (n_enc_layers, or n_layers when unset); 0 for other archs."""
        if self.arch != "encdec":
            return 0
        return self.n_enc_layers if self.n_enc_layers is not None else self.n_layers

    def with_vocab(self, vocab_size: int) -> ModelConfig:
        return dataclasses.replace(self, vocab_size=vocab_size)

    # ---- parameter counts (exact; tests check them against the built modules) ---------------
    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact parameter count. `include_embeddings=False` drops token and position tables
        (and an untied output matrix is kept: it is a matmul in every step). A classifier adds its
        head, len(labels) x dim; the language model's output layer is counted as before (it stays in
        the state dict, frozen when untied: models/classifier.py). Bidirectional: two language models
        and a head of len(labels) x 2 dim."""
        readers = 2 if self.bidirectional else 1
        return readers * (self._lm_params(include_embeddings) + len(self.labels) * self.dim)

    def _lm_params(self, include_embeddings: bool) -> int:
        V, D, L = self.padded_vocab_size, self.dim, self.n_layers
        if self.arch in ("lstm", "gru"):
            gates = 4 if self.arch == "lstm" else 3
            per_layer = gates * (2 * D * D + 2 * D)  # W_ih, W_hh, b_ih, b_hh (PyTorch layout)
            out = (0 if self.tie_embeddings else V * D) + (V if self.bias else 0)
            emb = V * D if include_embeddings else 0
            return emb + L * per_layer + out
        H, K, Hd, F = self.n_heads, self.kv_heads, self.head_dim, self.hidden_dim
        b = 1 if self.bias else 0
        attn = D * H * Hd + 2 * D * K * Hd + H * Hd * D + b * (H * Hd + 2 * K * Hd + D)
        mlp = (3 if self.mlp == "swiglu" else 2) * D * F + b * ((2 if self.mlp == "swiglu" else 1) * F + D)
        norm = D * (2 if (self.norm == "layernorm" and self.bias) else 1)
        per_layer = attn + mlp + 2 * norm
        pos_table = self.max_seq_len * D if self.pos == "learned" else 0
        total = L * per_layer + norm  # + final norm
        if self.arch == "encoder":
            # embedding norm; masked-LM head: dense D x D, its norm, the output layer's bias
            total += norm + D * D + b * D + norm + b * V
        elif self.arch == "encdec":
            # decoder blocks gain cross-attention and its norm; the encoder stack has its own blocks,
            # final norm and position table; both stacks norm their embeddings
            total += L * (attn + norm) + self.enc_layers * per_layer + norm + 2 * norm
            pos_table *= 2
        if include_embeddings:
            total += V * D + pos_table
        if not self.tie_embeddings:
            total += V * D
        return total


_GPT2 = dict(arch="transformer", vocab_size=50257, max_seq_len=1024, pos="learned", norm="layernorm",
             mlp="gelu", bias=True, tie_embeddings=True)
_LLAMA3 = dict(arch="transformer", vocab_size=128256, max_seq_len=8192, pos="rope", rope_theta=500000.0,
               norm="rmsnorm", mlp="swiglu", bias=False, ffn_multiple=256)
_LLAMA_SMALL = dict(arch="transformer", pos="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                    tie_embeddings=True, ffn_multiple=64)
# init_std 0.1: at the Transformer's 0.02 a tied LSTM/GRU LM stalls at the unigram loss (ModelConfig.init_std)
_RNN_SMALL = dict(n_layers=2, dim=512, pos="none", dropout=0.1, tie_embeddings=True, bias=True, init_std=0.1)

# Published shapes. GPT-2: Radford et al. 2019 (124M/355M/774M/1.5B as counted with tied
# embeddings and 50257 tokens). Llama: Meta's Llama 3.2 1B and Llama 3.1 8B/70B configs.
PRESETS: dict[str, dict[str, Any]] = {
    # small CPU presets (vocab from the data)
    "gpt-nano": dict(n_layers=4, dim=128, n_heads=4, max_seq_len=64, bias=False, tie_embeddings=True),
    "gpt-mini": dict(n_layers=6, dim=384, n_heads=6, max_seq_len=256, bias=False, tie_embeddings=True),
    "llama-nano": dict(_LLAMA_SMALL, n_layers=4, dim=128, n_heads=4, n_kv_heads=2, max_seq_len=256),
    "llama-mini": dict(_LLAMA_SMALL, n_layers=6, dim=384, n_heads=6, n_kv_heads=2, max_seq_len=512),
    "lstm-small": dict(_RNN_SMALL, arch="lstm"),
    "gru-small": dict(_RNN_SMALL, arch="gru"),
    # GPT-2 family
    "gpt2-124m": dict(_GPT2, n_layers=12, dim=768, n_heads=12),
    "gpt2-350m": dict(_GPT2, n_layers=24, dim=1024, n_heads=16),
    "gpt2-774m": dict(_GPT2, n_layers=36, dim=1280, n_heads=20),
    "gpt2-1.5b": dict(_GPT2, n_layers=48, dim=1600, n_heads=25),
    # Llama family
    "llama-150m": dict(_LLAMA3, vocab_size=32000, n_layers=12, dim=768, n_heads=12, n_kv_heads=4,
                       max_seq_len=2048, tie_embeddings=True),
    "llama-1b": dict(_LLAMA3, n_layers=16, dim=2048, n_heads=32, n_kv_heads=8, ffn_dim=8192, tie_embeddings=True),
    "llama-8b": dict(_LLAMA3, n_layers=32, dim=4096, n_heads=32, n_kv_heads=8, ffn_dim=14336, tie_embeddings=False),
    "llama-70b": dict(_LLAMA3, n_layers=80, dim=8192, n_heads=64, n_kv_heads=8, ffn_dim=28672, tie_embeddings=False),
}


def preset_values(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown model preset {name!r}{hint}; known presets: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def get_preset(name: str, **overrides: Any) -> ModelConfig:
    return ModelConfig(**{**preset_values(name), **overrides})
