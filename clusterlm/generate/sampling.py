"""Pure sampling functions on logits: temperature, top-k, nucleus (top-p), then a draw.

Nothing here holds state; randomness comes only from the generator(s) passed in, so a seeded
generator reproduces a sample exactly. `sample_rows` is the one sampler of the decode engine: each
row has its own RowSampling (temperature, top_k, top_p), and either one generator serves the batch
(`generate`: torch.multinomial over the rows) or each row has its own (`serve`: one uniform per row
from its generator, so a seeded request draws the same tokens whatever else shares its batch).
`sample_next` is sample_rows with one setting for every row.

Every finite temperature >= 0 and every top_p in (0, 1] is well defined, down to 5e-324 and up to
1.8e308: a temperature below GREEDY_TEMPERATURE is greedy, the logits are shifted to a maximum of 0
before the division (so it cannot overflow to inf and turn the softmax into NaN), and the nucleus
always keeps the most likely token (so a top_p that rounds to 0 in float32 keeps one token, not none).

    >>> import torch
    >>> logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    >>> sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None)
    tensor([0])
    >>> g = torch.Generator().manual_seed(0)
    >>> sample_next(logits, temperature=0.8, top_k=3, top_p=0.9, generator=g).shape
    torch.Size([1])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Temperatures below this are greedy (argmax). As T -> 0 the distribution concentrates on the
# argmax; below 1e-6 only logits within ~1e-5 of the maximum keep any mass, a few float32 ulps
# for logits of magnitude ~10, i.e. rounding noise. It also keeps 1 / T inside float32's range.
GREEDY_TEMPERATURE = 1e-6
_F32_MAX = torch.finfo(torch.float32).max


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None, *,
                        as_options: bool = False) -> None:
    """Raise ValueError naming the bad value and the valid range. `as_options`: name them as the command
    line does (--temperature, --top-k, --top-p; "left out" for None) instead of as Python keywords."""
    t, k, p = ("--temperature", "--top-k", "--top-p") if as_options else ("temperature", "top_k", "top_p")
    keep_all = "left out" if as_options else "None"
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature)
            or temperature < 0):
        raise ValueError(f"{t}={temperature!r} must be a finite number >= 0 (below "
                         f"{GREEDY_TEMPERATURE:g} = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"{k}={top_k!r} must be an integer >= 1, or {keep_all} to keep every token")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"{p}={top_p!r} must be in (0, 1], or {keep_all} to keep every token")


def greedy_seed_note(seed: int | None, temperature: float, default: bool = False) -> str | None:
    """The note for a command line whose --seed is given to greedy decoding (temperature below
    GREEDY_TEMPERATURE), which draws nothing, so the seed changes nothing; None otherwise. `default`: the
    temperature is the command's default (eval --task's 0)."""
    if seed is None or temperature >= GREEDY_TEMPERATURE:
        return None
    where = f"--temperature {temperature:g}" + (", the default" if default else "")
    return (f"--seed={seed} has no effect with greedy decoding ({where}): every seed gives the same output; "
            "give --temperature > 0 to sample")


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (B, V); the rest become -inf. Exactly k survive
    (ties at the k-th value are broken by torch.topk); k >= V keeps every token."""
    check_sampling_args(1.0, k, None)
    if k >= logits.shape[-1]:
        return logits
    values, indices = torch.topk(logits, k, dim=-1)  # (B, k)
    return torch.full_like(logits, -math.inf).scatter(-1, indices, values)


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep, per row (B, V), the smallest set of most
    likely tokens whose total probability is >= p; the rest become -inf. The most likely token is
    always kept; p = 1 keeps every token."""
    check_sampling_args(1.0, None, p)
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the strictly better tokens
    drop = mass_before >= p  # a token is needed while the better ones sum to less than p
    # p below float32's smallest subnormal compares as 0 >= 0: keep the top token explicitly
    drop[..., 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    return torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)


def scale_by_temperature(logits: torch.Tensor, temperature: float | list[float]) -> torch.Tensor:
    """float32 logits (B, V) / temperature, shifted so each row's maximum is 0: softmax-ready and
    finite wherever the logits are, for any temperature >= GREEDY_TEMPERATURE (one float, or one
    per row). The shift leaves the softmax unchanged and means the division can only underflow
    (to -inf, probability 0), never overflow; a temperature beyond float32's range is clamped to
    its maximum (the distribution is then uniform over the finite logits, as in the limit)."""
    temps = [temperature] if isinstance(temperature, (int, float)) else list(temperature)
    if min(temps) < GREEDY_TEMPERATURE:
        raise ValueError(f"temperature={min(temps)!r} is below {GREEDY_TEMPERATURE:g}: sample greedily instead")
    x = logits.float()
    x = x - x.max(dim=-1, keepdim=True).values  # (B, V), <= 0
    if len(temps) == 1:
        return x / min(float(temps[0]), _F32_MAX)
    t = torch.tensor([min(float(v), _F32_MAX) for v in temps], dtype=torch.float32, device=x.device)  # (B,)
    return x / t[:, None]


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax of each row of logits (B, V) -> LongTensor (B,), the first maximal index on ties.
    max(dim).indices: on the CPU several times faster than torch.argmax over a 50k vocabulary, which
    matters at a decode step's scale (figures: docs/compression.md, "Faster generation")."""
    return logits.max(dim=-1).indices


@dataclass(frozen=True)
class RowSampling:
    """How one row is sampled: temperature (below GREEDY_TEMPERATURE: greedy), then top-k, then
    top-p; None (or top_p 1) keeps every token."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        check_sampling_args(self.temperature, self.top_k, self.top_p)


def _groups(values: list, skip: tuple) -> dict:
    """value -> row indices holding it, for the values not in `skip` (no filtering)."""
    out: dict = {}
    for i, v in enumerate(values):
        if v not in skip:
            out.setdefault(v, []).append(i)
    return out


def sample_rows(logits: torch.Tensor, rows: Sequence[RowSampling],
                generator: torch.Generator | None | Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token id per row of logits (B, V) -> LongTensor (B,), row b sampled by rows[b]. Greedy rows
    take the argmax. The others are filtered by their own temperature, top-k and top-p, then drawn:
    with one `generator` (or None: torch's global RNG) by torch.multinomial over the batch; with a
    sequence of generators, one per row, by inverse CDF with a uniform from that row's generator
    (so a seeded row reproduces whatever rows share its batch). Generators live on logits' device."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    B = logits.shape[0]
    per_row = isinstance(generator, Sequence)
    if len(rows) != B or (per_row and len(generator) != B):  # type: ignore[arg-type]
        raise ValueError(f"{B} rows of logits need {B} sampling settings (and generators), got {len(rows)}")
    out = greedy(logits)  # (B,)
    drawn = [b for b, r in enumerate(rows) if r.temperature >= GREEDY_TEMPERATURE]
    if not drawn:
        return out
    if not per_row and len(drawn) == B and len(set(rows)) == 1:  # one setting for the whole batch
        r = rows[0]
        x = scale_by_temperature(logits, r.temperature)  # (B, V)
        if r.top_k is not None:
            x = apply_top_k(x, r.top_k)
        if r.top_p is not None:
            x = apply_top_p(x, r.top_p)
        return torch.multinomial(torch.softmax(x, dim=-1), num_samples=1, generator=generator).squeeze(-1)
    idx = torch.tensor(drawn, device=logits.device)
    sub = [rows[b] for b in drawn]
    x = scale_by_temperature(logits[idx], [r.temperature for r in sub])  # (R, V)
    for k, sel in _groups([r.top_k for r in sub], (None,)).items():  # top-k, then top-p, per distinct value
        sel_t = torch.tensor(sel, device=logits.device)
        x[sel_t] = apply_top_k(x[sel_t], k)
    for p, sel in _groups([r.top_p for r in sub], (None, 1.0)).items():
        sel_t = torch.tensor(sel, device=logits.device)
        x[sel_t] = apply_top_p(x[sel_t], p)
    if per_row:
        cdf = torch.softmax(x, dim=-1).cumsum(-1)  # (R, V)
        u = torch.stack([torch.rand((), generator=generator[b], device=logits.device) for b in drawn])  # (R,)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).squeeze(-1)  # (R,)
        out[idx] = pick.clamp_(max=logits.shape[-1] - 1)
    else:
        out[idx] = torch.multinomial(torch.softmax(x, dim=-1), num_samples=1, generator=generator).squeeze(-1)
    return out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model's log-probabilities, log_softmax of the raw logits (B, V) in float32, before any
    temperature or top-p (as vLLM reports them by default): of each row's sampled token (B,), and the
    k most likely tokens of each row, (B, k) values and (B, k) ids, most likely first."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    chosen = lp.gather(-1, tokens[:, None]).squeeze(-1)  # (B,)
    top = torch.topk(lp, min(k, lp.shape[-1]), dim=-1)  # (B, k)
    return chosen, top.values, top.indices


def sample_next(logits: torch.Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of logits (B, V) -> LongTensor (B,), every row sampled alike (see
    sample_rows): temperature 0 = greedy (argmax; top_k/top_p are then irrelevant), and so is any
    temperature below GREEDY_TEMPERATURE. Otherwise softmax(logits / temperature) after top-k then
    top-p filtering, drawn with `generator` (which must live on logits' device)."""
    check_sampling_args(temperature, top_k, top_p)
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, V), got shape {tuple(logits.shape)}")
    return sample_rows(logits, [RowSampling(temperature, top_k, top_p)] * logits.shape[0], generator)
