"""`clusterlm eval CKPT`: loss, perplexity and bits per byte of a checkpoint on a data split, or
task scores (`--task`: BLEU, chrF, ROUGE, exact match/F1, accuracy/precision/recall/F1, multiple
choice) on task files (docs/tasks.md).

    clusterlm eval runs/shakespeare_char --split val
    clusterlm eval runs/shakespeare_char --data data/other --max-batches 50 --out eval.json
    clusterlm eval runs/shakespeare_char --task shakespeare_next_line --samples samples.jsonl
    clusterlm eval runs/mt --task test.en.gz,test.fr.gz --limit 200 --max-new-tokens 48
    clusterlm eval runs/shakespeare_char --lm-eval my_task --lm-eval-include tasks/   # lm-evaluation-harness

Bits per byte divide the summed loss (in bits) by the UTF-8 bytes of the evaluated text, so
they compare models with different tokenizers. The data directory defaults to the one the model
was trained on (from the checkpoint's config.toml).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from clusterlm.errors import DataError

log = logging.getLogger(__name__)


def evaluate_checkpoint(ckpt: str, *, data: str | None = None, split: str = "val", batch_size: int = 16,
                        seq_len: int | None = None, max_batches: int | None = None,
                        device: str = "auto") -> dict[str, Any]:
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.data.loader import iter_eval_batches
    from clusterlm.data.shards import check_data_tokenizer, read_meta
    from clusterlm.eval.metrics import bits_per_byte, evaluate_loss
    from clusterlm.device import autocast_dtype, resolve_device

    dev = resolve_device(device, "--device")
    loaded = load_for_inference(ckpt, device=dev)
    cfg = loaded.config
    if cfg.model.labels:
        raise DataError(f"{loaded.path} is a classifier (labels {', '.join(cfg.model.labels)}), not a language "
                        "model: it has no loss on a data split; score it with --task FILE (a classify task)")
    data_dir = Path(data or cfg.data.dir)
    if data is None and not data_dir.exists():  # a converted checkpoint's default, or a run from another cwd
        raise DataError(f"{data_dir} (data.dir in {loaded.path}/config.toml, the default of --data) does not exist "
                        "here; pass --data DIR, a directory `clusterlm prepare` made with this checkpoint's tokenizer")
    if cfg.model.arch in ("encoder", "encdec"):
        return _objective_loss(loaded, data_dir, split, batch_size, seq_len, max_batches, dev)
    meta = read_meta(data_dir)
    if split not in meta["splits"] or meta["splits"][split]["tokens"] == 0:
        have = [k for k, v in meta["splits"].items() if v.get("tokens")]
        raise DataError(f"{data_dir} has no tokens in split {split!r}; splits with tokens: {have} (--split NAME; a "
                        "val split needs a val fraction > 0 when preparing: prepare --val-fraction)")
    ckpt_tok = loaded.tokenizer
    check_data_tokenizer(data_dir, meta, loaded.path, ckpt_tok)
    T = seq_len or cfg.train.seq_len
    if cfg.model.arch == "transformer" and T > cfg.model.max_seq_len:  # a recurrent model has no context limit
        raise ValueError(f"--seq-len {T} exceeds the model's context, model.max_seq_len={cfg.model.max_seq_len}; "
                         f"give --seq-len {cfg.model.max_seq_len} or less")
    amp = autocast_dtype("auto", dev)
    if meta.get("layout") == "examples":  # SFT data: the loss on the trained (response) tokens, as in training
        from clusterlm.data.sft import iter_example_batches

        batches = iter_example_batches(data_dir, split, batch_size, T, pad_id=ckpt_tok.pad_id,
                                       pack=cfg.finetune.pack, max_batches=max_batches)
        res = evaluate_loss(loaded.model, batches, device=dev, autocast_dtype=amp)
        return {"checkpoint": str(loaded.path), "data": str(data_dir), "split": split, "objective": "sft responses",
                "seq_len": T, "examples": meta["splits"][split].get("examples"), "tokens": res["tokens"],
                "loss": res["loss"], "perplexity": math.exp(min(res["loss"], 50.0))}
    batches = iter_eval_batches(data_dir, split, batch_size, T, max_batches=max_batches)
    res = evaluate_loss(loaded.model, batches, device=dev, autocast_dtype=amp)
    info = meta["splits"][split]
    bytes_per_token = info["bytes"] / info["tokens"]
    n_bytes = res["tokens"] * bytes_per_token
    return {
        "checkpoint": str(loaded.path),
        "data": str(data_dir),
        "split": split,
        "seq_len": T,
        "tokens": res["tokens"],
        "loss": res["loss"],
        "perplexity": math.exp(min(res["loss"], 50.0)),
        "bits_per_byte": bits_per_byte(res["loss"] * res["tokens"], n_bytes),
        "bytes_per_token": bytes_per_token,
    }


def _objective_loss(loaded: Any, data_dir: Path, split: str, batch_size: int, seq_len: int | None,
                    max_batches: int | None, dev: Any) -> dict[str, Any]:
    """The loss of a masked-LM encoder or an encoder-decoder on the held-out data of its own objective
    (finetune.task mlm, span or seq2seq, or the architecture's for a converted checkpoint, whose config
    says 'lm': finetune/objectives.py's validation batches; docs/encdec.md)."""
    import dataclasses

    from clusterlm.device import autocast_dtype
    from clusterlm.eval.metrics import evaluate_loss
    from clusterlm.finetune.objectives import check_objective_data, objective_of, val_batches

    cfg = loaded.config
    task = objective_of(cfg)  # a converted checkpoint's config says 'lm': the architecture's objective
    check_objective_data(data_dir, task)
    if task == "mlm" and loaded.tokenizer.token_id("<|mask|>") is None:
        raise DataError(f"{loaded.path} is a masked-LM encoder whose tokenizer has no <|mask|> token, so its masked-LM "
                        "loss cannot be measured; score it with --task FILE")
    if split != "val":
        raise DataError(f"--split {split}: an {cfg.model.arch} model's loss is measured on its objective's 'val' split")
    from clusterlm.data.shards import same_tokenizer

    if not same_tokenizer(Path(loaded.path) / "tokenizer.json", data_dir / "tokenizer.json"):
        raise DataError(f"{data_dir} was not made with checkpoint {loaded.path}'s tokenizer; give --data the run's "
                        "own data directory (for mlm/span: OUT_DIR/mlm_data or OUT_DIR/span_data)")
    T = seq_len or cfg.train.seq_len
    limit = cfg.model.max_seq_len - (1 if task == "span" else 0)  # span targets carry one more position
    if seq_len is not None and T > limit:  # as training refuses it (finetune/data.py); it was reported as measured
        raise ValueError(f"--seq-len {T} exceeds what the model reads, model.max_seq_len={cfg.model.max_seq_len}"
                         f"{' less one for span targets' if task == 'span' else ''}; give --seq-len {limit} or less")
    run = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=batch_size, seq_len=T,
                                                             eval_batches=max_batches or 10**9),
                              finetune=dataclasses.replace(cfg.finetune, task=task))
    res = evaluate_loss(loaded.model, val_batches(run, data_dir, Path(loaded.path) / "tokenizer.json"), device=dev,
                        autocast_dtype=autocast_dtype("auto", dev))
    return {"checkpoint": str(loaded.path), "data": str(data_dir), "split": split, "objective": task, "seq_len": T,
            "tokens": res["tokens"], "loss": res["loss"], "perplexity": math.exp(min(res["loss"], 50.0))}


def _labels_arg(text: str) -> list[str] | dict[str, str]:
    """--labels: "a,b" is the label set; "0=a,1=b" renames the file's labels (eval.tasks.load_task)."""
    items = [x.strip() for x in text.split(",")]
    if not any("=" in x for x in items):
        return items
    bad = [x for x in items if x.count("=") != 1 or not all(x.partition("=")[::2])]
    if bad:
        raise ValueError(f"--labels={text!r}: {bad[0]!r} is not RAW=NAME; give the label set (negative,positive) or "
                         "every label renamed (0=negative,1=positive)")
    pairs = [x.split("=") for x in items]
    raws = [raw.strip() for raw, _ in pairs]
    repeated = next((r for r in raws if raws.count(r) > 1), None)
    if repeated is not None:  # a dict kept the last name given and dropped the other without a word
        raise ValueError(f"--labels={text!r} renames {repeated!r} twice; give each raw label one name")
    return dict(pairs)


def evaluate_tasks(ckpt: str, tasks: list[str], *, limit: int | None = None, batch_size: int = 16,
                   decode: Any = None, truncate: bool = False, labels: list[str] | dict[str, str] | None = None,
                   device: str = "auto", samples_out: str | None = None) -> dict[str, Any]:
    """Scores of a checkpoint on each task (a bundled name or a file), with the decoding settings; a
    chat model is prompted with its checkpoint's chat template and stopped at its end of turn
    (eval.harness.task_chat_format). Per-example records to `samples_out` (JSONL, written atomically)
    when given."""
    from clusterlm.checkpoint.model_io import load_for_inference
    from clusterlm.device import resolve_device
    from clusterlm.eval.harness import (DecodeOptions, check_fits, check_model_kind, model_labels, resolve_task,
                                        run_task, task_requests)

    decode = decode or DecodeOptions()
    loaded_tasks = [resolve_task(t, limit=limit, **({"labels": labels} if labels else {})) for t in tasks]
    first: dict[str, str] = {}
    for spec, task in zip(tasks, loaded_tasks):  # the scores are keyed by name: a second one replaced the first
        name = task.name or spec
        if name in first:
            raise DataError(f"task {spec!r} is given twice" if first[name] == spec else
                            f"tasks {first[name]!r} and {spec!r} are both named {name!r}, and their scores would "
                            "share one entry: give one a \"name\" in a header record (docs/tasks.md) or rename "
                            "its file")
        first[name] = spec
    if not any(t.kind == "generate" for t in loaded_tasks):  # decoding options mean nothing to the others
        import dataclasses

        given = [f"--{f.name.replace('_', '-')}".replace("--stops", "--stop") for f in dataclasses.fields(decode)
                 if getattr(decode, f.name) != getattr(DecodeOptions(), f.name)]
        if given:
            kinds = ", ".join(f"{t.name!r} ({t.kind})" for t in loaded_tasks)
            raise DataError(f"{', '.join(given)} set how generate tasks decode; {kinds} "
                            f"{'is' if len(loaded_tasks) == 1 else 'are'} scored without decoding: leave "
                            f"{'it' if len(given) == 1 else 'them'} out")
    if labels:  # a label set or renaming means nothing to other kinds: say so instead of ignoring it
        other = [f"{t.name!r} ({t.kind})" for t in loaded_tasks if t.kind != "classify"]
        if other:
            raise DataError(f"--labels applies to classify tasks; {', '.join(other)} "
                            f"{'is' if len(other) == 1 else 'are'} not one: leave --labels out")
    loaded = load_for_inference(ckpt, device=resolve_device(device, "--device"))
    for task in loaded_tasks:  # a classifier answers classify tasks with its labels: refused before any scoring
        check_model_kind(loaded.model, task_requests(task, decode, model_labels(loaded.model)), f"task {task.name!r}")
    from clusterlm.generate.engine import context_length

    for task in loaded_tasks:  # inputs too long for the context, named by task before any is scored (a later
        # task's refusal came after the earlier ones had run, and did not say which task it was)
        check_fits(task, loaded.tokenizer, context_length(loaded.model), decode, truncate,
                   labels=model_labels(loaded.model), chat_template=loaded.chat_template)
    if decode.num_beams == 1:  # after every refusal: a note, then the scores
        from clusterlm.generate.sampling import greedy_seed_note

        note = greedy_seed_note(decode.seed, decode.temperature, default=decode.temperature == 0.0)
        if note:
            log.warning("%s", note)
    out: dict[str, Any] = {"checkpoint": str(loaded.path), "tasks": {}}
    records: list[dict[str, Any]] = []
    for spec, task in zip(tasks, loaded_tasks):
        metrics, samples = run_task(loaded.model, loaded.tokenizer, task, batch_size=batch_size, decode=decode,
                                    truncate=truncate, chat_template=loaded.chat_template)
        out["tasks"][task.name or spec] = metrics
        records += [{"task": task.name or spec, **r} for r in samples]
    if samples_out:
        from clusterlm.fsutil import atomic_write_text

        atomic_write_text(samples_out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return out


def evaluate_lm_eval_tasks(ckpt: str, tasks: list[str], *, include: list[str] | None = None,
                           num_fewshot: int | None = None, limit: int | None = None, batch_size: int = 16,
                           truncate: bool = False, device: str = "auto",
                           apply_chat_template: bool = False) -> dict[str, Any]:
    """lm-evaluation-harness tasks (names, or YAMLs under `include`) on a checkpoint through the
    bridge (eval/lm_eval_bridge.py): lm-eval's results, n-shot, n-samples, versions and higher_is_better.
    apply_chat_template: lm-eval renders each prompt as a user turn in the checkpoint's chat template
    (the plain 'User:/Assistant:' one for a model without its own), as its --apply_chat_template does."""
    try:
        import lm_eval
    except ImportError as e:
        raise DataError(f"--lm-eval needs lm-evaluation-harness ({e}); install it with: pip install 'clusterlm[eval]'") from e
    from clusterlm.eval.harness import model_labels
    from clusterlm.eval.lm_eval_bridge import ClusterLM, evaluate_lm_eval

    model = ClusterLM(checkpoint=ckpt, batch_size=batch_size, device=device, truncate=truncate)
    labels = model_labels(model.model)
    if labels:
        raise DataError(f"{model.checkpoint} is a classifier (labels {', '.join(labels)}): lm-eval asks a language "
                        "model for log-likelihoods and generations; score it with --task FILE (a classify task)")
    res = evaluate_lm_eval(model, tasks, include=include or (), num_fewshot=num_fewshot, limit=limit,
                           apply_chat_template=apply_chat_template)
    keep = ("results", "groups", "n-shot", "n-samples", "versions", "higher_is_better")
    out = {"checkpoint": model.checkpoint, "lm_eval_version": lm_eval.__version__,
           **{k: res[k] for k in keep if k in res}}
    if apply_chat_template:  # which template asked, as lm-eval's tracker records it (chat_template_sha)
        import hashlib

        out["chat_template_sha256"] = hashlib.sha256(model.chat_template(True).encode()).hexdigest()
    return out


def _add_task_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task evaluation (docs/tasks.md)")
    g.add_argument("--task", action="append", default=[], metavar="TASK",
                   help="a bundled task name, a task file (.jsonl, .tsv) or a parallel pair SRC,TGT; repeatable")
    g.add_argument("--limit", type=int, help="first N examples of each task")
    g.add_argument("--labels", help="classify: the label set, comma-separated (default: the file's), or the file's "
                                    "labels renamed, RAW=NAME,... (0=negative,1=positive)")
    g.add_argument("--samples", metavar="JSONL", help="write one record per example (prediction, references, ...)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="generate tasks: tokens per answer (default 64)")
    g.add_argument("--temperature", type=float, default=None, help="generate tasks: 0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--num-beams", type=int, default=1,
                   help="generate tasks: beam search with this width (1 = greedy/sampling; docs/encdec.md)")
    g.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam search: score = log-probability / length ** this (transformers' length_penalty)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (example i draws with seed + i)")
    g.add_argument("--stop", action="append", default=None,
                   help="stop string, repeatable (default: a newline when every reference is one line)")
    g.add_argument("--truncate", action="store_true",
                   help="left-truncate inputs longer than the model's context (an encoder-decoder's source keeps its "
                        "first tokens; default: refuse, naming how many)")
    g = p.add_argument_group("lm-evaluation-harness tasks (pip install 'clusterlm[eval]'; docs/tasks.md)")
    g.add_argument("--lm-eval", metavar="TASKS",
                   help="lm-eval task names, comma-separated; run through lm_eval.simple_evaluate (also uses "
                        "--limit, --batch-size, --truncate, --device)")
    g.add_argument("--lm-eval-include", action="append", default=[], metavar="DIR",
                   help="a folder of lm-eval task YAMLs to add to its task list; repeatable")
    g.add_argument("--num-fewshot", type=int, default=None, help="lm-eval tasks: few-shot examples (default: the task's)")
    g.add_argument("--apply-chat-template", action="store_true",
                   help="lm-eval tasks: ask each prompt as a user turn in the checkpoint's own chat template "
                        "(lm-eval's --apply_chat_template; for chat fine-tunes). Default: the raw prompt")


# options that only one or two of eval's modes read (the others: --batch-size, --device, --out, all modes);
# "loss" is a data split's loss (no --task, no --lm-eval)
MODE_OPTIONS = {
    "--data": ("loss",), "--split": ("loss",), "--seq-len": ("loss",), "--max-batches": ("loss",),
    "--labels": ("task",), "--samples": ("task",), "--max-new-tokens": ("task",), "--temperature": ("task",),
    "--top-p": ("task",), "--top-k": ("task",), "--num-beams": ("task",), "--length-penalty": ("task",),
    "--seed": ("task",), "--stop": ("task",), "--limit": ("task", "lm-eval"), "--truncate": ("task", "lm-eval"),
    "--lm-eval-include": ("lm-eval",), "--num-fewshot": ("lm-eval",),
}
MODE_NAMES = {"loss": "the loss on a data split (no --task or --lm-eval given)", "task": "--task",
              "lm-eval": "--lm-eval"}


def refuse_unused_options(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Options given (not at their defaults) that the chosen mode does not read: a ValueError naming
    them and the mode each is for (they were ignored, e.g. --samples without --task wrote no file)."""
    mode = "lm-eval" if args.lm_eval else "task" if args.task else "loss"
    unused = []
    for opt, modes in MODE_OPTIONS.items():
        dest = opt[2:].replace("-", "_")
        if mode not in modes and getattr(args, dest) != p.get_default(dest):
            unused.append(f"{opt} (for {' or '.join('a data split' if m == 'loss' else '--' + m for m in modes)})")
    if unused:
        raise ValueError(f"{', '.join(unused)} {'is' if len(unused) == 1 else 'are'} not used by "
                         f"{MODE_NAMES[mode]}: leave {'it' if len(unused) == 1 else 'them'} out")


def _refuse_outputs_over_inputs(args: argparse.Namespace) -> None:
    """--out or --samples naming a --task file (it was overwritten with the scores), each other (one
    file held whichever was written last), a file of the --data directory, or a path in a run's
    checkpoints folder: a ValueError naming the option."""
    from clusterlm.eval.harness import builtin_tasks, task_paths

    def same(a: str, b: str) -> bool:
        pa, pb = Path(a), Path(b)
        if pa.exists() and not pa.is_file():  # a device or pipe (/dev/null) takes both
            return False
        try:
            return pa.exists() and pb.exists() and pa.samefile(pb) or pa.resolve() == pb.resolve()
        except OSError:
            return False

    bundled = builtin_tasks()  # a bundled task's file too: --out over it overwrote the installed task
    inputs = [("--task", f) for spec in args.task for f in ([bundled[spec]] if spec in bundled else task_paths(spec))]
    for flag, out in (("--out", args.out), ("--samples", args.samples)):
        for what, path in inputs + ([("--samples", args.samples)] if flag == "--out" and args.samples else []):
            if out and same(out, path):
                raise ValueError(f"{flag} {out} is the file {what} {path} names: it would be overwritten; give "
                                 f"{flag} another file")
    from clusterlm.checkpoint.store import check_outside_checkpoints

    for flag, out in (("--out", args.out), ("--samples", args.samples)):
        if not out:
            continue
        # a checkpoint's files (config.toml, model.safetensors) or the --data directory's (meta.json, a shard)
        # were overwritten with the scores; a new file in a step folder goes with it when rotation prunes it
        check_outside_checkpoints(out, flag, kind="file")
        if args.data and Path(out).is_file() and Path(out).resolve().is_relative_to(Path(args.data).resolve()):
            raise ValueError(f"{flag} {out} is a file of the --data directory {args.data}: it would be overwritten; "
                             f"give {flag} a file outside it")


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (0 batches or a 0-token context would score nothing)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="clusterlm eval", description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("checkpoint", help="run directory, checkpoints folder or step folder")
    p.add_argument("--data", help="prepared data directory (default: the one in the checkpoint's config)")
    p.add_argument("--split", default="val", help="split to evaluate (default: val)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--seq-len", type=positive_int, help="context length (default: the training seq_len)")
    p.add_argument("--max-batches", type=positive_int,
                   help="evaluate at most this many batches (default: the whole split)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", help="also write the JSON result to this file")
    _add_task_args(p)
    args = p.parse_args(argv)
    from clusterlm.fsutil import atomic_write_text, check_output_file

    for flag, path in (("--out", args.out), ("--samples", args.samples)):
        if path:  # checked now: an evaluation can take minutes, and its result would be lost at the end
            check_output_file(path, flag)
    _refuse_outputs_over_inputs(args)
    if args.lm_eval is not None and not any(t.strip() for t in args.lm_eval.split(",")):
        # '' fell through to the loss on the config's data split; ' , ' reached lm-eval as no task at all
        raise ValueError(f"--lm-eval {args.lm_eval!r} names no task; give lm-eval task names, comma-separated "
                         "(`lm-eval ls tasks` lists them)")
    if args.lm_eval and args.task:
        raise ValueError("give --task or --lm-eval, not both (they report in different shapes)")
    if args.apply_chat_template and not args.lm_eval:
        raise ValueError("--apply-chat-template is for --lm-eval tasks; --task asks a chat checkpoint in its own "
                         "template already (a task's `chat` field)")
    if not (args.lm_eval and args.samples):  # said below, with what to use instead
        refuse_unused_options(p, args)
    if args.lm_eval:
        if args.samples:
            raise ValueError("--samples is for --task; for lm-eval's per-example records call "
                             "lm_eval.simple_evaluate(..., log_samples=True) (docs/tasks.md)")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit={args.limit} must be >= 1")
        if args.num_fewshot is not None and args.num_fewshot < 0:
            raise ValueError(f"--num-fewshot={args.num_fewshot} must be >= 0 (0 = zero-shot); leave it out for each "
                             "task's own number")
        result = evaluate_lm_eval_tasks(args.checkpoint, [t.strip() for t in args.lm_eval.split(",") if t.strip()],
                                        include=args.lm_eval_include, num_fewshot=args.num_fewshot,
                                        limit=args.limit, batch_size=args.batch_size, truncate=args.truncate,
                                        device=args.device, apply_chat_template=args.apply_chat_template)
    elif args.task:
        from clusterlm.eval.harness import DecodeOptions

        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit={args.limit} must be >= 1")
        if args.batch_size < 1:
            raise ValueError(f"--batch-size={args.batch_size} must be >= 1")
        if args.max_new_tokens < 1:  # 0 scored every answer as empty
            raise ValueError(f"--max-new-tokens={args.max_new_tokens} must be >= 1 (the tokens of each answer)")
        if args.num_beams < 1:  # it decoded greedily
            raise ValueError(f"--num-beams={args.num_beams} must be >= 1 (1 = no beam search)")
        if not math.isfinite(args.length_penalty):  # nan scored every beam nan
            raise ValueError(f"--length-penalty={args.length_penalty} must be a finite number")
        if args.length_penalty != 1.0 and args.num_beams == 1:  # greedy and sampling have no length score
            raise ValueError(f"--length-penalty={args.length_penalty} scores beam search only: add --num-beams N "
                             "(N >= 2) or leave it out")
        if args.num_beams > 1:  # beam search is deterministic: these would be ignored
            given = [f for f, v in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                    ("--top-p", args.top_p), ("--seed", args.seed)) if v is not None]
            if given:
                raise ValueError(f"--num-beams={args.num_beams} is beam search, which is deterministic: "
                                 f"{', '.join(given)} only apply to sampling; leave them out, or drop --num-beams "
                                 "to sample")
        temperature = 0.0 if args.temperature is None else args.temperature
        from clusterlm.generate.sampling import check_sampling_args

        check_sampling_args(temperature, args.top_k, args.top_p, as_options=True)  # not as eval.lm's keywords
        if args.stop and not all(args.stop):  # eval.lm said "stops=['']"
            raise ValueError("--stop '' is empty: a stop string needs at least one character; leave --stop out for "
                             "the default (a newline when every reference is one line)")
        decode = DecodeOptions(max_new_tokens=args.max_new_tokens, temperature=temperature, top_p=args.top_p,
                               top_k=args.top_k, seed=args.seed, stops=tuple(args.stop) if args.stop else None,
                               num_beams=args.num_beams, length_penalty=args.length_penalty)
        from clusterlm.generate.beam import BeamWidthError

        try:
            result = evaluate_tasks(args.checkpoint, args.task, limit=args.limit, batch_size=args.batch_size,
                                    decode=decode, truncate=args.truncate, device=args.device,
                                    samples_out=args.samples, labels=_labels_arg(args.labels) if args.labels else None)
        except BeamWidthError as e:  # the search's check names the library's keyword, num_beams
            raise ValueError(e.for_option("--num-beams")) from None
    else:
        result = evaluate_checkpoint(args.checkpoint, data=args.data, split=args.split, batch_size=args.batch_size,
                                     seq_len=args.seq_len, max_batches=args.max_batches, device=args.device)
    text = json.dumps(result, indent=2, default=str)  # default: lm-eval's results may hold numpy scalars
    sys.stdout.write(text + "\n")  # first: the scores are shown even if writing --out fails
    sys.stdout.flush()
    if args.out:
        atomic_write_text(args.out, text + "\n")
    return 0
