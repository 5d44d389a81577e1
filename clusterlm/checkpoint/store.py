"""Single-process checkpoint store: atomic, hashed, resumable; safetensors + JSON + TOML only.

    path = save_checkpoint(run / "checkpoints", step, model_state=model.state_dict(),
                           optimizer_state=opt.state_dict(), train_state={"step": step, ...},
                           rng=capture_rng_state(), config_toml=to_toml(cfg), tokenizer_path=tok)
    ckpt = load_checkpoint(find_latest_valid(run / "checkpoints"))  # or resolve_checkpoint("runs/x")
    restore_rng_state(ckpt.rng)

A training run does not call this module directly: clusterlm.checkpoint.manager (the checkpointer)
picks this store or the distributed one. Folder names, `latest` and pruning live in layout.py, the
RNG capture in rng.py, the durable file writers in files.py.

Layout of a step folder (format_version 1, described in docs/checkpoints.md):

    RUN_DIR/checkpoints/step-00000100/
        model.safetensors      model state dict; tied (aliased) tensors stored once
        optimizer.safetensors  optimizer tensors, keys like "state.3.exp_avg"   (if an optimizer)
        optimizer.json         the rest of the optimizer state dict (param_groups, ...)
        rng.safetensors        torch CPU (and CUDA) generator states
        train_state.json       the caller's dict, plus "rng": python `random` and numpy states
        config.toml            the resolved run config (text given by the caller)
        tokenizer.json         copied from the caller's path (optional)
        chat_template.jinja    the chat template, copied from beside that tokenizer file when it has
                               one, or given as text (optional; clusterlm.generate.template)
        quantization.json      written by `clusterlm quantize` (optional; older checkpoints kept it
                               as a "quantization" entry of train_state.json, still read)
        ensemble.json          written by `clusterlm ensemble` (optional): the weights are N classifiers
                               of config.toml's shape, `members.i.*` (clusterlm.models.ensemble)
        manifest.json          written last: sha256 and size of every other file

A save writes into a hidden `.step-N.partial-XXXX` folder, fsyncs each file, writes the manifest,
renames the folder into place, and only then moves `latest` and prunes to the last K. One writer per
checkpoints folder: a save removes leftovers (`.partial`, `.old`, `.deleting`) of earlier crashed saves.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from clusterlm.checkpoint.files import fsync_file, named_os_error, read_tensors, write_bytes, write_json, write_tensors
from clusterlm.checkpoint.flatten import flatten_state, unflatten_state
from clusterlm.checkpoint.layout import (
    BEST,
    LATEST,
    STEP_RE,
    commit_folder,
    make_hidden_dir,
    move_latest,
    prune,
    read_latest,
    remove_stale,
    step_folders,
    step_name,
    step_of,
)
from clusterlm.checkpoint.rng import capture_rng_state
from clusterlm.errors import CheckpointError
from clusterlm.fsutil import fsync_dir, sha256_file
from clusterlm.generate.template import TEMPLATE_FILE

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# files load_checkpoint needs; optimizer.* and tokenizer.json are optional
REQUIRED_FILES = ("model.safetensors", "rng.safetensors", "train_state.json", "config.toml")
# a distributed (DCP) step folder, clusterlm/checkpoint/distributed.py: its dcp/ shards instead
DCP_DIR = "dcp"
DIST_REQUIRED_FILES = ("train_state.json", "config.toml", f"{DCP_DIR}/.metadata")
RNG_KEY = "rng"  # reserved key in train_state.json
QUANTIZATION = "quantization.json"  # {"method", "group_size", "modules", "source"} (clusterlm.optimize.quantize)
ENSEMBLE = "ensemble.json"  # {"members": N, "combine", "sources"} (clusterlm.finetune.ensemble)


@dataclass(frozen=True)
class CheckpointInfo:
    """What a step folder says about itself, without its tensors."""

    path: Path
    step: int
    train_state: dict  # the caller's dict, without the reserved "rng" key
    config_toml: str
    tokenizer_path: Path | None


@dataclass(frozen=True)
class Checkpoint(CheckpointInfo):
    model_state: dict[str, torch.Tensor]  # CPU tensors; tied names map to the same tensor object
    optimizer_state: dict | None  # torch.optim state_dict, ready for load_state_dict
    rng: dict  # as returned by capture_rng_state(); pass to restore_rng_state


# ---- manifest (reused by distributed saves) ---------------------------------------------------------------
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
    write_json(folder / MANIFEST, manifest)
    fsync_dir(folder)
    return manifest


# ---- save ------------------------------------------------------------------------------------------------
def _checkpoints_root(folder: Path) -> bool:
    """Whether `folder` is a run's checkpoints folder: step folders and the `latest` pointer (or the name
    checkpoints), so that an unrelated folder holding a file called latest is not taken for one."""
    return (folder.is_dir() and ((folder / LATEST).is_file() or folder.name == "checkpoints")
            and bool(step_folders(folder)))


def _checkpoint_folder(folder: Path) -> bool:
    """Whether `folder` is one checkpoint: its manifest and run config (not any folder with a manifest.json)."""
    return (folder / MANIFEST).is_file() and (folder / "config.toml").is_file()


def check_outside_checkpoints(out: str | Path, flag: str = "--out", kind: str = "folder") -> None:
    """Refuse an output folder `out` inside a run's checkpoints folder, or inside one checkpoint (a step
    folder, checkpoints/best): there it would be taken for part of a checkpoint (its manifest does not
    list it) or deleted when checkpoint rotation prunes that step. For every command that writes a
    folder of its own (export, convert, quantize, prune, ensemble). A file where a folder of `out` should be
    is refused here too (fsutil.check_output_dir). `kind`: what `out` is, for the message ("file": eval's
    --out and --samples, which would also overwrite a checkpoint's own files there)."""
    from clusterlm.fsutil import check_output_dir

    if kind == "folder":
        check_output_dir(out, flag)  # a file in the way, an unwritable folder: said before any work
    target = Path(out).resolve()  # symlinks and ".." as the writes would follow them
    for folder in (target, *target.parents):
        if _checkpoint_folder(folder) or _checkpoints_root(folder):
            root = folder if _checkpoints_root(folder) else folder.parent
            raise FileExistsError(f"{flag} {out} is inside {'the checkpoints folder' if folder == root else 'the checkpoint'} "
                                  f"{folder}, where checkpoint rotation may delete it or it may be taken for part of a "
                                  f"checkpoint; choose a {kind} outside {root}")


def check_new_run_dir(out: str | Path) -> Path:
    """`out` for a command that writes a new run (convert, quantize, prune, ensemble): refused when
    its checkpoints folder already holds a checkpoint. An empty one (what a failed earlier attempt,
    e.g. on a full disk, leaves) does not block the retry."""
    out = Path(out)
    if str(out) in ("", "."):
        raise FileExistsError("--out is empty; give a new run directory")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder; give a new run directory")
    if out.is_dir() and ((out / "manifest.json").exists() or any(out.glob("step-*"))):
        # the new run would nest inside a checkpoint (or a checkpoints folder), where resolving that
        # folder then finds the nested copy instead of its own steps
        raise FileExistsError(f"--out {out} is a checkpoint or a checkpoints folder, not a run directory; give a new "
                              "run directory")
    check_outside_checkpoints(out)
    ckpts = out / "checkpoints"
    if ckpts.exists() and (not ckpts.is_dir() or any(not c.name.startswith(".") for c in ckpts.iterdir())):
        raise FileExistsError(f"{ckpts} already exists; choose a new --out")
    return out


def save_checkpoint(ckpt_root: Path, step: int, *, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict | None, train_state: dict, config_toml: str,
                    tokenizer_path: Path | None = None, rng: dict | None = None, keep_last: int = 3,
                    quantization: dict | None = None, chat_template: str | None = None,
                    ensemble: dict | None = None) -> Path:
    """Write checkpoint `step` atomically under `ckpt_root`; returns the committed step folder.

    `rng` is what `capture_rng_state()` returned; when None it is captured here (call it at the
    point whose RNG state a resume should see). Tensors may be on any device; they are copied to CPU.
    `quantization` (quantized weights only) is written to quantization.json, `ensemble` (several
    classifiers' weights, `members.i.*`) to ensemble.json. The chat template
    (chat_template.jinja) is `chat_template` (its source text) when given, else the file beside
    `tokenizer_path` when there is one.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step={step!r} must be an int >= 0")
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be >= 1")
    if RNG_KEY in train_state:
        raise ValueError(f"train_state must not contain the reserved key '{RNG_KEY}' (RNG states are stored there)")
    _check_json(train_state, "train_state")
    if quantization is not None:
        _check_json(quantization, "quantization")
    if ensemble is not None:
        _check_json(ensemble, "ensemble")
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
    tmp = make_hidden_dir(root, f".{name}.partial-")
    try:
        write_tensors(tmp / "model.safetensors", model_state, "model_state")
        if optimizer_state is not None:
            write_tensors(tmp / "optimizer.safetensors", opt_tensors, "optimizer_state")
            write_json(tmp / "optimizer.json", {"format_version": FORMAT_VERSION, "state_dict": opt_skeleton})
        write_tensors(tmp / "rng.safetensors", rng_tensors, "rng")
        write_json(tmp / "train_state.json", {**train_state, RNG_KEY: rng_skeleton})
        write_bytes(tmp / "config.toml", config_toml.encode("utf-8"))
        if quantization is not None:
            write_json(tmp / QUANTIZATION, quantization)
        if ensemble is not None:
            write_json(tmp / ENSEMBLE, ensemble)
        copy_tokenizer_files(tokenizer_path, tmp, chat_template)
        write_manifest(tmp, step)
        commit_folder(tmp, root / name)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written: no step folder without its manifest
        named = named_os_error(e, root / name)
        if named is None and isinstance(e, OSError) and str(e.filename or "").startswith(str(tmp) + os.sep):
            # a file of the hidden staging folder: named as it would have been in the step folder
            named = OSError(e.errno, e.strerror or str(e), str(root / name) + str(e.filename)[len(str(tmp)):])
        if named is not None:
            raise named from e
        raise
    try:
        move_latest(root, name)
    except OSError as e:  # the step folder is committed and complete; `latest` keeps naming the previous one
        if (named := named_os_error(e, root / LATEST)) is not None:
            raise named from e
        raise
    prune(root, keep_last, root / name)
    log.info("saved checkpoint %s", root / name)
    return root / name


def copy_tokenizer_files(tokenizer_path: Path | None, folder: Path, chat_template: str | None = None) -> None:
    """Copy `tokenizer_path` to folder/tokenizer.json and the chat template (`chat_template` text, or
    TEMPLATE_FILE beside the tokenizer file) to folder/TEMPLATE_FILE, fsynced (the DCP saver too)."""
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, folder / "tokenizer.json")
        fsync_file(folder / "tokenizer.json")
        beside = Path(tokenizer_path).parent / TEMPLATE_FILE
        if chat_template is None and beside.is_file():
            shutil.copyfile(beside, folder / TEMPLATE_FILE)
            fsync_file(folder / TEMPLATE_FILE)
    if chat_template is not None:
        write_bytes(folder / TEMPLATE_FILE, chat_template.encode("utf-8"))


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
    warn_if_latest_differs(root, best)
    return best


def warn_if_latest_differs(root: Path, newest: Path | None) -> None:
    """Warn when `root/latest` names another folder than `newest`, the newest valid one that is used
    (a crash between commit and pointer move, a folder deleted or damaged by hand)."""
    hint = read_latest(root)
    if newest is None or hint is None or hint == newest.name:
        return
    why = "which does not exist" if not (root / hint).is_dir() else "which is older or failed verification"
    log.warning("%s/latest names %s, %s; using the newest valid checkpoint, %s", root, hint, why, newest.name)


def resolve_checkpoint(arg: str | Path) -> Path:
    """A step folder from a run directory, a checkpoints folder, a step folder or the `best`
    pointer of a checkpoints folder (checkpoint.keep_best), verified."""
    p = Path(arg).expanduser()
    usage = "pass a run directory, its checkpoints/ folder, a step-NNNNNNNN folder or checkpoints/best"
    if p.name == BEST and p.is_file():
        name = read_latest(p.parent, BEST)
        if name is None or not STEP_RE.match(name) or not (p.parent / name).is_dir():
            raise CheckpointError(f"{p} names {name!r}, which is not a step folder in {p.parent}; {usage}")
        p = p.parent / name
    if not p.exists():
        if p.name == BEST and p.parent.is_dir():  # the user named the pointer; the usage line would name it back
            raise CheckpointError(f"{p} does not exist: a run writes checkpoints/best only with checkpoint.keep_best = "
                                  f"true; pass {p.parent} for its newest checkpoint or a step-NNNNNNNN folder")
        raise CheckpointError(f"{p} does not exist; {usage}")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file; {usage}")
    if (p / "config.json").is_file() and not (p / MANIFEST).exists() and not (p / "config.toml").exists():
        # was "not a valid checkpoint: manifest.json is missing (the save did not finish)"
        raise CheckpointError(f"{p} is a Hugging Face folder (config.json), not a clusterlm checkpoint; convert it "
                              f"first: clusterlm convert --from-hf {p} --out RUN_DIR")
    if STEP_RE.match(p.name) or (p / MANIFEST).exists() or (p / "model.safetensors").exists():
        problems = verify_checkpoint(p)
        if problems:
            raise CheckpointError(f"{p} is not a valid checkpoint: {'; '.join(problems)}")
        return p
    root = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    best, rejected = _scan(root)
    if best is not None:
        warn_if_latest_differs(root, best)
        return best
    if not rejected and (p / "adapter.json").is_file():  # a LoRA fine-tune's RUN/adapter folder
        raise CheckpointError(f"{p} is a LoRA adapter folder (adapter.json), not a checkpoint: pass the fine-tune's run "
                              f"directory ({p.parent}, adapters merged at load), or serve the adapter on its base "
                              f"with `clusterlm serve NAME={p}`")
    if not rejected:
        raise CheckpointError(f"no checkpoints in {root} (no step-NNNNNNNN folders); {usage}")
    raise CheckpointError(f"no valid checkpoint in {root}; found {len(rejected)}, all rejected:\n"
                          f"{describe_rejected(rejected)}")


# ---- load ------------------------------------------------------------------------------------------------
def _read_info(folder: Path) -> tuple[CheckpointInfo, Any]:
    """(the folder's CheckpointInfo, the RNG skeleton kept in train_state.json)."""
    m, _ = _read_manifest(folder)
    try:
        train_state = json.loads((folder / "train_state.json").read_text(encoding="utf-8"))
        config_toml = (folder / "config.toml").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read checkpoint {folder}: {e}") from e
    if m is not None:
        step = m["step"]
    elif step_of(folder) is not None:
        step = step_of(folder)
    elif isinstance(train_state.get("step"), int):
        step = train_state["step"]
    else:
        raise CheckpointError(f"{folder}: no manifest, no step-N folder name and no 'step' in train_state.json")
    rng_skeleton = train_state.pop(RNG_KEY, {})
    tok = folder / "tokenizer.json"
    return CheckpointInfo(path=folder, step=step, train_state=train_state, config_toml=config_toml,
                          tokenizer_path=tok if tok.is_file() else None), rng_skeleton


def read_info(path: Path | str) -> CheckpointInfo:
    """Step, train_state, config text and tokenizer of a step folder, without reading its tensors
    (the caller has verified the folder, e.g. through resolve_checkpoint)."""
    return _read_info(Path(path))[0]


def read_quantization(path: Path | str) -> dict | None:
    """The quantization a step folder was written with ({"method", "group_size", "modules", ...}), or
    None for float weights. Read from quantization.json, else (checkpoints written before it existed)
    from the "quantization" entry of train_state.json."""
    folder = Path(path)
    f = folder / QUANTIZATION
    try:
        if f.is_file():
            q = json.loads(f.read_text(encoding="utf-8"))
        elif (folder / "train_state.json").is_file():
            f = folder / "train_state.json"
            q = json.loads(f.read_text(encoding="utf-8")).get("quantization")
        else:
            return None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{f} is unparsable: {e}") from e
    if q is None:
        return None
    if not (isinstance(q, dict) and q.get("method") in ("int8", "int4") and isinstance(q.get("modules"), list)):
        raise CheckpointError(f"{f}: 'quantization' must hold method int8|int4 and a modules list, got {q!r}")
    return q


def read_ensemble(path: Path | str) -> dict | None:
    """What ensemble.json of a step folder says ({"members": N, ...}: the weights are N classifiers,
    `members.i.*`), or None for one model."""
    f = Path(path) / ENSEMBLE
    if not f.is_file():
        return None
    try:
        e = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{f} is unparsable: {err}") from err
    n = e.get("members") if isinstance(e, dict) else None
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise CheckpointError(f"{f}: 'members' must be the number of classifiers (>= 2), got {e!r}")
    return e


def load_checkpoint(path: Path | str, *, verify: bool = True) -> Checkpoint:
    """Read a step folder (hash-verified unless verify=False); tensors come back on CPU."""
    folder = Path(path)
    if verify:
        problems = verify_checkpoint(folder)
        if problems:
            raise CheckpointError(f"{folder} is not a valid checkpoint: {'; '.join(problems)}")
    info, rng_skeleton = _read_info(folder)
    try:
        opt_json = folder / "optimizer.json"
        opt_doc = json.loads(opt_json.read_text(encoding="utf-8")) if opt_json.exists() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read checkpoint {folder}: {e}") from e
    try:
        rng = unflatten_state(rng_skeleton, read_tensors(folder / "rng.safetensors"))
        optimizer_state = None
        if opt_doc is not None:
            optimizer_state = unflatten_state(opt_doc["state_dict"], read_tensors(folder / "optimizer.safetensors"))
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{folder}: inconsistent RNG or optimizer state: {e}") from e
    return Checkpoint(**vars(info), model_state=read_tensors(folder / "model.safetensors"),
                      optimizer_state=optimizer_state, rng=rng)


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
    return read_tensors(folder / "model.safetensors")
