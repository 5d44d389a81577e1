"""All-reduce bus bandwidth measured by `clusterlm probe` on real gloo ranks: under torchrun (2 ranks, one
host: the intra-node link) and through `probe --all-nodes` with a fake srun emulating 2 nodes (2 ranks on
2 host names: the inter-node link). About 10 s on 2 cores."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from clusterlm.cli import main as cli_main
from clusterlm.cluster.spec import load_spec
from clusterlm.cluster.allreduce import bus_bandwidth
from tests.unit.test_probe_all_nodes import in_allocation, install_fake_srun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bus_bandwidth_convention():
    """nccl-tests (doc/PERFORMANCE.md): algbw = S/t, busbw = algbw * 2(n-1)/n; 1 GB in 0.1 s on 8 ranks
    is algbw 10 GB/s, busbw 17.5 GB/s; on 2 ranks busbw equals algbw."""
    assert bus_bandwidth(10**9, 0.1, 8) == pytest.approx((10.0, 17.5))
    assert bus_bandwidth(10**6, 1e-3, 2) == pytest.approx((1.0, 1.0))
    with pytest.raises(ValueError, match="seconds=0"):
        bus_bandwidth(10, 0, 2)


def test_torchrun_probe_measures_intra_node_busbw(tmp_path):
    """torchrun --nproc-per-node 2 `clusterlm probe --quick --no-measure`: rank 0 alone writes a spec whose
    intra-node link has a positive measured busbw from a gloo all-reduce over 2 ranks on 1 host, with the
    per-size figures in the notes and a table printed; a single process writes no busbw at all."""
    out = tmp_path / "node.toml"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_",
                                                                   "SLURM"))}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
                        f"--master-port={_free_port()}", "-m", "clusterlm", "probe", "--quick", "--no-measure",
                        "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1 and "busbw_GB/s" in r.stdout  # rank 1 neither prints nor writes
    spec = load_spec(out)
    (node,) = spec.node_types
    link = node.intra_link
    assert link is not None and link.measured_busbw_gbs > 0
    assert spec.inter_node_link is None or spec.inter_node_link.measured_busbw_gbs is None
    assert "gloo, 2 ranks on 1 host(s)" in spec.notes["allreduce"] and "gloo, 2 ranks" in link.source
    sizes = spec.notes["allreduce_busbw_gbs"].split(", ")
    assert len(sizes) == 7 and sizes[0].startswith("4 KiB") and sizes[-1].startswith("16 MiB")
    assert max(float(s.split()[-1]) for s in sizes[-3:]) == link.measured_busbw_gbs

    single = tmp_path / "single.toml"
    r = subprocess.run([sys.executable, "-m", "clusterlm", "probe", "--no-measure", "--out", str(single)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "measured_busbw_gbs" not in single.read_text()


def test_all_nodes_allreduce_fills_inter_node_link(tmp_path, monkeypatch, capsys):
    """`probe --all-nodes --quick --no-measure` over 2 emulated nodes: step 1 merges 2 node specs, step 2
    runs 2 gloo ranks (one per node, CPU nodes) whose host names differ, so the measured busbw lands in the
    merged spec's inter-node link; the per-node intra links stay unmeasured."""
    calls = install_fake_srun(tmp_path, monkeypatch)
    in_allocation(monkeypatch, nodelist="n[7-8]")
    port = next(p for p in iter(_free_port, None) if 20000 <= p < 40000)  # step 2's port is 20000 + job id % 20000
    monkeypatch.setenv("SLURM_JOB_ID", str(port - 20000))
    out = tmp_path / "cluster.toml"
    assert cli_main(["probe", "--all-nodes", "--quick", "--no-measure", "--out", str(out)]) == 0, \
        capsys.readouterr().err
    spec = load_spec(out)
    assert [(n.count, n.hostnames) for n in spec.node_types] == [(2, ("n7", "n8"))]
    assert spec.node_types[0].intra_link is None
    link = spec.inter_node_link
    assert link is not None and link.measured_busbw_gbs > 0
    assert "gloo, 2 ranks on 2 host(s)" in spec.notes["allreduce"] and "ranks on n7, n8" in spec.notes["allreduce"]
    assert tomllib.loads(out.read_text())["inter_node_link"]["measured_busbw_gbs"] == link.measured_busbw_gbs
    step2 = calls.read_text().splitlines()[1]
    assert '"--ntasks=2"' in step2 and f'"--export=ALL,MASTER_PORT={port}"' in step2
    assert "measured all-reduce busbw" in capsys.readouterr().out
