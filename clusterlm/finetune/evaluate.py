"""A classifier's validation: mean loss and accuracy / precision / recall / F1 over batches of
(ids, label ids), as the trainer logs them for finetune.task = "classify".

    scores = evaluate_classifier(model, batches, labels, loss_fn, device=device)
    scores["loss"], scores["accuracy"], scores["macro_f1"]
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                        labels: tuple[str, ...], loss_fn: Callable, *, device: torch.device,
                        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                        ) -> dict[str, Any]:
    """{"loss": mean loss per example, "n": examples, and eval.scorers.score_classify's metrics}.
    The model is put in eval mode and its mode restored."""
    from clusterlm.eval.scorers import score_classify

    was = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    preds: list[int] = []
    gold: list[int] = []
    try:
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast():
                logits = model(x)
            total += loss_fn(logits, y, reduction="sum").double()
            preds += logits.argmax(-1).tolist()
            gold += y.tolist()
    finally:
        model.train(was)
    if not gold:
        raise ValueError("evaluate_classifier: no examples")
    scores = score_classify([labels[i] for i in preds], [labels[i] for i in gold], labels)
    return {"loss": float(total) / len(gold), **scores}
