"""The trainer's loaders for the objectives other than next-token prediction: masked LM
(finetune.task = "mlm", data/mlm.py), T5's span corruption (finetune.task = "span", data/mlm.py) and
sequence-to-sequence (finetune.task = "seq2seq",
data/seq2seq.py). train/loop.py asks here for the training loader and the validation batches; the
loss of both is fine-tuning's TokenSumLoss (the mean over every labelled token of a step, whatever
the layout), since their labels carry IGNORE_INDEX where nothing is predicted.

    loader = train_loader(cfg, data_dir, tokenizer_file, rank=0, world=1)
    for x, y in val_batches(cfg, data_dir, tokenizer_file): ...
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

OBJECTIVES = ("mlm", "seq2seq", "span")


def objective_of(cfg: Any) -> str:
    """The objective a model's loss is measured with: the run's own (finetune.task mlm, span or
    seq2seq), else its architecture's (an encoder: masked LM; an encoder-decoder: source/target
    pairs; a checkpoint converted from Hugging Face says task 'lm', which neither trains with), else
    next-token "lm"."""
    task = cfg.finetune.task
    if task in OBJECTIVES:
        return task
    return {"encoder": "mlm", "encdec": "seq2seq"}.get(cfg.model.arch, "lm")


def check_objective_data(data_dir: Path, objective: str) -> dict[str, Any]:
    """`data_dir` must be a prepared directory of the kind `objective` reads: source/target pairs for
    seq2seq, token shards for the others; returns its meta.json. A DataError naming both otherwise."""
    from clusterlm.data.shards import read_meta
    from clusterlm.errors import DataError

    meta = read_meta(data_dir)
    held = f"examples of task {meta.get('task')!r}" if meta.get("layout") == "examples" else "token shards"
    if objective == "seq2seq" and meta.get("task") != "seq2seq":
        raise DataError(f"an encoder-decoder's seq2seq loss reads source/target pairs, but {data_dir} holds {held}; "
                        "give --data a pairs directory prepared for a finetune.task='seq2seq' run (e.g. that run's "
                        "data.dir)")
    if objective != "seq2seq" and meta.get("layout") == "examples":
        raise DataError(f"the {objective} loss reads token shards, but {data_dir} holds {held}; give --data a "
                        "directory made by `clusterlm prepare` with the checkpoint's tokenizer")
    return meta


def _ids(tokenizer_file: Path) -> dict[str, int]:
    from clusterlm.data.mlm import MASK
    from clusterlm.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_file)
    mask = tok.token_id(MASK)
    return {"pad": tok.pad_id, "bos": tok.bos_id, "eos": tok.eos_id, "mask": -1 if mask is None else mask,
            "base_vocab": tok.vocab_size - len(tok.added_tokens)}


def train_loader(cfg: Any, data_dir: Path, tokenizer_file: Path, *, rank: int, world: int) -> Any:
    """The resumable training loader of finetune.task (mlm or seq2seq) for data-parallel rank `rank`."""
    tc, ft, ids = cfg.train, cfg.finetune, _ids(tokenizer_file)
    if ft.task == "mlm":
        from clusterlm.data.mlm import MLMLoader

        return MLMLoader(data_dir, "train", batch_size=tc.micro_batch_size, seq_len=tc.seq_len, mask_id=ids["mask"],
                         vocab=ids["base_vocab"], mask_prob=ft.mask_prob, seed=tc.seed, rank=rank, world_size=world)
    if ft.task == "span":
        from clusterlm.data.mlm import SpanLoader

        return SpanLoader(data_dir, "train", batch_size=tc.micro_batch_size, seq_len=tc.seq_len, seed=tc.seed,
                          rank=rank, world_size=world, **_span_kw(cfg, tokenizer_file))
    from clusterlm.data.seq2seq import Seq2SeqLoader

    return Seq2SeqLoader(data_dir, "train", batch_size=tc.micro_batch_size, seq_len=tc.seq_len, seed=tc.seed,
                         rank=rank, world_size=world, pad_id=ids["pad"], bos_id=ids["bos"], eos_id=ids["eos"])


def val_batches(cfg: Any, data_dir: Path, tokenizer_file: Path) -> Iterator[Any]:
    """The validation batches of finetune.task (the same ones at every evaluation)."""
    tc, ft, ids = cfg.train, cfg.finetune, _ids(tokenizer_file)
    if ft.task == "mlm":
        from clusterlm.data.mlm import iter_mlm_eval_batches

        return iter_mlm_eval_batches(data_dir, "val", tc.micro_batch_size, tc.seq_len, mask_id=ids["mask"],
                                     vocab=ids["base_vocab"], mask_prob=ft.mask_prob, seed=tc.seed,
                                     max_batches=tc.eval_batches)
    if ft.task == "span":
        from clusterlm.data.mlm import iter_span_eval_batches

        return iter_span_eval_batches(data_dir, "val", tc.micro_batch_size, tc.seq_len, seed=tc.seed,
                                      max_batches=tc.eval_batches, **_span_kw(cfg, tokenizer_file))
    from clusterlm.data.seq2seq import iter_seq2seq_batches

    return iter_seq2seq_batches(data_dir, "val", tc.micro_batch_size, tc.seq_len, pad_id=ids["pad"], bos_id=ids["bos"],
                                eos_id=ids["eos"], max_batches=tc.eval_batches)


def _span_kw(cfg: Any, tokenizer_file: Path) -> dict[str, Any]:
    from clusterlm.data.mlm import SENTINELS
    from clusterlm.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_file)
    return {"sentinel_ids": [tok.token_id(t) for t in SENTINELS], "bos_id": tok.bos_id, "eos_id": tok.eos_id,
            "pad_id": tok.pad_id, "density": cfg.finetune.mask_prob, "mean_span": cfg.finetune.mean_span}
