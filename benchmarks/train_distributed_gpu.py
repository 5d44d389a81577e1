"""Tokens/s and peak memory of training steps under DDP and FSDP2 on one GPU (NCCL, world size 1).

    .venv/bin/python benchmarks/train_distributed_gpu.py                       # gpt2-124m, llama-1b
    .venv/bin/python benchmarks/train_distributed_gpu.py --cpu --presets llama-nano --seq-len 64  # smoke run

Each configuration: a one-rank process group, the model built by clusterlm.parallel.parallelize with
the wrapper forced (DDP, or FSDP2 with bf16 parameters / fp32 reduction), fused AdamW, random token
batches, 3 warm-up steps then `--steps` timed steps (median). Peak memory is
torch.cuda.max_memory_allocated. Writes benchmarks/results/train_distributed_gpu.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from clusterlm.config import OptimConfig
from clusterlm.eval.metrics import lm_loss
from clusterlm.models.config import get_preset
from clusterlm.parallel.dims import ParallelDims
from clusterlm.parallel.mesh import build_mesh
from clusterlm.parallel.parallelize import build_parallel_model
from clusterlm.train.optim import build_optimizer
from common import cpu_model, positive_int, write_result  # benchmarks/common.py

RESULTS = Path(__file__).parent / "results"


def run(preset: str, wrap: str, device: torch.device, batch: int, seq_len: int, steps: int) -> dict:
    mcfg = get_preset(preset)
    if mcfg.vocab_size is None:
        mcfg = mcfg.with_vocab(50304)
    bf16 = device.type == "cuda"
    mesh = build_mesh(ParallelDims(), device.type)
    pm = build_parallel_model(mcfg, ParallelDims(), mesh, device, seed=0, micro_batch=batch, loss_fn=lm_loss,
                              param_dtype=torch.bfloat16 if bf16 and wrap == "fsdp" else None, wrap=wrap)
    opt = build_optimizer(pm.module, OptimConfig())
    V = mcfg.vocab_size
    g = torch.Generator(device="cpu").manual_seed(0)

    def autocast():
        # DDP: autocast to bf16; FSDP2: its MixedPrecisionPolicy already computes in bf16
        if bf16 and wrap == "ddp":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(3 + steps):
        x = torch.randint(0, V, (batch, seq_len + 1), generator=g).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        loss = pm.forward_backward(x[:, :-1], x[:, 1:], autocast=autocast)
        pm.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    out = {"preset": preset, "wrap": wrap, "params": mcfg.num_params(), "batch": batch, "seq_len": seq_len,
           "dtype": "bf16" if bf16 else "fp32", "median_step_s": step_s,
           "tokens_per_s": batch * seq_len / step_s, "steps_timed": steps}
    if device.type == "cuda":
        out["peak_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    del pm, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["gpt2-124m", "llama-1b"])
    ap.add_argument("--wraps", nargs="+", default=["ddp", "fsdp"])
    ap.add_argument("--batch", type=positive_int, default=8)
    ap.add_argument("--seq-len", type=positive_int, default=1024)
    ap.add_argument("--steps", type=positive_int, default=10)
    ap.add_argument("--cpu", action="store_true", help="gloo on CPU (a smoke run of this script)")
    ap.add_argument("--out", default=str(RESULTS / "train_distributed_gpu.json"))
    args = ap.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        ap.error("no CUDA device is visible to torch here; --cpu runs the script on gloo as a smoke test")
    cuda = not args.cpu
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    results: list[dict] = []
    doc = {"device": torch.cuda.get_device_name(device) if cuda else "cpu", "cpu": cpu_model(), "torch": torch.__version__,
           "world_size": 1, "backend": "nccl" if cuda else "gloo", "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{tmp}/rdzv", rank=0, world_size=1)
        try:
            for p in args.presets:
                for w in args.wraps:
                    try:
                        r = run(p, w, device, args.batch, args.seq_len, args.steps)
                    except (RuntimeError, ValueError, NotImplementedError) as e:  # e.g. out of memory: the others still run
                        r = {"preset": p, "wrap": w, "error": f"{type(e).__name__}: {e}"[:1000]}
                        if cuda:
                            torch.cuda.empty_cache()
                    results.append(r)
                    # written after every configuration: a later one that hangs or is killed loses nothing
                    write_result(args.out, json.dumps(doc, indent=1) + "\n")
                    mem = f"{r['peak_memory_bytes'] / 2**30:.1f} GiB" if "peak_memory_bytes" in r else "n/a"
                    print(f"{p:>10} {w:>4}: " + (f"{r['tokens_per_s']:,.0f} tok/s, peak {mem}" if "error" not in r
                                                 else r["error"]), flush=True)
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
