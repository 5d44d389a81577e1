"""`clusterlm eval CKPT`: loss, perplexity and bits per byte of a checkpoint on a data split.

    clusterlm eval runs/shakespeare_char --split val
    clusterlm eval runs/shakespeare_char --data data/other --max-batches 50 --out eval.json

Bits per byte divide the summed loss (in bits) by the UTF-8 bytes of the evaluated text, so
they compare models with different tokenizers. The data directory defaults to the one the model
was trained on (from the checkpoint's config.toml).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from clusterlm.errors import DataError


def evaluate_checkpoint(ckpt: str, *, data: str | None = None, split: str = "val", batch_size: int = 16,
                        seq_len: int | None = None, max_batches: int | None = None,
                        device: str = "auto") -> dict[str, Any]:
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.data.loader import iter_eval_batches
    from clusterlm.data.shards import read_meta
    from clusterlm.eval.metrics import bits_per_byte, evaluate_loss
    from clusterlm.device import autocast_dtype, resolve_device

    dev = resolve_device(device, "--device")
    loaded = load_for_inference(ckpt, device=dev)
    cfg = loaded.config
    data_dir = Path(data or cfg.data.dir)
    meta = read_meta(data_dir)
    if split not in meta["splits"] or meta["splits"][split]["tokens"] == 0:
        raise DataError(f"{data_dir} has no tokens in split {split!r}; splits: {sorted(meta['splits'])}")
    ckpt_tok = loaded.tokenizer
    if meta["tokenizer"]["vocab_size"] != ckpt_tok.vocab_size or meta["tokenizer"]["kind"] != ckpt_tok.kind:
        raise DataError(f"{data_dir} was tokenized with {meta['tokenizer']['kind']} (vocab "
                        f"{meta['tokenizer']['vocab_size']}), the checkpoint uses {ckpt_tok.kind} (vocab "
                        f"{ckpt_tok.vocab_size}); prepare the data with the checkpoint's tokenizer.json")
    if not _same_tokenizer(Path(loaded.path) / "tokenizer.json", data_dir / "tokenizer.json"):
        # same kind and size, other tokens (another corpus's char set or merges): the ids would mean
        # other text, and the loss would be reported as if they did not
        raise DataError(f"{data_dir} was tokenized with another {ckpt_tok.kind} tokenizer of the same size "
                        f"({ckpt_tok.vocab_size}) than checkpoint {loaded.path}; prepare the data with "
                        f"--tokenizer {Path(loaded.path) / 'tokenizer.json'}")
    T = seq_len or cfg.train.seq_len
    batches = iter_eval_batches(data_dir, split, batch_size, T, max_batches=max_batches)
    amp = autocast_dtype("auto", dev)
    res = evaluate_loss(loaded.model, batches, device=dev, autocast_dtype=amp)
    info = meta["splits"][split]
    bytes_per_token = info["bytes"] / info["tokens"]
    n_bytes = res["tokens"] * bytes_per_token
    return {
        "checkpoint": str(loaded.path),
        "data": str(data_dir),
        "split": split,
        "seq_len": T,
        "tokens": res["tokens"],
        "loss": res["loss"],
        "perplexity": math.exp(min(res["loss"], 50.0)),
        "bits_per_byte": bits_per_byte(res["loss"] * res["tokens"], n_bytes),
        "bytes_per_token": bytes_per_token,
    }


def _same_tokenizer(a: Path, b: Path) -> bool:
    """Both tokenizer files hold the same tokenizer (as parsed JSON); True when either is missing or
    unreadable (the kind and size check above is then all there is)."""
    try:
        return json.loads(a.read_text(encoding="utf-8")) == json.loads(b.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return True


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clusterlm eval", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="run directory, checkpoints folder or step folder")
    p.add_argument("--data", help="prepared data directory (default: the one in the checkpoint's config)")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, help="context length (default: the training seq_len)")
    p.add_argument("--max-batches", type=int, help="evaluate at most this many batches (default: the whole split)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", help="also write the JSON result to this file")
    args = p.parse_args(argv)
    result = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split, batch_size=args.batch_size,
                                 seq_len=args.seq_len, max_batches=args.max_batches, device=args.device)
    text = json.dumps(result, indent=2)
    if args.out:
        from clusterlm.fsutil import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    sys.stdout.write(text + "\n")
    return 0
