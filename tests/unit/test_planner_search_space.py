"""Issue 20: the layout search covers every micro-batch that divides the per-rank batch, the recipe's own
layout is always a candidate, pruned candidates are listed with the reason; fixed per-step costs from the
probe are in the step model."""

import pytest

from clusterlm.cluster import planner, steptime
from clusterlm.cluster.spec import ProbeQuality, spec_from_dict, spec_to_toml
from clusterlm.errors import ConfigError
from clusterlm.models.config import ModelConfig

from tests.unit.test_planner import FLAT, cpu_spec

# shakespeare_char_cpu.toml's model (0.8M parameters) and batch: 12 sequences of 64 tokens
CHAR = ModelConfig(vocab_size=87, n_layers=4, n_heads=4, dim=128, max_seq_len=64, bias=False, tie_embeddings=True)
LSTM = ModelConfig(arch="lstm", vocab_size=87, n_layers=2, dim=64, max_seq_len=64)
KW = dict(seq_len=64, global_batch_tokens=768, dtype="fp32")


def test_every_divisor_of_the_per_rank_batch():
    """12 samples on one rank: micro-batches 1, 2, 3, 4, 6 and 12 (the recipe's 12 x 1 included, which the
    former fixed list 1, 2, 4, 8, ... never offered), accumulation = 12 / micro-batch."""
    assert planner.micro_batch_options(12) == (1, 2, 3, 4, 6, 12)
    cands = planner.search(CHAR, cpu_spec(**FLAT), recompute_modes=("none",), **KW)
    assert sorted((c.micro_batch, c.grad_accum_steps) for c in cands) == [(1, 12), (2, 6), (3, 4), (4, 3), (6, 2),
                                                                           (12, 1)]


def test_many_divisors_are_capped_but_keep_the_recipe():
    """720720 has 240 divisors: at most MAX_MICRO_BATCHES + powers of two are tried, and the recipe's 7 stays."""
    opts = planner.micro_batch_options(720720, recipe=7)
    assert 7 in opts and 16 in opts and 720720 in opts and len(opts) <= planner.MAX_MICRO_BATCHES + 10
    assert all(720720 % d == 0 for d in opts)


def test_recipe_layout_that_does_not_divide_is_pruned_with_the_reason():
    """A recipe micro-batch of 5 against 12 samples is tried and pruned with the divisibility arithmetic; --explain's
    text lists it."""
    pruned: list[planner.Pruned] = []
    cands = planner.search(CHAR, cpu_spec(**FLAT), recompute_modes=("none",), recipe_micro_batch=5, pruned=pruned,
                           **KW)
    assert 5 not in {c.micro_batch for c in cands}
    [p] = [p for p in pruned if p.micro_batch == 5]
    assert "not divisible" in p.reason and "5*64*1 = 320" in p.reason
    text = planner.explain_pruned(pruned, [])
    assert "micro-batch 5" in text and "1 layout/micro-batch choice(s) invalid" in text


def test_memory_pruned_candidates_are_explained():
    """With a memory limit below every candidate, explain_pruned names each one's peak against the limit."""
    cands = planner.search(CHAR, cpu_spec(**FLAT), memory_fraction=1e-6, recompute_modes=("none",), **KW)
    assert cands and not any(c.fits for c in cands)
    text = planner.explain_pruned([], cands)
    assert "over the memory limit" in text and "GiB > limit" in text


def test_recurrent_models_follow_the_trainers_rules():
    """The trainer refuses activation checkpointing and sharding for LSTM/GRU: the planner prunes them, saying so."""
    pruned: list[planner.Pruned] = []
    cands = planner.search(LSTM, cpu_spec(**FLAT), pruned=pruned, **KW)
    assert cands and {c.recompute for c in cands} == {"none"}
    assert any("Transformer blocks" in p.reason for p in pruned)


def test_recipe_line_ranks_the_recipe():
    """recipe_line names the recipe's rank and its predicted step against the best one."""
    cands = planner.plan(CHAR, cpu_spec(**FLAT), recompute_modes=("none",), **KW)
    line = planner.recipe_line(cands, 12)
    assert "micro-batch 12 x 1" in line and "rank" in line and "ms/step" in line


def test_fixed_step_costs_from_the_probe():
    """With the probe's fixed costs the optimizer's per-tensor bookkeeping is its own figure (not 3 x the per-op
    cost) and the step adds the loop's fixed cost and the loader per micro-batch:
    step_fixed = tensors * 5 us + 80 us + m * 12 us."""
    spec = cpu_spec(**FLAT, optimizer_us_per_tensor=5.0, step_fixed_us=80.0, data_us_per_batch=12.0)
    c = planner.plan(CHAR, spec, recompute_modes=("none",), micro_batches=(4,), **KW)[0]
    tensors = steptime.param_tensors(CHAR)
    assert c.time_parts["step_fixed"] == pytest.approx((tensors * 5 + 80 + 3 * 12) * 1e-6)
    work = planner.flops_mod.step_work(CHAR, 4, 64)
    assert c.time_parts["op_overhead"] == pytest.approx(3 * work.autograd_ops * 2e-6)
    assert "loader" in c.formulas["step_fixed"]


def test_disturbed_probe_round_trips_and_is_announced(tmp_path, capsys):
    """A spec whose [probe] says disturbed: the library notes it among the assumptions; `clusterlm plan` refuses
    it without --force (naming the figures) and warns with it."""
    import dataclasses

    q = ProbeQuality(disturbed=True, foreign_cpus=0.98, max_foreign_cpus=0.25, wall_s=12.0, busy_cpu_s=30.0,
                     own_cpu_s=18.2, spread=0.2, max_spread=0.5, load_avg_1m=2.1,
                     reasons=("other processes used 0.98 CPUs (> 0.25)",))
    spec = dataclasses.replace(cpu_spec(**FLAT), probe=q)
    import tomllib

    assert spec_from_dict(tomllib.loads(spec_to_toml(spec))).probe == q
    c = planner.plan(CHAR, spec, recompute_modes=("none",), **KW)[0]
    assert any("probe DISTURBED" in a and "0.98 CPUs" in a for a in c.assumptions)
    path = tmp_path / "node.toml"
    path.write_text(spec_to_toml(spec))
    argv = ["--model", "gpt-mini", "--vocab-size", "65", "--cluster", str(path), "--seq-len", "64",
            "--global-batch-tokens", "768", "--dtype", "fp32", "--explain"]
    with pytest.raises(ConfigError, match=r"disturbed \(other processes used 0.98 CPUs.*--force"):
        planner.main(argv)
    assert planner.main(argv + ["--force", "--micro-batch", "12"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: planning from a disturbed probe" in out and "recipe's layout (micro-batch 12 x 1" in out
    assert "pruned:" in out


def test_rnn_per_op_model_from_the_probes_layer_sweep():
    """An LSTM with the probe's per-time-step layer cost (here 10 us at every B, D): rnn_layers = m * layers * T *
    10 us, plus the output projection's GEMMs at 1 TFLOP/s, the loss and fixed costs; without an rnn_sweep the
    FLOP-rate model is used and a note says why."""
    rows = tuple((float(b), float(d), 10.0) for b in (4, 16) for d in (64, 128))
    spec = cpu_spec(**FLAT, rnn_sweep={"lstm": rows}, optimizer_us_per_tensor=5.0, step_fixed_us=80.0,
                    data_us_per_batch=12.0)
    c = planner.plan(LSTM, spec, recompute_modes=("none",), micro_batches=(6,), **KW)[0]
    assert c.time_parts["rnn_layers"] == pytest.approx(2 * 2 * 64 * 10e-6)
    n, V, D = 6 * 64, LSTM.padded_vocab_size, 64
    assert c.time_parts["gemm"] == pytest.approx(2 * 3 * 2 * n * V * D / 1e12)
    assert steptime.param_tensors(LSTM) == 1 + 2 * 4  # embedding (tied output), 2 x (w_ih, w_hh, b_ih, b_hh)
    assert c.time_parts["step_fixed"] == pytest.approx((9 * 5 + 80 + 2 * 12) * 1e-6)
    plain = planner.plan(LSTM, cpu_spec(**FLAT, measured_tflops={"fp32": 0.1}), recompute_modes=("none",),
                         micro_batches=(6,), **KW)[0]
    assert "compute" in plain.time_parts and any("rnn_sweep.lstm" in a for a in plain.assumptions)


def test_rnn_layer_cost_has_a_per_call_part_from_two_lengths():
    """Issue 20: a probe row [B, D, us per call, us per time step] prices a layer of T steps at call + T * step
    (oneDNN's weight reorders do not grow with T); a 3-column row from an older probe has no per-call part;
    rows of mixed width or a non-positive step are refused naming the expected shape."""
    rows = tuple((float(b), float(d), 500.0, 10.0) for b in (4, 16) for d in (64, 128))
    spec = cpu_spec(**FLAT, rnn_sweep={"lstm": rows}, optimizer_us_per_tensor=5.0, step_fixed_us=80.0,
                    data_us_per_batch=12.0)
    c = planner.plan(LSTM, spec, recompute_modes=("none",), micro_batches=(6,), **KW)[0]
    assert c.time_parts["rnn_layers"] == pytest.approx(2 * 2 * (500 + 64 * 10) * 1e-6)
    assert "500 us per call" in c.formulas["rnn_layers"]
    with pytest.raises(ConfigError, match=r"rnn_sweep.lstm rows are \[B, D, us per call, us per time step\]"):
        cpu_spec(**FLAT, rnn_sweep={"lstm": rows[:2] + ((4.0, 64.0, 10.0),)})
    with pytest.raises(ConfigError, match=r"rnn_sweep.gru rows"):
        cpu_spec(**FLAT, rnn_sweep={"gru": ((4.0, 64.0, 5.0, 0.0),)})


def test_no_layout_the_trainer_refuses():
    """GPT-2 ties its embedding and output: the trainer and `launch` refuse pp > 1 for it
    (dims.validate_layout), so the planner offers no pipeline layout and --explain says why (before, a
    pp=2 layout ranked 29th for gpt2-124m on a100-80gb-8x-hdr and `--out` could write a recipe that
    `clusterlm train` refuses)."""
    from clusterlm.cluster.spec import load_spec
    from clusterlm.models.config import get_preset

    model = get_preset("gpt2-124m")
    assert model.tie_embeddings
    pruned: list[planner.Pruned] = []
    cands = planner.search(model, load_spec("a100-80gb-8x-hdr"), seq_len=1024, global_batch_tokens=2**19,
                           recompute_modes=("none",), pruned=pruned)
    assert cands and all(c.dims.pp == 1 for c in cands)
    assert any("tie_embeddings" in p.reason and "pp=2" in p.layout for p in pruned)
