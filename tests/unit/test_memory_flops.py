"""Memory and FLOPs accounting against published closed forms (ZeRO, Korthikanti et al., PaLM, nanoGPT)."""

import math

import pytest

from clusterlm.cluster import flops, memory
from clusterlm.cluster.memory import estimate_memory, layer_activation_bytes
from clusterlm.models.config import ModelConfig, get_preset
from clusterlm.parallel.dims import ParallelDims, pipeline_microbatches

# GPT-3 175B layer shape (Brown et al. 2020; Korthikanti et al. 2022 table 3): h=12288, a=96, 4h GELU MLP,
# dropout on, eager attention (the paper's accounting stores the a*s*s softmax).
GPT3 = ModelConfig(vocab_size=51200, n_layers=96, dim=12288, n_heads=96, max_seq_len=2048, mlp="gelu", bias=True,
                   dropout=0.1, tie_embeddings=True)
S, B, H, A = 2048, 1, 12288, 96


def test_mixed_precision_adamw_is_16_bytes_per_param():
    """ZeRO (Rajbhandari et al. 2020) sec. 3.1: mixed-precision AdamW = 2 + 2 + 4 + 8 = 16 bytes/param;
    fp32 AdamW 4 + 4 + 8 = 16; FSDP over 8 ranks divides it by 8."""
    model = get_preset("llama-8b")
    n = model.num_params()
    state = ("weights", "gradients", "master_weights", "optimizer")
    est = estimate_memory(model, ParallelDims(), micro_batch=1, seq_len=1024, dtype="bf16")
    assert [est.get(k) / n for k in state] == [2, 2, 4, 8]
    assert sum(est.get(k) for k in state) == pytest.approx(16 * n, rel=1e-9)
    est32 = estimate_memory(model, ParallelDims(), micro_batch=1, seq_len=1024, dtype="fp32")
    assert sum(v for k, v in est32.as_dict().items() if k in state) == pytest.approx(16 * n, rel=1e-9)
    sharded = estimate_memory(model, ParallelDims(dp_shard=8), micro_batch=1, seq_len=1024, dtype="bf16")
    assert sum(sharded.get(k) for k in state) == pytest.approx(16 * n / 8, rel=1e-9)
    # optim.ema_decay keeps one more fp32 copy of the (sharded) weights, and the peak grows by it
    ema = estimate_memory(model, ParallelDims(dp_shard=8), micro_batch=1, seq_len=1024, dtype="bf16", ema=True)
    assert ema.get("ema_weights") == pytest.approx(4 * n / 8, rel=1e-9)
    assert ema.peak_bytes - sharded.peak_bytes == pytest.approx(4 * n / 8, rel=1e-9)


def test_korthikanti_no_recompute():
    """Korthikanti et al. 2022 eq. 1: one GPT-3 layer stores s*b*h*(34 + 5*a*s/h) bytes in 16-bit
    (s=2048, b=1, h=12288, a=96): 34sbh + 5as^2b, within 5% (here exactly)."""
    closed = 34 * S * B * H + 5 * A * S * S * B
    got, _ = layer_activation_bytes(GPT3, S, B, dtype="bf16", recompute="none", attention="eager")
    assert got == pytest.approx(closed, rel=0.05)
    assert got == closed


def test_korthikanti_selective_and_full():
    """Selective recomputation: 34sbh (eq. 6 with t=1); full: the layer input 2sbh; TP+SP divides by t (eq. 5)."""
    sel, _ = layer_activation_bytes(GPT3, S, B, dtype="bf16", recompute="selective", attention="eager")
    assert sel == pytest.approx(34 * S * B * H, rel=0.05)
    full, _ = layer_activation_bytes(GPT3, S, B, dtype="bf16", recompute="full", attention="eager")
    assert full == 2 * S * B * H
    t8, _ = layer_activation_bytes(GPT3, S, B, dtype="bf16", recompute="none", attention="eager", tp=8)
    assert t8 == pytest.approx(S * B * H / 8 * (34 + 5 * A * S / H))


def test_korthikanti_tensor_parallel_without_sequence_parallel():
    """Korthikanti et al. 2022 eq. 2, TP without SP: s*b*h*(10 + 24/t + 5*a*s/(h*t)); the trainer runs TP that
    way only under pipeline parallel, where the planner also keeps the logits whole (no loss parallel)."""
    from clusterlm.cluster.memory import trainer_sequence_parallel

    t8, _ = layer_activation_bytes(GPT3, S, B, dtype="bf16", recompute="none", attention="eager", tp=8,
                                   sequence_parallel=False)
    assert t8 == pytest.approx(S * B * H * (10 + 24 / 8 + 5 * A * S / (H * 8)))
    full, _ = layer_activation_bytes(GPT3, S, B, dtype="bf16", recompute="full", tp=8, sequence_parallel=False)
    assert full == 2 * S * B * H  # the layer input is whole on every rank
    assert trainer_sequence_parallel(ParallelDims(tp=2)) and not trainer_sequence_parallel(ParallelDims(tp=2, pp=2))
    # parallel.sequence_parallel = false: the trainer keeps the norm/projection inputs and the logits whole
    # (the estimate, and so train's start-up memory check, split them as with sequence parallel)
    assert not trainer_sequence_parallel(ParallelDims(tp=2, sequence_parallel=False))
    gpt3_tp8 = estimate_memory(GPT3, ParallelDims(tp=8, sequence_parallel=False), micro_batch=B, seq_len=S,
                               recompute="none", attention="eager")
    assert gpt3_tp8.get("activations") == pytest.approx(GPT3.n_layers * S * B * H * (10 + 24 / 8 + 5 * A * S / (H * 8)))
    assert gpt3_tp8.get("logits") == B * S * GPT3.padded_vocab_size * (2 + 8)  # whole: no loss parallel
    small = get_preset("llama-nano", vocab_size=64)
    sp = estimate_memory(small, ParallelDims(tp=2), micro_batch=1, seq_len=32, dtype="fp32").get("logits")
    # micro-batch 2 on pp=2 runs as 2 pipeline micro-batches of 1 sample: one sample's logits, whole
    last_stage = memory._stage(small, ParallelDims(tp=2, pp=2), "last", 2, 32, "fp32", "none", "flash", 1, "fused")
    assert last_stage.get("logits") == pytest.approx(2 * sp)


def test_activation_variants():
    """Derived variants (docs/planner.md): fp32 doubles the tensor part, masks stay 1 byte: 66sbh + 9as^2b;
    no dropout: 32sbh + 2as^2b; flash attention keeps no s^2 term, only a 4-byte log-sum-exp per head."""
    fp32, _ = layer_activation_bytes(GPT3, S, B, dtype="fp32", recompute="none", attention="eager")
    assert fp32 == 66 * S * B * H + 9 * A * S * S * B
    nodrop = GPT3.__class__(**{**GPT3.__dict__, "dropout": 0.0})
    nd, _ = layer_activation_bytes(nodrop, S, B, dtype="bf16", recompute="none", attention="eager")
    assert nd == 32 * S * B * H + 2 * A * S * S * B
    fl, _ = layer_activation_bytes(nodrop, S, B, dtype="bf16", recompute="none", attention="flash")
    assert fl == 32 * S * B * H + 4 * A * S * B


def test_pipeline_stage0_holds_pp_microbatches():
    """1F1B as the trainer runs it (parallel/pp.py): each rank micro-batch (each accumulation step) is one
    schedule call of n_mb pipeline micro-batches, the largest divisor of the micro-batch <= 2*pp. Micro-batch
    8 on pp=4: n_mb = 8 of 1 sample; stage 0 keeps min(4, 8) = 4 of them over its ceil(32/4) = 8 layers, the
    last stage one, plus the logits of one sample. Accumulation (16 steps) adds nothing: each call ends with
    its backward. The estimate used to keep min(pp, accumulation) whole micro-batches (4 x 8 samples here)."""
    model = get_preset("llama-8b")
    per_sample, _ = layer_activation_bytes(model, 4096, 1, dtype="bf16", recompute="selective")
    assert pipeline_microbatches(8, 4) == 8 and pipeline_microbatches(6, 2) == 3 and pipeline_microbatches(1, 4) == 1
    est = estimate_memory(model, ParallelDims(pp=4), micro_batch=8, seq_len=4096, recompute="selective",
                          grad_accum_steps=16)
    first = memory._stage(model, ParallelDims(pp=4), "first", 8, 4096, "bf16", "selective", "flash", 16, "fused")
    last = memory._stage(model, ParallelDims(pp=4), "last", 8, 4096, "bf16", "selective", "flash", 16, "fused")
    assert first.get("activations") == 4 * 8 * per_sample
    assert last.get("activations") == 1 * 8 * per_sample
    assert last.get("logits") == 1 * 4096 * 128256 * (2 + 8)
    assert est.peak_bytes == max(first.peak_bytes, last.peak_bytes)
    # micro-batch 6 on pp=2: 3 pipeline micro-batches of 2 samples, 2 of them on stage 0 (16 layers)
    per_two, _ = layer_activation_bytes(model, 4096, 2, dtype="bf16", recompute="selective")
    first = memory._stage(model, ParallelDims(pp=2), "first", 6, 4096, "bf16", "selective", "flash", 1, "fused")
    assert per_two == 2 * per_sample and first.get("activations") == 2 * 16 * per_two
    # micro-batch 1: nothing to pipeline, one sample in flight on stage 0 whatever the accumulation
    first = memory._stage(model, ParallelDims(pp=4), "first", 1, 4096, "bf16", "selective", "flash", 16, "fused")
    assert first.get("activations") == 1 * 8 * per_sample


def test_gpipe_holds_every_pipeline_microbatch_on_every_stage():
    """parallel.pp_schedule = "gpipe" runs all forwards before any backward: micro-batch 8 on pp=4 is 8 pipeline
    micro-batches of 1 sample, all 8 alive on stage 0 and on the last stage (1F1B: 4 and 1), and the last
    stage keeps each one's logits and fp32 log-probs (e + 4 bytes per logit) until its backward, plus one
    fp32 logits gradient. The estimate assumed 1F1B for either schedule."""
    model = get_preset("llama-8b")
    per_sample, _ = layer_activation_bytes(model, 4096, 1, dtype="bf16", recompute="selective")
    dims = ParallelDims(pp=4, pp_schedule="gpipe")
    first = memory._stage(model, dims, "first", 8, 4096, "bf16", "selective", "flash", 1, "fused")
    last = memory._stage(model, dims, "last", 8, 4096, "bf16", "selective", "flash", 1, "fused")
    assert first.get("activations") == 8 * 8 * per_sample and last.get("activations") == 8 * 8 * per_sample
    assert last.get("logits") == pytest.approx(4096 * 128256 * (8 * (2 + 4) + 4))
    est = estimate_memory(model, dims, micro_batch=8, seq_len=4096, recompute="selective")
    assert est.peak_bytes == max(first.peak_bytes, last.peak_bytes)
    assert est.peak_bytes > estimate_memory(model, ParallelDims(pp=4), micro_batch=8, seq_len=4096,
                                            recompute="selective").peak_bytes


def test_stage_params_add_up():
    """Stage parameters: the first stage holds the embedding, the last the head; stages sum to the total
    (plus the tied copy kept on the last stage)."""
    model = get_preset("llama-8b")
    g = memory.param_groups(model)
    assert g["embedding"] + 32 * g["per_layer"] + g["head"] == model.num_params()
    first, n1 = memory.stage_params(model, 4, "first")
    last, n2 = memory.stage_params(model, 4, "last")
    assert (n1, n2) == (8, 8)
    assert first + last + 2 * 8 * g["per_layer"] == model.num_params()


def test_flops_match_nanogpt_and_palm():
    """GPT-2 124M at T=1024: N = all parameters minus the position table (nanoGPT estimate_mfu's N),
    6N + 12*L*D*T per token (PaLM appendix B); forward 2N + 4*L*D*T."""
    model = get_preset("gpt2-124m")
    n_nanogpt = model.num_params() - 1024 * 768
    f = flops.training_flops_per_token(model, 1024)
    assert f.matmul_params == n_nanogpt == 123_653_376
    assert f.dense == 6 * n_nanogpt and f.attention == 12 * 12 * 768 * 1024
    assert "PaLM convention" in f.convention and "6*N + 12*L*D*T" in f.convention
    fw = flops.forward_flops_per_token(model, 1024)
    assert fw.total == 2 * n_nanogpt + 4 * 12 * 768 * 1024
    assert flops.training_flops_per_step(model, 1024, 524288) == f.total * 524288


def test_untied_output_counted_once():
    """Llama 8B (untied): N = non-embedding parameters (num_params(include_embeddings=False)), which
    already include the 128256 x 4096 output matrix."""
    model = get_preset("llama-8b")
    n, layers, out = flops.matmul_params(model)
    assert n == model.num_params(include_embeddings=False) and out == 128256 * 4096
    assert n == model.num_params() - 128256 * 4096  # total minus the token embedding


def test_recompute_flops():
    """Full recompute adds one forward (2N_layers + 4LDT per token), selective only the attention core (4LDT)."""
    model = get_preset("gpt2-124m")
    _, layers, _ = flops.matmul_params(model)
    assert flops.recompute_flops(model, 1024, "none") == 0
    assert flops.recompute_flops(model, 1024, "selective") == 4 * 12 * 768 * 1024
    assert flops.recompute_flops(model, 1024, "full") == 2 * layers + 4 * 12 * 768 * 1024


def test_rnn_flops_and_memory():
    """LSTM: 6N with N = 4 gates x (2*D*D + 2*D) per layer + the output matmul (+ its V biases, as
    non-embedding parameters always include biases); no attention term."""
    model = get_preset("lstm-small", vocab_size=65)
    f = flops.training_flops_per_token(model, 128)
    assert f.attention == 0 and f.matmul_params == 2 * 4 * (2 * 512 * 512 + 2 * 512) + 65 * 512 + 65
    est = estimate_memory(model, ParallelDims(), micro_batch=4, seq_len=128, dtype="fp32", optimizer_impl="per_tensor")
    assert est.get("weights") == 4 * model.num_params()
    assert math.isfinite(est.peak_bytes) and est.peak_bytes > 16 * model.num_params()


def test_explain_names_every_piece():
    """--explain prints each item by name with its GiB figure and the peak."""
    est = estimate_memory(get_preset("llama-1b"), ParallelDims(dp_shard=4), micro_batch=2, seq_len=2048,
                          recompute="full", optimizer_impl="foreach")
    text = est.explain()
    for name in ("weights", "gradients", "master_weights", "optimizer", "activations", "recompute_working_set",
                 "logits", "fsdp_buffers", "optimizer_step_temp", "peak"):
        assert name in text


def test_optimizer_step_temporaries():
    """Fused AdamW (the trainer's choice on CPU and CUDA) adds nothing; foreach adds 4 B per sharded
    parameter; the single-tensor loop 4 B x the largest tensor (the 128256 x 2048 embedding of Llama 1B)."""
    model, dims = get_preset("llama-1b"), ParallelDims(dp_shard=4)
    kw = dict(micro_batch=1, seq_len=1024)
    assert estimate_memory(model, dims, **kw).get("optimizer_step_temp") == 0
    assert estimate_memory(model, dims, optimizer_impl="foreach", **kw).get("optimizer_step_temp") == pytest.approx(
        4 * model.num_params() / 4)
    assert estimate_memory(model, dims, optimizer_impl="per_tensor", **kw).get("optimizer_step_temp") == \
        4 * 128256 * 2048


def test_step_work_gemms_add_up_to_6n():
    """The per-op inventory's linear GEMMs are 6 FLOPs per matmul weight per token (PaLM's 6N without the norm
    weights and biases, which are elementwise); full recomputation adds one forward of the layers (2 N_layers); tp=2
    halves them; the attention core counts 7 GEMMs per head (2 forward, 5 backward) over the causal part, 9 when
    its forward is recomputed; the loss is one cross-entropy kernel over B*T*V logits; 2L + 1 norms over B*T*D."""
    m = get_preset("gpt2-124m")
    n_tok = 2 * 1024
    w = flops.step_work(m, 2, 1024)
    norms = (2 * m.n_layers + 1) * 2 * m.dim  # LayerNorm weight + bias
    norms += m.n_layers * (5 * m.dim + m.hidden_dim)  # Linear biases (q, k, v, o, w2: D; w1: F): added, not GEMM
    assert sum(g.flops for g in w.gemms) == pytest.approx(6 * (flops.matmul_params(m)[0] - norms) * n_tok)
    full = flops.step_work(m, 2, 1024, recompute="full")
    layer_mm = flops.matmul_params(m)[1] - norms  # layer weights (N without the output projection), no norms
    assert sum(g.flops for g in full.gemms) - sum(g.flops for g in w.gemms) == pytest.approx(2 * layer_mm * n_tok)
    tp2 = flops.step_work(m, 2, 1024, tp=2)
    assert sum(g.flops for g in tp2.gemms) == pytest.approx(sum(g.flops for g in w.gemms) / 2, rel=1e-5)  # V odd
    T, Hd = 1024, m.head_dim
    attn = 2 * m.n_heads * m.n_layers * (T + 1) / (2 * T) * 7 * 2 * T * T * Hd
    assert w.attention.flops == pytest.approx(attn)
    assert flops.step_work(m, 2, 1024, recompute="selective").attention.flops == pytest.approx(attn * 9 / 7)
    loss = [o for o in w.memops if o.part == "loss"]
    assert [(o.kernel, o.elements) for o in loss] == [("cross_entropy", n_tok * m.padded_vocab_size)]
    norms_ = [o for o in w.memops if o.kernel == "layernorm"]
    assert sum(o.count * o.elements for o in norms_) == (2 * m.n_layers + 1) * n_tok * m.dim
    with pytest.raises(ValueError, match="Transformers"):
        flops.step_work(get_preset("lstm-small", vocab_size=65), 1, 8)


def test_a_classifier_counts_neither_the_lm_head_nor_its_own_head_per_token():
    """A classifier never runs the LM's V x D output projection, and its C x D head runs once per
    sequence: FLOPs per token are the layers' only."""
    import dataclasses

    from clusterlm.cluster.flops import matmul_params
    from clusterlm.models.config import get_preset

    lm = get_preset("gpt-nano", vocab_size=100)
    clf = dataclasses.replace(lm, labels=("a", "b", "c"), pad_id=1)
    n_lm, layers_lm, out_lm = matmul_params(lm)
    n, layers, out = matmul_params(clf)
    assert out_lm == lm.padded_vocab_size * lm.dim and out == 0
    assert layers == layers_lm and n == layers


def test_ddp_buckets_hold_fp32_gradients_under_bf16():
    """DDP trains under torch.autocast (clusterlm/train/loop.py): parameters, gradients and so DDP's bucket
    copy stay fp32 in a bf16 run, 4 B/param, as steptime's all-reduce already counts them
    (GRAD_REDUCE_BYTES); it was 2 B/param, 2.5 GB short per GPU for llama-1b."""
    model = get_preset("llama-1b")
    n = model.num_params()
    for dtype in ("bf16", "fp32"):
        est = estimate_memory(model, ParallelDims(dp_replicate=8), micro_batch=1, seq_len=2048, dtype=dtype)
        assert est.get("ddp_buckets") == 4 * n


def test_replication_with_tp_or_pp_is_planned_as_the_fsdp2_the_trainer_builds():
    """dp_replicate > 1 with dp_shard = 1 and tp or pp > 1: the trainer wraps FSDP2 on a replicate x shard
    mesh (parallelize.py, ParallelDims.dp_wrapper), not DDP; the estimate counted DDP's bucket copy of
    every gradient and autocast weight copies instead of FSDP2's per-layer buffers."""
    assert ParallelDims(dp_replicate=8).dp_wrapper == "ddp"
    assert ParallelDims(tp=2, pp=2).dp_wrapper == "none"
    for dims in (ParallelDims(dp_replicate=2, tp=2), ParallelDims(dp_replicate=2, pp=2),
                 ParallelDims(dp_replicate=2, dp_shard=2)):
        assert dims.dp_wrapper == "fsdp"
        est = estimate_memory(get_preset("llama-1b"), dims, micro_batch=1, seq_len=2048, dtype="bf16")
        names = {it.name for it in est.items}
        assert "fsdp_buffers" in names and not names & {"ddp_buckets", "autocast_weight_copies"}, names


def test_peak_line_states_the_gradient_rule_only_where_it_applies():
    """--explain's peak line said "with one micro-batch per step and no pipeline, gradients ... are not counted
    together" also for llama-70b at 32 accumulation steps, where they are (state + working memory); the clause
    now appears only for accumulation 1 without a pipeline."""
    model = get_preset("llama-1b")
    kw = dict(micro_batch=1, seq_len=2048, dtype="bf16")
    one = estimate_memory(model, ParallelDims(dp_shard=8), grad_accum_steps=1, **kw)
    many = estimate_memory(model, ParallelDims(dp_shard=8), grad_accum_steps=8, **kw)
    assert "not counted together" in one.explain().splitlines()[-1]
    assert "not counted together" not in many.explain().splitlines()[-1]
    assert many.peak_bytes - one.peak_bytes == pytest.approx(one.get("gradients"))


def test_an_encoder_classifier_does_not_count_the_masked_lm_head():
    """An encoder classifier pools the final hidden states into its head; the masked-LM head (dense
    D x D, its norm, the output bias), which only feeds the output projection, never runs either. It
    was counted in the classifier's layer weights (FLOPs/token at start-up, MFU): now the layers are
    the masked-LM encoder's without that head, and the start-up line no longer calls the uncounted
    output projection "tied to the embedding, still a matmul"."""
    import dataclasses

    from clusterlm.cluster.flops import matmul_params
    from clusterlm.models.config import ModelConfig

    for bias in (False, True):
        lm = ModelConfig(arch="encoder", vocab_size=100, n_layers=2, dim=32, n_heads=4, max_seq_len=16, bias=bias)
        clf = dataclasses.replace(lm, labels=("a", "b"), pad_id=1)
        _, layers_lm, _ = matmul_params(lm)
        n, layers, out = matmul_params(clf)
        norm = 32 * (2 if bias else 1)
        head = 32 * 32 + (32 if bias else 0) + norm + (lm.padded_vocab_size if bias else 0)
        assert out == 0 and n == layers == layers_lm - head
    from clusterlm.cluster.flops import flops_per_token

    conv = flops_per_token(clf, 16).convention
    assert "0 output projection (a classifier does not run it)" in conv and "still a matmul" not in conv


def test_masked_lm_flops_count_the_head_and_output_at_the_corrupted_positions():
    """A masked-LM step runs the encoder's masked-LM head and output layer at the corrupted positions
    only (models/encdec.py `predict`, 15% of them), but FLOPs/token (start-up line, MFU) counted both
    at every position. With predicted = mask_prob they count at that share; the layers in full."""
    from clusterlm.cluster.flops import flops_per_token, matmul_params, mlm_head_params
    from clusterlm.models.config import ModelConfig
    from clusterlm.train.metrics import flops_per_token as train_fpt

    cfg = ModelConfig(arch="encoder", vocab_size=4097, n_layers=4, dim=192, n_heads=4, max_seq_len=128)
    n, layers, out = matmul_params(cfg)
    head = mlm_head_params(cfg)
    f = flops_per_token(cfg, 96, predicted=0.15)
    want = layers - head + round(0.15 * head) + round(0.15 * out)
    assert f.matmul_params == want and f.dense == 6 * want and "at 15% of positions" in f.convention
    assert flops_per_token(cfg, 96).matmul_params == n  # the default: every position
    t = train_fpt(cfg, 96, predicted=0.15)
    assert t["n_matmul_params"] == want == t["n_layer_params"] + t["n_output_params"]


def test_a_classifiers_logits_are_its_class_scores():
    """A classifier (model.labels) scores the pooled state, (B, C) fp32, and never runs the LM output layer
    (models/classifier.py): its logits item is B*C*(4+4+4) bytes, not B*T*V*(e+8) (here 32*128*4096*12 =
    192 MiB of a 0.44 GiB peak, in train's start-up memory check too). A bidirectional one (two LSTM readers)
    keeps both readers' activations."""
    base = dict(arch="transformer", n_layers=4, n_heads=4, dim=192, max_seq_len=128, pos="learned", vocab_size=4096)
    lm = ModelConfig(**base)
    clf = ModelConfig(**base, labels=("neg", "pos"))
    e_lm = estimate_memory(lm, ParallelDims(), micro_batch=32, seq_len=128, dtype="fp32")
    e_clf = estimate_memory(clf, ParallelDims(), micro_batch=32, seq_len=128, dtype="fp32")
    assert e_lm.get("logits") == 32 * 128 * 4096 * 12
    assert e_clf.get("logits") == 32 * 2 * 12
    assert e_clf.get("activations") == e_lm.get("activations")
    lstm = dict(arch="lstm", n_layers=2, dim=128, max_seq_len=64, vocab_size=256, labels=("neg", "pos"))
    one = estimate_memory(ModelConfig(**lstm), ParallelDims(), micro_batch=8, seq_len=64, dtype="fp32")
    two = estimate_memory(ModelConfig(**lstm, bidirectional=True), ParallelDims(), micro_batch=8, seq_len=64,
                          dtype="fp32")
    assert one.get("activations") == 2 * 64 * 8 * (128 + 4 * 128 + 2 * 128) * 4  # layers * s*b*(h + 4h + 2h)*e
    assert two.get("activations") == 2 * one.get("activations")
