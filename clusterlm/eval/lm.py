"""The model side of task evaluation: batched log-likelihoods of continuations and batched
generation for lists of prompts, for every model family (Transformer, LSTM/GRU; quantized and
pruned ones too: they share one call signature, `model(idx) -> logits (B, T, padded V)`).

    from clusterlm.eval.lm import generate_batch, loglikelihood, loglikelihood_rolling

    loglikelihood(model, tok, [("To be, or not", " to be")], batch_size=16)
    # [LogLikelihood(logprob=-3.1, n_tokens=6, is_greedy=False)]
    loglikelihood_rolling(model, tok, ["a whole document"])      # [(logprob, n_tokens)]
    generate_batch(model, tok, ["ROMEO.\\n"], max_new_tokens=32, stops=["\\n\\n"])   # ["..."]

Definitions are lm-evaluation-harness's (lm_eval.api.model.TemplateLM, models/huggingface.py), with
clusterlm's document separator: every sequence starts with EOS, as in training and as
generate.text.prompt_ids does for prompts.

- loglikelihood((context, continuation)): trailing whitespace of the context moves to the
  continuation; context ids = [EOS] + encode(context), whole = [EOS] + encode(context +
  continuation), continuation ids = whole[len(context ids):] (the split at the boundary, so a BPE
  merge across it is scored as the model would see the text). The model reads whole[:-1]; the sum of
  log p over the continuation's tokens, their number, and whether each was the argmax.
- loglikelihood_rolling(text): the text's ids cut into disjoint windows of the model's context
  (lm-eval's get_rolling_token_windows with context_len=1): the first window predicts its tokens
  after [EOS], each later one after the one token before it. An RNN has no context limit: one window.
- classify(texts): a SequenceClassifier's label and label probabilities for [EOS] + encode(text)
  (its head on the pooled final hidden state; no log-likelihoods).
- generate_batch(prompts): continuation text of [EOS] + encode(prompt), cut at the first stop string
  (not returned) or EOS, greedy by default; at most max_new_tokens, and no further than the model's
  context holds (finish reason "length", as engine.generate without sliding_window).

Inputs longer than the model's context (engine.context_length) are counted and refused with one
DataError unless `truncate=True`, which keeps the last tokens: for a loglikelihood request the last
context + 1 ids (lm-eval's left truncation), for a prompt the last context - min(max_new_tokens,
context // 2) (the rule of generate.text.prompt_ids).

Batching. Log-likelihoods: requests sorted longest first (lm-eval's order: the first batch shows the
memory peak), right-padded to the batch's longest (causal models: padding after a row cannot change
its logits), one forward pass per batch, results in input order. Generation: continuous batching
through the one decode engine (generate.engine.Engine over the model's slot cache, as serve's
scheduler): up to batch_size prompts run at once, each at its own position, a finished one's slot is
refilled from the queue; prompts of equal length are prefilled together. Greedy results equal
one-at-a-time generation; sampled rows draw from their own generator (seed + the prompt's index), so
a seeded result does not depend on batch_size either. Figures: benchmarks/eval_throughput.py.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from clusterlm.errors import DataError
from clusterlm.generate.engine import Engine, context_length
from clusterlm.generate.sampling import GREEDY_TEMPERATURE, RowSampling, check_sampling_args
from clusterlm.generate.text import StopStrings, TextStream

log = logging.getLogger(__name__)


class LogLikelihood(NamedTuple):
    """One request's score: sum of the continuation tokens' log-probabilities (natural log), their
    number, and whether every one of them was the model's argmax (lm-eval's is_greedy)."""

    logprob: float
    n_tokens: int
    is_greedy: bool


class Classification(NamedTuple):
    """A classifier's answer for one input: the argmax label, the softmax of the head's logits in the
    model's label order, and the ids it read (after truncation)."""

    label: str
    probs: list[float]
    n_tokens: int


class Completion(NamedTuple):
    """One prompt's generated text (no prompt, no stop string), its new tokens (EOS not counted)
    and why it ended: "stop" (EOS or a stop string) or "length"."""

    text: str
    n_tokens: int
    finish_reason: str


# ---- helpers -------------------------------------------------------------------------------------

def _check_positive(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _check_vocab(model: nn.Module, tokenizer) -> None:  # noqa: ANN001 - the tokenizer protocol
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model's vocabulary "
                         f"{model.config.vocab_size}: use the tokenizer the model was trained with")


def _device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """eval() for the duration (dropout off), then the caller's mode back; inference_mode inside."""
    training = model.training
    if training:
        model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if training:
            model.train()


def _progress(total: int, desc: str, progress: bool | None):  # noqa: ANN202 - a tqdm bar
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, desc=desc, unit="ex", disable=not show, dynamic_ncols=True)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:  # noqa: ANN001
    """(context ids, continuation ids) of a request, lm-eval's TemplateLM._encode_pair with [EOS]
    first: the context's trailing whitespace moves to the continuation, and the continuation's ids
    are those of the whole text past the context's (the split at the boundary)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx = [tokenizer.eos_id] + tokenizer.encode(context)
    whole = [tokenizer.eos_id] + tokenizer.encode(context + continuation)
    return ctx, whole[len(ctx):]


def rolling_windows(tokens: Sequence[int], prefix: int, max_len: int | None,
                    context_len: int = 1) -> list[tuple[list[int], list[int]]]:
    """(context ids, ids to predict) windows that predict every token of `tokens` once, each window
    at most `max_len` model inputs (lm-eval's get_rolling_token_windows + make_disjoint_window): the
    first predicts tokens[:max_len] after [prefix]; each later one predicts up to
    max_len - context_len + 1 tokens after the tokens before them (at least context_len of them).
    max_len None (no context limit): one window."""
    tokens = list(tokens)
    if not tokens:
        return []
    if max_len is None:
        return [([prefix], tokens)]
    if not 1 <= context_len <= max_len:
        raise ValueError(f"context_len={context_len} must be in [1, max_len={max_len}]")
    done = min(max_len, len(tokens))
    windows = [([prefix], tokens[:done])]
    step = max_len - context_len + 1
    while done < len(tokens):
        end = min(done + step, len(tokens))
        # the model reads tokens[end - max_len - 1 : end - 1]; its last end - done positions predict
        windows.append((tokens[end - max_len - 1:done], tokens[done:end]))
        done = end
    return windows


# ---- log-likelihoods -----------------------------------------------------------------------------

def score_tokens(model: nn.Module, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int = 16,
                 device: torch.device | str | None = None, truncate: bool = False,
                 autocast_dtype: torch.dtype | None = None, progress: bool | None = None,
                 what: str = "requests") -> list[LogLikelihood]:
    """LogLikelihood of each (context ids, continuation ids) pair (token level; see loglikelihood).
    The model reads (context + continuation)[:-1]; longer than its context, the pair is refused
    (DataError, all of them counted) or, with truncate=True, left-truncated to the last context + 1
    ids. A continuation longer than the context cannot be scored either way."""
    _check_positive("batch_size", batch_size, 1)
    C = context_length(model)
    V = model.config.vocab_size
    inputs: list[tuple[list[int], int]] = []  # (model input ids, continuation length)
    too_long: list[int] = []
    for i, (ctx, cont) in enumerate(pairs):
        whole = list(ctx) + list(cont)
        if C is not None and len(whole) - 1 > C:
            too_long.append(i)
            whole = whole[-(C + 1):]
        inputs.append((whole[:-1], len(cont)))
    if too_long:
        longest = max(len(pairs[i][0]) + len(pairs[i][1]) - 1 for i in too_long)
        unscorable = [i for i in too_long if len(pairs[i][1]) > C]  # type: ignore[operator]
        if unscorable:
            raise DataError(f"{len(unscorable)} of {len(pairs)} {what} have a continuation longer than the model's "
                            f"context of {C} tokens (first: {what[:-1]} {unscorable[0]}); they cannot be scored, "
                            "even with truncation")
        if not truncate:
            raise DataError(f"{len(too_long)} of {len(pairs)} {what} do not fit the model's context of {C} tokens "
                            f"(the longest needs {longest} inputs; first: {what[:-1]} {too_long[0]}); pass "
                            f"truncate=True (--truncate) to keep the last {C} tokens of each")
        log.warning("%d of %d %s are longer than the model's context of %d tokens: their contexts are "
                    "left-truncated", len(too_long), len(pairs), what, C)
    dev = _device(model, device)
    out: list[LogLikelihood | None] = [None] * len(pairs)
    order = sorted((i for i in range(len(pairs)) if inputs[i][1] > 0), key=lambda i: -len(inputs[i][0]))
    for i in range(len(pairs)):
        if inputs[i][1] == 0:  # an empty continuation: probability 1
            out[i] = LogLikelihood(0.0, 0, True)
    amp = (torch.autocast(device_type=dev.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with _eval_mode(model), amp, _progress(len(pairs), "loglikelihood", progress) as bar:
        bar.update(len(pairs) - len(order))
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            lengths = [len(inputs[i][0]) for i in batch]
            x = torch.zeros(len(batch), max(lengths), dtype=torch.long)  # (B, T), right-padded with id 0
            rows, cols, targets, counts = [], [], [], []
            for b, i in enumerate(batch):
                ids, n = inputs[i]
                x[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                # position t predicts token t + 1: the last n input positions predict the continuation
                rows += [b] * n
                cols += range(len(ids) - n, len(ids))
                targets += pairs[i][1]
                counts.append(n)
            logits = model(x.to(dev))  # (B, T, padded V)
            picked = logits[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev), :V].float()  # (N, V)
            logp = torch.log_softmax(picked, dim=-1)  # (N, V)
            tgt = torch.tensor(targets, dtype=torch.long, device=dev)  # (N,)
            token_lp = logp.gather(-1, tgt[:, None]).squeeze(-1).double()  # (N,)
            greedy = logp.argmax(dim=-1) == tgt  # (N,)
            for i, n, lp, g in zip(batch, counts, token_lp.split(counts), greedy.split(counts)):
                out[i] = LogLikelihood(float(lp.sum()), n, bool(g.all()))
            bar.update(len(batch))
    return out  # type: ignore[return-value]


def loglikelihood(model: nn.Module, tokenizer, requests: Sequence[tuple[str, str]], *,  # noqa: ANN001
                  batch_size: int = 16, device: torch.device | str | None = None, truncate: bool = False,
                  autocast_dtype: torch.dtype | None = None, progress: bool | None = None) -> list[LogLikelihood]:
    """log p(continuation | context) of each (context, continuation) request, in input order: see the
    module docstring for the definition. `truncate`: left-truncate requests longer than the model's
    context instead of raising DataError. `autocast_dtype`: run the forward under autocast (the
    logits are float32 either way). `progress`: a progress bar (None: when stderr is a terminal)."""
    _check_vocab(model, tokenizer)
    if getattr(model.config, "arch", None) == "encdec":  # the context to the encoder: generate/seq2seq.py
        from clusterlm.generate.seq2seq import score_pairs

        with _eval_mode(model), _progress(len(requests), "loglikelihood", progress) as bar:
            return [LogLikelihood(*r) for r in score_pairs(model, tokenizer, requests, batch_size=batch_size,
                                                            device=_device(model, device), truncate=truncate, bar=bar)]
    pairs = [encode_pair(tokenizer, c, x) for c, x in requests]
    return score_tokens(model, pairs, batch_size=batch_size, device=device, truncate=truncate,
                        autocast_dtype=autocast_dtype, progress=progress)


def loglikelihood_rolling(model: nn.Module, tokenizer, texts: Sequence[str], *,  # noqa: ANN001
                          batch_size: int = 16, device: torch.device | str | None = None,
                          autocast_dtype: torch.dtype | None = None,
                          progress: bool | None = None) -> list[tuple[float, int]]:
    """(log p(text), number of tokens) of each whole text, scored in disjoint windows of the model's
    context (see rolling_windows); the number of tokens gives perplexity, exp(-logprob / n). Every
    window of every text goes through one batched pass of score_tokens. lm-eval's
    loglikelihood_rolling returns the first element."""
    _check_vocab(model, tokenizer)
    if getattr(model.config, "arch", None) == "encdec":
        raise ValueError("loglikelihood_rolling scores whole texts with a causal language model; an encoder-decoder "
                         "scores a continuation given a source (loglikelihood)")
    C = context_length(model)
    pairs: list[tuple[list[int], list[int]]] = []
    owner: list[int] = []
    for t, text in enumerate(texts):
        for w in rolling_windows(tokenizer.encode(text), tokenizer.eos_id, C):
            pairs.append(w)
            owner.append(t)
    scores = score_tokens(model, pairs, batch_size=batch_size, device=device, autocast_dtype=autocast_dtype,
                          progress=progress, what="windows")
    logprob, counts = [0.0] * len(texts), [0] * len(texts)
    for t, s in zip(owner, scores):
        logprob[t] += s.logprob
        counts[t] += s.n_tokens
    return list(zip(logprob, counts))


# ---- classification (a SequenceClassifier's head) ------------------------------------------------

def classifier_ids(tokenizer, text: str) -> list[int]:  # noqa: ANN001 - the tokenizer protocol
    """A classifier's input ids for `text`: [EOS] + encode(text), the document separator first as in
    training (left-truncation to the model's context is classify_ids's)."""
    return [tokenizer.eos_id] + tokenizer.encode(text)


def classify_ids(model: nn.Module, ids: Sequence[Sequence[int]], *, batch_size: int = 16,
                 device: torch.device | str | None = None, truncate: bool = False,
                 autocast_dtype: torch.dtype | None = None, progress: bool | None = None,
                 what: str = "inputs") -> list[Classification]:
    """The head's answer for each id sequence, in input order (models/classifier.py). Longer than the
    model's context: refused (DataError, all of them counted) or, with truncate=True, left-truncated
    to the last `context` ids. Batches: longest first; with the model's pad_id (>= 0), up to
    batch_size rows right-padded with it (ceil(N / batch_size) forward calls, whatever the lengths);
    with pad_id -1 (no padding) only rows of equal length share a batch."""
    _check_positive("batch_size", batch_size, 1)
    cfg = model.config
    labels = tuple(cfg.labels)
    if not labels:
        raise ValueError(f"{type(model).__name__} is not a classifier (model.labels is empty)")
    if any(len(x) == 0 for x in ids):
        raise ValueError("an input has no ids; a classifier reads at least one token ([EOS] first)")
    C = context_length(model)
    rows = [list(x) for x in ids]
    too_long = [i for i, x in enumerate(rows) if C is not None and len(x) > C]
    if too_long:
        if not truncate:
            raise DataError(f"{len(too_long)} of {len(rows)} {what} do not fit the model's context of {C} tokens "
                            f"(the longest is {max(len(rows[i]) for i in too_long)} tokens with the EOS separator; "
                            f"first: {what[:-1]} {too_long[0]}); pass truncate=True (--truncate) to keep the last "
                            f"{C} tokens of each")
        log.warning("%d of %d %s are longer than the model's context of %d tokens: keeping the last %d tokens of each",
                    len(too_long), len(rows), what, C, C)
        for i in too_long:
            rows[i] = rows[i][-C:]  # type: ignore[index]
    pad = cfg.pad_id
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and (pad >= 0 or len(rows[batches[-1][0]]) == len(rows[i])):
            batches[-1].append(i)
        else:
            batches.append([i])
    dev = _device(model, device)
    out: list[Classification | None] = [None] * len(rows)
    amp = (torch.autocast(device_type=dev.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with _eval_mode(model), amp, _progress(len(rows), "classify", progress) as bar:
        for batch in batches:
            T = len(rows[batch[0]])  # the longest first
            x = torch.full((len(batch), T), max(pad, 0), dtype=torch.long)  # (B, T), right-padded
            for b, i in enumerate(batch):
                x[b, :len(rows[i])] = torch.tensor(rows[i], dtype=torch.long)
            probs = torch.softmax(model(x.to(dev)).float(), dim=-1).cpu()  # (B, C)
            for i, p in zip(batch, probs):
                out[i] = Classification(labels[int(p.argmax())], p.tolist(), len(rows[i]))
            bar.update(len(batch))
    return out  # type: ignore[return-value]


def classify(model: nn.Module, tokenizer, texts: Sequence[str], *, batch_size: int = 16,  # noqa: ANN001
             device: torch.device | str | None = None, truncate: bool = False,
             autocast_dtype: torch.dtype | None = None, progress: bool | None = None) -> list[Classification]:
    """The classifier's label and probabilities for each text ([EOS] + its ids: classifier_ids)."""
    _check_vocab(model, tokenizer)
    return classify_ids(model, [classifier_ids(tokenizer, t) for t in texts], batch_size=batch_size, device=device,
                        truncate=truncate, autocast_dtype=autocast_dtype, progress=progress, what="texts")


# ---- generation ----------------------------------------------------------------------------------

def fit_prompts(ids: list[list[int]], context: int | None, max_new_tokens: int, truncate: bool) -> list[list[int]]:
    """Prompts as the model can take them: one that leaves no room for a new token (len + 1 >
    context) is refused, all of them counted in one DataError, or with truncate=True keeps its last
    context - min(max_new_tokens, context // 2) ids (generate.text.prompt_ids's rule)."""
    if context is None:
        return ids
    bad = [i for i, p in enumerate(ids) if len(p) + 1 > context]
    if not bad:
        return ids
    keep = max(1, context - min(max_new_tokens, context // 2))
    if not truncate:
        raise DataError(f"{len(bad)} of {len(ids)} prompts do not fit the model's context of {context} tokens "
                        f"(the longest is {max(len(ids[i]) for i in bad)} tokens with the EOS separator; first: "
                        f"prompt {bad[0]}); pass truncate=True (--truncate) to keep the last {keep} tokens of each")
    log.warning("%d of %d prompts are longer than the model's context of %d tokens: keeping the last %d "
                "tokens of each", len(bad), len(ids), context, keep)
    return [p[-keep:] if len(p) + 1 > context else p for p in ids]


@dataclass
class _Row:
    """One prompt being generated in a slot of the cache."""

    index: int
    slot: int
    gen: torch.Generator | None
    text: TextStream
    stops: StopStrings
    last: int = 0  # the token to feed next
    n_tokens: int = 0
    pieces: list[str] = field(default_factory=list)


def generate_completions(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,  # noqa: ANN001
                         batch_size: int = 16, temperature: float = 0.0, top_p: float | None = None,
                         top_k: int | None = None, seed: int | None = None, stops: Sequence[str] = (),
                         device: torch.device | str | None = None, truncate: bool = False,
                         progress: bool | None = None, num_beams: int = 1,
                         length_penalty: float = 1.0, stop_ids: Sequence[int] = ()) -> list[Completion]:
    """generate_batch with each prompt's token count and finish reason (see Completion). A token of
    `stop_ids` (a chat template's end of turn) ends a text as EOS does: not counted, not shown. An
    encoder-decoder (the prompt is its source), or num_beams > 1 (beam search): generate/seq2seq.py."""
    check_sampling_args(temperature, top_k, top_p)
    if num_beams > 1 or getattr(model.config, "arch", None) == "encdec":
        return _seq2seq_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                    temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stops=stops,
                                    device=device, truncate=truncate, progress=progress, num_beams=num_beams,
                                    length_penalty=length_penalty, stop_ids=tuple(stop_ids))
    _check_positive("max_new_tokens", max_new_tokens, 0)
    _check_positive("batch_size", batch_size, 1)
    if any(not s for s in stops):
        raise ValueError(f"stops={list(stops)!r}: a stop string must not be empty")
    _check_vocab(model, tokenizer)
    stop_ids = frozenset(stop_ids)
    engine = Engine(model, device=_device(model, device))
    C, dev, eos = engine.context, engine.device, tokenizer.eos_id
    ids = fit_prompts([[eos] + tokenizer.encode(p) for p in prompts], C, max_new_tokens, truncate)
    if not ids or max_new_tokens == 0:
        return [Completion("", 0, "length") for _ in ids]
    need = max(len(p) for p in ids) + max_new_tokens - 1  # positions a sequence can fill (its last token is not fed)
    max_len = need if C is None else min(need, C)
    cache = model.make_slot_cache(min(batch_size, len(ids)), max_len, device=dev, dtype=engine.dtype)
    sampling = RowSampling(temperature, top_k, top_p)
    greedy = temperature < GREEDY_TEMPERATURE
    base = seed if seed is not None else int(torch.randint(0, 2**62, ()).item())
    # longest first: equal lengths sit together and are prefilled in one pass
    waiting = deque(sorted(range(len(ids)), key=lambda i: -len(ids[i])))
    running: list[_Row] = []
    out: list[Completion | None] = [None] * len(ids)

    def finish(r: _Row, reason: str, flush: bool) -> None:
        if flush:  # held-back text was not a stop string after all
            r.pieces.append(r.stops.flush(r.text.flush()))
        out[r.index] = Completion("".join(r.pieces), r.n_tokens, reason)
        cache.free(r.slot)
        bar.update(1)

    def advance(rs: list[_Row], logits: torch.Tensor) -> list[_Row]:
        """Sample a token per row from logits (B, V); the rows still running after it."""
        gens = None if greedy else [r.gen for r in rs]
        tokens = engine.sample(logits, [sampling] * len(rs), gens)
        alive = []
        for r, tok in zip(rs, tokens):
            pos = int(cache.pos[r.slot]) if C is not None else None
            reason = engine.finish_reason(tok, eos, r.n_tokens + 1, max_new_tokens, pos)
            if reason == "stop" or tok in stop_ids:  # EOS or an end of turn: not counted, not shown
                finish(r, "stop", flush=True)
                continue
            r.n_tokens, r.last = r.n_tokens + 1, tok
            piece, stopped = r.stops.push(r.text.push(tok))
            r.pieces.append(piece)
            if stopped:
                finish(r, "stop", flush=False)
            elif reason is not None:
                finish(r, reason, flush=True)
            else:
                alive.append(r)
        return alive

    with _eval_mode(model), _progress(len(ids), "generate", progress) as bar:
        while waiting or running:
            groups: dict[int, list[_Row]] = {}
            while waiting and cache.num_free:
                i = waiting.popleft()
                # seed + i as given (manual_seed takes [0, 2^64); modulo 2^63-1, seed 2^63-1 drew seed 0's texts)
                gen = None if greedy else torch.Generator(device=dev).manual_seed((base + i) % 2**64)
                # the prompt's ids first: the text the reply adds to it (with a sentencepiece-style
                # decoder the first new token decoded alone lost its leading space)
                r = _Row(i, cache.alloc(), gen, TextStream(tokenizer, ids[i]), StopStrings(tuple(stops)))
                groups.setdefault(len(ids[i]), []).append(r)
            for rs in groups.values():
                x = torch.tensor([ids[r.index] for r in rs], dtype=torch.long, device=dev)  # (R, P)
                running += advance(rs, engine.prefill(x, cache.rows([r.slot for r in rs])))  # (R, V) logits
            if running:
                x = torch.tensor([[r.last] for r in running], dtype=torch.long, device=dev)  # (B, 1)
                running = advance(running, engine.decode(x, cache.rows([r.slot for r in running])))
    return out  # type: ignore[return-value]


def _seq2seq_completions(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,  # noqa: ANN001
                         truncate: bool, progress: bool | None, num_beams: int, **kw: Any) -> list[Completion]:
    """An encoder-decoder (the prompt is its source: generate.seq2seq.fit_sources) or beam search."""
    from clusterlm.generate import seq2seq

    _check_positive("max_new_tokens", max_new_tokens, 0)
    _check_positive("num_beams", num_beams, 1)
    if any(not s for s in kw.get("stops", ())):
        raise ValueError(f"stops={list(kw['stops'])!r}: a stop string must not be empty")
    _check_vocab(model, tokenizer)
    if seq2seq.is_encdec(model):
        ids = seq2seq.fit_sources(tokenizer, prompts, model.config.max_seq_len, truncate)
    else:
        ids = fit_prompts([[tokenizer.eos_id] + tokenizer.encode(p) for p in prompts], context_length(model),
                          max_new_tokens, truncate)
    with _eval_mode(model), _progress(len(ids), "generate", progress) as bar:
        outs = seq2seq.completions(model, tokenizer, ids, max_new_tokens=max_new_tokens, num_beams=num_beams,
                                   bar=bar, **kw)
    return [Completion(*o) for o in outs]


def generate_batch(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,  # noqa: ANN001
                   batch_size: int = 16, temperature: float = 0.0, top_p: float | None = None,
                   top_k: int | None = None, seed: int | None = None, stops: Sequence[str] = (),
                   device: torch.device | str | None = None, truncate: bool = False,
                   progress: bool | None = None) -> list[str]:
    """The continuation text of each prompt, in input order (see the module docstring): up to
    batch_size prompts decoded at once through the one engine, greedy unless temperature > 0 (then
    top_k, top_p, and `seed`: prompt i draws from a generator seeded with seed + i), cut before the
    first of `stops`. Prompts longer than the context: DataError, or truncated with truncate=True."""
    return [c.text for c in generate_completions(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, temperature=temperature,
        top_p=top_p, top_k=top_k, seed=seed, stops=stops, device=device, truncate=truncate, progress=progress)]
