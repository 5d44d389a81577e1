"""The fault catalogue, run on purpose: each fault made N times, detected, recovered from, timed.

    .venv/bin/python benchmarks/faults.py            # ~12 min on 2 busy cores; root: real tmpfs, node loss
    .venv/bin/python benchmarks/faults.py --trials 1 --kill-trials 2
    .venv/bin/python benchmarks/faults.py --only sigkill --seed 18   # one row, merged into the JSON

Writes benchmarks/results/faults.json and the table between the FAULTS markers of docs/reliability.md.
Columns: trials; detected (the fault was noticed, by the right rank or check); recovered (a resume
from what was left loaded a valid checkpoint, or, for a hung rank, the job ended with the resumable
exit code 76); data lost (committed checkpoints lost: must be 0); time to detect and to recover
(median seconds). The same faults are asserted in tests/distributed/test_heartbeat.py,
tests/unit/test_mirror.py, tests/e2e/test_faults.py (which also has the NaN-on-one-rank case),
tests/e2e/test_multinode.py (node loss, root) and tests/distributed/test_torchrun.py (one SIGKILL).

SIGKILL row: `clusterlm launch --nproc-per-node 2 --max-restarts 1 --train.resume=auto` of a tiny
llama (gloo, DDP, a checkpoint every 2 steps); a seeded random rank is SIGKILLed at a random step plus
a random fraction of a step (so also inside a save); torchrun ends the group and restarts it, which
resumes from the last committed checkpoint. Recovered means: the resumed step is the newest committed
one at the time of the kill, every logged loss equals the uninterrupted run's for its step, and the
final model and optimizer state are bit-identical to it. The seed and every trial are in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED = 18  # the SIGKILL trials' seed (rank, step, delay); recorded in the JSON
RESULT = ROOT / "benchmarks" / "results" / "faults.json"
DOC = ROOT / "docs" / "reliability.md"
BEGIN, END = "<!-- FAULTS BEGIN (benchmarks/faults.py) -->", "<!-- FAULTS END -->"
HEARTBEAT_TIMEOUT = 5.0


class Loader:
    pos = 0

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def _train(root: Path, steps: int, *, size: int = 64, mirror: str = "", distributed: bool = False):
    """A tiny run saving a checkpoint after each step: (model, checkpointer, state, optimizer)."""
    import torch

    from clusterlm.checkpoint.manager import Checkpointer
    from clusterlm.config import CheckpointConfig

    model = torch.nn.Linear(size, size)
    opt = torch.optim.AdamW(model.parameters())
    ckpt = Checkpointer(root, CheckpointConfig(keep_last=3, mirror=mirror), config_toml="", distributed=distributed)
    state, loader = ckpt.load_into(model, opt, Loader()), Loader()
    for _ in range(steps):
        model(torch.randn(2, size)).sum().backward()
        opt.step()
        state.step += 1
        ckpt.save(state, model, opt, loader, reason="periodic")
    return model, ckpt, state, opt


def _resume(root: Path, *, size: int = 64, mirror: str = "", distributed: bool = False) -> tuple[int, float]:
    """(the step a resume=auto run continues from, seconds to find, verify and load it)."""
    import torch

    from clusterlm.checkpoint.manager import Checkpointer
    from clusterlm.config import CheckpointConfig

    t0 = time.perf_counter()
    model = torch.nn.Linear(size, size)
    ckpt = Checkpointer(root, CheckpointConfig(mirror=mirror), config_toml="", resume="auto", distributed=distributed)
    step = ckpt.load_into(model, torch.optim.AdamW(model.parameters()), Loader()).step
    return step, time.perf_counter() - t0


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ---- the faults: each returns {detected, recovered, lost, detect_s, recover_s, note} -----------------
def hung_rank(stopped: int) -> Callable[[Path], dict]:
    def trial(tmp: Path) -> dict:  # noqa: ARG001
        from tests.distributed.test_heartbeat import _start_job

        procs = _start_job(HEARTBEAT_TIMEOUT)
        other = procs[1 - stopped]
        try:
            t0 = time.monotonic()
            os.kill(procs[stopped].pid, signal.SIGSTOP)
            rc = other.wait(timeout=HEARTBEAT_TIMEOUT + 30)
            detect = time.monotonic() - t0
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        line = next((ln for ln in other.stderr.read().splitlines() if "hung rank" in ln), "")
        named = f"rank {stopped}" in line
        return {"detected": named, "recovered": rc == 76, "lost": 0, "detect_s": detect, "recover_s": None,
                "note": line}
    return trial


def disk_full(tmp: Path) -> dict:
    import clusterlm.checkpoint.store as store
    from clusterlm.checkpoint.store import verify_checkpoint

    disk = tmp / "disk"
    disk.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)],
                                                   capture_output=True).returncode == 0
    write = store.write_tensors
    if not mounted:  # ENOSPC from the writer instead of a real full disk
        def full(path, *a, **k):
            if "step-00000002" in str(path):
                raise OSError(28, "No space left on device")
            return write(path, *a, **k)
        store.write_tensors = full
    try:
        root = disk / "checkpoints"
        t0 = time.perf_counter()
        try:
            _train(root, 2, size=512)
            detected, line = False, ""
        except OSError as e:
            detected, line = "No space left on device" in str(e) and "\n" not in str(e), str(e)
        detect = time.perf_counter() - t0
        lost = int(verify_checkpoint(root / "step-00000001") != [])
        step, recover = _resume(root, size=512)
    finally:
        store.write_tensors = write
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)
    return {"detected": detected, "recovered": step == 1, "lost": lost, "detect_s": detect, "recover_s": recover,
            "note": ("real 6 MB tmpfs: " if mounted else "ENOSPC injected: ") + line}


def corrupt_dcp_shard(tmp: Path) -> dict:
    import torch.distributed as dist

    from clusterlm.checkpoint.store import scan_checkpoints

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp / "store"), 1), rank=0, world_size=1)
    try:
        root = tmp / "checkpoints"
        _train(root, 2, distributed=True)
        _flip(next((root / "step-00000002" / "dcp").glob("*.distcp")))
        t0 = time.perf_counter()
        best, rejected = scan_checkpoints(root)
        detect = time.perf_counter() - t0
        step, recover = _resume(root, distributed=True)
    finally:
        dist.destroy_process_group()
    return {"detected": [p.name for p, _ in rejected] == ["step-00000002"], "recovered": step == 1, "lost": 0,
            "detect_s": detect, "recover_s": recover, "note": rejected[0][1][0] if rejected else ""}


def primary_deleted(tmp: Path) -> dict:
    root, mirror = tmp / "run" / "checkpoints", tmp / "mirror"
    _, ckpt, _, _ = _train(root, 3, mirror=str(mirror))
    ckpt.mirror.wait()  # a periodic save's copy runs on in the background
    shutil.rmtree(root)
    step, recover = _resume(root, mirror=str(mirror))
    return {"detected": True, "recovered": step == 3, "lost": 3 - step, "detect_s": None,
            "recover_s": recover, "note": f"resumed from the mirror's step {step}"}


def corrupt_mirror_copy(tmp: Path) -> dict:
    from clusterlm.checkpoint.store import scan_checkpoints

    root, mirror = tmp / "run" / "checkpoints", tmp / "mirror"
    _, ckpt, _, _ = _train(root, 3, mirror=str(mirror))
    ckpt.mirror.wait()
    _flip(mirror / "step-00000003" / "model.safetensors")  # the primary stays intact: one fault at a time
    t0 = time.perf_counter()
    _, rejected = scan_checkpoints(mirror)
    detect = time.perf_counter() - t0
    step, recover = _resume(root, mirror=str(mirror))
    return {"detected": [p.name for p, _ in rejected] == ["step-00000003"], "recovered": step == 3, "lost": 3 - step,
            "detect_s": detect, "recover_s": recover, "note": "the mirror's corrupt step 3 skipped, the primary's resumed"}


# ---- a NaN loss on one rank only -----------------------------------------------------------------------
NAN_AT_STEP = 3


def _nan_rank(rank: int, world: int, args: list[str]) -> dict:
    """`clusterlm train` on this rank (FSDP x2); rank 1 alone gets a NaN loss at step NAN_AT_STEP. Returns
    when (wall clock, one host) the NaN was made and when this rank's step ended with the step skipped."""
    from clusterlm.config import load_run_config
    from clusterlm.train.loop import Trainer

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    trainer = Trainer(load_run_config(None, args))
    fb, step, out = trainer.pm.forward_backward, trainer.train_step, {"skipped": [], "made": None, "seen": None}

    def forward_backward(*a, **k):
        loss = fb(*a, **k)
        if rank == 1 and trainer.state.step == NAN_AT_STEP - 1:
            out["made"] = time.time()
            return loss * float("nan")
        return loss

    def train_step():
        r = step()
        if trainer.state.bad_streak:
            out["skipped"].append(trainer.state.step)
            out["seen"] = out["seen"] or time.time()
        return r

    trainer.pm.forward_backward, trainer.train_step = forward_backward, train_step
    r = trainer.run()
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in trainer.model.parameters()]
    import torch
    return out | {"exit": r.exit_code, "step": r.step, "bad": trainer.state.bad_steps_total,
                  "checksum": float(sum(torch.sum(p.detach().double()) for p in params))}


def nan_one_rank(tmp: Path) -> dict:
    from tests.distributed.helpers import run_ranks

    steps = 6
    args = [f"--data.dir={tiny_data(tmp)}", f"--train.out_dir={tmp / 'run'}", "--model.preset=llama-nano",
            "--model.max_seq_len=32", "--train.seq_len=32", "--train.micro_batch_size=4", f"--train.max_steps={steps}",
            "--train.device=cpu", "--train.threads=1", "--train.eval_interval=0", "--checkpoint.interval=0",
            "--train.tensorboard=false", "--parallel.dp_shard=2", "--train.skip_memory_check=true",
            "--train.heartbeat_timeout=0"]
    r0, r1 = run_ranks(2, _nan_rank, args)
    same = r0["skipped"] == r1["skipped"] == [NAN_AT_STEP]
    detect = max(r0["seen"], r1["seen"]) - r1["made"] if same else None
    equal = r0["checksum"] == r1["checksum"]
    ok = same and r0["exit"] == r1["exit"] == 0 and r0["step"] == r1["step"] == steps and equal
    return {"detected": same, "recovered": ok, "lost": 0, "detect_s": detect, "recover_s": None,
            "note": f"NaN loss on rank 1 at step {NAN_AT_STEP}: skipped by both ranks at step(s) {r0['skipped']}/"
                    f"{r1['skipped']} (the loss is all-reduced before the check; 1 optimizer step skipped), "
                    f"{steps} of {steps} steps done, the weights equal on both ranks: {equal}"}


# ---- a node lost (namespaced Slurm cluster; root) ------------------------------------------------------
def node_loss_rows(trials: int) -> list[dict]:
    """Rows for a cut link and a killed node of tests/e2e/test_multinode.py's elastic HSDP 2 x 2 job
    (`--on-node-loss requeue`, the default) on scripts/testcluster.sh's 2-node cluster; with no cluster to
    be had, rows of 0 trials saying why. Recovered: requeued once (Slurm's restart count 1), completed,
    and the steps after the resumed checkpoint equal an uninterrupted world-size-2 run's."""
    from tests.e2e.test_multinode import ClusterUnavailable, node_loss_trial, testcluster

    names = {"cut": "node lost: its link cut (Slurm HSDP 2x2, --min-nodes 1, requeued)",
             "kill": "node lost: every process of it killed (Slurm HSDP 2x2, --min-nodes 1, requeued)"}
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp, testcluster(2) as cluster:
            from clusterlm.data.prepare import prepare

            (Path(tmp) / "t.txt").write_text(
                "".join(f"To be, or not to be, that is the question {i}\n" * 20 for i in range(20)))
            prepare([str(Path(tmp) / "t.txt")], Path(tmp) / "data", tokenizer="char", val_fraction=0.1)
            for fault, name in names.items():
                results = []
                for i in range(trials):
                    trial_dir = Path(tmp) / f"{fault}{i}"
                    trial_dir.mkdir()
                    try:
                        r = node_loss_trial(cluster, Path(tmp) / "data", trial_dir, fault, "requeue")
                    except (AssertionError, Exception) as e:  # noqa: BLE001 - pytest.fail too: one failed trial
                        r = {"state": f"failed: {type(e).__name__}: {str(e)[:300]}", "detect_s": None,
                             "recover_s": None, "step": None, "committed": None, "after": {}, "reference": None,
                             "lost": "?", "restarts": None}
                    ok = (r["state"] == "COMPLETED" and r["restarts"] == 1 and r["reference"] is not None
                          and r["reference"] == r["after"])
                    results.append({"detected": r["detect_s"] is not None, "recovered": ok,
                                    "lost": int(r["step"] is None or r["step"] < r["committed"]),
                                    "detect_s": r["detect_s"], "recover_s": r["recover_s"],
                                    "note": f"node {r['lost']} lost at step {r.get('at_step')}: job {r['state']} "
                                            f"after {r['restarts']} requeue(s), "
                                            f"resumed at world size 2 from step {r['step']} (committed: "
                                            f"{r['committed']}); steps after it equal an uninterrupted world-size-2 "
                                            f"run from that checkpoint: {ok}"})
                    print(json.dumps(results[-1]), flush=True)
                rows.append(_row(name, results))
    except ClusterUnavailable as e:
        rows = [{"fault": name, "trials": 0, "detected": 0, "recovered": 0, "data_lost": 0, "detect_s": None,
                 "recover_s": None, "example": f"not run: {e}"} for name in names.values()]
    return rows


# ---- a rank's core hogged: the straggler ---------------------------------------------------------------
def cpu_hogged_rank(tmp: Path) -> dict:
    """tests/distributed/test_heartbeat.py's run: 2 DDP ranks pinned to a core each, 3 busy loops on rank
    1's; detected when rank 0's "ranks" records name rank 1 (and never rank 0), timed from the hogs' start
    to the first record naming it (it takes 2 log intervals of 4 steps in a row)."""
    from tests.distributed.helpers import run_ranks
    from tests.distributed.test_heartbeat import _hogged_rank, hog_args

    cores = sorted(os.sched_getaffinity(0))[:2]
    if len(cores) < 2:
        return {"detected": False, "recovered": False, "lost": 0, "detect_s": None, "recover_s": None,
                "note": "not run: needs 2 cores"}
    out = tmp / "run"
    results = run_ranks(2, _hogged_rank, hog_args(tiny_data(tmp), out), cores)
    ranks = [r for r in train_records(out, kind="ranks") if len(r["step_s"]) == 2]
    named = [r for r in ranks if r["stragglers"] == [1]]
    wrong = any(0 in r["stragglers"] for r in ranks)
    last = ranks[-1] if ranks else {"step_s": {}, "wait_s": {}}
    ms = {k: {r: round(v * 1e3, 1) for r, v in last[k].items()} for k in ("step_s", "wait_s")}
    return {"detected": bool(named) and not wrong, "recovered": all(r["exit"] == 0 for r in results), "lost": 0,
            "detect_s": named[0]["time"] - results[1]["hogged_at"] if named else None, "recover_s": None,
            "note": f"rank 1 named in {len(named)} of {len(ranks)} comparisons, rank 0 in none: {not wrong}; "
                    f"last: compute ms/step {ms['step_s']}, gradient all-reduce wait ms/step {ms['wait_s']}"}


# ---- SIGKILL of a random rank under torchrun ----------------------------------------------------------
KILL_STEPS, KILL_CKPT_INTERVAL = 16, 2


def _tiny_run_args(data: Path, out: Path, steps: int = KILL_STEPS, interval: int = KILL_CKPT_INTERVAL) -> list[str]:
    """A llama-nano run of 2 DDP ranks on a char corpus: ~50 ms a step on 2 cores."""
    return [f"--data.dir={data}", f"--train.out_dir={out}", "--model.preset=llama-nano", "--model.max_seq_len=32",
            "--train.seq_len=32", "--train.micro_batch_size=4", f"--train.max_steps={steps}", "--train.device=cpu",
            "--train.threads=1", "--train.eval_interval=0", f"--checkpoint.interval={interval}",
            "--checkpoint.keep_last=2", "--train.tensorboard=false", "--parallel.dp_replicate=2",
            "--train.skip_memory_check=true", "--train.log_interval=1", "--train.resume=auto"]


def tiny_data(tmp: Path) -> Path:
    from clusterlm.data.prepare import prepare

    if not (tmp / "data" / "meta.json").exists():
        (tmp / "t.txt").write_text("".join(f"To be or not to be {i}\n" * 20 for i in range(40)))
        prepare([str(tmp / "t.txt")], tmp / "data", tokenizer="char", val_fraction=0.0)
    return tmp / "data"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_cmd(args: list[str], *, max_restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "clusterlm", "launch", "--nproc-per-node", "2", "--master-port", str(_free_port()),
            "--max-restarts", str(max_restarts), *args]


def launch_env() -> dict[str, str]:
    return os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def workers(launcher: int, restart: int = 0) -> dict[int, int]:
    """{rank: pid} of the trainer processes torchrun started under `launcher` in restart round `restart`."""
    found = {}
    for pid in _descendants(launcher):
        try:
            env = dict(kv.split("=", 1) for kv in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
        except OSError:
            continue
        if "RANK" in env and env.get("TORCHELASTIC_RESTART_COUNT", "0") == str(restart) and "LOCAL_RANK" in env:
            found[int(env["RANK"])] = pid
    return found


def train_records(out: Path, kind: str = "train") -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [r for r in (json.loads(ln) for ln in lines if ln.strip().endswith("}")) if r["kind"] == kind]


def final_state(out: Path, steps: int) -> dict:
    """The final checkpoint's model and optimizer tensors, flattened (DCP read back without a process group)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = out / "final.pt"
    dcp_to_torch_save(out / "checkpoints" / f"step-{steps:08d}" / "dcp", target)
    flat: dict = {}

    def walk(prefix: str, v) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}/{k}", x)
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(f"{prefix}/{i}", x)
        else:
            flat[prefix] = v
    walk("", torch.load(target, weights_only=False))
    return flat


def same_state(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def reference_run(tmp: Path) -> tuple[dict[int, float], dict]:
    """The uninterrupted run: ({step: loss}, final state)."""
    out = tmp / "reference"
    subprocess.run(launch_cmd(_tiny_run_args(tiny_data(tmp), out)), env=launch_env(), check=True,
                   capture_output=True, timeout=300)
    return {r["step"]: r["loss"] for r in train_records(out)}, final_state(out, KILL_STEPS)


def kill_trial(tmp: Path, reference: tuple[dict[int, float], dict], rank: int, step: int, frac: float) -> dict:
    """SIGKILL `rank` once step `step` is logged plus `frac` of a step; torchrun restarts the group."""
    from clusterlm.checkpoint.layout import read_latest

    ref_losses, ref_state = reference
    out = Path(tempfile.mkdtemp(prefix=f"kill-r{rank}-s{step}-", dir=tmp))  # trials may repeat (rank, step)
    proc = subprocess.Popen(launch_cmd(_tiny_run_args(tiny_data(tmp), out), max_restarts=1), env=launch_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (done := [r for r in train_records(out) if r["step"] >= step]):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the run ended before step {step}: {proc.stderr.read()[-2000:]}")
            time.sleep(0.005)
        time.sleep(frac * done[0]["step_time_s"])
        first, t_find = workers(proc.pid), time.monotonic()
        while len(first) < 2 and time.monotonic() - t_find < 10:  # a /proc read can race a process's start
            time.sleep(0.01)
            first = workers(proc.pid)
        if len(first) < 2:
            raise RuntimeError(f"found the workers {first} under torchrun {proc.pid}, not ranks 0 and 1")
        os.kill(first[rank], signal.SIGKILL)
        t_kill, wall_kill = time.monotonic(), time.time()
        while any("zombie" not in _state(pid) for pid in first.values()) and time.monotonic() - t_kill < 120:
            time.sleep(0.01)
        detect = time.monotonic() - t_kill
        detected = not any("zombie" not in _state(pid) for pid in first.values())
        committed = read_latest(out / "checkpoints")  # the group is gone: nothing commits any more
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    records = train_records(out)
    committed_step = int(committed.split("-")[1]) if committed else 0
    after = [r for r in records if r["time"] > wall_kill]
    resumed_from = after[0]["step"] - 1 if after else None
    recover = after[0]["time"] - wall_kill if after else None
    losses_equal = bool(records) and all(r["loss"] == ref_losses[r["step"]] for r in records)
    final_equal = rc == 0 and same_state(final_state(out, KILL_STEPS), ref_state)
    return {"rank": rank, "step": step, "frac": round(frac, 3), "rc": rc, "detected": detected,
            "committed": committed_step,
            "resumed_from": resumed_from, "losses_equal": losses_equal, "final_equal": final_equal,
            "records": len(records), "detect_s": round(detect, 3),
            "recover_s": None if recover is None else round(recover, 3),
            "resumed_line": ([ln for ln in err.splitlines() if "resumed from" in ln or "starting fresh" in ln]
                             or [""])[-1][-200:]}


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        return "zombie"


def sigkill_trials(n: int, seed: int) -> dict:
    """n seeded trials (one reference run shared); the row and each trial's record."""
    import random

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        reference = reference_run(Path(tmp))
        results = []
        for i in range(n):
            rank, step, frac = rng.randrange(2), rng.randint(1, KILL_STEPS - 1), rng.random()
            r = kill_trial(Path(tmp), reference, rank, step, frac)
            print(json.dumps({"trial": i} | r), flush=True)
            results.append(r)
    ok = [r["rc"] == 0 and r["resumed_from"] == r["committed"] and r["losses_equal"] and r["final_equal"]
          for r in results]
    return {"fault": f"SIGKILL of a random rank at a random step (torchrun --max-restarts 1, seed {seed})",
            "trials": n, "detected": sum(r["detected"] for r in results), "recovered": sum(ok),
            "data_lost": sum(r["resumed_from"] is None or r["resumed_from"] < r["committed"] for r in results),
            "detect_s": _median([r["detect_s"] for r in results]),
            "recover_s": _median([r["recover_s"] for r in results]),
            "example": f"rank {results[0]['rank']} killed at step {results[0]['step']}: resumed from step "
                       f"{results[0]['resumed_from']}, losses and final state equal the uninterrupted run: "
                       f"{ok[0]}", "seed": seed, "per_trial": results}


FAULTS: dict[str, Callable[[Path], dict]] = {
    f"rank 1 SIGSTOPped (heartbeat_timeout {HEARTBEAT_TIMEOUT:g} s)": hung_rank(1),
    f"rank 0 (store host) SIGSTOPped (heartbeat_timeout {HEARTBEAT_TIMEOUT:g} s)": hung_rank(0),
    "disk full during a save": disk_full,
    "corrupt shard of a DCP checkpoint": corrupt_dcp_shard,
    "primary checkpoints folder deleted (mirror on)": primary_deleted,
    "corrupt mirror copy": corrupt_mirror_copy,
    "NaN loss on one rank only (FSDP x2)": nan_one_rank,
    "a rank's core hogged by 3 busy loops (DDP x2): the straggler named": cpu_hogged_rank,
}


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def _row(name: str, results: list[dict]) -> dict:
    return {"fault": name, "trials": len(results), "detected": sum(r["detected"] for r in results),
            "recovered": sum(r["recovered"] for r in results), "data_lost": sum(r["lost"] for r in results),
            "detect_s": _median([r["detect_s"] for r in results]),
            "recover_s": _median([r["recover_s"] for r in results]), "example": results[0]["note"]}


def run(trials: int, only: str = "", kill_trials: int = 20, seed: int = SEED, node_trials: int = 1) -> list[dict]:
    rows = []
    for name, fault in FAULTS.items():
        if only and only not in name:
            continue
        results = []
        for _ in range(trials):
            with tempfile.TemporaryDirectory() as tmp:
                results.append(fault(Path(tmp)))
        rows.append(_row(name, results))
        print(json.dumps(rows[-1]), flush=True)
    if not only or only in "node lost":
        rows += node_loss_rows(node_trials)
    if not only or only in "sigkill":
        rows.append(sigkill_trials(kill_trials, seed))
    return rows


def table(rows: list[dict]) -> str:
    def s(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f} s"

    lines = ["| fault | trials | detected | recovered | data lost | time to detect | time to recover |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['fault']} | {r['trials']} | {r['detected']} | {r['recovered']} | {r['data_lost']} | "
              f"{s(r['detect_s'])} | {s(r['recover_s'])} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from common import machine, write_result

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--kill-trials", type=int, default=20, help="SIGKILL trials (one row)")
    parser.add_argument("--seed", type=int, default=SEED, help="the SIGKILL trials' seed")
    parser.add_argument("--node-trials", type=int, default=1, help="trials of each node-loss row (~2 min each)")
    parser.add_argument("--only", default="", help="run the rows whose name contains this (or 'sigkill'); "
                        "the other rows are kept from the last result")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rows = run(args.trials, args.only, args.kill_trials, args.seed, args.node_trials)
    this_run = {"command": " ".join(["benchmarks/faults.py", *sys.argv[1:]]), "date": time.strftime("%Y-%m-%d %H:%M"),
                "load_avg_1m_before": round(load_before, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2)}
    rows = [r | {"run": this_run} for r in rows]  # rows kept from an earlier --only run keep their own
    if args.only and RESULT.exists():  # replace the rows that ran, keep the others in their order
        new = {r["fault"].split(" (")[0]: r for r in rows}
        old = json.loads(RESULT.read_text())["rows"]
        kept = [new.pop(r["fault"].split(" (")[0], None) or r for r in old]
        rows = kept + list(new.values())
    result = {"rows": rows, "machine": machine(), "heartbeat_timeout_s": HEARTBEAT_TIMEOUT,
              "date": time.strftime("%Y-%m-%d"), "last_command": this_run["command"]}
    write_result(RESULT, json.dumps(result, indent=1) + "\n")
    doc = DOC.read_text(encoding="utf-8")
    head, rest = doc.split(BEGIN)
    _, tail = rest.split(END)
    write_result(DOC, f"{head}{BEGIN}\n{table(result['rows'])}\n{END}{tail}")
    print(table(result["rows"]))


if __name__ == "__main__":
    main()
