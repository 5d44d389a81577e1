"""What fine-tuning adds to a training run: the base model, the fine-tuned model's config (its
vocabulary grown by the chat tokens, a classification head), the data prepared with the base's
tokenizer, LoRA and frozen parameters, and the base weights loaded into the (possibly sharded)
model. The trainer (train/loop.py) calls these when `[finetune] task` is sft or classify.

    base = resolve_base("runs/shakespeare_char", out_dir)          # a step folder, or an HF folder
    mcfg = finetune_model_config(base.config.model, cfg.model, vocab_size=..., labels=..., pad_id=...)
    transform, init_extra = model_transform(cfg.finetune)          # LoRA, freezing: before sharding
    state = base_state(base, mcfg)                                  # full tensors, vocabulary grown
    load_weights(model, state, distributed=...)                     # checkpoint/manager.py

New vocabulary rows (the chat tokens appended to the base's tokenizer) start as the mean of the
base's rows, in the token embedding and in an untied output layer (and its bias): the rule of
transformers' `resize_token_embeddings(mean_resizing=True)` without the noise, so a new token's
first logits are the average token's and the loss does not jump (docs/finetune.md).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clusterlm.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

SHAPE_KEYS = ("arch", "n_layers", "dim", "n_heads", "n_kv_heads", "head_size", "ffn_dim", "ffn_multiple", "pos",
              "norm", "mlp", "bias", "tie_embeddings", "vocab_multiple", "rope_theta")


@dataclass(frozen=True)
class Base:
    """A base model on disk: a clusterlm step folder (an HF folder is converted into one first)."""

    path: Path
    config: Any  # its RunConfig
    tokenizer_file: Path
    template_file: Path | None  # chat_template.jinja beside its tokenizer, if it has one
    made: tuple[Path, ...] = ()  # folders resolve_base created (OUT_DIR/base, then OUT_DIR and parents it made)
    hf_folder: Path | None = None  # the Hugging Face folder `path` was converted from

    @property
    def labels(self) -> tuple[str, ...]:
        """A classifier's label names (it is fine-tuned further, head and all: check_classifier_base);
        empty for a language model."""
        return tuple(self.config.model.labels)

    @property
    def where(self) -> str:
        """The base as messages name it: as the user gave it (an HF folder, not its conversion)."""
        return f"finetune.init_from={str(self.hf_folder or self.path)!r}"


def new_folders(folder: Path) -> tuple[Path, ...]:
    """`folder` and those of its parents that do not exist yet, deepest first: what a run that writes
    `folder` creates, and discard_made removes again if the run is refused before it trains."""
    return tuple(d for d in (folder, *folder.parents) if not d.exists())


def discard_made(made: tuple[Path, ...]) -> None:
    """Remove what a run refused before it trains wrote, so that it leaves nothing behind: `made` is a
    folder it created (removed with its contents), then the parents it created for it (deepest first,
    removed where they hold nothing else), as in Base.made and new_folders."""
    import shutil

    if not made:
        return
    folder, *created = made
    shutil.rmtree(folder, ignore_errors=True)
    for parent in created:
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


def resolve_base(init_from: str, out_dir: Path) -> Base:
    """The base named by finetune.init_from: a run, checkpoints folder or step folder, or a Hugging
    Face model folder (converted once into OUT_DIR/base; removed again by discard_made when the run is
    refused before it trains)."""
    src = Path(init_from)
    if not src.exists():
        raise ConfigError(f"finetune.init_from={init_from!r} does not exist; give a clusterlm run or checkpoint "
                          "folder, or a Hugging Face model folder (config.json + model.safetensors + tokenizer.json)")
    made: tuple[Path, ...] = ()
    hf_folder = None
    if (src / "config.json").is_file() and not (src / "config.toml").is_file():
        hf_folder = src
        converted = out_dir / "base"
        if not (converted / "checkpoints").exists():
            from clusterlm.interop.hf_io import convert_from_hf

            made = (converted, *new_folders(out_dir))
            log.info("finetune.init_from=%s is a Hugging Face folder: converting it into %s", src, converted)
            convert_from_hf(src, converted)
        src = converted
    try:
        return dataclasses.replace(_read_base(src, made), hf_folder=hf_folder)
    except (ConfigError, CheckpointError):
        discard_made(made)
        raise


def _read_base(src: Path, made: tuple[Path, ...]) -> Base:
    """The Base of run/checkpoint folder `src`, refusing what cannot be fine-tuned."""
    from clusterlm.checkpoint.model_io import read_checkpoint_config
    from clusterlm.checkpoint.store import read_ensemble, read_quantization, resolve_checkpoint

    path = resolve_checkpoint(str(src))  # distributed checkpoints carry full weights too (model.safetensors)
    if read_quantization(path) is not None:
        raise ConfigError(f"finetune.init_from={path} is a quantized checkpoint; fine-tune the full-precision model "
                          "(quantize the fine-tuned one afterwards)")
    if (ens := read_ensemble(path)) is not None:
        raise ConfigError(f"finetune.init_from={path} is an ensemble of {ens['members']} classifiers (clusterlm "
                          "ensemble), which is only for inference; fine-tune from one of its members "
                          f"({', '.join(map(str, ens.get('sources', [])[:2]))}...) or use it as a teacher "
                          "(finetune.distill_from)")
    cfg = read_checkpoint_config(path)
    tok = path / "tokenizer.json"
    if not tok.is_file():
        raise CheckpointError(f"{path} has no tokenizer.json; a base model for fine-tuning needs its tokenizer")
    template = path / "chat_template.jinja"
    return Base(path=path, config=cfg, tokenizer_file=tok, template_file=template if template.is_file() else None,
                made=made)


def check_classifier_base(base: Base, ft: Any, given: frozenset[str] = frozenset()) -> None:
    """A classifier as the base is fine-tuned further as that classifier (new data, the same head):
    task classify, its labels in its order, its pooling and reader(s). Anything else is refused
    naming the base's value: an SFT run wants a language model, another label set or pooling wants
    a new head on the language model it started from."""
    if not base.labels:
        return
    mcfg = base.config.model
    source = f" (this one's: {base.config.finetune.init_from})" if base.config.finetune.init_from else ""
    fresh = f"start from the language model it was fine-tuned from{source} for a new head"
    if ft.task != "classify":
        raise ConfigError(f"{base.where} is a classifier (labels {', '.join(base.labels)}); finetune.task={ft.task!r} "
                          f"starts from a language model: give the base it was fine-tuned from{source}, or use it as a "
                          "teacher (finetune.distill_from)")
    if ft.labels and tuple(ft.labels) != base.labels:
        raise ConfigError(f"finetune.labels={list(ft.labels)} but {base.where} is a classifier over "
                          f"{list(base.labels)}; fine-tuning it further keeps its head's labels in their order: "
                          f"remove finetune.labels or set it to {list(base.labels)}, or {fresh}")
    pool_given = "finetune.pool" in given or ft.pool != "auto"
    if pool_given and dataclasses.replace(mcfg, pool=ft.pool).pooling != mcfg.pooling:
        raise ConfigError(f"finetune.pool={ft.pool!r} but {base.where} is a classifier whose head reads "
                          f"pool={mcfg.pooling!r}; its head was trained on those states: remove finetune.pool or "
                          f"set it to {mcfg.pooling!r}, or {fresh}")
    if ("finetune.bidirectional" in given or ft.bidirectional) and ft.bidirectional != mcfg.bidirectional:
        raise ConfigError(f"finetune.bidirectional={str(ft.bidirectional).lower()} but {base.where} is a classifier "
                          f"with bidirectional={str(mcfg.bidirectional).lower()}; its head reads that many pooled "
                          f"states: remove finetune.bidirectional, or {fresh}")


def as_base_classifier(ft: Any, base: Base | None, given: frozenset[str] = frozenset()) -> Any:
    """`ft` (the [finetune] section) as a run from `base` reads it: for a classifier base, checked
    (check_classifier_base) and with the base's labels, pooling and reader(s); else `ft` itself."""
    if base is None or not base.labels:
        return ft
    check_classifier_base(base, ft, given)
    mcfg = base.config.model
    return dataclasses.replace(ft, labels=base.labels, pool=mcfg.pool, bidirectional=mcfg.bidirectional)


def finetune_model_config(base: Any, recipe: Any, *, vocab_size: int, labels: tuple[str, ...] = (),
                          pool: str = "auto", pad_id: int = -1, bidirectional: bool = False,
                          inherit_dropout: bool = True, where: str = "the base",
                          given: frozenset[str] = frozenset()) -> Any:
    """The fine-tuned model's ModelConfig: the base's shape with the vocabulary of the data's
    tokenizer (the base's plus the chat tokens), a head for `labels`, and the recipe's dropout and
    embedding dropout (with `inherit_dropout`, the base's where the recipe leaves them at their
    defaults; without, the recipe's as given). A recipe [model] key that asks for another shape than
    the base's is refused, naming both: a key in `given` (RunConfig.given: set by the recipe or the
    command line, even to its default value), or, for a config built in Python, a value other than
    the default."""
    from clusterlm.models.config import ModelConfig

    default = ModelConfig()
    asked = [(k, getattr(base, k), getattr(recipe, k)) for k in SHAPE_KEYS + ("max_seq_len",)
             if (f"model.{k}" in given or getattr(recipe, k) != getattr(default, k))
             and getattr(recipe, k) != getattr(base, k)]
    if asked:
        has = ", ".join(f"{k}={b!r}" for k, b, _ in asked)
        want = ", ".join(f"{k}={r!r}" for k, _, r in asked)
        raise ConfigError(f"{where} has {has} but the recipe's [model] asks for {want}; a fine-tuned model keeps its "
                          "base's shape: remove those keys from [model]")
    if recipe.vocab_size is not None and recipe.vocab_size not in (base.vocab_size, vocab_size):
        grown = f" ({vocab_size} with the template's special tokens)" if vocab_size != base.vocab_size else ""
        raise ConfigError(f"{where} has vocab_size={base.vocab_size}{grown} but the recipe's [model] asks for "
                          f"vocab_size={recipe.vocab_size}; a fine-tuned model's vocabulary is its base's tokenizer's: "
                          "remove model.vocab_size")
    if base.vocab_size is not None and vocab_size < base.vocab_size:
        raise ConfigError(f"the data's tokenizer has {vocab_size} tokens but {where} has vocab_size="
                          f"{base.vocab_size}; fine-tuning data must be tokenized with the base's tokenizer")
    dropout, embed_dropout = recipe.dropout, recipe.embed_dropout
    if inherit_dropout:
        dropout = dropout if dropout != default.dropout else base.dropout
        embed_dropout = embed_dropout if embed_dropout != default.embed_dropout else base.embed_dropout
    return dataclasses.replace(base, vocab_size=vocab_size, labels=tuple(labels), pool=pool,
                               pad_id=pad_id if labels else base.pad_id, dropout=dropout,
                               embed_dropout=embed_dropout, bidirectional=bidirectional)


def check_tokenizer_extends(base_tok: Any, tok: Any, where: str) -> None:
    """`tok` must be `base_tok` with tokens appended: the same ids for every base token."""
    probe = "The quick brown fox, 0123456789!\n"
    if (tok.kind != base_tok.kind or tok.vocab_size < base_tok.vocab_size
            or tok.vocab_size - len(tok.added_tokens) != base_tok.vocab_size - len(base_tok.added_tokens)
            or tok.encode(probe) != base_tok.encode(probe)):
        raise ConfigError(f"{where}: the data's tokenizer ({tok.kind}, {tok.vocab_size} tokens) is not the base's "
                          f"({base_tok.kind}, {base_tok.vocab_size} tokens) plus chat tokens; prepare the data again "
                          "into a fresh data.dir")


# ---- the model ------------------------------------------------------------------------------------
def _lms(model: nn.Module) -> list[nn.Module]:
    """The language models in `model`: a SequenceClassifier's `backbone` (and `reverse`), or `model`."""
    readers = getattr(model, "readers", None)
    return [lm for _, lm in readers()] if callable(readers) else [model]


def freeze(model: nn.Module, *, embeddings: bool, layers: int) -> int:
    """Stop training the token/position embeddings and the first `layers` blocks; returns the number
    of parameters frozen. A tied output layer is the token embedding: frozen with it. A bidirectional
    classifier's two readers are frozen alike."""
    targets: list[nn.Parameter] = []
    for lm in _lms(model):
        targets += _freeze_targets(lm, embeddings=embeddings, layers=layers)
    n = 0
    for p in targets:
        if p.requires_grad:
            p.requires_grad_(False)
            n += p.numel()
    return n


def _freeze_targets(lm: nn.Module, *, embeddings: bool, layers: int) -> list[nn.Parameter]:
    targets: list[nn.Parameter] = []
    if embeddings:
        for name in ("tok_embeddings", "pos_embeddings"):
            mod = getattr(lm, name, None)
            if mod is not None:
                targets += list(mod.parameters())
    if layers:
        if hasattr(lm, "layers"):
            blocks = list(lm.layers.values())
            if layers > len(blocks):
                raise ConfigError(f"finetune.freeze_layers={layers} but the model has {len(blocks)} layers")
            for b in blocks[:layers]:
                targets += list(b.parameters())
        else:  # LSTM/GRU: per-layer parameters weight_ih_l{k}, weight_hh_l{k}, bias_*_l{k}
            k_max = lm.config.n_layers
            if layers > k_max:
                raise ConfigError(f"finetune.freeze_layers={layers} but the model has {k_max} layers")
            targets += [p for name, p in lm.rnn.named_parameters()
                        if int(name.rsplit("_l", 1)[1].split("_")[0]) < layers]
    return targets


def model_transform(ft: Any, seed: int = 0, new_rows: int = 0) -> tuple[Callable[[nn.Module], nn.Module] | None,
                                                                       Callable[[nn.Module, int], None] | None]:
    """(transform, init_extra) for parallel.parallelize.build_parallel_model: LoRA adapters on the
    finetune.lora_targets projections (everything else frozen, a classification head excepted) and
    the frozen embeddings/layers. (None, None) for plain full fine-tuning. `new_rows`: tokens the
    fine-tune added to the base's vocabulary (the chat tokens). They start as one identical row, so
    with the default targets the token embedding (and an untied output layer) take adapters too:
    otherwise the new tokens could never differ, and a tied output could not tell <|end|> from
    <|user|>. Named targets are used as given (a warning when they leave the new rows frozen)."""
    if not (ft.lora_rank or ft.freeze_embeddings or ft.freeze_layers):
        return None, None
    from clusterlm.finetune.lora import DEFAULT_TARGETS, apply_lora, reset_adapters

    def lora_targets(model: nn.Module) -> list[str] | None:
        if not new_rows:
            return list(ft.lora_targets) or None
        untied = any(not lm.config.tie_embeddings for lm in _lms(model))
        rows = ["tok_embeddings"] + (["output"] if untied else [])
        if ft.lora_targets:
            if not set(rows) <= set(ft.lora_targets):
                log.warning("the vocabulary grew by %d tokens whose rows start identical, but "
                            "finetune.lora_targets=%s leaves them frozen: the new tokens stay alike; add %s",
                            new_rows, list(ft.lora_targets), " and ".join(rows))
            return list(ft.lora_targets)
        present = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        log.info("the vocabulary grew by %d tokens: LoRA adapters on %s too, so that their rows can differ",
                 new_rows, " and ".join(rows))
        return [t for t in DEFAULT_TARGETS if t in present] + rows

    def transform(model: nn.Module) -> nn.Module:
        if ft.lora_rank:
            apply_lora(model, lora_targets(model), rank=ft.lora_rank, alpha=ft.lora_alpha, dropout=ft.lora_dropout,
                       seed=seed, dora=ft.lora_dora)
            head = getattr(model, "score", None)
            if head is not None:
                head.requires_grad_(True)  # the task head is new: it trains with the adapters
        freeze(model, embeddings=ft.freeze_embeddings, layers=ft.freeze_layers)
        return model

    def init_extra(model: nn.Module, s: int) -> None:
        reset_adapters(model, s)

    return transform, (init_extra if ft.lora_rank else None)


def preflight(ft: Any, recipe_model: Any, base: Base | None, given: frozenset[str] = frozenset()) -> None:
    """The refusals that need only the base (or, from scratch, the recipe's [model]), made before any
    data is prepared, so that a refused run writes nothing: a recipe [model] shape other than the
    base's, LoRA targets that match nothing, more frozen layers than the model has. Checked on a
    model built on the meta device (no memory)."""
    from clusterlm.models.build import build_model

    ft = as_base_classifier(ft, base, given)
    labels = tuple(ft.labels) or (("a", "b") if ft.task == "classify" else ())  # the real ones come with the data
    if base is not None:
        # the data's vocabulary (the base's plus the template's tokens) is not known yet: vocab_size is checked with it
        mcfg = finetune_model_config(base.config.model, dataclasses.replace(recipe_model, vocab_size=None),
                                     vocab_size=base.config.model.vocab_size,
                                     labels=labels, pool=ft.pool if labels else "auto",
                                     bidirectional=ft.bidirectional and bool(labels),
                                     inherit_dropout=ft.inherit_dropout, where=base.where, given=given)
    else:  # the vocabulary comes with the tokenizer trained on the records: any size builds the same layers
        if ft.lora_rank:
            raise ConfigError(f"finetune.lora_rank={ft.lora_rank} with an empty finetune.init_from: LoRA trains "
                              "adapters on frozen weights, which from scratch would stay random; give a base "
                              "(finetune.init_from) or set finetune.lora_rank=0 to train every weight")
        mcfg = recipe_model if recipe_model.vocab_size is not None else recipe_model.with_vocab(256)
        mcfg = dataclasses.replace(mcfg, labels=labels, pool=ft.pool if labels else "auto",
                                   bidirectional=ft.bidirectional and bool(labels))
    transform, _ = model_transform(ft)
    if transform is not None:
        with torch.device("meta"):
            transform(build_model(mcfg))


def base_state(base: Base, mcfg: Any) -> dict[str, torch.Tensor]:
    """The base's weights as full CPU tensors named as in the fine-tuned model: vocabulary rows grown
    to `mcfg`'s padded size (new rows: the mean of the base's real rows) and, for a classifier, the
    LM's names under `backbone.` (and, bidirectional, the same weights again under `reverse.`: the
    right-to-left reader starts from the base too, as ULMFiT's backward model starts from an LM)."""

    from clusterlm.checkpoint.model_io import grow_vocab_rows, plain_weights

    state = plain_weights(base.path)  # a LoRA fine-tune as the base: its adapters merged, as it answers
    if base.config.model.labels:  # a classifier fine-tuned further: its own names, head included (no new rows)
        return state
    grow_vocab_rows(state, base.config.model.vocab_size, mcfg)
    if mcfg.labels:
        readers = ("backbone", "reverse") if mcfg.bidirectional else ("backbone",)
        state = {f"{r}.{k}": v for r in readers for k, v in state.items()}
    return state


def expected_missing(model: nn.Module, names: list[str]) -> list[str]:
    """Of `names` (keys absent from the base), those that are not new parameters (a head, adapters)
    or tied aliases: what a base that does not fit leaves unfilled."""
    tied = set()
    seen: dict[int, str] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(n)
        seen.setdefault(id(p), n)
    from clusterlm.finetune.lora import ADAPTER_SUFFIXES

    return [n for n in names if not (n.endswith(ADAPTER_SUFFIXES) or n.startswith("score.") or n in tied)]


def trainable_summary(model: nn.Module) -> str:
    params = list(model.parameters())
    train = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return f"{train:,} of {total:,} parameters train ({100.0 * train / max(total, 1):.2f}%)"


# ---- losses ---------------------------------------------------------------------------------------
class TokenSumLoss:
    """The SFT loss: next-token cross-entropy summed over the trained tokens of a micro-batch, times
    `scale`, which the trainer sets each step to accum * dp / (trained tokens of the whole step over
    every rank). After the parallel wrappers' division by accum and dp, the gradient is that of the
    mean over every trained token of the step, however the tokens fall into rows, micro-batches and
    ranks (a mean per micro-batch would weight a short response's tokens more, and make the losses
    depend on the layout)."""

    def __init__(self) -> None:
        self.scale = 1.0

    def denominator(self, targets: torch.Tensor) -> float:
        """This micro-batch's part of the step's denominator: its trained tokens."""
        from clusterlm.eval.metrics import IGNORE_INDEX

        return float((targets != IGNORE_INDEX).sum())

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        from clusterlm.eval.metrics import lm_loss

        return lm_loss(logits, targets, reduction="sum") * self.scale


class ClassifyLoss:
    """Cross-entropy of (B, C) logits against (B,) label ids, or against (B, C) label distributions
    (distillation's targets: finetune/distill.py), with optional class weights; the trainer's
    `loss_fn` for classifiers (a class, so it pickles for the pipeline schedule).

    In training the trainer sets `scale` each step (as TokenSumLoss's) to accum * dp / (the step's
    denominator over every rank), and 'mean' is the summed loss times it: one mean over the whole
    step. With class weights torch's per-micro-batch mean divides by that micro-batch's sum of
    weights, so a mean of those means would depend on how the step is split into micro-batches and
    ranks. `scale` None (outside training): torch's mean of this call."""

    def __init__(self, weight: torch.Tensor | None = None) -> None:
        self.weight = weight
        self.scale: float | None = None

    def denominator(self, targets: torch.Tensor) -> float:
        """This micro-batch's part of the step's denominator, torch's 'mean' rule: the sum of its
        labels' weights for label ids, its rows for label distributions or without weights. (With
        class weights the two rules' scales differ, each consistent within a run.)"""
        if self.weight is not None and targets.ndim == 1:
            return float(self.weight.to(targets.device)[targets].double().sum())
        return float(targets.shape[0])

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if logits.ndim != 2 or targets.shape not in (logits.shape[:1], logits.shape):
            raise ValueError(f"classify loss: logits {tuple(logits.shape)} must be (B, C) and targets "
                             f"{tuple(targets.shape)} (B,) label ids or (B, C) label distributions")
        w = self.weight.to(logits.device) if self.weight is not None else None
        if reduction == "mean" and self.scale is not None:
            return torch.nn.functional.cross_entropy(logits.float(), targets, weight=w, reduction="sum") * self.scale
        return torch.nn.functional.cross_entropy(logits.float(), targets, weight=w, reduction=reduction)


def balanced_weights(labels: Any, n_classes: int) -> torch.Tensor:
    """scikit-learn's 'balanced' class weights: n / (C * count_c) (a class absent from training: 0)."""
    counts = torch.bincount(torch.as_tensor(labels, dtype=torch.int64), minlength=n_classes).double()
    w = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return w.float()
