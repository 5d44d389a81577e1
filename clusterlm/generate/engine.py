"""Generation over token ids: prefill the prompt into the model's cache, then decode one token at a
time, streaming each step's new tokens. Works for every model family (the Transformer's KV cache,
the RNN's recurrent state; clusterlm.models.cache). `Engine` is the one decode step that
`generate` here and the server's continuous-batching scheduler (clusterlm.serve.scheduler) both
drive: prefill/decode to next-token logits, the one sampler (generate.sampling.sample_rows), the
finish rule, and `context_length`, the one rule for how many positions a model holds. The CLI and
`serve` add text (generate.text) and scheduling on top.

    from clusterlm.generate.engine import complete, generate

    stream = generate(model, [[5, 6, 7]] * 4, max_new_tokens=50, temperature=0.8, seed=0, eos_id=0)
    for step in stream:          # one list per decode step: a token id per sequence, or None
        ...                      # once that sequence has finished (the eos token is not yielded)
    stream.tokens, stream.finish_reasons   # [[...], ...], ["stop" | "length", ...]

    new_tokens, reasons = complete(model, [5, 6, 7], max_new_tokens=50)

Batches: sequences in one call must have prompts of the same length (pass one prompt several times
for several samples of it); run prompts of different lengths in separate calls. A sequence stops
with "stop" when it samples `eos_id`, and with "length" at `max_new_tokens` or when the model's
context (a Transformer's max_seq_len) is full, unless `sliding_window=True`, which restarts the
cache from the last half of the context and keeps going. Padding rows of the output (ids >= vocab_size, from
model.vocab_multiple) are never sampled.

Speed: the KV cache is static (allocated once per generation for prompt + max_new_tokens, written in
place). `compile=True` runs the one-token decode step through `torch.compile` (dynamic shapes, so
the growing cache length does not recompile; compiled once per model and reused by later calls);
the prefill stays eager. On the CPU only one-row steps (batch 1) are compiled, in fp32 on the plain
weights: their Linears run as inductor's fused multiply-and-sum where that beats MKL's GEMV on this
machine (optimize.packed.compiled_reduction_wins; gpt2-124m on an AMD EPYC, 2 threads: ~50 against
~35 tokens/s eager), and batched steps stay eager on the packed weights (2x faster than compiled
there); compile with pack="bf16" is refused (the compiled step would compute in fp32). `fuse` chooses fused projections (models.transformer.fuse_for_inference):
by default on accelerators only. `pack` chooses packed weights on the CPU
(optimize.packed.pack_for_inference): "fp32" runs calls of 4 or more rows (batched decode steps,
the server's steps, prefills) through oneDNN's packed inner product, same precision, 1.5-1.7x
faster than MKL's sgemm there, and one-row calls too where a measurement at packing time finds
packed faster than MKL's GEMV on this CPU (an AMD EPYC: 1.9x; an Intel Xeon: 0.75x, so F.linear); "bf16" runs every Linear on a bfloat16 packed copy (AMX), at a
measured accuracy cost; `generate` packs fp32 by default on the CPU for a model in eval mode (the
Engine itself packs only when asked: eval.lm drives it on a model that is being trained).
On the CPU each decode step runs at the intra-op thread count a ThreadChooser settles on by
timing the steps (on a machine shared with other jobs, fewer threads than cores can be several
times faster: no thread waits at a kernel's barrier for a descheduled one).
Figures: benchmarks/generate_speed.py, benchmarks/peers_decode.py, docs/compression.md.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import nn

from clusterlm.generate.sampling import RowSampling, check_sampling_args, sample_rows, token_logprobs
from clusterlm.models.transformer import fuse_for_inference
from clusterlm.optimize.packed import (compiled_reduction_wins, pack_for_inference, packing_unavailable,
                                       set_compiled_one_row)

Pack = Literal["auto", "fp32", "bf16"] | None

FinishReason = Literal["stop", "length"]

# model -> its compiled forward, shared by every generation over that model
_COMPILED: weakref.WeakKeyDictionary[nn.Module, Callable] = weakref.WeakKeyDictionary()
# model -> the thread count its CPU decode steps settled on, so a later generation starts there
_THREADS: weakref.WeakKeyDictionary[nn.Module, "ThreadChooser"] = weakref.WeakKeyDictionary()


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot run a decode step on `device` here, or None when it can: inductor
    generates C++ on CPU (needs g++ or clang++, or $CXX) and Triton kernels on CUDA."""
    if device.type == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 - any failure to find a compiler means no compile
            return f"torch.compile on CPU needs a C++ compiler (g++ or clang++, or set $CXX): {e}"
    elif device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs the triton package (pip install triton)"
    return None


def compiled_step(model: nn.Module) -> Callable:
    """`torch.compile(model)` (dynamic shapes), made once per model."""
    fn = _COMPILED.get(model)
    if fn is None:
        fn = torch.compile(model, dynamic=True)
        _COMPILED[model] = fn
    return fn


def context_length(model: nn.Module) -> int | None:
    """The one rule for a model's context: the positions its cache holds (a Transformer's
    max_seq_len), or None when there is no limit (an RNN). `generate` slides its window past it
    (sliding_window=True) or stops with "length"; the CLI trims a long prompt to fit
    (generate.text.prompt_ids); the server refuses a prompt longer than it (serve/app.py). A masked-LM
    encoder (a classifier's backbone) reads at most max_seq_len positions too; an encoder-decoder's
    source limit is generate/seq2seq.fit_sources'."""
    cfg = model.config
    return cfg.max_seq_len if cfg.arch in ("transformer", "encoder") else None


def pack_by_default(model: nn.Module, device: torch.device) -> Pack:
    """generate()'s packing when not told: fp32 packed weights on a CPU with oneDNN for a model in
    eval mode (an inference process), else none."""
    if device.type == "cpu" and not model.training and packing_unavailable() is None:
        return "fp32"
    return None


def fuse_by_default(device: torch.device) -> bool:
    """Whether the engine fuses projections on `device`: on accelerators, not on the CPU, where a
    batch-1 decode step is bound by the weights' bytes, fusing measured no faster and the fused
    copy costs memory (docs/compression.md, "Faster generation")."""
    return device.type != "cpu"


class ThreadChooser:
    """The intra-op thread count for CPU decode steps, chosen by measurement while decoding.

    On a machine shared with other jobs, a step with as many threads as cores waits at each of its
    ~300 kernels' barriers for a thread the OS has descheduled: gpt2-124m on this 2-core VM with a
    load average of 7 decoded 1.9 tokens/s at batch 1 with 2 threads and 11.6 with 1 (batch 16:
    17-21 against 109-133), while on a quiet machine 2 threads are ~1.8x faster than 1. So every
    `period` steps the chooser runs `probe` steps at a neighbouring count (half or double the current
    one, within 1..max_threads), compares their mean time (the first trial step left out: threads
    wake up) with the mean of the last steps at the current count, and moves when the neighbour is 5%
    faster. A trial that loses doubles the period (up to `max_period`), so a quiet machine pays a
    slower step about once every few hundred; a move resets it. Thread counts change the order of
    some float sums (MKL's sgemm splits), not the precision."""

    def __init__(self, max_threads: int, period: int = 16, probe: int = 3, max_period: int = 256) -> None:
        self.max_threads, self.best = max_threads, max_threads
        self.base_period, self.period, self.max_period, self.probe = period, period, max_period, probe
        self.countdown = probe  # the first trial early: a generation may be short
        self.recent: list[float] = []  # the last step times at `best`
        self.trial: tuple[int, list[float]] | None = None
        self._up = False  # alternate the direction of trials

    def threads(self) -> int:
        return self.trial[0] if self.trial is not None else self.best

    def _neighbour(self) -> int | None:
        down, up = max(1, self.best // 2), min(self.max_threads, self.best * 2)
        order = (up, down) if self._up else (down, up)
        self._up = not self._up
        return next((n for n in order if n != self.best), None)

    def record(self, seconds: float) -> None:
        """The time of the step just run at threads()."""
        if self.trial is not None:
            n, times = self.trial
            times.append(seconds)
            if len(times) < self.probe:
                return
            trial_s, best_s = sum(times[1:]) / (len(times) - 1), sum(self.recent) / len(self.recent)
            if trial_s < 0.95 * best_s:
                self.best, self.period, self.recent = n, self.base_period, []
            else:
                self.period = min(2 * self.period, self.max_period)
            self.trial, self.countdown = None, self.period
            return
        self.recent = (self.recent + [seconds])[-self.probe:]
        self.countdown -= 1
        if self.countdown <= 0 and len(self.recent) >= 2:
            n = self._neighbour()
            if n is None:  # one thread allowed: nothing to choose
                self.countdown = self.max_period
            else:
                self.trial = (n, [])


class Engine:
    """One model's decode step, shared by `generate` (a KVCache per call) and the server's scheduler
    (a SlotKVCache, `cache.rows(slots)`): next-token logits from a prefill or a one-token decode
    step, the sampler, and the finish rule. Runs under the caller's inference_mode."""

    def __init__(self, model: nn.Module, *, device: torch.device | str | None = None, compile: bool = False,
                 fuse: bool | None = None, pack: Pack = None, adapt_threads: bool | None = False) -> None:
        self.model = model
        self.vocab_size: int = model.config.vocab_size
        self.context: int | None = context_length(model)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if compile:
            problem = compile_unavailable(self.device)
            if problem is not None:
                raise ValueError(f"compile=True: {problem}; run without compile (eager decode)")
        # a second call rebuilds only stale copies, so calling it per generation follows weight changes
        fuse_for_inference(model, enable=fuse_by_default(self.device) if fuse is None else fuse)
        if compile and self.device.type == "cpu" and pack == "bf16":
            # compiled steps compute in fp32 on the weights (inductor cannot lower oneDNN's packed copy)
            raise ValueError("compile=True with pack='bf16': the compiled step computes in fp32 (torch.compile "
                             "cannot lower oneDNN's bf16 packed weights); use one or the other")
        if pack == "auto":
            pack = pack_by_default(model, self.device)
        if pack is not None and self.device.type == "cpu":  # replaces the Linear modules, same parameters
            pack_for_inference(model, pack)
        self.pack = pack
        if compile and self.device.type == "cpu" and pack == "fp32":
            # one-row compiled steps: inductor's fused reduction where it beats MKL's GEMV here
            set_compiled_one_row(model, compiled_reduction_wins(torch.get_num_threads()))
        # CPU decode steps choose their thread count by measurement (ThreadChooser). None: on the CPU
        # with more than one thread (generate, the server); the default False keeps eval.lm's scores
        # reproducible (thread counts change the order of some float sums)
        if adapt_threads is None:
            adapt_threads = self.device.type == "cpu" and torch.get_num_threads() > 1
        self.threads: ThreadChooser | None = None
        if adapt_threads:
            chooser = _THREADS.get(model)
            if chooser is None or chooser.max_threads != torch.get_num_threads():
                chooser = _THREADS[model] = ThreadChooser(torch.get_num_threads())
            self.threads = chooser
        # the compiled one-token step; on the CPU for one-row steps only: batched steps stay eager, where
        # oneDNN's packed weights ran gpt2-124m at batch 16 ~2x faster than the compiled step (MKL's sgemm)
        self._compiled = compiled_step(model) if compile else None

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    def prefill(self, idx: torch.Tensor, cache: object) -> torch.Tensor:
        """Next-token logits (B, V) after the tokens idx (B, T) fed through the cache. A Transformer
        computes logits for the last position only; rows past vocab_size are padding
        (vocab_multiple) and are dropped, so they are never sampled."""
        kw = {"last_only": True} if self.context is not None else {}
        return self.model(idx, cache, **kw)[:, -1, : self.vocab_size]  # (B, V)

    def decode(self, last: torch.Tensor, cache: object) -> torch.Tensor:
        """Next-token logits (B, V) after one token per row, last (B, 1): compiled when asked; on the
        CPU at the thread count the ThreadChooser picks (the caller's count is restored after)."""
        step = self.model
        if self._compiled is not None and (self.device.type != "cpu" or last.shape[0] == 1):
            step = self._compiled
        if self.threads is None:
            return step(last, cache)[:, -1, : self.vocab_size]  # (B, V)
        n, caller = self.threads.threads(), torch.get_num_threads()
        if n != caller:
            torch.set_num_threads(n)
        try:
            t0 = time.perf_counter()
            logits = step(last, cache)[:, -1, : self.vocab_size]  # (B, V)
            self.threads.record(time.perf_counter() - t0)
        finally:
            if n != caller:
                torch.set_num_threads(caller)
        return logits

    @staticmethod
    def sample(logits: torch.Tensor, rows: list[RowSampling],
               generator: torch.Generator | None | list[torch.Generator]) -> list[int]:
        """One token per row (generate.sampling.sample_rows)."""
        return sample_rows(logits, rows, generator).tolist()

    @staticmethod
    def logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[tuple[float, list[tuple[int, float]]]]:
        """Per row of logits (B, V): the sampled token's log-probability and the k most likely
        (id, log-probability) pairs (generate.sampling.token_logprobs: the raw model distribution)."""
        chosen, values, ids = token_logprobs(logits, torch.tensor(tokens, device=logits.device), k)
        return [(c, list(zip(i, v))) for c, i, v in zip(chosen.tolist(), ids.tolist(), values.tolist())]

    def finish_reason(self, token: int, eos_id: int | None, n_tokens: int, max_tokens: int,
                      cache_pos: int | None) -> FinishReason | None:
        """After sampling `token` as a sequence's n_tokens-th new token (eos not counted), with
        cache_pos tokens in its cache (None: the caller slides its window, no limit): "stop" at eos,
        "length" at max_tokens or when the context is full (no room to feed the token back)."""
        if eos_id is not None and token == eos_id:
            return "stop"
        if n_tokens >= max_tokens or (self.context is not None and cache_pos is not None
                                      and cache_pos >= self.context):
            return "length"
        return None


def _as_batch(prompt: Sequence[int] | Sequence[Sequence[int]], vocab_size: int | None) -> list[list[int]]:
    if len(prompt) == 0:
        raise ValueError("prompt is empty; give at least one token id")
    rows = [list(prompt)] if isinstance(prompt[0], int) else [list(p) for p in prompt]
    lengths = {len(r) for r in rows}
    if 0 in lengths:
        raise ValueError("a prompt in the batch is empty; every prompt needs at least one token id")
    if len(lengths) > 1:
        raise ValueError(f"prompts in one batch must have equal lengths, got lengths {sorted(lengths)}; "
                         "generate prompts of different lengths in separate calls")
    for i, r in enumerate(rows):
        for t in r:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                raise ValueError(f"prompt {i} has token id {t!r}; ids must be integers in [0, {vocab_size})")
    return rows


class Generation(Iterator[list[int | None]]):
    """A running generation: iterate it for the new token of each sequence per step.

    `tokens` holds the tokens generated so far per sequence (no prompt, no eos), and
    `finish_reasons` is "stop" / "length" per finished sequence (None while running).
    """

    def __init__(self, model: nn.Module, prompt: Sequence[int] | Sequence[Sequence[int]], *, max_new_tokens: int,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, eos_id: int | None = None,
                 device: torch.device | str | None = None, sliding_window: bool = False,
                 compile: bool = False, fuse: bool | None = None, pack: Pack = "auto",
                 adapt_threads: bool | None = None) -> None:
        check_sampling_args(temperature, top_k, top_p)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
        rows = _as_batch(prompt, model.config.vocab_size)
        self.engine = engine = Engine(model, device=device, compile=compile, fuse=fuse, pack=pack,
                                      adapt_threads=adapt_threads)
        self.vocab_size, self.device, self.context_len = engine.vocab_size, engine.device, engine.context
        self.prompt_len = len(rows[0])
        if self.context_len is not None and self.prompt_len > self.context_len:
            raise ValueError(f"prompt of {self.prompt_len} tokens exceeds the model's context of "
                             f"{self.context_len} tokens (model.max_seq_len)")
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.eos_id = eos_id
        self._rows = [RowSampling(temperature, top_k, top_p)] * len(rows)
        self.generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.finish_reasons: list[FinishReason | None] = [None] * len(rows)
        self._prompt = rows
        # sliding_window: when a Transformer's context is full, restart the cache from the last half
        # of the context (re-prefilled) instead of stopping; amortised cost ~2x a cached decode step
        self.sliding_window = sliding_window and self.context_len is not None
        self._history = [list(r) for r in rows]  # every token fed or sampled, per row
        self._cache = None
        self._last: torch.Tensor | None = None  # (B, 1) tokens to feed next
        self._steps = 0
        if max_new_tokens == 0:
            self.finish_reasons = ["length"] * len(rows)

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.finish_reasons)

    def _logits(self) -> torch.Tensor:
        """Next-token logits (B, V) for the tokens not yet in the cache."""
        if self._cache is None:
            B, P = len(self._prompt), self.prompt_len
            # every prompt token and every generated token but the last is fed to the model
            need = P + self.max_new_tokens - 1
            max_len = need if self.context_len is None else min(need, self.context_len)
            self._cache = self.model.make_cache(B, max_len, device=self.device, dtype=self.engine.dtype)
            idx = torch.tensor(self._prompt, dtype=torch.long, device=self.device)  # (B, P)
        elif self.sliding_window and self._cache.pos >= self.context_len:
            keep = max(1, self.context_len // 2)
            self._cache.reset()
            idx = torch.tensor([h[-keep:] for h in self._history], dtype=torch.long, device=self.device)  # (B, keep)
        else:
            return self.engine.decode(self._last, self._cache)  # (B, V) from (B, 1) tokens
        return self.engine.prefill(idx, self._cache)  # (B, V)

    def __next__(self) -> list[int | None]:
        if self.done:
            raise StopIteration
        # a model in training mode is switched to eval for the step and back after it; eval() walks
        # every module, which costs more than the rest of a small model's step, so a model already
        # in eval mode is left alone
        training = self.model.training
        if training:
            self.model.eval()
        try:
            with torch.inference_mode():
                logits = self._logits()
                next_ids = sample_rows(logits, self._rows, self.generator)  # (B,)
        finally:
            if training:
                self.model.train()
        self._last = next_ids[:, None]  # (B, 1)
        self._steps += 1
        ids = next_ids.tolist()
        if self.sliding_window:
            for h, t in zip(self._history, ids):
                h.append(t)
        pos = None if self.sliding_window else self._cache.pos
        out: list[int | None] = []
        for i, t in enumerate(ids):
            if self.finish_reasons[i] is not None:
                out.append(None)
                continue
            reason = self.engine.finish_reason(t, self.eos_id, self._steps, self.max_new_tokens, pos)
            if reason != "stop":
                self.tokens[i].append(t)
            out.append(t if reason != "stop" else None)
            self.finish_reasons[i] = reason
        if all(t is None for t in out):
            raise StopIteration  # the last running sequences all stopped at eos in this step
        return out


def generate(model: nn.Module, prompt: Sequence[int] | Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_id: int | None = None,
             device: torch.device | str | None = None, sliding_window: bool = False,
             compile: bool = False, fuse: bool | None = None, pack: Pack = "auto",
             adapt_threads: bool | None = None) -> Generation:
    """Stream generation: returns a Generation; each iteration yields one token id (or None once
    finished) per sequence. `prompt` is one list of token ids or a batch of equal-length lists.
    temperature 0 = greedy. `seed` seeds a private generator (None: torch's global RNG).
    `device` defaults to the model's parameters' device. `sliding_window=True` lets a Transformer
    generate past its context: when full, the cache restarts from the last max_seq_len // 2 tokens.
    `compile=True` runs the decode step through torch.compile (see the module docstring). `fuse`:
    fused projections for the cached steps (None: on accelerators only; see fuse_by_default).
    `pack`: packed CPU weights, "fp32" | "bf16" | None (leave the model's modules as they are);
    "auto": fp32 on the CPU for a model in eval mode (pack_by_default). `adapt_threads`: CPU decode
    steps pick their thread count by measurement (ThreadChooser; None: on the CPU with > 1 thread)."""
    return Generation(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, eos_id=eos_id, device=device, sliding_window=sliding_window,
                      compile=compile, fuse=fuse, pack=pack, adapt_threads=adapt_threads)


def complete(model: nn.Module, prompt: Sequence[int] | Sequence[Sequence[int]], **kwargs: object
             ) -> tuple[list[list[int]], list[FinishReason]]:
    """Run generate() to the end: (new tokens per sequence, finish reason per sequence)."""
    stream = generate(model, prompt, **kwargs)  # type: ignore[arg-type]
    for _ in stream:
        pass
    return stream.tokens, [r for r in stream.finish_reasons if r is not None]
