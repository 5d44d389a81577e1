"""lm-evaluation-harness's `LM` interface for clusterlm checkpoints: any lm-eval task on a clusterlm model.

    pip install 'clusterlm[eval]'          # lm-eval (>= 0.4.13; no torch of its own)

    import lm_eval
    from clusterlm.eval.lm_eval_bridge import register
    register()                             # lm-eval's model registry now knows "clusterlm"
    out = lm_eval.simple_evaluate(model="clusterlm", model_args="checkpoint=runs/x,batch_size=16,device=cpu",
                                  tasks=["hellaswag"])
    # or an instance: simple_evaluate(model=ClusterLM(checkpoint="runs/x"), tasks=[...])

    clusterlm eval runs/x --lm-eval hellaswag,arc_easy             # the same from the command line
    clusterlm eval runs/x --lm-eval my_task --lm-eval-include tasks/   # local task YAMLs

The three request types go through clusterlm.eval.lm, batched (docs/eval_lm.md): `loglikelihood` and
`loglikelihood_rolling` follow lm-eval's definitions (TemplateLM._encode_pair, rolling windows) with
clusterlm's EOS document separator in place of a BOS; `generate_until` decodes through the one engine
with continuous batching, one call per distinct set of generation settings (`until` stop strings,
`max_gen_toks`, `do_sample`/`temperature`, `top_p`, `top_k`), greedy unless the task samples.

A chat model (a checkpoint with a chat_template.jinja, e.g. an SFT fine-tune) is asked as `clusterlm
chat` and `clusterlm eval --task` ask it: `simple_evaluate(..., apply_chat_template=True)` renders
the prompts with the checkpoint's own template (generate.text.ChatFormat; a model without one keeps
the plain 'User:/Assistant:' template), and its generations end at the template's end-of-turn token
(`<|end|>`) as at EOS, whatever the prompt format.

lm-eval 0.4.13 finds models only in its own table (lm_eval.models.MODEL_MAPPING): it has no
plug-in entry points, so the `lm_eval` command cannot reach "clusterlm"; `register()` adds it to
this process's registry, and `clusterlm eval --lm-eval` is the command line.

Inputs longer than the model's context are refused in one DataError naming how many (clusterlm's
rule, unlike lm-eval's HF model, which truncates silently) unless `truncate=True` in model_args.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from lm_eval.api.model import LM

from clusterlm.eval import lm
from clusterlm.generate.template import ChatTemplate
from clusterlm.generate.text import ChatFormat, chat_format

log = logging.getLogger(__name__)

MODEL_NAME = "clusterlm"
DEFAULT_BATCH_SIZE = 16
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default (HFLM.max_gen_toks)
# generation keys lm-eval tasks set that clusterlm reads; the others are logged and ignored
_GEN_KEYS = {"until", "max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens", "do_sample",
             "temperature", "top_p", "top_k", "seed"}


def _task_manager(task_manager_cls: Any, tasks: Sequence[str], include: Sequence[str]) -> Any:
    """lm-eval's TaskManager: over the --lm-eval-include folders alone when every task asked for is a
    plain task there (indexing lm-eval's thousands of bundled YAMLs takes ~18 s on a 2-core CPU);
    otherwise (a group or tag, which may name bundled tasks, or a task not there) over both."""
    if include:
        own = task_manager_cls(include_path=list(include), include_defaults=False)
        kinds = {t: getattr(own.task_index.get(t), "kind", None) for t in tasks}
        if all(k is not None and getattr(k, "name", "") == "TASK" for k in kinds.values()):
            return own
    return task_manager_cls(include_path=list(include) or None)


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"model_args {name}={value!r}: expected true or false")


def _batch_size(value: Any) -> int:
    if isinstance(value, str) and value.startswith("auto"):  # lm-eval's "auto"/"auto:N": no search here
        log.info("batch_size=%s: using %d (clusterlm does not search for a batch size)", value, DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    try:
        b = int(value)
    except (TypeError, ValueError):
        b = 0
    if b < 1:
        raise ValueError(f"model_args batch_size={value!r}: expected an integer >= 1")
    return b


def generation_settings(gen_kwargs: dict[str, Any], default_max_gen_toks: int) -> dict[str, Any]:
    """lm-eval generation kwargs -> generate_completions keywords: `until` (a string or a list) ->
    stops; max_gen_toks (or its aliases, lm-eval's priority order) -> max_new_tokens; do_sample false
    or temperature 0 -> greedy (lm_eval.models.utils.normalize_gen_kwargs's rules)."""
    if not isinstance(gen_kwargs, dict):
        raise ValueError(f"generate_until: generation kwargs must be a dict, got {type(gen_kwargs).__name__}")
    ignored = sorted(set(gen_kwargs) - _GEN_KEYS)
    if ignored:
        log.warning("generate_until: ignoring generation kwargs clusterlm does not use: %s", ", ".join(ignored))
    until = gen_kwargs.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    max_toks = next((gen_kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
                     if gen_kwargs.get(k) is not None), default_max_gen_toks)
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if gen_kwargs.get("do_sample") is False:
        temperature = 0.0
    seed = gen_kwargs.get("seed")
    return {"stops": tuple(s for s in until if s), "max_new_tokens": int(max_toks), "temperature": temperature,
            "top_p": gen_kwargs.get("top_p") if temperature > 0 else None,
            "top_k": gen_kwargs.get("top_k") if temperature > 0 else None,
            "seed": int(seed) if seed is not None else None}


class ClusterLM(LM):
    """A clusterlm checkpoint as an lm-eval model. `model_args`: checkpoint (a run directory,
    checkpoints folder or step folder), batch_size (default 16), device (auto, cpu, cuda),
    truncate (left-truncate over-long inputs instead of refusing them), max_gen_toks (default for
    tasks that set none, 256). Or pass a loaded `model` and `tokenizer` instead of a checkpoint, and
    the model's `chat_template` (default: the tokenizer's, which load_for_inference attaches)."""

    def __init__(self, checkpoint: str | None = None, batch_size: int | str = DEFAULT_BATCH_SIZE,
                 device: str | None = None, truncate: bool | str = False,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, max_batch_size: int | None = None, *,
                 model: Any = None, tokenizer: Any = None, chat_template: ChatTemplate | None = None) -> None:
        super().__init__()
        self.batch_size = _batch_size(batch_size)
        self.truncate = _as_bool(truncate, "truncate")
        self.max_gen_toks = int(max_gen_toks)
        del max_batch_size  # lm-eval passes it for "auto" batch sizes; clusterlm uses batch_size as given
        if (checkpoint is None) == (model is None):
            raise ValueError("ClusterLM needs model_args checkpoint=PATH (or a loaded model and tokenizer)")
        if model is None:
            from clusterlm.checkpoint.model_io import load_for_inference
            from clusterlm.device import resolve_device

            loaded = load_for_inference(str(checkpoint), device=resolve_device(device or "auto", "device"))
            model, tokenizer, chat_template = loaded.model, loaded.tokenizer, loaded.chat_template
            self.checkpoint = str(loaded.path)
        elif tokenizer is None:
            raise ValueError("ClusterLM(model=...) needs the model's tokenizer too")
        else:
            self.checkpoint = None
            if chat_template is None:
                chat_template = getattr(tokenizer, "chat_template", None)
        self.model, self.tokenizer = model, tokenizer
        # how the model is chatted with: its template and end-of-turn stop (ConfigError when the
        # tokenizer lacks the template's tokens), or the plain template
        self.chat = chat_format(tokenizer, chat_template) if chat_template is not None else ChatFormat(None)
        self._device = next(model.parameters()).device

    # ---- the three request types ---------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) of each request's `args` (context, continuation)."""
        pairs = [(r.args[0], r.args[1]) for r in requests]
        scores = lm.loglikelihood(self.model, self.tokenizer, pairs, batch_size=self.batch_size,
                                  truncate=self.truncate, progress=False if disable_tqdm else None)
        out = [(s.logprob, s.is_greedy) for s in scores]
        for p, o in zip(pairs, out):
            self.cache_hook.add_partial("loglikelihood", p, o)
        return out

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """log p(text) of each request's `args` (text,), scored in disjoint windows of the context."""
        texts = [r.args[0] for r in requests]
        scores = lm.loglikelihood_rolling(self.model, self.tokenizer, texts, batch_size=self.batch_size,
                                          progress=False if disable_tqdm else None)
        out = [logprob for logprob, _ in scores]
        for t, o in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (t,), o)
        return out

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """The continuation of each request's `args` (context, gen_kwargs), cut before the first of
        `until` or a chat model's end of turn; requests with the same settings decode together,
        results in input order."""
        groups: dict[tuple, list[int]] = {}
        settings: dict[tuple, dict[str, Any]] = {}
        for i, r in enumerate(requests):
            s = generation_settings(r.args[1], self.max_gen_toks)
            key = tuple(sorted(s.items()))
            settings[key] = s
            groups.setdefault(key, []).append(i)
        out: list[str] = [""] * len(requests)
        for key, idx in groups.items():
            done = lm.generate_completions(self.model, self.tokenizer, [requests[i].args[0] for i in idx],
                                           batch_size=self.batch_size, truncate=self.truncate,
                                           progress=False if disable_tqdm else None, stop_ids=self.chat.stop_ids,
                                           **settings[key])
            for i, c in zip(idx, done):
                out[i] = c.text
                self.cache_hook.add_partial("generate_until", requests[i].args, c.text)
        return out

    # ---- chat (lm-eval's --apply_chat_template) ------------------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return f"clusterlm-{self.tokenizer.kind}-{self.tokenizer.vocab_size}"

    def chat_template(self, chat_template: bool | str = False) -> str:
        """The template lm-eval records in its results: the checkpoint's Jinja source, or the plain one's name."""
        if self.chat.template is not None:
            return self.chat.template.source
        return "clusterlm plain: 'Role: content' paragraphs, then 'Assistant:'"

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt `clusterlm chat` gives this model (its checkpoint's chat template, else the plain
        one). add_generation_prompt=False: lm-eval's gen_prefix ends the history as an assistant
        message, which the model continues (ChatFormat.render's continue_final)."""
        return self.chat.render(chat_history, continue_final=not add_generation_prompt)


def register() -> None:
    """Add "clusterlm" to lm-eval's model registry (idempotent). lm-eval's own models are
    registered first: its get_model fills the registry only when it finds it empty."""
    import lm_eval.models  # noqa: F401 - registers lm-eval's built-in models (lazily)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=ClusterLM)


def evaluate_lm_eval(lm_model: ClusterLM, tasks: Sequence[str], *, include: Sequence[str] = (),
                     num_fewshot: int | None = None, limit: int | None = None,
                     log_samples: bool = False, apply_chat_template: bool = False) -> dict[str, Any]:
    """lm_eval.simple_evaluate of `lm_model` on lm-eval task names (with task YAMLs under `include`
    too), prompts in the checkpoint's chat template with apply_chat_template; its result dict
    (results, n-shot, n-samples, versions, configs, ...)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from clusterlm.errors import DataError

    register()
    manager = _task_manager(TaskManager, tasks, include)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        import difflib

        hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
        where = f" (with --lm-eval-include {', '.join(include)})" if include else ""
        raise DataError("unknown lm-eval task " + "; ".join(
            f"{t!r}" + (f" (close: {', '.join(h)})" if h else "") for t, h in hints.items())
            + f"{where}; `lm-eval ls tasks` lists them, or give a folder of task YAMLs with --lm-eval-include")
    return lm_eval.simple_evaluate(model=lm_model, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot,
                                   limit=limit, log_samples=log_samples, apply_chat_template=apply_chat_template)
