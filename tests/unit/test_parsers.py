"""Probe parsers on recorded outputs (tests/unit/fixtures/probe/, see its README for provenance)."""

from pathlib import Path

import pytest

from clusterlm.cluster import parsers, slurm_text

FIX = Path(__file__).parent / "fixtures" / "probe"


def read(name: str) -> str:
    return (FIX / name).read_text()


@pytest.mark.parametrize("name, model, sockets, cores, threads, numa, flags", [
    ("lscpu_kvm_2core.txt", "Intel(R) Xeon(R) Processor", 1, 2, 2, 1, {"avx512f", "amx_bf16", "avx512_bf16"}),
    ("lscpu_dgx_h100_xeon8480c.txt", "Intel(R) Xeon(R) Platinum 8480C", 2, 112, 224, 2, {"amx_bf16", "avx512f"}),
    ("lscpu_dgx_a100_epyc7742.txt", "AMD EPYC 7742 64-Core Processor", 2, 128, 256, 8, {"avx2", "fma"}),
    ("lscpu_grace_neoverse_v2.txt", "Neoverse-V2", 1, 72, 72, 9, {"sve", "sve2", "bf16", "asimd"}),
])
def test_lscpu(name, model, sockets, cores, threads, numa, flags):
    """Sockets x cores-per-socket, CPU(s), NUMA nodes and ISA flags equal the lscpu lines of each recording."""
    cpu = parsers.parse_lscpu(read(name))
    assert (cpu.model, cpu.sockets, cpu.cores, cpu.threads, cpu.numa_nodes) == (model, sockets, cores, threads, numa)
    assert flags <= set(cpu.flags)


def test_lscpu_without_avx512_has_no_avx512_flag():
    """The EPYC 7742 (Zen 2) recording lists avx2 but no AVX-512: the parser must not invent it."""
    assert "avx512f" not in parsers.parse_lscpu(read("lscpu_dgx_a100_epyc7742.txt")).flags


def test_cpuinfo_matches_lscpu_on_the_same_machine():
    """/proc/cpuinfo and lscpu recorded on the same 2-core VM give the same model, cores and threads."""
    a = parsers.parse_cpuinfo(read("cpuinfo_kvm_2core.txt"))
    b = parsers.parse_lscpu(read("lscpu_kvm_2core.txt"))
    assert (a.model, a.cores, a.threads, a.sockets) == (b.model, b.cores, b.threads, b.sockets) == (
        "Intel(R) Xeon(R) Processor", 2, 2, 1)
    assert set(a.flags) == set(b.flags)


def test_meminfo_in_bytes():
    """MemTotal 24683656 kB (KiB) = 24683656 * 1024 bytes."""
    m = parsers.parse_meminfo(read("meminfo_kvm_24g.txt"))
    assert m["MemTotal"] == 24683656 * 1024
    assert 0 < m["MemAvailable"] <= m["MemTotal"]


def test_nvidia_smi_query_with_units():
    """'NVIDIA H100 80GB HBM3, 81559 MiB, 9.0' x 8 -> 8 GPUs of 81559 MiB, compute capability 9.0."""
    gpus = parsers.parse_nvidia_smi_gpus(read("nvidia_smi_gpus_dgx_h100.csv"))
    assert len(gpus) == 8
    assert gpus[0] == parsers.GpuInfo("NVIDIA H100 80GB HBM3", 81559, "9.0")


def test_nvidia_smi_query_nounits_and_old_driver():
    """nounits ('81920') and a driver without compute_cap (two columns) both parse."""
    a100 = parsers.parse_nvidia_smi_gpus(read("nvidia_smi_gpus_a100_nounits.csv"))
    assert [g.memory_mib for g in a100] == [81920] * 8 and a100[0].compute_capability == "8.0"
    v100 = parsers.parse_nvidia_smi_gpus(read("nvidia_smi_gpus_v100_old_driver.csv"))
    assert v100 == [parsers.GpuInfo("Tesla V100-SXM2-32GB", 32510, "")] * 4


def test_topo_dgx_h100_all_nv18():
    """8x H100 topo -m: 56 GPU pairs, all NV18; NIC legend NIC0..7 -> mlx5_0..7; GPU0 on NUMA 0, GPU7 on 1."""
    t = parsers.parse_nvidia_smi_topo(read("nvidia_smi_topo_dgx_h100.txt"))
    assert t.gpus == tuple(f"GPU{i}" for i in range(8))
    assert t.gpu_links() == {"NV18"} and t.min_nvlinks() == 18
    assert t.matrix[("GPU0", "GPU0")] == "X" and t.matrix[("GPU0", "NIC0")] == "PIX"
    assert t.matrix[("GPU0", "NIC7")] == "SYS"
    assert t.nics == {f"NIC{i}": f"mlx5_{i}" for i in range(8)}
    assert t.numa_affinity["GPU0"] == "0" and t.numa_affinity["GPU7"] == "1"


def test_topo_pcie_has_no_nvlink():
    """4x L40S on PCIe: GPU pairs are NODE or SYS, so min_nvlinks is None."""
    t = parsers.parse_nvidia_smi_topo(read("nvidia_smi_topo_4x_l40s_pcie.txt"))
    assert len(t.gpus) == 4 and t.gpu_links() == {"NODE", "SYS"} and t.min_nvlinks() is None
    assert t.nics == {"NIC0": "mlx5_0"}


def test_topo_without_gpus():
    """Text with no GPU matrix (e.g. an error message) gives an empty topology."""
    assert parsers.parse_nvidia_smi_topo("NVIDIA-SMI has failed because it couldn't communicate").gpus == ()


def test_ib_rate_and_net_speed():
    """'200 Gb/sec (4X HDR)' -> 200 Gb/s HDR; '400 Gb/sec (4X NDR)' -> 400; speed 100000 Mb/s; -1 -> None."""
    assert parsers.parse_ib_rate(read("ib_rate_hdr.txt")) == (200.0, "4X HDR")
    assert parsers.parse_ib_rate(read("ib_rate_ndr.txt")) == (400.0, "4X NDR")
    assert parsers.parse_ib_rate("garbage") is None
    assert parsers.parse_net_speed(read("net_speed_100g.txt")) == 100000
    assert parsers.parse_net_speed(read("net_speed_down.txt")) is None
    assert parsers.parse_net_speed("") is None


def test_df():
    """df -PT rows: fstype and 1024-byte blocks -> bytes, mount point last."""
    rows = {r.mount: r for r in parsers.parse_df(read("df_cluster.txt"))}
    assert {m: r.fstype for m, r in rows.items()} == {"/": "ext4", "/raid": "xfs", "/lus/scratch": "lustre",
                                                      "/home": "nfs4", "/gpfs/ckpt": "gpfs"}
    assert rows["/lus/scratch"].avail_bytes == 1759218604442 * 1024
    here = parsers.parse_df(read("df_ext4.txt"))
    assert len(here) == 1 and here[0].fstype == "ext4" and here[0].mount == "/"


def test_findmnt_and_proc_mounts():
    """findmnt gives (target, fstype, source); /proc/mounts picks the longest mount prefix of a path,
    and decodes \\040 as a space."""
    assert parsers.parse_findmnt(read("findmnt_lustre.txt")) == (
        "/lus/scratch", "lustre", "10.10.0.11@o2ib:10.10.0.12@o2ib:/scratch")
    mounts = read("proc_mounts_cluster.txt")
    assert parsers.fstype_from_mounts(mounts, "/lus/scratch/run1/ckpt")[:2] == ("/lus/scratch", "lustre")
    assert parsers.fstype_from_mounts(mounts, "/gpfs/ckpt")[:2] == ("/gpfs/ckpt", "gpfs")
    assert parsers.fstype_from_mounts(mounts, "/home/me")[:2] == ("/home", "nfs4")
    assert parsers.fstype_from_mounts(mounts, "/raidx/a")[:2] == ("/", "ext4")  # not /raid
    assert parsers.fstype_from_mounts(mounts, "/mnt/my data/x")[:2] == ("/mnt/my data", "ext4")


def test_sinfo_merges_partition_lines():
    """Two 'gpu*' lines (30 + 2 nodes) merge into one default partition of 32 nodes; limits stay as printed."""
    parts = {p.name: p for p in slurm_text.parse_sinfo(read("sinfo_gpu_cluster.txt"))}
    assert list(parts) == ["gpu", "debug", "cpu", "preempt"]
    gpu = parts["gpu"]
    assert gpu.default and gpu.nodes == 32 and gpu.timelimit == "2-00:00:00"
    assert gpu.nodelist == "gpu[001-030],gpu[031-032]" and gpu.memory_mb == "2063000,1031000"
    assert not parts["debug"].default and parts["preempt"].avail == "down"
    assert slurm_text.parse_gres(gpu.gres) == [("gpu", "h100", 8)]


def test_slurm_version():
    """`scontrol --version` -> the version; text without one -> None."""
    assert slurm_text.parse_scontrol_version(read("scontrol_version.txt")) == "23.11.4"
    assert slurm_text.parse_scontrol_version("no slurm here") is None


def test_gres():
    """GRES strings with types, socket bindings and several items."""
    assert slurm_text.parse_gres("gpu:h100:8(S:0-1),shard:4") == [("gpu", "h100", 8), ("shard", "", 4)]
    assert slurm_text.parse_gres("gpu:4") == [("gpu", "", 4)]
    assert slurm_text.parse_gres("(null)") == []


def test_probe_reads_lscpu_in_the_c_locale(tmp_path, monkeypatch):
    """lscpu translates its field names (util-linux de.po: "Modellname:", "Kern(e) pro Sockel:",
    "Markierungen:"); under LANG=de_DE.UTF-8 the probe recorded model 'unknown', cores = threads and no
    ISA flags (so no bf16 matmul was measured). A stand-in lscpu that prints German unless LC_ALL=C
    gives the English recording's figures: the probe runs it in the C locale."""
    import os

    from clusterlm.cluster import probe

    german = ("Architektur:            x86_64\nCPU(s):                  2\nModellname:             Intel(R) Xeon(R) "
              "Processor\nThread(s) pro Kern:     1\nKern(e) pro Sockel:     2\nSockel:                 1\n"
              "Markierungen:           fpu avx2 avx512f avx512_bf16 amx_bf16\nNUMA-Knoten:            1\n")
    (tmp_path / "english.txt").write_text(read("lscpu_kvm_2core.txt"))
    (tmp_path / "german.txt").write_text(german)
    fake = tmp_path / "lscpu"
    fake.write_text(f'#!/bin/sh\nif [ "$LC_ALL" = C ]; then cat {tmp_path}/english.txt; '
                    f'else cat {tmp_path}/german.txt; fi\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    cpu = probe.probe_cpu()
    assert (cpu.model, cpu.sockets, cpu.cores, cpu.threads) == ("Intel(R) Xeon(R) Processor", 1, 2, 2)
    assert {"avx512f", "amx_bf16", "avx512_bf16"} <= set(cpu.flags)


def test_probe_network_skips_virtual_interfaces(tmp_path, monkeypatch):
    """A container host's veth pairs report 10000 Mb/s in /sys/class/net/*/speed; the probe took the fastest
    interface, so a node with a 1 Gb/s NIC was recorded with a 10 Gb/s inter-node link (veth...). Interfaces
    under devices/virtual/net are skipped, except a bond (bonding/), which aggregates real NICs."""
    from clusterlm.cluster import probe

    net = tmp_path / "class" / "net"
    net.mkdir(parents=True)
    for iface, where, speed in (("eth0", "devices/pci0000:00/0000:00:03.0/net", "1000"),
                                ("veth1a2b", "devices/virtual/net", "10000"),
                                ("bond0", "devices/virtual/net", "25000")):
        real = tmp_path / where / iface
        real.mkdir(parents=True)
        (real / "speed").write_text(speed + "\n")
        (net / iface).symlink_to(real)
    real_glob = probe.glob.glob
    monkeypatch.setattr(probe.glob, "glob", lambda pattern: (
        real_glob(str(net / "*" / "speed")) if pattern == "/sys/class/net/*/speed" else []))
    link = probe.probe_network()
    assert link.name == "Ethernet 1 Gb/s (eth0)" and link.bandwidth_gbs == 0.125
    (tmp_path / "devices/virtual/net/bond0/bonding").mkdir()
    assert probe.probe_network().name == "Ethernet 25 Gb/s (bond0)"
