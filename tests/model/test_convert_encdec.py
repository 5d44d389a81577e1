"""Hugging Face parity of the encoder families (models/convert_encdec.py), through the commands:
a clusterlm "encoder" -> `clusterlm export` -> transformers' RobertaPreLayerNormForMaskedLM, an
"encdec" -> MBartForConditionalGeneration (from_pretrained, logits 1e-4), and back with `clusterlm
convert`; tiny random-weight transformers models built locally (no downloads) -> `clusterlm convert`
-> our logits. Options the target classes cannot express are refused in one line.

Run: .venv/bin/python -m pytest -q tests/model/test_convert_encdec.py
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from clusterlm.checkpoint.model_io import load_for_inference  # noqa: E402
from clusterlm.errors import ConfigError  # noqa: E402
from clusterlm.interop.cli import export_main, main  # noqa: E402
from clusterlm.models.build import build_model  # noqa: E402
from clusterlm.models.config import ModelConfig  # noqa: E402

V = 259  # the byte tokenizer: 256 bytes, BOS 256, EOS 257, PAD 258
PAD = 258
ENCODER = ModelConfig(arch="encoder", vocab_size=V, n_layers=2, dim=32, n_heads=4, max_seq_len=16, bias=True)
ENCDEC = ModelConfig(arch="encdec", vocab_size=V, n_layers=2, n_enc_layers=3, dim=32, n_heads=4, max_seq_len=16,
                     bias=True)


def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Every weight random (norm weights around 1), so that every mapped tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = any(k in name.lower() for k in ("norm", "layernorm")) and name.endswith("weight")
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if norm else 0.0))


def _checkpoint(tmp_path, cfg: ModelConfig):
    """A clusterlm run folder holding random weights of `cfg` and the byte tokenizer; the model"""
    from clusterlm.checkpoint.store import save_checkpoint
    from clusterlm.config import RunConfig, to_toml
    from clusterlm.tokenizer.kinds import make_tokenizer

    tok = tmp_path / "tokenizer.json"
    make_tokenizer("byte").save(tok)
    model = build_model(cfg)
    model.init_weights(0)
    _randomize(model)
    save_checkpoint(tmp_path / "run" / "checkpoints", 0, model_state=model.state_dict(), optimizer_state=None,
                    train_state={"step": 0}, config_toml=to_toml(RunConfig(model=cfg)), tokenizer_path=tok)
    return model.eval()


def _inputs(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (2, n) of byte tokens, right-padded with PAD in row 1; mask (2, n) bool, True = real)"""
    ids = torch.randint(0, 256, (2, n), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, n - 4:] = False
    return ids.masked_fill(~mask, PAD), mask


def _close(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    assert got.shape == want.shape
    if mask is not None:  # padded positions' own outputs are not defined alike
        got, want = got[mask], want[mask]
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("tie", [True, False])
def test_encoder_export_and_back(tmp_path, tie):
    """A clusterlm masked-LM encoder exported with `clusterlm export` loads as transformers'
    RobertaPreLayerNormForMaskedLM (AutoModelForMaskedLM) with our logits at every real position of a
    right-padded batch (1e-4), and `clusterlm convert` of that folder gives our logits back."""
    cfg = dataclasses.replace(ENCODER, tie_embeddings=tie)
    ours = _checkpoint(tmp_path, cfg)
    assert export_main([str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "exp")]) == 0
    hf_cfg = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert hf_cfg["architectures"] == ["RobertaPreLayerNormForMaskedLM"] and hf_cfg["pad_token_id"] == PAD
    assert not (tmp_path / "exp" / "generation_config.json").exists()  # it does not generate
    hf = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "exp").eval()
    assert type(hf).__name__ == "RobertaPreLayerNormForMaskedLM"
    ids, mask = _inputs(16)  # the whole context
    with torch.no_grad():
        want = ours(ids, mask)
        _close(hf(input_ids=ids, attention_mask=mask.long()).logits, want, mask)
    assert main(["--from-hf", str(tmp_path / "exp"), "--out", str(tmp_path / "back")]) == 0
    back = load_for_inference(tmp_path / "back")
    assert back.config.model.max_seq_len == cfg.max_seq_len and back.config.model.tie_embeddings == tie
    with torch.no_grad():
        _close(back.model(ids, mask), want, mask)


def test_encdec_export_and_back(tmp_path):
    """A clusterlm encoder-decoder exported with `clusterlm export` loads as transformers'
    MBartForConditionalGeneration (AutoModelForSeq2SeqLM) with our logits for a padded source batch
    and a target prefix (1e-4), and `clusterlm convert` of that folder gives our logits back; the
    generation config starts the decoder from BOS and forces no end token, so transformers' greedy
    generate() gives our cached greedy decoding token for token."""
    ours = _checkpoint(tmp_path, ENCDEC)
    assert export_main([str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "exp")]) == 0
    gen = json.loads((tmp_path / "exp" / "generation_config.json").read_text())
    assert gen["decoder_start_token_id"] == 256 and gen["forced_eos_token_id"] is None
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "exp").eval()
    assert type(hf).__name__ == "MBartForConditionalGeneration"
    src, src_mask = _inputs(13)
    tgt, _ = _inputs(16, seed=2)
    tgt[:, 0] = 256  # BOS
    with torch.no_grad():
        want = ours(src, tgt, src_mask)
        _close(hf(input_ids=src, attention_mask=src_mask.long(), decoder_input_ids=tgt).logits, want)
        # greedy decoding: ours through the cross-attention cache, theirs through generate() and the
        # exported generation_config.json (start from BOS, no forced end), token for token
        cache = ours.make_cache(2, 9, device="cpu", dtype=torch.float32)
        seq = torch.full((2, 1), 256)
        for _ in range(8):
            logits = ours(src, seq[:, -1:], src_mask, cache=cache)[:, -1]
            logits[:, 257] = float("-inf")  # EOS: what min_new_tokens does on their side
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        theirs = hf.generate(input_ids=src, attention_mask=src_mask.long(), max_new_tokens=8, min_new_tokens=8,
                             do_sample=False, num_beams=1)
    assert torch.equal(theirs, seq), (theirs, seq)
    assert main(["--from-hf", str(tmp_path / "exp"), "--out", str(tmp_path / "back")]) == 0
    back = load_for_inference(tmp_path / "back")
    assert back.config.model.enc_layers == 3 and back.config.model.n_layers == 2
    with torch.no_grad():
        _close(back.model(src, tgt, src_mask), want)


def test_untied_encdec_export_and_import(tmp_path):
    """An encoder-decoder with tie_embeddings=false: transformers (5.x) ties MBart's encoder/decoder
    embed_tokens to model.shared only with tied embeddings, so the export, which wrote model.shared
    alone, loaded with both stacks' tables randomly initialized (logits off by ~1.7, a load report the
    only sign). Now the stacks' tables are written: from_pretrained gives our logits (1e-4), and
    `convert` reads the tables the stacks use, not model.shared (an untied MBart whose shared table
    differs converted to other logits); tables that differ between the stacks are refused."""
    from clusterlm.errors import CheckpointError

    cfg = dataclasses.replace(ENCDEC, tie_embeddings=False)
    ours = _checkpoint(tmp_path, cfg)
    assert export_main([str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "exp")]) == 0
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "exp").eval()
    src, src_mask = _inputs(13)
    tgt, _ = _inputs(9, seed=2)
    with torch.no_grad():
        want = ours(src, tgt, src_mask)
        _close(hf(input_ids=src, attention_mask=src_mask.long(), decoder_input_ids=tgt).logits, want)
        hf.model.shared.weight.normal_()  # unused by an untied MBart's forward: must not be what convert reads
        _close(hf(input_ids=src, attention_mask=src_mask.long(), decoder_input_ids=tgt).logits, want)
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_text((tmp_path / "exp" / "tokenizer.json").read_text())
    assert main(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    with torch.no_grad():
        _close(load_for_inference(tmp_path / "back").model(src, tgt, src_mask), want)

    with torch.no_grad():
        hf.model.decoder.embed_tokens.weight.add_(0.1)  # the stacks now read different tables
    hf.save_pretrained(tmp_path / "hf2")
    (tmp_path / "hf2" / "tokenizer.json").write_text((tmp_path / "exp" / "tokenizer.json").read_text())
    with pytest.raises(CheckpointError, match="token embeddings of encoder and decoder differ"):
        main(["--from-hf", str(tmp_path / "hf2"), "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def _save_hf(tmp_path, hf) -> None:
    from clusterlm.tokenizer.kinds import make_tokenizer

    _randomize(hf, seed=3)
    hf.save_pretrained(tmp_path / "hf")
    make_tokenizer("byte").save(tmp_path / "hf" / "tokenizer.json")
    assert main(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0


def test_roberta_prelayernorm_import(tmp_path):
    """A random RobertaPreLayerNormForMaskedLM (pad_token_id 1: positions from 2; two token types, of
    which every token gets type 0) converted with `clusterlm convert` gives transformers' logits at
    every real position (1e-4)."""
    hf_cfg = transformers.RobertaPreLayerNormConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        hidden_act="gelu_new", max_position_embeddings=20, type_vocab_size=2, pad_token_id=1, layer_norm_eps=1e-5,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, tie_word_embeddings=False)
    hf = transformers.RobertaPreLayerNormForMaskedLM(hf_cfg).eval()
    _save_hf(tmp_path, hf)
    loaded = load_for_inference(tmp_path / "run")
    assert loaded.config.model.max_seq_len == 18 and loaded.config.model.arch == "encoder"
    ids, mask = _inputs(18, seed=4)
    ids = ids.masked_fill(ids == 1, 3).masked_fill(~mask, 1)  # HF's padding id is 1 here
    with torch.no_grad():
        _close(loaded.model(ids, mask), hf(input_ids=ids, attention_mask=mask.long()).logits, mask)


def test_roberta_position_table_must_match_config_json(tmp_path):
    """A RoBERTa folder whose position table has more rows than config.json's max_position_embeddings
    converted with every position shifted (our rows were found from the table's size), where
    transformers refuses the folder; it is refused naming the table and both sizes, and nothing is written."""
    from clusterlm.errors import CheckpointError
    from clusterlm.tokenizer.kinds import make_tokenizer

    hf_cfg = transformers.RobertaPreLayerNormConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
        hidden_act="gelu_new", max_position_embeddings=22, type_vocab_size=1, pad_token_id=1)
    transformers.RobertaPreLayerNormForMaskedLM(hf_cfg).save_pretrained(tmp_path / "hf")
    make_tokenizer("byte").save(tmp_path / "hf" / "tokenizer.json")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg | {"max_position_embeddings": 20}))
    with pytest.raises(CheckpointError, match=r"position_embeddings.weight has 22 rows but config.json describes "
                                              r"max_position_embeddings=20; the weights and config.json are from"):
        main(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_mbart_import(tmp_path):
    """A random MBartForConditionalGeneration (tied, gelu_new) converted with `clusterlm convert` gives
    transformers' logits for a padded source batch (1e-4)."""
    hf_cfg = transformers.MBartConfig(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, activation_function="gelu_new",
        max_position_embeddings=24, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=PAD,
        bos_token_id=256, eos_token_id=257)
    hf = transformers.MBartForConditionalGeneration(hf_cfg).eval()
    _save_hf(tmp_path, hf)
    loaded = load_for_inference(tmp_path / "run")
    assert (loaded.config.model.enc_layers, loaded.config.model.n_layers, loaded.config.model.max_seq_len) == (2, 1, 24)
    src, src_mask = _inputs(24)
    tgt, _ = _inputs(11, seed=5)
    with torch.no_grad():
        _close(loaded.model(src, tgt, src_mask),
               hf(input_ids=src, attention_mask=src_mask.long(), decoder_input_ids=tgt).logits)


@pytest.mark.parametrize("arch,change,fragment", [
    ("encoder", dict(pos="rope"), "model.pos='rope' (needs 'learned')"),
    ("encoder", dict(pos="sinusoidal"), "model.pos='sinusoidal' (needs 'learned')"),
    ("encoder", dict(norm="rmsnorm"), "model.norm='rmsnorm' (needs 'layernorm')"),
    ("encdec", dict(mlp="swiglu"), "model.mlp='swiglu' (needs 'gelu')"),
    ("encdec", dict(n_kv_heads=2), "model.n_kv_heads=2 (grouped-query attention"),
    ("encdec", dict(norm_eps=1e-6), "model.norm_eps=1e-06 (MBart's LayerNorms use 1e-05)"),
    ("encoder", dict(labels=("neg", "pos")), "RoBERTa's classification head reads the first token"),
])
def test_export_refuses_what_the_target_cannot_express(tmp_path, arch, change, fragment):
    """`clusterlm export` of an option the transformers class cannot express fails with one line naming
    the option and what would be valid, and writes nothing."""
    from clusterlm.interop.hf_io import export_to_hf

    cfg = dataclasses.replace(ENCODER if arch == "encoder" else ENCDEC, **change)
    _checkpoint(tmp_path, cfg)
    with pytest.raises(ConfigError) as e:
        export_to_hf(tmp_path / "run", tmp_path / "exp")
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("change,fragment", [
    (dict(model_type="mbart", activation_function="gelu"), "activation_function='gelu'; clusterlm's MLP is GELU's tanh"),
    (dict(model_type="mbart", activation_function="gelu_new", scale_embedding=True), "scale_embedding=true"),
    (dict(model_type="roberta-prelayernorm", architectures=["RobertaPreLayerNormForSequenceClassification"]),
     "its task head (dense + tanh on the first token"),
])
def test_convert_refuses_what_clusterlm_cannot_express(change, fragment):
    """hf_to_config refuses, in one line naming the config key, an exact-erf GELU MLP, scaled
    embeddings and a classification head (RoBERTa's first-token dense + tanh)."""
    from clusterlm.models.convert import hf_to_config

    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("+", r"\+")):
        hf_to_config(change)


_ROBERTA_CFG = {"model_type": "roberta-prelayernorm", "vocab_size": 259, "hidden_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 4, "intermediate_size": 40, "max_position_embeddings": 20, "pad_token_id": 1,
                "hidden_act": "gelu_pytorch_tanh"}
_MBART_CFG = {"model_type": "mbart", "vocab_size": 259, "d_model": 32, "encoder_layers": 3, "decoder_layers": 2,
              "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 40, "decoder_ffn_dim": 40,
              "max_position_embeddings": 16, "activation_function": "gelu_pytorch_tanh"}


@pytest.mark.parametrize("base, change, fragment", [
    (_ROBERTA_CFG, {"hidden_size": 32.0}, "config.json hidden_size=32.0 must be a whole number >= 1"),
    (_ROBERTA_CFG, {"num_attention_heads": True}, "config.json num_attention_heads=True must be a whole number >= 1"),
    (_ROBERTA_CFG, {"num_hidden_layers": "2"}, "config.json num_hidden_layers='2' must be a whole number >= 1"),
    (_ROBERTA_CFG, {"pad_token_id": 30}, "config.json pad_token_id=30: RoBERTa numbers positions from pad_token_id + 1, "
                                         "so it must be a whole number from 0 to max_position_embeddings - 2 = 18"),
    (_MBART_CFG, {"d_model": 32.0}, "config.json d_model=32.0 must be a whole number >= 1"),
    (_MBART_CFG, {"encoder_layers": 0}, "config.json encoder_layers=0 must be a whole number >= 1"),
    (_MBART_CFG, {"decoder_attention_heads": True, "encoder_attention_heads": True},
     "config.json encoder_attention_heads=True must be a whole number >= 1"),
])
def test_convert_checks_the_encoder_families_sizes(base, change, fragment):
    """The encoder families' config.json sizes are checked as GPT-2's and Llama's are: a float size was a
    TypeError traceback from torch, num_attention_heads=true wrote a checkpoint with n_heads=True, and a
    pad_token_id past the position table read as "model.max_seq_len=-11 must be >= 1"."""
    from clusterlm.models.convert import hf_to_config

    assert hf_to_config(base).n_heads == 4
    with pytest.raises(ConfigError) as e:
        hf_to_config(base | change)
    assert fragment in str(e.value)


def test_converted_encdec_gets_its_seq2seq_loss_from_eval(tmp_path, capsys):
    """`clusterlm eval BACK --data PAIRS` of an encoder-decoder converted back from Hugging Face (its
    config says finetune.task 'lm', which no encdec trains with) measures the seq2seq loss, equal to
    the source run's (1e-5); it was refused as "trained with finetune.task='lm'". Token shards given
    as --data are refused in one line naming the pairs it needs."""
    from clusterlm.cli import main as cli
    from clusterlm.data.seq2seq import prepare_pairs
    from clusterlm.errors import DataError
    from clusterlm.eval.evaluate import evaluate_checkpoint
    from clusterlm.tokenizer.kinds import make_tokenizer

    _checkpoint(tmp_path, ENCDEC)
    assert export_main([str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "exp")]) == 0
    assert main(["--from-hf", str(tmp_path / "exp"), "--out", str(tmp_path / "back")]) == 0
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"a{i}", "completion": f"b{i}"}) + "\n"
                                                  for i in range(40)))
    prepare_pairs(tmp_path / "pairs", source=str(tmp_path / "pairs.jsonl"), tokenizer=make_tokenizer("byte"),
                  max_source_len=8, val_fraction=0.5)
    capsys.readouterr()  # export's and convert's lines
    losses = []
    for run in ("run", "back"):
        assert cli(["eval", str(tmp_path / run), "--data", str(tmp_path / "pairs")]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["objective"] == "seq2seq"
        losses.append(got["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "meta.json").write_text(json.dumps({"format_version": 1, "splits": {}}))
    with pytest.raises(DataError, match="reads source/target pairs, but .* holds token shards"):
        evaluate_checkpoint(str(tmp_path / "back"), data=str(tmp_path / "lm"))


def test_bpe_encoder_round_trip_keeps_its_tokenizer_for_eval(tmp_path, capsys):
    """A BPE masked-LM encoder (its tokenizer with <|mask|> appended, as an MLM run's) exported and
    converted back keeps its tokenizer.json exactly, so `clusterlm eval BACK --data DIR` on data made
    with the original tokenizer gives the original's masked-LM loss (1e-5). The export's tokenizer.json
    drops added tokens in its decoder (for transformers); convert read that one back, and eval refused
    the run's own data as "not made with checkpoint's tokenizer"."""
    from clusterlm.checkpoint.store import save_checkpoint
    from clusterlm.cli import main as cli
    from clusterlm.config import RunConfig, to_toml
    from clusterlm.tokenizer.kinds import train_tokenizer

    text = "the quick brown fox jumps over the lazy dog. " * 40
    tok = train_tokenizer("bpe", [text], vocab_size=300).with_special_tokens(["<|mask|>"])
    tok.save(tmp_path / "tok.json")
    cfg = dataclasses.replace(ENCODER, vocab_size=tok.vocab_size)
    model = build_model(cfg)
    model.init_weights(0)
    _randomize(model)
    save_checkpoint(tmp_path / "run" / "checkpoints", 0, model_state=model.state_dict(), optimizer_state=None,
                    train_state={"step": 0}, config_toml=to_toml(RunConfig(model=cfg)),
                    tokenizer_path=tmp_path / "tok.json")
    words = text.split()
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": " ".join(words[i:i + 12])}) + "\n"
                                                   for i in range(0, 120, 3)))
    assert cli(["prepare", str(tmp_path / "corpus.jsonl"), "--out", str(tmp_path / "data"), "--tokenizer",
                str(tmp_path / "tok.json"), "--val-fraction", "0.5"]) == 0
    assert export_main([str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "exp")]) == 0
    assert main(["--from-hf", str(tmp_path / "exp"), "--out", str(tmp_path / "back")]) == 0
    back = tmp_path / "back" / "checkpoints" / "step-00000000" / "tokenizer.json"
    assert json.loads(back.read_text()) == json.loads((tmp_path / "tok.json").read_text())
    capsys.readouterr()
    losses = []
    for run in ("run", "back"):
        assert cli(["eval", str(tmp_path / run), "--data", str(tmp_path / "data"), "--seq-len", "16"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert got["objective"] == "mlm"
        losses.append(got["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
