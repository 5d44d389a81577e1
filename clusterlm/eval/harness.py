"""Task evaluation of a loaded model: a task file in, metrics and per-example samples out.

    from clusterlm.eval.harness import DecodeOptions, resolve_task, run_task
    task = resolve_task("shakespeare_next_line")              # a bundled task, or a path
    metrics, samples = run_task(loaded.model, loaded.tokenizer, task, batch_size=16)

What the model is asked, by task kind (docs/tasks.md):
- generate: the prompt (or the chat messages through generate.text.render_chat), decoded by the
  one engine (eval.lm.generate_completions; greedy unless DecodeOptions says otherwise); the
  continuation, stripped of surrounding white space, is scored against the references. Default
  stop: a newline when every reference is one line (a translation pair), none otherwise.
- classify: zero-shot by log-likelihood: for each label, log p(" " + label | CLASSIFY_TEMPLATE
  with the text); the label with the highest sum wins (lm-eval's `acc` for multiple choice).
  Fine-tuned classification heads are not used here.
- choice: log p(delimiter + choice | context) for every choice (lm-eval's multiple_choice); the
  delimiter is a space, or nothing when the context already ends in white space; scored as
  `acc` (sum) and `acc_norm` (sum / characters).

Log-likelihoods and generations are batched (eval.lm); inputs longer than the model's context are
refused in one line naming how many unless `truncate` (then left-truncated: eval.lm's rule).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from clusterlm.errors import DataError
from clusterlm.eval.tasks import Task

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


def builtin_tasks() -> dict[str, Path]:
    """Bundled task files by name (clusterlm/data/tasks/NAME.jsonl)."""
    return {p.stem: p for p in sorted(TASKS_DIR.glob("*.jsonl"))}


def resolve_task(spec: str, **load_kwargs: Any) -> Task:
    """A bundled task's name, a task file, or a parallel pair "SRC,TGT" -> Task (eval.tasks.load_task)."""
    from clusterlm.eval.tasks import load_task

    bundled = builtin_tasks()
    if spec in bundled:
        return load_task(bundled[spec], name=spec, **load_kwargs)
    paths = [Path(p) for p in spec.split(",")] if "," in spec else [Path(spec)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"task {spec!r}: no such file {', '.join(missing)}; give a task file (.jsonl, .tsv), a "
                        f"parallel pair SRC,TGT, or a bundled task: {', '.join(bundled) or 'none'}")
    return load_task(tuple(paths) if len(paths) == 2 else paths[0], **load_kwargs)


def _delimiter(context: str) -> str:
    return "" if not context or context[-1].isspace() else " "


def _prompt(ex: Any) -> str:
    if ex.prompt is not None:
        return ex.prompt
    from clusterlm.generate.text import render_chat

    return render_chat([{"role": m.role, "content": m.content} for m in ex.messages])


def run_task(model: nn.Module, tokenizer: Any, task: Task, *, batch_size: int = 16,
             decode: DecodeOptions = DecodeOptions(), truncate: bool = False, device: Any = None,
             progress: bool | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(metrics, one sample record per example) of `model` on `task`."""
    from clusterlm.eval import lm
    from clusterlm.eval.scorers import choice_predictions, score_task

    ex = task.examples
    if not ex:
        raise DataError(f"task {task.name!r} has no examples")
    common = dict(batch_size=batch_size, device=device, truncate=truncate, progress=progress)
    samples: list[dict[str, Any]] = []
    if task.kind == "generate":
        prompts = [_prompt(e) for e in ex]
        stops = decode.stops
        if stops is None:
            stops = ("\n",) if all("\n" not in r.strip() for e in ex for r in e.references) else ()
        done = lm.generate_completions(model, tokenizer, prompts, max_new_tokens=decode.max_new_tokens,
                                       temperature=decode.temperature, top_p=decode.top_p, top_k=decode.top_k,
                                       seed=decode.seed, stops=stops, **common)
        preds = [c.text.strip() for c in done]
        metrics = score_task(task, preds)
        for i, (e, p, c) in enumerate(zip(ex, prompts, done)):
            samples.append({"index": i, "line": e.line, "prompt": p, "prediction": preds[i],
                            "references": list(e.references), "tokens": c.n_tokens, "finish_reason": c.finish_reason})
        metrics["decoding"] = {**asdict(decode), "stops": list(stops)}
    else:
        if task.kind == "classify":
            contexts = [CLASSIFY_TEMPLATE.format(text=e.text) for e in ex]
            options = [list(task.labels)] * len(ex)
        else:
            contexts = [e.context for e in ex]
            options = [list(e.choices) for e in ex]
        requests = [(c, _delimiter(c) + o) for c, opts in zip(contexts, options) for o in opts]
        scores = lm.loglikelihood(model, tokenizer, requests, **common)
        per_example, k = [], 0
        for opts in options:
            per_example.append([(s.logprob, s.n_tokens, len(o)) for s, o in zip(scores[k:k + len(opts)], opts)])
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
