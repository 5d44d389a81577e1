"""Serving an encoder-decoder (arch "encdec"): completions and chat where the prompt (or the rendered
conversation) goes to the encoder and the generated target is streamed back.

`Seq2SeqScheduler` has the Scheduler's interface as the app uses it (submit -> a Request whose
`events` queue receives Delta / Finished / Failed; start, stop, abort, warmup, context, running,
cache), so the routes, SSE streaming, stop strings, logprobs, usage and metrics are the same code.
It is not continuous batching: one worker thread takes one request at a time and decodes its n
choices as one batch through generate/seq2seq.py (the source encoded once per request, the
cross-attention keys/values and the decoder's KV cache kept across steps). Requests wait in a
bounded queue (max_queue; beyond it 429 with Retry-After). docs/encdec.md says what this costs:
a request waits for the ones ahead of it to finish.

The app hands over its ids as for a decoder-only model ([EOS] + ids(prompt), checked against the
context); the encoder reads ids(prompt) + [EOS] (data/seq2seq.py source_ids), the same length.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque

import torch
from torch import nn

from clusterlm.generate.sampling import token_logprobs
from clusterlm.generate.seq2seq import Seq2SeqGeneration
from clusterlm.generate.text import StopStrings, TextStream
from clusterlm.serve.scheduler import (Delta, Failed, Finished, QueueFull, Request, SamplingParams,
                                      drop_cancelled_waiting)

log = logging.getLogger(__name__)


class _NoCache:
    """No slot cache to measure: each request makes its own (Served.measure counts 0 bytes)."""


class Seq2SeqScheduler:
    def __init__(self, model: nn.Module, tokenizer, *, max_batch: int, max_queue: int,  # noqa: ANN001
                 metrics, device: torch.device | str = "cpu") -> None:  # noqa: ANN001
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch={max_batch} must be >= 1 and max_queue={max_queue} >= 0")
        self.model, self.tokenizer, self.metrics = model, tokenizer, metrics
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context: int | None = model.config.max_seq_len  # the encoder's: a source longer is refused
        self.device = torch.device(device)
        self.cache = _NoCache()
        self._waiting: deque[Request] = deque()
        self._current: Request | None = None
        self._cond = threading.Condition()
        self._stop = False
        self._abort: str | None = None
        self._thread: threading.Thread | None = None
        self.request_seconds = 1.0  # moving average of one request, for Retry-After

    # ---- the app's API (event-loop thread) -------------------------------------------------------
    def submit(self, prompt_ids: list[int], n: int, params: SamplingParams, loop: asyncio.AbstractEventLoop) -> Request:
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"n={n} must be in [1, {self.max_batch}] (the server's --max-batch)")
        eos = self.tokenizer.eos_id
        source = (prompt_ids[1:] if prompt_ids and prompt_ids[0] == eos else list(prompt_ids)) + [eos]
        req = Request(source, n, params, loop)
        with self._cond:
            self._waiting = drop_cancelled_waiting(self._waiting, self.metrics)  # clients that left while queued
            if len(self._waiting) >= self.max_queue + (0 if self._current is not None else 1):
                wait = int(self.request_seconds * (1 + len(self._waiting)))
                raise QueueFull(len(self._waiting), min(60, max(1, wait)))
            self._waiting.append(req)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify()
        return req

    @property
    def running(self) -> int:
        return self._current.n if self._current is not None else 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="clusterlm-seq2seq", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def abort(self, message: str) -> None:
        with self._cond:
            self._abort = message
            self._cond.notify()

    def warmup(self) -> None:
        """One short decode (first-call allocations)."""
        gen = Seq2SeqGeneration(self.model, [[self.tokenizer.eos_id] * 4], max_new_tokens=3,
                                bos_id=self.tokenizer.bos_id, eos_id=None, temperature=0.0, device=self.device)
        for _ in gen:
            pass

    # ---- the worker thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stop and self._abort is None:
                    self._cond.wait()
                if self._stop:
                    return
                if self._abort is not None:
                    for req in self._waiting:
                        req.emit(Failed(self._abort))
                    self.metrics.aborted.inc(len(self._waiting))
                    self._waiting.clear()
                    self.metrics.queue_depth.set(0)
                    self._abort = None
                    continue
                req = self._current = self._waiting.popleft()
                self.metrics.queue_depth.set(len(self._waiting))
            t0 = time.perf_counter()
            try:
                self._run(req)
            except Exception as e:  # noqa: BLE001 - the request fails, the server keeps going
                log.exception("encoder-decoder request failed")
                req.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
            finally:
                with self._cond:
                    self._current = None
                self.metrics.running.set(0)
                self.request_seconds = 0.8 * self.request_seconds + 0.2 * (time.perf_counter() - t0)

    def _run(self, req: Request) -> None:
        p, tok, n = req.params, self.tokenizer, req.n
        if req.cancelled.is_set():
            self.metrics.finished.labels("cancelled").inc(n)
            return
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        self.metrics.prompt_len.observe(len(req.prompt_ids))
        self.metrics.queue_time.observe(time.perf_counter() - req.submitted)
        self.metrics.running.set(n)
        seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item())
        gen = Seq2SeqGeneration(self.model, [req.prompt_ids] * n, max_new_tokens=p.max_tokens, bos_id=tok.bos_id,
                                eos_id=tok.eos_id, pad_id=max(tok.pad_id, 0), temperature=p.temperature,
                                top_p=p.top_p if p.top_p < 1.0 else None, seeds=[seed + i for i in range(n)],
                                device=self.device)
        texts = [TextStream(tok) for _ in range(n)]
        stops = [StopStrings(p.stops) for _ in range(n)]
        counts, live = [0] * n, [True] * n
        pending: list[list] = [[] for _ in range(n)]
        t_last = t_first = time.perf_counter()
        first = True  # the step that samples each choice's first token
        logits_hook = p.logprobs is not None
        while any(live):
            if req.cancelled.is_set():
                self.metrics.finished.labels("cancelled").inc(sum(live))
                return
            if self._abort is not None or self._stop:  # the drain deadline (or shutdown): at a token boundary
                req.emit(Failed(self._abort or "the server is shutting down"))
                self.metrics.aborted.inc()
                return
            with torch.inference_mode():
                step = next(gen, None)
            if step is None:
                break
            now = time.perf_counter()
            for _ in range(sum(live)):  # one observation per choice, as Scheduler records them
                if first:
                    self.metrics.ttft.observe(now - req.submitted)
                else:
                    self.metrics.itl.observe(now - t_last)
            t_last, first = now, False
            lps = self._logprobs(gen, step, p.logprobs) if logits_hook else None
            for i, t in enumerate(step):
                if not live[i]:
                    continue
                if t is None or t in p.stop_ids:  # EOS (or an end of turn): not counted
                    self._finish(req, i, "stop", counts[i], stops[i].flush(texts[i].flush()), pending[i])
                    live[i] = False
                    continue
                counts[i] += 1
                self.metrics.generated_tokens.inc()
                if lps is not None:
                    pending[i].append(lps[i])
                piece, stopped = stops[i].push(texts[i].push(t))
                if stopped:
                    self._finish(req, i, "stop", counts[i], piece, pending[i])
                    live[i] = False
                elif gen.finish_reasons[i] == "length":
                    self._finish(req, i, "length", counts[i], piece + stops[i].flush(texts[i].flush()), pending[i])
                    live[i] = False
                elif piece or pending[i]:
                    req.emit(Delta(i, piece, counts[i], pending[i] if lps is not None else None))
                    pending[i] = []
        for i in range(n):  # the stream ended (every row at EOS or the length)
            if live[i]:
                reason = gen.finish_reasons[i] or "length"
                self._finish(req, i, reason, counts[i], stops[i].flush(texts[i].flush()), pending[i])
        self.metrics.latency.observe(time.perf_counter() - req.submitted)  # the request is answered
        self.metrics.generation_len.observe(sum(counts))
        log.debug("seq2seq request: %d choice(s), %.2f s", n, time.perf_counter() - t_first)

    def _logprobs(self, gen: Seq2SeqGeneration, step: list, k: int) -> list | None:
        """Each row's sampled token, its log-probability and the k most likely (id, log-probability),
        from the logits the step sampled from (Seq2SeqGeneration.last_logits)."""
        logits = getattr(gen, "last_logits", None)
        if logits is None:
            return None
        toks = torch.tensor([t if t is not None else self.tokenizer.eos_id for t in step], device=logits.device)
        chosen, values, ids = token_logprobs(logits, toks, k)
        return [(t, c, list(zip(i, v))) for t, c, i, v in zip(toks.tolist(), chosen.tolist(), ids.tolist(),
                                                                values.tolist())]

    def _finish(self, req: Request, i: int, reason: str, tokens: int, text: str, pending: list) -> None:
        if text:
            req.emit(Delta(i, text, tokens))
        req.emit(Finished(i, reason, tokens, pending or None))
        self.metrics.finished.labels(reason).inc()
