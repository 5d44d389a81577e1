"""Load a trained model (and its tokenizer and config) from a checkpoint for inference.

    model, tokenizer, cfg = load_for_inference("runs/shakespeare_char", device="cpu")

Accepts a run directory (newest verified checkpoint), a checkpoints folder or one step folder.
Only safetensors and JSON/TOML are read: nothing is unpickled.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from clusterlm.errors import CheckpointError

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


def load_for_inference(arg: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    from clusterlm.checkpoint.store import load_model_weights, resolve_checkpoint
    from clusterlm.config import resolve
    from clusterlm.models.build import build_model
    from clusterlm.tokenizer import load_tokenizer

    path = resolve_checkpoint(str(arg))
    cfg_file = path / "config.toml"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no config.toml; it was not written by `clusterlm train`")
    cfg = resolve(tomllib.loads(cfg_file.read_text(encoding="utf-8")))
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise CheckpointError(f"{path} has no tokenizer.json")
    tokenizer = load_tokenizer(tok_file)
    with torch.device("meta"):
        model = build_model(cfg.model)
    model.to_empty(device=device)
    model.init_weights(0)  # fills non-persistent buffers (rotary tables); weights are overwritten below
    state = load_model_weights(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied_names(model)]
    if missing or unexpected:
        raise CheckpointError(f"{path}/model.safetensors does not match model config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    model.eval()
    log.info("loaded %s (%s parameters) on %s", path, f"{cfg.model.num_params():,}", device)
    return LoadedModel(model=model, tokenizer=tokenizer, config=cfg, path=path)


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
