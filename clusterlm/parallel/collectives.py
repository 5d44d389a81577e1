"""The collectives of the probe's all-reduce benchmark: what `clusterlm probe` runs under torchrun/srun.

    python -m torch.distributed.run --nproc-per-node 2 -m clusterlm probe --quick --no-measure --out node.toml
    srun --nodes 2 --ntasks-per-node 8 python -m clusterlm probe --no-measure --out cluster.toml

Every rank calls `measure_allreduce`; it starts the process group (clusterlm.parallel.launch: NCCL on
GPU, gloo on CPU), learns which host each rank is on, times dist.all_reduce (sum, fp32) over a sweep
of message sizes and returns the same AllReduceResult on every rank. The figures follow nccl-tests
(github.com/NVIDIA/nccl-tests, doc/PERFORMANCE.md):

    algbw = S / t                     (S bytes of the buffer, t seconds per all-reduce)
    busbw = algbw * 2(n-1)/n          (n ranks; what each rank's link carries in a ring all-reduce,
                                       comparable with the link's bandwidth whatever n is)

t is the mean over the timed iterations after a warm-up, taken from the slowest rank (MAX over
ranks: an all-reduce is done when its last rank is). The benchmark's sizes, result and bus
bandwidth arithmetic live with the probe, torch-free (clusterlm/cluster/allreduce.py); this file
holds only what calls torch.distributed (allowed in parallel/ alone). Torch is imported inside the
functions.
"""

from __future__ import annotations

import logging
import time

from clusterlm.cluster.allreduce import AllReduceResult, SizePoint, bus_bandwidth, default_sizes, fmt_bytes

log = logging.getLogger(__name__)

def allreduce_sweep(sizes: tuple[int, ...] | list[int], device, *, warmup: int = 2, min_iters: int = 3,
                    max_iters: int = 50, seconds_per_size: float = 0.3) -> list[SizePoint]:
    """Time dist.all_reduce over `sizes` (bytes, fp32 buffers) in the current process group; every
    rank must call it with the same arguments. Iterations per size: enough to fill about
    `seconds_per_size` judged from the warm-up, clamped to [min_iters, max_iters], the same on every
    rank (MAX over ranks), so all ranks issue the same collectives."""
    import torch
    import torch.distributed as dist

    n = dist.get_world_size()
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    points = []
    for nbytes in sizes:
        if nbytes % 4:
            raise ValueError(f"message size {nbytes} bytes is not a whole number of fp32 elements")
        buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(warmup):
            dist.all_reduce(buf)
        sync()
        per_warm = (time.perf_counter() - t0) / max(warmup, 1)
        iters = torch.tensor([min(max_iters, max(min_iters, int(seconds_per_size / max(per_warm, 1e-6))))],
                             dtype=torch.int64, device=device)
        dist.all_reduce(iters, op=dist.ReduceOp.MAX)
        k = int(iters.item())
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        for _ in range(k):
            dist.all_reduce(buf)
        sync()
        t = torch.tensor([(time.perf_counter() - t0) / k], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank's time
        seconds = float(t.item())
        algbw, busbw = bus_bandwidth(nbytes, seconds, n)
        points.append(SizePoint(nbytes, k, seconds, round(algbw, 4), round(busbw, 4)))
        log.info("all_reduce %s x%d: %.1f us, busbw %.3f GB/s", fmt_bytes(nbytes), k, seconds * 1e6, busbw)
    return points


def measure_allreduce(host: str, *, quick: bool = False, sizes: tuple[int, ...] | None = None,
                      timeout_s: float = 300.0) -> AllReduceResult:
    """On every rank of a torchrun/srun job: start the process group, sweep, shut the group down.
    Returns the same result on every rank (hosts gathered from each rank's `host`)."""
    import torch.distributed as dist

    from clusterlm.parallel.launch import init_distributed, read_env, shutdown_distributed

    env = read_env()
    if not env.distributed or env.world_size < 2:
        raise ValueError(f"all-reduce bandwidth needs a job of 2 or more ranks (torchrun or srun); this process "
                         f"has world_size={env.world_size} ({env.source})")
    device = init_distributed(env, timeout_s=timeout_s)
    try:
        hosts: list[str] = [""] * env.world_size
        dist.all_gather_object(hosts, host)
        backend = str(dist.get_backend())
        chosen = sizes or default_sizes(quick, device.type == "cuda")
        points = allreduce_sweep(chosen, device, warmup=1 if quick else 5, min_iters=3 if quick else 5,
                                 max_iters=20 if quick else 100, seconds_per_size=0.15 if quick else 1.0)
        dist.barrier()
    finally:
        shutdown_distributed()
    return AllReduceResult(backend, env.world_size, tuple(hosts), "fp32", tuple(points))
