"""Single-process checkpoint store: atomic, hashed, resumable; safetensors + JSON + TOML only.

    path = save_checkpoint(run / "checkpoints", step, model_state=model.state_dict(),
                           optimizer_state=opt.state_dict(), train_state={"step": step, ...},
                           rng=capture_rng_state(), config_toml=to_toml(cfg), tokenizer_path=tok)
    ckpt = load_checkpoint(find_latest_valid(run / "checkpoints"))  # or resolve_checkpoint("runs/x")
    restore_rng_state(ckpt.rng)

Layout (format_version 1, described in docs/checkpoints.md):

    RUN_DIR/checkpoints/latest                  text: name of the newest committed folder
    RUN_DIR/checkpoints/step-00000100/
        model.safetensors      model state dict; tied (aliased) tensors stored once
        optimizer.safetensors  optimizer tensors, keys like "state.3.exp_avg"   (if an optimizer)
        optimizer.json         the rest of the optimizer state dict (param_groups, ...)
        rng.safetensors        torch CPU (and CUDA) generator states
        train_state.json       the caller's dict, plus "rng": python `random` and numpy states
        config.toml            the resolved run config (text given by the caller)
        tokenizer.json         copied from the caller's path (optional)
        manifest.json          written last: sha256 and size of every other file

A save writes into a hidden `.step-N.partial-XXXX` folder, fsyncs each file, writes the manifest,
renames the folder into place, and only then moves `latest` and prunes to the last K. One writer per
checkpoints folder: a save removes leftovers (`.partial`, `.old`, `.deleting`) of earlier crashed saves.
`commit_folder`, `write_manifest` and `move_latest` are public so distributed saves can reuse them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import secrets
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from clusterlm.checkpoint.flatten import flatten_state, unflatten_state
from clusterlm.errors import CheckpointError
from clusterlm.fsutil import atomic_write_text, fsync_dir, sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
STEP_RE = re.compile(r"^step-(\d+)$")
STALE_RE = re.compile(r"^\.(step-\d+\.(partial|old|deleting)-.+|latest\..*\.tmp)$")
# files load_checkpoint needs; optimizer.* and tokenizer.json are optional
REQUIRED_FILES = ("model.safetensors", "rng.safetensors", "train_state.json", "config.toml")
# a distributed (DCP) step folder, clusterlm/checkpoint/distributed.py: its dcp/ shards instead
DCP_DIR = "dcp"
DIST_REQUIRED_FILES = ("train_state.json", "config.toml", f"{DCP_DIR}/.metadata")
RNG_KEY = "rng"  # reserved key in train_state.json
ALIASES_META = "clusterlm.aliases"  # safetensors header: JSON {alias name: stored name}
ORDER_META = "clusterlm.keys"  # safetensors header: JSON list of all names in the caller's order


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    model_state: dict[str, torch.Tensor]  # CPU tensors; tied names map to the same tensor object
    optimizer_state: dict | None  # torch.optim state_dict, ready for load_state_dict
    train_state: dict  # the caller's dict, without the reserved "rng" key
    rng: dict  # as returned by capture_rng_state(); pass to restore_rng_state
    config_toml: str
    tokenizer_path: Path | None


def step_name(step: int) -> str:
    return f"step-{step:08d}"


# ---- RNG ------------------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Python `random`, numpy's global RNG, torch CPU and (if CUDA is initialised) every CUDA device.

    Returns {"python": {...}, "numpy": {...}} as JSON-friendly values and {"torch_cpu": uint8 Tensor,
    "cuda": [uint8 Tensor, ...]} as tensors; `save_checkpoint(rng=...)` stores it, `restore_rng_state`
    takes it (or `Checkpoint.rng`) back.
    """
    version, internal, gauss_next = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": version, "state": list(internal), "gauss_next": gauss_next},
        "numpy": _np_to_json(np_state),
        "torch_cpu": torch.get_rng_state(),
    }
    # an uninitialised CUDA has only its default state; querying it would create a context for nothing
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the generators captured by `capture_rng_state` (only those present in `state`)."""
    unknown = set(state) - {"python", "numpy", "torch_cpu", "cuda"}
    if unknown:
        raise ValueError(f"unknown RNG state keys {sorted(unknown)}; expected python, numpy, torch_cpu, cuda")
    if "python" in state:
        p = state["python"]
        random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "numpy" in state:
        np.random.set_state(state["numpy"])  # accepts the dict form with a list key
    if "torch_cpu" in state:
        torch.set_rng_state(state["torch_cpu"].to("cpu", torch.uint8))
    if "cuda" in state:
        cuda = [t.to("cpu", torch.uint8) for t in state["cuda"]]
        if not torch.cuda.is_available():
            log.warning("checkpoint holds %d CUDA RNG states but CUDA is unavailable; not restored", len(cuda))
        else:
            if len(cuda) != torch.cuda.device_count():
                log.warning("checkpoint holds %d CUDA RNG states, this machine has %d devices; restoring %d",
                            len(cuda), torch.cuda.device_count(), min(len(cuda), torch.cuda.device_count()))
            for i, t in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(t, i)


def _np_to_json(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _np_to_json(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


# ---- low-level writers (module-level so tests can inject crashes) ------------------------------------------
OS_ERRNO_RE = re.compile(r"os error (\d+)")


def _named_os_error(e: BaseException, path: Path) -> OSError | None:
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


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    try:
        with open(path, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if (named := _named_os_error(e, path)) is not None:
            raise named from e
        raise


def _write_json(path: Path, obj: Any) -> None:
    _write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode("utf-8"))


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], what: str) -> None:
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
    except (SafetensorError, OSError) as e:
        if (named := _named_os_error(e, path)) is not None:
            raise named from e
        raise
    _fsync_file(path)


def _open_safetensors(path: Path) -> Any:
    # pread: tensors own their memory, so nothing depends on the file after loading (a later save may
    # replace or prune the folder); older safetensors lack `backend` and memory-map (copy-on-write)
    try:
        return safe_open(str(path), framework="pt", device="cpu", backend="pread")
    except TypeError:
        return safe_open(str(path), framework="pt", device="cpu")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
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


# ---- manifest, commit, latest (reusable by distributed saves) -----------------------------------------------
def write_manifest(folder: Path, step: int) -> dict:
    """Hash every file under `folder` (recursively, except the manifest) and write manifest.json last."""
    from clusterlm import __version__

    folder = Path(folder)
    files = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(folder).as_posix()] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    manifest = {"format_version": FORMAT_VERSION, "step": step, "files": files,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "clusterlm_version": __version__}
    _write_json(folder / MANIFEST, manifest)
    fsync_dir(folder)
    return manifest


def commit_folder(tmp: Path, final: Path) -> None:
    """Rename a complete `tmp` folder to `final` durably; an existing `final` is replaced.

    Replacing: the old folder is renamed away to a hidden name, the new one renamed in, the old one
    deleted. A crash between the two renames leaves no visible `final` (readers fall back to an older
    step); it never leaves a half-written one.
    """
    tmp, final = Path(tmp), Path(final)
    fsync_dir(tmp)
    if final.exists():
        old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            os.rename(old, final)
            raise
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
        fsync_dir(final.parent)


def move_latest(ckpt_root: Path, name: str) -> None:
    """Point `ckpt_root/latest` at folder `name` (atomic replace of a one-line text file)."""
    atomic_write_text(Path(ckpt_root) / LATEST, name + "\n")


def read_latest(ckpt_root: Path) -> str | None:
    try:
        return (Path(ckpt_root) / LATEST).read_text(encoding="utf-8").strip() or None
    except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
        return None


def step_folders(ckpt_root: Path) -> list[Path]:
    """Visible step-N folders, oldest first by step number (hidden partial folders are ignored)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_RE.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: (int(STEP_RE.match(p.name)[1]), p.name))


def remove_stale(ckpt_root: Path) -> None:
    """Delete leftovers of interrupted saves (hidden .partial/.old/.deleting folders, latest temp files)."""
    for p in Path(ckpt_root).iterdir():
        if STALE_RE.match(p.name):
            log.info("removing %s left by an interrupted save", p)
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def _delete_folder(p: Path) -> None:
    # hide it first, so a crash in the middle of rmtree leaves nothing that looks like a checkpoint
    hidden = p.with_name(f".{p.name}.deleting-{secrets.token_hex(4)}")
    os.rename(p, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def prune(ckpt_root: Path, keep_last: int, just_saved: Path) -> None:
    """Keep the `keep_last` newest step folders (by step); drop folders newer than the one just saved.

    A folder with a higher step than `just_saved` belongs to the run before it was resumed from an
    earlier checkpoint; left in place it would be picked by `find_latest_valid` instead of the new one.
    """
    saved = int(STEP_RE.match(just_saved.name)[1])
    kept = []
    for p in step_folders(ckpt_root):
        if int(STEP_RE.match(p.name)[1]) > saved:
            log.warning("removing %s: it is later than the step just saved (%d), left by a run that was "
                        "resumed from an earlier checkpoint", p, saved)
            _delete_folder(p)
        else:
            kept.append(p)
    for p in kept[: max(len(kept) - keep_last, 0)]:
        log.info("removing old checkpoint %s (keep_last=%d)", p, keep_last)
        _delete_folder(p)


# ---- save ------------------------------------------------------------------------------------------------
def save_checkpoint(ckpt_root: Path, step: int, *, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict | None, train_state: dict, config_toml: str,
                    tokenizer_path: Path | None = None, rng: dict | None = None, keep_last: int = 3) -> Path:
    """Write checkpoint `step` atomically under `ckpt_root`; returns the committed step folder.

    `rng` is what `capture_rng_state()` returned; when None it is captured here (call it at the
    point whose RNG state a resume should see). Tensors may be on any device; they are copied to CPU.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} must be an int >= 0")
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be >= 1")
    if RNG_KEY in train_state:
        raise ValueError(f"train_state must not contain the reserved key '{RNG_KEY}' (RNG states are stored there)")
    _check_json(train_state, "train_state")
    if tokenizer_path is not None and not Path(tokenizer_path).is_file():
        raise FileNotFoundError(f"tokenizer_path={tokenizer_path} is not a file")
    if rng is None:
        rng = capture_rng_state()
    rng_skeleton, rng_tensors = flatten_state(rng)
    opt_skeleton, opt_tensors = flatten_state(optimizer_state) if optimizer_state is not None else (None, {})

    root = Path(ckpt_root)
    if not root.is_dir():
        root.mkdir(parents=True)
        fsync_dir(root.parent)  # the new checkpoints/ entry itself must survive a power cut
    remove_stale(root)
    name = step_name(step)
    tmp = _make_hidden_dir(root, f".{name}.partial-")
    try:
        _write_tensors(tmp / "model.safetensors", model_state, "model_state")
        if optimizer_state is not None:
            _write_tensors(tmp / "optimizer.safetensors", opt_tensors, "optimizer_state")
            _write_json(tmp / "optimizer.json", {"format_version": FORMAT_VERSION, "state_dict": opt_skeleton})
        _write_tensors(tmp / "rng.safetensors", rng_tensors, "rng")
        _write_json(tmp / "train_state.json", {**train_state, RNG_KEY: rng_skeleton})
        _write_bytes(tmp / "config.toml", config_toml.encode("utf-8"))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
            _fsync_file(tmp / "tokenizer.json")
        write_manifest(tmp, step)
        commit_folder(tmp, root / name)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written: no step folder without its manifest
        if (named := _named_os_error(e, tmp)) is not None:
            raise named from e
        raise
    try:
        move_latest(root, name)
    except OSError as e:  # the step folder is committed and complete; `latest` keeps naming the previous one
        if (named := _named_os_error(e, root / LATEST)) is not None:
            raise named from e
        raise
    prune(root, keep_last, root / name)
    log.info("saved checkpoint %s", root / name)
    return root / name


def _make_hidden_dir(parent: Path, prefix: str) -> Path:
    while True:  # os.mkdir honours the umask (tempfile.mkdtemp would make it private, 0700)
        p = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            p.mkdir()
            return p
        except FileExistsError:
            continue


def _check_json(x: Any, where: str) -> None:
    """Reject what json.dumps would silently change (non-str keys) or refuse (non-JSON types)."""
    if isinstance(x, dict):
        for k, v in x.items():
            if not isinstance(k, str):
                raise ValueError(f"{where} has key {k!r} ({type(k).__name__}); JSON keys must be str")
            _check_json(v, f"{where}[{k!r}]")
    elif isinstance(x, (list, tuple)):  # tuples come back as lists
        for i, v in enumerate(x):
            _check_json(v, f"{where}[{i}]")
    elif not (x is None or isinstance(x, (str, int, float, bool))):
        raise ValueError(f"{where} is a {type(x).__name__}; train_state must hold only JSON values "
                         "(dict, list, str, int, float, bool, None)")


# ---- verify and find -------------------------------------------------------------------------------------
def _read_manifest(folder: Path) -> tuple[dict | None, list[str]]:
    mf = folder / MANIFEST
    if not folder.is_dir():
        return None, [f"{folder} is not a directory"]
    if not mf.is_file():
        return None, [f"{MANIFEST} is missing (the save did not finish)"]
    try:
        m = json.loads(mf.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, [f"{MANIFEST} is unparsable: {e}"]
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict) or not isinstance(m.get("step"), int):
        return None, [f"{MANIFEST} lacks a 'files' object or an integer 'step'"]
    if m.get("format_version") != FORMAT_VERSION:
        return None, [f"{MANIFEST} has format_version={m.get('format_version')!r}; "
                      f"this clusterlm reads {FORMAT_VERSION}"]
    for name, info in m["files"].items():
        if not (isinstance(info, dict) and isinstance(info.get("sha256"), str) and isinstance(info.get("bytes"), int)):
            return None, [f"{MANIFEST} entry for {name!r} lacks 'sha256' or 'bytes'"]
    return m, []


def _check_file(folder: Path, name: str, info: dict) -> str | None:
    p = folder / name
    if not p.is_file():
        return f"{name} is missing"
    size = p.stat().st_size
    if size != info["bytes"]:
        return f"{name} has {size} bytes, the manifest says {info['bytes']} (truncated or overwritten)"
    digest = sha256_file(p)
    if digest != info["sha256"]:
        return f"{name} sha256 {digest[:12]}... does not match the manifest's {info['sha256'][:12]}..."
    return None


def required_files(folder: Path) -> tuple[str, ...]:
    """The files a step folder of its format must list: distributed (has dcp/) or single-process."""
    return DIST_REQUIRED_FILES if (Path(folder) / DCP_DIR).is_dir() else REQUIRED_FILES


def verify_checkpoint(path: Path | str, required: Iterable[str] | None = None) -> list[str]:
    """Problems found in a step folder (empty list: every file matches the manifest's size and sha256).

    `required` defaults to what the folder's format needs (`required_files`)."""
    folder = Path(path)
    required = required_files(folder) if required is None else required
    m, problems = _read_manifest(folder)
    if m is None:
        return problems
    match = STEP_RE.match(folder.name)
    if match and int(match[1]) != m["step"]:
        problems.append(f"folder name says step {int(match[1])}, the manifest says step {m['step']}")
    problems += [f"{name} is not listed in the manifest" for name in required if name not in m["files"]]
    for name, info in m["files"].items():
        if (problem := _check_file(folder, name, info)) is not None:
            problems.append(problem)
    return problems


def _scan(ckpt_root: Path) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    rejected = []
    for p in reversed(step_folders(ckpt_root)):
        problems = verify_checkpoint(p)
        if not problems:
            return p, rejected
        log.warning("skipping corrupt checkpoint %s: %s", p, "; ".join(problems))
        rejected.append((p, problems))
    return None, rejected


def scan_checkpoints(ckpt_root: Path | str) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    """(newest step folder that verifies or None, [(newer folder that failed, its problems), ...])."""
    return _scan(Path(ckpt_root))


def describe_rejected(rejected: list[tuple[Path, list[str]]]) -> str:
    """One short line per rejected checkpoint: its folder name and its first problem."""
    lines = []
    for q, probs in rejected:
        more = f" (and {len(probs) - 1} more problems)" if len(probs) > 1 else ""
        lines.append(f"  {q.name}: {probs[0]}{more}")
    return "\n".join(lines)


def find_latest_valid(ckpt_root: Path | str) -> Path | None:
    """The step folder with the highest step whose files verify; corrupt ones are skipped with a warning.

    `latest` is only a cross-check: a crash between commit and pointer move leaves it one save behind,
    and a damaged newest folder must not be trusted just because the pointer names it.
    """
    root = Path(ckpt_root)
    best, _ = _scan(root)
    hint = read_latest(root)
    if best is not None and hint is not None and hint != best.name:
        log.warning("%s/latest names %s but the newest valid checkpoint is %s; using %s", root, hint, best.name,
                    best.name)
    return best


def resolve_checkpoint(arg: str | Path) -> Path:
    """A step folder from a run directory, a checkpoints folder or a step folder (verified)."""
    p = Path(arg).expanduser()
    usage = "pass a run directory, its checkpoints/ folder or a step-NNNNNNNN folder"
    if not p.exists():
        raise CheckpointError(f"{p} does not exist; {usage}")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file; {usage}")
    if STEP_RE.match(p.name) or (p / MANIFEST).exists() or (p / "model.safetensors").exists():
        problems = verify_checkpoint(p)
        if problems:
            raise CheckpointError(f"{p} is not a valid checkpoint: {'; '.join(problems)}")
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    best, rejected = _scan(root)
    if best is not None:
        return best
    if not rejected:
        raise CheckpointError(f"no checkpoints in {root} (no step-NNNNNNNN folders); {usage}")
    raise CheckpointError(f"no valid checkpoint in {root}; found {len(rejected)}, all rejected:\n"
                          f"{describe_rejected(rejected)}")


# ---- load ------------------------------------------------------------------------------------------------
def load_checkpoint(path: Path | str, *, verify: bool = True) -> Checkpoint:
    """Read a step folder (hash-verified unless verify=False); tensors come back on CPU."""
    folder = Path(path)
    if verify:
        problems = verify_checkpoint(folder)
        if problems:
            raise CheckpointError(f"{folder} is not a valid checkpoint: {'; '.join(problems)}")
    m, _ = _read_manifest(folder)
    match = STEP_RE.match(folder.name)
    try:
        train_state = json.loads((folder / "train_state.json").read_text(encoding="utf-8"))
        config_toml = (folder / "config.toml").read_text(encoding="utf-8")
        opt_json = folder / "optimizer.json"
        opt_doc = json.loads(opt_json.read_text(encoding="utf-8")) if opt_json.exists() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read checkpoint {folder}: {e}") from e
    if m is not None:
        step = m["step"]
    elif match:
        step = int(match[1])
    elif isinstance(train_state.get("step"), int):
        step = train_state["step"]
    else:
        raise CheckpointError(f"{folder}: no manifest, no step-N folder name and no 'step' in train_state.json")
    try:
        rng = unflatten_state(train_state.pop(RNG_KEY, {}), _read_tensors(folder / "rng.safetensors"))
        optimizer_state = None
        if opt_doc is not None:
            optimizer_state = unflatten_state(opt_doc["state_dict"], _read_tensors(folder / "optimizer.safetensors"))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}: inconsistent RNG or optimizer state: {e}") from e
    tok = folder / "tokenizer.json"
    return Checkpoint(path=folder, step=step, model_state=_read_tensors(folder / "model.safetensors"),
                      optimizer_state=optimizer_state, train_state=train_state, rng=rng, config_toml=config_toml,
                      tokenizer_path=tok if tok.is_file() else None)


def load_model_weights(path: Path | str) -> dict[str, torch.Tensor]:
    """Just the model state dict of a step folder (model.safetensors checked against the manifest)."""
    folder = Path(path)
    m, problems = _read_manifest(folder)
    if m is None:
        raise CheckpointError(f"{folder} is not a valid checkpoint: {'; '.join(problems)}")
    info = m["files"].get("model.safetensors")
    problem = "model.safetensors is not listed in the manifest" if info is None else \
        _check_file(folder, "model.safetensors", info)
    if problem is not None:
        raise CheckpointError(f"{folder} is not a valid checkpoint: {problem}")
    return _read_tensors(folder / "model.safetensors")
