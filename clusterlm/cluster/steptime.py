"""The planner's step-time model: seconds per training step of one layout on one device type.

    parts, formulas = step_time(model, dims, mb, accum, recompute, seq_len, gbt, dtype, rate, net, device, ops)

    step = compute + pipeline bubble + exposed communication + optimizer step
    compute = per-op model (GEMMs by shape, attention, memory-bound kernels, fixed cost per op;
              from the probe's sweeps) | FLOPs / (devices * rate)
    comm    = ring collectives (all-reduce 2(n-1)/n * S / busbw, all-gather and reduce-scatter
              (n-1)/n * S / busbw, plus latency per ring step); DP/FSDP traffic overlaps the
              backward, TP and PP traffic does not.

Torch-free. The planner (planner.py) enumerates layouts and calls this for each one; every part
comes back with the formula that produced it, for `clusterlm plan --explain`. Arithmetic:
docs/planner.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from clusterlm.cluster import flops as flops_mod
from clusterlm.cluster import hardware
from clusterlm.cluster.memory import layer_activation_bytes, logits_bytes, stage_params, trainer_sequence_parallel
from clusterlm.cluster.spec import ClusterSpec, DeviceSpec, LinkSpec, NodeType
from clusterlm.errors import ConfigError
from clusterlm.models.config import ModelConfig
from clusterlm.parallel.dims import ParallelDims, pipeline_microbatches

# Stand-ins for measurements, always printed when used.
DEFAULT_TRAIN_FRACTION_OF_PEAK = 0.40
"""MFU of a tuned dense-Transformer run: PaLM 46.2% (Chowdhery et al. 2022, table 3), Megatron-LM
52% on A100 for 530B (Narayanan et al. 2021); 0.40 leaves room for a less tuned stack."""
DEFAULT_TRAIN_FRACTION_OF_MATMUL = 0.60
"""training step FLOP/s over a large dense matmul's: attention, norms, elementwise ops and the
loss run below matmul speed (about 0.45 MFU / 0.75 matmul efficiency on recent GPUs)."""
GRAD_REDUCE_BYTES = 4  # gradients are reduced in fp32 (DDP under autocast; FSDP2 reduce_dtype=fp32)
ACTIVATION_PASSES = 3  # CPU: activation bytes written (fwd), read and gradient written (bwd)
ADAMW_BYTES_PER_PARAM = 28  # optimizer step traffic: read p, g, m, v (16) + write p, m, v (12), fp32


@dataclass(frozen=True)
class ComputeRate:
    tflops: float | None
    """FLOP/s / 1e12 one device sustains in training; None = unknown"""
    how: str
    assumed: bool


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
class Net:
    """Bus bandwidths (GB/s) and latencies (s) a collective sees, inside a node and across nodes."""
    intra_busbw: float
    intra_lat: float
    inter_node_busbw: float  # whole-node network, shared by its devices
    inter_lat: float
    devices_per_node: int
    notes: tuple[str, ...]


def busbw(link: LinkSpec, table_key: str | None) -> tuple[float, str | None]:
    if link.measured_busbw_gbs:
        return link.measured_busbw_gbs, None
    frac = link.achievable_fraction
    note = None
    if frac is None:
        frac = hardware.LINKS[table_key].achievable_fraction if table_key in hardware.LINKS else 0.7
        note = f"ASSUMPTION: {link.name} reaches {frac:.0%} of {link.bandwidth_gbs:g} GB/s (no measured bus bandwidth)"
    return link.bandwidth_gbs * frac, note


def network(spec: ClusterSpec, node: NodeType, nodes: int) -> Net:
    notes = []
    g = node.devices_per_node
    if node.intra_link:
        intra, note = busbw(node.intra_link, None)
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
        per, note = busbw(link, None)
        if note:
            notes.append(note)
        inter, inter_lat = per * link.count, link.latency_us * 1e-6
    return Net(intra, lat, inter, inter_lat, g, tuple(notes))


def group_bw(net: Net, size: int, stride: int) -> tuple[float, float, str]:
    """Bus bandwidth (GB/s), latency (s) and link name for a ring of `size` ranks `stride` apart."""
    g = net.devices_per_node
    if size * stride <= g:
        return net.intra_busbw, net.intra_lat, "intra-node"
    # The group spans nodes: its ranks on one node share the node's network with the other groups
    # of the same dimension running at the same time (g / ranks_per_node of them).
    ranks_per_node = max(1, min(size, g // stride)) if stride < g else 1
    inter = net.inter_node_busbw * ranks_per_node / g
    return min(net.intra_busbw, inter), max(net.intra_lat, net.inter_lat), "inter-node"


def ring(kind: str, nbytes: float, n: int, bw_gbs: float, lat: float) -> float:
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
    optimizer_us_per_tensor: float | None = None
    """clip + fused AdamW + zero_grad per parameter tensor (probe); None: 3 x op_overhead_us"""
    step_fixed_us: float = 0.0
    """the loop's fixed cost per step (probe)"""
    data_us_per_batch: float = 0.0
    """the loader's cost per micro-batch (probe)"""
    rnn_sweep: tuple[tuple[tuple[str, tuple[tuple[float, ...], ...]], ...], ...] = ()
    """(arch, rows [B, D, us per call, us per time step]) of one LSTM/GRU layer fwd + bwd (probe); older
    probes' rows [B, D, us per time step] have no per-call part"""

    def rnn_layer_us(self, arch: str, batch: float, dim: float) -> tuple[float, float]:
        """(us per call, us per time step) of one recurrent layer forward + backward: each log-interpolated
        in (B, D), end values outside (a per-call part of 0 stays 0)."""
        rows = dict(self.rnn_sweep)[arch]
        step = _grid_interp(tuple((r[0], r[1], r[-1]) for r in rows), (batch, dim), scale_below=False)
        fixed = 0.0  # older probes' 3-column rows have no per-call part; +1 us keeps log() defined at 0
        if len(rows[0]) == 4:
            fixed = _grid_interp(tuple((r[0], r[1], r[2] + 1.0) for r in rows), (batch, dim), scale_below=False) - 1.0
        return max(fixed, 0.0), step

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
                   device.op_overhead_us, device.optimizer_us_per_tensor, device.step_fixed_us or 0.0,
                   device.data_us_per_batch or 0.0, tuple(device.rnn_sweep.items())), []


def step_model(model: ModelConfig, device: DeviceSpec, dtype: str) -> tuple[OpRates | None, str | None]:
    """(the per-op figures when the planner uses them, else None; why not, when that is worth saying).
    A measured training efficiency (device.train_efficiency) comes from real steps and wins; the
    per-op model needs all of OP_MODEL_FIELDS from the probe and a Transformer."""
    rates, missing = op_rates(device, dtype)
    if dtype in device.train_efficiency:
        return None, (f"step time from the measured device.train_efficiency.{dtype} (it takes precedence over "
                      f"the per-op model)" if rates else None)
    if model.arch in ("lstm", "gru") and (rates is None or model.arch not in dict(rates.rnn_sweep)):
        return None, (f"per-op step model not used: the spec has no rnn_sweep.{model.arch} (probe it again); step "
                      f"time from the FLOP rate" if rates else None)
    if rates is None:
        return None, (f"per-op step model not used: the spec lacks {', '.join(missing)} (measured by "
                      f"`clusterlm probe --out node.toml`); step time from one FLOP rate instead")
    return rates, None


def param_tensors(model: ModelConfig) -> int:
    """Parameter tensors (what clip_grad_norm and the optimizer loop over)."""
    if model.arch in ("lstm", "gru"):  # embedding, per layer w_ih, w_hh, b_ih, b_hh (nn.LSTM's default), output bias
        return 1 + model.n_layers * 4 + bool(model.bias) + (not model.tie_embeddings)
    b = 2 if model.bias else 1
    norm = b if model.norm == "layernorm" else 1
    per_layer = 2 * norm + (4 + (3 if model.mlp == "swiglu" else 2)) * b
    total = (model.n_layers * per_layer + 1 + (model.pos == "learned") + norm + (not model.tie_embeddings))
    if model.arch == "encoder":  # embedding norm, mlm_head dense + norm, output bias
        total += norm + b + norm + (1 if model.bias else 0)
    elif model.arch == "encdec":  # cross-attention + its norm per decoder layer; the encoder stack; embedding norms
        total += model.n_layers * (4 * b + norm) + model.enc_layers * per_layer + norm + (model.pos == "learned")
        total += 2 * norm
    return total


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
    parts["attention"], texts = 0.0, []
    for a in work.attentions:  # encdec: decoder self, cross and encoder self-attention
        rate = rates.attention_tflops(a.seq_len, a.head_dim)
        parts["attention"] += m * a.flops / (rate * 1e12)
        texts.append(f"{a.name}: {m} micro-batches * {a.layers} layers * {a.heads:g} heads * {a.passes} GEMMs of "
                     f"2*T*T*Hd (T={a.seq_len}, Hd={a.head_dim})" + (" * causal (T+1)/2T" if a.causal else "")
                     + f" = {a.flops / 1e9:.4g} GFLOP at {rate:.4g} TFLOP/s")
    formulas["attention"] = ("; ".join(texts) + " (the probe's causal SDPA fwd+bwd sweep; a full-square core "
                             "is taken at the same rate per FLOP)")
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
    tensors = param_tensors(model)
    if rates.optimizer_us_per_tensor is None:  # a spec from before the fixed-cost figures
        # clip_grad_norm_ runs a norm and a scale per parameter tensor, the fused AdamW one update each
        parts["op_overhead"] = (m * n_ops + OPTIMIZER_OPS_PER_TENSOR * tensors) * rates.op_overhead_us * 1e-6
        formulas["op_overhead"] = (f"({m} micro-batches * {n_ops} autograd ops + {OPTIMIZER_OPS_PER_TENSOR} x "
                                   f"{tensors} parameter tensors in clip/optimizer) * {rates.op_overhead_us:g} us "
                                   f"(the probe's fixed cost per op, fwd + bwd)")
        return parts, formulas
    parts["op_overhead"] = m * n_ops * rates.op_overhead_us * 1e-6
    formulas["op_overhead"] = (f"{m} micro-batches * {n_ops} autograd ops * {rates.op_overhead_us:g} us (the probe's "
                               f"fixed cost per op, fwd + bwd)")
    parts["step_fixed"], formulas["step_fixed"] = fixed_step_costs(tensors, m, rates.optimizer_us_per_tensor,
                                                                   rates.step_fixed_us, rates.data_us_per_batch)
    return parts, formulas


RNN_OTHER_OPS = 12  # embedding, output Linear, loss and their backward: autograd ops besides the layers


def _rnn_model_parts(model: ModelConfig, mb: int, m: int, seq_len: int, rates: OpRates
                     ) -> tuple[dict[str, float], dict[str, str]]:
    """Per-op model of an LSTM/GRU LM: its layers at the probe's per-time-step cost (the recurrence is
    sequential), the output projection's GEMMs and the loss at their measured rates, fixed costs."""
    parts: dict[str, float] = {}
    formulas: dict[str, str] = {}
    call, us = rates.rnn_layer_us(model.arch, mb, model.dim)
    parts["rnn_layers"] = m * model.n_layers * (call + seq_len * us) * 1e-6
    formulas["rnn_layers"] = (f"{m} micro-batches * {model.n_layers} layers * ({call:.4g} us per call + {seq_len} "
                              f"time steps * {us:.4g} us) (the probe's {model.arch} layer fwd+bwd at B={mb}, "
                              f"D={model.dim}, timed at two lengths)")
    n, V, D = mb * seq_len, model.padded_vocab_size, model.dim
    shapes = ((n, V, D), (n, D, V), (V, D, n))  # output projection: forward, input gradient, weight gradient
    t = sum(2 * a * b * c / (rates.gemm_tflops(a, b, c) * 1e12) for a, b, c in shapes)
    parts["gemm"] = m * t
    formulas["gemm"] = (f"{m} micro-batches * output projection fwd + dX + dW GEMMs ({n}x{V}x{D}) at the probe's "
                        f"sweep rates = {t * 1e3:.3g} ms each")
    ce = rates.kernel_ns("cross_entropy", n * V)
    parts["loss"] = m * n * V * ce * 1e-9
    formulas["loss"] = f"{m} micro-batches * cross-entropy fwd+bwd {n * V / 1e6:.4g} M elem x {ce:.3g} ns"
    ops = RNN_OTHER_OPS + 2 * model.n_layers
    parts["op_overhead"] = m * ops * rates.op_overhead_us * 1e-6
    formulas["op_overhead"] = f"{m} micro-batches * {ops} autograd ops * {rates.op_overhead_us:g} us"
    if rates.optimizer_us_per_tensor is not None:
        parts["step_fixed"], formulas["step_fixed"] = fixed_step_costs(
            param_tensors(model), m, rates.optimizer_us_per_tensor, rates.step_fixed_us, rates.data_us_per_batch)
    return parts, formulas


def fixed_step_costs(tensors: int, m: int, per_tensor_us: float, step_us: float, data_us: float
                     ) -> tuple[float, str]:
    """Seconds per step that no op accounts for, from the probe: the optimizer's bookkeeping per
    parameter tensor (clip, fused AdamW, zero_grad), the loop's fixed cost, the loader per micro-batch."""
    t = (tensors * per_tensor_us + step_us + m * data_us) * 1e-6
    return t, (f"{tensors} parameter tensors * {per_tensor_us:g} us (clip + AdamW + zero_grad bookkeeping) + "
               f"{step_us:g} us per step (loop) + {m} micro-batches * {data_us:g} us (loader) [the probe's fixed "
               f"costs]")


def _op_model_optimizer(model: ModelConfig, per_dev: float, dims: ParallelDims, rates: OpRates
                        ) -> tuple[float, str]:
    ops = flops_mod.optimizer_work(per_dev / dims.dp_shard, param_tensors(model))
    t = sum(rates.memop_s(o) for o in ops)
    desc = " + ".join(f"{o.name} {o.elements / 1e6:.4g} M params x {rates.kernel_ns(o.kernel, o.elements):.3g} ns "
                      f"(the probe's fused AdamW step)" if o.kernel else
                      f"{o.name} {o.bytes / 1e6:.4g} MB at {rates.bandwidth_gbs(o.bytes):.4g} GB/s" for o in ops)
    return t, desc


# ---- one candidate ------------------------------------------------------------------------------------
def step_time(model: ModelConfig, dims: ParallelDims, mb: int, accum: int, recompute: str, seq_len: int,
               gbt: int, dtype: str, rate: ComputeRate, net: Net, device: DeviceSpec,
               ops: OpRates | None = None) -> tuple[dict, dict]:
    parts: dict[str, float] = {}
    formulas: dict[str, str] = {}
    world = dims.world_size
    m = accum
    if ops is not None:  # per-op model: GEMMs by shape, memory-bound ops, loss, fixed op costs
        op_parts, op_formulas = (_op_model_parts(model, dims, mb, m, recompute, seq_len, dtype, ops)
                                 if model.arch not in ("lstm", "gru") else _rnn_model_parts(model, mb, m, seq_len, ops))
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
    # a pipeline runs each of the m rank micro-batches as one schedule call of n_mb pipeline micro-batches
    # (parallel/pp.py): every call has its own fill and drain
    n_mb = pipeline_microbatches(mb, dims.pp) if dims.pp > 1 else 1
    if dims.pp > 1:
        parts["bubble"] = compute * (dims.pp - 1) / n_mb
        formulas["bubble"] = (f"compute * (pp-1)/n_mb = compute * {dims.pp - 1}/{n_mb}, n_mb = {n_mb} pipeline "
                              f"micro-batches per schedule call (micro-batch {mb} split), one call per accumulation "
                              f"step: a fraction (pp-1)/(n_mb+pp-1) = {(dims.pp - 1) / (n_mb + dims.pp - 1):.3f} "
                              f"of the pipelined time")
    e = 2 if dtype in ("bf16", "fp16") else 4
    per_dev = stage_params(model, dims.pp, "first")[0] / dims.tp  # parameters one rank holds unsharded
    grad_bytes = per_dev * GRAD_REDUCE_BYTES
    # strides in the mesh (pp, dp_replicate, dp_shard, tp): tp innermost
    tp_bw = group_bw(net, dims.tp, 1)
    sh_bw = group_bw(net, dims.dp_shard, dims.tp)
    rep_bw = group_bw(net, dims.dp_replicate, dims.tp * dims.dp_shard)
    pp_bw = group_bw(net, dims.pp, dims.tp * dims.dp_shard * dims.dp_replicate)
    dp_comm = 0.0
    dp_f = []
    if dims.dp_shard > 1:
        ag = ring("all_gather", per_dev * e, dims.dp_shard, sh_bw[0], sh_bw[1])
        rs = ring("reduce_scatter", grad_bytes, dims.dp_shard, sh_bw[0], sh_bw[1])
        exposed = max(0.0, ag - t_fwd) + max(0.0, ag + rs - t_bwd)
        dp_comm += m * exposed
        dp_f.append(f"FSDP per micro-batch: all-gather {per_dev * e / 1e9:.3g} GB fwd+bwd ({ag * 1e3:.3g} ms each) + "
                    f"reduce-scatter {grad_bytes / 1e9:.3g} GB ({rs * 1e3:.3g} ms) over {dims.dp_shard} ranks "
                    f"({sh_bw[2]}, {sh_bw[0]:.4g} GB/s), exposed beyond fwd {t_fwd * 1e3:.3g} ms / "
                    f"bwd {t_bwd * 1e3:.3g} ms, x {m}")
    if dims.dp_replicate > 1:
        size = grad_bytes / dims.dp_shard
        ar = ring("all_reduce", size, dims.dp_replicate, rep_bw[0], rep_bw[1])
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
        one = ring("all_reduce", act, dims.tp, tp_bw[0], tp_bw[1])
        parts["tp_comm"] = m * layers * n_coll * one
        formulas["tp_comm"] = (f"{m} micro-batches * {layers} layers * {n_coll} all-reduce-sized collectives of "
                               f"b*s*h*e = {act / 1e6:.3g} MB over tp={dims.tp} ({tp_bw[2]}, {tp_bw[0]:.4g} GB/s) "
                               f"= {one * 1e6:.3g} us each, not overlapped")
    if dims.pp > 1:
        act = mb // n_mb * seq_len * model.dim * e / dims.tp
        one = act / (pp_bw[0] * 1e9) + pp_bw[1]
        parts["pp_comm"] = m * 2 * (n_mb + dims.pp - 1) * one
        formulas["pp_comm"] = (f"m * 2 * (n_mb + pp - 1) = {m} * {2 * (n_mb + dims.pp - 1)} sends of b*s*h*e/t "
                               f"= {act / 1e6:.3g} MB (b = {mb // n_mb} per pipeline micro-batch) ({pp_bw[2]}, "
                               f"{pp_bw[0]:.4g} GB/s) on the critical path")
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
