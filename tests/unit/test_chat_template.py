"""Chat templates (clusterlm/generate/template.py) and their path through checkpoints, generate and chat.

Run: .venv/bin/python -m pytest -q tests/unit/test_chat_template.py
"""

from __future__ import annotations

import io
import json
import logging

import pytest
import torch

from clusterlm.errors import ConfigError
from clusterlm.generate.template import (
    BUILTIN_TEMPLATES,
    CHAT_TOKENS,
    DEFAULT_TEMPLATE,
    END_OF_TURN,
    TEMPLATE_FILE,
    ChatTemplate,
    load_template,
    read_template,
)
from clusterlm.generate.text import CHAT_STOP, chat_format, prompt_ids, render_chat, stream_text
from clusterlm.tokenizer.char import CharTokenizer

MESSAGES = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_default_template_renders_the_documented_format():
    """Reference: the format in the contract, written out by hand: <|role|>\\n{content}<|end|>\\n per
    message, <|assistant|>\\n with add_generation_prompt."""
    t = load_template("clusterlm")
    assert t.source == DEFAULT_TEMPLATE == BUILTIN_TEMPLATES["clusterlm"]
    want = ("<|system|>\nBe terse.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"
            "<|user|>\n2+2?<|end|>\n")
    assert t.render(MESSAGES) == want
    assert t.render(MESSAGES, add_generation_prompt=True) == want + "<|assistant|>\n"
    assert set(t.special_tokens) == set(CHAT_TOKENS)
    assert t.stop_tokens == (END_OF_TURN,)
    with pytest.raises(ValueError, match="chat template clusterlm: chat roles are system, user and assistant, not tool"):
        t.render([{"role": "tool", "content": "x"}])


def test_foreign_template_tokens_and_stop():
    """A ChatML template: its tokens are found in the source, and <|im_end|> (written right after the
    assistant's content) is its stop token; a sandboxed template cannot reach Python internals."""
    t = ChatTemplate(CHATML, name="chatml")
    assert t.special_tokens == ("<|im_start|>", "<|im_end|>")
    assert t.stop_tokens == ("<|im_end|>",)
    evil = ChatTemplate("{{ messages.__class__.__mro__ }}", name="evil")
    with pytest.raises(ValueError, match="evil"):
        evil.render(MESSAGES)


def test_load_template_errors(tmp_path):
    """Unknown name, syntax error, a template that fails on the sample conversation, non-UTF-8 text:
    one ConfigError line naming the file and the Jinja error."""
    with pytest.raises(ConfigError, match=r"'chatml' is neither a builtin \(clusterlm\) nor a Jinja2 file"):
        load_template("chatml")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(ConfigError, match=r"bad\.jinja is not valid Jinja2") as e:
        load_template(str(bad))
    assert "\n" not in str(e.value)
    fails = tmp_path / "fails.jinja"
    fails.write_text("{{ raise_exception('no chat here') }}")
    with pytest.raises(ConfigError, match=r"fails\.jinja: no chat here .*sample") as e:
        load_template(str(fails))
    assert "\n" not in str(e.value)
    undefined = tmp_path / "undef.jinja"
    undefined.write_text("{{ messages[0].content.upper(1, 2, 3) }}")
    with pytest.raises(ConfigError, match=r"undef\.jinja"):
        load_template(str(undefined))
    latin = tmp_path / "latin.jinja"
    latin.write_bytes(b"\xff{{ x }}")
    with pytest.raises(ConfigError, match="latin.jinja is not UTF-8"):
        load_template(str(latin))
    good = tmp_path / "chatml.jinja"
    good.write_text(CHATML)
    assert load_template(str(good)).render(MESSAGES[:2]) == "<|im_start|>system\nBe terse.<|im_end|>\n" \
        "<|im_start|>user\nHi<|im_end|>\n"
    assert read_template(tmp_path) is None
    (tmp_path / TEMPLATE_FILE).write_text(CHATML)
    assert read_template(tmp_path).source == CHATML


def test_chat_format_checks_the_tokenizer(caplog):
    """A template's tokens must be special tokens of the tokenizer (else they would encode as plain
    text); the format's stop ids are the template's end-of-turn id; no template: render_chat, CHAT_STOP
    and a log note."""
    plain = CharTokenizer("".join(sorted(set("abc ?+2HiBet.rs\n"))))
    tok = plain.with_special_tokens(CHAT_TOKENS)
    t = load_template("clusterlm")
    with pytest.raises(ConfigError, match=r"emits .*<\|user\|>.*does not have"):
        chat_format(plain, t)
    fmt = chat_format(tok, t)
    assert fmt.stop_ids == (tok.token_id(END_OF_TURN),) and fmt.stop_strings == ()
    text = fmt.render(MESSAGES)
    assert text == t.render(MESSAGES, add_generation_prompt=True)
    ids = prompt_ids(tok, text, None, 8)
    assert ids[0] == tok.eos_id and ids[1] == tok.token_id("<|system|>")
    assert ids == [tok.eos_id] + tok.encode(text)
    assert ids[-2:] == [tok.token_id("<|assistant|>"), tok.encode("\n")[0]]
    with caplog.at_level(logging.INFO, logger="clusterlm.generate.text"):
        fallback = chat_format(tok, None)
    assert "no chat template" in caplog.text
    assert fallback.render(MESSAGES) == render_chat(MESSAGES) and fallback.stop_strings == (CHAT_STOP,)


def test_continue_final_leaves_the_reply_open():
    """ChatFormat.render(continue_final=True), what lm-eval's gen_prefix asks for (apply_chat_template
    with add_generation_prompt=False). Reference: transformers' render_jinja_template with
    continue_final_message=True on the same template (its trailing space kept where the template keeps
    it). The plain template ends at the begun reply as 'Assistant: Answer:' (it strips content)."""
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    tok = CharTokenizer("".join(sorted(set("abc ?+2HiBet.rsAnw:\n")))).with_special_tokens(CHAT_TOKENS)
    fmt = chat_format(tok, load_template("clusterlm"))
    for begun in ("Answer:", "Answer: "):
        messages = MESSAGES + [{"role": "assistant", "content": begun}]
        (want,), _ = chat_template_utils.render_jinja_template([messages], chat_template=DEFAULT_TEMPLATE,
                                                               continue_final_message=True)
        assert fmt.render(messages, continue_final=True) == want
        assert want.endswith("<|user|>\n2+2?<|end|>\n<|assistant|>\n" + begun)
        plain = chat_format(tok, None).render(messages, continue_final=True)
        assert plain == render_chat(MESSAGES).removesuffix("Assistant:") + "Assistant: Answer:"
    assert fmt.render(MESSAGES, continue_final=False) == fmt.render(MESSAGES)


def _chat_checkpoint(tmp_path, template: str | None):
    """A random tiny Transformer with a char tokenizer + CHAT_TOKENS, saved through save_checkpoint from
    a tokenizer file with `template` beside it (as a data dir or fine-tuning run has it)."""
    from clusterlm.checkpoint.store import save_checkpoint
    from clusterlm.config import RunConfig, to_toml
    from clusterlm.models.build import build_model
    from clusterlm.models.config import ModelConfig

    tok = CharTokenizer("".join(sorted(set("\n abcdefghijklmnopqrstuvwxyz?.,")))).with_special_tokens(CHAT_TOKENS)
    data = tmp_path / "data"
    data.mkdir(parents=True)
    tok.save(data / "tokenizer.json")
    if template is not None:
        (data / TEMPLATE_FILE).write_text(template, encoding="utf-8")
    cfg = ModelConfig(n_layers=1, dim=32, n_heads=4, max_seq_len=64, vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights(0)
    return save_checkpoint(tmp_path / "run" / "checkpoints", 0, model_state=model.state_dict(), optimizer_state=None,
                           train_state={}, config_toml=to_toml(RunConfig(model=cfg)),
                           tokenizer_path=data / "tokenizer.json")


def test_checkpoint_carries_the_template(tmp_path):
    """Reference: the template file beside the tokenizer. save_checkpoint copies it into the step folder
    and its manifest; load_for_inference exposes it; a checkpoint without one has chat_template None."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.checkpoint.store import verify_checkpoint

    path = _chat_checkpoint(tmp_path, DEFAULT_TEMPLATE)
    assert (path / TEMPLATE_FILE).read_text(encoding="utf-8") == DEFAULT_TEMPLATE
    manifest = json.loads((path / "manifest.json").read_text())
    assert TEMPLATE_FILE in manifest["files"] and verify_checkpoint(path) == []
    loaded = load_for_inference(tmp_path / "run")
    assert loaded.chat_template is not None and loaded.chat_template.source == DEFAULT_TEMPLATE
    (path / TEMPLATE_FILE).write_text("tampered")
    assert any(TEMPLATE_FILE in p for p in verify_checkpoint(path))
    bare = _chat_checkpoint(tmp_path / "bare", None)
    assert not (bare / TEMPLATE_FILE).exists()
    assert load_for_inference(bare).chat_template is None


def test_stream_text_stops_at_the_end_of_turn_id(tmp_path):
    """Reference: the same greedy sample without stop ids. With the first sampled token as a stop id
    nothing is returned; with an unrelated id the reply is unchanged."""
    from clusterlm.checkpoint.model_io import load_for_inference

    _chat_checkpoint(tmp_path, DEFAULT_TEMPLATE)
    loaded = load_for_inference(tmp_path / "run")
    kw = dict(max_new_tokens=12, temperature=0.0, top_k=None, top_p=None, seed=0)
    full = "".join(stream_text(loaded, "ab", **kw))
    from clusterlm.generate.engine import complete, context_length

    first = complete(loaded.model, [prompt_ids(loaded.tokenizer, "ab", context_length(loaded.model), 12)],
                     max_new_tokens=1, temperature=0.0, eos_id=loaded.tokenizer.eos_id)[0][0][0]
    assert "".join(stream_text(loaded, "ab", **kw, stop_ids=(first,))) == ""
    sampled = complete(loaded.model, [prompt_ids(loaded.tokenizer, "ab", None, 12)], max_new_tokens=12,
                       temperature=0.0, eos_id=loaded.tokenizer.eos_id)[0][0]
    other = next(i for i in range(loaded.tokenizer.vocab_size) if i not in sampled)
    assert "".join(stream_text(loaded, "ab", **kw, stop_ids=(other,))) == full


def test_chat_and_generate_chat_use_the_checkpoint_template(tmp_path, monkeypatch):
    """`clusterlm chat` and `generate --chat` render with the checkpoint's template and pass its end-of-
    turn id as a stop; the second turn's prompt holds the first reply as an assistant message."""
    import clusterlm.generate.cli as gcli

    _chat_checkpoint(tmp_path, DEFAULT_TEMPLATE)
    seen = []

    def fake_stream(loaded, prompt, **kw):
        seen.append((prompt, kw["stop"], kw["stop_ids"]))
        yield "ok"

    monkeypatch.setattr(gcli, "stream_text", fake_stream)
    out = io.StringIO()
    assert gcli.chat_main([str(tmp_path / "run"), "--system", "Be terse."], stdin=io.StringIO("hi\nbye\n"), out=out) == 0
    end = 31 + 4 + 3  # 31 characters + 4 specials, then <|end|> is the 4th added token
    assert seen[0] == ("<|system|>\nBe terse.<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n", (), (end,))
    assert seen[1][0].endswith("<|assistant|>\nok<|end|>\n<|user|>\nbye<|end|>\n<|assistant|>\n")
    seen.clear()
    assert gcli.generate_main([str(tmp_path / "run"), "--chat", "--prompt", "hi"], out=io.StringIO()) == 0
    assert seen == [("<|user|>\nhi<|end|>\n<|assistant|>\n", (), (end,))]


def test_a_template_token_with_whitespace_is_refused_naming_the_fix(tmp_path):
    """'<|user turn|>' is not a special token (they have no whitespace inside): the template loaded, and
    fine-tuning encoded the token character by character with only an unknown-characters warning (or
    none, for a byte or BPE tokenizer). Now one ConfigError line naming the token and its spelling
    without spaces; a template that builds its tokens in Jinja ('<|' + role + '|>') still loads."""
    spaced = tmp_path / "spaced.jinja"
    spaced.write_text("{% for m in messages %}<|{{ m.role }} turn|>{{ m.content }}<|end|>{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant turn|>{% endif %}")
    with pytest.raises(ConfigError, match=r"spaced\.jinja writes '<\|system turn\|>'.*'<\|system_turn\|>'") as e:
        load_template(str(spaced))
    assert "\n" not in str(e.value)
    built = tmp_path / "built.jinja"
    built.write_text("{% for m in messages %}{{ '<|' + m.role + '|>' }}{{ m.content }}<|end|>{% endfor %}")
    assert set(load_template(str(built)).special_tokens) == {"<|system|>", "<|user|>", "<|assistant|>", "<|end|>"}


def test_chat_system_refused_by_the_template_before_the_first_turn(tmp_path):
    """A template without a system role (raise_exception, as Gemma's) refuses --system when chat starts,
    naming the option, before a turn is read (it was refused only after the first message was typed)."""
    from clusterlm.generate.cli import chat_main

    _chat_checkpoint(tmp_path, "{% for m in messages %}{% if m['role'] == 'system' %}"
                               "{{ raise_exception('System role not supported') }}{% endif %}"
                               "{{ '<|' ~ m['role'] ~ '|>' ~ m['content'] ~ '<|end|>' }}{% endfor %}"
                               "{% if add_generation_prompt %}<|assistant|>{% endif %}")

    class NoInput(io.StringIO):
        def readline(self, *a):  # noqa: ANN002, ANN201
            raise AssertionError("a turn was read before --system was refused")

    out = io.StringIO()
    with pytest.raises(ValueError, match=r"--system: chat template .*System role not supported; leave --system out"):
        chat_main([str(tmp_path / "run"), "--system", "Be terse."], stdin=NoInput(), out=out)
    assert out.getvalue() == ""
