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
ELEMENTWISE_ELEMS = tuple(4**i for i in range(6, 14))  # 4 Ki .. 64 Mi fp32 elements per operand
ELEMENTWISE_ELEMS_QUICK = tuple(4**i for i in range(6, 13))


EVICT_BYTES = 64 << 20  # more than any CPU's L2 or a GPU's L2 (50 MB on H100)


def _timed_cold(fn: Callable[[], Any], sync: Callable[[], None], seconds: float, evict: Callable[[], Any],
                min_calls: int = 5) -> float:
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
    times.sort()
    return times[len(times) // 2]


def _evictor(device: str) -> Callable[[], Any]:
    import torch

    buf = torch.empty(EVICT_BYTES // 4, device=device)
    return lambda: buf.fill_(1.0)


def measure_matmul_sweep(device: str, dtype: str, grid: tuple[tuple[int, ...], ...],
                         seconds: float) -> tuple[tuple[float, float, float, float], ...]:
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
                best = _timed_cold(lambda: a @ w.t(), sync, seconds, evict, min_calls=1 if slow else 5)
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


def measure_kernel_sweep(device: str, sizes: tuple[int, ...],
                         seconds: float) -> dict[str, tuple[tuple[float, float], ...]]:
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
            per = _timed_cold(_kernel_fns(name, n, device), sync, seconds, evict)
            rows.append((float(n), float(f"{per / n * 1e9:.4g}")))
        out[name] = tuple(rows)
    return out


def measure_attention_sweep(device: str, seq_lens: tuple[int, ...], head_dims: tuple[int, ...],
                            seconds: float) -> tuple[tuple[float, float, float], ...]:
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
            per = _timed_cold(fn, sync, seconds, evict)
            flops = heads * 7 * 2 * T * T * hd * (T + 1) / (2 * T)
            rows.append((float(T), float(hd), float(f"{flops / per / 1e12:.4g}")))
    return tuple(rows)


def measure_op_overhead(device: str, seconds: float, ops: int = 64) -> float:
    """Microseconds of fixed cost per autograd op, forward + backward (dispatch, autograd bookkeeping,
    output allocation, the thread pool's fork/join on a CPU, the launch on a GPU): a chain of `ops`
    multiplies that records the graph, then backward through it, timed on tensors of 32768 and 65536
    elements (ATen's grain size, from which elementwise CPU ops run on every thread, as a training
    step's ops do) and extrapolated to zero elements: 2 t(32768) - t(65536)."""
    import torch

    sync = (lambda: torch.cuda.synchronize(device)) if device.startswith("cuda") else (lambda: None)

    def per_op(n: int) -> float:
        x = torch.ones(n, device=device, requires_grad=True)

        def chain() -> None:
            y = x
            for _ in range(ops):
                y = y * 1.0001
            y.sum().backward()

        return _timed(chain, sync, seconds) / ops * 1e6

    small, large = per_op(1 << 15), per_op(1 << 16)
    return max(2 * small - large, 0.5 * small)


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
