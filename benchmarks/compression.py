"""What compression costs: size on disk, validation loss/perplexity and batch-1 decode tokens/s for
fp32, int8, int4 and 50%-pruned (magnitude, structured, each also after a short recovery
fine-tune) versions of a fully trained Shakespeare char model and of the gpt2-124m architecture
(random weights: size and speed only).

    .venv/bin/python benchmarks/compression.py                      # trains the model first (2000 steps)
    .venv/bin/python benchmarks/compression.py --ckpt runs/shakespeare_char --data data/shakespeare_char
    # -> benchmarks/results/compression.json and compression.md

Without --ckpt the script trains recipes/shakespeare_char_cpu.toml for its 2000 steps into
--train-dir (about 2-3 minutes on a quiet 2-core machine; `clusterlm train` in a subprocess, the
command is recorded in the JSON; --train-threads, default 1) and reuses a finished run found
there on the next call.

Every variant is made with the same library calls as `clusterlm quantize` / `clusterlm prune` and
reloaded with load_for_inference. Val loss: mean over --eval-batches batches of the val split
(B=12, T=the model's context). Decode tokens/s: greedy, batch 1, 1 / median of the per-token
intervals pooled over --repeats runs after a warm-up (prefill and first token left out), the
variants of a model interleaved so they share the machine's load; the best interval is kept too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from clusterlm.checkpoint.model_io import load_for_inference
from clusterlm.checkpoint.store import load_checkpoint, resolve_checkpoint, save_checkpoint
from clusterlm.config import RunConfig, to_toml
from clusterlm.data.loader import iter_eval_batches
from clusterlm.eval.metrics import evaluate_loss
from clusterlm.generate.engine import generate
from clusterlm.models.build import build_model
from clusterlm.models.config import get_preset
from clusterlm.optimize.prune import prune_checkpoint
from clusterlm.optimize.quantize import quantize_checkpoint
from clusterlm.tokenizer.kinds import make_tokenizer
from common import check_checkpoint, cpu_model, gpu_name, positive_int, refuse, write_result  # benchmarks/common.py

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
RECIPE = "recipes/shakespeare_char_cpu.toml"


def check_data(data: Path, ckpt: Path) -> None:
    """Exit with one line unless `data` is prepared data tokenized with `ckpt`'s tokenizer (checked
    before any variant is made: data of another tokenizer gave val losses of the wrong text)."""
    from clusterlm.data.shards import check_data_tokenizer, read_meta
    from clusterlm.errors import ClusterlmError
    from clusterlm.tokenizer import load_tokenizer

    try:
        check_data_tokenizer(data, read_meta(data), ckpt, load_tokenizer(ckpt / "tokenizer.json"))
    except (ClusterlmError, OSError) as e:
        refuse(f"--data {data}: {e}")


def train_shakespeare(out_dir: Path, threads: int) -> tuple[Path, list[str]]:
    """Train the recipe for its full 2000 steps into out_dir (reused when already finished there)."""
    cmd = [sys.executable, "-m", "clusterlm", "train", RECIPE, f"--train.out_dir={json.dumps(str(out_dir))}",
           f"--train.threads={threads}"]
    try:
        step = resolve_checkpoint(str(out_dir))
        if load_checkpoint(step).step >= 2000:
            print(f"reusing the trained run {step}", flush=True)
            return step, cmd
    except (FileNotFoundError, ValueError):
        pass
    print("training:", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return resolve_checkpoint(str(out_dir)), cmd


def decode_intervals(model: torch.nn.Module, n: int) -> list[float]:
    """Per-token intervals of one greedy batch-1 generation of n tokens; the first (prefill) left out."""
    stamps = []
    for _ in generate(model, [[1, 2, 3, 4, 5, 6, 7, 8]], max_new_tokens=n, temperature=0.0):
        stamps.append(time.perf_counter())
    return [b - a for a, b in zip(stamps, stamps[1:])]


def measure(variants: list[tuple[str, Path]], data: Path | None, eval_batches: int, new_tokens: int,
            repeats: int) -> list[dict]:
    rows, models = [], []
    for name, ckpt in variants:
        loaded = load_for_inference(ckpt)
        size = (loaded.path / "model.safetensors").stat().st_size
        row: dict = {"variant": name, "model_bytes": size, "params": loaded.config.model.num_params()}
        if data is not None:
            T = loaded.config.model.max_seq_len
            with torch.inference_mode():
                r = evaluate_loss(loaded.model, iter_eval_batches(data, "val", 12, T, max_batches=eval_batches),
                                  device="cpu")
            row.update(val_loss=round(r["loss"], 4), perplexity=round(math.exp(r["loss"]), 3))
        rows.append(row)
        models.append((loaded.model, min(new_tokens, loaded.config.model.max_seq_len - 9)))
    intervals: list[list[float]] = [[] for _ in models]
    for r in range(repeats + 1):  # run 0 warms up; interleaved so every variant sees the same load
        for i, (model, n) in enumerate(models):
            got = decode_intervals(model, n)
            if r:
                intervals[i] += got
    for row, xs in zip(rows, intervals):
        xs = sorted(xs)
        row["decode_tokens_per_s"] = round(1.0 / xs[len(xs) // 2], 1)
        row["decode_tokens_per_s_best"] = round(1.0 / xs[0], 1)
        print(json.dumps(row), flush=True)
    return rows


def variants(src: Path, work: Path, finetune_steps: int, data: Path | None) -> list[tuple[str, Path]]:
    out = [("fp32", src)]
    out.append(("int8", quantize_checkpoint(src, work / "int8", "int8")))
    out.append(("int4 (group 128)", quantize_checkpoint(src, work / "int4", "int4", 128)))
    for method in ("magnitude", "structured"):
        out.append((f"{method} 50%", prune_checkpoint(src, work / method, 0.5, method)))
        if finetune_steps and data is not None:
            out.append((f"{method} 50% + {finetune_steps}-step fine-tune",
                        prune_checkpoint(src, work / f"{method}_ft", 0.5, method, finetune_steps=finetune_steps,
                                         data_dir=data)))
    return out


def gpt2_checkpoint(work: Path) -> Path:
    cfg = get_preset("gpt2-124m")
    model = build_model(cfg)
    model.init_weights(0)
    tok = make_tokenizer("byte")
    tok.save(work / "tok.json")
    return save_checkpoint(work / "gpt2" / "checkpoints", 0, model_state=model.state_dict(), optimizer_state=None,
                           train_state={"step": 0}, config_toml=to_toml(RunConfig(model=cfg)),
                           tokenizer_path=work / "tok.json")


def markdown(results: dict) -> str:
    lines = ["# Compression: size, accuracy, speed", "",
             f"CPU: {results.get('cpu') or 'unknown'}"
             + (f", GPU: {results['gpu']}" if results.get("gpu") else "") + ". "
             f"torch {results['torch']}, {results['threads']} threads, batch-1 greedy decode, tokens/s = 1 / median "
             f"per-token interval over {results['repeats']} interleaved runs (best interval in brackets). "
             f"Load average (1, 5, 15 min) before: {results['load_before']}, after: {results['load_after']} "
             "(a shared 2-core machine: timings are noisy).", "",
             f"Command: `{results['command']}`", ""]
    t = results["training"]
    how = f"trained with `{t['command']}`" if t["command"] else f"checkpoint {t['checkpoint']}"
    best = "n/a" if t["val_loss"] is None else t["val_loss"]
    lines += [f"Shakespeare model: {how} (step {t['step']}, best val loss in training {best}).", ""]
    for model, rows in results["models"].items():
        lines += [f"## {model}", "", "| variant | model.safetensors | params | val loss | perplexity | decode tok/s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            lines.append(f"| {r['variant']} | {r['model_bytes'] / 1e6:.2f} MB | {r['params']:,} | "
                         f"{r.get('val_loss', 'n/a')} | {r.get('perplexity', 'n/a')} | "
                         f"{r['decode_tokens_per_s']} ({r['decode_tokens_per_s_best']}) |")
        lines.append("")
    lines += ["Notes: params is the config's count (quantized variants keep the float count). Magnitude pruning "
              "is saved dense (zeros), so size and speed do not change. The gpt2-124m rows use random "
              "weights: no loss. Fine-tunes: `clusterlm prune --finetune-steps` on the run's training data "
              "(warmup to 3x the run's min_lr, cosine down to min_lr).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, default=None,
                    help="a trained Shakespeare char run (or step folder); omitted: train one into --train-dir")
    ap.add_argument("--train-dir", type=Path, default=ROOT / "runs" / "compression_shakespeare_char")
    ap.add_argument("--train-threads", type=positive_int, default=1,
                    help="torch threads for training (1: steadier than 2 on a machine shared with other jobs)")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "shakespeare_char",  # prepared by the training
                    help="the model's prepared data directory (val split; fine-tune data)")
    ap.add_argument("--eval-batches", type=positive_int, default=50)
    ap.add_argument("--new-tokens", type=positive_int, default=48)
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    check_checkpoint("--ckpt", args.ckpt)
    torch.set_num_threads(args.threads)
    results: dict = {"command": shlex.join(["python", "benchmarks/compression.py", *sys.argv[1:]]),
                     "torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
                     "load_before": [round(x, 2) for x in os.getloadavg()], "models": {},
                     "cpu": cpu_model(), "gpu": gpu_name()}
    default_data = ROOT / "data" / "shakespeare_char"
    if args.data != default_data and not (args.data / "meta.json").is_file():  # before minutes of training
        refuse(f"--data {args.data}: not a prepared data directory (no meta.json); give the model's prepared "
               f"data (clusterlm prepare ... --out DIR), or leave --data out for {default_data}")
    if args.ckpt is None:
        src, cmd = train_shakespeare(args.train_dir, args.train_threads)
    else:
        src, cmd = resolve_checkpoint(str(args.ckpt)), None
    check_data(args.data, Path(src))
    run = load_checkpoint(src).train_state.get("run", {})
    best = run.get("best_val_loss")  # None for a converted checkpoint: null in the JSON (NaN is not JSON)
    results["training"] = {"checkpoint": str(src), "command": shlex.join(["clusterlm", *cmd[3:]]) if cmd else None,
                           "step": load_checkpoint(src).step, "val_loss": None if best is None else round(best, 4)}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "sc").mkdir()
        rows = measure(variants(src, work / "sc", args.finetune_steps, args.data), args.data, args.eval_batches,
                       args.new_tokens, args.repeats)
        results["models"]["Shakespeare char (4 layers, dim 128, trained)"] = rows
        if not args.skip_gpt2:
            (work / "g").mkdir()
            rows = measure(variants(gpt2_checkpoint(work), work / "g", 0, None), None, 0, 64, args.repeats)
            results["models"]["gpt2-124m architecture (random weights)"] = rows
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_result(args.out_dir / "compression.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    write_result(args.out_dir / "compression.md", markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
