"""The fault catalogue, run on purpose: each fault made N times, detected, recovered from, timed.

    .venv/bin/python benchmarks/faults.py            # ~1 min on 2 cores; root mounts a real tmpfs
    .venv/bin/python benchmarks/faults.py --trials 1

Writes benchmarks/results/faults.json and the table between the FAULTS markers of docs/reliability.md.
Columns: trials; detected (the fault was noticed, by the right rank or check); recovered (a resume
from what was left loaded a valid checkpoint, or, for a hung rank, the job ended with the resumable
exit code 76); data lost (committed checkpoints lost: must be 0); time to detect and to recover
(median seconds). The same faults are asserted in tests/distributed/test_heartbeat.py,
tests/unit/test_mirror.py and tests/e2e/test_faults.py (which also has the NaN-on-one-rank case).
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


FAULTS: dict[str, Callable[[Path], dict]] = {
    f"rank 1 SIGSTOPped (heartbeat_timeout {HEARTBEAT_TIMEOUT:g} s)": hung_rank(1),
    f"rank 0 (store host) SIGSTOPped (heartbeat_timeout {HEARTBEAT_TIMEOUT:g} s)": hung_rank(0),
    "disk full during a save": disk_full,
    "corrupt shard of a DCP checkpoint": corrupt_dcp_shard,
    "primary checkpoints folder deleted (mirror on)": primary_deleted,
    "corrupt mirror copy": corrupt_mirror_copy,
}


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def run(trials: int) -> dict:
    rows = []
    for name, fault in FAULTS.items():
        results = []
        for _ in range(trials):
            with tempfile.TemporaryDirectory() as tmp:
                results.append(fault(Path(tmp)))
        rows.append({"fault": name, "trials": trials, "detected": sum(r["detected"] for r in results),
                     "recovered": sum(r["recovered"] for r in results), "data_lost": sum(r["lost"] for r in results),
                     "detect_s": _median([r["detect_s"] for r in results]),
                     "recover_s": _median([r["recover_s"] for r in results]), "example": results[0]["note"]})
        print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows}


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
    from common import machine

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    result = run(args.trials) | {"machine": machine(), "heartbeat_timeout_s": HEARTBEAT_TIMEOUT,
                                 "date": time.strftime("%Y-%m-%d")}
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    doc = DOC.read_text(encoding="utf-8")
    head, rest = doc.split(BEGIN)
    _, tail = rest.split(END)
    DOC.write_text(f"{head}{BEGIN}\n{table(result['rows'])}\n{END}{tail}", encoding="utf-8")
    print(table(result["rows"]))


if __name__ == "__main__":
    main()
