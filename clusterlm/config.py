"""Run configuration: TOML recipes + `--section.key=value` overrides -> frozen, typed dataclasses.

    clusterlm config show recipes/shakespeare_char_cpu.toml --train.max_steps=100

Each component gets its own section (`data`, `model`, `train`, `optim`, `checkpoint`, `parallel`,
`plan`, `eval`, `finetune`); nothing
receives the whole run config. Unknown keys fail with a close-match suggestion; wrong types name
the key, the value and the expected type. `[model]` may start from a named preset
(`preset = "gpt2-124m"`) with the other keys overriding it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from clusterlm.errors import ConfigError
from clusterlm.models.config import ModelConfig, preset_values
from clusterlm.parallel.dims import ParallelDims  # the [parallel] section (torch-free)


# ---- sections -------------------------------------------------------------------------------
def _check_finite(obj: Any, section: str) -> None:
    """Reject inf/nan in any float field of a section built directly in Python (the TOML/override
    loader, `_coerce`, already refuses them with the key named)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{section}.{f.name}={v!r} is not a finite number; give a finite value")


@dataclass(frozen=True)
class DataConfig:
    dir: str = "data/shakespeare_char"
    """prepared data directory (meta.json + shards), as written by `clusterlm prepare`"""
    source: str = ""
    """if `dir` does not exist yet, prepare it from this: 'builtin:shakespeare', or a path/glob"""
    tokenizer: str = "char"
    """tokenizer used when preparing from `source`: byte, char, bpe or a tokenizer.json path"""
    vocab_size: int = 0
    """BPE vocabulary size when preparing from `source` (0 = the tokenizer's default)"""
    val_fraction: float = 0.1
    """fraction of documents held out for validation when preparing from `source`"""

    def __post_init__(self) -> None:
        _check_finite(self, "data")
        if not self.dir.strip() or self.dir.strip() == ".":
            raise ConfigError(f"data.dir={self.dir!r}: give the prepared data's own folder, e.g. data/my_corpus")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.vocab_size < 0:
            raise ConfigError(f"data.vocab_size={self.vocab_size} must be >= 0 (0 = the tokenizer's default)")


@dataclass(frozen=True)
class TrainConfig:
    out_dir: str = "runs/default"
    """run directory: checkpoints, metrics.jsonl, TensorBoard events, plots"""
    seed: int = 1337
    seq_len: int = 256
    """tokens per training sample (context length); at most model.max_seq_len"""
    micro_batch_size: int = 12
    """samples per forward/backward on one device"""
    global_batch_tokens: int = 0
    """tokens per optimizer step over all devices; 0 = micro_batch_size * seq_len * data-parallel size"""
    max_steps: int = 2000
    max_minutes: float = 0.0
    """stop (and save) after this much wall time; 0 = no limit"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this; 0 = off"""
    dtype: Literal["auto", "bf16-native", "fp32", "bf16", "fp16"] = "auto"
    """autocast dtype: auto = bf16 on GPUs that support it, fp32 on CPU; bf16-native = the same, and
    bf16 on CPUs with AMX or AVX512-BF16 (faster there; fp32 on other CPUs)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False
    """torch.compile the model"""
    threads: int = 0
    """torch intra-op threads on CPU; 0 = torch's default"""
    log_interval: int = 10
    eval_interval: int = 250
    """steps between evaluations on the val split; 0 = only at the end"""
    eval_batches: int = 20
    max_bad_steps: int = 5
    """stop after this many consecutive NaN/Inf losses (each one skips its optimizer step)"""
    resume: str = "none"
    """none, auto (newest verified checkpoint in out_dir) or a checkpoint path"""
    tensorboard: bool = True
    skip_memory_check: bool = False
    """start even when the planner's predicted memory per device exceeds the memory available (the
    check refuses such runs before allocating; docs/training.md)"""
    probe_spec: str = ""
    """node spec from `clusterlm probe --out`: its cited peak, else its measured matmul TFLOP/s, is
    the MFU denominator; empty = the known-accelerator table on CUDA, unknown on CPU"""
    heartbeat_timeout: float = 60.0
    """distributed runs: a rank silent this many seconds is named (rank, host) and the job exits 76
    (docs/reliability.md); 0 = off (the process group's own 600 s timeout then applies)"""

    def __post_init__(self) -> None:
        _check_finite(self, "train")
        if not self.out_dir.strip() or self.out_dir.strip() == ".":
            raise ConfigError(f"train.out_dir={self.out_dir!r}: give the run its own folder, e.g. runs/my_run (its "
                              "checkpoints, config.toml and metrics.jsonl go there)")
        if not self.resume.strip():  # read as the path "." it said "no checkpoints in ."
            raise ConfigError(f"train.resume={self.resume!r}: give none, auto or a checkpoint path")
        for name in ("seq_len", "micro_batch_size", "max_steps", "log_interval", "eval_batches", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        for name in ("seed", "global_batch_tokens", "threads", "eval_interval", "max_minutes", "grad_clip",
                     "heartbeat_timeout"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 0")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 6e-4
    """peak learning rate"""
    min_lr: float = 6e-5
    """floor the schedule decays to"""
    schedule: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    """after warmup: cosine or linear decay to min_lr, warmup-stable-decay, or constant"""
    warmup_steps: int = 100
    decay_steps: int = 0
    """steps over which the lr decays after warmup; 0 = until train.max_steps"""
    wsd_decay_fraction: float = 0.2
    """for schedule = wsd: the last fraction of steps that decay linearly to min_lr"""
    weight_decay: float = 0.1
    """decoupled (AdamW) decay on matrices only; norms, biases and embeddings do not decay"""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    layer_lr_decay: float = 1.0
    """< 1: each layer's lr is this times the lr of the layer above; the head keeps optim.lr, the
    embeddings get the least (ULMFiT's discriminative fine-tuning uses 1/2.6); 1 = one lr for all"""
    unfreeze_every: int = 0
    """> 0: ULMFiT's gradual unfreezing: the head (and final norm) train from the first step, and every
    this many steps the next layer down joins, the embeddings last (each group's lr is 0 until then;
    its gradients and Adam moments are still computed, so it works the same under DDP and FSDP);
    0 = every layer from the start"""
    ema_decay: float = 0.0
    """> 0: keep an exponential moving average of the weights (e.g. 0.999, about the last 1,000 steps;
    warmed up over the first steps); evaluation and checkpoints use it (train/ema.py); 0 = off"""

    def __post_init__(self) -> None:
        _check_finite(self, "optim")
        if not 0.0 < self.layer_lr_decay <= 1.0:
            raise ConfigError(f"optim.layer_lr_decay={self.layer_lr_decay} must be in (0, 1]: 1 gives every layer "
                              "optim.lr, 0.385 (1/2.6) is ULMFiT's discriminative fine-tuning")
        if self.unfreeze_every < 0:
            raise ConfigError(f"optim.unfreeze_every={self.unfreeze_every} must be >= 0: 0 trains every layer from "
                              "the first step, N unfreezes one more layer from the top every N steps")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay={self.ema_decay} must be in [0, 1): 0 turns the average off, "
                              "0.999 averages about the last 1,000 steps")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.lr={self.lr}, optim.min_lr={self.min_lr}: need 0 <= min_lr <= lr and lr > 0")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ConfigError("optim.warmup_steps and optim.decay_steps must be >= 0")
        if not (0.0 <= self.beta1 < 1.0 and 0.0 <= self.beta2 < 1.0):
            raise ConfigError(f"optim.beta1={self.beta1}, optim.beta2={self.beta2} must be in [0, 1)")
        if not 0.0 < self.wsd_decay_fraction <= 1.0:
            raise ConfigError(f"optim.wsd_decay_fraction={self.wsd_decay_fraction} must be in (0, 1]")
        for name in ("weight_decay", "eps"):  # torch.optim.AdamW refuses negatives, but only once built
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name}={getattr(self, name)} must be >= 0")


@dataclass(frozen=True)
class CheckpointConfig:
    interval: int = 500
    """steps between checkpoints (a final one is always written); 0 = final only"""
    keep_last: int = 3
    """checkpoints kept in out_dir/checkpoints; older ones are deleted"""
    async_save: bool = False
    """distributed runs: write periodic checkpoints in the background (committed before the next save)"""
    mirror: str = ""
    """second folder each committed checkpoint is copied to in the background (keep_last applies
    there too); resume falls back to it when out_dir's checkpoints are missing or corrupt; "" = off"""
    keep_best: bool = False
    """also keep the checkpoint saved at the lowest validation loss so far, beside the keep_last
    newest, named in checkpoints/best (pass RUN/checkpoints/best wherever a checkpoint is read);
    needs interval to be a multiple of train.eval_interval (docs/checkpoints.md)"""

    def __post_init__(self) -> None:
        if self.interval < 0:
            raise ConfigError(f"checkpoint.interval={self.interval} must be >= 0 (0 saves only at the end)")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last={self.keep_last} must be >= 1 (the newest checkpoint is "
                              "always kept)")


@dataclass(frozen=True)
class PlanConfig:
    """What `clusterlm plan` predicted for this recipe; training logs measured figures beside these."""

    cluster: str = ""
    predicted_step_s: float = 0.0
    predicted_tokens_per_s: float = 0.0
    predicted_memory_bytes: int = 0

    def __post_init__(self) -> None:
        _check_finite(self, "plan")
        for name in ("predicted_step_s", "predicted_tokens_per_s", "predicted_memory_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"plan.{name}={getattr(self, name)} must be >= 0 (0 = no prediction)")


@dataclass(frozen=True)
class EvalConfig:
    """Task evaluation during training (docs/training.md, "Task scores during training")."""

    tasks: tuple[str, ...] = ()
    """tasks scored during training: bundled names (e.g. "shakespeare_word_order"), task files
    (.jsonl, .tsv) or parallel pairs "SRC,TGT" (docs/tasks.md); empty = no task evaluation"""
    every: int = 0
    """steps between task evaluations; 0 = only at the end of training"""
    limit: int = 0
    """score the first N examples of each task; 0 = all"""
    batch_size: int = 16
    """requests (log-likelihood) or prompts (generation) per forward pass"""
    max_new_tokens: int = 64
    """generate tasks: the most tokens decoded per prompt"""
    temperature: float = 0.0
    """generate tasks: 0 = greedy (the default); above 0 samples, with `seed`"""
    seed: int = 0
    """generate tasks with temperature > 0: prompt i samples from a generator seeded with seed + i"""
    truncate: bool = False
    """left-truncate inputs longer than the model's context instead of refusing the run at start-up"""

    def __post_init__(self) -> None:
        _check_finite(self, "eval")
        for i, t in enumerate(self.tasks):
            if not isinstance(t, str) or not t.strip():
                raise ConfigError(f"eval.tasks[{i}]={t!r} must be a task name or file")
        dup = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
        if dup:
            raise ConfigError(f"eval.tasks lists {', '.join(map(repr, dup))} more than once")
        for name in ("every", "limit", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"eval.{name}={getattr(self, name)} must be >= 0")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name}={getattr(self, name)} must be >= 1")
        if self.temperature < 0:
            raise ConfigError(f"eval.temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.every and not self.tasks:
            raise ConfigError(f"eval.every={self.every} but eval.tasks is empty: nothing to evaluate; "
                              "list tasks, e.g. eval.tasks = [\"shakespeare_word_order\"], or set eval.every=0 "
                              "to evaluate no task")


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning (docs/finetune.md): start from a base model, train on labelled records."""

    task: Literal["lm", "mlm", "span", "sft", "classify", "seq2seq"] = "lm"
    """lm = pre-training on token shards (no fine-tuning); mlm = masked-LM pre-training of an
    encoder on token shards (BERT's recipe, data/mlm.py); sft = supervised fine-tuning on
    prompt/completion or chat records (loss on the responses only); classify = a classification head;
    seq2seq = an encoder-decoder on source/target pairs (prompt -> encoder, completion -> decoder);
    span = T5's span-corruption pre-training of an encoder-decoder on token shards (data/mlm.py)"""
    init_from: str = ""
    """the base: a clusterlm run, checkpoints folder or step folder, or a Hugging Face folder;
    empty = from scratch (random weights, tokenizer trained on the records)"""
    val_source: str = ""
    """validation records (same forms as data.source); empty = hold out data.val_fraction of them"""
    template: str = "auto"
    """chat template: auto (the builtin 'clusterlm' template for chat records and a base that has
    one, none for plain prompt/completion pairs), none, a builtin name, or a .jinja file"""
    pack: bool = True
    """sft: pack several examples into each row of seq_len tokens (no padding waste; attention
    crosses example boundaries, as in most SFT packers); false = one example per row, padded"""
    prompt_loss: bool = False
    """sft: also train on the prompt tokens (default: the loss is on the responses only)"""
    labels: tuple[str, ...] = ()
    """classify: the label names in order; empty = the sorted labels found in the training records"""
    class_weights: str = "none"
    """classify: none, or balanced (weight of class c = n / (C * count_c), sklearn's rule)"""
    pool: Literal["auto", "last", "mean", "max"] = "auto"
    """classify: auto = the last real token for transformers, the mean over real tokens for LSTM/GRU;
    max = each feature's largest value over the real tokens"""
    bidirectional: bool = False
    """classify, lstm/gru: a second backbone reads each text right to left and the head reads both
    pooled states (a BiLSTM); with init_from both start from the base's weights"""
    inherit_dropout: bool = True
    """take the base's model.dropout and embed_dropout where [model] leaves them at their defaults
    (0); false = [model]'s values as given, e.g. fine-tune at dropout 0 a base pre-trained at 0.1"""
    freeze_embeddings: bool = False
    """do not train the token (and position) embeddings"""
    freeze_layers: int = 0
    """do not train the first k blocks (transformer layers / recurrent layers)"""
    lora_rank: int = 0
    """LoRA rank on the attention and MLP projections; 0 = full fine-tuning (docs/finetune.md)"""
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_plus_ratio: float = 1.0
    """LoRA+ (Hayou et al. 2024): the B factors (output side, zero at the start) train at this many
    times the lr of the A factors and the rest; 1 = plain LoRA, the paper suggests about 16"""
    lora_dora: bool = False
    """DoRA (Liu et al. 2024; peft's use_dora): each adapted Linear also learns its output rows'
    magnitudes (one number per row), its low-rank update changing their direction only
    (docs/finetune.md); an embedding adapter stays plain LoRA"""
    mask_prob: float = 0.15
    """mlm: the share of positions chosen (each then 80% <|mask|>, 10% a random token, 10% kept);
    span: the share of tokens in the corrupted spans (T5's noise density)"""
    mean_span: float = 3.0
    """span: the mean length of a corrupted span (T5: 3)"""
    lora_targets: tuple[str, ...] = ()
    """module names LoRA wraps (the last part of a Linear's or Embedding's name, e.g. ["wq", "wv",
    "tok_embeddings"]); empty = every attention and MLP projection the model has (wq wk wv wo w1 w2,
    and w3 with SwiGLU)"""
    distill_from: tuple[str, ...] = ()
    """classify: teacher classifiers (clusterlm runs or checkpoints with the data's labels and
    tokenizer); each training text's target becomes (1 - distill_weight) * its label +
    distill_weight * the teachers' averaged probabilities (knowledge distillation: one model
    trained to answer like an ensemble; docs/finetune.md)"""
    distill_weight: float = 0.5
    """classify with distill_from: the share of the target given to the teachers, in (0, 1]"""
    augment: int = 0
    """classify with distill_from: K augmented copies of each training text (words swapped, n-grams
    cut: data/augment.py) that only the teachers' probabilities label; 0 = none"""

    def __post_init__(self) -> None:
        _check_finite(self, "finetune")
        if self.class_weights not in ("none", "balanced"):
            raise ConfigError(f"finetune.class_weights={self.class_weights!r}; expected 'none' or 'balanced'")
        if self.freeze_layers < 0 or self.lora_rank < 0:
            raise ConfigError(f"finetune.freeze_layers={self.freeze_layers} and lora_rank={self.lora_rank} must be >= 0")
        if self.lora_plus_ratio <= 0:
            raise ConfigError(f"finetune.lora_plus_ratio={self.lora_plus_ratio} must be > 0 (1 = plain LoRA, LoRA+ "
                              "suggests 16)")
        if self.lora_dora and not self.lora_rank:
            raise ConfigError("finetune.lora_dora=true needs finetune.lora_rank >= 1 (DoRA is a kind of LoRA adapter; "
                              "lora_rank=0 is full fine-tuning)")
        if self.lora_alpha <= 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"finetune.lora_alpha={self.lora_alpha} must be > 0 and lora_dropout="
                              f"{self.lora_dropout} in [0, 1)")
        dup = sorted({x for x in self.labels if self.labels.count(x) > 1})
        if dup or any(not x for x in self.labels):
            raise ConfigError(f"finetune.labels={list(self.labels)!r}: labels must be distinct non-empty names")
        if self.labels and len(self.labels) < 2:
            raise ConfigError(f"finetune.labels={list(self.labels)!r}: a classifier needs at least 2 labels")
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"finetune.mask_prob={self.mask_prob} must be in (0, 1)")
        if self.mean_span < 1.0:
            raise ConfigError(f"finetune.mean_span={self.mean_span} must be >= 1")
        if self.distill_from and self.task != "classify":
            raise ConfigError(f"finetune.distill_from is set but finetune.task={self.task!r}; distillation trains a "
                              "classifier (task = 'classify') on its teachers' probabilities")
        if not 0.0 < self.distill_weight <= 1.0:
            raise ConfigError(f"finetune.distill_weight={self.distill_weight} must be in (0, 1] (the teachers' share "
                              "of each target; 1 = the teachers' probabilities alone)")
        if self.augment < 0 or (self.augment and not self.distill_from):
            raise ConfigError(f"finetune.augment={self.augment}: augmented copies have no label a classifier can "
                              "trust; they need teachers to label them (finetune.distill_from), and K >= 0")
        if any(not t for t in self.distill_from):
            raise ConfigError(f"finetune.distill_from={list(self.distill_from)!r}: a teacher path is empty")
        if self.task in ("lm", "mlm", "span") and (self.init_from or self.lora_rank):
            raise ConfigError(f"finetune.init_from / lora_rank are set but finetune.task={self.task!r} (pre-training); set task = 'sft' "
                              "or 'classify'")


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelDims = field(default_factory=ParallelDims)
    plan: PlanConfig = field(default_factory=PlanConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False, metadata={"internal": True})
    """not a setting: the 'section.key's the recipe and the command line set (load_run_config), so that a
    value equal to its default can be told from an unset one; never written to config.toml"""

    def __post_init__(self) -> None:
        ck, tc = self.checkpoint, self.train
        if ck.keep_best and (tc.eval_interval <= 0 or ck.interval % tc.eval_interval):
            raise ConfigError(f"checkpoint.keep_best needs a validation loss at every save: checkpoint.interval="
                              f"{ck.interval} must be a multiple of train.eval_interval={tc.eval_interval} (> 0; "
                              "interval 0 saves only at the end)")


# ---- typed construction from plain dicts ---------------------------------------------------------
# The one typed loader: run configs (here) and cluster specs (cluster/spec.py) are both plain TOML
# trees turned into frozen dataclasses by `from_dict`, with the same messages for unknown keys
# (close-match suggestion), wrong types (the key, the value, the expected type) and inf/nan.
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _wrong_type(key: str, value: Any, expected: str) -> ConfigError:
    shown = str(value).lower() if isinstance(value, bool) else repr(value)  # as TOML writes it: true, not True
    return ConfigError(f"{key}={shown} has type {type(value).__name__}; expected {expected}")


def _int64(value: int, key: str) -> None:
    """Refuse an integer outside 64 bits, as TOML does; tomllib reads any length (10**400 written out
    raised OverflowError in a float field, and a seed of 2**64 failed in torch naming no key)."""
    if not -2**63 <= value < 2**63:
        raise ConfigError(f"{key}={value} is outside the 64-bit integer range TOML allows "
                          f"({-2**63} .. {2**63 - 1})")


def _coerce(value: Any, tp: Any, key: str, numbers_as_str: bool) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):  # whatever the field's type
        _int64(value, key)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and isinstance(value, (dict, list, tuple)):
            return _coerce(value, options[0], key, numbers_as_str)  # the error names the inner key
        for a in options:
            try:
                return _coerce(value, a, key, numbers_as_str)
            except ConfigError:
                pass
        raise _wrong_type(key, value, _type_name(tp))
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}={value!r} is not one of {_type_name(tp)}{hint}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(key, value, "a list")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]", numbers_as_str) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _wrong_type(key, value, "a table")
        inner = args[1] if args else Any
        return {str(k): _coerce(v, inner, f"{key}.{k}", numbers_as_str) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # every float field of every section, current and future, and TOML's inf/nan literals:
            # no config value means anything as inf or nan (a nan also slips past `x < 0` checks)
            if not math.isfinite(value):
                raise ConfigError(f"{key}={value!r} is not a finite number; give a finite value")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if numbers_as_str and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, (int, float)):  # a text that TOML reads as a number or boolean
            text = str(value).lower() if isinstance(value, bool) else value
            # a list element (key "eval.tasks[0]") is quoted inside the list: there is no --a.b[0]=... override
            quoted = (f"--{key.split('[', 1)[0]}='[\"{text}\", ...]'" if "[" in key else f"--{key}='\"{text}\"'")
            raise ConfigError(f"{key}={value!r} has type {type(value).__name__}; expected str (text that reads as a "
                              f"number or boolean is quoted: {quoted} on the command line)")
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return from_dict(tp, value, key, numbers_as_str=numbers_as_str)
        raise _wrong_type(key, value, "a table")
    raise _wrong_type(key, value, _type_name(tp))


def from_dict(cls: type, data: dict[str, Any], where: str = "", *, numbers_as_str: bool = False) -> Any:
    """Build the dataclass `cls` from `data`, checking every key and type; `where` prefixes the
    keys named in errors. `numbers_as_str` takes a number where a str is expected (hand-written
    cluster specs write versions and sizes as bare numbers)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]
    kwargs = {}
    for key, value in data.items():
        full = f"{where}.{key}" if where else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{(where + '.') if where else ''}{close[0]}'?" if close else ""
            raise ConfigError(f"unknown key '{full}'{hint} (valid keys: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], full, numbers_as_str)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field left out (cluster specs have some)
        raise ConfigError(f"{where or cls.__name__}: {e}") from e


def to_dict(obj: Any, *, drop_empty: bool = False) -> Any:
    """Plain TOML-ready data of a (nested) config dataclass: None values left out (TOML has no
    null), tuples as lists, and with `drop_empty` empty tables and lists left out too."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            if f.metadata.get("internal"):
                continue
            v = to_dict(getattr(obj, f.name), drop_empty=drop_empty)
            if v is None or (drop_empty and v in ({}, [])):
                continue
            out[f.name] = v
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v, drop_empty=drop_empty) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v, drop_empty=drop_empty) for k, v in obj.items()}
    return obj


def to_toml(cfg: Any) -> str:
    import tomli_w

    return tomli_w.dumps(to_dict(cfg))


# ---- recipes and overrides ---------------------------------------------------------------------
def parse_override(arg: str) -> tuple[list[str], Any]:
    """'--train.lr=3e-4' -> (['train', 'lr'], 0.0003). The value is read as TOML when it parses
    (numbers, booleans, quoted strings, lists), else taken as a bare string."""
    body = arg[2:] if arg.startswith("--") else arg
    if "=" not in body:
        raise ConfigError(f"override {arg!r} must look like --section.key=value")
    key, raw = body.split("=", 1)
    parts = key.split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"override {arg!r}: the key must be section.key, e.g. --train.max_steps=100")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if isinstance(value, (datetime.date, datetime.time)):  # no key takes a date: 2024-06-01 is a name
        value = raw
    return parts, value


def _merge(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(parts)}: '{p}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def resolve(tree: dict[str, Any], cls: type = RunConfig) -> Any:
    """Build a run config from a parsed TOML tree (with a `[model] preset` expanded)."""
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    _check_sections(tree, cls)
    model = tree.get("model")
    if isinstance(model, dict) and "preset" in model:
        name = model.pop("preset")
        if not isinstance(name, str):
            raise ConfigError(f"model.preset={name!r} has type {type(name).__name__}; expected str")
        tree["model"] = {**preset_values(name), **model}
    return from_dict(cls, tree)


def _check_sections(tree: dict[str, Any], cls: type) -> None:
    """Unknown sections, and keys placed in the wrong section, get a pointed suggestion."""
    sections = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    hints = typing.get_type_hints(cls)
    for name, body in tree.items():
        if name not in sections:
            if not isinstance(body, dict):  # a key above every [section] header
                homes = [o for o in sections if name in {f.name for f in dataclasses.fields(hints[o])}]
                where = f"; it belongs under [{homes[0]}]" if homes else ""
                raise ConfigError(f"'{name} = {body!r}' stands outside any section{where} (every key goes under a "
                                  f"[section] header: {', '.join(sections)})")
            close = difflib.get_close_matches(name, sections, n=1)
            hint = f"; did you mean [{close[0]}]?" if close else ""
            raise ConfigError(f"unknown section [{name}]{hint} (valid sections: {', '.join(sections)})")
        if not isinstance(body, dict):
            raise ConfigError(f"'{name}' must be a section (a TOML table), got {body!r}")
        own = {f.name for f in dataclasses.fields(hints[name])} | ({"preset"} if name == "model" else set())
        for key in body:
            if key in own:
                continue
            for other in sections:
                if other != name and key in {f.name for f in dataclasses.fields(hints[other])}:
                    raise ConfigError(f"unknown key '{name}.{key}'; did you mean '{other}.{key}'?")


def bundled_recipes() -> dict[str, Path]:
    """Recipes shipped inside the package (the repository's recipes/ folder), by stem."""
    folder = Path(__file__).parent / "recipes"
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


def _no_recipe(path: Path, bundled: dict[str, Path]) -> str:
    what = "is a directory, not a recipe file" if path.is_dir() else "does not exist"
    return f"recipe {path} {what}; give a .toml file or a bundled recipe: {', '.join(bundled)}"


def resolve_recipe(recipe: str | None) -> str | None:
    """Absolute path of a recipe file or of a bundled recipe named by stem."""
    if recipe is None:
        return None
    path = Path(recipe)
    if path.is_file():
        return os.path.abspath(path)  # as the user named it (symbolic links kept)
    bundled = bundled_recipes()
    if len(path.parts) == 1 and path.stem in bundled:
        return os.path.abspath(bundled[path.stem])
    raise FileNotFoundError(_no_recipe(path, bundled))


def load_tree(path: str | Path) -> dict[str, Any]:
    """Parse a recipe file; a bare name such as 'shakespeare_char_cpu' finds a bundled recipe."""
    path = Path(path)
    if not path.is_file():
        bundled = bundled_recipes()
        if path.stem in bundled and len(path.parts) == 1:
            path = bundled[path.stem]
        else:
            raise FileNotFoundError(_no_recipe(path, bundled))
    try:  # utf-8-sig: a byte order mark (Notepad) read as "invalid TOML ... at line 1, column 1"
        return tomllib.loads(path.read_text(encoding="utf-8-sig"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e
    except UnicodeDecodeError as e:  # said "'utf-8' codec can't decode byte ..." without the file
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); a recipe "
                          "is a TOML file in UTF-8") from e


def load_run_config(path: str | Path | None, overrides: list[str] = (), cls: type = RunConfig) -> Any:
    """Read a recipe (or start from defaults when `path` is None) and apply overrides in order."""
    tree = load_tree(path) if path is not None else {}
    for arg in overrides:
        parts, value = parse_override(arg)
        _merge(tree, parts, value)
    cfg = resolve(tree, cls)
    if "given" in {f.name for f in dataclasses.fields(cls)}:
        cfg = dataclasses.replace(cfg, given=given_keys(tree))
    return cfg


def given_keys(tree: dict[str, Any]) -> frozenset[str]:
    """The 'section.key's a recipe tree sets, a [model] preset's keys included."""
    keys = {f"{name}.{k}" for name, body in tree.items() if isinstance(body, dict) for k in body}
    preset = tree.get("model", {}).get("preset") if isinstance(tree.get("model"), dict) else None
    if isinstance(preset, str):
        keys |= {f"model.{k}" for k in preset_values(preset)}
    return frozenset(keys - {"model.preset"})


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate `--section.key=value` overrides from ordinary arguments."""
    overrides = [a for a in argv if a.startswith("--") and "." in a.split("=", 1)[0]]
    rest = [a for a in argv if a not in overrides]
    return overrides, rest


def main(argv: list[str]) -> int:
    """`clusterlm config show RECIPE [--section.key=value ...]`."""
    overrides, rest = split_overrides(argv)
    parser = argparse.ArgumentParser(
        prog="clusterlm config",
        description="Show the resolved configuration of a recipe with --section.key=value overrides.",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    show = sub.add_parser("show", help="print the resolved config as TOML")
    show.add_argument("recipe", nargs="?", help="recipe TOML file (defaults when omitted)")
    args = parser.parse_args(rest)
    cfg = load_run_config(args.recipe, overrides)
    sys.stdout.write(to_toml(cfg))
    return 0
