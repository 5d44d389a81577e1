"""Refuse a run that cannot fit before any memory is allocated: the planner's prediction against
the memory this process may use.

    need = predicted_peak_bytes(mcfg, dims, micro_batch=12, seq_len=256, dtype="fp32", accum=1)
    check_memory(need, device)   # raises ConfigError when it cannot fit

Without the check a model too large for the machine (llama-70b in a 4 GB container) is killed by
the kernel's OOM killer with exit 137 and no message, after the model has been allocated.

Available memory: on CUDA the device's free memory (torch.cuda.mem_get_info); on CPU the smaller
of the cgroup limit (v2 memory.max, v1 memory.limit_in_bytes) and MemAvailable of /proc/meminfo.
The prediction is clusterlm.cluster.memory.estimate_memory (model state, activations for the run's
micro-batch, logits, buffers) for the run's parallel layout; docs/training.md lists its terms.
The check only refuses when the prediction alone exceeds what is available, so a run that fits is
never refused; `--train.skip_memory_check=true` skips it (e.g. when swap makes a slow run possible).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from clusterlm.cluster.memory import GIB, estimate_memory
from clusterlm.errors import ConfigError
from clusterlm.models.config import ModelConfig
from clusterlm.parallel.dims import ParallelDims

log = logging.getLogger(__name__)

CGROUP_FILES = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
MEMINFO = "/proc/meminfo"
# cgroup v1 reports "no limit" as a huge number (PAGE_COUNTER_MAX pages); anything above 2^60 is none
NO_LIMIT = 1 << 60


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    if not text.isdigit():  # "max" (cgroup v2: no limit)
        return None
    value = int(text)
    return value if value < NO_LIMIT else None


def _mem_available(meminfo: str = MEMINFO) -> int | None:
    try:
        for line in Path(meminfo).read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes this process can still allocate on `device`, where the figure comes from); None when
    nothing can be read (then no check is made)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {torch.cuda.get_device_name(device)}"
    found = []
    for f in CGROUP_FILES:
        if (v := _read_int(f)) is not None:
            found.append((v, f"cgroup limit ({f})"))
            break
    if (v := _mem_available()) is not None:
        found.append((v, f"MemAvailable ({MEMINFO})"))
    if not found:
        return None, "unknown"
    return min(found)


def amp_name(amp_dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")


def predicted_peak_bytes(model: ModelConfig, dims: ParallelDims, *, micro_batch: int, seq_len: int, dtype: str,
                         recompute: str = "none", accum: int = 1, ema: bool = False) -> float:
    """The planner's peak bytes per device for this run (fused AdamW, as the trainer builds it)."""
    return estimate_memory(model, dims, micro_batch=micro_batch, seq_len=seq_len, dtype=dtype, recompute=recompute,
                           grad_accum_steps=accum, optimizer_impl="fused", ema=ema).peak_bytes


def check_memory(need_per_process: float, device: torch.device, *, processes_per_pool: int = 1,
                 available: int | None = None, source: str = "") -> None:
    """Raise ConfigError when `processes_per_pool` processes of `need_per_process` bytes each cannot
    fit in the available memory. `available` (bytes) replaces the measured figure (tests).

    On CPU the ranks of one node share its RAM (processes_per_pool = ranks on this node); on CUDA
    each rank has its own device (1)."""
    if available is None:
        available, source = available_memory(device)
        if available is None:
            log.warning("memory check skipped: cannot read the available memory on %s", device)
            return
    need = need_per_process * processes_per_pool
    per = f" ({processes_per_pool} processes x {need_per_process / GIB:.2f} GiB)" if processes_per_pool > 1 else ""
    if need > available:
        raise ConfigError(
            f"the run needs about {need / GIB:.2f} GiB{per} on {device.type} (planner prediction: model state, "
            f"activations, logits) but only {available / GIB:.2f} GiB is available ({source or 'given'}); "
            "use a smaller model, micro_batch_size or seq_len, more devices, or "
            "--train.skip_memory_check=true to start anyway")
    log.info("memory: %.2f GiB predicted%s, %.2f GiB available (%s)", need / GIB, per, available / GIB,
             source or "given")
