"""Checkpoint store: exact round trips, tied weights, RNG, corruption detection, crash safety, pruning.

Run: .venv/bin/python -m pytest -q tests/unit/test_checkpoint.py

The model is a tiny tied-embedding LM defined here (models/ is not needed); the optimizer is
torch.optim.AdamW with two parameter groups, as the trainer builds it.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import safe_open
from torch import nn

import clusterlm.checkpoint.flatten as flatten_mod
import clusterlm.checkpoint.store as store
from clusterlm.checkpoint.flatten import flatten_state, unflatten_state
from clusterlm.checkpoint.rng import capture_rng_state, restore_rng_state
from clusterlm.checkpoint.store import (
    find_latest_valid,
    load_checkpoint,
    load_model_weights,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from clusterlm.errors import CheckpointError
from clusterlm.fsutil import sha256_file

V, D = 17, 8  # vocab, model dim


class TinyLM(nn.Module):
    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(V, D)
        self.norm = nn.LayerNorm(D)
        self.output = nn.Linear(D, V, bias=False)
        if tie:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(self.tok_embeddings(idx)))  # (B, T, V)


def make_opt(model: nn.Module) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.99))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (4, 6), generator=g)
    logits = model(idx[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, V), idx[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def save_small(root: Path, step: int, value: float = 0.0, **kw) -> Path:
    state = {"w": torch.full((3, 4), value), "b": torch.arange(5)}
    return save_checkpoint(root, step, model_state=state, optimizer_state=None, train_state={"step": step},
                           config_toml=f"# step {step}\n", **kw)


def assert_same_structure(a, b) -> None:
    """Tensors torch.equal with the same dtype; everything else equal with the same type."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same_structure(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_structure(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def hidden_entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


# ---- round trips ------------------------------------------------------------------------------------------
def test_round_trip_and_next_step_bit_exact(tmp_path):
    """Loaded model and AdamW state equal the saved ones (torch.equal, same types), and one more step
    after load_state_dict gives parameters torch.equal to the same step taken without save/load."""
    torch.manual_seed(0)
    model, opt = TinyLM(), None
    opt = make_opt(model)
    for s in range(3):
        train_step(model, opt, s)
    path = save_checkpoint(tmp_path / "ckpt", 3, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                           train_state={"step": 3, "loader": {"epoch": 0, "pos": [5, 7]}, "loss": float("nan")},
                           config_toml="[model]\ndim = 8\n")
    assert path == tmp_path / "ckpt" / "step-00000003"
    ck = load_checkpoint(path)
    assert ck.step == 3 and ck.config_toml == "[model]\ndim = 8\n" and ck.tokenizer_path is None
    assert ck.train_state["loader"] == {"epoch": 0, "pos": [5, 7]} and math.isnan(ck.train_state["loss"])
    assert_same_structure(dict(model.state_dict()), ck.model_state)
    assert_same_structure(opt.state_dict(), ck.optimizer_state)

    model2 = TinyLM()
    opt2 = make_opt(model2)
    model2.load_state_dict(ck.model_state)
    opt2.load_state_dict(ck.optimizer_state)
    train_step(model, opt, 99)
    train_step(model2, opt2, 99)
    for (n, p), (n2, p2) in zip(model.named_parameters(), model2.named_parameters()):
        assert n == n2 and torch.equal(p, p2), n
    assert_same_structure(opt.state_dict(), opt2.state_dict())


def test_tied_weights_stored_once_and_stay_tied(tmp_path):
    """model.safetensors holds the tied matrix once (safetensors refuses shared tensors); loading maps
    both names to one tensor, and a fresh tied model loaded from it still shares one Parameter."""
    torch.manual_seed(1)
    model = TinyLM(tie=True)
    path = save_checkpoint(tmp_path, 0, model_state=model.state_dict(), optimizer_state=None, train_state={},
                           config_toml="")
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    assert stored == {"tok_embeddings.weight", "norm.weight", "norm.bias"}
    sd = load_model_weights(path)
    assert list(sd) == list(model.state_dict())  # caller's order, aliases included
    assert sd["output.weight"] is sd["tok_embeddings.weight"]
    model2 = TinyLM(tie=True)
    model2.load_state_dict(sd)
    assert model2.output.weight is model2.tok_embeddings.weight
    assert torch.equal(model2.output.weight, model.output.weight)


def test_views_dtypes_and_empty_tensors_round_trip(tmp_path):
    """Non-contiguous views, slices sharing a buffer, bf16/int64/bool, 0-d and empty tensors come back
    torch.equal with their dtype and shape."""
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"t": base.t(), "slice": base[1:3], "base": base, "bf16": torch.randn(5).bfloat16(),
             "i64": torch.tensor([2**40, -3]), "mask": torch.tensor([True, False]), "scalar": torch.tensor(3.5),
             "empty": torch.zeros(0, 4), "empty2": torch.zeros(0, dtype=torch.int32)}
    path = save_checkpoint(tmp_path, 1, model_state=state, optimizer_state=None, train_state={}, config_toml="")
    out = load_model_weights(path)
    assert list(out) == list(state)
    for k in state:
        assert out[k].dtype == state[k].dtype and out[k].shape == state[k].shape and torch.equal(out[k], state[k]), k


def test_flatten_round_trip_exotic_structures():
    """unflatten_state(flatten_state(x)) equals x with the same types: int/float/None dict keys, tuples,
    nan/inf, keys that look like markers; the skeleton survives json.dumps/loads."""
    x = {1: (1.5, float("inf"), float("nan")), "__tensor__": "not a tensor", 2.5: "f", None: [None, True],
         "a": [{"b": torch.ones(2)}, (torch.zeros(1, dtype=torch.int8),)], "s": {"__tuple__": [1]}, "e": {}}
    skeleton, tensors = flatten_state(x)
    assert set(tensors) == {"a.0.b", "a.1.0"}
    back = unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert_same_structure(x, back)
    with pytest.raises(TypeError, match=r"set at 'a\.q'"):
        flatten_state({"a": {"q": {1, 2}}})
    with pytest.raises(ValueError, match="'x' named in the JSON skeleton is missing"):
        unflatten_state({"__tensor__": "x"}, {})


def test_rng_capture_restore_reproduces_draws(tmp_path):
    """After restore_rng_state, python random, numpy's global RNG and torch CPU give the same draws as
    right after capture_rng_state (cached Gaussians included), also after a save/load round trip."""
    random.gauss(0, 1)
    np.random.standard_normal()  # leaves a cached Gaussian in both generators

    def draws():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
                torch.rand(4).tolist(), torch.randint(0, 1000, (3,)).tolist())

    state = capture_rng_state()
    expected = draws()
    restore_rng_state(state)
    assert draws() == expected
    path = save_checkpoint(tmp_path, 7, model_state={}, optimizer_state=None, train_state={}, config_toml="",
                           rng=state)
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    ck = load_checkpoint(path)
    assert_same_structure(state, ck.rng)
    restore_rng_state(ck.rng)
    assert draws() == expected
    with pytest.raises(ValueError, match="unknown RNG state keys"):
        restore_rng_state({"jax": 1})


# ---- layout and manifest -------------------------------------------------------------------------------
def test_layout_manifest_and_latest(tmp_path):
    """The step folder holds the documented files; manifest sizes and sha256 equal those of the files
    (fsutil.sha256_file); latest names the folder; the tokenizer is a byte copy."""
    tok = tmp_path / "tok.json"
    tok.write_text('{"kind": "char"}')
    model = TinyLM()
    opt = make_opt(model)
    train_step(model, opt, 0)
    root = tmp_path / "run" / "checkpoints"
    path = save_checkpoint(root, 100, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                           train_state={"step": 100}, config_toml="x = 1\n", tokenizer_path=tok)
    names = sorted(p.name for p in path.iterdir())
    assert names == ["config.toml", "manifest.json", "model.safetensors", "optimizer.json", "optimizer.safetensors",
                     "rng.safetensors", "tokenizer.json", "train_state.json"]
    m = json.loads((path / "manifest.json").read_text())
    assert m["format_version"] == 1 and m["step"] == 100 and m["clusterlm_version"]
    assert datetime.fromisoformat(m["created"]).tzinfo is not None
    assert sorted(m["files"]) == [n for n in names if n != "manifest.json"]
    for name, info in m["files"].items():
        assert info == {"sha256": sha256_file(path / name), "bytes": (path / name).stat().st_size}
    assert (root / "latest").read_text() == "step-00000100\n"
    assert (path / "tokenizer.json").read_bytes() == tok.read_bytes()
    assert load_checkpoint(path).tokenizer_path == path / "tokenizer.json"
    with safe_open(str(path / "optimizer.safetensors"), "pt") as f:
        assert "state.0.exp_avg" in set(f.keys())
    assert verify_checkpoint(path) == [] and hidden_entries(root) == []
    assert resolve_checkpoint(str(tmp_path / "run")) == path == resolve_checkpoint(root) == resolve_checkpoint(path)


def test_bad_arguments_leave_nothing_behind(tmp_path):
    """Invalid step, keep_last, train_state (int keys, reserved 'rng', non-JSON) or tokenizer path raise
    before anything is written; meta tensors raise a clear ValueError and the partial folder is removed."""
    root = tmp_path / "c"
    kw = {"model_state": {}, "optimizer_state": None, "config_toml": ""}
    with pytest.raises(ValueError, match="step=-1"):
        save_checkpoint(root, -1, train_state={}, **kw)
    with pytest.raises(ValueError, match="keep_last=0"):
        save_checkpoint(root, 1, train_state={}, keep_last=0, **kw)
    with pytest.raises(ValueError, match="key 3"):
        save_checkpoint(root, 1, train_state={"loader": {3: "x"}}, **kw)
    with pytest.raises(ValueError, match="reserved key 'rng'"):
        save_checkpoint(root, 1, train_state={"rng": 1}, **kw)
    with pytest.raises(ValueError, match=r"train_state\['t'\] is a Tensor"):
        save_checkpoint(root, 1, train_state={"t": torch.ones(1)}, **kw)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        save_checkpoint(root, 1, train_state={}, tokenizer_path=tmp_path / "nope.json", **kw)
    assert not root.exists()
    with pytest.raises(ValueError, match=r"model_state\['w'\] is on the meta device"):
        save_checkpoint(root, 1, train_state={}, **{**kw, "model_state": {"w": torch.empty(2, device="meta")}})
    assert list(root.iterdir()) == []


# ---- corruption --------------------------------------------------------------------------------------------
def _flip(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[-3] ^= 0xFF
    p.write_bytes(bytes(raw))


CORRUPTIONS = {
    "flipped byte": (lambda d: _flip(d / "model.safetensors"), "model.safetensors sha256"),
    "truncated": (lambda d: (d / "rng.safetensors").write_bytes((d / "rng.safetensors").read_bytes()[:-10]),
                  "rng.safetensors has"),
    "missing manifest": (lambda d: (d / "manifest.json").unlink(), "manifest.json is missing"),
    "unparsable manifest": (lambda d: (d / "manifest.json").write_text('{"format_version": 1, "st'),
                            "manifest.json is unparsable"),
    "missing file": (lambda d: (d / "config.toml").unlink(), "config.toml is missing"),
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_newest_is_skipped(tmp_path, caplog, kind):
    """A damaged newest checkpoint: verify_checkpoint names the problem, find_latest_valid returns the
    previous step and logs a warning naming the folder and the problem, load_checkpoint raises."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    first = save_small(root, 10, 1.0)
    second = save_small(root, 20, 2.0)
    corrupt, phrase = CORRUPTIONS[kind]
    corrupt(second)
    problems = verify_checkpoint(second)
    assert len(problems) == 1 and phrase in problems[0]
    with caplog.at_level(logging.WARNING, logger="clusterlm.checkpoint.store"):
        assert find_latest_valid(root) == first
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step-00000020" in w and phrase in w for w in warnings), warnings
    assert resolve_checkpoint(run) == first
    assert torch.equal(load_checkpoint(first).model_state["w"], torch.full((3, 4), 1.0))
    with pytest.raises(CheckpointError, match="step-00000020 is not a valid checkpoint"):
        load_checkpoint(second)


def test_latest_naming_a_missing_folder_is_warned_where_a_run_is_opened(tmp_path, caplog):
    """`latest` naming a step folder that was deleted by hand: resolve_checkpoint (eval, generate,
    serve, export) and find_latest_valid use the newest valid folder and say that the pointer names a
    folder that does not exist."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    first = save_small(root, 10, 1.0)
    second = save_small(root, 20, 2.0)
    import shutil

    shutil.rmtree(second)
    with caplog.at_level(logging.WARNING, logger="clusterlm.checkpoint.store"):
        assert resolve_checkpoint(run) == first
    assert "latest names step-00000020, which does not exist; using the newest valid checkpoint, " \
           "step-00000010" in caplog.text
    caplog.clear()
    save_small(root, 30, 3.0)  # a new save moves the pointer: nothing to say
    with caplog.at_level(logging.WARNING, logger="clusterlm.checkpoint.store"):
        assert resolve_checkpoint(run).name == "step-00000030"
    assert "latest names" not in caplog.text


def test_none_valid_raises_with_reasons(tmp_path):
    """With every checkpoint corrupt, find_latest_valid is None and resolve_checkpoint's CheckpointError
    lists each folder with its problem; an empty or absent folder gets its own clear message."""
    root = tmp_path / "checkpoints"
    a, b = save_small(root, 1), save_small(root, 2)
    _flip(a / "model.safetensors")
    (b / "manifest.json").unlink()
    assert find_latest_valid(root) is None
    with pytest.raises(CheckpointError) as e:
        resolve_checkpoint(tmp_path)
    msg = str(e.value)
    assert "found 2, all rejected" in msg
    assert "step-00000001: model.safetensors sha256" in msg and "step-00000002: manifest.json is missing" in msg
    with pytest.raises(CheckpointError, match="is not a valid checkpoint: model.safetensors sha256"):
        resolve_checkpoint(a)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints in .*empty"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "absent")
    assert find_latest_valid(tmp_path / "absent") is None


def test_a_lora_adapter_folder_is_named_as_one(tmp_path):
    """RUN/adapter (adapter.json, a LoRA fine-tune's adapters alone) given to eval, generate or export:
    one line says what it is and points to the run directory and to `serve`, where the generic "no
    checkpoints in RUN/adapter (no step-NNNNNNNN folders)" left the user to guess why."""
    adapter = tmp_path / "run" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter.json").write_text("{}")
    with pytest.raises(CheckpointError, match=rf"^{adapter} is a LoRA adapter folder \(adapter.json\), not a "
                                              rf"checkpoint: pass the fine-tune's run directory \({adapter.parent},"):
        resolve_checkpoint(adapter)


def test_load_model_weights_checks_only_the_model_file(tmp_path):
    """load_model_weights ignores a damaged optimizer file (it is not read) but refuses a damaged
    model.safetensors; load_checkpoint refuses both; verify=False skips hashing."""
    model = TinyLM()
    opt = make_opt(model)
    train_step(model, opt, 0)
    path = save_checkpoint(tmp_path, 5, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                           train_state={}, config_toml="")
    _flip(path / "optimizer.safetensors")
    assert torch.equal(load_model_weights(path)["norm.weight"], model.norm.weight)
    with pytest.raises(CheckpointError, match="optimizer.safetensors sha256"):
        load_checkpoint(path)
    assert load_checkpoint(path, verify=False).step == 5
    _flip(path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors sha256"):
        load_model_weights(path)


# ---- crash safety ------------------------------------------------------------------------------------------
def test_exception_mid_save_leaves_previous_state(tmp_path, monkeypatch):
    """An exception while writing optimizer.json (new step, then re-save of an existing step) leaves the
    step folders, their contents and `latest` as before, no hidden leftovers; the next save succeeds."""
    root = tmp_path / "c"
    save_small(root, 1, 1.0)
    real = store.write_json

    def failing(path, obj):
        if path.name == "optimizer.json":
            raise OSError("disk full (injected)")
        return real(path, obj)

    monkeypatch.setattr(store, "write_json", failing)
    model = TinyLM()
    opt = make_opt(model)
    train_step(model, opt, 0)
    for step in (2, 1):
        with pytest.raises(OSError, match="injected"):
            save_checkpoint(root, step, model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                            train_state={}, config_toml="")
        assert [p.name for p in store.step_folders(root)] == ["step-00000001"]
        assert (root / "latest").read_text() == "step-00000001\n" and hidden_entries(root) == []
        assert torch.equal(load_checkpoint(root / "step-00000001").model_state["w"], torch.full((3, 4), 1.0))
    monkeypatch.setattr(store, "write_json", real)
    assert save_small(root, 2, 2.0) == find_latest_valid(root)


CHILD = textwrap.dedent("""
    import sys, time, torch
    import clusterlm.checkpoint.store as store
    root, stage = sys.argv[1], sys.argv[2]

    def pause_after(fn, tag, when=lambda *a: True):
        def wrapped(*a, **k):
            out = fn(*a, **k)
            if when(*a):
                print(tag, flush=True)
                time.sleep(120)
            return out
        return wrapped

    if stage == "model":
        store.write_tensors = pause_after(store.write_tensors, "model", lambda p, *a: p.name == "model.safetensors")
    elif stage == "manifest":
        store.write_manifest = pause_after(store.write_manifest, "manifest")
    elif stage == "commit":
        store.commit_folder = pause_after(store.commit_folder, "commit")
    big = {"w": torch.randn(6_000_000), "b": torch.arange(5)}  # 24 MB
    print("saving", flush=True)
    store.save_checkpoint(root, 2, model_state=big, optimizer_state=None, train_state={"step": 2}, config_toml="")
    print("done", flush=True)
""")


@pytest.mark.parametrize("stage", ["model", "manifest", "commit", "anytime"])
def test_sigkill_during_save(tmp_path, stage, caplog):
    """A process SIGKILLed during a save of a 24 MB tensor (after the model file, after the manifest,
    after the rename but before `latest` moves, or at a random moment) leaves either no step-2 folder or
    a complete verified one, `latest` still naming step-1 until the save completes, and the next save
    succeeds and removes the leftovers."""
    root = tmp_path / "c"
    save_small(root, 1, 1.0)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(root), stage], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for = "saving" if stage == "anytime" else stage
    try:
        while (line := proc.stdout.readline().strip()) != wait_for:
            assert line, f"child exited early: {proc.stderr.read()}"
        if stage == "anytime":
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    step2 = root / "step-00000002"
    latest = (root / "latest").read_text()
    if stage in ("model", "manifest"):
        assert not step2.exists() and latest == "step-00000001\n"
        assert any(".partial-" in n for n in hidden_entries(root))
        assert find_latest_valid(root) == root / "step-00000001"
    elif stage == "commit":
        assert verify_checkpoint(step2) == [] and latest == "step-00000001\n"
        with caplog.at_level(logging.WARNING):
            assert find_latest_valid(root) == step2  # newest valid wins; `latest` is only a hint
        assert "latest names step-00000001" in caplog.text
    else:
        assert (not step2.exists() and latest == "step-00000001\n") or verify_checkpoint(step2) == []
    assert save_small(root, 3, 3.0) == find_latest_valid(root)
    assert hidden_entries(root) == [] and (root / "latest").read_text() == "step-00000003\n"


# ---- retention and replacement -----------------------------------------------------------------------------
def test_keep_last_prunes_and_earlier_step_drops_later_ones(tmp_path, caplog):
    """keep_last=2 over steps 1..5 leaves steps 4 and 5; then saving step 3 (a run resumed from an earlier
    checkpoint) removes the later steps 4 and 5 with a warning, so find_latest_valid returns step 3."""
    root = tmp_path / "c"
    for s in range(1, 6):
        save_small(root, s, float(s), keep_last=2)
    assert [p.name for p in store.step_folders(root)] == ["step-00000004", "step-00000005"]
    with caplog.at_level(logging.WARNING):
        save_small(root, 3, 3.0, keep_last=2)
    assert [p.name for p in store.step_folders(root)] == ["step-00000003"]
    assert "step-00000005: it is later than the step just saved (3)" in caplog.text
    assert find_latest_valid(root) == root / "step-00000003" and hidden_entries(root) == []


def test_resave_existing_step_replaces_it(tmp_path):
    """Saving step 5 twice leaves one step-5 folder holding the second save's tensors, verified, with
    no hidden leftovers and `latest` naming it."""
    root = tmp_path / "c"
    save_small(root, 5, 1.0)
    path = save_small(root, 5, 2.0)
    assert torch.equal(load_checkpoint(path).model_state["w"], torch.full((3, 4), 2.0))
    assert [p.name for p in store.step_folders(root)] == ["step-00000005"] and hidden_entries(root) == []
    assert verify_checkpoint(path) == [] and (root / "latest").read_text() == "step-00000005\n"


def test_no_pickle_in_checkpoint_code():
    """The checkpoint modules import no pickle-based module and never call torch.load / torch.save /
    numpy.load (parsed with ast, so docstrings mentioning them do not count). The one exception is
    distributed.py, which guards DCP's own pickles: `pickle` only for a restricted Unpickler, and
    torch.load only with weights_only=True."""
    banned_modules = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    files = sorted(Path(store.__file__).parent.glob("*.py"))
    assert Path(flatten_mod.__file__) in files and len(files) >= 8
    for file in files:
        tree = ast.parse(file.read_text())
        guarded = file.name == "distributed.py"
        safe_loads = {id(c.func) for c in ast.walk(tree) if guarded and isinstance(c, ast.Call)
                      and any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in c.keywords)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & (banned_modules - ({"pickle"} if guarded
                                                                                          else set())), file
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in banned_modules, file
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and id(node) not in safe_loads:
                assert (node.value.id, node.attr) not in {("torch", "load"), ("torch", "save"), ("np", "load"),
                                                          ("pickle", "load"), ("pickle", "loads")}, \
                    f"{file}:{node.lineno}"


def _dcp_checkpoint(root: Path) -> tuple[Path, nn.Module, torch.optim.Optimizer]:
    from clusterlm.checkpoint.distributed import save_distributed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return save_distributed(root, 1, model, opt, train_state={"step": 1}, config_toml="x = 1\n"), model, opt


class _RunsCode:  # what an untrusted pickle can hold: unpickling it calls os.mkdir(marker)
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_load_runs_no_code_from_the_checkpoint(tmp_path):
    """A DCP checkpoint (single process, as any layout may load one) loads back equal, while a
    dcp/.metadata or a non-tensor value (optimizer param_groups) holding a pickle that calls a function
    is refused with CheckpointError naming it, and the function never runs (DCP itself would run it:
    pickle.load / torch.load(weights_only=False))."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from clusterlm.checkpoint.distributed import load_distributed

    path, model, opt = _dcp_checkpoint(tmp_path / "good")
    fresh = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=5.0)
    assert load_distributed(path, fresh, fresh_opt) == {"step": 1}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert fresh_opt.param_groups[0]["lr"] == 1e-3

    marker = tmp_path / "code-ran"
    (path / "dcp" / ".metadata").write_bytes(__import__("pickle").dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata .*posix\.mkdir|\.metadata .*os\.mkdir"):
        load_distributed(path, fresh, fresh_opt)
    assert not marker.exists()
    (path / "dcp" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"^cannot read .*/dcp/\.metadata: No such file or directory$"):
        load_distributed(path, fresh, fresh_opt)

    path, model, opt = _dcp_checkpoint(tmp_path / "bytes")
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    state["optim"]["param_groups"][0]["lr"] = _RunsCode(marker)
    __import__("shutil").rmtree(path / "dcp")  # written anew (dcp.save over a folder warns)
    dcp.save(state, checkpoint_id=str(path / "dcp"), no_dist=True)
    with pytest.raises(CheckpointError, match=r"optim\.param_groups\.0\.lr.*weights_only=True"):
        load_distributed(path, fresh, fresh_opt)
    assert not marker.exists()


# ---- the checkpointer ---------------------------------------------------------------------------------------
class _Loader:
    def __init__(self) -> None:
        self.pos = 0

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


def test_checkpointer_saves_and_resumes_in_one_call_each(tmp_path):
    """Checkpointer.save then load_into on a fresh model, optimizer and loader (what `train
    --train.resume=auto` does) gives back equal weights and optimizer state, the loader position, the
    RunState and the torch RNG as it was at the save; resume="none" refuses a folder with checkpoints,
    and auto on an empty folder starts fresh."""
    from clusterlm.checkpoint.manager import Checkpointer, RunState
    from clusterlm.config import CheckpointConfig
    from clusterlm.errors import ConfigError

    root = tmp_path / "run" / "checkpoints"
    assert Checkpointer(root, CheckpointConfig(), config_toml="", resume="auto").load_into(
        TinyLM(), make_opt(TinyLM()), _Loader()) == RunState()
    model, loader = TinyLM(), _Loader()
    opt = make_opt(model)
    train_step(model, opt, 0)
    loader.pos = 7
    state = RunState(step=3, tokens_seen=96, best_val_loss=2.5)
    torch.manual_seed(11)
    saver = Checkpointer(root, CheckpointConfig(keep_last=2), config_toml="# run\n", extra_state={"tokens_per_step": 32})
    path = saver.save(state, model, opt, loader, reason="periodic")
    assert path == root / "step-00000003" and saver.latest() == path
    want_draw = torch.rand(3)

    torch.manual_seed(99)
    model2, loader2 = TinyLM(), _Loader()
    opt2 = make_opt(model2)
    got = Checkpointer(root, CheckpointConfig(), config_toml="", resume="auto").load_into(model2, opt2, loader2)
    assert got == state and loader2.pos == 7
    assert torch.equal(torch.rand(3), want_draw)
    for k, v in model.state_dict().items():
        assert torch.equal(model2.state_dict()[k], v)
    assert_same_structure(opt2.state_dict(), opt.state_dict())
    assert load_checkpoint(path).train_state["tokens_per_step"] == 32
    with pytest.raises(ConfigError, match="already has checkpoints"):
        Checkpointer(root, CheckpointConfig(), config_toml="", resume="none").load_into(model2, opt2, loader2)


@pytest.mark.parametrize("resume", ["none", "auto"])
def test_a_file_where_the_checkpoints_folder_goes_is_refused_at_start_up(tmp_path, resume):
    """RUN/checkpoints being a file: refused when the checkpoint is resolved (start-up, before any model),
    naming it; `train` used to run every step up to the first save and then stop with exit 2 "File exists:
    RUN/checkpoints", the work lost. The file is left as it was."""
    from clusterlm.checkpoint.manager import Checkpointer
    from clusterlm.config import CheckpointConfig
    from clusterlm.errors import ConfigError

    (tmp_path / "checkpoints").write_text("mine")
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'checkpoints'} is a file, where this run keeps its "
                                          "checkpoints folder; move it aside or choose another --train.out_dir$"):
        Checkpointer(tmp_path / "checkpoints", CheckpointConfig(), config_toml="", resume=resume).resolve()
    assert (tmp_path / "checkpoints").read_text() == "mine"


def test_resume_into_a_folder_of_another_run_is_refused_at_start_up(tmp_path, caplog):
    """--train.resume=OTHER_RUN/step-3 with an out_dir already holding steps 2 and 6 of another run: refused
    when the checkpoint is resolved (start-up, before any model), naming the folders (the first save used to
    delete step 6 as "left by a run resumed from an earlier checkpoint" and keep step 2 beside the new
    steps). Resuming this folder's own step 2 is a branch: allowed, with a warning now that step 6 goes at
    the first save; the folder is unchanged until then."""
    from clusterlm.checkpoint.manager import Checkpointer, RunState
    from clusterlm.config import CheckpointConfig
    from clusterlm.errors import ConfigError

    def save(root: Path, step: int) -> Path:
        model = TinyLM()
        return Checkpointer(root, CheckpointConfig(keep_last=5), config_toml="").save(
            RunState(step=step), model, make_opt(model), _Loader(), reason="periodic")

    mine, other = tmp_path / "b" / "checkpoints", tmp_path / "a" / "checkpoints"
    save(mine, 2), save(mine, 6)
    foreign = save(other, 3)
    with pytest.raises(ConfigError, match=r"--train.resume=.*a/checkpoints/step-00000003 is outside .*b/checkpoints, "
                       r"which already holds checkpoints of another run \(step-00000002, step-00000006\)"):
        Checkpointer(mine, CheckpointConfig(), config_toml="", resume=str(foreign)).resolve()
    with caplog.at_level(logging.WARNING):
        got = Checkpointer(mine, CheckpointConfig(), config_toml="", resume=str(mine / "step-00000002")).resolve()
    assert got == mine / "step-00000002"
    assert "the later checkpoints step-00000006 of" in caplog.text and "deleted at this run's first save" in caplog.text
    assert [p.name for p in store.step_folders(mine)] == ["step-00000002", "step-00000006"]
    assert Checkpointer(tmp_path / "c" / "checkpoints", CheckpointConfig(), config_toml="",
                        resume=str(foreign)).resolve() == foreign  # a new folder: nothing to mix with


def test_keep_best_keeps_the_lowest_val_loss_checkpoint_beside_the_newest(tmp_path, caplog):
    """checkpoint.keep_best with keep_last=1: saves at steps 1..5 where steps 2 and 4 were the best so
    far; after each save the newest and the best are the folders left, checkpoints/best names the best
    (resolve_checkpoint reads it), and an earlier best is pruned once a later one replaces it. Resaving
    an earlier step (a resumed run) removes a later best and its pointer; saves without keep_best ignore
    `best`. A `best` pointer naming nothing is refused with the path in the message."""
    from clusterlm.checkpoint.manager import Checkpointer, RunState
    from clusterlm.config import CheckpointConfig

    root = tmp_path / "run" / "checkpoints"
    model, loader = TinyLM(), _Loader()
    opt = make_opt(model)
    saver = Checkpointer(root, CheckpointConfig(keep_last=1, keep_best=True), config_toml="")
    names = lambda: [p.name for p in store.step_folders(root)]  # noqa: E731
    want = {1: ["step-00000001"], 2: ["step-00000002"], 3: ["step-00000002", "step-00000003"],
            4: ["step-00000004"], 5: ["step-00000004", "step-00000005"]}
    for step in range(1, 6):
        with caplog.at_level(logging.INFO):
            saver.save(RunState(step=step), model, opt, loader, reason="periodic", best=step in (1, 2, 4))
        assert names() == want[step], step
        assert (root / "best").read_text() == f"step-{max(s for s in (1, 2, 4) if s <= step):08d}\n"
        assert (root / "latest").read_text() == f"step-{step:08d}\n"
    assert resolve_checkpoint(root / "best") == root / "step-00000004" and hidden_entries(root) == []
    assert "step-00000004 has the lowest validation loss so far" in caplog.text
    # a run resumed from step 3 saves step 3 again: the later best (4) belonged to the abandoned run
    save_small(root, 3, keep_last=1)
    assert names() == ["step-00000003"] and not (root / "best").exists()
    # without keep_best a best save is an ordinary one
    plain = Checkpointer(tmp_path / "p", CheckpointConfig(keep_last=1), config_toml="")
    for step in (1, 2):
        plain.save(RunState(step=step), model, opt, loader, reason="periodic", best=step == 1)
    assert [p.name for p in store.step_folders(tmp_path / "p")] == ["step-00000002"]
    assert not (tmp_path / "p" / "best").exists()
    (root / "best").write_text("step-00000009\n")
    with pytest.raises(CheckpointError, match="best names 'step-00000009', which is not a step folder"):
        resolve_checkpoint(root / "best")
    # a run without keep_best has no `best`: say so, not "does not exist; pass ... or checkpoints/best"
    with pytest.raises(CheckpointError, match=r"p/best does not exist: a run writes checkpoints/best only with "
                                              r"checkpoint.keep_best = true; pass .*p for its newest checkpoint"):
        resolve_checkpoint(tmp_path / "p" / "best")
