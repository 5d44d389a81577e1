"""LoRA: low-rank adapters on a model's Linear layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation
of Large Language Models"), native rather than through peft (docs/finetune.md says why).

A targeted `nn.Linear` becomes a `LoRALinear` that keeps the base `weight` and `bias` Parameters
themselves (same objects, frozen) and adds `lora_a` (r, in) and `lora_b` (out, r):

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T

With `dora=True` a LoRALinear is DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank
Adaptation"; peft's `use_dora`): the adapted weight W + (alpha / r) B A is split into each output
row's direction and a trainable magnitude m, so that besides the low-rank direction change every row's
length moves freely:

    y = m / ||W + (alpha / r) B A||_row * (x W^T + (alpha / r) dropout(x) A^T B^T) + b

m is stored as its change from the base's row norms, `lora_magnitude` = m - ||W||_row (out,), zero at
the start, so a fresh adapter gives the base's outputs whatever order the base weights arrive in
(a sharded model is initialised before the base is loaded). The norm is a constant for the gradient
(detached), as the paper's section 4.3 and peft do.

A targeted `nn.Embedding` (opt-in: name it, e.g. "tok_embeddings") becomes a `LoRAEmbedding`, peft's
embedding LoRA: the lookup of a token's row gains (alpha / r) * (B A)^T[token], with `lora_a` (r, V)
starting at zero and `lora_b` (D, r) Normal(0, 1). A classifier fine-tuned with LoRA on the projections
only cannot move its word embeddings; on SST-2 that alone cost 13 points (docs/finetune.md). In a
language model with tied embeddings the output layer becomes a `TiedLoRAOutput` that applies the same
update, (x B) A, so the adapted model and the merged one (whose shared table moves) agree.

State dict keys: the base keys do not move (`layers.0.attention.wq.weight`), the adapters sit beside
them (`layers.0.attention.wq.lora_a`, `.lora_b`). So a base checkpoint loads into a LoRA model
(`load_state_dict(sd, strict=False)`: only adapter keys are missing), and `merge_lora` gives back
plain nn.Linear modules whose state dict is exactly the base model's.

    names = apply_lora(model, rank=8, alpha=16)        # after the base weights are loaded (dora=True: DoRA)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ... train ...
    save_adapters("runs/x/adapter", model)              # adapter.safetensors + adapter.json
    load_adapters("runs/x/adapter", fresh_base_model)   # applies LoRA from adapter.json if needed
    merge_lora(model)                                   # W += (alpha/r) B A (DoRA: then rows rescaled)

Order with the parallel wrappers: apply LoRA (and load adapters) on the unsharded model, then
torch.compile / FSDP2 `fully_shard` (frozen base weights and adapters shard alike; FSDP2 reduces
gradients only of parameters that require them). `lora_state_dict` gathers sharded adapters
(a collective: call it on every rank). `merge_lora` and `load_adapters` need unsharded modules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from clusterlm.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # attention and MLP projections
ADAPTER_FILE = "adapter.safetensors"
META_FILE = "adapter.json"
FORMAT = "clusterlm-lora/1"
ADAPTER_SUFFIXES = (".lora_a", ".lora_b", ".lora_magnitude")  # state dict keys of adapter tensors
# wrappers that insert themselves into parameter names (activation checkpointing, torch.compile)
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def _clean(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def add_low_rank(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """y += scale * h b^T for y (n, out), h (n, r), b (out, r), as ONE matrix multiply that
    accumulates into y in place (addmm_, alpha=scale): the scale lands on the small factors and there
    is no separate multiply, add or copy pass over the out-sized activations. Those passes cost more
    than the adapter's own GEMMs on a CPU (on multi30k_enfr_cpu's shape, 8 x 256 tokens into a
    4096-word tied output, about 45 ms of a 345 ms step; docs/finetune.md "Step time").
    y must be a fresh 2-D result that no autograd node saved and not a view (a Linear's or an
    Embedding's output on flattened rows: their backward keeps their inputs; in place on a view,
    autograd would copy the whole gradient back through it). Autocast leaves in-place ops alone, so
    b is cast to h's dtype here."""
    return y.addmm_(h, b.t().to(h.dtype), alpha=scale)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update. Holds the base Linear's own `weight` and
    `bias` Parameters (so their state dict keys and any tying are unchanged)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, dora: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.dora = rank, alpha, dora
        self.scale = alpha / rank
        self.weight = base.weight
        self.bias = base.bias
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        if dora:  # m - ||W||_row (module docstring)
            self.lora_magnitude = nn.Parameter(torch.zeros(self.out_features, device=w.device, dtype=w.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trainable tensors by their state dict suffix: lora_a, lora_b (and lora_magnitude for DoRA)."""
        out = {"lora_a": self.lora_a, "lora_b": self.lora_b}
        if self.dora:
            out["lora_magnitude"] = self.lora_magnitude
        return out

    @torch.no_grad()
    def reset_adapter(self, seed: int, name: str) -> None:
        """A ~ Kaiming-uniform (a=sqrt(5), nn.Linear's and peft's init), B = 0, so the update starts at
        zero. Drawn on the CPU from a generator seeded by (seed, name): the same on every device.
        A meta tensor is left alone (each of A and B on its own: parallel.init_sharded materialises
        one parameter at a time)."""
        if not self.lora_a.is_meta:
            g = torch.Generator(device="cpu")
            g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
            a = torch.empty(self.lora_a.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
            self.lora_a.copy_(a)
        if not self.lora_b.is_meta:
            self.lora_b.zero_()
        if self.dora and not self.lora_magnitude.is_meta:
            self.lora_magnitude.zero_()

    def delta(self) -> torch.Tensor:
        """(alpha / r) B A, (out, in) in float32."""
        return (self.lora_b.float() @ self.lora_a.float()) * self.scale

    def magnitude_scale(self) -> torch.Tensor:
        """DoRA: m / ||W + (alpha / r) B A||_row, (out,) in float32, the norm detached (module docstring).
        Exactly 1 for a fresh adapter (B = 0 and lora_magnitude = 0)."""
        w = self.weight.float()
        norm = (w + self.delta()).norm(dim=1).detach()
        return (w.norm(dim=1) + self.lora_magnitude.float()) / norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        x = x.reshape(-1, self.in_features)  # rows: add_low_rank works on 2-D results
        h = F.linear(self.dropout(x), self.lora_a)  # (n, r)
        if not self.dora:
            return add_low_rank(F.linear(x, self.weight, self.bias), h, self.lora_b, self.scale).view(shape)
        y = add_low_rank(F.linear(x, self.weight), h, self.lora_b, self.scale) * self.magnitude_scale().to(x.dtype)
        return (y if self.bias is None else y + self.bias).view(shape)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, alpha={self.alpha}" + (", dora=True" if self.dora else ""))


class LoRAEmbedding(nn.Module):
    """A frozen nn.Embedding plus a trainable low-rank update of its table, as peft's embedding LoRA:

        y = W[ids] + (alpha / r) * A^T[ids] B^T        W (V, D), A = lora_a (r, V), B = lora_b (D, r)

    so the table moves by (alpha / r) (B A)^T. A starts at zero (a token's update starts at zero and
    only the rows of tokens seen get gradients through B), B ~ Normal(0, 1). Holds the base
    Embedding's own `weight` Parameter. No dropout: the input is token ids."""

    def __init__(self, base: nn.Embedding, rank: int, alpha: float) -> None:
        super().__init__()
        if base.padding_idx is not None or base.max_norm is not None or base.sparse:
            raise ConfigError("lora on an nn.Embedding with padding_idx, max_norm or sparse is not supported")
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.rank, self.alpha = rank, alpha
        self.scale = alpha / rank
        self.weight = w = base.weight
        self.lora_a = nn.Parameter(torch.zeros(rank, self.num_embeddings, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.empty(self.embedding_dim, rank, device=w.device, dtype=w.dtype))
        self.dropout = nn.Identity()

    @torch.no_grad()
    def reset_adapter(self, seed: int, name: str) -> None:
        """A = 0, B ~ Normal(0, 1) from a CPU generator seeded by (seed, name) (peft's embedding init);
        meta tensors are left alone, as LoRALinear.reset_adapter."""
        if not self.lora_a.is_meta:
            self.lora_a.zero_()
        if not self.lora_b.is_meta:
            g = torch.Generator(device="cpu")
            g.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
            self.lora_b.copy_(torch.empty(self.lora_b.shape, dtype=torch.float32).normal_(0.0, 1.0, generator=g))

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The trainable tensors by their state dict suffix."""
        return {"lora_a": self.lora_a, "lora_b": self.lora_b}

    def delta(self) -> torch.Tensor:
        """The update of the whole table, (V, D) in float32."""
        return (self.lora_b.float() @ self.lora_a.float()).t() * self.scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        y = F.embedding(flat, self.weight)  # (n, D)
        h = F.embedding(flat, self.lora_a.t())  # (n, r)
        return add_low_rank(y, h, self.lora_b, self.scale).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}, alpha={self.alpha}"


class TiedLoRAOutput(nn.Module):
    """The output projection of a language model whose weight IS a LoRA embedding's table (tied
    embeddings). It applies the embedding's update too, so that the model with adapters and the
    merged model (whose shared table holds W + delta) compute the same logits:

        logits = x (W + (alpha / r) (B A)^T)^T + b = x W^T + b + (alpha / r) (x B) A

    It holds the tied `weight` (and `bias`) Parameters and no adapter of its own: A and B are the
    embedding's, referenced rather than registered, so they are saved, loaded and sharded once,
    under the embedding's name."""

    def __init__(self, base: nn.Linear, source: LoRAEmbedding) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.__dict__["source"] = source  # not a submodule: the adapters stay registered once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.source
        shape = (*x.shape[:-1], self.out_features)
        x = x.reshape(-1, self.in_features)
        y = F.linear(x, self.weight, self.bias)  # (n, V)
        h = F.linear(x, s.lora_b.t())  # x B: (n, r)
        return add_low_rank(y, h, s.lora_a.t(), s.scale).view(shape)  # + (x B) A

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, adapter of the tied embedding"


LORA_TYPES = (LoRALinear, LoRAEmbedding)


# ---- applying ------------------------------------------------------------------------------------
def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, module)


def _matches(name: str, targets: Iterable[str]) -> str | None:
    clean = _clean(name)
    for t in targets:
        if clean == t or clean.endswith("." + t):
            return t
    return None


def lora_modules(model: nn.Module) -> dict[str, LoRALinear | LoRAEmbedding]:
    """The LoRA layers of `model` by (clean) module name."""
    return {_clean(n): m for n, m in model.named_modules() if isinstance(m, LORA_TYPES)}


def _unused_heads(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes of the modules `model` keeps but never runs: a sequence classifier's backbone LM
    (and reverse LM) (SequenceClassifier.unused_heads), whose weight may be tied to the embedding. Duck-typed so
    that this module does not import the models."""
    unused, readers = getattr(model, "unused_heads", None), getattr(model, "readers", None)
    if not callable(unused):
        return ()
    return tuple(f"{r}.{h}." for r, _ in readers() for h in unused())


def apply_lora(model: nn.Module, targets: Iterable[str] | None = None, rank: int = 8, alpha: float = 16.0,
               dropout: float = 0.0, seed: int = 0, dora: bool = False) -> list[str]:
    """Wrap every nn.Linear whose module name ends with one of `targets` ("wq" matches
    `layers.3.attention.wq`; "attention.wq" also works) in a LoRALinear, every nn.Embedding named so
    ("tok_embeddings") in a LoRAEmbedding, and freeze every parameter that is not an adapter. Returns
    the wrapped module names. Adapters are initialised from `seed` (one factor zero: the model's
    outputs do not change). Call after the base weights are in place and before torch.compile or
    fully_shard. A target that matches no layer raises ConfigError naming it and the names there are.
    An LM's embedding tied to its output layer takes LoRA on both uses: the output becomes a
    TiedLoRAOutput applying the embedding's update, so merging (one shared table) stays exact. Naming
    the tied output itself is refused (name the embedding). targets=None: DEFAULT_TARGETS, those the
    model has (GPT-2's MLP has no w3), at least one. dora=True makes the Linear adapters DoRA (module
    docstring); an embedding adapter stays plain LoRA."""
    strict = targets is not None
    targets = tuple(DEFAULT_TARGETS if targets is None else targets)
    if rank < 1:
        raise ConfigError(f"lora rank={rank}; expected an integer >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"lora dropout={dropout}; expected 0 <= dropout < 1")
    if not targets:
        raise ConfigError("lora targets is empty; name at least one Linear layer, e.g. wq")
    if lora_modules(model):
        raise ConfigError("the model already has LoRA adapters; merge_lora it first or load onto a fresh base")
    layers = {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)}
    # a weight shared with another module that runs (tied output/embedding) would change both when
    # merged; a classifier's unused LM head does not count
    skip = _unused_heads(model)
    holders: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        holders.setdefault(id(p), []).append(_clean(n))
    chosen: dict[str, nn.Linear | nn.Embedding] = {}
    tied_outputs: dict[str, str] = {}  # a Linear tied to a chosen embedding -> that embedding's name
    linears = {f"{_clean(n)}.weight": n for n, m in layers.items() if isinstance(m, nn.Linear)}
    used: set[str] = set()
    for name, layer in layers.items():
        t = _matches(name, targets)
        if t is None:
            continue
        others = [h for h in holders[id(layer.weight)] if h != f"{_clean(name)}.weight" and not h.startswith(skip)]
        if others and isinstance(layer, nn.Embedding) and all(h in linears for h in others):
            tied_outputs.update({linears[h]: name for h in others})  # the output gets the same update
        elif others:
            hint = ("name the embedding instead: its adapter applies to the tied output too"
                    if isinstance(layer, nn.Linear) else "untie them (model.tie_embeddings=false)")
            raise ConfigError(f"lora target {_clean(name)!r} shares its weight with {others[0]!r} (tied "
                              f"embeddings); {hint}, or leave it out of the targets")
        chosen[name] = layer
        used.add(t)
    unused = [t for t in targets if t not in used]
    if unused and (strict or not used):
        short = sorted({_clean(n).rsplit(".", 1)[-1] for n in layers if not f"{_clean(n)}.".startswith(skip)})
        if not strict:  # nobody named the defaults: say so, and how to name targets that exist
            raise ConfigError(f"{type(model).__name__} has none of the default lora targets (the attention and MLP "
                              f"projections {', '.join(DEFAULT_TARGETS)}); name targets (finetune.lora_targets) "
                              f"from: {short or 'none'}")
        raise ConfigError(f"lora targets {unused} match no nn.Linear or nn.Embedding in {type(model).__name__}; "
                          f"names there: {short or 'none'}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in chosen.items():
        wrapped: nn.Module = (LoRALinear(layer, rank, alpha, dropout, dora) if isinstance(layer, nn.Linear)
                              else LoRAEmbedding(layer, rank, alpha))
        wrapped.reset_adapter(seed, _clean(name))
        _set_module(model, name, wrapped)
    for name, emb in tied_outputs.items():
        _set_module(model, name, TiedLoRAOutput(layers[name], model.get_submodule(emb)))
    return [_clean(n) for n in chosen]


@torch.no_grad()
def reset_adapters(model: nn.Module, seed: int = 0) -> None:
    """Initialise every adapter again (each layer's reset_adapter from (seed, name)): for a model on
    which LoRA was applied on the meta device, after `to_empty`.""" 
    for name, m in lora_modules(model).items():
        m.reset_adapter(seed, name)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, tied weights counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# ---- merging ---------------------------------------------------------------------------------------
@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight, W <- W + (alpha/r) B A (computed in float32; an
    embedding's table gets the transpose; DoRA then scales each row i by m_i / ||row i||), and put
    plain nn.Linear / nn.Embedding modules back holding the same weight and bias Parameters: the
    state dict then has exactly the base model's keys, for export, quantization and serving. Every
    parameter is made trainable again (as a freshly built model). Returns the number of merged
    layers. Needs unsharded modules (merge before fully_shard, or on a model loaded in one process)."""
    mods = {n: m for n, m in model.named_modules() if isinstance(m, (*LORA_TYPES, TiedLoRAOutput))}
    for name, m in mods.items():
        if hasattr(m.weight, "device_mesh"):
            raise ConfigError(f"merge_lora on {_clean(name)!r}: its weight is sharded (DTensor); merge in one "
                              "process after gathering or loading the adapters onto an unsharded model")
        plain: nn.Module
        if isinstance(m, LoRAEmbedding):
            m.weight.add_(m.delta().to(m.weight.dtype))  # (V, D)
            plain = nn.Embedding(m.num_embeddings, m.embedding_dim, device="meta")
        else:
            if isinstance(m, LoRALinear):  # a TiedLoRAOutput adds nothing: its table is the embedding's
                if m.dora:  # each row rescaled to its magnitude; the bias is outside the scaling
                    merged = (m.weight.float() + m.delta()) * m.magnitude_scale()[:, None]  # (out, in)
                    m.weight.copy_(merged.to(m.weight.dtype))
                else:
                    m.weight.add_(m.delta().to(m.weight.dtype))
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            plain.bias = m.bias
        plain.weight = m.weight
        _set_module(model, name, plain)
    for p in model.parameters():
        p.requires_grad_(True)
    return sum(not isinstance(m, TiedLoRAOutput) for m in mods.values())


# ---- adapters on disk ------------------------------------------------------------------------------
def _full(t: torch.Tensor) -> torch.Tensor:
    # DTensor (FSDP2 shard) -> the whole tensor; a collective, duck-typed so this module needs no
    # torch.distributed import (docs/architecture.md)
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, {"layers.0.attention.wq.lora_a": (r, in), ...lora_b: (out, r), and
    for DoRA ...lora_magnitude: (out,)}, full (unsharded) and detached on the CPU. Under FSDP2 this
    gathers: call it on every rank."""
    out = {}
    for name, m in lora_modules(model).items():
        for suffix, p in m.adapter_params().items():
            out[f"{name}.{suffix}"] = _full(p.detach()).cpu().contiguous()
    return out


def base_fingerprint(model: nn.Module) -> str:
    """A short hash of the base model: its config (a dataclass, `model.config`) where it has one,
    else the names and shapes of its base parameters."""
    cfg = getattr(model, "config", None)
    if dataclasses.is_dataclass(cfg):
        text = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    else:
        text = json.dumps(sorted((_clean(n), list(p.shape)) for n, p in model.named_parameters()
                                 if not n.endswith(ADAPTER_SUFFIXES)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _lora_settings(model: nn.Module) -> dict[str, Any]:
    mods = lora_modules(model)
    if not mods:
        raise ConfigError(f"{type(model).__name__} has no LoRA adapters (apply_lora first)")
    first = next(iter(mods.values()))
    drop = next((m.dropout.p for m in mods.values() if isinstance(m.dropout, nn.Dropout)), 0.0)  # embeddings have none
    dora = any(getattr(m, "dora", False) for m in mods.values())
    return {"rank": first.rank, "alpha": first.alpha, "dropout": drop, "dora": dora, "targets": sorted(mods)}


def save_adapters(path: str | Path, model: nn.Module, meta: dict[str, Any] | None = None, *,
                  overwrite: bool = False, write: bool = True, tokenizer_path: Path | None = None) -> Path:
    """Write the folder `path` with adapter.safetensors (the adapters only) and adapter.json (format,
    rank, alpha, dropout, dora, the wrapped module names, the base fingerprint, and `meta`: anything
    JSON-serialisable the caller adds; a fine-tune writes "base" and "checkpoint", paths relative to
    this folder, and "vocab_size", its model's). `tokenizer_path`: the fine-tune's tokenizer.json,
    copied in with the chat template beside it, so that a server answers with the fine-tune's tokens
    and template rather than the base's. The folder appears whole or not at all. Under FSDP2 call it
    on every rank (gathering is collective) with write=(rank == 0)."""
    from safetensors.torch import save

    from clusterlm.checkpoint.store import copy_tokenizer_files
    from clusterlm.fsutil import staging_dir

    info = {"format": FORMAT, **_lora_settings(model), "base_fingerprint": base_fingerprint(model),
            "meta": meta or {}}
    tensors = lora_state_dict(model)
    path = Path(path)
    if not write:
        return path
    data = save(tensors, metadata={"format": FORMAT})
    hint = "pass overwrite=True to save_adapters to replace it, or choose another folder"
    with staging_dir(path, overwrite=overwrite, overwrite_hint=hint) as tmp:
        (tmp / ADAPTER_FILE).write_bytes(data)
        (tmp / META_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        if tokenizer_path is not None:
            copy_tokenizer_files(tokenizer_path, tmp)
    return path


def adapter_source(path: str | Path, key: str = "base") -> Path | None:
    """adapter.json's meta[key] of adapter folder `path` ("base": the checkpoint the adapters were
    trained on; "checkpoint": the fine-tune's last checkpoint) as a path that exists. A relative path
    is relative to the adapter folder (written so since 2026-12-06) or, in older files, to the
    directory the fine-tune ran in (tried as given). None when meta has no such key; a
    CheckpointError naming adapter.json when the path is in neither place."""
    given = (read_adapter_meta(path).get("meta") or {}).get(key)
    if not given:
        return None
    for cand in (Path(path) / given, Path(given)):
        if cand.exists():
            return cand
    raise CheckpointError(f"{Path(path) / META_FILE}: its meta.{key} {given!r} does not exist (relative to "
                          f"{path} or to this directory); move the adapter folder back beside its run, or edit "
                          f"meta.{key} to the {'base checkpoint' if key == 'base' else 'fine-tune'} folder")


def read_adapter_meta(path: str | Path) -> dict[str, Any]:
    """adapter.json of an adapter folder, checked for the fields load_adapters needs."""
    f = Path(path) / META_FILE
    if not f.is_file():
        raise CheckpointError(f"{path} is not a LoRA adapter folder: {META_FILE} is missing")
    try:
        info = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    missing = [k for k in ("format", "rank", "alpha", "targets") if k not in info]
    if missing or info.get("format") != FORMAT:
        raise CheckpointError(f"{f}: not a {FORMAT} adapter file (format={info.get('format')!r}, missing {missing})")
    # a hand-edited or foreign file: alpha <= 0 loaded silently (no-op or sign-flipped adapters), a string
    # of targets was read letter by letter ("trained on 'w'"), dora "no" counted as true
    number = (int, float)
    checks = {"rank": (type(info["rank"]) is int and info["rank"] >= 1, "an integer >= 1"),
              "alpha": (type(info["alpha"]) in number and info["alpha"] > 0, "a number > 0"),
              "dropout": (type(info.get("dropout", 0.0)) in number and 0 <= info.get("dropout", 0.0) < 1,
                          "a number in [0, 1)"),
              "dora": (type(info.get("dora", False)) is bool, "true or false"),
              "targets": (isinstance(info["targets"], list) and bool(info["targets"])
                          and all(isinstance(t, str) and t for t in info["targets"]),
                          "a non-empty list of module names")}
    for key, (ok, valid) in checks.items():
        if not ok:
            raise CheckpointError(f"{f}: {key}={info[key]!r:.80} is not valid; {key} is {valid} (a damaged or "
                                  "hand-edited file: save the adapters again)")
    return info


@torch.no_grad()
def load_adapters(path: str | Path, model: nn.Module, seed: int = 0) -> list[str]:
    """Load the adapters saved at `path` into `model` (a base model, or one that already has LoRA
    layers of the same rank and kind). A base without adapters gets them first, with the saved rank,
    alpha, dropout, DoRA or not, and module names. Every saved tensor must exist in the model with the same shape, or a
    CheckpointError names the tensor and both shapes. A different base fingerprint with fitting
    shapes is logged as a warning (e.g. a config field that does not change shapes). Returns the
    LoRA module names. Load before fully_shard. On any error a base model is left as it was given (no
    adapters, its parameters' requires_grad unchanged)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    info = read_adapter_meta(path)
    try:  # read before the model is touched
        saved = load_file(str(Path(path) / ADAPTER_FILE))
    except (SafetensorError, FileNotFoundError, OSError) as e:
        raise CheckpointError(f"{Path(path) / ADAPTER_FILE}: cannot read adapters ({e})") from None
    if lora_modules(model):
        return _load_saved(path, model, info, saved)
    # exact module names as targets: matching by suffix, a saved name is only its own module
    _check_targets_exist(model, info["targets"], path)
    modules, grads = dict(model.named_modules()), {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        apply_lora(model, info["targets"], rank=int(info["rank"]), alpha=float(info["alpha"]),
                   dropout=float(info.get("dropout", 0.0)), seed=seed, dora=bool(info.get("dora", False)))
        return _load_saved(path, model, info, saved)
    except BaseException:  # a mismatch found after the wrapping: put the base back as it was given
        for name, m in list(model.named_modules()):
            if isinstance(m, (LoRALinear, LoRAEmbedding, TiedLoRAOutput)) and name in modules:
                _set_module(model, name, modules[name])
        for n, p in model.named_parameters():
            p.requires_grad_(grads.get(n, p.requires_grad))
        raise


@torch.no_grad()
def _load_saved(path: str | Path, model: nn.Module, info: dict[str, Any], saved: dict[str, torch.Tensor]
                ) -> list[str]:
    """load_adapters' second half: copy the `saved` tensors into `model`'s adapters, checked first."""
    params = {f"{name}.{suffix}": p for name, m in lora_modules(model).items() for suffix, p in m.adapter_params().items()}
    missing = sorted(set(params) - set(saved))
    unknown = sorted(set(saved) - set(params))
    if unknown or missing:
        what = f"{unknown[0]} is not in the model" if unknown else f"{missing[0]} is not in the file"
        raise CheckpointError(f"adapters at {path} do not fit {type(model).__name__}: {what} "
                              f"({len(unknown)} unknown, {len(missing)} missing tensors)")
    for name, p in params.items():  # the model's order: the first mismatch named is the first layer's
        t = saved[name]
        if hasattr(p, "device_mesh"):
            raise CheckpointError(f"load_adapters: {name} is sharded (DTensor); load adapters before fully_shard")
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(f"adapter tensor {name} has shape {tuple(t.shape)} in {path} but "
                                  f"{tuple(p.shape)} in the model (a different base model or rank)")
    for name, t in saved.items():
        params[name].copy_(t.to(dtype=params[name].dtype))
    fp = base_fingerprint(model)
    if info.get("base_fingerprint") not in (None, fp):
        log.warning("adapters at %s were trained on a base with fingerprint %s; this model's is %s "
                    "(shapes fit, so they were loaded)", path, info["base_fingerprint"], fp)
    return sorted(lora_modules(model))


def _check_targets_exist(model: nn.Module, names: list[str], path: str | Path) -> None:
    have = {_clean(n): m for n, m in model.named_modules()}
    for name in names:
        m = have.get(name)
        if type(m) not in (nn.Linear, nn.Embedding):
            found = "no such module" if m is None else f"a {type(m).__name__}, not an nn.Linear or nn.Embedding"
            raise CheckpointError(f"adapters at {path} were trained on {name!r}; in {type(model).__name__} "
                                  f"that is {found} (a different base model)")
