"""Throughput of task evaluation on the CPU: batched greedy generation (clusterlm.eval.lm.generate_batch)
and batched log-likelihoods (loglikelihood on the bundled Shakespeare choice task), batch 1 against
batch 16. Issue 14's goal: batch 16 reaches at least 3x the examples per second of batch 1.

    .venv/bin/python benchmarks/eval_throughput.py                    # writes benchmarks/results/eval_throughput.json
    .venv/bin/python benchmarks/eval_throughput.py --checkpoint runs/shakespeare_char   # a trained model
    .venv/bin/python benchmarks/eval_throughput.py --repeats 1 --examples 32            # quicker

Model: the quickstart's shape (recipes/shakespeare_char_cpu.toml [model]: 4 layers, 4 heads, dim 128,
context 64, character tokenizer of the bundled corpus) with random weights, or a checkpoint given
with --checkpoint. Prompts: the contexts of the first --examples records of
clusterlm/data/tasks/shakespeare_next_line.jsonl; generation is greedy, --new-tokens (32) new tokens
at most (a prompt stops earlier only where the 64-token context is full, or at EOS). Log-likelihood:
every (context, choice) request of the task's 400 records (1,600 requests), with the accuracy of the
highest-scoring choice (raw and per-character normalised, as lm-eval's acc and acc_norm) recorded
beside, meaningful with --checkpoint.

Timing: wall time of each whole call (tokenizing, batching, the forward passes), --repeats runs after
one warm-up run of each variant; batch sizes interleaved (each repeat runs every variant once) so
they share the machine's load; median and best run reported, ratios from the medians. Torch threads:
--threads (1 by default: the tiny model is bound by per-call overhead, not by arithmetic, and this
machine's 2 cores are shared). The CPU model, thread count and load averages before and after go
into the JSON: a load average above the core count means the numbers were taken on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from common import check_checkpoint, cpu_model, positive_int, write_result  # benchmarks/common.py

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "eval_throughput.json"
TASK = ROOT / "clusterlm" / "data" / "tasks" / "shakespeare_next_line.jsonl"
RECIPE = ROOT / "recipes" / "shakespeare_char_cpu.toml"


def quickstart_model(seed: int = 0) -> tuple[torch.nn.Module, object]:
    """The quickstart recipe's model shape, random weights, and the character tokenizer of the corpus."""
    import tomllib

    from clusterlm.data.builtin import builtin_files
    from clusterlm.models.build import build_model
    from clusterlm.models.config import ModelConfig
    from clusterlm.tokenizer.kinds import train_tokenizer

    tok = train_tokenizer("char", [raw.decode("utf-8") for _, raw in builtin_files("shakespeare")])
    shape = tomllib.loads(RECIPE.read_text())["model"]
    model = build_model(ModelConfig(**shape, vocab_size=tok.vocab_size))
    model.init_weights(seed)
    return model.eval(), tok


def timed(fn) -> tuple[float, object]:  # noqa: ANN001
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def summary(n: int, times: list[float]) -> dict[str, float]:
    xs = sorted(times)
    return {"examples": n, "runs_s": [round(t, 4) for t in times], "median_s": round(xs[len(xs) // 2], 4),
            "examples_per_s_median": round(n / xs[len(xs) // 2], 2), "examples_per_s_best": round(n / xs[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a run directory or checkpoint folder (default: random weights)")
    ap.add_argument("--examples", type=positive_int, default=64, help="prompts for the generation timing")
    ap.add_argument("--new-tokens", type=positive_int, default=32)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    check_checkpoint("--checkpoint", args.checkpoint)

    from clusterlm.eval.lm import generate_batch, loglikelihood

    torch.set_num_threads(args.threads)
    load_before = [round(x, 2) for x in os.getloadavg()]
    if args.checkpoint:
        from clusterlm.checkpoint.model_io import load_for_inference

        loaded = load_for_inference(args.checkpoint, device="cpu")
        model, tok = loaded.model.eval(), loaded.tokenizer
    else:
        model, tok = quickstart_model()
    records = [json.loads(line) for line in TASK.read_text("utf-8").splitlines()]
    prompts = [r["context"] for r in records[:args.examples]]
    requests = [(r["context"], c) for r in records for c in r["choices"]]
    sizes = [int(b) for b in args.batch_sizes.split(",")]

    def gen(b: int) -> list[str]:
        return generate_batch(model, tok, prompts, max_new_tokens=args.new_tokens, batch_size=b, progress=False)

    def ll(b: int) -> list:
        return loglikelihood(model, tok, requests, batch_size=b, progress=False)

    gen_times: dict[int, list[float]] = {b: [] for b in sizes}
    ll_times: dict[int, list[float]] = {b: [] for b in sizes}
    gen_out: dict[int, list[str]] = {}
    ll_out: dict[int, list] = {}
    for b in sizes:  # warm-up: first-call allocations, and the outputs compared below
        gen_out[b], ll_out[b] = gen(b), ll(b)
    for _ in range(args.repeats):
        for b in sizes:
            t, _ = timed(lambda: gen(b))
            gen_times[b].append(t)
            t, _ = timed(lambda: ll(b))
            ll_times[b].append(t)

    base = sizes[0]
    scores = ll_out[base]
    acc = acc_norm = 0
    for k, r in enumerate(records):
        s = scores[4 * k:4 * k + 4]
        acc += max(range(4), key=lambda i: s[i].logprob) == r["gold"]
        acc_norm += max(range(4), key=lambda i: s[i].logprob / len(r["choices"][i])) == r["gold"]
    max_diff = max(abs(a.logprob - b.logprob) for b_ in sizes for a, b in zip(ll_out[base], ll_out[b_]))
    gen_s = {str(b): summary(len(prompts), gen_times[b]) for b in sizes}
    ll_s = {str(b): summary(len(records), ll_times[b]) | {"requests": len(requests)} for b in sizes}
    results = {
        "model": args.checkpoint or f"random weights, {RECIPE.name} [model] shape",
        "parameters": sum(p.numel() for p in model.parameters()),
        "context": model.config.max_seq_len if model.config.arch == "transformer" else None,
        "task": str(TASK.relative_to(ROOT)),
        "generate": {"new_tokens_max": args.new_tokens, "greedy": True, "by_batch_size": gen_s,
                     "new_tokens_generated": sum(len(tok.encode(t)) for t in gen_out[base]),
                     "outputs_equal_across_batch_sizes": all(gen_out[b] == gen_out[base] for b in sizes)},
        "loglikelihood": {"by_batch_size": ll_s, "max_abs_logprob_diff_across_batch_sizes": max_diff,
                          "accuracy": round(acc / len(records), 4), "accuracy_norm": round(acc_norm / len(records), 4)},
        "speedup_generate": {f"{b}_vs_{base}": round(gen_s[str(b)]["examples_per_s_median"]
                                                   / gen_s[str(base)]["examples_per_s_median"], 2) for b in sizes[1:]},
        "speedup_loglikelihood": {f"{b}_vs_{base}": round(ll_s[str(b)]["examples_per_s_median"]
                                                        / ll_s[str(base)]["examples_per_s_median"], 2)
                                  for b in sizes[1:]},
        "goal": "batch 16 >= 3x the examples/s of batch 1 (issue 14)",
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1_5_15_min_before": load_before,
        "load_average_1_5_15_min_after": [round(x, 2) for x in os.getloadavg()],
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_result(args.out, json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("speedup_generate", "speedup_loglikelihood")}))
    for name, table in (("generate", gen_s), ("loglikelihood", ll_s)):
        for b, s in table.items():
            print(f"{name:14s} batch {b:>3s}: {s['examples_per_s_median']:8.1f} examples/s (best {s['examples_per_s_best']})")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
