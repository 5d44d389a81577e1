"""Sequence-to-sequence data for an encoder-decoder (arch "encdec"): source/target pairs from the
fine-tuning record forms, prepared once into an examples directory that `Seq2SeqLoader` reads.

    from clusterlm.data.seq2seq import prepare_pairs, Seq2SeqLoader
    prepare_pairs("data/enfr", source="train.en.gz,train.fr.gz", tokenizer=tok, max_source_len=256)
    loader = Seq2SeqLoader("data/enfr", "train", batch_size=32, seq_len=128, seed=0, pad_id=tok.pad_id)
    x, y = next(loader)     # x = Inputs((src (B, S), tgt_in (B, T), src_mask (B, S) bool)); y: labels (B, T)
    logits = model(*x)      # EncoderDecoder.forward(src, tgt, src_mask)

Record forms (data/sft.py `read_records`): parallel text files "SRC,TGT" (the source is the task
harness's prompt "en: {source}\\nfr:", so training, `eval --task` and serving give the encoder the
same text), JSONL {"prompt", "completion"} (or the harness's {"prompt", "references"}) and TSV.
The source goes to the encoder, the target to the decoder:

    encoder input  = ids(source) + [EOS]
    decoder input  = [BOS] + ids(target)          labels = ids(target) + [EOS]

Bad input, refused before anything is written (DataError, exit 2): a source longer than the
encoder's context (the file and line, both lengths), one text file (a target side alone), parallel
files of different line counts (both counts), a record without its prompt or completion. A target
longer than the decoder's context is cut (a warning counts them): the decoder learns its start.

The directory (data/sft.py's layout, task "seq2seq"): per split `SPLIT.tokens.npy` and
`SPLIT.offsets.npy` (the sources, EOS included) and `SPLIT.tgt_tokens.npy`, `SPLIT.tgt_offsets.npy`
(the targets, without BOS/EOS), each checked against its SHA-256 when read. The loader is
ExampleLoader's stream (a seeded permutation per epoch, one integer of state, the global batch
split over the ranks) with one pair per row, right-padded to the longest of the micro-batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clusterlm.data.sft import IGNORE_INDEX, ExampleLoader, SFTRecord, _hash, _split_val, describe_source
from clusterlm.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TASK = "seq2seq"


class Inputs(tuple):
    """Several model inputs (called as model(*inputs)) that move to a device together like a tensor."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Inputs:
        return Inputs(t.to(device, non_blocking=non_blocking) if isinstance(t, torch.Tensor) else t for t in self)


def source_ids(tokenizer: Any, text: str) -> list[int]:
    """The encoder's input for `text`: its ids and EOS (training, evaluation and serving alike)."""
    return tokenizer.encode(text) + [tokenizer.eos_id]


def read_pairs(spec: str, field: str = "data.source") -> list[SFTRecord]:
    """(prompt, completion) records of `spec` for a seq2seq run (module docstring)."""
    from clusterlm.data.sft import read_records

    paths = spec.split(",") if "," in spec and not Path(spec).exists() else [spec]
    tabular = (".jsonl", ".jsonl.gz", ".tsv", ".tsv.gz")
    if len(paths) == 1 and not paths[0].endswith(tabular) and Path(paths[0]).is_file():
        raise DataError(f"{field}={spec!r} is one text file, one side of a parallel corpus: a seq2seq run needs "
                        "the sources and the targets, as two parallel files 'SRC,TGT' (e.g. train.en.gz,train.fr.gz) "
                        "or a .jsonl/.tsv file of prompt/completion pairs")
    records = read_records(spec, "sft", field=field)
    for r in records:
        if r.messages is not None:
            raise DataError(f"{r.where}: a chat record ('messages'); a seq2seq run reads prompt/completion pairs "
                            "(the prompt goes to the encoder, the completion to the decoder)")
    return records


def _encode(tokenizer: Any, records: Sequence[SFTRecord], max_source_len: int
            ) -> dict[str, np.ndarray]:
    srcs = tokenizer.encode_batch([r.prompt or "" for r in records]) if records else []
    tgts = tokenizer.encode_batch([r.completion or "" for r in records]) if records else []
    eos = tokenizer.eos_id
    for r, s in zip(records, srcs):
        if len(s) + 1 > max_source_len:
            files, _, line = r.where.rpartition(":")
            where = f"{files.split(',')[0]}:{line}" if "," in files else r.where  # parallel files: the source side
            raise DataError(f"{where}: the source is {len(s) + 1} tokens (the encoder's input "
                            f"{r.prompt[:40]!r}... with EOS) but the encoder's context is {max_source_len} tokens (model.max_seq_len); shorten "
                            "it or raise model.max_seq_len")
    src_flat = [np.asarray(s + [eos], dtype=np.int32) for s in srcs]
    tgt_flat = [np.asarray(t, dtype=np.int32) for t in tgts]

    def cat(parts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(p) for p in parts]) if parts else []
        return (np.concatenate(parts) if parts else np.zeros(0, np.int32)), offsets

    tokens, offsets = cat(src_flat)
    tgt_tokens, tgt_offsets = cat(tgt_flat)
    return {"tokens": tokens, "offsets": offsets, "tgt_tokens": tgt_tokens, "tgt_offsets": tgt_offsets}


def prepare_pairs(out_dir: str | os.PathLike, *, source: str, tokenizer: Any, max_source_len: int,
                  val_source: str = "", val_fraction: float = 0.1, records: list[SFTRecord] | None = None,
                  val_records: list[SFTRecord] | None = None) -> dict[str, Any]:
    """Write the seq2seq examples directory `out_dir` (module docstring) and return its meta.json."""
    from clusterlm.data.shards import META_VERSION
    from clusterlm.data.sft import LAYOUT
    from clusterlm.fsutil import atomic_write_json, staging_dir

    out_dir = Path(out_dir)
    recs = records if records is not None else read_pairs(source)
    if val_records is None and val_source:
        val_records = read_pairs(val_source, "finetune.val_source")
    if val_records is None:
        held = _split_val(len(recs), val_fraction)
        splits = {"train": [r for r, h in zip(recs, held) if not h], "val": [r for r, h in zip(recs, held) if h]}
    else:
        splits = {"train": list(recs), "val": list(val_records)}
    if not splits["train"]:
        raise DataError(f"data.source={source!r}: no training pairs left after holding out validation")
    encoded = {split: _encode(tokenizer, rs, max_source_len) for split, rs in splits.items()}  # checks first
    with staging_dir(out_dir, overwrite=out_dir.exists()) as tmp:
        tokenizer.save(tmp / "tokenizer.json")
        meta_splits = {}
        for split, arrays in encoded.items():
            files = {}
            for name, arr in arrays.items():
                files[name] = fname = f"{split}.{name}.npy"
                np.save(tmp / fname, arr, allow_pickle=False)
            n = len(splits[split])
            meta_splits[split] = {"examples": n, "tokens": int(arrays["tokens"].size + arrays["tgt_tokens"].size),
                                  "trained_tokens": int(arrays["tgt_tokens"].size) + n, "files": files,
                                  "sha256": {k: _hash(tmp / f) for k, f in files.items()}}
        meta = {"format_version": META_VERSION, "layout": LAYOUT, "task": TASK,
                "tokenizer": {"file": "tokenizer.json", "kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size},
                "chat_template": None, "labels": [], "prompt_loss": False, "splits": meta_splits,
                "max_source_len": max_source_len,
                "made_from": describe_source(TASK, source, val_source, None, tmp / "tokenizer.json")}
        atomic_write_json(tmp / "meta.json", meta)
    log.info("prepared %s: %s", out_dir, ", ".join(f"{s} {m['examples']:,} pairs ({m['tokens']:,} tokens)"
                                                   for s, m in meta_splits.items()))
    return meta


class Seq2SeqLoader(ExampleLoader):
    """ExampleLoader's deterministic, resumable, rank-aware stream, one pair per row; yields
    (Inputs((src, tgt_in, src_mask)), labels). Targets are cut to seq_len decoder positions."""

    def __init__(self, data_dir: str | os.PathLike, split: str = "train", *, batch_size: int, seq_len: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, pad_id: int, bos_id: int, eos_id: int,
                 shuffle: bool = True, pack: bool = False) -> None:
        super().__init__(data_dir, split, batch_size=batch_size, seq_len=seq_len, seed=seed, rank=rank,
                         world_size=world_size, pack=False, pad_id=pad_id, shuffle=shuffle, warn_cut=False)
        if self.data.task != TASK:
            raise ConfigError(f"{data_dir} holds {self.data.task} examples, not seq2seq pairs; give a new data.dir")
        self.bos_id, self.eos_id = bos_id, eos_id
        tgt_len = np.diff(self.data.arrays["tgt_offsets"]) + 1
        cut = int((tgt_len > seq_len).sum())
        if cut:
            log.warning("%s/%s: %d of %d targets are longer than %d decoder positions and are cut (longest %d); "
                        "raise train.seq_len to keep them whole", data_dir, split, cut, self.data.n, seq_len,
                        int(tgt_len.max()))

    def _collate(self, rows: list[list[int]]) -> tuple[Inputs, torch.Tensor]:
        d = self.data
        to, tt = d.arrays["tgt_offsets"], d.arrays["tgt_tokens"]
        srcs = [d.tokens[d.offsets[r[0]]:d.offsets[r[0] + 1]] for r in rows]
        tgts = [tt[to[r[0]]:to[r[0] + 1]][:self.T] for r in rows]
        S = max(len(s) for s in srcs)
        T = min(max(len(t) for t in tgts) + 1, self.T)
        src = np.full((len(rows), S), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(rows), S), dtype=bool)
        tgt_in = np.full((len(rows), T), self.pad_id, dtype=np.int64)
        labels = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)
        for k, (s, t) in enumerate(zip(srcs, tgts)):
            src[k, :len(s)] = s
            mask[k, :len(s)] = True
            seq_in = np.concatenate([[self.bos_id], t])[:T]
            seq_out = np.concatenate([t, [self.eos_id]])[:T]
            tgt_in[k, :len(seq_in)] = seq_in
            labels[k, :len(seq_out)] = seq_out
        return (Inputs((torch.from_numpy(src), torch.from_numpy(tgt_in), torch.from_numpy(mask))),
                torch.from_numpy(labels))


def iter_seq2seq_batches(data_dir: str | os.PathLike, split: str, batch_size: int, seq_len: int, *, pad_id: int,
                         bos_id: int, eos_id: int, max_batches: int | None = None
                         ) -> Iterator[tuple[Inputs, torch.Tensor]]:
    """One pass over `split` in file order (the last batch may be short), at most `max_batches`."""
    loader = Seq2SeqLoader(data_dir, split, batch_size=batch_size, seq_len=seq_len, pad_id=pad_id, bos_id=bos_id,
                           eos_id=eos_id, shuffle=False)
    n, k = loader.data.n, 0
    while loader.position < n and (max_batches is None or k < max_batches):
        stop = min(loader.position + batch_size, n)
        rows = [[i] for i in range(loader.position, stop)]
        loader.position = stop
        k += 1
        yield loader._collate(rows)
