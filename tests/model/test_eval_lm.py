"""The model side of task evaluation (clusterlm/eval/lm.py): log-likelihoods against one hand-written
full forward pass + log_softmax, rolling windows, batched generation against the engine one prompt at
a time, context limits, and the bundled Shakespeare choice task.

Run: .venv/bin/python -m pytest -q tests/model/test_eval_lm.py
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from clusterlm.errors import DataError
from clusterlm.eval.lm import (generate_batch, generate_completions, loglikelihood, loglikelihood_rolling,
                               score_tokens)
from clusterlm.generate.engine import complete
from clusterlm.models.build import build_model
from clusterlm.models.config import ModelConfig
from clusterlm.tokenizer.kinds import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n"
TOK = train_tokenizer("char", [TEXT])
V = TOK.vocab_size
C = 24  # the Transformers' context
STEPS = 80
_T = dict(vocab_size=V, vocab_multiple=8, n_layers=2, dim=32, n_heads=4, max_seq_len=C, ffn_multiple=16)
MODELS: dict[str, ModelConfig] = {
    "gpt": ModelConfig(**_T, pos="learned", norm="layernorm", mlp="gelu", bias=True),
    "llama": ModelConfig(**_T, pos="rope", norm="rmsnorm", mlp="swiglu", n_kv_heads=2, tie_embeddings=False),
    "lstm": ModelConfig(arch="lstm", vocab_size=V, vocab_multiple=8, n_layers=2, dim=32, pos="none"),
}
REQUESTS = [  # (context, continuation): lengths differ, one empty context, one trailing space
    ("To be, or not", " to be"),
    ("", "question"),
    ("the mind ", "to suffer"),
    ("nobler", " in the mind"),
    ("be", ","),
    ("that is the", " question:\nW"),
    ("no", "t to be"),
]


@functools.lru_cache(maxsize=None)
def _trained(name: str) -> torch.nn.Module:
    """Random weights, then STEPS AdamW steps on TEXT (about a second): greedy outputs of a random
    model repeat one token (often a special one); a model that has seen TEXT writes varied text."""
    torch.manual_seed(0)
    model = build_model(MODELS[name])
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2 if name == "lstm" else 1e-2)
    data = torch.tensor([TOK.eos_id] + ids(TEXT) * 2)
    for _ in range(STEPS):
        starts = torch.randint(0, len(data) - C - 1, (8,))
        x = torch.stack([data[s:s + C] for s in starts])  # (B, T)
        y = torch.stack([data[s + 1:s + C + 1] for s in starts])  # (B, T)
        loss = torch.nn.functional.cross_entropy(model(x)[..., :V].flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def make(name: str) -> torch.nn.Module:
    return copy.deepcopy(_trained(name))


def ids(text: str) -> list[int]:
    return TOK.encode(text)


@torch.no_grad()
def hand(model: torch.nn.Module, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One full forward pass over (ctx + cont)[:-1], log_softmax over the real vocabulary, the sum
    of the continuation tokens' log-probabilities and whether each is the argmax."""
    whole = ctx + cont
    logp = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0, :, :V].double(), dim=-1)  # (T, V)
    rows = logp[len(ctx) - 1:]  # position t predicts token t + 1
    tgt = torch.tensor(cont)
    return float(rows.gather(-1, tgt[:, None]).sum()), bool((rows.argmax(-1) == tgt).all())


def hand_request(model: torch.nn.Module, context: str, continuation: str) -> tuple[float, int, bool]:
    """lm-eval's split, written out for a character tokenizer: the context's trailing whitespace
    moves to the continuation, and EOS comes first."""
    stripped = context.rstrip()
    cont = ids(context[len(stripped):] + continuation)
    lp, greedy = hand(model, [TOK.eos_id] + ids(stripped), cont)
    return lp, len(cont), greedy


@pytest.mark.parametrize("name", MODELS)
def test_loglikelihood_equals_one_forward_pass(name: str) -> None:
    """Reference: hand_request per request (one unbatched forward + log_softmax). Batched (3 per
    pass, sorted and padded) and one at a time both equal it within float32 rounding, in input
    order, with the same token counts and is_greedy flags."""
    model = make(name)
    want = [hand_request(model, c, x) for c, x in REQUESTS]
    for bs in (1, 3, 16):
        got = loglikelihood(model, TOK, REQUESTS, batch_size=bs)
        for (lp, n, g), res in zip(want, got):
            assert res.logprob == pytest.approx(lp, abs=1e-4)
            assert (res.n_tokens, res.is_greedy) == (n, g)
    assert [r.n_tokens for r in got] == [6, 8, 10, 12, 1, 12, 7]


@pytest.mark.parametrize("name", ["gpt", "lstm"])
def test_is_greedy_on_the_models_own_argmax(name: str) -> None:
    """A continuation made of the model's greedy tokens (engine.complete, temperature 0) has
    is_greedy True and log-probability equal to the hand forward; changing its last token makes it
    False and lowers the score."""
    model = make(name)
    ctx = [TOK.eos_id] + ids("To be, or")
    cont, _ = complete(model, ctx, max_new_tokens=5, temperature=0.0)
    cont = cont[0]
    other = cont[:-1] + [(cont[-1] + 1) % V]
    res = score_tokens(model, [(ctx, cont), (ctx, other)], batch_size=2)
    assert res[0].is_greedy and not res[1].is_greedy
    assert res[0].logprob == pytest.approx(hand(model, ctx, cont)[0], abs=1e-4)
    assert res[1].logprob < res[0].logprob


def test_quantized_and_pruned_models_share_the_path() -> None:
    """An int4 weight-only quantized and a structurally pruned Transformer (optimize/) score the
    requests, batched, as their own hand forward pass does: the same call signature serves them.
    int8 with int8 activations (fbgemm, the CPU default) rounds each call's whole input with one
    dynamic scale, so its scores depend on what shares the batch: equal to the hand pass one request
    at a time; batched (the padding joins the range too) it moved the sums by up to 0.14 nats at
    batch 4 and 0.19 at batch 7 (of 0.6 to 20): bounded here by 0.5."""
    from clusterlm.optimize.prune import structured_prune
    from clusterlm.optimize.qlinear import quantize_model

    int4, int8 = make("gpt"), make("gpt")
    quantize_model(int4, "int4", group_size=32)
    quantize_model(int8, "int8")
    pruned = structured_prune(make("gpt"), 0.5).eval()
    for model, bs, tol in ((int4, 4, 1e-4), (pruned, 4, 1e-4), (int8, 1, 1e-4), (int8, 4, 0.5)):
        got = loglikelihood(model, TOK, REQUESTS, batch_size=bs)
        for (c, x), res in zip(REQUESTS, got):
            assert res.logprob == pytest.approx(hand_request(model, c, x)[0], abs=tol)


def test_too_long_requests_are_counted_or_left_truncated() -> None:
    """Requests needing more than the context (24 inputs) raise one DataError counting them all;
    with truncate=True each keeps its last 25 ids (lm-eval's left truncation) and equals the hand
    forward over them; a continuation longer than the context cannot be scored at all."""
    model = make("gpt")
    reqs = [(TEXT[:30], " to be"), ("To be", ","), (TEXT[:40], "question")]
    with pytest.raises(DataError, match=r"2 of 3 requests do not fit the model's context of 24 tokens"):
        loglikelihood(model, TOK, reqs)
    got = loglikelihood(model, TOK, reqs, truncate=True, batch_size=2)
    for (c, x), res in zip(reqs, got):
        whole = [TOK.eos_id] + ids(c + x)
        kept = whole[-(C + 1):]
        lp, _ = hand(model, kept[:-len(ids(x))], ids(x))
        assert res.logprob == pytest.approx(lp, abs=1e-4) and res.n_tokens == len(ids(x))
    with pytest.raises(DataError, match="continuation longer than the model's context"):
        loglikelihood(model, TOK, [("a", TEXT[:30])], truncate=True)
    # an RNN has no context limit: nothing to truncate
    assert loglikelihood(make("lstm"), TOK, reqs)[2].n_tokens == 8


@pytest.mark.parametrize("name", ["gpt", "lstm"])
def test_rolling_loglikelihood(name: str) -> None:
    """A text shorter than the context scores as loglikelihood(("", text)). A longer one (86
    characters, context 24) is the sum over lm-eval's disjoint windows, written out by hand: the
    first predicts 24 tokens after EOS, each later one up to 24 tokens after the one token before
    them (the last, shorter one after as many as fill the window). An RNN reads the whole text in one window."""
    model = make(name)
    short = "nobler in the mind"
    (lp, n), = loglikelihood_rolling(model, TOK, [short])
    assert n == len(short) and lp == pytest.approx(loglikelihood(model, TOK, [("", short)])[0].logprob, abs=1e-4)
    t = ids(TEXT)
    assert len(t) == 85
    if name == "lstm":
        want = hand(model, [TOK.eos_id], t)[0]
    else:  # the last window's context fills the window: t[85 - 25:72]
        want = (hand(model, [TOK.eos_id], t[:24])[0] + hand(model, t[23:24], t[24:48])[0]
                + hand(model, t[47:48], t[48:72])[0] + hand(model, t[60:72], t[72:85])[0])
    got = loglikelihood_rolling(model, TOK, [TEXT, short, ""], batch_size=3)
    assert got[0][0] == pytest.approx(want, abs=1e-3) and got[0][1] == len(t)
    assert got[2] == (0.0, 0)


PROMPTS = ["To be", "Whether 'tis no", "", "the question", "To be", "mind to suffer", "q", "or not to be, th"]


def one_at_a_time(model: torch.nn.Module, prompt: str, n: int, stops: tuple[str, ...] = ()) -> str:
    """Reference: engine.complete on [EOS] + prompt, greedy, decoded, cut before the first stop."""
    new, _ = complete(model, [TOK.eos_id] + ids(prompt), max_new_tokens=n, temperature=0.0, eos_id=TOK.eos_id)
    text = TOK.decode(new[0])
    cuts = [text.find(s) for s in stops if s in text]
    return text[:min(cuts)] if cuts else text


@pytest.mark.parametrize("name", MODELS)
def test_generate_batch_greedy_equals_engine_one_at_a_time(name: str) -> None:
    """Greedy generate_batch of 8 prompts of different lengths, 3 slots (so finished slots are
    refilled) and 16 (all at once), equals engine.complete one prompt at a time; a Transformer's
    rows stop where its context of 24 is full, as the engine's do."""
    model = make(name)
    want = [one_at_a_time(model, p, 12) for p in PROMPTS]
    assert generate_batch(model, TOK, PROMPTS, max_new_tokens=12, batch_size=3) == want
    assert generate_batch(model, TOK, PROMPTS, max_new_tokens=12, batch_size=16) == want
    assert generate_batch(model, TOK, PROMPTS, max_new_tokens=12, batch_size=1) == want
    done = generate_completions(model, TOK, PROMPTS, max_new_tokens=12, batch_size=3)
    if name != "lstm":  # prompt 7 is 17 tokens with EOS: 8 fit before the context is full
        assert done[7].n_tokens == C - 17 + 1 and done[7].finish_reason == "length"


@pytest.mark.parametrize("name", ["gpt", "lstm"])
def test_stop_strings_are_honoured(name: str) -> None:
    """Stop strings taken from the greedy outputs cut each text before the first of them (the stop
    string is not returned), as the one-at-a-time reference cut by str.find; finish reason "stop"."""
    model = make(name)
    full = [one_at_a_time(model, p, 16) for p in PROMPTS]
    longest = sorted(full, key=len)[-2:]
    stops = (longest[0][3:5], longest[1][6:8])
    want = [one_at_a_time(model, p, 16, stops) for p in PROMPTS]
    assert any(len(w) < len(f) for w, f in zip(want, full))
    got = generate_completions(model, TOK, PROMPTS, max_new_tokens=16, batch_size=3, stops=stops)
    assert [c.text for c in got] == want
    for c, w, f in zip(got, want, full):
        if len(w) < len(f):
            assert c.finish_reason == "stop"


def test_beam_search_ends_at_the_end_of_turn_token() -> None:
    """A chat model's end-of-turn token (`stop_ids`, here a character the model writes often) ends a
    beam as EOS does. Reference: the best beam of a search whose EOS is that token (beam_search with
    eos_id=it, on the model with its real EOS made impossible so the two searches have one end token),
    as text, token count and finish reason. These 3 cases differed when the search ran on past the
    token and the text was cut there afterwards: the chosen beam was the best of beams that did not
    end at it. Width 1 (length_penalty 0) equals greedy decoding stopped at the token."""
    from clusterlm.generate.beam import beam_search
    from tests.helpers import token_masked

    model = make("llama")
    masked = token_masked(model, TOK.eos_id)
    for end, prompt in (("e", "nobler in "), ("t", "nobler in "), ("o", "To be, ")):
        (eot,) = ids(end)
        (ref,) = beam_search(masked, prompts=[[TOK.eos_id] + ids(prompt)], num_beams=4, max_new_tokens=10, eos_id=eot)
        (got,) = generate_completions(masked, TOK, [prompt], max_new_tokens=10, num_beams=4, stop_ids=(eot,))
        assert eot not in ref.tokens
        assert (got.text, got.n_tokens, got.finish_reason) == (TOK.decode(ref.tokens), len(ref.tokens),
                                                                "stop" if ref.finished else "length")
        (greedy,) = generate_completions(model, TOK, [prompt], max_new_tokens=10, stop_ids=(eot,))
        (width1,) = beam_search(model, prompts=[[TOK.eos_id] + ids(prompt)], num_beams=1, max_new_tokens=10,
                                eos_id=TOK.eos_id, stop_ids=[eot], length_penalty=0.0)
        assert (TOK.decode(width1.tokens), width1.finished) == (greedy.text, greedy.finish_reason == "stop")


def test_seeded_sampling_does_not_depend_on_batch_size() -> None:
    """Sampled rows draw from their own generator (seed + prompt index): batch 1, 3 and 8 give the
    same texts, the same seed repeats them and another seed changes them."""
    model = make("gpt")
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.95, seed=7)
    a = generate_batch(model, TOK, PROMPTS, batch_size=1, **kw)
    assert generate_batch(model, TOK, PROMPTS, batch_size=3, **kw) == a
    assert generate_batch(model, TOK, PROMPTS, batch_size=8, **kw) == a
    assert generate_batch(model, TOK, PROMPTS, batch_size=8, **{**kw, "seed": 8}) != a


def test_the_largest_seeds_are_their_own() -> None:
    """Row i samples with seed + i as given (as serve does): taken modulo 2^63-1, seed 2^63-1 drew
    seed 0's texts, and row 1 of seed 2^63-2 row 0's of seed 0."""
    model = make("gpt")
    kw = dict(max_new_tokens=10, temperature=1.0)
    top = generate_batch(model, TOK, PROMPTS[:2], seed=2**63 - 1, **kw)
    zero = generate_batch(model, TOK, PROMPTS[:2], seed=0, **kw)
    assert top != zero and top == generate_batch(model, TOK, PROMPTS[:2], seed=2**63 - 1, **kw)


def test_long_prompts_are_counted_or_truncated() -> None:
    """Prompts that leave no room for a new token in the context of 24 raise one DataError counting
    them; with truncate=True each keeps its last 24 - min(6, 12) = 18 ids (generate.text.prompt_ids's
    rule) and generates as the engine does from them."""
    model = make("gpt")
    prompts = [TEXT[:40], "To be", TEXT[:23]]
    with pytest.raises(DataError, match=r"2 of 3 prompts do not fit the model's context of 24 tokens"):
        generate_batch(model, TOK, prompts, max_new_tokens=6)
    got = generate_batch(model, TOK, prompts, max_new_tokens=6, truncate=True)
    kept = ([TOK.eos_id] + ids(TEXT[:40]))[-18:]
    new, _ = complete(model, kept, max_new_tokens=6, temperature=0.0, eos_id=TOK.eos_id)
    assert got[0] == TOK.decode(new[0]) and got[1] == one_at_a_time(model, "To be", 6)


# ---- the bundled Shakespeare choice task ----------------------------------------------------------

TASK = ROOT / "clusterlm" / "data" / "tasks" / "shakespeare_next_line.jsonl"


def _script():
    spec = importlib.util.spec_from_file_location("make_task", ROOT / "scripts" / "make_shakespeare_choice_task.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def test_shakespeare_task_file_is_valid_and_regenerates_byte_for_byte() -> None:
    """The committed file holds 400 choice records: 4 distinct choices, gold in range, the gold line
    not among the distractors, every (context, choice) within 64 characters (the quickstart
    model's context: no truncation needed). Running the script's build again gives the same bytes."""
    data = TASK.read_bytes()
    records = [json.loads(line) for line in data.decode("utf-8").splitlines()]
    assert len(records) == 400
    for r in records:
        assert set(r) == {"kind", "context", "choices", "gold"} and r["kind"] == "choice"
        assert len(r["choices"]) == 4 and len(set(r["choices"])) == 4 and r["gold"] in range(4)
        assert r["context"].endswith("\n") and all(len(r["context"]) + len(c) <= 64 for c in r["choices"])
    golds = [r["gold"] for r in records]
    assert min(golds.count(i) for i in range(4)) > 60  # positions are spread
    mod = _script()
    assert mod.render(mod.build_records()) == data


def test_word_order_task_is_valid_and_regenerates_byte_for_byte() -> None:
    """shakespeare_word_order.jsonl: 400 records whose 4 distinct choices are the same words in other
    orders (so the same characters: length normalisation cannot help), gold in range and spread,
    within the quickstart model's 64 characters; the script's build gives the same bytes."""
    path = TASK.with_name("shakespeare_word_order.jsonl")
    data = path.read_bytes()
    records = [json.loads(line) for line in data.decode("utf-8").splitlines()]
    assert len(records) == 400
    for r in records:
        gold = r["choices"][r["gold"]]
        assert len(set(r["choices"])) == 4 and len(gold.split(" ")) >= 5
        assert all(sorted(c.split(" ")) == sorted(gold.split(" ")) for c in r["choices"])
        assert all(len(r["context"]) + len(c) <= 64 for c in r["choices"])
    assert min([r["gold"] for r in records].count(i) for i in range(4)) > 60
    mod = _script()
    assert mod.render(mod.build_word_order_records()) == data


def test_shakespeare_task_fits_a_quickstart_shaped_model_without_truncation() -> None:
    """Every request of the task fits a character model with a 64-token context (no DataError
    without truncate) and gives a finite score; a random-weights model is near chance (25%)."""
    from clusterlm.data.builtin import builtin_files

    tok = train_tokenizer("char", [b.decode("utf-8") for _, b in builtin_files("shakespeare")])
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layers=1, dim=32, n_heads=2, max_seq_len=64, pos="learned",
                      norm="layernorm", mlp="gelu")
    model = build_model(cfg)
    model.init_weights(0)
    records = [json.loads(line) for line in TASK.read_text("utf-8").splitlines()][:50]
    reqs = [(r["context"], c) for r in records for c in r["choices"]]
    res = loglikelihood(model.eval(), tok, reqs, batch_size=32)
    assert all(math.isfinite(x.logprob) for x in res)
    correct = sum(max(range(4), key=lambda i: res[4 * k + i].logprob) == r["gold"] for k, r in enumerate(records))
    assert 0 <= correct <= 30
