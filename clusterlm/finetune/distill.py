"""Knowledge distillation for classifiers (finetune.distill_from): the teachers' class
probabilities on every training example, averaged, computed once before training and kept in
the run folder. The loader (data/sft.py ExampleLoader) then gives each training text the target
(1 - distill_weight) * one-hot(label) + distill_weight * teachers, and ClassifyLoss's
cross-entropy against that distribution is Hinton et al.'s loss at temperature 1: the label's term
plus the teachers' (their KL divergence to the student, up to a constant).

    probs = teacher_probs(["runs/a", "runs/b"], data_dir, out_dir, seq_len=96)   # (N, C) float32

Each teacher reads the same token ids the student does (the training split's examples, cut to
train.seq_len from the left as the loader cuts them), so it must share the data's tokenizer and
labels: train the teachers on the same data.dir, or prepare the student's data with a teacher's
tokenizer (data.tokenizer = TEACHER/tokenizer.json). Augmented copies (finetune.augment,
data/augment.py) are training examples like the others here; the loader gives them the teachers'
probabilities alone. docs/finetune.md has the SST-2 figures.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import torch

from clusterlm.errors import ConfigError

log = logging.getLogger(__name__)


def _teacher_key(path: Path) -> str:
    """What identifies a teacher's weights: its manifest (the SHA-256 of every file), else its weights."""
    from clusterlm.checkpoint.store import MANIFEST
    from clusterlm.fsutil import sha256_file

    manifest = path / MANIFEST
    return sha256_file(manifest if manifest.is_file() else path / "model.safetensors")


def resolve_teachers(teachers: tuple[str, ...] | list[str]) -> list[Path]:
    """The step folder of each teacher, checked without the data (train/loop.py calls it before data.dir
    is prepared): it exists, is a checkpoint, has a classification head, and no teacher is given twice
    (twice would weigh it double in the average, silently). ConfigError naming the teacher otherwise."""
    from clusterlm.checkpoint.model_io import read_checkpoint_config
    from clusterlm.checkpoint.store import resolve_checkpoint
    from clusterlm.errors import CheckpointError

    paths: list[Path] = []
    for t in teachers:
        if not Path(t).exists():
            raise ConfigError(f"finetune.distill_from: teacher {t!r} does not exist; give a classifier's run, "
                              "checkpoints or step folder")
        try:
            path = resolve_checkpoint(t)
        except CheckpointError as e:
            raise ConfigError(f"finetune.distill_from: teacher {e}") from None
        twice = [q for q, p in zip(teachers, paths) if p.resolve() == path.resolve()]
        if twice:
            raise ConfigError(f"finetune.distill_from: {twice[0]!r} and {t!r} are the same teacher ({path}); each "
                              "teacher is another training run (given twice it would count double)")
        if not read_checkpoint_config(path).model.labels:
            raise ConfigError(f"finetune.distill_from: teacher {path} has no classification head (a language model); "
                              "a teacher is a classifier over the data's labels")
        paths.append(path)
    return paths


def teacher_probs(teachers: tuple[str, ...] | list[str], data_dir: Path, out_dir: Path, *, seq_len: int,
                  batch_size: int = 256, device: str | torch.device = "cpu") -> np.ndarray:
    """The teachers' averaged probabilities for each example of data_dir's training split, (N, C)
    float32 in the data's label order; read from out_dir/distill/ when the same teachers already
    scored the same examples (a resumed run), else computed and written there atomically."""
    from clusterlm.checkpoint.model_io import read_checkpoint_config
    from clusterlm.data.shards import read_meta
    from clusterlm.data.sft import ExampleSplit
    from clusterlm.fsutil import atomic_write_bytes, sha256_file

    data_dir, out_dir = Path(data_dir), Path(out_dir)
    split = ExampleSplit(data_dir, "train")
    labels = split.labels
    data_tok = data_dir / read_meta(data_dir)["tokenizer"]["file"]
    paths = resolve_teachers(teachers)
    for path in paths:
        mcfg = read_checkpoint_config(path).model
        if tuple(mcfg.labels) != labels:
            what = f"labels {list(mcfg.labels)}" if mcfg.labels else "no classification head (a language model)"
            raise ConfigError(f"finetune.distill_from: teacher {path} has {what}, but {data_dir} has labels "
                              f"{list(labels)}; a teacher is a classifier over the same labels")
        tok = path / "tokenizer.json"
        if not tok.is_file() or sha256_file(tok) != sha256_file(data_tok):
            raise ConfigError(f"finetune.distill_from: teacher {path} was trained with another tokenizer than "
                              f"{data_tok}; the teachers read the student's token ids: train them on the same "
                              f"data.dir, or prepare the student's data with data.tokenizer={str(tok)!r}")
    key = hashlib.sha256(json.dumps({"data": split.fingerprint, "seq_len": seq_len,
                                     "teachers": [_teacher_key(p) for p in paths]}).encode()).hexdigest()[:16]
    cache = out_dir / "distill" / f"teachers-{key}.npy"
    if cache.is_file():
        probs = np.load(cache, allow_pickle=False)
        if probs.shape == (split.n, len(labels)):
            log.info("distillation: the teachers' probabilities from %s", cache)
            return probs
    probs = np.zeros((split.n, len(labels)), dtype=np.float64)
    ids = [split.example(i, seq_len)[0].tolist() for i in range(split.n)]
    for path in paths:
        probs += _score(path, ids, batch_size, device)
    probs = (probs / len(paths)).astype(np.float32)
    agree = float((probs.argmax(1) == split.arrays["labels"]).mean())
    log.info("distillation: %d teachers scored %d training examples (their average agrees with the labels on "
             "%.2f%%); kept in %s", len(paths), split.n, 100 * agree, cache)
    buf = io.BytesIO()
    np.save(buf, probs, allow_pickle=False)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cache, buf.getvalue())
    return probs


def _score(path: Path, ids: list[list[int]], batch_size: int, device: str | torch.device) -> np.ndarray:
    """One teacher's probabilities for `ids` (eval.lm.classify_ids, in eval mode)."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.eval.lm import classify_ids

    teacher = load_for_inference(path, device=device)
    log.info("distillation: teacher %s scoring %d training examples", path, len(ids))
    out = classify_ids(teacher.model, ids, batch_size=batch_size, truncate=True, what="training examples")
    del teacher  # one teacher in memory at a time
    return np.asarray([c.probs for c in out], dtype=np.float64)
