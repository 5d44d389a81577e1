"""Issue 20: a probe knows when it was disturbed. Reference: a deliberate CPU hog (a subprocess spinning one
core, bounded in time) is other processes' CPU time the probe must see in /proc/stat beyond its own, flag
as disturbed, and the plan must refuse it without --force."""

import subprocess
import sys
import time
from pathlib import Path

import pytest

from clusterlm.cluster import microbench, planner, probe
from clusterlm.cluster.spec import load_spec, save_spec
from clusterlm.errors import ConfigError

pytestmark = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs /proc/stat (Linux)")
HOG_S = 60  # the hog's own bound: it stops by itself even if the test dies (the test kills it sooner)


def start_hog() -> subprocess.Popen:
    code = f"import time\nend = time.time() + {HOG_S}\nwhile time.time() < end:\n    pass\n"
    p = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(0.3)  # started and spinning
    return p


def test_busy_seconds_from_proc_stat():
    """/proc/stat's cpu line: busy = everything but idle and iowait, in clock ticks."""
    line = "cpu  100 5 50 1000 40 3 2 0 0 0\ncpu0 1 2 3 4\n"
    assert microbench.cpu_busy_seconds(line, 100) == pytest.approx((100 + 5 + 50 + 3 + 2) / 100)


def test_spread_is_robust():
    """(p75 - p25) / median: one outlier of ten calls does not move it."""
    assert microbench.spread([1.0] * 9 + [50.0]) == pytest.approx(0.0)
    assert microbench.spread([1.0, 1.0, 2.0, 2.0]) == pytest.approx(0.5)


def test_foreign_cpu_sees_a_hog_and_not_itself():
    """1.5 s of this process spinning counts as its own (foreign ~0 from it); a hog spinning one core meanwhile
    counts as about one CPU of other work (> 0.6 allowing for the 2-core VM's sharing)."""
    hog = start_hog()
    try:
        with microbench.ForeignCpu() as fc:
            end = time.perf_counter() + 1.5
            while time.perf_counter() < end:
                pass
    finally:
        hog.kill()
        hog.wait()
    assert fc.own_s > 0.05 and fc.wall_s >= 1.5  # on a shared machine it gets what it gets
    assert fc.foreign_cpus > 0.6, (fc.foreign_cpus, fc.busy_s, fc.own_s)


def test_probe_under_a_cpu_hog_is_flagged_and_the_plan_refuses(tmp_path, monkeypatch, capsys):
    """The real probe_node (its sweeps cut to a few shapes to stay within seconds) while a hog spins one core:
    the spec's [probe] is disturbed with the hog's CPU time in foreign_cpus; the spec round-trips through TOML;
    `clusterlm plan` refuses it, naming the figures, and with --force warns and plans."""
    monkeypatch.setattr(probe, "SWEEP_GRID_CPU_QUICK", ((128,), (32, 128), (32, 128)))
    monkeypatch.setattr(probe, "KERNEL_ELEMS", (1 << 14, 1 << 16))
    monkeypatch.setattr(probe, "ATTENTION_T_CPU", (128,))
    monkeypatch.setattr(probe, "ATTENTION_HD_QUICK", (32,))
    monkeypatch.setattr(probe, "ELEMENTWISE_ELEMS_QUICK", (4096, 65536))
    monkeypatch.setattr(probe, "RNN_BATCH_QUICK", (4,))
    monkeypatch.setattr(probe, "RNN_DIM_QUICK", (64,))
    hog = start_hog()
    try:
        spec = probe.probe_node(quick=True, measure=True, work_dir=str(tmp_path), checkpoint_dir=str(tmp_path))
        spinning = hog.poll() is None  # the hog ran through the whole measurement
    finally:
        hog.kill()
        hog.wait()
    assert spinning
    q = spec.probe
    assert q is not None and q.disturbed, q
    assert q.foreign_cpus > 0.5 and q.busy_cpu_s > q.own_cpu_s and any("other processes" in r for r in q.reasons)
    path = tmp_path / "node.toml"
    save_spec(spec, path)
    assert load_spec(path).probe == q
    argv = ["--model", "gpt-mini", "--vocab-size", "65", "--cluster", str(path), "--seq-len", "64",
            "--global-batch-tokens", "768", "--dtype", "fp32"]
    with pytest.raises(ConfigError, match="the probe was disturbed"):
        planner.main(argv)
    assert planner.main(argv + ["--force"]) == 0
    assert "WARNING: planning from a disturbed probe" in capsys.readouterr().out
