"""Load a trained model (and its tokenizer and config) from a checkpoint for inference.

    model, tokenizer, cfg = load_for_inference("runs/shakespeare_char", device="cpu")

Accepts a run directory (newest verified checkpoint), a checkpoints folder or one step folder.
Only safetensors and JSON/TOML are read: nothing is unpickled.

A checkpoint written by `clusterlm quantize` has a quantization.json (method, group size, module
names; older ones: a "quantization" entry in train_state.json); its Linear layers are rebuilt as the
quantized modules of clusterlm.optimize.qlinear before the packed weights are loaded
(docs/compression.md). A checkpoint written by `clusterlm ensemble` has an ensemble.json: its
weights are N classifiers of config.toml's shape, loaded as one ClassifierEnsemble
(clusterlm.models.ensemble). `LoadedModel.chat_template` is the checkpoint's chat_template.jinja (None
without one; clusterlm.generate.template), also attached to the tokenizer as `tokenizer.chat_template`
(where transformers keeps it) so that code handed only the model and tokenizer, such as the task
harness (eval/harness.py), prompts a chat model as it was trained. `LoadedModel.info` carries the
folder's step, train_state and config text, so a command that writes a derived checkpoint (quantize,
prune) reads the source once.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clusterlm.checkpoint.store import CheckpointInfo, read_quantization
from clusterlm.errors import CheckpointError
from clusterlm.generate.template import ChatTemplate, read_template

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object  # clusterlm.tokenizer.Tokenizer
    config: object  # clusterlm.config.RunConfig
    path: Path
    info: CheckpointInfo | None = None  # step, train_state, config text, tokenizer path of `path`
    quantization: dict | None = None  # what read_quantization(path) returned
    chat_template: ChatTemplate | None = None  # the checkpoint's chat_template.jinja, if it has one
    ensemble: dict | None = None  # what read_ensemble(path) returned: N classifiers answering as one


def load_for_inference(arg: str | Path, device: str | torch.device = "cpu", *,
                       grow_vocab: int | None = None) -> LoadedModel:
    """The checkpoint `arg` (a run, checkpoints or step folder) built for inference on `device`, a
    LoRA fine-tune's adapters merged. `grow_vocab`: build it with that many tokens, the rows beyond
    its own vocabulary the mean of its rows, as a fine-tune grows its base (finetune/setup.py): the
    base of a LoRA fine-tune that added chat tokens, for its adapters (serve/models.py)."""
    from clusterlm.checkpoint.store import load_model_weights, read_ensemble, read_info, resolve_checkpoint
    from clusterlm.models.build import build_model
    from clusterlm.tokenizer import load_tokenizer

    path = resolve_checkpoint(str(arg))
    cfg = read_checkpoint_config(path)
    v0 = cfg.model.vocab_size
    if grow_vocab is not None and grow_vocab != v0:
        if grow_vocab < v0 or cfg.model.labels:
            raise CheckpointError(f"{path}: cannot grow a {v0}-token {'classifier' if cfg.model.labels else 'model'} "
                                  f"to {grow_vocab} tokens")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=grow_vocab))
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise CheckpointError(f"{path} has no tokenizer.json")
    tokenizer = load_tokenizer(tok_file)
    chat_template = read_template(path)  # before the weights: a broken template is refused at once
    tokenizer.chat_template = chat_template
    if tokenizer.vocab_size > cfg.model.padded_vocab_size:  # its ids would index past the embedding
        raise CheckpointError(f"{tok_file} has {tokenizer.vocab_size} tokens but the model in {path}/config.toml has "
                              f"vocab_size={cfg.model.vocab_size}; the checkpoint's files disagree (was one replaced?)")
    ensemble = read_ensemble(path)
    if ensemble is not None and not cfg.model.labels:
        raise CheckpointError(f"{path}/ensemble.json names {ensemble['members']} members, but config.toml is not a "
                              "classifier's (no model.labels); only classifiers are combined")
    with torch.device("meta"):
        members = [build_model(cfg.model) for _ in range(ensemble["members"] if ensemble else 1)]
    for m in members:
        m.to_empty(device=device)
        m.init_weights(0)  # fills non-persistent buffers (rotary tables); weights are overwritten below
    if ensemble is not None:
        from clusterlm.models.ensemble import ClassifierEnsemble

        model = ClassifierEnsemble(members)
    else:
        model = members[0]
    quant = read_quantization(path)
    if quant is not None:
        from clusterlm.optimize.qlinear import quantize_model

        quantize_model(model, quant["method"], group_size=quant["group_size"], modules=quant["modules"],
                       empty=True)
    state = load_model_weights(path)
    if cfg.model.vocab_size != v0:
        grow_vocab_rows(state, v0, cfg.model)
    lora = sorted({k[:-len(".lora_a")] for k in state if k.endswith(".lora_a")})
    if lora:  # a LoRA fine-tuning checkpoint (base + adapters): merged into the weights for inference
        from clusterlm.finetune.lora import apply_lora

        apply_lora(model, lora, rank=int(state[lora[0] + ".lora_a"].shape[0]), alpha=cfg.finetune.lora_alpha,
                   dora=any(k.endswith(".lora_magnitude") for k in state))
    check_state_shapes(state, model, path / "model.safetensors")  # one line, not load_state_dict's 20
    missing, unexpected = model.load_state_dict(state, strict=False)
    if lora:
        from clusterlm.finetune.lora import merge_lora

        merge_lora(model)
    missing = [k for k in missing if k not in _tied_names(model)]
    if missing or unexpected:
        raise CheckpointError(f"{path}/model.safetensors does not match model config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.eval()
    log.info("loaded %s (%s parameters%s) on %s", path, f"{cfg.model.num_params() * len(members):,}",
             f": {len(members)} classifiers averaged" if ensemble else "", device)
    return LoadedModel(model=model, tokenizer=tokenizer, config=cfg, path=path, info=read_info(path),
                       quantization=quant, chat_template=chat_template, ensemble=ensemble)


def plain_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights of step folder `path` as a model without adapters holds them: a LoRA
    fine-tune's adapters (and DoRA magnitudes) folded into their weights as load_for_inference does,
    the adapter tensors gone; any other checkpoint's weights as saved. For what reads a checkpoint's
    weights without building it for inference: HF export, and a fine-tune's base."""
    from clusterlm.checkpoint.store import load_model_weights

    state = load_model_weights(path)
    if not any(k.endswith(".lora_a") for k in state):
        return state
    merged = load_for_inference(path).model.state_dict()
    return {k: merged[k] for k in state if k in merged}


VOCAB_KEYS = ("tok_embeddings.weight", "output.weight", "output.bias")  # tensors with one row per token


def grow_vocab_rows(state: dict[str, torch.Tensor], v0: int, mcfg: Any) -> None:
    """Grow, in `state`, the tensors with a row per token (VOCAB_KEYS) from a `v0`-token vocabulary
    to `mcfg`'s padded size; the new rows (from v0 on) are the mean of the first v0. A fine-tune grows
    its base so (finetune/setup.py), and a LoRA fine-tune's base is rebuilt so wherever its adapters
    are loaded (load_for_inference's grow_vocab)."""
    v1, p1 = mcfg.vocab_size, mcfg.padded_vocab_size
    for key in VOCAB_KEYS:
        t = state.get(key)
        if t is None or (v1 == v0 and t.shape[0] == p1):
            continue
        grown = t.new_empty((p1,) + tuple(t.shape[1:]))
        keep = min(t.shape[0], p1)
        grown[:keep] = t[:keep]
        grown[v0:] = t[:v0].float().mean(0).to(t.dtype)
        state[key] = grown
    if v1 > v0:
        log.info("vocabulary %d -> %d tokens: %d new rows initialised to the mean of the base's rows", v0, v1, v1 - v0)


def read_checkpoint_config(path: Path) -> object:
    """The RunConfig saved in step folder `path` (config.toml)."""
    from clusterlm.config import resolve
    from clusterlm.errors import ConfigError

    cfg_file = Path(path) / "config.toml"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.toml; it was not written by clusterlm")
    try:
        return resolve(tomllib.loads(cfg_file.read_text(encoding="utf-8")))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, ConfigError) as e:
        raise CheckpointError(f"{cfg_file} is not a usable run config: {e}") from e


def check_state_shapes(state: Mapping[str, Any], model: Any, where: str | Path) -> None:
    """Every tensor of `state` that `model` also has must have the model's shape (names are checked
    by load_state_dict itself). `model` is an nn.Module, possibly on the meta device."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = [(k, tuple(v.shape), want[k]) for k, v in state.items() if k in want and tuple(v.shape) != want[k]]
    if bad:
        k, got, exp = bad[0]
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise CheckpointError(f"{where}: tensor {k} has shape {list(got)} but the model built from its config.toml "
                              f"needs {list(exp)}{more}; the checkpoint's files disagree (was one replaced?)")


def _tied_names(model: torch.nn.Module) -> set[str]:
    """Parameter names that alias another parameter (e.g. output.weight tied to tok_embeddings)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        else:
            seen[id(p)] = name
    return tied
