"""TokenLoader and iter_eval_batches: coverage per epoch, determinism, resume, validation.

Run: .venv/bin/python -m pytest -q tests/unit/test_loader.py

Data directories are built here with shards.write_shard and a hand-written meta.json. Token values
encode where they come from: shard k (numbered over all splits) holds k*OFFSET + arange(count), in
uint32, so every window is unique and a sample's identity is recovered from its first token.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clusterlm.data import shards
from clusterlm.data.loader import TokenLoader, iter_eval_batches
from clusterlm.errors import CheckpointError, DataError
from clusterlm.fsutil import sha256_file

OFFSET = 1_000_000  # token value offset between shards


def make_data_dir(path: Path, splits: dict[str, list[int]], dtype: str = "uint32", base: int = 0) -> Path:
    """Write shards with position-encoding tokens and a meta.json like `clusterlm prepare` writes."""
    path.mkdir(parents=True, exist_ok=True)
    meta_splits = {}
    k = base
    for split, sizes in splits.items():
        entries = []
        for i, n in enumerate(sizes):
            name = f"{split}-{i:05d}.bin"
            shards.write_shard(path / name, k * OFFSET + np.arange(n, dtype=np.int64), np.dtype(dtype))
            entries.append({"file": name, "tokens": n, "sha256": sha256_file(path / name)})
            k += 1
        meta_splits[split] = {"shards": entries, "tokens": sum(sizes), "documents": len(sizes), "bytes": 0}
    meta = {"format_version": 1,
            "tokenizer": {"kind": "byte", "vocab_size": 2**32, "bos_id": 0, "eos_id": 1, "pad_id": 2,
                          "file": "tokenizer.json", "sha256": "0" * 64},
            "dtype": dtype, "splits": meta_splits}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def reference_first_tokens(sizes: list[int], T: int, base: int = 0) -> list[int]:
    """First token of every sample in order, derived from the spec (window j = tokens[j*T : j*T+T+1])."""
    firsts = []
    for k, n in enumerate(sizes):
        firsts += [(base + k) * OFFSET + j * T for j in range(max(n - 1, 0) // T)]
    return firsts


def sample_ids(x: torch.Tensor, index: dict[int, int]) -> list[int]:
    return [index[int(v)] for v in x[:, 0]]


def reference_stream(n: int, seed: int, stop: int, shuffle: bool = True) -> np.ndarray:
    """Stream positions [0, stop): epochs of np.random.default_rng([seed, e]).permutation(n)."""
    epochs = -(-stop // n)
    parts = [np.random.default_rng([seed, e]).permutation(n) if shuffle else np.arange(n) for e in range(epochs)]
    return np.concatenate(parts)[:stop]


def run_ranks(data: Path, W: int, B: int, T: int, steps: int, seed: int = 0, state: dict | None = None,
              split: str = "train", shuffle: bool = True) -> tuple[list[TokenLoader], list[list[torch.Tensor]]]:
    """W loaders in one process (simulated ranks), each advanced `steps` times; returns their x batches."""
    loaders = [TokenLoader(data, split, batch_size=B, seq_len=T, seed=seed, rank=r, world_size=W, shuffle=shuffle)
               for r in range(W)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    xs: list[list[torch.Tensor]] = [[] for _ in range(W)]
    for _ in range(steps):
        for r, ld in enumerate(loaders):
            x, y = next(ld)
            assert torch.equal(y[:, :-1], x[:, 1:])
            xs[r].append(x)
    return loaders, xs


def consumed(xs: list[list[torch.Tensor]], index: dict[int, int]) -> list[int]:
    """Sample ids in global stream order: step by step, rank 0's slice, then rank 1's, ..."""
    out = []
    for step in range(len(xs[0])):
        for r in range(len(xs)):
            out += sample_ids(xs[r][step], index)
    return out


SIZES = [101, 57, 3, 80]  # at T=4: 25, 14, 0 (too short for a window) and 19 samples


@pytest.fixture
def data(tmp_path):
    return make_data_dir(tmp_path / "d", {"train": SIZES, "val": [41, 30]})


@pytest.fixture
def index():
    return {t: i for i, t in enumerate(reference_first_tokens(SIZES, 4))}


@pytest.mark.parametrize("W", [1, 2, 3])
def test_each_sample_once_per_epoch(data, index, W):
    """Over whole epochs, the global stream read by W ranks equals the reference stream (epochs of
    default_rng([seed, e]).permutation): every sample appears exactly once per epoch across ranks."""
    T, B = 4, 5
    n = len(index)
    assert n == 25 + 14 + 0 + 19
    steps = -(-3 * n // (W * B))  # a bit over 3 epochs, batches straddle epoch boundaries
    loaders, xs = run_ranks(data, W, B, T, steps, seed=7)
    got = consumed(xs, index)
    assert got == reference_stream(n, 7, steps * W * B).tolist()
    for e in range(3):
        assert sorted(got[e * n:(e + 1) * n]) == list(range(n))
    assert loaders[0].num_samples == n
    assert loaders[0].position == steps * W * B
    assert loaders[0].epoch == steps * W * B // n
    assert loaders[0].batches_per_epoch == n / (W * B)
    assert loaders[0].tokens_per_batch == B * T and loaders[0].global_tokens_per_batch == W * B * T
    assert all(ld.state_dict() == loaders[0].state_dict() for ld in loaders)


def test_x_y_shift_and_windows_stay_in_shards(data):
    """y is x shifted by one token; every window holds T+1 consecutive tokens of one shard (token
    values k*OFFSET + position never jump), and x/y are int64 (B, T) tensors."""
    T, B = 4, 6
    ld = TokenLoader(data, batch_size=B, seq_len=T, seed=1)
    for _ in range(40):  # > 4 epochs of 58 samples
        x, y = next(ld)
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64
        window = torch.cat([x, y[:, -1:]], dim=1)  # (B, T+1)
        assert torch.equal(y, window[:, 1:])
        assert (window.diff(dim=1) == 1).all()
        shard, pos = window // OFFSET, window % OFFSET
        assert (shard == shard[:, :1]).all()
        sizes = torch.tensor(SIZES)[shard[:, 0]]
        assert (pos[:, -1] < sizes).all() and (pos[:, 0] % T == 0).all()


def test_deterministic_for_seed_and_differs_across_seeds_and_epochs(data, index):
    """Two loaders with seed 3 give identical batches; seed 4 gives another order; epoch 1's order
    differs from epoch 0's; shuffle=False reads samples 0, 1, 2, ... in order every epoch."""
    n = len(index)
    _, a = run_ranks(data, 1, n, 4, 2, seed=3)
    _, b = run_ranks(data, 1, n, 4, 2, seed=3)
    _, c = run_ranks(data, 1, n, 4, 2, seed=4)
    ids = [sample_ids(x, index) for x in a[0]]
    assert all(torch.equal(p, q) for p, q in zip(a[0], b[0]))
    assert [sample_ids(x, index) for x in c[0]][0] != ids[0]
    assert ids[0] != ids[1] and sorted(ids[0]) == sorted(ids[1]) == list(range(n))
    _, d = run_ranks(data, 1, n, 4, 2, shuffle=False)
    assert [sample_ids(x, index) for x in d[0]] == [list(range(n))] * 2


@pytest.mark.parametrize("W", [1, 2])
def test_resume_gives_identical_batches(data, W):
    """Stop after k batches, round-trip state_dict through JSON, restore in fresh loaders: the next
    m batches equal those of an uninterrupted run on every rank (x and y)."""
    T, B, k, m = 4, 3, 7, 15
    full = [TokenLoader(data, batch_size=B, seq_len=T, seed=5, rank=r, world_size=W) for r in range(W)]
    ref = [[next(ld) for _ in range(k + m)] for ld in full]
    first = [TokenLoader(data, batch_size=B, seq_len=T, seed=5, rank=r, world_size=W) for r in range(W)]
    for ld in first:
        for _ in range(k):
            next(ld)
    state = json.loads(json.dumps(first[0].state_dict()))
    assert state["position"] == k * W * B and state["version"] == 1
    for r in range(W):
        ld = TokenLoader(data, batch_size=B, seq_len=T, seed=5, rank=r, world_size=W)
        ld.load_state_dict(state)
        for j in range(m):
            x, y = next(ld)
            assert torch.equal(x, ref[r][k + j][0]) and torch.equal(y, ref[r][k + j][1])


@pytest.mark.parametrize("W_new,B_new", [(3, 2), (1, 2), (1, 5)])
def test_resume_on_other_world_size_continues_stream(data, index, W_new, B_new):
    """Save after k steps on 2 ranks (B=2), resume on W_new ranks (and batch size B_new): samples
    before + after are exactly the reference stream positions [0, p_end), no repeat, no gap."""
    T, k, m = 4, 9, 20
    loaders, before = run_ranks(data, 2, 2, T, k, seed=11)
    state = json.loads(json.dumps(loaders[0].state_dict()))
    loaders2, after = run_ranks(data, W_new, B_new, T, m, seed=11, state=state)
    got = consumed(before, index) + consumed(after, index)
    end = k * 2 * 2 + m * W_new * B_new
    assert loaders2[0].position == end
    assert got == reference_stream(len(index), 11, end).tolist()


def test_mismatched_state_names_field(data, tmp_path):
    """load_state_dict refuses a state from another seq_len, seed, split, shuffle, data directory or
    version, with the field name and both values in the message."""
    ld = TokenLoader(data, batch_size=2, seq_len=4, seed=0)
    other = make_data_dir(tmp_path / "other", {"train": SIZES, "val": [41, 30]}, base=9)
    cases = [
        (TokenLoader(data, batch_size=2, seq_len=5, seed=0), "seq_len: saved 5, current 4"),
        (TokenLoader(data, batch_size=2, seq_len=4, seed=1), "seed: saved 1, current 0"),
        (TokenLoader(data, "val", batch_size=2, seq_len=4, seed=0), "split: saved 'val', current 'train'"),
        (TokenLoader(data, batch_size=2, seq_len=4, seed=0, shuffle=False), "shuffle: saved False, current True"),
        (TokenLoader(other, batch_size=2, seq_len=4, seed=0), "fingerprint: saved"),
    ]
    for src, msg in cases:
        with pytest.raises(CheckpointError, match=msg.replace("(", r"\(")):
            ld.load_state_dict(src.state_dict())
    bad = ld.state_dict() | {"version": 2}
    with pytest.raises(CheckpointError, match="version: saved 2"):
        ld.load_state_dict(bad)
    state = ld.state_dict()
    del state["seed"]
    with pytest.raises(CheckpointError, match="lacks field.*seed"):
        ld.load_state_dict(state)
    with pytest.raises(CheckpointError, match="position=-1"):
        ld.load_state_dict(ld.state_dict() | {"position": -1})
    assert ld.position == 0


def test_constructor_validation(data, tmp_path):
    """Bad arguments and inconsistent data directories fail with the numbers in the message."""
    with pytest.raises(ValueError, match=r"rank=2 must be in \[0, world_size=2\)"):
        TokenLoader(data, batch_size=2, seq_len=4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size=0 must be an integer >= 1"):
        TokenLoader(data, batch_size=0, seq_len=4)
    with pytest.raises(ValueError, match="seq_len=0"):
        TokenLoader(data, batch_size=1, seq_len=0)
    with pytest.raises(DataError, match="no split 'test'; it has: train, val"):
        TokenLoader(data, "test", batch_size=1, seq_len=4)
    with pytest.raises(DataError, match=r"71 tokens, fewer than seq_len\+1 = 101"):
        TokenLoader(data, "val", batch_size=1, seq_len=100)
    with pytest.raises(DataError, match="no shard holds seq_len\\+1 = 42 tokens \\(largest: 41\\)"):
        TokenLoader(data, "val", batch_size=1, seq_len=41)
    with pytest.raises(DataError, match="is not a prepared data directory"):
        TokenLoader(tmp_path / "nowhere", batch_size=1, seq_len=4)
    # meta says 57 tokens, the shard header says 50
    shards.write_shard(data / "train-00001.bin", np.arange(50), np.dtype("uint32"))
    with pytest.raises(DataError, match="holds 50 tokens but .*shards\\[1\\] says tokens=57"):
        TokenLoader(data, batch_size=1, seq_len=4)
    with pytest.raises(ValueError, match="max_batches=-1"):
        iter_eval_batches(data, "val", 2, 4, max_batches=-1)


def test_a_damaged_meta_json_is_named(tmp_path):
    """A meta.json that is JSON but not an object, or not UTF-8, failed with a bare AttributeError /
    UnicodeDecodeError naming no file. Now a DataError naming meta.json."""
    for name, raw in (("list", b"[1, 2]"), ("binary", b"\xff\xfe{}"), ("null", b"null")):
        d = make_data_dir(tmp_path / name, {"train": [50]})
        (d / "meta.json").write_bytes(raw)
        with pytest.raises(DataError, match=rf"{name}/meta.json: (not UTF-8|a JSON object is expected)"):
            TokenLoader(d, batch_size=1, seq_len=4)

@pytest.mark.parametrize("W", [1, 3])
def test_eval_batches_cover_val_once(data, W):
    """iter_eval_batches: ranks together read val samples 0..n-1 in order, each once; every rank yields
    ceil(n / (W*B)) batches (the last ones smaller or empty); max_batches caps the count."""
    T, B = 4, 4
    firsts = reference_first_tokens([41, 30], T, base=len(SIZES))
    index = {t: i for i, t in enumerate(firsts)}
    n = len(firsts)  # 10 + 7 = 17
    per_rank = [list(iter_eval_batches(data, "val", B, T, max_batches=None, rank=r, world_size=W)) for r in range(W)]
    assert all(len(b) == -(-n // (W * B)) for b in per_rank)
    got = consumed([[x for x, _ in b] for b in per_rank], index)
    assert got == list(range(n))
    for b in per_rank:
        for x, y in b:
            assert x.shape[1] == T and torch.equal(y[:, :-1], x[:, 1:])
    capped = list(iter_eval_batches(data, "val", B, T, max_batches=2, rank=0, world_size=W))
    assert len(capped) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(capped, per_rank[0]))


def test_uint16_dataset(tmp_path):
    """A uint16 data directory yields the same int64 values as written."""
    data = make_data_dir(tmp_path / "d16", {"train": [33]}, dtype="uint16")
    x, y = next(TokenLoader(data, batch_size=8, seq_len=4, shuffle=False))
    assert x[:, 0].tolist() == list(range(0, 32, 4)) and y[-1].tolist() == [29, 30, 31, 32]


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 60), min_size=1, max_size=4), T=st.integers(1, 9),
       B=st.integers(1, 6), W=st.integers(1, 4), seed=st.integers(0, 2**32))
def test_coverage_property(sizes, T, B, W, seed):
    """For any shard sizes, T, B and W: the ranks' concatenated batches equal the reference stream,
    so each epoch covers every sample exactly once (even when one global batch spans epochs)."""
    firsts = reference_first_tokens(sizes, T)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data_dir(Path(tmp) / "d", {"train": sizes})
        if not firsts:
            with pytest.raises(DataError, match="seq_len"):
                TokenLoader(data, batch_size=B, seq_len=T)
            return
        index = {t: i for i, t in enumerate(firsts)}
        n = len(firsts)
        steps = -(-2 * n // (W * B))  # at least 2 epochs
        _, xs = run_ranks(data, W, B, T, steps, seed=seed)
    got = consumed(xs, index)
    assert got == reference_stream(n, seed, steps * W * B).tolist()
    for e in range(2):
        assert sorted(got[e * n:(e + 1) * n]) == list(range(n))


def test_a_data_dir_prepared_otherwise_than_asked_is_refused(tmp_path):
    """train's data.dir already prepared from data.source, but with another tokenizer kind or
    val_fraction than the run asks for: refused, naming both, not trained on silently; the same
    options (or no data.source: a folder from `clusterlm prepare`) use it as it is."""
    from clusterlm.config import DataConfig
    from clusterlm.data.prepare import prepare
    from clusterlm.errors import ConfigError
    from clusterlm.train.loop import ensure_data

    src = tmp_path / "a.txt"
    src.write_text("".join(f"To be, or not to be {i}: that is the question.\n\n" for i in range(40)))
    d = tmp_path / "d"
    prepare([str(src)], d, tokenizer="char", val_fraction=0.2)
    before = (d / "meta.json").read_bytes()
    assert ensure_data(DataConfig(dir=str(d), source=str(src), tokenizer="char", val_fraction=0.2)) == d
    assert ensure_data(DataConfig(dir=str(d), tokenizer="bpe")) == d  # no source: as prepared
    with pytest.raises(ConfigError, match=r"prepared with the char tokenizer, but data.tokenizer='bpe'; give "
                                          r"another data.dir, or delete"):
        ensure_data(DataConfig(dir=str(d), source=str(src), tokenizer="bpe", val_fraction=0.2))
    with pytest.raises(ConfigError, match=r"prepared with val_fraction 0.2, but data.val_fraction=0.1"):
        ensure_data(DataConfig(dir=str(d), source=str(src), tokenizer="char", val_fraction=0.1))
    assert (d / "meta.json").read_bytes() == before
    # a data.dir under a file is named as data.dir (prepare's refusal named --out, which train has not)
    with pytest.raises(ConfigError, match=r"data.dir='.*a\.txt/x': .*a\.txt is a file, not a folder; give another data.dir"):
        ensure_data(DataConfig(dir=str(src / "x"), source=str(src), tokenizer="char"))


def test_a_data_dir_prepared_by_another_run_meanwhile_is_used(tmp_path, monkeypatch):
    """Two runs (a sweep) preparing the same data.dir from data.source at once: the one that finishes
    second used its prepare's refusal of a data.dir that appeared meanwhile (naming --overwrite,
    which train has not). Now it uses that data.dir, checked as any prepared one."""
    from clusterlm.config import DataConfig
    from clusterlm.data import prepare as prepare_mod
    from clusterlm.errors import ConfigError
    from clusterlm.train.loop import ensure_data

    src = tmp_path / "a.txt"
    src.write_text("".join(f"To be, or not to be {i}: that is the question.\n\n" for i in range(40)))
    d = tmp_path / "d"
    real_scan, other = prepare_mod._scan, []

    def scan_while_another_run_prepares(*args, **kwargs):
        result = real_scan(*args, **kwargs)
        if not other:  # the other run's prepare scans too: once
            other.append(None)
            other[0] = prepare_mod.prepare([str(src)], d, tokenizer=other_tokenizer, val_fraction=0.2)
        return result

    monkeypatch.setattr(prepare_mod, "_scan", scan_while_another_run_prepares)
    other_tokenizer = "char"
    assert ensure_data(DataConfig(dir=str(d), source=str(src), tokenizer="char", val_fraction=0.2)) == d
    assert shards.read_meta(d) == other[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "d"]
    # prepared otherwise by the other run: refused as any data.dir prepared otherwise
    other.clear()
    d2, d = d, tmp_path / "d2"
    other_tokenizer = "byte"
    with pytest.raises(ConfigError, match=r"prepared with the byte tokenizer, but data.tokenizer='char'"):
        ensure_data(DataConfig(dir=str(d), source=str(src), tokenizer="char", val_fraction=0.2))
    assert shards.read_meta(d) == other[0]
    assert d2.is_dir()

def test_why_no_val_names_a_missing_or_too_short_val_split(tmp_path):
    """A val split shorter than one window (seq_len + 1 tokens) gives no validation loss: the
    trainer logs why (it said only 'val loss n/a' at the end) and keep_best is refused with the
    token counts, not as 'no validation split'; none at all is named as such."""
    from clusterlm.data.prepare import prepare
    from clusterlm.data.shards import read_meta
    from clusterlm.train.loop import why_no_val

    for i, text in enumerate(["first document, a longer one " * 4, "second", "third one here " * 3]):
        (tmp_path / f"{i}.txt").write_text(text)
    d = tmp_path / "d"
    prepare([str(tmp_path / "*.txt")], d, tokenizer="byte", val_fraction=0.5)
    meta = read_meta(d)
    val = meta["splits"]["val"]["tokens"]
    assert 0 < val
    assert why_no_val(meta, d, val - 1) is None
    assert why_no_val(meta, d, val) == (
        f"the val split of {d} has {val} tokens, fewer than train.seq_len+1 = {val + 1}; use a smaller "
        "train.seq_len or prepare a larger val split (data.val_fraction, prepare --val-fraction)")
    prepare([str(tmp_path / "*.txt")], d, tokenizer="byte", val_fraction=0.0, overwrite=True)
    assert why_no_val(read_meta(d), d, 8) == (f"{d} has no validation split; prepare it with a val fraction > 0 "
                                              "(data.val_fraction, prepare --val-fraction)")


def test_a_bpe_data_dir_prepared_with_another_vocab_size_is_refused(tmp_path):
    """train's data.dir prepared from data.source as BPE of one size, the run asking another
    (--data.vocab_size=4096 on shakespeare_bpe_cpu's 2048 folder): refused naming both sizes; it was
    trained on silently. The size asked is what counts, not the one a small corpus gave; a data dir
    whose meta.json does not record it (made before it was) is used as it is."""
    import json

    from clusterlm.config import DataConfig
    from clusterlm.data.prepare import prepare
    from clusterlm.errors import ConfigError
    from clusterlm.train.loop import ensure_data

    src = tmp_path / "a.txt"
    src.write_text("".join(f"To be, or not to be {i}: that is the question.\n\n" for i in range(40)))
    d = tmp_path / "d"
    meta = prepare([str(src)], d, tokenizer="bpe", vocab_size=4000, val_fraction=0.2)
    assert meta["options"]["vocab_size"] == 4000 and meta["tokenizer"]["vocab_size"] < 4000  # a small corpus
    asked = DataConfig(dir=str(d), source=str(src), tokenizer="bpe", vocab_size=4000, val_fraction=0.2)
    assert ensure_data(asked) == d
    with pytest.raises(ConfigError, match=r"prepared with a BPE vocabulary of 4000, but data.vocab_size=300; give "
                                          r"another data.dir, or delete"):
        ensure_data(dataclasses.replace(asked, vocab_size=300))
    with pytest.raises(ConfigError, match=r"BPE vocabulary of 4000, but data.vocab_size=0 \(the default, 8192\)"):
        ensure_data(dataclasses.replace(asked, vocab_size=0))
    old = json.loads((d / "meta.json").read_text())
    del old["options"]["vocab_size"]
    (d / "meta.json").write_text(json.dumps(old))
    assert ensure_data(dataclasses.replace(asked, vocab_size=300)) == d


def test_a_data_dir_that_is_not_data_is_refused_naming_data_dir(tmp_path):
    """train's data.dir with data.source set, where data.dir is a file or a folder of other things:
    refused naming data.dir (prepare's refusal named its --out and --overwrite, which train does not
    have); an empty folder the user made is prepared into."""
    from clusterlm.config import DataConfig
    from clusterlm.errors import ConfigError
    from clusterlm.train.loop import ensure_data

    src = tmp_path / "a.txt"
    src.write_text("To be, or not to be: that is the question.\n")
    (tmp_path / "file").write_text("mine")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    for d in (tmp_path / "file", tmp_path / "other"):
        with pytest.raises(ConfigError, match=r"data.dir='.*' exists and is not a prepared data directory \(no "
                                              r"meta.json\): not prepared there from data.source=.*; give another"):
            ensure_data(DataConfig(dir=str(d), source=str(src), tokenizer="byte", val_fraction=0.0))
    assert (tmp_path / "file").read_text() == (tmp_path / "other" / "keep.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()
    d = ensure_data(DataConfig(dir=str(tmp_path / "empty"), source=str(src), tokenizer="byte", val_fraction=0.0))
    assert (d / "meta.json").is_file()
