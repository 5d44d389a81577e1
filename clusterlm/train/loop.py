"""The training loop: one process, or many under torchrun/srun; nanoGPT's shape with its parts named.

    clusterlm train recipes/shakespeare_char_cpu.toml --train.max_steps=200
    clusterlm train recipes/shakespeare_char_cpu.toml --train.resume=auto   # continue a run
    clusterlm launch recipes/llama_shakespeare_cpu.toml --nproc-per-node 2 --parallel.dp_shard=2

Under torchrun or srun (clusterlm.parallel.launch reads the environment) the [parallel] layout is
applied from outside the model (clusterlm.parallel.parallelize): each data-parallel rank reads its
slice of every global batch, gradients sync on the last micro-batch only, the logged loss and
gradient norm are global, rank 0 alone writes logs and metrics, checkpoints are DCP
(clusterlm.checkpoint.distributed) and every stop decision (signal, NaN streak, time limit) is
all-reduced so all ranks leave the loop at the same step.

Per step: lr from a pure function of the step, micro-batches accumulated to the global batch,
a NaN/Inf check (the optimizer step is skipped and counted), clip, step, log, maybe evaluate
(val loss every train.eval_interval steps; the [eval] tasks every eval.every steps, their model
calls split over the data-parallel ranks), maybe checkpoint. SIGTERM / SIGINT / SIGUSR2 finish
the current step, save, and exit with EXIT_PREEMPTED (75); `--train.resume=auto` then continues
bit-exactly on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clusterlm.config import DataConfig, RunConfig, TrainConfig, load_run_config, split_overrides, to_toml
from clusterlm.device import autocast as device_autocast
from clusterlm.device import autocast_dtype, keep_freed_memory, resolve_device
from clusterlm.parallel.dims import ParallelDims
from clusterlm.errors import EXIT_DIVERGED, EXIT_OK, EXIT_PREEMPTED, EXIT_USAGE, ConfigError, DataError, exit_code_of

log = logging.getLogger(__name__)

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR2")


@dataclass
class TrainResult:
    exit_code: int
    step: int
    out_dir: Path
    final_train_loss: float | None
    final_val_loss: float | None
    checkpoint: Path | None
    reason: str


# ---- set-up helpers -------------------------------------------------------------------------------
def ensure_data(data: DataConfig) -> Path:
    """The prepared data directory; prepared from `data.source` first if it does not exist yet. One
    prepared from a source with another tokenizer kind or validation fraction than `data` asks for is
    refused: the run would train silently on data its options do not describe."""
    data_dir = Path(data.dir)
    if (data_dir / "meta.json").is_file():
        if data.source:
            _check_prepared_as_asked(data, data_dir)
        return data_dir
    if not data.source:
        raise ConfigError(f"data.dir={str(data_dir)!r} is not a prepared data directory and data.source is empty; "
                          "run `clusterlm prepare` first or set data.source (e.g. 'builtin:shakespeare')")
    from clusterlm.data.prepare import check_unprepared_data_dir, prepare

    empty = check_unprepared_data_dir(data_dir, data.source)  # prepare's refusal would name its --out, --overwrite
    log.info("preparing %s from %s (tokenizer %s)", data_dir, data.source, data.tokenizer)
    try:
        prepare([data.source], data_dir, tokenizer=data.tokenizer, vocab_size=data.vocab_size or None,
                val_fraction=data.val_fraction, overwrite=empty)  # an empty folder (made by the user) is filled
    except FileExistsError:  # another run (a sweep) prepared data.dir meanwhile, and prepare left it alone
        if not (data_dir / "meta.json").is_file():
            raise
        log.info("%s was prepared by another run meanwhile; using it", data_dir)
        _check_prepared_as_asked(data, data_dir)
    return data_dir


def check_seq_len(seq_len: int, max_seq_len: int) -> None:
    """train.seq_len must fit the model's positions."""
    if seq_len > max_seq_len:
        raise ConfigError(f"train.seq_len={seq_len} exceeds model.max_seq_len={max_seq_len}; set "
                          f"--train.seq_len={max_seq_len} or less, or a larger --model.max_seq_len")


def refuse_before_preparing(cfg: RunConfig) -> None:
    """The refusals the config (and what is already on disk) can tell alone, made before data.dir is
    prepared or a base converted: the same ConfigError the later check would give, without the minutes
    of tokenizing and the folder written first (they used to come after ensure_data)."""
    from clusterlm.checkpoint.manager import already_has_checkpoints

    tc, ft, data = cfg.train, cfg.finetune, cfg.data
    if ft.task == "lm":  # a fine-tune's context may come from its base: checked once the model is known
        check_seq_len(tc.seq_len, cfg.model.max_seq_len)
    if ft.task != "lm" and (cfg.parallel.tp > 1 or cfg.parallel.pp > 1):
        raise ConfigError(f"fine-tuning runs under data parallelism (DDP, FSDP: parallel.dp_replicate, dp_shard), "
                          f"not tp={cfg.parallel.tp} pp={cfg.parallel.pp}")
    from clusterlm.parallel.launch import read_env

    if tc.global_batch_tokens and cfg.parallel.world_size == read_env().world_size:  # else the layout check names it
        cfg.parallel.grad_accum_steps(tc.global_batch_tokens, tc.micro_batch_size, tc.seq_len)  # not divisible: refused
    prepares = data.source and not (Path(data.dir) / "meta.json").is_file()
    if cfg.checkpoint.keep_best and prepares and data.val_fraction == 0 and not (ft.task != "lm" and ft.val_source):
        raise ConfigError(f"checkpoint.keep_best needs a validation loss, but data.val_fraction=0 would prepare "
                          f"data.dir={data.dir!r} from data.source without a validation split; set "
                          "data.val_fraction > 0, or checkpoint.keep_best = false")
    if ft.task == "classify" and ft.distill_from:  # the teachers' labels and tokenizer are compared with the data later
        from clusterlm.finetune.distill import resolve_teachers

        resolve_teachers(ft.distill_from)
    checkpoints = Path(tc.out_dir) / "checkpoints"
    if tc.resume == "none" and checkpoints.is_dir() and any(checkpoints.glob("step-*")):
        raise ConfigError(already_has_checkpoints(Path(tc.out_dir)))


def why_no_val(meta: dict[str, Any], data_dir: Path, seq_len: int) -> str | None:
    """Why the val split of `data_dir` (its meta.json `meta`) gives no validation loss at train.seq_len
    `seq_len`, with what to do; None when it gives one."""
    val = meta["splits"].get("val", {})
    prepare_val = "prepare it with a val fraction > 0 (data.val_fraction, prepare --val-fraction)"
    if meta.get("layout") == "examples":
        return None if val.get("examples", 0) > 0 else f"{data_dir} has no validation examples; {prepare_val}"
    tokens = val.get("tokens", 0)
    if tokens > seq_len:  # one window of seq_len + 1 tokens
        return None
    if not tokens:
        return f"{data_dir} has no validation split; {prepare_val}"
    return (f"the val split of {data_dir} has {tokens} tokens, fewer than train.seq_len+1 = {seq_len + 1}; use a "
            "smaller train.seq_len or prepare a larger val split (data.val_fraction, prepare --val-fraction)")


def _check_prepared_as_asked(data: DataConfig, data_dir: Path) -> None:
    """ConfigError when data.dir's meta.json records another tokenizer kind, val_fraction or BPE size
    asked for than `data` (a data.tokenizer that is a tokenizer.json path is not compared)."""
    from clusterlm.data.shards import read_meta
    from clusterlm.tokenizer.bpe import DEFAULT_VOCAB_SIZE as DEFAULT_BPE_VOCAB

    meta = read_meta(data_dir)  # checked as the loader checks it (DataError naming what is wrong)
    kind, val_fraction = meta["tokenizer"]["kind"], float(meta["val_fraction"])
    again = f"give another data.dir, or delete {data_dir} to prepare it again from data.source={data.source!r}"
    if data.tokenizer in ("byte", "char", "bpe") and kind != data.tokenizer:
        raise ConfigError(f"data.dir={str(data_dir)!r} was prepared with the {kind} tokenizer, but "
                          f"data.tokenizer={data.tokenizer!r}; {again}")
    if abs(val_fraction - data.val_fraction) > 1e-9:
        raise ConfigError(f"data.dir={str(data_dir)!r} was prepared with val_fraction {val_fraction:g}, but "
                          f"data.val_fraction={data.val_fraction:g}; {again}")
    asked = meta.get("options", {}).get("vocab_size")  # BPE only; absent in data dirs made before it was recorded
    if data.tokenizer == "bpe" and asked is not None and asked != (data.vocab_size or DEFAULT_BPE_VOCAB):
        raise ConfigError(f"data.dir={str(data_dir)!r} was prepared with a BPE vocabulary of {asked}, but "
                          f"data.vocab_size={data.vocab_size}"
                          + (f" (the default, {DEFAULT_BPE_VOCAB})" if not data.vocab_size else "") + f"; {again}")


def _probed_peak(spec_file: str, dtype: str) -> float | None:
    """FLOP/s of the first node type's device in a probed spec: its cited dense peak, else its
    measured matmul rate (what `clusterlm probe` records for a CPU). None without a spec file."""
    if not spec_file:
        return None
    from clusterlm.cluster.spec import load_spec

    node = load_spec(spec_file).node_types[0]
    device = node.device
    if device is not None:
        from clusterlm.cluster.probe import other_cpu_note

        note = other_cpu_note(node, f"train.probe_spec={spec_file!r}")
        if note:
            log.warning("%s; MFU is computed against that CPU's peak", note)
    tflops = device.peak(dtype)[0] or device.matmul_tflops(dtype)
    if not tflops:
        raise ConfigError(f"train.probe_spec={spec_file!r} has no peak or measured {dtype} TFLOP/s for "
                          f"{device.name}; re-run `clusterlm probe --out FILE` on this node")
    return tflops * 1e12


def batch_plan(train: TrainConfig, dims: ParallelDims) -> tuple[int, int]:
    """(accumulation steps, tokens per optimizer step) from the global batch in tokens: ParallelDims's
    arithmetic (a global batch that does not divide is refused there, by validate_layout)."""
    accum = dims.grad_accum_steps(train.global_batch_tokens, train.micro_batch_size, train.seq_len)
    return accum, accum * dims.tokens_per_micro_step(train.micro_batch_size, train.seq_len)


def _check_run_memory(cfg: RunConfig, dims: Any, accum: int, device: torch.device,
                      amp_dtype: torch.dtype | None, distributed: bool, ranks_on_node: int = 1) -> None:
    """Refuse (ConfigError) a run whose predicted peak memory per device exceeds what is available;
    every rank agrees, so none is left waiting in a collective when another refuses."""
    from clusterlm.parallel.agree import agree_any
    from clusterlm.train.memcheck import amp_name, check_memory, predicted_peak_bytes

    tc = cfg.train
    need = predicted_peak_bytes(cfg.model, dims, micro_batch=tc.micro_batch_size, seq_len=tc.seq_len,
                                dtype=amp_name(amp_dtype), recompute=cfg.parallel.activation_checkpointing,
                                accum=accum, ema=cfg.optim.ema_decay > 0)
    # on CPU the ranks of one node share its RAM; each GPU has its own memory
    problem = None
    try:
        check_memory(need, device, processes_per_pool=ranks_on_node if device.type == "cpu" else 1)
    except ConfigError as e:
        problem = e
    (refused,) = agree_any(distributed, problem is not None, device=device)
    if problem is not None:
        raise problem
    if refused:
        raise ConfigError("the memory check failed on another rank (its message gives the numbers); "
                          "--train.skip_memory_check=true starts anyway")


def _install_stop_handlers(flag: dict[str, Any]) -> dict[int, Any]:
    previous = {}

    def handler(signum, frame):  # noqa: ARG001 - signal API
        if flag.get("signal"):
            return  # already stopping; finish the step
        flag["signal"] = signal.Signals(signum).name
        log.warning("%s received: finishing the current step, then saving and exiting", flag["signal"])

    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            with contextlib.suppress(ValueError):  # not in the main thread: leave handlers alone
                previous[sig] = signal.signal(sig, handler)
    return previous


def _restore_handlers(previous: dict[int, Any]) -> None:
    for sig, h in previous.items():
        with contextlib.suppress(ValueError, TypeError):
            signal.signal(sig, h)


# ---- the trainer ----------------------------------------------------------------------------------------
def train(cfg: RunConfig) -> TrainResult:
    """Run (or resume) training as configured; returns how it ended. Never calls exit().
    The caller's torch thread count is restored afterwards (train.threads applies to this run only)."""
    threads = torch.get_num_threads()
    try:
        return Trainer(cfg).run()
    finally:
        torch.set_num_threads(threads)


class Trainer:
    """Set-up in __init__ (process group, data, model laid out, optimizer, loader, resume); `run` is
    the loop, built from `train_step`, `log_step`, `maybe_eval` and `maybe_save`."""

    def __init__(self, cfg: RunConfig) -> None:
        # what set-up wrote (data.dir prepared from data.source, a fine-tune's converted Hugging Face base), as
        # finetune/setup.py new_folders gives them: a run refused before it trains removes them again,
        # so the next run does not reuse data prepared for this one's options
        self.made: list[tuple[Path, ...]] = []
        self._lock: Any = None  # OUT_DIR/.clusterlm.lock, held by rank 0 while this run uses the folder
        try:
            self._set_up(cfg)
        except Exception as e:
            from clusterlm.finetune.setup import discard_made

            self._release_lock()
            if exit_code_of(e) == EXIT_USAGE:  # refused (bad input), not a crash
                for made in self.made:
                    discard_made(made)
            raise

    def _lock_out_dir(self) -> None:
        """One run per train.out_dir: rank 0 holds an exclusive flock on OUT_DIR/.clusterlm.lock, so a second
        `clusterlm train` there (the same command started twice, a resume while the run still goes on) is
        refused at once instead of both writing checkpoints, pruning each other's step folders and
        interleaving metrics.jsonl. Taken at start-up when the folder exists, else when it is created
        (_open_run_dir); the lock goes with the process. A folder that cannot hold the file or a file
        system without locks is not locked (the writes that follow report their own errors)."""
        import errno
        import fcntl

        from clusterlm.errors import ResourceBusyError
        from clusterlm.parallel.agree import rank0_first

        def take() -> None:
            if not self.rank0 or self._lock is not None or not self.out_dir.is_dir():
                return
            path = self.out_dir / ".clusterlm.lock"
            try:
                f = open(path, "a")  # noqa: SIM115 - held open for the run
            except OSError:
                return
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                f.close()
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ResourceBusyError(f"train.out_dir={str(self.out_dir)!r} is in use by another clusterlm run "
                                            f"(it holds {path}); wait for it to end or stop it, or give this run "
                                            "another --train.out_dir") from None
                log.info("%s: no file lock on this file system (%s); one run per train.out_dir is not enforced",
                         path, e.strerror)
                return
            self._lock = f

        rank0_first(self.distributed, self.env.rank, take, what="the train.out_dir lock", device=self.device)

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the flock
            self._lock = None

    def _set_up(self, cfg: RunConfig) -> None:
        from clusterlm.checkpoint.manager import Checkpointer
        from clusterlm.data.loader import TokenLoader
        from clusterlm.eval.metrics import lm_loss
        from clusterlm.parallel.launch import read_env
        from clusterlm.parallel.mesh import Coords, build_mesh
        from clusterlm.parallel.parallelize import build_parallel_model
        from clusterlm.train.optim import build_optimizer

        tc = self.tc = cfg.train
        self.env = read_env()
        self.distributed = self.env.world_size > 1
        self.rank0 = self.env.rank == 0
        self.out_dir = Path(tc.out_dir)
        existing = next(p for p in (self.out_dir, *self.out_dir.parents) if p.exists())
        if not existing.is_dir():  # at once: it was "[Errno 17] File exists" once the model was set up
            raise ConfigError(f"train.out_dir={tc.out_dir!r}: {existing} is a file; give the run its own folder, "
                              "e.g. runs/my_run")
        if (self.out_dir / "meta.json").is_file():  # `prepare --overwrite` there would delete the run's checkpoints
            raise ConfigError(f"train.out_dir={tc.out_dir!r} is a prepared data directory (it has meta.json); give the "
                              "run its own folder, e.g. runs/my_run")
        from clusterlm.checkpoint.store import check_outside_checkpoints

        try:  # a step folder's config.toml would be overwritten (the checkpoint then fails verification)
            check_outside_checkpoints(tc.out_dir, "--train.out_dir", kind="run folder")
        except FileExistsError as e:
            raise ConfigError(str(e)) from None
        refuse_before_preparing(cfg)  # the config alone can tell: nothing prepared or converted first
        self.device = self._init_process(cfg)
        self._lock_out_dir()  # before anything is read from or written to the folder
        self.amp_dtype = autocast_dtype(tc.dtype, self.device)
        if tc.threads and self.device.type == "cpu":
            torch.set_num_threads(tc.threads)
        if self.device.type == "cpu" and (note := keep_freed_memory()):
            log.info("%s", note)
        self.cfg = cfg = self._resolve_data(cfg)
        mcfg, dims = cfg.model, self.dims
        self.accum, self.tokens_per_step = batch_plan(tc, dims)
        # padded rows (one example a row, cut to the micro-batch's longest): tokens/s, MFU and tokens_seen
        # count the positions each step computes, not micro_batch_size x seq_len (step_positions)
        ft = cfg.finetune
        self.padded = ft.task in ("classify", "seq2seq") or (ft.task == "sft" and not ft.pack)
        self.step_tokens = self.tokens_per_step
        self.tasks = self._load_tasks(cfg)  # a bad task fails here, before any model memory
        if not tc.skip_memory_check:  # before any checkpoint or model memory is allocated
            _check_run_memory(cfg, dims, self.accum, self.device, self.amp_dtype, self.distributed,
                              self.env.local_world_size)

        # the checkpoint to resume from, checked against this run's model and tokenizer before any
        # model memory exists; then the model built on meta, laid out, materialised, initialised
        mesh = build_mesh(dims, self.device.type) if self.distributed else None
        coords = Coords.of(mesh, dims)
        self.checkpointer = Checkpointer(
            self.out_dir / "checkpoints", cfg.checkpoint, config_toml=to_toml(cfg), resume=tc.resume,
            tokenizer_path=self.tokenizer_file, model_config=mcfg, data_dir=self.data_dir,
            distributed=self.distributed, device=self.device,
            pipeline_stage_source=(coords.dp_rank == 0 and coords.tp == 0) if dims.pp > 1 else None,
            extra_state={"tokens_per_step": self.tokens_per_step}, finetune=cfg.finetune)
        self.checkpointer.resolve()
        torch.manual_seed(tc.seed)
        transform, init_extra = None, None
        loss_fn = lm_loss
        if cfg.finetune.task != "lm":
            from clusterlm.finetune.setup import model_transform

            grown = mcfg.vocab_size - self.base.config.model.vocab_size if self.base and not mcfg.labels else 0
            transform, init_extra = model_transform(cfg.finetune, seed=tc.seed, new_rows=grown)
            if mcfg.labels:
                loss_fn = self._classify_loss()
            else:
                from clusterlm.finetune.setup import TokenSumLoss

                loss_fn = TokenSumLoss()  # its scale is set per step (train_step)
        self.pm = pm = build_parallel_model(
            mcfg, cfg.parallel, mesh, self.device, seed=tc.seed, micro_batch=tc.micro_batch_size, loss_fn=loss_fn,
            param_dtype=self.amp_dtype if self.distributed else None, compile=tc.compile,
            pp_schedule=cfg.parallel.pp_schedule, transform=transform, init_extra=init_extra)
        self.model = pm.module
        if self.base is not None and self.checkpointer.resolve() is None:
            self._load_base()
        self.optimizer = build_optimizer(self.model, cfg.optim, fused=None if pm.fused_optimizer_ok else False,
                                         lora_plus_ratio=cfg.finetune.lora_plus_ratio if cfg.finetune.lora_rank else 1.0)
        if cfg.finetune.task in ("mlm", "seq2seq", "span"):  # masked LM, pairs, span corruption: finetune/objectives.py
            from clusterlm.finetune.objectives import train_loader

            self.loader = train_loader(cfg, self.data_dir, self.tokenizer_file, rank=pm.coords.dp_rank, world=dims.dp)
        elif self.examples:
            from clusterlm.data.sft import ExampleLoader

            self.loader = ExampleLoader(self.data_dir, "train", batch_size=tc.micro_batch_size, seq_len=tc.seq_len,
                                        seed=tc.seed, rank=pm.coords.dp_rank, world_size=dims.dp,
                                        pack=cfg.finetune.pack, pad_id=self.pad_id, **self._distill_targets())
        else:
            self.loader = TokenLoader(self.data_dir, "train", batch_size=tc.micro_batch_size, seq_len=tc.seq_len,
                                      seed=tc.seed, rank=pm.coords.dp_rank, world_size=dims.dp)
        # this run's optim settings (weight_decay, beta1/beta2, eps, layer_lr_decay, unfreeze_every):
        # load_state_dict puts the saved groups' values back, so a resume that changes them would keep
        # training with the old ones while config.toml and the log say the new
        keys = ("lr_scale", "unfreeze_at", "weight_decay", "betas", "eps")
        mine = [{k: g[k] for k in keys if k in g} for g in self.optimizer.param_groups]
        self.state = self.checkpointer.load_into(self.model, self.optimizer, self.loader)
        self._start_loss_scale()
        changed = sorted({k for group, own in zip(self.optimizer.param_groups, mine) for k in own
                          if k in group and _as_tuple(group[k]) != _as_tuple(own[k])})
        if changed and self.state.step:
            log.info("resumed with this run's optimizer %s (the checkpoint's differed)", ", ".join(changed))
        if self.state.step:
            _warn_schedule_jump(self.checkpointer.resolve(), self.state.step, cfg)
        # resumed with nothing left to train: run() returns at once; the checkpoint and the run folder
        # (config.toml, metrics.jsonl, tb/) stay as they are (a re-save rewrote the step folder)
        spent_min = self.state.train_seconds / 60  # train.max_minutes counts every segment of the run
        if self.state.step and self.state.step >= tc.max_steps:
            why = f"not below train.max_steps={tc.max_steps}", "--train.max_steps"
        elif self.state.step and tc.max_minutes and spent_min >= tc.max_minutes:
            why = (f"after {spent_min:.2f} min of training, not below train.max_minutes={tc.max_minutes:g}",
                   "--train.max_minutes (or 0: no limit)")
        else:
            why = None
        # the run's time budget already spent: the final evaluation and checkpoint only (no step trained)
        self.out_of_time = why is not None and self.state.step < tc.max_steps
        if why is not None and self._resumed_reason() == "preempted":
            # stopped by a signal in its last step (or as its time ran out): the loop has nothing left
            # but the run never had its final evaluation and checkpoint; run() does them now
            log.warning("resumed at step %d, %s, from a checkpoint saved when the run was stopped by a signal: "
                        "no step to train; running the final evaluation and checkpoint it did not reach",
                        self.state.step, why[0])
            why = None
        self.nothing_to_train = why is not None
        if why is not None:
            log.warning("resumed at step %d, %s: nothing to train; %s and the run folder are left as they are (no "
                        "evaluation, no checkpoint); pass a larger %s to continue", self.state.step, why[0],
                        self.checkpointer.resolve(), why[1])
        for group, own in zip(self.optimizer.param_groups, mine):
            group.update(own)
        from clusterlm.train.ema import WeightEMA

        self.ema = WeightEMA(self.optimizer, cfg.optim.ema_decay)
        self.ema.restore_after_load()  # a checkpoint written with the average as its model
        self._log_plan()
        if not self.nothing_to_train:
            if self.state.step:
                self.checkpointer.reconcile_best(self.state)
            self._open_run_dir()
        self.last_loss: float | None = None
        self.last_val: float | None = None
        self._val_at: tuple[int, float] | None = None  # (step, val loss) of the last evaluation
        self._evaluated_at = self._tasks_at = -1  # the steps maybe_eval last evaluated at (the final one skips them)
        self.last_ckpt: Path | None = None

    # ---- set-up helpers --------------------------------------------------------------------------
    def _start_loss_scale(self) -> None:
        """fp16 autocast scales the loss (train/amp.py): from 2^16 in a fresh run (or one resumed from a
        run that did not scale), from the checkpoint's scale in a resumed one; other dtypes do not."""
        from clusterlm.train.amp import LossScale

        state = self.state
        if self.amp_dtype != torch.float16:
            state.loss_scale, state.loss_scale_streak = None, 0
        elif state.loss_scale is None:
            start = LossScale.start()
            state.loss_scale, state.loss_scale_streak = start.scale, start.streak
            log.info("fp16 autocast: dynamic loss scaling from %g (docs/training.md)", start.scale)

    def _resumed_reason(self) -> str | None:
        """Why the checkpoint this run resumed from was saved ("periodic", "final", "preempted", ...)."""
        from clusterlm.checkpoint.store import read_info

        path = self.checkpointer.resolve()
        return read_info(path).train_state.get("reason") if path is not None else None

    def _init_process(self, cfg: RunConfig) -> torch.device:
        """The device; under torchrun/srun the process group first (after a layout check, so a wrong
        world size fails before any process group or model exists)."""
        from clusterlm.parallel.launch import init_distributed
        from clusterlm.parallel.dims import validate_layout

        tc, env = cfg.train, self.env
        if not self.distributed:
            return resolve_device(tc.device)
        if cfg.model.vocab_size:  # else it comes from the data; checked again below either way
            validate_layout(cfg.parallel, cfg.model, env.world_size, tc.global_batch_tokens, tc.micro_batch_size,
                            tc.seq_len)
        if env.rank != 0:
            from clusterlm.log import setup_logging

            setup_logging(env.rank)  # warnings and errors only, prefixed [rank N]
        return init_distributed(env, device_type=tc.device)

    def _resolve_data(self, cfg: RunConfig) -> RunConfig:
        """Prepare the data if needed (rank 0 first; the others then read it), take the vocabulary
        size from its tokenizer, check the layout; returns the config with both filled in."""
        from clusterlm.data.shards import read_meta
        from clusterlm.parallel.agree import rank0_first
        from clusterlm.parallel.dims import validate_layout

        tc = cfg.train
        self.base = None
        task, arch = cfg.finetune.task, cfg.model.arch
        if cfg.model.labels and task != "classify":  # a head under a language-modelling loss
            raise ConfigError(f"model.labels={list(cfg.model.labels)!r} makes a classifier, which "
                              f"finetune.task='classify' trains (labels from its data or finetune.labels); "
                              f"finetune.task={task!r} trains a language model: leave model.labels unset")
        if task == "lm" and arch in ("encoder", "encdec"):  # the next-token loss is a causal model's
            use = ("finetune.task='mlm' (masked LM): a bidirectional encoder sees the next token, so the next-token "
                   "loss would teach it to copy" if arch == "encoder" else
                   "finetune.task='span' (T5's span corruption) on token shards, or 'seq2seq' on pairs")
            raise ConfigError(f"finetune.task='lm' (next-token pre-training) is for causal models, but "
                              f"model.arch={arch!r}; use {use} (docs/encdec.md)")
        if task != "lm":
            from clusterlm.finetune.data import ensure_finetune_data
            from clusterlm.finetune.setup import new_folders

            made = new_folders(Path(cfg.data.dir)) if self.rank0 else ()  # rank 0 prepares it
            if task in ("mlm", "span") and self.rank0:  # the masked view it makes in OUT_DIR (data/mlm.py)
                from clusterlm.data.mlm import SPAN_VIEW, VIEW

                self.made.append(new_folders(Path(tc.out_dir) / (SPAN_VIEW if task == "span" else VIEW)))
            data_dir, self.base, mcfg = rank0_first(
                self.distributed, self.env.rank, lambda: ensure_finetune_data(cfg), what=f"preparing {cfg.data.dir}",
                device=self.device)
            self.made += [made, self.base.made if self.base is not None else ()]
            self.meta = meta = read_meta(data_dir)
        else:
            from clusterlm.finetune.setup import new_folders

            self.made.append(new_folders(Path(cfg.data.dir)) if self.rank0 else ())  # a refusal below removes it
            data_dir = rank0_first(self.distributed, self.env.rank, lambda: ensure_data(cfg.data),
                                   what=f"preparing {cfg.data.dir}", device=self.device)
            self.meta = meta = read_meta(data_dir)
            if meta.get("layout") == "examples":
                raise ConfigError(f"data.dir={str(data_dir)!r} holds fine-tuning examples ({meta.get('task')}); set "
                                  f"finetune.task = {meta.get('task')!r} to train on them")
            vocab = int(meta["tokenizer"]["vocab_size"])
            mcfg = cfg.model
            if mcfg.vocab_size is None:
                mcfg = mcfg.with_vocab(vocab)
            elif mcfg.vocab_size < vocab:
                raise ConfigError(f"model.vocab_size={mcfg.vocab_size} is smaller than the tokenizer's {vocab} "
                                  f"tokens in {data_dir}; leave it unset to take the tokenizer's size")
        check_seq_len(tc.seq_len, mcfg.max_seq_len)
        self.data_dir = data_dir
        self.tokenizer_file = data_dir / meta["tokenizer"]["file"]
        if not self.tokenizer_file.is_file():  # every checkpoint carries it: refused now, not at the first save
            raise DataError(f"{self.tokenizer_file} is missing: {data_dir}/meta.json names it as the data's tokenizer; "
                            "prepare the data again (clusterlm prepare) or put the tokenizer file back")
        self.examples = meta.get("layout") == "examples"
        no_val = why_no_val(meta, data_dir, tc.seq_len)
        self.has_val = no_val is None
        if cfg.checkpoint.keep_best and no_val:
            raise ConfigError(f"checkpoint.keep_best needs a validation loss, but {no_val}; or set "
                              "checkpoint.keep_best = false")
        if no_val:
            log.warning("no validation loss in this run: %s", no_val)
        self.dims = validate_layout(cfg.parallel, mcfg, self.env.world_size, tc.global_batch_tokens,
                                    tc.micro_batch_size, tc.seq_len)
        if cfg.finetune.task != "lm" and (self.dims.tp > 1 or self.dims.pp > 1):
            raise ConfigError(f"fine-tuning runs under data parallelism (DDP, FSDP: parallel.dp_replicate, dp_shard), "
                              f"not tp={self.dims.tp} pp={self.dims.pp}")
        return dataclasses.replace(cfg, model=mcfg, data=dataclasses.replace(cfg.data, dir=str(data_dir)))

    @property
    def pad_id(self) -> int:
        from clusterlm.tokenizer import load_tokenizer

        if not hasattr(self, "_pad_id"):
            self._pad_id = load_tokenizer(self.tokenizer_file).pad_id
        return self._pad_id

    def _classify_loss(self):  # noqa: ANN202 - a ClassifyLoss
        """Cross-entropy over the labels, with finetune.class_weights from the training labels."""
        from clusterlm.data.sft import ExampleSplit
        from clusterlm.finetune.setup import ClassifyLoss, balanced_weights

        weight = None
        labels = self.cfg.model.labels
        train_labels = ExampleSplit(self.data_dir, "train").arrays["labels"]
        counts = torch.bincount(torch.as_tensor(train_labels, dtype=torch.int64), minlength=len(labels)).tolist()
        if absent := [name for name, c in zip(labels, counts) if c == 0]:
            log.warning("label(s) %s have no training example (%d training texts): the classifier cannot learn "
                        "to predict them%s", ", ".join(map(repr, absent)), len(train_labels),
                        " (their balanced class weight is 0)" if self.cfg.finetune.class_weights == "balanced" else "")
        if self.cfg.finetune.class_weights == "balanced":
            weight = balanced_weights(train_labels, len(labels))
            log.info("class weights (balanced): %s", ", ".join(f"{n} {w:.3f}" for n, w in zip(labels, weight.tolist())))
        return ClassifyLoss(weight)

    def _distill_targets(self) -> dict:
        """finetune.distill_from: the loader's soft_targets (the teachers' averaged probabilities on
        the training split, scored by rank 0 into the run folder, then read by the others) and weight."""
        ft = self.cfg.finetune
        if not ft.distill_from:
            return {}
        from clusterlm.finetune.distill import teacher_probs
        from clusterlm.parallel.agree import rank0_first

        probs = rank0_first(self.distributed, self.env.rank,
                            lambda: teacher_probs(ft.distill_from, self.data_dir, self.out_dir, seq_len=self.tc.seq_len,
                                                  device=self.device),
                            what="scoring the training examples with the teachers", device=self.device)
        return {"soft_targets": probs, "soft_weight": ft.distill_weight}

    def _load_base(self) -> None:
        """The base model's weights into the freshly built (possibly sharded) model."""
        from clusterlm.checkpoint.manager import load_weights
        from clusterlm.finetune.setup import base_state, expected_missing, trainable_summary

        base = self.base
        state = base_state(base, self.cfg.model)
        missing = load_weights(self.model, state, distributed=self.distributed, where=str(base.path))
        bad = expected_missing(self.model, missing)
        if bad:
            raise ConfigError(f"finetune.init_from={base.path} lacks {len(bad)} tensors the model needs "
                              f"(first: {bad[0]}); is it a model of this architecture?")
        log.info("fine-tuning %s from %s: %s", self.cfg.finetune.task, base.path, trainable_summary(self.model))

    def _load_tasks(self, cfg: RunConfig) -> list:
        """The [eval] tasks, loaded once and checked against the model's context (an unknown name, a
        bad file or an input too long fails here, naming the task), on every rank together. Task eval
        splits the model calls over the data-parallel ranks (DDP, FSDP); tensor and pipeline parallel
        layouts are refused, and so are generate tasks under FSDP (docs/training.md)."""
        ec = cfg.eval
        if not ec.tasks:
            return []
        from clusterlm.eval.harness import DecodeOptions, check_fits, resolve_task
        from clusterlm.generate.template import read_template
        from clusterlm.parallel.agree import agree_any
        from clusterlm.tokenizer import load_tokenizer

        dims, mcfg = self.dims, cfg.model
        self.task_decode = DecodeOptions(max_new_tokens=ec.max_new_tokens, temperature=ec.temperature, seed=ec.seed)
        # FSDP gathers the parameters in every forward: every rank must make the same forward calls
        self.task_pad = self.distributed and dims.dp_shard > 1
        tasks, problem = [], None
        try:
            if dims.tp > 1 or dims.pp > 1:
                raise ConfigError(f"eval.tasks: task evaluation during training runs under data parallelism only "
                                  f"(DDP, FSDP), not tp={dims.tp} pp={dims.pp}; score the checkpoints with "
                                  "`clusterlm eval RUN --task ...` instead")
            self.task_tokenizer = tok = load_tokenizer(self.tokenizer_file)
            # a chat fine-tune's tasks are asked in its own template (chat_template.jinja beside the tokenizer)
            tok.chat_template = read_template(self.tokenizer_file.parent)
            context = mcfg.max_seq_len if mcfg.arch == "transformer" else None
            named: dict[str, str] = {}
            for spec in ec.tasks:
                task = resolve_task(spec, limit=ec.limit or None)
                if task.name in named:  # metrics.jsonl keys task records by name: two would be one series
                    raise ConfigError(f"eval.tasks: {named[task.name]!r} and {spec!r} are both named {task.name!r}, "
                                      "and their scores would be logged as one task: give one a \"name\" in a "
                                      "header record (docs/tasks.md) or rename its file")
                named[task.name] = spec
                if self.task_pad and task.kind == "generate":
                    raise ConfigError(f"eval.tasks: {spec!r} is a generate task; under FSDP (parallel.dp_shard="
                                      f"{dims.dp_shard}) every rank must make the same forward calls and a "
                                      "generation's number depends on its output: use choice/classify tasks, DDP, "
                                      "or `clusterlm eval RUN --task ...` on the checkpoints")
                # a classifier answers classify tasks with its own labels: checked now, not after the last step
                check_fits(task, tok, context, self.task_decode, ec.truncate, labels=tuple(mcfg.labels) or None)
                tasks.append(task)
        except (ConfigError, DataError, OSError) as e:
            problem = e
        (failed,) = agree_any(self.distributed, problem is not None, device=self.device)
        if problem is not None:
            raise problem
        if failed:
            raise ConfigError("eval.tasks failed to load on another rank (its message names the task)")
        log.info("eval tasks: %s, every %s", ", ".join(f"{t.name} ({t.kind}, {len(t.examples)} examples)"
                                                        for t in tasks),
                 f"{ec.every} steps and at the end" if ec.every else "only at the end")
        return tasks

    def _log_plan(self) -> None:
        """The derived numbers, printed once (llm.c style)."""
        from clusterlm.train.metrics import device_peak_flops, flops_per_token, mfu_devices, peak_dtype
        from clusterlm.train.optim import schedule_warning

        tc, mcfg, device = self.tc, self.cfg.model, self.device
        # a masked-LM step runs the head and output layer at the corrupted positions only (data/mlm.py predicting)
        self.flops = flops_per_token(mcfg, tc.seq_len,
                                     self.cfg.finetune.mask_prob if self.cfg.finetune.task == "mlm" else 1.0)
        dtype = peak_dtype(self.amp_dtype)
        self.peak, peak_source = device_peak_flops(device, dtype, measured_peak=_probed_peak(tc.probe_spec, dtype))
        if tc.probe_spec and self.peak is not None:
            peak_source = f"{tc.probe_spec}: {peak_source}"
        # MFU is against every device's peak: tokens/s counts all data-parallel ranks' tokens
        self.mfu_devices = mfu_devices(device.type, self.env.world_size, self.env.local_world_size)
        if self.mfu_devices > 1 and self.peak is not None:
            peak_source += f"; MFU against {self.mfu_devices} x this peak ({self.mfu_devices} devices)"
        log.info("model: %s, %s parameters (%s without embeddings)", mcfg.arch, f"{mcfg.num_params():,}",
                 f"{mcfg.num_params(include_embeddings=False):,}")
        log.info("batch: %d x %d tokens per micro-batch, %d accumulation steps, %s%s tokens per step",
                 tc.micro_batch_size, tc.seq_len, self.accum, "at most " if self.padded else "",
                 f"{self.tokens_per_step:,}")
        log.info("FLOPs/token: %.3g (%s)", self.flops["total"], self.flops["convention"])
        if warning := schedule_warning(self.cfg.optim, tc.max_steps):
            log.warning("%s", warning)
        log.info("layout: %s on %d process(es) (%s)", self.dims.describe(), self.env.world_size, self.pm.kind)
        log.info("device: %s, autocast %s, peak %s (%s), compile=%s", device, self.amp_dtype or "off (fp32)",
                 f"{self.peak / 1e12:.4g} TFLOP/s" if self.peak else "unknown", peak_source, tc.compile)
        log.info("data: %s (%s train tokens, %d samples/epoch)", self.data_dir,
                 f"{self.meta['splits']['train']['tokens']:,}", self.loader.num_samples)

    def _open_run_dir(self) -> None:
        """config.toml (rank 0, atomic: a full disk leaves the previous one) and the metrics log, cut
        back to the resumed step (a fresh start keeps an earlier run's metrics.jsonl aside instead)."""
        from clusterlm.fsutil import atomic_write_text
        from clusterlm.train.metrics import MetricsLogger

        if self.rank0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self._lock_out_dir()  # a folder made just now (a second run started at the same time is refused here)
        if self.rank0:
            try:
                atomic_write_text(self.out_dir / "config.toml", to_toml(self.cfg))
            except OSError as e:
                if e.filename is not None:
                    raise
                raise OSError(e.errno, e.strerror or str(e), str(self.out_dir / "config.toml")) from e
        self.metrics = MetricsLogger(self.out_dir, tensorboard=self.tc.tensorboard, enabled=self.rank0)
        if self.checkpointer.resolve() is None:  # a fresh start: an earlier run's log is kept aside, not cut
            self.metrics.start_fresh()
        else:
            self.metrics.truncate_after(self.state.step)

    def autocast(self) -> contextlib.AbstractContextManager:
        return device_autocast(self.device, self.amp_dtype)

    # ---- the loop --------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        from tqdm.auto import tqdm

        from clusterlm.train.metrics import Throughput

        tc, state = self.tc, self.state
        if self.nothing_to_train:  # warned at set-up: nothing is written
            self._release_lock()
            log.warning("nothing trained or written: resumed at step %d, at train.max_steps or train.max_minutes "
                        "(see above); checkpoint %s", state.step, self.checkpointer.resolve())
            return TrainResult(EXIT_OK, state.step, self.out_dir, None, None, self.checkpointer.resolve(),
                               f"nothing to train (resumed at step {state.step}: train.max_steps={tc.max_steps}, "
                               f"train.max_minutes={tc.max_minutes:g})")
        stop: dict[str, Any] = {}
        previous_handlers = _install_stop_handlers(stop)
        self.heartbeat = self._start_heartbeat()
        self._t_start = time.perf_counter()  # this segment's wall time goes into RunState.train_seconds
        self.throughput = Throughput()
        exit_code, reason = EXIT_OK, "finished"
        self.bar = tqdm(total=tc.max_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
                        disable=not sys.stderr.isatty() or not self.rank0, leave=False)
        try:
            self.model.train()
            if self.out_of_time:  # resumed from a signal's checkpoint with train.max_minutes spent
                reason = f"time limit of {tc.max_minutes} min reached"
            while state.step < tc.max_steps and not self.out_of_time:
                t0 = time.perf_counter()
                loss, grad_norm, lr = self.train_step()
                self.log_step(loss, grad_norm, lr, time.perf_counter() - t0)
                self.log_ranks(time.perf_counter() - t0)  # this rank's time before the closing all-reduce
                stop_signal, over_time = self.agree_stop(stop)  # the same answer on every rank
                if state.bad_streak >= tc.max_bad_steps:
                    exit_code, reason = EXIT_DIVERGED, f"{state.bad_streak} consecutive non-finite losses"
                    log.error("stopping: %s (train.max_bad_steps=%d); the last good weights are saved", reason,
                              tc.max_bad_steps)
                    self.save("diverged")
                    break
                self.maybe_eval()
                if stop_signal:
                    exit_code, reason = EXIT_PREEMPTED, f"stopped by {stop_signal}"
                    self.save("preempted")
                    break
                if over_time:
                    reason = f"time limit of {tc.max_minutes} min reached"
                    log.info("%s at step %d", reason, state.step)
                    break
                self.maybe_save()
            if exit_code == EXIT_OK:  # finished or out of time: a last evaluation and checkpoint
                if self._evaluated_at != state.step:  # out of time at an eval_interval step: done above
                    self.evaluate()
                if self._tasks_at != state.step:
                    self.evaluate_tasks()
                self.save("final")
        finally:
            if self.heartbeat is not None:
                self.heartbeat.stop()
            self.bar.close()
            _restore_handlers(previous_handlers)
            self.metrics.close()
            self._release_lock()
        log.info("%s at step %d: train loss %s, val loss %s; checkpoint %s", reason, state.step,
                 f"{self.last_loss:.4f}" if self.last_loss is not None else "n/a",
                 f"{self.last_val:.4f}" if self.last_val is not None else "n/a", self.last_ckpt)
        return TrainResult(exit_code, state.step, self.out_dir, self.last_loss, self.last_val, self.last_ckpt,
                           reason)

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over `accum` micro-batches; returns (loss, grad norm, lr), global over
        ranks. A non-finite loss or gradient skips the optimizer step (counted in the RunState)."""
        from clusterlm.train.amp import LossScale
        from clusterlm.train.optim import lr_at, set_lr

        tc, state, opt, pm = self.tc, self.state, self.optimizer, self.pm
        lr = lr_at(state.step, self.cfg.optim, tc.max_steps)
        set_lr(opt, lr, state.step)  # times each group's layer scale; 0 for a group not yet unfrozen
        loss_sum = torch.zeros((), device=self.device)
        batches = [next(self.loader) for _ in range(self.accum)]
        if hasattr(pm.loss_fn, "denominator"):  # SFT, classify: one mean over the whole step, all ranks
            local = torch.tensor(sum(pm.loss_fn.denominator(y) for _, y in batches), device=self.device)
            total = float(pm.mean_over_dp(local)) * self.dims.dp  # trained tokens, or (weighted) examples
            pm.loss_fn.scale = self.accum * self.dims.dp / (total if total > 0 else 1.0)
        if self.padded:
            self.step_tokens = self.step_positions(batches)
        scale = LossScale(state.loss_scale, state.loss_scale_streak) if state.loss_scale is not None else None
        for i, (x, y) in enumerate(batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # gradients are reduced across data-parallel ranks on the last micro-batch only
            loss_sum += pm.forward_backward(x, y, accum=self.accum, sync=i == self.accum - 1, autocast=self.autocast,
                                            loss_scale=scale.scale if scale is not None else 1.0)
        loss = float(pm.mean_over_dp(loss_sum))  # one host sync per step: NaN check and log
        if scale is not None:
            pm.unscale_grads_(scale.scale)
        grad_norm = pm.clip_grad_norm_(tc.grad_clip)  # global: every rank skips (or not) alike
        if math.isfinite(loss) and math.isfinite(grad_norm):
            opt.step()
            self.ema.update(state.step - state.bad_steps_total - state.overflow_steps)  # steps taken before this one
            state.bad_streak = 0
            self.last_loss = loss
            if scale is not None:
                scale = scale.finite()
        elif scale is not None and math.isfinite(loss) and scale.can_back_off:
            # fp16 overflow of the scaled gradients: skip the step, halve the scale (not a bad step)
            state.overflow_steps += 1
            scale = scale.overflowed()
            log.info("step %d: fp16 gradients overflowed at loss scale %g: step skipped, scale now %g",
                     state.step + 1, state.loss_scale, scale.scale)
        else:
            state.bad_steps_total += 1
            state.bad_streak += 1
            if scale is not None:  # the scale stays, but "2,000 finite steps in a row" start again
                scale = dataclasses.replace(scale, streak=0)
            log.warning("step %d: loss=%s grad_norm=%s is not finite: optimizer step skipped (%d in a row, "
                        "limit %d)", state.step + 1, loss, grad_norm, state.bad_streak, tc.max_bad_steps)
        if scale is not None:
            state.loss_scale, state.loss_scale_streak = scale.scale, scale.streak
        opt.zero_grad(set_to_none=True)
        state.step += 1
        state.tokens_seen += self.step_tokens
        return loss, grad_norm, lr

    def step_positions(self, batches: list) -> int:
        """Token positions this step computes on every data-parallel rank: padded rows are as wide as
        their micro-batch's longest example, usually far less than seq_len. A seq2seq pair counts its
        decoder positions (FLOPs/token is per target token, cluster/flops.py)."""
        local = sum((x[1] if isinstance(x, tuple) else x).numel() for x, _ in batches)
        if not self.distributed:
            return local
        counts = torch.tensor(float(local), dtype=torch.float64, device=self.device)
        return round(float(self.pm.mean_over_dp(counts)) * self.dims.dp)

    def log_step(self, loss: float, grad_norm: float, lr: float, dt: float) -> None:
        """metrics.jsonl every step (TensorBoard and the console every log_interval steps), progress bar."""
        from clusterlm.train.metrics import memory_stats, mfu

        tc, state, plan = self.tc, self.state, self.cfg.plan
        tps = self.throughput.update(self.step_tokens, dt)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        record = {"kind": "train", "step": state.step, "tokens": state.tokens_seen, "loss": loss, "lr": lr,
                  "grad_norm": grad_norm, "skipped": not finite, "step_time_s": dt, "tokens_per_s": tps,
                  **({"loss_scale": state.loss_scale} if state.loss_scale is not None else {}),
                  "mfu": mfu(tps, self.flops["total"], self.peak and self.peak * self.mfu_devices)}
        # [plan]'s figures, named predicted_X after the measured field X the report pairs them with
        # (predicted_step_s and predicted_memory_bytes matched no field: the report's measured column was empty)
        if plan.predicted_step_s:
            record["predicted_step_time_s"] = plan.predicted_step_s
        if plan.predicted_tokens_per_s:
            record["predicted_tokens_per_s"] = plan.predicted_tokens_per_s
        if state.step % tc.log_interval == 0 or state.step == tc.max_steps:
            stats = memory_stats(self.device)
            record.update(stats)
            if plan.predicted_memory_bytes:
                peak = "cuda_max_allocated_bytes" if "cuda_max_allocated_bytes" in stats else "cpu_peak_rss_bytes"
                record[f"predicted_{peak}"] = plan.predicted_memory_bytes
            planned = f"  (plan: {plan.predicted_step_s * 1e3:.1f} ms/step)" if plan.predicted_step_s else ""
            log.info("step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f  %.0f tok/s  %.1f ms/step%s",
                     state.step, tc.max_steps, loss, lr, grad_norm, tps, dt * 1e3, planned)
        self.metrics.log(record, tensorboard=state.step % tc.log_interval == 0)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)

    def _start_heartbeat(self):  # -> clusterlm.parallel.heartbeat.Heartbeat | None
        """Distributed runs with train.heartbeat_timeout > 0: this rank's heartbeat thread (a silent rank
        is named and the job exits EXIT_RANK_LOST) and rank 0's straggler check (docs/reliability.md)."""
        if not self.distributed or not self.tc.heartbeat_timeout:
            return None
        from clusterlm.parallel.heartbeat import GradSyncTimer, Heartbeat, Stragglers, exit_rank_lost

        self.stragglers = Stragglers()
        # DDP: time each rank's wait in the gradient all-reduce (a comm hook, before the first forward)
        self.grad_sync = GradSyncTimer.install(self.pm.wrapped) if self.pm.kind == "ddp" else None
        hb = Heartbeat.for_process_group(self.tc.heartbeat_timeout, on_lost=exit_rank_lost)
        hb.start()
        return hb

    def log_ranks(self, busy_s: float) -> None:
        """Publish this step's time and its wait in the gradient all-reduce; every log_interval rank 0 logs
        each rank's mean compute and wait ("ranks" record) and names a straggler (compute >= 1.5x the
        other ranks' median for 2 intervals in a row)."""
        if self.heartbeat is None:
            return
        self.heartbeat.progress(self.state.step, busy_s, self.grad_sync.take() if self.grad_sync else 0.0)
        if not self.rank0 or self.state.step % self.tc.log_interval:
            return
        beats = self.heartbeat.read_all()
        means, lines = self.stragglers.update(beats)
        for line in lines.values():
            log.warning("step %d: %s", self.state.step, line)
        if means:
            self.metrics.log({"kind": "ranks", "step": self.state.step, "step_s": {str(r): means[r] for r in means},
                              "wait_s": {str(r): w for r, w in self.stragglers.waits.items()},
                              "hosts": {str(r): beats[r].host for r in means},
                              "stragglers": sorted(lines)}, tensorboard=False)

    def agree_stop(self, stop: dict[str, Any]) -> tuple[str | None, bool]:
        """(the stop signal's name or None, time limit reached), agreed by all ranks (one all-reduce)."""
        from clusterlm.parallel.agree import agree_any

        tc, state = self.tc, self.state
        elapsed = state.train_seconds + time.perf_counter() - self._t_start
        over_time = bool(tc.max_minutes and elapsed >= tc.max_minutes * 60 and state.step < tc.max_steps)
        stop_signal, over_time = agree_any(self.distributed, bool(stop.get("signal")), over_time, device=self.device)
        if stop_signal and not stop.get("signal"):
            stop["signal"] = "a signal on another rank"
        return (stop["signal"] if stop_signal else None), over_time

    def maybe_eval(self) -> None:
        interval, step = self.tc.eval_interval, self.state.step
        if interval and step % interval == 0 and step < self.tc.max_steps:
            self.evaluate()
            self._evaluated_at = step
        every = self.cfg.eval.every
        if self.tasks and every and step % every == 0 and step < self.tc.max_steps:
            self.evaluate_tasks()
            self._tasks_at = step

    def maybe_save(self) -> None:
        interval, step = self.cfg.checkpoint.interval, self.state.step
        if interval and step % interval == 0 and step < self.tc.max_steps:
            self.save("periodic")

    def evaluate(self) -> None:
        """Validation loss (every rank evaluates the same batches, so the collectives of FSDP/TP/PP
        stay in step); logged and kept as last_val. Nothing without a validation split. With
        optim.ema_decay, of the averaged weights."""
        with self.ema.applied():
            self._evaluate()

    def _evaluate(self) -> None:
        from clusterlm.data.loader import iter_eval_batches
        from clusterlm.eval.metrics import evaluate_loss

        if not self.has_val:
            self.last_val = None
            return
        tc, state = self.tc, self.state
        extra: dict[str, Any] = {}
        if self.cfg.finetune.task in ("mlm", "seq2seq", "span"):
            from clusterlm.finetune.objectives import val_batches

            batches = val_batches(self.cfg, self.data_dir, self.tokenizer_file)
        elif self.examples:
            from clusterlm.data.sft import iter_example_batches

            batches = iter_example_batches(self.data_dir, "val", tc.micro_batch_size, tc.seq_len, pad_id=self.pad_id,
                                           pack=self.cfg.finetune.pack, max_batches=tc.eval_batches)
        else:
            batches = iter_eval_batches(self.data_dir, "val", tc.micro_batch_size, tc.seq_len,
                                        max_batches=tc.eval_batches)
        if self.cfg.model.labels:
            from clusterlm.finetune.evaluate import evaluate_classifier

            extra = evaluate_classifier(self.pm.inference_module, batches, self.cfg.model.labels, self.pm.loss_fn,
                                        device=self.device, autocast=self.autocast)
            val = extra.pop("loss")
        elif self.dims.pp > 1:
            val = self.pm.pipeline_eval_loss(batches, self.device, self.autocast)  # full batches only
        else:
            val = float(evaluate_loss(self.pm.inference_module, batches, device=self.device,
                                      autocast_dtype=self.amp_dtype)["loss"])
        self.last_val = val
        if val is None:
            return
        self._val_at = (state.step, val)  # checkpoint.keep_best: a save at this step is scored by it
        if state.best_val_loss is None or val < state.best_val_loss:
            state.best_val_loss = val
        record = {"kind": "eval", "step": state.step, "tokens": state.tokens_seen, "val_loss": val}
        if self.cfg.model.labels:
            record.update({f"val_{k}": v for k, v in extra.items() if isinstance(v, (int, float))})
        else:
            record["val_ppl"] = math.exp(min(val, 50.0))
        self.metrics.log(record)
        scores = "".join(f", {k} {extra[k]:.4f}" for k in ("accuracy", "macro_f1") if k in extra)
        log.info("step %d: val loss %.4f (best %.4f)%s", state.step, val, state.best_val_loss, scores)

    def evaluate_tasks(self) -> None:
        """Score the [eval] tasks on the current weights: one "task" record per task in metrics.jsonl
        (its scalars to TensorBoard as task/<name>/<metric>) and one line on rank 0. Each data-parallel
        rank answers its block of the model calls, every rank scores the gathered answers
        (eval.harness.run_task_split); under FSDP the blocks are padded to equal length. eval.lm puts the
        model in eval mode under inference_mode and restores train mode; the RNG states are forked, so
        training draws the same numbers (and has the same losses) with and without [eval]."""
        if not self.tasks:
            return
        from clusterlm.eval.harness import run_task_split
        from clusterlm.parallel.gather import gather_objects
        from clusterlm.train.metrics import task_record

        state, ec, rank = self.state, self.cfg.eval, self.pm.coords.dp_rank
        wall = state.train_seconds + time.perf_counter() - self._t_start  # the run's wall time at these weights
        scored = state.task_scoring_seconds  # the scoring in `wall`: the same for each task scored at these weights

        def gather(answers: list) -> list[list]:
            parts = gather_objects((rank, answers), self.distributed)
            return [a for _, a in sorted(parts, key=lambda p: p[0])]

        devices = [self.device] if self.device.type == "cuda" else []
        with self.ema.applied():
            for task in self.tasks:
                t0 = time.perf_counter()
                with torch.random.fork_rng(devices=devices):
                    metrics, _ = run_task_split(self.pm.module, self.task_tokenizer, task, rank=rank,
                                                world=self.dims.dp, gather=gather, pad=self.task_pad,
                                                batch_size=ec.batch_size, decode=self.task_decode,
                                                truncate=ec.truncate, device=self.device, progress=False)
                record = task_record(metrics, step=state.step, tokens=state.tokens_seen, wall_s=wall,
                                     eval_s=time.perf_counter() - t0, scoring_s=scored)
                state.task_scoring_seconds += record["eval_s"]  # saved with the run: a resume goes on counting
                self.metrics.log(record)
                log.info("step %d: task %s", state.step, _task_line(record))

    def save(self, reason: str) -> None:
        """A checkpoint of this step (collective when distributed), with the wall time of this segment
        added to the RunState first; logged as an event."""
        now = time.perf_counter()
        self.state.train_seconds += now - self._t_start
        self._t_start = now
        ckpt, state, best = self.checkpointer, self.state, False
        if self.cfg.checkpoint.keep_best and self._val_at is not None and self._val_at[0] == state.step:
            val = self._val_at[1]  # the lowest among saved steps (an evaluation between saves keeps nothing)
            if state.best_saved_val_loss is None or val < state.best_saved_val_loss:
                state.best_saved_val_loss, state.best_saved_step, best = val, state.step, True
        with self.ema.applied(for_checkpoint=True):  # with optim.ema_decay the model saved is the average
            self.last_ckpt = path = ckpt.save(state, self.model, self.optimizer, self.loader, reason=reason, best=best)
            if reason == "final" and self.cfg.finetune.lora_rank:
                from clusterlm.finetune.lora import save_adapters

                # collective under FSDP (the adapters are gathered); rank 0 writes OUT_DIR/adapter with
                # the paths relative to it (the run folder can move) and the fine-tune's tokenizer and
                # template (its chat tokens grew the base's vocabulary: a server grows it the same way)
                where = (self.out_dir / "adapter").resolve()
                rel = lambda p: os.path.relpath(Path(p).resolve(), where)  # noqa: E731
                save_adapters(self.out_dir / "adapter", self.model,
                              {"base": rel(self.base.path) if self.base else None, "checkpoint": rel(path),
                               "vocab_size": self.cfg.model.vocab_size},
                              overwrite=True, write=self.rank0, tokenizer_path=self.tokenizer_file)
        event = {"kind": "event", "step": self.state.step, "event": "checkpoint", "path": str(path), "reason": reason}
        if ckpt.distributed:
            event["async"] = ckpt.writes_async(reason)
        self.metrics.log(event)


SCHEDULE_KEYS = ("lr", "min_lr", "schedule", "warmup_steps", "decay_steps", "wsd_decay_fraction")


def _warn_schedule_jump(ckpt: Path | None, step: int, cfg: RunConfig) -> None:
    """Warn when a resume at `step` changes the learning rate there: lr_at of this run's [optim] and
    train.max_steps against the checkpoint's (its config.toml). A cosine run of 2000 steps resumed with
    --train.max_steps=4000 went from min_lr back to most of the peak without a word in the log."""
    import tomllib

    from clusterlm.train.optim import lr_at

    try:
        saved = tomllib.loads((Path(ckpt) / "config.toml").read_text(encoding="utf-8"))
        max_steps = int(saved["train"]["max_steps"])
        given = {k: saved["optim"][k] for k in SCHEDULE_KEYS if k in saved.get("optim", {})}
        before = lr_at(step, dataclasses.replace(cfg.optim, **given), max_steps)
    except (OSError, TypeError, KeyError, ValueError, tomllib.TOMLDecodeError, ConfigError):
        return  # no readable config.toml (an older or foreign checkpoint): nothing to compare
    now = lr_at(step, cfg.optim, cfg.train.max_steps)
    if math.isclose(before, now, rel_tol=1e-6, abs_tol=0.0):
        return
    changed = [f"train.max_steps {max_steps} -> {cfg.train.max_steps}"] if max_steps != cfg.train.max_steps else []
    changed += [f"optim.{k} {given[k]} -> {getattr(cfg.optim, k)}" for k in SCHEDULE_KEYS
                if k in given and given[k] != getattr(cfg.optim, k)]
    log.warning("resumed at step %d with lr %.3g, where the checkpoint's schedule was at %.3g (%s): the learning "
                "rate jumps (the schedule is a function of the step and this run's settings, docs/training.md)", step, now, before,
                ", ".join(changed))


def _as_tuple(v: Any) -> tuple:
    """A param-group value as a tuple, for comparing (betas is a pair, the rest numbers)."""
    return tuple(v) if isinstance(v, (list, tuple)) else (v,)


def _task_line(record: dict[str, Any]) -> str:
    from clusterlm.train.metrics import TASK_HEADLINE

    m = record["metrics"]
    scores = "  ".join(f"{k} {m[k]:.4g}" for k in TASK_HEADLINE.get(record["task_kind"], m) if k in m)
    return f"{record['task']} ({record['task_kind']}, {record['n']} examples, {record['eval_s']:.1f} s): {scores}"


def main(argv: list[str], *, finetune: bool = False) -> int:
    """`clusterlm train` (and `clusterlm finetune`, which needs a recipe with a [finetune] task other than lm)."""
    overrides, rest = split_overrides(argv)
    what = ("Fine-tune a base model from a recipe with a [finetune] section (task sft, classify or seq2seq; "
            "docs/finetune.md)" if finetune else "Train a model from a recipe")
    parser = argparse.ArgumentParser(
        prog="clusterlm finetune" if finetune else "clusterlm train",
        description=f"{what}. Any config key can be overridden as --section.key=value "
                    "(see `clusterlm config show RECIPE`). Exit codes: 0 done, 2 bad input, 3 diverged "
                    "(NaN/Inf), 75 stopped by a signal after saving (resume with --train.resume=auto).",
    )
    parser.add_argument("recipe", nargs="?", help="recipe TOML file or bundled recipe name, e.g. "
                        "recipes/shakespeare_char_cpu.toml (omitted: defaults + overrides)")
    parser.add_argument("--resume", choices=["auto", "none"], help="shortcut for --train.resume")
    args = parser.parse_args(rest)
    if args.resume:
        overrides.append(f"--train.resume={args.resume}")
    cfg = load_run_config(args.recipe, overrides)
    if finetune and cfg.finetune.task == "lm":
        raise ConfigError(f"clusterlm finetune: {args.recipe or 'the config'} has finetune.task = 'lm' (pre-training); "
                          "set [finetune] task = 'sft', 'classify' or 'seq2seq' (and init_from = a base model), or use "
                          "`clusterlm train`")
    from clusterlm.parallel.launch import read_env, record_exit_code, shutdown_distributed

    if read_env().rank == 0:
        sys.stderr.write("resolved config:\n" + to_toml(cfg) + "\n")

    try:
        code = train(cfg).exit_code
        record_exit_code(code)  # under `clusterlm launch`: torchrun itself would report 1
        return code
    except BaseException as e:  # bad input found on the ranks (a resume refused): launch exits 2, not 1
        from clusterlm.errors import exit_code_of

        with contextlib.suppress(Exception):
            record_exit_code(exit_code_of(e))
        raise
    finally:
        shutdown_distributed()  # the process group train() started under torchrun/srun, if any
