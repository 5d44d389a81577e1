"""The models one `clusterlm serve` answers for: which ones (command line or a TOML file), how each
is loaded (a checkpoint, or a LoRA adapter folder onto its base), and the bytes each one holds.

    clusterlm serve runs/shakespeare_char tiny=runs/llama_mini sst2=runs/sst2_lora/adapter
    clusterlm serve --models models.toml

models.toml, one [[model]] table per model (paths relative to the file; limits default to the
command line's --max-batch, --max-queue, --max-new-tokens-limit):

    [[model]]
    name = "shakespeare"
    path = "runs/shakespeare_char"
    max_batch = 8

An adapter folder (RUN/adapter: adapter.safetensors + adapter.json, written by a LoRA fine-tune)
is loaded onto its base checkpoint (adapter.json's meta.base). `clusterlm serve` passes one
`bases` dict for all its models, so a base checkpoint is loaded once: every adapter on it, and the
base itself if it is served too, share the base's weight tensors, and each adapter adds only its
LoRA matrices, applied unmerged (W x + (alpha/r) B A x, the way vLLM serves LoRA). Without `bases`
(a single adapter loaded on its own) the adapters are merged into a private copy of the base.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import os
import threading
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from clusterlm.checkpoint.layout import BEST, STEP_RE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """One served model: its id in requests' `model` field, the checkpoint or adapter folder it is
    loaded from, and its own limits (None: the server's)."""

    name: str
    path: str = ""
    max_batch: int | None = None
    max_queue: int | None = None
    max_new_tokens_limit: int | None = None

    def __post_init__(self) -> None:
        if not (0 < len(self.name) <= 256 and self.name.isprintable() and self.name == self.name.strip()):
            raise ValueError(f"model name {self.name!r} must be 1-256 printable characters without leading or "
                             "trailing spaces (the request's `model` field holds at most 256)")
        for f in ("max_batch", "max_queue", "max_new_tokens_limit"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (0 if f == "max_queue" else 1)):
                raise ValueError(f"model {self.name!r}: {f}={v!r} must be an integer >= "
                                 f"{0 if f == 'max_queue' else 1}")


def _spec_from_arg(arg: str) -> ModelSpec:
    """`PATH` (named after the run folder, as a single `clusterlm serve PATH` is) or `NAME=PATH`; an
    argument that exists as a path is a PATH even with a "=" in it (runs/lr=3e-4)."""
    name, sep, path = arg.partition("=")
    if not sep or Path(arg).exists():
        name, path = default_name(arg), arg
    if not path:
        raise ValueError(f"model argument {arg!r}: give PATH or NAME=PATH")
    return ModelSpec(name=name, path=path)


def default_name(path: str) -> str:
    """The run folder's name: RUN's for RUN, RUN/adapter, RUN/checkpoints, RUN/checkpoints/step-N and
    RUN/checkpoints/best (a folder with no run above it keeps its own name)."""
    p = Path(path).resolve()
    if (p / "adapter.json").is_file():
        return p.parent.name
    run = p.parent if STEP_RE.match(p.name) or p.name == BEST else p
    run = run.parent if run.name == "checkpoints" else run
    return run.name or p.name


def read_models_file(path: str | Path) -> list[ModelSpec]:
    """The [[model]] tables of a TOML file; unknown keys fail with a close-match suggestion."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"--models {path}: cannot read it as TOML ({e})") from None
    extra = sorted(set(data) - {"model"})
    tables = data.get("model")
    if extra or not isinstance(tables, list) or not tables:
        raise ValueError(f"--models {path}: expected one [[model]] table per model (name, path, and optionally "
                         "max_batch, max_queue, max_new_tokens_limit)"
                         f"{'; unknown ' + ', '.join(extra) if extra else ''}")
    known = [f.name for f in fields(ModelSpec)]
    specs = []
    for i, t in enumerate(tables):
        if not isinstance(t, dict):
            raise ValueError(f"--models {path}: model #{i + 1} is {t!r}, not a table; write one [[model]] table "
                             "per model (name, path, ...)")
        for k in t:
            if k not in known:
                close = difflib.get_close_matches(k, known, n=1)
                raise ValueError(f"--models {path}: [[model]] #{i + 1} has unknown key {k!r}"
                                 f"{f' (did you mean {close[0]!r}?)' if close else ''}; known: {', '.join(known)}")
        if not isinstance(t.get("path"), str) or not t["path"]:
            raise ValueError(f"--models {path}: [[model]] #{i + 1} needs path = \"RUN\" "
                             "(a checkpoint or adapter folder)")
        if "name" in t and not (isinstance(t["name"], str) and t["name"]):  # "" is not "left out"
            raise ValueError(f"--models {path}: [[model]] #{i + 1} has name = {t['name']!r}; give a string of 1-256 "
                             "printable characters, or leave name out to use the run folder's")
        p = Path(t["path"]).expanduser()
        p = p if p.is_absolute() else path.parent / p  # relative to the file, as compose files are
        specs.append(ModelSpec(**{**t, "name": t.get("name") or default_name(str(p)), "path": str(p)}))
    return specs


def model_specs(args: list[str], models_file: str | None, model_name: str | None) -> list[ModelSpec]:
    """The served models from the positional arguments, --models and --model-name; names must be unique."""
    specs = [_spec_from_arg(a) for a in args] + (read_models_file(models_file) if models_file else [])
    if not specs:
        raise ValueError("no model to serve: give a checkpoint (PATH or NAME=PATH) or --models FILE")
    if model_name is not None:
        if len(specs) != 1:
            raise ValueError(f"--model-name names a single model; with {len(specs)} models write NAME=PATH")
        if specs[0].name != default_name(specs[0].path):  # NAME=PATH, or a models file's name
            raise ValueError(f"--model-name {model_name!r} and the name {specs[0].name!r} given with "
                             f"{specs[0].path} both name the model; keep one")
        specs = [ModelSpec(model_name, specs[0].path, specs[0].max_batch, specs[0].max_queue,
                           specs[0].max_new_tokens_limit)]
    seen: dict[str, str] = {}
    for s in specs:
        if s.name in seen:
            raise ValueError(f"model name {s.name!r} is given twice ({seen[s.name]} and {s.path}); "
                             "name one of them with NAME=PATH")
        seen[s.name] = s.path
    return specs


def load_model(path: str | Path, device: str, bases: dict | None = None) -> object:
    """A LoadedModel from a checkpoint (run, checkpoints or step folder), or from a LoRA adapter
    folder: its base checkpoint (adapter.json meta.base) with the adapters loaded. `bases`: the
    checkpoints already loaded by this server, by resolved step folder and device (filled here): a
    checkpoint is then loaded once and adapters share its weights (module docstring); None: each
    call loads its own copy and adapters are merged. Errors name the path (CheckpointError)."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.errors import CheckpointError, ClusterlmError

    path = Path(path)
    try:
        if (path / "adapter.json").is_file():
            return _load_adapter(path, device, bases)
        if bases is None:
            return load_for_inference(path, device=device)
        return _shared_checkpoint(path, device, bases)
    except ClusterlmError:
        raise
    except Exception as e:  # torch/safetensors errors on a truncated or foreign file: name the checkpoint
        raise CheckpointError(f"checkpoint {path} cannot be loaded: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from e


def _shared_checkpoint(path: str | Path, device: str, bases: dict, grow_vocab: int | None = None) -> object:
    """The LoadedModel of checkpoint `path` from `bases`, loading it the first time; with
    `grow_vocab`, the checkpoint grown to that many tokens (load_for_inference), a base of its own."""
    from clusterlm.checkpoint.model_io import load_for_inference, read_checkpoint_config
    from clusterlm.checkpoint.store import resolve_checkpoint

    step = resolve_checkpoint(str(path))
    if grow_vocab == read_checkpoint_config(step).model.vocab_size:
        grow_vocab = None  # the base as it is: shared with the base served by name
    key = (str(Path(step).resolve()), str(device), grow_vocab)
    if key not in bases:
        bases[key] = load_for_inference(path, device=device, grow_vocab=grow_vocab)
    return bases[key]


def share_weights(model: nn.Module) -> nn.Module:
    """A new module tree with `model`'s structure whose parameters and buffers ARE `model`'s (no
    copy): changing the copy's modules (wrapping a Linear in a LoRALinear) leaves `model` as it
    was, and the weights are in memory once. Inference-only caches (`fused`) are not carried."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    clone = copy.deepcopy(model, memo)
    for m in clone.modules():
        if getattr(m, "fused", None) is not None:
            m.fused, m._fused_src = None, None
    object.__setattr__(clone, "_shared_base", model)  # not a submodule: only for the memory figures
    return clone


def own_tensor_bytes(model: nn.Module) -> int:
    """tensor_bytes of `model` without the tensors it shares with its base (share_weights)."""
    base = model.__dict__.get("_shared_base")
    if base is None:
        return tensor_bytes(model)
    shared = {id(t) for t in (*base.parameters(), *base.buffers())}
    own = nn.ParameterList([p for p in model.parameters() if id(p) not in shared])
    return tensor_bytes(own)


def refuse_classifier_adapter(path: Path) -> None:
    """A CheckpointError when adapter folder `path` belongs to a classifier fine-tune: its head was
    trained with the adapters but is not in adapter.safetensors, so the full checkpoint is what serves.
    Reads configs only (serve calls it before binding its port)."""
    import os

    from clusterlm.checkpoint.model_io import read_checkpoint_config
    from clusterlm.checkpoint.store import resolve_checkpoint
    from clusterlm.errors import CheckpointError

    ckpt = _optional_source(path, "checkpoint")
    if ckpt is None:
        return
    labels = read_checkpoint_config(resolve_checkpoint(str(ckpt))).model.labels
    if labels:
        raise CheckpointError(f"{path} holds the adapters of a classifier (labels {', '.join(labels)}); its head "
                              f"is only in the full checkpoint: serve {os.path.normpath(ckpt)}")


def _load_adapter(path: Path, device: str, bases: dict | None = None) -> object:
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.errors import CheckpointError
    from clusterlm.finetune.lora import adapter_source, load_adapters, merge_lora, read_adapter_meta
    from clusterlm.generate.template import read_template
    from clusterlm.tokenizer import load_tokenizer

    meta = read_adapter_meta(path).get("meta") or {}
    base_path = adapter_source(path, "base")
    if base_path is None:
        raise CheckpointError(f"{path}/adapter.json has no meta.base (the base checkpoint the adapters were "
                              "trained on); serve the fine-tune's checkpoint instead")
    refuse_classifier_adapter(path)
    # the fine-tune's tokenizer and template (written beside the adapters since 2026-12-06): its chat
    # tokens grew the base's vocabulary, new rows at the mean of the base's (finetune/setup.py), so the
    # base is rebuilt the same way; older folders answer with the base's own tokenizer and template
    own_tok = path / "tokenizer.json"
    grow = int(meta["vocab_size"]) if own_tok.is_file() and meta.get("vocab_size") else None
    if bases is not None:  # the base once per server: adapters share its weights, applied unmerged
        base = _shared_checkpoint(base_path, device, bases, grow)
        if base.quantization:
            raise CheckpointError(f"{path}: its base {base_path} is quantized ({base.quantization.get('method')}); "
                                  "LoRA adapters apply to a full-precision base")
        model = share_weights(base.model)
        load_adapters(path, model)
        model.eval()
        loaded = dataclasses.replace(base, model=model, path=path)
    else:
        loaded = load_for_inference(base_path, device=device, grow_vocab=grow)
        load_adapters(path, loaded.model)
        merge_lora(loaded.model)
        loaded.model.eval()
        loaded.path = path
    if own_tok.is_file():
        loaded = dataclasses.replace(loaded, tokenizer=load_tokenizer(own_tok), chat_template=read_template(path))
    return loaded


def _optional_source(path: Path, key: str) -> Path | None:
    """adapter_source, or None where the path no longer exists (only the base is needed to serve)."""
    from clusterlm.errors import CheckpointError
    from clusterlm.finetune.lora import adapter_source

    try:
        return adapter_source(path, key)
    except CheckpointError:
        return None


def tensor_bytes(obj: object) -> int:
    """Bytes of the distinct tensors of a module (parameters and buffers; tied weights once) or of a
    cache object's attributes (tensors, and dicts, lists or tuples of them)."""
    if isinstance(obj, nn.Module):
        tensors = [*obj.parameters(), *obj.buffers()]
    else:
        tensors = []
        for v in vars(obj).values():
            items = v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else [v]
            tensors += [t for t in items if isinstance(t, torch.Tensor)]
    seen: dict[tuple[int, str], int] = {}
    for t in tensors:
        if t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), str(t.device))
            seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
    return sum(seen.values())


class Served:
    """One served model at run time: its spec, limits (app.Settings) and metrics (labelled with its
    name), the `state` its routes read (loaded, sched or labels, tokenizer, context, chat), whether
    it is ready, and why it failed to load (None while it has not)."""

    def __init__(self, spec: ModelSpec, settings: object, metrics: object) -> None:
        self.spec, self.name, self.settings, self.metrics = spec, spec.name, settings, metrics
        self.state: dict = {}
        self.ready = threading.Event()
        self.error: str | None = None
        self.memory: dict[str, int] = {}

    def measure(self) -> None:
        """Parameter and KV-cache bytes, into `memory` and the clusterlm_model_memory_bytes gauge."""
        sched = self.state.get("sched")
        model = self.state["loaded"].model
        # an adapter on a shared base counts its own LoRA matrices; the base's bytes once, under the base
        self.memory = {"parameter_bytes": own_tensor_bytes(model),
                       "kv_cache_bytes": tensor_bytes(sched.cache) if sched is not None else 0}
        if "_shared_base" in model.__dict__:
            self.memory["shared_base_bytes"] = tensor_bytes(model.__dict__["_shared_base"])
        self.metrics.set_memory(self.memory["parameter_bytes"], self.memory["kv_cache_bytes"])

    def source(self, field: str) -> str:
        """Where this model's limit `field` (max_batch, max_new_tokens_limit) comes from, for messages:
        the models file when it gives one for this model, else the server's command-line flag."""
        if getattr(self.spec, field) is not None:
            return f"model {self.name!r}'s {field} in the models file"
        return "the server's --" + field.replace("_", "-")

    def ranges(self) -> dict[str, str]:
        """This model's own ranges for the fields whose bounds are the server's (422 messages)."""
        from clusterlm.serve.schemas import MAX_N

        limit = f"[1, {self.settings.max_new_tokens_limit}]"
        return {"max_tokens": limit, "max_completion_tokens": limit,
                "n": f"[1, {min(MAX_N, self.settings.max_batch)}]"}

    def card(self) -> dict:
        """The model's /v1/models entry. max_model_len (vLLM's name): the context in tokens, so a client
        (the chat page) can trim history; labels: a classifier's, in the order of its `probs`."""
        from clusterlm.serve.classify import model_card

        ctx = self.state.get("context")
        loaded = self.state.get("loaded")
        # OpenAI's `created`: when the model was made, here its checkpoint folder's time (the same on every
        # replica serving it); 0 while it loads
        created = int(os.stat(loaded.path).st_mtime) if loaded is not None and os.path.exists(loaded.path) else 0
        return {"id": self.name, "object": "model", "created": created, "owned_by": "clusterlm",
                **({"max_model_len": ctx} if ctx is not None else {}), **model_card(self.state),
                "max_batch": self.settings.max_batch, **({"memory": self.memory} if self.memory else {}),
                **({} if self.ready.is_set() else {"status": "loading"})}
