"""ClusterSpec: what a cluster has (nodes, devices, links, storage, scheduler), as TOML. Torch-free.

    spec = load_spec("h100-sxm-8x")                   # a bundled preset, or a TOML file
    save_spec(merge_specs([load_spec("n1.toml"), load_spec("n2.toml")]), "cluster.toml")

The `clusterlm cluster` command and the tree rendering live in show.py.

A spec is written by the probe (measured figures) or by hand/presets (cited figures). Units are in
the field names: GiB for memory (nvidia-smi's MiB / 1024), GB/s = 1e9 B/s for bandwidth, TFLOP/s =
1e12 FLOP/s, microseconds for latency. Peaks are DENSE. A device's peak may be left out when the
name is in clusterlm.cluster.hardware's table; a figure that is neither measured nor known stays
unknown (the planner says so and never substitutes another device's peak).
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from clusterlm.cluster import hardware
from clusterlm.config import from_dict, to_dict
from clusterlm.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"
DEVICE_KINDS = ("cuda", "rocm", "cpu")


@dataclass(frozen=True)
class CpuSpec:
    model: str = "unknown"
    sockets: int = 1
    cores: int = 1
    """physical cores on the node (all sockets)"""
    threads: int = 1
    """logical CPUs on the node"""
    numa_nodes: int = 1
    flags: tuple[str, ...] = ()
    """ISA features relevant to matmul speed (avx2, avx512f, avx512_bf16, amx_bf16, ...)"""


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    """as nvidia-smi/torch print it, or the CPU model for kind='cpu'"""
    kind: str = "cuda"
    count: int = 1
    memory_gib: float = 0.0
    """memory per device (for kind='cpu': the node's memory)"""
    memory_bandwidth_gbs: float | None = None
    """peak memory bandwidth (cited)"""
    measured_memory_bandwidth_gbs: float | None = None
    """large-copy bandwidth measured by the probe (read + write bytes / time)"""
    peak_tflops: dict[str, float] = field(default_factory=dict)
    """dense peak TFLOP/s by dtype (cited); empty = take it from the hardware table if known"""
    measured_tflops: dict[str, float] = field(default_factory=dict)
    """dense matmul TFLOP/s measured by the probe"""
    matmul_efficiency: dict[str, float] = field(default_factory=dict)
    """measured matmul TFLOP/s / peak, when the measurement is known only as a fraction"""
    train_efficiency: dict[str, float] = field(default_factory=dict)
    """fraction of peak (or of measured matmul TFLOP/s when there is no peak) that training
    steps reach: measured MFU; the planner uses it before any default"""
    matmul_sweep: dict[str, tuple[tuple[float, ...], ...]] = field(default_factory=dict)
    """probe: GEMM TFLOP/s by dtype over a grid of shapes, rows [M, N, K, TFLOP/s] for
    C (M, N) = A (M, K) @ W^T (K, N); the planner interpolates each GEMM of a step in it"""
    elementwise_sweep: tuple[tuple[float, ...], ...] = ()
    """probe: fp32 c = a + b at growing sizes, rows [bytes moved per call, GB/s] (caches to DRAM)"""
    kernel_sweep: dict[str, tuple[tuple[float, ...], ...]] = field(default_factory=dict)
    """probe: fp32 forward + backward of layernorm, rmsnorm, gelu_tanh, silu, cross_entropy and one
    fused AdamW step, rows [elements, ns per element] by size"""
    attention_sweep: tuple[tuple[float, ...], ...] = ()
    """probe: causal SDPA forward + backward, rows [T, Hd, TFLOP/s] (FLOPs as the planner counts them)"""
    op_overhead_us: float | None = None
    """probe: microseconds per tiny autograd op, forward + backward (dispatch, bookkeeping, launch)"""
    rnn_sweep: dict[str, tuple[tuple[float, ...], ...]] = field(default_factory=dict)
    """probe: one LSTM / GRU layer (D -> D) forward + backward, rows [B, D, us per call, us per time step]
    by arch (a layer of T steps costs us per call + T x us per time step); rows [B, D, us per time step]
    from older probes are read with no per-call part"""
    optimizer_us_per_tensor: float | None = None
    """probe: microseconds per parameter tensor of clip_grad_norm_ + fused AdamW step + zero_grad on
    tiny tensors (the optimizer's per-tensor bookkeeping, beyond its per-element work)"""
    step_fixed_us: float | None = None
    """probe: microseconds per optimizer step that no op accounts for (the training loop's Python:
    lr, loss sync, finiteness checks), the intercept of the per-tensor fit"""
    data_us_per_batch: float | None = None
    """probe: microseconds to cut one micro-batch of windows from a token memmap into (B, T) int64
    tensors, as the trainer's loader does"""
    log_us_per_step: float | None = None
    """probe: microseconds to write one metrics record (JSON line), outside the timed step"""
    compute_capability: str = ""
    source: str = ""

    def __post_init__(self) -> None:
        for dt, rows in self.matmul_sweep.items():
            bad = [r for r in rows if len(r) != 4 or min(r) <= 0]
            if dt not in hardware.DTYPES or bad or not rows:
                raise ConfigError(f"device {self.name!r}: matmul_sweep.{dt} needs a dtype in "
                                  f"{', '.join(hardware.DTYPES)} and rows [M, N, K, TFLOP/s] of positive numbers; "
                                  f"bad rows: {bad[:3]}")
        tables = [("elementwise_sweep", self.elementwise_sweep, 2, "[bytes, GB/s]"),
                  ("attention_sweep", self.attention_sweep, 3, "[T, Hd, TFLOP/s]")]
        tables += [(f"kernel_sweep.{k}", v, 2, "[elements, ns]") for k, v in self.kernel_sweep.items()]
        for key, rows, n, what in tables:
            if any(len(r) != n or min(r) <= 0 for r in rows):
                raise ConfigError(f"device {self.name!r}: {key} rows are {what}, all > 0; got {list(rows)[:3]}")
        for key, rows in self.rnn_sweep.items():
            width = {len(r) for r in rows}
            if not rows or len(width) != 1 or width - {3, 4} or any(min(r[:2]) <= 0 or r[-1] <= 0 or min(r) < 0
                                                                     for r in rows):
                raise ConfigError(f"device {self.name!r}: rnn_sweep.{key} rows are [B, D, us per call, us per time "
                                  f"step] (B, D and the step > 0, the call >= 0; older probes: [B, D, us per time "
                                  f"step]), all of one width; got {list(rows)[:3]}")
        if self.kind not in DEVICE_KINDS:
            raise ConfigError(f"device {self.name!r}: kind={self.kind!r}; expected one of {', '.join(DEVICE_KINDS)}")
        if self.count < 1:
            raise ConfigError(f"device {self.name!r}: count={self.count} must be >= 1")
        if self.memory_gib < 0:
            raise ConfigError(f"device {self.name!r}: memory_gib={self.memory_gib:g} must be >= 0")
        for table in ("peak_tflops", "measured_tflops", "matmul_efficiency", "train_efficiency"):
            bad = set(getattr(self, table)) - set(hardware.DTYPES)
            if bad:
                raise ConfigError(f"device {self.name!r}: {table} has unknown dtypes {sorted(bad)}; "
                                  f"valid: {', '.join(hardware.DTYPES)}")
            # a rate or efficiency of 0 or below gave negative (or 'unknown') step times and MFU
            for dt, v in getattr(self, table).items():
                if not v > 0:
                    raise ConfigError(f"device {self.name!r}: {table}.{dt}={v:g} must be > 0")
        for key in ("memory_bandwidth_gbs", "measured_memory_bandwidth_gbs"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise ConfigError(f"device {self.name!r}: {key}={v:g} must be > 0 (or left out)")
        for key in ("op_overhead_us", "optimizer_us_per_tensor", "step_fixed_us", "data_us_per_batch",
                    "log_us_per_step"):
            v = getattr(self, key)
            if v is not None and v < 0:
                raise ConfigError(f"device {self.name!r}: {key}={v:g} must be >= 0 (or left out)")

    def peak(self, dtype: str) -> tuple[float | None, str]:
        """(dense peak TFLOP/s or None, where it came from)."""
        if dtype in self.peak_tflops:
            return self.peak_tflops[dtype], "spec"
        acc = hardware.lookup_accelerator(self.name) if self.kind != "cpu" else None
        if acc and dtype in acc.peak_tflops:
            return acc.peak_tflops[dtype], f"hardware table ({acc.key}: {acc.source})"
        return None, "unknown"

    def matmul_tflops(self, dtype: str) -> float | None:
        """Measured matmul TFLOP/s, directly or as efficiency x peak."""
        if dtype in self.measured_tflops:
            return self.measured_tflops[dtype]
        peak, _ = self.peak(dtype)
        if dtype in self.matmul_efficiency and peak:
            return self.matmul_efficiency[dtype] * peak
        return None


@dataclass(frozen=True)
class LinkSpec:
    name: str
    bandwidth_gbs: float
    """per direction, per device (intra-node) or per adapter (inter-node)"""
    latency_us: float = 5.0
    count: int = 1
    """adapters per node (inter-node links)"""
    achievable_fraction: float | None = None
    """fraction of bandwidth_gbs that ring collectives reach; None = hardware table default"""
    measured_busbw_gbs: float | None = None
    """all-reduce bus bandwidth measured across the link"""
    source: str = ""

    def __post_init__(self) -> None:
        if self.bandwidth_gbs <= 0 or self.latency_us < 0 or self.count < 1:
            raise ConfigError(f"link {self.name!r}: bandwidth_gbs={self.bandwidth_gbs} must be > 0, "
                              f"latency_us={self.latency_us} >= 0, count={self.count} >= 1")
        # 0 divided every collective's bytes by a zero bus bandwidth (ZeroDivisionError in plan)
        if self.achievable_fraction is not None and not 0 < self.achievable_fraction <= 1:
            raise ConfigError(f"link {self.name!r}: achievable_fraction={self.achievable_fraction:g} must be in "
                              f"(0, 1] (or left out for the hardware table's)")
        if self.measured_busbw_gbs is not None and not self.measured_busbw_gbs > 0:
            raise ConfigError(f"link {self.name!r}: measured_busbw_gbs={self.measured_busbw_gbs:g} must be > 0 "
                              f"(or left out)")


@dataclass(frozen=True)
class NodeType:
    name: str
    count: int = 1
    memory_gib: float = 0.0
    cpu: CpuSpec = field(default_factory=CpuSpec)
    device: DeviceSpec | None = None
    """the accelerators (or, for CPU-only nodes, the CPU as one device)"""
    intra_link: LinkSpec | None = None
    """device-to-device link inside the node"""
    hostnames: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"node type {self.name!r}: count={self.count} must be >= 1")

    @property
    def devices_per_node(self) -> int:
        return self.device.count if self.device else 0


@dataclass(frozen=True)
class StorageSpec:
    path: str
    fstype: str = "unknown"
    source: str = ""
    """device or server behind the mount"""
    total_gb: float | None = None
    free_gb: float | None = None
    write_gbs: float | None = None
    """measured: write + fsync"""
    read_gbs: float | None = None
    """measured: read after dropping the file from the page cache"""


@dataclass(frozen=True)
class PartitionSpec:
    name: str
    default: bool = False
    avail: str = "up"
    timelimit: str = ""
    nodes: int = 0
    nodelist: str = ""
    gres: str = ""
    cpus: str = ""
    memory_mb: str = ""


@dataclass(frozen=True)
class SchedulerSpec:
    kind: str = "slurm"
    version: str = ""
    partitions: tuple[PartitionSpec, ...] = ()


@dataclass(frozen=True)
class ProbeQuality:
    """How undisturbed the probe's measurements were: the CPU time other processes took while it
    measured (machine-wide busy time from /proc/stat minus the probe's own), and the spread of its
    repeated micro-benchmarks. `disturbed` = foreign_cpus > max_foreign_cpus or spread > max_spread;
    the planner refuses such a spec without --force."""
    disturbed: bool = False
    foreign_cpus: float = 0.0
    """CPUs' worth of other processes' work, averaged over the measurement"""
    max_foreign_cpus: float = 0.0
    """the threshold used"""
    wall_s: float = 0.0
    busy_cpu_s: float = 0.0
    """all CPUs' busy time over the measurement (/proc/stat)"""
    own_cpu_s: float = 0.0
    """the probe's own user + system time over the measurement (all its threads)"""
    spread: float = 0.0
    """largest (p75 - p25) / median over the repeated per-op micro-benchmarks"""
    max_spread: float = 0.0
    load_avg_1m: float = 0.0
    """at the end of the measurement"""
    reasons: tuple[str, ...] = ()

    def summary(self) -> str:
        return (f"other processes used {self.foreign_cpus:.2f} CPUs on average over {self.wall_s:.1f} s "
                f"(busy {self.busy_cpu_s:.1f} CPU-s, the probe's own {self.own_cpu_s:.1f}; limit "
                f"{self.max_foreign_cpus:g}), micro-benchmark spread {self.spread:.0%} (limit {self.max_spread:.0%}), "
                f"load average {self.load_avg_1m:g}" + (f": {'; '.join(self.reasons)}" if self.reasons else ""))


@dataclass(frozen=True)
class ClusterSpec:
    name: str = "cluster"
    description: str = ""
    node_types: tuple[NodeType, ...] = ()
    inter_node_link: LinkSpec | None = None
    storage: tuple[StorageSpec, ...] = ()
    scheduler: SchedulerSpec | None = None
    notes: dict[str, str] = field(default_factory=dict)
    """probe steps that failed soft: step -> 'unavailable: reason', and other remarks"""
    probe: ProbeQuality | None = None
    """how undisturbed the probe's measurements were (None: hand-written or a preset)"""

    def __post_init__(self) -> None:
        names = [n.name for n in self.node_types]
        if len(set(names)) != len(names):
            raise ConfigError(f"cluster {self.name!r}: node type names must be unique, got {names}")

    def node_type(self, name: str | None = None) -> NodeType:
        """The named node type, or (None) the one with most devices in total."""
        if not self.node_types:
            raise ConfigError(f"cluster {self.name!r} has no node types")
        if name is None:
            return max(self.node_types, key=lambda n: n.count * n.devices_per_node)
        for n in self.node_types:
            if n.name == name:
                return n
        raise ConfigError(f"cluster {self.name!r} has no node type {name!r}; "
                          f"known: {', '.join(n.name for n in self.node_types)}")


# ---- dicts <-> dataclasses ------------------------------------------------------------------------
def spec_from_dict(data: dict[str, Any], where: str = "spec") -> ClusterSpec:
    """A ClusterSpec from a TOML tree, through the run config's typed loader (same messages for
    unknown keys, wrong types and non-finite numbers); numbers are taken where text is expected."""
    return from_dict(ClusterSpec, data, where, numbers_as_str=True)


def spec_to_toml(spec: ClusterSpec) -> str:
    """The spec as TOML; None, empty tables and empty lists are left out."""
    import tomli_w

    return tomli_w.dumps(to_dict(spec, drop_empty=True))


def save_spec(spec: ClusterSpec, path: str | Path) -> None:
    from clusterlm.fsutil import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, spec_to_toml(spec))


def presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PRESET_DIR.glob("*.toml"))}


def load_spec(path_or_preset: str | Path) -> ClusterSpec:
    """Read a spec TOML file, or a bundled preset by name (see `presets()`)."""
    path = Path(path_or_preset)
    if not path.is_file():
        known = presets()
        if str(path_or_preset) in known:
            path = known[str(path_or_preset)]
        else:
            close = difflib.get_close_matches(str(path_or_preset), known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise FileNotFoundError(f"cluster spec {path_or_preset} is neither a file nor a preset{hint}; "
                                    f"presets: {', '.join(known)}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e
    return spec_from_dict(data, where=str(path))


# ---- merging probe outputs ---------------------------------------------------------------------------
def _signature(n: NodeType) -> tuple:
    d = n.device
    return (n.cpu.model, n.cpu.cores, round(n.memory_gib), d.name if d else "", d.count if d else 0,
            round(d.memory_gib) if d else 0)


def _min_dict(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: min(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in {**a, **b}}


def _min_opt(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _slower(a: DeviceSpec | None, b: DeviceSpec | None) -> bool:
    """Whether device `a` measured a lower matmul rate than `b` (fp32 where both have it, else the
    first dtype both have); False when either has no measured figure."""
    if a is None or b is None:
        return False
    common = [k for k in a.measured_tflops if k in b.measured_tflops]
    if not common:
        return False
    k = "fp32" if "fp32" in common else common[0]
    return a.measured_tflops[k] < b.measured_tflops[k]


def _slower_link(a: LinkSpec | None, b: LinkSpec | None) -> LinkSpec | None:
    """The link with the lower measured bus bandwidth (else the lower rated one); either when one is missing."""
    if a is None or b is None:
        return a or b
    return min((a, b), key=lambda l: (l.measured_busbw_gbs if l.measured_busbw_gbs is not None
                                      else float("inf"), l.bandwidth_gbs * l.count))


def merge_specs(specs: list[ClusterSpec], name: str = "cluster") -> ClusterSpec:
    """Merge one-node specs (probe outputs) into one cluster: identical nodes become one node type
    with a count; measured figures keep the slowest node's (synchronous training runs at its pace)."""
    if not specs:
        raise ConfigError("merge needs at least one spec")
    hosts = [h for spec in specs for n in spec.node_types for h in n.hostnames]
    twice = sorted({h for h in hosts if hosts.count(h) > 1})
    if twice:  # two probes of one node would be counted as two nodes (and an inter-node link assumed)
        raise ConfigError(f"host(s) {', '.join(twice)} appear in more than one spec: merge one probe per node")
    groups: dict[tuple, NodeType] = {}
    for spec in specs:
        for n in spec.node_types:
            sig = _signature(n)
            if sig not in groups:
                groups[sig] = n
                continue
            g = groups[sig]
            # the slower node's device: its per-op figures (sweeps, overheads) are the ones the planner
            # uses; the headline matmul and memory figures are each the lower of the two
            slow, fast = (n.device, g.device) if _slower(n.device, g.device) else (g.device, n.device)
            dev = slow
            if slow and fast:
                dev = dataclasses.replace(
                    slow, measured_tflops=_min_dict(slow.measured_tflops, fast.measured_tflops),
                    measured_memory_bandwidth_gbs=_min_opt(slow.measured_memory_bandwidth_gbs,
                                                           fast.measured_memory_bandwidth_gbs))
            groups[sig] = dataclasses.replace(g, count=g.count + n.count, device=dev or fast,
                                              intra_link=_slower_link(g.intra_link, n.intra_link),
                                              hostnames=g.hostnames + n.hostnames)
    node_types = []
    for i, n in enumerate(groups.values()):
        node_types.append(dataclasses.replace(n, name=n.name if len(groups) == 1 else f"{n.name}-{i}"))
    links = [s.inter_node_link for s in specs if s.inter_node_link]
    inter = min(links, key=lambda l: l.bandwidth_gbs * l.count) if links else None
    storage: dict[tuple[str, str], StorageSpec] = {}
    for spec in specs:
        for st in spec.storage:
            key = (st.path, st.fstype)
            old = storage.get(key)
            storage[key] = st if old is None else dataclasses.replace(
                old, write_gbs=_min_opt(old.write_gbs, st.write_gbs), read_gbs=_min_opt(old.read_gbs, st.read_gbs))
    scheduler = next((s.scheduler for s in specs if s.scheduler), None)
    notes = {}
    for spec in specs:
        host = spec.node_types[0].hostnames[0] if spec.node_types and spec.node_types[0].hostnames else spec.name
        notes.update({f"{host}: {k}": v for k, v in spec.notes.items()})
    probes = [s.probe for s in specs if s.probe is not None]  # the most disturbed node's figures
    probe = max(probes, key=lambda q: (q.disturbed, q.foreign_cpus)) if probes else None
    return ClusterSpec(name=name, description=f"merged from {len(specs)} node spec(s)", node_types=tuple(node_types),
                       inter_node_link=inter, storage=tuple(storage.values()), scheduler=scheduler, notes=notes,
                       probe=probe)
