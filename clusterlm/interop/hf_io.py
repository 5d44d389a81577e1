"""Hugging Face model folders on disk <-> clusterlm checkpoints.

    from clusterlm.interop.hf_io import convert_from_hf, export_to_hf
    convert_from_hf("./gpt2", "runs/gpt2")          # -> runs/gpt2/checkpoints/step-00000000
    export_to_hf("runs/gpt2", "./gpt2-export")     # loads with transformers' from_pretrained

A folder holds config.json, the weights (model.safetensors, a sharded index, or a pickled
pytorch_model.bin) and tokenizer.json. Only safetensors and JSON are read by default: a
pytorch_model.bin is a pickle and is loaded only with trust_pickle (--trust-pickle), and then with
torch.load(weights_only=True). The name and layout translation itself is models/convert.py.

The families: decoder-only GPT-2 and Llama, the masked-LM encoder as RobertaPreLayerNormForMaskedLM
and the encoder-decoder as MBartForConditionalGeneration (models/convert.py, convert_encdec.py).

Chat templates travel both ways: `convert` keeps a folder's template (chat_template.jinja, else the
`chat_template` of tokenizer_config.json) as the checkpoint's chat_template.jinja; `export` writes the
checkpoint's template into tokenizer_config.json and chat_template.jinja (tokenizer/hf_export.py) and
its end-of-turn id into generation_config.json's eos_token_id, so transformers' `generate` stops
where clusterlm does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from clusterlm.errors import CheckpointError, ConfigError
from clusterlm.models.config import ModelConfig
from clusterlm.models.convert import config_to_hf, family, hf_to_config, hf_to_state, state_to_hf
from clusterlm.models.convert_encdec import check_position_rows

log = logging.getLogger(__name__)


def read_hf_weights(folder: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face model folder: model.safetensors, a sharded index, or (only
    with trust_pickle) pytorch_model.bin."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return _load_safetensors(single)
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no 'weight_map' object")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            if not isinstance(shard, str) or not (folder / shard).is_file():
                raise FileNotFoundError(f"{index} names shard {shard}, which is missing from {folder}")
            state.update(_load_safetensors(folder / shard))
        return state
    pickled = folder / "pytorch_model.bin"
    if pickled.is_file():
        if not trust_pickle:
            raise CheckpointError(f"{folder} has only pytorch_model.bin, a pickle that can run code when loaded; "
                                  "convert it to safetensors, or pass --trust-pickle if you trust its source")
        return _load_pickled_weights(pickled)
    raise FileNotFoundError(f"{folder} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a JSON {type(obj).__name__}, not an object")
    return obj


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def _load_pickled_weights(path: Path) -> dict[str, torch.Tensor]:
    """torch.load(weights_only=True) of a state dict; anything else (a truncated file, a pickle of
    another object, one that needs code to load) is refused naming the file."""
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        if not path.is_file() or not os.access(path, os.R_OK):
            raise  # the file itself cannot be read: the OS's words (exit 74)
        # a truncated zip archive reads as EINVAL from torch's reader: the file is bad, not the disk
        raise CheckpointError(f"{path} is not a PyTorch state dict that loads with weights_only=True: "
                              f"{e.strerror or e} (a truncated or damaged file?)") from e
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a PyTorch state dict that loads with weights_only=True: "
                              f"{first[:200]}") from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # a training checkpoint that wraps its weights
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of weights")
    bad = [k for k, v in obj.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise CheckpointError(f"{path} is not a state dict of weights: entry {bad[0]!r} is a "
                              f"{type(obj[bad[0]]).__name__}, not a tensor ({len(bad)} such entries)")
    return obj


def _check_shapes(state: dict[str, torch.Tensor], cfg: ModelConfig, where: str) -> None:
    """The converted tensors must have the shapes of the model config.json describes (built on the
    meta device: no memory), else the checkpoint would be written and fail at every load."""
    from clusterlm.models.build import build_model

    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
    for k, v in state.items():
        if k in want and tuple(v.shape) != want[k]:
            raise CheckpointError(f"{where}: weight for {k} has shape {list(v.shape)} but config.json describes "
                                  f"{list(want[k])}; the weights and config.json are from different models")


def find_tokenizer(folder: Path) -> Path | None:
    """The tokenizer file `convert` reads: clusterlm_tokenizer.json first (what `export` writes next to
    tokenizer.json for a byte or char tokenizer: the exact clusterlm kind), else tokenizer.json. One of
    those names that exists but is not a file (a folder) is refused: falling back to tokenizer.json
    would read a byte or char tokenizer as BPE, silently."""
    for name in ("clusterlm_tokenizer.json", "tokenizer.json"):
        path = folder / name
        if path.is_file():
            return path
        if path.exists():
            fix = ("put the file `clusterlm export` writes there, or remove it to read tokenizer.json"
                   if name != "tokenizer.json" else "put the file tokenizer.save_pretrained writes there")
            raise IsADirectoryError(f"{path} is {'a folder' if path.is_dir() else 'not a regular file'}, not the "
                                    f"tokenizer file `convert` reads: {fix}")
    return None


def read_hf_template(folder: Path) -> str | None:
    """The chat template source of a Hugging Face folder: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or a list of {"name", "template"} of which "default" is taken), without
    the prefix a clusterlm export adds; None when it has none. ConfigError when it does not compile."""
    from clusterlm.generate.template import TEMPLATE_FILE, ChatTemplate
    from clusterlm.tokenizer.hf_export import template_from_hf

    source, where = None, folder / TEMPLATE_FILE
    if where.is_file():
        source = where.read_text(encoding="utf-8")
    elif (folder / "tokenizer_config.json").is_file():
        where = folder / "tokenizer_config.json"
        value = _read_json(where).get("chat_template")
        if isinstance(value, list):  # named templates (transformers' multi-template form)
            value = next((t.get("template") for t in value if isinstance(t, dict) and t.get("name") == "default"), None)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}: chat_template is a {type(value).__name__}, not a Jinja2 string")
        source = value
    if source is None:
        return None
    source = template_from_hf(source)
    ChatTemplate(source, name=str(where))  # compiles, or ConfigError naming the file
    return source


def convert_from_hf(src: str | Path, out: str | Path, *, trust_pickle: bool = False) -> Path:
    """Write a clusterlm checkpoint (out/checkpoints/step-00000000) from a Hugging Face folder."""
    from clusterlm.checkpoint.store import check_new_run_dir, save_checkpoint
    from clusterlm.config import RunConfig, TrainConfig, to_toml

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"--from-hf {src} is not a directory (a Hugging Face model folder)")
    cfg_file, tok_file = src / "config.json", find_tokenizer(src)
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} is missing; a Hugging Face model folder has config.json")
    if tok_file is None:
        raise FileNotFoundError(f"{src / 'tokenizer.json'} is missing; clusterlm carries the tokenizer as "
                                "tokenizer.json (save it with tokenizer.save_pretrained)")
    check_new_run_dir(out)
    from clusterlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tok_file)  # unreadable tokenizer: refused now, not at the first `generate`
    template = read_hf_template(src)
    hf_cfg = _read_json(cfg_file)
    try:
        cfg = hf_to_config(hf_cfg)
    except KeyError as e:
        raise ConfigError(f"{cfg_file} lacks {e.args[0]!r}, which a {hf_cfg.get('model_type')} config has") from e
    except (TypeError, ValueError, ZeroDivisionError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{cfg_file}: {e}") from e
    if tokenizer.vocab_size > cfg.padded_vocab_size:  # its ids would index past the embedding: every load refuses
        raise ConfigError(f"{tok_file} has {tokenizer.vocab_size} tokens but {cfg_file} has vocab_size="
                          f"{cfg.vocab_size}: the tokenizer's ids would index past the embedding; use the model's "
                          "own tokenizer (or resize its embeddings with transformers' resize_token_embeddings)")
    if tokenizer.vocab_size < cfg.vocab_size:
        # the rows past the tokenizer's ids become padding rows (kept: same logits, same export), which
        # clusterlm never samples; as vocabulary they were sampled and then failed to decode
        cfg = dataclasses.replace(cfg, vocab_size=tokenizer.vocab_size, vocab_multiple=cfg.padded_vocab_size)
    weights = read_hf_weights(src, trust_pickle)
    check_position_rows(weights, hf_cfg, str(src))
    state = hf_to_state(weights, cfg, hf_cfg["model_type"], where=str(src))
    _check_shapes(state, cfg, str(src))
    run = RunConfig(model=cfg, train=TrainConfig(out_dir=str(out), seq_len=min(256, cfg.max_seq_len)))
    path = save_checkpoint(out / "checkpoints", 0, model_state=state, optimizer_state=None,
                           train_state={"step": 0, "converted_from": str(src)}, config_toml=to_toml(run),
                           tokenizer_path=tok_file, chat_template=template)
    log.info("converted %s (%s, %s parameters) -> %s", src, hf_cfg["model_type"], f"{cfg.num_params():,}", path)
    return path


def export_to_hf(ckpt: str | Path, out: str | Path) -> Path:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer files
    (tokenizer.json, tokenizer_config.json, special_tokens_map.json; clusterlm_tokenizer.json too for
    byte and char, and BPE with added tokens) for `ckpt`; transformers' AutoTokenizer loads them with clusterlm's ids
    (tokenizer/hf_export.py)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    from clusterlm.checkpoint.files import named_os_error
    from clusterlm.checkpoint.model_io import plain_weights, read_checkpoint_config, read_quantization
    from clusterlm.checkpoint.store import check_outside_checkpoints, resolve_checkpoint
    from clusterlm.fsutil import plain_mode, staging_dir

    path = resolve_checkpoint(str(ckpt))
    run = read_checkpoint_config(path)
    if read_quantization(path) is not None:
        raise ConfigError(f"{path} is quantized; export the unquantized checkpoint it came from")
    cfg = run.model
    family(cfg)  # ConfigError naming what the target class cannot express, before anything is read or written
    if cfg.labels:
        raise ConfigError(f"{path} is a classifier (labels {', '.join(cfg.labels)}); export writes language "
                          "models for transformers (a classifier's pooled head has no transformers class); serve "
                          "it with `clusterlm serve` (POST /classify) instead")
    out = Path(out)
    if str(out) in ("", "."):
        raise FileExistsError("--out is empty; give a new folder for the Hugging Face files")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder; give a folder to create (or an empty folder) "
                              "for the Hugging Face files")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} is a folder that is not empty; give a folder to create (or an empty "
                              "folder) for the Hugging Face files")
    check_outside_checkpoints(out)
    bos = eos = pad = None
    stop_ids: list[int] = []
    tok_files: dict[str, str] = {}
    tok_src = path / "tokenizer.json"
    if tok_src.is_file():
        from clusterlm.generate.template import read_template
        from clusterlm.generate.text import chat_format
        from clusterlm.tokenizer import load_tokenizer
        from clusterlm.tokenizer.hf_export import hf_tokenizer_files

        tok = load_tokenizer(tok_src)
        bos, eos, pad = tok.bos_id, tok.eos_id, tok.pad_id
        template = read_template(path)
        if template is not None:  # its tokens must be the tokenizer's; its end of turn stops generate
            stop_ids = list(chat_format(tok, template).stop_ids)
        tok_files = hf_tokenizer_files(tok, cfg.max_seq_len, template)  # before anything is written
        own = tok_src.read_text(encoding="utf-8")
        if tok.kind in ("byte", "char") or json.loads(tok_files["tokenizer.json"]) != json.loads(own):
            # our own file too: `convert` reads it back as the same kind (tokenizer.json would load as bpe)
            # and the same file (a BPE tokenizer with added tokens is exported with a decoder that drops
            # them, which would make the converted checkpoint's tokenizer differ from its data's)
            tok_files["clusterlm_tokenizer.json"] = own
    hf_cfg = config_to_hf(cfg, bos, eos, pad)
    hf_state = state_to_hf(plain_weights(path), cfg, pad)  # a LoRA fine-tune's adapters merged
    files = {"config.json": json.dumps(hf_cfg, indent=2) + "\n"}
    if cfg.arch != "encoder":  # a masked-LM encoder does not generate
        gen = {"bos_token_id": bos, "eos_token_id": [eos, *stop_ids] if stop_ids else eos, "pad_token_id": pad,
               "max_length": cfg.max_seq_len}
        if cfg.arch == "encdec":  # the decoder starts from BOS, as clusterlm's; no forced end token
            gen.update(decoder_start_token_id=bos, forced_eos_token_id=None)
        if cfg.padded_vocab_size > cfg.vocab_size:  # clusterlm never samples the padding rows; neither may generate()
            gen["suppress_tokens"] = list(range(cfg.vocab_size, cfg.padded_vocab_size))
        files["generation_config.json"] = json.dumps(gen, indent=2) + "\n"
    files.update(tok_files)
    # the folder appears whole or not at all (a full disk leaves nothing to mistake for an export);
    # an empty --out (made by the user, or left by an earlier failure) is replaced
    with staging_dir(out, overwrite=out.exists()) as tmp:
        try:
            save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            plain_mode(tmp / "model.safetensors")  # safetensors creates it 0600
        except SafetensorError as e:  # its I/O errors (a full disk) as the OSError they are: exit 74, one line
            if (named := named_os_error(e, out / "model.safetensors")) is not None:
                raise named from None
            raise
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    log.info("exported %s as a Hugging Face %s folder: %s", path, hf_cfg["model_type"], out)
    return out
