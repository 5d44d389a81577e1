"""Beam search over token ids, for decoder-only models (Transformer, LSTM, GRU) and encoder-decoders alike.

    from clusterlm.generate.beam import beam_search
    best = beam_search(encdec, sources=[[5, 6, 2]], num_beams=4, max_new_tokens=40, eos_id=2, bos_id=1)
    best = beam_search(gpt, prompts=[[2, 5, 6]], num_beams=4, max_new_tokens=40, eos_id=2)
    best = beam_search(chat, prompts=[[2, 5, 6]], num_beams=4, max_new_tokens=40, eos_id=2, stop_ids=[9])  # <|end|>
    best[0].tokens, best[0].logprob, best[0].score, best[0].finished

The search (transformers' `generate(num_beams=W)` without early stopping, `early_stopping=False`
made exact): each of the B inputs keeps W running hypotheses; a step scores every continuation of
every hypothesis, takes the 2W best non-EOS ones per input to run on (the best W), and closes
hypotheses with EOS, keeping the W best closed ones by score. Which EOS continuations close: with
W > 1 every running hypothesis's (transformers only takes an EOS ranked among the first W of the
2W, so a hypothesis whose EOS ranks lower at the step it could end is lost, and beam search can end
below greedy's log-probability: it did on 1 of 12 test sentences); with W = 1 transformers' rule,
which is greedy decoding. The cache
rows are reordered to follow their hypotheses (KVCache rows, EncDecCache.reorder, RNNState.reorder). An input is done
when it holds W closed hypotheses and no running one can still score above the worst of them
(with `length_penalty` > 0 the bound divides the running log-probability by max_new_tokens ** lp,
else by (t + 1) ** lp: exact, not transformers' heuristic); at max_new_tokens the running ones
close as they are (finished=False).

End tokens: EOS and the tokens of `stop_ids` (a chat template's end of turn, `<|end|>`) end a
hypothesis alike, as they end greedy decoding (eval/lm.py): a hypothesis closes with the likeliest
of them (one closed hypothesis per running one and step, so no two returned differ only in their
end token), and no hypothesis runs on past one.

Scores: score = logprob / length ** length_penalty, logprob the sum of the token log-probabilities
(the end token's included for a finished hypothesis) and length the tokens generated (the end
token counted) - the `length_penalty` of transformers (1.0 = the mean log-probability per token,
0 = the plain sum, > 0 favours longer outputs); GNMT's ((5 + |Y|) / 6) ** alpha is
`length_penalty_kind="gnmt"`. Width 1 with length_penalty 0 is greedy decoding token for token
(tests/model/test_beam.py); with a length penalty a closed hypothesis may still lose to a longer one,
which greedy never considers.

Batching: sources of any lengths (right-padded, with a key mask); decoder-only prompts of equal
length (one call per length, as generate/engine.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

BEAM_ARCHS = ("transformer", "lstm", "gru", "encdec")  # decoder-only (prompts=) and encoder-decoders (sources=)


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids (no prompt, no BOS, no end token: EOS or one of stop_ids)
    logprob: float  # sum of the token log-probabilities, the end token's included when finished
    score: float  # logprob / length_penalty(len)
    finished: bool  # ended with an end token (False: cut at max_new_tokens)


def beam_row_bytes(model: nn.Module, max_new_tokens: int, input_len: int) -> int:
    """Estimated bytes one beam (one row of the search) holds: its cache for the `input_len`-token
    prompt and the new tokens, twice (a reorder copies the rows before the old ones are freed), an
    encoder-decoder's cross-attention keys and values of its `input_len`-token source, and one step's
    logits in the model's dtype plus two float64 copies (log-probabilities and candidate scores)."""
    cfg = model.config
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    elem = torch.empty((), dtype=dtype).element_size()
    encdec = cfg.arch == "encdec"
    max_len = max_new_tokens if encdec else input_len + max_new_tokens - 1  # as the steppers size their caches
    max_len = max(1, min(max_len, cfg.max_seq_len)) if cfg.arch in ("transformer", "encdec") else max_len
    cache = model.make_cache(1, max_len, device="meta", dtype=dtype)
    cache = getattr(cache, "self_kv", cache)  # EncDecCache: its self-attention KVCache
    tensors: list[torch.Tensor] = []
    for v in vars(cache).values():
        items = v.values() if isinstance(v, dict) else [v]
        tensors += [t for t in items if isinstance(t, torch.Tensor)]
    per_row = 2 * sum(t.numel() for t in tensors) * elem
    if encdec:
        per_row += 2 * cfg.n_layers * cfg.kv_heads * cfg.head_dim * input_len * elem  # cross K and V
    return per_row + cfg.vocab_size * (elem + 2 * 8)


class BeamWidthError(ValueError):
    """A beam width check_beam_width refuses. The message names the option as the caller spelled it;
    `for_option` words it for another spelling, so a command line that reaches the search through library
    calls (`eval --task ... --num-beams N`) can name its own option instead of the keyword num_beams."""

    def __init__(self, word: Callable[[str], str], name: str) -> None:
        super().__init__(word(name))
        self._word = word

    def for_option(self, name: str) -> str:
        return self._word(name)


def check_beam_width(model: nn.Module, num_beams: int, *, rows: int = 1, max_new_tokens: int, input_len: int,
                     device: torch.device | str | None = None, available: int | None = None,
                     name: str = "num_beams") -> None:
    """Refuse a beam width the search cannot use or cannot hold (BeamWidthError, a ValueError; `name` is how
    the caller's user spells the option, and a caller further up can reword it: BeamWidthError.for_option). Wider than the vocabulary: the first step has at most vocab_size
    continuations to keep, so such a width is never filled, and widths past a few dozen rarely help
    (usual: 4-10). Needing more than the memory available on `device` (train.memcheck's figure;
    `available` replaces it): `rows` inputs (sources or prompts of up to `input_len` tokens) of
    `num_beams` rows each, beam_row_bytes per row. A width
    of 100,000 ran 10 minutes on a 54k-parameter model before the check."""
    from clusterlm.train.memcheck import available_memory

    V = model.config.vocab_size
    if num_beams > V:
        raise BeamWidthError(lambda n: f"{n}={num_beams} is wider than the model's vocabulary ({V} tokens): the first "
                             f"step has at most {V} continuations to keep; use a width in [1, {V}] (4-10 is usual)", name)
    if available is None:
        dev = torch.device(device) if device is not None else next(model.parameters()).device
        available, _ = available_memory(dev)
        if available is None:
            return
    per_row = beam_row_bytes(model, max_new_tokens, input_len)
    need = rows * num_beams * per_row
    if need > available:
        widest = max(0, available // (rows * per_row))
        raise BeamWidthError(lambda n: f"{n}={num_beams} needs about {_size(need)} for {rows * num_beams} beam rows "
                             f"(caches and logits, {_size(per_row)} each) but {_size(available)} is available; "
                             + (f"use {n} <= {widest}" if widest >= 1 else "use a shorter output or source"), name)


def _size(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _penalty(length: int, lp: float, kind: str) -> float:
    if kind == "gnmt":
        return ((5.0 + length) / 6.0) ** lp
    return float(length) ** lp


class _Stepper:
    """Next-token logits (N, V) for N = B*W rows, with a cache whose rows can be reordered."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.model, self.device = model, device
        self.vocab = model.config.vocab_size
        self.dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())

    def reorder(self, rows: torch.Tensor) -> None:
        cache = self.cache
        if hasattr(cache, "reorder"):
            cache.reorder(rows)
            return
        cache.k = {key: t.index_select(0, rows) for key, t in cache.k.items()}  # KVCache: (N, K, max_len, Hd)
        cache.v = {key: t.index_select(0, rows) for key, t in cache.v.items()}

    def step(self, last: torch.Tensor) -> torch.Tensor:
        return self._forward(last)[:, -1, :self.vocab]


class _DecoderStepper(_Stepper):
    def __init__(self, model: nn.Module, prompts: list[list[int]], W: int, max_new: int, device: torch.device) -> None:
        super().__init__(model, device)
        P = len(prompts[0])
        ctx = model.config.max_seq_len if model.config.arch == "transformer" else None
        need = P + max_new - 1
        self.max_new = max_new if ctx is None else max(1, min(max_new, ctx - P + 1))
        self.cache = model.make_cache(len(prompts) * W, need if ctx is None else min(need, ctx), device=device,
                                      dtype=self.dtype)
        self.first = torch.tensor(prompts, dtype=torch.long, device=device).repeat_interleave(W, 0)  # (N, P)

    def _forward(self, idx: torch.Tensor) -> torch.Tensor:
        kw = {"last_only": True} if self.model.config.arch == "transformer" else {}
        return self.model(idx, self.cache, **kw)

    def start(self) -> torch.Tensor:
        return self.step(self.first)


class _EncDecStepper(_Stepper):
    def __init__(self, model: nn.Module, sources: list[list[int]], W: int, max_new: int, bos_id: int, pad_id: int,
                 device: torch.device) -> None:
        super().__init__(model, device)
        src, mask = pad_sources(sources, pad_id, device)
        src, mask = src.repeat_interleave(W, 0), mask.repeat_interleave(W, 0)  # (N, S)
        self.max_new = min(max_new, model.config.max_seq_len)  # decoder positions: BOS + all but the last token
        self.cache = model.make_cache(src.shape[0], self.max_new, device=device, dtype=self.dtype)
        model.prime(src, self.cache, mask)
        self.first = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=device)

    def _forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(None, idx, cache=self.cache, last_only=True)

    def start(self) -> torch.Tensor:
        return self.step(self.first)


def pad_sources(sources: Sequence[Sequence[int]], pad_id: int, device: torch.device | str
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded source ids (B, S) and their key mask (B, S) bool (True = a real token)."""
    if not sources or any(len(s) == 0 for s in sources):
        raise ValueError("every source needs at least one token id")
    S = max(len(s) for s in sources)
    src = torch.full((len(sources), S), max(pad_id, 0), dtype=torch.long)
    mask = torch.zeros((len(sources), S), dtype=torch.bool)
    for i, s in enumerate(sources):
        src[i, :len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, :len(s)] = True
    return src.to(device), mask.to(device)


@torch.inference_mode()
def beam_search(model: nn.Module, *, prompts: Sequence[Sequence[int]] | None = None,
                sources: Sequence[Sequence[int]] | None = None, num_beams: int = 4, max_new_tokens: int = 64,
                eos_id: int, bos_id: int | None = None, pad_id: int = 0, length_penalty: float = 1.0,
                length_penalty_kind: Literal["transformers", "gnmt"] = "transformers",
                num_return: int = 1, device: torch.device | str | None = None, stop_ids: Sequence[int] = ()
                ) -> list[list[Hypothesis]] | list[Hypothesis]:
    """The best hypothesis per input (num_return > 1: the best num_return, a list per input), for a
    decoder-only model (`prompts`, equal lengths) or an encoder-decoder (`sources`, and `bos_id`, the
    decoder's first input). `stop_ids`: tokens that end a hypothesis as EOS does (a chat template's
    end of turn). See the module docstring for the search and the scores."""
    if num_beams < 1 or max_new_tokens < 1 or not 1 <= num_return <= num_beams:
        raise ValueError(f"num_beams={num_beams} and max_new_tokens={max_new_tokens} must be >= 1, "
                         f"num_return={num_return} in [1, num_beams]")
    if length_penalty_kind not in ("transformers", "gnmt"):
        raise ValueError(f"length_penalty_kind={length_penalty_kind!r}; expected 'transformers' or 'gnmt'")
    arch = model.config.arch
    if arch not in BEAM_ARCHS:
        raise ValueError(f"beam search is for arch {', '.join(BEAM_ARCHS)}; this model is arch {arch!r}")
    ends = sorted({eos_id, *stop_ids})
    if ends[0] < 0 or ends[-1] >= model.config.vocab_size:
        raise ValueError(f"end tokens eos_id={eos_id}, stop_ids={list(stop_ids)} must be ids in "
                         f"[0, {model.config.vocab_size}) (the model's vocab_size)")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    W = num_beams
    encdec = arch == "encdec"
    inputs = sources if encdec else prompts
    if inputs:
        check_beam_width(model, W, rows=len(inputs), max_new_tokens=max_new_tokens,
                         input_len=max(len(s) for s in inputs), device=dev)
    if encdec:
        if sources is None or bos_id is None:
            raise ValueError("an encoder-decoder needs sources= and bos_id=")
        stepper: _Stepper = _EncDecStepper(model, [list(s) for s in sources], W, max_new_tokens, bos_id, pad_id, dev)
        B = len(sources)
    else:
        if prompts is None or len({len(p) for p in prompts}) != 1 or not prompts[0]:
            raise ValueError("a decoder-only model needs prompts= of equal, non-zero lengths")
        stepper = _DecoderStepper(model, [list(p) for p in prompts], W, max_new_tokens, dev)
        B = len(prompts)
    max_new = stepper.max_new
    training = model.training
    model.eval()
    try:
        return _search(stepper, B, W, max_new, ends, length_penalty, length_penalty_kind, num_return)
    finally:
        model.train(training)


def _search(stepper: _Stepper, B: int, W: int, max_new: int, ends: list[int], lp: float, kind: str,
            num_return: int) -> list[list[Hypothesis]] | list[Hypothesis]:
    dev = stepper.device
    end_set, end_idx = set(ends), torch.tensor(ends, dtype=torch.long, device=dev)
    scores = torch.full((B, W), -math.inf, dtype=torch.float64, device=dev)
    scores[:, 0] = 0.0  # the W rows start identical: only the first may expand
    seqs: list[list[list[int]]] = [[[] for _ in range(W)] for _ in range(B)]
    closed: list[list[Hypothesis]] = [[] for _ in range(B)]
    done = [False] * B
    logits = stepper.start()
    for t in range(1, max_new + 1):
        V = logits.shape[-1]
        logp = torch.log_softmax(logits.double(), dim=-1).view(B, W, V)
        cand = (scores[:, :, None] + logp).view(B, W * V)
        # each hypothesis has at most len(ends) end candidates: (len(ends) + 1) * W hold W that run on
        top_v, top_i = cand.topk(min((len(ends) + 1) * W, W * V), dim=1)  # (B, (E + 1) W)
        top_v, top_i = top_v.tolist(), top_i.tolist()
        # (B, W): each hypothesis ending here, with its likeliest end token
        eos_v = cand.view(B, W, V)[:, :, end_idx].amax(dim=-1).tolist() if W > 1 else None
        rows, nxt, new_scores = [], [], []
        new_seqs: list[list[list[int]]] = []
        for b in range(B):
            keep: list[tuple[int, int, float]] = []
            if not done[b]:
                if eos_v is not None:  # W > 1: every running hypothesis may end here, whatever its EOS's rank
                    for beam, v in enumerate(eos_v[b]):
                        if v > -math.inf:
                            _close(closed[b], Hypothesis(list(seqs[b][beam]), v, v / _penalty(t, lp, kind), True), W)
                for rank, (v, i) in enumerate(zip(top_v[b], top_i[b])):
                    if v == -math.inf:
                        break
                    beam, tok = divmod(i, V)
                    if tok in end_set:
                        if rank < W and eos_v is None:
                            _close(closed[b], Hypothesis(list(seqs[b][beam]), v, v / _penalty(t, lp, kind), True), W)
                        continue
                    keep.append((beam, tok, v))
                    if len(keep) == W:
                        break
            while len(keep) < W:  # a done input (or too few candidates): inert rows
                keep.append((0, ends[0], -math.inf))
            new_seqs.append([seqs[b][beam] + [tok] for beam, tok, _ in keep])
            rows += [b * W + beam for beam, _, _ in keep]
            nxt += [tok for _, tok, _ in keep]
            new_scores.append([v for _, _, v in keep])
            if not done[b] and len(closed[b]) >= W:
                best = max(v for _, _, v in keep)
                bound = best / _penalty(max_new if lp > 0 else t + 1, lp, kind) if best > -math.inf else -math.inf
                done[b] = bound <= closed[b][-1].score
        seqs = new_seqs
        scores = torch.tensor(new_scores, dtype=torch.float64, device=dev)
        if all(done) or t == max_new:
            break
        stepper.reorder(torch.tensor(rows, dtype=torch.long, device=dev))
        logits = stepper.step(torch.tensor(nxt, dtype=torch.long, device=dev)[:, None])
    out = []
    for b in range(B):
        if not done[b]:  # cut at max_new_tokens: the running hypotheses close as they are
            for beam in range(W):
                v = float(scores[b, beam])
                if v > -math.inf:
                    _close(closed[b], Hypothesis(seqs[b][beam], v, v / _penalty(len(seqs[b][beam]), lp, kind),
                                                 False), W)
        out.append(closed[b][:num_return])
    return [o[0] for o in out] if num_return == 1 else out


def _close(closed: list[Hypothesis], h: Hypothesis, W: int) -> None:
    """Add h to the closed hypotheses, keeping the W best by score (ties: the earlier first)."""
    closed.append(h)
    closed.sort(key=lambda x: -x.score)
    del closed[W:]
