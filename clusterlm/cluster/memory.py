"""Per-device training memory: model state, activations by recompute mode, buffers. Torch-free.

    >>> from clusterlm.models.config import get_preset
    >>> from clusterlm.parallel.dims import ParallelDims
    >>> from clusterlm.cluster.memory import estimate_memory
    >>> est = estimate_memory(get_preset("llama-8b"), ParallelDims(dp_shard=8), micro_batch=1,
    ...                       seq_len=8192, dtype="bf16", recompute="selective")
    >>> print(est.explain())        # every piece by name, with its formula and numbers

Sources and conventions (derivations in docs/planner.md):
- Model state, bytes per parameter (Rajbhandari et al. 2020, ZeRO, sec. 3.1): mixed-precision
  AdamW 2 (bf16 weights) + 2 (bf16 grads) + 4 (fp32 master) + 8 (Adam m, v) = 16; fp32 AdamW
  4 + 4 + 8 = 16. (torch.autocast keeps fp32 weights and grads instead: 4 + 4 + 8, the same 16,
  plus bf16 weight copies that autograd saves for backward: the `autocast_weight_copies` item.)
  TP and PP divide the parameters a device holds; FSDP (dp_shard) divides all of the state.
- Activations per Transformer layer (Korthikanti et al. 2022, sec. 4): the tensors autograd saves,
  counted one by one, which for a GPT-3 layer in 16-bit with dropout and eager attention gives
  s*b*h*(34 + 5*a*s/h) bytes; selective recomputation drops the a*s^2 terms (34*s*b*h); full
  recomputation keeps only each layer's input (2*s*b*h) plus one layer's activations while it is
  recomputed. Tensor parallel with sequence parallel divides all of it by t. In fp32 each tensor
  element takes 4 bytes instead of 2 while dropout masks stay 1 byte.
- Pipeline (1F1B): each rank micro-batch runs as one schedule call of n_mb pipeline micro-batches
  (dims.pipeline_microbatches); stage 0 holds the activations of min(pp, n_mb) of them, the last stage one.
- Logits and loss: B*T*V*(e + 4 + 4) bytes on the last stage (logits in the compute dtype, fp32
  log-probabilities saved by log_softmax, fp32 gradient of the logits at the start of backward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from clusterlm.models.config import ModelConfig
from clusterlm.parallel.dims import ParallelDims, pipeline_microbatches

RECOMPUTE_MODES = ("none", "selective", "full")
ATTENTION_KINDS = ("flash", "eager")
GIB = 1024**3

# bytes per parameter of model state (ZeRO paper's accounting)
STATE_BYTES = {
    "bf16": {"weights": 2, "gradients": 2, "master_weights": 4, "optimizer": 8},
    "fp16": {"weights": 2, "gradients": 2, "master_weights": 4, "optimizer": 8},
    "fp32": {"weights": 4, "gradients": 4, "master_weights": 0, "optimizer": 8},
}
ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DDP_GRAD_BYTES = 4  # DDP trains under torch.autocast: fp32 parameters, so fp32 gradients and buckets


@dataclass(frozen=True)
class MemoryItem:
    name: str
    bytes: float
    formula: str


@dataclass(frozen=True)
class MemoryEstimate:
    items: tuple[MemoryItem, ...]
    peak_bytes: float
    """state + max(forward/backward working memory, optimizer-step temporaries); with accumulation 1
    and no pipeline, max(state - gradients + working memory, state + backward transient,
    state + optimizer temporaries), since set_to_none gradients appear as activations are freed"""
    stage: str
    """which pipeline stage this is (the one that needs most memory): only, first or last"""
    one_backward: bool = False
    """accumulation 1 and no pipeline: gradients and activations were not counted together"""

    def get(self, name: str) -> float:
        for it in self.items:
            if it.name == name:
                return it.bytes
        raise KeyError(f"no memory item {name!r}; items: {', '.join(i.name for i in self.items)}")

    def as_dict(self) -> dict[str, float]:
        return {it.name: it.bytes for it in self.items}

    def explain(self) -> str:
        width = max(len(it.name) for it in self.items)
        lines = [f"  {it.name:<{width}}  {it.bytes / GIB:10.3f} GiB  {it.formula}" for it in self.items]
        lines.append(f"  {'peak':<{width}}  {self.peak_bytes / GIB:10.3f} GiB  "
                     f"state + max(activations + logits + buffers, optimizer step temporaries)"
                     + ("; one micro-batch per step and no pipeline: gradients (allocated during backward) and "
                        "activations (freed during it) are not counted together" if self.one_backward else "")
                     + (f"; worst pipeline stage: {self.stage}" if self.stage != "only" else ""))
        return "\n".join(lines)


# ---- parameters ------------------------------------------------------------------------------------
def param_groups(model: ModelConfig) -> dict[str, int]:
    """Parameters by where they live: embedding (token + position tables), per layer, head (final
    norm + output projection when untied)."""
    V, D, L = model.padded_vocab_size, model.dim, model.n_layers
    total = model.num_params()
    emb = V * D + (model.max_seq_len * D if model.pos == "learned" else 0)
    head = 0 if model.tie_embeddings else V * D
    layers_and_norm = total - emb - head
    per_layer = layers_and_norm // L
    head += layers_and_norm - per_layer * L  # final norm (and any remainder) sits with the head
    return {"embedding": emb, "per_layer": per_layer, "head": head, "total": total}


def stage_params(model: ModelConfig, pp: int, stage: str) -> tuple[int, int]:
    """(parameters held by one pipeline stage before TP/FSDP sharding, layers in it).

    Layers are split ceil(L/pp) per stage. The first stage holds the embedding, the last the head;
    with pp > 1 a tied output matrix exists on both (the last stage keeps its own copy)."""
    g = param_groups(model)
    layers = math.ceil(model.n_layers / pp)
    if pp == 1:
        return g["total"], model.n_layers
    n = layers * g["per_layer"]
    if stage == "first":
        return n + g["embedding"], layers
    tied_copy = model.padded_vocab_size * model.dim if model.tie_embeddings else 0
    return n + g["head"] + tied_copy, layers


# ---- activations -------------------------------------------------------------------------------------
def trainer_sequence_parallel(dims: ParallelDims) -> bool:
    """Whether clusterlm's trainer splits activations over the sequence (and logits over the vocabulary)
    with tp > 1: by default yes, except with pipeline parallel or parallel.sequence_parallel = false
    (clusterlm/parallel/parallelize.py)."""
    return dims.pp == 1 and dims.sequence_parallel


def layer_activation_bytes(model: ModelConfig, seq_len: int, micro_batch: int, *, dtype: str = "bf16",
                           recompute: str = "none", attention: str = "flash", tp: int = 1,
                           sequence_parallel: bool = True) -> tuple[float, str]:
    """Bytes one layer saves for backward for one micro-batch, and the formula with its numbers.

    Per token, in tensor elements of e bytes (e = 2 for bf16/fp16, 4 for fp32), for a Transformer
    layer (h = D, kv = K*Hd, F = MLP hidden, a = heads, s = seq_len):
      norms: 2h (each norm's input); attention: qkv-projection input h, q h, k kv, v kv,
      output-projection input h; MLP: first input h, GELU: 2F (GELU input, second input),
      SwiGLU: 4F (w1 out, silu out, w3 out, product); eager attention: a*s softmax output
      (+ a*s dropout output); dropout masks, 1 byte: 2h (+ a*s for eager attention probs);
      flash attention: 4*a bytes (fp32 log-sum-exp) instead of the a*s terms.
    LSTM/GRU: input h and gate pre-activations (4h / 3h) plus cell/hidden states 2h per layer.
    With tp > 1 and sequence parallel everything is divided by t; without it the norm inputs, the
    projection/MLP inputs (4h) and the dropout masks are replicated on every tp rank (Korthikanti eq. 2:
    10 of the 34 stay whole), and full recomputation's layer input too.
    """
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute={recompute!r}; expected one of {', '.join(RECOMPUTE_MODES)}")
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention={attention!r}; expected one of {', '.join(ATTENTION_KINDS)}")
    e = ELEM_BYTES[dtype]
    s, b, h = seq_len, micro_batch, model.dim
    tokens = s * b
    sp = sequence_parallel or tp == 1
    if recompute == "full":
        t_in = tp if sp else 1
        return tokens * h * e / t_in, f"full recompute: layer input s*b*h*e/t = {s}*{b}*{h}*{e}/{t_in}"
    if model.arch in ("lstm", "gru"):
        gates = 4 if model.arch == "lstm" else 3
        elems = h + gates * h + 2 * h
        return tokens * elems * e, f"{model.arch}: s*b*(h + {gates}h + 2h)*e = {s}*{b}*{elems}*{e}"
    a, kv, F = model.n_heads, model.kv_heads * model.head_dim, model.hidden_dim
    dropout = model.dropout > 0
    mlp_elems = 2 * F if model.mlp == "gelu" else 4 * F
    elems = 2 * h + (3 * h + 2 * kv) + (h + mlp_elems)  # norms + attention + MLP, per token
    mask_bytes = 2 * h if dropout else 0  # residual dropout masks, 1 byte each
    square_elems = square_masks = 0.0  # the a*s terms of eager attention, per token
    lse_bytes = 0.0
    if attention == "eager" and recompute == "none":
        square_elems = a * s * (2 if dropout else 1)
        square_masks = a * s if dropout else 0
    elif attention == "flash" and recompute == "none":
        lse_bytes = 4 * a
    per_token = elems * e + mask_bytes + square_elems * e + square_masks + lse_bytes
    formula = (f"s*b*({elems}*{e} + {mask_bytes} masks"
               + (f" + {square_elems:g}*{e} + {square_masks:g} eager a*s terms" if square_elems else "")
               + (f" + {lse_bytes:g} flash lse" if lse_bytes else "")
               + f")/t with s={s} b={b} t={tp}, {recompute} recompute")
    if sp:
        return tokens * per_token / tp, formula
    whole = 4 * h * e + mask_bytes  # norm inputs, qkv and MLP inputs, dropout masks: on every tp rank
    formula += f", but {4 * h}*{e} + {mask_bytes} of it whole on every rank (tp without sequence parallel)"
    return tokens * (whole + (per_token - whole) / tp), formula


def _encdec_activations(model: ModelConfig, s: int, b: int, e: int, t: int, recompute: str,
                        items: list[MemoryItem]) -> float:
    """An encoder-decoder's activations beyond its decoder layers (counted as Transformer layers
    above): the encoder's layers (the same per-layer bytes: bidirectional attention stores what causal
    attention does) and, per decoder layer, its cross-attention: norm input h, query-projection
    input h, q h, output h, keys and values of the source 2*kv (a source as long as the target), and
    flash attention's fp32 log-sum-exp; the memory (s*b*h) once."""
    enc, f_enc = layer_activation_bytes(model, s, b, dtype=_dtype_of(e), recompute=recompute, tp=t,
                                        sequence_parallel=True)
    kv = model.kv_heads * model.head_dim
    h = model.dim
    cross_elems = 4 * h + 2 * kv
    cross = s * b * (cross_elems * e + 4 * model.n_heads) / t if recompute != "full" else 0.0
    memory = s * b * h * e / t
    L, Le = model.n_layers, model.enc_layers
    items.append(MemoryItem("encoder_activations", Le * enc + memory,
                            f"{Le} encoder layers * {f_enc} + the memory s*b*h*e/t"))
    items.append(MemoryItem("cross_attention_activations", L * cross,
                            f"{L} decoder layers * s*b*({cross_elems}*{e} + 4*{model.n_heads} lse)/t"
                            + (" (full recompute: none kept)" if recompute == "full" else "")))
    return Le * enc + memory + L * cross


def _dtype_of(nbytes: int) -> str:
    return {4: "fp32", 2: "bf16"}[nbytes]


def logits_bytes(model: ModelConfig, seq_len: int, micro_batch: int, dtype: str = "bf16", tp: int = 1,
                 loss_parallel: bool = True) -> float:
    """B*T*V*(e + 4 + 4): logits, fp32 log-probs saved by log_softmax, fp32 logits gradient; split over
    the vocabulary by tp under loss parallel, whole on every rank without it."""
    t = tp if loss_parallel else 1
    return micro_batch * seq_len * model.padded_vocab_size * (ELEM_BYTES[dtype] + 8) / t


def _largest_tensor(model: ModelConfig) -> int:
    """Elements of the largest single parameter: the V x D table, an MLP or RNN gate matrix."""
    D = model.dim
    if model.arch in ("lstm", "gru"):
        return max(model.padded_vocab_size * D, (4 if model.arch == "lstm" else 3) * D * D)
    return max(model.padded_vocab_size * D, D * model.hidden_dim, D * model.n_heads * model.head_dim)


# ---- the estimate --------------------------------------------------------------------------------------
def estimate_memory(model: ModelConfig, dims: ParallelDims, *, micro_batch: int, seq_len: int,
                    dtype: str = "bf16", recompute: str = "none", attention: str = "flash",
                    grad_accum_steps: int = 1, optimizer_impl: str = "fused", ema: bool = False) -> MemoryEstimate:
    """Peak bytes on the device that needs most (over pipeline stages), piece by piece. ema: the
    trainer keeps an average of the weights (optim.ema_decay), one more fp32 copy of the state."""
    if dtype not in STATE_BYTES:
        raise ValueError(f"dtype={dtype!r}; expected one of {', '.join(STATE_BYTES)}")
    stages = ("only",) if dims.pp == 1 else ("first", "last")
    estimates = [_stage(model, dims, st, micro_batch, seq_len, dtype, recompute, attention,
                        grad_accum_steps, optimizer_impl, ema) for st in stages]
    return max(estimates, key=lambda m: m.peak_bytes)


def _stage(model: ModelConfig, dims: ParallelDims, stage: str, b: int, s: int, dtype: str, recompute: str,
           attention: str, accum: int, optimizer_impl: str, ema: bool = False) -> MemoryEstimate:
    t, pp, fsdp = dims.tp, dims.pp, dims.dp_shard
    e = ELEM_BYTES[dtype]
    params, layers = stage_params(model, pp, stage)
    per_dev = params / t  # parameters this device owns before FSDP sharding
    items: list[MemoryItem] = []
    shard = f"/(t*fsdp) = {params:,}/({t}*{fsdp})"
    for name, nbytes in STATE_BYTES[dtype].items():
        if nbytes:
            items.append(MemoryItem(name, per_dev * nbytes / fsdp, f"{nbytes} B/param * params{shard}"))
    if ema:
        items.append(MemoryItem("ema_weights", per_dev * 4 / fsdp, f"4 B/param * params{shard} (optim.ema_decay)"))
    state = sum(it.bytes for it in items)

    # activations: in-flight micro-batches x layers in this stage x per-layer bytes. A pipeline runs each
    # rank micro-batch (each accumulation step) as one schedule call of n_mb pipeline micro-batches of b/n_mb
    # samples (parallel/pp.py); 1F1B keeps min(pp, n_mb) of them on stage 0, one on the last stage; GPipe
    # (parallel.pp_schedule) runs every forward before any backward: all n_mb on every stage
    n_mb = pipeline_microbatches(b, pp) if pp > 1 else 1
    b //= n_mb
    if pp > 1 and dims.pp_schedule == "gpipe":
        inflight = n_mb
    else:
        inflight = min(pp, n_mb) if stage == "first" else 1
    sp = trainer_sequence_parallel(dims)
    per_layer, formula = layer_activation_bytes(model, s, b, dtype=dtype, recompute=recompute,
                                                attention=attention, tp=t, sequence_parallel=sp)
    split = f" (the rank micro-batch split into {n_mb} pipeline micro-batches of {b})" if pp > 1 else ""
    readers = 2 if model.bidirectional else 1  # a bidirectional classifier runs two language models
    items.append(MemoryItem("activations", readers * inflight * layers * per_layer,
                            (f"{readers} readers (bidirectional) * " if readers > 1 else "")
                            + f"{inflight} in-flight micro-batch(es){split} * {layers} layers * {formula}"))
    work = readers * inflight * layers * per_layer
    if model.arch == "encdec":
        work += _encdec_activations(model, s, b, e, t, recompute, items)
    if recompute == "full":  # one layer's activations live again while it is recomputed
        redo, f2 = layer_activation_bytes(model, s, b, dtype=dtype, recompute="none", attention=attention, tp=t,
                                          sequence_parallel=sp)
        items.append(MemoryItem("recompute_working_set", redo, f"one layer without recompute: {f2}"))
        work += redo
    # gradients flowing back through one layer: dL/d(MLP hidden) and a few h-sized tensors
    F = model.hidden_dim if model.arch not in ("lstm", "gru") else 4 * model.dim
    bwd = s * b * (2 * F + 4 * model.dim) * e / t
    formula_bwd = f"s*b*(2F + 4h)*e/t = {s}*{b}*(2*{F} + 4*{model.dim})*{e}/{t}"
    if model.arch not in ("lstm", "gru") and attention == "eager":
        bwd += 2 * model.n_heads * s * s * b * e / t
        formula_bwd += f" + 2*a*s^2*b*e/t (grads of the attention probabilities)"
    items.append(MemoryItem("backward_transient", bwd, formula_bwd))
    work += bwd
    # stage outputs: final norm + head input on the last stage, and the logits/loss buffers
    if stage in ("only", "last") and model.labels:
        # a classifier's head scores the pooled state: (B, C) fp32 class logits, their log-probs and gradient;
        # the language model's output layer never runs (models/classifier.py)
        lg = b * len(model.labels) * 12
        items.append(MemoryItem("logits", lg, f"classifier: B*C*(4+4+4) = {b}*{len(model.labels)}*12 (the LM output "
                                              f"layer does not run)"))
        work += lg
    elif stage in ("only", "last"):
        lg = logits_bytes(model, s, b, dtype, t, loss_parallel=sp)
        t_lg = t if sp else 1
        formula_lg = f"B*T*V*(e+4+4)/t = {b}*{s}*{model.padded_vocab_size}*({e}+8)/{t_lg}"
        if inflight > 1:  # GPipe: every micro-batch's logits and log-probs wait for the backward
            lg += (inflight - 1) * lg * (e + 4) / (e + 8)
            formula_lg += f" + {inflight - 1} more micro-batches' logits and log-probs (e+4) in flight (GPipe)"
        items.append(MemoryItem("logits", lg, formula_lg + ("" if sp or t == 1 else " (no loss parallel with pp > 1)")))
        work += lg
    # temporary buffers of the data-parallel wrapper
    g = param_groups(model)
    layer_p = g["per_layer"] / t
    wrapper = dims.dp_wrapper  # the trainer's: DDP for pure replication, else FSDP2 whenever dp > 1
    if wrapper == "fsdp":
        buf = layer_p * (2 * e + STATE_BYTES[dtype]["gradients"])
        items.append(MemoryItem("fsdp_buffers", buf, f"unsharded params of 2 layers (current + prefetch) + grads of "
                                                     f"1 layer: {layer_p:,.0f}*(2*{e}+{STATE_BYTES[dtype]['gradients']})"))
        work += buf
    elif wrapper == "ddp":
        # DDP runs under torch.autocast: parameters and gradients stay fp32 whatever the compute dtype
        # (the ZeRO items above count 2 B/param of gradients for bf16; the buckets hold the real fp32 ones)
        buf = per_dev * DDP_GRAD_BYTES
        items.append(MemoryItem("ddp_buckets", buf, f"DDP bucket copy of all gradients, fp32: {DDP_GRAD_BYTES} B/param "
                                                    f"* {per_dev:,.0f} (gradient_as_bucket_view=False, PyTorch's default)"))
        work += buf
    if dtype != "fp32" and wrapper != "fsdp":
        copies = per_dev * e
        items.append(MemoryItem("autocast_weight_copies", copies,
                                f"{e} B/param bf16 copies saved for backward under autocast: {per_dev:,.0f}*{e}"))
        work += copies
    # optimizer step temporaries by AdamW implementation: fused (clusterlm's trainer on CPU and CUDA)
    # updates in place; foreach allocates one fp32 tensor the size of the sharded parameters
    # (sqrt of v); the single-tensor loop one tensor the size of the largest parameter
    if optimizer_impl == "fused":
        opt_tmp, opt_formula = 0.0, "fused AdamW updates in place: no step-sized temporaries"
    elif optimizer_impl == "foreach":
        opt_tmp = 4 * per_dev / fsdp
        opt_formula = "4 B/param * sharded params (foreach AdamW sqrt(v) temporary)"
    elif optimizer_impl == "per_tensor":
        opt_tmp = 4 * _largest_tensor(model) / t
        opt_formula = "4 B * largest tensor (single-tensor AdamW loop)"
    else:
        raise ValueError(f"optimizer_impl={optimizer_impl!r}; expected fused, foreach or per_tensor")
    items.append(MemoryItem("optimizer_step_temp", opt_tmp, opt_formula))
    # Gradients and activations are not all alive at once when the gradients start each step
    # unallocated (the trainer's zero_grad(set_to_none=True)) and one backward fills them
    # (accumulation 1, no pipeline): at the start of backward every activation is alive and no
    # gradient is; by its end every gradient is and the activations are freed. Peak = the larger of
    # the two moments. Measured on this project's CPU (benchmarks/planner_accuracy.py) the sum
    # state + activations over-predicted the peak by up to 18%; this bound is within a few %.
    if accum == 1 and pp == 1:
        grads = sum(it.bytes for it in items if it.name == "gradients")
        peak = max(state - grads + work, state + bwd, state + opt_tmp)
    else:
        peak = state + max(work, opt_tmp)
    return MemoryEstimate(tuple(items), peak, stage, one_backward=accum == 1 and pp == 1)
