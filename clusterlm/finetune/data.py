"""The fine-tuning run's data directory: prepared once from `data.source` with the base's tokenizer
(plus the chat template's special tokens), or reused when it was made from the same inputs.

    data_dir, base, model_cfg = ensure_finetune_data(cfg)     # cfg: a RunConfig with [finetune]

Torch-light: the base's weights are not read here (finetune/setup.py `base_state` does that).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from clusterlm.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def resolve_template(spec: str, task: str, base_template: Path | None, records: list) -> Any | None:
    """The chat template for finetune.template = `spec` (auto, none, a builtin name or a .jinja file)."""
    from clusterlm.generate.template import BUILTIN_TEMPLATES, load_template

    if task == "classify" or spec == "none":
        if task == "classify" and spec not in ("auto", "none"):
            raise ConfigError(f"finetune.template={spec!r}: a classifier reads plain text; leave template unset")
        return None
    if spec == "auto":
        if base_template is not None:
            return _check_renders_replies(load_template(str(base_template)), spec)
        if any(getattr(r, "messages", None) is not None for r in records):
            return load_template(next(iter(BUILTIN_TEMPLATES)))
        return None
    return _check_renders_replies(load_template(spec), spec)


REPLY_PROBE = "q7Zx reply"  # an assistant content no template writes by itself


def _check_renders_replies(template: Any, spec: str) -> Any:
    """`template`, if it writes the assistant's content: SFT trains on exactly that text, so a template
    that leaves it out (static text, a typo in `message['content']`) would prepare examples with
    nothing to train and a run whose loss is 0."""
    turns = [{"role": "user", "content": "q7Zx question"}, {"role": "assistant", "content": REPLY_PROBE}]
    rendered = []
    for sample in (turns, [{"role": "system", "content": "q7Zx system"}] + turns):
        try:
            rendered.append(template.render(sample))
        except ValueError:  # a template without a system role (or one that requires it): load_template's rule
            pass
    if not any(REPLY_PROBE in text for text in rendered):
        raise ConfigError(f"finetune.template={spec!r}: chat template {template.name} does not render the assistant's "
                          "content (a sample reply is not in its output), so there would be nothing to train; use a "
                          "template that writes each message's content")
    return template


def _texts(records: list) -> list[str]:
    """The records' own contents (a BPE tokenizer's training text: byte-level, it encodes any text)."""
    out = []
    for r in records:
        if hasattr(r, "text"):
            out.append(r.text)
        elif r.messages is not None:
            out += [c for _, c in r.messages]
        else:
            out += [r.prompt or "", r.completion or ""]
    return out


def _encoded_texts(records: list, template: Any | None) -> list[str]:
    """The text of each record as it will be encoded (data/sft.py segments: the rendered template, the
    space between prompt and completion), the template's special tokens left out (they are added as
    tokens of their own). A char tokenizer knows only the characters it was trained on, so trained on
    the contents alone it maps the newlines and spaces clusterlm itself inserts to <|unk|>."""
    from clusterlm.data.sft import segments

    out = []
    for r in records:
        if hasattr(r, "text"):
            out.append(r.text)
            continue
        text = "".join(t for t, _ in segments(r, template))
        for tok in getattr(template, "special_tokens", ()):
            text = text.replace(tok, "")
        out.append(text)
    return out


def _warn_unknown_chars(tok: Any, texts: list[str]) -> None:
    """A char base reads characters it never saw as <|unk|>, and only special tokens can be added to it:
    say which characters of the examples train as <|unk|> (a chat template's role names, a new script),
    as `generate` does for a prompt, rather than train on them silently."""
    unk = getattr(tok, "unk_id", None)
    if unk is None:  # byte and BPE tokenizers encode any text
        return
    unknown = sorted(c for c in set().union(*map(set, texts)) if tok.encode(c) == [unk])
    if unknown:
        shown = "".join(unknown[:10]) + ("..." if len(unknown) > 10 else "")
        log.warning("%d distinct character(s) of the examples (as they are encoded, template included) are not in "
                    "the base's character vocabulary and train as <|unk|>: %r", len(unknown), shown)


def _check_made_from(data_dir: Path, meta: dict, cfg: Any, base: Any | None) -> None:
    from clusterlm.data.sft import source_differs

    ft, data = cfg.finetune, cfg.data
    if meta.get("layout") != "examples":
        raise ConfigError(f"data.dir={str(data_dir)!r} holds pre-training token shards; fine-tuning prepares its own "
                          "examples: give a new data.dir (and data.source = the records)")
    if meta.get("task") != ft.task:
        raise ConfigError(f"data.dir={str(data_dir)!r} was prepared for finetune.task={meta.get('task')!r}, not "
                          f"{ft.task!r}; give a new data.dir")
    if int(meta.get("augment") or 0) != ft.augment:
        raise ConfigError(f"data.dir={str(data_dir)!r} was prepared with finetune.augment={meta.get('augment') or 0}, "
                          f"not {ft.augment}; give a new data.dir")
    made = meta.get("made_from") or {}
    if data.source:
        why = source_differs(made.get("source") or [], data.source)
        if why:
            raise ConfigError(f"data.dir={str(data_dir)!r} was not prepared from data.source={data.source!r} as it "
                              f"is now: {why}; delete {data_dir} or give a new data.dir")
    if ft.task in ("sft", "classify"):
        _check_options(data_dir, meta, prepare_options(cfg))
    if ft.task == "sft":
        _check_template(data_dir, made.get("template_sha256"), ft.template, base)


def prepare_options(cfg: Any) -> dict[str, Any]:
    """The options that shape a prepared directory's examples besides its records, kept in meta.json's
    made_from (a directory made with others is refused, not silently reused): the tokenizer trained
    from scratch, the validation hold-out, and for SFT what the loss is on and the template."""
    ft, data = cfg.finetune, cfg.data
    out = {"data.tokenizer": None if ft.init_from else data.tokenizer,  # a base brings its own
           "data.val_fraction": None if ft.val_source else data.val_fraction,  # val_source replaces it
           "finetune.val_source": ft.val_source}
    if ft.task == "sft":
        out.update({"finetune.prompt_loss": ft.prompt_loss, "finetune.template": ft.template})
    return out


def _check_options(data_dir: Path, meta: dict, now: dict[str, Any]) -> None:
    """Refuse a directory prepared with other prepare_options (one from before they were kept in
    meta.json has only prompt_loss to compare)."""
    made = (meta.get("made_from") or {}).get("options")
    if made is None:
        made = {"finetune.prompt_loss": bool(meta.get("prompt_loss"))} if meta.get("task") == "sft" else {}
    for key, new in now.items():
        if key in made and made[key] != new:
            raise ConfigError(f"data.dir={str(data_dir)!r} was prepared with {key}={made[key]!r}, not {new!r}; give "
                              f"another data.dir, or delete {data_dir} to prepare it again")


def _check_template(data_dir: Path, made_sha: str | None, spec: str, base: Any | None) -> None:
    """Refuse a directory prepared with another template than finetune.template gives now: a .jinja
    file edited since, a directory from before the options were kept, or for 'auto' a base whose own
    chat_template.jinja differs (another init_from, the base re-exported): the option reads 'auto'
    either way, so the hash of the template that rendered the examples is what is compared."""
    import hashlib

    from clusterlm.generate.template import BUILTIN_TEMPLATES, load_template

    def sha256(name: str) -> str:
        return hashlib.sha256(load_template(name).source.encode()).hexdigest()

    base_template = base.template_file if base is not None else None
    if spec == "none":
        sha, now = None, "none"
    elif spec != "auto":
        sha = sha256(spec)
        now = f"sha256 {sha[:12]}"
    elif base_template is not None:
        sha = sha256(str(base_template))
        now = f"the chat template of {base.where}, of sha256 {sha[:12]}"
    else:  # the builtin template if the records have messages, else none: the records are checked above
        builtin = sha256(next(iter(BUILTIN_TEMPLATES)))
        sha = made_sha if made_sha in (None, builtin) else builtin
        now = f"the builtin template (sha256 {builtin[:12]}) or none, there being no base chat_template.jinja"
    if sha != made_sha:
        had = "no chat template" if made_sha is None else f"a chat template of sha256 {made_sha[:12]}"
        raise ConfigError(f"data.dir={str(data_dir)!r} was prepared with {had}, but finetune.template={spec!r} is "
                          f"{now}; give another data.dir, or delete {data_dir} to prepare it again")


def ensure_finetune_data(cfg: Any) -> tuple[Path, Any, Any]:
    """(data_dir, base or None, the fine-tuned model's ModelConfig) for a run with finetune.task sft or
    classify; prepares data.dir from data.source if it has no meta.json yet. Refused, it removes the
    data.dir it created (train/loop.py does the same for refusals after it returns)."""
    from clusterlm.errors import CheckpointError
    from clusterlm.finetune.setup import discard_made, new_folders, resolve_base

    ft = cfg.finetune
    made = new_folders(Path(cfg.data.dir))  # () when data.dir exists: then it is never removed
    base = None
    try:
        if ft.task in ("mlm", "span"):
            return _mlm_data(cfg)
        base = resolve_base(ft.init_from, Path(cfg.train.out_dir)) if ft.init_from else None
        return _finetune_data(cfg, base)
    except (ConfigError, DataError, CheckpointError):
        discard_made(made)
        discard_made(base.made if base is not None else ())  # a Hugging Face base converted for this run
        raise


# [finetune] keys each fine-tuning task has no use for, and why. seq2seq: pairs are padded (never packed),
# the loss is on the target only, there is no head; sft: there is no head; classify: one example a row
# (never packed), the loss is on the label. The corruption settings are the masked-LM/span objectives'.
UNUSED_BY_TASK = {
    "seq2seq": (("pack", "prompt_loss", "labels", "class_weights", "pool", "bidirectional", "mask_prob",
                 "mean_span"), "pairs are padded, the loss is on the target, and there is no classification head"),
    "sft": (("labels", "class_weights", "pool", "bidirectional", "mask_prob", "mean_span"),
            "they are for task = 'classify' and the masked-LM/span objectives; an SFT model has no classification "
            "head"),
    "classify": (("pack", "prompt_loss", "mask_prob", "mean_span"),
                 "a classifier reads one text a row, padded, and its loss is on the label alone"),
}


def _warn_unused_keys(ft: Any) -> None:
    """One warning naming the keys set away from their defaults that this task ignores (a recipe may share
    them with another task, so not a refusal)."""
    from clusterlm.config import FinetuneConfig

    if ft.task not in UNUSED_BY_TASK:
        return
    keys, why = UNUSED_BY_TASK[ft.task]
    default = FinetuneConfig()
    unused = [f"{k}={getattr(ft, k)!r}" for k in keys if getattr(ft, k) != getattr(default, k)]
    if unused:
        log.warning("finetune.task=%r does not use finetune.%s: ignored (%s)", ft.task, ", finetune.".join(unused),
                    why)


def _warn_tokenizer_ignored(data: Any, base_tok: Any, init_from: str, given: frozenset[str]) -> None:
    """A fine-tune from a base tokenizes with the base's tokenizer: say so when data.tokenizer (set by the
    recipe or the command line, or other than the default) asks for another kind."""
    from clusterlm.config import DataConfig

    if data.tokenizer == base_tok.kind or ("data.tokenizer" not in given and data.tokenizer == DataConfig().tokenizer):
        return
    size = f", data.vocab_size={data.vocab_size}" if data.vocab_size else ""
    log.warning("data.tokenizer=%r%s is not used: a fine-tune reads its data with the tokenizer of "
                "finetune.init_from=%r (%s, %d tokens)", data.tokenizer, size, init_from, base_tok.kind,
                base_tok.vocab_size)


def _finetune_data(cfg: Any, base: Any | None) -> tuple[Path, Any, Any]:
    """ensure_finetune_data with the base resolved."""
    from clusterlm.data.shards import read_meta
    from clusterlm.data.sft import prepare_examples, read_records
    from clusterlm.finetune.setup import as_base_classifier, check_tokenizer_extends, finetune_model_config, preflight
    from clusterlm.tokenizer import load_tokenizer

    ft, data = cfg.finetune, cfg.data
    _check_arch(ft.task, base.config.model if base is not None else cfg.model)
    ft = as_base_classifier(ft, base, cfg.given)  # a classifier base: its labels, pooling and readers
    if ft.task == "seq2seq" and ft.template not in ("auto", "none"):  # it was ignored: pairs are not rendered
        raise ConfigError(f"finetune.template={ft.template!r}: a seq2seq run gives the encoder each prompt as it is "
                          "(parallel files: the task harness's 'en: {source}\\nfr:'), no chat template renders it; "
                          "leave template unset")
    _warn_unused_keys(ft)
    base_tok = load_tokenizer(base.tokenizer_file) if base is not None else None
    preflight(ft, cfg.model, base, cfg.given)  # shape, LoRA targets, frozen layers: refused before data is written
    context = (base.config.model if base is not None else cfg.model).max_seq_len
    if cfg.train.seq_len > context:  # the trainer's check (train/loop.py), made before the data is written
        where, fix = ((f", the context of finetune.init_from={ft.init_from!r}", "") if base is not None
                      else ("", ", or a larger --model.max_seq_len"))
        raise ConfigError(f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={context}{where}; "
                          f"set --train.seq_len={context} or less{fix}")
    data_dir = Path(data.dir)
    seq2seq = ft.task == "seq2seq"
    if (data_dir / "meta.json").is_file():
        _check_made_from(data_dir, read_meta(data_dir), cfg, base)
    else:
        if not data.source:
            raise ConfigError(f"data.dir={str(data_dir)!r} is not prepared and data.source is empty; set data.source "
                              "to the training records (.jsonl, .tsv, or parallel files 'SRC,TGT')")
        from clusterlm.data.prepare import check_unprepared_data_dir

        check_unprepared_data_dir(data_dir, data.source)  # a folder of the user's files was replaced
        if seq2seq:
            from clusterlm.data.seq2seq import read_pairs

            records = read_pairs(data.source)
            val_records = read_pairs(ft.val_source, "finetune.val_source") if ft.val_source else None
        else:
            given = cfg.finetune.labels  # a classifier base's labels are checked below, naming it
            records = read_records(data.source, ft.task, given)
            val_records = read_records(ft.val_source, ft.task, given, "finetune.val_source") if ft.val_source else None
            if base is not None and base.labels:
                _check_base_labels(records + (val_records or []), base)
        template = None if seq2seq else resolve_template(ft.template, ft.task, base.template_file if base else None,
                                                         records + (val_records or []))
        if base_tok is not None:
            _warn_tokenizer_ignored(data, base_tok, ft.init_from, cfg.given)
            tok = base_tok
        else:
            from clusterlm.tokenizer.kinds import make_tokenizer, train_tokenizer

            if data.tokenizer == "byte":
                tok = make_tokenizer("byte")
            elif data.tokenizer == "char":  # every character the examples hold, validation's too
                tok = train_tokenizer("char", _encoded_texts(records + (val_records or []), template),
                                      data.vocab_size or None)
            elif data.tokenizer == "bpe":
                tok = train_tokenizer("bpe", _texts(records), data.vocab_size or None)
            else:
                tok = load_tokenizer(data.tokenizer)
        if template is not None:
            tok = tok.with_special_tokens(template.special_tokens)
        if base_tok is not None:
            _warn_unknown_chars(tok, _encoded_texts(records + (val_records or []), template))
        log.info("preparing %s: %s records from %s (template: %s, tokenizer: %s, %d tokens)", data_dir, ft.task,
                 data.source, "none" if template is None else ft.template, tok.kind, tok.vocab_size)
        if seq2seq:
            from clusterlm.data.seq2seq import prepare_pairs

            context = (base.config.model if base is not None else cfg.model).max_seq_len
            prepare_pairs(data_dir, source=data.source, tokenizer=tok, max_source_len=context,
                          val_source=ft.val_source, val_fraction=data.val_fraction, records=records,
                          val_records=val_records)
        else:
            prepare_examples(data_dir, task=ft.task, source=data.source, tokenizer=tok, val_source=ft.val_source,
                             val_fraction=data.val_fraction, template=template, labels=ft.labels,
                             prompt_loss=ft.prompt_loss, records=records, val_records=val_records,
                             augment=ft.augment, options=prepare_options(cfg))
    meta = read_meta(data_dir)
    if ft.task == "sft":
        from clusterlm.data.sft import check_responses_fit

        check_responses_fit(data_dir, cfg.train.seq_len)
    tok = load_tokenizer(data_dir / meta["tokenizer"]["file"])
    labels = tuple(meta.get("labels") or ()) if ft.task == "classify" else ()
    if base is not None and base.labels and labels and labels != base.labels:
        raise ConfigError(f"{data_dir} was prepared with labels {list(labels)} but {base.where} is a classifier over "
                          f"{list(base.labels)}; give a new data.dir")
    if ft.labels and labels and tuple(ft.labels) != labels:
        raise ConfigError(f"finetune.labels={list(ft.labels)} but {data_dir} was prepared with labels {list(labels)}; "
                          "give a new data.dir")
    if base is not None:
        check_tokenizer_extends(base_tok, tok, f"data.dir={str(data_dir)!r}")
        mcfg = finetune_model_config(base.config.model, cfg.model, vocab_size=tok.vocab_size, labels=labels,
                                     pool=ft.pool if labels else "auto", pad_id=tok.pad_id,
                                     bidirectional=ft.bidirectional and bool(labels),
                                     inherit_dropout=ft.inherit_dropout, where=base.where, given=cfg.given)
    else:
        mcfg = cfg.model
        if mcfg.vocab_size is None:
            mcfg = mcfg.with_vocab(tok.vocab_size)
        elif mcfg.vocab_size < tok.vocab_size:
            raise DataError(f"model.vocab_size={mcfg.vocab_size} is smaller than the tokenizer's {tok.vocab_size} "
                            f"tokens in {data_dir}; leave it unset")
        # finetune.pool and .bidirectional are a classifier's: a recipe that sets them also pre-trains an LM
        mcfg = dataclasses.replace(mcfg, labels=labels, pool=ft.pool if labels else "auto",
                                   pad_id=tok.pad_id if labels else mcfg.pad_id,
                                   bidirectional=ft.bidirectional and bool(labels))
    return data_dir, base, mcfg


def _check_base_labels(records: list, base: Any) -> None:
    """Every record's label is one of classifier `base`'s: its head has no row for another."""
    for r in records:
        if r.label not in base.labels:
            raise DataError(f"{r.where}: label {r.label!r} is not one of the labels of {base.where}, a classifier "
                            f"over {', '.join(base.labels)}; fine-tuning it further keeps its head, so give records "
                            "with those labels, or start from the language model it was fine-tuned from for a new head")


def _check_arch(task: str, mcfg: Any) -> None:
    """An encoder-decoder trains on pairs (seq2seq) and only there; a masked-LM objective needs an encoder."""
    if task == "seq2seq" and mcfg.arch != "encdec":
        raise ConfigError(f"finetune.task='seq2seq' trains an encoder-decoder (model.arch='encdec'), but the model is "
                          f"arch {mcfg.arch!r}; for a decoder-only model use finetune.task='sft' on the same records")
    if mcfg.arch == "encdec" and task != "seq2seq":
        raise ConfigError(f"finetune.task={task!r} with an encoder-decoder (model.arch='encdec'): use "
                          "finetune.task='seq2seq' (the prompt goes to the encoder, the completion to the decoder)")


def _mlm_data(cfg: Any) -> tuple[Path, None, Any]:
    """Masked-LM (or span-corruption) pre-training: the prepared token shards (prepared from
    data.source first if needed) read with the tokenizer plus <|mask|> (or the span sentinels:
    data/mlm.py mask_view); the model's vocabulary from it."""
    from clusterlm.data.mlm import mask_view
    from clusterlm.data.shards import read_meta

    from clusterlm.data.mlm import MASK, SENTINELS, SPAN_VIEW, VIEW

    mcfg, span = cfg.model, cfg.finetune.task == "span"
    if cfg.finetune.val_source:  # it was ignored: the held-out rows are data.dir's val split
        raise ConfigError(f"finetune.val_source={cfg.finetune.val_source!r} gives fine-tuning's held-out records; "
                          f"finetune.task={cfg.finetune.task!r} validates on the val split of data.dir's token shards "
                          "(data.val_fraction when prepared): set finetune.val_source = \"\"")
    if not span and mcfg.arch != "encoder":
        raise ConfigError(f"finetune.task='mlm' pre-trains a bidirectional encoder (model.arch='encoder'), but "
                          f"model.arch={mcfg.arch!r}; causal models pre-train with finetune.task='lm'")
    if span and mcfg.arch != "encdec":
        raise ConfigError(f"finetune.task='span' (T5's span corruption) pre-trains an encoder-decoder "
                          f"(model.arch='encdec'), but model.arch={mcfg.arch!r}")
    if span and cfg.train.seq_len + 1 > mcfg.max_seq_len:
        raise ConfigError(f"finetune.task='span': a corrupted window of train.seq_len={cfg.train.seq_len} tokens can "
                          f"give a source of {cfg.train.seq_len + 1} (sentinels and EOS), more than "
                          f"model.max_seq_len={mcfg.max_seq_len}; lower train.seq_len")
    data, data_dir = cfg.data, Path(cfg.data.dir)
    if not (data_dir / "meta.json").is_file():  # train/loop.py ensure_data's rule
        if not data.source:
            raise ConfigError(f"data.dir={str(data_dir)!r} is not a prepared data directory and data.source is empty; "
                              "run `clusterlm prepare` first or set data.source")
        from clusterlm.data.prepare import check_unprepared_data_dir, prepare

        empty = check_unprepared_data_dir(data_dir, data.source)
        prepare([data.source], data_dir, tokenizer=data.tokenizer, vocab_size=data.vocab_size or None,
                val_fraction=data.val_fraction, overwrite=empty)
    data_dir = mask_view(data_dir, cfg.train.out_dir, SENTINELS if span else (MASK,), SPAN_VIEW if span else VIEW)
    vocab = int(read_meta(data_dir)["tokenizer"]["vocab_size"])
    if mcfg.vocab_size is None:
        mcfg = mcfg.with_vocab(vocab)
    elif mcfg.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={mcfg.vocab_size} is smaller than the {vocab} tokens of {data_dir}'s "
                          "tokenizer with <|mask|>; leave it unset")
    return data_dir, None, mcfg
