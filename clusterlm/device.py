"""Which device and which autocast dtype: one answer for `train`, `eval`, `generate` and `serve`.

    device = resolve_device("auto")                  # cuda when available, else cpu
    amp = autocast_dtype("auto", device)             # bf16 on GPUs that have it, None (fp32) on CPU
    with autocast(device, amp): loss = model(x)      # a no-op context when amp is None

Library code takes a torch.device from here; models/ never decides a device (shared ARCHITECTURE.md).
"""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from clusterlm.errors import ConfigError

DTYPE_NAMES = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str, what: str = "train.device") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is refused naming `what`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what}='cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def autocast_dtype(dtype: str, device: torch.device, what: str = "train.dtype") -> torch.dtype | None:
    """None = plain fp32. auto: bf16 on GPUs that support it (Ampere+), fp32 on CPU."""
    if dtype not in DTYPE_NAMES:
        raise ConfigError(f"{what}={dtype!r}; expected one of {', '.join(DTYPE_NAMES)}")
    if dtype == "fp32":
        return None
    if dtype == "auto":
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
