"""Hugging Face parity: tiny random-weight GPT2LMHeadModel / LlamaForCausalLM built locally (no
downloads) -> `clusterlm convert` -> our logits; `clusterlm export` -> transformers from_pretrained.

Run: .venv/bin/python -m pytest -q tests/model/test_convert.py
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from clusterlm.checkpoint.model_io import load_for_inference  # noqa: E402
from clusterlm.errors import ClusterlmError  # noqa: E402
from clusterlm.interop.cli import export_main, main  # noqa: E402
from clusterlm.models.convert import hf_to_config  # noqa: E402
from clusterlm.tokenizer.bpe import BPETokenizer  # noqa: E402

V = 300


def _tokenizer(folder) -> None:
    tok = BPETokenizer.train(["the quick brown fox jumps over the lazy dog " * 50], vocab_size=V)
    tok.save(folder / "tokenizer.json")


def _gpt2(tie: bool = True):
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  tie_word_embeddings=tie, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return transformers.GPT2LMHeadModel(cfg)


def _llama(tie: bool = False, kv: int = 2):
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=32,
                                   rope_theta=5000.0, tie_word_embeddings=tie, rms_norm_eps=1e-6)
    return transformers.LlamaForCausalLM(cfg)


def _randomize(model) -> None:
    """transformers' init leaves norms at 1 and biases at 0; randomize all so every weight matters."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if ("ln_" in name or "norm" in name) and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + centre)


@pytest.mark.parametrize("name,make", [
    ("gpt2", lambda: _gpt2()), ("gpt2-untied", lambda: _gpt2(tie=False)),
    ("llama-gqa", lambda: _llama()), ("llama-tied-mha", lambda: _llama(tie=True, kv=4)),
])
def test_roundtrip_logits(tmp_path, name, make):
    """Our logits on converted weights equal transformers' logits (1e-4); the exported folder loads
    with from_pretrained and gives the same logits again."""
    torch.manual_seed(0)
    hf = make().eval()
    _randomize(hf)
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    _tokenizer(src)
    assert main(["--from-hf", str(src), "--out", str(tmp_path / "run")]) == 0
    loaded = load_for_inference(tmp_path / "run")
    idx = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(idx).logits
        got = loaded.model(idx)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4
    assert loaded.model.config.num_params() == sum(p.numel() for p in hf.parameters())

    assert export_main([str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "exp")]) == 0
    names = {p.name for p in (tmp_path / "exp").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp").eval()
    assert type(back) is type(hf)
    with torch.no_grad():
        again = back(idx).logits
    assert (again - want).abs().max().item() < 1e-4
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "exp" / "tokenizer.json"))
    assert fast.encode("the lazy fox") == loaded.tokenizer.encode("the lazy fox")


def test_sharded_index_and_errors(tmp_path):
    """A sharded safetensors folder (max_shard_size) converts to the same weights; an unsupported
    model_type, a missing tokenizer.json and a pickle-only folder get clear errors."""
    torch.manual_seed(0)
    hf = _llama().eval()
    src = tmp_path / "hf"
    hf.save_pretrained(src, max_shard_size="20KB")
    assert (src / "model.safetensors.index.json").is_file()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        main(["--from-hf", str(src), "--out", str(tmp_path / "r0")])
    _tokenizer(src)
    assert main(["--from-hf", str(src), "--out", str(tmp_path / "run")]) == 0
    idx = torch.arange(10)[None]
    with torch.no_grad():
        assert (load_for_inference(tmp_path / "run").model(idx) - hf(idx).logits).abs().max().item() < 1e-4

    with pytest.raises(ClusterlmError, match="model_type='bert'.*gpt2, llama"):
        hf_to_config({"model_type": "bert"})
    with pytest.raises(ClusterlmError, match="rope scaling"):
        hf_to_config({**json.loads((src / "config.json").read_text()),
                      "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}})
    # {"rope_type": "default"} is transformers' spelling of no scaling (it was refused as scaling)
    plain = hf_to_config({**json.loads((src / "config.json").read_text()), "rope_scaling": {"rope_type": "default"}})
    assert plain == hf_to_config(json.loads((src / "config.json").read_text()))
    # a tokenizer with more ids than the embedding has rows: refused before anything is written (the
    # checkpoint it wrote could never be loaded)
    big = tmp_path / "big"
    hf.config.vocab_size = 100
    transformers.LlamaForCausalLM(hf.config).save_pretrained(big)
    _tokenizer(big)
    with pytest.raises(ClusterlmError, match=r"has \d+ tokens but .*config.json has vocab_size=100"):
        main(["--from-hf", str(big), "--out", str(tmp_path / "r3")])
    assert not (tmp_path / "r3").exists()
    pk = tmp_path / "pk"
    pk.mkdir()
    (pk / "config.json").write_text((src / "config.json").read_text())
    (pk / "tokenizer.json").write_text((src / "tokenizer.json").read_text())
    (pk / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ClusterlmError, match="trust-pickle"):
        main(["--from-hf", str(pk), "--out", str(tmp_path / "r2")])


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_export_then_convert_round_trip_every_tokenizer(tmp_path, kind):
    """Issue 12, 13b: `export` of a char model wrote clusterlm_tokenizer.json, which `convert` could not
    read back. For byte, char and BPE tokenizers: checkpoint -> export -> convert gives the same token
    ids and the same logits (1e-5) as the original checkpoint."""
    from tests.helpers import random_checkpoint

    random_checkpoint(tmp_path, kind, "the quick brown fox jumps over the lazy dog " * 40, bpe_vocab=300,
                      n_layers=2, context=32)
    assert export_main([str(tmp_path / "run"), "--out", str(tmp_path / "exp")]) == 0
    assert main(["--from-hf", str(tmp_path / "exp"), "--out", str(tmp_path / "back")]) == 0
    a, b = load_for_inference(tmp_path / "run"), load_for_inference(tmp_path / "back")
    ids = a.tokenizer.encode("the lazy fox")
    assert ids and b.tokenizer.encode("the lazy fox") == ids
    idx = torch.tensor([ids])
    with torch.no_grad():
        want, got = a.model(idx), b.model(idx)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("payload, fragment", [
    (b"this is not a pickle", "not a PyTorch state dict"),
    ("list", "holds a list, not a state dict"),
    ("mixed", "entry 'step' is a int, not a tensor"),
    ("truncated", "not a PyTorch state dict"),
    ("truncated_data", "a truncated or damaged file?"),  # torch's reader says EINVAL: was exit 74, "free space"
])
def test_trust_pickle_on_a_pickle_that_is_not_weights(tmp_path, payload, fragment):
    """Issue 12, failure 8: `convert --trust-pickle` on a pickle that is not weights ended in an
    UnpicklingError or AttributeError traceback (exit 1); now a CheckpointError naming the file."""
    import io

    from clusterlm.errors import CheckpointError

    torch.manual_seed(0)
    src = tmp_path / "hf"
    _llama().save_pretrained(src)
    _tokenizer(src)
    (src / "model.safetensors").unlink()
    pk = src / "pytorch_model.bin"
    if payload == "list":
        torch.save([1, 2, 3], pk)
    elif payload == "mixed":
        torch.save({"w": torch.zeros(2), "step": 3}, pk)
    elif payload == "truncated":
        buf = io.BytesIO()
        torch.save({"w": torch.zeros(1000)}, buf)
        pk.write_bytes(buf.getvalue()[:500])
    elif payload == "truncated_data":
        buf = io.BytesIO()
        torch.save(_llama().state_dict(), buf)
        pk.write_bytes(buf.getvalue()[:5000])
    else:
        pk.write_bytes(payload)
    with pytest.raises(CheckpointError) as e:
        main(["--from-hf", str(src), "--out", str(tmp_path / "run"), "--trust-pickle"])
    assert str(pk) in str(e.value) and fragment in str(e.value)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_convert_refuses_weights_that_disagree_with_config_json(tmp_path):
    """Weights of another width than config.json says were converted and failed at every later load
    (size-mismatch traceback); now refused at convert with both shapes, nothing written."""
    from clusterlm.errors import CheckpointError

    torch.manual_seed(0)
    src = tmp_path / "hf"
    _llama().save_pretrained(src)
    _tokenizer(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 64  # the weights have 48
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape \[48, 32\] but config.json describes \[64, 32\]"):
        main(["--from-hf", str(src), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
    (src / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json is not valid JSON"):
        main(["--from-hf", str(src), "--out", str(tmp_path / "run")])


@pytest.mark.parametrize("change, fragment", [
    ({"num_attention_heads": 0}, "num_attention_heads=0 must be a whole number >= 1"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers=2.5 must be a whole number >= 1"),
    ({"hidden_size": "32"}, "hidden_size='32' must be a whole number >= 1"),
    ({"max_position_embeddings": 10**12}, "at most 1,048,576"),
    ({"rope_theta": "big"}, "rope_theta='big' must be a number > 0"),
])
def test_config_json_sizes_are_checked_before_use(change, fragment):
    """A config.json with a zero, fractional or text size, or a context whose position tables could
    not be allocated, is one ConfigError naming the key (it was a ZeroDivisionError or TypeError
    traceback, or a checkpoint that no command could load)."""
    from clusterlm.errors import ConfigError

    hf = {"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    assert hf_to_config(hf).n_heads == 4 and hf_to_config(hf | {"rope_theta": None}).rope_theta == 10000.0
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("?", r"\?")):
        hf_to_config(hf | change)


def test_export_of_a_padded_vocabulary_never_generates_padding_ids(tmp_path):
    """A model with vocab_multiple exports its padding rows (all logits, vocab_size = the padded size);
    clusterlm never samples them, but transformers' generate() did (ids the tokenizer cannot decode,
    about 1 token in 5 here). generation_config.json now suppresses them."""
    from tests.helpers import byte_llama_checkpoint

    run, cfg = byte_llama_checkpoint(tmp_path, vocab_multiple=64, n_layers=1)
    assert export_main([str(run), "--out", str(tmp_path / "exp")]) == 0
    gen = json.loads((tmp_path / "exp" / "generation_config.json").read_text())
    assert gen["suppress_tokens"] == list(range(cfg.vocab_size, cfg.padded_vocab_size))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp").eval()
    torch.manual_seed(0)
    out = hf.generate(torch.tensor([[104, 105]]), max_new_tokens=40, do_sample=True, top_k=0, temperature=1.0,
                      eos_token_id=None)
    assert out.shape[1] == 42 and out.max().item() < cfg.vocab_size


def test_convert_of_a_vocabulary_larger_than_its_tokenizer_samples_only_token_ids(tmp_path, capsys):
    """config.json's vocab_size above the tokenizer's (padded embeddings, as many published models
    have): the extra rows were taken as vocabulary, so `generate` sampled them and failed mid-output
    with 'token id ... is outside the vocabulary'. They become padding rows: same logits, never sampled."""
    from clusterlm.cli import main as cli
    from clusterlm.tokenizer import load_tokenizer

    model = _llama()
    _randomize(model)
    model.save_pretrained(tmp_path / "hf")
    _tokenizer(tmp_path / "hf")
    n_tok = load_tokenizer(tmp_path / "hf" / "tokenizer.json").vocab_size
    assert n_tok < V
    assert main(["--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    loaded = load_for_inference(tmp_path / "run")
    assert (loaded.config.model.vocab_size, loaded.config.model.padded_vocab_size) == (n_tok, V)
    idx = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert (loaded.model(idx) - model(idx).logits).abs().max().item() < 1e-4
    capsys.readouterr()
    for seed in range(3):
        assert cli(["generate", str(tmp_path / "run"), "--prompt", "the", "--max-new-tokens", "30",
                    "--temperature", "1.0", "--seed", str(seed)]) == 0
    assert "outside the vocabulary" not in capsys.readouterr().err


@pytest.mark.parametrize("change, fragment", [
    (dict(n_kv_heads=2), "model.n_kv_heads=2 (grouped-query attention) has no Hugging Face GPT-2 equivalent"),
    (dict(n_heads=2, head_size=8), "GPT-2 needs n_heads * head_dim = dim; this model has 2 x 8 != 32"),
])
def test_export_refuses_a_gpt2_style_model_that_gpt2_cannot_express(tmp_path, change, fragment):
    """A GPT-2-style model (learned positions, LayerNorm, GELU) with grouped-query attention was
    exported as a gpt2 folder whose c_attn is (D, D + 2 K Hd): transformers' from_pretrained refused it
    with a size-mismatch report. Now refused at export in one line naming the option, nothing written;
    the same model with one key/value head per query head exports and loads."""
    from clusterlm.errors import ConfigError
    from tests.helpers import byte_llama_checkpoint

    gpt2_style = dict(pos="learned", norm="layernorm", mlp="gelu", n_layers=1)
    run, _ = byte_llama_checkpoint(tmp_path, **gpt2_style, **change)
    with pytest.raises(ConfigError) as e:
        export_main([str(run), "--out", str(tmp_path / "exp")])
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "exp").exists()

    (tmp_path / "mha").mkdir()
    run, _ = byte_llama_checkpoint(tmp_path / "mha", **gpt2_style, n_kv_heads=4)
    assert export_main([str(run), "--out", str(tmp_path / "exp")]) == 0
    assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp")).__name__ == "GPT2LMHeadModel"
