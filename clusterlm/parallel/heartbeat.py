"""Hung and slow ranks: a heartbeat per rank through the process group's store, and a straggler check.

    hb = Heartbeat.for_process_group(timeout_s=60, on_lost=exit_rank_lost)  # after init_process_group
    hb.start()
    ...each step: hb.progress(step, local_step_seconds)
    ...every log interval on rank 0: for line in stragglers.update(hb.read_all()): log.warning(line)
    hb.stop()

Each rank's thread writes `heartbeat/<rank>` = {seq, step, host, pid, steps, busy_s} into a clone of
the default process group's store (its own connection: a TCPStore under torchrun or Slurm) every
timeout/10 seconds (0.2 to 5 s). Rank 0 reads every rank's key, every other rank reads the next
rank's (rank N-1 watches rank 0), so each rank is watched at least once at O(N) store traffic.
A watched rank whose `seq` has not changed for `timeout_s` (measured on the watcher's own monotonic
clock: no clock agreement between hosts is needed) is named with its host and last step, and
`on_lost` is called with that line. A SIGSTOPped process, a dead node and a cut link all look like
this. When the store itself stops answering for `timeout_s` (it lives in rank 0's process outside
torchrun, so a hung rank 0 takes it along), the line names rank 0 and the store's address.

The heartbeat is a liveness check of the process, not of its main thread: a main thread stuck while
the process lives (a deadlock in Python) is left to the process group's own timeout.

Stragglers: `busy_s` is the rank's own time in its steps up to the step's closing all-reduce (the
time every rank then waits for the slowest there is excluded); `wait_s` is the part of it spent
waiting in the gradient all-reduce after the rank's own backward pass ended (`GradSyncTimer`, a DDP
comm hook). Inside that all-reduce every rank waits for the slowest, so the fast ranks wait long and
the slow one hardly at all: `busy_s - wait_s` (compute) separates a rank slowed uniformly (a CPU hog
on its core) by all of its extra time, not only by its local share. `Stragglers` reports a rank whose
mean compute over a log interval is >= `ratio` x the median of the other ranks for `windows`
intervals in a row. Under FSDP/TP/PP (no comm hook) wait_s is 0 and only local work separates the ranks.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from clusterlm.errors import EXIT_RANK_LOST

log = logging.getLogger(__name__)

PREFIX = "heartbeat"


def _interval(timeout_s: float) -> float:
    return min(5.0, max(0.2, timeout_s / 10))


@dataclass(frozen=True)
class Beat:
    """One rank's latest heartbeat as read from the store."""

    rank: int
    seq: int
    step: int
    host: str
    pid: int
    steps: int  # steps timed so far (cumulative)
    busy_s: float  # seconds of step time before the closing all-reduce, over those steps (cumulative)
    wait_s: float = 0.0  # of busy_s, seconds spent waiting in the gradient all-reduce (cumulative)

    @property
    def compute_s(self) -> float:
        return self.busy_s - self.wait_s


class Heartbeat:
    """A daemon thread per rank: write this rank's beat, watch the ranks it is responsible for."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, timeout_s: float, *,
                 on_lost: Callable[[str], None], store_where: str = "the process group's store",
                 clock: Callable[[], float] = time.monotonic) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s} must be > 0")
        self.store, self.rank, self.world_size, self.timeout_s = store, rank, world_size, timeout_s
        self.on_lost, self.store_where, self.clock = on_lost, store_where, clock
        self.interval_s = _interval(timeout_s)
        self.host = socket.gethostname()
        self.watched = list(range(world_size)) if rank == 0 else [(rank + 1) % world_size]
        self.watched = [r for r in self.watched if r != rank]
        self._seq = 0
        self._step, self._steps, self._busy, self._wait = 0, 0, 0.0, 0.0
        self._lock = threading.Lock()
        self._beats: dict[int, Beat] = {}
        self._stop = threading.Event()

    @classmethod
    def for_process_group(cls, timeout_s: float, *, on_lost: Callable[[str], None]) -> Heartbeat:
        """A heartbeat on its own connection to the default process group's store (already initialised)."""
        from clusterlm.parallel.launch import read_env

        env = read_env()
        store = dist.distributed_c10d._get_default_store().clone()  # a new connection: never blocks the trainer's
        # one slow answer is retried; only timeout_s without any answer counts
        store.set_timeout(datetime.timedelta(seconds=max(1.0, timeout_s / 4)))
        where = (f"the job's store at {env.master_addr}:{env.master_port}" if env.distributed
                 else "the process group's store")
        return cls(dist.PrefixStore(PREFIX, store), dist.get_rank(), dist.get_world_size(), timeout_s,
                   on_lost=on_lost, store_where=where)

    # ---- main thread -----------------------------------------------------------------------------
    def progress(self, step: int, busy_s: float, wait_s: float = 0.0) -> None:
        """Record a finished step, its time before the closing all-reduce and the part of it spent waiting
        in the gradient all-reduce (no store I/O: the thread publishes it)."""
        with self._lock:
            self._step, self._steps = step, self._steps + 1
            self._busy, self._wait = self._busy + busy_s, self._wait + min(wait_s, busy_s)

    def read_all(self) -> dict[int, Beat]:
        """The latest beats this rank has read (rank 0: every rank's, its own included)."""
        with self._lock:
            return dict(self._beats)

    def start(self) -> None:
        now = self.clock()
        self._changed = {r: now for r in self.watched}  # a rank that never beats is named after timeout_s too
        self._last_seq: dict[int, int] = {}
        self._store_ok = now
        # two threads: a store call to a stopped host can block for good (TCPStore's client retries), so
        # the deadlines are checked apart from the I/O
        self._threads = [threading.Thread(target=self._io, name=f"heartbeat-io-rank{self.rank}", daemon=True),
                         threading.Thread(target=self._check, name=f"heartbeat-rank{self.rank}", daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop both threads (the I/O one is left behind if a store call hangs: it is a daemon)."""
        self._stop.set()
        for t in getattr(self, "_threads", []):
            t.join(timeout=self.interval_s + 1.0)

    # ---- the threads -------------------------------------------------------------------------------
    def _beat(self) -> Beat:
        self._seq += 1
        with self._lock:
            return Beat(self.rank, self._seq, self._step, self.host, os.getpid(), self._steps, self._busy,
                        self._wait)

    def _io(self) -> None:
        keys = [str(r) for r in self.watched]
        while not self._stop.is_set():
            try:
                beat = self._beat()
                self.store.set(str(self.rank), json.dumps(beat.__dict__))
                present = [k for k in keys if self.store.check([k])] if len(self._last_seq) < len(keys) else keys
                values = self.store.multi_get(present) if present else []
            except Exception as e:  # noqa: BLE001 - a refused connection or a timeout: retried; _check keeps time
                self._store_error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
                self._stop.wait(self.interval_s)
                continue
            now = self.clock()
            beats = {self.rank: beat}
            with self._lock:
                self._store_ok = now
                for v in values:
                    b = Beat(**json.loads(v))
                    beats[b.rank] = b
                    if self._last_seq.get(b.rank) != b.seq:
                        self._last_seq[b.rank], self._changed[b.rank] = b.seq, now
                self._beats.update(beats)
            self._stop.wait(self.interval_s)

    def _check(self) -> None:
        while not self._stop.wait(self.interval_s / 2):
            now = self.clock()
            with self._lock:
                store_silent = now - self._store_ok
                stale = [(r, now - self._changed[r], self._beats.get(r)) for r in self.watched
                         if now - self._changed[r] >= self.timeout_s]
                host0 = f" on host {self._beats[0].host}" if 0 in self._beats else ""
            if store_silent >= self.timeout_s:
                why = getattr(self, "_store_error", "no answer")
                self._lost(f"{self.store_where} (hosted by rank 0{host0} outside torchrun) did not answer for "
                           f"{store_silent:.0f} s, seen from rank {self.rank} on {self.host} ({why}): rank 0 or "
                           "the store's host is hung or unreachable")
            elif stale:
                line = "; ".join(self._describe(*s) for s in stale)
                if store_silent >= 2 * self.interval_s:  # rank 0 stopped just before its next beat: the store
                    # it hosts went quiet a little after its last beat, so the beat deadline passes first
                    why = getattr(self, "_store_error", "no answer")
                    line += (f"; {self.store_where} (hosted by rank 0{host0}) did not answer for the last "
                             f"{store_silent:.0f} s either ({why})")
                self._lost(line)
            if self._stop.is_set():
                return

    def _describe(self, rank: int, silent_s: float, beat: Beat | None) -> str:
        if beat is None:
            return f"rank {rank} never sent a heartbeat within {silent_s:.0f} s (seen from rank {self.rank} on {self.host})"
        return (f"rank {rank} on host {beat.host} (pid {beat.pid}) sent no heartbeat for {silent_s:.0f} s "
                f"(heartbeat_timeout {self.timeout_s:g} s; its last step {beat.step}; seen from rank {self.rank} "
                f"on {self.host}): stopped, dead, or its link is down")

    def _lost(self, line: str) -> None:
        if not self._stop.is_set():  # stop() called meanwhile: the run ended, no alarm
            self._stop.set()
            self.on_lost(line)


def exit_rank_lost(line: str) -> None:
    """Log `line`, note EXIT_RANK_LOST for `clusterlm launch`, and end this process with it now.

    The main thread is blocked in a collective that will never complete (gloo would wait its 600 s
    timeout); os._exit is the one way out, as torch's own NCCL watchdog tears the process down
    (TORCH_NCCL_ASYNC_ERROR_HANDLING). The launcher (torchrun, srun) then stops the other ranks and
    `--train.resume=auto` continues from the last committed checkpoint."""
    from clusterlm.fsutil import atomic_write_text
    from clusterlm.parallel.launch import EXIT_FILE_ENV

    log.error("hung rank: %s; exiting with %d (resume with --train.resume=auto)", line, EXIT_RANK_LOST)
    if path := os.environ.get(EXIT_FILE_ENV):  # any rank may notice (record_exit_code writes on local rank 0 only)
        try:
            atomic_write_text(path, f"{EXIT_RANK_LOST}\n")
        except OSError:
            pass
    for h in logging.getLogger().handlers:
        h.flush()
    sys.stderr.flush()
    os._exit(EXIT_RANK_LOST)


class GradSyncTimer:
    """Per step, the seconds this rank waits for DDP's gradient all-reduce once its own backward is done.

    Installed as DDP's comm hook (`DistributedDataParallel.register_comm_hook`, before the first forward),
    doing what DDP's built-in hook does (average: scale the bucket by 1/world size, all-reduce the sum)
    and noting when each bucket is launched and when its all-reduce completes. The last bucket is
    launched when the rank's backward has produced its last gradient; from then on it only waits, until
    the last all-reduce completes, which is when the slowest rank has launched its last bucket too. So
    wait = (last completion) - (last launch): long on a fast rank, about the transfer time on the
    slowest. `take()` returns it for the step just done and starts the next."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._launched = self._done = None  # type: float | None

    @classmethod
    def install(cls, ddp: torch.nn.Module) -> GradSyncTimer:
        timer = cls()
        group = ddp.process_group
        scale = 1.0 / group.size()

        def hook(_state, bucket):  # noqa: ANN001, ANN202 - DDP checks real annotations; these would be strings
            buf = bucket.buffer()
            buf.mul_(scale)  # what DDP's own reducer does without a hook: grads * (1 / world size), then sum
            with timer._lock:
                timer._launched = timer.clock()
            fut = dist.all_reduce(buf, group=group, async_op=True).get_future()

            def done(f: torch.futures.Future) -> torch.Tensor:
                with timer._lock:
                    now = timer.clock()
                    timer._done = now if timer._done is None else max(timer._done, now)
                return f.value()[0]

            return fut.then(done)

        ddp.register_comm_hook(None, hook)
        return timer

    def take(self) -> float:
        """Seconds waited in this step's gradient all-reduce (0 for a step without one: no_sync, none yet)."""
        with self._lock:
            launched, done, self._launched, self._done = self._launched, self._done, None, None
        return max(0.0, done - launched) if launched is not None and done is not None else 0.0


class Stragglers:
    """Rank 0's check, once per log interval, of the ranks' mean compute time per step over that interval
    (step time before the closing all-reduce less the wait in the gradient all-reduce)."""

    def __init__(self, ratio: float = 1.5, windows: int = 2) -> None:
        self.ratio, self.windows = ratio, windows
        self._prev: dict[int, Beat] = {}
        self._streak: dict[int, int] = {}
        self.waits: dict[int, float] = {}  # the last interval's mean gradient all-reduce wait per rank

    def update(self, beats: dict[int, Beat]) -> tuple[dict[int, float], dict[int, str]]:
        """({rank: mean compute seconds per step over the window}, {straggler's rank: a line naming it})."""
        means, self.waits = {}, {}
        for r, b in beats.items():
            p = self._prev.get(r)
            if p is not None and b.steps > p.steps:
                means[r] = (b.compute_s - p.compute_s) / (b.steps - p.steps)
                self.waits[r] = (b.wait_s - p.wait_s) / (b.steps - p.steps)
        self._prev = dict(beats)
        if len(means) < 2:
            return means, {}
        lines = {}
        for r, m in sorted(means.items()):
            # against the others' median, not all ranks': with 2 ranks that would take a 3x gap to reach 1.5x
            median = statistics.median(v for q, v in means.items() if q != r)
            slow = median > 0 and m >= self.ratio * median
            self._streak[r] = self._streak.get(r, 0) + 1 if slow else 0
            if slow and self._streak[r] >= self.windows:
                waited = (f"; it waits {self.waits[r] * 1e3:.1f} ms/step in the gradient all-reduce, the others "
                          f"{statistics.median(w for q, w in self.waits.items() if q != r) * 1e3:.1f} ms"
                          if any(self.waits.values()) else "")
                lines[r] = (f"straggler: rank {r} on host {beats[r].host} computes {m * 1e3:.1f} ms/step, "
                            f"{m / median:.1f}x the median {median * 1e3:.1f} ms of the other ranks "
                            f"({self._streak[r]} log intervals in a row{waited})")
        return means, lines
