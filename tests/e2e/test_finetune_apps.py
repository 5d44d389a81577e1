"""The application recipes (recipes/multi30k_*_cpu.toml, recipes/sst2_*_cpu.toml) end to end on tiny
synthetic data made here (never ../shared): SFT on parallel text with BLEU scored during training,
a classifier fine-tuned from a small pre-trained LM (full and LoRA rank 8) and one from scratch, and
benchmarks/applications_report.py on fake result files. Checks that the records exist and hold sane
numbers; speed is not asserted (benchmarks/applications.py measures it)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clusterlm.config import bundled_recipes, load_run_config
from clusterlm.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
EN_FR = {"a": "un", "red": "rouge", "dog": "chien", "cat": "chat", "runs": "court", "sleeps": "dort",
         "big": "grand", "small": "petit", "man": "homme", "eats": "mange", "the": "le", "house": "maison"}
GOOD = ["good", "great", "fine", "lovely", "fun"]
BAD = ["bad", "awful", "dull", "boring", "poor"]
TINY_MODEL = ["--model.n_layers=2", "--model.dim=32", "--model.n_heads=2", "--model.max_seq_len=64",
              "--train.seq_len=64", "--train.device=cpu", "--train.threads=1", "--train.tensorboard=false",
              "--train.log_interval=1", "--checkpoint.interval=0", "--optim.warmup_steps=2", "--optim.lr=3e-3"]


def q(value: object) -> str:
    return json.dumps(value)


def run(recipe: str, out: Path, *overrides: str):  # noqa: ANN201 - a TrainResult
    from clusterlm.train.loop import train

    cfg = load_run_config(bundled_recipes()[recipe], [*overrides, f"--train.out_dir={q(str(out))}"])
    return cfg, train(cfg)


def kinds(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == kind]


def parallel_files(root: Path, split: str, n: int, seed: int) -> str:
    """n en/fr pairs of a word-for-word 'language' as split.en / split.fr; returns "SRC,TGT"."""
    rng = random.Random(seed)
    words = sorted(EN_FR)
    src = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 5))) for _ in range(n)]
    (root / f"{split}.en").write_text("".join(s + "\n" for s in src))
    (root / f"{split}.fr").write_text("".join(" ".join(EN_FR[w] for w in s.split()) + "\n" for s in src))
    return f"{root / f'{split}.en'},{root / f'{split}.fr'}"


def sentiment_tsv(path: Path, n: int, seed: int, column: str) -> list[str]:
    """n labelled sentences (1 = positive words) as a TSV with header label<TAB>column; returns them."""
    rng = random.Random(seed)
    lines, texts = [f"label\t{column}"], []
    for i in range(n):
        label = i % 2
        words = rng.sample(GOOD if label else BAD, 2) + ["movie", "was", "the"]
        rng.shuffle(words)
        texts.append(" ".join(words))
        lines.append(f"{label}\t{texts[-1]}")
    path.write_text("\n".join(lines) + "\n")
    return texts


def test_translation_sft_scores_bleu_during_training(tmp_path):
    """recipes/multi30k_enfr_cpu.toml on 160 synthetic parallel pairs, a tiny model, 6 steps: the
    prepared examples train on the targets only (fewer trained tokens than tokens), BLEU/chrF task
    records at steps 3 and 6 on 4 test pairs with growing wall time, finite val losses, and a
    lower training loss at the end than at the start."""
    train_spec = parallel_files(tmp_path, "train", 160, seed=0)
    test_spec = parallel_files(tmp_path, "test", 4, seed=1)
    data, out = tmp_path / "data", tmp_path / "run"
    cfg, res = run("multi30k_enfr_cpu", out, f"--data.source={q(train_spec)}", f"--data.dir={q(str(data))}",
                   "--data.vocab_size=300", f"--eval.tasks={q([test_spec])}", "--eval.every=3", "--eval.limit=4",
                   "--eval.max_new_tokens=8", "--train.max_steps=6", "--train.micro_batch_size=4",
                   "--train.eval_interval=3", "--train.max_minutes=0", *TINY_MODEL)
    assert res.exit_code == 0 and res.step == 6
    assert cfg.finetune.task == "sft" and cfg.data.tokenizer == "bpe"
    meta = json.loads((data / "meta.json").read_text())
    split = meta["splits"]["train"]
    assert meta["task"] == "sft" and split["examples"] + meta["splits"]["val"]["examples"] == 160
    assert 0 < split["trained_tokens"] < split["tokens"]  # the prompt "en: ...\nfr:" is not trained
    tasks = kinds(out, "task")
    assert [t["step"] for t in tasks] == [3, 6]
    assert all(t["task_kind"] == "generate" and t["n"] == 4 for t in tasks)
    assert tasks[0]["wall_s"] < tasks[1]["wall_s"] and all(t["eval_s"] > 0 for t in tasks)
    for t in tasks:
        assert 0.0 <= t["metrics"]["bleu"] <= 100.0 and 0.0 <= t["metrics"]["chrf"] <= 100.0
    evals = kinds(out, "eval")
    assert [e["step"] for e in evals] == [3, 6] and all(math.isfinite(e["val_loss"]) for e in evals)
    losses = [r["loss"] for r in kinds(out, "train")]
    assert len(losses) == 6 and losses[-1] < losses[0]


@pytest.fixture(scope="module")
def sst(tmp_path_factory) -> dict[str, Path]:
    """Synthetic SST-2-like files (train uses the `sentence` column, dev `content`, as in
    ../shared/data/sst2) and a tiny LM pre-trained on the unlabelled training sentences with the
    Transformer recipe, as benchmarks/applications.py does."""
    from clusterlm.data.prepare import prepare

    root = tmp_path_factory.mktemp("sst")
    texts = sentiment_tsv(root / "train.tsv", 120, seed=0, column="sentence")
    sentiment_tsv(root / "dev.tsv", 24, seed=1, column="content")
    (root / "sentences.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    prepare([str(root / "sentences.jsonl")], str(root / "lm_data"), tokenizer="bpe", vocab_size=300,
            val_fraction=0.1, workers=1)
    _, res = run("sst2_transformer_cpu", root / "lm", "--finetune.task=lm", '--finetune.val_source=""',
                 '--data.source=""', f"--data.dir={q(str(root / 'lm_data'))}", "--train.max_steps=4",
                 "--train.micro_batch_size=4", "--train.eval_interval=0", "--train.max_minutes=0", *TINY_MODEL)
    assert res.exit_code == 0
    return {"root": root, "train": root / "train.tsv", "dev": root / "dev.tsv", "lm": root / "lm"}


def classify_args(sst: dict[str, Path], data: str, *extra: str) -> list[str]:
    return [f"--data.source={q(str(sst['train']))}", f"--finetune.val_source={q(str(sst['dev']))}",
            f"--data.dir={q(str(sst['root'] / data))}", "--train.max_steps=8", "--train.micro_batch_size=8",
            "--train.eval_interval=4", "--train.max_minutes=0", *TINY_MODEL, *extra]


def check_classifier_evals(out: Path) -> dict:
    evals = kinds(out, "eval")
    assert [e["step"] for e in evals] == [4, 8]
    for e in evals:
        assert math.isfinite(e["val_loss"]) and 0.0 <= e["val_accuracy"] <= 1.0 and 0.0 <= e["val_macro_f1"] <= 1.0
    return evals[-1]


def test_classifier_from_pretrained_lm_full_and_lora(sst):
    """recipes/sst2_transformer_cpu.toml fine-tuned from the tiny pre-trained LM (init_from), fully
    and with LoRA rank 8: val accuracy/F1 records at steps 4 and 8; the final val accuracy equals the
    task harness's accuracy on dev.tsv (`clusterlm eval RUN --task dev.tsv`, the same 24 examples);
    LoRA writes an adapter file smaller than the model and trains fewer parameters than full
    fine-tuning."""
    from clusterlm.eval.evaluate import evaluate_tasks

    full, lora = sst["root"] / "full", sst["root"] / "lora"
    init = f"--finetune.init_from={q(str(sst['lm']))}"
    _, res = run("sst2_transformer_cpu", full, *classify_args(sst, "records_ft", init))
    assert res.exit_code == 0
    last = check_classifier_evals(full)
    (scores,) = evaluate_tasks(str(full), [str(sst["dev"])], device="cpu")["tasks"].values()
    assert scores["n"] == 24 and scores["accuracy"] == pytest.approx(last["val_accuracy"], abs=1e-9)
    assert 0.0 <= scores["per_class"]["1"]["precision"] <= 1.0

    _, res = run("sst2_transformer_cpu", lora, *classify_args(sst, "records_ft", init, "--finetune.lora_rank=8"))
    assert res.exit_code == 0
    check_classifier_evals(lora)
    adapter = lora / "adapter" / "adapter.safetensors"
    model_file = next((full / "checkpoints").glob("step-*/model.safetensors"))
    assert 0 < adapter.stat().st_size < model_file.stat().st_size
    assert json.loads((lora / "adapter" / "adapter.json").read_text())["rank"] == 8
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from applications import trainable  # benchmarks/applications.py: the count its results report
    finally:
        sys.path.pop(0)
    lora_train, lora_total = trainable(lora)
    full_train, full_total = trainable(full)
    assert lora_total > full_total and full_train == full_total and 0 < lora_train < full_train


def test_lstm_classifier_from_scratch(sst):
    """recipes/sst2_lstm_cpu.toml from scratch (a BPE tokenizer trained on the records, mean pooling)
    gives val accuracy/F1 records at steps 4 and 8."""
    out = sst["root"] / "lstm"
    lstm = [a for a in classify_args(sst, "records_lstm") if not a.startswith("--model.n_heads")]
    _, res = run("sst2_lstm_cpu", out, *lstm, "--data.vocab_size=300")
    assert res.exit_code == 0
    check_classifier_evals(out)
    assert json.loads((sst["root"] / "records_lstm" / "meta.json").read_text())["labels"] == ["0", "1"]


def test_bilstm_classifier_from_an_lstm_lm(sst):
    """An LSTM LM pre-trained on the sentences, then a bidirectional classifier from it
    (finetune.bidirectional): both readers start from the LM's weights, it trains and evaluates, and
    the harness scores the saved checkpoint (which rebuilds the reverse reader from its config)."""
    from clusterlm.checkpoint.store import load_model_weights
    from clusterlm.eval.evaluate import evaluate_tasks

    root = sst["root"]
    lstm = [a for a in TINY_MODEL if not a.startswith("--model.n_heads")]
    _, res = run("sst2_lstm_cpu", root / "lstm_lm", "--finetune.task=lm", '--finetune.val_source=""', '--data.source=""',
                 f"--data.dir={q(str(root / 'lm_data'))}", "--train.max_steps=4", "--train.micro_batch_size=4",
                 "--train.eval_interval=0", "--train.max_minutes=0", *lstm)
    assert res.exit_code == 0
    out = root / "bilstm"
    args = [a for a in classify_args(sst, "records_bilstm") if not a.startswith("--model.n_heads")]
    _, res = run("sst2_lstm_cpu", out, *args, f"--finetune.init_from={q(str(root / 'lstm_lm'))}",
                 "--finetune.bidirectional=true")
    assert res.exit_code == 0
    last = check_classifier_evals(out)
    weights = load_model_weights(next((out / "checkpoints").glob("step-*")))
    lm = load_model_weights(next((root / "lstm_lm" / "checkpoints").glob("step-*")))
    assert weights["score.weight"].shape[1] == 2 * lm["tok_embeddings.weight"].shape[1]
    for k in ("rnn.weight_hh_l0", "rnn.weight_ih_l1"):  # trained from the same start, apart
        assert not torch.equal(weights[f"backbone.{k}"], weights[f"reverse.{k}"])
    (m,) = evaluate_tasks(str(out), [str(sst["dev"])], batch_size=8, device="cpu")["tasks"].values()
    assert m["n"] == 24 and m["accuracy"] == pytest.approx(last["val_accuracy"], abs=1e-6)


def test_applications_report(tmp_path):
    """applications_report.py turns every applications_*.json into one markdown table (rows in file
    order, '|' escaped) and names a malformed input under "Skipped inputs" instead of failing."""
    rows = {"translation": [{"application": "translation en->fr", "metric": "BLEU", "value": 12.34567, "goal": ">= 35",
                             "train_minutes": 8.0, "notes": "budget 8 min | shared CPU"}],
            "instructions": [{"application": "instructions", "metric": "exact match %", "value": 91.0,
                              "goal": ">= 90", "train_minutes": 5.5, "notes": "through serve"}]}
    for name, r in rows.items():
        (tmp_path / f"applications_{name}.json").write_text(json.dumps({"rows": r}))
    (tmp_path / "applications_broken.json").write_text(json.dumps({"rows": [{"application": "x"}]}))
    out = tmp_path / "report.md"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "applications_report.py"), "--results",
                           str(tmp_path), "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert table[0] == "| application | metric | value | goal | train min | notes |"
    assert table[1:] == ["| instructions | exact match % | 91 | >= 90 | 5.5 | through serve |",
                         "| translation en->fr | BLEU | 12.35 | >= 35 | 8 | budget 8 min \\| shared CPU |"]
    assert "applications_broken.json: rows[0] lacks metric, value, goal, train_minutes, notes" in text
    assert "applications_broken.json" in proc.stderr


def test_translate_lora_base_corpus_directions(tmp_path):
    """translate-lora --base-pairs: "de" is en->de, "fr-en" is fr->en; the fine-tuning direction itself
    and unknown languages are refused; each pair becomes one "source target" document after every
    language's sentences."""
    import gzip

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from applications import base_corpus_jsonl, base_directions
    finally:
        sys.path.pop(0)
    assert base_directions(["de", "fr-en"], "fr") == [("en", "de"), ("fr", "en")]
    for bad, says in ((["fr"], "the fine-tuning direction en->fr itself"), (["en-fr"], "en->fr itself"),
                      (["xx-en"], "two of en, fr, de"), (["de-de"], "two of en, fr, de")):
        with pytest.raises(SystemExit, match=says):
            base_directions(bad, "fr")
    files = {}
    for lang, lines in (("en", ["a dog", "a cat"]), ("fr", ["un chien", "un chat"])):
        files[lang] = tmp_path / f"train.{lang}.gz"
        with gzip.open(files[lang], "wt", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    out = tmp_path / "docs.jsonl"
    n = base_corpus_jsonl([files["en"], files["fr"]], out, [(files["fr"], files["en"])])
    docs = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert n == 6 and docs == ["a dog", "a cat", "un chien", "un chat", "un chien a dog", "un chat a cat"]


def test_translate_lora_base_documents_prompt_layout_and_disjoint_directions(tmp_path):
    """translate-lora's base corpus: --base-layout prompt writes each pair as the harness's prompt and
    its completion; --disjoint gives each direction its own share of the three-way parallel sentences."""
    import gzip

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from applications import base_corpus_jsonl

    for lang, w in (("en", "a"), ("de", "b"), ("fr", "c")):
        with gzip.open(tmp_path / f"train.{lang}.gz", "wt") as f:
            f.write("".join(f"{w}{i}\n" for i in range(6)))
    files = [tmp_path / f"train.{x}.gz" for x in ("en", "fr", "de")]
    pairs = [(tmp_path / "train.en.gz", tmp_path / "train.de.gz"), (tmp_path / "train.de.gz", tmp_path / "train.fr.gz")]
    n = base_corpus_jsonl(files, tmp_path / "o.jsonl", pairs, layout="prompt", disjoint=True)
    docs = [json.loads(x)["text"] for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert n == len(docs) == 18 + 6
    assert docs[18:] == ["en: a0\nde: b0", "en: a2\nde: b2", "en: a4\nde: b4",
                         "de: b1\nfr: c1", "de: b3\nfr: c3", "de: b5\nfr: c5"]
    base_corpus_jsonl(files, tmp_path / "p.jsonl", pairs[:1])
    assert (tmp_path / "p.jsonl").read_text().splitlines()[-1] == json.dumps({"text": "a5 b5"})


def test_translate_lora_task_in_base_fine_tunes_on_the_pairs_the_base_did_not_see(tmp_path):
    """--task-in-base: en->fr may be a base direction only beside another one (it needs sentences to
    leave for fine-tuning), and held_out_pairs keeps exactly the lines --disjoint gave the others."""
    import gzip

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from applications import base_corpus_jsonl, base_directions, first_pairs, held_out_pairs

    assert base_directions(["fr", "de"], "fr", task_in_base=True) == [("en", "fr"), ("en", "de")]
    for bad in (["fr"], ["de", "de-fr"]):
        with pytest.raises(SystemExit, match="must name en->fr"):
            base_directions(bad, "fr", task_in_base=True)
    for lang, w in (("en", "a"), ("fr", "c"), ("de", "b")):
        with gzip.open(tmp_path / f"train.{lang}.gz", "wt") as f:
            f.write("".join(f"{w}{i}\n" for i in range(6)))
    en, fr, de = (tmp_path / f"train.{x}.gz" for x in ("en", "fr", "de"))
    base_corpus_jsonl([en, fr, de], tmp_path / "o.jsonl", [(en, fr), (en, de)], layout="prompt", disjoint=True)
    base_docs = [json.loads(x)["text"] for x in (tmp_path / "o.jsonl").read_text().splitlines()][18:]
    assert base_docs[:3] == ["en: a0\nfr: c0", "en: a2\nfr: c2", "en: a4\nfr: c4"]
    out = held_out_pairs(en, fr, tmp_path / "held", 0, 2)
    assert [p.name for p in out] == ["train.en.gz", "train.fr.gz"]
    assert [gzip.open(p, "rt").read().split() for p in out] == [["a1", "a3", "a5"], ["c1", "c3", "c5"]]
    assert not list((tmp_path / "held").glob(".*"))  # no temporary file left
    # written again (translate-lora --reuse does), the files are the same bytes: the prepared pairs'
    # data.dir recorded their SHA-256 and refuses a source whose bytes changed
    before = [p.read_bytes() for p in out]
    time.sleep(1.1)  # gzip's header holds a time in seconds unless it is pinned
    assert [p.read_bytes() for p in held_out_pairs(en, fr, tmp_path / "held", 0, 2)] == before
    # --ft-pairs N: the first N of those, as the same pair of files
    few = first_pairs(*out, tmp_path / "few", 2)
    assert [gzip.open(p, "rt").read().split() for p in few] == [["a1", "a3"], ["c1", "c3"]]
