"""The probe's all-reduce benchmark, torch-free: message sizes, the result, nccl-tests' arithmetic.

    algbw = S / t                     (S bytes of the buffer, t seconds per all-reduce)
    busbw = algbw * 2(n-1)/n          (n ranks; what each rank's link carries in a ring all-reduce,
                                       comparable with the link's bandwidth whatever n is)

(github.com/NVIDIA/nccl-tests, doc/PERFORMANCE.md). The timed collectives themselves run in
clusterlm/parallel/collectives.py, the only package that may import torch.distributed; the probe
(probe.py) and `--all-nodes` (probe_all.py) read AllReduceResult from here, also where torch is
missing.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB, MIB = 1 << 10, 1 << 20
# message sizes in bytes, doubling x4 (nccl-tests runs -b 8 -e 128M -f 2; fewer points keep it short)
SIZES_QUICK_CPU = tuple(4 * KIB * 4**i for i in range(7))        # 4 KiB .. 16 MiB
SIZES_FULL_CPU = tuple(1 * KIB * 4**i for i in range(10))        # 1 KiB .. 256 MiB
SIZES_QUICK_GPU = tuple(64 * KIB * 4**i for i in range(7))       # 64 KiB .. 256 MiB
SIZES_FULL_GPU = tuple(8 * KIB * 4**i for i in range(9)) + (1 << 30,)  # 8 KiB .. 512 MiB, 1 GiB


@dataclass(frozen=True)
class SizePoint:
    nbytes: int
    iters: int
    seconds: float
    """mean seconds per all-reduce, slowest rank"""
    algbw_gbs: float
    busbw_gbs: float


@dataclass(frozen=True)
class AllReduceResult:
    backend: str
    world_size: int
    hosts: tuple[str, ...]
    """host of each rank, in rank order"""
    dtype: str
    points: tuple[SizePoint, ...]

    @property
    def n_hosts(self) -> int:
        return len(set(self.hosts))

    @property
    def intra_node(self) -> bool:
        """All ranks on one host: the figure describes the intra-node link, else the inter-node one."""
        return self.n_hosts == 1

    @property
    def headline_points(self) -> tuple[SizePoint, ...]:
        """The three largest messages: the bandwidth-bound end of the sweep (the planner charges
        latency apart, 2(n-1) x link latency per all-reduce)."""
        return tuple(sorted(self.points, key=lambda p: p.nbytes)[-3:])

    @property
    def busbw_gbs(self) -> float:
        """The headline figure: the best busbw of the three largest messages. Best, not mean: other
        work on the machine only ever slows a collective down (as the probe's other timings)."""
        return max(p.busbw_gbs for p in self.headline_points)

    def summary(self) -> str:
        return (f"all_reduce {self.dtype} sum, {self.backend}, {self.world_size} ranks on {self.n_hosts} host(s), "
                f"{len(self.points)} sizes {fmt_bytes(self.points[0].nbytes)}..{fmt_bytes(self.points[-1].nbytes)}, "
                f"busbw = algbw * 2(n-1)/n (nccl-tests)")

    def table(self) -> str:
        lines = [self.summary(),
                 f"{'size':>10} {'iters':>6} {'time_us':>12} {'algbw_GB/s':>11} {'busbw_GB/s':>11}"]
        for p in self.points:
            lines.append(f"{fmt_bytes(p.nbytes):>10} {p.iters:>6} {p.seconds * 1e6:>12.1f} {p.algbw_gbs:>11.3f} "
                         f"{p.busbw_gbs:>11.3f}")
        return "\n".join(lines)


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", KIB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def bus_bandwidth(nbytes: int, seconds: float, world_size: int) -> tuple[float, float]:
    """(algbw, busbw) in GB/s for one all-reduce of `nbytes` taking `seconds` on `world_size` ranks."""
    if nbytes <= 0 or seconds <= 0 or world_size < 1:
        raise ValueError(f"nbytes={nbytes}, seconds={seconds} must be > 0 and world_size={world_size} >= 1")
    algbw = nbytes / seconds / 1e9
    return algbw, algbw * 2 * (world_size - 1) / world_size


def default_sizes(quick: bool, cuda: bool) -> tuple[int, ...]:
    if cuda:
        return SIZES_QUICK_GPU if quick else SIZES_FULL_GPU
    return SIZES_QUICK_CPU if quick else SIZES_FULL_CPU
