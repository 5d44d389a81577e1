"""Known accelerators and links: cited DENSE peaks, memory, bandwidth. Data, not measurements.

    >>> from clusterlm.cluster.hardware import peak_flops, lookup_accelerator
    >>> peak_flops("NVIDIA H100 80GB HBM3", "bf16")       # FLOP/s, dense (not 2:4 sparse)
    989400000000000.0
    >>> peak_flops("NVIDIA H100 PCIe", "bf16")
    756000000000000.0
    >>> peak_flops("Some Future GPU", "bf16") is None      # unknown is unknown, never "an A100"
    True

Every figure is the DENSE peak. Vendor data sheets for Ampere and later print the 2:4-sparse
figure first ("1,979 TFLOP/s" for H100 SXM bf16): those are halved here, and the source string
says so. MFU against a sparse peak would be off by 2x; against a hard-coded A100 peak by up to 3x
(nanoGPT PR #464, torchtitan PR #4779: "MFU ~152%").

Names are matched against what `nvidia-smi --query-gpu=name` and `torch.cuda.get_device_name`
print ("NVIDIA H100 80GB HBM3" is the SXM5 part, "NVIDIA H100 PCIe" the PCIe card). A name that
matches no entry, or is ambiguous (a bare "NVIDIA H100"), gives None. Units: TFLOP/s = 1e12 FLOP/s,
GB/s = 1e9 bytes/s, memory in GiB as nvidia-smi reports it (MiB / 1024).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DTYPES = ("fp32", "tf32", "bf16", "fp16")

_NV_AMPERE = "NVIDIA A100 Tensor Core GPU data sheet (2021); tf32/bf16/fp16 = sparse/2"
_NV_HOPPER = "NVIDIA H100 Tensor Core GPU data sheet (2023) and Hopper whitepaper Table 3; sparse/2"


@dataclass(frozen=True)
class Accelerator:
    key: str
    """short stable id used in presets, e.g. 'h100-sxm'"""
    name: str
    """marketing name"""
    vendor: str
    memory_gib: float
    """device memory as nvidia-smi reports it (MiB / 1024)"""
    memory_bandwidth_gbs: float
    """peak DRAM/HBM bandwidth, GB/s (1e9 B/s)"""
    peak_tflops: dict[str, float] = field(default_factory=dict)
    """dense peak TFLOP/s by dtype (fp32 = non-tensor-core FP32); a dtype absent = not supported"""
    source: str = ""

    def __post_init__(self) -> None:
        bad = set(self.peak_tflops) - set(DTYPES)
        if bad:
            raise ValueError(f"accelerator {self.key}: unknown dtypes {sorted(bad)}; valid: {DTYPES}")


@dataclass(frozen=True)
class Link:
    key: str
    name: str
    bandwidth_gbs: float
    """unidirectional bandwidth per device (intra-node) or per adapter (network), GB/s"""
    latency_us: float
    """typical small-message latency through NCCL/MPI, microseconds (order of magnitude)"""
    achievable_fraction: float
    """fraction of `bandwidth_gbs` that NCCL ring collectives typically reach (bus bandwidth)"""
    source: str = ""


ACCELERATORS: dict[str, Accelerator] = {a.key: a for a in [
    Accelerator("v100-sxm2-16gb", "Tesla V100 SXM2 16GB", "nvidia", 16.0, 900.0,
                {"fp32": 15.7, "fp16": 125.0},
                "NVIDIA V100 Tensor Core GPU data sheet (2020): SXM2 15.7 FP32, 125 tensor; no bf16/tf32"),
    Accelerator("v100-sxm2-32gb", "Tesla V100 SXM2 32GB", "nvidia", 32.0, 900.0,
                {"fp32": 15.7, "fp16": 125.0},
                "NVIDIA V100 Tensor Core GPU data sheet (2020): SXM2 15.7 FP32, 125 tensor; no bf16/tf32"),
    Accelerator("v100-pcie", "Tesla V100 PCIe", "nvidia", 16.0, 900.0,
                {"fp32": 14.0, "fp16": 112.0},
                "NVIDIA V100 Tensor Core GPU data sheet (2020): PCIe 14 FP32, 112 tensor; no bf16/tf32"),
    Accelerator("a100-sxm-40gb", "A100 SXM4 40GB", "nvidia", 40.0, 1555.0,
                {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}, _NV_AMPERE),
    Accelerator("a100-sxm-80gb", "A100 SXM4 80GB", "nvidia", 80.0, 2039.0,
                {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}, _NV_AMPERE),
    Accelerator("a100-pcie-40gb", "A100 PCIe 40GB", "nvidia", 40.0, 1555.0,
                {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}, _NV_AMPERE),
    Accelerator("a100-pcie-80gb", "A100 PCIe 80GB", "nvidia", 80.0, 1935.0,
                {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}, _NV_AMPERE),
    Accelerator("h100-sxm", "H100 SXM5 80GB", "nvidia", 79.6, 3350.0,
                {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
                _NV_HOPPER + " (bf16 1979 sparse -> 989.4 dense)"),
    Accelerator("h100-pcie", "H100 PCIe 80GB", "nvidia", 79.6, 2000.0,
                {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0, "fp16": 756.0},
                _NV_HOPPER + " (PCIe: bf16 1513 sparse -> 756 dense)"),
    Accelerator("h100-nvl", "H100 NVL 94GB", "nvidia", 93.6, 3900.0,
                {"fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "fp16": 835.5},
                "NVIDIA H100 NVL product brief (2023): bf16 1671 sparse -> 835.5 dense"),
    Accelerator("gh200", "GH200 (H100 96GB HBM3)", "nvidia", 95.0, 4000.0,
                {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
                "NVIDIA GH200 Grace Hopper Superchip data sheet (2023); sparse/2"),
    Accelerator("h200-sxm", "H200 SXM 141GB", "nvidia", 140.4, 4800.0,
                {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "fp16": 989.4},
                "NVIDIA H200 Tensor Core GPU data sheet (2024): bf16 1979 sparse -> 989.4 dense"),
    Accelerator("l40s", "L40S 48GB", "nvidia", 44.4, 864.0,
                {"fp32": 91.6, "tf32": 183.0, "bf16": 362.05, "fp16": 362.05},
                "NVIDIA L40S data sheet (2023): bf16 733 sparse -> 362 dense (fp32 accumulate)"),
    Accelerator("rtx-4090", "GeForce RTX 4090 24GB", "nvidia", 23.99, 1008.0,
                {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2},
                "NVIDIA Ada Lovelace architecture whitepaper v1.01, Appendix A: dense, fp32 accumulate"),
    Accelerator("mi300x", "AMD Instinct MI300X 192GB", "amd", 192.0, 5300.0,
                {"fp32": 163.4, "tf32": 653.7, "bf16": 1307.4, "fp16": 1307.4},
                "AMD Instinct MI300X data sheet (2023): dense matrix peaks, fp32 = vector"),
]}

# Name patterns, most specific first. Names are normalised: lower case, '-'/'_' -> ' '.
# nvidia-smi examples: "Tesla V100-SXM2-32GB", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe",
# "NVIDIA A100-PCIE-40GB", "NVIDIA H100 80GB HBM3" (SXM5), "NVIDIA H100 PCIe", "NVIDIA H100 NVL",
# "NVIDIA GH200 480GB", "NVIDIA H200", "NVIDIA L40S", "NVIDIA GeForce RTX 4090", "AMD Instinct MI300X".
_PATTERNS: list[tuple[str, str]] = [
    (r"\bv100\b.*\bpcie\b", "v100-pcie"),  # not V100S: different peaks
    (r"\bv100\b.*\bsxm2\b.*\b32gb\b", "v100-sxm2-32gb"),
    (r"\bv100\b.*\bsxm2\b", "v100-sxm2-16gb"),
    (r"\ba100\b.*\bpcie\b.*\b80gb\b|\ba100\b.*\b80gb\b.*\bpcie\b", "a100-pcie-80gb"),
    (r"\ba100\b.*\bpcie\b", "a100-pcie-40gb"),
    (r"\ba100\b.*\bsxm\w*\b.*\b80gb\b|\ba100\b.*\b80gb\b.*\bsxm", "a100-sxm-80gb"),
    (r"\ba100\b.*\bsxm\w*\b.*\b40gb\b", "a100-sxm-40gb"),
    (r"\bgh200\b", "gh200"),
    (r"\bh100\b.*\bpcie\b", "h100-pcie"),
    (r"\bh100\b.*\bnvl\b", "h100-nvl"),
    (r"\bh100\b.*\b(hbm3|sxm\w*)\b", "h100-sxm"),
    (r"\bh200\b(?!.*\bnvl\b)", "h200-sxm"),
    (r"\bl40s\b", "l40s"),
    (r"\brtx 4090\b", "rtx-4090"),
    (r"\bmi300x\b", "mi300x"),
]

LINKS: dict[str, Link] = {l.key: l for l in [
    Link("nvlink2", "NVLink 2 (V100, 6 links)", 150.0, 2.0, 0.8,
         "NVIDIA V100 data sheet: 300 GB/s bidirectional per GPU"),
    Link("nvlink3", "NVLink 3 (A100, 12 links)", 300.0, 2.0, 0.7,
         "NVIDIA A100 data sheet: 600 GB/s bidirectional per GPU; 8x A100 NCCL busbw ~200-210 GB/s "
         "(nccl-tests #149, #178)"),
    Link("nvlink4", "NVLink 4 (H100/H200, 18 links)", 450.0, 2.0, 0.82,
         "NVIDIA H100 data sheet: 900 GB/s bidirectional per GPU; 8x H100 NCCL ring busbw ~370 GB/s "
         "(nccl-tests #212, #290)"),
    Link("pcie4-x16", "PCIe 4.0 x16", 32.0, 3.0, 0.75, "PCI-SIG: 16 GT/s x16 = 31.5 GB/s per direction"),
    Link("pcie5-x16", "PCIe 5.0 x16", 64.0, 3.0, 0.75, "PCI-SIG: 32 GT/s x16 = 63 GB/s per direction"),
    Link("ib-edr", "InfiniBand EDR 100 Gb/s", 12.5, 3.0, 0.9, "IBTA: 4X EDR = 100 Gb/s per adapter"),
    Link("ib-hdr", "InfiniBand HDR 200 Gb/s", 25.0, 3.0, 0.92, "IBTA: 4X HDR = 200 Gb/s per adapter"),
    Link("ib-ndr", "InfiniBand NDR 400 Gb/s", 50.0, 3.0, 0.94,
         "IBTA: 4X NDR = 400 Gb/s = 50 GB/s per adapter; NCCL reaches ~46-48 GB/s"),
    Link("eth-10g", "Ethernet 10 Gb/s (TCP)", 1.25, 30.0, 0.7, "IEEE 802.3; TCP sockets, no RDMA"),
    Link("eth-25g", "Ethernet 25 Gb/s (TCP)", 3.125, 25.0, 0.7, "IEEE 802.3; TCP sockets, no RDMA"),
    Link("eth-100g", "Ethernet 100 Gb/s", 12.5, 10.0, 0.8, "IEEE 802.3; RoCE reaches more than TCP"),
    Link("eth-200g", "Ethernet 200 Gb/s", 25.0, 10.0, 0.8, "IEEE 802.3; RoCE reaches more than TCP"),
    Link("eth-400g", "Ethernet 400 Gb/s", 50.0, 10.0, 0.8, "IEEE 802.3; RoCE reaches more than TCP"),
    Link("shared-memory", "one host, shared memory", 10.0, 5.0, 0.5,
         "assumption: gloo/shm collectives between processes on one CPU host; measure to replace"),
]}

# IB rate label (from /sys/class/infiniband/*/ports/*/rate) -> link key
IB_RATE_LINKS = {"EDR": "ib-edr", "HDR": "ib-hdr", "NDR": "ib-ndr"}


def normalize_name(name: str) -> str:
    return " ".join(re.sub(r"[-_]", " ", name.lower()).split())


def lookup_accelerator(device_name: str) -> Accelerator | None:
    """The table entry for a device name as nvidia-smi/torch print it; None if unknown/ambiguous."""
    norm = normalize_name(device_name)
    for pattern, key in _PATTERNS:
        if re.search(pattern, norm):
            return ACCELERATORS[key]
    return ACCELERATORS.get(norm.replace(" ", "-"))  # a table key itself, e.g. "h100-sxm"


def peak_flops(device_name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s (not TFLOP/s) of `device_name` in `dtype`; None if unknown or unsupported."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {', '.join(DTYPES)}")
    acc = lookup_accelerator(device_name)
    if acc is None or dtype not in acc.peak_tflops:
        return None
    return acc.peak_tflops[dtype] * 1e12


def nvlink_link(n_links: int, device_name: str = "") -> Link:
    """The link behind `nvidia-smi topo -m`'s NV<n>: each NVLink (gen 2-4) carries 25 GB/s per direction."""
    acc = lookup_accelerator(device_name) if device_name else None
    gen = {"v100": "nvlink2", "a100": "nvlink3"}.get((acc.key.split("-")[0] if acc else ""), "nvlink4")
    base = LINKS[gen]
    return Link(f"nvlink-x{n_links}", f"NVLink x{n_links} ({base.name.split('(')[0].strip()})",
                25.0 * n_links, base.latency_us, base.achievable_fraction,
                f"nvidia-smi topo -m: NV{n_links} = {n_links} bonded links x 25 GB/s per direction; {base.source}")


def ethernet_link(speed_mbps: int) -> Link:
    """The link for an Ethernet interface of `speed_mbps` (from /sys/class/net/*/speed)."""
    gbps = speed_mbps / 1000
    for key in ("eth-400g", "eth-200g", "eth-100g", "eth-25g", "eth-10g"):
        if abs(LINKS[key].bandwidth_gbs * 8 - gbps) < 1e-6:
            return LINKS[key]
    return Link(f"eth-{gbps:g}g", f"Ethernet {gbps:g} Gb/s", gbps / 8, 30.0, 0.7,
                f"/sys/class/net speed {speed_mbps} Mb/s; latency and efficiency assumed as for TCP")
