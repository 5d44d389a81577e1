"""What compression costs: size on disk, validation loss/perplexity and batch-1 decode tokens/s for
fp32, int8, int4 and 50%-pruned (magnitude, structured) versions of a trained Shakespeare char
model and of the gpt2-124m architecture (random weights: size and speed only).

    .venv/bin/python -m clusterlm train recipes/shakespeare_char_cpu.toml --train.out_dir=runs/shakespeare_char
    .venv/bin/python benchmarks/compression.py --ckpt runs/shakespeare_char --data data/shakespeare_char
    # -> benchmarks/results/compression.json and compression.md

Every variant is made with the same library calls as `clusterlm quantize` / `clusterlm prune`
and reloaded with load_for_inference. Val loss: mean over --eval-batches batches of the val split
(B=12, T=the model's context). Decode tokens/s: best of 3 runs, (N-1)/(t(N) - t(1)) as in
generate_speed.py. Structured pruning is also shown after a short recovery fine-tune
(--finetune-steps, default 200).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from clusterlm.checkpoint.model_io import load_for_inference
from clusterlm.checkpoint.store import save_checkpoint
from clusterlm.config import RunConfig, to_toml
from clusterlm.data.loader import iter_eval_batches
from clusterlm.eval.metrics import evaluate_loss
from clusterlm.generate.engine import generate
from clusterlm.models.build import build_model
from clusterlm.models.config import get_preset
from clusterlm.optimize.prune import prune_checkpoint
from clusterlm.optimize.quantize import quantize_checkpoint
from clusterlm.tokenizer.kinds import make_tokenizer

RESULTS = Path(__file__).parent / "results"


def decode_tps(model: torch.nn.Module, n: int, repeats: int = 3) -> float:
    prompt = [[1, 2, 3, 4, 5, 6, 7, 8]]

    def run(k: int) -> float:
        t0 = time.perf_counter()
        for _ in generate(model, prompt, max_new_tokens=k, temperature=0.0):
            pass
        return time.perf_counter() - t0

    run(2)
    best_n = min(run(n) for _ in range(repeats))
    best_1 = min(run(1) for _ in range(repeats))
    return (n - 1) / (best_n - best_1)


def measure(name: str, ckpt: Path, data: Path | None, eval_batches: int, new_tokens: int) -> dict:
    loaded = load_for_inference(ckpt)
    size = sum(f.stat().st_size for f in loaded.path.glob("model.safetensors"))
    row: dict = {"variant": name, "model_bytes": size, "params": loaded.config.model.num_params()}
    if data is not None:
        T = loaded.config.model.max_seq_len
        with torch.inference_mode():
            r = evaluate_loss(loaded.model, iter_eval_batches(data, "val", 12, T, max_batches=eval_batches),
                              device="cpu")
        row.update(val_loss=round(r["loss"], 4), perplexity=round(math.exp(r["loss"]), 3))
    n = min(new_tokens, loaded.config.model.max_seq_len - 9)
    row["decode_tokens_per_s"] = round(decode_tps(loaded.model, n), 1)
    print(json.dumps(row), flush=True)
    return row


def variants(src: Path, work: Path, finetune_steps: int, data: Path | None) -> list[tuple[str, Path]]:
    out = [("fp32", src)]
    out.append(("int8", quantize_checkpoint(src, work / "int8", "int8")))
    out.append(("int4 (group 128)", quantize_checkpoint(src, work / "int4", "int4", 128)))
    out.append(("magnitude 50%", prune_checkpoint(src, work / "mag", 0.5, "magnitude")))
    out.append(("structured 50%", prune_checkpoint(src, work / "struct", 0.5, "structured")))
    if finetune_steps and data is not None:
        out.append((f"structured 50% + {finetune_steps}-step fine-tune",
                    prune_checkpoint(src, work / "struct_ft", 0.5, "structured", finetune_steps=finetune_steps,
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
             f"torch {results['torch']}, {results['threads']} threads, batch-1 greedy decode, best of 3 "
             "(shared 2-core machine: timings are noisy).", ""]
    for model, rows in results["models"].items():
        lines += [f"## {model}", "", "| variant | model.safetensors | params | val loss | perplexity | decode tok/s |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in rows:
            lines.append(f"| {r['variant']} | {r['model_bytes'] / 1e6:.2f} MB | {r['params']:,} | "
                         f"{r.get('val_loss', 'n/a')} | {r.get('perplexity', 'n/a')} | {r['decode_tokens_per_s']} |")
        lines.append("")
    lines += ["Notes: params is the config's count (quantized variants keep the float count). Magnitude pruning "
              "is saved dense (zeros), so size and speed do not change. The gpt2-124m rows use random "
              "weights: no loss.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, required=True, help="trained Shakespeare char run (or step folder)")
    ap.add_argument("--data", type=Path, required=True, help="its prepared data directory (val split)")
    ap.add_argument("--eval-batches", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results: dict = {"torch": torch.__version__, "threads": args.threads, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "sc").mkdir()
        rows = [measure(n, p, args.data, args.eval_batches, args.new_tokens)
                for n, p in variants(args.ckpt, work / "sc", args.finetune_steps, args.data)]
        results["models"]["Shakespeare char (4 layers, dim 128, trained)"] = rows
        if not args.skip_gpt2:
            (work / "g").mkdir()
            src = gpt2_checkpoint(work)
            rows = [measure(n, p, None, 0, 64) for n, p in variants(src, work / "g", 0, None)]
            results["models"]["gpt2-124m architecture (random weights)"] = rows
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compression.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "compression.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
