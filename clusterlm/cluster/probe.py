"""`clusterlm probe`: inventory and benchmark the node this runs on; write a one-node ClusterSpec.

    clusterlm probe                                  # print the node as a tree
    clusterlm probe --out node.toml --quick          # write it (clusterlm plan --cluster node.toml)
    clusterlm probe --out node.toml --checkpoint-dir /scratch/ckpt
    torchrun --nproc-per-node 8 -m clusterlm probe --out node.toml     # + all-reduce busbw over 8 ranks
    clusterlm probe --all-nodes --out cluster.toml   # inside salloc/sbatch: every node (probe_all.py)

Inventory (no torch): CPU (lscpu, else /proc/cpuinfo), memory (/proc/meminfo), GPUs (nvidia-smi
query and `topo -m`), network (/sys/class/net/*/speed, /sys/class/infiniband/*/ports/*/rate),
storage of the working and checkpoint folders (df -PT, findmnt, /proc/mounts), Slurm (sinfo,
scontrol --version). Measurements (torch, imported here only): dense matmul TFLOP/s per device
(fp32, and bf16 where it is supported), large-copy memory bandwidth, and write+fsync / read
bandwidth of the checkpoint folder. Each step fails soft: what could not be read or measured is
recorded in the spec's [notes] as "unavailable: reason", never guessed. Text parsing lives in
clusterlm.cluster.parsers; this file only runs things.

Under torchrun or srun (world size > 1) every rank first joins an all-reduce sweep
(clusterlm.parallel.collectives); rank 0 then probes its node alone and writes the spec with the
measured bus bandwidth in the intra-node link (all ranks on one host) or the inter-node link.
With --no-allreduce, local rank 0 of every node probes its node (what `--all-nodes` runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import logging
import os
import platform
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from clusterlm.cluster import hardware, parsers, slurm_text
from clusterlm.cluster.show import render_tree
from clusterlm.cluster.spec import (ClusterSpec, CpuSpec, DeviceSpec, LinkSpec, NodeType, ProbeQuality, SchedulerSpec,
                                    StorageSpec, save_spec)
from clusterlm.cluster.microbench import (ATTENTION_HD, ATTENTION_HD_QUICK, ATTENTION_T_CPU, ATTENTION_T_GPU, DEFAULT_MAX_FOREIGN_CPUS,
                                          DEFAULT_MAX_SPREAD, ELEMENTWISE_ELEMS, ELEMENTWISE_ELEMS_QUICK, KERNEL_ELEMS,
                                          SWEEP_GRID_CPU, SWEEP_GRID_CPU_QUICK, SWEEP_GRID_GPU, ForeignCpu, measure_attention_sweep,
                                          measure_copy_bandwidth, measure_data_loading, measure_elementwise_sweep,
                                          measure_kernel_sweep, measure_log_record, measure_matmul_sweep,
                                          measure_matmul_tflops, measure_op_overhead, measure_optimizer_fixed,
                                          measure_storage, measure_rnn_sweep, RNN_BATCH, RNN_BATCH_QUICK, RNN_DIM,
                                          RNN_DIM_QUICK)
from clusterlm.cluster.allreduce import AllReduceResult, fmt_bytes
from clusterlm.fsutil import check_output_path
from clusterlm.parallel.launch import read_env

log = logging.getLogger(__name__)
GIB = 1024**3


def node_name(env: dict[str, str] | None = None) -> str:
    """This node's name: Slurm's own (SLURMD_NODENAME, set by srun in every task; the name its node
    lists use) when running under srun, else the host name."""
    env = os.environ if env is None else env
    return env.get("SLURMD_NODENAME") or socket.gethostname()


def _run(cmd: list[str], timeout: float = 20.0, env: dict[str, str] | None = None) -> str:
    """Output of a command; raises RuntimeError with the reason when it is missing or fails."""
    if shutil.which(cmd[0]) is None:
        raise RuntimeError(f"{cmd[0]} not found")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(cmd)} timed out after {timeout:g} s") from None
    if r.returncode != 0:
        why = " | ".join(line.strip() for line in (r.stderr or r.stdout).strip().splitlines())  # one line for [notes]
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {why[:200]}")
    return r.stdout


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


class Probe:
    """Runs steps, keeping each one's result or its failure reason."""

    def __init__(self) -> None:
        self.notes: dict[str, str] = {}

    def step(self, name: str, fn: Callable[[], Any], default: Any = None) -> Any:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a probe step fails soft, by design, and says why
            self.notes[name] = f"unavailable: {e}"
            log.info("probe %s: unavailable: %s", name, e)
            return default


# ---- inventory -------------------------------------------------------------------------------------
def probe_cpu() -> CpuSpec:
    try:
        # lscpu translates its field names ("Modellname:", "Kern(e) pro Sockel:", "Markierungen:" in a German
        # locale), which parse_lscpu would not find: read it in the C locale
        return parsers.parse_lscpu(_run(["lscpu"], env={**os.environ, "LC_ALL": "C"}))
    except RuntimeError:
        return parsers.parse_cpuinfo(_read("/proc/cpuinfo"))


def other_cpu_note(node: NodeType, what: str) -> str | None:
    """A warning when `node`'s figures were probed on a CPU other than this machine's (CPU nodes
    only: a GPU node's CPU does not set its step times), naming both; None when they match or this
    machine's CPU cannot be read. Figures from one CPU do not carry to another (issue 20)."""
    if node.device is None or node.device.kind != "cpu":
        return None
    try:
        here = probe_cpu().model
    except (OSError, RuntimeError):
        return None
    there = node.cpu.model
    if there in ("unknown", "") or here in ("unknown", "") or there == here:
        return None
    return (f"{what} was probed on CPU {there!r}; this machine is {here!r}: its step times and peaks are that "
            f"CPU's, not this one's (re-probe here with `clusterlm probe --out FILE`)")


def probe_gpus() -> list[parsers.GpuInfo]:
    try:
        out = _run(["nvidia-smi", "--query-gpu=name,memory.total,compute_cap", "--format=csv,noheader"])
    except RuntimeError as e:
        if "not found" in str(e):
            raise
        # drivers before 510 do not know compute_cap
        out = _run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"])
    gpus = parsers.parse_nvidia_smi_gpus(out)
    if not gpus:
        raise RuntimeError("nvidia-smi listed no GPUs")
    return gpus


def probe_intra_link(gpu_name: str) -> LinkSpec | None:
    topo = parsers.parse_nvidia_smi_topo(_run(["nvidia-smi", "topo", "-m"]))
    if len(topo.gpus) < 2:
        return None
    n = topo.min_nvlinks()
    if n:
        link = hardware.nvlink_link(n, gpu_name)
        return LinkSpec(f"NVLink NV{n}", link.bandwidth_gbs, link.latency_us, 1, link.achievable_fraction,
                        source=f"nvidia-smi topo -m: every GPU pair NV{n} or more")
    kinds = sorted(topo.gpu_links())
    link = hardware.LINKS["pcie4-x16"]
    return LinkSpec(f"PCIe ({'/'.join(kinds)})", link.bandwidth_gbs, link.latency_us, 1, link.achievable_fraction,
                    source=f"nvidia-smi topo -m shows {', '.join(kinds)} between GPUs; PCIe 4 x16 assumed")


def probe_network() -> LinkSpec | None:
    """The inter-node link: InfiniBand adapters if any (all ports up at the top rate), else the
    fastest Ethernet interface."""
    rates = []
    for path in sorted(glob.glob("/sys/class/infiniband/*/ports/*/rate")):
        state = Path(path).with_name("state")
        if state.exists() and "ACTIVE" not in _read(str(state)):
            continue
        r = parsers.parse_ib_rate(_read(path))
        if r:
            rates.append(r)
    if rates:
        top = max(g for g, _ in rates)
        label = next(lbl for g, lbl in rates if g == top)
        key = hardware.IB_RATE_LINKS.get(label.split()[-1] if label else "", "")
        base = hardware.LINKS.get(key)
        return LinkSpec(f"InfiniBand {top:g} Gb/s ({label})", top / 8, base.latency_us if base else 3.0,
                        sum(1 for g, _ in rates if g == top), base.achievable_fraction if base else None,
                        source="/sys/class/infiniband/*/ports/*/rate (active ports)")
    speeds = []
    for path in sorted(glob.glob("/sys/class/net/*/speed")):
        iface = Path(path).parent.name
        if iface == "lo" or _virtual_interface(Path(path).parent):
            continue
        try:
            s = parsers.parse_net_speed(_read(path))
        except OSError:  # reading the speed of a down or virtual interface fails with EINVAL
            continue
        if s:
            speeds.append((s, iface))
    if not speeds:
        raise RuntimeError("no InfiniBand port and no Ethernet interface with a known speed")
    speed, iface = max(speeds)
    link = hardware.ethernet_link(speed)
    return LinkSpec(f"Ethernet {speed / 1000:g} Gb/s ({iface})", link.bandwidth_gbs, link.latency_us, 1,
                    link.achievable_fraction, source=f"/sys/class/net/{iface}/speed = {speed} Mb/s")


def _virtual_interface(iface_dir: Path) -> bool:
    """A software interface (veth pair, bridge, tunnel: sysfs links it under devices/virtual/net), which reaches
    no other node (a container's veth reports 10000 Mb/s); a bond (its bonding/ folder) joins real ones and counts."""
    return "/virtual/" in os.path.realpath(iface_dir) and not (iface_dir / "bonding").is_dir()


def probe_storage(path: str) -> StorageSpec:
    """Filesystem type and space of `path` (or of its nearest existing parent, for a folder that a
    run will create)."""
    path = os.path.abspath(path)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    fstype = source = "unknown"
    total = free = None
    try:
        rows = parsers.parse_df(_run(["df", "-PT", existing]))
        if rows:
            fstype, source = rows[0].fstype, rows[0].filesystem
            total, free = rows[0].total_bytes / 1e9, rows[0].avail_bytes / 1e9
    except RuntimeError:
        found = parsers.fstype_from_mounts(_read("/proc/mounts"), existing)
        if found:
            _, fstype, source = found
        st = os.statvfs(existing)
        total, free = st.f_blocks * st.f_frsize / 1e9, st.f_bavail * st.f_frsize / 1e9
    return StorageSpec(path=path, fstype=fstype, source=source, total_gb=total, free_gb=free)


def probe_slurm() -> SchedulerSpec:
    try:
        version = slurm_text.parse_scontrol_version(_run(["scontrol", "--version"])) or ""
    except RuntimeError as e:
        if "fetch_config" in str(e):  # client installed, no slurm.conf and no DNS SRV record to find one
            raise RuntimeError("Slurm's commands are installed but find no cluster configuration (no "
                               "slurm.conf, SLURM_CONF unset, no DNS SRV record): not a Slurm node") from None
        raise
    parts = slurm_text.parse_sinfo(_run(["sinfo", "-h", "-o", slurm_text.SINFO_FORMAT]))
    return SchedulerSpec("slurm", version, tuple(parts))


def measure_step_primitives(probe: Probe, device: str, dtypes: list[str], quick: bool, cpu: bool,
                            spreads: list[float] | None = None) -> dict[str, Any]:
    """The figures the planner's per-op step model reads (DeviceSpec fields of the same names); a
    failed measurement is left out and noted, and the planner then says which figure is missing.
    The spread of every repeated timing is appended to `spreads`."""
    grid = (SWEEP_GRID_CPU_QUICK if quick else SWEEP_GRID_CPU) if cpu else SWEEP_GRID_GPU
    per_shape = 0.02 if quick else 0.1
    out: dict[str, Any] = {"matmul_sweep": {}}
    for dt in dtypes:
        if dt not in (("fp32",) if cpu else ("fp32", "bf16", "fp16")):  # CPUs train in fp32 (a shorter probe)
            continue
        rows = probe.step(f"matmul_sweep_{dt}_{device}",
                          lambda dt=dt: measure_matmul_sweep(device, dt, grid, per_shape, spreads))
        if rows:
            out["matmul_sweep"][dt] = rows
    sizes = ELEMENTWISE_ELEMS_QUICK if quick else ELEMENTWISE_ELEMS
    ew = probe.step(f"elementwise_sweep_{device}", lambda: measure_elementwise_sweep(device, sizes, 0.05 if quick
                                                                                       else 0.2))
    if ew:
        out["elementwise_sweep"] = ew
    ks = probe.step(f"kernel_sweep_{device}", lambda: measure_kernel_sweep(
        device, KERNEL_ELEMS if cpu else tuple(n * 64 for n in KERNEL_ELEMS), 0.05 if quick else 0.2, spreads))
    if ks:
        out["kernel_sweep"] = ks
    att = probe.step(f"attention_sweep_{device}", lambda: measure_attention_sweep(
        device, ATTENTION_T_CPU if cpu else ATTENTION_T_GPU, ATTENTION_HD_QUICK if quick else ATTENTION_HD,
        0.05 if quick else 0.2, spreads))
    if att:
        out["attention_sweep"] = att
    oh = probe.step(f"op_overhead_{device}", lambda: measure_op_overhead(device, 0.2 if quick else 0.5,
                                                                           spreads=spreads))
    if oh is not None:
        out["op_overhead_us"] = round(oh, 3)
    rnn = {}
    for arch in ("lstm", "gru"):
        rows = probe.step(f"rnn_sweep_{arch}_{device}", lambda arch=arch: measure_rnn_sweep(
            device, arch, RNN_BATCH_QUICK if quick else RNN_BATCH, RNN_DIM_QUICK if quick else RNN_DIM,
            0.03 if quick else 0.1, spreads))
        if rows:
            rnn[arch] = rows
    if rnn:
        out["rnn_sweep"] = rnn
    # fixed costs of a step no op accounts for: they dominate a sub-1M-parameter model's step
    fixed = probe.step(f"optimizer_fixed_{device}", lambda: measure_optimizer_fixed(device, 0.2 if quick else 0.5,
                                                                                     spreads))
    if fixed is not None:
        out["optimizer_us_per_tensor"], out["step_fixed_us"] = round(fixed[0], 3), round(fixed[1], 2)
    data = probe.step("data_loading", lambda: measure_data_loading(12, 64, 0.1 if quick else 0.3))
    if data is not None:
        out["data_us_per_batch"] = round(data, 2)
    logrec = probe.step("log_record", lambda: measure_log_record(0.05 if quick else 0.1))
    if logrec is not None:
        out["log_us_per_step"] = round(logrec, 2)
    return out


def probe_quality(fc: ForeignCpu, spreads: list[float], *, max_foreign_cpus: float = DEFAULT_MAX_FOREIGN_CPUS,
                  max_spread: float = DEFAULT_MAX_SPREAD) -> ProbeQuality:
    """The `[probe]` section: other processes' CPU use over the measurement and the largest spread of
    the repeated micro-benchmarks (their median: single cold-cache calls of small ops vary by 50-100%
    on a quiet machine, while other work widens the spread of most of them)."""
    ordered = sorted(spreads)
    sp = ordered[len(ordered) // 2] if ordered else 0.0
    reasons = []
    if not fc.available:
        reasons.append("/proc/stat unreadable: other processes' CPU time unknown")
    if fc.foreign_cpus > max_foreign_cpus:
        reasons.append(f"other processes used {fc.foreign_cpus:.2f} CPUs (> {max_foreign_cpus:g})")
    if sp > max_spread:
        reasons.append(f"repeated micro-benchmarks spread {sp:.0%} (> {max_spread:.0%})")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return ProbeQuality(disturbed=fc.foreign_cpus > max_foreign_cpus or sp > max_spread, foreign_cpus=round(fc.foreign_cpus, 3),
                        max_foreign_cpus=max_foreign_cpus, wall_s=round(fc.wall_s, 2), busy_cpu_s=round(fc.busy_s, 2),
                        own_cpu_s=round(fc.own_s, 2), spread=round(sp, 3), max_spread=max_spread,
                        load_avg_1m=round(load, 2), reasons=tuple(reasons))


def _measure_device(probe: Probe, device: str, dtypes: list[str], quick: bool, cpu: bool) -> tuple[dict, float | None]:
    seconds = 0.3 if quick else 1.5
    if cpu:
        sizes = {"fp32": 1024 if quick else 2048, "bf16": 512 if quick else 1024}
    else:
        sizes = {d: 4096 if quick else 8192 for d in dtypes}
    measured = {}
    for dt in dtypes:
        v = probe.step(f"matmul_{dt}_{device}", lambda dt=dt: measure_matmul_tflops(device, dt, sizes.get(dt, 1024),
                                                                                     seconds))
        if v is not None:
            measured[dt] = round(v, 4)
    nbytes = (64 << 20 if quick else 256 << 20) if cpu else (256 << 20 if quick else 1 << 30)
    bw = probe.step(f"memory_bandwidth_{device}", lambda: measure_copy_bandwidth(device, nbytes, seconds))
    return measured, (round(bw, 2) if bw is not None else None)


def _cpu_bf16_supported(cpu: CpuSpec) -> bool:
    """bf16 matmul is only worth measuring where the ISA has it (else PyTorch emulates it slowly)."""
    return any(f in cpu.flags for f in ("avx512_bf16", "amx_bf16", "bf16", "sve"))


# ---- the node spec --------------------------------------------------------------------------------------
def probe_node(*, quick: bool = False, checkpoint_dir: str = ".", measure: bool = True,
               work_dir: str = ".", hostname: str | None = None) -> ClusterSpec:
    """Probe this node; return it as a one-node ClusterSpec. Never raises for a missing tool."""
    probe = Probe()
    host = hostname or socket.gethostname()
    cpu = probe.step("cpu", probe_cpu, CpuSpec(model=platform.processor() or "unknown"))
    mem = probe.step("memory", lambda: parsers.parse_meminfo(_read("/proc/meminfo")), {})
    memory_gib = round(mem.get("MemTotal", 0) / GIB, 2)
    gpus = probe.step("gpus", probe_gpus, [])
    intra = None
    if gpus:
        intra = probe.step("gpu_topology", lambda: probe_intra_link(gpus[0].name))
    inter = probe.step("network", probe_network)
    storage = []
    for folder in dict.fromkeys([os.path.abspath(work_dir), os.path.abspath(checkpoint_dir)]):
        st = probe.step(f"storage {folder}", lambda f=folder: probe_storage(f))
        if st:
            storage.append(st)
    scheduler = probe.step("slurm", probe_slurm)

    torch_ok = measure and probe.step("torch", lambda: __import__("torch") and True, False)
    if measure:  # other work on the node slows every measurement: say so beside the figures
        load = probe.step("load", lambda: float(_read("/proc/loadavg").split()[0]))
        if load is not None and load > 0.25 * max(cpu.threads, 1):
            probe.notes["load"] = (f"1-minute load average {load:g} on {cpu.threads} logical CPUs when measuring: "
                                   f"other processes shared the node, figures may be low")
    fc, spreads = ForeignCpu(), []  # other processes' CPU time while the device is measured
    if torch_ok:
        fc.__enter__()
    if gpus:
        name = gpus[0].name
        if len({g.name for g in gpus}) > 1:
            probe.notes["gpus"] = f"mixed GPU models {sorted({g.name for g in gpus})}; described as {name}"
        acc = hardware.lookup_accelerator(name)
        measured, bw, prims = {}, None, {}
        if torch_ok:
            import torch

            if torch.cuda.is_available():
                dts = ["fp32", "tf32"] + (["bf16"] if torch.cuda.is_bf16_supported() else []) + ["fp16"]
                measured, bw = _measure_device(probe, "cuda:0", dts, quick, cpu=False)
                prims = measure_step_primitives(probe, "cuda:0", dts, quick, cpu=False, spreads=spreads)
            else:
                probe.notes["gpu_measurement"] = "unavailable: torch sees no CUDA device"
        device = DeviceSpec(name=name, kind="cuda", count=len(gpus), memory_gib=round(min(g.memory_mib for g in gpus)
                                                                                         / 1024, 2),
                            memory_bandwidth_gbs=acc.memory_bandwidth_gbs if acc else None,
                            measured_memory_bandwidth_gbs=bw, measured_tflops=measured, **prims,
                            compute_capability=gpus[0].compute_capability,
                            source=(f"probe; peaks from hardware table {acc.key}" if acc else
                                    "probe; not in the hardware table: peak unknown, measured figures only"))
    else:
        measured, bw, prims = {}, None, {}
        if torch_ok:
            dts = ["fp32"] + (["bf16"] if _cpu_bf16_supported(cpu) else [])
            measured, bw = _measure_device(probe, "cpu", dts, quick, cpu=True)
            prims = measure_step_primitives(probe, "cpu", dts, quick, cpu=True, spreads=spreads)
            import torch

            probe.notes["cpu_threads"] = f"torch intra-op threads during the measurement: {torch.get_num_threads()}"
        device = DeviceSpec(name=cpu.model, kind="cpu", count=1, memory_gib=memory_gib,
                            measured_memory_bandwidth_gbs=bw, measured_tflops=measured, **prims,
                            source="probe: CPU as one device; no cited peak (depends on cores, clocks, ISA)")
    quality = None
    if torch_ok:
        fc.__exit__(None, None, None)
        quality = probe_quality(fc, spreads)
        if quality.disturbed:
            log.warning("probe disturbed: %s", quality.summary())
    if measure and storage:
        target = storage[-1]
        nbytes = (32 << 20) if quick else (256 << 20)
        wr = probe.step(f"storage_bandwidth {target.path}", lambda: measure_storage(target.path, nbytes))
        if wr:
            storage[-1] = StorageSpec(target.path, target.fstype, target.source, target.total_gb, target.free_gb,
                                      round(wr[0], 3), round(wr[1], 3))
    node = NodeType(name=host, count=1, memory_gib=memory_gib, cpu=cpu, device=device, intra_link=intra,
                    hostnames=(host,))
    return ClusterSpec(name=host, description=f"probed on {host} ({time.strftime('%Y-%m-%d')})"
                       + (" --quick" if quick else ""), node_types=(node,), inter_node_link=inter,
                       storage=tuple(storage), scheduler=scheduler, notes=probe.notes, probe=quality)


# ---- all-reduce bus bandwidth into the spec -------------------------------------------------------------
def _with_measured(link: LinkSpec, busbw: float, what: str) -> LinkSpec:
    source = f"{link.source}; measured_busbw_gbs: {what}" if link.source else f"measured_busbw_gbs: {what}"
    return dataclasses.replace(link, measured_busbw_gbs=busbw, source=source)


def with_allreduce(spec: ClusterSpec, result: AllReduceResult) -> ClusterSpec:
    """`spec` with the measured all-reduce bus bandwidth in the link it crossed: the intra-node link of
    the ranks' node type when they all ran on one host, else the inter-node link. A link the probe
    could not describe is added: the intra-node one from the hardware table (shared memory between
    CPU processes, PCIe between GPUs), the inter-node one with its nominal bandwidth unknown (set to
    the measurement, and said so in its source)."""
    busbw = round(result.busbw_gbs, 4)
    top = result.headline_points
    what = (f"{result.summary()}; best busbw of the {len(top)} largest messages "
            f"({fmt_bytes(top[0].nbytes)}..{fmt_bytes(top[-1].nbytes)})")
    notes = {**spec.notes, "allreduce": f"{result.summary()}; ranks on {', '.join(dict.fromkeys(result.hosts))}",
             "allreduce_busbw_gbs": ", ".join(f"{fmt_bytes(p.nbytes)} {p.busbw_gbs:g}" for p in result.points)}
    if result.intra_node:
        host = result.hosts[0]
        match = [n for n in spec.node_types if host in n.hostnames] or list(spec.node_types[:1])
        if not match:
            raise ValueError(f"spec {spec.name!r} has no node type to hold the intra-node all-reduce figure")
        node = match[0]
        link = node.intra_link
        if link is None:
            cpu = node.device is None or node.device.kind == "cpu"
            t = hardware.LINKS["shared-memory" if cpu else "pcie4-x16"]
            link = LinkSpec(t.name, t.bandwidth_gbs, t.latency_us, 1, t.achievable_fraction,
                            source=f"hardware table {t.key}: {t.source}")
        node = dataclasses.replace(node, intra_link=_with_measured(link, busbw, what))
        types = tuple(node if n.name == node.name else n for n in spec.node_types)
        return dataclasses.replace(spec, node_types=types, notes=notes)
    link = spec.inter_node_link or LinkSpec(
        "network (not identified by the probe)", busbw,
        source="nominal bandwidth unknown: bandwidth_gbs is the measured bus bandwidth")
    return dataclasses.replace(spec, inter_node_link=_with_measured(link, busbw, what), notes=notes)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clusterlm probe", description="Inventory and benchmark this node; write a "
                                "one-node cluster spec that `clusterlm plan --cluster` reads. Under torchrun or "
                                "srun (2+ ranks) also measure all-reduce bus bandwidth across the ranks.")
    p.add_argument("--out", default=None, help="write the node spec (TOML) here; {host} is replaced by the node name")
    p.add_argument("--quick", action="store_true", help="coarser grids and shorter timings: about half the time "
                   "(33 s instead of 61 s on a 2-core CPU); the planner interpolates between fewer measured shapes")
    p.add_argument("--checkpoint-dir", default=".", help="folder whose write/read bandwidth is measured")
    p.add_argument("--no-measure", action="store_true", help="inventory only: no matmul, memory or storage timing "
                   "(the all-reduce sweep still runs under torchrun/srun; see --no-allreduce)")
    p.add_argument("--no-allreduce", action="store_true", help="under torchrun/srun: no all-reduce sweep; local "
                   "rank 0 of every node probes its node and writes --out (use {host} in it)")
    p.add_argument("--all-nodes", action="store_true", help="inside a Slurm allocation: probe every node with srun "
                   "and merge the results into one cluster spec (see --nodes)")
    p.add_argument("--nodes", type=int, default=None, help="with --all-nodes: number of nodes (default: all of the "
                   "allocation; outside one, srun allocates this many)")
    p.add_argument("--nodes-dir", default=None, help="with --all-nodes: folder on a shared filesystem for the "
                   "per-node specs and logs (default: next to --out)")
    args = p.parse_args(argv)
    if args.out:
        check_output_path(args.out.replace("{host}", node_name()), "--out")
    if os.path.exists(args.checkpoint_dir) and not os.path.isdir(args.checkpoint_dir):
        raise ValueError(f"--checkpoint-dir {args.checkpoint_dir} is not a folder (its write and read bandwidth "
                         f"is measured with a file written there)")
    if args.nodes_dir and os.path.exists(args.nodes_dir) and not os.path.isdir(args.nodes_dir):
        raise ValueError(f"--nodes-dir {args.nodes_dir} is not a folder (the per-node specs and logs go there)")
    if args.all_nodes:
        from clusterlm.cluster.probe_all import probe_all_nodes

        spec = probe_all_nodes(out=args.out, quick=args.quick, measure=not args.no_measure,
                               checkpoint_dir=args.checkpoint_dir, nodes=args.nodes, nodes_dir=args.nodes_dir,
                               allreduce=not args.no_allreduce)
        print(render_tree(spec))
        if args.out:
            print(f"\nwrote {args.out}")
        return 0
    if args.nodes is not None or args.nodes_dir is not None:
        raise ValueError("--nodes and --nodes-dir go with --all-nodes")
    env = read_env()
    host = node_name()
    result = None
    if env.world_size > 1 and not args.no_allreduce:
        from clusterlm.parallel.collectives import measure_allreduce

        result = measure_allreduce(host, quick=args.quick)  # every rank; the group is gone afterwards
        if env.rank != 0:
            return 0  # rank 0 alone probes (the node is quiet now) and writes
    elif env.local_rank != 0:
        return 0  # one probe per node
    spec = probe_node(quick=args.quick, checkpoint_dir=args.checkpoint_dir, measure=not args.no_measure,
                      hostname=host)
    if result is not None:
        spec = with_allreduce(spec, result)
    elif env.world_size == 1 and not args.no_allreduce:
        spec = dataclasses.replace(spec, notes={**spec.notes, "allreduce": "unavailable: one process; run under "
                                                "torchrun or srun with 2+ ranks to measure bus bandwidth"})
    print(render_tree(spec))
    if result is not None:
        print("\n" + result.table())
    if args.out:
        out = args.out.replace("{host}", host)
        save_spec(spec, out)
        print(f"\nwrote {out}")
    return 0
