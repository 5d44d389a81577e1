"""Masked-LM data (clusterlm/data/mlm.py): BERT's 15% / 80-10-10 corruption, masks that depend only on
(seed, global stream position) so any rank layout and a resume draw the same ones, and the <|mask|>
view of a prepared directory. Reference: the rates of Devlin et al. 2019 sec. 3.1 (binomial bounds);
the single-process loader's rows for the 2-rank split.

Run: .venv/bin/python -m pytest -q tests/unit/test_mlm.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from clusterlm.data.mlm import IGNORE_INDEX, MASK, MLMLoader, corrupt, iter_mlm_eval_batches, mask_view


def test_corruption_rates_follow_bert():
    rng = np.random.default_rng(0)
    row = rng.integers(0, 100, 200_000)
    x, y = corrupt(row, np.random.default_rng(1), mask_id=100, vocab=100)
    chosen = y != IGNORE_INDEX
    n = int(chosen.sum())
    assert abs(n / row.size - 0.15) < 0.005
    assert (y[chosen] == row[chosen]).all() and (x[~chosen] == row[~chosen]).all()
    masked = (x[chosen] == 100).mean()
    kept = (x[chosen] == row[chosen]).mean()  # unchanged, plus random draws that hit the same id (1%)
    assert abs(masked - 0.8) < 0.01 and abs(kept - (0.1 + 0.1 / 100)) < 0.01
    assert (x < 101).all()
    # a short row always gets a target
    x, y = corrupt(np.array([5, 6]), np.random.default_rng(3), mask_id=100, vocab=100, mask_prob=1e-9)
    assert (y != IGNORE_INDEX).sum() == 1


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from clusterlm.cli import main as cli

    root = tmp_path_factory.mktemp("mlm")
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i} says {'ab' * (i % 7)} hello."}) + "\n"
                                            for i in range(300)))
    assert cli(["prepare", str(root / "docs.jsonl"), "--out", str(root / "data"), "--tokenizer", "char",
                "--val-fraction", "0.1"]) == 0
    return root


def test_mask_view_appends_the_token_and_reads_the_same_shards(shards, tmp_path):
    from clusterlm.tokenizer import load_tokenizer

    view = mask_view(shards / "data", tmp_path / "run")
    base = load_tokenizer(shards / "data" / "tokenizer.json")
    tok = load_tokenizer(view / "tokenizer.json")
    assert tok.token_id(MASK) == base.vocab_size and tok.vocab_size == base.vocab_size + 1
    assert tok.encode("hello") == base.encode("hello")
    meta = json.loads((view / "meta.json").read_text())
    assert meta["tokenizer"]["vocab_size"] == tok.vocab_size and meta["splits"] == json.loads(
        (shards / "data" / "meta.json").read_text())["splits"]
    assert mask_view(shards / "data", tmp_path / "run") == view  # made once, reused


def test_masks_depend_on_the_stream_position_only(shards, tmp_path):
    """2 ranks x B=4 see exactly the rows (and masks) of 1 process x B=8; a fresh loader restored from
    a state continues with the same batches."""
    view = mask_view(shards / "data", tmp_path / "run")
    kw = dict(seq_len=16, mask_id=60, vocab=60, seed=3)
    one = MLMLoader(view, batch_size=8, **kw)
    ranks = [MLMLoader(view, batch_size=4, rank=r, world_size=2, **kw) for r in range(2)]
    for _ in range(3):
        (x, _, predict), y = next(one)
        assert (predict == (y != IGNORE_INDEX)).all()  # the encoder predicts only where labels are
        parts = [next(r) for r in ranks]
        assert (np.concatenate([p[0][0] for p in parts]) == x.numpy()).all()
        assert (np.concatenate([p[1] for p in parts]) == y.numpy()).all()
    state = one.state_dict()
    want = [next(one) for _ in range(2)]
    fresh = MLMLoader(view, batch_size=8, **kw)
    fresh.load_state_dict(state)
    for (a, b), (c, d) in zip(want, (next(fresh) for _ in range(2))):
        assert (a[0] == c[0]).all() and (b == d).all()
    v1 = [b[0][0] for b in iter_mlm_eval_batches(view, "val", 4, 16, mask_id=60, vocab=60, seed=3, max_batches=2)]
    v2 = [b[0][0] for b in iter_mlm_eval_batches(view, "val", 4, 16, mask_id=60, vocab=60, seed=3, max_batches=2)]
    assert all((a == b).all() for a, b in zip(v1, v2))


def test_span_corruption_reconstructs_the_row_with_t5_proportions():
    """T5's span corruption: the source with each sentinel replaced by its span in the target is the
    row again; round(T * 0.15) noise tokens in round(noise / 3) spans."""
    from clusterlm.data.mlm import span_corrupt

    row = np.arange(100, 228)  # T = 128
    sentinels = list(range(32))
    for seed in range(5):
        src, tgt = span_corrupt(row, np.random.default_rng(seed), sentinel_ids=sentinels, eos_id=99)
        assert src[-1] == 99
        spans = {}
        cur = None
        for t in tgt.tolist():
            if t in sentinels:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        assert len(spans) == round(19 / 3) and sum(map(len, spans.values())) == 19
        assert all(spans.values())  # no empty span
        rebuilt = [x for t in src[:-1].tolist() for x in (spans[t] if t in sentinels else [t])]
        assert rebuilt == row.tolist()
