"""Does a checkpoint fit what a command asks of it? Checked from config.toml, tokenizer.json and
tensor shapes before `load_state_dict` would fail with a 20-line size-mismatch traceback.

    check_resume(ckpt_path, run_model_cfg, data_dir, tokenizer_file)   # train --train.resume=...

(`check_state_shapes`, for every load of weights into a model, lives in model_io.py.)
Each raises CheckpointError with one line: the checkpoint, the two values (or shapes) and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clusterlm.errors import CheckpointError
from clusterlm.models.config import TRANSFORMER_ARCHS, ModelConfig

# ModelConfig values that fix the parameter shapes or the meaning of the weights; dropout, init_std
# and (with rotary positions) max_seq_len may change between a run and its resume
PRIMARY = ("arch", "vocab_size", "vocab_multiple", "n_layers", "dim", "n_heads", "pos", "norm", "mlp", "bias",
           "tie_embeddings")
DERIVED = {"kv_heads": "n_kv_heads", "head_dim": "head_size", "hidden_dim": "ffn_dim"}  # property -> config key


def model_differences(saved: ModelConfig, wanted: ModelConfig) -> list[tuple[str, Any, Any]]:
    """(config key, checkpoint's value, requested value) for the shape-relevant fields that differ.
    Derived sizes (kv heads, head dim, MLP hidden size) are reported only when no primary field
    explains them (a new dim changes the head dim too: only dim is named)."""
    primary = PRIMARY + (("max_seq_len",) if "learned" in (saved.pos, wanted.pos) else ())
    out = [(f"model.{f}", getattr(saved, f), getattr(wanted, f)) for f in primary
           if getattr(saved, f) != getattr(wanted, f)]
    if saved.arch == wanted.arch == "encdec" and saved.enc_layers != wanted.enc_layers:
        out.append(("model.n_enc_layers", saved.enc_layers, wanted.enc_layers))  # None = n_layers: compare counts
    if out or saved.arch not in TRANSFORMER_ARCHS:
        return out
    return [(f"model.{key}", getattr(saved, prop), getattr(wanted, prop)) for prop, key in DERIVED.items()
            if getattr(saved, prop) != getattr(wanted, prop)]


def _toml(v: Any) -> str:
    return json.dumps(v)  # str quoted, bool lower-case, numbers as they are: valid TOML values


def _tokenizer_summary(path: Path) -> str:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return "unreadable"
    kind = obj.get("clusterlm_tokenizer") or (obj.get("model") or {}).get("type", "?")
    size = obj.get("vocab_size") or len((obj.get("model") or {}).get("vocab") or {}) or "?"
    return f"{kind}, vocab {size}"


# FinetuneConfig values that fix which adapter tensors a LoRA fine-tune's checkpoint holds, and their shapes
LORA_SHAPE = ("lora_rank", "lora_targets", "lora_dora")


def check_resume(ckpt_path: Path, wanted: ModelConfig, data_dir: Path | None = None,
                 tokenizer_file: Path | None = None, finetune: Any = None) -> None:
    """Refuse to resume `ckpt_path` into a model of another shape (`finetune`, the run's
    FinetuneConfig: other LoRA adapters) or with another tokenizer."""
    from clusterlm.checkpoint.model_io import read_checkpoint_config

    ckpt_path = Path(ckpt_path)
    saved = read_checkpoint_config(ckpt_path)
    diffs = model_differences(saved.model, wanted)
    fresh = "or start fresh with another --train.out_dir"
    if finetune is not None and not diffs:
        diffs = [(f"finetune.{f}", getattr(saved.finetune, f), getattr(finetune, f)) for f in LORA_SHAPE
                 if getattr(saved.finetune, f) != getattr(finetune, f)]
    if diffs:
        vocab_note = ""
        if any(k == "model.vocab_size" for k, _, _ in diffs) and data_dir is not None:
            vocab_note = f" (the tokenizer of {data_dir}; the checkpoint was trained on {saved.data.dir})"
        said = ", ".join(f"{k}={a!r}" for k, a, _ in diffs)
        asked = ", ".join(f"{k}={b!r}" for k, _, b in diffs)
        fix = " ".join(f"--{k}={_toml(a)}" for k, a, _ in diffs if a is not None and k != "model.vocab_size")
        how = (f"resume with the checkpoint's settings ({fix}) " if fix else
               f"resume with the data it was trained on (--data.dir={saved.data.dir}) ")
        raise CheckpointError(f"checkpoint {ckpt_path} has {said} but the run asks for {asked}{vocab_note}; "
                              f"{how}{fresh}")
    ckpt_tok = ckpt_path / "tokenizer.json"
    if tokenizer_file is not None and ckpt_tok.is_file() and Path(tokenizer_file).is_file():
        try:
            same = json.loads(ckpt_tok.read_text(encoding="utf-8")) == \
                json.loads(Path(tokenizer_file).read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot compare tokenizers {ckpt_tok} and {tokenizer_file}: {e}") from e
        if not same:  # same vocabulary size, other tokens: the ids would silently mean other text
            raise CheckpointError(
                f"checkpoint {ckpt_path} was trained with another tokenizer ({_tokenizer_summary(ckpt_tok)}) than "
                f"the one of {data_dir or tokenizer_file} ({_tokenizer_summary(Path(tokenizer_file))}); resume with "
                f"the data it was trained on (--data.dir={saved.data.dir}) {fresh}")
