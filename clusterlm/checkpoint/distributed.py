"""Distributed checkpoints with torch.distributed.checkpoint (DCP): saved on N ranks, loaded on M.

    path = save_distributed(ckpt_root, step, model, optimizer, train_state=..., config_toml=...)
    pending = save_distributed(..., async_save=True); ...train...; path = finish_save(pending)
    train_state = load_distributed(path, model, optimizer)   # any layout, any world size (even 1)

Layout of a step folder (same root, `latest` pointer, keep-K and manifest as the single-process
store; clusterlm/checkpoint/layout.py does the committing):

    step-00000100/
        dcp/                  DCP's files: .metadata plus one __R_0.distcp per writing rank.
                              Keys "model.<fqn>" and "optim.state.<fqn>.<exp_avg|...>", ... (FQNs
                              of the unsharded model), so any layout can read them back.
        train_state.json      step, tokens, loader position (a global sample index: reshards freely)
        config.toml, tokenizer.json (and chat_template.jinja when the tokenizer file has one beside it)
        model.safetensors     full weights for eval/generate/export (written by rank 0; with pp > 1 the
                              stages' weights are gathered to rank 0 first)
        rng/rank-00000.{json,safetensors}   each rank's generators (python, numpy, torch CPU, CUDA)
        manifest.json         written last by rank 0, over every file above

Every rank writes its own shards into the same hidden `.step-N.partial-dist` folder (a shared file
system is assumed, as for any multi-node checkpoint); rank 0 writes the rest after a barrier,
hashes, renames into place, moves `latest` and prunes. A crash at any point leaves no visible
step folder. Each rank's RNG state is saved beside the shards and restored on a resume at the same
world size (dropout then resumes bit-exactly); at another world size the generators cannot be mapped
onto the new ranks, so they start from the seed and a warning says so.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from clusterlm.checkpoint.files import named_os_error, read_tensors, write_json, write_tensors
from clusterlm.checkpoint.flatten import flatten_state, unflatten_state
from clusterlm.checkpoint.layout import commit_folder, move_latest, prune, remove_stale, step_name
from clusterlm.checkpoint.rng import capture_rng_state
from clusterlm.checkpoint.store import DCP_DIR, copy_tokenizer_files, write_manifest
from clusterlm.errors import CheckpointError
from clusterlm.fsutil import atomic_write_text, fsync_dir, plain_mode

log = logging.getLogger(__name__)

RNG_DIR = "rng"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rng_files(folder: Path, rank: int) -> tuple[Path, Path]:
    stem = folder / RNG_DIR / f"rank-{rank:05d}"
    return stem.with_suffix(".json"), stem.with_suffix(".safetensors")


def _save_rank_rng(folder: Path) -> None:
    """This rank's generators (captured now) -> rng/rank-NNNNN.{json,safetensors} in `folder`."""
    skeleton, tensors = flatten_state(capture_rng_state())
    meta_path, tensor_path = _rng_files(folder, _rank())
    meta_path.parent.mkdir(exist_ok=True)
    write_tensors(tensor_path, tensors, "rng")
    write_json(meta_path, {"world_size": _world(), "rng": skeleton})


def load_rank_rng(path: Path) -> dict[str, Any] | None:
    """This rank's saved RNG state (for `restore_rng_state`), or None when the checkpoint holds none or was
    saved at another world size (logged: the generators then stay as seeded)."""
    meta_path, tensor_path = _rng_files(Path(path), _rank())
    if not meta_path.exists():
        log.warning("%s holds no RNG state for rank %d: generators stay as seeded", path, _rank())
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {meta_path}: {e}") from e
    if meta.get("world_size") != _world():
        log.warning("%s was saved on %s ranks, this run has %d: RNG states are not restored (generators stay "
                    "as seeded; bit-exact resume needs the same world size)", path, meta.get("world_size"), _world())
        return None
    try:
        return unflatten_state(meta["rng"], read_tensors(tensor_path))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: inconsistent RNG state: {e}") from e


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def is_distributed_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_DIR).is_dir()


@dataclass
class PendingSave:
    """An asynchronous save whose shards are still being written; `finish_save` commits it."""

    future: Any
    tmp: Path
    root: Path
    step: int
    keep_last: int


_CKPT_GROUP: list[Any] = []  # a gloo group of all ranks for background checkpoint collectives


def _checkpoint_group():
    # async saves run DCP's collectives in a background thread: on their own group, so they never
    # interleave with the training loop's collectives on the default group (torch's recommendation)
    if not _CKPT_GROUP:
        _CKPT_GROUP.append(dist.new_group(backend="gloo") if dist.is_initialized() else None)
    return _CKPT_GROUP[0]


def save_distributed(ckpt_root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                     train_state: dict[str, Any], config_toml: str, tokenizer_path: Path | None = None,
                     keep_last: int = 3, full_weights: bool = True, async_save: bool = False,
                     pipeline_stage_source: bool | None = None) -> Path | PendingSave:
    """Collective: every rank calls it with its shard of the model/optimizer; returns the step folder.

    async_save=True: the state is copied to CPU memory, written by a background thread, and a
    PendingSave is returned; every rank must later call `finish_save(pending)` (before the next save
    and before exiting), which waits for the writes and commits the folder. Until then no step folder
    is visible, so a crash in between loses only this checkpoint.

    pipeline_stage_source: None without pipeline parallel. With pp > 1 each rank holds only its stage's
    layers: True on the one rank per stage that sends its stage's full weights to rank 0 (dp and tp
    coordinate 0), False on the others; rank 0 merges them into model.safetensors.
    """
    root, name = Path(ckpt_root), step_name(step)
    tmp = root / f".{name}.partial-dist"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale(root)  # includes an earlier crashed save's partial folder
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    try:
        state = {"model": get_model_state_dict(model)}
        if optimizer is not None:
            state["optim"] = get_optimizer_state_dict(model, optimizer)
        if async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp / DCP_DIR), process_group=_checkpoint_group())
        else:
            future = None
            dcp.save(state, checkpoint_id=str(tmp / DCP_DIR))
        _save_rank_rng(tmp)  # before the barrier below, so rank 0's manifest covers every rank's file
        full = None
        if full_weights and pipeline_stage_source is not None:
            full = _gather_pipeline_weights(model, pipeline_stage_source)
        elif full_weights:  # collective too: every rank takes part in the gather
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        _barrier()
        if _rank() == 0:
            if full is not None:
                from safetensors.torch import save_file

                # tied weights are one tensor: keep the first name (as the single-process store does)
                seen: dict[int, str] = {}
                tensors = {}
                for k, v in full.items():
                    key = v.untyped_storage().data_ptr()
                    if key not in seen:
                        seen[key] = k
                        tensors[k] = v.contiguous()
                try:
                    save_file(tensors, str(tmp / "model.safetensors"))
                except Exception as e:  # "I/O error: ... (os error 28)": the OS's error, naming the file
                    if (named := named_os_error(e, tmp / "model.safetensors")) is not None:
                        raise named from e
                    raise
                plain_mode(tmp / "model.safetensors")  # safetensors creates it 0600
            atomic_write_text(tmp / "train_state.json", json.dumps(train_state, indent=1))
            atomic_write_text(tmp / "config.toml", config_toml)
            copy_tokenizer_files(tokenizer_path, tmp)  # and the chat template beside it, if any
    except BaseException as e:
        named = _save_os_error(e, tmp, root / name)  # before the partial folder goes: a full disk shows there
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if named is not None:
            raise named from e
        raise
    pending = PendingSave(future, tmp, root, step, keep_last)
    if async_save:
        return pending
    return finish_save(pending)


def _save_os_error(e: BaseException, tmp: Path, final: Path) -> OSError | None:
    """The OSError a failed save ends with (the CLI's one line and exit 74), its file named as in the step
    folder `final` rather than the hidden `tmp`; None when `e` is no I/O failure. DCP gathers the ranks'
    errors into a CheckpointException (a BaseException, printed as a traceback), and its torch.save of
    non-tensor values turns a short write into a RuntimeError without errno ("unexpected pos"): when the
    file system then has no space left, that is ENOSPC."""
    inner = e
    if isinstance(e, dcp.api.CheckpointException) and e.failures:
        inner = next(iter(e.failures.values()))[0]
    if isinstance(inner, OSError) and inner.filename is not None:
        where = str(inner.filename)
        if where == str(tmp) or where.startswith(str(tmp) + os.sep):
            return OSError(inner.errno, inner.strerror or str(inner), str(final) + where[len(str(tmp)):])
        return None if inner is e else inner
    if (named := named_os_error(inner, final / DCP_DIR)) is not None:  # no file name: DCP's shard writes
        return named
    if inner is not e:
        try:
            full = os.statvfs(tmp if tmp.exists() else tmp.parent).f_bavail == 0
        except OSError:
            full = False
        if full:
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final / DCP_DIR))
    return None


def _gather_pipeline_weights(model: nn.Module, source: bool) -> dict[str, torch.Tensor] | None:
    """Collective: every stage's full (unsharded) weights, merged on rank 0 (None elsewhere).

    The stage modules keep the unsplit model's names (clusterlm.parallel.pp), so the union of the
    stages' state dicts is the whole model's. Within a stage, `full_state_dict` gathers the FSDP/TP
    shards on every rank (no cpu_offload: that would keep them on global rank 0 only, which is in stage
    0); one rank per stage then sends its copy."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    mine = {k: v.detach().cpu() for k, v in full.items()} if source else {}
    del full
    parts: list[Any] = [None] * dist.get_world_size() if _rank() == 0 else []
    dist.gather_object(mine, parts if _rank() == 0 else None, dst=0)
    if _rank() != 0:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        for k, v in part.items():
            if k in merged:
                raise CheckpointError(f"pipeline stages both hold '{k}': the stage split overlaps")
            merged[k] = v
    return merged


def finish_save(pending: PendingSave) -> Path:
    """Collective: wait for this rank's shard writes, then rank 0 hashes and commits the folder."""
    tmp, root, name = pending.tmp, pending.root, step_name(pending.step)
    try:
        if pending.future is not None:
            pending.future.result()
        _barrier()
        if _rank() == 0:
            fsync_dir(tmp / DCP_DIR)
            write_manifest(tmp, pending.step)
            commit_folder(tmp, root / name)
            move_latest(root, name)
            prune(root, pending.keep_last, root / name)
            log.info("saved distributed checkpoint %s", root / name)
    except BaseException as e:
        named = _save_os_error(e, tmp, root / name)
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if named is not None:
            raise named from e
        raise
    _barrier()
    return root / name


# ---- loading without running code ---------------------------------------------------------------------------
# DCP keeps its index (dcp/.metadata) as a pickle and loads it with an unrestricted pickle.load, and loads
# non-tensor values (the optimizer's param_groups) with torch.load(weights_only=False): a checkpoint from
# elsewhere (--train.resume=PATH) could run code. The index is read with only DCP's own classes allowed
# (Python docs, pickle, "Restricting Globals"), the values with weights_only=True; what these refuse is
# refused naming the file, before the real load reads them.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # TensorProperties' layout
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch.distributed.checkpoint.metadata" and isinstance(
                getattr(dcp.metadata, name, None), type):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(
                getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))):
            return super().find_class(module, name)
        if name in _METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not one of DCP's metadata classes")


class _SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose dcp/.metadata may hold DCP's metadata classes and nothing that runs code."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = Path(self._get_metadata_path(kwargs.get("rank")))
        try:
            with open(path, "rb") as f:
                _MetadataUnpickler(f).load()
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from e
        except (EOFError, pickle.UnpicklingError, AttributeError, ValueError, TypeError) as e:
            raise CheckpointError(f"{path} is not a DCP metadata file this clusterlm loads: {e} (a pickle that "
                                  "would run code when loaded is refused)") from e
        return super().read_metadata(*args, **kwargs)


class _SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner loading non-tensor values (param_groups) with torch.load(weights_only=True) first."""

    def __init__(self, dcp_dir: Path) -> None:
        super().__init__()
        self.dcp_dir = dcp_dir

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        data = value.read()
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()]  # torch's own reason is its GLOBAL line
            why = next((ln for ln in lines if "GLOBAL" in ln), lines[0] if lines else type(e).__name__)
            raise CheckpointError(f"{self.dcp_dir}: the value of '{read_item.dest_index.fqn}' does not load with "
                                  f"weights_only=True, a pickle that could run code is refused: {why}") from e
        super().load_bytes(read_item, io.BytesIO(data))


def _add_saved_state_keys(optim_state: dict[str, Any], dcp_dir: Path) -> None:
    """DCP loads only the keys the destination state dict has, and a fresh optimizer's state has
    AdamW's own (step, exp_avg, exp_avg_sq). A per-parameter tensor the saving run kept beside them
    (train/ema.py's "ema" or "train_weights") gets a destination shaped, typed and sharded like the
    parameter's exp_avg, so it is loaded instead of silently dropped."""
    saved = _SafeReader(str(dcp_dir)).read_metadata().state_dict_metadata
    for fqn, st in optim_state.get("state", {}).items():
        template = st.get("exp_avg")
        if template is None:
            continue
        prefix = f"optim.state.{fqn}."
        for key in saved:
            name = key[len(prefix):]
            if key.startswith(prefix) and "." not in name and name not in st:
                st[name] = torch.empty_like(template)


def load_distributed(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Collective: fill this rank's shards of model (and optimizer) from `path`; returns train_state."""
    path = Path(path)
    if not is_distributed_checkpoint(path):
        raise CheckpointError(f"{path} has no {DCP_DIR}/ folder: not a distributed checkpoint")
    _SafeReader(str(path / DCP_DIR)).read_metadata()  # here: inside dcp.load torch replaces its error
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
        _add_saved_state_keys(state["optim"], path / DCP_DIR)
    with warnings.catch_warnings():  # one process reading a sharded checkpoint is meant: torch warns anyway
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        try:
            dcp.load(state, storage_reader=_SafeReader(str(path / DCP_DIR)), planner=_SafePlanner(path / DCP_DIR))
        except dcp.api.CheckpointException as e:  # the ranks' errors, gathered: ours is the one line to say
            ours = [exc for exc, _ in e.failures.values() if isinstance(exc, CheckpointError)]
            if ours:
                raise ours[0] from None
            raise
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        # fused/foreach are this process's kernel choice (the saving layout's may not work here:
        # fused AdamW refuses TP's mix of DTensor and plain parameters), not state: keep ours
        kernels = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
        set_optimizer_state_dict(model, optimizer, state["optim"])
        for g, kv in zip(optimizer.param_groups, kernels):
            g.update(kv)
    try:
        return json.loads((path / "train_state.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path / 'train_state.json'}: {e}") from e

