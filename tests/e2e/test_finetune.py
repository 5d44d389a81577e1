"""`clusterlm finetune` end to end on a tiny base: SFT with the chat template (vocabulary grown,
template carried, bit-exact resume), a classifier with LoRA (adapters on their own, merged at load),
DoRA through the CLI (resume, merged at load),
and bad input (one line, exit 2, nothing written).

Run: .venv/bin/python -m pytest -q tests/e2e/test_finetune.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from clusterlm.cli import main as cli
from clusterlm.errors import EXIT_USAGE
from tests.helpers import train_losses

TEXT = "".join(f"{a}+{b}={a + b}. the film was {'good' if a > b else 'bad'}.\n" for a in range(10) for b in range(10))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A char-level gpt-nano trained 30 steps on TEXT."""
    root = tmp_path_factory.mktemp("base")
    (root / "corpus.txt").write_text(TEXT * 3)
    assert cli(["prepare", str(root / "corpus.txt"), "--out", str(root / "data"), "--tokenizer", "char",
                "--val-fraction", "0"]) == 0
    assert cli(["train", f"--data.dir={json.dumps(str(root / 'data'))}", f"--train.out_dir={json.dumps(str(root / 'run'))}",
                "--model.preset=gpt-nano", "--model.max_seq_len=64", "--train.seq_len=64", "--train.micro_batch_size=8",
                "--train.max_steps=30", "--train.eval_interval=0", "--optim.lr=3e-3", "--optim.warmup_steps=3",
                "--train.tensorboard=false"]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("records")
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{a}+{b}"},
                                                     {"role": "assistant", "content": str(a + b)}]}) + "\n"
                            for a in range(10) for b in range(10)))
    cls = root / "cls.tsv"
    cls.write_text("sentence\tlabel\n" + "".join(f"the film was {'good' if (a + b) % 2 else 'bad'}.\t"
                                                f"{'pos' if (a + b) % 2 else 'neg'}\n" for a in range(10) for b in range(8)))
    return {"chat": chat, "cls": cls, "root": root}


def _ft(base: Path, source: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", f"--finetune.init_from={json.dumps(str(base))}", f"--data.source={json.dumps(str(source))}",
            f"--data.dir={json.dumps(str(data))}", f"--train.out_dir={json.dumps(str(out))}", "--train.seq_len=64",
            "--train.micro_batch_size=8", "--train.eval_interval=0", "--optim.warmup_steps=2", "--optim.lr=1e-3",
            "--train.tensorboard=false", "--train.threads=1", *extra]


def test_sft_chat_grows_the_vocabulary_carries_the_template_and_resumes_bit_exactly(base, records, tmp_path):
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.checkpoint.store import load_model_weights, resolve_checkpoint
    from clusterlm.generate.template import CHAT_TOKENS

    args = _ft(base, records["chat"], tmp_path / "data", tmp_path / "a", "--finetune.task=sft",
               "--train.max_steps=12", "--checkpoint.interval=6")
    assert cli(args) == 0
    loaded = load_for_inference(tmp_path / "a")
    base_tok = load_for_inference(base).tokenizer
    assert loaded.chat_template is not None and loaded.chat_template.source == (
        tmp_path / "data" / "chat_template.jinja").read_text()
    assert loaded.tokenizer.vocab_size == base_tok.vocab_size + len(CHAT_TOKENS)
    assert loaded.config.model.vocab_size == loaded.tokenizer.vocab_size
    # the step-6 checkpoint: new rows moved away from their start, old ids kept their meaning
    emb = load_model_weights(resolve_checkpoint(str(tmp_path / "a" / "checkpoints" / "step-00000006")))
    assert emb["tok_embeddings.weight"].shape[0] == loaded.config.model.padded_vocab_size
    # resume from the step-6 checkpoint (the run as a preempted job leaves it) == 12 straight
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000012")
    assert cli(_ft(base, records["chat"], tmp_path / "data", tmp_path / "b", "--finetune.task=sft",
                   "--train.max_steps=12", "--checkpoint.interval=6", "--train.resume=auto")) == 0
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")
    losses = train_losses(tmp_path / "a")
    assert losses[12] < losses[1]
    # `clusterlm eval RUN` of an SFT run: the loss on the held-out responses' tokens, as training scores it
    from clusterlm.eval.evaluate import evaluate_checkpoint

    res = evaluate_checkpoint(str(tmp_path / "a"), device="cpu")
    val = json.loads((tmp_path / "data" / "meta.json").read_text())["splits"]["val"]
    assert res["objective"] == "sft responses" and res["tokens"] == val["trained_tokens"] > 0
    assert 0 < res["loss"] < 10


def test_new_rows_start_at_the_mean_of_the_base_rows(base):
    import dataclasses

    from clusterlm.checkpoint.model_io import read_checkpoint_config
    from clusterlm.checkpoint.store import load_model_weights
    from clusterlm.finetune.setup import base_state, resolve_base

    b = resolve_base(str(base), base)
    v0 = b.config.model.vocab_size
    mcfg = dataclasses.replace(read_checkpoint_config(b.path).model, vocab_size=v0 + 4)
    state = base_state(b, mcfg)
    old = load_model_weights(b.path)["tok_embeddings.weight"]
    new = state["tok_embeddings.weight"]
    assert torch.equal(new[:v0], old[:v0])
    assert torch.allclose(new[v0:v0 + 4], old[:v0].mean(0).expand(4, -1))


def test_lora_classifier_trains_few_parameters_saves_small_adapters_and_merges_at_load(base, records, tmp_path, caplog):
    from clusterlm.checkpoint.model_io import load_for_inference

    caplog.set_level("INFO")
    out = tmp_path / "cls"
    assert cli(_ft(base, records["cls"], tmp_path / "cdata", out, "--finetune.task=classify",
                   "--finetune.lora_rank=2", "--finetune.class_weights=balanced", "--train.max_steps=20",
                   "--optim.lr=3e-3", "--train.eval_interval=10", "--train.micro_batch_size=16")) == 0
    line = next(r.getMessage() for r in caplog.records if "parameters train" in r.getMessage())
    pct = float(line.rsplit("(", 1)[1].split("%")[0])
    assert 0 < pct < 5, line
    adapter = out / "adapter" / "adapter.safetensors"
    model_file = next((out / "checkpoints").glob("step-*/model.safetensors"))
    assert adapter.stat().st_size < 0.05 * model_file.stat().st_size
    evals = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert evals and 0.0 <= evals[-1]["val_accuracy"] <= 1.0 and "val_macro_f1" in evals[-1]
    loaded = load_for_inference(out)  # base + adapters merged: a plain classifier again
    assert loaded.config.model.labels == ("neg", "pos")
    assert not [k for k in loaded.model.state_dict() if "lora" in k]
    tok = loaded.tokenizer
    x = torch.tensor([[tok.eos_id] + tok.encode("the film was good.")])
    assert loaded.model(x).shape == (1, 2)
    # a classifier is not a causal LM: export and generate refuse it in one line
    assert cli(["export", "--out", str(tmp_path / "hf"), str(out)]) == EXIT_USAGE
    assert not (tmp_path / "hf").exists()
    assert cli(["generate", str(out), "--prompt", "the film"]) == EXIT_USAGE
    # serving its adapter folder alone (the head is not in it) is refused before the port is bound,
    # naming the checkpoint to serve as a plain path (it was RUN/adapter/../checkpoints/step-N, after binding)
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "clusterlm", "serve", str(out / "adapter"), "--port", str(port)],
                       capture_output=True, text=True, timeout=120)
    step = next((out / "checkpoints").glob("step-*"))
    assert r.returncode == EXIT_USAGE and f"its head is only in the full checkpoint: serve {step}" in r.stderr, r.stderr
    assert "Uvicorn running" not in r.stderr and "API key" not in r.stdout, (r.stdout, r.stderr)


def test_dora_sft_resumes_bit_exactly_and_merges_at_load(base, records, tmp_path):
    """--finetune.lora_dora=true through the CLI: the adapter folder and checkpoint carry the
    magnitudes, a resume from the middle gives the same losses, and load_for_inference recognises
    DoRA in the checkpoint and merges it: the plain model's logits equal the DoRA model's (1e-5)."""
    from clusterlm.checkpoint.model_io import load_for_inference, read_checkpoint_config
    from clusterlm.checkpoint.store import load_model_weights, resolve_checkpoint
    from clusterlm.finetune.lora import apply_lora
    from clusterlm.models.build import build_model

    args = ["--finetune.task=sft", "--finetune.lora_rank=2", "--finetune.lora_dora=true", "--train.max_steps=6",
            "--checkpoint.interval=3", "--optim.lr=1e-2"]
    assert cli(_ft(base, records["chat"], tmp_path / "data", tmp_path / "a", *args)) == 0
    assert json.loads((tmp_path / "a" / "adapter" / "adapter.json").read_text())["dora"] is True
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step-00000006")
    assert cli(_ft(base, records["chat"], tmp_path / "data", tmp_path / "b", *args, "--train.resume=auto")) == 0
    assert train_losses(tmp_path / "a") == train_losses(tmp_path / "b")

    ckpt = resolve_checkpoint(str(tmp_path / "a"))
    state = load_model_weights(ckpt)
    mags = [k for k in state if k.endswith(".lora_magnitude")]
    assert mags and any(state[k].abs().max() > 0 for k in mags)
    unmerged = build_model(read_checkpoint_config(ckpt).model)
    apply_lora(unmerged, sorted(k[:-len(".lora_a")] for k in state if k.endswith(".lora_a")), rank=2, dora=True)
    unmerged.load_state_dict(state)
    loaded = load_for_inference(tmp_path / "a")
    assert not [k for k in loaded.model.state_dict() if "lora" in k]
    x = torch.tensor([loaded.tokenizer.encode("3+4=7. the film was good.")])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), unmerged.eval()(x), rtol=0, atol=1e-5)

    # what reads the weights without building the model for inference gets them merged too: HF export
    # (transformers answers with the fine-tune's logits, not the base's) and a fine-tune's base
    from clusterlm.checkpoint.model_io import plain_weights

    plain = plain_weights(ckpt)
    assert set(plain) == {k for k in state if "lora" not in k}
    assert all(torch.equal(plain[k], loaded.model.state_dict()[k]) for k in plain)
    transformers = pytest.importorskip("transformers")
    from clusterlm.interop.hf_io import export_to_hf

    hf = transformers.AutoModelForCausalLM.from_pretrained(export_to_hf(tmp_path / "a", tmp_path / "hf")).eval()
    with torch.no_grad():
        want = loaded.model(x)
        torch.testing.assert_close(hf(x).logits[..., :want.shape[-1]], want, rtol=0, atol=1e-5)


def test_a_chat_lora_adapter_folder_serves_as_its_fine_tune_wherever_it_moves(base, records, tmp_path, monkeypatch):
    """A LoRA chat fine-tune grows its base's vocabulary by the chat tokens and adds a template; its
    adapter folder carries the fine-tune's tokenizer and template and the grown vocabulary size, and
    names its base relative to itself: loaded from another directory after the runs moved, on its own
    (merged) or on a shared base (unmerged), it answers with the fine-tune's logits, new tokens
    included, and its template. An adapter folder whose base is gone is refused naming adapter.json."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.errors import CheckpointError
    from clusterlm.serve.models import load_model

    runs = tmp_path / "runs"
    shutil.copytree(base, runs / "base")
    monkeypatch.chdir(tmp_path)  # the fine-tune names its base relative to where it runs, as a user does
    assert cli(_ft(Path("runs/base"), records["chat"], Path("data"), Path("runs/lora"), "--finetune.task=sft",
                   "--finetune.lora_rank=2", "--train.max_steps=6", "--optim.lr=1e-2",
                   '--finetune.lora_targets=["wq","wv","w1","tok_embeddings"]')) == 0
    meta = json.loads((runs / "lora" / "adapter" / "adapter.json").read_text())["meta"]
    assert not Path(meta["base"]).is_absolute() and meta["vocab_size"] > read_vocab(runs / "base")
    shutil.move(runs, tmp_path / "moved")
    monkeypatch.chdir(records["root"])
    full = load_for_inference(tmp_path / "moved" / "lora")
    v = full.tokenizer.vocab_size
    x = torch.tensor([list(range(v - 6, v)) + full.tokenizer.encode("3+4")])  # the chat tokens among them
    with torch.no_grad():
        want = full.model(x)
        for bases in (None, {}):
            ad = load_model(tmp_path / "moved" / "lora" / "adapter", "cpu", bases)
            torch.testing.assert_close(ad.model(x), want, rtol=0, atol=1e-5)
            assert ad.tokenizer.vocab_size == v and ad.chat_template.source == full.chat_template.source
    lone = shutil.copytree(tmp_path / "moved" / "lora" / "adapter", tmp_path / "lone")
    with pytest.raises(CheckpointError, match="adapter.json: its meta.base"):
        load_model(lone, "cpu", {})


def test_a_lora_chat_fine_tune_that_adds_tokens_trains_their_rows(base, records, tmp_path, caplog):
    """The chat tokens a fine-tune adds start as one identical row; with LoRA's default targets the
    token embedding takes an adapter too, so that they come apart (a frozen table would leave a tied
    output unable to tell <|end|> from <|user|>: such a run never ended a reply, docs/finetune.md).
    Named targets without it are used as given, with a warning."""
    from clusterlm.checkpoint.model_io import load_for_inference

    caplog.set_level("INFO")
    assert cli(_ft(base, records["chat"], tmp_path / "data", tmp_path / "a", "--finetune.task=sft",
                   "--finetune.lora_rank=2", "--train.max_steps=6", "--optim.lr=1e-2")) == 0
    targets = json.loads((tmp_path / "a" / "adapter" / "adapter.json").read_text())["targets"]
    assert "tok_embeddings" in targets and "layers.0.attention.wq" in targets
    v0 = read_vocab(base)
    rows = load_for_inference(tmp_path / "a").model.tok_embeddings.weight[v0:v0 + 4]
    assert (rows[1:] - rows[0]).abs().max() > 0  # the new tokens differ now
    assert cli(_ft(base, records["chat"], tmp_path / "data", tmp_path / "b", "--finetune.task=sft",
                   "--finetune.lora_rank=2", "--train.max_steps=1", '--finetune.lora_targets=["wq"]')) == 0
    assert any("leaves them frozen" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    targets = json.loads((tmp_path / "b" / "adapter" / "adapter.json").read_text())["targets"]
    assert not [t for t in targets if "tok_embeddings" in t]


def read_vocab(run: Path) -> int:
    from clusterlm.checkpoint.model_io import read_checkpoint_config
    from clusterlm.checkpoint.store import resolve_checkpoint

    return read_checkpoint_config(resolve_checkpoint(str(run))).model.vocab_size


def _fails(args: list[str], capsys) -> str:
    code = cli(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_USAGE, err
    return err[-1]


def test_bad_input_is_one_line_exit_2_and_nothing_written(base, records, tmp_path, capsys):
    root = records["root"]
    bad = root / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "1+1", "completion": "2"}) + "\n" + json.dumps({"prompt": "2+2"}) + "\n")
    line = _fails(_ft(base, bad, tmp_path / "d1", tmp_path / "o1", "--finetune.task=sft", "--train.max_steps=2"),
                  capsys)
    assert "bad.jsonl:2" in line and "'completion'" in line
    assert not (tmp_path / "d1").exists() and not (tmp_path / "o1" / "checkpoints").exists()

    line = _fails(_ft(base, records["cls"], tmp_path / "d2", tmp_path / "o2", "--finetune.task=classify",
                      '--finetune.labels=["pos", "meh"]', "--train.max_steps=2"), capsys)
    assert "'neg'" in line and "label set" in line
    assert not (tmp_path / "d2").exists()

    broken = root / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }")
    line = _fails(_ft(base, records["chat"], tmp_path / "d3", tmp_path / "o3", "--finetune.task=sft",
                      f"--finetune.template={json.dumps(str(broken))}", "--train.max_steps=2"), capsys)
    assert "broken.jinja" in line
    assert not (tmp_path / "d3").exists()

    line = _fails(_ft(base, records["cls"], tmp_path / "d4", tmp_path / "o4", "--finetune.task=classify",
                      "--finetune.lora_rank=2", '--finetune.lora_targets=["q_proj"]', "--train.max_steps=2"), capsys)
    assert "q_proj" in line and "match no nn.Linear" in line
    assert not (tmp_path / "o4").exists() and not (tmp_path / "d4").exists()  # refused before the data

    # train.seq_len's default (256) over the base's context (64), as docs/finetune.md's recipe had it
    line = _fails(_ft(base, records["chat"], tmp_path / "d4s", tmp_path / "o4s", "--finetune.task=sft",
                      "--train.seq_len=256", "--train.max_steps=2"), capsys)
    assert "train.seq_len=256 exceeds model.max_seq_len=64, the context of finetune.init_from=" in line
    assert "set --train.seq_len=64 or less" in line and not (tmp_path / "d4s").exists()

    line = _fails(_ft(base, records["chat"], tmp_path / "d4b", tmp_path / "o4b", "--finetune.task=sft",
                      "--finetune.freeze_layers=9", "--train.max_steps=2"), capsys)
    assert "freeze_layers=9" in line and not (tmp_path / "d4b").exists()

    line = _fails(_ft(base, records["cls"], tmp_path / "d5", tmp_path / "o5", "--finetune.task=classify",
                      "--model.dim=96", "--train.max_steps=2"), capsys)
    assert "dim=" in line and "dim=96" in line and "base" in line
    assert not (tmp_path / "o5").exists() and not (tmp_path / "d5").exists()

    # data prepared for this base, used with a base whose tokenizer differs: refused naming both
    assert cli(_ft(base, records["cls"], tmp_path / "d6", tmp_path / "o6", "--finetune.task=classify",
                   "--train.max_steps=1")) == 0
    capsys.readouterr()
    other = tmp_path / "other"
    (other / "c.txt").parent.mkdir()
    (other / "c.txt").write_text("only a few letters here\n" * 50)
    assert cli(["prepare", str(other / "c.txt"), "--out", str(other / "data"), "--tokenizer", "char"]) == 0
    assert cli(["train", f"--data.dir={json.dumps(str(other / 'data'))}", f"--train.out_dir={json.dumps(str(other / 'run'))}",
                "--model.preset=gpt-nano", "--model.max_seq_len=64", "--train.seq_len=16", "--train.max_steps=1",
                "--train.eval_interval=0", "--train.tensorboard=false"]) == 0
    capsys.readouterr()
    line = _fails(_ft(other / "run", records["cls"], tmp_path / "d6", tmp_path / "o7", "--finetune.task=classify",
                      "--train.max_steps=1"), capsys)
    assert "is not the base's" in line and "tokens" in line

    line = _fails(["finetune", f"--data.dir={json.dumps(str(tmp_path / 'x'))}"], capsys)
    assert "finetune.task = 'lm'" in line


def test_eval_tasks_a_classifier_cannot_answer_are_refused_before_it_trains(base, records, tmp_path, capsys):
    """Reference: the start-up check of [eval] tasks (train/loop.py, docs/tasks.md "During training").
    A classify task with labels other than the classifier's, or a generate task, is exit 2 before the
    first step, with nothing in the output folder; before, the run trained every step and then failed
    at the final evaluation without saving a checkpoint."""
    raw = tmp_path / "dev01.tsv"
    raw.write_text("sentence\tlabel\nthe film was good.\t1\nthe film was bad.\t0\n")
    gen = tmp_path / "gen.jsonl"
    gen.write_text(json.dumps({"prompt": "1+1", "references": ["2"]}) + "\n")
    for i, (task, needle) in enumerate([(raw, "has labels ['0', '1'] but the classifier's are ['neg', 'pos']"),
                                        (gen, "is a generate task, but the model is a classifier")]):
        line = _fails(_ft(base, records["cls"], tmp_path / "d", tmp_path / f"o{i}", "--finetune.task=classify",
                          "--train.max_steps=2", f"--eval.tasks={json.dumps([str(task)])}"), capsys)
        assert needle in line
        assert not (tmp_path / f"o{i}").exists()


def test_finetune_from_a_hugging_face_base_and_export_the_chat_model(base, records, tmp_path):
    """A base exported to transformers' files is a valid init_from; the fine-tuned chat model, exported,
    gives the same greedy reply in transformers (apply_chat_template + generate) as in clusterlm."""
    transformers = pytest.importorskip("transformers")
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.generate.engine import complete, context_length
    from clusterlm.generate.text import chat_format, prompt_ids
    from clusterlm.interop.hf_io import export_to_hf

    hf_base = export_to_hf(base, tmp_path / "hf_base")
    out = tmp_path / "sft"
    assert cli(_ft(hf_base, records["chat"], tmp_path / "data", out, "--finetune.task=sft", "--train.max_steps=40",
                   "--optim.lr=3e-3")) == 0
    assert (out / "base" / "checkpoints").is_dir()  # the HF folder, converted once
    loaded = load_for_inference(out)
    messages = [{"role": "user", "content": "3+4"}]
    fmt = chat_format(loaded.tokenizer, loaded.chat_template)
    ids = prompt_ids(loaded.tokenizer, fmt.render(messages), context_length(loaded.model), 8)
    new, _ = complete(loaded.model, [ids], max_new_tokens=8, temperature=0.0, eos_id=None)
    stops = {loaded.tokenizer.eos_id, *fmt.stop_ids}
    want = new[0][:next((i + 1 for i, t in enumerate(new[0]) if t in stops), 8)]
    exp = export_to_hf(out, tmp_path / "hf_sft")
    at = transformers.AutoTokenizer.from_pretrained(exp)
    hf_ids = at.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert list(hf_ids) == ids
    hf = transformers.AutoModelForCausalLM.from_pretrained(exp).eval()
    with torch.no_grad():
        got = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert got[0, len(ids):len(ids) + len(want)].tolist() == want


def test_balanced_class_weights_give_one_mean_over_the_step_whatever_the_micro_batches(tmp_path):
    """Reference: sum of w_y * nll / sum of w_y over the step's 16 examples (torch's weighted mean of
    the whole batch). A from-scratch classifier with balanced weights on 3:1 labels, one micro-batch of
    16 against two of 8 (gradient accumulation): the same step-1 loss (1e-6) and, the gradients being
    the same, step-2 loss. Before, each micro-batch was a weighted mean of its own and the step the
    plain mean of those, which depends on how the classes fall into the micro-batches."""
    tsv = tmp_path / "c.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"the film was {'good' if i % 4 == 0 else 'bad'} {i}.\t"
                                                f"{'pos' if i % 4 == 0 else 'neg'}\n" for i in range(64)))
    common = ["finetune", "--finetune.task=classify", "--finetune.class_weights=balanced",
              f"--data.source={json.dumps(str(tsv))}", f"--data.dir={json.dumps(str(tmp_path / 'data'))}",
              "--data.tokenizer=char", "--data.val_fraction=0", "--model.preset=gpt-nano", "--model.n_layers=1",
              "--model.dim=32", "--model.n_heads=2", "--model.max_seq_len=32", "--train.seq_len=32",
              "--train.max_steps=2", "--train.eval_interval=0", "--train.tensorboard=false", "--train.threads=1",
              "--optim.warmup_steps=0", "--optim.lr=1e-2"]
    one = tmp_path / "one"
    assert cli([*common, f"--train.out_dir={json.dumps(str(one))}", "--train.micro_batch_size=16"]) == 0
    two = tmp_path / "two"
    assert cli([*common, f"--train.out_dir={json.dumps(str(two))}", "--train.micro_batch_size=8",
                "--train.global_batch_tokens=512"]) == 0
    a, b = train_losses(one), train_losses(two)
    assert abs(a[1] - b[1]) < 1e-6 and abs(a[2] - b[2]) < 1e-5, (a, b)


def test_refusals_after_the_base_is_read_leave_no_output(records, tmp_path, capsys):
    """Reference: the file system before the run. From scratch, more frozen layers than the recipe's
    model has, or a train.seq_len over its context, is refused before data.dir is written (before,
    after preparing it); a Hugging Face base
    whose shape the recipe contradicts is refused naming the HF folder, and its conversion into
    OUT_DIR/base (and OUT_DIR) is removed again (before, OUT_DIR/base stayed)."""
    pytest.importorskip("transformers")
    from clusterlm.checkpoint.store import save_checkpoint
    from clusterlm.config import RunConfig, to_toml
    from clusterlm.interop.hf_io import export_to_hf
    from clusterlm.models.build import build_model
    from clusterlm.models.config import get_preset
    from clusterlm.tokenizer.kinds import train_tokenizer

    scratch = ["finetune", "--finetune.task=sft", f"--data.source={json.dumps(str(records['chat']))}",
               f"--data.dir={json.dumps(str(tmp_path / 'd1'))}", f"--train.out_dir={json.dumps(str(tmp_path / 'o1'))}",
               "--model.preset=gpt-nano", "--model.n_layers=2", "--train.seq_len=64", "--finetune.freeze_layers=5",
               "--train.max_steps=1"]
    line = _fails(scratch, capsys)
    assert "freeze_layers=5" in line and "2 layers" in line
    assert not (tmp_path / "d1").exists() and not (tmp_path / "o1").exists()
    line = _fails([a for a in scratch if "freeze_layers" not in a and "seq_len" not in a], capsys)
    assert "train.seq_len=256 exceeds model.max_seq_len=64" in line  # gpt-nano's context
    assert "--model.max_seq_len" in line and "set --train.seq_len=64 or less" in line
    assert not (tmp_path / "d1").exists() and not (tmp_path / "o1").exists()

    tok = train_tokenizer("char", [TEXT])
    tok.save(tmp_path / "tok.json")
    cfg = get_preset("gpt-nano", n_layers=1, dim=32, n_heads=2, max_seq_len=64, vocab_size=tok.vocab_size)
    model = build_model(cfg)
    model.init_weights(0)
    save_checkpoint(tmp_path / "run" / "checkpoints", 0, model_state=model.state_dict(), optimizer_state=None,
                    train_state={}, config_toml=to_toml(RunConfig(model=cfg)), tokenizer_path=tmp_path / "tok.json")
    hf = export_to_hf(tmp_path / "run", tmp_path / "hf")
    line = _fails(_ft(hf, records["chat"], tmp_path / "d2", tmp_path / "out" / "o2", "--finetune.task=sft",
                      "--model.dim=64", "--train.max_steps=1"), capsys)
    assert f"finetune.init_from={str(hf)!r} has dim=32" in line and "dim=64" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "d2").exists()


def test_a_classifier_as_init_from_of_an_sft_run_is_refused_naming_its_base(records, tmp_path, capsys):
    """Reference: what init_from takes (docs/finetune.md "The base"). A classifier's weights sit under
    its head's `backbone.`: as an SFT base it failed with "model.pool='auto' and model.pad_id=... are
    for classifiers". Now one line says what it is and names the base it was fine-tuned from, before
    any data is prepared."""
    from clusterlm.config import FinetuneConfig
    from tests.helpers import random_classifier

    random_classifier(tmp_path / "clf", "char", TEXT, "gpt-nano", ("neg", "pos"), n_heads=2, context=64,
                      finetune=FinetuneConfig(task="classify", init_from="runs/lm"))
    line = _fails(_ft(tmp_path / "clf", records["chat"], tmp_path / "d", tmp_path / "o", "--finetune.task=sft",
                      "--train.max_steps=1"), capsys)
    assert "is a classifier (labels neg, pos)" in line and "(this one's: runs/lm)" in line
    assert "finetune.task='sft' starts from a language model" in line
    assert not (tmp_path / "d").exists() and not (tmp_path / "o").exists()


def test_a_classifier_is_fine_tuned_further_from_its_own_weights_head_included(records, tmp_path, capsys):
    """Reference: the base's weights. A classifier as init_from of a classify run continues from all
    of it (a second stage on other data: the full sentences after the phrases, a new domain): after one
    step at lr 1e-9 every tensor, the head included, is the base's to 1e-6 (a fresh head would be
    random). Before, it failed at the weight load ("tensor backbone.backbone.layers.0... has no place")."""
    from clusterlm.checkpoint.store import load_model_weights, resolve_checkpoint
    from clusterlm.config import FinetuneConfig
    from tests.helpers import random_classifier

    clf = random_classifier(tmp_path / "clf", "char", TEXT, "gpt-nano", ("neg", "pos"), n_heads=2, context=64,
                            finetune=FinetuneConfig(task="classify"))
    out = tmp_path / "o"
    assert cli(_ft(clf, records["cls"], tmp_path / "d", out, "--finetune.task=classify", "--train.max_steps=1",
                   "--optim.lr=1e-9", "--optim.min_lr=0", "--optim.warmup_steps=0")) == 0
    before = load_model_weights(resolve_checkpoint(str(clf)))
    after = load_model_weights(resolve_checkpoint(str(out)))
    assert set(before) == set(after) and "score.weight" in after
    for k in before:
        assert torch.allclose(before[k].float(), after[k].float(), atol=1e-6), k
    assert json.loads((tmp_path / "d" / "meta.json").read_text())["labels"] == ["neg", "pos"]
    from clusterlm.checkpoint.model_io import read_checkpoint_config

    cfg = read_checkpoint_config(resolve_checkpoint(str(out)))
    assert cfg.model.labels == ("neg", "pos") and cfg.model.pooling == "last"


@pytest.mark.parametrize("extra, source, fragment", [
    (("--finetune.labels=[\"pos\", \"neg\"]",), "cls", "keeps its head's labels in their order"),
    (("--finetune.pool=max",), "cls", "whose head reads pool='last'"),
    ((), "other", "label 'meh' is not one of the labels of finetune.init_from="),
])
def test_a_classifier_base_keeps_its_labels_and_pooling(records, tmp_path, capsys, extra, source, fragment):
    """Fine-tuning a classifier further with another label order, another pooling or a record whose
    label its head has no row for: one line naming the base's value, nothing written."""
    from clusterlm.config import FinetuneConfig
    from tests.helpers import random_classifier

    clf = random_classifier(tmp_path / "clf", "char", TEXT, "gpt-nano", ("neg", "pos"), n_heads=2, context=64,
                            finetune=FinetuneConfig(task="classify"))
    other = tmp_path / "other.tsv"
    other.write_text("sentence\tlabel\nthe film was good.\tpos\nthe film was bad.\tneg\nthe film was.\tmeh\n")
    src = records["cls"] if source == "cls" else other
    line = _fails(_ft(clf, src, tmp_path / "d", tmp_path / "o", "--finetune.task=classify", "--train.max_steps=1",
                      *extra), capsys)
    assert fragment in line, line
    if source == "other":
        assert f"{other}:4" in line
    assert not (tmp_path / "d").exists() and not (tmp_path / "o").exists()


def test_a_resume_with_other_lora_adapters_is_refused_naming_the_option(base, records, tmp_path, capsys):
    """Reference: the checkpoint's config.toml. Resuming a LoRA fine-tune with another lora_rank (or
    targets) is one line naming the option, both values and the flag that resumes; before, it was
    "tensor tok_embeddings.lora_a has shape [2, 37] but the model built from its config.toml needs
    [4, 37]; the checkpoint's files disagree (was one replaced?)", blaming the files."""
    args = _ft(base, records["chat"], tmp_path / "d", tmp_path / "o", "--finetune.task=sft", "--train.max_steps=2",
               "--finetune.lora_rank=2")
    assert cli(args) == 0
    capsys.readouterr()
    line = _fails([*args, "--finetune.lora_rank=4", "--train.max_steps=3", "--train.resume=auto"], capsys)
    assert ("has finetune.lora_rank=2 but the run asks for finetune.lora_rank=4; resume with the checkpoint's "
            "settings (--finetune.lora_rank=2)") in line
    line = _fails([*args, '--finetune.lora_targets=["wq"]', "--train.max_steps=3", "--train.resume=auto"], capsys)
    assert "has finetune.lora_targets=() but the run asks for finetune.lora_targets=('wq',)" in line
    assert cli([*args, "--train.max_steps=3", "--train.resume=auto"]) == 0  # as saved: resumes


def test_a_classifier_counts_the_positions_it_computes_not_micro_batch_times_seq_len(base, tmp_path):
    """Classifier rows are cut to their micro-batch's longest text, yet tokens/s, MFU and tokens_seen counted
    micro_batch_size x seq_len (here 8 x 64 = 512 a step for rows of 19 positions: 3.4x overstated). Now
    each step adds the positions it computed: 8 rows x (EOS + 18 characters)."""
    source = tmp_path / "same_length.tsv"
    source.write_text("sentence\tlabel\n" + "".join(f"the film was {w}.\t{lab}\n" for _ in range(20)
                                                    for w, lab in (("good", "pos"), ("dull", "neg"))))
    out = tmp_path / "cls"
    assert cli(_ft(base, source, tmp_path / "d", out, "--finetune.task=classify", "--train.max_steps=3",
                   "--train.log_interval=1")) == 0
    rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["tokens"] for r in train] == [8 * 19, 2 * 8 * 19, 3 * 8 * 19]
    assert train[0]["tokens_per_s"] == pytest.approx(8 * 19 / train[0]["step_time_s"], rel=1e-6)


def test_a_declared_label_without_training_examples_is_named(tmp_path, caplog):
    """finetune.labels = [neg, neutral, pos] over records with no 'neutral': the head had a class it could
    never learn (and, balanced, weight 0) without a word. Now one warning names it; with every label
    present nothing is said."""
    tsv = tmp_path / "c.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"the film was {'good' if i % 2 else 'bad'} {i}.\t"
                                                f"{'pos' if i % 2 else 'neg'}\n" for i in range(32)))

    def run(name: str, *extra: str) -> str:
        caplog.clear()
        args = ["finetune", "--finetune.task=classify", "--finetune.class_weights=balanced",
                f"--data.source={json.dumps(str(tsv))}", f"--data.dir={json.dumps(str(tmp_path / name / 'data'))}",
                "--data.tokenizer=char", "--data.val_fraction=0", "--model.preset=gpt-nano", "--model.n_layers=1",
                "--model.max_seq_len=32", "--train.seq_len=32", "--train.max_steps=1", "--train.eval_interval=0",
                "--train.tensorboard=false", "--train.threads=1", f"--train.out_dir={json.dumps(str(tmp_path / name))}",
                *extra]
        with caplog.at_level("WARNING", logger="clusterlm"):
            assert cli(args) == 0, caplog.text
        return caplog.text

    said = run("three", '--finetune.labels=["neg", "neutral", "pos"]')
    assert "label(s) 'neutral' have no training example (32 training texts)" in said, said
    assert "balanced class weight is 0" in said
    assert "no training example" not in run("two")
