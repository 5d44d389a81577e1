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
a NaN/Inf check (the optimizer step is skipped and counted), clip, step, log, maybe evaluate,
maybe checkpoint. SIGTERM / SIGINT / SIGUSR2 finish the current step, save, and exit with
EXIT_PREEMPTED (75); `--train.resume=auto` then continues bit-exactly on CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clusterlm.config import DataConfig, RunConfig, TrainConfig, load_run_config, split_overrides, to_toml
from clusterlm.device import autocast as device_autocast
from clusterlm.device import autocast_dtype, resolve_device
from clusterlm.errors import EXIT_DIVERGED, EXIT_OK, EXIT_PREEMPTED, CheckpointError, ConfigError

log = logging.getLogger(__name__)

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR2")


@dataclass
class RunState:
    """Everything besides model/optimizer/loader/RNG that a resume needs (train_state.json)."""

    step: int = 0  # optimizer steps taken (skipped NaN steps included: their batches are consumed)
    tokens_seen: int = 0
    bad_steps_total: int = 0
    bad_streak: int = 0
    best_val_loss: float | None = None
    train_seconds: float = 0.0  # wall time spent in previous segments of this run


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
    """The prepared data directory; prepared from `data.source` first if it does not exist yet."""
    data_dir = Path(data.dir)
    if (data_dir / "meta.json").is_file():
        return data_dir
    if not data.source:
        raise ConfigError(f"data.dir={str(data_dir)!r} is not a prepared data directory and data.source is empty; "
                          "run `clusterlm prepare` first or set data.source (e.g. 'builtin:shakespeare')")
    from clusterlm.data.prepare import prepare

    log.info("preparing %s from %s (tokenizer %s)", data_dir, data.source, data.tokenizer)
    prepare([data.source], data_dir, tokenizer=data.tokenizer, vocab_size=data.vocab_size or None,
            val_fraction=data.val_fraction)
    return data_dir


def _probed_peak(spec_file: str, dtype: str) -> float | None:
    """FLOP/s of the first node type's device in a probed spec: its cited dense peak, else its
    measured matmul rate (what `clusterlm probe` records for a CPU). None without a spec file."""
    if not spec_file:
        return None
    from clusterlm.cluster.spec import load_spec

    device = load_spec(spec_file).node_types[0].device
    tflops = device.peak(dtype)[0] or device.matmul_tflops(dtype)
    if not tflops:
        raise ConfigError(f"train.probe_spec={spec_file!r} has no peak or measured {dtype} TFLOP/s for "
                          f"{device.name}; re-run `clusterlm probe --out FILE` on this node")
    return tflops * 1e12


def batch_plan(train: TrainConfig, dp_size: int = 1) -> tuple[int, int]:
    """(accumulation steps, tokens per optimizer step) from the global batch in tokens."""
    micro_tokens = train.micro_batch_size * train.seq_len * dp_size
    if train.global_batch_tokens == 0:
        return 1, micro_tokens
    if train.global_batch_tokens % micro_tokens:
        raise ConfigError(
            f"train.global_batch_tokens={train.global_batch_tokens} is not a multiple of micro_batch_size*seq_len*dp"
            f" = {train.micro_batch_size}*{train.seq_len}*{dp_size} = {micro_tokens}")
    return train.global_batch_tokens // micro_tokens, train.global_batch_tokens


def _check_run_memory(cfg: RunConfig, dims: Any, accum: int, device: torch.device,
                      amp_dtype: torch.dtype | None, distributed: bool, ranks_on_node: int = 1) -> None:
    """Refuse (ConfigError) a run whose predicted peak memory per device exceeds what is available;
    every rank agrees, so none is left waiting in a collective when another refuses."""
    from clusterlm.parallel.agree import agree_any
    from clusterlm.train.memcheck import amp_name, check_memory, predicted_peak_bytes

    tc = cfg.train
    need = predicted_peak_bytes(cfg.model, dims, micro_batch=tc.micro_batch_size, seq_len=tc.seq_len,
                                dtype=amp_name(amp_dtype), recompute=cfg.parallel.activation_checkpointing,
                                accum=accum)
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


# ---- the loop -----------------------------------------------------------------------------------------
def train(cfg: RunConfig) -> TrainResult:
    """Run (or resume) training as configured; returns how it ended. Never calls exit().
    The caller's torch thread count is restored afterwards (train.threads applies to this run only)."""
    threads = torch.get_num_threads()
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: RunConfig) -> TrainResult:
    from clusterlm.checkpoint.store import (
        capture_rng_state,
        load_checkpoint,
        restore_rng_state,
        save_checkpoint,
    )
    from clusterlm.data.loader import TokenLoader, iter_eval_batches
    from clusterlm.data.shards import read_meta
    from clusterlm.eval.metrics import evaluate_loss
    from clusterlm.parallel.agree import agree_any, agree_on_checkpoint, rank0_first
    from clusterlm.parallel.launch import init_distributed, read_env
    from clusterlm.parallel.parallelize import validate_layout
    from clusterlm.train.metrics import MetricsLogger, Throughput, device_peak_flops, flops_per_token, memory_stats, mfu
    from clusterlm.train.optim import build_optimizer, lr_at

    tc, oc = cfg.train, cfg.optim
    denv = read_env()
    distributed = denv.world_size > 1
    out_dir = Path(tc.out_dir)
    ckpt_root = out_dir / "checkpoints"
    if distributed:
        # layout arithmetic first: a wrong world size fails before a process group or model exists
        if cfg.model.vocab_size:  # else it comes from the data; checked again below either way
            validate_layout(cfg.parallel, cfg.model, denv.world_size, tc.global_batch_tokens,
                            tc.micro_batch_size, tc.seq_len)
        if denv.rank != 0:
            from clusterlm.log import setup_logging

            setup_logging(denv.rank)  # warnings and errors only, prefixed [rank N]
        device = init_distributed(denv, device_type=tc.device)
    else:
        device = resolve_device(tc.device)
    amp_dtype = autocast_dtype(tc.dtype, device)
    if tc.threads and device.type == "cpu":
        torch.set_num_threads(tc.threads)

    # -- data and model config ----------------------------------------------------------------------
    # rank 0 prepares a missing data directory; the others wait and then read it
    data_dir = rank0_first(distributed, denv.rank, lambda: ensure_data(cfg.data),
                           what=f"preparing {cfg.data.dir}", device=device)
    meta = read_meta(data_dir)
    vocab = int(meta["tokenizer"]["vocab_size"])
    mcfg = cfg.model
    if mcfg.vocab_size is None:
        mcfg = mcfg.with_vocab(vocab)
    elif mcfg.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={mcfg.vocab_size} is smaller than the tokenizer's {vocab} tokens "
                          f"in {data_dir}; leave it unset to take the tokenizer's size")
    if tc.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"train.seq_len={tc.seq_len} exceeds model.max_seq_len={mcfg.max_seq_len}")
    cfg = dataclasses.replace(cfg, model=mcfg, data=dataclasses.replace(cfg.data, dir=str(data_dir)))
    dims = validate_layout(cfg.parallel, mcfg, denv.world_size, tc.global_batch_tokens, tc.micro_batch_size,
                           tc.seq_len)
    accum, tokens_per_step = batch_plan(tc, dims.dp)
    if not tc.skip_memory_check:  # before any checkpoint or model memory is allocated
        _check_run_memory(cfg, dims, accum, device, amp_dtype, distributed, denv.local_world_size)

    # -- resume point ------------------------------------------------------------------------------------
    from clusterlm.checkpoint.compat import check_resume
    from clusterlm.checkpoint.distributed import is_distributed_checkpoint
    from clusterlm.checkpoint.store import describe_rejected, scan_checkpoints

    ckpt = ckpt_path = None
    if tc.resume == "auto":
        ckpt_path, rejected = scan_checkpoints(ckpt_root)
        if ckpt_path is None and rejected:
            # resume=auto was given: saying "resume with --train.resume=auto" would help no one
            raise CheckpointError(
                f"--train.resume=auto: all {len(rejected)} checkpoints in {ckpt_root} failed verification:\n"
                f"{describe_rejected(rejected)}\nto start fresh, give another --train.out_dir (or move "
                f"{ckpt_root} aside); to continue this run, restore a checkpoint from a copy")
        if ckpt_path is None:
            log.info("resume=auto: no valid checkpoint in %s, starting fresh", ckpt_root)
    elif tc.resume != "none":
        from clusterlm.checkpoint.store import resolve_checkpoint

        ckpt_path = resolve_checkpoint(tc.resume)
    if distributed:
        ckpt_path = agree_on_checkpoint(ckpt_path, device)
    if ckpt_path is not None:  # a model of another shape or another tokenizer: one line, before any load
        check_resume(ckpt_path, mcfg, data_dir, data_dir / meta["tokenizer"]["file"])
    if ckpt_path is not None and not is_distributed_checkpoint(ckpt_path):
        if distributed:
            raise ConfigError(f"{ckpt_path} is a single-process checkpoint; resuming it on {denv.world_size} ranks "
                              "is not supported (distributed runs save DCP checkpoints, which load on any layout)")
        ckpt = load_checkpoint(ckpt_path)
        missing = [k for k in ("run", "loader") if k not in ckpt.train_state]
        if missing or ckpt.optimizer_state is None:  # written by convert/quantize/prune: weights only
            raise CheckpointError(f"{ckpt_path} holds weights without the training state a resume needs "
                                  f"({', '.join(missing) or 'optimizer'} missing: written by convert, quantize or "
                                  "prune?); it can be evaluated or served, not resumed; start fresh with another "
                                  "--train.out_dir")
    if ckpt_path is None and ckpt_root.exists() and any(ckpt_root.glob("step-*")):
        raise ConfigError(f"{out_dir} already has checkpoints; resume with --train.resume=auto "
                          "or choose another --train.out_dir")

    # -- model, optimizer, loader (built on meta, laid out, materialised, initialised) -------------------
    from clusterlm.parallel.mesh import build_mesh
    from clusterlm.parallel.parallelize import build_parallel_model

    torch.manual_seed(tc.seed)
    mesh = build_mesh(dims, device.type) if distributed else None
    pm = build_parallel_model(mcfg, cfg.parallel, mesh, device, seed=tc.seed, micro_batch=tc.micro_batch_size,
                              param_dtype=amp_dtype if distributed else None, compile=tc.compile,
                              pp_schedule=cfg.parallel.pp_schedule)
    model, coords = pm.module, pm.coords
    rank0 = denv.rank == 0
    opt = build_optimizer(model, oc, fused=None if pm.fused_optimizer_ok else False)
    loader = TokenLoader(data_dir, "train", batch_size=tc.micro_batch_size, seq_len=tc.seq_len, seed=tc.seed,
                         rank=coords.dp_rank, world_size=dims.dp)
    state = RunState()
    if ckpt_path is not None and ckpt is None:  # distributed checkpoint, any layout it was saved with
        from clusterlm.checkpoint.distributed import load_distributed, load_rank_rng

        ts = load_distributed(ckpt_path, model, opt)
        rng = load_rank_rng(ckpt_path)
        if rng is not None:
            restore_rng_state(rng)
        loader.load_state_dict(ts["loader"])
        state = RunState(**ts["run"])
        log.info("resumed from %s at step %d (%d tokens seen)", ckpt_path, state.step, state.tokens_seen)
    if ckpt is not None:
        from clusterlm.checkpoint.model_io import check_state_shapes

        check_state_shapes(ckpt.model_state, model, ckpt.path / "model.safetensors")
        model.load_state_dict(ckpt.model_state)
        if ckpt.optimizer_state is not None:
            opt.load_state_dict(ckpt.optimizer_state)
        ts = ckpt.train_state
        loader.load_state_dict(ts["loader"])
        state = RunState(**ts["run"])
        restore_rng_state(ckpt.rng)
        log.info("resumed from %s at step %d (%d tokens seen)", ckpt.path, state.step, state.tokens_seen)

    # -- derived numbers, printed once (llm.c style) -------------------------------------------------
    n_params = mcfg.num_params()
    fpt = flops_per_token(mcfg, tc.seq_len)
    peak_dtype = "bf16" if amp_dtype == torch.bfloat16 else "fp32"
    peak, peak_source = device_peak_flops(device, peak_dtype, measured_peak=_probed_peak(tc.probe_spec, peak_dtype))
    if tc.probe_spec and peak is not None:
        peak_source = f"{tc.probe_spec}: {peak_source}"
    log.info("model: %s, %s parameters (%s without embeddings)", mcfg.arch, f"{n_params:,}",
             f"{mcfg.num_params(include_embeddings=False):,}")
    log.info("batch: %d x %d tokens per micro-batch, %d accumulation steps, %s tokens per step",
             tc.micro_batch_size, tc.seq_len, accum, f"{tokens_per_step:,}")
    log.info("FLOPs/token: %.3g (%s)", fpt["total"], fpt["convention"])
    log.info("layout: %s on %d process(es) (%s)", dims.describe(), denv.world_size, pm.kind)
    log.info("device: %s, autocast %s, peak %s (%s), compile=%s", device, amp_dtype or "off (fp32)",
             f"{peak / 1e12:.1f} TFLOP/s" if peak else "unknown", peak_source, tc.compile)
    log.info("data: %s (%s train tokens, %d samples/epoch)", data_dir, f"{meta['splits']['train']['tokens']:,}",
             loader.num_samples)

    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        from clusterlm.fsutil import atomic_write_text

        try:  # atomic: a full disk leaves the previous config.toml, not half of the new one
            atomic_write_text(out_dir / "config.toml", to_toml(cfg))
        except OSError as e:
            if e.filename is not None:
                raise
            raise OSError(e.errno, e.strerror or str(e), str(out_dir / "config.toml")) from e
    metrics = MetricsLogger(out_dir, tensorboard=tc.tensorboard, enabled=rank0)
    metrics.truncate_after(state.step)
    tokenizer_file = data_dir / meta["tokenizer"]["file"]
    has_val = meta["splits"].get("val", {}).get("tokens", 0) > tc.seq_len

    def autocast():
        return device_autocast(device, amp_dtype)

    def evaluate() -> float | None:
        if not has_val:
            return None
        # every rank evaluates the same batches (collectives of FSDP/TP/PP stay in step)
        batches = iter_eval_batches(data_dir, "val", tc.micro_batch_size, tc.seq_len, max_batches=tc.eval_batches)
        if dims.pp > 1:
            return pm.pipeline_eval_loss(batches, device, autocast)  # full batches only
        return float(evaluate_loss(pm.inference_module, batches, device=device, autocast_dtype=amp_dtype)["loss"])

    pending: list = []  # at most one asynchronous distributed save not yet committed

    def save(reason: str) -> Path:
        train_state = {"run": dataclasses.asdict(state), "loader": loader.state_dict(), "reason": reason,
                       "tokens_per_step": tokens_per_step}
        if distributed:
            from clusterlm.checkpoint.distributed import PendingSave, finish_save, save_distributed

            if pending:  # the previous asynchronous save commits before the next one starts
                finish_save(pending.pop())
            # periodic saves may write in the background (checkpoint.async_save); every loop exit ends
            # in a synchronous save, which commits a pending one first
            async_ok = reason == "periodic" and cfg.checkpoint.async_save
            result = save_distributed(ckpt_root, state.step, model, opt, train_state=train_state,
                                      config_toml=to_toml(cfg), tokenizer_path=tokenizer_file,
                                      keep_last=cfg.checkpoint.keep_last, async_save=async_ok,
                                      pipeline_stage_source=(coords.dp_rank == 0 and coords.tp == 0)
                                      if dims.pp > 1 else None)
            if isinstance(result, PendingSave):
                pending.append(result)
                from clusterlm.checkpoint.store import step_name

                path = result.root / step_name(result.step)  # visible once committed
            else:
                path = result
            metrics.log({"kind": "event", "step": state.step, "event": "checkpoint", "path": str(path),
                         "reason": reason, "async": async_ok})
            return path
        path = save_checkpoint(ckpt_root, state.step, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                               train_state=train_state, rng=capture_rng_state(), config_toml=to_toml(cfg),
                               tokenizer_path=tokenizer_file, keep_last=cfg.checkpoint.keep_last)
        metrics.log({"kind": "event", "step": state.step, "event": "checkpoint", "path": str(path), "reason": reason})
        return path

    stop: dict[str, Any] = {}
    previous_handlers = _install_stop_handlers(stop)
    throughput = Throughput()
    t_start = time.perf_counter()
    last_loss = last_val = None
    last_ckpt: Path | None = None
    exit_code, reason = EXIT_OK, "finished"
    from tqdm.auto import tqdm

    bar = tqdm(total=tc.max_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
               disable=not sys.stderr.isatty() or not rank0, leave=False)
    try:
        model.train()
        while state.step < tc.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(state.step, oc, tc.max_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for i in range(accum):
                x, y = next(loader)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                # gradients are reduced across data-parallel ranks on the last micro-batch only
                loss_sum += pm.forward_backward(x, y, accum=accum, sync=i == accum - 1, autocast=autocast)
            loss_value = float(pm.mean_over_dp(loss_sum))  # one host sync per step: NaN check and log
            grad_norm = pm.clip_grad_norm_(tc.grad_clip)
            finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
            if finite:
                opt.step()
                state.bad_streak = 0
            else:
                state.bad_steps_total += 1
                state.bad_streak += 1
                log.warning("step %d: loss=%s grad_norm=%s is not finite: optimizer step skipped (%d in a row, "
                            "limit %d)", state.step + 1, loss_value, grad_norm, state.bad_streak, tc.max_bad_steps)
            opt.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens_seen += tokens_per_step
            dt = time.perf_counter() - t0
            tps = throughput.update(tokens_per_step, dt)
            record = {"kind": "train", "step": state.step, "tokens": state.tokens_seen, "loss": loss_value,
                      "lr": lr, "grad_norm": grad_norm, "skipped": not finite, "step_time_s": dt, "tokens_per_s": tps,
                      "mfu": mfu(tps, fpt["total"], peak)}
            if cfg.plan.predicted_step_s:
                record["predicted_step_s"] = cfg.plan.predicted_step_s
            if state.step % tc.log_interval == 0 or state.step == tc.max_steps:
                record.update(memory_stats(device))
                if cfg.plan.predicted_memory_bytes:
                    record["predicted_memory_bytes"] = cfg.plan.predicted_memory_bytes
                planned = (f"  (plan: {cfg.plan.predicted_step_s * 1e3:.1f} ms/step)"
                           if cfg.plan.predicted_step_s else "")
                log.info("step %d/%d  loss %.4f  lr %.2e  grad_norm %.3f  %.0f tok/s  %.1f ms/step%s",
                         state.step, tc.max_steps, loss_value, lr, grad_norm, tps, dt * 1e3, planned)
            metrics.log(record, tensorboard=state.step % tc.log_interval == 0)
            if finite:
                last_loss = loss_value
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)

            # stop decisions are agreed by all ranks (loss and grad norm are already global)
            elapsed = state.train_seconds + time.perf_counter() - t_start
            over_time = bool(tc.max_minutes and elapsed >= tc.max_minutes * 60 and state.step < tc.max_steps)
            stop_signal, over_time = agree_any(distributed, bool(stop.get("signal")), over_time, device=device)
            if stop_signal and not stop.get("signal"):
                stop["signal"] = "a signal on another rank"
            if state.bad_streak >= tc.max_bad_steps:
                exit_code, reason = EXIT_DIVERGED, f"{state.bad_streak} consecutive non-finite losses"
                log.error("stopping: %s (train.max_bad_steps=%d); the last good weights are saved", reason,
                          tc.max_bad_steps)
                last_ckpt = save("diverged")
                break
            if tc.eval_interval and state.step % tc.eval_interval == 0 and state.step < tc.max_steps:
                last_val = evaluate()
                if last_val is not None:
                    _record_val(metrics, state, last_val)
            if stop.get("signal"):
                exit_code, reason = EXIT_PREEMPTED, f"stopped by {stop['signal']}"
                last_ckpt = save("preempted")
                break
            if over_time:
                reason = f"time limit of {tc.max_minutes} min reached"
                log.info("%s at step %d", reason, state.step)
                break
            if cfg.checkpoint.interval and state.step % cfg.checkpoint.interval == 0 and state.step < tc.max_steps:
                state.train_seconds += time.perf_counter() - t_start
                t_start = time.perf_counter()
                last_ckpt = save("periodic")
        else:
            pass
        if exit_code == EXIT_OK:
            last_val = evaluate()
            if last_val is not None:
                _record_val(metrics, state, last_val)
            state.train_seconds += time.perf_counter() - t_start
            t_start = time.perf_counter()
            last_ckpt = save("final")
    finally:
        bar.close()
        _restore_handlers(previous_handlers)
        metrics.close()
    log.info("%s at step %d: train loss %s, val loss %s; checkpoint %s", reason, state.step,
             f"{last_loss:.4f}" if last_loss is not None else "n/a",
             f"{last_val:.4f}" if last_val is not None else "n/a", last_ckpt)
    return TrainResult(exit_code, state.step, out_dir, last_loss, last_val, last_ckpt, reason)


def _record_val(metrics, state: RunState, val_loss: float) -> None:
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss = val_loss
    metrics.log({"kind": "eval", "step": state.step, "tokens": state.tokens_seen, "val_loss": val_loss,
                 "val_ppl": math.exp(min(val_loss, 50.0))})
    log.info("step %d: val loss %.4f (best %.4f)", state.step, val_loss, state.best_val_loss)


def main(argv: list[str]) -> int:
    overrides, rest = split_overrides(argv)
    parser = argparse.ArgumentParser(
        prog="clusterlm train",
        description="Train a model from a recipe. Any config key can be overridden as --section.key=value "
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
    from clusterlm.parallel.launch import read_env, record_exit_code, shutdown_distributed

    if read_env().rank == 0:
        sys.stderr.write("resolved config:\n" + to_toml(cfg) + "\n")

    try:
        code = train(cfg).exit_code
        record_exit_code(code)  # under `clusterlm launch`: torchrun itself would report 1
        return code
    finally:
        shutdown_distributed()  # the process group train() started under torchrun/srun, if any
