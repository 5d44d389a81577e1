"""Chat models exported to and imported from Hugging Face folders, checked against transformers (no downloads).

Run: .venv/bin/python -m pytest -q tests/model/test_hf_chat_export.py
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from clusterlm.checkpoint.model_io import load_for_inference  # noqa: E402
from clusterlm.checkpoint.store import save_checkpoint  # noqa: E402
from clusterlm.config import RunConfig, to_toml  # noqa: E402
from clusterlm.errors import ConfigError  # noqa: E402
from clusterlm.generate.engine import complete, context_length  # noqa: E402
from clusterlm.generate.template import CHAT_TOKENS, DEFAULT_TEMPLATE, END_OF_TURN, TEMPLATE_FILE  # noqa: E402
from clusterlm.generate.text import chat_format, prompt_ids  # noqa: E402
from clusterlm.interop.hf_io import convert_from_hf, export_to_hf  # noqa: E402
from clusterlm.models.build import build_model  # noqa: E402
from clusterlm.models.config import ModelConfig  # noqa: E402
from clusterlm.tokenizer.kinds import train_tokenizer  # noqa: E402

CORPUS = ("The quick brown fox jumps over the lazy dog. What is 2+2? It is 4.\n"
          "héllo àçcénts 中文 😀 and <|eos|> <|bos|> written as text.\n") * 20
STRINGS = ["<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n", "fox<|end|><|end|>", "<|system|>", "no chat here",
           "héllo 中文 😀\n\n", "<|assistant|>It is 4.<|end|>\n"]
MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And the fox?"}]


def _chat_run(tmp_path, kind: str, chat: bool = True, template: bool = True, **model) -> tuple:
    """A random-weights checkpoint whose `kind` tokenizer (trained on CORPUS) has CHAT_TOKENS (when
    `chat`) and the default template beside it (when `template`); returns (run dir, tokenizer)."""
    tok = train_tokenizer(kind, [CORPUS], vocab_size=400 if kind == "bpe" else None)
    if chat:
        tok = tok.with_special_tokens(CHAT_TOKENS)
    data = tmp_path / "data"
    data.mkdir(parents=True)
    tok.save(data / "tokenizer.json")
    if template:
        (data / TEMPLATE_FILE).write_text(DEFAULT_TEMPLATE, encoding="utf-8")
    cfg = ModelConfig(n_layers=2, dim=32, n_heads=4, max_seq_len=128, vocab_size=tok.vocab_size, init_std=0.3,
                      **model)
    torch.manual_seed(0)
    m = build_model(cfg)
    m.init_weights(0)
    with torch.no_grad():  # random, varied weights (init_weights zeroes some): a greedy reply that moves
        for p in m.parameters():
            p.normal_(0.0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    save_checkpoint(tmp_path / "run" / "checkpoints", 0, model_state=m.state_dict(), optimizer_state=None,
                    train_state={}, config_toml=to_toml(RunConfig(model=cfg)), tokenizer_path=data / "tokenizer.json")
    return tmp_path / "run", tok


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_every_kind_exports_with_the_same_ids(tmp_path, kind, chat):
    """Reference: the clusterlm tokenizer. AutoTokenizer on the export encodes text with and without
    chat tokens to the same ids and decodes them to the same text; the chat tokens are its additional
    special tokens. Without a template literal <|eos|>/<|bos|>/<|pad|> stay text as in clusterlm."""
    run, tok = _chat_run(tmp_path, kind, chat=chat, template=chat)
    exp = export_to_hf(run, tmp_path / "exp")
    at = transformers.AutoTokenizer.from_pretrained(exp)
    assert len(at) == tok.vocab_size
    corpus = CORPUS[:300] if not chat else CORPUS[:300].replace("<|eos|>", "").replace("<|bos|>", "")
    for s in STRINGS + [corpus]:
        ids = tok.encode(s)
        assert at.encode(s, add_special_tokens=False) == ids, s
        assert at.decode(ids, skip_special_tokens=True) == tok.decode(ids), s
    config = json.loads((exp / "tokenizer_config.json").read_text())
    if chat:
        assert config["additional_special_tokens"] == list(CHAT_TOKENS)
        assert [at.convert_tokens_to_ids(t) for t in CHAT_TOKENS] == [tok.token_id(t) for t in CHAT_TOKENS]
        assert (exp / TEMPLATE_FILE).is_file() and config["chat_template"].endswith(DEFAULT_TEMPLATE)
        gen = json.loads((exp / "generation_config.json").read_text())
        assert gen["eos_token_id"] == [tok.eos_id, tok.token_id(END_OF_TURN)]
        # the documented difference: with a template, <|eos|> typed in text is the EOS id in transformers
        assert at.encode("a<|eos|>", add_special_tokens=False) == tok.encode("a") + [tok.eos_id]
    else:
        assert "chat_template" not in config and not (exp / TEMPLATE_FILE).exists()
        for s in ("<|eos|>", "written as text: <|bos|><|pad|>"):
            assert at.encode(s, add_special_tokens=False) == tok.encode(s)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_apply_chat_template_and_generate_match_clusterlm(tmp_path, style):
    """Reference: clusterlm's chat path (ChatTemplate.render, prompt_ids with the leading EOS, the greedy
    engine stopping at EOS or <|end|>). transformers' apply_chat_template gives the same text and ids
    (the exported template starts with {{ eos_token }}), and greedy `generate` the same reply, token for
    token, for 16 new tokens."""
    model = {} if style == "gpt2" else dict(pos="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=False)
    run, tok = _chat_run(tmp_path, "char", **model)
    exp = export_to_hf(run, tmp_path / "exp")
    loaded = load_for_inference(run)
    fmt = chat_format(loaded.tokenizer, loaded.chat_template)
    text = fmt.render(MESSAGES)
    ids = prompt_ids(loaded.tokenizer, text, context_length(loaded.model), 16)
    at = transformers.AutoTokenizer.from_pretrained(exp)
    hf_text = at.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert hf_text == "<|eos|>" + text
    hf_ids = at.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert list(hf_ids) == ids

    new, _ = complete(loaded.model, [ids], max_new_tokens=16, temperature=0.0, eos_id=None)
    stops = {tok.eos_id, *fmt.stop_ids}
    cut = next((i + 1 for i, t in enumerate(new[0]) if t in stops), 16)
    want = new[0][:cut]
    hf = transformers.AutoModelForCausalLM.from_pretrained(exp).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                          attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert out[0, len(ids):].tolist() == want
    assert len(set(want)) > 2  # a reply that moves, not one repeated token


def test_import_keeps_the_template(tmp_path):
    """Reference: the exported checkpoint's template. `convert` of the export gives a checkpoint whose
    chat_template.jinja is the original (the export's {{ eos_token }} prefix removed) with the same
    tokenizer ids; a folder with only tokenizer_config.json's chat_template keeps it too; a template
    that does not compile is refused naming the file."""
    run, tok = _chat_run(tmp_path, "byte")
    exp = export_to_hf(run, tmp_path / "exp")
    path = convert_from_hf(exp, tmp_path / "back")
    assert (path / TEMPLATE_FILE).read_text(encoding="utf-8") == DEFAULT_TEMPLATE
    back = load_for_inference(tmp_path / "back")
    assert back.chat_template.source == DEFAULT_TEMPLATE and back.tokenizer.added_tokens == CHAT_TOKENS
    (exp / TEMPLATE_FILE).unlink()
    assert convert_from_hf(exp, tmp_path / "back2").joinpath(TEMPLATE_FILE).read_text() == DEFAULT_TEMPLATE
    cfg = json.loads((exp / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}"
    (exp / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"tokenizer_config\.json is not valid Jinja2"):
        convert_from_hf(exp, tmp_path / "back3")
    assert not (tmp_path / "back3" / "checkpoints").exists()


def test_export_refuses_a_template_whose_tokens_the_tokenizer_lacks(tmp_path):
    """A template that emits <|user|> with a tokenizer without chat tokens is refused before writing."""
    run, _ = _chat_run(tmp_path, "char", chat=False, template=True)
    with pytest.raises(ConfigError, match="does not have"):
        export_to_hf(run, tmp_path / "exp")
    assert not (tmp_path / "exp").exists()
