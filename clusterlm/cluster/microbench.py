"""The probe's micro-benchmarks: dense matmul rate, copy bandwidth, the planner's per-op sweeps
(GEMM shapes, causal attention, memory-bound kernels, elementwise bandwidth by size, fixed cost per
op) and checkpoint-folder storage bandwidth. Each returns numbers; `clusterlm probe` (probe.py)
decides what to run and records failures.

    from clusterlm.cluster.microbench import measure_matmul_tflops
    measure_matmul_tflops("cpu", "fp32", 1024, seconds=0.5)   # TFLOP/s

torch is imported inside each function, so the probe's inventory and `clusterlm plan` stay
torch-free.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Callable


# ---- was the machine quiet? (torch-free) ----------------------------------------------------------------
DEFAULT_MAX_FOREIGN_CPUS = 0.25
"""other processes' average CPU use above which a probe is marked disturbed: on a 2-core VM a probe
that shared the CPUs with 0.35 CPUs' worth of other work predicted steps 2.4-9x too long"""
DEFAULT_MAX_SPREAD = 0.5
"""(p75 - p25) / median of a repeated micro-benchmark above which the probe is marked disturbed"""


def cpu_busy_seconds(stat_text: str, hz: int) -> float:
    """Busy CPU-seconds of all CPUs since boot from /proc/stat's first line (everything but idle and
    iowait; guest time is already counted in user)."""
    vals = [int(v) for v in stat_text.splitlines()[0].split()[1:]]
    total = sum(vals[:8])  # user nice system idle iowait irq softirq steal
    return (total - vals[3] - (vals[4] if len(vals) > 4 else 0)) / hz


class ForeignCpu:
    """CPU time other processes took while a block ran: the machine-wide busy time (/proc/stat) minus
    this process's own user + system time (all its threads, and its waited-for children).

        with ForeignCpu() as fc:
            measure()
        fc.foreign_cpus   # CPUs' worth of other work, averaged over the block
    """

    def __init__(self, stat_path: str = "/proc/stat") -> None:
        self.stat_path = stat_path
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.available = os.path.exists(stat_path)
        self.busy_s = self.own_s = self.wall_s = self.foreign_cpus = 0.0

    def _busy(self) -> float:
        with open(self.stat_path) as f:
            return cpu_busy_seconds(f.read(), self.hz)

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> "ForeignCpu":
        self._b0 = self._busy() if self.available else 0.0
        self._o0, self._w0 = self._own(), time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall_s = time.perf_counter() - self._w0
        self.own_s = self._own() - self._o0
        if self.available:
            self.busy_s = self._busy() - self._b0
            # jiffy rounding makes tiny negatives; the foreign share cannot exceed the other CPUs
            self.foreign_cpus = max(0.0, self.busy_s - self.own_s) / max(self.wall_s, 1e-9)


# ---- measurements (torch) ----------------------------------------------------------------------------
def _timed(fn: Callable[[], Any], sync: Callable[[], None], seconds: float) -> float:
    """Seconds per call of fn: the fastest of the calls made in about `seconds`, after a warm-up.
    The minimum measures what the hardware can do; a mean would also measure whatever else shares
    the machine (other processes on a login or CI node)."""
    fn()
    sync()
    best, start = float("inf"), time.perf_counter()
    while True:
        t0 = time.perf_counter()
        fn()
        sync()
        t1 = time.perf_counter()
        best = min(best, t1 - t0)
        if t1 - start >= seconds:
            return best


def measure_matmul_tflops(device: str, dtype: str, n: int, seconds: float) -> float:
    """Dense n x n x n matmul TFLOP/s (2*n^3 FLOPs per product) on `device` ('cpu', 'cuda:0')."""
    import torch

    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32}[dtype]
    a = torch.randn(n, n, device=device, dtype=tdt)
    b = torch.randn(n, n, device=device, dtype=tdt)
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = dtype == "tf32"
    try:
        per = _timed(lambda: a @ b, sync, seconds)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    return 2 * n**3 / per / 1e12


def measure_copy_bandwidth(device: str, nbytes: int, seconds: float) -> float:
    """GB/s of a large tensor copy, counting read + write bytes."""
    import torch

    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    per = _timed(lambda: dst.copy_(src), sync, seconds)
    return 2 * nbytes / per / 1e9


# ---- step primitives for the planner's per-op step model (docs/planner.md, "Step time") -----------------
# GEMM shape grids (M, N, K) for the matmul sweep: M = tokens of a micro-batch (or a weight's rows
# in its gradient GEMM), N and K = model dimensions down to a head's (32); the planner interpolates
# between them in log space. The CPU grid's largest product is 137 GFLOP (0.4 s at 0.35 TFLOP/s);
# the GPU grid reaches the sizes where tensor cores saturate.
SWEEP_GRID_CPU = ((128, 1024, 4096), (32, 128, 512, 2048, 4096), (32, 128, 512, 2048, 4096))
SWEEP_GRID_GPU = ((512, 2048, 8192), (256, 1024, 4096, 16384), (256, 1024, 4096, 16384))
# `probe --quick` on a CPU: the same ends, fewer points between them (27 shapes instead of 75)
SWEEP_GRID_CPU_QUICK = ((128, 1024, 4096), (32, 512, 4096), (32, 512, 4096))
ELEMENTWISE_ELEMS = tuple(4**i for i in range(6, 14))  # 4 Ki .. 64 Mi fp32 elements per operand
ELEMENTWISE_ELEMS_QUICK = tuple(4**i for i in range(6, 13))


EVICT_BYTES = 64 << 20  # more than any CPU's L2 or a GPU's L2 (50 MB on H100)


def spread(times: list[float]) -> float:
    """(p75 - p25) / median of repeated timings: a robust spread, which other work on the machine
    widens (it slows some calls and not others)."""
    t = sorted(times)
    n = len(t)
    if n < 4:
        return 0.0
    return (t[(3 * n) // 4] - t[n // 4]) / t[n // 2]


def _timed_cold(fn: Callable[[], Any], sync: Callable[[], None], seconds: float, evict: Callable[[], Any],
                min_calls: int = 5, spreads: list[float] | None = None) -> float:
    """Median seconds of calls of fn, each made after `evict` has streamed EVICT_BYTES through the
    caches: in a training step an op's inputs were written long before (weights by the optimizer,
    saved activations by the rest of the forward), so the probe times ops from a cold cache. The
    median, not the fastest call: the planner adds these up to a typical step, which is what a run
    sees (the fastest call of each op is about 10% below it). At least `min_calls` calls, more while
    the budget lasts."""
    fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        evict()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    if spreads is not None:
        spreads.append(spread(times))
    times.sort()
    return times[len(times) // 2]


def _evictor(device: str) -> Callable[[], Any]:
    import torch

    buf = torch.empty(EVICT_BYTES // 4, device=device)
    return lambda: buf.fill_(1.0)


def measure_matmul_sweep(device: str, dtype: str, grid: tuple[tuple[int, ...], ...], seconds: float,
                         spreads: list[float] | None = None) -> tuple[tuple[float, float, float, float], ...]:
    """Rows (M, N, K, TFLOP/s) of C = A @ W^T with A (M, K) and W (N, K), nn.Linear's forward
    layout (the backward's layouts run at the same rates on CPU), for every M, N, K of `grid`, from
    a cold cache; `seconds` is the time budget of each shape (the median call; at least 5 calls
    for shapes under 5 GFLOP on a CPU, else 1)."""
    import torch

    tdt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    evict = _evictor(device)
    rows = []
    for m in grid[0]:
        for n in grid[1]:
            for k in grid[2]:
                a = torch.randn(m, k, device=device, dtype=tdt)
                w = torch.randn(n, k, device=device, dtype=tdt)
                slow = 2 * m * n * k > 5e9 if not device.startswith("cuda") else False
                best = _timed_cold(lambda: a @ w.t(), sync, seconds, evict, min_calls=1 if slow else 5,
                                   spreads=None if slow else spreads)
                rows.append((float(m), float(n), float(k), float(f"{2 * m * n * k / best / 1e12:.4g}")))
    return tuple(rows)


def measure_elementwise_sweep(device: str, sizes: tuple[int, ...], seconds: float) -> tuple[tuple[float, float], ...]:
    """Rows (bytes moved per call, GB/s) of c = a + b in fp32 at growing sizes: from caches to main
    memory. Bytes moved = 12 per element (two reads, one write). The output is allocated by each
    call, as every op of an autograd graph allocates its own."""
    import torch

    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    rows = []
    for n in sizes:
        a = torch.ones(n, device=device)
        b = torch.ones(n, device=device)
        per = _timed(lambda: torch.add(a, b), sync, seconds)
        rows.append((float(12 * n), round(12 * n / per / 1e9, 3)))
    return tuple(rows)


KERNEL_ELEMS = (1 << 16, 1 << 19, 1 << 22)  # 256 KiB (cache) .. 16 MiB (memory) of fp32 per tensor
ATTENTION_T_CPU, ATTENTION_T_GPU = (128, 512, 2048), (512, 2048, 8192)
ATTENTION_HD = (32, 64, 128)
ATTENTION_HD_QUICK = (32, 128)


def _kernel_fns(name: str, n: int, device: str) -> Callable[[], Any]:
    """One forward + backward of a Transformer's non-matmul kernel over n fp32 elements (the
    cross-entropy over n logits in rows of 4096, norms over rows of 512), or one fused AdamW step
    of n parameters, as the trainer runs them."""
    import torch
    import torch.nn.functional as F

    if name == "adamw":
        p = torch.nn.Parameter(torch.randn(n, device=device))
        p.grad = torch.randn(n, device=device)
        opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
        return opt.step
    width = 4096 if name == "cross_entropy" else 512
    x = torch.randn(n // width, width, device=device, requires_grad=True)
    if name == "cross_entropy":
        t = torch.randint(0, width, (n // width,), device=device)
        return lambda: torch.autograd.grad(F.cross_entropy(x, t), x)
    w = torch.ones(width, device=device, requires_grad=True)
    g = torch.randn(n // width, width, device=device)
    f = {"layernorm": lambda: F.layer_norm(x, (width,), w), "rmsnorm": lambda: F.rms_norm(x, (width,), w),
         "gelu_tanh": lambda: F.gelu(x, approximate="tanh") * w, "silu": lambda: F.silu(x) * w}[name]
    return lambda: torch.autograd.grad(f(), (x, w), g)


KERNELS = ("layernorm", "rmsnorm", "gelu_tanh", "silu", "cross_entropy", "adamw")


def measure_kernel_sweep(device: str, sizes: tuple[int, ...], seconds: float,
                         spreads: list[float] | None = None) -> dict[str, tuple[tuple[float, float], ...]]:
    """Rows (elements, ns per element) for each of KERNELS at each size: forward + backward of the
    norms, the activations (GELU's product with a weight vector: the rate of a layer's elementwise
    chain) and the cross-entropy, and the fused AdamW step (per parameter). On a CPU these kernels
    are bound by arithmetic per element as much as by memory, at rates no bandwidth figure gives.
    Timed from a cold cache, like the GEMMs."""
    import torch

    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    evict = _evictor(device)
    out = {}
    for name in KERNELS:
        rows = []
        for n in sizes:
            per = _timed_cold(_kernel_fns(name, n, device), sync, seconds, evict, spreads=spreads)
            rows.append((float(n), float(f"{per / n * 1e9:.4g}")))
        out[name] = tuple(rows)
    return out


def measure_attention_sweep(device: str, seq_lens: tuple[int, ...], head_dims: tuple[int, ...], seconds: float,
                            spreads: list[float] | None = None) -> tuple[tuple[float, float, float], ...]:
    """Rows (T, Hd, TFLOP/s) of causal scaled_dot_product_attention forward + backward, counting the
    FLOPs the planner assigns it: 7 GEMMs of 2*T*T*Hd per head (Q.K^T, P.V; recomputed Q.K^T, dP,
    dV, dQ, dK) over the causal fraction (T+1)/2T."""
    import torch
    import torch.nn.functional as F

    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    evict = _evictor(device)
    rows = []
    for T in seq_lens:
        for hd in head_dims:
            heads = max(1, (1 << 23) // (T * T))  # about the same work at every T
            q, k, v = (torch.randn(1, heads, T, hd, device=device, requires_grad=True) for _ in range(3))
            go = torch.randn(1, heads, T, hd, device=device)
            fn = lambda: torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), go)
            per = _timed_cold(fn, sync, seconds, evict, spreads=spreads)
            flops = heads * 7 * 2 * T * T * hd * (T + 1) / (2 * T)
            rows.append((float(T), float(hd), float(f"{flops / per / 1e12:.4g}")))
    return tuple(rows)


def measure_op_overhead(device: str, seconds: float, ops: int = 64, repeats: int = 5,
                        spreads: list[float] | None = None) -> float:
    """Microseconds of fixed cost per autograd op, forward + backward (dispatch, autograd bookkeeping,
    output allocation, the thread pool's fork/join on a CPU, the launch on a GPU): a chain of `ops`
    multiplies that records the graph, then backward through it, timed on tensors of 32768 and 65536
    elements (ATen's grain size, from which elementwise CPU ops run on every thread, as a training
    step's ops do) and extrapolated to zero elements: 2 t(32768) - t(65536); `repeats` times, the median kept."""
    import torch

    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)

    def per_op(n: int) -> float:
        x = torch.ones(n, device=device, requires_grad=True)

        def chain() -> None:
            y = x
            for _ in range(ops):
                y = y * 1.0001
            y.sum().backward()

        return _timed(chain, sync, seconds / repeats) / ops * 1e6

    # repeated, the median kept: one disturbed repetition does not move it
    est = []
    for _ in range(repeats):
        small, large = per_op(1 << 15), per_op(1 << 16)
        est.append(max(2 * small - large, 0.5 * small))
    if spreads is not None:
        spreads.append(spread(est))
    return sorted(est)[len(est) // 2]


# ---- fixed costs of a step that no op accounts for (what dominates a sub-1M-parameter model) -----------
def _median_call(fn: Callable[[], Any], seconds: float, min_calls: int = 7) -> tuple[float, list[float]]:
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2], times


def measure_optimizer_fixed(device: str, seconds: float, spreads: list[float] | None = None) -> tuple[float, float]:
    """(us per parameter tensor, us per step) of the trainer's step outside forward/backward on tiny
    tensors: clip_grad_norm_, the fused AdamW step, zero_grad(set_to_none=True), plus the loop's own
    per-step Python (lr into the param groups, the loss's host sync, finiteness checks). Timed with 8
    and 64 tensors of 64 elements; the slope is the per-tensor cost, the intercept the per-step cost."""
    import math

    import torch

    def one(n: int) -> tuple[float, list[float]]:
        params = [torch.nn.Parameter(torch.randn(64, device=device)) for _ in range(n)]
        grads = [torch.randn(64, device=device) for _ in range(n)]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
        loss = torch.zeros((), device=device)

        def step() -> None:
            for p, g in zip(params, grads):  # what backward leaves behind
                p.grad = g
            for group in opt.param_groups:
                group["lr"] = 1e-4
            value = float(loss + 1.0)
            norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
            if math.isfinite(value) and math.isfinite(norm):
                opt.step()
            opt.zero_grad(set_to_none=True)

        return _median_call(step, seconds / 2)

    (t8, s8), (t64, s64) = one(8), one(64)
    if spreads is not None:
        spreads += [spread(s8), spread(s64)]
    per_tensor = max((t64 - t8) / 56, 0.0)
    return per_tensor * 1e6, max(t8 - 8 * per_tensor, 0.0) * 1e6


def measure_data_loading(batch: int, seq_len: int, seconds: float) -> float:
    """us per micro-batch of the trainer's loader path: random windows of seq_len+1 tokens gathered
    from a uint16 token memmap (one fancy-index read), cast to int64, split into x and y tensors."""
    import numpy as np
    import torch

    n_tokens = 1 << 20
    with tempfile.TemporaryDirectory(prefix="clusterlm-probe-") as tmp:
        path = os.path.join(tmp, "tokens.bin")
        np.arange(n_tokens, dtype=np.uint16).tofile(path)
        mm = np.memmap(path, dtype=np.uint16, mode="r")
        rng = np.random.default_rng(0)
        span = np.arange(seq_len + 1)
        n_windows = n_tokens // seq_len - 1

        def load() -> None:
            idx = rng.integers(0, n_windows, batch)
            out = np.empty((batch, seq_len + 1), dtype=np.int64)
            out[:] = mm[(idx * seq_len)[:, None] + span]
            x = torch.from_numpy(np.ascontiguousarray(out[:, :-1]))  # (B, T)
            y = torch.from_numpy(np.ascontiguousarray(out[:, 1:]))  # (B, T)
            x.to("cpu"), y.to("cpu")

        t, _ = _median_call(load, seconds)
        del mm
    return t * 1e6


def measure_log_record(seconds: float) -> float:
    """us to write one metrics record as a JSON line (the trainer's per-step metrics.jsonl write)."""
    import json

    record = {"kind": "train", "step": 1, "tokens": 768, "loss": 4.1234567, "lr": 1e-3, "grad_norm": 0.5,
              "skipped": False, "step_time_s": 0.0412, "tokens_per_s": 18640.2, "mfu": 0.21, "predicted_step_s": 0.04}
    with tempfile.TemporaryFile("w") as f:
        def write() -> None:
            f.write(json.dumps(record) + "\n")
            f.flush()

        t, _ = _median_call(write, seconds)
    return t * 1e6


RNN_BATCH = (4, 16, 64)
RNN_DIM = (128, 256, 512)
RNN_BATCH_QUICK, RNN_DIM_QUICK = (4, 64), (128, 512)  # `probe --quick`: the corners of the grid
RNN_STEPS = (16, 64)  # two sequence lengths: a call costs a fixed part (weight reorders) + T x a per-step part


def measure_rnn_sweep(device: str, arch: str, batches: tuple[int, ...], dims: tuple[int, ...], seconds: float,
                      spreads: list[float] | None = None) -> tuple[tuple[float, float, float, float], ...]:
    """Rows (B, D, us per call, us per time step) of one nn.LSTM / nn.GRU layer (D -> D, batch_first)
    forward + backward. The recurrence runs one step after another (oneDNN's fused layer on a CPU),
    and each call also pays a fixed cost that does not grow with T (oneDNN reorders the weights into
    its own layout, forward and backward): timing two lengths, T1 < T2, separates them, so that a layer
    costs (us per call) + T x (us per time step) at batch B. Timing one length and dividing by it
    mispredicted a 2-layer, T=64 recipe by 23-35% (issue 20). Timed from a cold cache, median of calls."""
    import torch

    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)
    evict = _evictor(device)
    cls = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[arch]
    t1, t2 = RNN_STEPS
    rows = []
    for b in batches:
        for d in dims:
            layer = cls(d, d, num_layers=1, batch_first=True).to(device)
            per_len = []
            for t in (t1, t2):
                x = torch.randn(b, t, d, device=device, requires_grad=True)
                g = torch.randn(b, t, d, device=device)
                fn = lambda x=x, g=g: torch.autograd.grad(layer(x)[0], [x, *layer.parameters()], g)
                per_len.append(_timed_cold(fn, sync, seconds, evict, spreads=spreads) * 1e6)
            step = (per_len[1] - per_len[0]) / (t2 - t1)
            if step <= 0:  # noise larger than the difference: no separable fixed part
                step, fixed = per_len[1] / t2, 0.0
            else:
                fixed = max(per_len[0] - t1 * step, 0.0)
            rows.append((float(b), float(d), float(f"{fixed:.4g}"), float(f"{step:.4g}")))
    return tuple(rows)


def measure_storage(folder: str, nbytes: int) -> tuple[float, float]:
    """(write GB/s including fsync, read GB/s after dropping the file from the page cache) for a
    temporary file in `folder`, removed afterwards."""
    os.makedirs(folder, exist_ok=True)
    chunk = os.urandom(1 << 20) * 4  # 4 MiB of incompressible data
    fd, path = tempfile.mkstemp(prefix=".clusterlm-probe-", dir=folder)
    try:
        t0 = time.perf_counter()
        with os.fdopen(fd, "wb") as f:
            written = 0
            while written < nbytes:
                f.write(chunk)
                written += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        write = written / (time.perf_counter() - t0) / 1e9
        rfd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):  # clean pages after fsync can be dropped: a cold read
                os.posix_fadvise(rfd, 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            while os.read(rfd, 16 << 20):
                pass
            read = written / (time.perf_counter() - t0) / 1e9
        finally:
            os.close(rfd)
        return write, read
    finally:
        os.unlink(path)
