"""Which device and which autocast dtype: one answer for `train`, `eval`, `generate` and `serve`.

    device = resolve_device("auto")                  # cuda when available, else cpu
    amp = autocast_dtype("auto", device)             # bf16 on GPUs that have it, None (fp32) on CPU
    amp = autocast_dtype("bf16-native", device)      # ... and bf16 on CPUs with AMX or AVX512-BF16 too
    with autocast(device, amp): loss = model(x)      # a no-op context when amp is None

Library code takes a torch.device from here; models/ never decides a device (shared ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
from typing import ContextManager

import torch

from clusterlm.errors import ConfigError

DTYPE_NAMES = ("auto", "bf16-native", "fp32", "bf16", "fp16")


def resolve_device(name: str, what: str = "train.device", instead: str = "'auto' or 'cpu'") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is refused naming `what` and the
    values `instead` that the caller accepts."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what}='cuda' but no CUDA device is available; use {instead}")
    return torch.device(name)


@functools.cache
def cpu_flags() -> frozenset[str] | None:
    """This CPU's matmul features as the probe names them (cluster.parsers.MATMUL_FLAGS: avx512_bf16,
    amx_bf16, ...), read once from /proc/cpuinfo; None where it cannot be read (not Linux)."""
    from clusterlm.cluster.parsers import parse_cpuinfo

    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(parse_cpuinfo(f.read()).flags)
    except OSError:
        return None


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matmuls in hardware: AMX-BF16 tiles (Intel Sapphire Rapids
    and later) or AVX512-BF16 dot products (AMD Zen 4 and later, Intel Cooper Lake). False where
    /proc/cpuinfo cannot be read."""
    return bool({"amx_bf16", "avx512_bf16"} & (cpu_flags() or frozenset()))


def autocast_dtype(dtype: str, device: torch.device, what: str = "train.dtype") -> torch.dtype | None:
    """None = plain fp32. auto: bf16 on GPUs that support it (Ampere+), fp32 on CPU. bf16-native:
    as auto, and bf16 on CPUs with AMX or AVX512-BF16 too, where it is measured faster than fp32 for
    training (docs/training.md, "bf16 on a CPU": 1.41x on a Xeon with AMX, 1.46x on an AMD EPYC
    with AVX512-BF16); fp32 on other CPUs, whose bf16 matmuls are emulated."""
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"{what}={dtype!r}; expected one of {', '.join(DTYPE_NAMES)}")
    if dtype == "fp32":
        return None
    if dtype == "bf16-native" and device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else None
    if dtype in ("auto", "bf16-native"):
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    if dtype == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            name = torch.cuda.get_device_name(device)
            raise ConfigError(f"{what}='bf16' but {name} has no bf16 support; use 'fp16' or 'fp32'")
        return torch.bfloat16
    if device.type != "cuda":
        raise ConfigError(f"{what}='fp16' needs a CUDA device; on CPU use 'fp32' or 'bf16'")
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> ContextManager:
    """torch.autocast for `dtype` on `device`; a no-op context for None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# the values keep_freed_memory sets, and glibc's mallopt parameter numbers (malloc.h)
KEEP_FREED = {"M_TRIM_THRESHOLD": 1 << 30, "M_TOP_PAD": 64 << 20, "M_MMAP_THRESHOLD": 32 << 20}
_MALLOPT_PARAM = {"M_TRIM_THRESHOLD": -1, "M_TOP_PAD": -2, "M_MMAP_THRESHOLD": -3}


def keep_freed_memory() -> str | None:
    """Tell glibc's malloc to keep the memory a CPU training step frees for the next step instead of
    handing it back to the kernel (and faulting it in again, zeroed, a step later): free memory at
    the top of the heap is returned only above 1 GiB, the heap grows 64 MiB at a time, and blocks
    up to 32 MiB come from the heap rather than from mmap. What it buys, measured on a 2-core AMD
    EPYC (`clusterlm train lstm_shakespeare_cpu`, 1 thread): ~64 ms a step against ~85-97 ms
    (oneDNN's LSTM allocates and frees megabytes of workspace per call); the Transformer recipe did
    not change. The cost: the process keeps its high-water mark of freed memory (at most 1 GiB
    above what it uses), as PyTorch's CUDA caching allocator does on a GPU.

    Left alone (returns None) where the allocator is not glibc's, where the user set any
    MALLOC_*_ variable, or preloads another allocator (LD_PRELOAD: jemalloc, tcmalloc, ...).
    Returns a one-line note of what was set."""
    if any(k.startswith("MALLOC_") for k in os.environ) or os.environ.get("LD_PRELOAD"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: musl has no mallopt semantics to rely on)
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not all(mallopt(_MALLOPT_PARAM[k], v) == 1 for k, v in KEEP_FREED.items()):
        return None
    return "glibc malloc keeps freed memory (" + ", ".join(f"{k}={v >> 20} MiB" for k, v in KEEP_FREED.items()) + ")"
