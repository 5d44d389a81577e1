"""`clusterlm probe --all-nodes`: the probe on every node of a Slurm allocation, merged into one ClusterSpec.

    salloc -N 4 --gpus-per-node 8 clusterlm probe --all-nodes --out cluster.toml
    sbatch -N 4 --wrap "clusterlm probe --all-nodes --quick --out cluster.toml"
    clusterlm probe --all-nodes --nodes 2 --out cluster.toml      # no allocation: srun allocates 2 nodes

Two srun steps, both from commands built by pure functions (tested without Slurm):

1. one task per node: `clusterlm probe --no-allreduce --out DIR/node-{host}.toml`, each task's
   output in DIR/node-%N.log; the node specs are merged with spec.merge_specs (identical nodes
   become one node type with a count; measured figures keep the slowest node's);
2. one task per device (one per node on CPU nodes): `clusterlm probe --no-measure` measures
   all-reduce bus bandwidth across all ranks and its figure goes to the merged spec's inter-node
   link (intra-node on a one-node allocation). This step fails soft: the merged spec is written
   with a note saying why the figure is missing.

DIR (--nodes-dir, default next to --out) must be on a filesystem every node sees. A node whose
spec is missing fails the whole command with the node's name and the end of its log; nothing is
written to --out then, and DIR keeps the logs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from clusterlm.cluster.slurm_text import (SINFO_FORMAT, SINFO_NODE_STATE_FORMAT, expand_nodelist, node_state_usable,
                                          parse_scontrol_show_partition, parse_sinfo, parse_sinfo_node_states)
from clusterlm.cluster.spec import ClusterSpec, load_spec, merge_specs, save_spec
from clusterlm.errors import ClusterlmError, ConfigError

log = logging.getLogger(__name__)

Runner = Callable[[list[str], float], subprocess.CompletedProcess]
STEP_TIMEOUT_S = 3600.0  # a full (not --quick) probe takes about a minute; srun may queue for a while


class ProbeError(ClusterlmError):
    """A probe that cannot run as asked (no Slurm allocation, srun missing, a node that failed)."""


def srun_probe_command(nodes: int, nodes_dir: str, *, quick: bool, measure: bool, checkpoint_dir: str,
                       python: str | None = None) -> list[str]:
    """srun step 1: the probe on each of `nodes` nodes, one task per node, one spec and log per node."""
    if nodes < 1:
        raise ValueError(f"--nodes={nodes} must be >= 1")
    cmd = ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=0",
           f"--output={nodes_dir}/node-%N.log",
           python or sys.executable, "-m", "clusterlm", "probe", "--no-allreduce",
           "--out", f"{nodes_dir}/node-{{host}}.toml", "--checkpoint-dir", checkpoint_dir]
    return cmd + (["--quick"] if quick else []) + ([] if measure else ["--no-measure"])


def srun_allreduce_command(nodes: int, tasks_per_node: int, out: str, *, quick: bool, master_port: int,
                           python: str | None = None) -> list[str]:
    """srun step 2: all-reduce across nodes x tasks_per_node ranks; rank 0 writes `out`. The master
    address is the first host of the step (clusterlm.parallel.launch.read_env); the port is given."""
    if nodes < 1 or tasks_per_node < 1 or nodes * tasks_per_node < 2:
        raise ValueError(f"an all-reduce needs 2+ ranks: nodes={nodes} x tasks_per_node={tasks_per_node}")
    cmd = ["srun", f"--nodes={nodes}", f"--ntasks={nodes * tasks_per_node}", f"--ntasks-per-node={tasks_per_node}",
           "--kill-on-bad-exit=1", f"--output={Path(out).parent}/allreduce-%N-%t.log",
           f"--export=ALL,MASTER_PORT={master_port}",
           python or sys.executable, "-m", "clusterlm", "probe", "--no-measure", "--out", out]
    return cmd + (["--quick"] if quick else [])


def run_srun(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """The one runner: srun with its own output (the tasks' output goes to the --output files)."""
    log.info("running: %s", " ".join(cmd))
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ProbeError(f"{' '.join(cmd[:4])} ... did not finish within {timeout:g} s") from None


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:] if line.strip()) or "(empty)"


def collect_node_specs(nodes_dir: Path, nodes: int, expected_hosts: list[str] | None,
                       srun: subprocess.CompletedProcess) -> list[ClusterSpec]:
    """The node specs of step 1, or ProbeError naming every node that wrote none and why (the end of
    its log, or srun's own message when no task ran there)."""
    specs = {p.name[len("node-"):-len(".toml")]: p for p in nodes_dir.glob("node-*.toml")}
    logs = {p.name[len("node-"):-len(".log")]: p for p in nodes_dir.glob("node-*.log")}
    failed = []
    for host in sorted(set(logs) | set(expected_hosts or [])):
        if host in specs:
            continue
        if host in logs:
            failed.append(f"{host}: no spec written; its log {logs[host]} ends: {_tail(logs[host].read_text())}")
        else:
            failed.append(f"{host}: no task ran there (no log)")
    n_failed = len(failed)
    if not failed and len(specs) < nodes:  # no host names to go by (srun allocated, or did not start)
        n_failed = nodes - len(specs)
        failed.append(f"{n_failed} of {nodes} node(s) wrote no spec and no log")
    if failed:
        srun_msg = f"srun exited {srun.returncode}: {_tail(srun.stderr or srun.stdout, 3)}"
        raise ProbeError(f"probe failed on {n_failed} of {nodes} node(s) ({srun_msg}):\n  " + "\n  ".join(failed)
                         + f"\nnode specs and logs are in {nodes_dir}")
    out = []
    for host, path in sorted(specs.items()):
        try:
            out.append(load_spec(path))
        except ConfigError as e:
            raise ProbeError(f"{host}: unreadable node spec {path}: {e}") from e
    return out


def _allocation(env: Mapping[str, str], nodes: int | None) -> tuple[int, list[str] | None]:
    """(nodes to probe, their names when known) from the Slurm allocation or --nodes."""
    if "SLURM_JOB_ID" not in env:
        if nodes is None:
            raise ProbeError("--all-nodes runs inside a Slurm allocation (SLURM_JOB_ID is not set): run it under "
                             "salloc or sbatch, e.g. `salloc -N 2 clusterlm probe --all-nodes --out cluster.toml`, "
                             "or pass --nodes N to let srun allocate N nodes")
        return nodes, None
    have = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if have is None or not have.isdigit():
        raise ProbeError(f"inside Slurm job {env['SLURM_JOB_ID']} but SLURM_JOB_NUM_NODES={have!r} is not a count")
    allocated = int(have)
    if nodes is not None and not 1 <= nodes <= allocated:
        raise ProbeError(f"--nodes={nodes} but job {env['SLURM_JOB_ID']} has {allocated} node(s); valid: 1..{allocated}")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    hosts = expand_nodelist(nodelist) if nodelist else None
    n = nodes or allocated
    return n, (hosts if hosts and len(hosts) == n else None)


def run_query(cmd: list[str]) -> str | None:
    """A Slurm query's stdout (sinfo, scontrol), or None when the command is missing, fails or does not
    answer in 30 s."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return None
    return r.stdout if r.returncode == 0 else None


def check_partition_size(nodes: int, env: Mapping[str, str], sinfo_text: str | None,
                         node_states_text: str | None = None, partitions_text: str | None = None) -> None:
    """Outside an allocation srun allocates `nodes` nodes from SLURM_PARTITION (or the default partition);
    a request it cannot meet would queue until STEP_TIMEOUT_S, so refuse it now. What limits it: the
    partition's nodes that can take a job (down, drained and failed ones not counted: `sinfo -N` states)
    and its per-job node limit (MaxNodes of `scontrol show partition`). Nothing is checked when sinfo gave
    no answer or the partition is not in it (srun then speaks for itself); a query that gave no answer
    leaves its limit out."""
    if not sinfo_text:
        return
    parts = parse_sinfo(sinfo_text)
    wanted = [p.strip() for p in env.get("SLURM_PARTITION", "").split(",") if p.strip()]
    chosen = [p for p in parts if p.name in wanted] if wanted else [p for p in parts if p.default]
    if not chosen:
        return
    states = parse_sinfo_node_states(node_states_text or "")
    max_nodes = parse_scontrol_show_partition(partitions_text or "")
    reasons = []
    for p in chosen:
        hosts = states.get(p.name)
        total = len(hosts) if hosts else p.nodes
        down = sorted(h for h, state in (hosts or {}).items() if not node_state_usable(state))
        usable = total - len(down)
        limit = usable if max_nodes.get(p.name) is None else min(usable, max_nodes[p.name])
        if p.avail.lower() != "up":
            limit = 0
        if nodes <= limit:
            return
        why = f"partition {p.name}{'' if wanted else ' (the default partition)'} has {total} node(s)"
        if down:
            shown = ",".join(down[:8]) + (f",... ({len(down) - 8} more)" if len(down) > 8 else "")
            why += f", {len(down)} of them down/drained ({shown})"
        if max_nodes.get(p.name) is not None:
            why += f", and MaxNodes={max_nodes[p.name]} per job"
        if p.avail.lower() != "up":
            why += f", and is {p.avail} (sinfo)"
        reasons.append((limit, why))
    best = max(limit for limit, _ in reasons)
    fix = f"use --nodes {best} or fewer" if best else "no node of it can take a job now"
    sizes = ", ".join(f"{p.name}: {p.nodes}" for p in sorted(parts, key=lambda p: -p.nodes))
    raise ProbeError(f"{'; '.join(why for _, why in reasons)}: --nodes {nodes} cannot run (srun would queue for up "
                     f"to {STEP_TIMEOUT_S:g} s); {fix}, or set SLURM_PARTITION to another partition "
                     f"(sinfo: {sizes})")


def _master_port(env: Mapping[str, str]) -> int:
    """A port for step 2's rendezvous on its first node: derived from the job id inside an allocation
    (the common sbatch idiom, so concurrent jobs differ), random outside one."""
    job = env.get("SLURM_JOB_ID", "")
    return 20000 + int(job) % 20000 if job.isdigit() else random.randint(20000, 39999)


def _copy_allreduce(merged: ClusterSpec, measured: ClusterSpec) -> ClusterSpec:
    """Carry step 2's measured link (and its notes) into the merged spec."""
    notes = {**merged.notes, **{k: v for k, v in measured.notes.items() if k.startswith("allreduce")}}
    m = measured.inter_node_link
    if m is not None and m.measured_busbw_gbs:
        link = merged.inter_node_link
        link = dataclasses.replace(link, measured_busbw_gbs=m.measured_busbw_gbs, source=m.source) if link else m
        return dataclasses.replace(merged, inter_node_link=link, notes=notes)
    for n in measured.node_types:
        if n.intra_link and n.intra_link.measured_busbw_gbs:
            types = tuple(dataclasses.replace(t, intra_link=n.intra_link) if set(n.hostnames) & set(t.hostnames)
                          else t for t in merged.node_types)
            return dataclasses.replace(merged, node_types=types, notes=notes)
    return dataclasses.replace(merged, notes={**notes, "allreduce": "unavailable: step 2 wrote no measured link"})


def probe_all_nodes(*, out: str | None, quick: bool = False, measure: bool = True, checkpoint_dir: str = ".",
                    nodes: int | None = None, nodes_dir: str | None = None, allreduce: bool = True,
                    env: Mapping[str, str] | None = None, runner: Runner = run_srun,
                    query: Callable[[list[str]], str | None] = run_query) -> ClusterSpec:
    """Probe every node with srun, merge, measure all-reduce across nodes; write `out` if given."""
    env = os.environ if env is None else env
    n, hosts = _allocation(env, nodes)
    if shutil.which("srun") is None:
        raise ProbeError("srun not found on PATH: --all-nodes needs Slurm's srun (Debian/Ubuntu package "
                         "slurm-client); without Slurm, run `clusterlm probe --out node-X.toml` on each node and "
                         "`clusterlm cluster merge node-*.toml --out cluster.toml`")
    if "SLURM_JOB_ID" not in env:
        check_partition_size(n, env, query(["sinfo", "-h", "-o", SINFO_FORMAT]),
                             query(["sinfo", "-h", "-N", "-o", SINFO_NODE_STATE_FORMAT]),
                             query(["scontrol", "show", "partition", "-o"]))
    if nodes_dir is None:
        nodes_dir = f"{Path(out).with_suffix('')}-nodes" if out else f"probe-nodes-{env.get('SLURM_JOB_ID', 'srun')}"
    folder = Path(nodes_dir).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob("node-*.toml"), *folder.glob("node-*.log"), *folder.glob("allreduce*")]:
        old.unlink()  # a previous run's files must not pass for this one's
    step1 = runner(srun_probe_command(n, str(folder), quick=quick, measure=measure,
                                      checkpoint_dir=os.path.abspath(checkpoint_dir)), STEP_TIMEOUT_S)
    specs = collect_node_specs(folder, n, hosts, step1)
    name = f"slurm-{env['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in env else "cluster"
    merged = merge_specs(specs, name=name)
    merged = dataclasses.replace(merged, description=f"{merged.description}, probed with srun on "
                                 f"{', '.join(h for s in specs for t in s.node_types for h in t.hostnames)}"
                                 + (" --quick" if quick else ""))
    node = merged.node_type()
    per_node = node.device.count if node.device and node.device.kind != "cpu" else 1
    if allreduce and n * per_node >= 2:
        target = folder / "allreduce.toml"
        step2 = runner(srun_allreduce_command(n, per_node, str(target), quick=quick, master_port=_master_port(env)),
                       STEP_TIMEOUT_S)
        if step2.returncode == 0 and target.is_file():
            merged = _copy_allreduce(merged, load_spec(target))
        else:
            logs = sorted(folder.glob("allreduce-*.log"))
            why = _tail(logs[0].read_text(), 3) if logs else _tail(step2.stderr or step2.stdout, 3)
            merged = dataclasses.replace(merged, notes={**merged.notes, "allreduce": f"unavailable: srun step "
                                                        f"exited {step2.returncode}: {why}"})
    elif allreduce:
        merged = dataclasses.replace(merged, notes={**merged.notes, "allreduce": "unavailable: one node with one "
                                                    "device: no ranks to all-reduce across"})
    if out:
        save_spec(merged, out)
    return merged
