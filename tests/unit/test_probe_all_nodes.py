"""`clusterlm probe --all-nodes` without Slurm: the srun command lines (pure functions), and the whole
command against a fake `srun` on PATH that runs the real probe once per emulated node.

The fake srun is a small Python script: it reads --nodes/--ntasks-per-node/--output/--export, names
the nodes from SLURM_JOB_NODELIST (or FAKE_SRUN_HOSTS), and starts every task at once with the
variables real srun sets (SLURMD_NODENAME, SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NODEID,
SLURM_NODELIST, SLURM_STEP_ID), its output in the --output file with %N/%n/%t filled in. The emulated hosts do not
resolve, so it also sets MASTER_ADDR=127.0.0.1 (all "nodes" are this machine). FAKE_SRUN_FAIL=host
makes that node's task die the way slurmstepd reports it; every call is appended to FAKE_SRUN_CALLS.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from clusterlm.cli import main as cli_main
from clusterlm.cluster.probe_all import srun_allreduce_command, srun_probe_command
from clusterlm.cluster.spec import load_spec

FAKE_SRUN = r'''#!PYTHON
import json, os, subprocess, sys
sys.path.insert(0, REPO)
from clusterlm.cluster.slurm_text import expand_nodelist

args = sys.argv[1:]
opts = {}
while args and args[0].startswith("--"):
    key, _, value = args.pop(0)[2:].partition("=")
    opts[key] = value
with open(os.environ["FAKE_SRUN_CALLS"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
nodes, per = int(opts["nodes"]), int(opts.get("ntasks-per-node", "1"))
hosts = (os.environ.get("FAKE_SRUN_HOSTS") or ",".join(expand_nodelist(os.environ["SLURM_JOB_NODELIST"]))).split(",")
hosts = hosts[:nodes]
extra = dict(kv.split("=", 1) for kv in opts.get("export", "ALL").split(",")[1:])
procs = []
for i, host in enumerate(hosts):
    for t in range(per):
        rank = i * per + t
        path = opts["output"].replace("%N", host).replace("%n", str(i)).replace("%t", str(rank))
        out = open(path, "w")
        if host == os.environ.get("FAKE_SRUN_FAIL"):
            out.write(f"slurmstepd: error: Detected 1 oom_kill event in StepId=1.0 on {host}\n")
            procs.append(subprocess.Popen(["false"], stdout=out))
            continue
        env = dict(os.environ, **extra, SLURMD_NODENAME=host, SLURM_NODEID=str(i), SLURM_PROCID=str(rank),
                   SLURM_LOCALID=str(t), SLURM_NTASKS=str(nodes * per), SLURM_NODELIST=",".join(hosts),
                   SLURM_STEP_ID="0", MASTER_ADDR="127.0.0.1")
        procs.append(subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env))
codes = [p.wait() for p in procs]
if any(codes):
    print(f"srun: error: {sum(1 for c in codes if c)} task(s) exited with a non-zero status", file=sys.stderr)
sys.exit(max(codes))
'''


def install_fake_srun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put the fake srun first on PATH; returns the file its calls are logged to."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN.replace("#!PYTHON", "#!" + sys.executable)
                    .replace("REPO", repr(str(Path(__file__).resolve().parents[2]))))
    srun.chmod(0o755)
    calls = tmp_path / "srun_calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SRUN_CALLS", str(calls))
    for key in [k for k in os.environ if k.startswith(("SLURM", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))]:
        monkeypatch.delenv(key)
    return calls


def in_allocation(monkeypatch: pytest.MonkeyPatch, nodelist: str = "fake[1-2]", nodes: int = 2) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", str(nodes))
    monkeypatch.setenv("SLURM_JOB_NODELIST", nodelist)


def test_srun_commands():
    """Step 1 is one probe task per node writing node-{host}.toml, logs per node name (%N), no all-reduce;
    step 2 is one task per device with the rendezvous port exported and rank 0 writing the target."""
    cmd = srun_probe_command(4, "/shared/p", quick=True, measure=False, checkpoint_dir="/ckpt", python="py")
    assert cmd == ["srun", "--nodes=4", "--ntasks=4", "--ntasks-per-node=1", "--kill-on-bad-exit=0",
                   "--output=/shared/p/node-%N.log", "py", "-m", "clusterlm", "probe", "--no-allreduce",
                   "--out", "/shared/p/node-{host}.toml", "--checkpoint-dir", "/ckpt", "--quick", "--no-measure"]
    full = srun_probe_command(1, "d", quick=False, measure=True, checkpoint_dir=".", python="py")
    assert "--quick" not in full and "--no-measure" not in full
    cmd = srun_allreduce_command(2, 8, "/shared/p/allreduce.toml", quick=False, master_port=21234, python="py")
    assert cmd == ["srun", "--nodes=2", "--ntasks=16", "--ntasks-per-node=8", "--kill-on-bad-exit=1",
                   "--output=/shared/p/allreduce-%N-%t.log", "--export=ALL,MASTER_PORT=21234",
                   "py", "-m", "clusterlm", "probe", "--no-measure", "--out", "/shared/p/allreduce.toml"]
    with pytest.raises(ValueError, match="nodes=1 x tasks_per_node=1"):
        srun_allreduce_command(1, 1, "x.toml", quick=True, master_port=1)
    with pytest.raises(ValueError, match="--nodes=0 must be >= 1"):
        srun_probe_command(0, "d", quick=True, measure=True, checkpoint_dir=".")


def test_all_nodes_merges_two_nodes(tmp_path, monkeypatch, capsys):
    """Two emulated nodes (fake1, fake2, the same hardware) probed through srun become one node type with
    count 2 and both host names; per-node files land in the nodes folder; srun got --nodes=2."""
    calls = install_fake_srun(tmp_path, monkeypatch)
    in_allocation(monkeypatch)
    out = tmp_path / "cluster.toml"
    rc = cli_main(["probe", "--all-nodes", "--no-measure", "--no-allreduce", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    spec = load_spec(out)
    assert [(n.count, n.hostnames) for n in spec.node_types] == [(2, ("fake1", "fake2"))]
    assert spec.name == "slurm-4242" and "fake1, fake2" in spec.description
    assert sorted(p.name for p in (tmp_path / "cluster-nodes").glob("node-*")) == [
        "node-fake1.log", "node-fake1.toml", "node-fake2.log", "node-fake2.toml"]
    assert all(k.startswith(("fake1: ", "fake2: ")) for k in spec.notes)  # per-node notes keep their node
    assert "allreduce" not in tomllib.loads(out.read_text()).get("notes", {})
    (argv,) = [line for line in calls.read_text().splitlines()]
    assert '"--nodes=2"' in argv and '"--no-allreduce"' in argv
    assert "compute nodes: 2 node(s)" in capsys.readouterr().out


def test_all_nodes_names_the_failed_node(tmp_path, monkeypatch, capsys):
    """A node whose task died: exit 2, the message names that node and quotes the end of its log,
    and no merged spec is written."""
    install_fake_srun(tmp_path, monkeypatch)
    in_allocation(monkeypatch)
    monkeypatch.setenv("FAKE_SRUN_FAIL", "fake2")
    out = tmp_path / "cluster.toml"
    rc = cli_main(["probe", "--all-nodes", "--no-measure", "--no-allreduce", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "probe failed on 1 of 2 node(s)" in err and "srun exited 1" in err
    assert "fake2: no spec written" in err and "oom_kill event" in err and "fake1:" not in err
    assert not out.exists()


def test_all_nodes_outside_allocation_and_without_srun(tmp_path, monkeypatch, capsys):
    """No SLURM_JOB_ID and no --nodes: exit 2 saying to use salloc/sbatch or --nodes; --nodes beyond the
    allocation is refused with the valid range; srun missing from PATH: exit 2 naming srun. With --nodes
    outside an allocation srun allocates: it gets --nodes=2 and both nodes are merged."""
    install_fake_srun(tmp_path, monkeypatch)
    assert cli_main(["probe", "--all-nodes"]) == 2
    err = capsys.readouterr().err
    assert "SLURM_JOB_ID is not set" in err and "salloc or sbatch" in err and "--nodes N" in err

    monkeypatch.setenv("FAKE_SRUN_HOSTS", "a1,a2")
    out = tmp_path / "c.toml"
    assert cli_main(["probe", "--all-nodes", "--nodes", "2", "--no-measure", "--no-allreduce", "--out", str(out)]) == 0
    assert load_spec(out).node_types[0].hostnames == ("a1", "a2")

    in_allocation(monkeypatch)
    assert cli_main(["probe", "--all-nodes", "--nodes", "3"]) == 2
    assert "--nodes=3 but job 4242 has 2 node(s); valid: 1..2" in capsys.readouterr().err

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert cli_main(["probe", "--all-nodes"]) == 2
    assert "srun not found on PATH" in capsys.readouterr().err


def test_single_probe_has_no_busbw_and_nodes_flag_needs_all_nodes(tmp_path, monkeypatch, capsys):
    """One process: the spec holds no measured bus bandwidth anywhere (unknown, not 0) and a note says how
    to measure it; --nodes without --all-nodes is refused."""
    install_fake_srun(tmp_path, monkeypatch)
    out = tmp_path / "n.toml"
    assert cli_main(["probe", "--no-measure", "--out", str(out)]) == 0
    text = out.read_text()
    assert "measured_busbw_gbs" not in text
    assert tomllib.loads(text)["notes"]["allreduce"].startswith("unavailable: one process")
    assert cli_main(["probe", "--nodes", "2"]) == 2
    assert "--nodes and --nodes-dir go with --all-nodes" in capsys.readouterr().err


def test_unwritable_out_is_refused_before_probing(tmp_path, monkeypatch, capsys):
    """--out that is a folder, or under a file, is exit 2 before any measurement or srun step (it used to
    fail after the minute of measuring, the whole probe lost)."""
    from clusterlm.cluster import probe

    calls = install_fake_srun(tmp_path, monkeypatch)
    in_allocation(monkeypatch)
    monkeypatch.setattr(probe, "probe_node", lambda **kw: pytest.fail("probed before --out was checked"))
    assert cli_main(["probe", "--no-measure", "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a directory; give a file name" in capsys.readouterr().err
    (tmp_path / "f").write_text("")
    assert cli_main(["probe", "--no-measure", "--out", str(tmp_path / "f" / "n.toml")]) == 2
    assert f"{tmp_path / 'f'} is not a folder" in capsys.readouterr().err
    assert cli_main(["probe", "--all-nodes", "--no-measure", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err and not calls.exists()


def test_checkpoint_or_nodes_dir_that_is_a_file_is_refused_before_probing(tmp_path, monkeypatch, capsys):
    """--checkpoint-dir naming a file is exit 2 at once (the probe ran, then noted the storage bandwidth
    'unavailable: [Errno 17] File exists')."""
    from clusterlm.cluster import probe

    install_fake_srun(tmp_path, monkeypatch)
    monkeypatch.setattr(probe, "probe_node", lambda **kw: pytest.fail("probed before --checkpoint-dir was checked"))
    (tmp_path / "f").write_text("")
    assert cli_main(["probe", "--checkpoint-dir", str(tmp_path / "f"), "--out", str(tmp_path / "n.toml")]) == 2
    assert f"--checkpoint-dir {tmp_path / 'f'} is not a folder" in capsys.readouterr().err
    in_allocation(monkeypatch)
    assert cli_main(["probe", "--all-nodes", "--nodes-dir", str(tmp_path / "f"), "--out", str(tmp_path / "c.toml")]) == 2
    assert f"--nodes-dir {tmp_path / 'f'} is not a folder" in capsys.readouterr().err  # was "File exists: ..."


def _result(hosts: tuple[str, ...], busbw: tuple[float, ...] = (1.0, 5.0, 4.0, 3.0)):
    from clusterlm.cluster.allreduce import AllReduceResult, SizePoint

    points = tuple(SizePoint(1 << (20 + 2 * i), 5, 1e-3, b, b) for i, b in enumerate(busbw))
    return AllReduceResult("nccl", len(hosts), hosts, "fp32", points)


def test_allreduce_figure_goes_to_the_link_it_crossed():
    """Ranks on one host: the figure (best busbw of the 3 largest messages: 5.0, not the 1 MiB point's 1.0
    nor the last one's 3.0) goes to that node type's intra-node link, nominal figures kept; ranks on 2 hosts:
    the inter-node link; no link at all: the table's shared-memory link (CPU) or a network link marked as
    nominal-unknown. The notes carry backend, world size and every size."""
    from clusterlm.cluster.probe import with_allreduce
    from clusterlm.cluster.spec import ClusterSpec, DeviceSpec, LinkSpec, NodeType

    nvlink = LinkSpec("NVLink NV18", 450.0, 1.0, source="nvidia-smi topo -m")
    ib = LinkSpec("InfiniBand 400 Gb/s", 50.0, 3.0, 8)
    gpu = NodeType("g", device=DeviceSpec("NVIDIA H100 80GB HBM3", count=8), intra_link=nvlink, hostnames=("g1",))
    spec = ClusterSpec("c", node_types=(gpu,), inter_node_link=ib)
    one = with_allreduce(spec, _result(("g1",) * 8))
    link = one.node_types[0].intra_link
    assert (link.measured_busbw_gbs, link.bandwidth_gbs, link.name) == (5.0, 450.0, "NVLink NV18")
    assert link.source.startswith("nvidia-smi topo -m; measured_busbw_gbs: all_reduce fp32 sum, nccl, 8 ranks on 1")
    assert one.inter_node_link == ib
    assert one.notes["allreduce_busbw_gbs"] == "1 MiB 1, 4 MiB 5, 16 MiB 4, 64 MiB 3"
    two = with_allreduce(spec, _result(("g1",) * 8 + ("g2",) * 8))
    assert two.inter_node_link.measured_busbw_gbs == 5.0 and two.inter_node_link.count == 8
    assert two.node_types[0].intra_link == nvlink and "16 ranks on 2 host(s)" in two.notes["allreduce"]

    cpu = ClusterSpec("c", node_types=(NodeType("h", device=DeviceSpec("cpu", kind="cpu"), hostnames=("h",)),))
    shm = with_allreduce(cpu, _result(("h", "h"))).node_types[0].intra_link
    assert shm.name == "one host, shared memory" and shm.measured_busbw_gbs == 5.0
    net = with_allreduce(cpu, _result(("h", "k"))).inter_node_link
    assert net.bandwidth_gbs == net.measured_busbw_gbs == 5.0 and "nominal bandwidth unknown" in net.source


def test_step2_link_is_copied_into_the_merged_spec():
    """--all-nodes step 2 on one 8-GPU node measured the intra-node link: the merged spec's node type with
    that host gets it; on 2 nodes the measured inter-node figure joins the merged spec's own link (its
    adapters count kept); a step-2 spec without a measured link leaves a note instead."""
    import dataclasses

    from clusterlm.cluster.probe import with_allreduce
    from clusterlm.cluster.probe_all import _copy_allreduce
    from clusterlm.cluster.spec import ClusterSpec, DeviceSpec, LinkSpec, NodeType

    node = NodeType("g", count=2, device=DeviceSpec("NVIDIA H100 80GB HBM3", count=8), hostnames=("g1", "g2"))
    merged = ClusterSpec("m", node_types=(node,), inter_node_link=LinkSpec("IB", 50.0, 3.0, 4))
    one = dataclasses.replace(node, count=1, hostnames=("g1",))
    measured = with_allreduce(ClusterSpec("s", node_types=(one,)), _result(("g1",) * 8))
    out = _copy_allreduce(merged, measured)
    assert out.node_types[0].intra_link.measured_busbw_gbs == 5.0 and out.inter_node_link.measured_busbw_gbs is None
    assert "8 ranks on 1 host(s)" in out.notes["allreduce"]
    measured = with_allreduce(ClusterSpec("s", node_types=(one,)), _result(("g1",) * 8 + ("g2",) * 8))
    out = _copy_allreduce(merged, measured)
    assert (out.inter_node_link.name, out.inter_node_link.count, out.inter_node_link.measured_busbw_gbs) == ("IB", 4, 5.0)
    assert _copy_allreduce(merged, ClusterSpec("s", node_types=(one,))).notes["allreduce"].startswith("unavailable")


def test_all_nodes_modules_import_without_torch():
    """probe_all and parallel.collectives (whose torch runners import torch inside functions) import on a
    login node without torch."""
    import subprocess

    code = ("import sys\nclass B:\n    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n            raise ImportError('blocked')\n"
            "sys.meta_path.insert(0, B())\nimport clusterlm.cluster.probe_all, clusterlm.parallel.collectives\n"
            "assert 'torch' not in sys.modules\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_slurm_client_without_configuration_is_named(tmp_path, monkeypatch):
    """Slurm's client installed on a machine that is no Slurm node (no slurm.conf): the probe says so in one
    line instead of relaying scontrol's DNS SRV errors."""
    from clusterlm.cluster import probe

    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'scontrol: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host' >&2\n"
                    "echo 'scontrol: error: fetch_config: DNS SRV lookup failed' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(RuntimeError, match="installed but find no cluster configuration"):
        probe.probe_slurm()


def install_fake_slurm_queries(tmp_path: Path) -> None:
    """Fake sinfo and scontrol in tmp_path/bin printing the recorded cluster (fixtures/probe): `sinfo -N`
    its node states, plain sinfo its partitions, `scontrol show partition` its per-job limits."""
    recorded = Path(__file__).parent / "fixtures" / "probe"
    sinfo = tmp_path / "bin" / "sinfo"
    sinfo.write_text(f"#!/bin/sh\ncase \"$*\" in *-N*) cat '{recorded}/sinfo_node_states.txt';;\n"
                     f"*) cat '{recorded}/sinfo_gpu_cluster.txt';; esac\n")
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text(f"#!/bin/sh\ncat '{recorded}/scontrol_show_partition_o.txt'\n")
    for tool in (sinfo, scontrol):
        tool.chmod(0o755)


def test_nodes_beyond_the_partition_are_refused_before_srun(tmp_path, monkeypatch, capsys):
    """Outside an allocation, --nodes more than the partition srun allocates from can run (the default one,
    gpu* with 32 nodes in the recorded sinfo, 2 of them drained/down; SLURM_PARTITION when set) is exit 2
    naming N, the partition's size, its unusable nodes and its MaxNodes, before any srun call (srun used
    to queue for up to an hour); --nodes within it goes ahead."""
    calls = install_fake_srun(tmp_path, monkeypatch)
    install_fake_slurm_queries(tmp_path)
    assert cli_main(["probe", "--all-nodes", "--nodes", "31", "--out", str(tmp_path / "c.toml")]) == 2
    err = capsys.readouterr().err
    assert ("partition gpu (the default partition) has 32 node(s), 2 of them down/drained (gpu017,gpu030): "
            "--nodes 31 cannot run") in err
    assert "use --nodes 30 or fewer" in err
    assert "cpu: 64" in err and not calls.exists() and not (tmp_path / "c.toml").exists()
    monkeypatch.setenv("SLURM_PARTITION", "debug")  # 2 nodes, gpu034 draining, MaxNodes=1
    assert cli_main(["probe", "--all-nodes", "--nodes", "2"]) == 2
    err = capsys.readouterr().err
    assert ("partition debug has 2 node(s), 1 of them down/drained (gpu034), and MaxNodes=1 per job: "
            "--nodes 2 cannot run") in err and "use --nodes 1 or fewer" in err
    monkeypatch.setenv("SLURM_PARTITION", "preempt")
    assert cli_main(["probe", "--all-nodes", "--nodes", "1"]) == 2
    assert "partition preempt has 0 node(s), and is down (sinfo)" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_PARTITION", "cpu")
    monkeypatch.setenv("FAKE_SRUN_HOSTS", "a1,a2,a3")
    out = tmp_path / "c.toml"
    assert cli_main(["probe", "--all-nodes", "--nodes", "3", "--no-measure", "--no-allreduce", "--out", str(out)]) == 0
    assert load_spec(out).node_types[0].count == 3


def test_partition_limit_counts_usable_nodes_and_max_nodes():
    """check_partition_size on the recorded cluster: 32 gpu nodes minus drained gpu017 and down* gpu030
    leave 30; debug's MaxNodes=1 binds before its 1 usable node count; cpu takes 63 (cn064 failed);
    without the node-state and partition queries only sinfo's count applies (32)."""
    from clusterlm.cluster.probe_all import ProbeError, check_partition_size
    fixtures = Path(__file__).parent / "fixtures" / "probe"
    sinfo = (fixtures / "sinfo_gpu_cluster.txt").read_text()
    states = (fixtures / "sinfo_node_states.txt").read_text()
    parts = (fixtures / "scontrol_show_partition_o.txt").read_text()
    check_partition_size(30, {}, sinfo, states, parts)
    with pytest.raises(ProbeError, match="use --nodes 30 or fewer"):
        check_partition_size(31, {}, sinfo, states, parts)
    check_partition_size(32, {}, sinfo, None, None)
    check_partition_size(63, {"SLURM_PARTITION": "cpu"}, sinfo, states, parts)
    with pytest.raises(ProbeError, match="1 of them down/drained \\(cn064\\): --nodes 64 cannot run"):
        check_partition_size(64, {"SLURM_PARTITION": "cpu"}, sinfo, states, parts)
    check_partition_size(1, {"SLURM_PARTITION": "debug"}, sinfo, states, parts)
    with pytest.raises(ProbeError, match="MaxNodes=1 per job: --nodes 2 cannot run"):
        check_partition_size(2, {"SLURM_PARTITION": "debug"}, sinfo, None, parts)
    check_partition_size(30, {"SLURM_PARTITION": "debug,gpu"}, sinfo, states, parts)  # srun takes either


def test_srun_that_ran_no_task_counts_every_node(tmp_path):
    """srun that started no task (no Slurm configuration here, or refused at once) on a 500-node request:
    "probe failed on 500 of 500 node(s)", not "on 1 of 500" (the one line standing for all of them)."""
    import subprocess

    from clusterlm.cluster.probe_all import ProbeError, collect_node_specs

    srun = subprocess.CompletedProcess(["srun"], 1, "", "srun: fatal: Could not establish a configuration source\n")
    with pytest.raises(ProbeError) as e:
        collect_node_specs(tmp_path, 500, None, srun)
    msg = str(e.value)
    assert msg.startswith("probe failed on 500 of 500 node(s) (srun exited 1: srun: fatal: Could not establish")
    assert "500 of 500 node(s) wrote no spec and no log" in msg
