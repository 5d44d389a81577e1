"""Masked-LM training step: the encoder's head and output layer at every position against only at
the corrupted ones (`Encoder.forward(..., predict=)`), forward + backward, interleaved repeats in one
run. Writes benchmarks/results/mlm_step.json.

    python benchmarks/mlm_step.py                     # the SST-2 encoder recipe's shape, 1 thread
    python benchmarks/mlm_step.py --threads 2 --repeats 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import machine, positive_int, write_result

from clusterlm.eval.metrics import IGNORE_INDEX, lm_loss
from clusterlm.models.build import build_model
from clusterlm.models.config import ModelConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--repeats", type=positive_int, default=6)
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--seq-len", type=positive_int, default=96)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "mlm_step.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # clusterlm/recipes/sst2_encoder_cpu.toml: 4 x 192, BPE 4096 + <|mask|>, dropout 0.1
    cfg = ModelConfig(arch="encoder", vocab_size=4097, n_layers=4, n_heads=4, dim=192, max_seq_len=128, dropout=0.1)
    model = build_model(cfg)
    model.init_weights(0)
    model.train()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 4096, (args.batch, args.seq_len), generator=g)
    y = torch.full_like(idx, IGNORE_INDEX)
    chosen = torch.rand(idx.shape, generator=g) < 0.15
    y[chosen] = idx[chosen]
    arms = {"every_position": lambda: model(idx), "predicted_only": lambda: model(idx, None, y != IGNORE_INDEX)}
    times: dict[str, list[float]] = {k: [] for k in arms}
    losses = {}
    for r in range(args.repeats + 1):  # the first round warms up and is dropped
        for name, fwd in (arms.items() if r % 2 == 0 else reversed(arms.items())):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(r)  # the same dropout masks in both arms of a round
            t0 = time.perf_counter()
            loss = lm_loss(fwd(), y, reduction="sum")
            loss.backward()
            dt = time.perf_counter() - t0
            losses[name] = float(loss.detach())
            if r:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"benchmark": "mlm_step", "machine": machine(), "threads": args.threads, "batch": args.batch,
              "seq_len": args.seq_len, "masked_fraction": float(chosen.float().mean()),
              "median_s": med, "times_s": times, "speedup": med["every_position"] / med["predicted_only"],
              "last_loss_sum": losses}
    write_result(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("median_s", "speedup", "machine")}, indent=1))


if __name__ == "__main__":
    main()
