"""Pruning: magnitude masks, structured head/channel removal against a masked reference, and the
`clusterlm prune` checkpoint round trip with a recovery fine-tune.

Run: .venv/bin/python -m pytest -q tests/unit/test_prune.py
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clusterlm.checkpoint.model_io import load_for_inference
from clusterlm.checkpoint.store import save_checkpoint
from clusterlm.config import RunConfig, TrainConfig, to_toml
from clusterlm.data import shards
from clusterlm.fsutil import sha256_file
from clusterlm.models.build import build_model
from clusterlm.models.config import ModelConfig
from clusterlm.optimize.prune import block_linears, magnitude_prune, main, prunable_weights, structured_prune
from clusterlm.tokenizer.kinds import make_tokenizer

GPT = ModelConfig(vocab_size=64, n_layers=2, dim=32, n_heads=4, max_seq_len=32, bias=True)
LLAMA = ModelConfig(vocab_size=64, n_layers=2, dim=32, n_heads=4, n_kv_heads=2, max_seq_len=32, pos="rope",
                    norm="rmsnorm", mlp="swiglu", ffn_dim=48, tie_embeddings=False)


def _model(cfg: ModelConfig) -> torch.nn.Module:
    m = build_model(cfg)
    m.init_weights(0)
    return m.eval()


def test_magnitude_zeroes_smallest_fraction():
    """Each block Linear gets exactly round(S * numel) zeros, the zeroed entries are the smallest
    |w| (max zeroed |w| <= min kept |w|), kept entries are unchanged; embeddings are untouched."""
    model = _model(GPT)
    before = {n: m.weight.clone() for n, m in block_linears(model).items()}
    emb = model.tok_embeddings.weight.clone()
    masks = magnitude_prune(model, 0.5)
    assert set(masks) == {f"{n}.weight" for n in before} and len(masks) == 2 * 6
    for name, lin in block_linears(model).items():
        w0, m = before[name], masks[f"{name}.weight"]
        assert int((~m).sum()) == round(0.5 * w0.numel())
        assert int((lin.weight == 0).sum()) >= round(0.5 * w0.numel())
        assert w0[~m].abs().max() <= w0[m].abs().min()
        assert torch.equal(lin.weight[m], w0[m])
    assert torch.equal(model.tok_embeddings.weight, emb)


@pytest.mark.parametrize("cfg", [GPT, LLAMA], ids=["gpt-mha", "llama-gqa"])
def test_structured_equals_masked_original(cfg):
    """The structurally pruned model's logits equal the original model's with the removed heads'
    wo columns and the removed channels' w2 columns zeroed (1e-5); shapes and counts shrink."""
    model = _model(cfg)
    pruned = structured_prune(model, 0.5)
    pc = pruned.config
    assert pc.n_heads == 2 and pc.head_dim == cfg.head_dim and pc.hidden_dim == cfg.hidden_dim // 2
    assert pc.kv_heads == (1 if cfg.n_kv_heads else 2)
    assert sum(p.numel() for p in pruned.parameters()) == pc.num_params() < cfg.num_params()
    Hd = cfg.head_dim
    masked = _model(cfg)
    masked.load_state_dict(model.state_dict())
    with torch.no_grad():
        for key, layer in masked.layers.items():
            pl = pruned.layers[key]
            orig_q = model.layers[key].attention.wq.weight.view(cfg.n_heads, Hd, -1)
            new_q = pl.attention.wq.weight.view(pc.n_heads, Hd, -1)
            kept = [h for h in range(cfg.n_heads) if any(torch.equal(orig_q[h], new_q[j]) for j in range(pc.n_heads))]
            assert len(kept) == pc.n_heads
            for h in set(range(cfg.n_heads)) - set(kept):
                layer.attention.wo.weight[:, h * Hd:(h + 1) * Hd] = 0
            w1o, w1n = model.layers[key].feed_forward.w1.weight, pl.feed_forward.w1.weight
            kept_c = {c for c in range(w1o.shape[0]) if any(torch.equal(w1o[c], r) for r in w1n)}
            for c in set(range(w1o.shape[0])) - kept_c:
                layer.feed_forward.w2.weight[:, c] = 0
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (pruned(idx) - masked(idx)).abs().max().item() < 1e-5


@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_magnitude_prunes_recurrent_weights(arch):
    """An LSTM/GRU: each layer's weight_ih/weight_hh gets exactly round(S * numel) zeros (the
    smallest |w|), so the logits change; the embedding (tied output) is untouched. Before the fix
    nothing was pruned and the model came back unchanged."""
    cfg = ModelConfig(arch=arch, vocab_size=64, n_layers=2, dim=16, max_seq_len=32, pos="none")
    model = _model(cfg)
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before_logits = model(idx)
    before = {n: w.clone() for n, w in prunable_weights(model).items()}
    emb = model.tok_embeddings.weight.clone()
    masks = magnitude_prune(model, 0.5)
    assert sorted(masks) == sorted(f"rnn.weight_{k}_l{i}" for k in ("ih", "hh") for i in range(2))
    weights = dict(model.named_parameters())
    for name, m in masks.items():
        w0 = before[name]
        assert int((~m).sum()) == round(0.5 * w0.numel()) and int((weights[name] == 0).sum()) >= int((~m).sum())
        assert w0[~m].abs().max() <= w0[m].abs().min()
    assert torch.equal(model.tok_embeddings.weight, emb)
    with torch.no_grad():
        assert (model(idx) - before_logits).abs().max().item() > 1e-3
    # structured pruning has no heads or channels to remove here: the refusal names what works
    with pytest.raises(ValueError, match=f"got model.arch='{arch}'; prune it with --method magnitude"):
        structured_prune(_model(cfg), 0.5)


def test_magnitude_refuses_when_nothing_would_be_pruned():
    """No prunable matrix, or a sparsity that rounds to zero entries everywhere: a clear ValueError
    (the CLI's exit 2), not a "pruned" copy equal to its source."""
    with pytest.raises(ValueError, match="no weight matrix to prune"):
        magnitude_prune(torch.nn.Sequential(torch.nn.Embedding(8, 4)), 0.5)
    with pytest.raises(ValueError, match="zeroes no entry"):
        magnitude_prune(_model(GPT), 1e-6)


def _data(path, n: int = 8192, vocab_size: int = 259) -> None:
    """A periodic token stream (period 16) that a few steps of training learn quickly."""
    path.mkdir()
    toks = np.arange(n, dtype=np.int64) % 16 + 3
    entries = []
    for split in ("train", "val"):
        shards.write_shard(path / f"{split}-00000.bin", toks, np.dtype("uint16"))
        entries.append((split, {"shards": [{"file": f"{split}-00000.bin", "tokens": n,
                                            "sha256": sha256_file(path / f"{split}-00000.bin")}],
                                "tokens": n, "documents": 1, "bytes": 0}))
    meta = {"format_version": 1, "tokenizer": {"kind": "byte", "vocab_size": vocab_size, "bos_id": 0, "eos_id": 1,
                                               "pad_id": 2, "file": "tokenizer.json", "sha256": "0" * 64},
            "dtype": "uint16", "splits": dict(entries)}
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("method", ["magnitude", "structured"])
def test_prune_cli_with_finetune(tmp_path, method):
    """`clusterlm prune --finetune-steps 30` writes a checkpoint that loads; the fine-tune lowers the
    loss (last < first); magnitude zeros survive the fine-tune; structured shrinks the config."""
    cfg = ModelConfig(vocab_size=259, n_layers=2, dim=32, n_heads=4, max_seq_len=32, bias=True)
    _data(tmp_path / "data")
    tok = make_tokenizer("byte")
    tok.save(tmp_path / "tok.json")
    model = _model(cfg)
    run = RunConfig(model=cfg, train=TrainConfig(seq_len=32, micro_batch_size=8))
    save_checkpoint(tmp_path / "run" / "checkpoints", 5, model_state=model.state_dict(), optimizer_state=None,
                    train_state={"step": 5}, config_toml=to_toml(run), tokenizer_path=tmp_path / "tok.json")
    out = tmp_path / "pruned"
    # an untrained model: a high peak lr (the default, 3x the run's min_lr, suits a trained one)
    assert main([str(tmp_path / "run"), "--sparsity", "0.5", "--method", method, "--finetune-steps", "30",
                 "--finetune-lr", "3e-3", "--data", str(tmp_path / "data"), "--out", str(out)]) == 0
    loaded = load_for_inference(out)
    ts = json.loads(next((out / "checkpoints").glob("step-*/train_state.json")).read_text())
    assert ts["pruning"]["method"] == method and ts["pruning"]["finetune_steps"] == 30
    assert ts["pruning"]["finetune_lr"] == 3e-3
    assert ts["pruning"]["finetune_last_loss"] < 0.8 * ts["pruning"]["finetune_first_loss"]
    if method == "magnitude":
        for lin in block_linears(loaded.model).values():
            assert int((lin.weight == 0).sum()) >= lin.weight.numel() // 2
    else:
        assert loaded.config.model.n_heads == 2 and loaded.config.model.hidden_dim == 64


@pytest.mark.parametrize("method, steps, lr, fragment", [
    ("magnitude", "10", "1e6", "diverged: loss nan at step"),
    ("structured", "1", "1e39", "diverged: non-finite weights in"),  # finite loss, then an inf update
])
def test_prune_cli_refuses_a_diverged_finetune(tmp_path, capsys, method, steps, lr, fragment):
    """A recovery fine-tune whose loss went NaN (a peak lr far too high) wrote the NaN weights as the
    pruned model, exit 0 and "wrote ..." (eval then gave loss NaN). Now one line names the step and
    the peak lr, exit 3 (EXIT_DIVERGED), nothing written."""
    from clusterlm.cli import main as cli

    cfg = ModelConfig(vocab_size=259, n_layers=1, dim=32, n_heads=4, max_seq_len=32, bias=True)
    _data(tmp_path / "data")
    make_tokenizer("byte").save(tmp_path / "tok.json")
    run = RunConfig(model=cfg, train=TrainConfig(seq_len=32, micro_batch_size=4))
    save_checkpoint(tmp_path / "run" / "checkpoints", 5, model_state=_model(cfg).state_dict(), optimizer_state=None,
                    train_state={"step": 5}, config_toml=to_toml(run), tokenizer_path=tmp_path / "tok.json")
    capsys.readouterr()
    assert cli(["prune", str(tmp_path / "run"), "--sparsity", "0.5", "--method", method, "--finetune-steps", steps,
                "--finetune-lr", lr, "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out")]) == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert fragment in err and f"(peak lr {float(lr):g}); nothing written: lower --finetune-lr" in err
    assert not (tmp_path / "out").exists()


def test_finetune_schedule_warms_up_then_decays_to_the_runs_min_lr():
    """The recovery fine-tune: warmup over 10% of the steps to the peak (default 3x the run's min_lr),
    cosine down to the run's min_lr by the last step; a peak below min_lr decays nowhere."""
    from clusterlm.config import OptimConfig
    from clusterlm.optimize.prune import finetune_optim
    from clusterlm.train.optim import lr_at

    run = OptimConfig(lr=1e-3, min_lr=1e-4, schedule="constant", warmup_steps=100)
    oc = finetune_optim(run, 200, None)
    assert (oc.lr, oc.min_lr, oc.warmup_steps, oc.schedule) == (pytest.approx(3e-4), 1e-4, 20, "cosine")
    lrs = [lr_at(s, oc, 200) for s in range(200)]
    assert lrs[19] == pytest.approx(3e-4) and lrs[0] == pytest.approx(3e-4 / 20)
    assert all(a >= b for a, b in zip(lrs[19:], lrs[20:])) and lrs[-1] == pytest.approx(1e-4, rel=1e-3)
    assert finetune_optim(run, 200, 5e-5).min_lr == 5e-5
    with pytest.raises(ValueError, match=r"the default fine-tune lr, 3 x the run's optim.min_lr=0.0, is 0.0; pass "
                                         r"--finetune-lr \(a number > 0\)"):
        finetune_optim(OptimConfig(lr=1e-3, min_lr=0.0), 10, None)
    with pytest.raises(ValueError, match=r"--finetune-lr=-1.0 must be a finite number > 0"):
        finetune_optim(run, 10, -1.0)


@pytest.mark.parametrize("lr", ["-1", "0", "nan", "inf"])
def test_prune_cli_refuses_a_bad_finetune_lr_before_reading_anything(tmp_path, capsys, lr):
    """--finetune-lr -1 was refused after the checkpoint and data were read, saying 'pass
    --finetune-lr' to a user who had; inf got as far as 'optim.lr=inf is not a finite number'. Each
    is refused first, naming --finetune-lr and what is valid (exit 2)."""
    from clusterlm.cli import main as cli

    assert cli(["prune", str(tmp_path / "no-run"), "--sparsity", "0.5", "--method", "magnitude",
                "--finetune-steps", "2", "--finetune-lr", lr, "--out", str(tmp_path / "out")]) == 2
    assert f"--finetune-lr={float(lr)} must be a finite number > 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prune_cli_lstm_finetune_keeps_recurrent_zeros(tmp_path):
    """`clusterlm prune` of an LSTM run with --finetune-steps: the written checkpoint has half of every
    weight_ih/weight_hh zero (the masks survive AdamW), and the fine-tune lowers the loss."""
    cfg = ModelConfig(arch="lstm", vocab_size=259, n_layers=2, dim=32, max_seq_len=32, pos="none")
    _data(tmp_path / "data")
    tok = make_tokenizer("byte")
    tok.save(tmp_path / "tok.json")
    run = RunConfig(model=cfg, train=TrainConfig(seq_len=32, micro_batch_size=8))
    save_checkpoint(tmp_path / "run" / "checkpoints", 5, model_state=_model(cfg).state_dict(), optimizer_state=None,
                    train_state={"step": 5}, config_toml=to_toml(run), tokenizer_path=tmp_path / "tok.json")
    out = tmp_path / "pruned"
    assert main([str(tmp_path / "run"), "--sparsity", "0.5", "--method", "magnitude", "--finetune-steps", "20",
                 "--finetune-lr", "1e-2", "--data", str(tmp_path / "data"), "--out", str(out)]) == 0
    loaded = load_for_inference(out)
    weights = prunable_weights(loaded.model)
    assert len(weights) == 4
    for w in weights.values():
        assert int((w == 0).sum()) >= w.numel() // 2
    ts = json.loads(next((out / "checkpoints").glob("step-*/train_state.json")).read_text())
    assert ts["pruning"]["finetune_last_loss"] < ts["pruning"]["finetune_first_loss"]


def _save_run(root, cfg: ModelConfig, tok_file, **train) -> None:
    """A one-checkpoint run of an untrained model with config `cfg` at root/run."""
    run = RunConfig(model=cfg, train=TrainConfig(seq_len=32, micro_batch_size=8, **train))
    save_checkpoint(root / "run" / "checkpoints", 5, model_state=_model(cfg).state_dict(), optimizer_state=None,
                    train_state={"step": 5}, config_toml=to_toml(run), tokenizer_path=tok_file)


def test_prune_finetune_of_an_encoder_trains_the_masked_lm_loss(tmp_path):
    """An encoder's recovery fine-tune trains its own objective: the first fine-tune loss equals the
    masked-LM loss (data/mlm.MLMLoader's first batch, the run's seed) of the pruned model, and falls.
    Before the fix it was the next-token loss, which a bidirectional encoder learns by copying."""
    from clusterlm.data.mlm import MASK, MLMLoader
    from clusterlm.eval.metrics import lm_loss

    tok = make_tokenizer("byte").with_special_tokens([MASK])
    tok.save(tmp_path / "tok.json")
    _data(tmp_path / "data", vocab_size=tok.vocab_size)
    cfg = ModelConfig(arch="encoder", vocab_size=tok.vocab_size, n_layers=2, dim=32, n_heads=4, max_seq_len=32)
    _save_run(tmp_path, cfg, tmp_path / "tok.json")
    out = tmp_path / "pruned"
    assert main([str(tmp_path / "run"), "--sparsity", "0.5", "--method", "magnitude", "--finetune-steps", "30",
                 "--finetune-lr", "3e-3", "--data", str(tmp_path / "data"), "--out", str(out)]) == 0
    ts = json.loads(next((out / "checkpoints").glob("step-*/train_state.json")).read_text())["pruning"]
    model = load_for_inference(tmp_path / "run").model
    magnitude_prune(model, 0.5)
    x, y = next(MLMLoader(tmp_path / "data", "train", batch_size=8, seq_len=32, mask_id=tok.token_id(MASK),
                          vocab=259, seed=TrainConfig().seed))
    with torch.no_grad():
        mlm = lm_loss(model(*x), y).item()
    assert ts["finetune_first_loss"] == pytest.approx(mlm, rel=1e-4)
    assert ts["finetune_last_loss"] < 0.9 * ts["finetune_first_loss"]


def test_prune_finetune_of_an_encdec_trains_on_pairs_and_refuses_token_shards(tmp_path):
    """An encoder-decoder's fine-tune reads source/target pairs (the seq2seq loss falls); given token
    shards it is refused in one line before anything is written (it was a traceback:
    EncoderDecoder.forward() missing 'tgt')."""
    from clusterlm.data.seq2seq import prepare_pairs
    from clusterlm.errors import DataError

    tok = make_tokenizer("byte")
    tok.save(tmp_path / "tok.json")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"n{i % 10}", "completion": f"m{i % 10}"})
                                                  + "\n" for i in range(200)))
    prepare_pairs(tmp_path / "pairs", source=str(tmp_path / "pairs.jsonl"), tokenizer=tok, max_source_len=16)
    _data(tmp_path / "lm")
    cfg = ModelConfig(arch="encdec", vocab_size=259, n_layers=1, n_enc_layers=1, dim=32, n_heads=4, max_seq_len=32)
    _save_run(tmp_path, cfg, tmp_path / "tok.json")
    args = [str(tmp_path / "run"), "--sparsity", "0.5", "--method", "magnitude", "--finetune-steps", "20",
            "--finetune-lr", "3e-3"]
    with pytest.raises(DataError, match="reads source/target pairs, but .* holds token shards"):
        main([*args, "--data", str(tmp_path / "lm"), "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()
    assert main([*args, "--data", str(tmp_path / "pairs"), "--out", str(tmp_path / "pruned")]) == 0
    ts = json.loads(next((tmp_path / "pruned" / "checkpoints").glob("step-*/train_state.json")).read_text())
    assert ts["pruning"]["finetune_last_loss"] < ts["pruning"]["finetune_first_loss"]


@pytest.mark.parametrize("extra", [["--finetune-lr", "0.1"], ["--data", "some/dir"]])
def test_prune_cli_refuses_finetune_options_without_finetune_steps(tmp_path, capsys, extra):
    """--finetune-lr or --data without --finetune-steps was silently ignored (no fine-tune ran, exit 0);
    it is refused as a usage error (exit 2) before the checkpoint is read or anything written."""
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path / "no-run"), "--sparsity", "0.5", "--method", "magnitude", *extra,
              "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert "runs only with --finetune-steps" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method, sparsity", [("magnitude", "0"), ("structured", "0"), ("structured", "0.001")])
def test_prune_cli_refuses_a_copy_equal_to_its_source(tmp_path, method, sparsity):
    """--sparsity 0 (or a structured sparsity that rounds to no head and no channel) with no fine-tune
    wrote a "pruned" checkpoint equal to its source, exit 0; refused, nothing written."""
    tok = make_tokenizer("byte")
    tok.save(tmp_path / "tok.json")
    _save_run(tmp_path, ModelConfig(vocab_size=tok.vocab_size, n_layers=1, dim=32, n_heads=4, max_seq_len=32,
                                    ffn_dim=64), tmp_path / "tok.json")
    with pytest.raises(ValueError, match="would equal its source"):
        main([str(tmp_path / "run"), "--sparsity", sparsity, "--method", method, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("arch", ["encoder", "encdec"])
def test_structured_refusal_of_the_encoder_families_points_to_magnitude(arch):
    """An encoder or encoder-decoder is a Transformer too: "structured pruning needs a Transformer, got
    model.arch='encdec'" contradicted itself and named no way out. The refusal now says decoder-only
    and points to --method magnitude (which prunes their blocks)."""
    enc = {"n_enc_layers": 1} if arch == "encdec" else {}
    cfg = ModelConfig(arch=arch, vocab_size=259, n_layers=1, dim=32, n_heads=4, max_seq_len=16, **enc)
    with pytest.raises(ValueError, match=f"decoder-only Transformer .*got model.arch='{arch}'; prune it with "
                                         "--method magnitude"):
        structured_prune(_model(cfg), 0.5)
