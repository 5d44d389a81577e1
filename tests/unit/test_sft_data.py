"""Fine-tuning data (clusterlm/data/sft.py): records, loss masks, the prepared directory and the
packing loader's determinism, resume and rank split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from clusterlm.data.sft import (IGNORE_INDEX, ExampleLoader, iter_example_batches, prepare_examples, read_records,
                                segments)
from clusterlm.errors import ConfigError, DataError
from clusterlm.generate.template import load_template
from clusterlm.tokenizer.kinds import train_tokenizer


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def pairs(n: int) -> list[dict]:
    return [{"prompt": f"{i % 7}+{i % 5}=", "completion": str(i % 7 + i % 5) * (1 + i % 3)} for i in range(n)]


@pytest.fixture
def tok():
    return train_tokenizer("char", ["0123456789+= abcdefghijklmnopqrstuvwxyz\n"])


def test_records_of_every_form(tmp_path):
    f = write_jsonl(tmp_path / "a.jsonl", [
        {"prompt": "p", "completion": "c"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "q"}], "references": ["r", "r2"]},  # the harness's form
        {"prompt": "p2", "references": "c2"}])
    recs = read_records(str(f), "sft")
    assert recs[0].prompt == "p" and recs[0].completion == "c"
    assert recs[1].messages == (("user", "hi"), ("assistant", "yo"))
    assert recs[2].messages[-1] == ("assistant", "r")
    assert recs[3].completion == "c2"
    src, tgt = tmp_path / "t.en", tmp_path / "t.fr"
    src.write_text("a cat\nthe dog\n")
    tgt.write_text("un chat\nle chien\n")
    par = read_records(f"{src},{tgt}", "sft")
    assert par[1].prompt == "en: the dog\nfr:" and par[1].completion == "le chien"
    tsv = tmp_path / "c.tsv"
    tsv.write_text("sentence\tlabel\ngood film\t1\nbad film\t0\n")
    cls = read_records(str(tsv), "classify")
    assert [(r.text, r.label) for r in cls] == [("good film", "1"), ("bad film", "0")]


@pytest.mark.parametrize("record, needle", [
    ({"prompt": "p"}, "a.jsonl:2: the record has no response field 'completion'"),
    ({"messages": [{"role": "user", "content": "q"}]}, "a.jsonl:2: the record has no response"),
    ({"completion": "c"}, "a.jsonl:2: the record has no 'prompt' field"),
    ({"messages": [{"role": "bot", "content": "q"}]}, "a.jsonl:2: messages[0] has role 'bot'"),
    # both forms at once (the prompt was dropped), and an empty reply (as an empty completion is refused)
    ({"prompt": "p", "completion": "c", "messages": [{"role": "user", "content": "q"},
                                                     {"role": "assistant", "content": "a"}]},
     "a.jsonl:2: the record has both 'prompt' and 'messages'"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
     "a.jsonl:2: messages[1] is an assistant turn with empty content"),
    ({"prompt": "p", "completion": ""}, "a.jsonl:2: field 'completion' must be a non-empty string, got ''"),
    # the reply twice (messages ending with the assistant, and a completion): two assistant turns were trained
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "completion": "b"},
     "a.jsonl:2: 'messages' ends with an assistant turn and the record has 'completion' too; give the reply once"),
])
def test_a_record_without_its_response_is_named_with_its_line(tmp_path, record, needle):
    """Reference: docs/finetune.md "Records" and docs/tasks.md (prompt and messages both is an error)."""
    f = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "ok", "completion": "fine"}, record])
    with pytest.raises(DataError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        read_records(str(f), "sft")


def test_plain_pair_trains_on_the_completion_and_eos_only(tmp_path, tok):
    f = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "ab=", "completion": "cd"}])
    prepare_examples(tmp_path / "d", task="sft", source=str(f), tokenizer=tok, val_fraction=0.0)
    toks = np.load(tmp_path / "d" / "train.tokens.npy")
    mask = np.load(tmp_path / "d" / "train.mask.npy")
    want = [tok.eos_id] + tok.encode("ab=") + tok.encode(" cd") + [tok.eos_id]
    assert toks.tolist() == want
    assert mask.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]  # " cd" and the final EOS


def test_chat_template_masks_exactly_the_assistant_turns(tmp_path, tok):
    template = load_template("clusterlm")
    tok = tok.with_special_tokens(template.special_tokens)
    rec = read_records(str(write_jsonl(tmp_path / "a.jsonl", [{"messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"},
        {"role": "assistant", "content": "ok"}]}])), "sft")[0]
    pieces = segments(rec, template)
    assert "".join(t for t, _ in pieces) == template.render(
        [{"role": r, "content": c} for r, c in rec.messages])
    assert [t for t, trained in pieces if trained] == ["yo<|end|>\n", "ok<|end|>\n"]
    prepare_examples(tmp_path / "d", task="sft", source="", tokenizer=tok, val_fraction=0.0, template=template,
                     records=[rec])
    toks = np.load(tmp_path / "d" / "train.tokens.npy")
    mask = np.load(tmp_path / "d" / "train.mask.npy").astype(bool)
    assert tok.decode(toks[mask].tolist()) == "yo\nok\n"  # the <|end|> ids are trained too (decode drops them)
    assert int(toks[mask].tolist().count(tok.token_id("<|end|>"))) == 2
    assert (tmp_path / "d" / "chat_template.jinja").read_text() == template.source


def test_labels_outside_the_label_set_are_refused(tmp_path, tok):
    tsv = tmp_path / "c.tsv"
    tsv.write_text("sentence\tlabel\ngood\tpos\nbad\tneg\nugly\tmeh\n")
    with pytest.raises(DataError, match=r"c.tsv:4.*'meh'"):
        read_records(str(tsv), "classify", labels=("pos", "neg"))
    val = tmp_path / "v.tsv"
    val.write_text("sentence\tlabel\nfine\tneutral\n")
    tsv.write_text("sentence\tlabel\ngood\tpos\nbad\tneg\n")
    with pytest.raises(DataError, match=r"label 'neutral' is not in the label set neg, pos"):
        prepare_examples(tmp_path / "d", task="classify", source=str(tsv), val_source=str(val), tokenizer=tok)
    assert not (tmp_path / "d").exists()  # nothing half-written


def test_a_class_drawn_only_into_the_held_out_share_is_in_the_label_set(tmp_path, tok):
    """Reference: data.source's labels (docs/finetune.md "Classification"). With data.val_fraction the
    validation records come from data.source too; a label whose every record was drawn into them was
    refused as "c.tsv:N: label 'rare' is not in the label set ..." though line N is in data.source."""
    from clusterlm.data.sft import _split_val

    held = _split_val(20, 0.1)
    rows = [f"text {i}\t{'rare' if held[i] else ('pos' if i % 2 else 'neg')}\n" for i in range(20)]
    tsv = tmp_path / "c.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(rows))
    prepare_examples(tmp_path / "d", task="classify", source=str(tsv), val_fraction=0.1, tokenizer=tok)
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    assert meta["labels"] == ["neg", "pos", "rare"]
    assert np.load(tmp_path / "d" / "val.labels.npy").tolist() == [2] * int(held.sum())
    assert 2 not in np.load(tmp_path / "d" / "train.labels.npy").tolist()


def test_packing_loader_is_deterministic_resumable_and_splits_ranks(tmp_path, tok):
    f = write_jsonl(tmp_path / "a.jsonl", pairs(50))
    prepare_examples(tmp_path / "d", task="sft", source=str(f), tokenizer=tok, val_fraction=0.0)
    kw = dict(seq_len=16, seed=3, pad_id=tok.pad_id)
    one = ExampleLoader(tmp_path / "d", batch_size=4, **kw)
    batches = [next(one) for _ in range(12)]  # past one epoch: 50 examples of ~8 tokens, ~2 a row
    for x, y in batches:
        assert x.shape == y.shape == (4, 16)
        assert ((y == IGNORE_INDEX) | (y == torch.roll(x, -1, 1))).all()  # targets are the next token
        assert (y != IGNORE_INDEX).any()
    again = ExampleLoader(tmp_path / "d", batch_size=4, **kw)
    for _ in range(5):
        next(again)
    resumed = ExampleLoader(tmp_path / "d", batch_size=4, **kw)
    resumed.load_state_dict(again.state_dict())
    for (x, y), (x2, y2) in zip(batches[5:], (next(resumed) for _ in range(7))):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    ranks = [ExampleLoader(tmp_path / "d", batch_size=2, rank=r, world_size=2, **kw) for r in range(2)]
    for x, y in batches[:6]:
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)


def test_padding_loader_and_one_eval_pass(tmp_path, tok):
    f = write_jsonl(tmp_path / "a.jsonl", pairs(10))
    prepare_examples(tmp_path / "d", task="sft", source=str(f), tokenizer=tok, val_fraction=0.0)
    loader = ExampleLoader(tmp_path / "d", batch_size=3, seq_len=32, seed=0, pad_id=tok.pad_id, pack=False)
    x, y = next(loader)
    assert x.shape[0] == 3 and x.shape[1] < 32  # padded to the longest of the batch only
    batches = list(iter_example_batches(tmp_path / "d", "train", 3, 32, pad_id=tok.pad_id, pack=False))
    assert [b[0].shape[0] for b in batches] == [3, 3, 3, 1]  # every example once, in file order
    assert int((batches[0][0][:, 0] == tok.eos_id).sum()) == 3
    packed = list(iter_example_batches(tmp_path / "d", "train", 2, 32, pad_id=tok.pad_id, pack=True))
    trained = sum(int((y != IGNORE_INDEX).sum()) for _, y in packed)
    assert trained == int(np.load(tmp_path / "d" / "train.mask.npy").sum())  # each trained token once


def test_classify_batches_and_a_changed_file_is_refused(tmp_path, tok):
    tsv = tmp_path / "c.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"{'good' if i % 2 else 'bad'} {i}\t{i % 2}\n" for i in range(20)))
    meta = prepare_examples(tmp_path / "d", task="classify", source=str(tsv), tokenizer=tok, val_fraction=0.2)
    assert meta["labels"] == ["0", "1"] and meta["splits"]["val"]["examples"] == 4
    x, y = next(ExampleLoader(tmp_path / "d", batch_size=5, seq_len=8, seed=0, pad_id=tok.pad_id))
    assert x.shape[0] == 5 and x.shape[1] <= 8 and y.shape == (5,) and set(y.tolist()) <= {0, 1}
    with open(tmp_path / "d" / "train.labels.npy", "r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"\x01")
    with pytest.raises(DataError, match="does not match its SHA-256"):
        ExampleLoader(tmp_path / "d", batch_size=5, seq_len=8, seed=0, pad_id=tok.pad_id)


def test_a_template_that_is_not_prefix_stable_is_refused(tmp_path, tok):
    class Reversed:  # renders the newest message first: the text before a reply changes with it
        source, special_tokens = "", ()

        def render(self, messages, add_generation_prompt=False):
            return "".join(f"{m['role']}:{m['content']}\n" for m in reversed(messages)) + (
                "assistant:" if add_generation_prompt else "")

    rec = read_records(str(write_jsonl(tmp_path / "a.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])), "sft")[0]
    with pytest.raises(ConfigError, match="not prefix-stable"):
        segments(rec, Reversed())


def test_a_prepared_folder_knows_its_source_by_content_not_by_mtime(tmp_path, tok):
    """A copy of the same records (new mtime, same bytes) still matches the prepared folder; an edit of
    the same size, another size, or another file is named."""
    import os

    from clusterlm.data.sft import source_differs

    tsv = tmp_path / "c.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"{'good' if i % 2 else 'bad'} {i}\t{i % 2}\n" for i in range(20)))
    made = prepare_examples(tmp_path / "d", task="classify", source=str(tsv), tokenizer=tok,
                            val_fraction=0.2)["made_from"]["source"]
    assert source_differs(made, str(tsv)) is None
    st = tsv.stat()
    os.utime(tsv, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, or copied without keeping times
    assert source_differs(made, str(tsv)) is None
    tsv.write_text(tsv.read_text().replace("good 1\t", "gold 1\t"))  # same size, other content
    assert "content changed" in source_differs(made, str(tsv))
    original = tsv.read_text().replace("gold 1\t", "good 1\t")
    tsv.write_text(original + "fine 99\t1\n")
    assert "bytes, was" in source_differs(made, str(tsv))
    other = tmp_path / "other.tsv"
    other.write_text("sentence\tlabel\n")
    assert f"made from {tsv.resolve()}" in source_differs(made, str(other))
    tsv.write_text(original)  # the same bytes again, a new mtime: fine, but not for a folder without the hash
    assert source_differs(made, str(tsv)) is None
    old = [{k: v for k, v in m.items() if k != "sha256"} for m in made]
    assert "kept no content hash" in source_differs(old, str(tsv))


def _sft_cfg(tmp_path: Path, source: Path, **finetune):
    """A from-scratch SFT RunConfig (char tokenizer trained on the records) over `source`."""
    from clusterlm.config import DataConfig, FinetuneConfig, RunConfig, TrainConfig

    return RunConfig(data=DataConfig(dir=str(tmp_path / "data"), source=str(source), tokenizer="char",
                                     val_fraction=0.25),
                     finetune=FinetuneConfig(task="sft", **finetune), train=TrainConfig(out_dir=str(tmp_path / "run")))


@pytest.mark.parametrize("records", [
    [{"prompt": "2+2?", "completion": "4"}, {"prompt": "3+3?", "completion": "6"}] * 2,
    [{"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                   {"role": "assistant", "content": "4"}]}] * 4,
])
def test_a_char_tokenizer_from_scratch_has_every_character_it_encodes(tmp_path, records):
    """Reference: the prepared examples decode back to the text clusterlm renders (segments): no
    <|unk|>. Before, the char tokenizer was trained on the records' contents only, so the space
    between prompt and completion and the template's newlines were <|unk|> (U+FFFD when decoded)."""
    from clusterlm.finetune.data import ensure_finetune_data
    from clusterlm.tokenizer import load_tokenizer

    src = write_jsonl(tmp_path / "r.jsonl", records)
    data_dir, _, _ = ensure_finetune_data(_sft_cfg(tmp_path, src))
    tok = load_tokenizer(data_dir / "tokenizer.json")
    tokens = np.load(data_dir / "train.tokens.npy")
    assert tok.unk_id not in set(tokens.tolist())
    assert "\ufffd" not in tok.decode(tokens.tolist())
    assert tok.encode(" ") != [tok.unk_id] and (records[0].get("messages") is None or tok.encode("\n") != [tok.unk_id])


def test_a_prepared_folder_made_with_other_options_is_refused_naming_the_option(tmp_path):
    """Reference: the options the folder was prepared with (meta.json made_from.options). Reusing it
    with another prompt_loss, template, data.tokenizer or val_fraction, or after its .jinja file was
    edited, is one ConfigError naming the option and both values; the same options reuse it. Before,
    the folder was reused silently with the old objective."""
    import dataclasses

    from clusterlm.finetune.data import ensure_finetune_data
    from clusterlm.generate.template import DEFAULT_TEMPLATE

    src = write_jsonl(tmp_path / "r.jsonl", pairs(8))
    jinja = tmp_path / "t.jinja"
    jinja.write_text(DEFAULT_TEMPLATE)
    cfg = _sft_cfg(tmp_path, src, template=str(jinja))
    ensure_finetune_data(cfg)
    meta = (tmp_path / "data" / "meta.json").read_text()
    ensure_finetune_data(cfg)  # the same options: reused
    ft = cfg.finetune
    changes = {"finetune.prompt_loss=False, not True": dict(finetune=dataclasses.replace(ft, prompt_loss=True)),
               "finetune.template=": dict(finetune=dataclasses.replace(ft, template="auto")),
               "data.tokenizer='char', not 'byte'": dict(data=dataclasses.replace(cfg.data, tokenizer="byte")),
               "data.val_fraction=0.25, not 0.5": dict(data=dataclasses.replace(cfg.data, val_fraction=0.5))}
    for needle, change in changes.items():
        with pytest.raises(ConfigError, match="delete") as e:
            ensure_finetune_data(dataclasses.replace(cfg, **change))
        assert needle in str(e.value) and "\n" not in str(e.value)
    jinja.write_text(DEFAULT_TEMPLATE.replace("<|end|>", "<|end|><|end|>", 1))
    with pytest.raises(ConfigError, match=r"was prepared with a chat template of sha256 .* is sha256"):
        ensure_finetune_data(cfg)
    assert (tmp_path / "data" / "meta.json").read_text() == meta


def test_a_template_that_does_not_render_the_replies_is_refused_before_anything_is_written(tmp_path):
    """Reference: the template's output for a sample conversation. A template of static text writes no
    assistant content, so SFT would train on nothing (trained_tokens 0, loss 0); it is refused in one
    line naming the template, and data.dir is not created. Before, the data was prepared and the run
    trained on nothing."""
    from clusterlm.finetune.data import ensure_finetune_data

    src = write_jsonl(tmp_path / "r.jsonl", pairs(8))
    static = tmp_path / "static.jinja"
    static.write_text("static text only")
    with pytest.raises(ConfigError, match="does not render the assistant's content") as e:
        ensure_finetune_data(_sft_cfg(tmp_path, src, template=str(static)))
    assert str(static) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "data").exists()


def _chat_base(root: Path, template: str | None) -> Path:
    """A random char-level base under `root` whose step folder holds `template` as its
    chat_template.jinja (none when None); returns the run folder."""
    from clusterlm.checkpoint.store import resolve_checkpoint
    from tests.helpers import random_checkpoint

    root.mkdir()
    run = random_checkpoint(root, "char", "0123456789+= abcdefghijklmnopqrstuvwxyz\n", bpe_vocab=0, n_layers=1,
                            context=64)
    if template is not None:
        (resolve_checkpoint(str(run)) / "chat_template.jinja").write_text(template)
    return run


def test_template_auto_refuses_a_folder_rendered_with_another_base_template(tmp_path):
    """Reference: the sha256 of the template that rendered the examples (meta.json made_from). With
    finetune.template = 'auto' the option reads the same whatever the base, so a base whose own
    chat_template.jinja changed (re-exported with another template, or another init_from, here one
    with no template, whose 'auto' is the builtin one) is refused in one line naming both hashes; the
    same base reuses the folder. Before, the examples rendered with the old template were reused."""
    import dataclasses

    from clusterlm.checkpoint.store import resolve_checkpoint
    from clusterlm.config import TrainConfig
    from clusterlm.finetune.data import ensure_finetune_data
    from clusterlm.generate.template import DEFAULT_TEMPLATE

    own = DEFAULT_TEMPLATE.replace("<|end|>", "<|end|>\n", 1)  # not the builtin: 'auto' without it differs
    base = _chat_base(tmp_path / "base", own)
    src = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "user", "content": f"{i}+{i}"},
                                                            {"role": "assistant", "content": str(2 * i)}]}
                                             for i in range(8)])
    cfg = _sft_cfg(tmp_path, src, init_from=str(base))
    cfg = dataclasses.replace(cfg, train=TrainConfig(out_dir=str(tmp_path / "run"), seq_len=64))
    ensure_finetune_data(cfg)
    meta = (tmp_path / "data" / "meta.json").read_text()
    ensure_finetune_data(cfg)  # the same base template: reused
    (resolve_checkpoint(str(base)) / "chat_template.jinja").write_text(DEFAULT_TEMPLATE)  # base re-exported
    with pytest.raises(ConfigError, match=r"was prepared with a chat template of sha256 [0-9a-f]{12}, but "
                                          r"finetune.template='auto' is the chat template of finetune.init_from=.*, "
                                          r"of sha256 [0-9a-f]{12}; give another data.dir") as e:
        ensure_finetune_data(cfg)
    assert "\n" not in str(e.value)
    other = _chat_base(tmp_path / "other", None)
    with pytest.raises(ConfigError, match=r"finetune.template='auto' is the builtin template \(sha256 .*\) or none"):
        ensure_finetune_data(dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, init_from=str(other))))
    assert (tmp_path / "data" / "meta.json").read_text() == meta


@pytest.mark.parametrize("refusal, needle", [
    (["--checkpoint.keep_best=true", "--data.val_fraction=0"], "checkpoint.keep_best needs a validation loss"),
    (["--parallel.dp_shard=2"], "!= world size 1"),
    (["--parallel.tp=2"], "fine-tuning runs under data parallelism (DDP, FSDP: parallel.dp_replicate, dp_shard), not tp=2"),
    (["--train.micro_batch_size=100000000"], "the run needs about"),
    (["--model.vocab_size=8"], "model.vocab_size=8 is smaller than the tokenizer's"),  # finetune/data.py's own
])
def test_a_fine_tune_refused_after_preparing_its_data_leaves_no_data_dir(tmp_path, capsys, refusal, needle):
    """Reference: the file system before the run. A refusal in the trainer's set-up after data.dir
    was prepared (keep_best without a validation split, the parallel layout, the memory check), or in
    ensure_finetune_data after preparing it (a model vocabulary too small for the data's tokenizer),
    is exit 2 and removes the data.dir this run created, with the parent folder it made for it; a
    data.dir that was there before the run is kept. Before, the prepared folder stayed, for the next
    run to reuse."""
    import json

    from clusterlm.cli import main as cli
    from clusterlm.config import load_run_config
    from clusterlm.errors import EXIT_USAGE
    from clusterlm.finetune.data import ensure_finetune_data

    src = write_jsonl(tmp_path / "r.jsonl", pairs(16))
    data, out = tmp_path / "new" / "data", tmp_path / "run"
    args = ["--finetune.task=sft", f"--data.source={json.dumps(str(src))}", "--data.tokenizer=char",
            f"--data.dir={json.dumps(str(data))}", f"--train.out_dir={json.dumps(str(out))}", "--model.preset=gpt-nano",
            "--model.n_layers=1", "--model.dim=32", "--model.n_heads=2", "--model.max_seq_len=32", "--train.seq_len=32",
            "--train.max_steps=1", "--train.device=cpu", "--train.tensorboard=false", *refusal]
    assert cli(["finetune", *args]) == EXIT_USAGE
    assert needle in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "new").exists() and not out.exists()
    ensure_finetune_data(load_run_config(None, [a for a in args if a not in refusal]))  # there before the run: kept
    meta = (data / "meta.json").read_text()
    assert cli(["finetune", *args]) == EXIT_USAGE
    assert (data / "meta.json").read_text() == meta


def test_a_data_dir_of_other_files_is_refused_not_replaced(tmp_path):
    """Reference: the user's folder before the run. finetune's data.dir with data.source set, where
    data.dir is a folder of the user's files (no meta.json) or a file: refused naming data.dir, the
    files untouched. Before, the prepared examples replaced the folder and its files were lost. An
    empty folder is prepared into."""
    import dataclasses

    from clusterlm.finetune.data import ensure_finetune_data

    src = write_jsonl(tmp_path / "r.jsonl", pairs(16))
    cfg = _sft_cfg(tmp_path, src)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "file").write_text("keep me too")
    for d in (tmp_path / "mine", tmp_path / "file"):
        with pytest.raises(ConfigError, match=r"data.dir='.*' exists and is not a prepared data directory \(no "
                                              r"meta.json\): not prepared there from data.source="):
            ensure_finetune_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, dir=str(d))))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "file").read_text() == "keep me too"
    (tmp_path / "empty").mkdir()
    data_dir, _, _ = ensure_finetune_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data,
                                                                                             dir=str(tmp_path / "empty"))))
    assert (data_dir / "meta.json").is_file()


def test_a_missing_val_source_is_named_as_finetune_val_source(tmp_path):
    """Reference: the option the user set. A finetune.val_source that does not exist was refused as
    "data.source='...': no such file", naming the option that was fine; the seq2seq reader too."""
    from clusterlm.data.seq2seq import read_pairs
    from clusterlm.finetune.data import ensure_finetune_data

    src = write_jsonl(tmp_path / "r.jsonl", pairs(8))
    missing = tmp_path / "val.jsonl"
    with pytest.raises(DataError, match=rf"^finetune.val_source='{missing}': no such file {missing}; give a .jsonl"):
        ensure_finetune_data(_sft_cfg(tmp_path, src, val_source=str(missing)))
    assert not (tmp_path / "data").exists()
    with pytest.raises(DataError, match=r"^finetune.val_source='.*val.jsonl': no such file"):
        read_pairs(str(missing), "finetune.val_source")
    with pytest.raises(DataError, match=r"^data.source='.*val.jsonl': no such file"):
        read_records(str(missing), "sft")


def test_a_tsv_of_prompt_completion_pairs_is_read_for_sft_and_seq2seq(tmp_path):
    """Reference: the JSONL's field names, and docs/encdec.md ("a .jsonl/.tsv file of prompt/completion
    pairs"). A TSV with `prompt` and `completion` columns was refused ("no field 'references'")."""
    from clusterlm.data.seq2seq import read_pairs

    f = tmp_path / "p.tsv"
    f.write_text("prompt\tcompletion\n1+1=\t2\n2+2=\t4\n")
    for recs in (read_records(str(f), "sft"), read_pairs(str(f))):
        assert [(r.prompt, r.completion) for r in recs] == [("1+1=", "2"), ("2+2=", "4")]
    f.write_text("prompt\tcompletion\n1+1=\t2\n2+2=\t \n")
    with pytest.raises(DataError, match=r"p.tsv:3: field 'completion' must be a non-empty string"):
        read_records(str(f), "sft")
    f.write_text("completion\tprompt\treferences\n2\t1+1=\ttwo\n")  # the harness's column wins
    assert read_records(str(f), "sft")[0].completion == "two"
    f.write_text("prompt\tanswer\n1+1=\t2\n")  # neither column: the header is named, with both names
    with pytest.raises(DataError, match=r"p.tsv:1: the header has no column 'references' or 'completion' .*"
                                        r"columns: prompt, answer"):
        read_records(str(f), "sft")


def test_characters_a_char_base_lacks_are_named_when_the_data_is_prepared(tmp_path, caplog):
    """Reference: the base's character vocabulary. Characters of the examples as encoded (contents and
    the template's text, its special tokens aside) that a char base lacks train as <|unk|>: one warning
    names them (here 'Ü'; the ChatML-style template's role names are known to this base, while one
    trained on digits alone would read them as <|unk|> too). Before, nothing said so."""
    import dataclasses
    import logging

    from clusterlm.config import TrainConfig
    from clusterlm.finetune.data import ensure_finetune_data

    base = _chat_base(tmp_path / "base", None)  # characters: digits, + =, space, a-z, newline
    chatml = tmp_path / "chatml.jinja"
    chatml.write_text("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                      "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    src = write_jsonl(tmp_path / "r.jsonl", [{"messages": [{"role": "user", "content": f"{i}+{i} Ü"},
                                                            {"role": "assistant", "content": str(2 * i)}]}
                                             for i in range(8)])
    cfg = _sft_cfg(tmp_path, src, init_from=str(base), template=str(chatml))
    cfg = dataclasses.replace(cfg, train=TrainConfig(out_dir=str(tmp_path / "run"), seq_len=64))
    caplog.clear()  # the base's save may have logged (at INFO, where an earlier test left the level there)
    with caplog.at_level(logging.WARNING, logger="clusterlm.finetune.data"):
        ensure_finetune_data(cfg)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        "1 distinct character(s) of the examples (as they are encoded, template included) are not in the base's "
        "character vocabulary and train as <|unk|>: 'Ü'"]
    caplog.clear()
    plain = write_jsonl(tmp_path / "p.jsonl", pairs(8))
    with caplog.at_level(logging.WARNING, logger="clusterlm.finetune.data"):
        ensure_finetune_data(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=str(plain),
                                                                                dir=str(tmp_path / "d2")),
                                                 finetune=dataclasses.replace(cfg.finetune, template="auto")))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_jsonl_that_is_not_utf8_or_a_damaged_gzip_is_named_with_its_line(tmp_path):
    """SFT JSONL reads as task files do (eval/tasks.py text_lines): a byte that is not UTF-8 is named
    with its line (it was "FILE: not UTF-8 text (...)" with no line), and a damaged .gz is a DataError
    naming the file (it was a raw zlib/EOFError traceback)."""
    import gzip

    good = json.dumps({"prompt": "1+1", "completion": "2"}) + "\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes((good * 2).encode() + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid UTF-8"):
        read_records(str(bad), "sft")
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress((good * 2000).encode())[:-40])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: corrupt or truncated gzip file"):
        read_records(str(cut), "sft")
