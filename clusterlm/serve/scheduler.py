"""Continuous batching: one background thread runs the decode loop over a slot cache.

Requests wait in a bounded queue (`QueueFull` when it holds `max_queue` requests beyond the free
slots; the app answers 429 with Retry-After). At every token boundary the loop
(1) drops cancelled sequences, freeing their slots;
(2) admits waiting requests while slots are free (a request with n choices takes n slots;
    admitted prompts of equal length are prefilled together as one batch);
(3) runs ONE forward pass over every running sequence, each at its own position in its own slot;
(4) samples per sequence (its own temperature, top_p and seeded generator) and streams text
    deltas to the request's asyncio queue.
Steps (2)-(4) are clusterlm.generate.engine's Engine, the decode step `generate` drives too:
prefill/decode to logits, sampling.sample_rows, the finish rule and the context length. Text is
clusterlm.generate.text's TextStream (linear detokenization) and StopStrings.
A sequence finishes with "stop" (EOS or a stop string; the stop string is not returned),
"length" (max_tokens, or a Transformer's context full), or is dropped when its client
disconnects ("cancelled").

    sched = Scheduler(model, tokenizer, max_batch=16, max_queue=64, metrics=Metrics())
    sched.start(); sched.warmup()
    req = sched.submit(prompt_ids, n=1, params=SamplingParams(max_tokens=32), loop=asyncio.get_running_loop())
    event = await req.events.get()   # Delta(index, text, tokens) ... Finished(index, reason, tokens)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from clusterlm.generate.engine import Engine, Pack
from clusterlm.generate.sampling import RowSampling, check_sampling_args
from clusterlm.generate.text import StopStrings, TextStream
from clusterlm.serve.metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue holds max_queue requests; retry after `retry_after` seconds."""

    def __init__(self, depth: int, retry_after: int) -> None:
        super().__init__(f"the request queue is full ({depth} waiting); retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stops: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()  # tokens that end the sequence like EOS (a chat template's end of turn)
    logprobs: int | None = None  # per token: its logprob and this many most likely alternatives (None: off)

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be >= 1")
        check_sampling_args(self.temperature, None, self.top_p)

    @property
    def row(self) -> RowSampling:
        """How the engine's sampler draws this request's tokens."""
        return RowSampling(self.temperature, None, self.top_p)


# (token id, its logprob, [(id, logprob) of the most likely tokens]): one per counted token, in order
TokenLogprob = tuple[int, float, list[tuple[int, float]]]


@dataclass
class Delta:
    index: int  # choice index
    text: str
    tokens: int  # tokens generated so far by this choice
    logprobs: list[TokenLogprob] | None = None  # the tokens sampled since the last event (params.logprobs)


@dataclass
class Finished:
    index: int
    reason: str  # "stop" | "length"
    tokens: int  # completion tokens of this choice
    logprobs: list[TokenLogprob] | None = None  # tokens not yet sent with a Delta (e.g. one ending in a stop string)


@dataclass
class Failed:
    message: str


class Request:
    """One API request: n sequences sharing a prompt. Events arrive on `events` (an asyncio.Queue
    of the submitting loop); `cancel()` may be called from any thread."""

    def __init__(self, prompt_ids: list[int], n: int, params: SamplingParams, loop: asyncio.AbstractEventLoop) -> None:
        self.prompt_ids, self.n, self.params = prompt_ids, n, params
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = loop
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.left, self.generated = n, 0  # choices still running; tokens of the finished ones

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, event: Delta | Finished | Failed) -> None:
        try:
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening
            pass


@dataclass
class _Seq:
    req: Request
    index: int
    slot: int
    gen: torch.Generator
    text: TextStream
    stops: StopStrings
    last: int = 0  # token to feed next
    n_tokens: int = 0
    t_last: float = field(default_factory=time.perf_counter)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # counted tokens not yet sent


class Scheduler:
    def __init__(self, model: nn.Module, tokenizer, *, max_batch: int, max_queue: int,  # noqa: ANN001
                 metrics: Metrics, device: torch.device | str = "cpu", pack: Pack = "auto") -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch={max_batch} must be >= 1 and max_queue={max_queue} >= 0")
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
        self.max_batch, self.max_queue = max_batch, max_queue
        # the same engine and packed weights as `generate`: on the CPU the batched step runs oneDNN's
        # packed inner product (generate.engine, optimize.packed), 1.5-1.7x MKL's sgemm for 4-16 rows,
        # at the thread count its steps measure fastest (ThreadChooser)
        self.engine = Engine(model, device=device, pack=pack, adapt_threads=None)
        self.context = self.engine.context
        self.cache = model.make_slot_cache(max_batch, self.context or 1, device=device, dtype=self.engine.dtype)
        self.device = self.engine.device
        self._waiting: deque[Request] = deque()
        self._running: list[_Seq] = []
        self._cond = threading.Condition()
        self._stop = False
        self._abort: str | None = None  # set by abort(): fail everything at the next token boundary
        self._thread: threading.Thread | None = None
        self.step_seconds = 0.05  # moving average of one decode step, for Retry-After

    # ---- API used by the app (event-loop thread) -----------------------------------------------
    def submit(self, prompt_ids: list[int], n: int, params: SamplingParams, loop: asyncio.AbstractEventLoop) -> Request:
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"n={n} must be in [1, {self.max_batch}] (the server's --max-batch)")
        req = Request(prompt_ids, n, params, loop)
        with self._cond:
            self._drop_cancelled_waiting()  # a client that left while queued holds no place in the queue
            # free slots the loop has not handed out yet absorb requests beyond the queue's bound,
            # so a burst arriving between two decode steps is not refused while slots sit idle
            if self._beyond_free(n) > self.max_queue:
                # a rough wait: the queue ahead of it drains about max_batch sequences per max_tokens steps
                retry = max(1, int(self.step_seconds * params.max_tokens * (1 + len(self._waiting) / self.max_batch)))
                raise QueueFull(len(self._waiting), min(retry, 60))
            self._waiting.append(req)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify()
        return req

    def _beyond_free(self, n: int) -> int:
        """Under self._cond: how many requests would wait beyond the free slots with one of `n` choices
        added, counted as `_admit` takes them: first come, first served, each taking n slots, until
        one does not fit."""
        free = self.cache.num_free
        fit = 0
        for m in [*(r.n for r in self._waiting), n]:
            if m > free:
                break
            free -= m
            fit += 1
        return len(self._waiting) + 1 - fit

    @property
    def running(self) -> int:
        return len(self._running)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="clusterlm-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def abort(self, message: str) -> None:
        """End every waiting and running request with Failed(message) at the next token boundary
        (the drain deadline: streams get an error event, non-streaming requests a 500)."""
        with self._cond:
            self._abort = message
            self._cond.notify()

    def warmup(self) -> None:
        """One prefill and a few decode steps on a dummy prompt (first-call allocations, kernels)."""
        with torch.inference_mode():
            slots = [self.cache.alloc() for _ in range(min(2, self.max_batch))]
            ids = torch.zeros(len(slots), 4, dtype=torch.long, device=self.device)
            self.engine.prefill(ids, self.cache.rows(slots))
            for _ in range(3):
                self.engine.decode(ids[:, :1], self.cache.rows(slots))
            for s in slots:
                self.cache.free(s)

    # ---- the decode loop (scheduler thread) ----------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._running and self._abort is None:
                    self._cond.wait()
                if self._stop:
                    return
                if self._abort is not None:
                    self._fail_all(self._abort)
                    continue
            try:
                with torch.inference_mode():
                    self._step()
            except Exception as e:  # a bug: fail every running request rather than hang them
                log.exception("scheduler step failed")
                for s in self._running:
                    s.req.emit(Failed(f"internal error: {type(e).__name__}"))
                    with contextlib.suppress(ValueError):  # a slot freed before the error
                        self.cache.free(s.slot)
                self._running = []
                self.metrics.running.set(0)

    def _fail_all(self, message: str) -> None:
        """Under self._cond: Failed(message) to every request, waiting or running; slots freed."""
        reqs = {id(r): r for r in self._waiting}
        for s in self._running:
            reqs[id(s.req)] = s.req
            self.cache.free(s.slot)
        for r in reqs.values():
            r.emit(Failed(message))
        self.metrics.aborted.inc(len(reqs))
        self._waiting.clear()
        self._running = []
        self._abort = None
        self.metrics.queue_depth.set(0)
        self.metrics.running.set(0)
        self.metrics.kv_used.set(0)

    def _step(self) -> None:
        t0 = time.perf_counter()
        self._drop_cancelled()
        self._admit()
        if self._running:
            rows = self.cache.rows([s.slot for s in self._running])
            idx = torch.tensor([[s.last] for s in self._running], dtype=torch.long, device=self.device)  # (B, 1)
            logits = self.engine.decode(idx, rows)  # (B, V)
            self._sample_and_emit(self._running, logits)
            self.step_seconds = 0.9 * self.step_seconds + 0.1 * (time.perf_counter() - t0)
        self.metrics.running.set(len(self._running))
        self.metrics.kv_used.set(self.max_batch - self.cache.num_free)

    def _drop_cancelled(self) -> None:
        keep = []
        for s in self._running:
            if s.req.cancelled.is_set():
                self.cache.free(s.slot)
                self.metrics.finished.labels("cancelled").inc()
            else:
                keep.append(s)
        self._running = keep

    def _drop_cancelled_waiting(self) -> None:
        """Under self._cond: see drop_cancelled_waiting."""
        self._waiting = drop_cancelled_waiting(self._waiting, self.metrics)

    def _admit(self) -> None:
        """Move waiting requests into free slots (first come, first served) and prefill them: one
        forward pass per distinct prompt length, over every admitted row of that length."""
        groups: dict[int, list[_Seq]] = {}
        free = self.cache.num_free
        with self._cond:
            self._drop_cancelled_waiting()
            while self._waiting and self._waiting[0].n <= free:
                req = self._waiting.popleft()
                if req.cancelled.is_set():
                    self.metrics.finished.labels("cancelled").inc(req.n)
                    continue
                free -= req.n
                base = req.params.seed if req.params.seed is not None else secrets.randbits(62)
                for i in range(req.n):
                    # seed + i as given: manual_seed takes [0, 2^64), so the largest seed (2^63-1) + 15 fits
                    # (taken modulo 2^63-1, seed 2^63-1 drew seed 0's text)
                    g = torch.Generator(device=self.device).manual_seed(base + i)
                    # the text the reply adds to its prompt (a sentencepiece-style decoder drops the leading
                    # space of a first token decoded alone)
                    text = TextStream(self.tokenizer, req.prompt_ids)
                    seq = _Seq(req, i, self.cache.alloc(), g, text, StopStrings(req.params.stops))
                    groups.setdefault(len(req.prompt_ids), []).append(seq)
                    self._running.append(seq)  # running from here on: an error below fails it, frees its slot
                self.metrics.prompt_tokens.inc(len(req.prompt_ids))
                self.metrics.prompt_len.observe(len(req.prompt_ids))
                self.metrics.queue_time.observe(time.perf_counter() - req.submitted)
            self.metrics.queue_depth.set(len(self._waiting))
        for seqs in groups.values():
            ids = torch.tensor([s.req.prompt_ids for s in seqs], dtype=torch.long, device=self.device)  # (R, P)
            logits = self.engine.prefill(ids, self.cache.rows([s.slot for s in seqs]))  # (R, V)
            self._sample_and_emit(seqs, logits)

    def _sample_and_emit(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Sample one token per row of logits (B, V) for seqs[b]; emit text; retire finished ones."""
        # one generator per row: a seeded request draws the same tokens whatever shares its batch
        tokens = self.engine.sample(logits, [s.req.params.row for s in seqs], [s.gen for s in seqs])
        want = [b for b, s in enumerate(seqs) if s.req.params.logprobs is not None]  # only rows that asked
        lps = dict(zip(want, self.engine.logprobs(
            logits[want], [tokens[b] for b in want], max(seqs[b].req.params.logprobs for b in want)))) if want else {}
        now = time.perf_counter()
        done: set[int] = set()
        self._outbox: list[tuple[Request, Delta | Finished]] = []
        for b, s in enumerate(seqs):
            tok = tokens[b]
            if s.n_tokens == 0:
                self.metrics.ttft.observe(now - s.req.submitted)
            else:
                self.metrics.itl.observe(now - s.t_last)
            s.t_last = now
            reason = self._advance(s, tok, lps.get(b))
            if reason is not None:
                self._finish(s, reason)
                done.add(id(s))
        if done:
            self._running = [s for s in self._running if id(s) not in done]
        # one wake-up of each request's event loop per step, not one per token
        by_loop: dict[int, tuple[asyncio.AbstractEventLoop, list]] = {}
        for req, ev in self._outbox:
            by_loop.setdefault(id(req._loop), (req._loop, []))[1].append((req.events, ev))
        for loop, items in by_loop.values():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop is closed: nobody is listening
                pass

    def _advance(self, s: _Seq, tok: int, lp: tuple[float, list[tuple[int, float]]] | None = None) -> str | None:
        """Take token `tok` (its logprob and the batch's top alternatives: `lp`) for sequence s; returns a
        finish reason or None to keep going."""
        pos = int(self.cache.pos[s.slot]) if self.context is not None else None
        reason = self.engine.finish_reason(tok, self.tokenizer.eos_id, s.n_tokens + 1, s.req.params.max_tokens, pos)
        if reason == "stop" or tok in s.req.params.stop_ids:  # eos or end of turn: not counted, nothing to show
            return "stop"
        s.n_tokens += 1
        if lp is not None:
            s.logprobs.append((tok, lp[0], lp[1][:s.req.params.logprobs]))
        s.last = tok
        self.metrics.generated_tokens.inc()
        piece, stopped = s.stops.push(s.text.push(tok))
        self._send(s, piece)
        return "stop_string" if stopped else reason

    def _send(self, s: _Seq, text: str) -> None:
        if text:
            self._outbox.append((s.req, Delta(s.index, text, s.n_tokens, s.logprobs or None)))
            s.logprobs = []

    def _finish(self, s: _Seq, reason: str) -> None:
        if reason == "stop_string":
            reason = "stop"  # the stop string and anything after it are not returned
        else:
            self._send(s, s.stops.flush(s.text.flush()))  # held-back text was not a stop string after all
        self.cache.free(s.slot)
        self.metrics.finished.labels(reason).inc()
        self._outbox.append((s.req, Finished(s.index, reason, s.n_tokens, s.logprobs or None)))
        s.req.left -= 1
        s.req.generated += s.n_tokens
        if s.req.left == 0:  # the request's last choice: it is answered
            self.metrics.latency.observe(time.perf_counter() - s.req.submitted)
            self.metrics.generation_len.observe(s.req.generated)


def _deliver(items: list[tuple[asyncio.Queue, Delta | Finished]]) -> None:
    for queue, ev in items:
        queue.put_nowait(ev)


def drop_cancelled_waiting(waiting: deque, metrics: Any) -> deque:
    """The queue without the requests whose client left while they waited, those counted as cancelled
    (each of its n choices), so that they neither take a queue place (429 for live clients) nor show in
    the depth gauge. Both schedulers (this one and serve/seq2seq.py's) call it under their lock."""
    if not any(r.cancelled.is_set() for r in waiting):
        return waiting
    metrics.finished.labels("cancelled").inc(sum(r.n for r in waiting if r.cancelled.is_set()))
    kept = deque(r for r in waiting if not r.cancelled.is_set())
    metrics.queue_depth.set(len(kept))
    return kept
