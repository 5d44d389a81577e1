"""Train recipes/shakespeare_char_cpu.toml on this CPU side by side with a plain-PyTorch nanoGPT-style
reference (model and loop written below, the recipe's math and hyper-parameters), interleaved in one
process, and report the tokens/s ratio and val loss after 2,000 steps.

    .venv/bin/python benchmarks/train_shakespeare_cpu.py                 # side by side, 2000 steps each
    .venv/bin/python benchmarks/train_shakespeare_cpu.py --steps 400 --segment 100   # quicker
    .venv/bin/python benchmarks/train_shakespeare_cpu.py --no-reference  # clusterlm only (the old report)
    .venv/bin/python benchmarks/train_shakespeare_cpu.py --compare-lstm  # clusterlm alone + LSTM at equal wall time

Interleaving: clusterlm's Trainer (its own train_step, log_step, evaluation and checkpoint calls, as
Trainer.run drives them) and the reference each run `--segment` steps in turn until both reach
`--steps`, in the same process and threads, so machine load from other jobs hits both alike
(`--compile-arm` adds clusterlm with train.compile as another arm, `--fp32-arm` one with
train.dtype = fp32: the recipe's "bf16-native" runs bf16 autocast on CPUs with AMX or AVX512-BF16). Timed:
the wall time of each side's training steps (batch fetch, forward, backward, clip, AdamW, the
per-step logging each loop does), evaluations and checkpoints left out on both sides and reported
apart. The reference is nanoGPT's model.py/train.py reduced to this configuration: GPT with
LayerNorm (no bias), SDPA attention, GELU (tanh, as the recipe's gelu_new) MLP, tied embeddings,
normal(0.02) init with scaled residual projections; nanoGPT's get_batch (random offsets into a
memmap of the same train tokens); AdamW over nanoGPT's groups (decay for >= 2-D tensors) with
fused=False on CPU as nanoGPT chooses (`use_fused = fused_available and device_type == 'cuda'`),
the recipe's lr schedule, betas, weight decay and grad clip; loss.item() every step as nanoGPT's
logging does at log_interval 1. Both start from seed 1337.

Goal (issue 19): clusterlm >= 1.2x the reference's tokens/s in the same run, val loss <= 1.90 at
step 2000. Writes benchmarks/results/train_shakespeare_cpu.json (and lstm_vs_transformer.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clusterlm.config import bundled_recipes, load_run_config
from clusterlm.eval.evaluate import evaluate_checkpoint
from clusterlm.train.loop import Trainer, train
from clusterlm.train.optim import lr_at
from common import machine, positive_int, write_result  # benchmarks/common.py

RESULTS = Path(__file__).parent / "results"
REFERENCE_VAL = 1.90


# ---- the reference: nanoGPT's model, reduced to this configuration ----------------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=False)
        self.gelu = nn.GELU(approximate="tanh")
        self.mlp_proj = nn.Linear(4 * n_embd, n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(self.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # scaled init of the residual projections (GPT-2 paper)
            if pn.endswith(("c_proj.weight", "mlp_proj.weight")):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None if targets is None else F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss


class Reference:
    """nanoGPT's train.py loop for this configuration, steppable in segments."""

    def __init__(self, cfg, train_tokens: Path, val_tokens: Path, vocab_size: int) -> None:  # noqa: ANN001
        torch.manual_seed(1337)
        m, tc, oc = cfg.model, cfg.train, cfg.optim
        self.cfg, self.B, self.T = cfg, tc.micro_batch_size, tc.seq_len
        self.files = {"train": train_tokens, "val": val_tokens}
        self.dtype = np.dtype(json.loads(train_tokens.with_suffix(".json").read_text())["dtype"])
        self.model = GPT(vocab_size, m.max_seq_len, m.n_layers, m.n_heads, m.dim)
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": oc.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=oc.lr, betas=(oc.beta1, oc.beta2), fused=False)
        self.step, self.losses = 0, []

    def get_batch(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = np.memmap(self.files[split], dtype=self.dtype, mode="r")  # recreated per batch, as nanoGPT does
        ix = torch.randint(len(data) - self.T, (self.B,))
        x = torch.stack([torch.from_numpy(data[i:i + self.T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + self.T].astype(np.int64)) for i in ix])
        return x, y

    def train_step(self) -> float:
        tc = self.cfg.train
        lr = lr_at(self.step, self.cfg.optim, tc.max_steps)
        for g in self.opt.param_groups:
            g["lr"] = lr
        x, y = self.get_batch("train")
        _, loss = self.model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        lossf = loss.item()  # nanoGPT logs loss.item() (log_interval 1 here)
        self.losses.append(lossf)
        return lossf

    @torch.no_grad()
    def val_loss(self, batches: int = 200) -> float:
        """Mean loss over `batches` random val batches (nanoGPT's estimate_loss)."""
        self.model.eval()
        out = statistics.mean(self.model(*self.get_batch("val"))[1].item() for _ in range(batches))
        self.model.train()
        return out


def _flat_tokens(data_dir: Path, split: str, out: Path) -> Path:
    """The split's shards concatenated into one raw file (nanoGPT's train.bin / val.bin)."""
    from clusterlm.data.shards import open_shard, read_meta

    meta = read_meta(data_dir)
    arrays = [np.asarray(open_shard(data_dir / s["file"])) for s in meta["splits"][split]["shards"]]
    tokens = np.concatenate(arrays)
    tokens.tofile(out)
    out.with_suffix(".json").write_text(json.dumps({"dtype": str(tokens.dtype)}))
    return out


def _clusterlm_trainer(cfg) -> Trainer:  # noqa: ANN001
    """A Trainer set up as Trainer.run() sets itself up, so its steps can be driven in segments."""
    from tqdm.auto import tqdm

    from clusterlm.train.metrics import Throughput

    t = Trainer(cfg)
    t.heartbeat, t.throughput, t._t_start = None, Throughput(), time.perf_counter()
    t.bar = tqdm(total=cfg.train.max_steps, disable=True)
    t.model.train()
    return t


def side_by_side(recipe: str, tmp: Path, steps: int, segment: int, arms: dict[str, list[str]]) -> dict:
    """clusterlm's Trainer for each arm (name -> overrides) and the reference, `segment` steps each in
    turn; returns the figures (see the module docstring)."""
    load_before = [round(x, 2) for x in os.getloadavg()]
    trainers: dict[str, Trainer] = {}
    for i, (name, extra) in enumerate(arms.items()):
        cfg = load_run_config(bundled_recipes()[recipe], [f"--train.out_dir={json.dumps(str(tmp / f'run{i}'))}",
                                                          f"--data.dir={json.dumps(str(tmp / 'data'))}",
                                                          "--train.tensorboard=false", f"--train.max_steps={steps}",
                                                          *extra])
        trainers[name] = _clusterlm_trainer(cfg)
    first = next(iter(trainers.values()))
    cfg, data_dir = first.cfg, Path(first.data_dir)
    ref = Reference(cfg, _flat_tokens(data_dir, "train", tmp / "train.bin"), _flat_tokens(data_dir, "val", tmp / "val.bin"),
                    cfg.model.vocab_size)
    tok = cfg.train.micro_batch_size * cfg.train.seq_len
    train_s = {name: 0.0 for name in [*trainers, "reference"]}
    other_s = {name: 0.0 for name in trainers}
    segments = []
    stop: dict = {}
    while ref.step < steps:
        n = min(segment, steps - ref.step)
        seg: dict = {"step": ref.step + n}
        for name, t in trainers.items():
            t0, other = time.perf_counter(), 0.0
            for _ in range(n):  # Trainer.run's loop body
                t1 = time.perf_counter()
                loss, grad_norm, lr = t.train_step()
                t.log_step(loss, grad_norm, lr, time.perf_counter() - t1)
                t.agree_stop(stop)
                t2 = time.perf_counter()
                t.maybe_eval()
                t.maybe_save()
                other += time.perf_counter() - t2
            dt = time.perf_counter() - t0 - other
            train_s[name] += dt
            other_s[name] += other
            seg[f"{name}_tokens_per_s"] = round(n * tok / dt, 1)
        t0 = time.perf_counter()
        for _ in range(n):
            ref.train_step()
        dt = time.perf_counter() - t0
        train_s["reference"] += dt
        seg["reference_tokens_per_s"] = round(n * tok / dt, 1)
        seg["load_1m"] = round(os.getloadavg()[0], 2)
        segments.append(seg)
        print(json.dumps(seg), flush=True)
    res: dict = {"recipe": recipe, "steps": steps, "segment_steps": segment, "tokens_per_step": tok,
                 "threads": torch.get_num_threads(), "arms": arms,
                 "reference_tokens_per_s": round(steps * tok / train_s["reference"], 1),
                 "reference_train_seconds": round(train_s["reference"], 2),
                 "reference_val_loss_200_random_batches": round(ref.val_loss(), 4),
                 "reference_final_train_loss_mean_last_50": round(statistics.mean(ref.losses[-50:]), 4)}
    for i, (name, t) in enumerate(trainers.items()):
        t0 = time.perf_counter()
        t.evaluate()
        t.evaluate_tasks()
        t.save("final")
        t.metrics.close()
        other_s[name] += time.perf_counter() - t0
        ev = evaluate_checkpoint(str(tmp / f"run{i}"), device="cpu", batch_size=64)
        seg_ratio = [sg[f"{name}_tokens_per_s"] / sg["reference_tokens_per_s"] for sg in segments]
        res[name] = {"tokens_per_s": round(steps * tok / train_s[name], 1),
                     "ratio_vs_reference": round(train_s["reference"] / train_s[name], 3),
                     "ratio_per_segment_median": round(statistics.median(seg_ratio), 3),
                     "ratio_per_segment_min_max": [round(min(seg_ratio), 3), round(max(seg_ratio), 3)],
                     "train_seconds": round(train_s[name], 2),
                     "eval_and_checkpoint_seconds": round(other_s[name], 2),
                     "val_loss_full_split": round(ev["loss"], 4), "final_train_loss": t.last_loss,
                     "train_dtype": t.cfg.train.dtype, "autocast": str(t.amp_dtype or "off (fp32)")}
        res[name]["meets_goal"] = (res[name]["ratio_vs_reference"] >= 1.2
                                   and res[name]["val_loss_full_split"] <= REFERENCE_VAL)
    res.update(segments=segments, load_before=load_before, load_after=[round(x, 2) for x in os.getloadavg()])
    return res


def run(recipe: str, out: Path, data: Path, *extra: str) -> dict:
    cfg = load_run_config(bundled_recipes()[recipe], [f"--train.out_dir={json.dumps(str(out))}",
                                                      f"--data.dir={json.dumps(str(data))}", "--train.tensorboard=false",
                                                      *extra])
    t0 = time.perf_counter()
    res = train(cfg)
    wall = time.perf_counter() - t0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if r.get("kind") == "train"]
    # steady state: skip the first 20 steps (allocator and thread-pool warm-up)
    times = [r["step_time_s"] for r in steps[20:]]
    ev = evaluate_checkpoint(str(out), device="cpu", batch_size=64)
    tokens_per_step = cfg.train.micro_batch_size * cfg.train.seq_len
    evals = [r for r in recs if r.get("kind") == "eval"]
    return {
        "recipe": recipe,
        "steps": res.step,
        "wall_time_s": round(wall, 2),
        "mean_step_ms": round(1e3 * statistics.mean(times), 3),
        "median_step_ms": round(1e3 * statistics.median(times), 3),
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": round(tokens_per_step / statistics.mean(times), 1),
        "val_loss_full_split": round(ev["loss"], 4),
        "val_bits_per_byte": round(ev["bits_per_byte"], 4),
        "val_tokens": ev["tokens"],
        "val_loss_in_training_evals": [(r["step"], round(r["val_loss"], 4)) for r in evals],
        "final_train_loss": res.final_train_loss,
        "params": cfg.model.with_vocab(1).num_params() if cfg.model.vocab_size is None else cfg.model.num_params(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compare-lstm", action="store_true", help="also train the LSTM recipe for the same wall time")
    p.add_argument("--no-reference", action="store_true", help="clusterlm alone (train()), no side-by-side reference")
    p.add_argument("--steps", type=positive_int, default=2000)
    p.add_argument("--segment", type=positive_int, default=50, help="steps per turn in the interleaving")
    p.add_argument("--compile-arm", action="store_true",
                   help="a third arm: clusterlm with --train.compile=true (compiled during its first steps)")
    p.add_argument("--fp32-arm", action="store_true",
                   help="an arm with --train.dtype=fp32 (the recipe's bf16-native is bf16 autocast on CPUs with AMX or AVX512-BF16)")
    p.add_argument("--keep", type=Path, default=None,
                   help="copy clusterlm's run (DIR/run) and the prepared data (DIR/data) here, e.g. for peers_decode.py --val-ckpt")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads for every arm (default: torch's)")
    p.add_argument("--out", type=Path, default=RESULTS / "train_shakespeare_cpu.json")
    p.add_argument("extra", nargs="*", help="--section.key=value overrides for clusterlm's run (after --)")
    args = p.parse_args()
    args.no_reference = args.no_reference or args.compare_lstm  # the LSTM comparison runs train() alone
    if args.threads:
        torch.set_num_threads(args.threads)
        args.extra = [*args.extra, f"--train.threads={args.threads}"]
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), **machine(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "command": " ".join(["python", "benchmarks/train_shakespeare_cpu.py", *sys.argv[1:]])}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        if not args.no_reference:
            arms = {"clusterlm": list(args.extra)}
            if args.compile_arm:
                arms["clusterlm_compiled"] = [*args.extra, "--train.compile=true"]
            if args.fp32_arm:
                arms["clusterlm_fp32"] = [*args.extra, "--train.dtype=fp32"]
            res = side_by_side("shakespeare_char_cpu", tmp, args.steps, args.segment, arms)
            res.update(goal={"val_loss_le": REFERENCE_VAL, "throughput_ratio_ge": 1.2}, env=env)
            write_result(args.out, json.dumps(res, indent=2) + "\n")
            print(json.dumps({k: v for k, v in res.items() if k != "segments"}, indent=2))
            if args.keep is not None:
                import shutil

                shutil.copytree(tmp / "run0", args.keep / "run", dirs_exist_ok=True)
                shutil.copytree(tmp / "data", args.keep / "data", dirs_exist_ok=True)
            return
        gpt = run("shakespeare_char_cpu", tmp / "gpt", data, f"--train.max_steps={args.steps}", *args.extra)
        gpt.update(env=env)
        write_result(args.out, json.dumps(gpt, indent=2) + "\n")
        print(json.dumps(gpt, indent=2))
        if args.compare_lstm:
            minutes = gpt["wall_time_s"] / 60
            lstm = run("lstm_shakespeare_cpu", tmp / "lstm", data, f"--train.max_minutes={minutes:.4f}",
                       "--train.max_steps=1000000", "--optim.decay_steps=2000")
            table = {"equal_wall_time_s": gpt["wall_time_s"], "transformer": gpt, "lstm": lstm, "env": env}
            write_result(RESULTS / "lstm_vs_transformer.json", json.dumps(table, indent=2) + "\n")
            md = ["| model | params | steps in equal wall time | ms/step | val loss (full val split) | bits/byte |",
                  "|---|---|---|---|---|---|"]
            for name, r in (("Transformer (shakespeare_char_cpu)", gpt), ("LSTM (lstm_shakespeare_cpu)", lstm)):
                md.append(f"| {name} | {r['params']:,} | {r['steps']} | {r['mean_step_ms']:.1f} | "
                          f"{r['val_loss_full_split']:.4f} | {r['val_bits_per_byte']:.3f} |")
            text = (f"# LSTM vs Transformer at equal wall time ({gpt['wall_time_s']:.0f} s, {env['cpu']}, "
                    f"{env['threads']} threads)\n\n" + "\n".join(md) + "\n")
            write_result(RESULTS / "lstm_vs_transformer.md", text)
            print(text)


if __name__ == "__main__":
    main()
