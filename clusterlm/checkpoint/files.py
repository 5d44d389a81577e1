"""Durable file writers and the safetensors reader of the checkpoint store (single-process and DCP).

    write_tensors(tmp / "model.safetensors", model.state_dict(), "model_state")  # fsynced, aliases once
    write_json(tmp / "train_state.json", {...})                                   # exclusive create + fsync
    state = read_tensors(folder / "model.safetensors")                            # CPU, aliases restored

Every writer creates a new file (never overwrites), fsyncs it, and turns an I/O failure that lost
its file name (ENOSPC from `f.write`, safetensors' "os error 28") into an OSError naming the path.
Only safetensors and JSON: nothing is pickled.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from clusterlm.errors import CheckpointError
from clusterlm.fsutil import plain_mode

ALIASES_META = "clusterlm.aliases"  # safetensors header: JSON {alias name: stored name}
ORDER_META = "clusterlm.keys"  # safetensors header: JSON list of all names in the caller's order
OS_ERRNO_RE = re.compile(r"os error (\d+)")


def named_os_error(e: BaseException, path: Path) -> OSError | None:
    """An OSError naming `path` for an I/O failure that lost its file name: `f.write` on a full disk
    raises ENOSPC without one, safetensors wraps it as "I/O error: ... (os error 28)". None when `e`
    is not an I/O failure (a bug, re-raised as it is)."""
    if isinstance(e, OSError):
        if e.filename is not None:
            return None
        return OSError(e.errno, e.strerror or str(e), str(path))
    if isinstance(e, SafetensorError) and (m := OS_ERRNO_RE.search(str(e))):
        errno_ = int(m[1])
        return OSError(errno_, os.strerror(errno_), str(path))
    return None


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist) with `data`, fsynced."""
    try:
        with open(path, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if (named := named_os_error(e, path)) is not None:
            raise named from e
        raise


def write_json(path: Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Save to safetensors on CPU; exact aliases (tied weights) are stored once and listed in the header."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_of: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}['{name}'] is a {type(t).__name__}, not a torch.Tensor")
        if t.is_meta:
            raise ValueError(f"{what}['{name}'] is on the meta device: it holds no data to save")
        t = t.detach()
        if t.numel() > 0:  # empty tensors may all report data_ptr 0
            view = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if view in first_of:
                aliases[name] = first_of[view]
                continue
            first_of[view] = name
        c = t.to("cpu").contiguous()
        # safetensors refuses tensors that share memory or view a larger buffer: give each its own
        if c.numel() > 0 and (c.untyped_storage().nbytes() != c.numel() * c.element_size()
                              or c.untyped_storage().data_ptr() in storages):
            c = c.clone()
        if c.numel() > 0:
            storages.add(c.untyped_storage().data_ptr())
        out[name] = c
    meta = {"format": "pt", ALIASES_META: json.dumps(aliases), ORDER_META: json.dumps(list(tensors))}
    try:
        save_file(out, str(path), metadata=meta)
        plain_mode(path)  # safetensors creates it 0600: a container's or a colleague's reader needs 0644
    except (SafetensorError, OSError) as e:
        if (named := named_os_error(e, path)) is not None:
            raise named from e
        raise
    fsync_file(path)


def _open_safetensors(path: Path) -> Any:
    # pread: tensors own their memory, so nothing depends on the file after loading (a later save may
    # replace or prune the folder); older safetensors lack `backend` and memory-map (copy-on-write)
    try:
        return safe_open(str(path), framework="pt", device="cpu", backend="pread")
    except TypeError:
        return safe_open(str(path), framework="pt", device="cpu")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file on CPU, restoring aliases as the same tensor object and the saved order."""
    try:
        with _open_safetensors(path) as f:
            meta = f.metadata() or {}
            stored = {k: f.get_tensor(k) for k in f.keys()}
        aliases = json.loads(meta.get(ALIASES_META, "{}"))
        order = json.loads(meta.get(ORDER_META, "null")) or list(stored)
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    for name, target in aliases.items():
        if target not in stored:
            raise CheckpointError(f"{path}: alias '{name}' points to missing tensor '{target}'")
        stored[name] = stored[target]
    return {k: stored[k] for k in order if k in stored} | stored
