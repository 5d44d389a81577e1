"""AdamW with decoupled weight decay on matrices only, and the lr schedule as a pure function of step.

    >>> from clusterlm.config import OptimConfig
    >>> cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=100, schedule="cosine")
    >>> lr_at(0, cfg, max_steps=2000), lr_at(99, cfg, max_steps=2000), lr_at(2000, cfg, max_steps=2000)
    (1e-05, 0.001, 0.0001)

The loop sets the lr each step (`set_lr(opt, lr_at(step, ...), step)`: each group gets lr times its
"lr_scale", or 0 before its "unfreeze_at" step), so the schedule has no state: resuming at step s
gives the same lr as an uninterrupted run at step s.

Schedules (step counts from 0 = the first optimizer step; W = warmup_steps):
  warmup     lr * (step + 1) / W for step < W (nanoGPT's shape: never 0, reaches lr at step W-1)
  cosine     min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,  p = (step - W) / decay_steps
  linear     lr + (min_lr - lr) * p
  wsd        warmup, stable at lr, then linear to min_lr over the last wsd_decay_fraction of max_steps
  constant   lr after warmup
decay_steps = 0 means "until max_steps" (decay_steps = max_steps - W). For p >= 1 the lr stays at
min_lr. A decay reaches min_lr at step W + decay_steps (cosine/linear) or max_steps (wsd): one past
the last step when it spans to the end, as in nanoGPT. wsd ignores decay_steps.
"""

from __future__ import annotations

import logging
import math
import re

import torch
from torch import nn

from clusterlm.config import OptimConfig

log = logging.getLogger(__name__)

# Parameters whose owning module path ends in one of these are embedding tables (STYLE.md names);
# tables built as nn.Embedding are recognised by type as well.
EMBEDDING_NAMES = ("tok_embeddings", "pos_embeddings")
# the norm over the embeddings (an encoder's or encdec's `emb_norm`, BERT's embeddings.LayerNorm) sits
# at the tables' depth for layer_lr_decay and unfreeze_every, below the first layer, not above the last
EMBEDDING_NORM_NAMES = ("emb_norm",)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `max_steps` steps."""
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if max_steps < 1:
        raise ValueError(f"max_steps={max_steps} must be >= 1")
    W = cfg.warmup_steps
    if step < W:
        return cfg.lr * (step + 1) / W
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_len = max(1, round(cfg.wsd_decay_fraction * max_steps))
        start = max(W, max_steps - decay_len)  # warmup wins if the two overlap: a shorter decay,
        if step < start:                       # still ending at max_steps
            return cfg.lr
        p = (step - start) / max(1, max_steps - start)
        return cfg.min_lr if p >= 1.0 else cfg.lr + (cfg.min_lr - cfg.lr) * p
    decay_steps = cfg.decay_steps or max(1, max_steps - W)
    p = (step - W) / decay_steps
    if p >= 1.0:
        return cfg.min_lr
    if cfg.schedule == "cosine":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    if cfg.schedule == "linear":
        return cfg.lr + (cfg.min_lr - cfg.lr) * p
    raise ValueError(f"optim.schedule={cfg.schedule!r}; expected cosine, linear, wsd or constant")


def schedule_warning(cfg: OptimConfig, max_steps: int) -> str | None:
    """A line for the log when the schedule cannot run as configured: a warmup as long as the run
    (warmup_steps >= max_steps) never reaches optim.lr, so the whole run trains below it; None if fine."""
    if cfg.warmup_steps < max_steps:
        return None
    return (f"optim.warmup_steps={cfg.warmup_steps} >= train.max_steps={max_steps}: the warmup never ends, so the lr "
            f"never reaches optim.lr={cfg.lr:g} (the last step's is {lr_at(max_steps - 1, cfg, max_steps):.3g}) and "
            f"optim.schedule={cfg.schedule!r} never starts; lower optim.warmup_steps")


def _embedding_param_ids(model: nn.Module) -> set[int]:
    """ids of parameters that are embedding tables under any of their names (tied ones included)."""
    ids: set[int] = set()
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False):
            path = f"{mod_name}.{p_name}".split(".") if mod_name else [p_name]
            if isinstance(mod, nn.Embedding) or any(part in EMBEDDING_NAMES for part in path):
                ids.add(id(p))
    return ids


def split_params(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(decay, no_decay) lists of (name, parameter), each trainable parameter exactly once.

    Decay: matrices that multiply activations (>= 2-D): Linear weights, LSTM/GRU weight_ih/weight_hh.
    No decay: biases and norm weights (1-D), and embedding tables (nn.Embedding, tok_embeddings,
    pos_embeddings). A tied output weight IS the token embedding (one Parameter), so it does not
    decay, whichever name `named_parameters` reports it under.
    """
    emb = _embedding_param_ids(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # remove_duplicate=True: a tied parameter appears once
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in emb else no_decay).append((name, p))
    return decay, no_decay


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # Transformer blocks: layers.3.attention.wq.weight
_RNN_LAYER = re.compile(r"_l(\d+)(?:_reverse)?$")   # nn.LSTM / nn.GRU: rnn.weight_ih_l1, ..._l0_reverse


def layer_depth(name: str) -> int | None:
    """0 for embedding tables and their norm (emb_norm), i + 1 for Transformer block i or recurrent
    layer i, None for what sits above the last layer (final norm, output, a classifier's head):
    `layer_lr_scales` puts it on top. Encoder and decoder blocks with the same index share a depth."""
    parts = name.split(".")
    if any(part in EMBEDDING_NAMES or part in EMBEDDING_NORM_NAMES for part in parts):
        return 0
    if m := _LAYER.search(name):
        return int(m.group(1)) + 1
    if m := _RNN_LAYER.search(parts[-1]):
        return int(m.group(1)) + 1
    return None


def layers_from_top(names: list[str]) -> dict[str, int]:
    """How many layers below the top each parameter sits: 0 for the head and final norm, 1 for the
    last block or recurrent layer, ..., the most for the embeddings."""
    depths = {n: layer_depth(n) for n in names}
    top = max((d for d in depths.values() if d is not None), default=0) + 1
    return {n: top - (top if d is None else d) for n, d in depths.items()}


def layer_lr_scales(names: list[str], decay: float) -> dict[str, float]:
    """Layer-wise learning-rate decay (ULMFiT's discriminative fine-tuning, ELECTRA's layer-wise
    decay): the top (head, final norm) keeps the lr, each layer below it gets `decay` times the one
    above, the embeddings the least: decay ** (top - depth)."""
    return {n: decay ** k for n, k in layers_from_top(names).items()}


def set_lr(optimizer: torch.optim.Optimizer, lr: float, step: int) -> None:
    """Give every group the schedule's `lr` for optimizer step `step`, times its "lr_scale"
    (optim.layer_lr_decay, LoRA+), or 0 before its "unfreeze_at" step (optim.unfreeze_every)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0) if step >= group.get("unfreeze_at", 0) else 0.0


def lora_b_ids(model: nn.Module) -> set[int]:
    """ids of the output-side LoRA factors (`lora_b`, out x r, zero at the start) of the model's
    LoRALinear adapters: the parameters LoRA+ (Hayou et al. 2024) trains at a higher lr. An embedding
    adapter (LoRAEmbedding) is left out: its zero factor is lora_a, on the input side."""
    from clusterlm.finetune.lora import LoRALinear

    return {id(m.lora_b) for m in model.modules() if isinstance(m, LoRALinear)}


def param_groups(model: nn.Module, weight_decay: float, layer_lr_decay: float = 1.0,
                 lora_plus_ratio: float = 1.0, unfreeze_every: int = 0) -> list[dict]:
    """Optimizer groups: [{"params": matrices, "weight_decay": weight_decay},
    {"params": the rest, "weight_decay": 0.0}]; an empty group is left out. With layer_lr_decay < 1
    or unfreeze_every > 0 each of the two splits by layer, with lora_plus_ratio != 1 the LoRA B
    factors get a group of their own, and every group carries "lr_scale" (`set_lr` gives it
    schedule * lr_scale): `layer_lr_scales` times lora_plus_ratio for a LoRA B factor (LoRA+); and
    with unfreeze_every > 0, "unfreeze_at": the step from which it trains, unfreeze_every times its
    `layers_from_top` counted from the topmost trainable parameter (ULMFiT's gradual unfreezing: the
    head first, the embeddings last)."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay={weight_decay} must be >= 0")
    if lora_plus_ratio <= 0:
        raise ValueError(f"lora_plus_ratio={lora_plus_ratio} must be > 0")
    if unfreeze_every < 0:
        raise ValueError(f"unfreeze_every={unfreeze_every} must be >= 0")
    decay, no_decay = split_params(model)
    if layer_lr_decay == 1.0 and lora_plus_ratio == 1.0 and not unfreeze_every:
        groups = [{"params": [p for _, p in decay], "weight_decay": weight_decay},
                  {"params": [p for _, p in no_decay], "weight_decay": 0.0}]
    else:
        names = [n for n, _ in decay + no_decay]
        layer = layer_lr_scales(names, layer_lr_decay)
        # the topmost trainable layer starts at step 0 even when nothing above it trains (LoRA, a frozen
        # head, a tied LSTM without an output bias): otherwise the first unfreeze_every steps train nothing
        depth = layers_from_top(names)
        first = min(depth.values(), default=0)
        start = {n: (k - first) * unfreeze_every for n, k in depth.items()}
        b_ids = lora_b_ids(model) if lora_plus_ratio != 1.0 else set()
        keys = {n: (layer[n] * (lora_plus_ratio if id(p) in b_ids else 1.0), start[n]) for n, p in decay + no_decay}
        groups = []
        for named, wd in ((decay, weight_decay), (no_decay, 0.0)):
            for scale, at in sorted({keys[n] for n, _ in named}, key=lambda k: (-k[0], k[1])):
                group = {"params": [p for n, p in named if keys[n] == (scale, at)], "weight_decay": wd,
                         "lr_scale": scale}
                if unfreeze_every:
                    group["unfreeze_at"] = at
                groups.append(group)
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    return groups


FUSED_DEVICES = ("cpu", "cuda")


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, fused: bool | None = None,
                    lora_plus_ratio: float = 1.0) -> torch.optim.AdamW:
    """AdamW (decoupled weight decay, Loshchilov & Hutter 2019) over `param_groups`.

    fused=None (auto) uses torch's fused AdamW kernel when every parameter is a floating-point
    tensor on CPU or CUDA: one kernel over all tensors instead of a loop per tensor, several times
    faster per optimizer step (measurements: docs/training.md). Results differ from the foreach path in the last bits, so a run and its
    resume must use the same setting (they do: the choice depends only on the devices).
    lora_plus_ratio: the LoRA B factors' lr over the rest's (finetune.lora_plus_ratio, LoRA+).
    """
    decay, no_decay = split_params(model)
    params = [p for _, p in decay + no_decay]
    if fused is None:
        fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    n_decay = sum(p.numel() for _, p in decay)
    n_rest = sum(p.numel() for _, p in no_decay)
    log.info("AdamW%s: %s parameters in %d tensors decay (wd=%g), %s in %d tensors do not",
             " (fused)" if fused else "", f"{n_decay:,}", len(decay), cfg.weight_decay, f"{n_rest:,}", len(no_decay))
    groups = param_groups(model, cfg.weight_decay, cfg.layer_lr_decay, lora_plus_ratio, cfg.unfreeze_every)
    if lora_plus_ratio != 1.0:
        log.info("LoRA+: the LoRA B factors (%d tensors) at %g x the lr", len(lora_b_ids(model)), lora_plus_ratio)
    if cfg.layer_lr_decay != 1.0:
        log.info("layer-wise lr decay %g: lr x %s (from the top down to the embeddings)", cfg.layer_lr_decay,
                 ", ".join(f"{s:.3g}" for s in sorted({g["lr_scale"] for g in groups}, reverse=True)))
    if cfg.unfreeze_every:
        starts = sorted({g["unfreeze_at"] for g in groups})
        log.info("gradual unfreezing every %d steps: %d layer groups, from the top down, start training at steps %s "
                 "(lr 0 before: their gradients and Adam moments are still computed)", cfg.unfreeze_every,
                 len(starts), ", ".join(map(str, starts)))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)
