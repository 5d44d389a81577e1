"""Training the other Transformer families end to end through `clusterlm train` / `finetune`:
masked-LM pre-training of an encoder from token shards (the tokenizer grows <|mask|>) and seq2seq
training of an encoder-decoder on parallel files, each resumed bit-exactly (N steps straight ==
N/2, save, resume, N/2); then the encoder fine-tuned as a classifier, and bad input (one line, exit 2).

Run: .venv/bin/python -m pytest -q tests/e2e/test_encdec_train.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from clusterlm.cli import main as cli
from clusterlm.errors import EXIT_USAGE
from tests.helpers import train_losses

WORDS = ["a", "man", "woman", "dog", "red", "blue", "runs", "sits", "the", "big", "small", "cat"]
FR = {"a": "un", "man": "homme", "woman": "femme", "dog": "chien", "red": "rouge", "blue": "bleu", "runs": "court",
      "sits": "assis", "the": "le", "big": "grand", "small": "petit", "cat": "chat"}


def sentences(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encdec")
    src = sentences(120)
    (root / "train.en").write_text("".join(s + "\n" for s in src))
    (root / "train.fr").write_text("".join(" ".join(FR[w] for w in s.split()) + "\n" for s in src))
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": s + "."}) + "\n" for s in sentences(600, 1)))
    return {"root": root}


def _mlm(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", f"--data.source={json.dumps(str(root / 'corpus.jsonl'))}",
            f"--data.dir={json.dumps(str(root / 'shards'))}",
            "--data.tokenizer=char", "--data.val_fraction=0.1", "--finetune.task=mlm", "--model.arch=encoder",
            "--model.n_layers=2", "--model.dim=32", "--model.n_heads=4", "--model.max_seq_len=32",
            "--model.pos=sinusoidal", "--train.seq_len=32", "--train.micro_batch_size=8", "--train.eval_interval=4",
            "--train.eval_batches=2", "--optim.lr=3e-3", "--optim.warmup_steps=2", "--train.tensorboard=false",
            "--train.threads=1", f"--train.out_dir={json.dumps(str(out))}", *extra]


def _s2s(root: Path, out: Path, *extra: str) -> list[str]:
    src = f"{root / 'train.en'},{root / 'train.fr'}"
    return ["finetune", f"--data.source={json.dumps(src)}", f"--data.dir={json.dumps(str(root / 's2s'))}",
            "--data.tokenizer=char", "--data.val_fraction=0.1", "--finetune.task=seq2seq", "--model.arch=encdec",
            "--model.n_layers=2", "--model.n_enc_layers=2", "--model.dim=32", "--model.n_heads=4",
            "--model.max_seq_len=64", "--model.pos=sinusoidal", "--train.seq_len=48", "--train.micro_batch_size=8",
            "--train.eval_interval=4", "--train.eval_batches=2", "--optim.lr=3e-3", "--optim.warmup_steps=2",
            "--train.tensorboard=false", "--train.threads=1", f"--train.out_dir={json.dumps(str(out))}", *extra]


def _resume_matches(args, out: Path, steps: int) -> dict[int, float]:
    """Run `steps` straight into out/a; copy it, drop the last checkpoint, resume into out/b."""
    a, b = out / "a", out / "b"
    assert cli(args(a, f"--train.max_steps={steps}", f"--checkpoint.interval={steps // 2}")) == 0
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / f"step-{steps:08d}")
    assert cli(args(b, f"--train.max_steps={steps}", f"--checkpoint.interval={steps // 2}",
                    "--train.resume=auto")) == 0
    la, lb = train_losses(a), train_losses(b)
    assert len(la) == steps and la == lb
    return la


def _val_losses(run: Path) -> list[float]:
    return [r["val_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r.get("kind") == "eval"]


def test_mlm_pretraining_adds_the_mask_token_learns_and_resumes_bit_exactly(corpus, tmp_path):
    """Reference: the same 8 steps without interruption (losses equal as floats)."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.data.mlm import MASK

    root = corpus["root"]
    losses = _resume_matches(lambda out, *e: _mlm(root, out, *e), tmp_path, 8)
    loaded = load_for_inference(tmp_path / "a")
    plain = json.loads((root / "shards" / "meta.json").read_text())["tokenizer"]["vocab_size"]
    assert loaded.tokenizer.token_id(MASK) == plain  # appended: no existing id moved
    assert loaded.config.model.arch == "encoder" and loaded.config.model.vocab_size == plain + 1
    vals = _val_losses(tmp_path / "a")
    assert len(vals) >= 2 and vals[-1] < vals[0]
    assert losses[8] < losses[1]


def test_span_corruption_pretraining_resumes_bit_exactly_and_fine_tunes(corpus, tmp_path):
    """T5 span corruption of an encdec on token shards: 8 steps straight == 4 + resume + 4; the
    tokenizer gains the 32 sentinels; then seq2seq fine-tuning starts from it (init_from)."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.data.mlm import SENTINELS

    root = corpus["root"]

    def args(out, *e):
        a = [x for x in _mlm(root, out, *e) if not x.startswith(("--finetune.task", "--model.arch"))]
        return [*a, "--finetune.task=span", "--model.arch=encdec", "--model.n_enc_layers=2", "--model.max_seq_len=64"]

    losses = _resume_matches(args, tmp_path, 8)
    assert losses[8] < losses[1]
    loaded = load_for_inference(tmp_path / "a")
    plain = json.loads((root / "shards" / "meta.json").read_text())["tokenizer"]["vocab_size"]
    assert [loaded.tokenizer.token_id(t) for t in SENTINELS] == list(range(plain, plain + len(SENTINELS)))
    assert len(_val_losses(tmp_path / "a")) >= 2
    ft = [x for x in _s2s(root, tmp_path / "ft", "--train.max_steps=4") if not x.startswith(("--model.", "--data.dir"))]
    assert cli([*ft, f"--finetune.init_from={json.dumps(str(tmp_path / 'a'))}",
                f"--data.dir={json.dumps(str(tmp_path / 's2s_from_span'))}", "--checkpoint.interval=0"]) == 0
    assert load_for_inference(tmp_path / "ft").tokenizer.vocab_size == loaded.tokenizer.vocab_size


def test_seq2seq_training_on_parallel_files_resumes_bit_exactly(corpus, tmp_path, capsys):
    """Reference: the same 8 steps without interruption (losses equal as floats); val loss falls."""
    root = corpus["root"]
    losses = _resume_matches(lambda out, *e: _s2s(root, out, *e), tmp_path, 8)
    meta = json.loads((root / "s2s" / "meta.json").read_text())
    assert meta["task"] == "seq2seq" and meta["splits"]["train"]["examples"] == 108
    assert losses[8] < losses[1]
    vals = _val_losses(tmp_path / "a")
    assert len(vals) >= 2 and vals[-1] < vals[0]
    # tokens count the decoder positions computed (rows cut to the micro-batch's longest target), not
    # 8 pairs x seq_len 48 a step; a resumed run counts the same
    tokens = {run: [r["tokens"] for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
                    if r.get("kind") == "train"] for run in ("a", "b")}
    steps = [b - a for a, b in zip([0, *tokens["a"]], tokens["a"])]
    assert all(0 < d < 8 * 48 and d % 8 == 0 for d in steps), steps
    assert tokens["b"][-1] == tokens["a"][-1]
    # `clusterlm eval RUN` measures the same validation loss on the run's own pairs
    assert cli(["eval", str(tmp_path / "a"), "--batch-size", "8", "--max-batches", "2"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["objective"] == "seq2seq" and got["loss"] == pytest.approx(vals[-1], rel=1e-5)
    # a --seq-len beyond the model's 64 positions is refused (it was measured and reported as seq_len 200)
    _one_line_exit_2(["eval", str(tmp_path / "a"), "--seq-len", "200"], capsys, "--seq-len 200",
                     "model.max_seq_len=64", "give --seq-len 64 or less")


def _one_line_exit_2(args: list[str], capsys, *needles: str) -> str:
    code = cli(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE, err
    last = err[-1]
    for n in needles:
        assert n in last, last
    return last


def test_bad_seq2seq_input_is_one_line_and_exit_2(corpus, tmp_path, capsys):
    root = corpus["root"]
    (tmp_path / "short.fr").write_text("un\ndeux\n")
    (tmp_path / "long.en").write_text("a " * 40 + "\n")
    (tmp_path / "long.fr").write_text("un\n")

    def args(src: str, data: str) -> list[str]:
        a = _s2s(root, tmp_path / "out", "--train.max_steps=1")
        return [x if not x.startswith("--data.source=") else f"--data.source={json.dumps(src)}" for x in a
                if not x.startswith("--data.dir=")] + [f"--data.dir={json.dumps(str(tmp_path / data))}"]

    _one_line_exit_2(args(f"{root / 'train.en'},{tmp_path / 'short.fr'}", "d1"), capsys, "120 lines", "has 2")
    _one_line_exit_2(args(str(tmp_path / "short.fr"), "d2"), capsys, "one side of a parallel corpus")
    _one_line_exit_2(args(f"{tmp_path / 'long.en'},{tmp_path / 'long.fr'}", "d3"), capsys,
                     "long.en:1", "88 tokens", "64 tokens")
    for d in ("d1", "d2", "d3"):
        assert not (tmp_path / d).exists()
    assert not (tmp_path / "out").exists()


def test_mlm_encoder_fine_tunes_as_a_classifier_and_scores_a_task(corpus, tmp_path, capsys):
    """The MLM-pre-trained encoder as finetune.init_from of a classifier (mean pool); `eval --task`
    scores it through its head; the data's tokenizer is the base's, <|mask|> included."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.data.mlm import MASK

    root = corpus["root"]
    assert cli(_mlm(root, tmp_path / "mlm", "--train.max_steps=4", "--checkpoint.interval=0")) == 0
    tsv = tmp_path / "cls.tsv"
    rows = [(s, "dog" if "dog" in s.split() else "other") for s in sentences(200, 2)]
    tsv.write_text("sentence\tlabel\n" + "".join(f"{s}\t{lab}\n" for s, lab in rows))
    assert cli(["finetune", f"--finetune.init_from={json.dumps(str(tmp_path / 'mlm'))}", "--finetune.task=classify",
                f"--data.source={json.dumps(str(tsv))}", f"--data.dir={json.dumps(str(tmp_path / 'cls'))}",
                f"--train.out_dir={json.dumps(str(tmp_path / 'clf'))}", "--train.seq_len=32",
                "--train.micro_batch_size=16", "--train.max_steps=30", "--train.eval_interval=0", "--optim.lr=3e-3",
                "--optim.warmup_steps=2", "--train.tensorboard=false", "--train.threads=1"]) == 0
    loaded = load_for_inference(tmp_path / "clf")
    assert loaded.config.model.arch == "encoder" and loaded.config.model.pooling == "mean"
    assert loaded.tokenizer.token_id(MASK) is not None
    capsys.readouterr()
    assert cli(["eval", str(tmp_path / "clf"), "--task", str(tsv)]) == 0
    metrics = next(iter(json.loads(capsys.readouterr().out)["tasks"].values()))
    assert metrics["n"] == 200 and metrics["accuracy"] > 0.6, metrics


def test_bad_mlm_pretraining_input_is_one_line_exit_2_and_writes_nothing(corpus, tmp_path, capsys):
    """Masked-LM runs refused at set-up leave nothing: train.seq_len above model.max_seq_len was refused
    after OUT_DIR/mlm_data had been made (the folder stayed); model.labels on a pre-training run
    (a classifier's head under the masked-LM loss) ended in a traceback at the first step (exit 1,
    config.toml written); and an encoder pre-trained with finetune.task='lm' (next-token loss, which a
    bidirectional encoder learns by copying the next token it sees) trained; an encoder-decoder under it
    crashed. Each is now one line,
    exit 2, naming what to use instead."""
    root = corpus["root"]
    out = tmp_path / "out"
    _one_line_exit_2(_mlm(root, out, "--train.seq_len=40", "--train.max_steps=1"), capsys,
                     "train.seq_len=40 exceeds model.max_seq_len=32")
    assert not out.exists()
    _one_line_exit_2(_mlm(root, out, "--model.labels=[\"a\", \"b\"]", "--train.max_steps=1"), capsys,
                     "model.labels", "finetune.task='classify'")
    assert not out.exists()
    lm = [a for a in _mlm(root, out, "--train.max_steps=1") if a != "--finetune.task=mlm"] + ["--finetune.task=lm"]
    _one_line_exit_2(lm, capsys, "finetune.task='lm'", "model.arch='encoder'", "finetune.task='mlm'")
    assert not out.exists()
    # an encoder-decoder under finetune.task='lm' (the default) ended in a TypeError traceback (exit 1)
    lm = [a if a != "--model.arch=encoder" else "--model.arch=encdec" for a in lm] + ["--model.n_enc_layers=1"]
    _one_line_exit_2(lm, capsys, "model.arch='encdec'", "finetune.task='span'", "'seq2seq'")
    assert not out.exists()


def test_mlm_refuses_a_val_source_it_would_ignore(corpus, tmp_path, capsys):
    """finetune.val_source on a masked-LM run (the sst2_encoder_cpu recipe sets one for its classifier)
    was silently ignored: validation reads data.dir's val split. It is now refused in one line, exit 2,
    nothing written; docs/encdec.md's command clears it (--finetune.val_source='""')."""
    root = corpus["root"]
    out = tmp_path / "out"
    _one_line_exit_2(_mlm(root, out, f"--finetune.val_source={json.dumps(str(root / 'corpus.jsonl'))}",
                          "--train.max_steps=1"), capsys, "finetune.val_source=", "val split", 'val_source = ""')
    assert not out.exists()


def test_seq2seq_refuses_a_chat_template_it_would_ignore(corpus, tmp_path, capsys):
    """finetune.template=chatml on a seq2seq run prepared its pairs with no template at all (the log
    said "template: none"), silently. A template is now refused for seq2seq as for classify: one
    line, exit 2, nothing written."""
    root = corpus["root"]
    out = tmp_path / "out"
    args = [a for a in _s2s(root, out, "--train.max_steps=1", "--finetune.template=chatml")
            if not a.startswith("--data.dir=")] + [f"--data.dir={json.dumps(str(tmp_path / 'd'))}"]
    _one_line_exit_2(args, capsys, "finetune.template='chatml'", "seq2seq", "leave template unset")
    assert not out.exists() and not (tmp_path / "d").exists()


def test_seq2seq_warns_about_finetune_keys_it_does_not_use(corpus, tmp_path, caplog):
    """pool, class_weights, pack=false, mask_prob ... on a seq2seq run changed nothing and said nothing;
    now one warning names each key set away from its default (the run still trains: a recipe may share
    keys with another task)."""
    root = corpus["root"]
    out = tmp_path / "out"
    args = [a for a in _s2s(root, out, "--train.max_steps=1", "--finetune.pool=mean", "--finetune.pack=false",
                            "--finetune.mask_prob=0.3") if not a.startswith("--data.dir=")]
    with caplog.at_level("WARNING", logger="clusterlm"):
        assert cli([*args, f"--data.dir={json.dumps(str(tmp_path / 'd'))}"]) == 0
    warned = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert "finetune.pack=False, finetune.pool='mean', finetune.mask_prob=0.3: ignored" in warned[0], warned
    caplog.clear()
    with caplog.at_level("WARNING", logger="clusterlm"):
        assert cli([*_s2s(root, tmp_path / "plain", "--train.max_steps=1")]) == 0
    assert "does not use" not in caplog.text
