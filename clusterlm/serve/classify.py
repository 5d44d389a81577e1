"""POST /classify: a fine-tuned classifier (models/classifier.py) served in vLLM's classification
API shape, with the same API key, body limit and error shape as the other routes (serve/app.py).

    curl -H "Authorization: Bearer $KEY" localhost:8000/classify \\
         -d '{"model": "sst2", "input": ["a gripping film", "a dull film"]}'
    {"id": "classify-...", "object": "list", "created": 1700000000, "model": "sst2",
     "data": [{"index": 0, "label": "positive", "probs": [0.08, 0.92], "num_classes": 2}, ...],
     "usage": {"prompt_tokens": 19, "total_tokens": 19, "completion_tokens": 0, "prompt_tokens_details": null}}

Each text is read as a classifier is trained on it: [EOS] + its ids (eval.lm.classifier_ids),
left-truncated to the model's context, or to the last `truncate_prompt_tokens` ids when the
request gives that (vLLM's field; -1 = the context). `probs` is the softmax of the head's logits in
the model's label order (GET /v1/models lists it; with several models served, `model` names
the classifier and is required); `label` is the most probable one. A request's
texts go through the model in batches of up to --max-batch rows, in inference mode, in a worker
thread (one request's forward passes at a time), so the event loop keeps answering; more than
--max-queue requests waiting is answered 429.

With a classifier loaded, /v1/completions and /v1/chat/completions answer 400 ("this model is a
classifier; use /classify"); with a language model loaded, /classify answers 400 naming the kind.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from clusterlm.serve.schemas import ClassifyRequest, new_id, now

log = logging.getLogger(__name__)

NOT_GENERATIVE = "this model is a classifier; use /classify"


def start_classifier(loaded: Any, state: dict, settings: Any) -> bool:
    """At start-up: when `loaded.model` is a classifier, warm it up (one forward pass) and fill
    `state` for the routes (no decode scheduler is started); False for a language model."""
    from clusterlm.eval.harness import model_labels
    from clusterlm.eval.lm import classify_ids
    from clusterlm.generate.engine import context_length

    labels = model_labels(loaded.model)
    if labels is None:
        return False
    classify_ids(loaded.model, [[loaded.tokenizer.eos_id]], device=settings.device, progress=False)
    state.update(loaded=loaded, tokenizer=loaded.tokenizer, context=context_length(loaded.model), labels=labels,
                 classify_lock=threading.Lock())
    log.info("serving classifier %s: labels %s, max_batch=%d", settings.model_name, ", ".join(labels),
             settings.max_batch)
    return True


def model_card(state: dict) -> dict:
    """Extra fields of the model's /v1/models entry: a classifier's labels, in the order of `probs`."""
    labels = state.get("labels")
    return {"labels": list(labels)} if labels else {}


def register_classify(app: FastAPI, pick: Callable[[str | None], Any], max_body_bytes: int,
                      read_json: Callable, err: Callable[..., Response]) -> None:
    """Add POST /classify to `app`. `pick(model)` is the app's: the served model (serve/models.py
    Served: its settings, state, readiness and metrics) a request names, or an error it raises
    (404 unknown, 400 none with several models); body reader and error response are the other
    routes', so limits and error shapes are theirs."""

    def run(sv: Any, ids: list[list[int]]) -> list:
        from clusterlm.eval.lm import classify_ids

        with sv.state["classify_lock"]:
            t0 = time.perf_counter()
            out = classify_ids(sv.state["loaded"].model, ids, batch_size=sv.settings.max_batch,
                               device=sv.settings.device, truncate=True, progress=False)
            sv.metrics.classify_time.observe(time.perf_counter() - t0)
        return out

    @app.post("/classify")
    async def classify(request: Request) -> Response:
        from clusterlm.eval.lm import classifier_ids

        req = await read_json(request, ClassifyRequest, max_body_bytes)
        sv = pick(req.model)
        state, settings = sv.state, sv.settings
        if not sv.ready.is_set():
            return err(503, "the model is still loading", type_="unavailable", headers={"Retry-After": "1"})
        labels = state.get("labels")
        if labels is None:
            arch = state["loaded"].config.model.arch  # type: ignore[union-attr]
            return err(400, f"this model is a language model (model.arch={arch!r}), not a classifier: /classify "
                            "needs a checkpoint with model.labels; use /v1/completions or /v1/chat/completions",
                       param="model")
        texts = req.texts  # valid Unicode: read_json answers 400 for unpaired surrogate escapes
        context, k = state["context"], req.truncate_prompt_tokens
        if k is not None and k > 0 and context is not None and k > context:
            return err(400, f"truncate_prompt_tokens={k} is larger than the model's context of {context} tokens",
                       param="truncate_prompt_tokens")
        keep = context if k is None or k < 0 else k  # None: an RNN reads any length
        if keep == 0:
            return err(400, "truncate_prompt_tokens=0 leaves no token to classify; give -1 or a value >= 1",
                       param="truncate_prompt_tokens")
        ids = [classifier_ids(state["tokenizer"], t) for t in texts]
        ids = [x[-keep:] if keep is not None else x for x in ids]
        waiting = state.setdefault("classify_waiting", [0])  # requests admitted and not yet answered
        if waiting[0] >= settings.max_queue + 1:
            return err(429, f"{waiting[0]} classify requests are waiting (the server's --max-queue is "
                            f"{settings.max_queue}); retry later", type_="rate_limit_error", headers={"Retry-After": "1"})
        waiting[0] += 1
        try:
            results = await asyncio.get_running_loop().run_in_executor(None, run, sv, ids)
        except Exception:
            log.exception("classifying %d inputs failed", len(ids))
            return err(500, "classifying the inputs failed; see the server log", type_="server_error")
        finally:
            waiting[0] -= 1
        n_tokens = sum(r.n_tokens for r in results)
        sv.metrics.classified.inc(len(results))
        sv.metrics.prompt_tokens.inc(n_tokens)
        data = [{"index": i, "label": r.label, "probs": r.probs, "num_classes": len(labels)}
                for i, r in enumerate(results)]
        return JSONResponse({"id": new_id("classify"), "object": "list", "created": now(),
                             "model": sv.name, "data": data,
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens, "completion_tokens": 0,
                                       "prompt_tokens_details": None}})
