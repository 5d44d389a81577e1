"""The planner: which parallel layout, micro-batch and recompute mode fit, and how fast each runs.

    clusterlm plan --model llama-8b --cluster h100-sxm-8x --tokens 10B --seq-len 8192 --explain
    clusterlm plan --model gpt-mini --vocab-size 65 --cluster node.toml --steps 2000 --out recipe.toml

Torch-free: runs on a login node. For every layout dp_replicate x dp_shard x tp x pp that
multiplies to the device count (tp inside a node), every micro-batch that divides the per-rank
batch (the recipe's own always tried; what is left out is listed with the reason by --explain)
and every activation recompute mode (none/selective/full), it estimates per-device memory (clusterlm.cluster.memory)
and keeps what fits; then it predicts the step time

    step = compute + pipeline bubble + exposed communication + optimizer step
    compute = (model + recompute FLOPs per step) / (devices * rate)
    rate    = peak * measured training efficiency           (spec: device.train_efficiency)
            | measured matmul TFLOP/s * DEFAULT_TRAIN_FRACTION_OF_MATMUL    (assumption, printed)
            | peak * DEFAULT_TRAIN_FRACTION_OF_PEAK                           (assumption, printed)
    bubble  = compute * (pp-1)/n_mb  (1F1B; each micro-batch one schedule call of n_mb pipeline micro-batches)
    comm    = ring collectives: all-reduce 2(n-1)/n * S / busbw, all-gather and reduce-scatter
              (n-1)/n * S / busbw, plus latency per ring step; DP/FSDP traffic overlaps the
              backward (and FSDP's forward all-gather the forward), TP and PP traffic does not.

and ranks candidates by predicted tokens/s. Every default that stands in for a measurement is
printed as an ASSUMPTION; nothing is silently taken from another device. The step-time model is
steptime.py. Arithmetic: docs/planner.md.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterlm.cluster import flops as flops_mod
from clusterlm.cluster import hardware
from clusterlm.cluster.memory import GIB, RECOMPUTE_MODES, MemoryEstimate, estimate_memory, param_groups
from clusterlm.cluster.spec import ClusterSpec, load_spec
from clusterlm.cluster.steptime import compute_rate, network, step_model, step_time
from clusterlm.errors import ConfigError
from clusterlm.models.config import ModelConfig, preset_values
from clusterlm.parallel.dims import ParallelDims, layout_problems

# Stand-ins for measurements, always printed when used (the step-time ones are in steptime.py).
DEFAULT_MEMORY_FRACTION = 0.90
"""of device memory the planner fills: CUDA context, NCCL buffers, allocator fragmentation."""
DEFAULT_GLOBAL_BATCH_TOKENS = 2**19  # 0.5M tokens: GPT-3 125M's batch (Brown et al. 2020, table 2.1)
MAX_MICRO_BATCHES = 64
"""micro-batch sizes tried per layout at most: every divisor of the per-rank batch up to this many
(a batch with more divisors keeps the powers of two, the largest ones and the recipe's own)"""


def micro_batch_options(per_rank: int, recipe: int | None = None) -> tuple[int, ...]:
    """Every micro-batch size that divides the per-rank batch (samples per data-parallel rank per
    step), so that accumulation = per_rank / micro-batch is whole; the recipe's own size is always
    kept. Above MAX_MICRO_BATCHES divisors: powers of two, the largest divisors and the recipe's."""
    divs = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
    if len(divs) > MAX_MICRO_BATCHES:
        keep = {d for d in divs if d & (d - 1) == 0} | set(divs[-MAX_MICRO_BATCHES // 2:])
        divs = sorted(keep)
    if recipe is not None and recipe not in divs:
        divs.append(recipe)  # validated (and pruned with the reason) like any other
    return tuple(sorted(divs))


@dataclass(frozen=True)
class Pruned:
    """A candidate the search left out, and why (printed by --explain): `reason`, the first found, and
    `more`, the others that would refuse it too (counted by no_valid_layout)."""
    layout: str
    micro_batch: int | None
    recompute: str | None
    reason: str
    more: tuple[str, ...] = ()

    @property
    def reasons(self) -> tuple[str, ...]:
        return (self.reason, *self.more)


@dataclass(frozen=True)
class Candidate:
    dims: ParallelDims
    micro_batch: int
    grad_accum_steps: int
    recompute: str
    memory: MemoryEstimate
    memory_limit_bytes: float
    step_time_s: float | None
    """None when the device's compute rate is unknown"""
    time_parts: dict[str, float] = field(default_factory=dict)
    """seconds per step: compute, bubble, dp_comm, tp_comm, pp_comm, optimizer"""
    formulas: dict[str, str] = field(default_factory=dict)
    tokens_per_s: float | None = None
    mfu: float | None = None
    steps: int | None = None
    total_time_s: float | None = None
    device_hours: float | None = None
    assumptions: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return self.memory.peak_bytes <= self.memory_limit_bytes


def _dims_options(world: int, per_node: int, model: ModelConfig,
                  pruned: list[Pruned] | None = None, fixed: dict[str, Any] | None = None) -> list[ParallelDims]:
    """Every layout of `world` devices the trainer accepts; `fixed`: ParallelDims keys the search does not
    choose (a recipe's pp_schedule, sequence_parallel), which the memory and step time follow."""
    out = []
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    why = pruned.append if pruned is not None else (lambda _: None)
    for tp in divisors:
        if tp > per_node or per_node % tp:
            why(Pruned(f"tp={tp}", None, None, f"tensor parallel stays inside a node of {per_node} device(s)"))
            continue
        if tp > 1 and (model.arch in ("lstm", "gru") or model.n_heads % tp or model.kv_heads % tp):
            why(Pruned(f"tp={tp}", None, None, f"tp must divide n_heads={model.n_heads} and kv_heads="
                       f"{model.kv_heads} of a Transformer (arch {model.arch})"))
            continue
        for pp in divisors:
            if (world // tp) % pp:
                continue
            if pp > model.n_layers:
                why(Pruned(f"tp={tp} pp={pp}", None, None, f"pp={pp} > n_layers={model.n_layers}"))
                continue
            if pp > 1 and model.arch in ("encoder", "encdec"):
                why(Pruned(f"tp={tp} pp={pp}", None, None, f"pipeline parallel splits decoder-only stacks; "
                           f"model.arch={model.arch!r} trains with DDP, FSDP and TP"))
                continue
            dp = world // (tp * pp)
            for rep in [d for d in range(1, dp + 1) if dp % d == 0]:
                dims = ParallelDims(dp_replicate=rep, dp_shard=dp // rep, tp=tp, pp=pp, **(fixed or {}))
                if model.arch in ("lstm", "gru") and dims.model_parallel * dims.dp_shard > 1:
                    why(Pruned(dims.describe(), None, None, f"model.arch={model.arch!r} trains with data-parallel "
                               f"replication only (the trainer's rule)"))
                    continue
                out.append(dims)
    return out


def search(model: ModelConfig, spec: ClusterSpec, *, seq_len: int, global_batch_tokens: int,
           tokens: int | None = None, steps: int | None = None, dtype: str = "bf16", node_type: str | None = None,
           nodes: int | None = None, memory_fraction: float = DEFAULT_MEMORY_FRACTION, attention: str = "flash",
           micro_batches: tuple[int, ...] | None = None, recipe_micro_batch: int | None = None,
           recompute_modes: tuple[str, ...] = RECOMPUTE_MODES,
           pruned: list[Pruned] | None = None, fixed_dims: dict[str, Any] | None = None) -> list[Candidate]:
    """Every valid candidate, fitting or not, unsorted. See `plan`. micro_batches=None tries every
    divisor of each layout's per-rank batch (micro_batch_options), plus recipe_micro_batch; the
    layouts and micro-batches left out are appended to `pruned` with the reason. fixed_dims: a recipe's
    [parallel] pp_schedule and sequence_parallel, kept in every layout."""
    if tokens is not None and steps is not None:
        raise ConfigError("give tokens or steps, not both")
    if dtype not in ("bf16", "fp16", "fp32"):
        raise ConfigError(f"dtype={dtype!r}; expected bf16, fp16 or fp32")
    if not 0 < memory_fraction <= 1:
        raise ConfigError(f"memory_fraction={memory_fraction} must be in (0, 1]")
    if global_batch_tokens < seq_len or global_batch_tokens % seq_len:
        raise ConfigError(f"global_batch_tokens={global_batch_tokens} must be a positive multiple of "
                          f"seq_len={seq_len} (samples per step = global_batch_tokens / seq_len)")
    node = spec.node_type(node_type)
    if node.device is None:
        raise ConfigError(f"node type {node.name!r} of {spec.name!r} lists no device to train on")
    n_nodes = node.count if nodes is None else nodes
    if n_nodes < 1:
        raise ConfigError(f"nodes={n_nodes} must be >= 1")
    device = node.device
    # a dtype the device's generation lacks (bf16 on a V100) is refused by the trainer (device.py): no plan
    acc = hardware.lookup_accelerator(device.name) if device.kind != "cpu" else None
    if acc is not None and dtype not in acc.peak_tflops and dtype not in device.peak_tflops \
            and not device.matmul_tflops(dtype):
        valid = [d for d in ("bf16", "fp16", "fp32") if d in acc.peak_tflops]
        raise ConfigError(f"dtype={dtype}: {device.name} has no {dtype} support (hardware table {acc.key}); "
                          f"the trainer refuses it: plan with {' or '.join(valid)}")
    if device.kind == "cpu" and dtype == "fp16":
        raise ConfigError("dtype=fp16 needs a GPU (the trainer refuses it on a CPU): plan a CPU node with fp32 or bf16")
    world = n_nodes * device.count
    rate = compute_rate(device, dtype)  # fp32 means fp32 matmuls (PyTorch leaves TF32 off by default)
    net = network(spec, node, n_nodes)
    limit = device.memory_gib * GIB * memory_fraction
    peak, _ = device.peak(dtype)
    if peak is None and device.matmul_tflops(dtype):
        # no cited peak (a CPU): MFU against the probe's measured matmul rate, as `clusterlm train
        # --train.probe_spec` reports it, so the two columns compare
        peak = device.matmul_tflops(dtype)
        mfu_note = f"MFU against the measured {dtype} matmul rate {peak:g} TFLOP/s (no cited peak for {device.name})"
    elif peak is None:
        mfu_note = f"MFU unknown: no cited {dtype} peak and no measured matmul rate for {device.name}"
    else:
        mfu_note = ""
    fpt = flops_mod.training_flops_per_token(model, seq_len)
    ops, why_not = step_model(model, device, dtype)
    assumptions = [rate.how] if rate.assumed and ops is None else []
    if why_not:
        assumptions.append(why_not)
    if spec.probe is not None and spec.probe.disturbed:
        assumptions.append(f"probe DISTURBED: {spec.probe.summary()}; step times are not this node's (re-probe an "
                           f"idle node)")
    for key, note in spec.notes.items():  # the probe's figures were measured while the node was busy
        if key == "load" or key.endswith(": load"):
            assumptions.append(f"probe {key}: {note}; re-probe an idle node for step times (the per-op figures "
                               f"are medians and grow with other work)")
    assumptions.append(f"memory limit {memory_fraction:.2f} x {device.memory_gib:g} GiB"
                       + (" (ASSUMPTION: default reserve for runtime buffers and fragmentation)"
                          if memory_fraction == DEFAULT_MEMORY_FRACTION else ""))
    assumptions += list(net.notes)
    if mfu_note:
        assumptions.append(mfu_note)
    if steps is None and tokens is not None:
        steps = math.ceil(tokens / global_batch_tokens)
    out = []
    why = pruned.append if pruned is not None else (lambda _: None)
    samples = global_batch_tokens // seq_len
    for dims in _dims_options(world, device.count, model, pruned, fixed_dims):
        if micro_batches is None:
            if samples % dims.dp:
                # with the layout's other problems (a seq_len past the model's context refuses every layout)
                why(Pruned(dims.describe(), None, None, f"{samples} samples per step do not split over dp={dims.dp} "
                           f"data-parallel ranks", tuple(layout_problems(dims, model, world, global_batch_tokens,
                                                                         None, seq_len))))
                options: tuple[int, ...] = (recipe_micro_batch,) if recipe_micro_batch else ()
            else:
                options = micro_batch_options(samples // dims.dp, recipe_micro_batch)
        else:
            options = tuple(dict.fromkeys(micro_batches + ((recipe_micro_batch,) if recipe_micro_batch else ())))
        for mb in options:
            # the trainer's own checks (validate_layout; launch runs them too): a layout it refuses is no
            # candidate, and every reason it has is kept for the summary
            problems = layout_problems(dims, model, world, global_batch_tokens, mb, seq_len)
            if problems:
                why(Pruned(dims.describe(), mb, None, problems[0], tuple(problems[1:])))
                continue
            accum = dims.grad_accum_steps(global_batch_tokens, mb, seq_len)
            for rc in recompute_modes:
                if rc != "none" and model.arch != "transformer":
                    why(Pruned(dims.describe(), mb, rc, f"activation checkpointing works on Transformer blocks "
                               f"(the trainer's rule); model.arch={model.arch!r}"))
                    continue
                mem = estimate_memory(model, dims, micro_batch=mb, seq_len=seq_len, dtype=dtype, recompute=rc,
                                      attention=attention, grad_accum_steps=accum)
                step = tps = mfu = total = dev_h = None
                parts: dict[str, float] = {}
                formulas: dict[str, str] = {}
                if rate.tflops or ops is not None:
                    parts, formulas = step_time(model, dims, mb, accum, rc, seq_len, global_batch_tokens, dtype,
                                                 rate, net, device, ops)
                    step = sum(parts.values())
                    tps = global_batch_tokens / step
                    if peak:
                        mfu = fpt.total * tps / (world * peak * 1e12)
                    if steps is not None:
                        total = steps * step
                        dev_h = total * world / 3600
                out.append(Candidate(dims, mb, accum, rc, mem, limit, step, parts, formulas, tps, mfu, steps,
                                     total, dev_h, tuple(assumptions)))
    return out


def plan(model: ModelConfig, spec: ClusterSpec, *, seq_len: int, global_batch_tokens: int,
         tokens: int | None = None, steps: int | None = None, dtype: str = "bf16", **kwargs: Any) -> list[Candidate]:
    """Candidates that fit in memory, fastest first (by predicted tokens/s). Ties, and every
    candidate when the device's speed is unknown, go to less recomputation, then a larger
    micro-batch (the model does not credit larger matmuls with higher efficiency; real kernels
    do), then less memory, then fewer model-parallel ranks.
    kwargs: node_type, nodes, memory_fraction, attention ('flash'|'eager'), micro_batches (default: every
    divisor of the per-rank batch), recipe_micro_batch (always a candidate), recompute_modes, pruned, fixed_dims."""
    cands = [c for c in search(model, spec, seq_len=seq_len, global_batch_tokens=global_batch_tokens, tokens=tokens,
                               steps=steps, dtype=dtype, **kwargs) if c.fits]
    order = {m: i for i, m in enumerate(RECOMPUTE_MODES)}
    return sorted(cands, key=lambda c: (-(c.tokens_per_s or 0.0), order[c.recompute], -c.micro_batch,
                                        c.memory.peak_bytes, c.dims.model_parallel))


# ---- recipe -------------------------------------------------------------------------------------------
def recipe_tree(model_tree: dict[str, Any], cand: Candidate, *, seq_len: int, global_batch_tokens: int,
                dtype: str, device_kind: str, cluster: str, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run file: [model]/[train]/[optim] in clusterlm.config's keys, plus [parallel] and [plan].
    `base`, the --model recipe's own tree: its sections ([data], [optim], [checkpoint], ...) and [train]
    keys are kept, the planned [train] keys, [parallel] and [plan] replace its own; without one (a
    preset), [optim] is clusterlm.config's defaults with the warm-up capped at a tenth of the steps."""
    from clusterlm.config import OptimConfig, to_dict

    base = base or {}
    steps = cand.steps or base.get("train", {}).get("max_steps") or 2000
    if "optim" in base:
        optim = dict(base["optim"])
    else:
        optim = to_dict(OptimConfig())
        optim["warmup_steps"] = min(optim["warmup_steps"], max(1, steps // 10))
    plan_section: dict[str, Any] = {"cluster": cluster, "predicted_memory_bytes": int(cand.memory.peak_bytes)}
    if cand.step_time_s is not None:
        plan_section["predicted_step_s"] = round(cand.step_time_s, 6)
        plan_section["predicted_tokens_per_s"] = round(cand.tokens_per_s or 0.0, 1)
    planned_train = {"seq_len": seq_len, "micro_batch_size": cand.micro_batch, "global_batch_tokens": global_batch_tokens,
                     "max_steps": steps, "dtype": dtype, "device": "cpu" if device_kind == "cpu" else "cuda"}
    tree = {k: v for k, v in base.items() if k not in ("model", "train", "optim", "parallel", "plan")}
    return {
        **({"data": tree["data"]} if "data" in tree else {}),
        "model": model_tree,
        "train": {**base.get("train", {}), **planned_train},
        "optim": optim,
        **{k: v for k, v in tree.items() if k != "data"},
        "parallel": {**base.get("parallel", {}),  # its pp_schedule, sequence_parallel
                     "dp_replicate": cand.dims.dp_replicate, "dp_shard": cand.dims.dp_shard, "tp": cand.dims.tp,
                     "pp": cand.dims.pp, "activation_checkpointing": cand.recompute},
        "plan": plan_section,
    }


# ---- CLI ------------------------------------------------------------------------------------------------
_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str) -> int:
    """'10B' -> 10_000_000_000, '2.5e9', '300M', '524288'."""
    m = re.fullmatch(r"\s*([0-9.eE+_]+)\s*([kKmMbBgGtT]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count like 524288, 2.5e9, 300M or 10B")
    try:
        value = float(m.group(1).replace("_", "")) * _SUFFIX.get(m.group(2).lower(), 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count like 524288, 2.5e9, 300M or 10B") from None
    if value <= 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive whole number")
    return int(value)


def _recipe_path(arg: str) -> Path | None:
    """The recipe file `--model` names: a file, or a bundled recipe's name that is not also a preset."""
    from clusterlm.config import bundled_recipes
    from clusterlm.models.config import PRESETS

    if Path(arg).is_file():
        return Path(arg)
    bundled = bundled_recipes()
    if arg not in PRESETS and arg in bundled:
        return bundled[arg]
    return None


def load_model(arg: str, vocab_size: int | None) -> tuple[ModelConfig, dict[str, Any]]:
    """A preset name or a TOML file (a recipe with [model], or bare model keys) -> (config, [model] tree)."""
    from clusterlm.config import from_dict, load_tree

    path = Path(arg)
    if path.suffix == ".toml" or path.is_file():
        tree = load_tree(path)
        tree = dict(tree.get("model", tree))
    else:
        from clusterlm.config import bundled_recipes
        from clusterlm.models.config import PRESETS

        if arg not in PRESETS and arg not in bundled_recipes():
            close = difflib.get_close_matches(arg, [*PRESETS, *bundled_recipes()], n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"--model {arg!r} is not a model preset, a bundled recipe or a TOML file{hint}; "
                              f"presets: {', '.join(PRESETS)}; bundled recipes: {', '.join(bundled_recipes())}")
        tree = {"preset": arg}
    if vocab_size is not None:
        tree["vocab_size"] = vocab_size
    values = dict(tree)
    if "preset" in values:
        values = {**preset_values(values.pop("preset")), **values}
    model = from_dict(ModelConfig, values, "model")
    if model.vocab_size is None:
        raise ConfigError(f"model {arg}: vocab_size is unset (it comes from the data at train time); "
                          f"pass --vocab-size N")
    return model, tree


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "?"
    for unit, div in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= div:
            return f"{s / div:.1f}{unit}"
    return f"{s:.3g}s"


def _table(cands: list[Candidate]) -> str:
    head = (f"{'#':>3} {'dp_rep':>6} {'dp_shard':>8} {'tp':>3} {'pp':>3} {'mb':>4} {'accum':>5} {'recompute':>9} "
            f"{'mem GiB':>8} {'step':>8} {'tokens/s':>10} {'MFU':>6} {'total':>7} {'dev-h':>8}")
    rows = [head]
    for i, c in enumerate(cands, 1):
        d = c.dims
        rows.append(f"{i:>3} {d.dp_replicate:>6} {d.dp_shard:>8} {d.tp:>3} {d.pp:>3} {c.micro_batch:>4} "
                    f"{c.grad_accum_steps:>5} {c.recompute:>9} {c.memory.peak_bytes / GIB:>8.2f} "
                    f"{_fmt_time(c.step_time_s):>8} "
                    f"{(f'{c.tokens_per_s:,.0f}' if c.tokens_per_s else '?'):>10} "
                    f"{(f'{c.mfu:.1%}' if c.mfu is not None else '?'):>6} {_fmt_time(c.total_time_s):>7} "
                    f"{(f'{c.device_hours:,.1f}' if c.device_hours is not None else '?'):>8}")
    return "\n".join(rows)


def explain(c: Candidate) -> str:
    lines = [f"best: {c.dims.describe()}, micro-batch {c.micro_batch} x {c.grad_accum_steps} accumulation steps, "
             f"recompute {c.recompute}", "", f"memory per device (limit {c.memory_limit_bytes / GIB:.2f} GiB):",
             c.memory.explain(), ""]
    if c.step_time_s is None:
        lines.append("step time: unknown (no compute rate for this device)")
    else:
        lines.append(f"step time {c.step_time_s:.4g} s:")
        width = max(len(k) for k in c.time_parts)
        for k, v in c.time_parts.items():
            lines.append(f"  {k:<{width}}  {v:10.4g} s  {c.formulas.get(k, '')}")
    return "\n".join(lines)


_LAYOUT_SIZE = re.compile(r"\b(dp|tp|pp)=(\d+)\b")


def no_valid_layout(pruned: list[Pruned], limit: int = 3) -> str:
    """The error when the search kept no candidate: the reasons it left them out, each counted over every
    choice it refuses (not only those where it was found first), the most frequent first (a generic
    "check the batch" hid e.g. a seq_len longer than the model's context). A reason that differs only
    in a layout size ("... over dp=2 ...", "... over dp=4 ...") is counted once, with the sizes."""
    counts: Counter[str] = Counter()
    sizes: dict[str, dict[str, set[int]]] = {}
    for p in pruned:
        keys = {}
        for r in p.reasons:
            key = _LAYOUT_SIZE.sub(lambda m: f"{m.group(1)}=*", r)
            for dim, n in _LAYOUT_SIZE.findall(r):
                sizes.setdefault(key, {}).setdefault(dim, set()).add(int(n))
            keys[key] = None
        counts.update(list(keys))  # once per choice
    if not counts:
        return "no layout is valid for this model, batch and device count (the search found no layout to try)"

    def text(key: str) -> str:  # the sizes back in: "dp=2/4/8"
        return re.sub(r"\b(dp|tp|pp)=\*", lambda m: f"{m.group(1)}=" + "/".join(map(str, sorted(sizes[key][m.group(1)]))),
                      key)

    parts = [f"{text(key)} ({n} of {len(pruned)} choices)" for key, n in counts.most_common(limit)]
    more = f"; and {len(counts) - limit} other reason(s)" if len(counts) > limit else ""
    return "no layout is valid for this model, batch and device count: " + "; ".join(parts) + more


def explain_pruned(pruned: list[Pruned], unfit: list[Candidate], limit: int = 12) -> str:
    """The candidates the search left out and why: invalid layouts or micro-batches, and those that
    do not fit in memory (with their peak against the limit)."""
    lines = [f"pruned: {len(pruned)} layout/micro-batch choice(s) invalid, {len(unfit)} candidate(s) over the "
             f"memory limit"]
    for p in pruned[:limit]:
        what = p.layout + (f", micro-batch {p.micro_batch}" if p.micro_batch is not None else "")
        lines.append(f"  {what}: {'; '.join(p.reasons)}")
    if len(pruned) > limit:
        lines.append(f"  ... and {len(pruned) - limit} more")
    for c in sorted(unfit, key=lambda c: c.memory.peak_bytes)[:limit]:
        lines.append(f"  {c.dims.describe()}, micro-batch {c.micro_batch} x {c.grad_accum_steps}, recompute "
                     f"{c.recompute}: needs {c.memory.peak_bytes / GIB:.2f} GiB > limit "
                     f"{c.memory_limit_bytes / GIB:.2f} GiB")
    if len(unfit) > limit:
        lines.append(f"  ... and {len(unfit) - limit} more over the memory limit")
    return "\n".join(lines)


def recipe_line(cands: list[Candidate], recipe_mb: int, recipe: ParallelDims | None = None) -> str:
    """Where the recipe's own layout ranks: its [parallel] sizes when they name a layout (world size > 1; else
    data-parallel replication, one device per rank, as launch gives it), its micro-batch and its
    activation_checkpointing (`recipe`: the recipe's [parallel]; None: none)."""
    rc = recipe.activation_checkpointing if recipe is not None else "none"
    sizes = ("dp_replicate", "dp_shard", "tp", "pp")
    named = recipe is not None and recipe.world_size > 1
    layout = f"{recipe.describe()}, " if named else ""

    def is_recipes(c: Candidate) -> bool:
        if c.micro_batch != recipe_mb or c.recompute != rc:
            return False
        if named:
            return all(getattr(c.dims, k) == getattr(recipe, k) for k in sizes)
        return c.dims.model_parallel == 1 and c.dims.dp_shard == 1

    mine = [(i, c) for i, c in enumerate(cands, 1) if is_recipes(c)]
    if not mine:
        world = cands[0].dims.world_size if cands else None
        why = (f": it needs {recipe.world_size} devices, the plan has {world}" if named and world
               and world != recipe.world_size else " (see pruned)")
        return f"recipe's layout ({layout}micro-batch {recipe_mb}, recompute {rc}): not among the fitting candidates{why}"
    i, c = mine[0]
    best = cands[0]
    if c.step_time_s is None or best.step_time_s is None:
        return (f"recipe's layout ({layout}micro-batch {recipe_mb} x {c.grad_accum_steps}"
                + (f", recompute {rc}" if rc != "none" else "") + f"): rank {i} of {len(cands)}")
    return (f"recipe's layout ({layout}micro-batch {recipe_mb} x {c.grad_accum_steps}, recompute {rc}): rank {i} of "
            f"{len(cands)}, predicted {c.step_time_s * 1e3:.4g} ms/step; best {best.step_time_s * 1e3:.4g} ms/step "
            f"({(best.step_time_s - c.step_time_s) / c.step_time_s:+.1%})")


def _dry_run(c: Candidate) -> str:
    """Build the planned DeviceMesh on a fake process group at the planned world size (needs torch)."""
    from clusterlm.parallel.mesh import dry_run_mesh

    return f"dry run: built {dry_run_mesh(c.dims)} on a fake process group of {c.dims.world_size} ranks"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clusterlm plan", description="Plan a training run on a cluster: memory, "
                                "FLOPs, step time and parallel layout. Torch-free.")
    p.add_argument("--model", required=True, help="model preset name, or a TOML file (recipe with [model], or model keys)")
    p.add_argument("--cluster", required=True, help="cluster spec TOML (from clusterlm probe) or preset name")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--tokens", type=parse_count, help="training tokens (e.g. 10B)")
    budget.add_argument("--steps", type=parse_count, help="optimizer steps")
    p.add_argument("--global-batch-tokens", type=parse_count, default=None,
                   help=f"tokens per optimizer step (default: a --model recipe's [train] global_batch_tokens, "
                        f"else micro_batch_size x seq_len; else {DEFAULT_GLOBAL_BATCH_TOKENS}, rounded to seq-len)")
    p.add_argument("--seq-len", type=int, default=None, help="context length (default: a --model recipe's [train] "
                   "seq_len, else the model's max_seq_len)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="auto = a --model recipe's [train] dtype, else bf16 where the device has a bf16 figure, "
                        "else fp32")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary size when the model preset leaves it unset")
    p.add_argument("--nodes", type=int, default=None, help="plan for this many nodes (default: all in the spec)")
    p.add_argument("--node-type", default=None, help="node type to plan on (default: the one with most devices)")
    p.add_argument("--memory-fraction", type=float, default=DEFAULT_MEMORY_FRACTION,
                   help="fraction of device memory the plan may fill")
    p.add_argument("--attention", choices=["flash", "eager"], default="flash",
                   help="attention kernel: flash stores no T x T matrix (SDPA), eager does")
    p.add_argument("--micro-batch", type=int, default=None, help="the recipe's own micro-batch size, always a "
                   "candidate (default: [train] micro_batch_size of a --model recipe)")
    p.add_argument("--force", action="store_true", help="plan from a probe marked disturbed (other processes took "
                   "CPU time while it measured) instead of refusing")
    p.add_argument("--top", type=int, default=10, help="rows of the table")
    p.add_argument("--out", default=None, help="write the best plan as a recipe TOML")
    p.add_argument("--explain", action="store_true", help="print the arithmetic of the best candidate")
    p.add_argument("--dry-run", action="store_true", help="build the planned device mesh on a fake process group "
                   "(imports torch)")
    args = p.parse_args(argv)
    for flag, value in (("--micro-batch", args.micro_batch), ("--top", args.top), ("--seq-len", args.seq_len)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value} must be >= 1")
    if args.out:
        from clusterlm.fsutil import check_output_path

        check_output_path(args.out, "--out")  # before the search (and --dry-run's torch), not after

    recipe = _recipe_path(args.model)  # a TOML file or a bundled recipe's name; None for a preset
    model, model_tree = load_model(str(recipe or args.model), args.vocab_size)
    train_tree: dict[str, Any] = {}  # a --model recipe's [train]: its batch is the one to plan, unless flags say
    recipe_full: dict[str, Any] | None = None  # a --model recipe (with [model]): its other sections go to --out
    if recipe is not None:
        from clusterlm.config import TrainConfig, from_dict, load_tree

        recipe_full = load_tree(recipe)
        recipe_full = recipe_full if "model" in recipe_full else None
        train_tree = (recipe_full or {}).get("train", {})
        tc = from_dict(TrainConfig, train_tree, "train")  # typed and checked, as train would read it
        train_tree = {k: getattr(tc, k) for k in train_tree}
    recipe_mb = args.micro_batch if args.micro_batch is not None else train_tree.get("micro_batch_size")
    fixed_dims: dict[str, Any] = {}  # the recipe's [parallel] keys the search does not choose, kept in --out
    if recipe_full is not None:
        from clusterlm.config import from_dict

        keys = {k: v for k, v in recipe_full.get("parallel", {}).items() if k in ("pp_schedule", "sequence_parallel")}
        typed = from_dict(ParallelDims, keys, "parallel")
        fixed_dims = {k: getattr(typed, k) for k in keys}
    recipe_dims = from_dict(ParallelDims, recipe_full.get("parallel", {}), "parallel") if recipe_full else None
    spec = load_spec(args.cluster)
    if spec.probe is not None and spec.probe.disturbed:
        if not args.force:
            raise ConfigError(f"{args.cluster}: the probe was disturbed ({spec.probe.summary()}); its step-time "
                              f"figures are not this node's. Re-probe an idle node, or pass --force to plan anyway")
        print(f"WARNING: planning from a disturbed probe (--force): {spec.probe.summary()}")
    node = spec.node_type(args.node_type)
    device = node.device
    if device is None:
        raise ConfigError(f"node type {node.name!r} lists no device")
    if device.kind == "cpu":  # a CPU node's figures are its CPU's: say so when this machine has another
        from clusterlm.cluster.probe import other_cpu_note

        note = other_cpu_note(node, args.cluster)
        if note:
            print(f"NOTE: {note}")
    seq_len = args.seq_len if args.seq_len is not None else train_tree.get("seq_len") or model.max_seq_len
    # the recipe's global batch; its 0 (= micro-batch x seq_len x dp) is planned as one device's batch
    recipe_gbt = train_tree.get("global_batch_tokens") or (recipe_mb * seq_len if "micro_batch_size" in train_tree
                                                           else None)
    gbt = (args.global_batch_tokens or recipe_gbt
           or max(seq_len, DEFAULT_GLOBAL_BATCH_TOKENS // seq_len * seq_len))
    dtype = args.dtype
    recipe_dtype = train_tree.get("dtype", "auto")  # a --model recipe's [train] dtype, as train resolves it
    if dtype == "auto" and recipe_dtype in ("fp32", "bf16", "fp16"):
        dtype = recipe_dtype
    if dtype == "auto":
        has_bf16 = device.peak("bf16")[0] or device.matmul_tflops("bf16")
        # bf16-native: bf16 on a CPU with AMX or AVX512-BF16 too (clusterlm.device.autocast_dtype)
        native_cpu = recipe_dtype == "bf16-native" and device.kind == "cpu" and bool(
            {"amx_bf16", "avx512_bf16"} & set(node.cpu.flags))
        dtype = "bf16" if (has_bf16 and device.kind != "cpu") or native_cpu else "fp32"
    n_nodes = args.nodes or node.count
    fpt = flops_mod.training_flops_per_token(model, seq_len)
    kwargs = dict(seq_len=seq_len, global_batch_tokens=gbt, tokens=args.tokens, steps=args.steps, dtype=dtype,
                  node_type=args.node_type, nodes=args.nodes, memory_fraction=args.memory_fraction,
                  attention=args.attention, recipe_micro_batch=recipe_mb, fixed_dims=fixed_dims)
    pruned: list[Pruned] = []
    everything = search(model, spec, pruned=pruned, **kwargs)
    cands = plan(model, spec, **kwargs)
    g = param_groups(model)
    from_recipe = " (the recipe's [train])" if train_tree and not args.global_batch_tokens and recipe_gbt else ""
    print(f"model: {args.model} ({g['total'] / 1e9:.3g}B parameters), seq_len {seq_len}, global batch {gbt:,} tokens "
          f"({gbt // seq_len} samples){from_recipe}, {dtype}")
    print(f"cluster: {spec.name}: {n_nodes} x {node.name} node(s) x {device.count} {device.name} = "
          f"{n_nodes * device.count} device(s)")
    print(f"FLOPs: {fpt.total:.4g} per token; {fpt.convention}")
    rate = compute_rate(device, dtype)
    ops, _ = step_model(model, device, dtype)
    if ops is not None:
        print(f"step model: per op, from the probe's figures: measured matmul (GEMM) sweep over {len(ops.sweep)} "
              f"{dtype} shapes ({min(r[3] for r in ops.sweep):.3g}-{max(r[3] for r in ops.sweep):.3g} TFLOP/s), "
              f"causal attention sweep over {len(ops.attention)} (T, Hd), fwd+bwd ns per element of "
              f"{', '.join(ops.kernels)}, elementwise bandwidth {min(r[1] for r in ops.elementwise):.3g}-"
              f"{max(r[1] for r in ops.elementwise):.3g} GB/s by size, {ops.op_overhead_us:g} us per op")
    else:
        print("compute rate per device: " + (f"{rate.tflops:.4g} TFLOP/s = " if rate.tflops else "") + rate.how)
    for line in (everything[0].assumptions if everything else ()):
        if line != rate.how:
            print(f"note: {line}")
    if not everything:
        raise ConfigError(no_valid_layout(pruned))
    if not cands:
        best = min(everything, key=lambda c: c.memory.peak_bytes)
        print(f"\nnothing fits: the smallest candidate needs {best.memory.peak_bytes / GIB:.2f} GiB per device, "
              f"the limit is {best.memory_limit_bytes / GIB:.2f} GiB. Closest:")
        print(explain(best))
        print("\nmore devices (--nodes), a shorter --seq-len or a smaller model would help")
        return 1
    print(f"\n{len(cands)} of {len(everything)} candidates fit; top {min(args.top, len(cands))}:")
    print(_table(cands[: args.top]))
    best = cands[0]
    if best.step_time_s is None:
        print(f"\nstep time unknown: {rate.how}")
    if recipe_mb:
        print("\n" + recipe_line(cands, recipe_mb, recipe_dims))
    if args.explain:
        print()
        print(explain(best))
        print()
        print(explain_pruned(pruned, [c for c in everything if not c.fits]))
    if args.out:
        import tomli_w

        from clusterlm.fsutil import atomic_write_text

        tree = recipe_tree(model_tree, best, seq_len=seq_len, global_batch_tokens=gbt, dtype=dtype,
                           device_kind=device.kind, cluster=spec.name, base=recipe_full)
        kept = (f"# Its other sections and [train] keys are {args.model}'s; [parallel], [plan] and the planned\n"
                f"# [train] keys replace its own.\n" if recipe_full else "")
        header = (f"# Planned by `clusterlm plan --model {args.model} --cluster {args.cluster}`.\n" + kept
                  + ("" if "data" in tree else "# Add a [data] section (dir = your prepared data).\n")
                  + "# [parallel] and [plan] are read by the distributed trainer; the predicted figures are compared\n"
                  "# with measured ones at run time.\n")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, header + tomli_w.dumps(tree))
        print(f"\nwrote {args.out}")
    if args.dry_run:
        try:
            print(_dry_run(best))
        except ImportError as e:
            raise NotImplementedError(f"--dry-run needs torch ({e})") from e
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
