"""Training step time of LoRA against full fine-tuning on a recipe's model shape, and against the
textbook LoRA forward (y + (x A^T B^T) * scale, as peft writes it), interleaved in one run.
Writes benchmarks/results/lora_step.json.

    python benchmarks/lora_step.py                       # multi30k_enfr_cpu: 4 x 192, BPE 4096, 8 x 256 tokens
    python benchmarks/lora_step.py --targets wq wv w1 w2 --repeats 12

Arms (each its own copy of the same random base weights, the same batches, AdamW over what trains):
  full          every parameter trains;
  lora          clusterlm.finetune.lora as shipped: rank 8 on --targets (the tied embedding's adapter
                applies to the output layer too), the update accumulated into the base output by one
                addmm_ (lora.add_low_rank);
  lora_textbook the same adapters with the textbook forward: a separate GEMM, a multiply by the scale
                and an add over the out-sized activations (what clusterlm did before).
lora and lora_textbook compute the same function: their losses after the same steps are reported
(they differ by float rounding only). Timed: forward, backward and the optimizer step, median of
--repeats rounds of --steps steps per arm, arms in alternating order each round.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from common import machine, positive_int, write_result

from clusterlm.config import bundled_recipes, load_run_config
from clusterlm.finetune.lora import LoRAEmbedding, LoRALinear, TiedLoRAOutput, apply_lora
from clusterlm.models.build import build_model


def _textbook_linear(self: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, self.weight, self.bias) + F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b) * self.scale


def _textbook_embedding(self: LoRAEmbedding, ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, self.weight) + F.linear(F.embedding(ids, self.lora_a.t()), self.lora_b) * self.scale


def _textbook_tied(self: TiedLoRAOutput, x: torch.Tensor) -> torch.Tensor:
    s = self.source
    return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, s.lora_b.t()), s.lora_a.t()) * s.scale


TEXTBOOK = {LoRALinear: _textbook_linear, LoRAEmbedding: _textbook_embedding, TiedLoRAOutput: _textbook_tied}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="multi30k_enfr_cpu", help="bundled recipe whose [model] shape is timed")
    p.add_argument("--targets", nargs="+", default=["wq", "wv", "w1", "w2", "tok_embeddings"])
    p.add_argument("--rank", type=positive_int, default=8)
    p.add_argument("--threads", type=positive_int, default=2)
    p.add_argument("--repeats", type=positive_int, default=8, help="rounds (one more warms up and is dropped)")
    p.add_argument("--steps", type=positive_int, default=5, help="steps per arm per round")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "lora_step.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_run_config(bundled_recipes()[args.recipe])
    mcfg = dataclasses.replace(cfg.model, vocab_size=cfg.data.vocab_size)
    batch, seq = cfg.train.micro_batch_size, cfg.train.seq_len
    torch.manual_seed(0)
    base = build_model(mcfg)
    base.init_weights(0)
    models = {"full": copy.deepcopy(base), "lora": copy.deepcopy(base), "lora_textbook": copy.deepcopy(base)}
    for name in ("lora", "lora_textbook"):
        apply_lora(models[name], args.targets, rank=args.rank, alpha=2.0 * args.rank, seed=0)
    for m in models["lora_textbook"].modules():
        if type(m) in TEXTBOOK:
            m.forward = types.MethodType(TEXTBOOK[type(m)], m)
    opts = {k: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=2e-3, foreach=True)
            for k, m in models.items()}
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, mcfg.vocab_size, (batch, seq + 1), generator=g) for _ in range(args.steps)]
    times: dict[str, list[float]] = {k: [] for k in models}
    losses: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.repeats + 1):  # round 0 warms up and is not timed
        for name in (list(models) if r % 2 == 0 else list(reversed(models))):
            model, opt = models[name], opts[name]
            t0 = time.perf_counter()
            for b in batches:
                logits = model(b[:, :-1])
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), b[:, 1:].reshape(-1))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses[name].append(float(loss.detach()))
            if r:
                times[name].append((time.perf_counter() - t0) / args.steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    trainable = {k: sum(q.numel() for q in m.parameters() if q.requires_grad) for k, m in models.items()}
    loss_diff = max(abs(a - b) for a, b in zip(losses["lora"], losses["lora_textbook"]))
    result = {"benchmark": "lora_step", "machine": machine(), "threads": args.threads, "recipe": args.recipe,
              "model": {"n_layers": mcfg.n_layers, "dim": mcfg.dim, "vocab_size": mcfg.vocab_size},
              "tokens_per_step": batch * seq, "targets": args.targets, "rank": args.rank, "trainable": trainable,
              "median_step_s": {k: round(v, 4) for k, v in med.items()},
              "step_s": {k: [round(t, 4) for t in v] for k, v in times.items()},
              "lora_over_full": round(med["lora"] / med["full"], 3),
              "textbook_over_full": round(med["lora_textbook"] / med["full"], 3),
              "lora_speedup_over_textbook": round(med["lora_textbook"] / med["lora"], 3),
              "max_loss_diff_lora_vs_textbook": loss_diff, "steps_per_arm": len(losses["lora"])}
    write_result(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("median_step_s", "lora_over_full", "textbook_over_full",
                                             "lora_speedup_over_textbook", "max_loss_diff_lora_vs_textbook",
                                             "machine")}, indent=1))


if __name__ == "__main__":
    main()
