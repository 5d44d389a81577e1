"""Masked-LM pre-training data (BERT's recipe) from ordinary prepared token shards.

    from clusterlm.data.mlm import MLMLoader, mask_view
    data_dir = mask_view("data/sst2_lm", "runs/sst2_mlm")      # the shards + a tokenizer with <|mask|>
    loader = MLMLoader(data_dir, "train", batch_size=32, seq_len=96, seed=0, mask_id=mask_id)
    x, y = next(loader)          # x: (B, T) ids with 15% of positions corrupted; y: (B, T) original ids
                                 # there, IGNORE_INDEX elsewhere (the loss is on the chosen positions only)

The objective (Devlin et al. 2019, sec. 3.1): each position is chosen with probability
`mask_prob` (0.15; a row with no chosen position gets one, so every row has a target); a chosen
position becomes `<|mask|>` with probability 0.8, a uniformly random token of the base vocabulary
with probability 0.1, and stays unchanged with probability 0.1. The model predicts the original
token at every chosen position.

Determinism and resume: the rows are TokenLoader's windows (data/loader.py; x is a window's first T
tokens), so the whole loader state is TokenLoader's global stream position. The corruption of the
sample at global stream position q is drawn from `np.random.default_rng([seed, MLM_STREAM, q])`: it
depends on neither the rank count nor the batch size, and a resumed run draws exactly the masks of
an uninterrupted one. Validation rows (`iter_mlm_eval_batches`) are masked from
`default_rng([seed, MLM_STREAM, VAL, i])` for sample i of the split: the same masks at every
evaluation, so validation losses are comparable across steps.

T5's span corruption for an encoder-decoder (finetune.task = "span", `SpanLoader`) is at the end
of this file: the same windows, stream and resume rule, with 32 sentinel tokens `<|sentinel_i|>`
appended instead of <|mask|>.

The mask token: `<|mask|>` is appended to the data's tokenizer, whatever its kind (byte, char, BPE),
as the chat tokens are (tokenizer `with_special_tokens`: existing ids do not move). Shards prepared
without it stay valid (their ids are all below the new token's). `mask_view` makes a small data
directory beside the run, `OUT_DIR/mlm_data`: meta.json and the shards (symbolic links to the
originals) of the prepared directory, with tokenizer.json = the original tokenizer plus `<|mask|>`.
The run's checkpoints carry that tokenizer, so a classifier fine-tuned from the encoder
(`finetune.init_from`) reads text with the same ids. A data directory whose tokenizer has `<|mask|>`
already is used as it is.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clusterlm.data.loader import SplitWindows, TokenLoader
from clusterlm.errors import DataError

log = logging.getLogger(__name__)

MASK = "<|mask|>"
IGNORE_INDEX = -100  # = clusterlm.eval.metrics.IGNORE_INDEX
MLM_STREAM = 0x4D4C4D  # "MLM": keeps these draws apart from any other use of (seed, position)
VAL = 1 << 40  # validation draws: default_rng([seed, MLM_STREAM, VAL, i])
VIEW = "mlm_data"


def corrupt(row: np.ndarray, rng: np.random.Generator, *, mask_id: int, vocab: int,
            mask_prob: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    """BERT's 80/10/10 corruption of one row of ids (T,) -> (input ids, labels); `vocab` = the base
    vocabulary that random replacements are drawn from (ids [0, vocab))."""
    T = row.shape[0]
    chosen = rng.random(T) < mask_prob
    if not chosen.any():
        chosen[rng.integers(T)] = True
    action = rng.random(T)  # < 0.8: mask; < 0.9: random token; else unchanged
    random_ids = rng.integers(0, vocab, T)
    x = row.copy()
    x[chosen & (action < 0.8)] = mask_id
    swap = chosen & (action >= 0.8) & (action < 0.9)
    x[swap] = random_ids[swap]
    y = np.where(chosen, row, IGNORE_INDEX)
    return x, y


def corrupt_rows(rows: np.ndarray, keys: list[list[int]], *, mask_id: int, vocab: int,
                 mask_prob: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (B, T) corrupted, row b from default_rng(keys[b]) -> (x, y) int64 tensors (B, T)."""
    xs, ys = [], []
    for row, key in zip(rows, keys):
        x, y = corrupt(row, np.random.default_rng(key), mask_id=mask_id, vocab=vocab, mask_prob=mask_prob)
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def predicting(x: torch.Tensor, y: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """(x, y) -> (Inputs((x, None, y != IGNORE_INDEX)), y): the model inputs of a masked-LM batch,
    telling the encoder to run its masked-LM head and output layer only at the corrupted positions
    (models/encdec.Encoder.forward `predict`; eval.metrics.lm_loss then takes the labelled targets).
    The output layer over every position was 70% of a step's time for 15% of the positions scored."""
    from clusterlm.data.seq2seq import Inputs

    return Inputs((x, None, y != IGNORE_INDEX)), y


class MLMLoader:
    """TokenLoader's stream (same state, same rank split), each window's first T tokens corrupted
    for the masked-LM objective (module docstring)."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", *, batch_size: int, seq_len: int,
                 mask_id: int, vocab: int | None = None, mask_prob: float = 0.15, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob={mask_prob} must be in (0, 1)")
        self.tokens = TokenLoader(data_dir, split, batch_size=batch_size, seq_len=seq_len, seed=seed, rank=rank,
                                  world_size=world_size)
        self.mask_id, self.mask_prob, self.seed = mask_id, mask_prob, seed
        self.vocab = mask_id if vocab is None else vocab

    @property
    def num_samples(self) -> int:
        return self.tokens.num_samples

    @property
    def position(self) -> int:
        return self.tokens.position

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.tokens
        start = t.position + t.rank * t.batch_size  # this rank's rows: global stream positions start..start+B-1
        x, _ = next(t)
        keys = [[self.seed, MLM_STREAM, q] for q in range(start, start + x.shape[0])]
        return predicting(*corrupt_rows(x.numpy(), keys, mask_id=self.mask_id, vocab=self.vocab,
                                        mask_prob=self.mask_prob))

    def state_dict(self) -> dict[str, Any]:
        return {**self.tokens.state_dict(), "objective": "mlm", "mask_prob": self.mask_prob}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from clusterlm.errors import CheckpointError

        if state.get("objective") != "mlm" or state.get("mask_prob") != self.mask_prob:
            raise CheckpointError(f"the checkpoint's loader state is for objective {state.get('objective', 'lm')!r} "
                                  f"(mask_prob {state.get('mask_prob')}), not masked LM with mask_prob "
                                  f"{self.mask_prob}; resume with the run's own objective")
        self.tokens.load_state_dict({k: v for k, v in state.items() if k not in ("objective", "mask_prob")})


def iter_mlm_eval_batches(data_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int, *, mask_id: int,
                          vocab: int | None = None, mask_prob: float = 0.15, seed: int = 0,
                          max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first samples of `split` in order, masked the same way at every call (module docstring)."""
    windows = SplitWindows(data_dir, split, seq_len)
    n = windows.num_samples
    total = -(-n // batch_size)
    if max_batches is not None:
        total = min(total, max_batches)
    for g in range(total):
        idx = np.arange(g * batch_size, min((g + 1) * batch_size, n))
        rows = windows.gather(idx)[:, :-1]
        yield predicting(*corrupt_rows(rows, [[seed, MLM_STREAM, VAL, int(i)] for i in idx], mask_id=mask_id,
                                       vocab=mask_id if vocab is None else vocab, mask_prob=mask_prob))


# ---- the mask token ------------------------------------------------------------------------------
def with_mask_token(tokenizer: Any) -> Any:
    """`tokenizer` with <|mask|> appended (itself when it has one)."""
    return tokenizer if tokenizer.token_id(MASK) is not None else tokenizer.with_special_tokens([MASK])


def mask_view(data_dir: str | os.PathLike, out_dir: str | os.PathLike, tokens: tuple[str, ...] = (MASK,),
              name: str = VIEW) -> Path:
    """A data directory reading `data_dir`'s shards with a tokenizer that has `tokens` (<|mask|>; the
    span sentinels with name=SPAN_VIEW): `data_dir` itself when its tokenizer has them, else
    OUT_DIR/NAME (made once; the same bytes each time, so a resumed run finds the tokenizer of its
    checkpoints)."""
    from clusterlm.data.shards import read_meta
    from clusterlm.fsutil import atomic_write_json, staging_dir
    from clusterlm.tokenizer import load_tokenizer

    data_dir = Path(data_dir)
    meta = read_meta(data_dir)
    if meta.get("layout") == "examples":
        raise DataError(f"data.dir={str(data_dir)!r} holds fine-tuning examples ({meta.get('task')}); masked-LM "
                        "pre-training reads token shards (`clusterlm prepare`)")
    tok = load_tokenizer(data_dir / meta["tokenizer"]["file"])
    if all(tok.token_id(t) is not None for t in tokens):
        return data_dir
    view = Path(out_dir) / name
    new_meta = json.loads(json.dumps(meta))
    masked = tok.with_special_tokens(list(tokens))
    new_meta["tokenizer"] = {**meta["tokenizer"], "file": "tokenizer.json", "vocab_size": masked.vocab_size}
    new_meta["view_of"] = str(data_dir.resolve())
    shards = [e["file"] for s in meta["splits"].values() for e in s.get("shards", [])]
    if (view / "meta.json").is_file():
        try:
            same = json.loads((view / "meta.json").read_text()) == new_meta
        except (OSError, ValueError):
            same = False
        if same and all((view / f).exists() for f in shards):
            return view
    view.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(view, overwrite=view.exists()) as tmp:
        masked.save(tmp / "tokenizer.json")
        for f in shards:
            os.symlink((data_dir / f).resolve(), tmp / f)
        atomic_write_json(tmp / "meta.json", new_meta)
    log.info("%s reads the shards of %s with %s (ids %d..) appended to its %s tokenizer", view, data_dir,
             ", ".join(tokens[:3]) + (", ..." if len(tokens) > 3 else ""), masked.token_id(tokens[0]), tok.kind)
    return view


# ---- T5 span corruption (encoder-decoder pre-training) -------------------------------------------
SENTINELS = tuple(f"<|sentinel_{i}|>" for i in range(32))
SPAN_STREAM = 0x5350414E  # "SPAN"
SPAN_VIEW = "span_data"


def _segments(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """n items cut into k non-empty consecutive parts at random (k - 1 distinct cut points)."""
    cuts = np.sort(rng.choice(np.arange(1, n), size=k - 1, replace=False)) if k > 1 else np.zeros(0, dtype=np.int64)
    return np.diff(np.concatenate([[0], cuts, [n]]))


def span_corrupt(row: np.ndarray, rng: np.random.Generator, *, sentinel_ids: list[int], eos_id: int,
                 density: float = 0.15, mean_span: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """T5's span corruption of one row (T,) (Raffel et al. 2020, sec. 3.1.4; its random_spans_noise_mask):
    round(T * density) noise tokens in max(1, round(noise / mean_span)) spans (at most one per
    sentinel), placed by a random segmentation of the noise and of the rest, each starting after a
    stretch of kept tokens. Returns (source, target): the source is the row with each span replaced
    by its sentinel, then EOS; the target is each sentinel followed by its span (EOS is the caller's)."""
    T = row.shape[0]
    noise = min(max(1, int(round(T * density))), T - 1)
    spans = max(1, min(int(round(noise / mean_span)), len(sentinel_ids), T - noise))
    noise_len = _segments(noise, spans, rng)
    keep_len = _segments(T - noise, spans, rng)
    src, tgt, at = [], [], 0
    for i in range(spans):
        src.extend(row[at:at + keep_len[i]].tolist())
        at += keep_len[i]
        src.append(sentinel_ids[i])
        tgt.append(sentinel_ids[i])
        tgt.extend(row[at:at + noise_len[i]].tolist())
        at += noise_len[i]
    src.append(eos_id)
    return np.asarray(src, dtype=np.int64), np.asarray(tgt, dtype=np.int64)


def span_batch(rows: np.ndarray, keys: list[list[int]], *, sentinel_ids: list[int], bos_id: int, eos_id: int,
               pad_id: int, density: float, mean_span: float) -> tuple[Any, torch.Tensor]:
    """Rows (B, T) -> (Inputs((src, tgt_in, src_mask)), labels): data/seq2seq.py's batch shape,
    decoder input [BOS] + target, labels target + [EOS]."""
    from clusterlm.data.seq2seq import Inputs

    pairs = [span_corrupt(r, np.random.default_rng(k), sentinel_ids=sentinel_ids, eos_id=eos_id, density=density,
                          mean_span=mean_span) for r, k in zip(rows, keys)]
    S, L = max(len(s) for s, _ in pairs), max(len(t) for _, t in pairs) + 1
    B = len(pairs)
    src = np.full((B, S), pad_id, dtype=np.int64)
    mask = np.zeros((B, S), dtype=bool)
    tin = np.full((B, L), pad_id, dtype=np.int64)
    lab = np.full((B, L), IGNORE_INDEX, dtype=np.int64)
    for i, (s, t) in enumerate(pairs):
        src[i, :len(s)], mask[i, :len(s)] = s, True
        tin[i, :len(t) + 1] = np.concatenate([[bos_id], t])
        lab[i, :len(t) + 1] = np.concatenate([t, [eos_id]])
    return (Inputs((torch.from_numpy(src), torch.from_numpy(tin), torch.from_numpy(mask))), torch.from_numpy(lab))


class SpanLoader:
    """TokenLoader's stream (same state and rank split) as T5 span-corruption pairs for an
    encoder-decoder; the corruption of stream position q from default_rng([seed, SPAN_STREAM, q])."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", *, batch_size: int, seq_len: int,
                 sentinel_ids: list[int], bos_id: int, eos_id: int, pad_id: int, density: float = 0.15,
                 mean_span: float = 3.0, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if not 0.0 < density < 1.0 or mean_span < 1.0:
            raise ValueError(f"density={density} must be in (0, 1) and mean_span={mean_span} >= 1")
        self.tokens = TokenLoader(data_dir, split, batch_size=batch_size, seq_len=seq_len, seed=seed, rank=rank,
                                  world_size=world_size)
        self.kw = dict(sentinel_ids=sentinel_ids, bos_id=bos_id, eos_id=eos_id, pad_id=max(pad_id, 0),
                       density=density, mean_span=mean_span)
        self.seed = seed

    @property
    def num_samples(self) -> int:
        return self.tokens.num_samples

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[Any, torch.Tensor]:
        t = self.tokens
        start = t.position + t.rank * t.batch_size
        x, _ = next(t)
        return span_batch(x.numpy(), [[self.seed, SPAN_STREAM, q] for q in range(start, start + x.shape[0])], **self.kw)

    def state_dict(self) -> dict[str, Any]:
        return {**self.tokens.state_dict(), "objective": "span", "density": self.kw["density"],
                "mean_span": self.kw["mean_span"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from clusterlm.errors import CheckpointError

        mine = (self.kw["density"], self.kw["mean_span"])
        if state.get("objective") != "span" or (state.get("density"), state.get("mean_span")) != mine:
            raise CheckpointError(f"the checkpoint's loader state is for objective {state.get('objective', 'lm')!r}, "
                                  f"not span corruption with density/mean span {mine}; resume with the run's own "
                                  "objective")
        self.tokens.load_state_dict({k: v for k, v in state.items() if k not in ("objective", "density", "mean_span")})


def iter_span_eval_batches(data_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int, *,
                           seed: int = 0, max_batches: int | None = None,
                           **kw: Any) -> Iterator[tuple[Any, torch.Tensor]]:
    """The first samples of `split` in order as span-corruption pairs, the same at every call."""
    windows = SplitWindows(data_dir, split, seq_len)
    n = windows.num_samples
    total = -(-n // batch_size)
    if max_batches is not None:
        total = min(total, max_batches)
    for g in range(total):
        idx = np.arange(g * batch_size, min((g + 1) * batch_size, n))
        yield span_batch(windows.gather(idx)[:, :-1], [[seed, SPAN_STREAM, VAL, int(i)] for i in idx], **kw)
