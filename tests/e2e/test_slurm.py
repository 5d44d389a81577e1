"""`clusterlm launch --slurm` on a real one-node Slurm cluster: Debian's slurm-wlm and munge, installed when
missing and started by scripts/slurm-localhost.sh in a fresh state folder on free ports (so it never meets
another cluster on this machine), stopped at the end.

Skips, saying why, only when the cluster cannot be had: not root and Slurm not installed, apt-get failing,
or daemons that do not come up. About 60 s on 2 cores (two 2-task jobs that queue one after the other).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from tests.helpers import train_losses

from clusterlm.cluster.slurm import TERMINAL_STATES, query_states

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "slurm-localhost.sh"
MAX_STEPS = 80
SIGNAL_AT_STEP = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm_env():
    """Environment (SLURM_CONF, a private CLUSTERLM_HOME) of a freshly started one-node cluster."""
    installed = all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch", "munged"))
    if os.geteuid() != 0:
        pytest.skip("the Slurm daemons run as root (SlurmdUser=root) and this test is not root"
                    + ("" if installed else "; Slurm is not installed either (apt-get install -y slurm-wlm munge)"))
    if shutil.which("apt-get") is None and not installed:
        pytest.skip("Slurm is not installed and there is no apt-get to install slurm-wlm and munge")
    # short path: munge's socket lives here and Unix socket paths are limited to 108 bytes
    state = tempfile.mkdtemp(prefix="clusterlm-slurm-")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_",
                                "TORCHELASTIC_"))}
    env.update(CLUSTERLM_SLURM_DIR=state, CLUSTERLM_SLURMCTLD_PORT=str(_free_port()),
               CLUSTERLM_SLURMD_PORT=str(_free_port()), CLUSTERLM_HOME=str(Path(state) / "home"),
               SLURM_CONF=str(Path(state) / "slurm.conf"))
    r = subprocess.run(["bash", str(SCRIPT), "start"], env=env, capture_output=True, text=True, timeout=900)
    try:
        if r.returncode != 0:
            logs = "".join(f"\n--- {p.name}\n" + p.read_text(errors="replace")[-1500:]
                           for p in [*Path(state).glob("apt.log"), *sorted((Path(state) / "log").glob("*.log"))])
            pytest.skip(f"the one-node Slurm cluster did not come up: {r.stderr.strip()[-1500:]}{logs}")
        yield env
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def _launch(env: dict[str, str], cwd: Path, name: str, data: Path) -> tuple[str, str]:
    """`clusterlm launch --slurm` of a 2-task FSDP run on gloo; returns (job id, printed script)."""
    args = [sys.executable, "-m", "clusterlm", "launch", "--slurm", "--ntasks-per-node=2", f"--job-name={name}",
            "--time=00:10:00", "--signal-seconds=60", "--parallel.dp_shard=2", f"--data.dir={data}",
            f"--train.out_dir={cwd / name}", "--model.preset=llama-nano", "--model.max_seq_len=32",
            "--train.seq_len=32", "--train.micro_batch_size=2", "--train.global_batch_tokens=256",
            f"--train.max_steps={MAX_STEPS}", "--train.device=cpu", "--train.threads=1", "--train.eval_interval=0",
            "--train.log_interval=1", "--checkpoint.interval=0", "--train.tensorboard=false"]
    r = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"^submitted batch job (\d+) ", r.stdout, re.M)
    assert m, r.stdout
    return m.group(1), r.stdout[: r.stdout.rfind("submitted batch job")]


def _steps_done(run: Path) -> int:
    try:
        return max(train_losses(run), default=0)
    except (OSError, ValueError):  # metrics.jsonl not there yet, or a line half written
        return 0


def test_preempted_job_is_requeued_resumes_and_matches_uninterrupted_run(slurm_env, tmp_path, monkeypatch):
    """A 2-task gloo run submitted with `clusterlm launch --slurm` gets `scancel --signal=USR2` mid-run: both
    ranks stop after the same step, checkpoint, exit 75, the script requeues the job (Restarts=1), it
    resumes by itself from that checkpoint and finishes; its per-step losses equal, bit for bit, those of
    an uninterrupted run submitted the same way. `clusterlm jobs` reports both as COMPLETED, 1 and 0
    restarts."""
    from clusterlm.data.prepare import prepare

    (tmp_path / "t.txt").write_text("".join(f"To be, or not to be, that is the question {i}\n" * 20 for i in range(20)))
    prepare([str(tmp_path / "t.txt")], tmp_path / "data", tokenizer="char", val_fraction=0.1)
    env = slurm_env
    monkeypatch.setenv("SLURM_CONF", env["SLURM_CONF"])  # for query_states in this process
    job, script = _launch(env, tmp_path, "preempted", tmp_path / "data")
    ref, _ = _launch(env, tmp_path, "ref", tmp_path / "data")  # queues behind: the node has 2 CPUs
    (tmp_path / "preempted.sbatch.txt").write_text(script)
    run = tmp_path / "preempted"
    try:
        deadline = time.time() + 180
        while _steps_done(run) < SIGNAL_AT_STEP and time.time() < deadline:
            time.sleep(0.05)
        signalled_at = _steps_done(run)
        assert SIGNAL_AT_STEP <= signalled_at < MAX_STEPS, f"job {job} at step {signalled_at} when the signal was due"
        r = subprocess.run(["scancel", "--signal=USR2", job], env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        deadline = time.time() + 300
        while time.time() < deadline:
            states = query_states([job, ref])
            if all(s.state in TERMINAL_STATES for s in states.values()):
                break
            time.sleep(1)
    finally:
        for j in (job, ref):  # never leave a job behind on failure
            subprocess.run(["scancel", j], env=env, capture_output=True, timeout=30)
    log = (run / f"slurm-{job}.out").read_text()
    assert f"job {job} (restart 0)" in log and f"job {job} (restart 1)" in log, log[-3000:]
    assert "SIGUSR2 received" in log and "Exited with exit code 75" in log
    assert f"clusterlm: exit 75 (checkpoint saved): requeueing job {job}" in log
    stopped = int(re.search(r"stopped by SIGUSR2 at step (\d+)", log).group(1))
    assert signalled_at <= stopped < MAX_STEPS
    assert re.search(rf"resumed from \S+step-{stopped:08d} at step {stopped}\b", log), log[-3000:]

    r = subprocess.run([sys.executable, "-m", "clusterlm", "jobs", "--all", "--json"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = {row["job_id"]: row for row in json.loads(r.stdout)}
    assert (rows[job]["state"], rows[job]["restarts"]) == ("COMPLETED", 1), rows[job]
    assert (rows[ref]["state"], rows[ref]["restarts"]) == ("COMPLETED", 0), rows[ref]
    assert rows[job]["script"].endswith(".sbatch") and rows[job]["recipe"] is None

    assert sorted(train_losses(run)) == list(range(1, MAX_STEPS + 1))
    assert train_losses(run) == train_losses(tmp_path / "ref")


def test_probe_all_nodes_and_allreduce_under_slurm(slurm_env, tmp_path):
    """`clusterlm probe --all-nodes` inside a real allocation runs the probe on the node with srun and writes
    the merged spec; `srun -n2 clusterlm probe` measures the all-reduce bus bandwidth across the 2 tasks
    (gloo) and puts it in the intra-node link; the batch step itself (SLURM_PROCID=0, SLURM_NTASKS=2, no
    step id) probes as one process instead of waiting for a rank 1 that never comes."""
    import tomllib

    py = f"{sys.executable} -m clusterlm probe --quick --no-measure"
    script = tmp_path / "probe.sbatch"
    script.write_text("#!/bin/bash\nset -e\n"
                      f"{py} --all-nodes --out {tmp_path / 'cluster.toml'}\n"
                      f"srun --ntasks=2 {py} --out {tmp_path / 'allreduce.toml'}\n"
                      f"{py} --out {tmp_path / 'batch.toml'}\n")
    r = subprocess.run(["sbatch", "--parsable", "--wait", "--ntasks=2", "--time=00:05:00",
                        f"--output={tmp_path / 'probe.out'}", str(script)], env=slurm_env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    out = (tmp_path / "probe.out").read_text() if (tmp_path / "probe.out").exists() else ""
    assert r.returncode == 0, r.stdout + r.stderr + out[-3000:]
    cluster = tomllib.loads((tmp_path / "cluster.toml").read_text())
    assert [nt["count"] for nt in cluster["node_types"]] == [1], cluster["node_types"]
    allreduce = tomllib.loads((tmp_path / "allreduce.toml").read_text())
    links = [nt.get("intra_link", {}) for nt in allreduce["node_types"]]
    assert any(link.get("measured_busbw_gbs", 0) > 0 for link in links), links
    assert "measured_busbw_gbs" not in (tmp_path / "batch.toml").read_text()  # one process: nothing to measure
