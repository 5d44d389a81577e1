"""The planner: only fitting candidates, ranked by throughput; step-time arithmetic; no silent defaults."""

import dataclasses
from pathlib import Path

import pytest

from clusterlm.cluster import planner, steptime
from clusterlm.cluster.flops import training_flops_per_token
from clusterlm.cluster.memory import GIB
from clusterlm.cluster.spec import load_spec
from clusterlm.config import resolve
from clusterlm.errors import ConfigError
from clusterlm.models.config import ModelConfig, get_preset

H100 = load_spec("h100-sxm-8x")
LLAMA70B = get_preset("llama-70b")
LLAMA8B = get_preset("llama-8b")


def one_gpu(spec):
    node = spec.node_types[0]
    return dataclasses.replace(spec, node_types=(dataclasses.replace(node, device=dataclasses.replace(node.device,
                                                                                                      count=1)),))


def with_efficiency(spec, eff):
    node = spec.node_types[0]
    dev = dataclasses.replace(node.device, train_efficiency={"bf16": eff})
    return dataclasses.replace(spec, node_types=(dataclasses.replace(node, device=dev),))


def test_only_fitting_sorted_by_throughput():
    """Every returned candidate's peak memory is within the limit, and tokens/s never increases down the list;
    the search itself also produced candidates that do not fit (they are filtered, not hidden by the search)."""
    kw = dict(seq_len=8192, global_batch_tokens=2**19, tokens=10**10)
    cands = planner.plan(LLAMA8B, H100, **kw)
    everything = planner.search(LLAMA8B, H100, **kw)
    assert cands and len(cands) < len(everything)
    assert all(c.fits and c.memory.peak_bytes <= 0.9 * 79.65 * GIB for c in cands)
    tps = [c.tokens_per_s for c in cands]
    assert tps == sorted(tps, reverse=True)
    assert any(not c.fits for c in everything)


def test_70b_needs_more_than_one_node():
    """Llama 70B: 16 B/param of model state is 1.13 TB: no plan on one 80 GB GPU, nor on one 8x H100 node
    (141 GB/GPU of state alone with full sharding); on 4 nodes (32 GPUs) a sharded plan fits."""
    kw = dict(seq_len=4096, global_batch_tokens=2**20)
    assert planner.plan(LLAMA70B, one_gpu(H100), **kw) == []
    assert planner.plan(LLAMA70B, H100, **kw) == []
    smallest = min(planner.search(LLAMA70B, H100, **kw), key=lambda c: c.memory.peak_bytes)
    state = sum(smallest.memory.get(k) for k in ("weights", "gradients", "master_weights", "optimizer"))
    assert state == pytest.approx(16 * LLAMA70B.num_params() / 8, rel=1e-6) and state > 80 * GIB
    cands = planner.plan(LLAMA70B, H100, nodes=4, **kw)
    assert cands, "a 70B plan should exist on 32 H100s"
    best = cands[0]
    assert best.dims.world_size == 32 and best.dims.dp_shard * best.dims.tp * best.dims.pp > 1


def test_8b_fits_on_8_gpus_with_sharding_not_on_one():
    """Llama 8B: 128 GB of model state does not fit one H100; on 8 it fits, always with sharded state."""
    kw = dict(seq_len=4096, global_batch_tokens=2**19)
    assert planner.plan(LLAMA8B, one_gpu(H100), **kw) == []
    cands = planner.plan(LLAMA8B, H100, **kw)
    assert cands and all(c.dims.dp_shard * c.dims.tp * c.dims.pp > 1 for c in cands)


def test_step_time_arithmetic_one_device():
    """On one device the step is compute + optimizer: (6N + 12LDT) * tokens / (peak * efficiency), and
    tokens/s = global batch / step; MFU equals the efficiency when nothing else costs time."""
    spec = with_efficiency(one_gpu(H100), 0.5)
    model = get_preset("gpt2-124m")
    c = planner.plan(model, spec, seq_len=1024, global_batch_tokens=2**19, steps=100, recompute_modes=("none",))[0]
    f = training_flops_per_token(model, 1024)
    assert c.time_parts["compute"] == pytest.approx(f.total * 2**19 / (989.4e12 * 0.5))
    assert set(c.time_parts) == {"compute", "optimizer"}
    assert c.tokens_per_s == pytest.approx(2**19 / c.step_time_s)
    assert c.total_time_s == pytest.approx(100 * c.step_time_s) and c.device_hours == pytest.approx(c.total_time_s / 3600)
    assert c.mfu == pytest.approx(0.5 * c.time_parts["compute"] / c.step_time_s)
    assert not any("ASSUMPTION" in a and "efficiency" in a for a in c.assumptions)


def test_default_efficiency_is_an_announced_assumption():
    """Without a measured efficiency the planner uses 0.40 of peak and says so in the candidate's assumptions."""
    c = planner.plan(LLAMA8B, H100, seq_len=4096, global_batch_tokens=2**19)[0]
    text = " ".join(c.assumptions)
    assert "ASSUMPTION" in text and "0.4" in text and "989.4" in text
    rate = steptime.compute_rate(H100.node_types[0].device, "bf16")
    assert rate.assumed and rate.tflops == pytest.approx(989.4 * steptime.DEFAULT_TRAIN_FRACTION_OF_PEAK)


def test_unknown_device_speed_stays_unknown():
    """The laptop preset has no peak and no measurement: memory is planned, step time is None (not an A100's)."""
    model = get_preset("gpt-mini", vocab_size=65)
    cands = planner.plan(model, load_spec("laptop-cpu"), seq_len=256, global_batch_tokens=12288, dtype="fp32")
    assert cands and all(c.step_time_s is None and c.tokens_per_s is None for c in cands)
    assert "unknown" in cands[0].assumptions[0]
    # without speeds the tie-breakers order them: least recomputation, then the largest micro-batch
    assert cands[0].recompute == "none" and cands[0].micro_batch == max(c.micro_batch for c in cands)


def test_pipeline_bubble_and_ring_formulas():
    """Bubble = compute * (pp-1)/n_mb, n_mb the pipeline micro-batches of one schedule call (the largest divisor
    of the micro-batch <= 2*pp: the trainer runs each accumulation step as its own call, parallel/pp.py); it was
    compute * (pp-1)/accumulation, so micro-batch 1 x 32 steps on pp=4 was credited a 3/32 bubble where no two
    stages ever overlap (3x compute). Ring all-reduce = 2(n-1)/n * S / busbw + 2(n-1) * latency."""
    cands = planner.search(LLAMA70B, H100, seq_len=4096, global_batch_tokens=2**20, nodes=4)
    c = next(c for c in cands if c.dims.pp == 4 and c.micro_batch == 8)  # 8 pipeline micro-batches of 1
    assert c.time_parts["bubble"] == pytest.approx(c.time_parts["compute"] * 3 / 8)
    c = next(c for c in cands if c.dims.pp == 4 and c.micro_batch == 32)  # 8 of 4 (n_mb <= 2*pp)
    assert c.time_parts["bubble"] == pytest.approx(c.time_parts["compute"] * 3 / 8)
    # pp sends: each of the m calls sends 2 * (n_mb + pp - 1) activations of one pipeline micro-batch
    c = next(c for c in cands if c.dims.pp == 4 and c.dims.tp == 1 and c.micro_batch == 8)
    one = 1 * 4096 * LLAMA70B.dim * 2 / (50.0 * 0.94 * 8 / 8 * 1e9) + 3e-6  # inter-node: one NDR adapter per rank
    assert c.time_parts["pp_comm"] == pytest.approx(c.grad_accum_steps * 2 * (8 + 3) * one)
    assert steptime.ring("all_reduce", 8e9, 8, 100.0, 1e-6) == pytest.approx(2 * 7 / 8 * 8e9 / 100e9 + 14e-6)
    assert steptime.ring("all_gather", 8e9, 8, 100.0, 0.0) == pytest.approx(7 / 8 * 8e9 / 100e9)
    assert steptime.ring("all_reduce", 8e9, 1, 100.0, 1e-6) == 0


def test_groups_that_cross_nodes_use_the_network():
    """tp=8 inside a node rides NVLink (369 GB/s busbw); a dp_replicate group across 4 nodes gets one NDR
    adapter per rank (8 x 47 GB/s per node / 8 ranks)."""
    net = steptime.network(H100, H100.node_types[0], 4)
    bw, _, where = steptime.group_bw(net, 8, 1)
    assert where == "intra-node" and bw == pytest.approx(450 * 0.82)
    bw, _, where = steptime.group_bw(net, 4, 8)
    assert where == "inter-node" and bw == pytest.approx(50 * 0.94)


def test_recipe_sections_load_with_the_run_config():
    """--out's [model]/[train]/[optim] resolve through clusterlm.config to the planned values; [parallel]
    and [plan] carry the layout and predictions."""
    model = get_preset("gpt2-124m")
    c = planner.plan(model, H100, seq_len=1024, global_batch_tokens=2**19, steps=500)[0]
    tree = planner.recipe_tree({"preset": "gpt2-124m"}, c, seq_len=1024, global_batch_tokens=2**19, dtype="bf16",
                               device_kind="cuda", cluster="h100-sxm-8x")
    cfg = resolve({k: tree[k] for k in ("model", "train", "optim")})
    assert cfg.model == model and cfg.train.micro_batch_size == c.micro_batch and cfg.train.max_steps == 500
    assert cfg.train.global_batch_tokens == 2**19 and cfg.train.device == "cuda"
    assert tree["parallel"] == {"dp_replicate": c.dims.dp_replicate, "dp_shard": c.dims.dp_shard, "tp": c.dims.tp,
                                "pp": c.dims.pp, "activation_checkpointing": c.recompute}
    assert tree["plan"]["predicted_step_s"] == pytest.approx(c.step_time_s, rel=1e-5)
    assert tree["plan"]["predicted_memory_bytes"] == int(c.memory.peak_bytes)


def test_out_keeps_a_recipe_models_other_sections(tmp_path, capsys):
    """`plan --model RECIPE --out F`: F resolves to the recipe's [optim] (lr 1e-3, beta2 0.99: it was
    replaced by the defaults, lr 6e-4), [data], [checkpoint], [eval] and unplanned [train] keys, with the
    planned [train] keys (max_steps from --steps), [parallel] and [plan]; a preset still gets the
    default [optim] with the warm-up capped at a tenth of the steps."""
    from clusterlm.config import load_run_config, resolve_recipe

    out = tmp_path / "p.toml"
    assert planner.main(["--model", "shakespeare_char_cpu", "--cluster", "laptop-cpu", "--vocab-size", "65",
                         "--steps", "300", "--out", str(out)]) == 0
    cfg, src = load_run_config(out), load_run_config(resolve_recipe("shakespeare_char_cpu"))
    assert cfg.optim == src.optim and cfg.optim.lr == 1e-3
    assert (cfg.data, cfg.checkpoint, cfg.eval) == (src.data, src.checkpoint, src.eval)
    assert (cfg.train.out_dir, cfg.train.eval_interval, cfg.train.max_steps) == (src.train.out_dir, 250, 300)
    assert cfg.plan.cluster == "laptop-cpu" and "Add a [data] section" not in out.read_text()
    assert planner.main(["--model", "gpt2-124m", "--cluster", "laptop-cpu", "--steps", "300", "--out", str(out)]) == 0
    cfg = load_run_config(out)
    assert cfg.optim.lr == 6e-4 and cfg.optim.warmup_steps == 30 and "Add a [data] section" in out.read_text()
    # the recipe's own [parallel] keys the planner does not choose stay; the layout is the plan's
    recipe = tmp_path / "r.toml"
    recipe.write_text(Path(resolve_recipe("shakespeare_char_cpu")).read_text() + '\n[parallel]\npp_schedule = "gpipe"\n'
                      'sequence_parallel = false\ndp_shard = 4\n')
    assert planner.main(["--model", str(recipe), "--cluster", "laptop-cpu", "--vocab-size", "65", "--out", str(out)]) == 0
    cfg = load_run_config(out)
    assert (cfg.parallel.pp_schedule, cfg.parallel.sequence_parallel, cfg.parallel.dp_shard) == ("gpipe", False, 1)


def test_a_recipes_pp_schedule_and_sequence_parallel_are_planned(tmp_path, capsys):
    """`plan --model RECIPE` with [parallel] pp_schedule = "gpipe" and sequence_parallel = false keeps both in
    --out; the memory it predicts is now the estimate of that layout (it was planned as 1F1B with sequence
    parallel: 4 of 8 pipeline micro-batches on stage 0 instead of 8, activations split over tp)."""
    from clusterlm.cluster.memory import estimate_memory
    from clusterlm.config import load_run_config
    from clusterlm.parallel.dims import ParallelDims

    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\npreset = "llama-8b"\n[train]\nseq_len = 4096\nmicro_batch_size = 8\n'
                      'global_batch_tokens = 65536\n[parallel]\npp_schedule = "gpipe"\nsequence_parallel = false\n')
    out = tmp_path / "p.toml"
    assert planner.main(["--model", str(recipe), "--cluster", "h100-sxm-8x", "--nodes", "2", "--out", str(out)]) == 0
    cfg = load_run_config(out)
    assert (cfg.parallel.pp_schedule, cfg.parallel.sequence_parallel) == ("gpipe", False)
    dims = ParallelDims(**{k: getattr(cfg.parallel, k) for k in ("dp_replicate", "dp_shard", "tp", "pp",
                                                                 "activation_checkpointing", "pp_schedule",
                                                                 "sequence_parallel")})
    accum = dims.grad_accum_steps(65536, cfg.train.micro_batch_size, 4096)
    est = estimate_memory(LLAMA8B, dims, micro_batch=cfg.train.micro_batch_size, seq_len=4096, dtype=cfg.train.dtype,
                          recompute=dims.activation_checkpointing, grad_accum_steps=accum)
    assert cfg.plan.predicted_memory_bytes == int(est.peak_bytes)
    cands = planner.search(LLAMA8B, H100, seq_len=4096, global_batch_tokens=65536, nodes=2, micro_batches=(8,),
                           fixed_dims={"pp_schedule": "gpipe", "sequence_parallel": False})
    gp = next(c for c in cands if c.dims.pp == 4 and c.dims.tp == 2 and c.recompute == "none")
    plain = next(c for c in planner.search(LLAMA8B, H100, seq_len=4096, global_batch_tokens=65536, nodes=2,
                                           micro_batches=(8,))
                 if c.dims.pp == 4 and c.dims.tp == 2 and c.recompute == "none")
    assert (gp.dims.pp_schedule, gp.dims.sequence_parallel) == ("gpipe", False)
    assert gp.memory.get("activations") > plain.memory.get("activations")


def test_bad_inputs():
    """A global batch that is not a multiple of seq_len, and both tokens and steps, are refused."""
    with pytest.raises(ConfigError, match="multiple of seq_len=1024"):
        planner.plan(LLAMA8B, H100, seq_len=1024, global_batch_tokens=1000)
    with pytest.raises(ConfigError, match="tokens or steps"):
        planner.plan(LLAMA8B, H100, seq_len=1024, global_batch_tokens=2**19, tokens=10, steps=10)


def test_parse_count():
    """Budgets: 10B, 2.5e9, 300M, 524288."""
    assert planner.parse_count("10B") == 10**10
    assert planner.parse_count("2.5e9") == 2_500_000_000
    assert planner.parse_count("300M") == 300_000_000
    assert planner.parse_count("524288") == 524288
    with pytest.raises(Exception):
        planner.parse_count("lots")


# ---- the per-op step model -------------------------------------------------------------------------------
TINY = ModelConfig(vocab_size=16, n_layers=1, dim=8, n_heads=2, max_seq_len=4)


def cpu_spec(**device_fields):
    """A one-CPU spec (16 GiB) carrying the given probe figures."""
    from clusterlm.cluster.spec import ClusterSpec, DeviceSpec, NodeType

    dev = DeviceSpec(name="test CPU", kind="cpu", memory_gib=16.0, **device_fields)
    return ClusterSpec(name="t", node_types=(NodeType(name="n", memory_gib=16.0, device=dev),))


KERNEL_NS = {"layernorm": 0.5, "rmsnorm": 0.7, "gelu_tanh": 2.0, "silu": 1.5, "cross_entropy": 1.0, "adamw": 0.25}
FLAT = dict(matmul_sweep={"fp32": ((1.0, 1.0, 1.0, 1.0),)}, attention_sweep=((1.0, 1.0, 0.5),),
            kernel_sweep={k: ((1.0, v),) for k, v in KERNEL_NS.items()}, elementwise_sweep=((1e3, 10.0), (1e9, 10.0)),
            op_overhead_us=2.0)


def test_gemm_rate_interpolates_in_log_space():
    """At grid points the measured rate; halfway in log(K) between K=64 (0.1) and K=256 (0.4) the geometric mean
    0.2; below the smallest K the rate scales with K (K=16: a quarter of K=64's); above the largest it stays."""
    rows = tuple((float(m), float(n), float(k), (0.1 if k == 64 else 0.4) * (2 if m == 1024 else 1))
                 for m in (128, 1024) for n in (64, 256) for k in (64, 256))
    r = steptime.OpRates("fp32", rows, ((1.0, 1.0, 1.0),), {}, ((1e3, 10.0),), 1.0)
    assert r.gemm_tflops(128, 64, 64) == pytest.approx(0.1) and r.gemm_tflops(1024, 256, 256) == pytest.approx(0.8)
    assert r.gemm_tflops(128, 64, 128) == pytest.approx(0.2)
    assert r.gemm_tflops(128, 100, 128) == pytest.approx(0.2)  # N does not change the rate here
    assert r.gemm_tflops(128, 64, 16) == pytest.approx(0.025)
    assert r.gemm_tflops(4096, 4096, 4096) == pytest.approx(0.8)
    assert r.gemm_tflops(128 * 2**0.5, 64, 64) == pytest.approx(0.1 * 2 ** (1 / 6))  # 1/6 of the way to 1024 in log


def test_bandwidth_by_size_and_incomplete_grid():
    """Elementwise GB/s: geometric interpolation in log(bytes) (1 KB at 100, 100 KB at 10 -> 10 KB at 31.6), end
    values outside; a sweep that is not a full M x N x K grid is refused, naming a missing shape."""
    r = steptime.OpRates("fp32", ((64.0, 64.0, 64.0, 1.0),), ((1.0, 1.0, 1.0),), {}, ((1e3, 100.0), (1e5, 10.0)), 1.0)
    assert r.bandwidth_gbs(1e4) == pytest.approx(10**1.5)
    assert r.bandwidth_gbs(10.0) == pytest.approx(100.0) and r.bandwidth_gbs(1e9) == pytest.approx(10.0)
    with pytest.raises(ConfigError, match=r"not a full grid.*\(64.0, 128.0, 64.0\)"):
        steptime.OpRates("fp32", ((64.0, 64.0, 64.0, 1.0), (128.0, 128.0, 64.0, 1.0)), ((1.0, 1.0, 1.0),), {},
                        ((1e3, 1.0),), 1.0)


def test_op_model_arithmetic_tiny_model():
    """With flat figures (1 TFLOP/s GEMMs, 0.5 TFLOP/s attention, 10 GB/s, fixed ns per element per kernel, 2 us
    per op) each part is hand-computable for a 1-layer D=8, F=32, V=16 model, 2 x 4 tokens: linear GEMMs
    6 * (4*64 + 2*256 + 16*8) FLOPs/token * 8 tokens; attention 2 heads x 2 sequences x 5/8 causal x 7 GEMMs of
    2*4*4*4 FLOPs; the loss 8 x 16 logits x 1 ns; memory ops 3 norms x 64 elements x 0.5 ns + 32 x 8 GELU
    elements x 2 ns + plain bytes / 10 GB/s; the optimizer 12 B/param at 10 GB/s + 0.25 ns/param; the fixed cost
    (ops + 3 x parameter tensors) x 2 us."""
    spec = cpu_spec(**FLAT)
    c = planner.plan(TINY, spec, seq_len=4, global_batch_tokens=8, dtype="fp32", micro_batches=(2,),
                     recompute_modes=("none",))[0]
    parts = c.time_parts
    assert set(parts) == {"gemm", "attention", "memory_ops", "loss", "op_overhead", "optimizer"}
    assert parts["gemm"] == pytest.approx(6 * (4 * 64 + 2 * 256 + 16 * 8) * 8 / 1e12)
    assert parts["attention"] == pytest.approx(2 * 2 * 5 / 8 * 7 * 2 * 4 * 4 * 4 / 0.5e12)
    assert parts["loss"] == pytest.approx(8 * 16 * 1e-9)
    n_params = TINY.num_params()
    assert parts["optimizer"] == pytest.approx(12 * n_params / 10e9 + 0.25e-9 * n_params)
    work = planner.flops_mod.step_work(TINY, 2, 4)
    tensors = 1 + 1 + 1 + 2 + 6  # tok + pos embeddings, final norm, 2 layer norms, 6 linear weights
    assert steptime.param_tensors(TINY) == tensors
    assert parts["op_overhead"] == pytest.approx((work.autograd_ops + 3 * tensors) * 2e-6)
    plain = sum(o.count * o.bytes for o in work.memops if o.part == "memory_ops" and not o.kernel)
    assert parts["memory_ops"] == pytest.approx(3 * 64 * 0.5e-9 + 32 * 8 * 2e-9 + plain / 10e9)
    assert c.step_time_s == pytest.approx(sum(parts.values()))
    assert not any("ASSUMPTION" in a and "fraction" in a for a in c.assumptions)


def test_op_model_grad_accumulation_and_explain():
    """Two micro-batches per step double every per-micro-batch part but not the optimizer; --explain prints
    each part with its formula."""
    spec = cpu_spec(**FLAT)
    kw = dict(seq_len=4, dtype="fp32", recompute_modes=("none",))
    one = planner.plan(TINY, spec, global_batch_tokens=8, micro_batches=(2,), **kw)[0]
    two = planner.plan(TINY, spec, global_batch_tokens=16, micro_batches=(2,), **kw)[0]
    for k in ("gemm", "attention", "memory_ops", "loss"):
        assert two.time_parts[k] == pytest.approx(2 * one.time_parts[k])
    assert two.time_parts["optimizer"] == pytest.approx(one.time_parts["optimizer"])
    text = planner.explain(one)
    for k in ("gemm", "attention", "memory_ops", "loss", "op_overhead", "optimizer"):
        assert f"  {k} " in text
    assert "GEMM sweep" in text and "ns per element" in text and "SDPA" in text and "fixed cost per op" in text


def test_op_model_missing_figures_are_named():
    """A spec with some of the probe's per-op figures says which are missing and falls back to the FLOP rate
    (with its assumption printed); a probe made under load is flagged; a measured train_efficiency takes precedence
    over the per-op model."""
    partial = cpu_spec(measured_tflops={"fp32": 0.5}, matmul_sweep=FLAT["matmul_sweep"], op_overhead_us=2.0)
    c = planner.plan(TINY, partial, seq_len=4, global_batch_tokens=8, dtype="fp32", micro_batches=(2,))[0]
    text = " ".join(c.assumptions)
    assert "device.elementwise_sweep" in text and "device.attention_sweep" in text and "device.kernel_sweep" in text
    assert "device.op_overhead_us" not in text and "ASSUMPTION" in text and "compute" in c.time_parts
    busy = dataclasses.replace(cpu_spec(**FLAT), notes={"load": "1-minute load average 3.2 on 2 logical CPUs"})
    c = planner.plan(TINY, busy, seq_len=4, global_batch_tokens=8, dtype="fp32", micro_batches=(2,))[0]
    assert any("load average 3.2" in a and "idle node" in a for a in c.assumptions)
    calibrated = cpu_spec(measured_tflops={"fp32": 0.5}, train_efficiency={"fp32": 0.5}, **FLAT)
    c = planner.plan(TINY, calibrated, seq_len=4, global_batch_tokens=8, dtype="fp32", micro_batches=(2,))[0]
    assert "compute" in c.time_parts and "gemm" not in c.time_parts
    assert any("train_efficiency" in a and "precedence" in a for a in c.assumptions)


def test_spec_with_probe_figures_round_trips(tmp_path):
    """The probe's per-op figures survive save -> load; specs without them (presets) still load."""
    from clusterlm.cluster.spec import save_spec

    spec = cpu_spec(**FLAT)
    save_spec(spec, tmp_path / "n.toml")
    back = load_spec(str(tmp_path / "n.toml"))
    assert back.node_types[0].device == spec.node_types[0].device
    assert load_spec("laptop-cpu").node_types[0].device.matmul_sweep == {}
    with pytest.raises(ConfigError, match="matmul_sweep"):
        cpu_spec(matmul_sweep={"fp32": ((64.0, 64.0, 1.0),)})
    with pytest.raises(ConfigError, match="kernel_sweep.gelu_tanh"):
        cpu_spec(kernel_sweep={"gelu_tanh": ((1.0, -2.0),)})


def test_probe_runners_feed_the_op_model():
    """The probe's per-op runners, at tiny sizes, return rows of the spec's shape (a full GEMM grid, positive
    rates) that load into a DeviceSpec and give a per-op plan; the fixed cost per op is a few microseconds."""
    from clusterlm.cluster import microbench as probe

    sweep = probe.measure_matmul_sweep("cpu", "fp32", ((16, 64), (8, 32), (16,)), 0.0)
    assert [r[:3] for r in sweep] == [(16.0, 8.0, 16.0), (16.0, 32.0, 16.0), (64.0, 8.0, 16.0), (64.0, 32.0, 16.0)]
    kernels = probe.measure_kernel_sweep("cpu", (8192,), 0.0)
    assert set(kernels) == set(steptime.OP_KERNELS) and all(r[0][1] > 0 for r in kernels.values())
    attention = probe.measure_attention_sweep("cpu", (16,), (8,), 0.0)
    elementwise = probe.measure_elementwise_sweep("cpu", (1024, 4096), 0.0)
    overhead = probe.measure_op_overhead("cpu", 0.0, ops=8)
    assert 0 < overhead < 10_000
    spec = cpu_spec(matmul_sweep={"fp32": sweep}, kernel_sweep=kernels, attention_sweep=attention,
                    elementwise_sweep=elementwise, op_overhead_us=overhead)
    c = planner.plan(TINY, spec, seq_len=4, global_batch_tokens=8, dtype="fp32", micro_batches=(2,))[0]
    assert "gemm" in c.time_parts and c.step_time_s > 0


def test_cpu_mfu_is_against_the_measured_matmul_rate():
    """A CPU has no cited peak: MFU is against the probe's measured matmul rate (as `clusterlm train
    --train.probe_spec` computes it), said in a note; with no measurement either it stays unknown."""
    spec = cpu_spec(measured_tflops={"fp32": 0.5}, **FLAT)
    [c] = planner.plan(TINY, spec, seq_len=4, global_batch_tokens=8, dtype="fp32", micro_batches=(2,),
                       recompute_modes=("none",))
    fpt = training_flops_per_token(TINY, 4).total
    assert c.mfu == pytest.approx(fpt * c.tokens_per_s / 0.5e12)
    assert any("MFU against the measured fp32 matmul rate 0.5 TFLOP/s" in a for a in c.assumptions)
    [u] = planner.plan(TINY, cpu_spec(), seq_len=4, global_batch_tokens=8, dtype="fp32", micro_batches=(2,),
                       recompute_modes=("none",))
    assert u.mfu is None and any(a.startswith("MFU unknown") for a in u.assumptions)


def test_no_valid_layout_names_the_reason():
    """`plan --seq-len 2048` for GPT-2 (context 1024): the error names seq_len > max_seq_len, the reason
    every layout was left out (it said "check that the global batch divides ..."); --micro-batch 0 and
    --top 0 are refused (they were accepted: an empty table, rc 0)."""
    argv = ["--model", "gpt2-124m", "--cluster", "a100-80gb-8x-hdr", "--tokens", "1B"]
    with pytest.raises(ConfigError, match=r"no layout is valid .*: seq_len=2048 > model.max_seq_len=1024 \(\d+ of"):
        planner.main(argv + ["--seq-len", "2048"])
    for flag in ("--micro-batch", "--top"):
        with pytest.raises(ConfigError, match=f"{flag} 0 must be >= 1"):
            planner.main(argv + [flag, "0"])
    assert "search found no layout" in planner.no_valid_layout([])


def test_no_valid_layout_counts_every_reason_of_every_choice():
    """A global batch of 3 sequences of 2048 tokens on 8 GPUs for GPT-2: seq_len > max_seq_len refuses every
    choice but the one tp prunes first, so it is counted for 22 of 23 (it was counted only where it came
    first: 6 of 23, behind "3 samples do not split over dp=4" and "... dp=2"); reasons that differ only in
    a layout size are one reason with the sizes (dp=2/4/8: 16 of 23); --explain lists each choice's reasons."""

    argv = ["--model", "gpt2-124m", "--cluster", "h100-sxm-8x", "--seq-len", "2048", "--global-batch-tokens", "6144"]
    with pytest.raises(ConfigError) as e:
        planner.main(argv)
    msg = str(e.value)
    assert msg.startswith("no layout is valid for this model, batch and device count: seq_len=2048 > "
                          "model.max_seq_len=1024 (22 of 23 choices); 3 samples per step do not split over "
                          "dp=2/4/8 data-parallel ranks (16 of 23 choices); pp=2/4/8 with model.tie_embeddings"), msg
    pruned: list[planner.Pruned] = []
    planner.search(get_preset("gpt2-124m"), H100, seq_len=2048, global_batch_tokens=6144,
                   pruned=pruned)
    [p] = [p for p in pruned if p.layout == "dp_replicate=1*dp_shard=1*tp=2*pp=4" and p.micro_batch == 3]
    assert p.reasons == ("seq_len=2048 > model.max_seq_len=1024", "pp=4 with pp_schedule='1f1b' needs at least 4 "
                         "pipeline micro-batches (one per stage) in each micro-batch: train.micro_batch_size=3 splits "
                         "into 3 (its largest divisor <= 2*pp = 8); use a multiple of 4, e.g. train.micro_batch_size=4, "
                         "or parallel.pp_schedule='gpipe'", "pp=4 with model.tie_embeddings=true: the tied "
                         "embedding/output weight would live on the first and last stages; set "
                         "model.tie_embeddings=false")
    assert "seq_len=2048 > model.max_seq_len=1024; pp=4 with" in planner.explain_pruned([p], [])


def test_seq_len_zero_or_negative_is_refused():
    """`plan --seq-len 0` planned silently at the model's max_seq_len (8192 for llama-8b: 0 read as "unset")
    and `--seq-len -5` failed with "-104858 samples per step do not split over dp=4"; both name the flag."""
    argv = ["--model", "llama-8b", "--cluster", "h100-sxm-8x"]
    for value in ("0", "-5"):
        with pytest.raises(ConfigError, match=f"--seq-len {value} must be >= 1"):
            planner.main(argv + ["--seq-len", value])


def test_a_recipe_plans_its_own_batch(tmp_path, capsys):
    """`plan --model RECIPE` plans the recipe's [train] seq_len and global batch (12 x 64 tokens for
    llama_shakespeare_cpu, whose global_batch_tokens is 0: micro-batch x seq_len), as the recipe's
    micro-batch already was; it planned 524,288 tokens (8192 samples) and then reported the recipe's own
    layout "not among the fitting candidates". Flags still win; a mistyped [train] value is exit 2."""
    from pathlib import Path

    recipe = str(Path(__file__).resolve().parents[2] / "recipes" / "llama_shakespeare_cpu.toml")
    argv = ["--model", recipe, "--cluster", "laptop-cpu", "--vocab-size", "65"]
    assert planner.main(argv) == 0
    out = capsys.readouterr().out
    assert "seq_len 64, global batch 768 tokens (12 samples) (the recipe's [train])" in out
    assert "recipe's layout (micro-batch 12 x 1): rank 1 of" in out
    assert planner.main(argv + ["--global-batch-tokens", "1536"]) == 0
    assert "global batch 1,536 tokens (24 samples), fp32" in capsys.readouterr().out
    # a bundled recipe by name, as train and launch take it; a near miss names presets and recipes
    assert planner.main(["--model", "llama_shakespeare_cpu", "--cluster", "laptop-cpu", "--vocab-size", "65"]) == 0
    assert "seq_len 64, global batch 768 tokens (12 samples) (the recipe's [train])" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="'llama_shakespeare' is not a model preset, a bundled recipe or a TOML "
                                          "file \\(did you mean llama_shakespeare_cpu"):
        planner.main(["--model", "llama_shakespeare", "--cluster", "laptop-cpu"])
    bad = tmp_path / "bad.toml"
    bad.write_text('[model]\npreset = "llama-nano"\nvocab_size = 65\n[train]\nglobal_batch_tokens = "x"\n')
    with pytest.raises(ConfigError, match="train.global_batch_tokens='x'"):
        planner.main(["--model", str(bad), "--cluster", "laptop-cpu"])


def test_a_dtype_the_device_lacks_is_refused(tmp_path):
    """bf16 on a V100 (FIELD_NOTES 7, gpt-fast #49): the trainer refuses it (clusterlm/device.py), and the
    planner planned it anyway, with step time "?" and "run clusterlm probe" as the advice; it now exits 2
    naming the dtypes the device has. fp16 plans; fp16 on a CPU node (refused by the trainer) is exit 2 too."""
    spec = tmp_path / "v100.toml"
    spec.write_text('name = "v"\n[[node_types]]\nname = "n"\ncount = 1\nmemory_gib = 100.0\n[node_types.device]\n'
                    'name = "Tesla V100-SXM2-32GB"\nkind = "cuda"\ncount = 8\nmemory_gib = 32.0\n')
    argv = ["--model", "llama-1b", "--cluster", str(spec), "--seq-len", "2048"]
    with pytest.raises(ConfigError, match="dtype=bf16: Tesla V100-SXM2-32GB has no bf16 support .* fp16 or fp32"):
        planner.main(argv + ["--dtype", "bf16"])
    assert planner.main(argv + ["--dtype", "fp16"]) == 0
    with pytest.raises(ConfigError, match="dtype=fp16 needs a GPU"):
        planner.main(["--model", "llama-nano", "--vocab-size", "65", "--cluster", "laptop-cpu", "--dtype", "fp16"])


def test_recipe_line_ranks_the_recipes_own_layout(tmp_path, capsys):
    """A --model recipe whose [parallel] names a layout (dp_shard=4, tp=2, selective recomputation) is run as that
    layout (launch's check_layout), so "recipe's layout" ranks that candidate: it ranked the DDP layout with no
    recomputation whatever the recipe said. A layout for another device count is named as such."""
    from clusterlm.parallel.dims import ParallelDims

    recipe = tmp_path / "r.toml"
    recipe.write_text('[model]\npreset = "llama-8b"\n[train]\nseq_len = 4096\nmicro_batch_size = 2\n'
                      'global_batch_tokens = 1048576\n[parallel]\ndp_shard = 4\ntp = 2\n'
                      'activation_checkpointing = "selective"\n')
    assert planner.main(["--model", str(recipe), "--cluster", "h100-sxm-8x", "--top", "1"]) == 0
    out = capsys.readouterr().out
    cands = planner.plan(LLAMA8B, H100, seq_len=4096, global_batch_tokens=2**20, recipe_micro_batch=2)
    mine = ParallelDims(dp_shard=4, tp=2)
    i = next(i for i, c in enumerate(cands, 1) if c.micro_batch == 2 and c.recompute == "selective"
             and c.dims == mine)
    assert (f"recipe's layout (dp_replicate=1*dp_shard=4*tp=2*pp=1, micro-batch 2 x 32, recompute selective): "
            f"rank {i} of {len(cands)}, predicted {cands[i - 1].step_time_s * 1e3:.4g} ms/step") in out
    line = planner.recipe_line(cands, 2, ParallelDims(dp_shard=8, tp=2))
    assert line.endswith("not among the fitting candidates: it needs 16 devices, the plan has 8")


def test_a_recipes_dtype_is_the_planned_one(tmp_path, capsys):
    """`plan --model RECIPE` plans the recipe's [train] dtype, as it plans its seq_len and batch: a recipe with
    dtype = "fp32" on an H100 was planned (and written by --out) as bf16, and "bf16-native" on a CPU with
    AMX as fp32, though train runs each as the recipe says. --dtype still wins."""
    from clusterlm.cluster.spec import presets
    from clusterlm.config import load_run_config, resolve_recipe

    recipe, out = tmp_path / "r.toml", tmp_path / "p.toml"
    recipe.write_text('[model]\npreset = "gpt2-124m"\n[train]\nseq_len = 1024\nmicro_batch_size = 8\n'
                      'global_batch_tokens = 65536\ndtype = "fp32"\n')
    assert planner.main(["--model", str(recipe), "--cluster", "h100-sxm-8x", "--top", "1", "--out", str(out)]) == 0
    assert "(64 samples) (the recipe's [train]), fp32" in capsys.readouterr().out
    assert load_run_config(out).train.dtype == "fp32"
    assert planner.main(["--model", str(recipe), "--cluster", "h100-sxm-8x", "--top", "1", "--dtype", "bf16"]) == 0
    assert "(the recipe's [train]), bf16" in capsys.readouterr().out
    spec = tmp_path / "amx.toml"
    spec.write_text(presets()["laptop-cpu"].read_text().replace("numa_nodes = 1",
                                                                 'numa_nodes = 1\nflags = ["avx512f", "amx_bf16"]'))
    char = resolve_recipe("shakespeare_char_cpu")  # [train] dtype = "bf16-native"
    for flags_spec, want in ((str(spec), "bf16"), ("laptop-cpu", "fp32")):
        assert planner.main(["--model", str(char), "--cluster", flags_spec, "--vocab-size", "65", "--top", "1"]) == 0
        assert f"(the recipe's [train]), {want}\n" in capsys.readouterr().out
