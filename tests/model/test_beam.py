"""Decoding an encoder-decoder and beam search (generate/seq2seq.py, generate/beam.py).

References: greedy decoding by uncached full forwards (the whole target prefix re-run through both
stacks at every step, one source at a time, unpadded) for the cached, batched, padded encdec path;
greedy decoding for beam width 1; and the sequence log-probability recomputed by full forwards for
the scores beam search reports. Run: .venv/bin/python -m pytest -q tests/model/test_beam.py
"""

from __future__ import annotations

import pytest
import torch

from clusterlm.generate.beam import beam_search
from clusterlm.generate.seq2seq import Seq2SeqGeneration
from clusterlm.models.config import ModelConfig

BOS, EOS, PAD, V = 1, 2, 0, 24
MAX_NEW = 12


def _sources(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, V, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist() + [EOS]
            for _ in range(n)]


@pytest.fixture(scope="module")
def encdec():
    """A tiny encdec trained 30 steps to copy its source: peaked but imperfect distributions, some
    outputs ending at EOS and some running to the limit."""
    from clusterlm.models.encdec import EncoderDecoder

    torch.manual_seed(0)
    cfg = ModelConfig(arch="encdec", vocab_size=V, n_layers=2, dim=32, n_heads=4, max_seq_len=16, pos="learned")
    model = EncoderDecoder(cfg)
    model.init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for step in range(30):
        srcs = _sources(8, seed=100 + step)
        S, T = max(map(len, srcs)), max(map(len, srcs))
        src = torch.full((8, S), PAD)
        mask = torch.zeros((8, S), dtype=torch.bool)
        tin = torch.full((8, T), PAD)
        lab = torch.full((8, T), -100)
        for i, s in enumerate(srcs):
            t = s[:-1]
            src[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), True
            tin[i, :len(t) + 1] = torch.tensor([BOS] + t)
            lab[i, :len(t) + 1] = torch.tensor(t + [EOS])
        loss = torch.nn.functional.cross_entropy(model(src, tin, mask).reshape(-1, V), lab.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def decoder():
    from clusterlm.models.transformer import Transformer

    cfg = ModelConfig(vocab_size=V, n_layers=2, dim=32, n_heads=4, max_seq_len=32, init_std=0.3)
    model = Transformer(cfg)
    model.init_weights(seed=1)
    return model.eval()


@torch.no_grad()
def _greedy_uncached(model, src: list[int]) -> list[int]:
    out: list[int] = []
    for _ in range(MAX_NEW):
        logits = model(torch.tensor([src]), torch.tensor([[BOS] + out]))[0, -1, :V]
        t = int(logits.argmax())
        if t == EOS:
            break
        out.append(t)
    return out


@torch.no_grad()
def _logprob_encdec(model, src: list[int], out: list[int], finished: bool) -> float:
    tgt = [BOS] + out
    labels = out + ([EOS] if finished else [])
    logp = torch.log_softmax(model(torch.tensor([src]), torch.tensor([tgt]))[0, :, :V].double(), -1)
    return float(sum(logp[i, t] for i, t in enumerate(labels)))


@torch.no_grad()
def _logprob_decoder(model, prompt: list[int], out: list[int], finished: bool) -> float:
    seq = prompt + out
    labels = out + ([EOS] if finished else [])
    logp = torch.log_softmax(model(torch.tensor([seq]))[0, :, :V].double(), -1)
    P = len(prompt)
    return float(sum(logp[P - 1 + i, t] for i, t in enumerate(labels)))


def test_cached_batched_greedy_equals_uncached_full_forwards(encdec):
    """Seq2SeqGeneration (source encoded once, cross-attention K/V and decoder KV cached, 8 sources of
    different lengths right-padded in one batch) == greedy by uncached full forwards, token for token."""
    srcs = _sources(8, seed=7)
    gen = Seq2SeqGeneration(encdec, srcs, max_new_tokens=MAX_NEW, bos_id=BOS, eos_id=EOS, pad_id=PAD, temperature=0.0)
    for _ in gen:
        pass
    ref = [_greedy_uncached(encdec, s) for s in srcs]
    assert gen.tokens == ref
    assert [r == "stop" for r in gen.finish_reasons] == [len(t) < MAX_NEW for t in ref]
    assert "stop" in gen.finish_reasons  # EOS handling exercised (the copies end at EOS)


def test_beam_width_1_equals_greedy(encdec, decoder):
    srcs = _sources(8, seed=7)
    hyps = beam_search(encdec, sources=srcs, num_beams=1, max_new_tokens=MAX_NEW, eos_id=EOS, bos_id=BOS,
                       pad_id=PAD, length_penalty=0.0)
    assert [h.tokens for h in hyps] == [_greedy_uncached(encdec, s) for s in srcs]
    prompts = [[EOS] + s[:4] for s in srcs]
    for p in prompts:
        (h,) = beam_search(decoder, prompts=[p], num_beams=1, max_new_tokens=MAX_NEW, eos_id=EOS, length_penalty=0.0)
        from clusterlm.generate.engine import complete

        toks, _ = complete(decoder, p, max_new_tokens=MAX_NEW, temperature=0.0, eos_id=EOS)
        assert h.tokens == toks[0]


def test_beam_width_4_scores_at_least_greedy_on_every_sentence(encdec, decoder):
    """Beam width 4 (length_penalty 0: the plain sum) reaches a sequence log-probability >= greedy's on
    every test input, for the encdec and a decoder-only model; the reported log-probability is the
    full forward's (1e-4, float32 logits)."""
    srcs = _sources(12, seed=11)
    greedy = beam_search(encdec, sources=srcs, num_beams=1, max_new_tokens=MAX_NEW, eos_id=EOS, bos_id=BOS,
                         pad_id=PAD, length_penalty=0.0)
    beams = beam_search(encdec, sources=srcs, num_beams=4, max_new_tokens=MAX_NEW, eos_id=EOS, bos_id=BOS,
                        pad_id=PAD, length_penalty=0.0)
    better = 0
    for s, g, b in zip(srcs, greedy, beams):
        lg, lb = _logprob_encdec(encdec, s, g.tokens, g.finished), _logprob_encdec(encdec, s, b.tokens, b.finished)
        assert lb == pytest.approx(b.logprob, abs=1e-4) and lg == pytest.approx(g.logprob, abs=1e-4)
        assert lb >= lg - 1e-9
        better += lb > lg + 1e-9
    # decoder-only: one prompt per call
    for s in srcs:
        p = [EOS] + s[:5]
        (g,) = beam_search(decoder, prompts=[p], num_beams=1, max_new_tokens=MAX_NEW, eos_id=EOS, length_penalty=0.0)
        (b,) = beam_search(decoder, prompts=[p], num_beams=4, max_new_tokens=MAX_NEW, eos_id=EOS, length_penalty=0.0)
        lg, lb = _logprob_decoder(decoder, p, g.tokens, g.finished), _logprob_decoder(decoder, p, b.tokens, b.finished)
        assert lb == pytest.approx(b.logprob, abs=1e-4)
        assert lb >= lg - 1e-9
        better += lb > lg + 1e-9
    assert better >= 1  # the search found something greedy did not


def test_length_penalty_and_returned_hypotheses_are_ordered(encdec):
    """num_return=4 gives 4 hypotheses by descending score; score = logprob / len ** lp."""
    src = _sources(1, seed=3)
    (hyps,) = beam_search(encdec, sources=src, num_beams=4, num_return=4, max_new_tokens=MAX_NEW, eos_id=EOS,
                          bos_id=BOS, pad_id=PAD, length_penalty=1.0)
    assert len(hyps) == 4 and [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    for h in hyps:
        n = len(h.tokens) + (1 if h.finished else 0)
        assert h.score == pytest.approx(h.logprob / n)


def test_stop_ids_end_hypotheses_as_eos_does(decoder):
    """An end-of-turn token in `stop_ids` (3, the token this model writes most) ends a hypothesis as
    EOS does. Reference: the same search with that token as its EOS, on the model with its real EOS
    made impossible (one end token in both): the 4 hypotheses (tokens, log-probability, score,
    finished) are equal, bit for bit. With EOS possible too, a finished hypothesis ends with the
    likelier of the two: its log-probability is the full forward's over its tokens plus that end
    token's (1e-4), and no hypothesis holds either end token."""
    from tests.helpers import token_masked

    eot = 3
    masked = token_masked(decoder, EOS)
    prompts = [[EOS] + s[:4] for s in _sources(8, seed=7)]
    finished = 0
    for p in prompts:
        (got,) = beam_search(masked, prompts=[p], num_beams=4, num_return=4, max_new_tokens=MAX_NEW, eos_id=EOS,
                             stop_ids=[eot])
        (ref,) = beam_search(masked, prompts=[p], num_beams=4, num_return=4, max_new_tokens=MAX_NEW, eos_id=eot)
        assert [(h.tokens, h.logprob, h.score, h.finished) for h in got] == \
            [(h.tokens, h.logprob, h.score, h.finished) for h in ref]
        finished += sum(h.finished for h in got)
        for h in beam_search(decoder, prompts=[p], num_beams=4, num_return=4, max_new_tokens=MAX_NEW, eos_id=EOS,
                             stop_ids=[eot])[0]:
            assert EOS not in h.tokens and eot not in h.tokens
            if h.finished:
                with torch.no_grad():
                    logp = torch.log_softmax(decoder(torch.tensor([p + h.tokens]))[0, -1, :V].double(), -1)
                want = _logprob_decoder(decoder, p, h.tokens, False) + float(logp[[EOS, eot]].max())
                assert h.logprob == pytest.approx(want, abs=1e-4)
    assert finished >= 4  # hypotheses ended at the end-of-turn token


def test_encdec_loglikelihood_equals_the_beam_scorers_full_forward(encdec):
    """generate/seq2seq.score_pairs (batched, padded sources and targets) == the unbatched full-forward
    log-probability of the same target given the same source (1e-6)."""
    from clusterlm.generate.seq2seq import score_pairs

    class Tok:  # ids as text: "3 4 5" <-> [3, 4, 5]
        eos_id, bos_id, pad_id = EOS, BOS, PAD

        @staticmethod
        def encode(text: str) -> list[int]:
            return [int(x) for x in text.split()]

    srcs = _sources(6, seed=5)
    reqs = [(" ".join(map(str, s[:-1])), " " + " ".join(map(str, s[1:-1] or [7]))) for s in srcs]
    got = score_pairs(encdec, Tok, reqs, batch_size=4)
    for (ctx, cont), (lp, n, _) in zip(reqs, got):
        src, out = Tok.encode(ctx) + [EOS], Tok.encode(cont)
        assert n == len(out)
        assert lp == pytest.approx(_logprob_encdec(encdec, src, out, finished=False), abs=1e-6)


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_beam_search_on_a_recurrent_model(arch):
    """An LSTM/GRU's state follows its hypotheses (RNNState.reorder): width 1 (length_penalty 0) is
    the engine's greedy decoding token for token, and width 4 reaches a log-probability >= greedy's
    that a full forward reproduces (1e-4). It was an AttributeError ('RNNState' has no 'k')."""
    from clusterlm.generate.engine import complete
    from clusterlm.models.rnn import RNNLM

    cfg = ModelConfig(arch=arch, vocab_size=V, n_layers=2, dim=32, max_seq_len=32, pos="none", init_std=0.5)
    model = RNNLM(cfg)
    model.init_weights(seed=3)
    model.eval()
    for s in _sources(6, seed=5):
        p = [EOS] + s[:4]
        (g,) = beam_search(model, prompts=[p], num_beams=1, max_new_tokens=MAX_NEW, eos_id=EOS, length_penalty=0.0)
        toks, _ = complete(model, p, max_new_tokens=MAX_NEW, temperature=0.0, eos_id=EOS)
        assert g.tokens == toks[0]
        (b,) = beam_search(model, prompts=[p], num_beams=4, max_new_tokens=MAX_NEW, eos_id=EOS, length_penalty=0.0)
        lb = _logprob_decoder(model, p, b.tokens, b.finished)
        assert lb == pytest.approx(b.logprob, abs=1e-4)
        assert lb >= _logprob_decoder(model, p, g.tokens, g.finished) - 1e-9


def test_beam_search_refuses_an_encoder():
    """A masked-LM encoder does not generate: one clear ValueError naming the archs beam search serves."""
    from clusterlm.models.encdec import Encoder

    model = Encoder(ModelConfig(arch="encoder", vocab_size=V, n_layers=1, dim=32, n_heads=4, max_seq_len=16))
    model.init_weights(seed=0)
    with pytest.raises(ValueError, match="beam search is for arch transformer, lstm, gru, encdec; .* 'encoder'"):
        beam_search(model, prompts=[[EOS, 3]], num_beams=2, max_new_tokens=4, eos_id=EOS)


def test_beam_widths_past_the_vocabulary_or_the_memory_are_refused(encdec, decoder):
    """A width of 100,000 ran 10 minutes (2 GB) on a 54k-parameter model. Wider than the vocabulary is
    refused (the first step has V continuations); so is a width whose rows (beam_row_bytes each: the
    cache twice, an encdec's cross-attention keys and values, one step's logits in fp32 and two in
    fp64, as counted here from real caches) need more than the available memory."""
    from clusterlm.generate.beam import beam_row_bytes, check_beam_width

    with pytest.raises(ValueError, match=rf"num_beams={V + 1} is wider than the model's vocabulary \({V} tokens\)"):
        beam_search(encdec, sources=[[3, 4, EOS]], num_beams=V + 1, max_new_tokens=4, eos_id=EOS, bos_id=BOS)
    with pytest.raises(ValueError, match=rf"num_beams={V + 1} is wider"):
        beam_search(decoder, prompts=[[EOS, 3]], num_beams=V + 1, max_new_tokens=4, eos_id=EOS)

    def cache_bytes(cache) -> int:  # noqa: ANN001
        return sum(t.numel() * t.element_size() for t in [*cache.k.values(), *cache.v.values()])

    logits = V * (4 + 2 * 8)
    cache = decoder.make_cache(1, 3 + MAX_NEW - 1, device="cpu", dtype=torch.float32)  # a 3-token prompt
    assert beam_row_bytes(decoder, MAX_NEW, 3) == 2 * cache_bytes(cache) + logits
    cache = encdec.make_cache(1, MAX_NEW, device="cpu", dtype=torch.float32)
    encdec.prime(torch.tensor([[3, 4, 5, 6, EOS]]), cache)  # a 5-token source
    cross = sum(t.numel() * t.element_size() for kv in cache.cross.values() for t in kv)
    assert beam_row_bytes(encdec, MAX_NEW, 5) == 2 * cache_bytes(cache.self_kv) + cross + logits

    per_row = beam_row_bytes(encdec, MAX_NEW, 5)
    check_beam_width(encdec, 5, rows=2, max_new_tokens=MAX_NEW, input_len=5, available=10 * per_row)
    with pytest.raises(ValueError, match=r"--num-beams=6 needs about .* for 12 beam rows .* use --num-beams <= 5$"):
        check_beam_width(encdec, 6, rows=2, max_new_tokens=MAX_NEW, input_len=5, available=10 * per_row,
                         name="--num-beams")


@pytest.mark.parametrize("sources, fragment", [([], "sources is empty"), ([[5, 2], []], "source 1 is empty"),
                                               ([[5, 10_000]], "source 0 has token id 10000"),
                                               ([[-1, 2]], "source 0 has token id -1"),
                                               ([[1.5, 2]], "source 0 has token id 1.5")])
def test_seq2seq_generation_names_a_bad_source(encdec, sources, fragment):
    """A library caller's out-of-vocabulary id (or an empty source) is one ValueError naming the source
    and the valid range; before, the encoder's embedding raised a bare IndexError."""
    with pytest.raises(ValueError, match="ids must be integers in|empty") as e:
        Seq2SeqGeneration(encdec, sources, max_new_tokens=2, bos_id=BOS, eos_id=EOS, pad_id=PAD, temperature=0.0)
    assert fragment in str(e.value)
