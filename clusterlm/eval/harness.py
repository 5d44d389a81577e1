"""Task evaluation of a loaded model: a task file in, metrics and per-example samples out.

    from clusterlm.eval.harness import DecodeOptions, resolve_task, run_task
    task = resolve_task("shakespeare_next_line")              # a bundled task, or a path
    metrics, samples = run_task(loaded.model, loaded.tokenizer, task, batch_size=16)

What the model is asked, by task kind (docs/tasks.md):
- generate: the prompt, or the chat messages rendered as the model is chatted with
  (generate.text.chat_format: its own chat template, the checkpoint's chat_template.jinja, else the
  plain render_chat one), decoded by the one engine (eval.lm.generate_completions; greedy unless
  DecodeOptions says otherwise); the continuation, stripped of surrounding white space, is scored
  against the references. Default stop: a newline when every reference is one line (a translation
  pair), none otherwise; a model with a template also stops at its end-of-turn token (`<|end|>`; a
  beam ends there too: generate/beam.py stop_ids).
- classify: zero-shot by log-likelihood: for each label, log p(" " + label | CLASSIFY_TEMPLATE
  with the text); the label with the highest sum wins (lm-eval's `acc` for multiple choice).
  A fine-tuned classifier (models/classifier.py, a checkpoint with model.labels) is asked its head
  instead: [EOS] + the text's ids, the prediction is the argmax over the model's labels (the task's
  labels must be among them; a prediction outside the task's set counts as wrong), batched
  (eval.lm.classify). A classifier answers classify tasks only.
- choice: log p(delimiter + choice | context) for every choice (lm-eval's multiple_choice); the
  delimiter is a space, or nothing when the context already ends in white space; scored as
  `acc` (sum) and `acc_norm` (sum / characters).

Log-likelihoods and generations are batched (eval.lm); inputs longer than the model's context are
refused in one line naming how many unless `truncate` (then left-truncated: eval.lm's rule).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from clusterlm.errors import ConfigError, DataError
from clusterlm.eval.tasks import Task

if TYPE_CHECKING:
    from clusterlm.generate.template import ChatTemplate
    from clusterlm.generate.text import ChatFormat

TASKS_DIR = Path(__file__).resolve().parent.parent / "data" / "tasks"
CLASSIFY_TEMPLATE = "{text}\nLabel:"


@dataclass(frozen=True)
class DecodeOptions:
    """How generate tasks are decoded: greedy (temperature 0) by default."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stops: tuple[str, ...] | None = None  # None: the kind's default (module docstring)
    num_beams: int = 1  # > 1: beam search (generate/beam.py), deterministic
    length_penalty: float = 1.0  # beam scores: log-probability / length ** length_penalty


def builtin_tasks() -> dict[str, Path]:
    """Bundled task files by name (clusterlm/data/tasks/NAME.jsonl)."""
    return {p.stem: p for p in sorted(TASKS_DIR.glob("*.jsonl"))}


def task_paths(spec: str) -> list[Path]:
    """The files a task spec (not a bundled name) names: one, or the parts of "SRC,TGT" unless the whole
    spec is a file (a name with a comma, as eval.tasks.load_task reads it)."""
    return [Path(p) for p in spec.split(",")] if "," in spec and not Path(spec).is_file() else [Path(spec)]


def resolve_task(spec: str, **load_kwargs: Any) -> Task:
    """A bundled task's name, a task file, or a parallel pair "SRC,TGT" -> Task (eval.tasks.load_task)."""
    from clusterlm.eval.tasks import load_task

    bundled = builtin_tasks()
    if spec in bundled:
        return load_task(bundled[spec], name=spec, **load_kwargs)
    paths = task_paths(spec)
    if len(paths) > 2:
        raise DataError(f"task {spec!r} names {len(paths)} files; a parallel pair is two (SRC,TGT), and each task "
                        "file is a --task of its own")
    valid = (f"give a task file (.jsonl, .tsv), a parallel pair SRC,TGT, or a bundled task: "
             f"{', '.join(bundled) or 'none'}")
    if len(paths) == 2 and not all(part.strip() for part in spec.split(",")):  # Path("") is ".": "no such file ."
        raise DataError(f"task {spec!r} has an empty file name beside the comma; {valid}")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        what = "is a directory, not a file:" if Path(missing[0]).is_dir() else "no such file"
        raise DataError(f"task {spec!r}: {what} {', '.join(missing)}; {valid}")
    return load_task(tuple(paths) if len(paths) == 2 else paths[0], **load_kwargs)


def _delimiter(context: str) -> str:
    return "" if not context or context[-1].isspace() else " "


def _prompt(ex: Any, chat: ChatFormat | None) -> str:
    """The text the model continues: the prompt as written, or the messages rendered in `chat`'s
    format (None: the plain render_chat template)."""
    if ex.prompt is not None:
        return ex.prompt
    from clusterlm.generate.text import render_chat

    messages = [{"role": m.role, "content": m.content} for m in ex.messages]
    return chat.render(messages) if chat is not None else render_chat(messages)


def task_chat_format(task: Task, tokenizer: Any, chat_template: ChatTemplate | None = None) -> ChatFormat | None:
    """How a generate task's model is chatted with, as `clusterlm chat` and `serve` do it: the chat
    template given, else the one its tokenizer carries (load_for_inference attaches the checkpoint's
    chat_template.jinja as `tokenizer.chat_template`), rendered and stopped at its end-of-turn token;
    None (the plain template, no stop token) for a model without one and for other task kinds. A chat
    model prompted in the plain format it never saw answers garbage, and without its end-of-turn stop
    it runs on past its reply: both score a right answer as wrong."""
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if task.kind != "generate" or template is None:
        return None
    from clusterlm.generate.text import chat_format

    return chat_format(tokenizer, template)


def model_labels(model: nn.Module) -> tuple[str, ...] | None:
    """A classifier's label names (its head's classes, in order), None for a language model (also
    inside a DDP wrapper's `module`). An ensemble of classifiers (models/ensemble.py) is one."""
    from clusterlm.models.classifier import SequenceClassifier
    from clusterlm.models.ensemble import ClassifierEnsemble

    kinds = (SequenceClassifier, ClassifierEnsemble)
    model = getattr(model, "module", model) if not isinstance(model, kinds) else model
    return tuple(model.labels) if isinstance(model, kinds) else None


@dataclass(frozen=True)
class Requests:
    """What the model is asked for a task: log-likelihood requests (context, continuation), prompts
    to continue (generate tasks, with their stop strings), or texts for a classifier's head.
    `options` lists each example's labels or choices (its requests are consecutive, in that order;
    a head's: the model's labels)."""

    kind: str  # "loglikelihood", "generate" or "head"
    items: list[Any]  # (context, continuation) pairs, prompt strings, or texts
    options: list[list[str]]
    stops: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()  # token ids that end a generation like EOS (a chat template's end of turn)


def task_requests(task: Task, decode: DecodeOptions = DecodeOptions(),
                  labels: tuple[str, ...] | None = None, chat: ChatFormat | None = None) -> Requests:
    """The model calls that score `task` (module docstring). `labels`: the model is a classifier with
    these classes (model_labels), asked through its head; None: a language model. `chat`: the model's
    chat format (task_chat_format) for generate tasks; None: the plain template."""
    ex = task.examples
    if not ex:
        raise DataError(f"task {task.name!r} has no examples")
    if labels is not None:
        if task.kind != "classify":
            raise ConfigError(f"task {task.name!r} is a {task.kind} task, but the model is a classifier (labels "
                              f"{', '.join(labels)}): it answers classify tasks only")
        extra = [x for x in task.labels if x not in labels]
        if extra:
            raise ConfigError(f"task {task.name!r} has labels {list(task.labels)} but the classifier's are "
                              f"{list(labels)}: {extra} are not among them (rename them: `clusterlm eval --labels RAW=NAME,...`, "
                              "or a JSONL header's labels mapping; or use a task with the model's labels)")
        return Requests("head", [e.text for e in ex], [list(labels)] * len(ex))
    if task.kind == "generate":
        stops = decode.stops
        if stops is None:
            stops = ("\n",) if all("\n" not in r.strip() for e in ex for r in e.references) else ()
        stop_ids = chat.stop_ids if chat is not None else ()
        return Requests("generate", [_prompt(e, chat) for e in ex], [], tuple(stops), tuple(stop_ids))
    if task.kind == "classify":
        contexts = [CLASSIFY_TEMPLATE.format(text=e.text) for e in ex]
        options = [list(task.labels)] * len(ex)
    else:
        contexts = [e.context for e in ex]
        options = [list(e.choices) for e in ex]
    items = [(c, _delimiter(c) + o) for c, opts in zip(contexts, options) for o in opts]
    return Requests("loglikelihood", items, options)


def _model_requests(model: nn.Module, tokenizer: Any, task: Task, decode: DecodeOptions,
                    chat_template: ChatTemplate | None) -> Requests:
    """task_requests for this model: a classifier's labels, else a language model's chat format."""
    labels = model_labels(model)
    chat = None if labels is not None else task_chat_format(task, tokenizer, chat_template)
    return task_requests(task, decode, labels, chat)


def check_model_kind(model: nn.Module, req: Requests, name: str = "the task") -> None:
    """Refuse (ConfigError) what a model family cannot answer: a masked-LM encoder without a head
    gives neither log-likelihoods nor generations (an encoder-decoder scores a continuation given the
    context as its source: generate/seq2seq.py score_pairs)."""
    arch = getattr(getattr(getattr(model, "module", model), "config", None), "arch", None)
    if req.kind == "loglikelihood" and arch == "encoder":
        raise ConfigError(f"{name} is scored by log-likelihoods of continuations, which a masked-LM encoder does not "
                          "give; fine-tune it as a classifier and score classify tasks through its head")
    if req.kind == "generate" and arch == "encoder":
        raise ConfigError(f"{name} is a generate task; a masked-LM encoder (arch 'encoder') does not generate")


def model_outputs(model: nn.Module, tokenizer: Any, req: Requests, items: list[Any] | None = None, *,
                  batch_size: int = 16, decode: DecodeOptions = DecodeOptions(), truncate: bool = False,
                  device: Any = None, progress: bool | None = None, seed_offset: int = 0) -> list[Any]:
    """The model's answers to `items` (default: all of `req.items`): a LogLikelihood per request, or a
    Completion per prompt. `seed_offset`: the index of items[0] in req.items, so that a sampled
    prompt draws from seed + its index in the whole task, wherever it is run."""
    from clusterlm.eval import lm

    check_model_kind(model, req)
    items = req.items if items is None else items
    common = dict(batch_size=batch_size, device=device, truncate=truncate, progress=progress)
    if req.kind == "head":
        return lm.classify(model, tokenizer, items, **common)
    if req.kind == "loglikelihood":
        return lm.loglikelihood(model, tokenizer, items, **common)
    seed = None if decode.seed is None else decode.seed + seed_offset
    return lm.generate_completions(model, tokenizer, items, max_new_tokens=decode.max_new_tokens,
                                   temperature=decode.temperature, top_p=decode.top_p, top_k=decode.top_k,
                                   seed=seed, stops=req.stops, stop_ids=req.stop_ids, num_beams=decode.num_beams,
                                   length_penalty=decode.length_penalty, **common)


def score_outputs(task: Task, req: Requests, outputs: list[Any],
                  decode: DecodeOptions = DecodeOptions()) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, one sample record per example) from the model's answers to every request of `req`."""
    from clusterlm.eval.scorers import choice_predictions, score_task

    ex = task.examples
    assert len(outputs) == len(req.items), (len(outputs), len(req.items))
    samples: list[dict[str, Any]] = []
    if req.kind == "generate":
        preds = [c.text.strip() for c in outputs]
        metrics = score_task(task, preds)
        for i, (e, p, c) in enumerate(zip(ex, req.items, outputs)):
            samples.append({"index": i, "line": e.line, "prompt": p, "prediction": preds[i],
                            "references": list(e.references), "tokens": c.n_tokens, "finish_reason": c.finish_reason})
        metrics["decoding"] = {**asdict(decode), "stops": list(req.stops), "stop_ids": list(req.stop_ids)}
    elif req.kind == "head":
        labels = req.options[0]
        preds = [c.label for c in outputs]
        metrics = score_task(task, preds)
        metrics["scored_by"] = "classifier head"
        for i, (e, c) in enumerate(zip(ex, outputs)):
            samples.append({"index": i, "line": e.line, "text": e.text, "prediction": c.label, "label": e.label,
                            "correct": c.label == e.label, "tokens": c.n_tokens,
                            "probs": {o: round(p, 6) for o, p in zip(labels, c.probs)}})
    else:
        options = req.options
        per_example, k = [], 0
        for opts in options:
            per_example.append([(s.logprob, s.n_tokens, len(o)) for s, o in zip(outputs[k:k + len(opts)], opts)])
            k += len(opts)
        if task.kind == "classify":
            preds = [opts[max(range(len(opts)), key=lambda j: sc[j][0])] for opts, sc in zip(options, per_example)]
            metrics = score_task(task, preds)
            for i, e in enumerate(ex):
                samples.append({"index": i, "line": e.line, "text": e.text, "prediction": preds[i], "label": e.label,
                                "correct": preds[i] == e.label,
                                "logprobs": {o: round(s[0], 6) for o, s in zip(options[i], per_example[i])}})
        else:
            metrics = score_task(task, per_example)
            for i, e in enumerate(ex):
                pred, pred_norm = choice_predictions(per_example[i])
                samples.append({"index": i, "line": e.line, "context": e.context, "choices": list(e.choices),
                                "gold": e.gold, "prediction": pred, "prediction_norm": pred_norm,
                                "logprobs": [round(s[0], 6) for s in per_example[i]]})
    metrics = {"task": task.name, "kind": task.kind, **metrics}
    return metrics, samples


def run_task(model: nn.Module, tokenizer: Any, task: Task, *, batch_size: int = 16,
             decode: DecodeOptions = DecodeOptions(), truncate: bool = False, device: Any = None,
             progress: bool | None = None,
             chat_template: ChatTemplate | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, one sample record per example) of `model` on `task` (a classifier through its head).
    `chat_template`: the model's (default: the tokenizer's, task_chat_format)."""
    req = _model_requests(model, tokenizer, task, decode, chat_template)
    outputs = model_outputs(model, tokenizer, req, batch_size=batch_size, decode=decode, truncate=truncate,
                            device=device, progress=progress)
    return score_outputs(task, req, outputs, decode)


# ---- split over ranks (eval during distributed training) -----------------------------------------
def share(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s block of n items: contiguous, ceil(n / world) long (the last ones shorter or empty).
    Contiguous, so a sampled prompt's seed (seed + its index in the task) is the one process's."""
    size = -(-n // world)
    return range(min(n, rank * size), min(n, (rank + 1) * size))


def run_task_split(model: nn.Module, tokenizer: Any, task: Task, *, rank: int, world: int,
                   gather: Callable[[Any], list[Any]], pad: bool = False, batch_size: int = 16,
                   decode: DecodeOptions = DecodeOptions(), truncate: bool = False, device: Any = None,
                   progress: bool | None = None,
                   chat_template: ChatTemplate | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """run_task with the model calls split over `world` workers: this one (`rank`) answers its block
    of the requests (`share`), `gather(answers)` returns every worker's answers in rank order (an
    all_gather of Python objects, parallel.gather), and every worker scores the whole task: the
    metrics equal run_task's (log-likelihoods within float32 rounding: a request's batch mates change).

    `pad`: every worker makes the same number of forward calls (FSDP gathers the parameters in each
    forward, a collective): each block is padded with repeats of the task's first request to
    ceil(n / world) requests, whose answers are dropped. Log-likelihood and classifier-head tasks
    only: a generation's number of decode steps depends on its outputs. A classifier without a pad id
    (model.pad_id -1) batches only inputs of equal length, so with `pad` it runs one input per call."""
    req = _model_requests(model, tokenizer, task, decode, chat_template)
    if pad and req.kind == "head" and model.config.pad_id < 0:
        batch_size = 1  # the same number of forward calls on every worker, whatever the lengths
    if pad and req.kind == "generate":
        raise ValueError(f"task {task.name!r} ({task.kind}): pad=True needs log-likelihood requests; a "
                         "generation's number of forward calls depends on what it generates")
    mine = share(len(req.items), rank, world)
    items = [req.items[i] for i in mine]
    size = len(share(len(req.items), 0, world))
    if pad:
        items += [req.items[0]] * (size - len(items))
    outputs = model_outputs(model, tokenizer, req, items, batch_size=batch_size, decode=decode, truncate=truncate,
                            device=device, progress=progress, seed_offset=mine.start)[:len(mine)]
    gathered = gather(outputs)
    if len(gathered) != world:
        raise ValueError(f"gather returned {len(gathered)} answer lists for world={world}")
    everything = [o for part in gathered for o in part]
    return score_outputs(task, req, everything, decode)


def check_fits(task: Task, tokenizer: Any, context: int | None, decode: DecodeOptions = DecodeOptions(),
               truncate: bool = False, labels: tuple[str, ...] | None = None,
               chat_template: ChatTemplate | None = None) -> None:
    """Raise the DataError that scoring `task` would raise for inputs longer than `context` tokens (a
    model's max_seq_len; None = no limit), without a model: training checks its tasks at start-up
    rather than failing at the first evaluation. Nothing to check with `truncate` (eval.lm truncates)
    except a continuation that cannot fit either way. `labels`: the model is a classifier with these
    classes (task_requests; its label check runs even without a context). `chat_template`: the
    model's, which renders chat messages (task_chat_format)."""
    from clusterlm.eval.lm import classifier_ids, encode_pair, fit_prompts

    if context is None and labels is None:
        return
    req = task_requests(task, decode, labels, None if labels is not None else task_chat_format(task, tokenizer,
                                                                                                chat_template))
    if context is None:
        return
    if req.kind == "head":
        lengths = [len(classifier_ids(tokenizer, t)) for t in req.items]
        bad = [i for i, n in enumerate(lengths) if n > context]
        if bad and not truncate:
            raise DataError(f"task {task.name!r}: {len(bad)} of {len(lengths)} texts do not fit the model's context "
                            f"of {context} tokens (the longest is {max(lengths)} tokens with the EOS separator; "
                            f"first: text {bad[0]}); pass truncate=True (eval.truncate, --truncate) to keep the "
                            f"last {context} tokens of each")
        return
    if req.kind == "generate":
        if not truncate:
            try:
                fit_prompts([[tokenizer.eos_id] + tokenizer.encode(p) for p in req.items], context,
                            decode.max_new_tokens, truncate)
            except DataError as e:
                why = str(e).replace("(--truncate)", "(eval.truncate, --truncate)")
                raise DataError(f"task {task.name!r}: {why}") from e
        return
    pairs = [encode_pair(tokenizer, c, o) for c, o in req.items]
    unscorable = [i for i, (_, cont) in enumerate(pairs) if len(cont) > context]
    too_long = [i for i, (ctx, cont) in enumerate(pairs) if len(ctx) + len(cont) - 1 > context]
    if unscorable or (too_long and not truncate):
        bad = unscorable or too_long
        longest = max(len(pairs[i][0]) + len(pairs[i][1]) - 1 for i in bad)
        what = "have a continuation longer than" if unscorable else "do not fit"
        raise DataError(f"task {task.name!r}: {len(bad)} of {len(pairs)} requests {what} the model's context of "
                        f"{context} tokens (the longest needs {longest} inputs; first: request {bad[0]})"
                        + ("" if unscorable else "; pass truncate=True (eval.truncate, --truncate) to keep the last "
                           f"{context} tokens of each"))
