"""What `generate`, `chat` and `eval` tell a user about options that cannot apply, on a tiny random model.

Run: .venv/bin/python -m pytest -q tests/e2e/test_inference_cli_notes.py

Reference: greedy decoding (temperature below sampling.GREEDY_TEMPERATURE) draws no random numbers,
so the output is the same for every --seed (checked here on the text itself).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from clusterlm.cli import main as cli
from tests.helpers import random_checkpoint

QA = Path(__file__).resolve().parents[1] / "unit" / "fixtures" / "tasks" / "qa.jsonl"
NOTE = "has no effect with greedy decoding"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("notes"), "byte", "", bpe_vocab=0, n_layers=1, context=128)


def _notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if NOTE in r.getMessage()]


@pytest.mark.parametrize("extra, want", [
    (["--temperature", "0"], "--seed=7 has no effect with greedy decoding (--temperature 0): every seed gives the "
                             "same output; give --temperature > 0 to sample"),
    (["--temperature", "1e-9"], "--seed=7 has no effect with greedy decoding (--temperature 1e-09)"),
    (["--temperature", "0.8"], None),
])
def test_generate_seed_with_greedy_is_noted(run, capsys, caplog, extra, want):
    """generate --seed with greedy decoding printed the same text for every seed without a word: one note,
    exit 0, the text unchanged by the seed; sampling (temperature 0.8) gets no note."""
    outs = []
    for seed in ("7", "8"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert cli(["generate", str(run), "--prompt", "ab", "--max-new-tokens", "8", "--seed", seed, *extra]) == 0
        outs.append(capsys.readouterr().out)
        if seed == "7":
            notes = _notes(caplog)
    if want is None:
        assert notes == []
    else:
        assert len(notes) == 1 and notes[0].startswith(want) and outs[0] == outs[1]


def test_chat_seed_with_greedy_is_noted(run, capsys, caplog, monkeypatch):
    """chat --seed --temperature 0: the same one note, once (not per turn)."""
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\nagain\n\n"))
    with caplog.at_level(logging.WARNING):
        assert cli(["chat", str(run), "--max-new-tokens", "4", "--temperature", "0", "--seed", "3"]) == 0
    assert _notes(caplog) == ["--seed=3 has no effect with greedy decoding (--temperature 0): every seed gives the "
                              "same output; give --temperature > 0 to sample"]


def test_eval_task_seed_with_greedy_default_is_noted(run, capsys, caplog):
    """eval --task decodes greedily by default: --seed alone changes nothing, and says so; with
    --temperature > 0 it seeds the sampling, no note."""
    with caplog.at_level(logging.WARNING):
        assert cli(["eval", str(run), "--task", str(QA), "--max-new-tokens", "4", "--seed", "5"]) == 0
    assert _notes(caplog) == ["--seed=5 has no effect with greedy decoding (--temperature 0, the default): every seed "
                              "gives the same output; give --temperature > 0 to sample"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert cli(["eval", str(run), "--task", str(QA), "--max-new-tokens", "4", "--seed", "5",
                    "--temperature", "0.5"]) == 0
    assert _notes(caplog) == []


@pytest.mark.parametrize("width, memory, start", [
    ("300", None, "--num-beams=300 is wider than the model's vocabulary (259 tokens)"),
    ("4", 4096, "--num-beams=4 needs about"),
])
def test_eval_beam_width_refusal_names_the_cli_option(run, capsys, monkeypatch, width, memory, start):
    """`eval --task --num-beams W` refused a width past the vocabulary (or the memory) with the library's
    keyword, "num_beams=300 ...": the user sees the option they typed, one line, exit 2, nothing on stdout."""
    if memory is not None:
        monkeypatch.setattr("clusterlm.train.memcheck.available_memory", lambda dev: (memory, None))
    assert cli(["eval", str(run), "--task", str(QA), "--max-new-tokens", "4", "--num-beams", width]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"clusterlm eval: error: {start}") and "num_beams" not in line, line
    if memory is not None:
        assert line.endswith("use a shorter output or source") or "use --num-beams <= " in line
    assert captured.out == ""


def test_beam_width_library_message_keeps_its_keyword(run):
    """A library caller of beam_search still reads its own keyword (num_beams=...), and a ValueError."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.generate.beam import check_beam_width

    model = load_for_inference(run).model
    with pytest.raises(ValueError, match=r"^num_beams=300 is wider than the model's vocabulary \(259 tokens\)"):
        check_beam_width(model, 300, max_new_tokens=4, input_len=3)


@pytest.mark.parametrize("command", ["generate", "chat", "eval"])
@pytest.mark.parametrize("extra, want", [
    (["--temperature", "-1"], "--temperature=-1.0 must be a finite number >= 0 (below 1e-06 = greedy)"),
    (["--top-k", "0"], "--top-k=0 must be an integer >= 1, or left out to keep every token"),
    (["--top-p", "2"], "--top-p=2.0 must be in (0, 1], or left out to keep every token"),
])
def test_bad_sampling_options_are_named_as_options(run, capsys, monkeypatch, command, extra, want):
    """generate/chat/eval refused --top-k 0 as "top_k=0 must be ..., or None to keep every token": Python's
    keyword and a None the command line cannot pass. Now the option and "left out", one line, exit 2."""
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
    task = ["--task", str(QA)] if command == "eval" else []
    assert cli([command, str(run), *task, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"clusterlm {command}: error: {want}" and captured.out == ""


def test_eval_empty_stop_names_the_option(run, capsys):
    """eval --task --stop '' was refused as "stops=['']: a stop string must not be empty" (eval.lm's
    keyword, after loading the model); now the option, one line, exit 2."""
    assert cli(["eval", str(run), "--task", str(QA), "--stop", "x", "--stop", ""]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == ("clusterlm eval: error: --stop '' is empty: a stop string needs at least one "
                                    "character; leave --stop out for the default (a newline when every reference is "
                                    "one line)") and captured.out == ""


@pytest.mark.parametrize("extra, want", [
    (["--lm-eval", ""], "--lm-eval '' names no task; give lm-eval task names, comma-separated (`lm-eval ls tasks` "
                        "lists them)"),
    (["--lm-eval", " , "], "--lm-eval ' , ' names no task"),
    (["--lm-eval", "hellaswag", "--num-fewshot", "-1"], "--num-fewshot=-1 must be >= 0 (0 = zero-shot); leave it out "
                                                        "for each task's own number"),
])
def test_eval_lm_eval_bad_task_list_or_fewshot(run, capsys, monkeypatch, extra, want):
    """--lm-eval '' fell through to the loss on the config's data split (a message about data.dir), ' , '
    reached lm-eval as no task, and --num-fewshot -1 ran with "n-shot": -1: each one line, exit 2, before
    lm-eval runs."""
    def not_reached(*a, **k):
        raise AssertionError("lm-eval was run")

    monkeypatch.setattr("clusterlm.eval.evaluate.evaluate_lm_eval_tasks", not_reached)
    assert cli(["eval", str(run), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip().startswith(f"clusterlm eval: error: {want}") and captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1


def test_generate_greedy_num_samples_is_noted(run, capsys, caplog):
    """generate --num-samples 3 --temperature 0 printed the same text 3 times without a word (beam search
    refuses --num-samples for that reason): one note, exit 0, the samples as before (identical)."""
    with caplog.at_level(logging.WARNING):
        assert cli(["generate", str(run), "--prompt", "ab", "--max-new-tokens", "6", "--temperature", "0",
                    "--num-samples", "3"]) == 0
    texts = capsys.readouterr().out.split("-----\n")[1:]
    assert len(texts) == 3 and len(set(t.split("-----")[0] for t in texts)) == 1
    notes = [r.getMessage() for r in caplog.records if "--num-samples" in r.getMessage()]
    assert notes == ["--num-samples=3 with greedy decoding (--temperature 0) prints the same text 3 times; give "
                     "--temperature > 0 to sample different ones"]


@pytest.mark.parametrize("command", ["generate", "eval", "export"])
def test_a_hugging_face_folder_is_named_as_one(run, tmp_path, capsys, command):
    """generate/eval/export on a Hugging Face folder (what `export` writes) said "not a valid checkpoint:
    manifest.json is missing (the save did not finish)", as if a save had crashed; now it says what the
    folder is and the command that converts it."""
    hf = tmp_path / "hf"
    assert cli(["export", str(run), "--out", str(hf)]) == 0
    capsys.readouterr()
    assert cli([command, str(hf), *(["--out", str(tmp_path / "x")] if command == "export" else [])]) == 2
    assert capsys.readouterr().err.strip() == (
        f"clusterlm {command}: error: {hf} is a Hugging Face folder (config.json), not a clusterlm checkpoint; "
        f"convert it first: clusterlm convert --from-hf {hf} --out RUN_DIR")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, error", [
    (["eval", "RUN", "--task", "shakespeare_word_order", "--limit", "2", "--seed", "1"],
     "--seed set how generate tasks decode"),
    (["generate", "NOWHERE", "--temperature", "0", "--seed", "1"], "does not exist"),
])
def test_a_refused_command_prints_no_seed_note(run, tmp_path, capsys, caplog, argv, error):
    """The greedy --seed note came before a refusal of the same command (two lines for one bad input):
    a refused command prints its error line only."""
    argv = [str(run) if a == "RUN" else str(tmp_path / "nowhere") if a == "NOWHERE" else a for a in argv]
    with caplog.at_level(logging.WARNING):
        assert cli(argv) == 2
    assert error in capsys.readouterr().err and _notes(caplog) == []


def test_generate_refused_after_loading_prints_no_greedy_note(run, capsys, caplog):
    """--src on a decoder-only model is refused after the checkpoint loads: no --seed/--num-samples note
    before that one error line."""
    with caplog.at_level(logging.WARNING):
        assert cli(["generate", str(run), "--src", "x", "--temperature", "0", "--seed", "1", "--num-samples", "2"]) == 2
    assert "--src is for encoder-decoder models" in capsys.readouterr().err
    assert [r.getMessage() for r in caplog.records if "greedy" in r.getMessage()] == []
