"""`clusterlm quantize`: a weight-only int8 or int4 copy of a float checkpoint.

    clusterlm quantize runs/shakespeare_char --method int8 --out runs/shakespeare_int8
    clusterlm quantize runs/shakespeare_char --method int4 --group-size 128 --out runs/shakespeare_int4

The layers and their format are in clusterlm.optimize.qlinear (re-exported here). The new step folder
holds the quantized buffers in model.safetensors and quantization.json ({"method", "group_size",
"modules", "source"}), which clusterlm.checkpoint.model_io reads to rebuild the quantized modules
before loading (docs/compression.md).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from clusterlm.optimize.qlinear import (  # noqa: F401  (re-exported: the public names of `quantize`)
    GROUP_SIZES,
    METHODS,
    Int4Linear,
    Int8Linear,
    quantizable,
    quantize_model,
    quantized_state,
)

log = logging.getLogger(__name__)


def _modules_to_quantize(loaded: object, method: str, group_size: int, keep_output: bool) -> list[str]:
    """The Linear modules `quantize` replaces; refused when there are none (a "quantized" checkpoint
    that is the float model), a warning when the output projection is the only one (an LSTM/GRU:
    its recurrent weights are not Linears and stay float32; a tied output becomes an untied copy, so
    the file grows)."""
    if method not in METHODS:
        raise ValueError(f"quantization method {method!r}; expected one of {', '.join(METHODS)}")
    if method == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size={group_size}; the kernels support {', '.join(map(str, GROUP_SIZES))}")
    names = quantizable(loaded.model, method, group_size, keep_output)
    arch = loaded.config.model.arch
    if not names:
        hint = (" (an LSTM/GRU's recurrent weights stay float32; its only Linear is the output projection, which "
                "--keep-output keeps)" if arch in ("lstm", "gru") and keep_output else "")
        if not keep_output and method == "int4":  # every Linear's input width is off the group size
            hint = (f" (int4 needs a Linear's input width to be a multiple of --group-size {group_size}, and none "
                    "is" + ("; an LSTM/GRU's recurrent weights stay float32" if arch in ("lstm", "gru") else "")
                    + f": try a smaller --group-size, or --method int8)")
        raise ValueError(f"{loaded.path} (arch {arch!r}) has no Linear module that {method} can quantize"
                         f"{' with --keep-output' if keep_output else ''}{hint}; nothing written")
    if names == ["output"]:
        log.warning("only the output projection of %s (arch %r) is quantized: %s; a tied output becomes its own "
                    "quantized copy beside the float embedding, so the checkpoint can be larger than the float one",
                    loaded.path, arch, "the LSTM/GRU recurrent weights stay float32" if arch in ("lstm", "gru")
                    else "no other Linear qualifies")
    return names


def quantize_checkpoint(src: str | Path, out: str | Path, method: str, group_size: int = 128,
                        keep_output: bool = False) -> Path:
    """Write a quantized copy of checkpoint `src` as out/checkpoints/step-N; returns the step folder."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.checkpoint.store import check_new_run_dir, save_checkpoint

    out = Path(out)
    check_new_run_dir(out)
    loaded = load_for_inference(src)  # the one read of the source checkpoint
    if loaded.quantization is not None:
        raise ValueError(f"{loaded.path} is already quantized; quantize the float checkpoint")
    if loaded.ensemble is not None:
        raise ValueError(f"{loaded.path} is an ensemble of {loaded.ensemble['members']} classifiers (clusterlm "
                         "ensemble); quantization writes one model's weights: serve the float ensemble")
    names = _modules_to_quantize(loaded, method, group_size, keep_output)
    info = loaded.info
    pruned = (info.train_state or {}).get("pruning") or {}
    if method == "int4" and pruned.get("method") == "magnitude":
        log.warning("%s was magnitude-pruned (sparsity %s): int4's asymmetric zero point turns its zeros into small "
                    "non-zero values, so the quantized model is no longer sparse and its pruning record no longer "
                    "holds; int8 (symmetric) keeps the zeros", loaded.path, pruned.get("sparsity"))
    quantize_model(loaded.model, method, group_size=group_size, modules=names)
    quantization = {"method": method, "group_size": group_size, "modules": names, "source": str(loaded.path)}
    path = save_checkpoint(out / "checkpoints", info.step, model_state=quantized_state(loaded.model),
                           optimizer_state=None, train_state=info.train_state, config_toml=info.config_toml,
                           tokenizer_path=info.tokenizer_path, quantization=quantization)
    log.info("quantized %d Linear modules of %s to %s -> %s", len(names), loaded.path, method, path)
    return path


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="clusterlm quantize",
                                 description="weight-only int8 (per channel) or int4 (group-wise) quantization")
    ap.add_argument("ckpt", metavar="CKPT", help="run directory, checkpoints folder or step folder")
    ap.add_argument("--method", choices=METHODS, required=True)
    ap.add_argument("--group-size", type=int, default=None,
                    help=f"int4 group size ({', '.join(map(str, GROUP_SIZES))}; default 128)")
    ap.add_argument("--keep-output", action="store_true", help="keep the output projection in float32")
    ap.add_argument("--out", required=True, metavar="CKPT", help="run directory to create")
    args = ap.parse_args(argv)
    if args.group_size is not None and args.method != "int4":
        ap.error(f"--group-size is for --method int4 (groups of input channels); {args.method} scales each output "
                 "channel: leave it out")
    path = quantize_checkpoint(args.ckpt, args.out, args.method, 128 if args.group_size is None else args.group_size,
                               args.keep_output)
    print(f"wrote {path}")
    return 0
