"""Generation over token ids: prefill the prompt into the model's cache, then decode one token at a
time, streaming each step's new tokens. Works for every model family (the Transformer's KV cache,
the RNN's recurrent state). `serve` and the CLI add text and scheduling on top.

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
the prefill stays eager. Figures: benchmarks/generate_speed.py, docs/compression.md.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch
from torch import nn

from clusterlm.generate.sampling import check_sampling_args, sample_next

FinishReason = Literal["stop", "length"]

# model -> its compiled forward, shared by every generation over that model
_COMPILED: weakref.WeakKeyDictionary[nn.Module, Callable] = weakref.WeakKeyDictionary()


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
                 compile: bool = False) -> None:
        check_sampling_args(temperature, top_k, top_p)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0")
        cfg = model.config
        rows = _as_batch(prompt, cfg.vocab_size)
        self.vocab_size: int = cfg.vocab_size
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        # a Transformer holds at most max_seq_len positions; an RNN has no limit
        self.context_len: int | None = cfg.max_seq_len if cfg.arch == "transformer" else None
        self.prompt_len = len(rows[0])
        if self.context_len is not None and self.prompt_len > self.context_len:
            raise ValueError(f"prompt of {self.prompt_len} tokens exceeds the model's context of "
                             f"{self.context_len} tokens (model.max_seq_len)")
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_k, self.top_p, self.eos_id = temperature, top_k, top_p, eos_id
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
        if compile:
            problem = compile_unavailable(self.device)
            if problem is not None:
                raise ValueError(f"compile=True: {problem}; run without compile (eager decode)")
        self._decode = compiled_step(model) if compile else model  # the one-token step
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
            dtype = next(p.dtype for p in self.model.parameters() if p.is_floating_point())
            self._cache = self.model.make_cache(B, max_len, device=self.device, dtype=dtype)
            idx = torch.tensor(self._prompt, dtype=torch.long, device=self.device)  # (B, P)
        elif self.sliding_window and self._cache.pos >= self.context_len:
            keep = max(1, self.context_len // 2)
            self._cache.reset()
            idx = torch.tensor([h[-keep:] for h in self._history], dtype=torch.long, device=self.device)  # (B, keep)
        else:
            return self._decode(self._last, self._cache)[:, -1, : self.vocab_size]  # (B, V) from (B, 1) tokens
        # rows past vocab_size are padding (vocab_multiple): never sample them; a Transformer's
        # prefill computes logits for the last position only
        kw = {"last_only": True} if self.context_len is not None else {}
        return self.model(idx, self._cache, **kw)[:, -1, : self.vocab_size]  # (B, V)

    def __next__(self) -> list[int | None]:
        if self.done:
            raise StopIteration
        # a model in training mode is switched to eval for the step and back after it; eval() walks
        # every module (~0.3 ms for gpt2-124m), so a model already in eval mode is left alone
        training = self.model.training
        if training:
            self.model.eval()
        try:
            with torch.inference_mode():
                logits = self._logits()
                next_ids = sample_next(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
                                       generator=self.generator)  # (B,)
        finally:
            if training:
                self.model.train()
        self._last = next_ids[:, None]  # (B, 1)
        self._steps += 1
        if self.sliding_window:
            for h, t in zip(self._history, next_ids.tolist()):
                h.append(t)
        out: list[int | None] = []
        for i, t in enumerate(next_ids.tolist()):
            if self.finish_reasons[i] is not None:
                out.append(None)
            elif self.eos_id is not None and t == self.eos_id:
                self.finish_reasons[i] = "stop"
                out.append(None)
            else:
                self.tokens[i].append(t)
                out.append(t)
        context_full = (self.context_len is not None and not self.sliding_window
                        and self._cache.pos >= self.context_len)
        if self._steps >= self.max_new_tokens or context_full:  # context_full: no room to feed a token back
            self._finish_running("length")
        if all(t is None for t in out):
            raise StopIteration  # the last running sequences all stopped at eos in this step
        return out

    def _finish_running(self, reason: FinishReason) -> None:
        self.finish_reasons = [r if r is not None else reason for r in self.finish_reasons]


def generate(model: nn.Module, prompt: Sequence[int] | Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, eos_id: int | None = None,
             device: torch.device | str | None = None, sliding_window: bool = False,
             compile: bool = False) -> Generation:
    """Stream generation: returns a Generation; each iteration yields one token id (or None once
    finished) per sequence. `prompt` is one list of token ids or a batch of equal-length lists.
    temperature 0 = greedy. `seed` seeds a private generator (None: torch's global RNG).
    `device` defaults to the model's parameters' device. `sliding_window=True` lets a Transformer
    generate past its context: when full, the cache restarts from the last max_seq_len // 2 tokens.
    `compile=True` runs the decode step through torch.compile (see the module docstring)."""
    return Generation(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, eos_id=eos_id, device=device, sliding_window=sliding_window,
                      compile=compile)


def complete(model: nn.Module, prompt: Sequence[int] | Sequence[Sequence[int]], **kwargs: object
             ) -> tuple[list[list[int]], list[FinishReason]]:
    """Run generate() to the end: (new tokens per sequence, finish reason per sequence)."""
    stream = generate(model, prompt, **kwargs)  # type: ignore[arg-type]
    for _ in stream:
        pass
    return stream.tokens, [r for r in stream.finish_reasons if r is not None]
