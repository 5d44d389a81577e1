"""Parsers for what the probe reads: pure functions from a tool's text output to values.

Kept apart from the runners in probe.py so each can be tested on recorded outputs
(tests/unit/fixtures/probe/). Every parser takes the text as the tool prints it and returns plain
values or spec dataclasses; none runs a command or reads a file.

    lscpu                                         -> parse_lscpu        -> CpuSpec
    /proc/cpuinfo                                 -> parse_cpuinfo      -> CpuSpec (when lscpu is missing)
    /proc/meminfo                                 -> parse_meminfo      -> {field: bytes}
    nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv,noheader
                                                  -> parse_nvidia_smi_gpus -> [GpuInfo]
    nvidia-smi topo -m                            -> parse_nvidia_smi_topo -> Topology
    /sys/class/net/IFACE/speed                    -> parse_net_speed    -> Mb/s or None
    /sys/class/infiniband/DEV/ports/N/rate        -> parse_ib_rate      -> (Gb/s, "4X HDR")
    df -PT PATH                                   -> parse_df           -> [DfRow]
    findmnt -n -o TARGET,FSTYPE,SOURCE -T PATH    -> parse_findmnt      -> (target, fstype, source)
    /proc/mounts                                  -> fstype_from_mounts -> (mount point, fstype, source)

Slurm's outputs (sinfo, scontrol, sacct, squeue, host lists) are read in slurm_text.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from clusterlm.cluster.spec import CpuSpec

# CPU features that decide matmul speed, as /proc/cpuinfo and lscpu name them (x86 and Arm)
MATMUL_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "asimd", "sve",
                "sve2", "bf16")


def _kv_lines(text: str, sep: str = ":") -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        if sep in line:
            k, v = line.split(sep, 1)
            out.append((k.strip(), v.strip()))
    return out


def _int(text: str | None, default: int) -> int:
    m = re.match(r"\s*(\d+)", text or "")
    return int(m.group(1)) if m else default


# ---- CPU and memory ------------------------------------------------------------------------------------
def parse_lscpu(text: str) -> CpuSpec:
    """`lscpu` (default format). Hybrid CPUs list several core types; their cores are added up."""
    kv = _kv_lines(text)
    first = {}
    cores_per_socket = []
    for k, v in kv:
        first.setdefault(k, v)
        if k == "Core(s) per socket" or k == "Core(s) per cluster":
            cores_per_socket.append(_int(v, 1))
    threads = _int(first.get("CPU(s)"), 1)
    sockets = _int(first.get("Socket(s)") or first.get("Cluster(s)"), 1)
    cores = sum(cores_per_socket) * sockets if cores_per_socket else threads
    flags = set(first.get("Flags", "").split())
    return CpuSpec(model=first.get("Model name", "unknown"), sockets=sockets, cores=cores, threads=threads,
                   numa_nodes=_int(first.get("NUMA node(s)"), 1),
                   flags=tuple(f for f in MATMUL_FLAGS if f in flags))


def parse_cpuinfo(text: str) -> CpuSpec:
    """/proc/cpuinfo: one block per logical CPU."""
    blocks = [b for b in text.strip().split("\n\n") if b.strip()]
    model, flags = "unknown", set()
    cores: set[tuple[str, str]] = set()
    sockets: set[str] = set()
    for b in blocks:
        kv = dict(_kv_lines(b))
        model = kv.get("model name", kv.get("Model", model))
        flags |= set(kv.get("flags", kv.get("Features", "")).split())
        phys = kv.get("physical id", "0")
        sockets.add(phys)
        cores.add((phys, kv.get("core id", kv.get("processor", "0"))))
    return CpuSpec(model=model, sockets=max(1, len(sockets)), cores=max(1, len(cores)), threads=max(1, len(blocks)),
                   numa_nodes=1, flags=tuple(f for f in MATMUL_FLAGS if f in flags))


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo -> {"MemTotal": bytes, "MemAvailable": bytes, ...} (the file counts kB = KiB)."""
    out = {}
    for k, v in _kv_lines(text):
        parts = v.split()
        if parts and parts[0].isdigit():
            out[k] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


# ---- GPUs -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuInfo:
    name: str
    memory_mib: int
    compute_capability: str = ""


def parse_nvidia_smi_gpus(text: str) -> list[GpuInfo]:
    """`nvidia-smi --query-gpu=name,memory.total[,compute_cap] --format=csv,noheader[,nounits]`."""
    gpus = []
    for line in text.strip().splitlines():
        cols = [c.strip() for c in line.split(",")]
        if len(cols) < 2 or not cols[0]:
            continue
        mem = _int(cols[1], 0)
        cc = cols[2] if len(cols) > 2 and re.fullmatch(r"\d+\.\d+", cols[2]) else ""
        gpus.append(GpuInfo(cols[0], mem, cc))
    return gpus


@dataclass(frozen=True)
class Topology:
    gpus: tuple[str, ...]
    """GPU0, GPU1, ... in order"""
    matrix: dict[tuple[str, str], str] = field(default_factory=dict)
    """(row, column) -> connection: X, NV18, SYS, NODE, PHB, PXB, PIX"""
    nics: dict[str, str] = field(default_factory=dict)
    """NIC0 -> mlx5_0, from the NIC legend"""
    numa_affinity: dict[str, str] = field(default_factory=dict)

    def gpu_links(self) -> set[str]:
        """Connection kinds between distinct GPUs."""
        return {self.matrix[(a, b)] for a in self.gpus for b in self.gpus if a != b and (a, b) in self.matrix}

    def min_nvlinks(self) -> int | None:
        """The fewest bonded NVLinks between any two GPUs; None if some pair has no NVLink."""
        counts = []
        for kind in self.gpu_links():
            m = re.fullmatch(r"NV(\d+)", kind)
            if not m:
                return None
            counts.append(int(m.group(1)))
        return min(counts) if counts else None


def parse_nvidia_smi_topo(text: str) -> Topology:
    """`nvidia-smi topo -m`: a tab-separated matrix, then legends."""
    lines = text.splitlines()
    header_i = next((i for i, l in enumerate(lines) if re.search(r"\bGPU0\b", l) and l[:1] in ("\t", " ")), None)
    if header_i is None:
        return Topology(())
    header = [c.strip() for c in lines[header_i].split("\t")]
    header = [c for c in header if c] if header and header[0] == "" else header
    cols = [c for c in header if c]
    matrix, numa = {}, {}
    gpus = []
    for line in lines[header_i + 1:]:
        if not line.strip() or line.startswith("Legend"):
            break
        cells = [c.strip() for c in line.split("\t")]
        row, values = cells[0], cells[1:]
        if row.startswith("GPU"):
            gpus.append(row)
        for col, val in zip(cols, values):
            if re.fullmatch(r"(GPU|NIC)\d+", col):
                matrix[(row, col)] = val
            elif col == "NUMA Affinity" and row.startswith("GPU"):
                numa[row] = val
    nics = {}
    for line in lines:
        m = re.match(r"\s*(NIC\d+):\s*(\S+)", line)
        if m:
            nics[m.group(1)] = m.group(2)
    return Topology(tuple(gpus), matrix, nics, numa)


# ---- network --------------------------------------------------------------------------------------------
def parse_net_speed(text: str) -> int | None:
    """/sys/class/net/IFACE/speed in Mb/s; -1 or garbage (a link that is down, a virtual device) -> None."""
    try:
        v = int(text.strip())
    except ValueError:
        return None
    return v if v > 0 else None


def parse_ib_rate(text: str) -> tuple[float, str] | None:
    """/sys/class/infiniband/DEV/ports/N/rate: '200 Gb/sec (4X HDR)' -> (200.0, '4X HDR')."""
    m = re.match(r"\s*([\d.]+)\s*Gb/sec(?:\s*\(([^)]*)\))?", text)
    if not m:
        return None
    return float(m.group(1)), (m.group(2) or "").strip()


# ---- storage --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DfRow:
    filesystem: str
    fstype: str
    total_bytes: int
    avail_bytes: int
    mount: str


def parse_df(text: str) -> list[DfRow]:
    """`df -PT [PATH]` (POSIX format, 1024-byte blocks)."""
    rows = []
    for line in text.strip().splitlines()[1:]:
        parts = line.split()
        if len(parts) < 7 or not parts[2].isdigit():
            continue
        rows.append(DfRow(parts[0], parts[1], int(parts[2]) * 1024, int(parts[4]) * 1024, " ".join(parts[6:])))
    return rows


def _unescape_mount(s: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def parse_findmnt(text: str) -> tuple[str, str, str] | None:
    """`findmnt -n -o TARGET,FSTYPE,SOURCE -T PATH` -> (target, fstype, source)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    parts = line.split()
    if len(parts) < 2:
        return None
    target = _unescape_mount(parts[0].replace("\\x20", " "))
    return target, parts[1], parts[2] if len(parts) > 2 else ""


def fstype_from_mounts(text: str, path: str) -> tuple[str, str, str] | None:
    """/proc/mounts and an absolute path -> (mount point, fstype, source) of the longest matching mount."""
    best = None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        source, mnt, fstype = _unescape_mount(parts[0]), _unescape_mount(parts[1]), parts[2]
        inside = path == mnt or path.startswith(mnt.rstrip("/") + "/") or mnt == "/"
        if inside and (best is None or len(mnt) >= len(best[0])):
            best = (mnt, fstype, source)
    return best
