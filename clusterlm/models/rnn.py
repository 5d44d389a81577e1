"""LSTM and GRU language models with the Transformer's call signature.

Embedding (-> embedding dropout, training only) -> dropout -> multi-layer nn.LSTM / nn.GRU
(dropout between layers) -> dropout -> output projection (optionally tied to the embedding, as in
Press & Wolf 2017). The same trainer, evaluator and generation engine serve these and the
Transformer: forward(idx, cache) -> logits, make_cache(...) with a `pos`, init_weights(seed).

    >>> import torch
    >>> from clusterlm.models.config import get_preset
    >>> model = RNNLM(get_preset("lstm-small", vocab_size=65)); model.init_weights(seed=0)
    >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 8, 65])
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from clusterlm.models.config import ModelConfig
from clusterlm.models.cache import RNNSlotState, RNNState, SlotRows
from clusterlm.models.transformer import TiedOutputLM


class RNNLM(TiedOutputLM):
    """Token ids (B, T) -> logits (B, T, padded V) in float32, for arch 'lstm' or 'gru'."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch not in ("lstm", "gru"):
            raise ValueError(f"RNNLM needs model.arch 'lstm' or 'gru', got {cfg.arch!r}")
        self.config = cfg
        V, D = cfg.padded_vocab_size, cfg.dim
        self.tok_embeddings = nn.Embedding(V, D)
        rnn_cls = nn.LSTM if cfg.arch == "lstm" else nn.GRU
        # PyTorch applies `dropout` to the outputs of every layer but the last
        self.rnn = rnn_cls(D, D, num_layers=cfg.n_layers, batch_first=True,
                           dropout=cfg.dropout if cfg.n_layers > 1 else 0.0)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.output = nn.Linear(D, V, bias=cfg.bias)
        self._tie()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Deterministic for a seed (None: drawn from torch's global RNG); each parameter from its
        own CPU generator seeded by (seed, name). Embedding and untied output: Normal(0, init_std);
        recurrent weights and biases: Uniform(+-1/sqrt(D)), PyTorch's own LSTM/GRU init; output
        bias: zeros. The lstm/gru presets set init_std = 0.1 (AWD-LSTM and PyTorch's word-language-
        model example draw embeddings from Uniform(+-0.1)): with the Transformer's 0.02 the inputs are
        too small for the gates to respond and a tied LM stays at the unigram loss for hundreds of steps."""
        cfg = self.config
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        bound = 1.0 / math.sqrt(cfg.dim)
        for name, p in self.named_parameters():  # a tied output.weight is listed once, as tok_embeddings
            if p.is_meta:
                continue
            g = torch.Generator(device="cpu")
            g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
            w = torch.empty(p.shape, dtype=torch.float32)
            if name.startswith("rnn."):
                w.uniform_(-bound, bound, generator=g)
            elif name == "output.bias":
                w.zero_()
            else:
                w.normal_(0.0, cfg.init_std, generator=g)
            p.copy_(w)
        self._tie()

    def make_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None,
                   dtype: torch.dtype) -> RNNState:
        cfg = self.config
        return RNNState(cfg.arch == "lstm", cfg.n_layers, batch_size, cfg.dim, max_len, device=device, dtype=dtype)

    def make_slot_cache(self, n_slots: int, max_len: int, *, device: torch.device | str | None,
                        dtype: torch.dtype) -> RNNSlotState:
        """State for `n_slots` independent sequences (continuous batching): pass `state.rows(slots)`."""
        cfg = self.config
        return RNNSlotState(cfg.arch == "lstm", cfg.n_layers, n_slots, cfg.dim, max_len, device=device, dtype=dtype)

    def forward(self, idx: torch.Tensor, cache: RNNState | SlotRows | None = None) -> torch.Tensor:
        """idx (B, T) token ids; with a cache, continue from its state and advance cache.pos by T.
        With `slot_state.rows(slots)`, row b continues slot slots[b]'s state."""
        B, T = idx.shape
        if isinstance(cache, SlotRows):
            state: RNNSlotState = cache.cache  # type: ignore[assignment]
            if B != cache.batch_size:
                raise ValueError(f"batch of {B} sequences does not match the {cache.batch_size} slots given")
            s = cache.slots
            x = self._embed(idx)  # (B, T, D)
            if state.c is not None:
                y, (h, c) = self.rnn(x, (state.h[:, s], state.c[:, s]))  # state (L, B, D)
                state.c[:, s] = c
            else:
                y, h = self.rnn(x, state.h[:, s])
            state.h[:, s] = h
            state.pos[s] += T
            return self.output(self.dropout(y)).float()  # (B, T, V)
        if cache is not None and B != cache.batch_size:
            raise ValueError(f"batch of {B} sequences does not match the cache's batch_size={cache.batch_size}")
        x = self._embed(idx)  # (B, T, D)
        if cache is None:
            y, _ = self.rnn(x)  # (B, T, D)
        elif cache.c is not None:
            y, (cache.h, cache.c) = self.rnn(x, (cache.h, cache.c))  # (B, T, D); state (L, B, D)
        else:
            y, cache.h = self.rnn(x, cache.h)  # (B, T, D); state (L, B, D)
        if cache is not None:
            cache.pos += T
        return self.output(self.dropout(y)).float()  # (B, T, V)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> the last layer's outputs (B, T, D) after dropout, what the output
        layer reads (no cache: a task head pools these, models/classifier.py)."""
        y, _ = self.rnn(self._embed(idx))  # (B, T, D)
        return self.dropout(y)

    def _embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> embeddings (B, T, D) after embedding dropout and dropout. Embedding
        dropout masks word types, not positions: one draw per vocabulary entry per call, so every
        occurrence of a dropped word in the batch reads zeros (applied to the looked-up vectors, so a
        LoRA embedding adapter is masked with its base)."""
        x = self.tok_embeddings(idx)
        p = self.config.embed_dropout
        if self.training and p > 0:
            keep = torch.empty(self.config.padded_vocab_size, device=idx.device).bernoulli_(1.0 - p) / (1.0 - p)
            x = x * keep[idx].unsqueeze(-1).to(x.dtype)
        return self.dropout(x)
