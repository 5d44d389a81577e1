"""Helper processes for prepare's tokenize pass, and the signals around them.

    with worker_pool(3, start=True, warm=("clusterlm.tokenizer.kinds",)) as pool:
        future = pool.submit(encode_chunk_from_file, "tokenizer.json", texts, mask, "uint16")

The pool is spawned (not forked: the parent may hold threads and Rust thread pools) and started
at once, each helper importing `warm` while the parent is still scanning, so no core waits for a
helper to boot. Helpers ignore SIGINT/SIGTERM (the parent handles them and cancels the pool, so a
helper never dies half-way through a chunk because of them) and exit when their parent dies.
`terminate_as_interrupt` turns the parent's SIGTERM (Slurm's scancel) into a KeyboardInterrupt, so
it unwinds like Ctrl-C: the pool cancelled, the staging folder removed.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler, so the staging folder is cleaned up as on Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum}")


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises `Terminated` for the duration (only on the main thread, where Python lets a
    handler be installed; elsewhere this does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent died (e.g. SIGKILL) exits instead of waiting forever for work."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(1)


def _worker_init(parent: int) -> None:
    # One core per worker: the pool supplies the parallelism (and no Rust thread pool is shared
    # across processes). Set here, in the worker, before its first encode.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _warmup(modules: tuple[str, ...]) -> None:
    """Import what the work needs while the parent is still busy with something else."""
    for name in modules:
        importlib.import_module(name)


@contextlib.contextmanager
def worker_pool(workers: int, start: bool, warm: tuple[str, ...] = ()) -> Iterator[Any]:
    """A ProcessPoolExecutor of `workers` spawned helpers, started now (None when `start` is False).
    Cancelled without waiting on error or interrupt; waited for on a normal exit."""
    if not start:
        yield None
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(os.getpid(),))
    for _ in range(workers):  # each submit spawns a process while none is idle
        pool.submit(_warmup, warm)
    try:
        yield pool
    except BaseException:
        _kill_helpers(pool)  # before shutdown, which forgets the processes
        # the helpers are dead, so waiting is short; it lets the executor close its queues, whose
        # semaphores the resource tracker otherwise reports as leaked after 'interrupted'
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


def _kill_helpers(pool: Any) -> None:
    """End the helpers now: cancelling leaves each running chunk to finish (a long BPE encode: many
    seconds), and the interpreter joins them at exit, so Ctrl-C would wait for them. Their partial
    work is discarded with the staging folder anyway. SIGKILL, since they ignore SIGINT/SIGTERM.
    ProcessPoolExecutor.kill_workers (Python 3.14) where it exists, else its process table."""
    kill = getattr(pool, "kill_workers", None)
    if kill is not None:
        kill()
        return
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            proc.kill()


@contextlib.contextmanager
def one_core() -> Iterator[None]:
    """Run `tokenizers` sequentially in this process for the duration (it reads the variable per call)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
