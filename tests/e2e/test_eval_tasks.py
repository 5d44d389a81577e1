"""`clusterlm eval RUN --task ...` as a user runs it: task files of each kind in, JSON scores and a
per-example JSONL out, bad input one line and exit 2.

References: the scores recomputed from the per-example samples (choice: accuracy = mean(prediction ==
gold); classify: accuracy and the confusion matrix from the samples' predictions) and the reference
libraries called directly on the samples' predictions (sacrebleu for BLEU); the same task scored through
the library (eval.harness.run_task) in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clusterlm.cli import main as cli
from tests.helpers import chat_run, train_tiny_byte_run

TEXT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(300))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A byte-level llama-nano (context 48) trained 30 steps on a tiny corpus."""
    return train_tiny_byte_run(tmp_path_factory.mktemp("tasks"), TEXT, context=48)


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _eval(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert cli(["eval", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_choice_classify_and_generate_tasks(run, tmp_path, capsys):
    """Three task kinds in one call: the JSON holds each task's metrics and n; the samples file has one
    record per example, and the scores recomputed from it (and by sacrebleu directly) are the same."""
    import sacrebleu

    choice = _write(tmp_path / "choice.jsonl", [
        {"kind": "choice", "context": f"Line {i}: the quick brown", "choices": [" fox", " cat", " lazy dog"],
         "gold": 0} for i in range(6)])
    classify = _write(tmp_path / "sent.jsonl", [{"kind": "classify", "labels": ["fox", "dog"]}] + [
        {"text": f"Line {i}: the quick brown", "label": "fox" if i % 2 else "dog"} for i in range(6)])
    gen = _write(tmp_path / "gen.jsonl", [
        {"kind": "generate", "prompt": f"Line {i}: the quick", "references": [" brown fox jumps"]} for i in range(5)])
    samples = tmp_path / "samples.jsonl"
    res = _eval(capsys, str(run), "--task", str(choice), "--task", str(classify), "--task", str(gen),
                "--batch-size", "4", "--max-new-tokens", "12", "--samples", str(samples))
    tasks = res["tasks"]
    assert set(tasks) == {"choice", "sent", "gen"}
    recs = [json.loads(x) for x in samples.read_text().splitlines()]
    assert len(recs) == 6 + 6 + 5
    by = {name: [r for r in recs if r["task"] == name] for name in tasks}

    c = tasks["choice"]
    assert c["n"] == 6 and c["kind"] == "choice"
    assert c["acc"] == pytest.approx(sum(r["prediction"] == r["gold"] for r in by["choice"]) / 6)
    assert c["acc_norm"] == pytest.approx(sum(r["prediction_norm"] == r["gold"] for r in by["choice"]) / 6)

    k = tasks["sent"]
    assert k["accuracy"] == pytest.approx(sum(r["correct"] for r in by["sent"]) / 6)
    assert sum(map(sum, k["confusion_matrix"]["matrix"])) == 6

    g = tasks["gen"]
    preds = [r["prediction"] for r in by["gen"]]
    assert g["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [[r["references"][0] for r in by["gen"]]]).score)
    assert g["decoding"]["temperature"] == 0.0 and g["decoding"]["max_new_tokens"] == 12
    assert all(r["tokens"] <= 12 for r in by["gen"])


def test_cli_equals_the_library(run, tmp_path, capsys):
    """--limit keeps the first N; the CLI's scores equal eval.harness.run_task on the loaded checkpoint."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.eval.harness import run_task
    from clusterlm.eval.tasks import load_task

    path = _write(tmp_path / "c.jsonl", [
        {"kind": "choice", "context": f"Line {i}: the", "choices": [" quick", " slow", " red"], "gold": i % 3}
        for i in range(9)])
    res = _eval(capsys, str(run), "--task", str(path), "--limit", "5")
    loaded = load_for_inference(str(run))
    metrics, _ = run_task(loaded.model, loaded.tokenizer, load_task(path, limit=5))
    assert res["tasks"]["c"]["n"] == 5
    assert res["tasks"]["c"]["acc"] == metrics["acc"] and res["tasks"]["c"]["acc_norm"] == metrics["acc_norm"]


@pytest.mark.parametrize("records, fragment", [
    ([{"kind": "choice", "context": "a", "choices": ["b", "c"]}], "gold"),
    ([], "empty"),
    ([{"kind": "generate", "prompt": "x"}], "references"),
])
def test_bad_task_files_exit_2_in_one_line(run, tmp_path, capsys, records, fragment):
    """A missing field (named, with its line), an empty task file, missing references: exit 2, one line."""
    path = _write(tmp_path / "bad.jsonl", records)
    capsys.readouterr()
    assert cli(["eval", str(run), "--task", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err


def test_too_long_inputs_are_refused_or_truncated(run, tmp_path, capsys):
    """A context longer than the model's 48 tokens: exit 2 naming how many, unless --truncate."""
    path = _write(tmp_path / "long.jsonl", [
        {"kind": "choice", "context": "the quick brown fox " * 10, "choices": [" jumps", " sleeps"], "gold": 0},
        {"kind": "choice", "context": "Line 1: the", "choices": [" quick", " slow"], "gold": 0}])
    capsys.readouterr()
    assert cli(["eval", str(run), "--task", str(path)]) == 2
    err = capsys.readouterr().err
    assert "2 of 4 requests" in err and "--truncate" in err
    res = _eval(capsys, str(run), "--task", str(path), "--truncate")
    assert res["tasks"]["long"]["n"] == 2


def test_labels_renaming_one_raw_label_twice_is_refused(tmp_path, capsys):
    """`--labels 0=negative,1=positive,0=neutral`: exit 2 naming the repeated raw label. Before, the
    renaming was a dict that kept the last name, so class 'negative' vanished without a word and the
    scores were of the labels neutral/positive."""
    from tests.helpers import byte_llama_checkpoint

    ckpt, _ = byte_llama_checkpoint(tmp_path)
    tsv = tmp_path / "dev.tsv"
    tsv.write_text("sentence\tlabel\nit is good\t1\nit is bad\t0\n")
    capsys.readouterr()
    assert cli(["eval", str(ckpt), "--task", str(tsv), "--labels", "0=negative,1=positive, 0=neutral"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "renames '0' twice" in err[0], err


def test_a_task_file_with_a_comma_in_its_name_and_three_files(tmp_path, capsys):
    """A task file named 'a,b.jsonl' is read (load_task reads it), and --out naming it is refused; before,
    --task split it into the files 'a' and 'b.jsonl' ("no such file") and --out overwrote it. Three
    comma-separated files are refused naming the count; before, the first one's extension was blamed."""
    from tests.helpers import byte_llama_checkpoint

    ckpt, _ = byte_llama_checkpoint(tmp_path)
    task = _write(tmp_path / "a,b.jsonl", [{"context": "x", "choices": ["y", "z"], "gold": 0}])
    assert _eval(capsys, str(ckpt), "--task", str(task))["tasks"]["a,b"]["n"] == 1
    assert cli(["eval", str(ckpt), "--task", str(task), "--out", str(task)]) == 2
    assert "it would be overwritten" in capsys.readouterr().err
    for lang in ("en", "fr", "de"):
        (tmp_path / f"t.{lang}").write_text("a\n")
    three = ",".join(str(tmp_path / f"t.{lang}") for lang in ("en", "fr", "de"))
    assert cli(["eval", str(ckpt), "--task", three]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "names 3 files; a parallel pair is two" in err[0], err


def test_a_later_task_too_long_is_refused_by_name_before_any_scoring(tmp_path, capsys, monkeypatch):
    """`--task ok.jsonl --task long.jsonl`: 'long' (a prompt past the 64-token context) is refused naming
    it, before 'ok' is scored. Before, 'ok' was scored first (its minutes lost) and the line said
    "1 of 1 prompts do not fit" without saying of which task."""
    import clusterlm.eval.harness as harness
    from tests.helpers import byte_llama_checkpoint

    ckpt, _ = byte_llama_checkpoint(tmp_path)
    ok = _write(tmp_path / "ok.jsonl", [{"context": "a", "choices": ["b", "c"], "gold": 0}])
    long = _write(tmp_path / "long.jsonl", [{"prompt": "x" * 100, "references": "y"}])
    scored = []
    real = harness.run_task
    monkeypatch.setattr(harness, "run_task", lambda model, tok, task, **kw: scored.append(task.name) or
                        real(model, tok, task, **kw))
    capsys.readouterr()
    assert cli(["eval", str(ckpt), "--task", str(ok), "--task", str(long), "--max-new-tokens", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "task 'long': 1 of 1 prompts do not fit the model's context of 64" in err[0], err
    assert scored == []
    res = _eval(capsys, str(ckpt), "--task", str(ok), "--task", str(long), "--max-new-tokens", "4", "--truncate")
    assert res["tasks"]["long"]["n"] == 1 and scored == ["ok", "long"]


def test_a_task_spec_with_an_empty_side_or_a_directory_is_named_as_such(tmp_path):
    """'x.en,' said "no such file ." (Path('') is the current directory) and a directory said "no such file
    DIR"; each is now named for what it is (as fine-tuning's data.source is)."""
    from clusterlm.errors import DataError
    from clusterlm.eval.harness import resolve_task

    (tmp_path / "x.en").write_text("a\n")
    for spec, fragment in ((f"{tmp_path / 'x.en'},", "has an empty file name beside the comma"),
                           (f",{tmp_path / 'x.en'}", "has an empty file name beside the comma"),
                           (str(tmp_path), f"is a directory, not a file: {tmp_path}"),
                           (str(tmp_path / "nope.jsonl"), "no such file")):
        with pytest.raises(DataError, match="shakespeare_next_line") as e:
            resolve_task(spec)
        assert fragment in str(e.value), e.value


def test_unknown_task_name_lists_the_bundled_ones(run, capsys):
    capsys.readouterr()
    assert cli(["eval", str(run), "--task", "no_such_task"]) == 2
    err = capsys.readouterr().err
    assert "shakespeare_next_line" in err and "no_such_task" in err


CHAT = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"}]


def test_chat_task_uses_the_checkpoints_template_and_end_of_turn(tmp_path, capsys):
    """Reference: `clusterlm chat`'s prompt (the checkpoint's template, stop at <|end|>). A chat model
    trained to answer "4<|end|>" in its template scores exact match 100 on a messages task: the prompt
    is the template's and the reply ends at <|end|> (1 token, finish "stop"); before, the harness
    asked in the plain 'User:/Assistant:' format and read on past the end of turn. A checkpoint
    without a template keeps the plain format."""
    task = _write(tmp_path / "chat.jsonl", [{"messages": CHAT, "references": ["4"]}])
    run = chat_run(tmp_path / "tpl", CHAT, "4")
    out = _eval(capsys, str(run), "--task", str(task), "--max-new-tokens", "8", "--samples", str(tmp_path / "s.jsonl"))
    sample = json.loads((tmp_path / "s.jsonl").read_text())
    assert sample["prompt"] == "<|system|>\nBe terse.<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n"
    assert (sample["prediction"], sample["tokens"], sample["finish_reason"]) == ("4", 1, "stop")
    assert out["tasks"]["chat"]["exact_match"] == 100.0 and len(out["tasks"]["chat"]["decoding"]["stop_ids"]) == 1
    plain = chat_run(tmp_path / "plain", CHAT, "4", template=False)
    _eval(capsys, str(plain), "--task", str(task), "--max-new-tokens", "8", "--samples", str(tmp_path / "p.jsonl"))
    assert json.loads((tmp_path / "p.jsonl").read_text())["prompt"] == "System: Be terse.\n\nUser: 2+2?\n\nAssistant:"


def test_evaluate_tasks_takes_the_template_from_the_checkpoint(tmp_path, monkeypatch):
    """Reference: the prompt and answer of the test above (the checkpoint's template, "4" ending at
    <|end|>). evaluate_tasks hands the harness the loaded checkpoint's template (LoadedModel.chat_template)
    itself: with a tokenizer that does not carry it (tokenizer.chat_template None) the chat model is
    still asked in its template; before, the harness read it off the tokenizer only and asked in the
    plain format."""
    import clusterlm.checkpoint.model_io as model_io
    from clusterlm.eval.evaluate import evaluate_tasks
    from clusterlm.eval.harness import DecodeOptions

    load = model_io.load_for_inference

    def load_bare_tokenizer(*args, **kwargs):
        loaded = load(*args, **kwargs)
        loaded.tokenizer.chat_template = None
        return loaded

    monkeypatch.setattr(model_io, "load_for_inference", load_bare_tokenizer)
    task = _write(tmp_path / "chat.jsonl", [{"messages": CHAT, "references": ["4"]}])
    run = chat_run(tmp_path / "tpl", CHAT, "4")
    out = evaluate_tasks(str(run), [str(task)], decode=DecodeOptions(max_new_tokens=8), device="cpu",
                         samples_out=str(tmp_path / "s.jsonl"))
    sample = json.loads((tmp_path / "s.jsonl").read_text())
    assert sample["prompt"] == "<|system|>\nBe terse.<|end|>\n<|user|>\n2+2?<|end|>\n<|assistant|>\n"
    assert (sample["prediction"], sample["finish_reason"]) == ("4", "stop")
    assert out["tasks"]["chat"]["exact_match"] == 100.0
