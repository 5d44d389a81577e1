"""TokenLoader: deterministic, rank-aware, resumable (B, T) batches from memory-mapped token shards.

    from clusterlm.data.loader import TokenLoader, iter_eval_batches
    loader = TokenLoader("data/shakespeare", "train", batch_size=8, seq_len=256, seed=0,
                         rank=rank, world_size=world_size)
    x, y = next(loader)                  # int64 tensors (B, T); y is x shifted by one token
    state = loader.state_dict()          # JSON-serializable; a fresh loader continues exactly here
    for x, y in iter_eval_batches("data/shakespeare", "val", 8, 256, max_batches=20): ...

Samples: each shard is cut into non-overlapping windows of T+1 tokens with stride T (window j is
tokens[j*T : j*T+T+1]); windows never cross a shard boundary. Sample i counts windows over the
split's shards in meta.json order. The sample stream is the concatenation over epochs e = 0, 1, ...
of `np.random.default_rng([seed, e]).permutation(num_samples)` (identity when shuffle=False).
The whole state is one integer, the global stream position p (samples consumed by all ranks
together): a call to next() on rank r returns stream[p + r*B : p + (r+1)*B] and advances p by W*B.
So resuming on a different number of ranks or batch size continues from the same sample. The
format and the guarantees are written down in docs/loader.md.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clusterlm.data.shards import open_shard, read_header, read_meta, verify_shards
from clusterlm.errors import CheckpointError, DataError

log = logging.getLogger(__name__)

STATE_VERSION = 1
_PERM_CACHE = 2  # epochs whose permutation is kept: a batch may straddle one epoch boundary


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


class SplitWindows:
    """The windows (samples) of one split: shard layout, fingerprint, and gathering by sample index.

    Reads meta.json, checks every shard header against it and every shard's content against its
    sha256 and the vocabulary (`shards.verify_shards`, remembered across runs), and opens shards
    lazily as memmaps.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int) -> None:
        self.data_dir = Path(data_dir)
        self.split = split
        self.seq_len = T = _check_int("seq_len", seq_len, 1)
        meta = read_meta(self.data_dir)
        meta_path = self.data_dir / "meta.json"
        splits = meta.get("splits")
        if not isinstance(splits, dict):
            raise DataError(f"{meta_path}: 'splits' is missing or not an object")
        if split not in splits:
            raise DataError(f"{meta_path} has no split {split!r}; it has: {', '.join(sorted(splits)) or '(none)'}")
        shards = splits[split].get("shards") if isinstance(splits[split], dict) else None
        if not isinstance(shards, list):
            raise DataError(f"{meta_path}: splits.{split}.shards is missing or not a list")
        meta_dtype = meta.get("dtype")
        vocab_size = (meta.get("tokenizer") or {}).get("vocab_size") if isinstance(meta.get("tokenizer"), dict) else None
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1):
            raise DataError(f"{meta_path}: tokenizer.vocab_size={vocab_size!r} must be an integer >= 1")
        to_verify: list[tuple[str, str, str]] = []

        self.paths: list[Path] = []
        counts: list[int] = []
        digest = hashlib.sha256(f"split={split}\n".encode())
        for k, entry in enumerate(shards):
            where = f"{meta_path}: splits.{split}.shards[{k}]"
            if not isinstance(entry, dict) or not {"file", "tokens", "sha256"} <= entry.keys():
                raise DataError(f"{where} must be an object with 'file', 'tokens' and 'sha256', got {entry!r}")
            name = entry["file"]
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise DataError(f"{where}: file={name!r} must be a plain file name inside {self.data_dir}")
            path = self.data_dir / name
            header = read_header(path)  # raises on a missing, truncated or foreign file
            if header.count != entry["tokens"]:
                raise DataError(f"shard {path} holds {header.count} tokens but {where} says tokens={entry['tokens']}: "
                                "the data directory is inconsistent; prepare it again")
            if meta_dtype is not None and header.dtype.name != meta_dtype:
                raise DataError(f"shard {path} stores {header.dtype.name} but {meta_path} says dtype={meta_dtype!r}")
            sha = entry["sha256"]
            if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
                raise DataError(f"{where}: sha256={sha!r} must be 64 lowercase hex digits")
            to_verify.append((name, sha, where))
            self.paths.append(path)
            counts.append(header.count)
            digest.update(f"{entry['sha256']} {header.count}\n".encode())
        # content == meta.json's hashes, ids < vocab_size; read once, then remembered by stat
        verify_shards(self.data_dir, to_verify, vocab_size)
        # Identifies the data a loader state belongs to (the hashes come from meta.json, which
        # verify_shards has just checked the shards against).
        self.fingerprint = digest.hexdigest()[:32]

        self.counts = np.array(counts, dtype=np.int64)
        self.windows = np.maximum((self.counts - 1) // T, 0)  # windows per shard, stride T, length T+1
        self.first = np.concatenate([[0], np.cumsum(self.windows)])  # sample index of each shard's window 0
        self.num_samples = int(self.first[-1])
        self.num_tokens = int(self.counts.sum())
        if self.num_samples == 0:
            if self.num_tokens < T + 1:
                raise DataError(f"split {split!r} of {self.data_dir} has {self.num_tokens} tokens, fewer than "
                                f"seq_len+1 = {T + 1} needed for one sample; use a smaller seq_len or more text")
            raise DataError(f"split {split!r} of {self.data_dir} has {self.num_tokens} tokens but no shard holds "
                            f"seq_len+1 = {T + 1} tokens (largest: {int(self.counts.max())}); windows never cross "
                            "shards, so use a smaller seq_len or larger shards")
        self._maps: dict[int, np.ndarray] = {}
        unused = int((self.counts - 1 - self.windows * T).clip(min=0).sum())
        log.debug("%s/%s: %d tokens in %d shards -> %d samples of %d+1 tokens (%d tail tokens unused)",
                  self.data_dir, split, self.num_tokens, len(self.paths), self.num_samples, T, unused)

    def _shard(self, s: int) -> np.ndarray:
        if s not in self._maps:
            self._maps[s] = open_shard(self.paths[s])
        return self._maps[s]

    def gather(self, samples: np.ndarray) -> np.ndarray:
        """Windows of the given sample indices: int64 array (len(samples), T+1)."""
        T = self.seq_len
        samples = np.asarray(samples, dtype=np.int64)
        out = np.empty((samples.size, T + 1), dtype=np.int64)
        shard = np.searchsorted(self.first, samples, side="right") - 1  # (n,)
        span = np.arange(T + 1)
        for s in np.unique(shard):
            rows = np.flatnonzero(shard == s)
            starts = (samples[rows] - self.first[s]) * T  # token offset of each window in shard s
            out[rows] = self._shard(int(s))[starts[:, None] + span]  # (n_s, T+1), one fancy-index read
        return out


def _to_xy(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))  # (B, T)
    y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))  # (B, T)
    return x, y


class TokenLoader:
    """Infinite iterator of (x, y) int64 tensors of shape (batch_size, seq_len) for one rank.

    Every rank builds its own loader with the same data, seed, batch size and seq_len; each
    next() consumes one global batch of world_size*batch_size samples, of which this rank gets
    the slice [rank*B, (rank+1)*B). Tensors stay on the CPU; the trainer moves them.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", *, batch_size: int, seq_len: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True) -> None:
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if self.rank >= self.world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.seed = _check_int("seed", seed, 0)
        if not isinstance(shuffle, bool):
            raise ValueError(f"shuffle={shuffle!r} must be true or false")
        self.shuffle = shuffle
        self.split = split
        self.windows = SplitWindows(data_dir, split, seq_len)
        self.seq_len = self.windows.seq_len
        self._position = 0
        self._perms: dict[int, np.ndarray] = {}  # epoch -> permutation (at most _PERM_CACHE entries)

    # -- derived numbers --------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Windows of seq_len+1 tokens in the split (one epoch)."""
        return self.windows.num_samples

    @property
    def position(self) -> int:
        """Samples consumed so far by all ranks together (the global stream position)."""
        return self._position

    @property
    def epoch(self) -> int:
        """Epoch of the next sample to be read (0-based)."""
        return self._position // self.num_samples

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.batch_size

    @property
    def batches_per_epoch(self) -> float:
        """num_samples / (world_size*batch_size), not rounded: batches straddle epochs, none is dropped."""
        return self.num_samples / self.global_batch_size

    @property
    def tokens_per_batch(self) -> int:
        """Input tokens in one next() on this rank: batch_size * seq_len."""
        return self.batch_size * self.seq_len

    @property
    def global_tokens_per_batch(self) -> int:
        """Input tokens in one next() over all ranks: world_size * batch_size * seq_len."""
        return self.global_batch_size * self.seq_len

    # -- the sample stream ------------------------------------------------------------------------
    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= _PERM_CACHE:
                del self._perms[min(self._perms)]
            n = self.num_samples
            self._perms[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                                  else np.arange(n, dtype=np.int64))
        return self._perms[epoch]

    def stream(self, start: int, stop: int) -> np.ndarray:
        """Sample indices at global stream positions [start, stop) (may span several epochs)."""
        q = np.arange(start, stop, dtype=np.int64)
        epochs, offsets = np.divmod(q, self.num_samples)
        out = np.empty_like(q)
        for e in np.unique(epochs):
            mask = epochs == e
            out[mask] = self._permutation(int(e))[offsets[mask]]
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        B = self.batch_size
        start = self._position + self.rank * B
        samples = self.stream(start, start + B)  # (B,)
        self._position += self.global_batch_size
        return _to_xy(self.windows.gather(samples))

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable state; identical on every rank (it holds the global position only)."""
        return {"version": STATE_VERSION, "position": self._position, "seed": self.seed,
                "seq_len": self.seq_len, "split": self.split, "shuffle": self.shuffle,
                "num_samples": self.num_samples, "fingerprint": self.windows.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved global position; world_size and batch_size may differ from the saver's."""
        if not isinstance(state, dict):
            raise CheckpointError(f"loader state must be a dict, got {type(state).__name__}")
        mine = self.state_dict()
        missing = sorted(set(mine) - set(state))
        if missing:
            raise CheckpointError(f"loader state lacks field(s) {', '.join(missing)}; it has {sorted(state)}")
        if state["version"] != STATE_VERSION:
            raise CheckpointError(f"loader state version: saved {state['version']!r}, "
                                  f"this clusterlm reads {STATE_VERSION}")
        why = {"seq_len": "samples would be cut differently", "seed": "the sample order would differ",
               "split": "it indexes another split", "shuffle": "the sample order would differ",
               "fingerprint": "the data directory's shards differ (meta.json hashes)",
               "num_samples": "the split has a different number of samples"}
        option = {"seq_len": "train.seq_len", "seed": "train.seed"}  # the run options these fields come from
        for field, reason in why.items():
            if state[field] != mine[field]:
                fix = (f"; resume with --{option[field]}={state[field]!r} or start fresh with another --train.out_dir"
                       if field in option else "")
                raise CheckpointError(f"loader state {field}: saved {state[field]!r}, current {mine[field]!r}; "
                                      f"cannot resume because {reason}{fix}")
        position = state["position"]
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise CheckpointError(f"loader state position={position!r} must be an integer >= 0")
        self._position = position
        log.debug("loader resumes at sample %d (epoch %d)", position, self.epoch)


def iter_eval_batches(data_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int,
                      max_batches: int | None = None, rank: int = 0,
                      world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential (unshuffled) batches over the first epoch of `split`: each sample is seen at most once.

    Global batch g holds samples [g*W*B, (g+1)*W*B) and rank r gets its slice [r*B, (r+1)*B),
    clipped to num_samples. Every rank yields the same number of batches,
    min(ceil(num_samples / (W*B)), max_batches), so collectives stay in step; near the end a
    rank's batch may be smaller than B, or even empty (shape (0, T)): weight losses by x.numel().
    """
    B = _check_int("batch_size", batch_size, 1)
    W = _check_int("world_size", world_size, 1)
    r = _check_int("rank", rank, 0)
    if r >= W:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if max_batches is not None:
        _check_int("max_batches", max_batches, 0)
    windows = SplitWindows(data_dir, split, seq_len)  # validated now, not at the first next()
    total = -(-windows.num_samples // (W * B))
    if max_batches is not None:
        total = min(total, max_batches)
    return _eval_batches(windows, B, W, r, total)


def _eval_batches(windows: SplitWindows, B: int, W: int, r: int,
                  total: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n = windows.num_samples
    for g in range(total):
        start = min(g * W * B + r * B, n)
        stop = min(start + B, n)
        yield _to_xy(windows.gather(np.arange(start, stop)))
