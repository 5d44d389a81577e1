"""clusterlm.device.keep_freed_memory: glibc's malloc told to keep freed memory in CPU training, left
alone where the user chose allocator settings (docs/training.md, "CPU allocator").

    .venv/bin/python -m pytest -q tests/unit/test_keep_freed_memory.py
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from clusterlm.device import KEEP_FREED, keep_freed_memory


def _glibc() -> bool:
    return platform.libc_ver()[0] == "glibc"


@pytest.mark.parametrize("var, value", [("MALLOC_ARENA_MAX", "2"), ("MALLOC_TRIM_THRESHOLD_", "0"),
                                        ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")])
def test_user_allocator_settings_are_left_alone(monkeypatch, var, value):
    """Any MALLOC_*_ variable or a preloaded allocator: nothing is set, None is returned."""
    monkeypatch.setenv(var, value)
    assert keep_freed_memory() is None


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _held_and_freed(libc: ctypes.CDLL) -> tuple[int, int]:
    """(blocks mmapped while four 8 MiB blocks are held, MiB free in the heap after they are freed)."""
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    h0 = libc.mallinfo2().hblks
    blocks = [libc.malloc(8 << 20) for _ in range(4)]
    assert all(blocks)
    h1 = libc.mallinfo2().hblks
    for b in reversed(blocks):
        libc.free(b)
    return h1 - h0, libc.mallinfo2().fordblks >> 20


@pytest.mark.skipif(not _glibc(), reason="glibc's mallopt only: this Python does not run on glibc")
def test_glibc_keeps_freed_blocks_in_the_heap(monkeypatch):
    """On glibc the note names each value, and 8 MiB blocks then come from the heap and stay there
    when freed (by default glibc mmaps them and unmaps them on free: measured 4 mmapped, 0 MiB kept).
    Run in a fresh interpreter: the setting is for the whole process."""
    code = (
        "import ctypes, ctypes.util, json, sys\n"
        "sys.path.insert(0, {here!r})\n"
        "from test_keep_freed_memory import _held_and_freed\n"
        "from clusterlm.device import keep_freed_memory\n"
        "note = keep_freed_memory()\n"
        "print(json.dumps([note, *_held_and_freed(ctypes.CDLL(ctypes.util.find_library('c')))]))\n"
    ).format(here=str(Path(__file__).parent))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    note, mmapped, kept_mib = json.loads(out.stdout.strip().splitlines()[-1])
    assert note is not None and "glibc malloc keeps freed memory" in note
    for k, v in KEEP_FREED.items():
        assert f"{k}={v >> 20} MiB" in note
    assert mmapped == 0 and kept_mib >= 32, (mmapped, kept_mib)
