"""Slurm: render an sbatch script for `clusterlm train`, submit it, requeue on preemption, list jobs.

    clusterlm launch recipes/gpt2_124m_1gpu.toml --slurm --nodes 2 --gpus-per-node 8 --time 04:00:00 \\
        --partition gpu --parallel.dp_shard=16 --dry-run
    clusterlm jobs            # runs submitted from here, with their Slurm state and requeue count

The script asks Slurm for SIGUSR2 `signal_seconds` before the time limit (`--signal=USR2@120`, sent
to the job steps, not the batch shell), starts one task per device with srun, and rendezvouses on
the allocation's first node at a port derived from the job id. `clusterlm train` catches the
signal, all ranks agree (all-reduce), finish the step, checkpoint and exit with EXIT_PREEMPTED
(75); the script then runs `scontrol requeue`, and the requeued job resumes by itself
(`--train.resume=auto`). Torch-free: this runs on a login node.

Elastic jobs (`--min-nodes`, `#SBATCH --nodes=MIN-MAX --no-kill`): when a node fails, the script names
it and, with `--on-node-loss requeue` (the default), sets it DOWN where Slurm has not yet and requeues
the job, which Slurm starts again on the nodes that are up (at least MIN) and which resumes its last
checkpoint at the new world size; with `--on-node-loss continue` it restarts in the same allocation
on the nodes left instead (faster: no requeue, no new scheduling).

Each submission is appended to a job registry (one JSON line per job: job id, recipe, script,
submit time, working folder) in $CLUSTERLM_HOME/jobs.jsonl, else ~/.cache/clusterlm/jobs.jsonl.
`clusterlm jobs` reads their state from sacct, falling back to squeue and then `scontrol show job`
when the cluster keeps no accounting (sacct then fails), with the requeue count from
`scontrol show job` (Restarts=) or from sacct's duplicate records.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from clusterlm.cluster.slurm_text import (TERMINAL_STATES, JobState, parse_sacct, parse_scontrol_show_job,
                                         parse_squeue, parse_time_limit)
from clusterlm.errors import EXIT_PREEMPTED, EXIT_RANK_LOST
from clusterlm.errors import ClusterlmError, ConfigError

log = logging.getLogger(__name__)

REGISTRY_VERSION = 1
PROBE_S = 20  # elastic jobs: a node that cannot run a one-task step in this time is taken for lost
MAX_RANK_LOST_REQUEUES = 3  # a job whose ranks (or nodes) keep getting lost is not requeued for ever
ON_NODE_LOSS = ("requeue", "continue")  # elastic jobs: what the script does when a node is lost
SIGNAL_RESOLUTION_S = 60  # sbatch(1), --signal: "may be sent up to 60 seconds earlier than specified"
_NAME_RE = re.compile(r"[A-Za-z0-9_.,+\-]+")  # job names, partitions, accounts (fullmatch): no spaces or quotes


@dataclass(frozen=True)
class SbatchOptions:
    """What `clusterlm launch --slurm` asks Slurm for."""

    nodes: int = 1
    min_nodes: int = 0
    """elastic: start (or restart after a node loss) on as few as this many nodes (sbatch --nodes=MIN-MAX),
    with dp_replicate = the allocated node count; 0 = exactly `nodes`"""
    ntasks_per_node: int = 1
    """tasks (training processes) per node: one per device"""
    gpus_per_node: int = 0
    """GPUs per node (--gpus-per-node); 0 = CPU-only, no GPU request"""
    cpus_per_task: int = 1
    time: str = ""
    """time limit [D-]HH:MM:SS; empty = the partition's default"""
    partition: str = ""
    account: str = ""
    job_name: str = "clusterlm"
    signal_seconds: int = 120
    """SIGUSR2 this many seconds before the time limit: time to finish a step and checkpoint"""
    extra: tuple[str, ...] = ()
    """further #SBATCH options, each one "--key=value" (e.g. --exclusive, --mem=0)"""
    on_node_loss: str = "requeue"
    """elastic jobs, after a node is lost: "requeue" (set the lost node DOWN if Slurm has not, `scontrol
    requeue`: Slurm starts the job again on the nodes that are up, at most MAX_RANK_LOST_REQUEUES times)
    or "continue" (restart at once in the same allocation on the nodes left)"""

    def __post_init__(self) -> None:
        for name in ("nodes", "ntasks_per_node", "cpus_per_task"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"--{name.replace('_', '-')}={value} must be an integer >= 1")
        if self.min_nodes and not 1 <= self.min_nodes <= self.nodes:
            raise ConfigError(f"--min-nodes={self.min_nodes} must be in [1, --nodes={self.nodes}]")
        if self.on_node_loss not in ON_NODE_LOSS:
            raise ConfigError(f"--on-node-loss={self.on_node_loss!r} must be one of {', '.join(ON_NODE_LOSS)}")
        if self.on_node_loss == "continue" and not 0 < self.min_nodes < self.nodes:
            raise ConfigError("--on-node-loss=continue needs an elastic job (--min-nodes below --nodes): a job of a "
                              "fixed node count cannot go on without a node; Slurm requeues it (--requeue)")
        if self.gpus_per_node < 0:
            raise ConfigError(f"--gpus-per-node={self.gpus_per_node} must be >= 0 (0 = no GPUs)")
        if not 1 <= self.signal_seconds <= 65535:  # Slurm stores the offset in 16 bits
            raise ConfigError(f"--signal-seconds={self.signal_seconds} must be in [1, 65535]")
        # Slurm checks time limits about once a minute and may send the signal up to 60 s early: a
        # limit within signal + 60 s could signal (and requeue) every run as soon as it starts
        if self.time and parse_time_limit(self.time) <= self.signal_seconds + SIGNAL_RESOLUTION_S:
            raise ConfigError(f"--time={self.time} ({parse_time_limit(self.time)} s) must be longer than "
                              f"--signal-seconds={self.signal_seconds} + {SIGNAL_RESOLUTION_S} s (Slurm may signal up "
                              f"to {SIGNAL_RESOLUTION_S} s early): the job would be told to stop as it starts")
        for name in ("partition", "account", "job_name"):
            value = getattr(self, name)
            if value and not _NAME_RE.fullmatch(value):  # not "^...$": "$" matched before a final line break
                raise ConfigError(f"--{name.replace('_', '-')}={value!r}: use letters, digits and _ . , + - only")
        if not self.job_name:
            raise ConfigError("--job-name must not be empty")
        for arg in self.extra:
            if not arg.startswith("--") or any(c in arg for c in "\n\r"):
                raise ConfigError(f"--sbatch-arg={arg!r} must be one sbatch option starting with '--' (e.g. --exclusive)")
            # sbatch splits a directive at whitespace: "--time 00:05:00" is --time too (it replaced the script's)
            key = re.split(r"[=\s]", arg, maxsplit=1)[0]
            if key in OWN_DIRECTIVES:  # sbatch takes the last of a repeated option: it would replace the script's
                raise ConfigError(f"--sbatch-arg={arg!r}: the script sets {key} itself; {OWN_DIRECTIVES[key]}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.ntasks_per_node


_USE = "use clusterlm launch's {} instead"
_NEEDED = "the preemption, requeue and log handling depend on it"
OWN_DIRECTIVES = {  # #SBATCH options render_sbatch writes, and what to pass instead of --sbatch-arg
    "--job-name": _USE.format("--job-name"), "--nodes": _USE.format("--nodes (and --min-nodes)"),
    "--ntasks-per-node": _USE.format("--ntasks-per-node"), "--cpus-per-task": _USE.format("--cpus-per-task"),
    "--gpus-per-node": _USE.format("--gpus-per-node"), "--time": _USE.format("--time"),
    "--partition": _USE.format("--partition"), "--account": _USE.format("--account"),
    "--signal": _USE.format("--signal-seconds") + " (the trainer stops on SIGUSR2)",
    "--output": _USE.format("--output"), "--requeue": _NEEDED, "--no-requeue": _NEEDED, "--open-mode": _NEEDED,
    "--chdir": "it is the folder launch runs in (cd there first)", "--no-kill": _USE.format("--min-nodes"),
}


def sbatch_directive(option: str) -> str:
    """One `#SBATCH` line. sbatch splits a directive line at whitespace and ends it at an unquoted `#`
    (its own parser, not the shell's): `--output=/my runs/slurm-%j.out` was refused ("Invalid directive
    found in batch script: runs/slurm-%j.out") and `/runs/a#b` cut to `/runs/a`. A value holding either,
    or a quote or backslash, is double-quoted with `"` and `\\` escaped, which sbatch reads back verbatim."""
    key, eq, value = option.partition("=")
    if eq and re.search(r"[\s#'\"\\]", value):
        value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"#SBATCH {key}{eq}{value}"


def render_sbatch(opts: SbatchOptions, recipe: str | None, overrides: list[str], *, output_dir: str | Path,
                  workdir: str | Path, python: str | None = None) -> str:
    """The batch script: #SBATCH header, rendezvous variables, srun of `clusterlm train`, requeue on 75.

    `recipe` and `python` should be absolute (the job may start in another shell, on another node);
    the train overrides start with --train.resume=auto so a requeued job continues where it stopped
    (an explicit --train.resume in `overrides` comes later and wins).
    """
    python = python or sys.executable
    q = shlex.quote
    elastic = 0 < opts.min_nodes < opts.nodes
    nodes = f"{opts.min_nodes}-{opts.nodes}" if elastic else str(opts.nodes)
    header = [f"--job-name={opts.job_name}", f"--nodes={nodes}", f"--ntasks-per-node={opts.ntasks_per_node}",
              f"--cpus-per-task={opts.cpus_per_task}"]
    if opts.gpus_per_node:
        header.append(f"--gpus-per-node={opts.gpus_per_node}")
    if opts.time:  # as parse_time_limit read it: a line break around it split the directive (sbatch then read no more)
        header.append(f"--time={opts.time.strip()}")
    if opts.partition:
        header.append(f"--partition={opts.partition}")
    if opts.account:
        header.append(f"--account={opts.account}")
    header += [f"--signal=USR2@{opts.signal_seconds}", "--requeue", "--open-mode=append",
               # sbatch expands %-patterns in the whole --output path (%j, %x, %a ...): a "%" of the folder's own
               # name, doubled, stays itself; else the log went elsewhere than the recorded one
               f"--output={str(Path(output_dir)).replace('%', '%%')}/slurm-%j.out", f"--chdir={workdir}"]
    if elastic:  # a failed node leaves the allocation instead of ending the job (sbatch(1), --no-kill)
        header.append("--no-kill")
    header += list(opts.extra)
    train = [python, "-m", "clusterlm", "train", *([recipe] if recipe else []), "--train.resume=auto", *overrides]
    srun = ["srun", f"--cpus-per-task={opts.cpus_per_task}", "--wait=120"]
    master = [
        "# a host name that does not resolve here (bare containers): the address Slurm reaches the node at",
        'getent hosts "$MASTER_ADDR" >/dev/null || MASTER_ADDR="$(scontrol show node "$MASTER_ADDR" '
        '| sed -n \'s/.*NodeAddr=\\([^ ]*\\).*/\\1/p\')"',
    ]
    threads = [
        "# torch's intra-op threads per task: its CPUs (by default torch takes every core of the node, and",
        "# several tasks on one node would fight over them); --train.threads overrides",
        f"export OMP_NUM_THREADS={opts.cpus_per_task}",
    ]
    if not elastic:
        run = [
            "# rendezvous on the first node of the allocation; the port comes from the job id (and the restart",
            "# count), so jobs sharing a node, and a requeued job's new round, do not collide",
            'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"',
            *master,
            "export MASTER_PORT=$(( 20000 + (SLURM_JOB_ID * 8 + ${SLURM_RESTART_COUNT:-0} % 8) % 40000 ))",
            *_FREE_PORT,
            'echo "clusterlm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST,'
            ' $SLURM_NTASKS tasks, master $MASTER_ADDR:$MASTER_PORT, $(date -u +%FT%TZ)"',
            "",
            *threads,
            "# one task per device; srun reads SLURM_CPUS_PER_TASK no more (22.05), so it is passed again;",
            "# --wait: when one task ends, the others get 120 s before srun stops them",
            " ".join(q(a) for a in srun) + " \\",
            "    " + " ".join(q(a) for a in train),
            "rc=$?",
        ]
    else:
        k = opts.ntasks_per_node
        on_loss = (_continue_lines(opts.min_nodes) if opts.on_node_loss == "continue"
                   else _requeue_lines(opts.min_nodes, k))
        run = [
            *threads,
            "# elastic (--nodes=MIN-MAX, --no-kill): one data-parallel replica per node (dp_replicate = nodes,",
            "# the last override wins). When a node fails, Slurm takes it out of the allocation and srun ends;",
            "# " + ("the next round runs on the nodes left" if opts.on_node_loss == "continue" else
                    "the job is requeued and Slurm starts it again on the nodes that are up"),
            "# (at least MIN); it resumes the last checkpoint at the new world size (DCP reshards; the trainer",
            "# re-derives gradient accumulation from the global batch)",
            'nodes="$SLURM_JOB_NODELIST"',
            "round=0",
            "while true; do",
            '    n=$(scontrol show hostnames "$nodes" | wc -l)',
            '    export MASTER_ADDR="$(scontrol show hostnames "$nodes" | head -n1)"',
            *("    " + line for line in master),
            "    # the port: from the job id, the requeue count and the round, so no round meets an older one's socket",
            "    export MASTER_PORT=$(( 20000 + (SLURM_JOB_ID * 8 + (${SLURM_RESTART_COUNT:-0} + round) % 8) % 40000 ))",
            *("    " + line for line in _FREE_PORT),
            '    echo "clusterlm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}, round $round) on $nodes,'
            f' $((n * {k})) tasks, --parallel.dp_replicate=$n, master $MASTER_ADDR:$MASTER_PORT, $(date -u +%FT%TZ)"',
            "    # --overlap after a loss: the lost round's step can linger on the survivors' CPUs until every node",
            "    # of it reports back, which a dead node never does (\"step creation temporarily disabled\")",
            '    overlap=""; [ "$round" -eq 0 ] || overlap="--overlap"',
            "    " + " ".join(q(a) for a in srun) + f' $overlap --nodes="$n" --ntasks=$((n * {k})) --nodelist="$nodes" \\',
            "        " + " ".join(q(a) for a in train) + ' "--parallel.dp_replicate=$n"',
            "    rc=$?",
            f'    [ "$rc" -eq 0 ] || [ "$rc" -eq {EXIT_PREEMPTED} ] && break',
            "    # the nodes left: still in the allocation (Slurm takes a node it declared DOWN out of it) and",
            f"    # running a one-task step within {PROBE_S} s (a node whose link is cut or whose slurmd died does not;",
            "    # Slurm itself may take SlurmdTimeout, 300 s by default, to declare it DOWN)",
            '    alloc="$(scontrol show job "$SLURM_JOB_ID" | sed -n \'s/^ *NodeList=\\([^ ]*\\).*/\\1/p\')"',
            '    alive="$(for node in $(scontrol show hostnames "$alloc"); do',
            f'        (timeout -k 5 {PROBE_S} srun --overlap --nodes=1 --ntasks=1 --nodelist="$node" true >/dev/null 2>&1 &&',
            '         echo "$node") &',
            '    done; wait)"',
            '    left="$(scontrol show hostnames "$nodes" | grep -xF -f <(echo "$alive") | paste -sd, -)"',
            '    lost="$(scontrol show hostnames "$nodes" | grep -vxF -f <(echo "$alive") | paste -sd, -)"',
            '    nleft=$(echo "$left" | tr , "\\n" | grep -c .)',
            *on_loss,
            f'    [ -z "$lost" ] || echo "clusterlm: node(s) lost: $lost; $nleft left, fewer than --min-nodes={opts.min_nodes}"',
            "    break",
            "done",
        ]
    lines = [
        "#!/bin/bash",
        # a line break in the recipe's path (kept as it is in the srun line, quoted) must not end this comment: the
        # rest ran as a command, before which sbatch reads every #SBATCH line and after which none
        "# rendered by `clusterlm launch --slurm` for "
        + (recipe.replace("\r", "\\r").replace("\n", "\\n") if recipe else "(defaults + overrides)"),
        *(sbatch_directive(h) for h in header),
        "",
        "set -uo pipefail",
        *run,
        f"if [ \"$rc\" -eq {EXIT_PREEMPTED} ]; then",
        "    # preempted (SIGUSR2 before the time limit, or scancel --signal=USR2): every rank finished its",
        "    # step and the checkpoint is saved; put the job back in the queue, it resumes by itself",
        f'    echo "clusterlm: exit {EXIT_PREEMPTED} (checkpoint saved): requeueing job $SLURM_JOB_ID"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        '    echo "clusterlm: scontrol requeue failed; resubmit this script to resume" >&2',
        "fi",
        f'if [ "$rc" -eq {EXIT_RANK_LOST} ] && [ "${{SLURM_RESTART_COUNT:-0}}" -lt {MAX_RANK_LOST_REQUEUES} ]; then',
        "    # a rank stopped making progress (its heartbeat went silent, named in the log above): requeue,",
        "    # the run resumes from its last checkpoint",
        f'    echo "clusterlm: exit {EXIT_RANK_LOST} (a rank was lost): requeueing job $SLURM_JOB_ID'
        f' (restart $(( ${{SLURM_RESTART_COUNT:-0}} + 1 )) of at most {MAX_RANK_LOST_REQUEUES})"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "fi",
        'echo "clusterlm: srun exited with $rc"',
        "exit $rc",
        "",
    ]
    return "\n".join(lines)


# The derived port repeats every 5,000 job ids: a long job on this node may hold it. The batch script runs on
# the allocation's first node, where rank 0 listens: the next port nothing listens on is taken instead.
_FREE_PORT = [
    "# a job 5000 ids away shares the derived port: where something listens on it here (the first node,",
    "# where rank 0's store will listen), take the next free one",
    'for _ in $(seq 64); do timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$MASTER_PORT" 2>/dev/null || break;'
    " MASTER_PORT=$(( MASTER_PORT + 1 )); done",
]


def _continue_lines(min_nodes: int) -> list[str]:
    """--on-node-loss=continue: the next round, at once, in the same allocation on the nodes left."""
    return [
        f'    if [ -n "$lost" ] && [ "$nleft" -ge {min_nodes} ]; then',
        '        echo "clusterlm: srun exited with $rc; node(s) lost: $lost; restarting on $left ($nleft node(s)),'
        ' $(date -u +%FT%TZ)"',
        '        nodes="$left"; round=$((round + 1)); continue',
        "    fi",
    ]


def _requeue_lines(min_nodes: int, k: int) -> list[str]:
    """--on-node-loss=requeue: name the lost nodes, make sure Slurm will not hand them back (DOWN, else
    excluded from the job), `scontrol requeue`, and reset the job's task count to MIN x k (a requeued job
    keeps its last allocation's, nodes x k, and would wait for the lost node)."""
    cap = MAX_RANK_LOST_REQUEUES
    return [
        f'    if [ -n "$lost" ] && [ "$nleft" -ge {min_nodes} ]; then',
        '        echo "clusterlm: srun exited with $rc; node(s) lost: $lost; $nleft node(s) left ($left), $(date -u +%FT%TZ)"',
        f'        if [ "${{SLURM_RESTART_COUNT:-0}}" -ge {cap} ]; then',
        f'            echo "clusterlm: not requeueing job $SLURM_JOB_ID: requeued ${{SLURM_RESTART_COUNT:-0}} times already'
        f' (at most {cap})"',
        "            break",
        "        fi",
        "        # Slurm must not give a lost node back to the requeued job: slurmctld marks a silent node DOWN only",
        "        # after SlurmdTimeout (300 s by default), and a requeued job given it would fail again. A node Slurm",
        "        # already holds DOWN, DRAINED or FAILED is left as it is (its reason, and ReturnToService, kept);",
        "        # any other is set DOWN (root or a Slurm operator may), else excluded from the requeued job",
        '        exclude=""',
        '        for node in $(echo "$lost" | tr , " "); do',
        '            st="$(sinfo --noheader --nodes="$node" --format=%t 2>/dev/null | head -n1)"',
        '            case "$st" in',
        '                down*|drain*|fail*) echo "clusterlm: node $node is ${st} to Slurm already" ;;',
        '                *) if scontrol update nodename="$node" state=down reason="clusterlm: lost by job $SLURM_JOB_ID"'
        ' >/dev/null 2>&1; then',
        '                       echo "clusterlm: set node $node DOWN (it was ${st:-unknown} to Slurm; reason: lost by job'
        ' $SLURM_JOB_ID)"',
        "                   else",
        '                       echo "clusterlm: cannot set node $node DOWN (not a Slurm operator); excluding it from the'
        ' requeued job"',
        '                       exclude="${exclude:+$exclude,}$node"',
        "                   fi ;;",
        "            esac",
        "        done",
        f'        echo "clusterlm: requeueing job $SLURM_JOB_ID (restart $(( ${{SLURM_RESTART_COUNT:-0}} + 1 )) of at most'
        f' {cap}): it resumes from its last checkpoint on the nodes Slurm gives it (at least {min_nodes}),'
        ' $(date -u +%FT%TZ)"',
        "        # A requeued job keeps its last allocation's task count (nodes x tasks per node), with which Slurm",
        f"        # would wait for the lost node (ReqNodeNotAvail): it is set back to what sbatch asked, {min_nodes} x {k}.",
        "        # Slurm takes that update only once the requeue is through, i.e. once every process of this run has",
        "        # ended (SIGTERM now, SIGKILL KillWait s later), and holds each try up to 5 s waiting for it: this",
        "        # shell ignores SIGTERM and keeps two tries in flight, staggered, so one is pending when it is killed",
        "        trap '' TERM",
        '        if scontrol requeue "$SLURM_JOB_ID"; then',
        "            for delay in 0 2; do",
        "                (sleep $delay; end=$((SECONDS + 120))",
        f'                 until scontrol update jobid="$SLURM_JOB_ID" NumTasks={min_nodes * k} ${{exclude:+ExcNodeList=$exclude}}'
        " 2>/dev/null; do",
        "                     [ $SECONDS -lt $end ] || exit 1; sleep 0.1",
        "                 done) &",
        "            done",
        "            wait",
        "            exit 0",
        "        fi",
        '        echo "clusterlm: scontrol requeue failed; resubmit this script to resume" >&2',
        "        break",
        "    fi",
    ]


# ---- job registry -----------------------------------------------------------------------------
def registry_path(env: Mapping[str, str] | None = None) -> Path:
    """$CLUSTERLM_HOME/jobs.jsonl, else $XDG_CACHE_HOME/clusterlm/jobs.jsonl, else ~/.cache/clusterlm/jobs.jsonl."""
    env = os.environ if env is None else env
    if env.get("CLUSTERLM_HOME"):
        return Path(env["CLUSTERLM_HOME"]) / "jobs.jsonl"
    cache = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "clusterlm" / "jobs.jsonl"


def record_job(path: Path, record: dict) -> None:
    """Append one JSON line with a single O_APPEND write, then fsync: concurrent submitters never
    interleave, and a reader sees whole lines (a torn last line after a crash is skipped on read)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps({"version": REGISTRY_VERSION, **record}, sort_keys=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_registry(path: Path) -> list[dict]:
    """The registry's records in submit order; unreadable lines are skipped with a warning."""
    if not path.is_file():
        return []
    from clusterlm.fsutil import read_jsonl

    return _job_records(path, read_jsonl(path))


def _job_records(path: Path, lines: list[dict]) -> list[dict]:
    """The lines (read_jsonl's) that name a job; the others skipped with a warning."""
    records = []
    for rec in lines:
        job_id = rec.get("job_id")
        if isinstance(job_id, bool) or not isinstance(job_id, (str, int)) or not str(job_id).strip():
            if "job_id" in rec:  # hand-edited: a null, empty or non-text id names no job to ask Slurm about
                log.warning("%s: a record with job_id=%s names no job: skipped", path, json.dumps(job_id))
            continue
        records.append(rec)
    return records


# ---- job state: the runner (parsers in slurm_text.py) ------------------------------------
Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    if shutil.which(cmd[0]) is None:
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]}: not found")
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 124, "", f"{cmd[0]}: no answer in 30 s")


def query_states(job_ids: Iterable[str], run: Runner | None = None) -> dict[str, JobState]:
    """State of each job: sacct first (it remembers finished jobs), then squeue, then `scontrol show job`
    for the ones left; the restart count from scontrol (Restarts=) where it knows the job."""
    run = run or _run
    ids = list(dict.fromkeys(str(j) for j in job_ids))
    if not ids:
        return {}
    states: dict[str, JobState] = {}
    r = run(["sacct", "--noheader", "--parsable2", "-X", "-D", f"--jobs={','.join(ids)}",
             "--format=JobID,State,ExitCode,Elapsed,NodeList"])
    if r.returncode == 0:  # fails with "Slurm accounting storage is disabled" without slurmdbd
        states.update({k: v for k, v in parse_sacct(r.stdout).items() if k in ids})
    else:
        log.debug("sacct: %s", r.stderr.strip())
    if len(states) < len(ids):
        r = run(["squeue", "--noheader", "--states=all", "--format=%i|%T|%M|%N|%r"])
        if r.returncode == 0:
            states.update({k: v for k, v in parse_squeue(r.stdout).items() if k in ids and k not in states})
    r = run(["scontrol", "show", "job", "-o"])  # every job slurmctld still holds (MinJobAge)
    if r.returncode == 0:
        for k, v in parse_scontrol_show_job(r.stdout).items():
            if k not in ids:
                continue
            if k not in states:
                states[k] = v
            elif v.restarts is not None:
                states[k].restarts = v.restarts
    return {j: states.get(j, JobState(j, "UNKNOWN", source="")) for j in ids}


# ---- commands ---------------------------------------------------------------------------------
SLURM_OPTIONS = ("nodes", "min_nodes", "on_node_loss", "ntasks_per_node", "gpus_per_node", "cpus_per_task", "time",
                 "partition", "account", "job_name", "output", "signal_seconds", "sbatch_arg")
"""the destinations of add_arguments' options but --slurm itself: `launch` refuses them without --slurm"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `clusterlm launch --slurm` options (launch.py owns the parser)."""
    g = parser.add_argument_group("Slurm (with --slurm: render an sbatch script, submit it, print the job id)")
    g.add_argument("--slurm", action="store_true", help="submit to Slurm with sbatch instead of running torchrun here")
    g.add_argument("--nodes", type=int, default=1, help="nodes to allocate")
    g.add_argument("--min-nodes", type=int, default=0,
                   help="elastic: run on as few as this many nodes (also after a node is lost and the job requeued); "
                        "dp_replicate follows the node count, so the recipe's must equal --nodes")
    g.add_argument("--on-node-loss", choices=ON_NODE_LOSS, default=None,
                   help="elastic jobs (--min-nodes), when a node is lost: requeue (default: set it DOWN if Slurm has "
                        "not, `scontrol requeue`; Slurm restarts the job on the nodes that are up, at most "
                        f"{MAX_RANK_LOST_REQUEUES} times) or continue (restart at once in the same allocation on the "
                        "nodes left)")
    g.add_argument("--ntasks-per-node", type=int, default=None,
                   help="training processes per node (default: --gpus-per-node, else world size / nodes)")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0: CPU-only job)")
    g.add_argument("--cpus-per-task", type=int, default=1, help="CPU cores per training process")
    g.add_argument("--time", default="", help="time limit [D-]HH:MM:SS (default: the partition's)")
    g.add_argument("--partition", default="", help="Slurm partition")
    g.add_argument("--account", default="", help="Slurm account to charge")
    g.add_argument("--job-name", default="clusterlm", help="Slurm job name")
    g.add_argument("--output", default="", help="folder for the script and slurm-JOBID.out (default: train.out_dir)")
    g.add_argument("--signal-seconds", type=int, default=120,
                   help="SIGUSR2 this many seconds before the time limit (checkpoint, exit 75, requeue)")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="--KEY=VALUE",
                   help="one more #SBATCH option, repeatable (e.g. --sbatch-arg=--exclusive)")


def submit(args: argparse.Namespace, overrides: list[str], run: Runner | None = None,
           env: Mapping[str, str] | None = None) -> int:
    """`clusterlm launch RECIPE --slurm ...`: validate, render, show, write, sbatch, record. Returns 0.
    `env` (default: this process's environment) gives SLURM_CONF and the registry's location."""
    from clusterlm.config import load_run_config, resolve_recipe
    from clusterlm.fsutil import atomic_write_text
    from clusterlm.parallel.layout import check_layout

    recipe = resolve_recipe(args.recipe)
    cfg = load_run_config(recipe, overrides)  # bad overrides fail here, before anything is written
    world = cfg.parallel.world_size
    ntasks = args.ntasks_per_node
    if ntasks is None:
        ntasks = (args.gpus_per_node if args.gpus_per_node > 0  # a negative count is refused below, by its name
                  else world // args.nodes if args.nodes >= 1 and world % args.nodes == 0 else 1)
    opts = SbatchOptions(nodes=args.nodes, min_nodes=args.min_nodes, ntasks_per_node=ntasks, gpus_per_node=args.gpus_per_node,
                         cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition,
                         account=args.account, job_name=args.job_name, signal_seconds=args.signal_seconds,
                         extra=tuple(args.sbatch_arg), on_node_loss=getattr(args, "on_node_loss", None) or "requeue")
    overrides = check_layout(args.recipe, overrides, opts.world_size, change="the task counts",
                             counts=f"--nodes={opts.nodes} x --ntasks-per-node={opts.ntasks_per_node} = "
                                    f"{opts.world_size} tasks")
    cfg = load_run_config(recipe, overrides)
    if 0 < opts.min_nodes < opts.nodes and cfg.parallel.dp_replicate != opts.nodes:
        raise ConfigError(f"--min-nodes={opts.min_nodes}: an elastic job has one data-parallel replica per node, but "
                          f"dp_replicate={cfg.parallel.dp_replicate} != --nodes={opts.nodes}; set "
                          f"--parallel.dp_replicate={opts.nodes} --parallel.dp_shard={opts.world_size // opts.nodes}")
    if 0 < opts.min_nodes < opts.nodes:  # the layout and batch must hold on every node count it may go on with
        import dataclasses

        from clusterlm.parallel.dims import validate_layout

        tc = cfg.train
        for n in range(opts.nodes - 1, opts.min_nodes - 1, -1):
            try:
                validate_layout(dataclasses.replace(cfg.parallel, dp_replicate=n), cfg.model, n * opts.ntasks_per_node,
                                tc.global_batch_tokens, tc.micro_batch_size, tc.seq_len)
            except ConfigError as e:
                raise ConfigError(f"--min-nodes={opts.min_nodes}: after a node loss the job goes on with {n} node(s) "
                                  f"(dp_replicate={n}), where {e}") from None
    if opts.gpus_per_node and opts.ntasks_per_node != opts.gpus_per_node:
        log.warning("--ntasks-per-node=%d != --gpus-per-node=%d: clusterlm expects one task per GPU",
                    opts.ntasks_per_node, opts.gpus_per_node)
    out_dir = Path(os.path.abspath(args.output or cfg.train.out_dir))
    if out_dir.exists() and not out_dir.is_dir():  # mkdir said only "File exists"
        raise ConfigError(f"{'--output' if args.output else 'train.out_dir'} {out_dir} is a file; the script and "
                          f"slurm-JOBID.out go in a folder")
    workdir = Path.cwd()
    # sbatch reads #SBATCH lines one by one: a line break in a path ended --output's line early, ran the rest as
    # a shell command, and (no #SBATCH read after a command) dropped --chdir
    for name, path in ((f"{'--output' if args.output else 'train.out_dir'}", out_dir), ("the working folder", workdir)):
        if any(c in str(path) for c in "\n\r"):
            raise ConfigError(f"{name} {str(path)!r} holds a line break, which an #SBATCH line cannot hold; use a "
                              f"folder without one")
    script = render_sbatch(opts, recipe, overrides, output_dir=out_dir, workdir=workdir)
    print(script, end="")
    if args.dry_run:
        return 0
    env = os.environ if env is None else env
    from clusterlm.fsutil import check_output_path

    check_output_path(registry_path(env), "job registry")  # now: a job queued but not recorded would be lost
    if shutil.which("sbatch") is None:
        raise ClusterlmError("Slurm is not installed here: `sbatch` is not on PATH. Run this on a Slurm login node, "
                             "add --dry-run to only see the script, or use --nproc-per-node N to run with torchrun")
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    script_path = out_dir / f"{opts.job_name}-{stamp}.sbatch"
    atomic_write_text(script_path, script)
    r = (run or _run)(["sbatch", "--parsable", str(script_path)])
    if r.returncode != 0:  # nothing was submitted: nothing of it is left either (the script, a new run folder)
        script_path.unlink(missing_ok=True)
        if made:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        said = " ".join((r.stderr.strip() or r.stdout.strip()).split()) or "no message"
        raise ClusterlmError(f"sbatch failed (exit {r.returncode}), nothing was submitted: {said}")
    job_id = r.stdout.strip().splitlines()[-1].split(";")[0].strip() if r.stdout.strip() else ""
    if not job_id:
        raise ClusterlmError(f"sbatch {script_path} printed no job id: {r.stdout!r} {r.stderr!r}")
    record_job(registry_path(env), {"job_id": job_id, "job_name": opts.job_name, "recipe": recipe,
                                 "overrides": overrides, "script": str(script_path),
                                 "log": str(out_dir / f"slurm-{job_id}.out"), "out_dir": str(cfg.train.out_dir),
                                 "cwd": str(workdir), "submit_time": _now_iso(),
                                 "slurm_conf": env.get("SLURM_CONF", "")})
    print(f"submitted batch job {job_id}  (script {script_path}; log {out_dir / f'slurm-{job_id}.out'}; "
          f"watch with `clusterlm jobs`)")
    return 0


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclass
class JobRow:
    record: dict
    state: JobState = field(default_factory=lambda: JobState(""))

    def as_dict(self) -> dict:
        return {**self.record, **{k: v for k, v in asdict(self.state).items() if k != "job_id"}}


def list_jobs(path: Path, show_all: bool = False, run: Runner | None = None, recent: int = 10,
              records: list[dict] | None = None) -> list[JobRow]:
    """Registry records (read from `path` unless given) with their Slurm state: unfinished jobs and the
    `recent` newest (all with show_all)."""
    records = read_registry(path) if records is None else records
    states = query_states([r["job_id"] for r in records], run) if records else {}
    rows = [JobRow(r, states.get(str(r["job_id"]), JobState(str(r["job_id"])))) for r in records]
    if show_all:
        return rows
    newest = {id(r) for r in rows[-recent:]}
    return [r for r in rows if id(r) in newest or r.state.state not in TERMINAL_STATES]


def format_table(rows: list[JobRow]) -> str:
    header = ("JOBID", "STATE", "RESTARTS", "ELAPSED", "SUBMITTED", "NAME", "RECIPE", "LOG")
    lines = [header]
    for row in rows:
        rec, st = row.record, row.state
        recipe = Path(str(rec["recipe"])).name if rec.get("recipe") else "-"
        lines.append((str(rec["job_id"]), st.state + (f" ({st.reason})" if st.reason else ""),
                      "-" if st.restarts is None else str(st.restarts), st.elapsed or "-",
                      str(rec.get("submit_time", "-"))[:19], str(rec.get("job_name", "-")), recipe,
                      str(rec.get("log") or "-")))  # str(): a hand-edited record's number or null too
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) + "  " + line[-1] for line in lines)


def jobs_main(argv: list[str]) -> int:
    """`clusterlm jobs [--all] [--json]`."""
    parser = argparse.ArgumentParser(
        prog="clusterlm jobs",
        description="List runs submitted with `clusterlm launch --slurm` (from the job registry) with their Slurm "
                    "state (sacct, else squeue, else scontrol) and requeue count.")
    parser.add_argument("--all", action="store_true", help="every recorded job (default: unfinished + 10 newest)")
    parser.add_argument("--json", action="store_true", help="one JSON list instead of a table")
    parser.add_argument("--registry", default=None, help=f"registry file (default: {registry_path()})")
    args = parser.parse_args(argv)
    if args.registry is not None and not args.registry.strip():  # an unset $VAR: not the default registry
        raise ConfigError(f"--registry={args.registry!r} is empty; give a jobs.jsonl file, or leave --registry out "
                          f"for the default ({registry_path()})")
    path = Path(args.registry) if args.registry else registry_path()
    if path.is_dir():
        raise IsADirectoryError(f"job registry {path} is a directory; give the jobs.jsonl file")
    if args.registry and not path.is_file():
        raise FileNotFoundError(f"job registry {path} does not exist")
    if shutil.which("squeue") is None and shutil.which("scontrol") is None:
        log.warning("Slurm commands are not on PATH: job states are unknown")
    from clusterlm.fsutil import read_jsonl

    # read once: each read warned again about the same torn or id-less line (three times for one line)
    lines = read_jsonl(path) if path.is_file() else []
    if lines and not any("job_id" in rec for rec in lines):  # e.g. a run's metrics.jsonl given as --registry
        raise ConfigError(f"{path} holds {len(lines)} JSON record(s) but none with a job_id: it is not a job "
                          f"registry (`clusterlm launch --slurm` writes {registry_path()})")
    rows = list_jobs(path, show_all=args.all, records=_job_records(path, lines))
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    elif not rows:
        print(f"no jobs recorded in {path}; submit one with `clusterlm launch RECIPE --slurm`")
    else:
        print(format_table(rows))
    return 0
