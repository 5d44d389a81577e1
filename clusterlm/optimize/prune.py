"""Pruning: unstructured magnitude (zeros, saved dense) and structured (heads and MLP channels
removed, so the matrices really shrink), with an optional short recovery fine-tune.

    clusterlm prune runs/shakespeare_char --sparsity 0.5 --method magnitude --out runs/sc_mag50
    clusterlm prune runs/shakespeare_char --sparsity 0.5 --method structured --finetune-steps 200 \\
        --out runs/sc_struct50

magnitude: in every Linear weight of the blocks (wq wk wv wo w1 w2 w3), and in an LSTM/GRU in every
layer's input-to-hidden and hidden-to-hidden matrix (weight_ih_l*, weight_hh_l*), the fraction
`sparsity` of entries with the smallest |w| (per matrix) is set to zero. Embeddings, norms, biases
and the output projection (tied to the embedding in GPT-style models) are kept. A model with no
such matrix, or a sparsity that zeroes no entry, is refused before anything is written. The checkpoint stays dense
(same size on disk, same speed): the zeros are a starting point for sparse kernels or compression.

structured: ModelConfig has one n_heads and one hidden_dim for all layers, so the same number of
heads and MLP channels is removed in every layer (the least important ones of that layer):
round(sparsity * n_heads) heads (whole key/value groups under grouped-query attention, so every kept
query head keeps its key/value head) and round(sparsity * hidden_dim) channels. Importance is the
weight magnitude a unit owns: for head h, |wq_h|^2 + |wk_h|^2 + |wv_h|^2 + |wo[:, h]|^2; for
channel c, |w1_c| * |w2[:, c]| (times |w3_c| for SwiGLU). The new n_heads, n_kv_heads, head_size
(unchanged Hd, which no longer equals dim / n_heads) and ffn_dim are written to the config.

Fine-tune (--finetune-steps N): AdamW (clusterlm.train.optim.build_optimizer with the run's
[optim] section) on the run's training data (or --data DIR) with the model's own objective (next
token; an encoder's masked LM; an encoder-decoder's source/target pairs or span corruption), the
learning rate warmed up over the
first 10% of the steps to --finetune-lr, then cosine-decayed to the run's min_lr (a trained model
sits at the end of its schedule: its peak lr undoes more than the pruning took away); magnitude
masks are re-applied after each step so pruned weights stay zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
from pathlib import Path

import torch
from torch import nn

from clusterlm.finetune.objectives import objective_of

log = logging.getLogger(__name__)

METHODS = ("magnitude", "structured")
_BLOCK_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1",
                  "feed_forward.w2", "feed_forward.w3")


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1)")


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers inside the Transformer blocks, by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith(_BLOCK_LINEARS)}


def prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight matrices magnitude pruning zeroes, by parameter name: the block Linears of a
    Transformer (encoder, decoder) and the input-to-hidden and hidden-to-hidden matrices of every
    LSTM/GRU layer (weight_ih_l*, weight_hh_l*: the recurrent model's counterpart of the blocks)."""
    weights = {f"{n}.weight": m.weight for n, m in block_linears(model).items()}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.RNNBase):
            prefix = f"{name}." if name else ""
            weights.update({prefix + p: w for p, w in mod.named_parameters(recurse=False)
                            if p.startswith(("weight_ih_l", "weight_hh_l"))})
    return weights


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float) -> dict[str, torch.Tensor]:
    """Zero the smallest-|w| fraction of each prunable weight matrix in place; returns the keep masks
    by parameter name. Refused when nothing would be zeroed: a checkpoint written as "pruned" that
    equals its source is worse than an error."""
    _check_sparsity(sparsity)
    weights = prunable_weights(model)
    arch = getattr(getattr(model, "config", None), "arch", type(model).__name__)
    if not weights:
        raise ValueError(f"magnitude pruning found no weight matrix to prune in this model (arch {arch!r}); it "
                         "prunes Transformer block Linears and LSTM/GRU recurrent weights")
    if sparsity > 0 and all(round(sparsity * w.numel()) == 0 for w in weights.values()):
        raise ValueError(f"sparsity={sparsity} zeroes no entry of any of the {len(weights)} weight matrices "
                         f"(the largest has {max(w.numel() for w in weights.values())} entries); use a larger "
                         "--sparsity")
    masks = {}
    for name, w in weights.items():
        k = int(round(sparsity * w.numel()))  # entries to zero
        mask = torch.ones_like(w, dtype=torch.bool)
        if k > 0:
            idx = torch.topk(w.abs().flatten(), k, largest=False).indices
            mask.view(-1)[idx] = False
        w.mul_(mask)
        masks[name] = mask
    return masks


def _keep(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the n_keep largest scores, in ascending order (keeps the original unit order)."""
    return torch.topk(scores, n_keep).indices.sort().values


@torch.no_grad()
def structured_prune(model: nn.Module, sparsity: float) -> nn.Module:
    """A new Transformer with round(sparsity * n_heads) heads and round(sparsity * hidden_dim) MLP
    channels removed from every layer; `model` is left unchanged."""
    from clusterlm.models.build import build_model

    _check_sparsity(sparsity)
    cfg = model.config
    if cfg.arch != "transformer":
        raise ValueError(f"structured pruning needs a decoder-only Transformer (model.arch='transformer'), got "
                         f"model.arch={cfg.arch!r}; prune it with --method magnitude")
    H, K, Hd, F = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.hidden_dim
    rep = H // K  # query heads per key/value head
    k_keep = max(1, K - int(round(sparsity * K))) if rep > 1 else max(1, H - int(round(sparsity * H)))
    h_keep = k_keep * rep if rep > 1 else k_keep
    f_keep = max(1, F - int(round(sparsity * F)))
    new_cfg = dataclasses.replace(cfg, n_heads=h_keep, n_kv_heads=(k_keep if cfg.n_kv_heads is not None else None),
                                  head_size=Hd, ffn_dim=f_keep)
    old = {k: v for k, v in model.state_dict().items()}
    new_state: dict[str, torch.Tensor] = {}
    for key in model.layers.keys():
        p = f"layers.{key}."
        a, f = p + "attention.", p + "feed_forward."
        wq = old[a + "wq.weight"].view(H, Hd, -1)  # (H, Hd, D)
        wk = old[a + "wk.weight"].view(K, Hd, -1)  # (K, Hd, D)
        wv = old[a + "wv.weight"].view(K, Hd, -1)
        wo = old[a + "wo.weight"].view(-1, H, Hd)  # (D, H, Hd)
        q_score = wq.pow(2).sum((1, 2)) + wo.pow(2).sum((0, 2))  # (H,)
        kv_score = wk.pow(2).sum((1, 2)) + wv.pow(2).sum((1, 2))  # (K,)
        if rep > 1:  # whole groups: a key/value head with the rep query heads that read it
            groups = _keep(q_score.view(K, rep).sum(1) + kv_score, k_keep)  # (k_keep,)
            heads = (groups[:, None] * rep + torch.arange(rep)).flatten()  # (h_keep,)
            kv = groups
        else:
            heads = _keep(q_score + kv_score, h_keep)
            kv = heads
        new_state[a + "wq.weight"] = wq[heads].reshape(h_keep * Hd, -1)
        new_state[a + "wk.weight"] = wk[kv].reshape(len(kv) * Hd, -1)
        new_state[a + "wv.weight"] = wv[kv].reshape(len(kv) * Hd, -1)
        new_state[a + "wo.weight"] = wo[:, heads].reshape(wo.shape[0], h_keep * Hd)
        if cfg.bias:
            new_state[a + "wq.bias"] = old[a + "wq.bias"].view(H, Hd)[heads].flatten()
            new_state[a + "wk.bias"] = old[a + "wk.bias"].view(K, Hd)[kv].flatten()
            new_state[a + "wv.bias"] = old[a + "wv.bias"].view(K, Hd)[kv].flatten()
            new_state[a + "wo.bias"] = old[a + "wo.bias"]
        w1, w2 = old[f + "w1.weight"], old[f + "w2.weight"]  # (F, D), (D, F)
        c_score = w1.norm(dim=1) * w2.norm(dim=0)  # (F,)
        if cfg.mlp == "swiglu":
            c_score = c_score * old[f + "w3.weight"].norm(dim=1)
        ch = _keep(c_score, f_keep)
        new_state[f + "w1.weight"] = w1[ch]
        new_state[f + "w2.weight"] = w2[:, ch]
        if cfg.mlp == "swiglu":
            new_state[f + "w3.weight"] = old[f + "w3.weight"][ch]
        if cfg.bias:
            new_state[f + "w1.bias"] = old[f + "w1.bias"][ch]
            new_state[f + "w2.bias"] = old[f + "w2.bias"]
            if cfg.mlp == "swiglu":
                new_state[f + "w3.bias"] = old[f + "w3.bias"][ch]
    for k, v in old.items():
        new_state.setdefault(k, v)
    with torch.device("meta"):
        pruned = build_model(new_cfg)
    pruned.to_empty(device=next(model.parameters()).device)
    pruned.init_weights(0)  # rotary tables; every weight is overwritten next
    pruned.load_state_dict({k: v.contiguous() for k, v in new_state.items()})
    log.info("structured pruning: heads %d -> %d, kv heads %d -> %d, MLP channels %d -> %d per layer; "
             "parameters %s -> %s", H, h_keep, K, new_cfg.kv_heads, F, f_keep, f"{cfg.num_params():,}",
             f"{new_cfg.num_params():,}")
    return pruned


def finetune_optim(optim_cfg: object, steps: int, lr: float | None) -> object:
    """The run's [optim] for a recovery fine-tune: warmup over 10% of `steps` to `lr` (default: the
    run's min_lr x 3), cosine down to the run's min_lr (or to `lr` if that is lower)."""
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--finetune-lr={lr} must be a finite number > 0")
    peak = optim_cfg.min_lr * 3 if lr is None else lr
    if not peak > 0:
        raise ValueError(f"the default fine-tune lr, 3 x the run's optim.min_lr={optim_cfg.min_lr}, is {peak}; pass "
                         "--finetune-lr (a number > 0)")
    return dataclasses.replace(optim_cfg, lr=peak, min_lr=min(optim_cfg.min_lr, peak), schedule="cosine",
                               warmup_steps=max(1, steps // 10), decay_steps=0)


def check_finetune_data(data: Path, objective: str) -> dict:
    """`data` must be a prepared directory of the kind `objective` reads (token shards, or pairs for
    seq2seq: finetune.objectives.check_objective_data); returns its meta."""
    from clusterlm.errors import DataError
    from clusterlm.finetune.objectives import check_objective_data

    if not (data / "meta.json").is_file():
        raise DataError(f"fine-tune data {data} has no meta.json; pass --data DIR (a `clusterlm prepare` output)")
    return check_objective_data(data, objective)


def _train_batches(run_cfg: object, objective: str, data_dir: Path, tokenizer_file: Path | None) -> object:
    """The training loader of `objective` on data_dir's train split (run_cfg.train: batch, seq_len, seed)."""
    tc = run_cfg.train
    if objective == "lm":
        from clusterlm.data.loader import TokenLoader

        return TokenLoader(data_dir, "train", batch_size=tc.micro_batch_size, seq_len=tc.seq_len, seed=tc.seed)
    from clusterlm.data.mlm import MASK
    from clusterlm.finetune.objectives import train_loader
    from clusterlm.tokenizer import load_tokenizer

    if objective == "mlm" and (tokenizer_file is None or load_tokenizer(tokenizer_file).token_id(MASK) is None):
        raise ValueError(f"the masked-LM fine-tune needs the checkpoint's tokenizer to have {MASK}; it has none")
    cfg = dataclasses.replace(run_cfg, finetune=dataclasses.replace(run_cfg.finetune, task=objective))
    return train_loader(cfg, data_dir, tokenizer_file, rank=0, world=1)


def finetune(model: nn.Module, run_cfg: object, steps: int, data_dir: str | Path, *, batch_size: int | None = None,
             masks: dict[str, torch.Tensor] | None = None, lr: float | None = None,
             tokenizer_file: Path | None = None) -> list[float]:
    """`steps` AdamW steps of the model's own objective (finetune.objectives.objective_of: next-token,
    masked LM, span corruption or pairs; a bidirectional encoder given the next-token loss sees its
    targets and learns to copy them) on data_dir's train split (lr schedule: `finetune_optim`); returns the
    losses. `tokenizer_file`: the checkpoint's, for the mask/sentinel/pad ids of the other objectives."""
    from clusterlm.eval.metrics import lm_loss
    from clusterlm.train.optim import build_optimizer, lr_at

    tc = run_cfg.train
    tc = dataclasses.replace(tc, seq_len=min(tc.seq_len, model.config.max_seq_len),
                             micro_batch_size=batch_size or tc.micro_batch_size)
    loader = _train_batches(dataclasses.replace(run_cfg, train=tc), objective_of(run_cfg), Path(data_dir),
                            tokenizer_file)
    oc = finetune_optim(run_cfg.optim, steps, lr)
    opt = build_optimizer(model, oc)
    params = dict(model.named_parameters())
    model.train()
    losses = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, oc, steps)
        x, y = next(loader)
        # a tuple is several model inputs (data/seq2seq.Inputs): a pair's, or a masked-LM batch's
        loss = lm_loss(model(*x) if isinstance(x, tuple) else model(x), y)
        if not torch.isfinite(loss):  # the weights would become NaN and be written as the pruned model
            _diverged(f"loss {loss.item()} at step {step + 1}", steps, oc.lr)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), getattr(tc, "grad_clip", 0.0) or 1e9)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if masks:
            with torch.no_grad():
                for name, mask in masks.items():
                    params[name].mul_(mask)
        losses.append(loss.item())
    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:  # the last step's update, after its loss was taken
        _diverged(f"non-finite weights in {bad} after step {steps}", steps, oc.lr)
    model.eval()
    return losses


def _diverged(what: str, steps: int, peak_lr: float) -> None:
    from clusterlm.errors import DivergedError

    raise DivergedError(f"the recovery fine-tune diverged: {what} of {steps} (peak lr {peak_lr:g}); nothing written: "
                        "lower --finetune-lr")


def prune_checkpoint(src: str | Path, out: str | Path, sparsity: float, method: str, *, finetune_steps: int = 0,
                     data_dir: str | Path | None = None, finetune_lr: float | None = None) -> Path:
    """Write a pruned copy of checkpoint `src` as out/checkpoints/step-N; returns the step folder."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.checkpoint.store import check_new_run_dir, save_checkpoint
    from clusterlm.config import to_toml

    if method not in METHODS:
        raise ValueError(f"pruning method {method!r}; expected one of {', '.join(METHODS)}")
    _check_sparsity(sparsity)
    if finetune_steps < 0:
        raise ValueError(f"--finetune-steps {finetune_steps}; expected 0 (no fine-tune) or more")
    if sparsity == 0 and finetune_steps == 0:  # the copy would equal its source
        raise ValueError("sparsity=0 removes nothing, and without --finetune-steps the \"pruned\" copy would equal "
                         "its source; use a sparsity in (0, 1)")
    out = Path(out)
    check_new_run_dir(out)
    loaded = load_for_inference(src)  # the one read of the source checkpoint
    if loaded.quantization is not None:
        raise ValueError(f"{loaded.path} is quantized; prune the float checkpoint, then quantize")
    if loaded.config.model.labels:
        raise ValueError(f"{loaded.path} is a classifier; pruning (and its perplexity check) is for language models")
    run_cfg = loaded.config
    data = None
    if finetune_steps > 0:  # the data is checked before the pruning: a wrong --data fails fast
        from clusterlm.data.shards import check_data_tokenizer

        data = Path(data_dir) if data_dir is not None else Path(run_cfg.data.dir)
        meta = check_finetune_data(data, objective_of(run_cfg))
        check_data_tokenizer(data, meta, loaded.path, loaded.tokenizer)  # its ids must be the model's
    masks = None
    if method == "magnitude":
        model = loaded.model
        masks = magnitude_prune(model, sparsity)
    else:
        model = structured_prune(loaded.model, sparsity)
        before, after = loaded.model.config, model.config
        if finetune_steps == 0 and (after.n_heads, after.hidden_dim) == (before.n_heads, before.hidden_dim):
            raise ValueError(f"sparsity={sparsity} removes no head (of {before.n_heads}) and no MLP channel (of "
                             f"{before.hidden_dim}) per layer: the \"pruned\" copy would equal its source; use a "
                             "larger --sparsity")
        run_cfg = dataclasses.replace(run_cfg, model=model.config)
    losses: list[float] = []
    if finetune_steps > 0:
        losses = finetune(model, run_cfg, finetune_steps, data, masks=masks, lr=finetune_lr,
                          tokenizer_file=loaded.path / "tokenizer.json")
    info = loaded.info
    train_state = dict(info.train_state)
    train_state["pruning"] = {"method": method, "sparsity": sparsity, "finetune_steps": finetune_steps,
                              "finetune_lr": finetune_optim(run_cfg.optim, finetune_steps, finetune_lr).lr
                              if finetune_steps > 0 else None,
                              "finetune_first_loss": losses[0] if losses else None,
                              "finetune_last_loss": losses[-1] if losses else None, "source": str(loaded.path)}
    path = save_checkpoint(out / "checkpoints", info.step, model_state=model.state_dict(), optimizer_state=None,
                           train_state=train_state, config_toml=to_toml(run_cfg), tokenizer_path=info.tokenizer_path)
    log.info("pruned %s (%s, sparsity %.2f) -> %s", loaded.path, method, sparsity, path)
    return path


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="clusterlm prune", description="magnitude or structured pruning of a checkpoint")
    ap.add_argument("ckpt", metavar="CKPT", help="run directory, checkpoints folder or step folder")
    ap.add_argument("--sparsity", type=float, required=True, help="fraction of weights/heads/channels removed, [0, 1)")
    ap.add_argument("--method", choices=METHODS, required=True)
    ap.add_argument("--finetune-steps", type=int, default=0, help="recovery fine-tune steps after pruning (0 = none)")
    ap.add_argument("--finetune-lr", type=float, default=None,
                    help="peak fine-tune learning rate (default: 3x the run's optim.min_lr; warmup 10%%, cosine to min_lr)")
    ap.add_argument("--data", default=None, help="prepared data directory for the fine-tune (default: the run's)")
    ap.add_argument("--out", required=True, metavar="CKPT", help="run directory to create")
    args = ap.parse_args(argv)
    unused = [opt for opt, v in (("--finetune-lr", args.finetune_lr), ("--data", args.data)) if v is not None]
    if unused and args.finetune_steps == 0:
        ap.error(f"{' and '.join(unused)} set the recovery fine-tune, which runs only with --finetune-steps N "
                 "(N >= 1): add it, or leave them out")
    if args.finetune_lr is not None and not (math.isfinite(args.finetune_lr) and args.finetune_lr > 0):
        # before the checkpoint and data are read (it was found after; inf was called optim.lr)
        raise ValueError(f"--finetune-lr={args.finetune_lr} must be a finite number > 0")
    path = prune_checkpoint(args.ckpt, args.out, args.sparsity, args.method, finetune_steps=args.finetune_steps,
                            data_dir=args.data, finetune_lr=args.finetune_lr)
    print(f"wrote {path}")
    return 0
