"""The checkpointer: the one object a training run calls to resume and to save.

    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint, resume="auto", config_toml=to_toml(cfg),
                        tokenizer_path=tok, model_config=mcfg, data_dir=data_dir,
                        distributed=world_size > 1, device=device)
    state = ckpt.load_into(model, optimizer, loader)   # RunState() when the run starts fresh
    ...
    path = ckpt.save(state, model, optimizer, loader, reason="periodic")

It hides three things from the trainer:
- the two stores: a single process writes clusterlm.checkpoint.store folders, a distributed run DCP
  folders (clusterlm.checkpoint.distributed, optionally written in the background); a resume reads
  whichever the folder holds (a DCP folder on any layout, a single-process folder on one process);
- the cross-rank agreement: every rank scans the shared checkpoints folder and they check, with one
  all-reduce, that they chose the same step;
- the RNG restore (python, numpy, torch; per rank for DCP), so the resumed run continues bit-exactly.

What a resume needs besides model, optimizer, loader and RNG is a RunState, saved as train_state.json's
"run" entry, beside "loader" (the loader's position), "reason" and the caller's `extra_state`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from clusterlm.checkpoint.layout import step_folders, step_name, step_of
from clusterlm.checkpoint.rng import capture_rng_state, restore_rng_state
from clusterlm.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """Everything besides model/optimizer/loader/RNG that a resume needs (train_state.json "run")."""

    step: int = 0  # optimizer steps taken (skipped NaN steps included: their batches are consumed)
    tokens_seen: int = 0
    bad_steps_total: int = 0
    bad_streak: int = 0
    best_val_loss: float | None = None
    best_saved_val_loss: float | None = None  # checkpoint.keep_best: the lowest val loss at a saved step
    best_saved_step: int | None = None  # ... and that step (checkpoints/best names its folder)
    train_seconds: float = 0.0  # wall time spent in previous segments of this run
    task_scoring_seconds: float = 0.0  # ... of it spent scoring the [eval] tasks (the "task" records' scoring_s)
    loss_scale: float | None = None  # fp16 autocast: the dynamic loss scale (train/amp.py); None = not scaling
    loss_scale_streak: int = 0  # ... finite steps since it last changed
    overflow_steps: int = 0  # ... steps skipped because the scaled gradients overflowed (they halved the scale)


class Stateful(Protocol):  # the data loader: its position is part of a checkpoint
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def agree_on_checkpoint(path: Path | None, device: torch.device) -> Path | None:
    """Collective: check that every rank chose the same checkpoint step (each scans the shared file
    system); ConfigError on every rank when they differ."""
    import torch.distributed as dist

    step = step_of(path) if path is not None else None
    step = -1 if step is None else step
    t = torch.tensor([step, -step], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise ConfigError(f"ranks disagree on the checkpoint to resume from (steps {-int(t[1])} to {int(t[0])}): "
                          "is the checkpoint folder on a file system shared by all nodes?")
    return path


def already_has_checkpoints(run_dir: Path) -> str:
    """The refusal of a run without --train.resume into a folder that holds step folders."""
    return f"{run_dir} already has checkpoints; resume with --train.resume=auto or choose another --train.out_dir"


class Checkpointer:
    """Resume and save one run's checkpoints (see the module docstring).

    resume: "none" (refuses a folder that already holds checkpoints), "auto" (the newest step folder
    that verifies; none: start fresh) or a run directory / checkpoints folder / step folder.
    model_config, data_dir, finetune: what the run asks for; a checkpoint of another model shape,
    tokenizer or LoRA adapters (rank, targets, DoRA) is refused in one line before anything is loaded. extra_state: saved in every train_state.json.
    pipeline_stage_source: with pp > 1, whether this rank sends its stage's weights for
    model.safetensors (clusterlm.checkpoint.distributed.save_distributed); None otherwise.
    """

    def __init__(self, root: Path, cfg: Any, *, config_toml: str, resume: str = "none",
                 tokenizer_path: Path | None = None, model_config: Any = None, data_dir: Path | None = None,
                 distributed: bool = False, device: torch.device | None = None,
                 pipeline_stage_source: bool | None = None, extra_state: dict[str, Any] | None = None,
                 finetune: Any = None) -> None:
        self.root = Path(root)
        self.cfg = cfg  # clusterlm.config.CheckpointConfig: keep_last, async_save
        self.config_toml = config_toml
        self.resume = resume
        self.tokenizer_path = tokenizer_path
        self.model_config = model_config
        self.finetune = finetune  # clusterlm.config.FinetuneConfig: a resume with other LoRA adapters is refused
        self.data_dir = data_dir
        self.distributed = distributed
        self.device = device or torch.device("cpu")
        self.pipeline_stage_source = pipeline_stage_source
        self.extra_state = extra_state or {}
        self._pending: list[Any] = []  # at most one asynchronous distributed save not yet committed
        self._best_steps: set[int] = set()  # saved at the lowest val loss, checkpoints/best not yet moved
        self.mirror = None  # clusterlm.checkpoint.mirror.Mirror on the rank that commits, with checkpoint.mirror
        if getattr(cfg, "mirror", ""):
            from clusterlm.checkpoint.mirror import Mirror, check_mirror_source

            check_mirror_source(cfg.mirror, self.root)  # every rank: one run per mirror
            if self._commits():
                self.mirror = Mirror(Path(cfg.mirror), cfg.keep_last)
        self._resolved: tuple[Path | None] | None = None  # resolve()'s answer, once computed

    # ---- find ------------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """The newest step folder whose files verify (corrupt newer ones skipped with a warning), or None."""
        from clusterlm.checkpoint.store import find_latest_valid

        return find_latest_valid(self.root)

    def _resume_path(self) -> Path | None:
        from clusterlm.checkpoint.store import (describe_rejected, resolve_checkpoint, scan_checkpoints,
                                                warn_if_latest_differs)

        if self.root.exists() and not self.root.is_dir():  # else the first save, after the steps before it, said so
            raise ConfigError(f"{self.root} is a file, where this run keeps its checkpoints folder; move it aside or "
                              "choose another --train.out_dir")
        path = None
        if self.resume == "auto":
            path, rejected = scan_checkpoints(self.root)
            if self._commits():  # one warning, not one per rank
                warn_if_latest_differs(self.root, path)
            path, rejected = self._or_mirror(path, rejected)
            if path is None and rejected:
                # resume=auto was given: saying "resume with --train.resume=auto" would help no one
                raise CheckpointError(
                    f"--train.resume=auto: all {len(rejected)} checkpoints in {self.root} failed verification:\n"
                    f"{describe_rejected(rejected)}\nto start fresh, give another --train.out_dir (or move "
                    f"{self.root} aside); to continue this run, restore a checkpoint from a copy")
            if path is None:
                log.info("resume=auto: no valid checkpoint in %s, starting fresh", self.root)
        elif self.resume != "none":
            path = resolve_checkpoint(self.resume)
        if self.distributed:
            path = agree_on_checkpoint(path, self.device)
        if path is None and self.root.exists() and any(self.root.glob("step-*")):
            raise ConfigError(already_has_checkpoints(self.root.parent))
        if path is not None:
            self._check_timeline(path)
        return path

    def _check_timeline(self, path: Path) -> None:
        """At start-up, not at the first save: a resume from a checkpoint outside this run's folder (another
        run's, or a copy) into a folder that already holds step folders would mix two runs there (the first
        save deleted the later ones as "left by a run resumed from an earlier checkpoint" and kept the
        earlier ones beside the new steps): refused. A resume from an earlier step of this folder is a
        branch: the later step folders go at the first save, said now."""
        here = step_folders(self.root)
        if not here:
            return
        where = path.resolve().parent
        mirror = getattr(self.cfg, "mirror", "")
        if where != self.root.resolve() and not (mirror and where == Path(mirror).resolve()):
            names = ", ".join(p.name for p in here[-3:]) + (f" and {len(here) - 3} more" if len(here) > 3 else "")
            raise ConfigError(f"--train.resume={path} is outside {self.root}, which already holds checkpoints of "
                              f"another run ({names}); the two would mix there: give the resumed run its own "
                              f"--train.out_dir, or move {self.root} aside")
        later = [p.name for p in here if (step_of(p) or 0) > (step_of(path) or 0)]
        if later and self._commits():
            log.warning("resuming from %s: the later checkpoints %s of %s will be deleted at this run's first save "
                        "(they belong to the timeline it branches from)", path.name, ", ".join(later), self.root)

    def _commits(self) -> bool:
        """Whether this process commits the step folders (rank 0 of a distributed run, or the only one)."""
        if not self.distributed:
            return True
        import torch.distributed as dist

        return dist.get_rank() == 0

    def _or_mirror(self, path: Path | None, rejected: list) -> tuple[Path | None, list]:
        """The newer of the primary's and the mirror's newest valid checkpoints (primary on a tie),
        logged when the mirror's is taken; (path, rejected) unchanged without a mirror."""
        from clusterlm.checkpoint.store import scan_checkpoints

        mirror = getattr(self.cfg, "mirror", "")
        if not mirror:
            return path, rejected
        copy, rejected_copies = scan_checkpoints(Path(mirror))
        if copy is None or (path is not None and step_of(path) >= step_of(copy)):
            return path, rejected + rejected_copies if path is None else rejected
        why = (f"newer than the primary's newest valid {path.name}" if path is not None else
               f"{self.root} has no valid checkpoint" + (f" ({len(rejected)} rejected)" if rejected else ""))
        log.warning("resume=auto: taking the mirror's copy %s (%s)", copy, why)
        return copy, []

    # ---- resume ----------------------------------------------------------------------------------
    def resolve(self) -> Path | None:
        """The checkpoint `resume` names (None: start fresh), agreed by every rank and checked against
        the run's model shape and tokenizer; one line (CheckpointError) when it does not fit. Call it
        before building the model, so a bad resume is refused before any memory is allocated;
        collective when distributed; computed once."""
        from clusterlm.checkpoint.compat import check_resume

        if self._resolved is None:
            path = self._resume_path()
            if path is not None:  # weights-only first: a pruned copy's other shape is not what to fix
                _refuse_weights_only(path)
            if path is not None and self.model_config is not None:
                check_resume(path, self.model_config, self.data_dir, self.tokenizer_path, self.finetune)
            self._resolved = (path,)
        return self._resolved[0]

    def load_into(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: Stateful) -> RunState:
        """Collective when distributed. Fill model, optimizer, loader and the RNGs from the checkpoint
        `resume` names and return its RunState; a fresh RunState() when there is none."""
        from clusterlm.checkpoint.distributed import is_distributed_checkpoint

        path = self.resolve()
        if path is None:
            return RunState()
        if is_distributed_checkpoint(path):  # any layout it was saved with
            from clusterlm.checkpoint.distributed import load_distributed, load_rank_rng

            train_state = load_distributed(path, model, optimizer)
            rng = load_rank_rng(path)
        else:
            train_state, rng = self._load_single(path, model, optimizer)
        try:  # the loader draws from its own seeded generators
            loader.load_state_dict(train_state["loader"])
        except CheckpointError as e:  # name the checkpoint: the loader's message knows only its fields
            raise CheckpointError(f"{path}: {e}") from e
        state = RunState(**train_state["run"])
        if rng is not None:
            restore_rng_state(rng)
        log.info("resumed from %s at step %d (%d tokens seen)", path, state.step, state.tokens_seen)
        return state

    def _load_single(self, path: Path, model: torch.nn.Module,
                     optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
        from clusterlm.checkpoint.model_io import check_state_shapes
        from clusterlm.checkpoint.store import load_checkpoint

        if self.distributed:
            import torch.distributed as dist

            raise ConfigError(f"{path} is a single-process checkpoint; resuming it on {dist.get_world_size()} ranks "
                              "is not supported (distributed runs save DCP checkpoints, which load on any layout)")
        ckpt = load_checkpoint(path)
        _refuse_weights_only(path, ckpt.train_state, ckpt.optimizer_state is not None)
        check_state_shapes(ckpt.model_state, model, ckpt.path / "model.safetensors")
        model.load_state_dict(ckpt.model_state)
        try:
            optimizer.load_state_dict(ckpt.optimizer_state)
        except ValueError as e:  # torch: "loaded state dict has a different number of parameter groups", ...
            raise CheckpointError(optimizer_mismatch(path, ckpt.optimizer_state, optimizer, e)) from e
        return ckpt.train_state, ckpt.rng

    # ---- save ------------------------------------------------------------------------------------
    def writes_async(self, reason: str) -> bool:
        """Periodic distributed saves may write in the background (checkpoint.async_save); every other
        save is synchronous and first commits a pending one, so a run never ends with one in flight."""
        return self.distributed and reason == "periodic" and bool(self.cfg.async_save)

    def save(self, state: RunState, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: Stateful,
             *, reason: str, best: bool = False) -> Path:
        """Collective when distributed. Save step `state.step`; returns its step folder (for an
        asynchronous save: where it appears once committed, at the next save). `best`: this step's
        validation loss is the lowest so far; with checkpoint.keep_best, checkpoints/best names the
        folder once it is committed and pruning keeps it."""
        if best and getattr(self.cfg, "keep_best", False):
            self._best_steps.add(state.step)
        train_state = {"run": dataclasses.asdict(state), "loader": loader.state_dict(), "reason": reason,
                       **self.extra_state}
        if self.mirror is not None:
            self.mirror.wait()  # the previous copy finishes before this save may prune its source
        if not self.distributed:
            from clusterlm.checkpoint.store import save_checkpoint

            path = save_checkpoint(self.root, state.step, model_state=model.state_dict(),
                                   optimizer_state=optimizer.state_dict(), train_state=train_state,
                                   rng=capture_rng_state(), config_toml=self.config_toml,
                                   tokenizer_path=self.tokenizer_path, keep_last=self.cfg.keep_last)
            self._mark_best(path)
            self._mirror(path, reason)
            return path
        from clusterlm.checkpoint.distributed import PendingSave, save_distributed

        self.wait()  # the previous asynchronous save commits before the next one starts
        result = save_distributed(self.root, state.step, model, optimizer, train_state=train_state,
                                  config_toml=self.config_toml, tokenizer_path=self.tokenizer_path,
                                  keep_last=self.cfg.keep_last, async_save=self.writes_async(reason),
                                  pipeline_stage_source=self.pipeline_stage_source)
        if isinstance(result, PendingSave):
            self._pending.append(result)
            return result.root / step_name(result.step)
        self._mark_best(result)
        self._mirror(result, reason)
        return result

    def reconcile_best(self, state: RunState) -> None:
        """checkpoints/best after a resume to `state` (the resumed RunState, whose best is reset where it
        no longer names a folder). With checkpoint.keep_best off, a pointer an earlier segment
        left would stay in force (and keep its folder past keep_last) for ever: it is removed, loudly.
        With it on, the pointer names the resumed RunState's best step: a branch resume (from a
        checkpoint before the best) drops the later folders and the pointer with them, and the best
        folder at or before the resumed step is named again; when that folder is gone (or the run
        resumed from a folder outside its own checkpoints/), the next evaluated save is marked best."""
        from clusterlm.checkpoint.layout import BEST, move_latest, read_latest

        root = self.root
        best = read_latest(root, BEST)
        if not getattr(self.cfg, "keep_best", False):
            if best is not None and self._commits():
                log.warning("checkpoint.keep_best is off in this run: removing %s, which named %s (saved while it "
                            "was on); that folder is now pruned by checkpoint.keep_last like any other",
                            root / BEST, best)
                (root / BEST).unlink(missing_ok=True)
            state.best_saved_val_loss = state.best_saved_step = None
            return
        if state.best_saved_val_loss is None:
            return
        resumed = self.resolve()
        name = step_name(state.best_saved_step) if state.best_saved_step is not None else None
        if name is not None and resumed is not None and resumed.parent.resolve() == root.resolve() and (root / name).is_dir():
            if best != name and self._commits():
                move_latest(root, name, BEST)
                log.info("checkpoints/best names %s again: the lowest val loss (%.4f) saved up to the resumed step %d"
                         "%s", name, state.best_saved_val_loss, state.step, f" (it named {best})" if best else "")
            return
        log.info("checkpoints/best: the best checkpoint up to the resumed step %d is not in %s (%s); the next "
                 "evaluated checkpoint is marked best", state.step, root, name or "saved before its step was recorded")
        state.best_saved_val_loss = state.best_saved_step = None

    def _mark_best(self, path: Path) -> None:
        """Point checkpoints/best at committed folder `path` when its step was saved as the best, then
        prune again: the previous best is an ordinary checkpoint now (keep_last decides)."""
        if step_of(path) not in self._best_steps:
            return
        self._best_steps.discard(step_of(path))
        if self._commits():
            from clusterlm.checkpoint.layout import BEST, move_latest, prune

            move_latest(self.root, path.name, BEST)
            prune(self.root, self.cfg.keep_last, path)
            log.info("checkpoint %s has the lowest validation loss so far: %s", path.name, self.root / BEST)

    def _mirror(self, path: Path, reason: str) -> None:
        """Copy a just committed folder to checkpoint.mirror in the background; the last save of a run
        (final, preempted, diverged) waits for its copy, so the process never exits with one in flight."""
        if self.mirror is not None:
            self.mirror.submit(path)
            if reason != "periodic":
                self.mirror.wait()

    def wait(self) -> None:
        """Collective: commit a pending asynchronous save, if any (then mirror it)."""
        if self._pending:
            from clusterlm.checkpoint.distributed import finish_save

            path = finish_save(self._pending.pop())
            self._mark_best(path)
            self._mirror(path, "periodic")


def _refuse_weights_only(path: Path, train_state: dict | None = None, has_optimizer: bool | None = None) -> None:
    """CheckpointError when `path` holds weights only (convert, quantize, prune, ensemble write no
    optimizer, run or loader state). Read from the folder when not given; a DCP folder always has them."""
    from clusterlm.checkpoint.distributed import is_distributed_checkpoint
    from clusterlm.checkpoint.store import read_info

    if train_state is None:
        if is_distributed_checkpoint(path):
            return
        train_state = read_info(path).train_state
        has_optimizer = (path / "optimizer.safetensors").is_file()
    missing = [k for k in ("run", "loader") if k not in train_state]
    if missing or not has_optimizer:
        raise CheckpointError(f"{path} holds weights without the training state a resume needs "
                              f"({', '.join(missing) or 'optimizer'} missing: written by convert, quantize, "
                              "prune or ensemble?); it can be evaluated or served, not resumed; start fresh with another "
                              "--train.out_dir")


def optimizer_mismatch(path: Path, saved: dict, optimizer: torch.optim.Optimizer, err: Exception) -> str:
    """The one line for a checkpoint whose optimizer state does not fit this run's parameter groups."""
    have = [len(g["params"]) for g in saved.get("param_groups", [])]
    want = [len(g["params"]) for g in optimizer.param_groups]
    return (f"cannot resume {path}: its optimizer has parameter groups of {have} tensors, this run's {want} ({err}); "
            "optim.weight_decay (0 or not), optim.layer_lr_decay (1 or not), optim.unfreeze_every (0 or not) or the "
            "trainable parameters "
            "(finetune.freeze_*, lora_*) changed since it was saved: set them as in its config.toml, or "
            "start fresh with another --train.out_dir")


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], *, distributed: bool,
                 where: str) -> list[str]:
    """Copy full (unsharded, CPU) tensors `state` into `model`, sharded (FSDP2/DTensor, collective:
    every rank passes the same state) or not; names are the model's without wrapper prefixes
    (activation checkpointing, torch.compile). Returns the model's keys `state` did not fill (the
    caller decides which may be missing); a tensor `state` has that the model lacks, or one of the
    wrong shape, is refused naming it and `where`."""
    from clusterlm.checkpoint.model_io import check_state_shapes
    from clusterlm.parallel.ac import clean_name

    own = {clean_name(k): k for k in model.state_dict()}
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise CheckpointError(f"{where}: tensor {unexpected[0]} has no place in the model being trained "
                              f"({len(unexpected)} such tensors; a base of another architecture?)")
    if distributed:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = {k: v for k, v in state.items()}
        want = {clean_name(k): tuple(v.shape) for k, v in model.state_dict().items()}
        bad = [(k, tuple(v.shape), want[k]) for k, v in full.items() if tuple(v.shape) != want[k]]
        if bad:
            k, got, exp = bad[0]
            raise CheckpointError(f"{where}: tensor {k} has shape {list(got)} but the model needs {list(exp)}")
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        renamed = {own[k]: v for k, v in state.items()}
        check_state_shapes(renamed, model, where)
        model.load_state_dict(renamed, strict=False)
    return sorted(k for k in own if k not in state)
