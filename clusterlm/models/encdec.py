"""The Transformer's other two families: a bidirectional encoder with a masked-LM head (BERT's
recipe, arch "encoder") and the encoder-decoder of the original Transformer (Vaswani et al. 2017;
T5, BART; arch "encdec").

Both reuse the decoder-only model's parts (models/transformer.py): the same attention projections,
norms (LayerNorm or RMSNorm), MLPs (GELU or SwiGLU) and positions (learned, sinusoidal or rotary),
pre-norm residual blocks, and the same per-parameter seeded initialisation. What differs:

- encoder self-attention is bidirectional, with a key mask for right-padded rows (`mask`, (B, S)
  bool, True = a real token; None = every position is real);
- the decoder block adds cross-attention between its self-attention and its MLP: queries from the
  decoder, keys and values from the encoder's output ("memory");
- both stacks norm their embeddings (`emb_norm`, as BERT and BART do) and end with a final norm;
- the encoder's masked-LM head is dense -> GELU -> norm -> output (tied to the token embedding,
  with a bias when model.bias), RoBERTa's `lm_head` layout.

Names (STYLE.md; parallel/tp.py, finetune/lora.py and models/convert.py match on them):

    encoder: tok_embeddings, pos_embeddings, emb_norm, layers.{i}.{attention_norm, attention.{wq,wk,wv,wo},
             ffn_norm, feed_forward.{w1,w2,w3}}, norm, mlm_head.{dense, norm}, output
    encdec:  tok_embeddings (shared by both stacks and the output), encoder.{pos_embeddings, emb_norm,
             layers.{i}..., norm}, pos_embeddings, emb_norm, layers.{i}.{attention_norm, attention,
             cross_norm, cross_attention.{wq,wk,wv,wo}, ffn_norm, feed_forward}, norm, output

Decoding computes the encoder once: `EncDecCache` holds the decoder's self-attention KV cache and,
per layer, the cross-attention keys and values of the memory, computed when the cache is primed.

    >>> import torch
    >>> from clusterlm.models.config import ModelConfig
    >>> cfg = ModelConfig(arch="encdec", vocab_size=40, n_layers=2, dim=32, n_heads=4, max_seq_len=16)
    >>> model = EncoderDecoder(cfg); model.init_weights(seed=0)
    >>> src, tgt = torch.randint(0, 40, (2, 7)), torch.randint(0, 40, (2, 5))
    >>> model(src, tgt).shape
    torch.Size([2, 5, 40])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clusterlm.models.cache import KVCache
from clusterlm.models.config import ModelConfig
from clusterlm.models.transformer import (
    Attention,
    Block,
    FeedForward,
    TiedOutputLM,
    _dropout,
    _norm,
    apply_rotary,
    init_parameters,
    rotary_tables,
    sdpa,
    sinusoidal_add,
    sinusoidal_table,
)


def key_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, S) bool, True = real -> SDPA's boolean attn_mask (B, 1, 1, S), True = may attend. A row
    with no real token keeps position 0 (SDPA returns NaN for a query that sees no key)."""
    if mask is None:
        return None
    mask = mask.clone()
    mask[:, 0] |= ~mask.any(dim=1)
    return mask[:, None, None, :]


class BidirectionalAttention(Attention):
    """The decoder's Attention (same projections, names and GQA) without the causal mask:
    x (B, T, D), rope, mask (B, 1, 1, T) bool or None."""

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,  # type: ignore[override]
                mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, Hd = self.n_heads, self.kv_heads, self.head_dim
        q, k, v = self.wq(x).view(B, T, H, Hd), self.wk(x).view(B, T, K, Hd), self.wv(x).view(B, T, K, Hd)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T, Hd)
        y = sdpa(q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0,
                 enable_gqa=K != H)  # (B, H, T, Hd)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, H * Hd)))


class CrossAttention(nn.Module):
    """Queries from the decoder (B, T, D), keys and values from the encoder's memory (B, S, D);
    no positions (they are in the memory already) and no causal mask, a key mask for padded sources.
    `memory_kv(memory)` gives the (k, v) a cache keeps, so decoding projects the memory once."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, H, K, Hd = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.n_heads, self.kv_heads, self.head_dim = H, K, Hd
        self.wq = nn.Linear(D, H * Hd, bias=cfg.bias)
        self.wk = nn.Linear(D, K * Hd, bias=cfg.bias)
        self.wv = nn.Linear(D, K * Hd, bias=cfg.bias)
        self.wo = nn.Linear(H * Hd, D, bias=cfg.bias)
        self.attn_dropout = cfg.dropout
        self.resid_dropout = _dropout(cfg.dropout)

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """memory (B, S, D) -> keys and values (B, K, S, Hd) each."""
        B, S, _ = memory.shape
        K, Hd = self.kv_heads, self.head_dim
        return (self.wk(memory).view(B, S, K, Hd).transpose(1, 2),
                self.wv(memory).view(B, S, K, Hd).transpose(1, 2))

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hd = self.n_heads, self.head_dim
        q = self.wq(x).view(B, T, H, Hd).transpose(1, 2)  # (B, H, T, Hd)
        k, v = kv
        y = sdpa(q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0,
                 enable_gqa=self.kv_heads != H)  # (B, H, T, Hd)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, T, H * Hd)))


class EncoderBlock(nn.Module):
    """Pre-norm residual block with bidirectional self-attention: the decoder's Block names."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = _norm(cfg)
        self.attention = BidirectionalAttention(cfg)
        self.ffn_norm = _norm(cfg)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class DecoderBlock(Block):
    """Block (causal self-attention with the KV cache, MLP) with cross-attention between the two:
    x + self_attn(norm(x)), then x + cross_attn(norm(x), memory), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.cross_norm = _norm(cfg)
        self.cross_attention = CrossAttention(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,  # type: ignore[override]
                kv: tuple[torch.Tensor, torch.Tensor, int] | None, memory_kv: tuple[torch.Tensor, torch.Tensor] | torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, kv)
        if isinstance(memory_kv, torch.Tensor):  # training / uncached: project the memory here
            memory_kv = self.cross_attention.memory_kv(memory_kv)
        x = x + self.cross_attention(self.cross_norm(x), memory_kv, mask)
        return x + self.feed_forward(self.ffn_norm(x), kv is not None)


class _Embedder(nn.Module):
    """Position handling shared by both stacks: a learned table (`pos_embeddings`), a sinusoidal
    buffer (`pos_table`) or rotary tables (`rope_cos`, `rope_sin`), then `emb_norm` and dropout."""

    def _setup_positions(self, cfg: ModelConfig) -> None:
        D = cfg.dim
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, D) if cfg.pos == "learned" else None
        if cfg.pos == "sinusoidal":  # buffers are not persistent: recomputed by init_weights
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, D), persistent=False)
        if cfg.pos == "rope":
            cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.emb_norm = _norm(cfg)
        self.dropout = _dropout(cfg.dropout)
        self.pos_kind = cfg.pos
        self.max_len = cfg.max_seq_len

    def _embed(self, tok: torch.Tensor, start: int, what: str
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Token vectors (B, T, D) at positions start..start+T-1 -> (normed input, rope tables)."""
        T = tok.shape[1]
        if start + T > self.max_len:
            raise ValueError(f"{what} of {start + T} tokens does not fit in model.max_seq_len={self.max_len}")
        h, rope = tok, None
        if self.pos_kind == "learned":
            h = h + self.pos_embeddings.weight[start:start + T]
        elif self.pos_kind == "sinusoidal":  # tokens scaled by sqrt(D), as Vaswani et al.
            h = sinusoidal_add(h, self.pos_table[start:start + T])
        elif self.pos_kind == "rope":
            rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
        return self.dropout(self.emb_norm(h)), rope


class EncoderStack(_Embedder):
    """Embedded tokens (B, S, D) and a key mask -> the final normed hidden states (B, S, D)."""

    def __init__(self, cfg: ModelConfig, n_layers: int) -> None:
        super().__init__()
        self._setup_positions(cfg)
        self.layers = nn.ModuleDict({str(i): EncoderBlock(cfg) for i in range(n_layers)})
        self.norm = _norm(cfg)

    def forward(self, tok: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        h, rope = self._embed(tok, 0, "a source")
        attn_mask = key_mask(mask)
        for layer in self.layers.values():
            h = layer(h, rope, attn_mask)
        return self.norm(h)


class MLMHead(nn.Module):
    """RoBERTa's lm_head before its output projection: dense (D x D) -> GELU (exact) -> norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.dim, cfg.dim, bias=cfg.bias)
        self.norm = _norm(cfg)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(h)))


class Encoder(TiedOutputLM, _Embedder):
    """arch "encoder": token ids (B, S) (and a key mask) -> masked-LM logits (B, S, padded V), float32.

    `hidden_states(idx, mask)` is what a classification head pools (models/classifier.py); with
    model.pad_id >= 0 and no mask given, positions holding pad_id are masked out of attention."""

    # the classifier freezes these: only the masked-LM objective trains them
    lm_head_modules = ("mlm_head", "output")

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch != "encoder":
            raise ValueError(f"Encoder needs model.arch='encoder', got {cfg.arch!r}")
        self.config = cfg
        V, D = cfg.padded_vocab_size, cfg.dim
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(V, D)
        self._setup_positions(cfg)
        self.layers = nn.ModuleDict({str(i): EncoderBlock(cfg) for i in range(cfg.n_layers)})
        self.norm: nn.Module | None = _norm(cfg)
        self.mlm_head = MLMHead(cfg)
        self.output: nn.Linear | None = nn.Linear(D, V, bias=cfg.bias)
        self._tie()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Transformer.init_weights' scheme (models/transformer.init_parameters)."""
        init_parameters(self, self.config, seed, self.config.n_layers)
        self._tie()

    def _pad_mask(self, idx: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        if mask is None and self.config.pad_id >= 0:
            mask = idx != self.config.pad_id
        return mask

    def hidden_states(self, idx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, S) -> final normed hidden states (B, S, D)."""
        h, rope = self._embed(self.tok_embeddings(idx), 0, "an input")
        attn_mask = key_mask(self._pad_mask(idx, mask))
        for layer in self.layers.values():
            h = layer(h, rope, attn_mask)
        return self.norm(h)

    def forward(self, idx: torch.Tensor, mask: torch.Tensor | None = None,
                predict: torch.Tensor | None = None) -> torch.Tensor:
        """Masked-LM logits (B, S, V); with `predict` (B, S) bool, only at those positions, in
        row-major order, as (1, N, V): the masked-LM objective scores ~15% of the positions, and the
        head and output layer over the rest were most of a training step (data/mlm.predicting)."""
        h = self.hidden_states(idx, mask)
        if predict is not None:
            h = h[predict].unsqueeze(0)  # (1, N, D)
        return self.output(self.mlm_head(h)).float()


class EncDecCache:
    """Inference state of an EncoderDecoder for B sequences: the decoder's self-attention KVCache,
    and once primed (`EncoderDecoder.prime`), every decoder layer's cross-attention keys and values
    of the encoded source plus its key mask. `reorder(rows)` keeps rows (beam search); `pos` is the
    decoder tokens stored."""

    def __init__(self, self_kv: KVCache) -> None:
        self.self_kv = self_kv
        self.cross: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.mask: torch.Tensor | None = None  # (B, 1, 1, S) or None

    @property
    def pos(self) -> int:
        return self.self_kv.pos

    @property
    def batch_size(self) -> int:
        return self.self_kv.batch_size

    @property
    def max_len(self) -> int:
        return self.self_kv.max_len

    @property
    def primed(self) -> bool:
        return self.cross is not None

    def reset(self) -> None:
        """Forget the source and the decoded tokens."""
        self.self_kv.reset()
        self.cross, self.mask = None, None

    def reorder(self, rows: torch.Tensor) -> None:
        """Row b becomes old row rows[b] (B,) long, in every tensor: the beam-search step."""
        kv = self.self_kv
        kv.k = {key: t.index_select(0, rows) for key, t in kv.k.items()}
        kv.v = {key: t.index_select(0, rows) for key, t in kv.v.items()}
        kv.batch_size = int(rows.numel())
        if self.cross is not None:
            self.cross = {key: (k.index_select(0, rows), v.index_select(0, rows)) for key, (k, v) in self.cross.items()}
        if self.mask is not None:
            self.mask = self.mask.index_select(0, rows)


class EncoderDecoder(TiedOutputLM, _Embedder):
    """arch "encdec": source ids (B, S) and target ids (B, T) -> logits (B, T, padded V), float32.

    Training and scoring: `forward(src, tgt, src_mask=None)` runs both stacks (teacher forcing: tgt
    is the decoder's input, typically BOS + target; the caller shifts the labels). Decoding:
    `cache = make_cache(B, max_len, ...)`, `prime(src, cache, src_mask)` encodes the source once,
    then `forward(None, tgt, cache=cache)` consumes tgt at positions cache.pos onwards."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch != "encdec":
            raise ValueError(f"EncoderDecoder needs model.arch='encdec', got {cfg.arch!r}")
        self.config = cfg
        V, D = cfg.padded_vocab_size, cfg.dim
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(V, D)
        self.encoder = EncoderStack(cfg, cfg.enc_layers)
        self._setup_positions(cfg)
        self.layers = nn.ModuleDict({str(i): DecoderBlock(cfg) for i in range(cfg.n_layers)})
        self.norm: nn.Module | None = _norm(cfg)
        self.output: nn.Linear | None = nn.Linear(D, V, bias=False)
        self._tie()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Transformer.init_weights' scheme; residual projections scaled by the deeper stack."""
        init_parameters(self, self.config, seed, max(self.config.n_layers, self.config.enc_layers))
        self._tie()

    # ---- encoder --------------------------------------------------------------------------------
    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Source ids (B, S) -> the memory (B, S, D). src_mask (B, S) bool, True = real token."""
        return self.encoder(self.tok_embeddings(src), src_mask)

    # ---- decoding -------------------------------------------------------------------------------
    def make_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None,
                   dtype: torch.dtype) -> EncDecCache:
        """A cache for `batch_size` target sequences of up to `max_len` tokens; prime() it with the source."""
        if max_len > self.config.max_seq_len:
            raise ValueError(f"cache max_len={max_len} exceeds model.max_seq_len={self.config.max_seq_len}")
        cfg = self.config
        return EncDecCache(KVCache(list(self.layers.keys()), batch_size, max_len, cfg.kv_heads, cfg.head_dim,
                                   device=device, dtype=dtype))

    def prime(self, src: torch.Tensor, cache: EncDecCache, src_mask: torch.Tensor | None = None) -> None:
        """Encode `src` once and store every layer's cross-attention keys and values in `cache`
        (which forgets what it held)."""
        if src.shape[0] != cache.batch_size:
            raise ValueError(f"source batch of {src.shape[0]} does not match the cache's batch_size={cache.batch_size}")
        memory = self.encode(src, src_mask)
        cache.self_kv.reset()
        cache.cross = {key: layer.cross_attention.memory_kv(memory) for key, layer in self.layers.items()}
        cache.mask = key_mask(src_mask)

    def forward(self, src: torch.Tensor | None, tgt: torch.Tensor, src_mask: torch.Tensor | None = None, *,
                cache: EncDecCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V) (B, 1, V with last_only) of the target ids tgt (B, T) given the source.
        With a cache, src is encoded only if the cache is not primed yet (else it may be None)."""
        if cache is None:
            if src is None:
                raise ValueError("an uncached forward needs the source ids")
            memory = self.encode(src, src_mask)
            memories: dict[str, object] = dict.fromkeys(self.layers.keys(), memory)
            mask, start, kv_of = key_mask(src_mask), 0, None
        else:
            if not cache.primed:
                if src is None:
                    raise ValueError("the cache holds no source yet: pass src (or call prime) first")
                self.prime(src, cache, src_mask)
            if tgt.shape[0] != cache.batch_size:
                raise ValueError(f"batch of {tgt.shape[0]} sequences does not match the cache's batch_size={cache.batch_size}")
            if cache.pos + tgt.shape[1] > cache.max_len:
                raise ValueError(f"{tgt.shape[1]} tokens do not fit in the cache (holding {cache.pos} tokens); "
                                 f"max_len={cache.max_len}")
            memories, mask, start, kv_of = cache.cross, cache.mask, cache.pos, cache.self_kv  # type: ignore[assignment]
        h, rope = self._embed(self.tok_embeddings(tgt), start, "a target")
        for key, layer in self.layers.items():
            kv = None if kv_of is None else (kv_of.k[key], kv_of.v[key], start)
            h = layer(h, rope, kv, memories[key], mask)
        if kv_of is not None:
            kv_of.pos = start + tgt.shape[1]
        if last_only:
            h = h[:, -1:]
        return self.output(self.norm(h)).float()
