"""Generation for encoder-decoders (arch "encdec") and beam search as text: what `generate`,
`eval --task` and `serve` call when the model is an encoder-decoder, or when beams are asked for.

    from clusterlm.generate.seq2seq import Seq2SeqGeneration, completions
    stream = Seq2SeqGeneration(model, [src_ids], max_new_tokens=40, temperature=0.0, bos_id=1, eos_id=2, pad_id=0)
    for step in stream: ...              # one token id (or None once finished) per source, as engine.Generation
    outs = completions(model, tok, [fit_sources(tok, ["en: A dog runs.\\nfr:"], 256, False)[0]], max_new_tokens=40,
                       num_beams=4)             # [(text, new tokens, finish reason)]

The encoder reads the prompt (data/seq2seq.py `source_ids`: its ids and EOS, as in training); the
decoder starts from BOS and its output is the completion. The source is encoded once per call
(EncoderDecoder.prime: every decoder layer's cross-attention keys and values are cached) and each
step feeds one token through the decoder's KV cache. Greedy and sampling use the engine's sampler
(generate.sampling.sample_rows: temperature, top-k, top-p, a generator per row seeded with seed + i,
the same rule as eval.lm's generate_completions); beam search is generate/beam.py. A source longer
than the encoder's context is refused (DataError) or, with truncate, cut to its first
max_seq_len - 1 ids plus EOS. Decoding stops at EOS, at max_new_tokens, or when the decoder's
max_seq_len positions are full ("length").

This is a batch-per-call path, not the server's continuous batching (serve/scheduler.py drives the
decoder-only engine): `serve` answers an encoder-decoder's requests one call at a time
(docs/encdec.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from clusterlm.errors import DataError
from clusterlm.generate.beam import beam_search, pad_sources
from clusterlm.generate.sampling import GREEDY_TEMPERATURE, RowSampling, check_sampling_args, sample_rows


def is_encdec(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "arch", None) == "encdec"


def fit_sources(tokenizer: Any, texts: Sequence[str], context: int, truncate: bool) -> list[list[int]]:
    """The encoder's ids of each text (its ids + EOS); longer than `context`: DataError naming how
    many and the longest, or with truncate the first context - 1 ids + EOS."""
    from clusterlm.data.seq2seq import source_ids

    ids = [source_ids(tokenizer, t) for t in texts]
    bad = [i for i, s in enumerate(ids) if len(s) > context]
    if bad and not truncate:
        raise DataError(f"{len(bad)} of {len(ids)} sources do not fit the encoder's context of {context} tokens (the "
                        f"longest is {max(len(ids[i]) for i in bad)} tokens with EOS; first: source {bad[0]}); pass "
                        f"truncate=True (--truncate) to keep the first {context - 1} tokens of each")
    return [s if len(s) <= context else s[:context - 1] + [tokenizer.eos_id] for s in ids]


def _check_sources(sources: Sequence[Sequence[int]], vocab_size: int) -> None:
    """ValueError naming the first empty source or id outside [0, vocab_size): the embedding would
    fail with a bare IndexError (or, on CUDA, a device-side assert)."""
    if len(sources) == 0:
        raise ValueError("sources is empty; give at least one source (its token ids and EOS)")
    for i, src in enumerate(sources):
        if len(src) == 0:
            raise ValueError(f"source {i} is empty; every source needs at least one token id (its EOS)")
        for t in src:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
                raise ValueError(f"source {i} has token id {t!r}; ids must be integers in [0, {vocab_size})")


class Seq2SeqGeneration(Iterator[list[int | None]]):
    """A running encoder-decoder generation over a batch of sources, engine.Generation's shape:
    iterate for one new token per sequence per step (None once it finished); `tokens` and
    `finish_reasons` ("stop" at EOS, "length") as there."""

    def __init__(self, model: nn.Module, sources: Sequence[Sequence[int]], *, max_new_tokens: int,
                 bos_id: int, eos_id: int | None, pad_id: int = 0, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, seeds: Sequence[int] | None = None,
                 device: torch.device | str | None = None) -> None:
        check_sampling_args(temperature, top_k, top_p)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be >= 0")
        _check_sources(sources, model.config.vocab_size)
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.max_new_tokens = min(max_new_tokens, model.config.max_seq_len)
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        B = len(sources)
        self._rows = [RowSampling(temperature, top_k, top_p)] * B
        if temperature < GREEDY_TEMPERATURE:
            self.generator: Any = None
        elif seeds is not None:
            self.generator = [torch.Generator(device=self.device).manual_seed(s % 2**64) for s in seeds]
        else:
            self.generator = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        self._sources = [list(s) for s in sources]
        self.tokens: list[list[int]] = [[] for _ in range(B)]
        self.finish_reasons: list[str | None] = [None] * B if self.max_new_tokens else ["length"] * B
        self._cache = None
        self._last: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return all(r is not None for r in self.finish_reasons)

    def _logits(self) -> torch.Tensor:
        model = self.model
        if self._cache is None:
            dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
            src, mask = pad_sources(self._sources, self.pad_id, self.device)
            # decoder positions: BOS and every new token but the last
            self._cache = model.make_cache(src.shape[0], self.max_new_tokens, device=self.device, dtype=dtype)
            model.prime(src, self._cache, mask)
            self._last = torch.full((src.shape[0], 1), self.bos_id, dtype=torch.long, device=self.device)
        return model(None, self._last, cache=self._cache, last_only=True)[:, -1, :model.config.vocab_size]

    def __next__(self) -> list[int | None]:
        if self.done:
            raise StopIteration
        training = self.model.training
        if training:
            self.model.eval()
        try:
            with torch.inference_mode():
                self.last_logits = self._logits()  # (B, V): what the step sampled from (serve's logprobs)
                next_ids = sample_rows(self.last_logits, self._rows, self.generator)  # (B,)
        finally:
            if training:
                self.model.train()
        self._last = next_ids[:, None]
        step = self._cache.pos  # tokens fed so far = new tokens sampled (BOS included, the new one not yet fed)
        out: list[int | None] = []
        for i, t in enumerate(next_ids.tolist()):
            if self.finish_reasons[i] is not None:
                out.append(None)
                continue
            if self.eos_id is not None and t == self.eos_id:
                self.finish_reasons[i] = "stop"
                out.append(None)
                continue
            self.tokens[i].append(t)
            out.append(t)
            if step >= self.max_new_tokens:
                self.finish_reasons[i] = "length"
        if all(t is None for t in out):
            raise StopIteration
        return out


def completions(model: nn.Module, tokenizer: Any, ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                batch_size: int = 16, temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
                seed: int | None = None, stops: Sequence[str] = (), device: torch.device | str | None = None,
                num_beams: int = 1, length_penalty: float = 1.0, bar: Any = None,
                stop_ids: Sequence[int] = ()) -> list[tuple[str, int, str]]:
    """(text, new tokens, finish reason) per input, in order: `ids` are an encoder-decoder's sources
    (fit_sources) or, with num_beams > 1, a decoder-only model's prompts ([EOS] + ids, fitted to its
    context). Beam search is deterministic (temperature etc. do not apply) and ends a beam at EOS or a
    token of `stop_ids`, so the best beam is chosen among replies that end there; sampling draws input i
    from a generator seeded with seed + i; the text is cut before the first of `stops` or of the
    tokens `stop_ids` (a chat template's end of turn, which ends a text as EOS does: not counted).
    eval.lm.generate_completions calls this (and wraps the tuples as its Completion)."""
    from clusterlm.generate.text import StopStrings, TextStream

    check_sampling_args(temperature, top_k, top_p)
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    encdec = is_encdec(model)
    eos = tokenizer.eos_id
    if not ids or max_new_tokens == 0:
        return [("", 0, "length") for _ in ids]

    def text_of(tokens: list[int], reason: str, prompt: Sequence[int] = ()) -> tuple[str, int, str]:
        # a decoder-only prompt is decoded before the reply: the text the reply adds to it (sentencepiece-
        # style decoders drop the leading space of a first token decoded alone)
        ts, st = TextStream(tokenizer, prompt), StopStrings(tuple(stops))
        pieces = []
        for n, tok in enumerate(tokens, 1):
            if tok in stop_ids:
                pieces.append(st.flush(ts.flush()))
                return "".join(pieces), n - 1, "stop"
            piece, stopped = st.push(ts.push(tok))
            pieces.append(piece)
            if stopped:
                return "".join(pieces), n, "stop"
        pieces.append(st.flush(ts.flush()))
        return "".join(pieces), len(tokens), reason

    def done(n: int) -> None:
        if bar is not None:
            bar.update(n)

    out: list[Any] = [None] * len(ids)
    if num_beams > 1:
        # decoder-only prompts in one call must have equal lengths: group them
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        groups: list[list[int]] = []
        for i in order:
            if groups and len(groups[-1]) < batch_size and (encdec or len(ids[groups[-1][0]]) == len(ids[i])):
                groups[-1].append(i)
            else:
                groups.append([i])
        for g in groups:
            kw: dict[str, Any] = ({"sources": [ids[i] for i in g], "bos_id": tokenizer.bos_id} if encdec
                                  else {"prompts": [ids[i] for i in g]})
            hyps = beam_search(model, num_beams=num_beams, max_new_tokens=max_new_tokens, eos_id=eos,
                               stop_ids=stop_ids, pad_id=max(tokenizer.pad_id, 0), length_penalty=length_penalty,
                               device=dev, **kw)
            for i, h in zip(g, hyps):
                out[i] = text_of(h.tokens, "stop" if h.finished else "length", () if encdec else ids[i])
            done(len(g))
        return out
    if not encdec:
        raise ValueError("seq2seq.completions samples encoder-decoders only; a decoder-only model's greedy and "
                         "sampled generation is eval.lm's (the engine's continuous batching)")
    base = seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
    for a in range(0, len(ids), batch_size):
        chunk = list(range(a, min(a + batch_size, len(ids))))
        gen = Seq2SeqGeneration(model, [ids[i] for i in chunk], max_new_tokens=max_new_tokens,
                                bos_id=tokenizer.bos_id, eos_id=eos, pad_id=max(tokenizer.pad_id, 0),
                                temperature=temperature, top_k=top_k, top_p=top_p,
                                seeds=[base + i for i in chunk], device=dev)
        for _ in gen:
            pass
        for k, i in enumerate(chunk):
            out[i] = text_of(gen.tokens[k], gen.finish_reasons[k] or "length")
        done(len(chunk))
    return out


def stream_seq2seq(loaded: Any, source: str, *, max_new_tokens: int, temperature: float, top_k: int | None,
                   top_p: float | None, seed: int | None, stop: str | tuple[str, ...] | None = None,
                   stop_ids: tuple[int, ...] = (), num_beams: int = 1, length_penalty: float = 1.0,
                   truncate: bool = True) -> Iterator[str]:
    """generate.text.stream_text for an encoder-decoder (a checkpoint.model_io LoadedModel): `source`
    to the encoder (too long: cut to its first max_seq_len - 1 ids + EOS unless truncate=False), the
    target streamed as text; with num_beams > 1 the best beam, in one piece when the search ends."""
    from clusterlm.generate.text import stream_pieces

    tok, model = loaded.tokenizer, loaded.model
    (src,) = fit_sources(tok, [source], model.config.max_seq_len, truncate)
    if num_beams > 1:
        (h,) = beam_search(model, sources=[src], num_beams=num_beams, max_new_tokens=max_new_tokens, eos_id=tok.eos_id,
                           stop_ids=stop_ids, bos_id=tok.bos_id, pad_id=max(tok.pad_id, 0),
                           length_penalty=length_penalty)
        steps: Iterator[list[int | None]] = iter([[t] for t in h.tokens])
    else:
        steps = Seq2SeqGeneration(model, [src], max_new_tokens=max_new_tokens, bos_id=tok.bos_id, eos_id=tok.eos_id,
                                  pad_id=max(tok.pad_id, 0), temperature=temperature, top_k=top_k, top_p=top_p,
                                  seed=seed)
    yield from stream_pieces(steps, tok, stop, stop_ids)


@torch.inference_mode()
def score_pairs(model: nn.Module, tokenizer: Any, requests: Sequence[tuple[str, str]], *, batch_size: int = 16,
                device: torch.device | str | None = None, truncate: bool = False, bar: Any = None
                ) -> list[tuple[float, int, bool]]:
    """(log p(continuation | context), tokens, every token the argmax) per (context, continuation)
    request for an encoder-decoder: the context is the source (fit_sources), the continuation the
    target the decoder is scored on from BOS (its leading whitespace dropped: targets start without
    one, as in data/seq2seq.py; no EOS scored), the log-likelihoods of choice tasks and lm-eval."""
    enc = fit_sources(tokenizer, [c for c, _ in requests], model.config.max_seq_len, truncate)
    L = model.config.max_seq_len
    conts = [tokenizer.encode(x.lstrip()) for _, x in requests]
    too_long = [i for i, t in enumerate(conts) if len(t) > L]
    if too_long:
        raise DataError(f"{len(too_long)} of {len(conts)} continuations are longer than the decoder's {L} positions "
                        f"(first: request {too_long[0]}); they cannot be scored")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    V = model.config.vocab_size
    out: list[tuple[float, int, bool] | None] = [None] * len(requests)
    order = sorted(range(len(requests)), key=lambda i: -(len(enc[i]) + len(conts[i])))
    for a in range(0, len(order), batch_size):
        batch = [i for i in order[a:a + batch_size]]
        for i in [i for i in batch if not conts[i]]:
            out[i] = (0.0, 0, True)
        batch = [i for i in batch if conts[i]]
        if not batch:
            continue
        src, mask = pad_sources([enc[i] for i in batch], max(tokenizer.pad_id, 0), dev)
        T = max(len(conts[i]) for i in batch)
        tin = torch.full((len(batch), T), max(tokenizer.pad_id, 0), dtype=torch.long)
        for b, i in enumerate(batch):
            tin[b, :len(conts[i])] = torch.tensor([tokenizer.bos_id] + conts[i][:-1], dtype=torch.long)
        logp = torch.log_softmax(model(src, tin.to(dev), mask)[:, :, :V].double(), dim=-1)  # (B, T, V)
        for b, i in enumerate(batch):
            n = len(conts[i])
            tgt = torch.tensor(conts[i], device=dev)
            lp = logp[b, :n].gather(-1, tgt[:, None]).squeeze(-1)
            out[i] = (float(lp.sum()), n, bool((logp[b, :n].argmax(-1) == tgt).all()))
        if bar is not None:
            bar.update(len(batch))
    return out  # type: ignore[return-value]
