"""The planner: which parallel layout, micro-batch and recompute mode fit, and how fast each runs.

    clusterlm plan --model llama-8b --cluster h100-sxm-8x --tokens 10B --seq-len 8192 --explain
    clusterlm plan --model gpt-mini --vocab-size 65 --cluster node.toml --steps 2000 --out recipe.toml

Torch-free: runs on a login node. For every layout dp_replicate x dp_shard x tp x pp that
multiplies to the device count (tp inside a node), every micro-batch and every activation
recompute mode (none/selective/full), it estimates per-device memory (clusterlm.cluster.memory)
and keeps what fits; then it predicts the step time

    step = compute + pipeline bubble + exposed communication + optimizer step
    compute = (model + recompute FLOPs per step) / (devices * rate)
    rate    = peak * measured training efficiency           (spec: device.train_efficiency)
            | measured matmul TFLOP/s * DEFAULT_TRAIN_FRACTION_OF_MATMUL    (assumption, printed)
            | peak * DEFAULT_TRAIN_FRACTION_OF_PEAK                           (assumption, printed)
    bubble  = compute * (pp-1)/m  (1F1B; a fraction (pp-1)/(m+pp-1) of the pipelined time)
    comm    = ring collectives: all-reduce 2(n-1)/n * S / busbw, all-gather and reduce-scatter
              (n-1)/n * S / busbw, plus latency per ring step; DP/FSDP traffic overlaps the
              backward (and FSDP's forward all-gather the forward), TP and PP traffic does not.

and ranks candidates by predicted tokens/s. Every default that stands in for a measurement is
printed as an ASSUMPTION; nothing is silently taken from another device. Arithmetic: docs/planner.md.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterlm.cluster import flops as flops_mod
from clusterlm.cluster import hardware
from clusterlm.cluster.memory import (GIB, RECOMPUTE_MODES, MemoryEstimate, estimate_memory, layer_activation_bytes,
                                      logits_bytes, param_groups, stage_params, trainer_sequence_parallel)
from clusterlm.cluster.spec import ClusterSpec, DeviceSpec, LinkSpec, NodeType, load_spec
from clusterlm.errors import ConfigError
from clusterlm.models.config import ModelConfig, preset_values
from clusterlm.parallel.dims import ParallelDims

# Stand-ins for measurements, always printed when used.
DEFAULT_TRAIN_FRACTION_OF_PEAK = 0.40
"""MFU of a tuned dense-Transformer run: PaLM 46.2% (Chowdhery et al. 2022, table 3), Megatron-LM
52% on A100 for 530B (Narayanan et al. 2021); 0.40 leaves room for a less tuned stack."""
DEFAULT_TRAIN_FRACTION_OF_MATMUL = 0.60
"""training step FLOP/s over a large dense matmul's: attention, norms, elementwise ops and the
loss run below matmul speed (about 0.45 MFU / 0.75 matmul efficiency on recent GPUs)."""
DEFAULT_MEMORY_FRACTION = 0.90
"""of device memory the planner fills: CUDA context, NCCL buffers, allocator fragmentation."""
DEFAULT_GLOBAL_BATCH_TOKENS = 2**19  # 0.5M tokens: GPT-3 125M's batch (Brown et al. 2020, table 2.1)
GRAD_REDUCE_BYTES = 4  # gradients are reduced in fp32 (DDP under autocast; FSDP2 reduce_dtype=fp32)
ACTIVATION_PASSES = 3  # CPU: activation bytes written (fwd), read and gradient written (bwd)
ADAMW_BYTES_PER_PARAM = 28  # optimizer step traffic: read p, g, m, v (16) + write p, m, v (12), fp32
MICRO_BATCHES = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class ComputeRate:
    tflops: float | None
    """FLOP/s / 1e12 one device sustains in training; None = unknown"""
    how: str
    assumed: bool


@dataclass(frozen=True)
class Candidate:
    dims: ParallelDims
    micro_batch: int
    grad_accum_steps: int
    recompute: str
    memory: MemoryEstimate
    memory_limit_bytes: float
    step_time_s: float | None
    """None when the device's compute rate is unknown"""
    time_parts: dict[str, float] = field(default_factory=dict)
    """seconds per step: compute, bubble, dp_comm, tp_comm, pp_comm, optimizer"""
    formulas: dict[str, str] = field(default_factory=dict)
    tokens_per_s: float | None = None
    mfu: float | None = None
    steps: int | None = None
    total_time_s: float | None = None
    device_hours: float | None = None
    assumptions: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return self.memory.peak_bytes <= self.memory_limit_bytes


# ---- rates and links ---------------------------------------------------------------------------------
def compute_rate(device: DeviceSpec, dtype: str) -> ComputeRate:
    """The FLOP/s a training step sustains on `device`, and where the figure comes from."""
    peak, peak_src = device.peak(dtype)
    matmul = device.matmul_tflops(dtype)
    if dtype in device.train_efficiency:
        eff = device.train_efficiency[dtype]
        if peak:
            return ComputeRate(peak * eff, f"peak {peak:g} TFLOP/s ({peak_src}) x measured training efficiency "
                                           f"{eff:.3f} (spec)", False)
        if matmul:
            return ComputeRate(matmul * eff, f"measured matmul {matmul:.4g} TFLOP/s x measured training "
                                             f"efficiency {eff:.3f} (spec)", False)
    if matmul:
        f = DEFAULT_TRAIN_FRACTION_OF_MATMUL
        return ComputeRate(matmul * f, f"measured matmul {matmul:.4g} TFLOP/s x {f} (ASSUMPTION: default fraction "
                                       f"of matmul speed a training step reaches; set device.train_efficiency "
                                       f"from a measured run to replace it)", True)
    if peak:
        f = DEFAULT_TRAIN_FRACTION_OF_PEAK
        return ComputeRate(peak * f, f"peak {peak:g} TFLOP/s ({peak_src}) x {f} (ASSUMPTION: default training "
                                     f"efficiency, no measured figure in the spec; run clusterlm probe or set "
                                     f"device.train_efficiency)", True)
    return ComputeRate(None, f"unknown: {device.name} has no peak or measured {dtype} TFLOP/s "
                             f"(run `clusterlm probe --out node.toml` and plan with that file)", True)


@dataclass(frozen=True)
class _Net:
    """Bus bandwidths (GB/s) and latencies (s) a collective sees, inside a node and across nodes."""
    intra_busbw: float
    intra_lat: float
    inter_node_busbw: float  # whole-node network, shared by its devices
    inter_lat: float
    devices_per_node: int
    notes: tuple[str, ...]


def _busbw(link: LinkSpec, table_key: str | None) -> tuple[float, str | None]:
    if link.measured_busbw_gbs:
        return link.measured_busbw_gbs, None
    frac = link.achievable_fraction
    note = None
    if frac is None:
        frac = hardware.LINKS[table_key].achievable_fraction if table_key in hardware.LINKS else 0.7
        note = f"ASSUMPTION: {link.name} reaches {frac:.0%} of {link.bandwidth_gbs:g} GB/s (no measured bus bandwidth)"
    return link.bandwidth_gbs * frac, note


def _network(spec: ClusterSpec, node: NodeType, nodes: int) -> _Net:
    notes = []
    g = node.devices_per_node
    if node.intra_link:
        intra, note = _busbw(node.intra_link, None)
        lat = node.intra_link.latency_us * 1e-6
    else:
        fallback = hardware.LINKS["shared-memory" if node.device and node.device.kind == "cpu" else "pcie4-x16"]
        intra, lat = fallback.bandwidth_gbs * fallback.achievable_fraction, fallback.latency_us * 1e-6
        note = (f"ASSUMPTION: no intra-node link in the spec; using {fallback.name} "
                f"({intra:g} GB/s bus bandwidth)") if g > 1 else None
    if note:
        notes.append(note)
    inter, inter_lat = float("inf"), 0.0
    if nodes > 1:
        link = spec.inter_node_link
        if link is None:
            fallback = hardware.LINKS["eth-10g"]
            link = LinkSpec(fallback.name, fallback.bandwidth_gbs, fallback.latency_us, 1, fallback.achievable_fraction)
            notes.append(f"ASSUMPTION: no inter-node link in the spec; using {fallback.name}")
        per, note = _busbw(link, None)
        if note:
            notes.append(note)
        inter, inter_lat = per * link.count, link.latency_us * 1e-6
    return _Net(intra, lat, inter, inter_lat, g, tuple(notes))


def _group_bw(net: _Net, size: int, stride: int) -> tuple[float, float, str]:
    """Bus bandwidth (GB/s), latency (s) and link name for a ring of `size` ranks `stride` apart."""
    g = net.devices_per_node
    if size * stride <= g:
        return net.intra_busbw, net.intra_lat, "intra-node"
    # The group spans nodes: its ranks on one node share the node's network with the other groups
    # of the same dimension running at the same time (g / ranks_per_node of them).
    ranks_per_node = max(1, min(size, g // stride)) if stride < g else 1
    inter = net.inter_node_busbw * ranks_per_node / g
    return min(net.intra_busbw, inter), max(net.intra_lat, net.inter_lat), "inter-node"


def _ring(kind: str, nbytes: float, n: int, bw_gbs: float, lat: float) -> float:
    """Seconds for a ring collective over n ranks of a `nbytes` buffer (the full, unsharded size)."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    steps = 2 * (n - 1) if kind == "all_reduce" else n - 1
    return steps / n * nbytes / (bw_gbs * 1e9) + steps * lat


# ---- the per-op step model (the probe's GEMM, attention and kernel sweeps, bandwidth, op overhead) -------
OP_MODEL_FIELDS = ("matmul_sweep", "attention_sweep", "kernel_sweep", "elementwise_sweep", "op_overhead_us")
OP_KERNELS = ("layernorm", "rmsnorm", "gelu_tanh", "silu", "cross_entropy", "adamw")
OPTIMIZER_OPS_PER_TENSOR = 3  # clip_grad_norm_: norm + scale; fused AdamW: one update per tensor


def _log_bracket(axis: tuple[float, ...], x: float, scale_below: bool) -> tuple[int, int, float, float]:
    """(i0, i1, weight of i1, scale) to interpolate at x on a sorted axis in log space. Outside the
    axis the end value holds, except below the smallest GEMM size (scale_below), where the rate
    scales with the size (a GEMM that small costs what the smallest one did: fixed per-call and
    per-output work), so scale = x / axis[0]."""
    if x <= axis[0]:
        return 0, 0, 0.0, (x / axis[0] if scale_below else 1.0)
    if x >= axis[-1]:
        return len(axis) - 1, len(axis) - 1, 0.0, 1.0
    i = next(j for j in range(1, len(axis)) if axis[j] >= x)
    w = (math.log(x) - math.log(axis[i - 1])) / (math.log(axis[i]) - math.log(axis[i - 1]))
    return i - 1, i, w, 1.0


def _grid_axes(rows: tuple[tuple[float, ...], ...], dims: int, what: str) -> tuple[tuple[float, ...], ...]:
    """The sorted axes of a full grid (rows: coordinates..., value); ConfigError naming a missing point."""
    axes = tuple(tuple(sorted({r[i] for r in rows})) for i in range(dims))
    have = {tuple(r[:dims]) for r in rows}
    points = [()]
    for a in axes:
        points = [p + (x,) for p in points for x in a]
    missing = [p for p in points if p not in have]
    if missing:
        raise ConfigError(f"{what} is not a full grid of its values {[list(map(int, a)) for a in axes]}: "
                          f"missing {missing[:4]}" + (" ..." if len(missing) > 4 else ""))
    return axes


def _grid_interp(rows: tuple[tuple[float, ...], ...], point: tuple[float, ...], scale_below: bool) -> float:
    """Multilinear interpolation of log(value) in log(coordinates) over a full grid."""
    dims = len(point)
    axes = tuple(tuple(sorted({r[i] for r in rows})) for i in range(dims))
    table = {tuple(r[:dims]): r[dims] for r in rows}
    br = [_log_bracket(a, x, scale_below) for a, x in zip(axes, point)]
    corners = [((), 1.0)]
    for d, (i0, i1, w, _) in enumerate(br):
        corners = [(c + (axes[d][i],), cw * wi) for c, cw in corners for i, wi in ((i0, 1 - w), (i1, w)) if wi]
    value = math.exp(sum(cw * math.log(table[c]) for c, cw in corners))
    return value * math.prod(b[3] for b in br)


@dataclass(frozen=True)
class OpRates:
    """A device's probed figures for the per-op step model, with interpolation."""
    dtype: str
    sweep: tuple[tuple[float, ...], ...]
    """GEMM rows (M, N, K, TFLOP/s)"""
    attention: tuple[tuple[float, ...], ...]
    """causal SDPA forward + backward rows (T, Hd, TFLOP/s)"""
    kernels: dict[str, tuple[tuple[float, ...], ...]]
    """kernel -> rows (elements, ns per element), forward + backward"""
    elementwise: tuple[tuple[float, ...], ...]
    """rows (bytes moved, GB/s)"""
    op_overhead_us: float

    def __post_init__(self) -> None:
        _grid_axes(self.sweep, 3, f"device.matmul_sweep.{self.dtype}")
        _grid_axes(self.attention, 2, "device.attention_sweep")

    def gemm_tflops(self, m: float, n: float, k: float) -> float:
        """TFLOP/s of an (m, n, k) GEMM: trilinear in log(size) and log(rate) between measured shapes."""
        return _grid_interp(self.sweep, (m, n, k), scale_below=True)

    def attention_tflops(self, seq_len: float, head_dim: float) -> float:
        return _grid_interp(self.attention, (seq_len, head_dim), scale_below=False)

    def kernel_ns(self, kernel: str, elements: float) -> float:
        """ns per element of a measured kernel at that size (log-interpolated; end values outside)."""
        return _grid_interp(self.kernels[kernel], (elements,), scale_below=False)

    def bandwidth_gbs(self, nbytes: float) -> float:
        """GB/s of an elementwise op moving nbytes: interpolated in log(bytes) over the probe's sweep
        (cache-resident sizes run faster than DRAM), the end values outside it."""
        return _grid_interp(self.elementwise, (nbytes,), scale_below=False)

    def memop_s(self, op: flops_mod.MemOp) -> float:
        if op.kernel is not None:
            return op.count * op.elements * self.kernel_ns(op.kernel, op.elements) * 1e-9
        return op.count * op.bytes / (self.bandwidth_gbs(op.bytes) * 1e9)


def op_rates(device: DeviceSpec, dtype: str) -> tuple[OpRates | None, list[str]]:
    """The device's per-op figures for `dtype`, or None and the spec fields that are missing."""
    missing = []
    sweep = device.matmul_sweep.get(dtype)
    if not sweep:
        missing.append(f"device.matmul_sweep.{dtype}")
    if not device.attention_sweep:
        missing.append("device.attention_sweep")
    lacking = [k for k in OP_KERNELS if not device.kernel_sweep.get(k)]
    if lacking:
        missing.append(f"device.kernel_sweep ({', '.join(lacking)})")
    if not device.elementwise_sweep:
        missing.append("device.elementwise_sweep")
    if device.op_overhead_us is None:
        missing.append("device.op_overhead_us")
    if missing:
        return None, missing
    return OpRates(dtype, sweep, device.attention_sweep, dict(device.kernel_sweep), device.elementwise_sweep,
                   device.op_overhead_us), []


def step_model(model: ModelConfig, device: DeviceSpec, dtype: str) -> tuple[OpRates | None, str | None]:
    """(the per-op figures when the planner uses them, else None; why not, when that is worth saying).
    A measured training efficiency (device.train_efficiency) comes from real steps and wins; the
    per-op model needs all of OP_MODEL_FIELDS from the probe and a Transformer."""
    rates, missing = op_rates(device, dtype)
    if dtype in device.train_efficiency:
        return None, (f"step time from the measured device.train_efficiency.{dtype} (it takes precedence over "
                      f"the per-op model)" if rates else None)
    if model.arch != "transformer":
        return None, (f"per-op step model not used: it covers Transformers, model.arch={model.arch!r}; step time "
                      f"from the FLOP rate" if rates else None)
    if rates is None:
        return None, (f"per-op step model not used: the spec lacks {', '.join(missing)} (measured by "
                      f"`clusterlm probe --out node.toml`); step time from one FLOP rate instead")
    return rates, None


def _param_tensors(model: ModelConfig) -> int:
    """Parameter tensors (what clip_grad_norm and the optimizer loop over)."""
    b = 2 if model.bias else 1
    per_layer = 2 * (b if model.norm == "layernorm" else 1) + (4 + (3 if model.mlp == "swiglu" else 2)) * b
    return (model.n_layers * per_layer + 1 + (model.pos == "learned") + (b if model.norm == "layernorm" else 1)
            + (not model.tie_embeddings))


def _op_model_parts(model: ModelConfig, dims: ParallelDims, mb: int, m: int, recompute: str, seq_len: int,
                    dtype: str, rates: OpRates) -> tuple[dict[str, float], dict[str, str]]:
    """Seconds per step of the per-op model's parts (one rank; the pipeline's last stage, which has the
    loss) and their formulas."""
    layers = math.ceil(model.n_layers / dims.pp)
    work = flops_mod.step_work(model, mb, seq_len, tp=dims.tp, recompute=recompute, dtype=dtype, layers=layers)
    parts: dict[str, float] = {}
    formulas: dict[str, str] = {}
    times = [(g, g.flops / (rates.gemm_tflops(g.m, g.n, g.k) * 1e12)) for g in work.gemms]
    total_f, total_t = sum(g.flops for g, _ in times), sum(t for _, t in times)
    parts["gemm"] = m * total_t
    g_big, t_big = max(times, key=lambda x: x[1])
    lo, hi = min(g.flops / t for g, t in times) / 1e12, max(g.flops / t for g, t in times) / 1e12
    formulas["gemm"] = (f"{m} micro-batches * sum of 2*M*N*K / rate(M,N,K) over {len(times)} GEMMs of the linear "
                        f"layers: {total_f / 1e9:.4g} GFLOP at {total_f / total_t / 1e12:.4g} TFLOP/s overall "
                        f"(interpolated in the probe's {dtype} GEMM sweep: {lo:.3g}-{hi:.3g}); slowest: {g_big.name} "
                        f"({g_big.m}x{g_big.n}x{g_big.k}, x{g_big.count:g}) {t_big * 1e3:.3g} ms")
    a = work.attention
    rate = rates.attention_tflops(a.seq_len, a.head_dim)
    parts["attention"] = m * a.flops / (rate * 1e12)
    formulas["attention"] = (f"{m} micro-batches * {a.layers} layers * {a.heads:g} heads * {a.passes} GEMMs of "
                             f"2*T*T*Hd (T={a.seq_len}, Hd={a.head_dim}) * causal (T+1)/2T = {a.flops / 1e9:.4g} GFLOP "
                             f"at {rate:.4g} TFLOP/s (the probe's causal SDPA fwd+bwd sweep)")
    for key in ("memory_ops", "loss"):
        ops = [o for o in work.memops if o.part == key]
        if not ops:
            continue
        parts[key] = m * sum(rates.memop_s(o) for o in ops)
        kern = [f"{o.name} {o.count * o.elements / 1e6:.4g} M elem x {rates.kernel_ns(o.kernel, o.elements):.3g} ns"
                for o in ops if o.kernel]
        plain = [o for o in ops if not o.kernel]
        nbytes = sum(o.bytes * o.count for o in plain)
        t_bw = sum(rates.memop_s(o) for o in plain)
        text = "; ".join(kern)
        if plain:
            text += (f"{'; ' if kern else ''}{len(plain)} memory ops ({', '.join(o.name for o in plain)}) "
                     f"{nbytes / 1e6:.4g} MB at {nbytes / t_bw / 1e9:.4g} GB/s (elementwise sweep at each size)")
        formulas[key] = f"{m} micro-batches * ({text}) [kernels: the probe's fwd+bwd ns per element at that size]"
    n_ops = work.autograd_ops
    tensors = _param_tensors(model)
    # clip_grad_norm_ runs a norm and a scale per parameter tensor, the fused AdamW one update each
    parts["op_overhead"] = (m * n_ops + OPTIMIZER_OPS_PER_TENSOR * tensors) * rates.op_overhead_us * 1e-6
    formulas["op_overhead"] = (f"({m} micro-batches * {n_ops} autograd ops + {OPTIMIZER_OPS_PER_TENSOR} x {tensors} "
                               f"parameter tensors in clip/optimizer) * {rates.op_overhead_us:g} us (the probe's "
                               f"fixed cost per op, fwd + bwd)")
    return parts, formulas


def _op_model_optimizer(model: ModelConfig, per_dev: float, dims: ParallelDims, rates: OpRates
                        ) -> tuple[float, str]:
    ops = flops_mod.optimizer_work(per_dev / dims.dp_shard, _param_tensors(model))
    t = sum(rates.memop_s(o) for o in ops)
    desc = " + ".join(f"{o.name} {o.elements / 1e6:.4g} M params x {rates.kernel_ns(o.kernel, o.elements):.3g} ns "
                      f"(the probe's fused AdamW step)" if o.kernel else
                      f"{o.name} {o.bytes / 1e6:.4g} MB at {rates.bandwidth_gbs(o.bytes):.4g} GB/s" for o in ops)
    return t, desc


# ---- one candidate ------------------------------------------------------------------------------------
def _step_time(model: ModelConfig, dims: ParallelDims, mb: int, accum: int, recompute: str, seq_len: int,
               gbt: int, dtype: str, rate: ComputeRate, net: _Net, device: DeviceSpec,
               ops: OpRates | None = None) -> tuple[dict, dict]:
    parts: dict[str, float] = {}
    formulas: dict[str, str] = {}
    world = dims.world_size
    m = accum
    if ops is not None:  # per-op model: GEMMs by shape, memory-bound ops, loss, fixed op costs
        op_parts, op_formulas = _op_model_parts(model, dims, mb, m, recompute, seq_len, dtype, ops)
        parts.update(op_parts)
        formulas.update(op_formulas)
        compute = sum(op_parts.values())
    else:
        fpt = flops_mod.training_flops_per_token(model, seq_len)
        extra = flops_mod.recompute_flops(model, seq_len, recompute)
        flops_step = (fpt.total + extra) * gbt
        compute = flops_step / world / (rate.tflops * 1e12)
        parts["compute"] = compute
        formulas["compute"] = (f"({fpt.total:.4g} model + {extra:.4g} recompute FLOPs/token) * {gbt} tokens / "
                               f"({world} devices * {rate.tflops:.4g} TFLOP/s)")
    t_fwd, t_bwd = compute / m / 3, compute / m * 2 / 3  # per micro-batch (backward = 2x forward)
    if dims.pp > 1:
        parts["bubble"] = compute * (dims.pp - 1) / m
        formulas["bubble"] = (f"compute * (pp-1)/m = compute * {dims.pp - 1}/{m}: a fraction "
                              f"(pp-1)/(m+pp-1) = {(dims.pp - 1) / (m + dims.pp - 1):.3f} of the pipelined time")
    e = 2 if dtype in ("bf16", "fp16") else 4
    per_dev = stage_params(model, dims.pp, "first")[0] / dims.tp  # parameters one rank holds unsharded
    grad_bytes = per_dev * GRAD_REDUCE_BYTES
    # strides in the mesh (pp, dp_replicate, dp_shard, tp): tp innermost
    tp_bw = _group_bw(net, dims.tp, 1)
    sh_bw = _group_bw(net, dims.dp_shard, dims.tp)
    rep_bw = _group_bw(net, dims.dp_replicate, dims.tp * dims.dp_shard)
    pp_bw = _group_bw(net, dims.pp, dims.tp * dims.dp_shard * dims.dp_replicate)
    dp_comm = 0.0
    dp_f = []
    if dims.dp_shard > 1:
        ag = _ring("all_gather", per_dev * e, dims.dp_shard, sh_bw[0], sh_bw[1])
        rs = _ring("reduce_scatter", grad_bytes, dims.dp_shard, sh_bw[0], sh_bw[1])
        exposed = max(0.0, ag - t_fwd) + max(0.0, ag + rs - t_bwd)
        dp_comm += m * exposed
        dp_f.append(f"FSDP per micro-batch: all-gather {per_dev * e / 1e9:.3g} GB fwd+bwd ({ag * 1e3:.3g} ms each) + "
                    f"reduce-scatter {grad_bytes / 1e9:.3g} GB ({rs * 1e3:.3g} ms) over {dims.dp_shard} ranks "
                    f"({sh_bw[2]}, {sh_bw[0]:.4g} GB/s), exposed beyond fwd {t_fwd * 1e3:.3g} ms / "
                    f"bwd {t_bwd * 1e3:.3g} ms, x {m}")
    if dims.dp_replicate > 1:
        size = grad_bytes / dims.dp_shard
        ar = _ring("all_reduce", size, dims.dp_replicate, rep_bw[0], rep_bw[1])
        dp_comm += max(0.0, ar - t_bwd)
        dp_f.append(f"all-reduce {size / 1e9:.3g} GB of gradients over {dims.dp_replicate} replicas "
                    f"({rep_bw[2]}, {rep_bw[0]:.4g} GB/s) = {ar * 1e3:.3g} ms, overlapping the last backward "
                    f"({t_bwd * 1e3:.3g} ms)")
    if dp_f:
        parts["dp_comm"] = dp_comm
        formulas["dp_comm"] = "; ".join(dp_f)
    if dims.tp > 1:
        layers = math.ceil(model.n_layers / dims.pp)
        act = mb * seq_len * model.dim * e
        n_coll = 4 + (2 if recompute == "full" else 0)  # fwd 2 + bwd 2 (+2 replayed forward)
        one = _ring("all_reduce", act, dims.tp, tp_bw[0], tp_bw[1])
        parts["tp_comm"] = m * layers * n_coll * one
        formulas["tp_comm"] = (f"{m} micro-batches * {layers} layers * {n_coll} all-reduce-sized collectives of "
                               f"b*s*h*e = {act / 1e6:.3g} MB over tp={dims.tp} ({tp_bw[2]}, {tp_bw[0]:.4g} GB/s) "
                               f"= {one * 1e6:.3g} us each, not overlapped")
    if dims.pp > 1:
        act = mb * seq_len * model.dim * e / dims.tp
        one = act / (pp_bw[0] * 1e9) + pp_bw[1]
        parts["pp_comm"] = 2 * (m + dims.pp - 1) * one
        formulas["pp_comm"] = (f"2 * (m + pp - 1) = {2 * (m + dims.pp - 1)} sends of b*s*h*e/t = {act / 1e6:.3g} MB "
                               f"({pp_bw[2]}, {pp_bw[0]:.4g} GB/s) on the critical path")
    bw = device.measured_memory_bandwidth_gbs or device.memory_bandwidth_gbs
    if ops is None and bw and device.kind == "cpu" and recompute == "none":
        # On CPU the non-matmul work (norms, GELU, softmax/cross-entropy, residual adds and their
        # gradients) is memory-bound and not hidden under the matmuls: each saved activation and
        # logits byte is written in forward, read in backward and its gradient written: 3 passes.
        # Without it the planner under-predicted a 1.3M-parameter model's step by 27-34% on the
        # project's 2-core CPU (benchmarks/planner_accuracy.py). GPUs fold this into the measured
        # training efficiency instead.
        layers = math.ceil(model.n_layers / dims.pp)
        sp = trainer_sequence_parallel(dims)
        act = layers * layer_activation_bytes(model, seq_len, mb, dtype=dtype, recompute="none", tp=dims.tp,
                                              sequence_parallel=sp)[0]
        act += logits_bytes(model, seq_len, mb, dtype, dims.tp, loss_parallel=sp)
        parts["activation_traffic"] = m * ACTIVATION_PASSES * act / (bw * 1e9)
        formulas["activation_traffic"] = (f"CPU: {m} micro-batches * {ACTIVATION_PASSES} passes * {act / 1e6:.4g} MB "
                                          f"saved activations + logits buffers / {bw:g} GB/s")
    if ops is not None:
        parts["optimizer"], formulas["optimizer"] = _op_model_optimizer(model, per_dev, dims, ops)
    elif bw:
        sharded = per_dev / dims.dp_shard
        parts["optimizer"] = sharded * ADAMW_BYTES_PER_PARAM / (bw * 1e9)
        formulas["optimizer"] = (f"AdamW step, memory-bound: {sharded:,.0f} params * {ADAMW_BYTES_PER_PARAM} B / "
                                 f"{bw:g} GB/s")
    return parts, formulas


def _dims_options(world: int, per_node: int, model: ModelConfig) -> list[ParallelDims]:
    out = []
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    for tp in divisors:
        if tp > per_node or per_node % tp:
            continue  # tensor parallel stays inside a node
        if tp > 1 and (model.arch != "transformer" or model.n_heads % tp or model.kv_heads % tp):
            continue
        for pp in divisors:
            if (world // tp) % pp or pp > model.n_layers:
                continue
            dp = world // (tp * pp)
            for rep in [d for d in range(1, dp + 1) if dp % d == 0]:
                out.append(ParallelDims(dp_replicate=rep, dp_shard=dp // rep, tp=tp, pp=pp))
    return out


def search(model: ModelConfig, spec: ClusterSpec, *, seq_len: int, global_batch_tokens: int,
           tokens: int | None = None, steps: int | None = None, dtype: str = "bf16", node_type: str | None = None,
           nodes: int | None = None, memory_fraction: float = DEFAULT_MEMORY_FRACTION, attention: str = "flash",
           micro_batches: tuple[int, ...] = MICRO_BATCHES,
           recompute_modes: tuple[str, ...] = RECOMPUTE_MODES) -> list[Candidate]:
    """Every valid candidate, fitting or not, unsorted. See `plan`."""
    if tokens is not None and steps is not None:
        raise ConfigError("give tokens or steps, not both")
    if dtype not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"dtype={dtype!r}; expected bf16, fp16 or fp32")
    if not 0 < memory_fraction <= 1:
        raise ConfigError(f"memory_fraction={memory_fraction} must be in (0, 1]")
    if global_batch_tokens < seq_len or global_batch_tokens % seq_len:
        raise ConfigError(f"global_batch_tokens={global_batch_tokens} must be a positive multiple of "
                          f"seq_len={seq_len} (samples per step = global_batch_tokens / seq_len)")
    node = spec.node_type(node_type)
    if node.device is None:
        raise ConfigError(f"node type {node.name!r} of {spec.name!r} lists no device to train on")
    n_nodes = node.count if nodes is None else nodes
    if n_nodes < 1:
        raise ConfigError(f"nodes={n_nodes} must be >= 1")
    device = node.device
    world = n_nodes * device.count
    rate = compute_rate(device, dtype)  # fp32 means fp32 matmuls (PyTorch leaves TF32 off by default)
    net = _network(spec, node, n_nodes)
    limit = device.memory_gib * GIB * memory_fraction
    peak, _ = device.peak(dtype)
    if peak is None and device.matmul_tflops(dtype):
        # no cited peak (a CPU): MFU against the probe's measured matmul rate, as `clusterlm train
        # --train.probe_spec` reports it, so the two columns compare
        peak = device.matmul_tflops(dtype)
        mfu_note = f"MFU against the measured {dtype} matmul rate {peak:g} TFLOP/s (no cited peak for {device.name})"
    elif peak is None:
        mfu_note = f"MFU unknown: no cited {dtype} peak and no measured matmul rate for {device.name}"
    else:
        mfu_note = ""
    fpt = flops_mod.training_flops_per_token(model, seq_len)
    ops, why_not = step_model(model, device, dtype)
    assumptions = [rate.how] if rate.assumed and ops is None else []
    if why_not:
        assumptions.append(why_not)
    for key, note in spec.notes.items():  # the probe's figures were measured while the node was busy
        if key == "load" or key.endswith(": load"):
            assumptions.append(f"probe {key}: {note}; re-probe an idle node for step times (the per-op figures "
                               f"are medians and grow with other work)")
    assumptions.append(f"memory limit {memory_fraction:.2f} x {device.memory_gib:g} GiB"
                       + (" (ASSUMPTION: default reserve for runtime buffers and fragmentation)"
                          if memory_fraction == DEFAULT_MEMORY_FRACTION else ""))
    assumptions += list(net.notes)
    if mfu_note:
        assumptions.append(mfu_note)
    if steps is None and tokens is not None:
        steps = math.ceil(tokens / global_batch_tokens)
    out = []
    for dims in _dims_options(world, device.count, model):
        for mb in micro_batches:
            try:
                dims.validate(world, model, global_batch_tokens, mb, seq_len)
            except ConfigError:
                continue
            accum = dims.grad_accum_steps(global_batch_tokens, mb, seq_len)
            for rc in recompute_modes:
                mem = estimate_memory(model, dims, micro_batch=mb, seq_len=seq_len, dtype=dtype, recompute=rc,
                                      attention=attention, grad_accum_steps=accum)
                step = tps = mfu = total = dev_h = None
                parts: dict[str, float] = {}
                formulas: dict[str, str] = {}
                if rate.tflops or ops is not None:
                    parts, formulas = _step_time(model, dims, mb, accum, rc, seq_len, global_batch_tokens, dtype,
                                                 rate, net, device, ops)
                    step = sum(parts.values())
                    tps = global_batch_tokens / step
                    if peak:
                        mfu = fpt.total * tps / (world * peak * 1e12)
                    if steps is not None:
                        total = steps * step
                        dev_h = total * world / 3600
                out.append(Candidate(dims, mb, accum, rc, mem, limit, step, parts, formulas, tps, mfu, steps,
                                     total, dev_h, tuple(assumptions)))
    return out


def plan(model: ModelConfig, spec: ClusterSpec, *, seq_len: int, global_batch_tokens: int,
         tokens: int | None = None, steps: int | None = None, dtype: str = "bf16", **kwargs: Any) -> list[Candidate]:
    """Candidates that fit in memory, fastest first (by predicted tokens/s). Ties, and every
    candidate when the device's speed is unknown, go to less recomputation, then a larger
    micro-batch (the model does not credit larger matmuls with higher efficiency; real kernels
    do), then less memory, then fewer model-parallel ranks.
    kwargs: node_type, nodes, memory_fraction, attention ('flash'|'eager'), micro_batches, recompute_modes."""
    cands = [c for c in search(model, spec, seq_len=seq_len, global_batch_tokens=global_batch_tokens, tokens=tokens,
                               steps=steps, dtype=dtype, **kwargs) if c.fits]
    order = {m: i for i, m in enumerate(RECOMPUTE_MODES)}
    return sorted(cands, key=lambda c: (-(c.tokens_per_s or 0.0), order[c.recompute], -c.micro_batch,
                                        c.memory.peak_bytes, c.dims.model_parallel))


# ---- recipe -------------------------------------------------------------------------------------------
def recipe_tree(model_tree: dict[str, Any], cand: Candidate, *, seq_len: int, global_batch_tokens: int,
                dtype: str, device_kind: str, cluster: str) -> dict[str, Any]:
    """A run file: [model]/[train]/[optim] in clusterlm.config's keys, plus [parallel] and [plan]."""
    from clusterlm.config import OptimConfig, to_dict

    steps = cand.steps or 2000
    optim = to_dict(OptimConfig())
    optim["warmup_steps"] = min(optim["warmup_steps"], max(1, steps // 10))
    plan_section: dict[str, Any] = {"cluster": cluster, "predicted_memory_bytes": int(cand.memory.peak_bytes)}
    if cand.step_time_s is not None:
        plan_section["predicted_step_s"] = round(cand.step_time_s, 6)
        plan_section["predicted_tokens_per_s"] = round(cand.tokens_per_s or 0.0, 1)
    return {
        "model": model_tree,
        "train": {"seq_len": seq_len, "micro_batch_size": cand.micro_batch, "global_batch_tokens": global_batch_tokens,
                  "max_steps": steps, "dtype": dtype, "device": "cpu" if device_kind == "cpu" else "cuda"},
        "optim": optim,
        "parallel": {"dp_replicate": cand.dims.dp_replicate, "dp_shard": cand.dims.dp_shard, "tp": cand.dims.tp,
                     "pp": cand.dims.pp, "activation_checkpointing": cand.recompute},
        "plan": plan_section,
    }


# ---- CLI ------------------------------------------------------------------------------------------------
_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str) -> int:
    """'10B' -> 10_000_000_000, '2.5e9', '300M', '524288'."""
    m = re.fullmatch(r"\s*([0-9.eE+_]+)\s*([kKmMbBgGtT]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count like 524288, 2.5e9, 300M or 10B")
    try:
        value = float(m.group(1).replace("_", "")) * _SUFFIX.get(m.group(2).lower(), 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count like 524288, 2.5e9, 300M or 10B") from None
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number")
    return int(value)


def load_model(arg: str, vocab_size: int | None) -> tuple[ModelConfig, dict[str, Any]]:
    """A preset name or a TOML file (a recipe with [model], or bare model keys) -> (config, [model] tree)."""
    from clusterlm.config import from_dict, load_tree

    path = Path(arg)
    if path.suffix == ".toml" or path.is_file():
        tree = load_tree(path)
        tree = dict(tree.get("model", tree))
    else:
        tree = {"preset": arg}
    if vocab_size is not None:
        tree["vocab_size"] = vocab_size
    values = dict(tree)
    if "preset" in values:
        values = {**preset_values(values.pop("preset")), **values}
    model = from_dict(ModelConfig, values, "model")
    if model.vocab_size is None:
        raise ConfigError(f"model {arg}: vocab_size is unset (it comes from the data at train time); "
                          f"pass --vocab-size N")
    return model, tree


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "?"
    for unit, div in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= div:
            return f"{s / div:.1f}{unit}"
    return f"{s:.3g}s"


def _table(cands: list[Candidate]) -> str:
    head = (f"{'#':>3} {'dp_rep':>6} {'dp_shard':>8} {'tp':>3} {'pp':>3} {'mb':>4} {'accum':>5} {'recompute':>9} "
            f"{'mem GiB':>8} {'step':>8} {'tokens/s':>10} {'MFU':>6} {'total':>7} {'dev-h':>8}")
    rows = [head]
    for i, c in enumerate(cands, 1):
        d = c.dims
        rows.append(f"{i:>3} {d.dp_replicate:>6} {d.dp_shard:>8} {d.tp:>3} {d.pp:>3} {c.micro_batch:>4} "
                    f"{c.grad_accum_steps:>5} {c.recompute:>9} {c.memory.peak_bytes / GIB:>8.2f} "
                    f"{_fmt_time(c.step_time_s):>8} "
                    f"{(f'{c.tokens_per_s:,.0f}' if c.tokens_per_s else '?'):>10} "
                    f"{(f'{c.mfu:.1%}' if c.mfu is not None else '?'):>6} {_fmt_time(c.total_time_s):>7} "
                    f"{(f'{c.device_hours:,.1f}' if c.device_hours is not None else '?'):>8}")
    return "\n".join(rows)


def explain(c: Candidate) -> str:
    lines = [f"best: {c.dims.describe()}, micro-batch {c.micro_batch} x {c.grad_accum_steps} accumulation steps, "
             f"recompute {c.recompute}", "", f"memory per device (limit {c.memory_limit_bytes / GIB:.2f} GiB):",
             c.memory.explain(), ""]
    if c.step_time_s is None:
        lines.append("step time: unknown (no compute rate for this device)")
    else:
        lines.append(f"step time {c.step_time_s:.4g} s:")
        width = max(len(k) for k in c.time_parts)
        for k, v in c.time_parts.items():
            lines.append(f"  {k:<{width}}  {v:10.4g} s  {c.formulas.get(k, '')}")
    return "\n".join(lines)


def _dry_run(c: Candidate) -> str:
    """Build the planned DeviceMesh on a fake process group at the planned world size (needs torch)."""
    from clusterlm.parallel.mesh import dry_run_mesh

    return f"dry run: built {dry_run_mesh(c.dims)} on a fake process group of {c.dims.world_size} ranks"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clusterlm plan", description="Plan a training run on a cluster: memory, "
                                "FLOPs, step time and parallel layout. Torch-free.")
    p.add_argument("--model", required=True, help="model preset name, or a TOML file (recipe with [model], or model keys)")
    p.add_argument("--cluster", required=True, help="cluster spec TOML (from clusterlm probe) or preset name")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=parse_count, help="training tokens (e.g. 10B)")
    budget.add_argument("--steps", type=parse_count, help="optimizer steps")
    p.add_argument("--global-batch-tokens", type=parse_count, default=None,
                   help=f"tokens per optimizer step (default {DEFAULT_GLOBAL_BATCH_TOKENS}, rounded to seq-len)")
    p.add_argument("--seq-len", type=int, default=None, help="context length (default: the model's max_seq_len)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto = bf16 where the device has a bf16 figure, else fp32")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary size when the model preset leaves it unset")
    p.add_argument("--nodes", type=int, default=None, help="plan for this many nodes (default: all in the spec)")
    p.add_argument("--node-type", default=None, help="node type to plan on (default: the one with most devices)")
    p.add_argument("--memory-fraction", type=float, default=DEFAULT_MEMORY_FRACTION,
                   help="fraction of device memory the plan may fill")
    p.add_argument("--attention", choices=["flash", "eager"], default="flash",
                   help="attention kernel: flash stores no T x T matrix (SDPA), eager does")
    p.add_argument("--top", type=int, default=10, help="rows of the table")
    p.add_argument("--out", default=None, help="write the best plan as a recipe TOML")
    p.add_argument("--explain", action="store_true", help="print the arithmetic of the best candidate")
    p.add_argument("--dry-run", action="store_true", help="build the planned device mesh on a fake process group "
                   "(imports torch)")
    args = p.parse_args(argv)

    model, model_tree = load_model(args.model, args.vocab_size)
    spec = load_spec(args.cluster)
    node = spec.node_type(args.node_type)
    device = node.device
    if device is None:
        raise ConfigError(f"node type {node.name!r} lists no device")
    seq_len = args.seq_len or model.max_seq_len
    gbt = args.global_batch_tokens or max(seq_len, DEFAULT_GLOBAL_BATCH_TOKENS // seq_len * seq_len)
    dtype = args.dtype
    if dtype == "auto":
        has_bf16 = device.peak("bf16")[0] or device.matmul_tflops("bf16")
        dtype = "bf16" if has_bf16 and device.kind != "cpu" else "fp32"
    n_nodes = args.nodes or node.count
    fpt = flops_mod.training_flops_per_token(model, seq_len)
    kwargs = dict(seq_len=seq_len, global_batch_tokens=gbt, tokens=args.tokens, steps=args.steps, dtype=dtype,
                  node_type=args.node_type, nodes=args.nodes, memory_fraction=args.memory_fraction,
                  attention=args.attention)
    everything = search(model, spec, **kwargs)
    cands = plan(model, spec, **kwargs)
    g = param_groups(model)
    print(f"model: {args.model} ({g['total'] / 1e9:.3g}B parameters), seq_len {seq_len}, global batch {gbt:,} tokens "
          f"({gbt // seq_len} samples), {dtype}")
    print(f"cluster: {spec.name}: {n_nodes} x {node.name} node(s) x {device.count} {device.name} = "
          f"{n_nodes * device.count} device(s)")
    print(f"FLOPs: {fpt.total:.4g} per token; {fpt.convention}")
    rate = compute_rate(device, dtype)
    ops, _ = step_model(model, device, dtype)
    if ops is not None:
        print(f"step model: per op, from the probe's figures: measured matmul (GEMM) sweep over {len(ops.sweep)} "
              f"{dtype} shapes ({min(r[3] for r in ops.sweep):.3g}-{max(r[3] for r in ops.sweep):.3g} TFLOP/s), "
              f"causal attention sweep over {len(ops.attention)} (T, Hd), fwd+bwd ns per element of "
              f"{', '.join(ops.kernels)}, elementwise bandwidth {min(r[1] for r in ops.elementwise):.3g}-"
              f"{max(r[1] for r in ops.elementwise):.3g} GB/s by size, {ops.op_overhead_us:g} us per op")
    else:
        print(f"compute rate per device: " + (f"{rate.tflops:.4g} TFLOP/s = " if rate.tflops else "") + rate.how)
    for line in (everything[0].assumptions if everything else ()):
        if line != rate.how:
            print(f"note: {line}")
    if not everything:
        raise ConfigError("no layout is valid for this model, batch and device count (check that the global batch "
                          "divides into micro-batch x seq_len x data-parallel ranks)")
    if not cands:
        best = min(everything, key=lambda c: c.memory.peak_bytes)
        print(f"\nnothing fits: the smallest candidate needs {best.memory.peak_bytes / GIB:.2f} GiB per device, "
              f"the limit is {best.memory_limit_bytes / GIB:.2f} GiB. Closest:")
        print(explain(best))
        print("\nmore devices (--nodes), a shorter --seq-len or a smaller model would help")
        return 1
    print(f"\n{len(cands)} of {len(everything)} candidates fit; top {min(args.top, len(cands))}:")
    print(_table(cands[: args.top]))
    best = cands[0]
    if best.step_time_s is None:
        print(f"\nstep time unknown: {rate.how}")
    if args.explain:
        print()
        print(explain(best))
    if args.out:
        import tomli_w

        from clusterlm.fsutil import atomic_write_text

        tree = recipe_tree(model_tree, best, seq_len=seq_len, global_batch_tokens=gbt, dtype=dtype,
                           device_kind=device.kind, cluster=spec.name)
        header = (f"# Planned by `clusterlm plan --model {args.model} --cluster {args.cluster}`.\n"
                  f"# Add a [data] section (dir = your prepared data). [parallel] and [plan] are read by the\n"
                  f"# distributed trainer; the predicted figures are compared with measured ones at run time.\n")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, header + tomli_w.dumps(tree))
        print(f"\nwrote {args.out}")
    if args.dry_run:
        try:
            print(_dry_run(best))
        except ImportError as e:
            raise NotImplementedError(f"--dry-run needs torch ({e})") from e
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
