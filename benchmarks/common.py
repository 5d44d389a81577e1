"""Shared by the benchmark scripts: what machine a figure came from.

    from common import cpu_model      # benchmarks/ is the script's folder, so on sys.path
    from common import machine        # {"cpu", "gpu", "cpus", "load_avg_1m", "torch"} for a result file
    from common import refuse         # bad input (missing data, a bad argument): one line, exit 2
    from common import positive_int   # argparse type= for counts that must be >= 1 (repeats, threads, ...)
    from common import write_result   # a result file (JSON, markdown) written whole or not at all
    from common import check_checkpoint  # a checkpoint argument refused at once, one line, exit 2
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from pathlib import Path
from typing import NoReturn

from clusterlm.cluster.parsers import parse_cpuinfo


def refuse(message: str) -> NoReturn:
    """Stop on bad input before anything is measured or written: `message` (what is wrong, what is valid)
    as one line on stderr and exit status 2, as the clusterlm CLI does (sys.exit(str) exits 1)."""
    print(message, file=sys.stderr)
    raise SystemExit(2)


def write_result(path: str | Path, text: str) -> None:
    """Write a result file atomically (clusterlm.fsutil: a temporary name, then a rename), its folder made
    first: a Ctrl-C or a full disk never leaves a half-written JSON under benchmarks/results/ in place of
    the last good one."""
    from clusterlm.fsutil import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)


def save_figure(fig: object, path: str | Path, dpi: int) -> None:
    """A matplotlib figure saved as PNG through write_result's rename (savefig writes in place)."""
    import io

    from clusterlm.fsutil import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def check_checkpoint(flag: str, path: str | Path | None) -> None:
    """Refuse (one line, exit 2) a checkpoint argument that names no checkpoint, before anything is made
    or measured: loading it later gave a CheckpointError traceback, in some scripts after set-up."""
    if path is None or path == "":
        return
    from clusterlm.checkpoint.store import resolve_checkpoint
    from clusterlm.errors import ClusterlmError

    try:
        resolve_checkpoint(str(path))
    except ClusterlmError as e:
        refuse(f"{flag} {path}: {e}")


def positive_int(text: str) -> int:
    """argparse `type=` for a count that must be at least 1 (--repeats 0 gave a median of nothing, --threads 0
    torch's own error, after seconds of set-up): argparse's one-line usage error and exit 2 instead."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give a whole number >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not >= 1")
    return value


def positive_float(text: str) -> float:
    """argparse `type=` for a duration or size that must be a finite number > 0 (seconds, minutes)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a number > 0") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number > 0")
    return value


def gpu_name() -> str | None:
    """The first CUDA device's name as torch prints it, None without one (torch imported here only)."""
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def torch_version() -> str | None:
    """torch's version string, None where torch is not installed."""
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def machine() -> dict[str, object]:
    """What every result file records so that figures from different machines are never compared as one:
    the CPU model, the GPU name (None on a CPU-only machine), logical CPUs, the 1-minute load average and
    the torch version (the same machine is another baseline under another torch)."""
    import os

    return {"cpu": cpu_model(), "gpu": gpu_name(), "cpus": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
            "torch": torch_version()}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo through the probe's parser), else what platform says."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text()).model
    except OSError:
        return platform.processor() or platform.machine() or "unknown"
