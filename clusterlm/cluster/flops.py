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


# ---- the step's work, op by op (the planner's per-op step model) ------------------------------------------
# One Transformer training micro-batch as the ops PyTorch runs for it: every GEMM with its shape
# (a Linear of in -> out over n tokens is a forward GEMM (n, out, in), an input-gradient GEMM
# (n, in, out) and a weight-gradient GEMM (out, in, n)), the attention core's batched GEMMs at the
# head's (T, T, Hd) shapes, and the memory-bound ops (norms, residual adds, activations, the loss
# over the vocabulary, the embedding) as bytes moved and transcendental functions evaluated.
ELEM_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Gemm:
    name: str
    m: int
    n: int
    k: int
    count: float
    """how many per micro-batch (fractional for the causal half of the attention GEMMs)"""

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k * self.count


@dataclass(frozen=True)
class MemOp:
    name: str
    bytes: float
    """bytes read + written by one call"""
    count: int = 1
    """calls per micro-batch"""
    transcendentals: float = 0.0
    """exp/tanh evaluations per call"""
    part: str = "memory_ops"
    """the step-time part it is reported under: memory_ops, loss (over the vocabulary), optimizer"""


@dataclass(frozen=True)
class StepWork:
    gemms: tuple[Gemm, ...]
    attention: tuple[Gemm, ...]
    memops: tuple[MemOp, ...]
    autograd_ops: int
    """ops recorded per micro-batch (each has a forward and a backward): the fixed-cost count"""


def _linear(name: str, tokens: int, d_in: int, d_out: int, count: int, forward_again: bool) -> list[Gemm]:
    fwd = 2 if forward_again else 1
    return [Gemm(f"{name} fwd", tokens, d_out, d_in, count * fwd), Gemm(f"{name} dX", tokens, d_in, d_out, count),
            Gemm(f"{name} dW", d_out, d_in, tokens, count)]


def step_work(model: ModelConfig, micro_batch: int, seq_len: int, *, tp: int = 1, recompute: str = "none",
              dtype: str = "fp32", layers: int | None = None, loss: bool = True) -> StepWork:
    """The ops of one micro-batch's forward + backward on one rank (`layers` of the model, its
    share 1/tp of every head, FFN column and vocabulary row; sequence parallel splits the rest).

    Memory-bound ops, bytes per call with h = n*D/t, f = n*F/t, q = n*H*Hd/t, kv = n*K*Hd/t
    elements (n = micro_batch*seq_len tokens) of e bytes:
      per layer: 2 norms, forward 2h and backward 5h each (x, dy, dx; a second pass over x and dy
      for the weight gradient); 2 residual adds 3h forward and 2 gradient sums 3h backward; the
      attention output's transpose-to-contiguous copy 2q forward and backward; the attention core's
      own traffic (q, k, v and output read/written, 2q + 2kv forward, 4q + 4kv backward with its
      zero-filled gradient buffers); GELU 2f forward (f tanh), 3f backward (f tanh); SwiGLU adds
      the gate product 3f forward, 6f backward and uses SiLU (exp) instead; rotary positions 13
      passes over q + kv each way.
      per micro-batch: embedding lookup 2h + position add 3h, final norm, the loss over the
      vocabulary (lg = n*V/t logits, fp32): log_softmax 2lg forward (lg exp), the zero-filled
      gradient lg, log_softmax backward 3lg (lg exp); the embedding gradient: V*D/t zeroed, 2h
      scattered, and a tied output matrix's gradient summed (3 V*D/t).
    The attention core's GEMMs run at (T, T, Hd) per head: forward Q.K^T and P.V, backward the
    recomputed Q.K^T, dV, dP, dQ, dK (flash attention keeps no T x T matrix), each over the causal
    fraction (T+1)/2T of the scores, with exp evaluated once forward and once backward per score.
    recompute='full' runs every layer's forward GEMMs and memory ops once more; 'selective' the
    attention core forward.
    """
    if model.arch != "transformer":
        raise ValueError(f"the per-op step model covers Transformers; model.arch={model.arch!r}")
    if recompute not in ("none", "selective", "full"):
        raise ValueError(f"recompute mode {recompute!r}; expected none, selective or full")
    e = ELEM_BYTES[dtype]
    L = model.n_layers if layers is None else layers
    D, H, K, Hd, F_, V = (model.dim, model.n_heads, model.kv_heads, model.head_dim, model.hidden_dim,
                          model.padded_vocab_size)
    T, B = seq_len, micro_batch
    n = B * T
    hq, hkv, hf = H * Hd // tp, K * Hd // tp, F_ // tp
    h, q, kv, f, lg = n * D / tp, n * hq, n * hkv, n * hf, n * V / tp
    full = recompute == "full"
    gemms: list[Gemm] = []
    gemms += _linear("attention.wq", n, D, hq, L, full)
    gemms += _linear("attention.wk", n, D, hkv, L, full)
    gemms += _linear("attention.wv", n, D, hkv, L, full)
    gemms += _linear("attention.wo", n, hq, D, L, full)
    gemms += _linear("feed_forward.w1", n, D, hf, L, full)
    if model.mlp == "swiglu":
        gemms += _linear("feed_forward.w3", n, D, hf, L, full)
    gemms += _linear("feed_forward.w2", n, hf, D, L, full)
    if loss:
        gemms += _linear("output", n, D, V // tp, 1, False)
    causal = (T + 1) / (2 * T)
    heads = B * H / tp * causal * L
    again = 1 if recompute != "none" else 0  # the forward core runs again in backward
    attention = (Gemm("attention Q.K^T (fwd, recomputed in bwd, dP)", T, T, Hd, heads * (3 + again)),
                 Gemm("attention P.V (fwd, dV, dQ, dK)", T, Hd, T, heads * (4 + again)))
    scores = B * H / tp * T * T * causal
    fwd_layer = [MemOp("norm fwd", 2 * h * e, 2), MemOp("residual add", 3 * h * e, 2),
                 MemOp("attention output copy", 2 * q * e), MemOp("attention core io fwd", (2 * q + 2 * kv) * e, 1,
                                                                  scores)]
    bwd_layer = [MemOp("norm bwd", 5 * h * e, 2), MemOp("residual grad sum", 3 * h * e, 2),
                 MemOp("attention output copy bwd", 2 * q * e),
                 MemOp("attention core io bwd", (4 * q + 4 * kv) * e, 1, scores)]
    if model.mlp == "swiglu":
        fwd_layer += [MemOp("silu fwd", 2 * f * e, 1, f), MemOp("gate product", 3 * f * e)]
        bwd_layer += [MemOp("silu bwd", 3 * f * e, 1, f), MemOp("gate product bwd", 3 * f * e, 2)]
    else:
        fwd_layer += [MemOp("gelu fwd", 2 * f * e, 1, f)]
        bwd_layer += [MemOp("gelu bwd", 3 * f * e, 1, f)]
    if model.pos == "rope":
        fwd_layer += [MemOp("rotary", 13 * (q + kv) * e)]
        bwd_layer += [MemOp("rotary bwd", 13 * (q + kv) * e)]
    passes = 2 if full else 1
    memops = [MemOp(f"{m.name} (x{L * passes} layers)", m.bytes, m.count * L * passes, m.transcendentals)
              for m in fwd_layer]
    memops += [MemOp(f"{m.name} (x{L} layers)", m.bytes, m.count * L, m.transcendentals) for m in bwd_layer]
    per_layer_ops = 20 + (3 if model.mlp == "swiglu" else 0) + (10 if model.pos == "rope" else 0)
    ops = per_layer_ops * L * passes
    if loss:
        memops += [MemOp("embedding lookup", 2 * h * e), MemOp("final norm fwd", 2 * h * e),
                   MemOp("final norm bwd", 5 * h * e),
                   MemOp("log_softmax fwd (vocab)", 2 * lg * 4, 1, lg, part="loss"),
                   MemOp("loss grad zero-fill (vocab)", lg * 4, part="loss"),
                   MemOp("log_softmax bwd (vocab)", 3 * lg * 4, 1, lg, part="loss"),
                   MemOp("embedding grad zero-fill", V * D / tp * 4), MemOp("embedding grad scatter", 2 * h * 4)]
        if model.pos == "learned":
            memops += [MemOp("position add", 3 * h * e)]
        if model.tie_embeddings:
            memops += [MemOp("tied output grad sum", 3 * V * D / tp * 4)]
        if e != 4:
            memops += [MemOp("logits upcast to fp32", lg * (e + 4), part="loss")]
        ops += 12
    return StepWork(tuple(gemms), attention, tuple(memops), ops)


def optimizer_work(params: float, tensors: int, *, clip: bool = True) -> tuple[MemOp, ...]:
    """One optimizer step over `params` fp32 parameters in `tensors` tensors: gradient clipping reads
    every gradient for its norm and scales it in place (12 B/param), AdamW reads p, g, m, v and writes
    p, m, v (28 B/param)."""
    ops = [MemOp("AdamW (fused)", 28.0 * params, part="optimizer")]
    if clip:
        ops.insert(0, MemOp(f"clip_grad_norm ({tensors} tensors)", 12.0 * params, part="optimizer"))
    return tuple(ops)
