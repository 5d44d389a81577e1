"""The hardware table: dense peaks, name matching, unknown devices stay unknown."""

import pytest

from clusterlm.cluster import hardware
from clusterlm.cluster.hardware import lookup_accelerator, peak_flops


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA GH200 480GB", "gh200"),
    ("NVIDIA H200", "h200-sxm"),
    ("NVIDIA A100-SXM4-80GB", "a100-sxm-80gb"),
    ("NVIDIA A100-SXM4-40GB", "a100-sxm-40gb"),
    ("NVIDIA A100 80GB PCIe", "a100-pcie-80gb"),
    ("NVIDIA A100-PCIE-40GB", "a100-pcie-40gb"),
    ("Tesla V100-SXM2-32GB", "v100-sxm2-32gb"),
    ("Tesla V100-SXM2-16GB", "v100-sxm2-16gb"),
    ("Tesla V100-PCIE-16GB", "v100-pcie"),
    ("NVIDIA L40S", "l40s"),
    ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("AMD Instinct MI300X", "mi300x"),
])
def test_names_as_nvidia_smi_prints_them(name, key):
    """Device names as nvidia-smi / torch.cuda.get_device_name print them map to the right part."""
    assert lookup_accelerator(name).key == key


@pytest.mark.parametrize("name", ["NVIDIA H100", "NVIDIA A100", "NVIDIA B200", "Tesla V100S-PCIE-32GB",
                                  "NVIDIA H200 NVL", "Intel(R) Xeon(R) Processor", "", "cpu"])
def test_unknown_or_ambiguous_is_none(name):
    """Unknown or ambiguous names give None, never the A100 (torchtitan PR #4779's 'MFU ~152%')."""
    assert lookup_accelerator(name) is None
    assert peak_flops(name, "bf16") is None


def test_dense_not_sparse_peaks():
    """H100 SXM bf16 = 989.4 TFLOP/s dense (FIELD_NOTES; 1979 is 2:4 sparse); H100 PCIe 756; A100 312;
    H200 989.4 with 4.8 TB/s; H100 SXM 3.35 TB/s."""
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == pytest.approx(312e12)
    assert peak_flops("NVIDIA H200", "bf16") == pytest.approx(989.4e12)
    assert lookup_accelerator("NVIDIA H200").memory_bandwidth_gbs == 4800
    assert lookup_accelerator("NVIDIA H100 80GB HBM3").memory_bandwidth_gbs == 3350
    assert lookup_accelerator("NVIDIA A100-SXM4-80GB").memory_bandwidth_gbs == 2039
    assert lookup_accelerator("NVIDIA H100 PCIe").memory_bandwidth_gbs == 2000


def test_every_entry_is_cited_and_dense():
    """Every accelerator has a source; no bf16/fp16 peak exceeds 1400 TFLOP/s (a sparse figure would)."""
    for acc in hardware.ACCELERATORS.values():
        assert acc.source, acc.key
        for dt, v in acc.peak_tflops.items():
            assert 0 < v < 1400, (acc.key, dt, v)
    for link in hardware.LINKS.values():
        assert link.source and link.bandwidth_gbs > 0 and 0 < link.achievable_fraction <= 1


def test_unsupported_dtype():
    """V100 has no bf16: None, not a guess; an invalid dtype name raises."""
    assert peak_flops("Tesla V100-SXM2-32GB", "bf16") is None
    assert peak_flops("Tesla V100-SXM2-32GB", "fp16") == pytest.approx(125e12)
    with pytest.raises(ValueError, match="dtype"):
        peak_flops("NVIDIA H100 80GB HBM3", "int8")


def test_links():
    """NVLink 4 = 900 GB/s bidirectional = 450 per direction = NV18 x 25; NDR adapter 50 GB/s; HDR 25."""
    assert hardware.LINKS["nvlink4"].bandwidth_gbs == 450
    assert hardware.nvlink_link(18, "NVIDIA H100 80GB HBM3").bandwidth_gbs == 450
    assert hardware.nvlink_link(12, "NVIDIA A100-SXM4-80GB").bandwidth_gbs == 300
    assert hardware.LINKS["ib-ndr"].bandwidth_gbs == 50 and hardware.LINKS["ib-hdr"].bandwidth_gbs == 25
    assert hardware.ethernet_link(100000).key == "eth-100g"
    assert hardware.ethernet_link(40000).bandwidth_gbs == 5.0
