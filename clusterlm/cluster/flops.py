"""FLOPs per token and per step, PaLM's convention (Chowdhery et al. 2022, appendix B). Torch-free.

    >>> from clusterlm.models.config import get_preset
    >>> from clusterlm.cluster.flops import training_flops_per_token
    >>> f = training_flops_per_token(get_preset("gpt2-124m"), seq_len=1024)
    >>> print(f.convention)           # always print this beside a FLOP count or an MFU

Training: 6*N + 12*L*D*T per token.
  - N = parameters that take part in a matrix multiply for every token: all Transformer (or
    LSTM/GRU) layer weights plus the output projection (V*D, counted once even when tied to the
    token embedding, because the logits matmul runs either way). Token and position embedding
    lookups are not matmuls and are not counted. This equals nanoGPT's `estimate_mfu` N for tied
    GPT-2 models (it subtracts only the position table).
  - 6 = 2 FLOPs per multiply-add, x3 for forward + backward (input and weight gradients).
  - 12*L*D*T: attention scores Q.K^T and the weighted sum A.V, 2*2*T*D FLOPs per token per
    layer forward, x3 for training; counted over the full T x T square as PaLM does (a causal
    kernel skips half of it, so MFU from this convention is comparable to PaLM's, not to HFU).
Forward only (inference, eval): 2*N + 4*L*D*T.
LSTM/GRU layers have no attention term; their recurrent matrices count in N.
Activation recomputation adds hardware FLOPs (HFU), never model FLOPs (MFU): see `recompute_flops`.
"""

from __future__ import annotations

from dataclasses import dataclass

from clusterlm.models.config import ModelConfig


@dataclass(frozen=True)
class FlopsPerToken:
    matmul_params: int
    """N: parameters in a matmul per token (layers + output projection)"""
    dense: float
    """6*N (training) or 2*N (forward)"""
    attention: float
    """12*L*D*T (training) or 4*L*D*T (forward)"""
    training: bool
    seq_len: int
    convention: str
    """one line naming the convention, with N broken down; print it beside any FLOP figure"""

    @property
    def total(self) -> float:
        return self.dense + self.attention


def matmul_params(model: ModelConfig) -> tuple[int, int, int]:
    """(N, non-embedding parameters without the output projection, output projection V*D)."""
    V, D = model.padded_vocab_size, model.dim
    output = V * D
    non_emb = model.num_params(include_embeddings=False)
    layers = non_emb - (0 if model.tie_embeddings else output)  # num_params keeps an untied output matrix
    return layers + output, layers, output


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:g}"


def flops_per_token(model: ModelConfig, seq_len: int, training: bool = True) -> FlopsPerToken:
    """Model FLOPs per token at context length `seq_len`."""
    n, layers, output = matmul_params(model)
    k_dense, k_attn = (6, 12) if training else (2, 4)
    attn = 0.0
    if model.arch == "transformer":
        attn = float(k_attn * model.n_layers * model.n_heads * model.head_dim * seq_len)
    tied = "tied to the embedding, still a matmul" if model.tie_embeddings else "untied"
    conv = (f"PaLM convention: {k_dense}*N + {k_attn}*L*D*T per token ({'training' if training else 'forward'}), "
            f"N = {_fmt(n)} = {_fmt(layers)} layer weights + {_fmt(output)} output projection ({tied}); "
            f"embedding lookups not counted; attention over the full T x T (T={seq_len})")
    if model.arch != "transformer":
        conv = (f"{k_dense}*N per token ({'training' if training else 'forward'}), N = {_fmt(n)} = {_fmt(layers)} "
                f"{model.arch.upper()} weights + {_fmt(output)} output projection ({tied}); no attention term")
    return FlopsPerToken(n, float(k_dense * n), attn, training, seq_len, conv)


def training_flops_per_token(model: ModelConfig, seq_len: int) -> FlopsPerToken:
    return flops_per_token(model, seq_len, training=True)


def forward_flops_per_token(model: ModelConfig, seq_len: int) -> FlopsPerToken:
    return flops_per_token(model, seq_len, training=False)


def training_flops_per_step(model: ModelConfig, seq_len: int, global_batch_tokens: int) -> float:
    return training_flops_per_token(model, seq_len).total * global_batch_tokens


def recompute_flops(model: ModelConfig, seq_len: int, mode: str) -> float:
    """Extra hardware FLOPs per token that activation recomputation spends (not in MFU).

    full: one more forward of every layer (2*N_layers + 4*L*D*T); selective (Korthikanti et al.):
    only the attention core is recomputed (4*L*D*T); none: 0.
    """
    if mode == "none":
        return 0.0
    _, layers, _ = matmul_params(model)
    attn = 4.0 * model.n_layers * model.dim * seq_len if model.arch == "transformer" else 0.0
    if mode == "selective":
        return attn
    if mode == "full":
        return 2.0 * layers + attn
    raise ValueError(f"recompute mode {mode!r}; expected none, selective or full")
