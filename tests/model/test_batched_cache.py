"""Slot caches for continuous batching: sequences at different positions decoded in one batch give
the same logits as each sequence decoded alone with the ordinary cache."""

from __future__ import annotations

import pytest
import torch

from clusterlm.models.build import build_model
from clusterlm.models.config import get_preset


def _model(preset: str, **kw):
    torch.manual_seed(0)
    model = build_model(get_preset(preset, vocab_size=37, **kw))
    model.init_weights(seed=1)
    return model.eval()


def _alone(model, tokens: list[int], n_prompt: int) -> torch.Tensor:
    """Logits (len-n_prompt+1, V) of one sequence: prefill n_prompt tokens, then one token at a time."""
    cache = model.make_cache(1, len(tokens), device="cpu", dtype=torch.float32)
    out = [model(torch.tensor([tokens[:n_prompt]]), cache)[0, -1]]
    for t in tokens[n_prompt:]:
        out.append(model(torch.tensor([[t]]), cache)[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("preset,kw", [("gpt-nano", {}), ("llama-nano", {}), ("lstm-small", {"n_layers": 2, "dim": 32}),
                                       ("gru-small", {"n_layers": 2, "dim": 32})])
@torch.no_grad()
def test_slot_decode_matches_each_alone(preset, kw):
    """Three sequences with prompts of 5, 1 and 9 tokens, joining the batch at different steps
    (one leaves and its slot is reused), decoded together through a slot cache, give the logits of
    each decoded alone with make_cache (atol 1e-5)."""
    model = _model(preset, **kw)
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 37, (n,), generator=g).tolist() for n in (12, 8, 16, 10)]
    prompts = [5, 1, 9, 3]
    joins = [0, 2, 2, 8]  # decode step at which each sequence is prefilled
    cache = model.make_slot_cache(3, 16, device="cpu", dtype=torch.float32)
    got: dict[int, list[torch.Tensor]] = {i: [] for i in range(4)}
    slot_of: dict[int, int] = {}
    fed: dict[int, int] = {}
    for step in range(20):
        for i, j in enumerate(joins):
            if j == step:
                slot_of[i] = cache.alloc()
                got[i].append(model(torch.tensor([seqs[i][:prompts[i]]]), cache.rows([slot_of[i]]))[0, -1])
                fed[i] = prompts[i]
        running = [i for i in slot_of if fed[i] < len(seqs[i])]
        if running:
            idx = torch.tensor([[seqs[i][fed[i]]] for i in running])
            logits = model(idx, cache.rows([slot_of[i] for i in running]))[:, -1]
            for r, i in enumerate(running):
                got[i].append(logits[r])
                fed[i] += 1
        for i in list(slot_of):
            if fed[i] == len(seqs[i]) and slot_of[i] is not None:
                cache.free(slot_of[i])  # leaves: its slot is free for the next sequence
                slot_of[i] = None
                fed[i] = 10**9
    assert all(len(got[i]) == len(seqs[i]) - prompts[i] + 1 for i in range(4))
    for i in range(4):
        ref = _alone(model, seqs[i], prompts[i])
        torch.testing.assert_close(torch.stack(got[i]), ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_full_batch_and_multi_token_rows():
    """A batched prefill of two rows at different positions (T=3 each) equals each row alone, in
    the all-slots fast path (slots 0..N-1 in order)."""
    model = _model("llama-nano")
    a, b = list(range(1, 11)), list(range(20, 26))
    cache = model.make_slot_cache(2, 16, device="cpu", dtype=torch.float32)
    s0, s1 = cache.alloc(), cache.alloc()
    assert (s0, s1) == (0, 1)
    model(torch.tensor([a[:4]]), cache.rows([s0]))
    model(torch.tensor([b[:1]]), cache.rows([s1]))
    out = model(torch.tensor([a[4:7], b[1:4]]), cache.rows([s0, s1]))  # (2, 3, V)
    assert cache.pos.tolist() == [7, 4]
    full_a = model(torch.tensor([a[:7]]))[0, 4:7]
    full_b = model(torch.tensor([b[:4]]))[0, 1:4]
    torch.testing.assert_close(out[0], full_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], full_b, atol=1e-5, rtol=1e-5)


def test_slot_alloc_free_errors():
    """alloc hands out each slot once; a full cache, a double free and an overflow raise with the numbers."""
    model = _model("gpt-nano")
    cache = model.make_slot_cache(2, 4, device="cpu", dtype=torch.float32)
    s = [cache.alloc(), cache.alloc()]
    assert sorted(s) == [0, 1] and cache.num_free == 0
    with pytest.raises(ValueError, match="all 2 cache slots"):
        cache.alloc()
    cache.free(s[0])
    with pytest.raises(ValueError, match="not in use"):
        cache.free(s[0])
    with pytest.raises(ValueError, match="max_len=4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache.rows([s[1]]))
