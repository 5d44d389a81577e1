"""Sampling functions: greedy, top-k, nucleus, seeded draws, argument validation.

Run: .venv/bin/python -m pytest -q tests/unit/test_sampling.py
"""

from __future__ import annotations

import math

import pytest
import torch

from clusterlm.generate.sampling import apply_top_k, apply_top_p, greedy, sample_next


def _logits_for(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()  # (1, V): softmax gives back probs


def test_greedy_is_argmax() -> None:
    """temperature 0 returns torch.argmax of each row, whatever top_k/top_p say."""
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    got = sample_next(logits, temperature=0.0, top_k=3, top_p=0.5, generator=None)
    assert got.tolist() == torch.argmax(logits, dim=-1).tolist()
    assert got.dtype == torch.long and got.shape == (5,)


def test_greedy_ties_take_the_first_maximum() -> None:
    """Ties go to the lowest index, as torch.argmax (a 50k row, the case greedy() is tuned for, and
    a strided slice of a padded vocabulary)."""
    logits = torch.zeros(3, 50304)
    logits[0, [7, 40000]] = 1.0
    logits[1, [49999, 50000]] = 2.0
    logits[2] = -1.0
    view = logits[:, :50257]  # padding rows cut off: not contiguous
    assert greedy(view).tolist() == [7, 49999, 0] == torch.argmax(view, dim=-1).tolist()


def test_top_k_keeps_exactly_the_k_largest() -> None:
    """apply_top_k keeps the k largest logits unchanged (the set from sorting by hand) and sets the
    other V-k to -inf; k >= V changes nothing."""
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5], [5.0, 4.0, 3.0, 2.0, 1.0]])
    out = apply_top_k(logits, 2)
    assert torch.isfinite(out).sum(dim=-1).tolist() == [2, 2]
    assert out[0].tolist() == [-math.inf, 3.0, -math.inf, 2.0, -math.inf]
    assert out[1].tolist() == [5.0, 4.0, -math.inf, -math.inf, -math.inf]
    assert torch.equal(apply_top_k(logits, 5), logits) and torch.equal(apply_top_k(logits, 99), logits)


@pytest.mark.parametrize("p, kept", [(0.5, 1), (0.79, 2), (0.81, 3), (0.95, 3), (0.96, 4), (1.0, 4),
                                     (1e-6, 1)])
def test_top_p_keeps_the_nucleus(p: float, kept: int) -> None:
    """For probs (0.5, 0.3, 0.15, 0.05) the nucleus (smallest set of most likely tokens with total
    >= p, counted by hand) has `kept` tokens; the top token is always kept."""
    probs = [0.15, 0.5, 0.05, 0.3]  # shuffled so the scatter back to vocab order is tested
    order = [1, 3, 0, 2]  # tokens by decreasing probability
    out = apply_top_p(_logits_for(probs), p)[0]
    finite = {i for i in range(4) if math.isfinite(out[i].item())}
    assert finite == set(order[:kept])
    for i in finite:
        assert out[i].item() == pytest.approx(math.log(probs[i]))


def test_filtered_tokens_are_never_sampled() -> None:
    """With top_k=2 only the two most likely tokens appear in 2000 draws; with top_p=0.6 over
    (0.5, 0.3, 0.2) only the top two appear."""
    g = torch.Generator().manual_seed(1)
    logits = _logits_for([0.3, 0.1, 0.2, 0.4]).expand(2000, 4)
    drawn = set(sample_next(logits, temperature=1.0, top_k=2, top_p=None, generator=g).tolist())
    assert drawn == {0, 3}
    logits = _logits_for([0.2, 0.5, 0.3]).expand(2000, 3)
    drawn = set(sample_next(logits, temperature=1.0, top_k=None, top_p=0.6, generator=g).tolist())
    assert drawn == {1, 2}


def test_sampling_frequencies_match_softmax() -> None:
    """20000 draws at temperature 1 have frequencies within 0.015 of softmax(logits); at
    temperature 0.5 within 0.015 of softmax(2 * logits) (probs squared, renormalised)."""
    g = torch.Generator().manual_seed(2)
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = probs.log()[None].expand(20000, 4)
    for temp, want in ((1.0, probs), (0.5, probs**2 / (probs**2).sum())):
        draws = sample_next(logits, temperature=temp, top_k=None, top_p=None, generator=g)
        freq = torch.bincount(draws, minlength=4).float() / 20000
        assert (freq - want).abs().max().item() < 0.015


def test_seeded_sampling_reproducible() -> None:
    """Two generators with the same seed draw identical samples; a different seed differs."""
    logits = torch.randn(64, 100, generator=torch.Generator().manual_seed(0))
    kw = dict(temperature=1.2, top_k=50, top_p=0.9)
    a = sample_next(logits, **kw, generator=torch.Generator().manual_seed(7))
    b = sample_next(logits, **kw, generator=torch.Generator().manual_seed(7))
    c = sample_next(logits, **kw, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature=-0.1"),
    (dict(temperature=float("nan")), "temperature=nan"),
    (dict(top_k=0), "top_k=0 must be an integer >= 1"),
    (dict(top_k=2.5), "top_k=2.5"),
    (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
])
def test_invalid_args_raise(kwargs: dict, match: str) -> None:
    """Each invalid argument raises ValueError naming the value and the valid range."""
    args = dict(temperature=1.0, top_k=None, top_p=None) | kwargs
    with pytest.raises(ValueError, match=match):
        sample_next(torch.zeros(1, 4), **args, generator=None)


def test_helpers_validate_and_shape() -> None:
    """apply_top_k / apply_top_p validate their own arguments; sample_next rejects (B, T, V) logits."""
    with pytest.raises(ValueError, match="top_k=0"):
        apply_top_k(torch.zeros(1, 4), 0)
    with pytest.raises(ValueError, match="top_p=2"):
        apply_top_p(torch.zeros(1, 4), 2)
    with pytest.raises(ValueError, match=r"\(B, V\)"):
        sample_next(torch.zeros(1, 2, 4), temperature=1.0, top_k=None, top_p=None, generator=None)


# every temperature and top_p the CLI or the server's schema admits, at the edges of float32 and float64
EDGE_TEMPERATURES = [5e-324, 1e-300, 1e-45, 1e-39, 1.1754943508222875e-38, 1e-7, 9.99e-7, 1e-6, 1e-3, 2.0,
                     3.4028234663852886e38, 1e300, 1.7976931348623157e308]
EDGE_TOP_P = [5e-324, 1e-300, 1e-46, 1e-45, 1e-39, 1e-8, 0.5, 1 - 1e-9, 1.0]


@pytest.mark.parametrize("temperature", EDGE_TEMPERATURES)
@pytest.mark.parametrize("top_p", [None, 1e-46, 0.9])
def test_tiny_and_huge_temperatures_are_well_defined(temperature: float, top_p: float | None) -> None:
    """Issue 12, failure 4: temperature 1e-39 or 1e-300 overflowed logits / T in float32 (NaN probabilities:
    "probability tensor contains either inf, nan"). Below GREEDY_TEMPERATURE the draw is the argmax;
    above it a draw is a valid id; at T >= float32's max every token is possible (uniform, the limit)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[3.0, 1.0, 40.0, -2.0], [1e30, -1e30, 0.0, 5.0]])  # (2, 4), a huge spread too
    draws = torch.stack([sample_next(logits, temperature=temperature, top_k=None, top_p=top_p, generator=g)
                         for _ in range(200)])  # (200, 2)
    assert ((draws >= 0) & (draws < 4)).all()
    if temperature < 1e-3 or top_p == 1e-46:
        assert (draws == torch.tensor([2, 0])).all()  # the argmax, every time
    if temperature < 1e-6:  # sampling.GREEDY_TEMPERATURE
        assert torch.equal(draws[0], greedy(logits))
    if temperature >= 1e300 and top_p is None:
        assert set(draws[:, 0].tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("top_p", EDGE_TOP_P)
def test_top_p_never_empties_the_nucleus(top_p: float) -> None:
    """Issue 12, failure 4: top_p=1e-46 rounds to 0 in float32 and the nucleus test `mass_before >= p`
    dropped every token (all -inf, NaN after softmax). The top token survives every p in (0, 1]."""
    logits = torch.tensor([[0.1, 2.0, -1.0, 0.5]])
    out = apply_top_p(logits, top_p)
    assert math.isfinite(out[0, 1].item())
    probs = torch.softmax(out, dim=-1)
    assert torch.isfinite(probs).all() and probs.sum().item() == pytest.approx(1.0)
    if top_p < 0.4:
        assert torch.isfinite(out).sum().item() == 1


def test_temperature_rejects_bools_and_non_finite() -> None:
    """A bool is not a temperature or top_p (True would silently mean 1); inf and NaN name the value."""
    for kw in (dict(temperature=True), dict(temperature=float("inf")), dict(top_p=True), dict(top_p=float("nan"))):
        args = dict(temperature=1.0, top_k=None, top_p=None) | kw
        with pytest.raises(ValueError, match="temperature=|top_p="):
            sample_next(torch.zeros(1, 4), **args, generator=None)
