"""The decoder-only Transformer: GPT-2 and Llama are this one module with different config values.

GPT-2: learned positions, LayerNorm, GELU MLP (tanh approximation, GPT-2's `gelu_new`), biases,
tied embeddings. Llama: rotary positions, RMSNorm, SwiGLU MLP, grouped-query attention, no biases.
Attention is `F.scaled_dot_product_attention` (flash kernels on GPU, a fused kernel on CPU).

Rotary convention: Hugging Face Llama's `rotate_half` (the head dim is split into two halves,
frequency i pairs element i with element i + Hd/2), not Meta's interleaved pairs. So Hugging Face
Llama checkpoints convert by copying weights, with no permutation of wq/wk.

Parameter names follow STYLE.md: tok_embeddings, pos_embeddings (learned only),
layers.{i}.attention.{wq,wk,wv,wo}, layers.{i}.feed_forward.{w1,w2,w3}, layers.{i}.attention_norm,
layers.{i}.ffn_norm, norm, output. With tie_embeddings, output.weight IS tok_embeddings.weight.

    >>> import torch
    >>> from clusterlm.models.config import get_preset
    >>> cfg = get_preset("gpt-nano", vocab_size=65)
    >>> with torch.device("meta"):
    ...     model = Transformer(cfg)
    >>> model = model.to_empty(device="cpu"); model.init_weights(seed=0)
    >>> model(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 8, 65])
"""

from __future__ import annotations

import math
import weakref
import zlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clusterlm.models.cache import KVCache, SlotKV, SlotKVCache, SlotRows
from clusterlm.models.config import ModelConfig


def rotary_tables(head_dim: int, max_len: int, theta: float, device: torch.device | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables, each (max_len, Hd), in float32, as Hugging Face Llama computes them:
    inv_freq_i = theta^(-2i/Hd), angle = position * inv_freq, duplicated across the two halves."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(max_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (S, Hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (S, Hd)
    return emb.cos(), emb.sin()


def sinusoidal_table(max_len: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """The fixed position table (max_len, D) of Vaswani et al. 2017, float32:
    PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(p / 10000^(2i/D)). Not a parameter."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    angles = torch.outer(torch.arange(max_len, device=device, dtype=torch.float32), inv_freq)  # (S, D/2)
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(1)  # (S, D): sin, cos interleaved


def sinusoidal_add(tok: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Token vectors (B, T, D) scaled by sqrt(D) plus the fixed position vectors (T, D) or (B, T, D):
    Vaswani et al. 2017, sec. 3.4 ("we multiply those weights by sqrt(d_model)"). Without the scale
    the table (entries up to +-1) swamps embeddings initialised at std 0.02: a 7-minute Multi30k
    encoder-decoder then ignored its source (2.8 BLEU, where learned positions reach 16)."""
    return tok * math.sqrt(tok.shape[-1]) + table.to(tok.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, T, H, Hd) by the angles in cos/sin, (T, Hd) shared by the batch or (B, T, Hd)
    per row: x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)  # (B, T, H, Hd)
    cos = cos.to(x.dtype).unsqueeze(-2)  # (T, 1, Hd) or (B, T, 1, Hd)
    sin = sin.to(x.dtype).unsqueeze(-2)
    return x * cos + rotated * sin


def _fuse(owner: nn.Module, linears: list[nn.Module], enable: bool) -> bool:
    """Set owner.fused to the weights (and biases) of `linears` concatenated along the output dim,
    or to None. Kept only when every module is a plain nn.Linear over plain tensors: quantized
    modules, DTensor shards under tensor parallel and inference tensors (no version counter) run
    one by one. `owner._fused_src` remembers the source tensors, their storage and version, so a
    second call rebuilds only when a weight was replaced, moved or modified in place."""
    tensors: list[torch.Tensor] = []
    for lin in linears:
        if type(lin) is not nn.Linear:
            enable = False
            break
        tensors += [lin.weight] if lin.bias is None else [lin.weight, lin.bias]
    if not enable or any(type(t.data) is not torch.Tensor or t.is_inference() for t in tensors):
        owner.fused, owner._fused_src = None, None
        return False
    key = tuple((t.data_ptr(), t._version) for t in tensors)
    src = owner._fused_src
    # same tensor objects (weak references: a replaced parameter is not kept alive), same storage, same version
    if owner.fused is None or src[1] != key or any(r() is not t for r, t in zip(src[0], tensors)):
        with torch.no_grad():
            weight = torch.cat([lin.weight for lin in linears])  # (sum N, D)
            bias = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
        owner.fused, owner._fused_src = (weight, bias), ([weakref.ref(t) for t in tensors], key)
    return True


def fuse_for_inference(model: nn.Module, enable: bool = True) -> int:
    """Give cached inference one matmul where the model has several over the same input: wq|wk|wv in
    every attention, w1|w3 in every SwiGLU feed-forward. The concatenated weights are plain
    attributes (`module.fused`), not parameters or buffers, so the state dict is unchanged. Used
    only by forward passes with a cache and gradients off. Call it again after changing the weights
    (a cheap no-op when nothing changed; clusterlm.generate.engine calls it before every
    generation); `enable=False` drops the copies. The caller decides where fusion pays (the engine:
    accelerators only). Returns the number of fused modules (0 for a model without these layers)."""
    n = 0
    for m in model.modules():
        if isinstance(m, Attention):
            n += _fuse(m, [m.wq, m.wk, m.wv], enable)
        elif isinstance(m, FeedForward) and m.swiglu:
            n += _fuse(m, [m.w1, m.w3], enable)
    return n


def _dropout(p: float) -> nn.Module:
    # nn.Identity when p == 0: skips a kernel per call in the common no-dropout case
    return nn.Dropout(p) if p > 0 else nn.Identity()


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: Any) -> torch.Tensor:
    """F.scaled_dot_product_attention, run in fp32 under CPU autocast. torch's CPU flash-attention
    backward in bf16 took 5.6 ms a call against 0.7 ms in fp32 (batch 12, 4 heads, 64 positions,
    head dim 32; a Xeon with AMX, 1 thread): it made bf16 training of the Shakespeare recipe slower
    than fp32 (44 against 39 ms a step), and 26 ms with attention kept in fp32 while the matmuls
    around it run in bf16 (docs/training.md, "bf16 on a CPU"). The output is fp32; the next Linear
    casts it back under autocast. Keyed on the caller's CPU autocast state, which casts nothing on
    other devices."""
    if torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw)
    return F.scaled_dot_product_attention(q, k, v, **kw)


class Attention(nn.Module):
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
        self.fused: tuple[torch.Tensor, torch.Tensor | None] | None = None  # wq|wk|wv: fuse_for_inference
        self._fused_src: tuple | None = None

    def _qkv(self, x: torch.Tensor, cached: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The projections q (B, T, H*Hd), k and v (B, T, K*Hd); `cached` inference (a KV cache,
        gradients off) runs them as one wq|wk|wv matmul after fuse_for_inference."""
        fused = self.fused if cached and not torch.is_grad_enabled() else None
        if fused is None:
            return self.wq(x), self.wk(x), self.wv(x)
        H, K, Hd = self.n_heads, self.kv_heads, self.head_dim
        q, k, v = F.linear(x, *fused).split([H * Hd, K * Hd, K * Hd], dim=-1)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                kv: tuple[torch.Tensor, torch.Tensor, int] | SlotKV | None) -> torch.Tensor:
        B, T, _ = x.shape
        if T == 1 and type(kv) is tuple and not self.training:
            return self._decode_step(x, rope, kv)
        H, K, Hd = self.n_heads, self.kv_heads, self.head_dim
        q, k, v = self._qkv(x, kv is not None)
        q, k, v = q.view(B, T, H, Hd), k.view(B, T, K, Hd), v.view(B, T, K, Hd)  # (B, T, H|K, Hd)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|K, T, Hd)
        mask, causal = None, True
        if isinstance(kv, SlotKV):
            k, v, mask = kv.update(k, v)
            causal = False
        elif kv is not None:
            k_cache, v_cache, pos = kv  # (B, K, S, Hd) each
            k_cache[:, :, pos:pos + T] = k
            v_cache[:, :, pos:pos + T] = v
            k, v = k_cache[:, :, :pos + T], v_cache[:, :, :pos + T]  # (B, K, pos+T, Hd)
            if T == 1:
                causal = False  # one query may see every stored key
            elif pos > 0:
                # SDPA's is_causal aligns the mask top-left; queries here sit at pos .. pos+T-1
                causal = False
                q_pos = torch.arange(pos, pos + T, device=x.device)
                mask = torch.arange(pos + T, device=x.device)[None, :] <= q_pos[:, None]  # (T, pos+T)
        y = sdpa(
            q, k, v, attn_mask=mask, is_causal=causal,
            dropout_p=self.attn_dropout if self.training else 0.0, enable_gqa=K != H,
        )  # (B, H, T, Hd)
        y = y.transpose(1, 2).reshape(B, T, H * Hd)  # (B, T, D)
        return self.resid_dropout(self.wo(y))

    def _decode_step(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                     kv: tuple[torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
        """forward() for one token per sequence (x: (B, 1, D)) on a KVCache in eval mode: the decode
        hot path. The new key and value are written at pos and the query sees all pos+1 stored keys,
        so there is no mask; with T = 1 the heads' layout (B, H, 1, Hd) is a view of the projection,
        no transpose. Same math as forward()'s cached path, in ~5 fewer ops per layer: on a CPU a
        decode step's weight stream evicts what small ops touch, so each costs several times its
        warm cost (measured in docs/compression.md, "Decode step")."""
        B = x.shape[0]
        H, K, Hd = self.n_heads, self.kv_heads, self.head_dim
        k_cache, v_cache, pos = kv  # (B, K, S, Hd) each
        q, k, v = self._qkv(x, True)
        q, k, v = q.view(B, H, 1, Hd), k.view(B, K, 1, Hd), v.view(B, K, 1, Hd)  # (B, H|K, 1, Hd)
        if rope is not None:  # cos/sin (1, Hd) broadcast over the heads
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        k_cache[:, :, pos:pos + 1] = k
        v_cache[:, :, pos:pos + 1] = v
        y = F.scaled_dot_product_attention(q, k_cache[:, :, :pos + 1], v_cache[:, :, :pos + 1],
                                           enable_gqa=K != H)  # (B, H, 1, Hd)
        return self.resid_dropout(self.wo(y.view(B, 1, H * Hd)))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, F_ = cfg.dim, cfg.hidden_dim
        self.swiglu = cfg.mlp == "swiglu"
        self.w1 = nn.Linear(D, F_, bias=cfg.bias)  # GELU: up projection; SwiGLU: gate
        self.w2 = nn.Linear(F_, D, bias=cfg.bias)  # down projection
        if self.swiglu:
            self.w3 = nn.Linear(D, F_, bias=cfg.bias)  # SwiGLU: up projection
        self.dropout = _dropout(cfg.dropout)
        self.fused: tuple[torch.Tensor, torch.Tensor | None] | None = None  # w1|w3: fuse_for_inference
        self._fused_src: tuple | None = None

    def forward(self, x: torch.Tensor, cached: bool = False) -> torch.Tensor:
        """`cached`: inference with a KV cache, where SwiGLU runs w1|w3 as one matmul after fuse_for_inference."""
        if self.swiglu:
            fused = self.fused if cached and not torch.is_grad_enabled() else None
            if fused is not None:
                gate, up = F.linear(x, *fused).chunk(2, dim=-1)  # (B, T, F) each
                h = F.silu(gate) * up
            else:
                h = F.silu(self.w1(x)) * self.w3(x)
        else:
            h = F.gelu(self.w1(x), approximate="tanh")  # GPT-2's gelu_new
        return self.dropout(self.w2(h))


def _norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + feed_forward(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = _norm(cfg)
        self.attention = Attention(cfg)
        self.ffn_norm = _norm(cfg)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                kv: tuple[torch.Tensor, torch.Tensor, int] | SlotKV | None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, kv)
        return x + self.feed_forward(self.ffn_norm(x), kv is not None)


class TiedOutputLM(nn.Module):
    """Base of the language models: with config.tie_embeddings, output.weight IS tok_embeddings.weight,
    and stays so across to_empty()/to() (which give each module a new Parameter)."""

    config: ModelConfig

    def _tie(self) -> None:
        # a pipeline stage may hold only one end (the other is None)
        if self.config.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # moving off the meta device would silently untie output from tok_embeddings: tie again
        super()._apply(fn, recurse)
        self._tie()
        return self


class Transformer(TiedOutputLM):
    """Token ids (B, T) -> logits (B, T, padded V) in float32. See the module docstring."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch != "transformer":
            raise ValueError(f"Transformer needs model.arch='transformer', got {cfg.arch!r}")
        self.config = cfg
        V, D = cfg.padded_vocab_size, cfg.dim
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(V, D)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, D) if cfg.pos == "learned" else None
        if cfg.pos == "sinusoidal":  # not persistent: recomputed by init_weights, never checkpointed
            self.register_buffer("pos_table", sinusoidal_table(cfg.max_seq_len, D), persistent=False)
        self.dropout = _dropout(cfg.dropout)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm: nn.Module | None = _norm(cfg)
        self.output: nn.Linear | None = nn.Linear(D, V, bias=False)
        if cfg.pos == "rope":
            cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
            # not persistent: recomputed by init_weights (after to_empty), never checkpointed
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self._tie()

    # ---- weights ------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Fill every parameter deterministically from `seed` (None: drawn from torch's global RNG)
        and recompute the rotary tables. Normal(0, init_std) for Linear and Embedding weights,
        std init_std/sqrt(2*n_layers) for residual projections (GPT-2 paper, sec. 2.3), zeros for
        biases, ones for norm weights. Each parameter gets its own generator seeded from (seed,
        name) on the CPU, so values do not depend on the device or on which layers are present
        (a pipeline stage holding layers 4-7 gets the same weights as the full model)."""
        init_parameters(self, self.config, seed, self.config.n_layers)
        self._tie()

    # ---- forward --------------------------------------------------------------------------------
    def _positions(self, h: torch.Tensor, positions: torch.Tensor | slice) -> torch.Tensor:
        """h (B, T, D) plus the absolute position vectors of `positions` (a slice shared by the batch,
        or (B, T) per row): the learned table or the sinusoidal one; unchanged for rotary (applied in
        attention) and on a pipeline stage that receives hidden states."""
        if self.pos_embeddings is not None:
            return h + self.pos_embeddings.weight[positions]  # (T, D) broadcast over B, or (B, T, D)
        if self.config.pos == "sinusoidal" and self.tok_embeddings is not None:
            return sinusoidal_add(h, self.pos_table[positions])
        return h

    def make_cache(self, batch_size: int, max_len: int, *, device: torch.device | str | None,
                   dtype: torch.dtype) -> KVCache:
        """A KV cache for `batch_size` sequences of up to `max_len` tokens (<= config.max_seq_len)."""
        if max_len > self.config.max_seq_len:
            raise ValueError(f"cache max_len={max_len} exceeds model.max_seq_len={self.config.max_seq_len}")
        cfg = self.config
        return KVCache(list(self.layers.keys()), batch_size, max_len, cfg.kv_heads, cfg.head_dim,
                       device=device, dtype=dtype)

    def make_slot_cache(self, n_slots: int, max_len: int, *, device: torch.device | str | None,
                        dtype: torch.dtype) -> SlotKVCache:
        """A cache of `n_slots` independent sequences of up to `max_len` tokens each, for continuous
        batching: pass `cache.rows(slots)` to forward."""
        if max_len > self.config.max_seq_len:
            raise ValueError(f"cache max_len={max_len} exceeds model.max_seq_len={self.config.max_seq_len}")
        cfg = self.config
        return SlotKVCache(list(self.layers.keys()), n_slots, max_len, cfg.kv_heads, cfg.head_dim,
                           device=device, dtype=dtype)

    def _forward_slots(self, idx: torch.Tensor, rows: SlotRows, last_only: bool = False) -> torch.Tensor:
        """forward() over a slot cache: row b's T tokens sit at positions pos[slots[b]] + 0..T-1."""
        cache: SlotKVCache = rows.cache  # type: ignore[assignment]
        B, T = idx.shape[:2]
        if B != rows.batch_size:
            raise ValueError(f"batch of {B} sequences does not match the {rows.batch_size} slots given")
        start = cache.pos[rows.slots]  # (B,)
        if int(start.max()) + T > cache.max_len:
            raise ValueError(f"{T} tokens do not fit in a cache slot holding {int(start.max())} tokens; "
                             f"max_len={cache.max_len}")
        positions = start[:, None] + torch.arange(T, device=start.device)  # (B, T)
        h = self.tok_embeddings(idx) if self.tok_embeddings is not None else idx  # (B, T, D)
        h = self.dropout(self._positions(h, positions))
        rope = (self.rope_cos[positions], self.rope_sin[positions]) if self.config.pos == "rope" else None  # (B, T, Hd)
        full = B == cache.n_slots and bool((rows.slots == torch.arange(B, device=start.device)).all())
        length, mask = SlotKV.for_batch(positions)
        for key, layer in self.layers.items():
            h = layer(h, rope, SlotKV(cache.k[key], cache.v[key], rows.slots, positions, full, length, mask))
        cache.pos[rows.slots] = start + T
        return self._head(h, last_only)

    def _head(self, h: torch.Tensor, last_only: bool) -> torch.Tensor:
        """Final norm and output projection of hidden states (B, T, D) -> logits (B, T or 1, V), float32
        under autocast too, for a stable loss (a pipeline stage without them returns h)."""
        if last_only:
            h = h[:, -1:]  # (B, 1, D)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is None:
            return h
        return self.output(h).float()

    def forward(self, idx: torch.Tensor, cache: KVCache | SlotRows | None = None, *,
                last_only: bool = False) -> torch.Tensor:
        """idx: token ids (B, T) (hidden states (B, T, D) on a pipeline stage without
        tok_embeddings). With a cache, the tokens sit at positions cache.pos .. cache.pos+T-1; with
        `slot_cache.rows(slots)`, row b's tokens sit at slot_cache.pos[slots[b]] onwards.
        `last_only`: the final norm and output projection run on the last position only, giving
        (B, 1, V): a prompt's prefill needs no logits for the other positions (with a 50k
        vocabulary the output projection is the costliest matmul of a long prefill)."""
        if isinstance(cache, SlotRows):
            return self._forward_slots(idx, cache, last_only)
        B, T = idx.shape[:2]
        pos = 0 if cache is None else cache.pos
        limit = self.config.max_seq_len if cache is None else cache.max_len
        if pos + T > limit:
            where = "model.max_seq_len" if cache is None else f"the cache (holding {pos} tokens); max_len"
            raise ValueError(f"{T} tokens do not fit in {where}={limit}")
        if cache is not None and B != cache.batch_size:
            raise ValueError(f"batch of {B} sequences does not match the cache's batch_size={cache.batch_size}")

        h = self.tok_embeddings(idx) if self.tok_embeddings is not None else idx  # (B, T, D)
        h = self.dropout(self._positions(h, slice(pos, pos + T)))
        rope = (self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]) if self.config.pos == "rope" else None
        for key, layer in self.layers.items():
            kv = None if cache is None else (cache.k[key], cache.v[key], pos)
            h = layer(h, rope, kv)
        if cache is not None:
            cache.pos = pos + T
        return self._head(h, last_only)

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> the final normed hidden states (B, T, D), what the output layer reads:
        forward() without a cache and without the output projection (a task head pools these:
        models/classifier.py)."""
        T = idx.shape[1]
        if T > self.config.max_seq_len:
            raise ValueError(f"{T} tokens do not fit in model.max_seq_len={self.config.max_seq_len}")
        h = self.dropout(self._positions(self.tok_embeddings(idx), slice(0, T)))  # (B, T, D)
        rope = (self.rope_cos[:T], self.rope_sin[:T]) if self.config.pos == "rope" else None
        for layer in self.layers.values():
            h = layer(h, rope, None)
        return self.norm(h)  # (B, T, D)


def init_parameters(model: nn.Module, cfg: ModelConfig, seed: int | None, n_layers: int) -> None:
    """The Transformer families' initialisation (Transformer.init_weights; models/encdec.py): each
    parameter from its own CPU generator seeded by (seed, name); Normal(0, init_std) for Linear and
    Embedding weights, init_std/sqrt(2*n_layers) for the residual projections (attention.wo,
    cross_attention.wo, feed_forward.w2), zeros for biases, ones for norm weights; then the rotary
    and sinusoidal tables recomputed (they are buffers, lost by to_empty())."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    resid_std = cfg.init_std / math.sqrt(2 * n_layers)
    seen: set[int] = set()
    with torch.no_grad():
        for mod_name, mod in model.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                if id(p) in seen:  # a tied weight is filled once, under its first name
                    continue
                seen.add(id(p))
                if p_name == "bias":
                    p.zero_()
                elif isinstance(mod, (nn.LayerNorm, nn.RMSNorm)):
                    p.fill_(1.0)
                else:
                    residual = mod_name.endswith(("attention.wo", "feed_forward.w2"))
                    _normal_(p, resid_std if residual else cfg.init_std, seed, f"{mod_name}.{p_name}")
            if getattr(mod, "rope_cos", None) is not None and not mod.rope_cos.is_meta:
                cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=mod.rope_cos.device)
                mod.rope_cos.copy_(cos)
                mod.rope_sin.copy_(sin)
            if getattr(mod, "pos_table", None) is not None and not mod.pos_table.is_meta:
                mod.pos_table.copy_(sinusoidal_table(cfg.max_seq_len, cfg.dim, device=mod.pos_table.device))


def _normal_(p: torch.Tensor, std: float, seed: int, name: str) -> None:
    """p ~ Normal(0, std), drawn on the CPU from a generator seeded by (seed, name)."""
    if p.is_meta:
        return
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
    p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=g))
