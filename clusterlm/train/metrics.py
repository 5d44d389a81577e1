"""Training metrics: FLOPs per token, MFU, throughput, memory, and the JSONL + TensorBoard log.

    logger = MetricsLogger(run_dir)             # RUN_DIR/metrics.jsonl and RUN_DIR/tb/
    logger.truncate_after(resumed_step)         # a resumed run's log has each step once
    logger.start_fresh()                        # or, on a fresh start, an earlier run's log kept aside
    logger.log({"kind": "train", "step": 10, "loss": 2.31, "tokens_per_s": 17000.0})
    logger.close()

MFU = tokens/s * FLOPs per token / peak FLOP/s of the device, with model FLOPs in the PaLM
convention (`clusterlm.cluster.flops`, the same numbers the planner predicts with) and the DENSE
peak of the actual device (`clusterlm.cluster.hardware`). An unknown peak gives MFU None, never
a guess: a CPU's peak comes from `clusterlm probe` (pass it as `measured_peak`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch

from clusterlm.fsutil import atomic_write_text
from clusterlm.models.config import ModelConfig

log = logging.getLogger(__name__)

KINDS = ("train", "eval", "event", "task", "ranks")  # ranks: per-rank step times (distributed)
# the scores of a task kind shown on the console and in summary.md (docs/tasks.md has them all)
TASK_HEADLINE = {"choice": ("acc", "acc_norm"), "classify": ("accuracy", "macro_f1"),
                 "generate": ("bleu", "chrf", "rougeL", "exact_match")}
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


# ---- FLOPs and MFU ----------------------------------------------------------------------------------
def flops_per_token(cfg: ModelConfig, seq_len: int, predicted: float = 1.0) -> dict[str, Any]:
    """Training FLOPs per token, PaLM convention: 6*N + 12*L*D*T (LSTM/GRU: 6*N, no attention term).

    N counts every weight in a matmul per token: the layers (`cfg.num_params(include_embeddings=False)`
    without an untied output matrix) plus the output projection V*D once, tied or not, because the
    logits matmul runs either way; embedding lookups are not matmuls. For tied GPT-2 this is
    nanoGPT's `estimate_mfu` N, so MFU figures compare. Returns {"total", "dense" (6N), "attention",
    "n_matmul_params" (N), "n_layer_params", "n_output_params", "seq_len", "convention" (print it)}.
    `predicted`: a masked-LM run's share of positions through the head and output layer
    (cluster/flops.py).
    """
    from clusterlm.cluster.flops import flops_per_token as _fpt  # torch-free, shared with the planner
    from clusterlm.cluster.flops import matmul_params, mlm_head_params

    f = _fpt(cfg, seq_len, training=True, predicted=predicted)
    n, layers, output = matmul_params(cfg)
    if predicted < 1.0 and cfg.arch == "encoder" and not cfg.labels:  # as cluster/flops.py counts it
        head = mlm_head_params(cfg)
        layers, output = layers - head + round(predicted * head), round(predicted * output)
        n = layers + output
    return {"total": f.total, "dense": f.dense, "attention": f.attention, "n_matmul_params": n,
            "n_layer_params": layers, "n_output_params": output, "seq_len": seq_len, "convention": f.convention}


def mfu(tokens_per_s: float | None, flops_per_token: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation in [0, 1] (can exceed 1 only if the peak or FLOP count is wrong);
    None when the peak is unknown or there is no throughput yet."""
    if peak_flops is None or peak_flops <= 0 or tokens_per_s is None or not math.isfinite(tokens_per_s):
        return None
    return tokens_per_s * flops_per_token / peak_flops


def mfu_devices(device_type: str, world_size: int, local_world_size: int) -> int:
    """How many device peaks the run's MFU is against. Tokens per second count every data-parallel
    rank's tokens, so the peak is one device's x the devices in use (the planner's `world * peak`):
    a GPU rank has a device of its own; the ranks on one CPU host share its CPU, which the probe
    measures as one device, so a CPU run counts hosts."""
    if device_type == "cpu":
        return max(1, world_size // max(1, local_world_size))
    return world_size


def _tf32_matmuls() -> bool:
    """Whether fp32 CUDA matmuls may run in TF32 (set_float32_matmul_precision("high") or the
    allow_tf32 / fp32_precision flags; reading the legacy flag raises after a mix of the two APIs)."""
    mm = torch.backends.cuda.matmul
    try:
        precision = getattr(mm, "fp32_precision", None)
        return precision == "tf32" if precision is not None else bool(mm.allow_tf32)
    except RuntimeError:
        return torch.get_float32_matmul_precision() != "highest"


def peak_dtype(amp_dtype: torch.dtype | None) -> str:
    """The peak a run's matmuls run at, by its autocast dtype (None = fp32): fp16 autocast is measured
    against the fp16 peak, as the planner predicts it (against the fp32/TF32 peak a V100's MFU read 8x)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")


def device_peak_flops(device: torch.device | str, dtype: str, *,
                      measured_peak: float | None = None) -> tuple[float | None, str]:
    """(dense peak FLOP/s or None, where it comes from) for `device` computing in `dtype`.

    dtype: "fp32", "tf32", "bf16" or "fp16". On CUDA, "fp32" becomes "tf32" when torch lets fp32
    matmuls use TF32 (`_tf32_matmuls`), since that is the peak they run at.
    `measured_peak` (e.g. from `clusterlm probe`) wins over any table.
    """
    device = torch.device(device)
    if measured_peak is not None:
        if not measured_peak > 0:
            raise ValueError(f"measured_peak={measured_peak} must be > 0 FLOP/s")
        return float(measured_peak), "measured (probe or given figure)"
    if device.type != "cuda":
        return None, "unknown: run `clusterlm probe` to measure"
    name = torch.cuda.get_device_name(device)
    if dtype == "fp32" and _tf32_matmuls():
        dtype = "tf32"
    try:
        from clusterlm.cluster.hardware import lookup_accelerator, peak_flops
    except ImportError:
        return None, "unknown"
    peak = peak_flops(name, dtype)
    if peak is None:
        return None, f"unknown: {name!r} in {dtype} is not in clusterlm.cluster.hardware"
    acc = lookup_accelerator(name)
    return peak, f"{name}, dense {dtype}: {acc.source if acc else 'clusterlm.cluster.hardware'}"


# ---- throughput and memory ------------------------------------------------------------------------------
class Throughput:
    """Tokens per second over the last `window` steps (a sum of tokens over a sum of seconds, so a
    slow step weighs by its duration). `overall` leaves out the first `skip` steps (start-up,
    torch.compile) unless there is nothing else."""

    def __init__(self, window: int = 20, skip: int = 1) -> None:
        if window < 1 or skip < 0:
            raise ValueError(f"Throughput(window={window}, skip={skip}): need window >= 1, skip >= 0")
        self.window, self.skip = window, skip
        self._recent: deque[tuple[int, float]] = deque(maxlen=window)
        self._n = 0
        self._tokens = self._seconds = 0.0  # totals after `skip`
        self._all_tokens = self._all_seconds = 0.0

    def update(self, tokens: int, seconds: float) -> float:
        """Record one step; returns tokens/s over the window (0.0 if no time has passed)."""
        self._recent.append((tokens, seconds))
        self._n += 1
        self._all_tokens += tokens
        self._all_seconds += seconds
        if self._n > self.skip:
            self._tokens += tokens
            self._seconds += seconds
        return self.rate

    @property
    def rate(self) -> float:
        secs = sum(s for _, s in self._recent)
        return sum(t for t, _ in self._recent) / secs if secs > 0 else 0.0

    @property
    def overall(self) -> float:
        tokens, secs = (self._tokens, self._seconds) if self._seconds > 0 else (self._all_tokens, self._all_seconds)
        return tokens / secs if secs > 0 else 0.0


def memory_stats(device: torch.device | str) -> dict[str, int]:
    """Peak memory so far, in bytes.

    CUDA: {"cuda_max_allocated_bytes", "cuda_max_reserved_bytes"} from the caching allocator.
    CPU: {"cpu_peak_rss_bytes"}: the process's peak resident set (resource.getrusage ru_maxrss,
    which Linux reports in KiB and macOS in bytes; converted here). It covers the whole process,
    not only tensors.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return {"cuda_max_allocated_bytes": int(torch.cuda.max_memory_allocated(device)),
                "cuda_max_reserved_bytes": int(torch.cuda.max_memory_reserved(device))}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"cpu_peak_rss_bytes": int(rss if sys.platform == "darwin" else rss * 1024)}


# ---- task records ----------------------------------------------------------------------------------------
def task_record(metrics: dict[str, Any], *, step: int, tokens: int, wall_s: float, eval_s: float,
                scoring_s: float = 0.0) -> dict[str, Any]:
    """The metrics.jsonl record of one task evaluation during training, from eval.harness's metrics:
    {"kind": "task", "step", "tokens", "wall_s" (the run's wall time when these weights were reached:
    training, validation, checkpoints and earlier task scoring included), "scoring_s" (the part of
    wall_s spent scoring tasks: wall_s - scoring_s is the time a run without [eval] tasks would have
    taken), "eval_s" (this scoring), "task", "task_kind", "n", "metrics": {every top-level number of
    the scores but n: acc, acc_norm, bleu, ...}}."""
    scores = {k: v for k, v in metrics.items()
              if k != "n" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"kind": "task", "step": step, "tokens": tokens, "wall_s": wall_s, "scoring_s": scoring_s,
            "eval_s": eval_s, "task": metrics["task"], "task_kind": metrics["kind"], "n": metrics.get("n"),
            "metrics": scores}


# ---- the log ----------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    """Plain JSON values; non-finite floats become null (strict JSON has no NaN/Infinity)."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    elif hasattr(value, "item") and callable(value.item) and not isinstance(value, (str, bytes)):  # numpy scalars
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class MetricsLogger:
    """One JSON object per line in RUN_DIR/metrics.jsonl (flushed per line), scalars mirrored to
    TensorBoard under RUN_DIR/tb/ as "<kind>/<key>".

    Every record has "kind" ("train", "eval", "event" or "task") and usually "step"; "time" (Unix seconds)
    is added when absent. Non-finite floats are written as null. `enabled=False` (ranks other than
    0) makes every method a no-op.
    """

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.enabled = enabled
        self.tensorboard = tensorboard
        self._file = None
        self._writer = None
        self._purge_step: int | None = None

    # -- files, opened on first use -------------------------------------------------------------------
    def _jsonl(self):
        if self._file is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # a crash mid-line leaves no newline at the end: start on a fresh line
            needs_newline = self.path.exists() and self.path.stat().st_size > 0 and self._last_byte() != b"\n"
            self._file = open(self.path, "a", encoding="utf-8")
            if needs_newline:
                self._file.write("\n")
        return self._file

    def _last_byte(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1)

    def _tb(self):
        if self._writer is None and self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is optional at run time
                log.warning("TensorBoard disabled: %s", e)
                self.tensorboard = False
                return None
            # purge_step hides events at or after it left by the run we resume (TensorBoard's own mechanism)
            self._writer = SummaryWriter(log_dir=str(self.run_dir / TB_DIR), purge_step=self._purge_step)
        return self._writer

    # -- API ---------------------------------------------------------------------------------------------
    def log(self, record: dict[str, Any], *, tensorboard: bool = True) -> None:
        """Append `record`; with `tensorboard`, also write its numeric fields as scalars at its step."""
        if not self.enabled:
            return
        kind = record.get("kind")
        if kind not in KINDS:
            raise ValueError(f"metrics record kind={kind!r}; expected one of {', '.join(KINDS)}")
        rec = _jsonable(record)
        rec.setdefault("time", time.time())
        f = self._jsonl()
        try:
            f.write(json.dumps(rec, allow_nan=False) + "\n")
            f.flush()
        except OSError as e:  # a full disk: f.write's error names no file; the CLI prints this one (exit 74)
            if e.filename is not None:
                raise
            raise OSError(e.errno, e.strerror or str(e), str(self.path)) from e
        step = rec.get("step")
        if tensorboard and isinstance(step, int) and (writer := self._tb()) is not None:
            if kind == "task":  # task/<name>/<metric>, one chart per score
                for key, value in rec.get("metrics", {}).items():
                    if isinstance(value, (int, float)) and not isinstance(value, bool):
                        writer.add_scalar(f"task/{rec['task']}/{key}", value, global_step=step)
                return
            for key, value in rec.items():
                if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                writer.add_scalar(f"{kind}/{key}", value, global_step=step)

    def truncate_after(self, step: int) -> int:
        """Keep only records with step <= `step` (and records without a step); returns how many were
        dropped. Rewrites metrics.jsonl atomically; unreadable lines (a crash mid-write) are dropped
        too. Call before logging when resuming from `step`."""
        if not self.enabled:
            return 0
        self._close_files()
        self._purge_step = step + 1
        if not self.path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                dropped += 1
                continue
            s = rec.get("step") if isinstance(rec, dict) else None
            if isinstance(s, (int, float)) and s > step:
                dropped += 1
                continue
            kept.append(line)
        if dropped:
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
            log.info("%s: dropped %d records after step %d (resuming)", self.path, dropped, step)
        return dropped

    def start_fresh(self) -> Path | None:
        """A fresh start (no checkpoint resumed) in a folder whose metrics.jsonl holds an earlier run's
        records: that file is renamed to metrics.jsonl.old-YYYYmmdd-HHMMSS beside it (never merged with
        or overwritten by the new run's, never deleted) and the new path returned; None when there was
        nothing to keep. TensorBoard events of the earlier run from step 1 on are hidden (purge_step)."""
        if not self.enabled:
            return None
        self._close_files()
        self._purge_step = 1
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        records = sum(1 for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines()
                      if line.strip())
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.path.stat().st_mtime))
        aside = self.path.with_name(f"{self.path.name}.old-{stamp}")
        n = 1
        while aside.exists():  # two earlier runs in the same second: neither overwritten
            n += 1
            aside = self.path.with_name(f"{self.path.name}.old-{stamp}-{n}")
        os.replace(self.path, aside)
        log.warning("starting fresh: %s held %d records of an earlier run; kept as %s (this run's metrics go "
                    "to a new %s)", self.path, records, aside.name, self.path.name)
        return aside

    def _close_files(self) -> None:
        if self._file is not None:
            f, self._file = self._file, None
            try:
                f.close()
            except OSError as e:  # its buffer could not be flushed (disk full): name the file
                raise OSError(e.errno, e.strerror or str(e), str(self.path)) from e
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        self._close_files()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl file in order; unreadable lines are skipped with a warning."""
    from clusterlm.fsutil import read_jsonl

    return read_jsonl(path)
