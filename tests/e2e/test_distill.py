"""Knowledge distillation (finetune.distill_from): a classifier trained on its teachers' averaged
probabilities mixed with the labels.

References: the teachers called one by one through load_for_inference + classify_ids on the
training split's examples (their probabilities averaged by hand), the one-hot mixture written out
with numpy, torch's cross-entropy of the two terms added by hand, and the uninterrupted run for
resume. Two tiny LSTM teachers are trained from scratch on a synthetic sentiment TSV (char
tokenizer) that shares one data folder with the student.

    .venv/bin/python -m pytest -q tests/e2e/test_distill.py
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clusterlm.cli import main as cli
from clusterlm.errors import EXIT_USAGE
from tests.helpers import train_losses

POS, NEG = ["good", "great", "fine", "lovely"], ["bad", "awful", "dull", "poor"]


def _q(p: Path) -> str:
    return json.dumps(str(p))


def _args(root: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--finetune.task=classify", f"--data.source={_q(root / 'cls.tsv')}",
            f"--data.dir={_q(root / 'data')}", "--data.tokenizer=char", "--model.arch=lstm", "--model.n_layers=1",
            "--model.dim=32", "--model.pos=none", "--train.seq_len=32", "--train.micro_batch_size=16",
            "--train.eval_interval=0", "--train.tensorboard=false", "--train.threads=1", "--optim.lr=1e-2",
            "--optim.warmup_steps=2", f"--train.out_dir={_q(out)}", *extra]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """cls.tsv (240 labelled sentences), data/ prepared from it, and teachers t1, t2 (seeds 1, 2)."""
    root = tmp_path_factory.mktemp("distill")
    rng = random.Random(0)
    rows = ["sentence\tlabel"]
    for i in range(240):
        pos = rng.random() < 0.5
        rows.append(f"{rng.choice(['the film was', 'it is', 'a truly'])} {rng.choice(POS if pos else NEG)} one {i % 7}"
                    f"\t{'pos' if pos else 'neg'}")
    (root / "cls.tsv").write_text("\n".join(rows) + "\n")
    for seed in (1, 2):
        assert cli(_args(root, root / f"t{seed}", "--train.max_steps=40", f"--train.seed={seed}")) == 0
    return root


def _teacher_average(root: Path, seq_len: int = 32) -> np.ndarray:
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.data.sft import ExampleSplit
    from clusterlm.eval.lm import classify_ids

    split = ExampleSplit(root / "data", "train")
    ids = [split.example(i, seq_len)[0].tolist() for i in range(split.n)]
    probs = [np.array([c.probs for c in classify_ids(load_for_inference(root / t).model, ids)])
             for t in ("t1", "t2")]
    return (probs[0] + probs[1]) / 2


def test_targets_are_the_teachers_average_mixed_with_the_label_and_the_loss_is_both_terms(root, tmp_path):
    from clusterlm.data.sft import ExampleLoader, ExampleSplit
    from clusterlm.finetune.setup import ClassifyLoss

    teachers = json.dumps([str(root / "t1"), str(root / "t2")])
    out = tmp_path / "student"
    assert cli(_args(root, out, "--train.max_steps=6", f"--finetune.distill_from={teachers}",
                     "--finetune.distill_weight=0.7")) == 0
    [cache] = (out / "distill").glob("teachers-*.npy")
    soft = np.load(cache)
    want = _teacher_average(root)
    assert np.abs(soft - want).max() < 1e-5
    assert float((want.argmax(1) == ExampleSplit(root / "data", "train").arrays["labels"]).mean()) > 0.8  # they learned

    loader = ExampleLoader(root / "data", "train", batch_size=8, seq_len=32, seed=3, pad_id=0, soft_targets=soft,
                           soft_weight=0.7)
    plain = ExampleLoader(root / "data", "train", batch_size=8, seq_len=32, seed=3, pad_id=0)
    rows, _ = plain._rows()
    idx = [r[0] for r in rows]
    x, dist = next(loader)
    x0, labels = next(plain)
    assert torch.equal(x, x0) and dist.dtype == torch.float32 and dist.shape == (8, 2)
    mix = 0.3 * np.eye(2)[labels.numpy()] + 0.7 * soft[idx]
    assert np.abs(dist.numpy() - mix).max() < 1e-6
    logits = torch.randn(8, 2)
    by_hand = 0.3 * torch.nn.functional.cross_entropy(logits, labels) - 0.7 * (
        torch.from_numpy(soft[idx]) * logits.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(ClassifyLoss()(logits, dist), by_hand, atol=1e-6)
    with pytest.raises(ValueError, match="soft_targets"):
        ExampleLoader(root / "data", "train", batch_size=8, seq_len=32, pad_id=0, soft_targets=soft[:5])


def test_resume_reads_the_kept_scores_and_equals_the_straight_run(root, tmp_path, caplog):
    teachers = json.dumps([str(root / "t1"), str(root / "t2")])
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--train.max_steps=10", "--checkpoint.interval=5", f"--finetune.distill_from={teachers}"]
    assert cli(_args(root, a, *args)) == 0
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step-00000010")
    caplog.set_level("INFO")
    assert cli(_args(root, b, *args, "--train.resume=auto")) == 0
    assert any("probabilities from" in r.getMessage() for r in caplog.records)
    assert not any("teachers scored" in r.getMessage() for r in caplog.records)
    assert train_losses(a) == train_losses(b)


def _fails(args: list[str], capsys) -> str:
    code = cli(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE, err
    return err[-1]


def test_bad_teachers_and_settings_are_one_line_exit_2_and_nothing_written(root, tmp_path, capsys):
    def refused(name: str, *extra: str) -> str:
        line = _fails(_args(root, tmp_path / name, "--train.max_steps=2", *extra), capsys)
        assert not (tmp_path / name / "checkpoints").exists()
        return line

    line = refused("o1", f"--finetune.distill_from={json.dumps([str(tmp_path / 'nowhere')])}")
    assert "nowhere" in line and "does not exist" in line
    # a language model is no teacher
    (tmp_path / "c.txt").write_text("the film was good one\n" * 40)
    assert cli(["prepare", str(tmp_path / "c.txt"), "--out", str(tmp_path / "lmdata"), "--tokenizer", "char"]) == 0
    assert cli(["train", f"--data.dir={_q(tmp_path / 'lmdata')}", f"--train.out_dir={_q(tmp_path / 'lm')}",
                "--model.preset=gpt-nano", "--model.max_seq_len=32", "--train.seq_len=16", "--train.max_steps=1",
                "--train.eval_interval=0", "--train.tensorboard=false"]) == 0
    capsys.readouterr()
    line = refused("o2", f"--finetune.distill_from={json.dumps([str(tmp_path / 'lm')])}")
    assert "no classification head" in line and "a teacher is a classifier over the data's labels" in line
    # a classifier over the same labels with another tokenizer (bytes, not the data's chars)
    assert cli(_args(root, tmp_path / "bytes", "--train.max_steps=1", f"--data.dir={_q(tmp_path / 'bdata')}",
                     "--data.tokenizer=byte")) == 0
    capsys.readouterr()
    line = refused("o3", f"--finetune.distill_from={json.dumps([str(tmp_path / 'bytes')])}")
    assert "another tokenizer" in line and "data.tokenizer=" in line
    line = refused("o4", f"--finetune.distill_from={json.dumps([str(root / 't1')])}", "--finetune.distill_weight=0")
    assert "distill_weight=0" in line and "(0, 1]" in line
    line = refused("o5", f"--finetune.distill_from={json.dumps([str(root / 't1')])}", "--finetune.task=sft")
    assert "distill_from" in line and "'sft'" in line
    # what the refusal advises: the student's data prepared anew with the teacher's tokenizer file
    tok = next((root / "t1" / "checkpoints").glob("step-*/tokenizer.json"))
    assert cli(_args(root, tmp_path / "ok", "--train.max_steps=3", f"--data.dir={_q(tmp_path / 'tdata')}",
                     f"--data.tokenizer={_q(tok)}", f"--finetune.distill_from={json.dumps([str(root / 't1')])}",
                     "--finetune.distill_weight=1")) == 0
    assert all(np.isfinite(v) for v in train_losses(tmp_path / "ok").values())


def test_teachers_are_checked_before_the_data_is_prepared(root, tmp_path, capsys, monkeypatch):
    """Reference: the file system before the run. A teacher that does not exist, is a file, or is given
    twice (t1 and t1/checkpoints: the same step folder, which counted double in the average) is exit 2 with
    one line naming it, before data.dir is prepared (ensure_finetune_data never called) and with no run
    folder; the missing teacher was refused only after preparing a new data.dir, the duplicate trained."""
    import clusterlm.finetune.data as fdata

    called = []
    monkeypatch.setattr(fdata, "ensure_finetune_data", lambda cfg: called.append(cfg) or 1 / 0)
    t1 = root / "t1"
    step = next((t1 / "checkpoints").glob("step-*"))
    for teachers, fragment in [([tmp_path / "nowhere"], "nowhere' does not exist"),
                               ([step / "model.safetensors"], "finetune.distill_from: teacher " + str(step)),
                               ([t1, t1 / "checkpoints"], "are the same teacher")]:
        args = _args(root, tmp_path / "out", "--train.max_steps=2", f"--data.dir={_q(tmp_path / 'new')}",
                     f"--finetune.distill_from={json.dumps([str(t) for t in teachers])}")
        line = _fails(args, capsys)
        assert fragment in line, line
        assert not called and not (tmp_path / "new").exists() and not (tmp_path / "out").exists()


def test_augment_texts_follows_its_rules_and_is_seeded():
    from clusterlm.data.augment import MAX_NGRAM, augment_texts

    texts = [f"the film was {w} and {v} one" for w in POS + NEG for v in ("long", "short")]
    out = augment_texts(texts, copies=3)
    assert out == augment_texts(texts, copies=3) and out != augment_texts(texts, copies=3, seed=1)
    vocab = {w for t in texts for w in t.split()}
    copies = [c for _, c in out]
    assert len(set(copies)) == len(copies) and not set(copies) & set(texts)  # no repeats, no originals
    assert all(set(c.split()) <= vocab for c in copies)
    cut = [c for c in copies if len(c.split()) < 7]
    assert cut and all(len(c.split()) <= MAX_NGRAM for c in cut)  # a shorter copy is an n-gram of <= 5 words
    whole = [(i, c) for i, c in out if len(c.split()) == 7]  # uncut: word i matches its source's or was swapped
    swaps = sum(a != b for i, c in whole for a, b in zip(c.split(), texts[i].split()))
    assert whole and 0.02 < swaps / (7 * len(whole)) < 0.25  # P_SWAP = 0.1 (a swap may draw the same word)
    assert augment_texts(texts, 0) == [] and augment_texts([], 2) == []


def test_augmented_copies_train_on_the_teachers_alone_and_never_leak_into_validation(root, tmp_path, capsys):
    from clusterlm.data.sft import ExampleLoader, ExampleSplit

    teachers = json.dumps([str(root / "t1"), str(root / "t2")])
    out, data = tmp_path / "aug", tmp_path / "augdata"
    assert cli(_args(root, out, "--train.max_steps=4", f"--data.dir={_q(data)}", f"--finetune.distill_from={teachers}",
                     "--finetune.distill_weight=0.25", "--finetune.augment=2")) == 0
    plain, train = ExampleSplit(root / "data", "val"), ExampleSplit(data, "train")
    val = ExampleSplit(data, "val")
    assert np.array_equal(val.tokens, plain.tokens) and "augmented" not in val.arrays  # same hold-out, no copies
    aug = train.arrays["augmented"]
    n_real = int((aug == 0).sum())
    assert n_real == ExampleSplit(root / "data", "train").n and aug[:n_real].sum() == 0 and n_real < train.n
    [cache] = (out / "distill").glob("teachers-*.npy")
    soft = np.load(cache)
    assert soft.shape == (train.n, 2)
    loader = ExampleLoader(data, "train", batch_size=train.n, seq_len=32, pad_id=0, shuffle=False,
                           soft_targets=soft, soft_weight=0.25)
    _, dist = next(loader)
    onehot = np.eye(2)[train.arrays["labels"]]
    want = np.where(aug[:, None] == 1, soft, 0.75 * onehot + 0.25 * soft)
    assert np.abs(dist.numpy() - want).max() < 1e-6
    # the folder was made with augment=2: reused with another setting, or augment without teachers, refused
    line = _fails(_args(root, tmp_path / "o1", "--train.max_steps=1", f"--data.dir={_q(data)}",
                        f"--finetune.distill_from={teachers}", "--finetune.augment=1"), capsys)
    assert "augment=2" in line and "not 1" in line
    line = _fails(_args(root, tmp_path / "o2", "--train.max_steps=1", "--finetune.augment=2"), capsys)
    assert "finetune.augment=2" in line and "distill_from" in line


def test_an_ensemble_checkpoint_teaches_what_its_members_teach_together(root, tmp_path):
    """`clusterlm ensemble t1 t2` as the one teacher gives each example the probabilities the two give as
    two teachers (their mean), to float32 rounding."""
    from clusterlm.finetune.distill import teacher_probs

    assert cli(["ensemble", str(root / "t1"), str(root / "t2"), "--out", str(tmp_path / "ens")]) == 0
    one = teacher_probs([str(tmp_path / "ens")], root / "data", tmp_path / "a", seq_len=32)
    two = teacher_probs([str(root / "t1"), str(root / "t2")], root / "data", tmp_path / "b", seq_len=32)
    np.testing.assert_allclose(one, two, rtol=0, atol=1e-6)
