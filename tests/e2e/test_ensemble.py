"""`clusterlm ensemble`: classifiers of one recipe written as one checkpoint that answers with the
mean of their class probabilities (clusterlm/models/ensemble.py, clusterlm/finetune/ensemble.py).

References: each member loaded alone and called on [EOS] + the text's ids, its softmax averaged by
hand; `clusterlm eval --task` samples and POST /classify compared with that average. The members
hold seeded random weights (an LSTM and a Llama-style decoder classifier, init seeds 1-3) with a
byte tokenizer, written with checkpoint.store.save_checkpoint.

    .venv/bin/python -m pytest -q tests/e2e/test_ensemble.py
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from clusterlm.cli import main as cli
from tests.e2e.test_classify import LABELS, TEXTS, Client, _task, direct

CONTEXT = 24


def _save(root: Path, cfg, name: str, seed: int, tok: str = "tok.json") -> Path:
    from clusterlm.checkpoint.store import save_checkpoint
    from clusterlm.config import RunConfig, to_toml
    from clusterlm.models.build import build_model

    model = build_model(cfg)
    model.init_weights(seed)
    save_checkpoint(root / name / "checkpoints", 10 * seed, model_state=model.state_dict(), optimizer_state=None,
                    train_state={}, config_toml=to_toml(RunConfig(model=cfg)), tokenizer_path=root / tok)
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """lstm1-3 and llama1-2 (init seeds 1-3), and what must be refused: lstm_wide (dim 48), lstm_labels
    (other labels), lstm_tok (another tokenizer), lm (a language model)."""
    from clusterlm.models.config import get_preset
    from clusterlm.tokenizer.kinds import train_tokenizer

    root = tmp_path_factory.mktemp("ensemble")
    tok = train_tokenizer("byte", ["x"])
    tok.save(root / "tok.json")
    train_tokenizer("char", ["a gripping film, dull; I laughed ok meh so-sbt"]).save(root / "char.json")
    common = dict(vocab_size=tok.vocab_size, labels=LABELS, pad_id=tok.pad_id)
    lstm = get_preset("lstm-small", n_layers=1, dim=32, dropout=0.0, **common)
    llama = get_preset("llama-nano", n_layers=1, dim=32, n_heads=4, max_seq_len=CONTEXT, **common)
    runs = {f"lstm{s}": _save(root, lstm, f"lstm{s}", s) for s in (1, 2, 3)}
    runs |= {f"llama{s}": _save(root, llama, f"llama{s}", s) for s in (1, 2)}
    runs["lstm_wide"] = _save(root, dataclasses.replace(lstm, dim=48), "lstm_wide", 4)
    runs["lstm_labels"] = _save(root, dataclasses.replace(lstm, labels=("neg", "neutral", "pos")), "lstm_labels", 5)
    runs["lstm_tok"] = _save(root, lstm, "lstm_tok", 6, tok="char.json")  # fewer ids than the byte vocabulary
    lm = get_preset("llama-nano", n_layers=1, dim=32, n_heads=4, max_seq_len=CONTEXT, vocab_size=tok.vocab_size)
    runs["lm"] = _save(root, lm, "lm", 7)
    return runs


def _combine(capsys, out: Path, *members: Path) -> None:
    capsys.readouterr()
    assert cli(["ensemble", *map(str, members), "--out", str(out)]) == 0, capsys.readouterr().err


def _refused(capsys, *args: str) -> str:
    """The one error line of a command that exits 2 (finetune logs its resolved config before it)."""
    capsys.readouterr()
    assert cli(list(args)) == 2
    err = [x for x in capsys.readouterr().err.strip().splitlines() if "error: " in x]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("arch,n", [("lstm", 3), ("llama", 2)])
def test_ensemble_answers_the_mean_of_its_members_probabilities(runs, tmp_path, capsys, arch, n):
    """Loaded, evaluated with `eval --task` and served on /classify, the ensemble's probabilities are
    the mean of its members' (each loaded alone) to 1e-6 / 1e-5, its label their argmax; the folder
    verifies against its manifest and names its members."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.checkpoint.store import read_ensemble, resolve_checkpoint, verify_checkpoint
    from clusterlm.models.ensemble import ClassifierEnsemble

    members = [runs[f"{arch}{s}"] for s in range(1, n + 1)]
    out = tmp_path / "ens"
    _combine(capsys, out, *members)
    step = resolve_checkpoint(str(out))
    assert step.name == f"step-{10 * n:08d}" and verify_checkpoint(step) == []  # the largest member step
    meta = read_ensemble(step)
    assert meta["members"] == n and meta["sources"] == [str(resolve_checkpoint(str(m))) for m in members]
    want = torch.stack([direct(m, TEXTS) for m in members]).mean(dim=0)  # (len(TEXTS), C)
    assert not torch.allclose(direct(members[0], TEXTS), want, atol=1e-3)  # the members do disagree
    loaded = load_for_inference(out)
    assert isinstance(loaded.model, ClassifierEnsemble) and len(loaded.model.members) == n
    torch.testing.assert_close(direct(out, TEXTS), want, rtol=0, atol=1e-6)

    samples = tmp_path / "samples.jsonl"
    capsys.readouterr()
    assert cli(["eval", str(out), "--task", str(_task(tmp_path / "sent.jsonl")), "--samples", str(samples)]) == 0
    res = json.loads(capsys.readouterr().out)["tasks"]["sent"]
    assert res["scored_by"] == "classifier head" and res["n"] == len(TEXTS)
    recs = [json.loads(x) for x in samples.read_text().splitlines()]
    got = torch.tensor([[r["probs"][lab] for lab in LABELS] for r in recs])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert [r["prediction"] for r in recs] == [LABELS[int(i)] for i in want.argmax(dim=-1)]

    with Client(out, max_batch=4) as c:
        body = c.post("/classify", {"input": TEXTS}).json()
        assert c.get("/v1/models").json()["data"][0]["labels"] == list(LABELS)
    for d, w in zip(body["data"], want):
        assert d["label"] == LABELS[int(w.argmax())] and d["probs"] == pytest.approx(w.tolist(), abs=1e-5)


def test_ensemble_refuses_what_it_cannot_average_and_writes_nothing(runs, tmp_path, capsys, monkeypatch):
    """Exit 2 with one line naming the member and what would be valid, and no out/checkpoints, for: one
    member, a missing path, a language model, another shape, other labels, another tokenizer, a member
    given twice, an ensemble as a member; an existing --out, an --out that is or is under a file, and an
    empty --out are refused. An ensemble is refused as
    finetune.init_from, by quantize and by resume."""
    out = tmp_path / "out"
    cases = [
        ([runs["lstm1"]], "at least 2 classifiers, got 1"),
        ([runs["lstm1"], tmp_path / "nope"], "does not exist"),
        ([runs["lstm1"], runs["lm"]], "is a language model"),
        ([runs["lstm1"], runs["lstm_wide"]], "model.dim=32 vs 48"),
        ([runs["lstm1"], runs["lstm_labels"]], "model.labels="),
        ([runs["lstm1"], runs["lstm_tok"]], "another tokenizer"),
        ([runs["lstm1"], runs["lstm1"] / "checkpoints"], "is given twice"),
    ]
    for members, fragment in cases:
        line = _refused(capsys, "ensemble", *map(str, members), "--out", str(out))
        assert fragment in line, (fragment, line)
        assert not out.exists() or not (out / "checkpoints").exists()
    # --out: a file, a folder under a file, empty (the working folder): refused naming it, before any member
    # is read (it said "Not a directory: F/checkpoints" after loading them all, and "" wrote ./checkpoints)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    for bad, fragment in [(tmp_path / "afile", "afile is a file, not a folder"),
                          (tmp_path / "afile" / "sub", "afile is a file, not a folder"), ("", "--out='' is empty")]:
        capsys.readouterr()
        assert cli(["ensemble", str(runs["lstm1"]), str(runs["lstm2"]), "--out", str(bad)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert fragment in err[-1], err
    assert (tmp_path / "afile").read_text() == "x" and not list((tmp_path / "cwd").iterdir())
    ens = tmp_path / "ens"
    _combine(capsys, ens, runs["lstm1"], runs["lstm2"])
    assert "already exists" in _refused(capsys, "ensemble", str(runs["lstm1"]), str(runs["lstm3"]), "--out", str(ens))
    line = _refused(capsys, "ensemble", str(ens), str(runs["lstm3"]), "--out", str(out))
    assert "already an ensemble of 2" in line and str(runs["lstm1"]) in line
    assert "is an ensemble of 2" in _refused(capsys, "quantize", str(ens), "--method", "int8", "--out", str(out))
    line = _refused(capsys, "finetune", "--finetune.task=classify", f"--finetune.init_from={json.dumps(str(ens))}",
                    f"--train.out_dir={json.dumps(str(out))}", f"--data.source={json.dumps(str(tmp_path / 'x.tsv'))}")
    assert "is an ensemble of 2 classifiers" in line and "distill_from" in line
    assert not (out / "checkpoints").exists()
