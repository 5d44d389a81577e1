"""Process-group start-up: the one place that reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* and SLURM_*.

    clusterlm launch recipes/llama_shakespeare_cpu.toml --nproc-per-node 2 --train.max_steps=50
    clusterlm launch RECIPE --nproc-per-node 8 --nnodes 2 --node-rank 0 --rdzv-endpoint node01:29500  # on each node
    clusterlm launch RECIPE --slurm --nodes 2 --gpus-per-node 8 --time 04:00:00 --parallel.dp_shard=16

`launch` runs torchrun (`python -m clusterlm.parallel.torchrun`: torchrun without a traceback when
stopped) for `clusterlm train`. `clusterlm train` started by torchrun directly, or by Slurm's `srun` without torchrun (one task per device), finds
its rank here: torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT first, then Slurm's
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID with the first host of SLURM_NODELIST as master address.
Backend: NCCL when CUDA is available, gloo otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import errno
import logging
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from clusterlm.cluster.slurm_text import expand_nodelist

log = logging.getLogger(__name__)

DEFAULT_PORT = 29500  # torchrun's default
DEFAULT_TIMEOUT_S = 600.0  # torch's default for gloo collectives
# the process group's timeout in seconds (a collective waiting longer raises): short in tests that cut
# a node's link, where gloo would otherwise wait DEFAULT_TIMEOUT_S on the dead peer
TIMEOUT_ENV = "CLUSTERLM_DIST_TIMEOUT_S"


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job (from the environment; world_size=1 when not launched)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = DEFAULT_PORT
    source: str = "none"  # "torchrun", "slurm" or "none"
    local_world_size: int = 1
    """processes of this job on this node (they share its RAM and cores)"""

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} must be in [0, world_size={self.world_size}) ({self.source})")
        if self.local_rank < 0:
            raise ValueError(f"local_rank={self.local_rank} must be >= 0 ({self.source})")
        if not 1 <= self.local_world_size <= self.world_size:
            raise ValueError(f"local_world_size={self.local_world_size} must be in [1, world_size={self.world_size}] "
                             f"({self.source})")

    @property
    def distributed(self) -> bool:
        return self.source != "none"


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def read_env(env: Mapping[str, str] | None = None) -> DistEnv:
    """This process's place in the job: torchrun's variables, else Slurm's, else a single process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(rank=_int(env, "RANK"), world_size=_int(env, "WORLD_SIZE"),
                       local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
                       local_world_size=_int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else 1,
                       master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT,
                       source="torchrun")
    # srun's tasks have a step id; an sbatch batch script has SLURM_PROCID=0 and the job's SLURM_NTASKS
    # too, but is one process: taking it for rank 0 of N would wait for ranks that never come
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        ntasks = _int(env, "SLURM_NTASKS")
        if ntasks == 1:
            return DistEnv()  # one task: plain single process, no process group needed
        if "SLURM_NODELIST" not in env and "SLURM_JOB_NODELIST" not in env:
            raise ValueError("SLURM_PROCID/SLURM_NTASKS are set but SLURM_NODELIST is not: cannot find the master")
        nodelist = env.get("SLURM_NODELIST") or env["SLURM_JOB_NODELIST"]
        port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT
        return DistEnv(rank=_int(env, "SLURM_PROCID"), world_size=ntasks,
                       local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                       local_world_size=_slurm_tasks_on_node(env, ntasks),
                       master_addr=env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0], master_port=port,
                       source="slurm")
    return DistEnv()


def _slurm_tasks_on_node(env: Mapping[str, str], ntasks: int) -> int:
    """Most tasks of this step on any one node, from SLURM_STEP_TASKS_PER_NODE / SLURM_TASKS_PER_NODE
    ("2(x3),1" = 2 on each of 3 nodes, then 1), else 1. The largest count: what one node must hold."""
    for key in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        counts = [int(c) for c in re.findall(r"(?:^|,)\s*(\d+)", env.get(key, ""))]
        if counts:
            return max(1, min(max(counts), ntasks))
    return 1


def dist_timeout_s(env: Mapping[str, str] | None = None) -> float:
    """The process group's timeout: $CLUSTERLM_DIST_TIMEOUT_S, else DEFAULT_TIMEOUT_S."""
    env = os.environ if env is None else env
    if not env.get(TIMEOUT_ENV):
        return DEFAULT_TIMEOUT_S
    try:
        value = float(env[TIMEOUT_ENV])
        datetime.timedelta(seconds=value)  # "nan" passed the check below, then failed on every rank unnamed
    except (ValueError, OverflowError):  # not a number; nan; inf or too large for a timedelta
        value = -1.0
    if value <= 0:
        raise ValueError(f"environment variable {TIMEOUT_ENV}={env[TIMEOUT_ENV]!r} must be a number of seconds > 0")
    return value


def init_distributed(dist_env: DistEnv | None = None, *, device_type: str = "auto",
                     timeout_s: float | None = None):  # -> torch.device
    """Start the default process group (NCCL on GPU, gloo on CPU) if launched; returns this rank's device
    (cuda:LOCAL_RANK when CUDA is available and device_type is "auto" or "cuda", else cpu).

    Does nothing but pick the device when world_size is 1 or a group is already initialised.
    `timeout_s` None: dist_timeout_s() ($CLUSTERLM_DIST_TIMEOUT_S, else 600 s).
    """
    import torch
    import torch.distributed as dist

    dist_env = read_env() if dist_env is None else dist_env
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device='cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    cuda = torch.cuda.is_available() and device_type in ("auto", "cuda")
    if cuda:
        device = torch.device("cuda", dist_env.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist_env.distributed or dist.is_initialized():
        return device
    backend = "nccl" if cuda else "gloo"
    timeout = datetime.timedelta(seconds=dist_timeout_s() if timeout_s is None else timeout_s)
    # Our own store, keys prefixed by torchrun's restart round: a restarted group must never read the
    # dead round's addresses from a store that outlived it (seen with torchrun's agent store: gloo then
    # fails with "Connection refused"). Under torchrun the agent hosts the store; else rank 0 does.
    use_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(dist_env.master_addr, dist_env.master_port, dist_env.world_size,
                          is_master=not use_agent and dist_env.rank == 0, timeout=timeout,
                          wait_for_workers=False)
    store = dist.PrefixStore(f"clusterlm/round_{restart}", store)
    dist.init_process_group(backend=backend, store=store, rank=dist_env.rank, world_size=dist_env.world_size,
                            timeout=timeout, device_id=device if cuda else None)
    log.info("process group %s: rank %d of %d (%s, master %s:%d, timeout %.0f s)", backend, dist_env.rank,
             dist_env.world_size, dist_env.source, dist_env.master_addr, dist_env.master_port, timeout.total_seconds())
    return device


def shutdown_distributed() -> None:
    """Destroy the default process group if one exists (end of `clusterlm train`)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(recipe: str | None, overrides: list[str], *, nproc_per_node: int, nnodes: int = 1, node_rank: int = 0,
                     master_addr: str = "127.0.0.1", master_port: int = DEFAULT_PORT, max_restarts: int = 0,
                     python: str | None = None) -> list[str]:
    """The torchrun command line that runs `clusterlm train RECIPE OVERRIDES` on this node."""
    for name, value, low in (("nproc_per_node", nproc_per_node, 1), ("nnodes", nnodes, 1),
                             ("node_rank", node_rank, 0), ("max_restarts", max_restarts, 0)):
        if value < low:
            raise ValueError(f"--{name.replace('_', '-')}={value} must be >= {low}")
    if node_rank >= nnodes:
        raise ValueError(f"--node-rank={node_rank} must be < --nnodes={nnodes}")
    # c10d rendezvous (not the static --master-addr one): each restart round gets a fresh store, so a
    # restarted group never reads the dead round's addresses (the static store keeps them)
    # clusterlm.parallel.torchrun: torchrun itself, without a traceback when it is stopped by a signal
    cmd = [python or sys.executable, "-m", "clusterlm.parallel.torchrun", f"--nproc-per-node={nproc_per_node}",
           f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--rdzv-backend=c10d",
           f"--rdzv-endpoint={master_addr}:{master_port}", "--rdzv-id=clusterlm", f"--max-restarts={max_restarts}"]
    return cmd + ["-m", "clusterlm", "train", *([recipe] if recipe else []), *overrides]


# torchrun reports any failed worker as exit 1; `clusterlm launch` passes this file's path to the workers
# so that each node's local rank 0 can say why it stopped (75: preempted and saved, 3: diverged) and that
# node's launch can exit so (every node runs its own launch, with its own file: global rank 0 is on node 0 only)
EXIT_FILE_ENV = "CLUSTERLM_EXIT_FILE"


def record_exit_code(code: int, env: Mapping[str, str] | None = None) -> None:
    """On local rank 0 under `clusterlm launch`, note the trainer's exit code for this node's launcher
    (see above)."""
    env = os.environ if env is None else env
    path = env.get(EXIT_FILE_ENV)
    if path and code != 0 and read_env(env).local_rank == 0:
        from clusterlm.fsutil import atomic_write_text

        atomic_write_text(path, f"{code}\n")


def threads_env(nproc_per_node: int, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """OMP_NUM_THREADS for the workers when the user set none: this machine's usable cores shared among
    them (torchrun would set 1, leaving most cores of a CPU node idle). torch reads it for its intra-op
    threads; `--train.threads` still overrides. An empty value (`export OMP_NUM_THREADS=$N`, N unset) is
    none: kept, it gave each worker every core (and a libgomp warning)."""
    env = os.environ if env is None else env
    if env.get("OMP_NUM_THREADS", "").strip():
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"OMP_NUM_THREADS": str(max(1, cores // nproc_per_node))}


def run_torchrun(cmd: list[str], extra_env: Mapping[str, str] | None = None) -> int:
    """Run torchrun; its exit code, or the trainer's own (75, 3, 2) when torchrun reports a failed
    worker. SIGINT and SIGTERM sent to this process go to torchrun, which passes them to the workers
    (they finish the step, save and exit 75); this process waits for them all, so that neither a
    worker nor torchrun outlives it and the workers' exit code comes back (a terminal's Ctrl-C
    reaches every process of the group: the workers then see it twice, and stop once)."""
    import signal
    import tempfile

    with tempfile.TemporaryDirectory(prefix="clusterlm-launch-") as tmp:
        exit_file = os.path.join(tmp, "exit_code")
        proc = subprocess.Popen(cmd, env=os.environ | dict(extra_env or {}) | {EXIT_FILE_ENV: exit_file})

        def forward(signum: int, frame: object) -> None:  # noqa: ARG001 - signal API
            log.warning("%s received: passed to torchrun; waiting for the workers to save and exit",
                        signal.Signals(signum).name)
            if proc.poll() is None:
                proc.send_signal(signum)

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, forward)
            except ValueError:  # not the main thread: leave the handlers alone
                pass
        try:
            code = proc.wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if code != 0 and os.path.exists(exit_file):
            with open(exit_file, encoding="utf-8") as f:
                recorded = f.read().strip()
            if recorded.isdigit():
                log.info("torchrun exited %d; the trainer's exit code was %s", code, recorded)
                return int(recorded)
    # torchrun itself killed by a signal (OOM killer, kill -9): Popen's -N; as an exit status -9 became 247
    return 128 - code if code < 0 else code


def check_port_free(addr: str, port: int) -> None:
    """The rendezvous port must be free on this node: another job's store there would take this
    launch's workers into its own group (they wait silently, then fail with a stack dump)."""
    import socket

    from clusterlm.errors import ResourceBusyError

    with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store binds: a past run's TIME_WAIT is fine
        try:
            s.bind((addr, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                raise ResourceBusyError(f"port {port} on {addr} is in use (another `clusterlm launch` or torchrun "
                                        f"job on this node?); pass a free one with --master-port") from None
            # not an address of this node (or no such name): the rendezvous reports that itself


def check_device(recipe: str | None, overrides: list[str]) -> None:
    """train.device='cuda' on a node without a usable GPU is refused here, before torchrun starts: each
    rank used to print the error, and torchrun's failure report then buried it."""
    from clusterlm.config import load_run_config, resolve_recipe

    if load_run_config(resolve_recipe(recipe), overrides).train.device != "cuda":
        return
    from clusterlm.device import resolve_device

    resolve_device("cuda", "train.device")  # ConfigError naming the field and the valid values


TORCHRUN_OPTIONS = ("nproc_per_node", "nnodes", "node_rank", "master_addr", "master_port", "rdzv_endpoint",
                    "max_restarts")


def main(argv: list[str]) -> int:
    from clusterlm.config import split_overrides

    overrides, rest = split_overrides(argv)
    parser = argparse.ArgumentParser(
        prog="clusterlm launch",
        description="Run `clusterlm train RECIPE` on N processes per node with torchrun, or with --slurm submit it "
                    "as a Slurm batch job (srun, one task per device, requeued after preemption). The parallel "
                    "layout comes from the recipe's [parallel] section; dp_replicate*dp_shard*tp*pp must equal "
                    "the number of processes. Extra --section.key=value overrides go to train.")
    parser.add_argument("recipe", nargs="?", help="recipe TOML file or bundled recipe name (omitted: defaults + overrides)")
    parser.add_argument("--nproc-per-node", type=int, help="processes on this node (one per GPU); torchrun only")
    parser.add_argument("--nnodes", type=int, default=1, help="number of nodes (run this command on each)")
    parser.add_argument("--node-rank", type=int, default=0, help="this node's index in [0, nnodes)")
    parser.add_argument("--master-addr", default=None,
                        help="host name/address of node 0 (default 127.0.0.1: one node; needed with --nnodes > 1)")
    parser.add_argument("--master-port", type=int, default=DEFAULT_PORT, help="free TCP port on node 0")
    parser.add_argument("--rdzv-endpoint", metavar="ADDR:PORT",
                        help="c10d rendezvous endpoint, the same on every node (= --master-addr ADDR --master-port PORT)")
    parser.add_argument("--max-restarts", type=int, default=0,
                        help="torchrun restarts of the whole group after a failure (resume with --train.resume=auto)")
    parser.add_argument("--dry-run", action="store_true", help="print the torchrun command (or sbatch script) and exit")
    from clusterlm.cluster import slurm

    slurm.add_arguments(parser)
    args = parser.parse_args(rest)
    # an option of the other mode would be ignored without a word (`--nodes 2` without --slurm ran on one node)
    given = [f"--{d.replace('_', '-')}" for d in (TORCHRUN_OPTIONS if args.slurm else slurm.SLURM_OPTIONS)
             if getattr(args, d) != parser.get_default(d)]
    if given and args.slurm:
        parser.error(f"{', '.join(given)}: torchrun's, not used with --slurm (Slurm's counts: --nodes, "
                     f"--ntasks-per-node)")
    if given:
        parser.error(f"{', '.join(given)}: used with --slurm only (torchrun's counts: --nnodes, --nproc-per-node)")
    if args.slurm:
        return slurm.submit(args, overrides)
    if args.nproc_per_node is None:
        parser.error("the following arguments are required: --nproc-per-node (or --slurm to submit to Slurm)")
    if args.rdzv_endpoint:
        # the endpoint took the place of both without a word: which of two addresses was meant is unknown
        both = [f"--{d.replace('_', '-')}={getattr(args, d)}" for d in ("master_addr", "master_port")
                if getattr(args, d) != parser.get_default(d)]
        if both:
            parser.error(f"--rdzv-endpoint={args.rdzv_endpoint} and {', '.join(both)}: give one of them "
                         f"(--rdzv-endpoint ADDR:PORT = --master-addr ADDR --master-port PORT)")
        addr, _, port = args.rdzv_endpoint.rpartition(":")
        if not addr or not port.isdigit():
            parser.error(f"--rdzv-endpoint={args.rdzv_endpoint!r} must be ADDR:PORT (e.g. 10.77.0.11:29500)")
        args.master_addr, args.master_port = addr.strip("[]"), int(port)
    if args.master_addr is not None and not args.master_addr.strip():  # an unset $VAR: was taken for 127.0.0.1
        parser.error(f"--master-addr={args.master_addr!r} is empty; give node 0's host name or address (e.g. "
                     f"node01), the same on every node, or leave it out on one node")
    for flag, value in (("--nproc-per-node", args.nproc_per_node), ("--nnodes", args.nnodes)):
        if value < 1:
            parser.error(f"{flag}={value} must be >= 1 (processes on this node / nodes in the job)")
    if args.master_addr is None and args.nnodes > 1:  # every node would wait on its own loopback
        parser.error(f"--nnodes={args.nnodes} needs node 0's address, the same on every node: --master-addr ADDR "
                     f"(or --rdzv-endpoint ADDR:PORT)")
    args.master_addr = args.master_addr or "127.0.0.1"
    if not 0 < args.master_port < 65536:
        parser.error(f"--master-port={args.master_port} must be in 1..65535")
    from clusterlm.parallel.layout import check_layout

    overrides = check_layout(args.recipe, overrides, args.nproc_per_node * args.nnodes)
    if not args.dry_run:  # a dry run may print the command for other (GPU) nodes
        check_device(args.recipe, overrides)
    if args.nnodes == 1 and not args.dry_run:
        check_port_free(args.master_addr, args.master_port)
    cmd = torchrun_command(args.recipe, overrides, nproc_per_node=args.nproc_per_node, nnodes=args.nnodes,
                           node_rank=args.node_rank, master_addr=args.master_addr, master_port=args.master_port,
                           max_restarts=args.max_restarts)
    extra = threads_env(args.nproc_per_node)
    # shell-quoted: a dry run's line is one to paste (a path with a space was split in two, a "$(...)" run)
    print(" ".join([*(f"{k}={shlex.quote(v)}" for k, v in extra.items()), *map(shlex.quote, cmd)]))
    if args.dry_run:
        return 0
    return run_torchrun(cmd, extra)
