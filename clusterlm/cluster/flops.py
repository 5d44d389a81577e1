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
Encoder (masked LM): as the decoder, plus the masked-LM head's dense D x D in N.
Encoder-decoder: per target token with a source of the same length T (a translation pair of two
T-token sides is T "tokens"): N = encoder layers + decoder layers (with cross-attention) + output;
attention 12*(L_enc + 2*L_dec)*D*T (encoder self, decoder self, cross), all over the full square.
Activation recomputation adds hardware FLOPs (HFU), never model FLOPs (MFU): see `recompute_flops`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from clusterlm.models.config import TRANSFORMER_ARCHS, ModelConfig


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
    """(N, non-embedding parameters without the output projection, output projection V*D). A
    classifier never runs the LM's output projection and its head runs once per sequence, not per
    token: neither is counted (output = 0), nor an encoder's masked-LM head, which feeds the output
    projection only."""
    V, D = model.padded_vocab_size, model.dim
    output = V * D
    readers = 2 if model.bidirectional else 1  # a bidirectional classifier runs two language models
    non_emb = model.num_params(include_embeddings=False) - readers * len(model.labels) * D  # the head, per sequence
    layers = non_emb - readers * (0 if model.tie_embeddings else output)  # num_params keeps an untied output matrix
    if model.labels:
        output = 0
        if model.arch == "encoder":  # the masked-LM head feeds only the output projection: not run either
            layers -= readers * mlm_head_params(model)
    return layers + output, layers, output


def mlm_head_params(model: ModelConfig) -> int:
    """An encoder's masked-LM head as num_params counts it: dense D x D (+ bias), its norm, the
    output layer's bias."""
    D, b = model.dim, 1 if model.bias else 0
    norm = D * (2 if (model.norm == "layernorm" and model.bias) else 1)
    return D * D + b * D + norm + b * model.padded_vocab_size


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:g}"


def flops_per_token(model: ModelConfig, seq_len: int, training: bool = True,
                    predicted: float = 1.0) -> FlopsPerToken:
    """Model FLOPs per token at context length `seq_len`. `predicted`: the share of positions at
    which an encoder (not a classifier) runs its masked-LM head and output layer; a masked-LM run
    computes them at the corrupted positions only (finetune.mask_prob; models/encdec.py `predict`)."""
    n, layers, output = matmul_params(model)
    scored = ""
    if predicted < 1.0 and model.arch == "encoder" and not model.labels:
        head = mlm_head_params(model)
        layers, output = layers - head + round(predicted * head), round(predicted * output)
        n = layers + output
        scored = f"; the masked-LM head and output at {predicted:.0%} of positions"
    k_dense, k_attn = (6, 12) if training else (2, 4)
    attn = 0.0
    if model.arch in TRANSFORMER_ARCHS:
        attn = float(k_attn * _attention_layers(model) * model.n_heads * model.head_dim * seq_len)
    tied = ("a classifier does not run it" if model.labels else "tied to the embedding, still a matmul"
            if model.tie_embeddings else "untied")
    conv = (f"PaLM convention: {k_dense}*N + {k_attn}*L*D*T per token ({'training' if training else 'forward'}), "
            f"N = {_fmt(n)} = {_fmt(layers)} layer weights + {_fmt(output)} output projection ({tied}); "
            f"embedding lookups not counted; attention over the full T x T (T={seq_len}){scored}")
    if model.arch == "encdec":
        conv = (f"PaLM convention per target token, source of the same length: {k_dense}*N + {k_attn}*(L_enc + "
                f"2*L_dec)*D*T ({'training' if training else 'forward'}), N = {_fmt(n)} = {_fmt(layers)} encoder + "
                f"decoder layer weights (cross-attention included) + {_fmt(output)} output projection ({tied}); "
                f"embedding lookups not counted; every attention over the full T x T (T={seq_len})")
    elif model.arch not in TRANSFORMER_ARCHS:
        conv = (f"{k_dense}*N per token ({'training' if training else 'forward'}), N = {_fmt(n)} = {_fmt(layers)} "
                f"{model.arch.upper()} weights + {_fmt(output)} output projection ({tied}); no attention term")
    return FlopsPerToken(n, float(k_dense * n), attn, training, seq_len, conv)


def _attention_layers(model: ModelConfig) -> int:
    """Attention cores per token: one per layer; encdec's decoder layers have two (self, cross)."""
    return model.enc_layers + 2 * model.n_layers if model.arch == "encdec" else model.n_layers


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
    attn = 4.0 * _attention_layers(model) * model.dim * seq_len if model.arch in TRANSFORMER_ARCHS else 0.0
    if mode == "selective":
        return attn
    if mode == "full":
        return 2.0 * layers + attn
    raise ValueError(f"recompute mode {mode!r}; expected none, selective or full")


# ---- the step's work, op by op (the planner's per-op step model) ------------------------------------------
# One Transformer training micro-batch as the kernels PyTorch runs for it: every GEMM with its shape
# (a Linear of in -> out over n tokens is a forward GEMM (n, out, in), an input-gradient GEMM
# (n, in, out) and a weight-gradient GEMM (out, in, n)), the attention core (one fused kernel per
# layer), the non-matmul kernels by their element counts (norms, activations, the cross-entropy over
# the vocabulary: each costs what the probe measured per element, forward + backward), and the plain
# memory ops (residual adds, copies, zero-fills) as bytes moved.
ELEM_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class Gemm:
    name: str
    m: int
    n: int
    k: int
    count: float
    """how many per micro-batch"""

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k * self.count


@dataclass(frozen=True)
class Attention:
    """The attention core of `layers` layers: SDPA forward + backward (+ a replayed forward), causal
    (the decoders' self-attention) or over the full square (bidirectional encoder, cross-attention)."""
    seq_len: int
    head_dim: int
    heads: float
    """B*H/t per layer"""
    layers: int
    passes: float
    """7 GEMM-equivalents forward + backward, 9 with the forward recomputed"""
    causal: bool = True
    name: str = "self-attention"

    @property
    def flops(self) -> float:
        T = self.seq_len
        part = (T + 1) / (2 * T) if self.causal else 1.0
        return self.heads * self.layers * self.passes * 2 * T * T * self.head_dim * part


@dataclass(frozen=True)
class MemOp:
    name: str
    bytes: float = 0.0
    """bytes read + written by one call (plain memory ops, costed at the elementwise bandwidth)"""
    count: int = 1
    """calls per micro-batch"""
    kernel: str | None = None
    """a measured kernel (forward + backward), costed per element: layernorm, rmsnorm, gelu_tanh, silu,
    cross_entropy, adamw"""
    elements: float = 0.0
    part: str = "memory_ops"
    """the step-time part it is reported under: memory_ops, loss, optimizer"""


@dataclass(frozen=True)
class StepWork:
    gemms: tuple[Gemm, ...]
    attention: Attention
    memops: tuple[MemOp, ...]
    autograd_ops: int
    """ops recorded per micro-batch (each has a forward and a backward): the fixed-cost count"""
    extra_attention: tuple[Attention, ...] = ()
    """encdec: the cross-attention cores and the encoder's bidirectional ones"""

    @property
    def attentions(self) -> tuple[Attention, ...]:
        return (self.attention, *self.extra_attention)


def _linear(name: str, tokens: int, d_in: int, d_out: int, count: int, forward_again: bool) -> list[Gemm]:
    fwd = 2 if forward_again else 1
    return [Gemm(f"{name} fwd", tokens, d_out, d_in, count * fwd), Gemm(f"{name} dX", tokens, d_in, d_out, count),
            Gemm(f"{name} dW", d_out, d_in, tokens, count)]


def step_work(model: ModelConfig, micro_batch: int, seq_len: int, *, tp: int = 1, recompute: str = "none",
              dtype: str = "fp32", layers: int | None = None, loss: bool = True) -> StepWork:
    """The kernels of one micro-batch's forward + backward on one rank (`layers` of the model, its
    share 1/tp of every head, FFN column and vocabulary row; sequence parallel splits the rest).

    n = micro_batch*seq_len tokens; h = n*D/t, f = n*F/t, q = n*H*Hd/t, kv = n*K*Hd/t elements of e
    bytes; lg = n*V/t logits (fp32).
      measured kernels (forward + backward, per element): 2 norms per layer and the final norm over
      h; GELU over f (SwiGLU: SiLU over f); the cross-entropy over lg.
      memory ops (bytes): per layer 2 residual adds 3h forward and 2 gradient sums 3h backward, the
      attention output's transpose-to-contiguous copy 2q each way; SwiGLU's gate product 3f forward,
      6f backward; rotary positions 13 passes over q + kv each way; per micro-batch the embedding
      lookup 2h (+ the position add 3h), the embedding gradient (V*D/t zero-filled, 2h scattered), a
      tied output matrix's gradient sum 3 V*D/t (fp32), the logits upcast lg*(e+4) below fp32.
      attention core: causal SDPA at (T, Hd), B*H/t heads per layer.
    recompute='full' runs every layer's forward GEMMs, memory ops and attention forward once more
    (the forward halves of the kernels are counted as a third of their forward + backward cost);
    'selective' the attention core forward.
    """
    if model.arch not in TRANSFORMER_ARCHS:
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
    passes = 7 + (2 if recompute != "none" else 0)
    attention = Attention(T, Hd, B * H / tp, L, passes, causal=model.arch != "encoder")
    norm = "rmsnorm" if model.norm == "rmsnorm" else "layernorm"
    again = 4 / 3 if full else 1  # a replayed forward: a third of forward + backward
    act = "silu" if model.mlp == "swiglu" else "gelu_tanh"
    fwd_passes = 2 if full else 1
    memops = [MemOp(f"{norm} fwd+bwd (x{2 * L})", count=2 * L, kernel=norm, elements=h * again),
              MemOp(f"{act} fwd+bwd (x{L})", count=L, kernel=act, elements=f * again),
              MemOp(f"residual add (x{2 * L * fwd_passes})", 3 * h * e, 2 * L * fwd_passes),
              MemOp(f"residual grad sum (x{2 * L})", 3 * h * e, 2 * L),
              MemOp(f"attention output copy fwd+bwd (x{L})", 2 * q * e, L * (1 + fwd_passes))]
    if model.mlp == "swiglu":
        memops += [MemOp(f"gate product fwd+bwd (x{L})", 3 * f * e, L * (2 + fwd_passes))]
    if model.pos == "rope":
        memops += [MemOp(f"rotary fwd+bwd (x{L})", 13 * (q + kv) * e, L * (1 + fwd_passes))]
    per_layer_ops = 20 + (3 if model.mlp == "swiglu" else 0) + (10 if model.pos == "rope" else 0)
    ops = per_layer_ops * L * fwd_passes
    if loss:
        memops += [MemOp("cross-entropy fwd+bwd (vocab)", kernel="cross_entropy", elements=lg, part="loss"),
                   MemOp(f"final {norm} fwd+bwd", kernel=norm, elements=h),
                   MemOp("embedding lookup", 2 * h * e), MemOp("embedding grad zero-fill", V * D / tp * 4),
                   MemOp("embedding grad scatter", 2 * h * 4)]
        if model.pos == "learned":
            memops += [MemOp("position add", 3 * h * e)]
        if model.tie_embeddings:
            memops += [MemOp("tied output grad sum", 3 * V * D / tp * 4)]
        if e != 4:
            memops += [MemOp("logits upcast to fp32", lg * (e + 4), part="loss")]
        ops += 12
    extra: list[Attention] = []
    if model.arch in ("encoder", "encdec"):  # both stacks norm their embeddings (models/encdec.py)
        memops += [MemOp(f"embedding {norm} fwd+bwd", kernel=norm, elements=h)]
        ops += 2
    if model.arch == "encoder" and loss:  # masked-LM head: dense D x D, exact GELU, norm
        gemms += _linear("mlm_head.dense", n, D, D, 1, False)
        memops += [MemOp("gelu (mlm head) fwd+bwd", kernel="gelu_tanh", elements=h),
                   MemOp(f"{norm} (mlm head) fwd+bwd", kernel=norm, elements=h)]
        ops += 4
    if model.arch == "encdec":
        # every decoder layer: cross-attention (queries from the target, keys/values from a source of the
        # same length), its norm, residual add; then the whole encoder stack (bidirectional, no loss)
        gemms += _linear("cross_attention.wq", n, D, hq, L, full)
        gemms += _linear("cross_attention.wk", n, D, hkv, L, full)
        gemms += _linear("cross_attention.wv", n, D, hkv, L, full)
        gemms += _linear("cross_attention.wo", n, hq, D, L, full)
        extra.append(Attention(T, Hd, B * H / tp, L, passes, causal=False, name="cross-attention"))
        memops += [MemOp(f"cross {norm} fwd+bwd (x{L})", count=L, kernel=norm, elements=h * again),
                   MemOp(f"cross residual add + grad sum (x{2 * L})", 3 * h * e, L * (1 + fwd_passes)),
                   MemOp(f"cross-attention output copy fwd+bwd (x{L})", 2 * q * e, L * (1 + fwd_passes))]
        ops += 10 * L * fwd_passes
        enc_cfg = dataclasses.replace(model, arch="encoder", n_layers=model.enc_layers, n_enc_layers=None)
        enc = step_work(enc_cfg, micro_batch, seq_len, tp=tp, recompute=recompute, dtype=dtype, loss=False)
        gemms += [dataclasses.replace(g, name=f"encoder.{g.name}") for g in enc.gemms]
        extra.append(dataclasses.replace(enc.attention, name="encoder self-attention"))
        memops += [dataclasses.replace(o, name=f"encoder {o.name}") for o in enc.memops]
        ops += enc.autograd_ops
    return StepWork(tuple(gemms), attention, tuple(memops), ops, tuple(extra))


def optimizer_work(params: float, tensors: int, *, clip: bool = True) -> tuple[MemOp, ...]:
    """One optimizer step over `params` fp32 parameters in `tensors` tensors: gradient clipping reads
    every gradient for its norm and scales it in place (12 B/param, at the elementwise bandwidth),
    then the fused AdamW step (the probe's measured kernel, per parameter)."""
    ops = [MemOp("AdamW (fused)", kernel="adamw", elements=params, part="optimizer")]
    if clip:
        ops.insert(0, MemOp(f"clip_grad_norm ({tensors} tensors)", 12.0 * params, part="optimizer"))
    return tuple(ops)
