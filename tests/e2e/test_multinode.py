"""Multi-node runs for real: a Slurm cluster of two network-namespace "nodes" (scripts/testcluster.sh: each
with its own address, host name and slurmd; munged and slurmctld shared), HSDP over gloo on TCP across
them, with torchrun's c10d rendezvous too, and a node lost mid-run (its link cut): the job is requeued and
resumes on the survivor (`--on-node-loss requeue`, the default).

Root only (namespaces, links, Slurm daemons); installs slurm-wlm and munge with apt when missing, as
tests/e2e/test_slurm.py does. Skips, saying why, only when the cluster cannot be had. The cluster lives in
a fresh state folder, on free ports, a subnet and name prefix of its own, and is stopped (namespaces,
links, daemons) at the end, also after a failure. 205 s on 2 busy cores, load average 5 (the tests marked slow);
the first tests check the rendered elastic script with stand-ins for srun and scontrol, in a second.
"""

from __future__ import annotations

import calendar
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from tests.helpers import read_metrics, train_losses

from clusterlm.checkpoint.layout import read_latest
from clusterlm.cluster.slurm import TERMINAL_STATES, query_states

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "testcluster.sh"
STEPS = 24  # a step is cheap; each run pays its start-up and (HSDP 2 x 2) 4 ranks over veth links
CKPT_INTERVAL = 5
CUT_AT_STEP = 12
# A rank blocked on a dead link is not freed by gloo's timeout (measured: still blocked 188 s after a
# cut with CLUSTERLM_DIST_TIMEOUT_S=20); the trainer's heartbeat (train.heartbeat_timeout, 60 s) is.
# Here Slurm is faster: slurmctld marks the silent node DOWN (SlurmdTimeout=10 s on the test cluster,
# about 30 s after the loss) and srun ends the step; the job script then requeues the job.
# the run every layout is compared with: a tiny Llama on the character-level corpus, CPU, fp32
TRAIN = ["--data.dir={data}", "--model.preset=llama-nano", "--model.max_seq_len=32", "--train.seq_len=32",
         "--train.micro_batch_size=2", "--train.global_batch_tokens=256", f"--train.max_steps={STEPS}",
         "--train.device=cpu", "--train.threads=1", "--train.eval_interval=0", "--train.log_interval=1",
         "--train.tensorboard=false"]
HSDP = ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tc(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


FAKE_SRUN = """#!/bin/bash
case "$*" in *" true") echo "$*" >> "$FAKE_DIR/probe.calls"; exit 0 ;; esac  # the node probe: n1 is alive
echo "$*" >> "$FAKE_DIR/srun.calls"
n=$(wc -l < "$FAKE_DIR/srun.calls")
[ -n "${FAKE_RC:-}" ] && exit "$FAKE_RC"
[ "$n" -ge 2 ] && exit 0
echo "srun: error: Node failure on n2" >&2
exit 137
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") case "$3" in "n[1-2]") printf 'n1\\nn2\\n' ;; *) echo "$3" ;; esac ;;
  "show job") echo "   NodeList=n1 BatchHost=n1" ;;
  "show node") echo "   NodeAddr=10.0.0.1" ;;
  requeue*) echo "$*" >> "$FAKE_DIR/scontrol.calls" ;;
esac
"""


def test_elastic_script_restarts_on_the_nodes_left(tmp_path):
    """The script of `launch --slurm --nodes 2 --min-nodes 1` (with stand-ins for srun and scontrol: the
    first srun fails with a node failure and scontrol then shows the allocation without n2) names the
    lost node and runs srun again on n1 alone, 2 tasks, dp_replicate=1 given last, on a new port."""
    from clusterlm.cluster.slurm import SbatchOptions, render_sbatch

    script = render_sbatch(SbatchOptions(nodes=2, min_nodes=1, ntasks_per_node=2, on_node_loss="continue"), None,
                           ["--parallel.dp_replicate=2", "--parallel.dp_shard=2"], output_dir=tmp_path, workdir=tmp_path,
                           python="python")
    assert "#SBATCH --nodes=1-2" in script and "#SBATCH --no-kill" in script
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    (tmp_path / "job.sh").write_text(script)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_JOB_NUM_NODES": "2"}
    r = subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    calls = (tmp_path / "srun.calls").read_text().splitlines()
    assert len(calls) == 2
    assert '--nodes=2 --ntasks=4 --nodelist=n[1-2]' in calls[0] and calls[0].endswith("--parallel.dp_replicate=2")
    assert '--overlap --nodes=1 --ntasks=2 --nodelist=n1' in calls[1] and calls[1].endswith("--parallel.dp_replicate=1")
    assert "srun exited with 137; node(s) lost: n2; restarting on n1 (1 node(s))" in r.stdout
    assert (tmp_path / "probe.calls").read_text().split().count("--nodelist=n1") == 1  # n2: out of the allocation
    ports = re.findall(r"master \S+:(\d+)", r.stdout)
    assert len(ports) == 2 and ports[0] != ports[1], r.stdout


@pytest.mark.parametrize("restarts, requeued", [(0, True), (3, False)])
def test_rank_lost_exit_is_requeued_a_bounded_number_of_times(tmp_path, restarts, requeued):
    """Exit 76 (EXIT_RANK_LOST: a rank's heartbeat went silent) makes the script requeue the job, unless it
    has been requeued 3 times already (a job whose ranks keep hanging then ends with 76)."""
    from clusterlm.cluster.slurm import SbatchOptions, render_sbatch

    (tmp_path / "job.sh").write_text(render_sbatch(SbatchOptions(nodes=2, ntasks_per_node=2), None, [],
                                                   output_dir=tmp_path, workdir=tmp_path, python="python"))
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o755)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}", "FAKE_DIR": str(tmp_path), "FAKE_RC": "76",
           "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS": "4",
           "SLURM_RESTART_COUNT": str(restarts)}
    r = subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, capture_output=True, text=True, timeout=30)
    calls = tmp_path / "scontrol.calls"
    if requeued:
        assert r.returncode == 0 and calls.read_text().split() == ["requeue", "7"], r.stdout + r.stderr
        assert "exit 76 (a rank was lost): requeueing job 7 (restart 1 of at most 3)" in r.stdout
    else:
        assert r.returncode == 76 and not calls.exists(), r.stdout + r.stderr


def test_elastic_needs_one_replica_per_node(tmp_path):
    """--min-nodes with a layout whose dp_replicate is not the node count is refused before anything is
    written, with the fix in the message; so is --min-nodes > --nodes."""
    base = [sys.executable, "-m", "clusterlm", "launch", "--slurm", "--dry-run", "--nodes=2", "--ntasks-per-node=2",
            f"--train.out_dir={tmp_path / 'run'}"]
    r = subprocess.run([*base, "--min-nodes=1", "--parallel.dp_shard=4"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--parallel.dp_replicate=2 --parallel.dp_shard=2" in r.stderr, r.stderr
    r = subprocess.run([*base, "--min-nodes=3", "--parallel.dp_replicate=2", "--parallel.dp_shard=2"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--min-nodes=3 must be in [1, --nodes=2]" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_dist_timeout_from_environment():
    """CLUSTERLM_DIST_TIMEOUT_S sets the process group's timeout; unset means torch's 600 s; junk is refused."""
    from clusterlm.parallel.launch import DEFAULT_TIMEOUT_S, dist_timeout_s

    assert dist_timeout_s({}) == DEFAULT_TIMEOUT_S == 600
    assert dist_timeout_s({"CLUSTERLM_DIST_TIMEOUT_S": "30"}) == 30
    for bad in ("0", "-5", "soon", "nan", "inf", "1e30"):  # nan, inf: torch's timedelta failed on each rank
        with pytest.raises(ValueError, match="CLUSTERLM_DIST_TIMEOUT_S"):
            dist_timeout_s({"CLUSTERLM_DIST_TIMEOUT_S": bad})


class ClusterUnavailable(Exception):
    """The namespaced Slurm cluster cannot be had here (not root, no namespaces, no Slurm): the reason."""


@contextlib.contextmanager
def testcluster(n: int = 2):
    """(environment, node names, node addresses) of a freshly started n-node namespaced Slurm cluster,
    stopped on exit; raises ClusterUnavailable before starting when it cannot be had.
    benchmarks/faults.py uses it too (its node-loss rows)."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("network namespaces, veth links and the Slurm daemons need root and this is not root")
    missing = [c for c in ("ip", "nsenter", "unshare") if shutil.which(c) is None]
    if missing:
        raise ClusterUnavailable(f"missing {', '.join(missing)} (iproute2, util-linux)")
    probe = f"clmprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=30)
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=30)
    if r.returncode != 0:
        raise ClusterUnavailable("cannot create a network namespace here (no CAP_SYS_ADMIN/CAP_NET_ADMIN?): "
                                 f"{r.stderr.strip()}")
    daemons = ("slurmctld", "slurmd", "sbatch", "munged")
    if shutil.which("apt-get") is None and not all(shutil.which(c) for c in daemons):
        raise ClusterUnavailable("Slurm is not installed and there is no apt-get to install slurm-wlm and munge")
    # short path: munge's socket lives here and Unix socket paths are limited to 108 bytes
    state = tempfile.mkdtemp(prefix="clusterlm-tc-")
    tag = os.getpid() % 150
    prefix = f"t{tag}n"  # node names t<tag>n1, t<tag>n2; bridge t<tag>nbr0 (interface names: 15 bytes at most)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_",
                                "TORCHELASTIC_", "OMP_NUM_THREADS"))}
    env.update(CLUSTERLM_TESTCLUSTER_DIR=state, CLUSTERLM_TC_PREFIX=prefix, CLUSTERLM_TC_NET=f"10.77.{100 + tag}",
               CLUSTERLM_SLURMCTLD_PORT=str(_free_port()), CLUSTERLM_SLURMD_PORT=str(_free_port()),
               CLUSTERLM_HOME=str(Path(state) / "home"), SLURM_CONF=str(Path(state) / "slurm.conf"))
    try:
        r = _tc(env, "start", str(n), timeout=900)
        if r.returncode != 0:
            logs = "".join(f"\n--- {p.name}\n" + p.read_text(errors="replace")[-1500:]
                           for p in [*Path(state).glob("apt.log"), *sorted((Path(state) / "log").glob("*.log"))])
            raise ClusterUnavailable(f"the namespaced Slurm cluster did not come up: {r.stderr.strip()[-1500:]}"
                                     f"{logs}")
        nodes = [f"{prefix}{k}" for k in range(1, n + 1)]
        yield env, nodes, [_tc(env, "addr", node).stdout.strip() for node in nodes]
    finally:
        _tc(env, "stop")
        shutil.rmtree(state, ignore_errors=True)


testcluster.__test__ = False  # a context manager for the fixture and benchmarks/faults.py, not a test


@pytest.fixture(scope="module")
def cluster():
    """testcluster(2), or a skip saying why it cannot be had."""
    try:
        with testcluster(2) as c:
            yield c
    except ClusterUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from clusterlm.data.prepare import prepare

    root = tmp_path_factory.mktemp("corpus")
    (root / "t.txt").write_text("".join(f"To be, or not to be, that is the question {i}\n" * 20 for i in range(20)))
    prepare([str(root / "t.txt")], root / "data", tokenizer="char", val_fraction=0.1)
    return root / "data"


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [a.format(data=data) for a in TRAIN] + [f"--train.out_dir={out}", *extra]


def _torchrun_cmd(data: Path, out: Path, nproc: int, *extra: str) -> list[str]:
    """`clusterlm launch --nproc-per-node N` on this host (the root namespace), no Slurm."""
    return [sys.executable, "-m", "clusterlm", "launch", f"--nproc-per-node={nproc}", f"--master-port={_free_port()}",
            *_train_args(data, out, *extra)]


def _here_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k != "SLURM_CONF"}


def _torchrun_here(env: dict[str, str], data: Path, out: Path, nproc: int, *extra: str,
                   timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_torchrun_cmd(data, out, nproc, *extra), env=_here_env(env), capture_output=True,
                          text=True, timeout=timeout)


# the uninterrupted world-size-2 run a node-loss trial's resumed run is compared with
REF_WS2 = ("--parallel.dp_replicate=1", "--parallel.dp_shard=2", f"--checkpoint.interval={CKPT_INTERVAL}",
           "--checkpoint.keep_last=100", "--train.resume=auto")


def _start_reference(env: dict[str, str], data: Path, ckpt: Path, ref: Path) -> subprocess.Popen:
    """REF_WS2 on this host from a copy of the step folder `ckpt` in ref/checkpoints; output in ref.log."""
    (ref / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, ref / "checkpoints" / ckpt.name)
    (ref / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    with open(ref.parent / f"{ref.name}.log", "wb") as log:
        return subprocess.Popen(_torchrun_cmd(data, ref, 2, *REF_WS2), env=_here_env(env), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _kill_reference(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # launch, torchrun and its ranks
        proc.wait()


def _finish_reference(proc: subprocess.Popen, ref: Path, timeout: float = 300) -> dict[int, float]:
    try:
        rc = proc.wait(timeout)
    finally:
        _kill_reference(proc)
    assert rc == 0, (ref.parent / f"{ref.name}.log").read_text()[-4000:]
    return train_losses(ref)


def _submit(env: dict[str, str], cwd: Path, name: str, *args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "clusterlm", "launch", "--slurm", f"--job-name={name}",
                        "--time=00:10:00", "--signal-seconds=60", *args], env=env, cwd=cwd, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"^submitted batch job (\d+) ", r.stdout, re.M)
    assert m, r.stdout
    return m.group(1)


def _job_state(env: dict[str, str], job: str):
    """The job's JobState as `clusterlm jobs` reads it (state, restart count from `scontrol show job`)."""
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = env["SLURM_CONF"]  # query_states runs scontrol/squeue in this process
    try:
        return query_states([job])[job]
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved


def _wait(env: dict[str, str], job: str, limit_s: float) -> str:
    """The job's terminal state; scancel and fail after limit_s."""
    deadline = time.time() + limit_s
    while time.time() < deadline:
        state = _job_state(env, job)
        if state.state in TERMINAL_STATES:
            return state.state
        time.sleep(1)
    subprocess.run(["scancel", job], env=env, capture_output=True, timeout=30)
    pytest.fail(f"job {job} did not finish in {limit_s:.0f} s")


@pytest.fixture(scope="module")
def one_host(cluster, data, tmp_path_factory) -> dict[int, float]:
    """Per-step losses of the 2 x 2 HSDP layout as 4 processes on this one host."""
    env, _, _ = cluster
    out = tmp_path_factory.mktemp("one_host") / "run"
    r = _torchrun_here(env, data, out, 4, *HSDP, "--checkpoint.interval=0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


@pytest.mark.slow
def test_slurm_hsdp_across_two_namespaced_nodes_equals_one_host(cluster, data, one_host, tmp_path):
    """`clusterlm launch --slurm --nodes 2 --ntasks-per-node 2` runs HSDP (dp_replicate=2 across the nodes,
    dp_shard=2 within) over gloo on TCP between two network namespaces, rendezvousing at the first
    node's own address; its 24 per-step losses equal, bit for bit, the same layout run as 4 processes on
    one host."""
    env, nodes, addrs = cluster
    job = _submit(env, tmp_path, "hsdp", "--nodes=2", "--ntasks-per-node=2", *HSDP,
                  *_train_args(data, tmp_path / "run", "--checkpoint.interval=0"))
    assert _wait(env, job, 300) == "COMPLETED"
    log = (tmp_path / "run" / f"slurm-{job}.out").read_text()
    first = rf"clusterlm: job {job} \(restart 0\) on {nodes[0][:-1]}\[1-2\], 4 tasks, master {nodes[0]}:"
    assert re.search(first, log), log[:2000]
    assert f"process group gloo: rank 0 of 4 (slurm, master {nodes[0]}:" in log
    assert "layout: dp_replicate=2*dp_shard=2*tp=1*pp=1 on 4 process(es)" in log
    assert train_losses(tmp_path / "run") == one_host


@pytest.mark.slow
def test_torchrun_c10d_across_two_namespaced_nodes_equals_one_host(cluster, data, one_host, tmp_path):
    """Multi-node `clusterlm launch` without Slurm: one `clusterlm launch --nnodes 2 --node-rank K
    --rdzv-endpoint NODE1_ADDR:PORT --nproc-per-node 2` per namespace (torchrun, c10d rendezvous); the
    HSDP run's 24 per-step losses equal the one-host run's bit for bit."""
    env, nodes, addrs = cluster
    port = _free_port()
    procs, logs = [], [open(tmp_path / f"node{k}.log", "w") for k in range(2)]
    for k, node in enumerate(nodes):
        cmd = ["bash", str(SCRIPT), "exec", node, sys.executable, "-m", "clusterlm", "launch", "--nnodes=2",
               f"--node-rank={k}", f"--rdzv-endpoint={addrs[0]}:{port}", "--nproc-per-node=2", *HSDP,
               *_train_args(data, tmp_path / "run", "--checkpoint.interval=0")]
        procs.append(subprocess.Popen(cmd, env={k: v for k, v in env.items() if k != "SLURM_CONF"},
                                      stdout=logs[k], stderr=subprocess.STDOUT, cwd=tmp_path))
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)
        for f in logs:
            f.close()
    logs = "\n".join((tmp_path / f"node{k}.log").read_text()[-2000:] for k in range(2))
    assert codes == [0, 0], logs
    both = (tmp_path / "node0.log").read_text() + (tmp_path / "node1.log").read_text()
    assert "process group gloo: rank 0 of 4 (torchrun" in both
    assert train_losses(tmp_path / "run") == one_host


@pytest.mark.slow
def test_probe_all_nodes_measures_the_inter_node_link(cluster, tmp_path):
    """`clusterlm probe --all-nodes` in a 2-node allocation probes each namespaced node (merged into one node
    type of count 2) and measures the all-reduce bus bandwidth between them (gloo, one rank per node),
    which becomes the spec's inter-node link (the planner's dp_comm uses it)."""
    import tomllib

    env, nodes, _ = cluster
    probe = f"{sys.executable} -m clusterlm probe --all-nodes --quick --no-measure --out {tmp_path / 'c.toml'}"
    r = subprocess.run(["sbatch", "--parsable", "--wait", "--nodes=2", "--ntasks-per-node=1", "--time=00:05:00",
                        f"--output={tmp_path / 'probe.out'}", "--wrap", probe],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = (tmp_path / "probe.out").read_text() if (tmp_path / "probe.out").exists() else ""
    assert r.returncode == 0, r.stdout + r.stderr + out[-3000:]
    assert "2 ranks on 2 host(s)" in out and f"ranks on {nodes[0]}, {nodes[1]}" in out, out[-3000:]
    spec = tomllib.loads((tmp_path / "c.toml").read_text())
    assert [nt["count"] for nt in spec["node_types"]] == [2], spec["node_types"]
    assert spec["inter_node_link"]["measured_busbw_gbs"] > 0, spec["inter_node_link"]


def _wait_idle(env: dict[str, str], limit_s: float = 90) -> None:
    """Until every node is idle (a restored node returns to service when its slurmd answers again)."""
    deadline = time.time() + limit_s
    while time.time() < deadline:
        r = subprocess.run(["sinfo", "-N", "--noheader", "--format=%t"], env=env, capture_output=True, text=True,
                           timeout=30)
        if r.returncode == 0 and r.stdout.split() and set(r.stdout.split()) == {"idle"}:
            return
        time.sleep(1)
    pytest.fail(f"the nodes are not idle after {limit_s:.0f} s: {r.stdout!r}")


def node_loss_trial(cluster, data: Path, tmp_path: Path, fault: str, mode: str = "requeue") -> dict:
    """An elastic HSDP 2 x 2 job (`--on-node-loss MODE`: requeue or continue) loses node 2 at step
    CUT_AT_STEP (`testcluster.sh cut|kill`); it is waited for, then an uninterrupted world-size-2 run from
    the checkpoint it resumed is made on this host. Returns what the test asserts and benchmarks/faults.py
    tabulates: state, log, the lost node, the job's restart count (Slurm's, as `clusterlm jobs` reads it),
    seconds from the fault to the job's "node(s) lost" line (detect_s) and to the first step after the
    restart (recover_s), the resumed step, and the losses after it beside the reference's."""
    env, nodes, _ = cluster
    _wait_idle(env)
    run = tmp_path / "run"
    train = _train_args(data, run, f"--checkpoint.interval={CKPT_INTERVAL}", "--checkpoint.keep_last=100")
    job = _submit(env, tmp_path, "elastic", "--nodes=2", "--min-nodes=1", "--ntasks-per-node=2",
                  f"--on-node-loss={mode}", *HSDP, *train)
    cut_at = ref_proc = None
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                done = max(train_losses(run), default=0)
            except (OSError, ValueError):  # not there yet, or a line half written
                done = 0
            if done >= CUT_AT_STEP:
                break
            time.sleep(0.05)
        assert CUT_AT_STEP <= done < STEPS, f"job {job} at step {done} when the cut was due"
        r = _tc(env, fault, nodes[1])
        assert r.returncode == 0, r.stderr
        cut_at = time.time()
        committed = read_latest(run / "checkpoints")  # nothing commits without node 2's ranks
        if committed:  # the checkpoint the job should resume from: its reference runs while Slurm notices
            # the loss (node 1's ranks wait on node 2's, so the CPUs are idle for ~25 s)
            ref_proc = _start_reference(env, data, run / "checkpoints" / committed, tmp_path / "ref")
        state = _wait(env, job, 300)
    except BaseException:
        _kill_reference(ref_proc)
        raise
    finally:
        if cut_at is not None:
            _tc(env, "restore", nodes[1])
    log = (run / f"slurm-{job}.out").read_text()
    out = {"job": job, "mode": mode, "state": state, "log": log, "lost": nodes[1], "detect_s": None,
           "recover_s": None, "step": None, "after": {}, "reference": None, "at_step": done,
           "restarts": _job_state(env, job).restarts, "committed": int(committed.split("-")[1]) if committed else 0}
    left = (rf"restarting on {nodes[0]} \(1 node\(s\)\)" if mode == "continue" else
            rf"1 node\(s\) left \({nodes[0]}\)")
    m = re.search(rf"clusterlm: srun exited with \d+; node\(s\) lost: {nodes[1]}; {left}, (\S+)Z", log)
    resumed = re.search(r"resumed from (\S+step-(\d+)) at step (\d+)", log)
    if not (state == "COMPLETED" and m and resumed):
        _kill_reference(ref_proc)
        return out
    stopped = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S"))
    step = int(resumed.group(3))
    after = {s: v for s, v in train_losses(run).items() if s > step}  # the restarted round's (later lines win)
    first = min((r["time"] for r in read_metrics(run / "metrics.jsonl") if r.get("kind") == "train"
                 and r["step"] == step + 1 and r["time"] > cut_at), default=None)
    out |= {"detect_s": stopped - cut_at, "recover_s": None if first is None else first - cut_at, "step": step,
            "after": after}

    # the reference: the same checkpoint, world size 2 on this host, never interrupted (started at the cut
    # from the newest committed checkpoint; again here if the job resumed from another one)
    ref = tmp_path / "ref"
    if ref_proc is not None and Path(resumed.group(1)).name != committed:
        _kill_reference(ref_proc)
        ref, ref_proc = tmp_path / "ref2", None
    if ref_proc is None:
        ref_proc = _start_reference(env, data, Path(resumed.group(1)), ref)
    return out | {"reference": _finish_reference(ref_proc, ref)}


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["cut"])
def test_node_lost_mid_run_is_requeued_on_survivor_and_matches_uninterrupted(cluster, data, tmp_path, fault):
    """An elastic job (`--nodes 2 --min-nodes 1`, `--on-node-loss requeue`, the default; HSDP 2 x 2, a
    checkpoint every 5 steps) loses node 2 at step 12: its link cut (`testcluster.sh cut`: packets vanish).
    Within 90 s Slurm marks the node DOWN, srun stops and the script names the lost node, leaves it DOWN in
    slurmctld's view (or sets it DOWN) and requeues the job: Slurm counts one restart and starts the job
    again on node 1 alone, where it runs at world size 2 (dp_replicate=1, dp_shard=2, 2 accumulation steps
    for the same global batch) from the last committed checkpoint (DCP reshards 4 -> 2 ranks) and
    finishes. Its per-step losses from there equal, bit for bit, an uninterrupted world-size-2 run started
    from a copy of that checkpoint on this host. Once node 2 is back, a new 2-node job grows the run back
    to world size 4 (_grow_back). The `continue` mode (restart inside the allocation) is the rendered
    script's test above, with stand-ins for srun and scontrol; benchmarks/faults.py can run it here too."""
    _, nodes, _ = cluster
    r = node_loss_trial(cluster, data, tmp_path, fault, "requeue")
    log = r["log"]
    assert r["state"] == "COMPLETED", log[-3000:]
    assert r["detect_s"] is not None, log[-4000:]  # the "node(s) lost: NODE2; 1 node(s) left (NODE1)" line
    assert r["detect_s"] < 90, f"the job noticed the lost node {r['detect_s']:.0f} s after the {fault}"
    # slurmctld holds node 2 DOWN before the requeue (it marked it itself, or the script did)
    assert re.search(rf"clusterlm: (node {nodes[1]} is down\S* to Slurm already|set node {nodes[1]} DOWN)", log), log
    assert f"clusterlm: requeueing job {r['job']} (restart 1 of at most 3)" in log, log[-3000:]
    assert r["restarts"] == 1  # Slurm's count (Restarts=), as `clusterlm jobs` shows it
    # the requeued run: Slurm gave it node 1 alone, SLURM_RESTART_COUNT=1, world size 2
    assert re.search(rf"clusterlm: job {r['job']} \(restart 1, round 0\) on {nodes[0]}, 2 tasks, "
                     r"--parallel.dp_replicate=1", log), log[-3000:]
    assert "round 1)" not in log  # no restart inside the first allocation
    step = r["step"]
    assert step % CKPT_INTERVAL == 0 and step <= CUT_AT_STEP + 1 and step > 0
    assert step == r["committed"], r["committed"]  # the newest committed checkpoint at the fault
    assert "2 accumulation steps, 256 tokens per step" in log
    assert sorted(r["after"]) == list(range(step + 1, STEPS + 1))
    assert r["reference"] == r["after"]
    _grow_back(cluster, data, tmp_path)  # node 2 is back: a new job grows the run back to 2 nodes x 2 ranks


def _grow_back(cluster, data: Path, tmp_path: Path) -> None:
    """After the elastic job finished on one node and node 2 returned: a new `launch --slurm --nodes 2` job on
    the same out_dir resumes the world-size-2 run's last checkpoint (step 24) at world size 4 (HSDP 2 x 2),
    back to 1 accumulation step for the same 256 tokens per step, and trains steps 25-28."""
    env, nodes, _ = cluster
    _wait_idle(env)
    run = tmp_path / "run"
    job = _submit(env, tmp_path, "grow", "--nodes=2", "--ntasks-per-node=2", *HSDP,
                  *_train_args(data, run, f"--checkpoint.interval={CKPT_INTERVAL}", "--checkpoint.keep_last=100",
                               "--train.resume=auto"), f"--train.max_steps={STEPS + 4}")
    state = _wait(env, job, 300)
    log = (run / f"slurm-{job}.out").read_text()
    assert state == "COMPLETED", log[-3000:]
    assert f"resumed from {run / 'checkpoints'}/step-{STEPS:08d} at step {STEPS}" in log, log[-3000:]
    assert "1 accumulation steps, 256 tokens per step" in log and "on 4 process(es)" in log, log[-3000:]
    assert f"process group gloo: rank 0 of 4 (slurm, master {nodes[0]}:" in log
    assert sorted(s for s in train_losses(run) if s > STEPS) == list(range(STEPS + 1, STEPS + 5))
