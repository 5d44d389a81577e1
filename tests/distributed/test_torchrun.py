"""Multi-process training as a user starts it: `clusterlm launch` under torchrun (a rank killed
mid-run, restart, resume) and `clusterlm train` started the way srun starts tasks.

Slow-ish (~50 s on 2 cores): marked slow.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.helpers import train_losses

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def _rank_pid(rank: int, marker: str) -> int | None:
    """pid of the torchrun worker with RANK=rank whose command line mentions `marker`"""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            env = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmd and f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b" ".join(env):
            return int(d.name)
    return None


def _kill_workers(marker: str) -> None:
    """SIGKILL the torchrun workers of a hung test run (found by their command line)"""
    for rank in (0, 1):
        while (pid := _rank_pid(rank, marker)) is not None:
            os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)


def _launch(data: Path, out: Path, max_restarts: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "clusterlm", "launch", "--nproc-per-node=2", f"--master-port={_free_port()}",
            f"--max-restarts={max_restarts}", "--parallel.dp_shard=2", f"--data.dir={data}",
            f"--train.out_dir={out}", "--model.preset=llama-nano", "--model.max_seq_len=32", "--train.seq_len=32",
            "--train.micro_batch_size=2", "--train.global_batch_tokens=256", "--train.max_steps=40",
            "--train.device=cpu", "--train.threads=1", "--train.eval_interval=0", "--train.log_interval=1",
            "--checkpoint.interval=5", "--checkpoint.keep_last=2", "--train.resume=auto", "--train.tensorboard=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "SLURM_"))}
    log = open(out.with_suffix(".log"), "w")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)


def _signal_rank1(proc: subprocess.Popen, run: Path, after_step: int, sig: int) -> tuple[bool, int]:
    """Send `sig` to the rank-1 worker of `run` once its step-`after_step` checkpoint exists; then wait for
    the launch to end. Returns (whether the signal was sent, the launch's exit code)."""
    sent = False
    deadline = time.time() + 240
    while not sent and time.time() < deadline and proc.poll() is None:
        if (run / "checkpoints" / f"step-{after_step:08d}").is_dir() and (pid := _rank_pid(1, str(run))):
            os.kill(pid, sig)
            sent = True
        time.sleep(0.02)
    try:
        return sent, proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _kill_workers(str(run))
        raise


def test_killed_rank_restarts_and_resumes_identically(tmp_path):
    """torchrun --max-restarts 1 with rank 1 SIGKILLed after the step-10 checkpoint: the group restarts,
    resumes from its last checkpoint and ends with per-step losses bit-identical to an uninterrupted run
    (FSDP x2 both)."""
    from clusterlm.data.prepare import prepare

    (tmp_path / "t.txt").write_text("".join(f"To be, or not to be, that is the question {i}\n" * 20
                                            for i in range(20)))
    prepare([str(tmp_path / "t.txt")], tmp_path / "data", tokenizer="char", val_fraction=0.1)

    ref = _launch(tmp_path / "data", tmp_path / "ref", max_restarts=0)
    assert ref.wait(timeout=240) == 0, (tmp_path / "ref.log").read_text()[-3000:]

    run = tmp_path / "killed"
    killed, rc = _signal_rank1(_launch(tmp_path / "data", run, max_restarts=1), run, 10, signal.SIGKILL)
    assert rc == 0, (tmp_path / "killed.log").read_text()[-3000:]
    log = (tmp_path / "killed.log").read_text()
    assert killed, "the run finished before rank 1 could be killed"
    assert "resumed from" in log and "step-000000" in log
    assert train_losses(run) == train_losses(tmp_path / "ref")
    assert sorted(train_losses(run)) == list(range(1, 41))

    # preemption: SIGUSR2 to rank 1 only; both ranks agree, save and exit 75, and `clusterlm launch`
    # exits 75 too (torchrun alone would report 1), so a requeue script can tell preemption from failure
    run = tmp_path / "preempted"
    signalled, rc = _signal_rank1(_launch(tmp_path / "data", run, max_restarts=0), run, 5, signal.SIGUSR2)
    log = (tmp_path / "preempted.log").read_text()
    assert signalled, "the run finished before rank 1 could be signalled"
    assert rc == 75, log[-3000:]
    got = train_losses(run)
    last = max(got)
    assert 5 <= last < 40 and (run / "checkpoints" / f"step-{last:08d}").is_dir()
    ref = train_losses(tmp_path / "ref")
    assert got == {s: ref[s] for s in got}

    # SIGTERM to `clusterlm launch` alone (a wrapper or `kill PID`): passed to torchrun and on to the
    # workers, which save; launch waits for them and exits 75, and no worker outlives it (before, it
    # exited 143 at once and left torchrun and the workers training, orphaned)
    run = tmp_path / "launcher"
    proc = _launch(tmp_path / "data", run, max_restarts=0)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step-00000005").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before the launcher could be signalled"
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=120)
    finally:
        _kill_workers(str(run))
    log = (tmp_path / "launcher.log").read_text()
    assert rc == 75, log[-3000:]
    assert "SIGTERM received: passed to torchrun" in log
    assert "torchrun: stopped by SIGTERM" in log and "SignalException" not in log  # one line, no traceback
    assert _rank_pid(0, str(run)) is None and _rank_pid(1, str(run)) is None
    last = max(train_losses(run))
    assert (run / "checkpoints" / f"step-{last:08d}").is_dir()


def test_srun_without_torchrun(tmp_path, monkeypatch):
    """`clusterlm train` started as srun starts tasks (SLURM_PROCID/NTASKS/LOCALID/NODELIST, no torchrun
    variables) forms the group itself, with the node list's first host as master, and trains FSDP x2 with
    one process's losses (1e-5)."""
    from clusterlm.config import load_run_config
    from clusterlm.data.prepare import prepare
    from clusterlm.train.loop import train

    (tmp_path / "t.txt").write_text("".join(f"Thou art more lovely and more temperate {i}\n" * 20 for i in range(20)))
    prepare([str(tmp_path / "t.txt")], tmp_path / "data", tokenizer="char", val_fraction=0.1)
    common = [f"--data.dir={tmp_path / 'data'}", "--model.preset=llama-nano", "--model.max_seq_len=32",
              "--train.seq_len=32", "--train.global_batch_tokens=256", "--train.max_steps=5", "--train.device=cpu",
              "--train.threads=1", "--train.eval_interval=0", "--train.log_interval=1", "--train.tensorboard=false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER"))}
    env.update(SLURM_NTASKS="2", SLURM_NODELIST="localhost", SLURM_STEP_ID="0", MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, "-m", "clusterlm", "train", *common, "--train.micro_batch_size=4",
                               "--parallel.dp_shard=2", f"--train.out_dir={tmp_path / 'srun'}"],
                              env=env | {"SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"rank{r}.log", "w"))
             for r in range(2)]
    assert [p.wait(timeout=240) for p in procs] == [0, 0], (tmp_path / "rank0.log").read_text()[-3000:]
    assert "rank 0 of 2 (slurm, master localhost:" in (tmp_path / "rank0.log").read_text()
    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    assert train(load_run_config(None, [*common, "--train.micro_batch_size=8",
                                        f"--train.out_dir={tmp_path / 'one'}"])).exit_code == 0
    got, ref = train_losses(tmp_path / "srun"), train_losses(tmp_path / "one")
    assert sorted(got) == [1, 2, 3, 4, 5]
    for s in ref:
        assert got[s] == pytest.approx(ref[s], abs=1e-5), s


def test_a_stop_signal_that_reaches_torchrun_again_stops_it_once(tmp_path):
    """A terminal's Ctrl-C reaches `clusterlm launch`, torchrun and the workers (one process group), and
    launch passes it on to torchrun: torchrun gets SIGINT twice (more with an impatient user). Each one
    after the first raised torch's SignalException again inside torchrun's shutdown: a 40-line "--- Logging
    error ---" traceback, or the shutdown cut short, torchrun gone before its workers had saved. Now
    torchrun stops once: one line, exit 130, after the worker's own exit (75 once it has saved)."""
    worker = tmp_path / "worker.py"
    worker.write_text(f"""import pathlib, signal, sys, time
def stop(signum, frame):
    time.sleep(2)  # the save
    pathlib.Path({str(tmp_path / 'saved')!r}).write_text("75")
    sys.exit(75)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, stop)
pathlib.Path({str(tmp_path / 'ready')!r}).write_text("")
time.sleep(120)
""")
    proc = subprocess.Popen([sys.executable, "-m", "clusterlm.parallel.torchrun", "--nproc-per-node=1",
                             "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}", str(worker)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "ready").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert (tmp_path / "ready").exists(), proc.communicate()[0]
        os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C
        for _ in range(10):  # launch passing it on, and the user pressing Ctrl-C again, while the worker saves
            time.sleep(0.1)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
        saved = (tmp_path / "saved").exists()  # when torchrun has ended
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    assert "torchrun: stopped by SIGINT" in out and "Traceback" not in out and "Logging error" not in out, out
    assert saved, "torchrun ended before its worker had saved"
