"""`clusterlm plan`, `clusterlm cluster` and `clusterlm probe` as a user runs them; plan and cluster
with torch blocked (a login node without torch)."""

import subprocess
import sys

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from clusterlm.cluster.spec import load_spec, save_spec
from tests.helpers import BLOCK_TORCH


def clusterlm(*args, block_torch=True, cwd=None):
    code = "import sys\n" + (BLOCK_TORCH if block_torch else "") + (
        "from clusterlm.cli import main\nsys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cluster_modules_import_without_torch():
    """Everything in clusterlm.cluster (the probe's runners import torch lazily) and parallel.dims imports
    with torch blocked."""
    code = ("import sys\n" + BLOCK_TORCH + "import clusterlm.cluster.planner, clusterlm.cluster.spec, "
            "clusterlm.cluster.memory, clusterlm.cluster.flops, clusterlm.cluster.hardware, "
            "clusterlm.cluster.parsers, clusterlm.cluster.probe, clusterlm.parallel.dims\n"
            "assert 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_plan_without_torch(tmp_path):
    """plan llama-8b on the 8x H100 preset: the convention, the assumption, a table, the arithmetic, and a
    recipe whose [parallel] layout multiplies to 8 devices."""
    out = tmp_path / "recipe.toml"
    r = clusterlm("plan", "--model", "llama-8b", "--cluster", "h100-sxm-8x", "--tokens", "10B", "--seq-len", "8192",
                  "--explain", "--out", str(out), "--top", "5")
    assert r.returncode == 0, r.stderr
    for text in ("PaLM convention: 6*N + 12*L*D*T", "ASSUMPTION", "989.4", "tokens/s", "best:", "activations",
                 "compute", "wrote"):
        assert text in r.stdout, text
    recipe = tomllib.loads(out.read_text())
    p = recipe["parallel"]
    assert p["dp_replicate"] * p["dp_shard"] * p["tp"] * p["pp"] == 8
    assert recipe["model"] == {"preset": "llama-8b"} and recipe["train"]["seq_len"] == 8192
    assert recipe["plan"]["predicted_step_s"] > 0 and 0 < recipe["plan"]["predicted_memory_bytes"] < 80 * 2**30


def test_plan_nothing_fits_exits_1():
    """70B on one 8x H100 node: exit 1, and the message gives the smallest requirement against the limit."""
    r = clusterlm("plan", "--model", "llama-70b", "--cluster", "h100-sxm-8x", "--seq-len", "4096")
    assert r.returncode == 1, r.stderr
    assert "nothing fits" in r.stdout and "limit is 71.69 GiB" in r.stdout


def test_plan_bad_model_is_a_usage_error():
    """An unknown preset is exit 2 with the known names."""
    r = clusterlm("plan", "--model", "llama-9b", "--cluster", "h100-sxm-8x")
    assert r.returncode == 2 and "--model 'llama-9b' is not a model preset, a bundled recipe" in r.stderr
    assert "llama-8b" in r.stderr and "sst2_lstm_cpu" in r.stderr  # the names it takes


def test_cluster_show_and_merge_without_torch(tmp_path):
    """`cluster show` renders the preset tree; `cluster merge` of two identical one-node specs gives one
    node type with count 2 and the slower node's measured TFLOP/s."""
    r = clusterlm("cluster", "show", "h100-sxm-8x")
    assert r.returncode == 0, r.stderr
    for text in ("8 x NVIDIA H100 80GB HBM3", "bf16 989.4", "NVLink 4", "InfiniBand NDR", "3350 GB/s"):
        assert text in r.stdout, text
    import dataclasses

    base = load_spec("h100-sxm-8x")
    node = base.node_types[0]
    for host, tf in (("n1", 700.0), ("n2", 650.0)):
        dev = dataclasses.replace(node.device, measured_tflops={"bf16": tf})
        save_spec(dataclasses.replace(base, name=host, node_types=(dataclasses.replace(
            node, name="gpu", device=dev, hostnames=(host,)),)), tmp_path / f"{host}.toml")
    r = clusterlm("cluster", "merge", str(tmp_path / "n1.toml"), str(tmp_path / "n2.toml"), "--out",
                  str(tmp_path / "all.toml"), "--name", "pair")
    assert r.returncode == 0, r.stderr
    merged = load_spec(tmp_path / "all.toml")
    assert len(merged.node_types) == 1 and merged.node_types[0].count == 2
    assert merged.node_types[0].hostnames == ("n1", "n2")
    assert merged.node_types[0].device.measured_tflops == {"bf16": 650.0}
    r = clusterlm("cluster", "merge", str(tmp_path / "n1.toml"), str(tmp_path / "n1.toml"), "--out",
                  str(tmp_path / "twice.toml"))  # one node probed twice is not two nodes
    assert r.returncode == 2 and "host(s) n1 appear in more than one spec" in r.stderr, r.stderr
    assert not (tmp_path / "twice.toml").exists()


def test_probe_writes_a_spec_that_plans(tmp_path):
    """`probe --quick` on this machine measures CPU matmul and copy bandwidth and the checkpoint folder's
    write/read speed; the spec loads, and `plan` (torch blocked) turns it into step times, not '?'."""
    node = tmp_path / "node.toml"
    r = clusterlm("probe", "--quick", "--out", str(node), "--checkpoint-dir", str(tmp_path / "ckpt"),
                  block_torch=False, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    spec = load_spec(node)
    nt = spec.node_types[0]
    assert nt.count == 1 and nt.memory_gib > 0 and nt.cpu.threads >= 1
    dev = nt.device
    assert dev.kind in ("cpu", "cuda") and dev.measured_tflops.get("fp32", 0) > 0
    assert dev.measured_memory_bandwidth_gbs > 0
    ckpt = [s for s in spec.storage if s.path.endswith("ckpt")]
    assert ckpt and ckpt[0].write_gbs > 0 and ckpt[0].read_gbs > 0 and ckpt[0].fstype != "unknown"
    assert not list((tmp_path / "ckpt").iterdir())  # the probe's test file is gone
    assert spec.probe is not None and spec.probe.wall_s > 0  # disturbed or not: the machine is shared
    r = clusterlm("plan", "--model", "gpt-mini", "--vocab-size", "65", "--cluster", str(node), "--steps", "100",
                  "--global-batch-tokens", "4096", "--force")  # --force: a busy test machine marks it disturbed
    assert r.returncode == 0, r.stderr
    assert "measured matmul" in r.stdout and "  1 " in r.stdout
    row = next(l for l in r.stdout.splitlines() if l.startswith("  1 "))
    assert "?" not in row.split()[9:11]  # step and tokens/s are numbers


def test_plan_dry_run_builds_the_mesh():
    """--dry-run (torch allowed) builds the planned DeviceMesh on a fake process group of 8 ranks."""
    r = clusterlm("plan", "--model", "llama-8b", "--cluster", "h100-sxm-8x", "--seq-len", "4096", "--top", "1",
                  "--dry-run", block_torch=False)
    assert r.returncode == 0, r.stderr
    assert "dry run: built DeviceMesh" in r.stdout and "fake process group of 8 ranks" in r.stdout


def test_probe_steps_fail_soft():
    """A probe step that raises is recorded as 'unavailable: reason' and yields its default; a missing tool
    says 'not found'."""
    from clusterlm.cluster import probe

    p = probe.Probe()
    assert p.step("boom", lambda: 1 / 0, default=7) == 7
    assert p.notes == {"boom": "unavailable: division by zero"}
    assert p.step("tool", lambda: probe._run(["clusterlm-no-such-tool-xyz"])) is None
    assert p.notes["tool"] == "unavailable: clusterlm-no-such-tool-xyz not found"


def test_spec_files_load_through_the_run_config_loader(tmp_path):
    """A cluster spec is read by config.from_dict, like a recipe: unknown keys get a close match,
    wrong types name the key, inf/nan are refused, and a bare number is taken where text is expected."""
    import pytest

    from clusterlm.errors import ConfigError

    cases = {
        '[[node_types]]\nname = "a"\ncout = 2\n': r"unknown key '.*node_types\[0\]\.cout'; did you mean '.*node_types\[0\]\.count'",
        '[[node_types]]\nname = "a"\n[node_types.device]\nname = "x"\nmemory_gib = "big"\n':
            r"node_types\[0\]\.device\.memory_gib='big' has type str; expected float",
        '[[node_types]]\nname = "a"\n[node_types.device]\nname = "x"\nmemory_gib = inf\n':
            r"node_types\[0\]\.device\.memory_gib=inf is not a finite number",
    }
    for i, (text, message) in enumerate(cases.items()):
        (tmp_path / f"{i}.toml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_spec(tmp_path / f"{i}.toml")
    (tmp_path / "ok.toml").write_text('[scheduler]\nversion = 23\n')
    assert load_spec(tmp_path / "ok.toml").scheduler.version == "23"


def test_device_count_and_memory_errors_name_the_bad_value(tmp_path):
    """A negative device memory named the (valid) count: "count=8 must be >= 1, memory_gib >= 0"; each
    check now names its own field and value."""
    import pytest

    from clusterlm.errors import ConfigError

    head = '[[node_types]]\nname = "a"\n[node_types.device]\nname = "x"\n'
    for body, message in (("count = 8\nmemory_gib = -80.0\n", r"device 'x': memory_gib=-80 must be >= 0$"),
                          ("count = 0\nmemory_gib = 80.0\n", r"device 'x': count=0 must be >= 1$")):
        (tmp_path / "s.toml").write_text(head + body)
        with pytest.raises(ConfigError, match=message):
            load_spec(tmp_path / "s.toml")


def test_rates_fractions_and_overheads_out_of_range_are_refused(tmp_path):
    """A negative peak planned at -2236.6% MFU with a negative step time (exit 0), and an
    achievable_fraction of 0 divided every collective by a zero bus bandwidth (ZeroDivisionError
    traceback): each is refused by name, through the CLI with exit 2."""
    import pytest

    from clusterlm.errors import ConfigError

    from clusterlm.cluster.spec import presets

    preset = presets()["h100-sxm-8x"].read_text()
    peaks = "peak_tflops = { fp32 = 67.0, tf32 = 494.7, bf16 = 989.4, fp16 = 989.4 }"
    assert peaks in preset and "achievable_fraction = 0.82" in preset
    cases = {
        preset.replace(peaks, peaks.replace("bf16 = 989.4", "bf16 = -989.4")):
            r"device 'NVIDIA H100 80GB HBM3': peak_tflops.bf16=-989.4 must be > 0$",
        preset.replace(peaks, peaks + "\ntrain_efficiency = { bf16 = 0.0 }"): r"train_efficiency.bf16=0 must be > 0$",
        preset.replace(peaks, peaks + "\nop_overhead_us = -3.0"): r"op_overhead_us=-3 must be >= 0 \(or left out\)$",
        preset.replace(peaks, peaks + "\nmeasured_memory_bandwidth_gbs = 0.0"):
            r"measured_memory_bandwidth_gbs=0 must be > 0",
        preset.replace("achievable_fraction = 0.82", "achievable_fraction = 0.0"):
            r"link 'NVLink 4 \(NV18 via NVSwitch\)': achievable_fraction=0 must be in \(0, 1\]",
        preset.replace("achievable_fraction = 0.94", "measured_busbw_gbs = -1.0"): r"measured_busbw_gbs=-1 must be > 0",
    }
    for i, (text, message) in enumerate(cases.items()):
        (tmp_path / f"{i}.toml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_spec(tmp_path / f"{i}.toml")
    r = clusterlm("plan", "--model", "gpt2-124m", "--cluster", str(tmp_path / "4.toml"))
    assert r.returncode == 2 and "achievable_fraction=0 must be in (0, 1]" in r.stderr and "Traceback" not in r.stderr


def test_merge_keeps_the_slower_nodes_per_op_figures_and_the_intra_node_link():
    """Two probes of one node model: the merged node type takes the slower node's per-op figures (what the
    planner's step time uses), not the first file's, and an intra-node link measured on one of them is kept
    (it was dropped when the first file had none)."""
    import dataclasses

    from clusterlm.cluster.spec import LinkSpec, merge_specs

    base = load_spec("h100-sxm-8x")
    node = base.node_types[0]
    link = LinkSpec(name="gloo", bandwidth_gbs=10.0, measured_busbw_gbs=4.2)
    specs = []
    for host, tf, overhead, intra in (("n1", 700.0, 15.0, None), ("n2", 650.0, 999.0, link)):
        dev = dataclasses.replace(node.device, measured_tflops={"bf16": tf}, op_overhead_us=overhead)
        specs.append(dataclasses.replace(base, name=host, node_types=(dataclasses.replace(
            node, name="gpu", device=dev, intra_link=intra, hostnames=(host,)),)))
    for order in (specs, specs[::-1]):
        merged = merge_specs(order).node_types[0]
        assert merged.count == 2 and merged.device.measured_tflops == {"bf16": 650.0}
        assert merged.device.op_overhead_us == 999.0  # n2's: the slower node
        assert merged.intra_link == link
