"""Small helpers shared by test files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clusterlm.train.metrics import read_metrics

# Python source that makes any later `import torch` fail: prepend it to `python -c` code to show that a
# command or module (CLI help, planner, Slurm launch, model configs) runs on a login node without torch.
BLOCK_TORCH = """
import sys
class _BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
        return None
sys.meta_path.insert(0, _BlockTorch())
"""


def signal_on_import(sig: str, module: str) -> str:
    """Python source that sends this process `sig` ("SIGINT", "SIGTERM") as `module` starts importing:
    prepend it to `python -c` code to land a signal while a command is still importing, at a set
    point (a timer would race the imports). raise_signal runs the handler before it returns."""
    return f"""
import signal, sys
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    # a shell that starts the tests in the background (`pytest &`) ignores SIGINT, and exec keeps it
    # ignored: put back what Python installs at a terminal, or the SIGINT cases test nothing
    signal.signal(signal.SIGINT, signal.default_int_handler)
class _SignalOnImport:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            signal.raise_signal(signal.{sig})
        return None
sys.meta_path.insert(0, _SignalOnImport())
"""


def console_script(code: str = "") -> list[str]:
    """argv that runs the `clusterlm` console script as pip's wrapper does (`from MODULE import FUNC;
    sys.exit(FUNC())`, MODULE:FUNC from pyproject.toml's [project.scripts]) after `code`: the entry point
    of this tree, whatever entry the installed script was generated from."""
    import sys

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    module, func = tomllib.loads(pyproject.read_text())["project"]["scripts"]["clusterlm"].split(":")
    return [sys.executable, "-c", f"import sys\n{code}\nfrom {module} import {func}\nsys.exit({func}())"]


def train_losses(run: Path) -> dict[int, float]:
    """Per-step training loss of a run directory, from its metrics.jsonl."""
    return {r["step"]: r["loss"] for r in read_metrics(Path(run) / "metrics.jsonl") if r.get("kind") == "train"}


def overfit_loss(model, vocab: int = 37, steps: int = 300) -> float:
    """Final loss of `model` trained with Adam (lr 1e-2) on 4 fixed random sequences of 16 tokens: a
    model that can fit its data drives the cross-entropy towards 0."""
    import torch
    import torch.nn.functional as F

    x = torch.randint(0, vocab, (4, 17))  # from the caller's seeded global RNG
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model(x[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def train_tiny_byte_run(root: Path, text: str, *, context: int, steps: int = 30) -> Path:
    """A byte-level llama-nano (context `context`) prepared from `text` and trained `steps` steps with
    the CLI under `root`; returns the run directory."""
    import json

    from clusterlm.cli import main as cli

    (root / "corpus.txt").write_text(text)
    data, out = root / "data", root / "run"
    assert cli(["prepare", str(root / "corpus.txt"), "--out", str(data), "--tokenizer", "byte",
                "--val-fraction", "0"]) == 0
    assert cli(["train", "--data.dir=" + json.dumps(str(data)), "--train.out_dir=" + json.dumps(str(out)),
                "--model.preset=llama-nano", f"--model.max_seq_len={context}", f"--train.seq_len={context}",
                "--train.micro_batch_size=8", f"--train.max_steps={steps}", "--train.eval_interval=0",
                "--train.device=cpu", "--optim.lr=3e-3", "--optim.warmup_steps=3"]) == 0
    return out


def random_checkpoint(tmp_path: Path, kind: str, text: str, *, bpe_vocab: int, n_layers: int, context: int) -> Path:
    """A seeded random-weights Transformer with a `kind` tokenizer trained on `text`, saved as a checkpoint
    under tmp_path/run (the tokenizer at tmp_path/tok.json); returns the run directory."""
    import torch

    from clusterlm.checkpoint.store import save_checkpoint
    from clusterlm.config import RunConfig, to_toml
    from clusterlm.models.build import build_model
    from clusterlm.models.config import ModelConfig
    from clusterlm.tokenizer.kinds import train_tokenizer

    tok = train_tokenizer(kind, [text], vocab_size=bpe_vocab if kind == "bpe" else None)
    tok.save(tmp_path / "tok.json")
    cfg = ModelConfig(n_layers=n_layers, dim=32, n_heads=4, max_seq_len=context, vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights(0)
    save_checkpoint(tmp_path / "run" / "checkpoints", 0, model_state=model.state_dict(), optimizer_state=None,
                    train_state={}, config_toml=to_toml(RunConfig(model=cfg)), tokenizer_path=tmp_path / "tok.json")
    return tmp_path / "run"


def byte_llama_checkpoint(root: Path, **model: Any) -> tuple[Path, Any]:
    """A random-weights (init_weights(0)) Llama-style Transformer (rope, rmsnorm, swiglu, untied output;
    dim 32, 4 heads, context 64; `model` sets these or other ModelConfig fields) with the byte
    tokenizer, saved as step 0 under root/run (the tokenizer at root/tokenizer.json); returns (the run
    directory, its ModelConfig)."""
    from clusterlm.checkpoint.store import save_checkpoint
    from clusterlm.config import RunConfig, to_toml
    from clusterlm.models.build import build_model
    from clusterlm.models.config import ModelConfig
    from clusterlm.tokenizer.kinds import make_tokenizer

    tok = make_tokenizer("byte")
    tok.save(root / "tokenizer.json")
    cfg = ModelConfig(**{"vocab_size": tok.vocab_size, "dim": 32, "n_heads": 4, "max_seq_len": 64, "pos": "rope",
                         "norm": "rmsnorm", "mlp": "swiglu", "tie_embeddings": False, **model})
    net = build_model(cfg)
    net.init_weights(0)
    save_checkpoint(root / "run" / "checkpoints", 0, model_state=net.state_dict(), optimizer_state=None,
                    train_state={"step": 0}, config_toml=to_toml(RunConfig(model=cfg)),
                    tokenizer_path=root / "tokenizer.json")
    return root / "run", cfg


def random_classifier(out: Path, kind: str, text: str, preset: str, labels: tuple[str, ...], *, n_heads: int,
                      context: int, finetune: Any = None) -> Path:
    """A random-weights classifier checkpoint of a 1-layer, 32-wide `preset` (labels, the tokenizer's pad id) with a
    `kind` tokenizer trained on `text`, saved under out/checkpoints (tokenizer at out.parent/tok.json),
    `finetune` (a FinetuneConfig) in its config; returns `out`."""
    from clusterlm.checkpoint.store import save_checkpoint
    from clusterlm.config import RunConfig, to_toml
    from clusterlm.models.build import build_model
    from clusterlm.models.config import get_preset
    from clusterlm.tokenizer.kinds import train_tokenizer

    tok = train_tokenizer(kind, [text])
    tok.save(out.parent / "tok.json")
    cfg = get_preset(preset, n_layers=1, dim=32, n_heads=n_heads, max_seq_len=context, vocab_size=tok.vocab_size,
                     labels=labels, pad_id=tok.pad_id)
    model = build_model(cfg)
    model.init_weights(0)
    run = RunConfig(model=cfg) if finetune is None else RunConfig(model=cfg, finetune=finetune)
    save_checkpoint(out / "checkpoints", 0, model_state=model.state_dict(), optimizer_state=None, train_state={},
                    config_toml=to_toml(run), tokenizer_path=out.parent / "tok.json")
    return out


def chat_run(tmp_path: Path, messages: list[dict[str, str]], reply: str, template: bool = True) -> Path:
    """A char-tokenizer chat checkpoint (CHAT_TOKENS added, the built-in template beside it when
    `template`) trained until it answers the conversation `messages` with `reply` and <|end|> in that
    template, as `clusterlm finetune` leaves an SFT chat model."""
    import torch

    from clusterlm.checkpoint.store import save_checkpoint
    from clusterlm.config import RunConfig, to_toml
    from clusterlm.generate.template import CHAT_TOKENS, DEFAULT_TEMPLATE, TEMPLATE_FILE, ChatTemplate
    from clusterlm.models.build import build_model
    from clusterlm.models.config import ModelConfig
    from clusterlm.tokenizer.kinds import train_tokenizer

    text = ChatTemplate(DEFAULT_TEMPLATE).render(messages + [{"role": "assistant", "content": reply}])
    tok = train_tokenizer("char", [text + "System: User: Assistant:"]).with_special_tokens(CHAT_TOKENS)
    data = tmp_path / "data"
    data.mkdir(parents=True)
    tok.save(data / "tokenizer.json")
    if template:
        (data / TEMPLATE_FILE).write_text(DEFAULT_TEMPLATE, encoding="utf-8")
    cfg = ModelConfig(n_layers=2, dim=32, n_heads=4, max_seq_len=64, vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    seq = torch.tensor([[tok.eos_id] + tok.encode(text)])  # (1, T)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 28k-parameter model: more threads only contend
    try:
        for _ in range(25):
            loss = torch.nn.functional.cross_entropy(model(seq[:, :-1])[0, :, :tok.vocab_size], seq[0, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    save_checkpoint(tmp_path / "run" / "checkpoints", 0, model_state=model.state_dict(), optimizer_state=None,
                    train_state={}, config_toml=to_toml(RunConfig(model=cfg)), tokenizer_path=data / "tokenizer.json")
    return tmp_path / "run"


def require_binary(binary: str, package: str | None = None) -> str:
    """The path of a system binary a test needs; skipped (with the reason) where it is missing, but a
    failure in CI, whose setup (scripts/system-deps.sh) installs `package` (default: the binary's name)."""
    import os
    import shutil

    import pytest

    path = shutil.which(binary)
    if path is None:
        how = f"apt-get install -y {package or binary}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{binary} is not installed; CI must install it ({how})")
        pytest.skip(f"{binary} is not installed ({how})")
    return path


def wait_for_ready(proc, url: str, log_path: Path, *, status: int = 200, timeout: float = 60) -> None:  # noqa: ANN001
    """Poll `url`/ready of the `clusterlm serve` child `proc` until it answers `status` (200: loaded;
    503: listening, still loading); fails with the end of its log if it exits or `timeout` passes."""
    import time

    import httpx2 as httpx  # the HTTP client the openai package ships with

    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None and time.time() < deadline, Path(log_path).read_text()[-3000:]
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == status:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)


def token_masked(model, token_id: int):  # noqa: ANN001, ANN201 - a model in, a wrapping nn.Module out
    """`model` with token `token_id` impossible (its logit -inf in every forward; cache, config and
    parameters are the model's): the reference for a search whose only end token is another one, e.g.
    beam search ending at an end-of-turn token and not at EOS."""
    import torch

    class TokenMasked(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.config = model, model.config

        def make_cache(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            return self.inner.make_cache(*args, **kwargs)

        def forward(self, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
            logits = self.inner(*args, **kwargs).clone()
            logits[..., token_id] = -torch.inf
            return logits

    return TokenMasked()


def collect_events(sched: Any, ids: list[int], n: int, params: Any, *, abort_after: int | None = None) -> list:
    """Submit prompt `ids` with `n` choices to started scheduler `sched` (a decoder's Scheduler or the
    Seq2SeqScheduler) and return its events until all n choices are Finished, or up to a Failed (the
    last event then). `abort_after`: call sched.abort("stop") once that many events have come. Each
    event is awaited for at most 30 s."""
    import asyncio

    from clusterlm.serve.scheduler import Failed, Finished

    async def go() -> list:
        req = sched.submit(ids, n, params, asyncio.get_running_loop())
        events, done = [], 0
        while done < n:
            ev = await asyncio.wait_for(req.events.get(), 30)
            events.append(ev)
            if abort_after is not None and len(events) == abort_after:
                sched.abort("stop")
            done += isinstance(ev, Finished)
            if isinstance(ev, Failed):
                break
        return events

    return asyncio.run(go())
