"""The user's path through the CLI: prepare -> train -> eval -> generate -> chat -> report, and quickstart."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from clusterlm.cli import main as cli

TEXT = "\n".join(f"Line {i}: the quick brown fox jumps over the lazy dog; hey diddle diddle." for i in range(400))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("flow")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"d{i}.txt").write_text(TEXT[i * 1000:(i + 1) * 1000 + 4000])
    data = root / "data"
    assert cli(["prepare", str(corpus), "--out", str(data), "--tokenizer", "byte", "--val-fraction", "0.25"]) == 0
    run = root / "run"
    rc = cli(["train", "--data.dir=" + json.dumps(str(data)), "--train.out_dir=" + json.dumps(str(run)),
              "--model.preset=llama-nano", "--model.max_seq_len=32", "--train.seq_len=32",
              "--train.micro_batch_size=8", "--train.max_steps=60", "--train.eval_interval=30",
              "--train.eval_batches=4", "--train.device=cpu", "--optim.lr=3e-3", "--optim.warmup_steps=5"])
    assert rc == 0
    return data, run


def test_eval_reports_consistent_metrics(trained, tmp_path, capsys):
    """eval's perplexity = exp(loss) and bits/byte = loss*tokens/(ln2*bytes) (byte tokenizer: 1 byte per
    token except the EOS separators), on the whole val split; --out writes the same JSON."""
    data, run = trained
    out = tmp_path / "eval.json"
    assert cli(["eval", str(run), "--out", str(out), "--batch-size", "8"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res == json.loads(out.read_text())
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    meta = json.loads((data / "meta.json").read_text())
    val = meta["splits"]["val"]
    assert res["bytes_per_token"] == pytest.approx(val["bytes"] / val["tokens"])
    assert res["bits_per_byte"] == pytest.approx(res["loss"] / math.log(2) / res["bytes_per_token"])
    assert 0 < res["loss"] < math.log(259)  # better than uniform over the byte vocabulary
    assert res["tokens"] > 0


def test_eval_without_data_of_a_checkpoint_whose_data_dir_is_absent(tmp_path, monkeypatch, capsys):
    """A checkpoint made by convert (or a run evaluated from another cwd) has a data.dir that does not
    exist here: eval said "data/shakespeare_char is not a prepared data directory", a folder the user
    never named; now one line says it is the checkpoint's default and to pass --data."""
    from tests.helpers import random_checkpoint

    monkeypatch.chdir(tmp_path)
    run = random_checkpoint(tmp_path, "byte", "hello world", bpe_vocab=0, n_layers=1, context=16)
    capsys.readouterr()
    assert cli(["eval", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.dir in" in err[0] and "pass --data DIR" in err[0]


def test_eval_seq_len_beyond_the_context_names_the_option(tmp_path, capsys):
    """eval --seq-len above model.max_seq_len: one line naming --seq-len and the largest valid value
    (it said "40 tokens do not fit in model.max_seq_len=16", from the model's forward)."""
    from tests.helpers import random_checkpoint

    run = random_checkpoint(tmp_path, "byte", "hello world", bpe_vocab=0, n_layers=1, context=16)
    (tmp_path / "a.txt").write_text("hello world, " * 40)
    assert cli(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "d"), "--tokenizer", "byte",
                "--val-fraction", "0"]) == 0
    capsys.readouterr()
    assert cli(["eval", str(run), "--data", str(tmp_path / "d"), "--split", "train", "--seq-len", "40"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == ("clusterlm eval: error: --seq-len 40 exceeds the model's context, model.max_seq_len=16; "
                       "give --seq-len 16 or less")


def test_eval_refuses_data_of_another_tokenizer(trained, tmp_path, capsys):
    """A data dir whose tokenizer has the checkpoint's kind and size but other contents (another corpus's
    characters) is refused in one line naming both, exit 2; the ids would otherwise mean other text."""
    import shutil

    data, run = trained
    other = tmp_path / "other"
    shutil.copytree(data, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["edited"] = True  # any change in content: the same kind and vocabulary size
    (other / "tokenizer.json").write_text(json.dumps(tok))
    capsys.readouterr()
    assert cli(["eval", str(run), "--data", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another byte tokenizer of the same size" in err[0] and str(other) in err[0]


def test_generate_is_seeded_and_streams(trained):
    """Same seed -> same text; the prompt is echoed; different seeds differ; greedy is deterministic."""
    from clusterlm.generate.cli import generate_main

    _, run = trained
    outs = []
    for seed in (1, 1, 2):
        buf = io.StringIO()
        assert generate_main([str(run), "--prompt", "Line 3", "--max-new-tokens", "40", "--seed", str(seed)],
                             out=buf) == 0
        outs.append(buf.getvalue())
    assert outs[0] == outs[1] and outs[0] != outs[2]
    assert outs[0].startswith("Line 3")
    g1, g2 = io.StringIO(), io.StringIO()
    generate_main([str(run), "--prompt", "Line", "--temperature", "0", "--max-new-tokens", "20"], out=g1)
    generate_main([str(run), "--prompt", "Line", "--temperature", "0", "--max-new-tokens", "20"], out=g2)
    assert g1.getvalue() == g2.getvalue()


def test_generation_continues_past_the_context(trained):
    """A 32-token-context model still produces --max-new-tokens tokens (sliding window), unless it stops at EOS."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.generate.cli import stream_text

    _, run = trained
    loaded = load_for_inference(run)
    pieces = list(stream_text(loaded, "Line 1", max_new_tokens=100, temperature=0.0, top_k=None, top_p=None,
                              seed=0))
    text = "".join(pieces)
    assert len(text.encode()) == 100 or text  # greedy byte model: 100 bytes unless EOS came first
    assert len(text.encode()) >= 60


def test_chat_reads_turns_from_stdin(trained):
    """chat answers each stdin line with one reply and stops at an empty line."""
    from clusterlm.generate.cli import chat_main

    _, run = trained
    out = io.StringIO()
    assert chat_main([str(run), "--max-new-tokens", "20", "--seed", "0"], stdin=io.StringIO("hello\nagain\n\n"),
                     out=out) == 0
    assert out.getvalue().count("model> ") == 2


def test_report_writes_plots_and_summary(trained):
    _, run = trained
    assert cli(["report", str(run)]) == 0
    for name in ("loss_vs_step.png", "loss_vs_tokens.png", "throughput.png"):
        assert (run / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "val" in (run / "summary.md").read_text().lower()


def test_bad_inputs_exit_2_with_message(trained, tmp_path):
    """Bad checkpoints and arguments give exit 2 and a one-line message, not a traceback."""
    _, run = trained
    for args, fragment in [
        (["eval", str(tmp_path / "nope")], "nope"),
        # output paths are checked before the evaluation runs (its scores were lost at the end)
        (["eval", str(run), "--out", str(tmp_path / "no" / "dir" / "s.json")], "--out"),
        (["eval", str(run), "--out", str(tmp_path)], "is a directory; give a file name"),
        (["eval", str(run), "--task", "x.jsonl", "--samples", str(tmp_path / "no" / "s.jsonl")], "the folder"),
        (["generate", str(run), "--temperature", "-1"], "temperature"),
        (["generate", str(run), "--num-beams", "0"], "--num-beams=0 must be >= 1"),
        (["generate", str(run), "--num-beams", "2"], "clusterlm eval --task ... --num-beams"),
        (["train", "--train.max_steps=0"], "train.max_steps=0"),
        (["prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "d")], "missing.txt"),
    ]:
        r = subprocess.run([sys.executable, "-m", "clusterlm", *args], capture_output=True, text=True)
        assert r.returncode == 2, (args, r.stderr[-2000:])
        assert fragment in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("extra, fragment", [
    (["--length-penalty", "2"], "--length-penalty=2.0 scores beam search only"),
    (["--length-penalty", "nan", "--num-beams", "2"], "--length-penalty=nan must be a finite number"),
])
def test_generate_length_penalty_without_beams_is_refused(tmp_path, capsys, extra, fragment):
    """--length-penalty without --num-beams was accepted and ignored (sampling has no length score);
    a non-finite one went on to the beam search. Both are refused before the checkpoint is read."""
    assert cli(["generate", str(tmp_path / "no-run"), "--prompt", "x", *extra]) == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("command, extra, fragment", [
    ("generate", ["--temperature", "1.5", "--top-k", "5"], "--temperature, --top-k only apply to sampling"),
    ("generate", ["--temperature", "0", "--top-p", "0.9", "--seed", "1"],
     "--temperature, --top-p, --seed only apply to sampling"),
    ("generate", ["--num-samples", "3"], "--num-samples only apply to sampling"),
    ("eval", ["--task", "x.jsonl", "--temperature", "0.7", "--seed", "1"], "--temperature, --seed only apply to sampling"),
])
def test_sampling_options_with_beam_search_are_refused(tmp_path, capsys, command, extra, fragment):
    """Beam search is deterministic: with --num-beams > 1, --temperature, --top-k, --top-p, --seed (and
    generate's --num-samples, which printed the same beam N times) were accepted and silently ignored,
    exit 0. They are refused (exit 2) naming both options, before the checkpoint is read, as
    --length-penalty without --num-beams is."""
    assert cli([command, str(tmp_path / "no-run"), "--num-beams", "2", *extra]) == 2
    err = capsys.readouterr().err
    assert "--num-beams=2 is beam search, which is deterministic: " + fragment in err, err


@pytest.mark.parametrize("extra, fragment", [
    (["--num-beams", "0"], "--num-beams=0 must be >= 1 (1 = no beam search)"),
    (["--length-penalty", "2"], "--length-penalty=2.0 scores beam search only: add --num-beams N"),
    (["--length-penalty", "nan", "--num-beams", "2"], "--length-penalty=nan must be a finite number"),
    (["--max-new-tokens", "0"], "--max-new-tokens=0 must be >= 1"),
])
def test_eval_task_decoding_options_are_checked_as_generate_checks_them(tmp_path, capsys, extra, fragment):
    """`eval --task` decoded greedily with --num-beams 0, ignored --length-penalty without beams, ran
    beam search with a nan length penalty (every score nan) and scored empty answers with
    --max-new-tokens 0, all exit 0; each is refused (exit 2) before the checkpoint is read."""
    assert cli(["eval", str(tmp_path / "no-run"), "--task", "x.jsonl", *extra]) == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("extra, fragment", [
    (["--temperature", "0.5", "--num-beams", "4"],
     "--temperature (for --task), --num-beams (for --task) are not used by the loss on a data split"),
    (["--samples", "S"], "--samples (for --task) is not used by the loss on a data split (no --task or --lm-eval "
                         "given): leave it out"),
    (["--limit", "3", "--truncate"], "--limit (for --task or --lm-eval), --truncate (for --task or --lm-eval) are "
                                     "not used by the loss"),
    (["--task", "x.jsonl", "--data", "D", "--max-batches", "2"],
     "--data (for a data split), --max-batches (for a data split) are not used by --task: leave them out"),
    (["--task", "x.jsonl", "--num-fewshot", "3"], "--num-fewshot (for --lm-eval) is not used by --task"),
    (["--lm-eval", "t", "--seed", "1", "--seq-len", "32"],
     "--seq-len (for a data split), --seed (for --task) are not used by --lm-eval"),
])
def test_eval_options_of_another_mode_are_refused(tmp_path, capsys, extra, fragment):
    """eval's loss on a split, --task and --lm-eval each read some options; the others were ignored,
    exit 0 (--samples without --task wrote no file, --temperature and --num-beams decoded nothing,
    --data with --task was never opened). Options of another mode are refused (exit 2) naming each
    and its mode, before the checkpoint is read."""
    extra = [str(tmp_path / a) if a in ("S", "D") else a for a in extra]
    assert cli(["eval", str(tmp_path / "no-run"), *extra]) == 2
    assert fragment in capsys.readouterr().err


def test_eval_outputs_that_name_an_input_are_refused(tmp_path, capsys):
    """`eval --task t.jsonl --out t.jsonl` overwrote the task file with the scores (and --samples and
    --out naming one file kept only the last written). Refused (exit 2) naming both options, before
    the checkpoint is read; the task file is untouched; /dev/null still takes both."""
    from clusterlm.eval.harness import builtin_tasks

    task = tmp_path / "t.jsonl"
    task.write_text('{"prompt": "a", "references": "b"}\n')
    run = str(tmp_path / "no-run")
    for extra, fragment in [
        (["--task", str(task), "--out", str(task)], f"--out {task} is the file --task {task} names"),
        (["--task", f"{tmp_path / 'a.en'},{tmp_path / '.' / 't.jsonl'}", "--samples", str(task)],
         f"--samples {task} is the file --task {tmp_path / '.' / 't.jsonl'} names"),
        (["--task", str(task), "--out", str(tmp_path / "o"), "--samples", str(tmp_path / "o")],
         f"--out {tmp_path / 'o'} is the file --samples {tmp_path / 'o'} names: it would be overwritten"),
        # a bundled task's file (the installed package's) was not checked: --out replaced it with the scores
        (["--task", "shakespeare_word_order", "--out", str(builtin_tasks()["shakespeare_word_order"])],
         "shakespeare_word_order.jsonl names: it would be overwritten"),
    ]:
        assert cli(["eval", run, *extra]) == 2
        assert fragment in capsys.readouterr().err
    assert task.read_text() == '{"prompt": "a", "references": "b"}\n'
    assert cli(["eval", run, "--task", str(task), "--out", "/dev/null", "--samples", "/dev/null"]) == 2
    assert "is the file" not in capsys.readouterr().err  # refused for the missing checkpoint only


def test_eval_tasks_of_one_name_are_refused(tmp_path, capsys):
    """Two task files of one name (a/t.jsonl, b/t.jsonl) gave one entry in the scores: the second
    replaced the first, exit 0. Refused (exit 2) naming both and how to tell them apart, before the
    checkpoint is read; a task given twice is named as such; a header "name" tells them apart."""
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "t.jsonl").write_text('{"prompt": "a", "references": "b"}\n')
    a, b = str(tmp_path / "a" / "t.jsonl"), str(tmp_path / "b" / "t.jsonl")
    run = str(tmp_path / "no-run")
    assert cli(["eval", run, "--task", a, "--task", b]) == 2
    assert f"tasks {a!r} and {b!r} are both named 't', and their scores would share one entry" in capsys.readouterr().err
    assert cli(["eval", run, "--task", a, "--task", a]) == 2
    assert f"task {a!r} is given twice" in capsys.readouterr().err
    (tmp_path / "b" / "t.jsonl").write_text('{"kind": "generate", "name": "t2"}\n{"prompt": "a", "references": "b"}\n')
    assert cli(["eval", run, "--task", a, "--task", b]) == 2
    assert "no-run" in capsys.readouterr().err  # past the names, to the missing checkpoint


def test_eval_decoding_options_without_a_generate_task_are_refused(tmp_path, capsys):
    """--num-beams, --max-new-tokens, --stop (any decoding option) with only choice or classify tasks
    were ignored (they score log-likelihoods or labels, without decoding), exit 0; refused (exit 2)
    naming the options and the tasks' kinds, before the checkpoint is read. With a generate task
    among them they apply."""
    run = str(tmp_path / "no-run")
    assert cli(["eval", run, "--task", "shakespeare_word_order", "--num-beams", "4", "--max-new-tokens", "7",
                "--stop", "x"]) == 2
    assert ("--max-new-tokens, --stop, --num-beams set how generate tasks decode; 'shakespeare_word_order' (choice) "
            "is scored without decoding: leave them out") in capsys.readouterr().err
    gen = tmp_path / "g.jsonl"
    gen.write_text('{"prompt": "a", "references": "b"}\n')
    assert cli(["eval", run, "--task", "shakespeare_word_order", "--task", str(gen), "--max-new-tokens", "7"]) == 2
    assert "no-run" in capsys.readouterr().err  # past the check, to the missing checkpoint


def test_characters_outside_a_char_vocabulary_are_named(tmp_path):
    """A char model reads characters it never saw as <|unk|>: generate says which, instead of letting
    the model continue text it was not given (this vocabulary has no '€' or '@')."""
    from tests.helpers import random_checkpoint

    run = random_checkpoint(tmp_path, "char", "the quick brown fox " * 20, bpe_vocab=0, n_layers=1, context=16)
    r = subprocess.run([sys.executable, "-m", "clusterlm", "generate", str(run), "--prompt", "the€@",
                        "--max-new-tokens", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 distinct character(s) of the prompt are not in the model's character vocabulary" in r.stderr
    assert "'@€'" in r.stderr


def test_a_refused_pack_prints_nothing_on_stdout(trained):
    """--pack bf16 on a CPU without bf16 matmuls: the refusal comes before a sample's header or the
    chat prompt is printed (stdout had '----- sample 1 -----' and the prompt, then the error)."""
    from clusterlm.optimize.packed import bf16_unavailable

    if bf16_unavailable() is None:
        pytest.skip("this CPU has bf16 matmuls: --pack bf16 is accepted here")
    _, run = trained
    for args in (["generate", str(run), "--prompt", "the", "--max-new-tokens", "3", "--pack", "bf16"],
                 ["chat", str(run), "--pack", "bf16"]):
        r = subprocess.run([sys.executable, "-m", "clusterlm", *args], capture_output=True, text=True, input="hi\n")
        assert r.returncode == 2 and r.stdout == "" and "--pack bf16" in r.stderr, (args, r.stdout, r.stderr[-500:])


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tmp_path):
    """The README's first command, shortened: prepare the bundled corpus, train, evaluate, sample, report."""
    r = subprocess.run([sys.executable, "-m", "clusterlm", "quickstart", "--out", str(tmp_path / "qs"),
                        "--steps", "40", "--minutes", "2", "--samples", "1"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "val loss" in r.stdout and "sample 1" in r.stdout
    assert (tmp_path / "qs" / "checkpoints" / "step-00000040" / "manifest.json").is_file()
    assert (tmp_path / "qs" / "summary.md").is_file()


def test_quickstart_checks_its_options_first_and_samples_0_prints_none(tmp_path, monkeypatch, capsys):
    """Reference: what the user asked for. A bad --minutes, --steps or --samples is refused before
    anything is written, naming only that option (it named both --minutes and --steps); --samples 0
    prints no sample (it failed with 'prompt is empty' after training and evaluating)."""
    from types import SimpleNamespace

    import clusterlm.eval.evaluate as evaluate
    import clusterlm.generate.text as text
    import clusterlm.train.loop as loop
    import clusterlm.train.report as report
    from clusterlm.quickstart import main

    for args, msg in ([["--steps", "0"], "--steps=0 must be >= 1"], [["--minutes", "nan"], "--minutes=nan must be > 0"],
                      [["--samples", "-1"], r"--samples=-1 must be >= 0 \(0: print none\)"]):
        with pytest.raises(ValueError, match=f"^{msg}$"):
            main(["--out", str(tmp_path / "qs"), *args])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(loop, "train", lambda cfg: SimpleNamespace(exit_code=0, checkpoint="ck"))
    monkeypatch.setattr(evaluate, "evaluate_checkpoint",
                        lambda *a, **k: {"loss": 1.0, "perplexity": 2.7, "bits_per_byte": 1.4, "tokens": 10})
    monkeypatch.setattr(evaluate, "evaluate_tasks",
                        lambda out, names, **k: {"tasks": {n: {"acc": 0.5, "n": 4} for n in names}})
    monkeypatch.setattr(text, "sample_texts", lambda *a, **k: pytest.fail("no sample was asked for"))
    monkeypatch.setattr(report, "write_report", lambda out: {})
    (tmp_path / "qs").mkdir()
    assert main(["--out", str(tmp_path / "qs"), "--samples", "0"]) == 0
    assert "[5/5] samples: none (--samples 0)" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["qs \U0001f680", "caf\u00e9 \"x\" \\ y", "tab\there"])
def test_quickstart_trains_in_the_out_folder_as_named(tmp_path, monkeypatch, name):
    """--out with an emoji, quotes, a backslash or a tab is the run's out_dir as given, data/ inside it (an
    emoji became the out_dir '"qs \\ud83d\\ude80"', quotes and escapes included: JSON's surrogate pair
    is no TOML escape, so the override was read as a bare string)."""
    from types import SimpleNamespace

    import clusterlm.train.loop as loop
    from clusterlm.quickstart import main

    seen = []
    monkeypatch.setattr(loop, "train", lambda cfg: seen.append(cfg) or SimpleNamespace(exit_code=75, reason="stop"))
    out = tmp_path / name
    assert main(["--out", str(out)]) == 75
    assert (seen[0].train.out_dir, seen[0].data.dir) == (str(out), str(out / "data"))


def test_eval_batch_size_below_1_is_refused_by_the_parser(tmp_path, capsys):
    """--batch-size 0 is refused as --max-batches 0 and --seq-len 0 are, before a checkpoint is read
    (it was refused only after loading the model and verifying the data's shards)."""
    with pytest.raises(SystemExit) as e:  # argparse's own exit, as from the command line
        cli(["eval", str(tmp_path / "no_run"), "--batch-size", "0"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "clusterlm eval: error: argument --batch-size: '0' is not a whole number >= 1")


def test_chat_tokens_are_not_named_as_unknown_characters(caplog):
    """A chat fine-tune of a char model renders '<|user|>' etc. into the prompt: those are added tokens
    with ids of their own, so only the characters outside them are checked (generate --chat warned
    that '<>nru|' were <|unk|> for a base that had never seen them)."""
    import logging

    from clusterlm.generate.cli import warn_unknown_chars
    from clusterlm.generate.template import CHAT_TOKENS
    from clusterlm.tokenizer.char import CharTokenizer

    tok = CharTokenizer.train(["3+4=7\n"]).with_special_tokens(CHAT_TOKENS)
    with caplog.at_level(logging.WARNING, logger="clusterlm.generate.cli"):
        warn_unknown_chars(tok, "<|user|>\n3+4<|end|>\n<|assistant|>\n", "the prompt")
        assert not caplog.records
        warn_unknown_chars(tok, "<|user|>\n3+4€<|end|>\n", "the prompt")
    assert len(caplog.records) == 1 and "1 distinct character(s)" in caplog.text and "'€'" in caplog.text
