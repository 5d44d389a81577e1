"""Task evaluation during training ([eval] in a recipe): records at the right steps, TensorBoard
scalars, the report's plots and summary, scores equal to `clusterlm eval`'s on the same weights,
training losses untouched, bad tasks refused before training, and the rank split of the harness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clusterlm.config import load_run_config
from tests.helpers import train_losses

TEXT = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 6,
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles\n" * 6,
    "And by opposing end them. To die: to sleep;\nNo more; and by a sleep to say we end\n" * 6,
]
CHOICES = [("To be, or not", [" to be", " be to", "the sea"], 0),
           ("Whether 'tis", [" arms", " nobler in"], 1),
           ("The slings and", ["sea of", " arrows of", " to sleep", "question"], 1),
           ("No more; and by", [" a sleep", "them"], 0),
           ("Or to take arms", [" against", " to be"], 0)]


def write_tasks(root: Path) -> dict[str, Path]:
    """A 7-example choice task (2 to 4 choices) and a 5-example generate task, in the corpus's characters."""
    choice, gen = root / "tiny_choice.jsonl", root / "tiny_gen.jsonl"
    with open(choice, "w") as f:
        f.write(json.dumps({"kind": "choice", "name": "tiny_choice"}) + "\n")
        for i in range(7):
            ctx, opts, gold = CHOICES[i % len(CHOICES)]
            f.write(json.dumps({"context": ctx, "choices": opts, "gold": (gold + i // 5) % len(opts)}) + "\n")
    with open(gen, "w") as f:
        f.write(json.dumps({"kind": "generate", "name": "tiny_gen"}) + "\n")
        for ctx, opts, gold in CHOICES:
            f.write(json.dumps({"prompt": ctx, "references": [opts[gold].strip()]}) + "\n")
    return {"choice": choice, "generate": gen}


def prepare_corpus(root: Path) -> Path:
    from clusterlm.data.prepare import prepare

    (root / "corpus").mkdir(parents=True)
    for i, t in enumerate(TEXT * 3):
        (root / "corpus" / f"d{i}.txt").write_text(t)
    prepare([str(root / "corpus")], root / "data", tokenizer="char", val_fraction=0.2)
    return root / "data"


def run_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"--data.dir={data}", f"--train.out_dir={out}", "--model.preset=llama-nano", "--model.max_seq_len=32",
            "--model.dropout=0.1",  # dropout draws from the global RNG: eval must leave it where it was
            "--train.seq_len=32", "--train.micro_batch_size=4", "--train.max_steps=6", "--train.device=cpu",
            "--train.threads=1", "--train.eval_interval=0", "--train.log_interval=1", "--checkpoint.interval=0",
            *extra]


def task_records(run: Path) -> dict[str, list[dict]]:
    from clusterlm.train.metrics import read_metrics

    out: dict[str, list[dict]] = {}
    for r in read_metrics(run / "metrics.jsonl"):
        if r.get("kind") == "task":
            out.setdefault(r["task"], []).append(r)
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("tt")
    return prepare_corpus(root), write_tasks(root)


def test_eval_during_training(corpus, tmp_path):
    """[eval] every=4 over 6 steps scores both tasks at steps 4 and 6 (the end); the records' scores
    equal run_task on the final checkpoint (`clusterlm eval`'s code), TensorBoard holds
    task/<name>/<metric> at those steps, `clusterlm report` draws one plot per task and puts the last
    scores in summary.md; and the per-step training losses equal, bit for bit, a run without [eval]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.eval.harness import DecodeOptions, resolve_task, run_task
    from clusterlm.train.loop import train
    from clusterlm.train.report import write_report

    data, tasks = corpus
    with_eval, without = tmp_path / "with", tmp_path / "without"
    tasks_toml = json.dumps([str(tasks["choice"]), str(tasks["generate"])])
    r = train(load_run_config(None, run_args(data, with_eval, f"--eval.tasks={tasks_toml}", "--eval.every=4",
                                             "--eval.max_new_tokens=6", "--eval.batch_size=3")))
    assert r.exit_code == 0 and r.step == 6
    assert train(load_run_config(None, run_args(data, without, "--train.tensorboard=false"))).exit_code == 0

    a, b = train_losses(with_eval), train_losses(without)
    assert sorted(a) == list(range(1, 7)) and a == b  # floats compared exactly

    recs = task_records(with_eval)
    assert sorted(recs) == ["tiny_choice", "tiny_gen"]
    for name, rs in recs.items():
        assert [x["step"] for x in rs] == [4, 6], name
        assert [x["tokens"] for x in rs] == [4 * 128, 6 * 128]
        assert rs[0]["wall_s"] < rs[1]["wall_s"] and all(x["eval_s"] >= 0 for x in rs)
    # wall_s - scoring_s is the run's time without task scoring: the same for every task scored at one step
    # (the second task's scoring_s counted the first's scoring at that step, which wall_s does not hold)
    for i in range(2):
        choice, gen = recs["tiny_choice"][i], recs["tiny_gen"][i]
        assert (choice["wall_s"], choice["scoring_s"]) == (gen["wall_s"], gen["scoring_s"])
    assert recs["tiny_choice"][0]["scoring_s"] == 0
    assert recs["tiny_gen"][1]["scoring_s"] == pytest.approx(sum(r[0]["eval_s"] for r in recs.values()))
    assert recs["tiny_choice"][-1]["n"] == 7 and recs["tiny_choice"][-1]["task_kind"] == "choice"
    assert set(recs["tiny_choice"][-1]["metrics"]) == {"acc", "acc_norm"}
    assert {"bleu", "chrf", "rougeL", "exact_match", "f1"} <= set(recs["tiny_gen"][-1]["metrics"])

    loaded = load_for_inference(with_eval, device="cpu")
    decode = DecodeOptions(max_new_tokens=6, seed=0)
    for name, path in (("tiny_choice", tasks["choice"]), ("tiny_gen", tasks["generate"])):
        ref, _ = run_task(loaded.model, loaded.tokenizer, resolve_task(str(path)), decode=decode, progress=False)
        for key, value in recs[name][-1]["metrics"].items():
            assert value == pytest.approx(ref[key], abs=1e-9), (name, key)

    ea = EventAccumulator(str(with_eval / "tb"))
    ea.Reload()
    acc = ea.Scalars("task/tiny_choice/acc")
    assert [e.step for e in acc] == [4, 6]
    assert [e.value for e in acc] == pytest.approx([x["metrics"]["acc"] for x in recs["tiny_choice"]], abs=1e-6)
    assert [e.step for e in ea.Scalars("task/tiny_gen/chrf")] == [4, 6]

    paths = write_report(with_eval)
    for name in ("task_tiny_choice", "task_tiny_gen"):
        assert paths[name] == with_eval / "plots" / f"{name}.png" and paths[name].stat().st_size > 5000
    summary = paths["summary"].read_text()
    last = recs["tiny_choice"][-1]["metrics"]["acc"]
    assert "## Task scores during training" in summary
    assert f"| tiny_choice | choice | 7 | 6 | acc | {last:.4g} |" in summary
    assert "| tiny_gen | generate | 5 | 6 | chrf |" in summary
    assert "![task_tiny_choice](plots/task_tiny_choice.png)" in summary


def test_task_scoring_time_counts_the_segments_before_a_resume(corpus, tmp_path):
    """scoring_s is the scoring inside wall_s, and wall_s counts the segments before a resume: scoring_s did
    not (it started again at 0), so wall_s - scoring_s jumped up by the earlier scoring after a resume. The
    scoring time is now in the run state: at step 6 of a run resumed at 4, scoring_s holds steps 2 and 4's."""
    from clusterlm.train.loop import train

    data, tasks = corpus
    run = tmp_path / "r"
    args = (f"--eval.tasks={json.dumps([str(tasks['choice'])])}", "--eval.every=2", "--train.tensorboard=false")
    assert train(load_run_config(None, run_args(data, run, *args, "--train.max_steps=4"))).step == 4
    assert train(load_run_config(None, run_args(data, run, *args, "--train.resume=auto"))).step == 6
    rs = task_records(run)["tiny_choice"]
    assert [r["step"] for r in rs] == [2, 4, 6]
    assert rs[0]["scoring_s"] == 0 and rs[1]["scoring_s"] == pytest.approx(rs[0]["eval_s"])
    assert rs[2]["scoring_s"] == pytest.approx(rs[0]["eval_s"] + rs[1]["eval_s"])


def test_bad_tasks_are_refused_before_training(corpus, tmp_path):
    """An unknown task name (the message lists the bundled ones) and tasks longer than the model's
    context (log-likelihood requests, prompts; named, with the key that allows truncation) stop the
    run at start-up: no metrics, no checkpoint."""
    from clusterlm.errors import ConfigError, DataError
    from clusterlm.train.loop import train

    data, _ = corpus
    with pytest.raises(DataError, match="shakespeare_word_order"):
        train(load_run_config(None, run_args(data, tmp_path / "a", '--eval.tasks=["no_such_task"]')))
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"context": "To be, or not to be, that is the question: " * 2,
                                "choices": [" to", " be"], "gold": 0}) + "\n")
    with pytest.raises(DataError, match=r"task 'long': 2 of 2 requests do not fit .*\(eval.truncate, --truncate\)"):
        train(load_run_config(None, run_args(data, tmp_path / "b", f"--eval.tasks={json.dumps([str(long)])}")))
    long_prompt = tmp_path / "long_gen.jsonl"
    long_prompt.write_text(json.dumps({"prompt": "To be, or not to be, " * 3, "references": ["that"]}) + "\n")
    with pytest.raises(DataError, match=r"task 'long_gen': 1 of 1 prompts do not fit .*\(eval.truncate, --truncate\)"):
        train(load_run_config(None, run_args(data, tmp_path / "c", f"--eval.tasks={json.dumps([str(long_prompt)])}")))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b" / "metrics.jsonl").exists()
    assert not (tmp_path / "b" / "checkpoints").exists()
    # two files of one name: their records were logged as one task (one series, one plot)
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "t.jsonl").write_text(json.dumps({"context": "To be", "choices": [" a", " b"], "gold": 0}))
    both = json.dumps([str(tmp_path / "x" / "t.jsonl"), str(tmp_path / "y" / "t.jsonl")])
    with pytest.raises(ConfigError, match=r"eval.tasks: '.*x/t.jsonl' and '.*y/t.jsonl' are both named 't'"):
        train(load_run_config(None, run_args(data, tmp_path / "d", f"--eval.tasks={both}")))
    assert not (tmp_path / "d" / "metrics.jsonl").exists()


@pytest.mark.parametrize("kind,pad,temperature", [("choice", False, 0.0), ("choice", True, 0.0),
                                                  ("generate", False, 0.0), ("generate", False, 0.8)])
def test_run_task_split_equals_run_task(corpus, kind, pad, temperature):
    """run_task_split over 4 workers (their answers gathered by calling each worker's block here)
    gives run_task's metrics and samples: 18 choice requests and 5 prompts do not divide by 4 (the
    last prompt block is empty), padded blocks included; a sampled generation too (each prompt's seed
    is seed + its index in the task)."""
    import torch

    from clusterlm.data.shards import read_meta
    from clusterlm.eval.harness import (DecodeOptions, model_outputs, resolve_task, run_task, run_task_split, share,
                                        task_requests)
    from clusterlm.models.build import build_model
    from clusterlm.models.config import ModelConfig, preset_values
    from clusterlm.tokenizer import load_tokenizer

    data, tasks = corpus
    tok = load_tokenizer(data / read_meta(data)["tokenizer"]["file"])
    torch.manual_seed(0)
    cfg = ModelConfig(**{**preset_values("llama-nano"), "max_seq_len": 32, "vocab_size": tok.vocab_size})
    model = build_model(cfg)
    model.init_weights(0)
    task = resolve_task(str(tasks[kind]))
    decode = DecodeOptions(max_new_tokens=6, temperature=temperature, seed=3)
    ref_metrics, ref_samples = run_task(model, tok, task, batch_size=2, decode=decode, progress=False)
    req = task_requests(task, decode)
    world = 4
    assert [len(share(len(req.items), r, world)) for r in range(world)] == \
        ([5, 5, 5, 3] if kind == "choice" else [2, 2, 1, 0])
    for rank in range(world):
        def gather(mine: list, rank: int = rank) -> list[list]:
            out = []
            for r in range(world):
                block = share(len(req.items), r, world)
                out.append(mine if r == rank else model_outputs(
                    model, tok, req, [req.items[i] for i in block], batch_size=2, decode=decode,
                    progress=False, seed_offset=block.start))
            return out

        metrics, samples = run_task_split(model, tok, task, rank=rank, world=world, gather=gather, pad=pad,
                                          batch_size=2, decode=decode, progress=False)
        assert metrics == ref_metrics  # acc, acc_norm, BLEU, ... exactly
        if kind == "generate":
            assert [s["prediction"] for s in samples] == [s["prediction"] for s in ref_samples]
        else:
            for s, t in zip(samples, ref_samples):
                assert s["prediction"] == t["prediction"]
                assert s["logprobs"] == pytest.approx(t["logprobs"], abs=1e-4)
    if kind == "generate":
        with pytest.raises(ValueError, match="pad=True needs log-likelihood"):
            run_task_split(model, tok, task, rank=0, world=2, gather=lambda a: [a, a], pad=True, progress=False)
