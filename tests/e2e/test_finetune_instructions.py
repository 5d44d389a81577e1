"""The instructions path end to end (issue 15): a tiny set from scripts/make_instructions.py, a few
dozen SFT steps from scratch (`clusterlm finetune`, char tokenizer), then `clusterlm serve` in a
subprocess on 127.0.0.1 and one chat request through the official `openai` client.

Reference for "the server used the model's own template": usage.prompt_tokens of the response
equals 1 (EOS, the document separator prompts start with) + the tokens of the messages rendered by
the checkpoint's chat_template.jinja with add_generation_prompt (each chat token one id), and
differs from the count under the plain "User:/Assistant:" fallback. The run is too short to answer
correctly; benchmarks/instructions.py measures accuracy.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from clusterlm.cli import main as cli

openai = pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[2]
KEY = "instructions-test-key-0123"


def _make_instructions():
    spec = importlib.util.spec_from_file_location("make_instructions", ROOT / "scripts" / "make_instructions.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, f"clusterlm serve exited with {proc.returncode}:\n{log.read_text()[-2000:]}"
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"clusterlm serve not ready after {timeout} s:\n{log.read_text()[-2000:]}")


def test_finetune_then_serve_with_the_models_template(tmp_path):
    """SFT from scratch on the recipe (shrunk), served; one openai chat request: a well-formed
    chat.completion whose prompt was rendered with the checkpoint's template."""
    from clusterlm.checkpoint.store import resolve_checkpoint
    from clusterlm.generate.template import CHAT_TOKENS, DEFAULT_TEMPLATE, read_template
    from clusterlm.generate.text import render_chat
    from clusterlm.tokenizer import load_tokenizer

    mi = _make_instructions()
    train_file, heldout_file = mi.write_sets(tmp_path / "set", n_train=300, n_heldout=10, seed=0)
    run = tmp_path / "run"
    rc = cli(["finetune", "instructions_cpu", f"--data.source={json.dumps(str(train_file))}",
              f"--data.dir={json.dumps(str(tmp_path / 'examples'))}", f"--train.out_dir={json.dumps(str(run))}",
              "--model.n_layers=1", "--model.dim=32", "--model.n_heads=2", "--train.micro_batch_size=4",
              "--train.max_steps=30", "--train.eval_interval=30", "--train.eval_batches=1", "--train.log_interval=10",
              "--optim.warmup_steps=5", "--train.tensorboard=false"])
    assert rc == 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r.get("kind") == "train"]
    assert len(losses) == 30 and losses[-1] < losses[0]  # it learned something in 30 steps

    ckpt = resolve_checkpoint(str(run))
    template, tok = read_template(ckpt), load_tokenizer(ckpt / "tokenizer.json")
    assert template is not None and template.source == DEFAULT_TEMPLATE  # auto -> the builtin for chat records
    assert all(tok.token_id(t) is not None for t in CHAT_TOKENS if t in template.special_tokens)

    record = json.loads(heldout_file.read_text().splitlines()[0])
    messages = [m for m in record["messages"] if m["role"] != "assistant"]
    rendered = template.render(messages, add_generation_prompt=True)
    want_prompt_tokens = 1 + len(tok.encode(rendered))
    assert want_prompt_tokens < len(rendered) + 1  # chat tokens are single ids, not their characters
    assert want_prompt_tokens != 1 + len(tok.encode(render_chat(messages)))  # the fallback would differ

    key_file = tmp_path / "key.txt"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "clusterlm", "serve", str(run), "--host", "127.0.0.1",
                                 "--port", str(port), "--api-key-file", str(key_file), "--model-name", "ins"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc, log)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, timeout=30, max_retries=0)
        r = client.chat.completions.create(model="ins", messages=messages, temperature=0, max_tokens=8)
        with pytest.raises(openai.AuthenticationError):  # the key is checked
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).chat.completions.create(
                model="ins", messages=messages, max_tokens=1)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert r.object == "chat.completion" and r.model == "ins" and len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens == want_prompt_tokens
