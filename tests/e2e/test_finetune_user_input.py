"""`clusterlm finetune` refusals found by following docs/finetune.md as a user: options that contradict
the base are one line, exit 2, nothing written (not silently replaced by the base's values).

Run: .venv/bin/python -m pytest -q tests/e2e/test_finetune_user_input.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clusterlm.cli import main as cli
from clusterlm.errors import EXIT_USAGE

TEXT = "".join(f"{a}+{b}={a + b}.\n" for a in range(10) for b in range(10))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A char-level 1-layer gpt-nano trained 2 steps (its shape and tokenizer are what matter here)."""
    root = tmp_path_factory.mktemp("base")
    (root / "corpus.txt").write_text(TEXT * 2)
    assert cli(["prepare", str(root / "corpus.txt"), "--out", str(root / "data"), "--tokenizer", "char",
                "--val-fraction", "0"]) == 0
    assert cli(["train", f"--data.dir={json.dumps(str(root / 'data'))}",
                f"--train.out_dir={json.dumps(str(root / 'run'))}",
                "--model.preset=gpt-nano", "--model.n_layers=1", "--model.max_seq_len=32", "--train.seq_len=32",
                "--train.micro_batch_size=4", "--train.max_steps=2", "--train.eval_interval=0",
                "--train.tensorboard=false"]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def chat(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("records") / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}"},
                                                     {"role": "assistant", "content": str(a + b)}]}) + "\n"
                            for a in range(4) for b in range(4)))
    return path


def _ft(base: Path, source: Path, root: Path, *extra: str) -> list[str]:
    return ["finetune", "--finetune.task=sft", f"--finetune.init_from={json.dumps(str(base))}",
            f"--data.source={json.dumps(str(source))}", f"--data.dir={json.dumps(str(root / 'data'))}",
            f"--train.out_dir={json.dumps(str(root / 'out'))}", "--train.seq_len=32", "--train.micro_batch_size=4",
            "--train.max_steps=1", "--train.eval_interval=0", "--train.tensorboard=false", "--train.threads=1", *extra]


def test_a_model_vocab_size_other_than_the_bases_is_refused(base, chat, tmp_path, capsys):
    """A recipe's model.vocab_size that is neither the base's nor the base's plus the template's tokens was
    ignored (the run trained at the base's vocabulary while the printed config said otherwise): now one
    line naming both sizes, exit 2, no data.dir or out_dir; the base's size and the grown size still run."""
    from clusterlm.checkpoint.model_io import read_checkpoint_config
    from clusterlm.checkpoint.store import resolve_checkpoint

    v0 = read_checkpoint_config(resolve_checkpoint(str(base))).model.vocab_size
    capsys.readouterr()
    assert cli(_ft(base, chat, tmp_path / "bad", "--model.vocab_size=500")) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the resolved config
    assert err.startswith("clusterlm finetune: error: ") and "vocab_size=500" in err, err
    assert f"vocab_size={v0} ({v0 + 4} with the template's special tokens)" in err, err
    assert not (tmp_path / "bad").exists()
    for i, v in enumerate((v0, v0 + 4)):
        assert cli(_ft(base, chat, tmp_path / f"ok{i}", f"--model.vocab_size={v}")) == 0


def test_lora_on_a_model_without_the_default_targets_names_the_ones_it_has():
    """LoRA with the default targets on an LSTM classifier (no attention or MLP projections): the message
    said "lora targets ['wq', ...] match no nn.Linear" although no targets were given, and offered the
    backbone's unused LM head ('output'); now it says the defaults are missing and lists what can be named."""
    from clusterlm.errors import ConfigError
    from clusterlm.finetune.lora import apply_lora
    from clusterlm.models.build import build_model
    from clusterlm.models.config import get_preset

    model = build_model(get_preset("lstm-small", n_layers=1, dim=16, vocab_size=20, labels=("neg", "pos"), pad_id=0))
    with pytest.raises(ConfigError) as e:
        apply_lora(model, None, rank=2)
    msg = str(e.value)
    assert msg.startswith("SequenceClassifier has none of the default lora targets"), msg
    assert msg.endswith("name targets (finetune.lora_targets) from: ['score', 'tok_embeddings']"), msg
    assert apply_lora(model, ["tok_embeddings"], rank=2) == ["backbone.tok_embeddings"]


def test_a_source_that_is_a_directory_or_three_files_is_named_as_such(tmp_path):
    """data.source as a folder said "no such file" (it exists), and three comma-separated files were
    read as parallel files and refused as "task 'a.txt': unsupported file"; now each says what it is."""
    from clusterlm.data.sft import read_records
    from clusterlm.errors import DataError

    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / name).write_text("x\n")
    with pytest.raises(DataError, match=r"data.source='.*': is a directory, not a file: .*; give a .jsonl or .tsv"):
        read_records(str(tmp_path), "sft")
    three = ",".join(str(tmp_path / n) for n in ("a.txt", "b.txt", "c.txt"))
    with pytest.raises(DataError, match=r"names 3 files; give a .jsonl or .tsv file or two parallel text files"):
        read_records(three, "sft")
    assert len(read_records(",".join(str(tmp_path / n) for n in ("a.txt", "b.txt")), "sft")) == 1


@pytest.mark.parametrize("spec", ["{a},", ",{a}", "{a}, "])
def test_a_parallel_source_with_an_empty_side_names_the_empty_file_name(tmp_path, spec):
    """data.source="train.en," (a trailing comma) was refused as "is a directory, not a file: ." (the
    empty name read as the current folder, which the user never named); now the empty name is said."""
    from clusterlm.data.sft import read_records
    from clusterlm.errors import DataError

    (tmp_path / "a.en").write_text("x\n")
    given = spec.format(a=tmp_path / "a.en")
    with pytest.raises(DataError, match=r"has an empty file name beside the comma; give a .jsonl or .tsv") as e:
        read_records(given, "sft")
    assert "directory" not in str(e.value)


@pytest.mark.parametrize("record, line", [
    ({"prompt": "p", "completion": 5}, "field 'completion' must be a non-empty string, got 5"),
    ({"prompt": ["p"], "completion": "c"}, "field 'prompt' must be a string, got ['p']"),
    ({"prompt": "p", "completion": None}, "field 'completion' must be a non-empty string, got None"),
    ({"prompt": "p", "references": []},
     "field 'references' must be a non-empty list whose first item is a non-empty string, got []"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]},
     "messages[1] must be an object with string 'role' and 'content' ('content' is 3)"),
    ({"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]},
     "messages[0] must be an object with string 'role' and 'content' (no 'role')"),
])
def test_a_field_of_the_wrong_type_is_named_with_what_it_holds(tmp_path, record, line):
    """Wrong types in SFT JSONL fields: the message was "'prompt' must be a string and 'completion' a
    non-empty string" whichever field was wrong (a 'references' one too), without the value; now it names
    the field and what it holds (as the classify reader does: "field 'label' must be ..., got None")."""
    from clusterlm.data.sft import read_records
    from clusterlm.errors import DataError

    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"prompt": "ok", "completion": "fine"}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError) as e:
        read_records(str(f), "sft")
    assert str(e.value) == f"{f}:2: {line}"


def test_lora_from_scratch_is_refused_before_data_is_written(chat, tmp_path, capsys):
    """LoRA with an empty init_from froze the random initial weights and trained only adapters on them
    (docs/finetune.md: LoRA adapts a base); now one line naming both options, exit 2, nothing written."""
    root = tmp_path / "scratch"
    args = ["finetune", "--finetune.task=sft", "--finetune.lora_rank=2", f"--data.source={json.dumps(str(chat))}",
            f"--data.dir={json.dumps(str(root / 'data'))}", f"--train.out_dir={json.dumps(str(root / 'out'))}",
            "--model.preset=gpt-nano", "--model.n_layers=1", "--model.max_seq_len=32", "--train.seq_len=32",
            "--train.max_steps=1", "--train.tensorboard=false"]
    capsys.readouterr()
    assert cli(args) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "finetune.lora_rank=2 with an empty finetune.init_from" in err and "finetune.lora_rank=0" in err, err
    assert not root.exists()


def test_responses_beyond_seq_len_are_refused_when_nothing_would_train(base, tmp_path, capsys, caplog):
    """Prompts longer than train.seq_len + 1 tokens cut every response away: the run trained steps of loss
    0.0000 and grad_norm 0, saved checkpoints, then failed at validation with "evaluate_loss: no tokens to
    score". Now one line before training (exit 2, nothing written); some such examples: a warning counts them."""
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"prompt": "1+1=2. " * 6 + f"{i}+1=", "completion": str(i + 1)}) + "\n"
                            for i in range(10)))
    capsys.readouterr()
    assert cli(_ft(base, long, tmp_path / "bad", "--finetune.pack=false")) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "every one of its 9 examples has its response beyond the first 33 tokens (train.seq_len=32 + 1)" in err
    assert "raise train.seq_len" in err and not (tmp_path / "bad").exists()

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(long.read_text() + "".join(json.dumps({"prompt": f"{i}+2=", "completion": str(i + 2)}) + "\n"
                                                for i in range(30)))
    caplog.set_level("WARNING")
    assert cli(_ft(base, mixed, tmp_path / "ok", "--data.val_fraction=0")) == 0
    assert any("10 of 40 examples have their response beyond the first 33 tokens" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("suffix, line, body", [
    (".tsv", 3, "sentence\tlabel\nthe film\tpos\nbad film\t\nok film\tneg\n"),
    (".jsonl", 2, "".join(json.dumps(r) + "\n" for r in ({"text": "a", "label": "pos"}, {"text": "b", "label": " "},
                                                      {"text": "c", "label": "neg"}))),
])
def test_an_empty_label_is_named_with_its_line(tmp_path, suffix, line, body):
    """A classify record with an empty label became a nameless class, refused later as "model.labels=['', 'neg',
    'pos'] has an empty name" without the file or line; now the reader names them (finetune and eval alike)."""
    from clusterlm.data.sft import read_records
    from clusterlm.errors import DataError

    f = tmp_path / f"cls{suffix}"
    f.write_text(body)
    with pytest.raises(DataError, match=rf"^{f}:{line}: field 'label' is empty \(got '\s*'\); a label is a non-empty"):
        read_records(str(f), "classify")


def test_options_another_task_uses_are_named_once_not_ignored_in_silence(base, chat, tmp_path, caplog):
    """finetune.pool/class_weights on an SFT run, finetune.prompt_loss on a classifier and data.tokenizer on a
    fine-tune from a base changed nothing and said nothing; now one warning names each (the run still
    trains: a recipe may share keys between tasks), and a run that sets none of them says nothing."""
    cases = [
        (_ft(base, chat, tmp_path / "sft", "--finetune.pool=max", "--finetune.class_weights=balanced",
             "--data.tokenizer=byte"),
         ["finetune.task='sft' does not use finetune.class_weights='balanced', finetune.pool='max': ignored",
          "data.tokenizer='byte' is not used", "(char, "]),
    ]
    labelled = tmp_path / "labels.tsv"
    labelled.write_text("sentence\tlabel\n" + "".join(f"{a} plus {b}\t{'big' if a + b > 4 else 'small'}\n"
                                                      for a in range(5) for b in range(5)))
    classify = [a.replace("--finetune.task=sft", "--finetune.task=classify") for a in
                _ft(base, labelled, tmp_path / "cls", "--finetune.prompt_loss=true", "--finetune.pack=false")]
    cases.append((classify, ["finetune.task='classify' does not use finetune.pack=False, "
                             "finetune.prompt_loss=True: ignored"]))
    for args, wanted in cases:
        caplog.clear()
        with caplog.at_level("WARNING", logger="clusterlm"):
            assert cli(args) == 0, caplog.text
        said = " | ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
        for w in wanted:
            assert w in said, said
    caplog.clear()  # data.tokenizer given as the base's own kind: nothing ignored, nothing said
    with caplog.at_level("WARNING", logger="clusterlm"):
        assert cli(_ft(base, chat, tmp_path / "plain", "--data.tokenizer=char")) == 0
    assert "does not use" not in caplog.text and "is not used" not in caplog.text, caplog.text


def test_a_recipe_shape_key_set_to_its_default_is_held_against_the_base_too(base, chat, tmp_path, capsys):
    """The base has 1 layer. A recipe (or --model.n_layers) asking for 4 layers, the default, could not be
    told from one that left n_layers unset: the run silently took the base's 1 layer while the recipe
    said 4 (6 was refused). Now a key the recipe or the command line sets is checked whatever its value;
    a [model] section that leaves it out still takes the base's."""
    from clusterlm.config import load_run_config
    from clusterlm.models.config import ModelConfig

    assert ModelConfig().n_layers == 4
    recipe = tmp_path / "sft.toml"
    recipe.write_text("[model]\nn_layers = 4\n")
    capsys.readouterr()
    for where, args in (("recipe", [str(recipe)]), ("command line", ["--model.n_layers=4"])):
        root = tmp_path / where.replace(" ", "_")
        cmd = _ft(base, chat, root)
        assert cli([cmd[0], *args, *cmd[1:]]) == EXIT_USAGE, where
        err = capsys.readouterr().err.strip().splitlines()
        assert "has n_layers=1 but the recipe's [model] asks for n_layers=4" in err[-1], err
        assert not (root / "data").exists() and not (root / "out").exists()
    assert "model.n_layers" in load_run_config(recipe).given and not load_run_config(None).given
    recipe.write_text("[model]\ndropout = 0.0\n")
    assert cli([_ft(base, chat, tmp_path / "ok")[0], str(recipe), *_ft(base, chat, tmp_path / "ok")[1:]]) == 0


def test_the_default_tokenizer_kind_given_explicitly_against_another_base_is_named(caplog):
    """data.tokenizer = "char" is the default: given in the recipe or on the command line against a BPE
    base it is ignored like any other kind, and says so; left unset it says nothing."""
    from types import SimpleNamespace

    from clusterlm.config import DataConfig
    from clusterlm.finetune.data import _warn_tokenizer_ignored

    bpe = SimpleNamespace(kind="bpe", vocab_size=300)
    with caplog.at_level("WARNING", logger="clusterlm"):
        _warn_tokenizer_ignored(DataConfig(), bpe, "runs/lm", frozenset())
        assert not caplog.records
        _warn_tokenizer_ignored(DataConfig(tokenizer="char"), bpe, "runs/lm", frozenset({"data.tokenizer"}))
    assert "data.tokenizer='char' is not used" in caplog.text and "(bpe, 300 tokens)" in caplog.text
